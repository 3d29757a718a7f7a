"""Adapting the base model to a listener: support batches, the safe rule, and the one divergence check."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from pdmer.data.types import Curve
from pdmer.personal.names import ProfileError

if TYPE_CHECKING:
    from pdmer.personal.profile import Profile

log = logging.getLogger(__name__)

# calibrate / predict: sliding windows per pass of the model's sequence part (16: its matrix products
# run about a fifth faster than at 4, for a few MB), and steps per pass of its CNN (which bounds memory)
PREDICT_BATCH_WINDOWS = 16
PREDICT_BATCH_STEPS = 240
PRED_LIMIT = 5.0  # |curve| beyond this, on a [-1, 1] scale, is absurd
DIVERGE_FACTOR = 2.0  # a support loss that ends above this times its start has diverged


def predict_span(net, feats, start: int, stop: int, seq_len: int, hop: int, params=None) -> np.ndarray:
    """:func:`~pdmer.evaluation.inference.predict_steps` of steps ``[start, stop)`` of one song's features,
    with the windows and steps per pass of calibrate / predict (which bound their memory).

    Returns:
        (stop - start, 2) float32, columns (arousal, valence).
    """
    from pdmer.evaluation.inference import predict_steps

    return predict_steps(
        net,
        feats,
        start,
        stop,
        seq_len,
        hop,
        params,
        batch_windows=PREDICT_BATCH_WINDOWS,
        batch_steps=PREDICT_BATCH_STEPS,
    )


class AdaptationError(ProfileError):
    """An adaptation diverged or gave non-finite weights, losses or curves; nothing was saved."""


def adaptation_problem(
    losses: Sequence[float] | torch.Tensor | None = None,
    params: dict[str, torch.Tensor] | None = None,
    curves: dict[str, np.ndarray] | None = None,
    final_loss: float | None = None,
) -> str | None:
    """What is wrong with an adaptation's result, or None when it is sane.

    Wrong: a non-finite support loss (``losses``, one per step, or ``final_loss``, the loss of
    the adapted parameters), a non-finite adapted parameter, a non-finite curve or one beyond
    ``PRED_LIMIT`` in absolute value, or a final loss above ``DIVERGE_FACTOR`` times the first.
    Every argument is optional, so a caller checks what it has (``predict`` checks curves).

    Args:
        losses: (steps,) support loss before each inner step.
        params: adapted parameters, name -> tensor.
        curves: song id -> (T, 2) predicted curve.
        final_loss: support loss after the last step.

    Returns:
        one sentence naming the first problem found, or None.
    """
    ls = [float(x) for x in (losses if losses is not None else [])]
    if final_loss is not None:
        ls_all = ls + [float(final_loss)]
    else:
        ls_all = ls
    if any(not np.isfinite(x) for x in ls_all):
        return "the support loss became non-finite (" + ", ".join(f"{x:.3g}" for x in ls_all) + ")"
    for k, v in (params or {}).items():
        if not bool(torch.isfinite(v).all()):
            return f"the adapted parameter {k!r} holds {int((~torch.isfinite(v)).sum())} NaN or infinite value(s)"
    for sid, c in (curves or {}).items():
        c = np.asarray(c)
        if not np.isfinite(c).all():
            return f"the personal curve of {sid} holds {int((~np.isfinite(c)).sum())} NaN or infinite value(s)"
        peak = float(np.abs(c).max()) if c.size else 0.0
        if peak > PRED_LIMIT:
            return f"the personal curve of {sid} reaches {peak:.3g} on the [-1, 1] scale"
    if len(ls_all) >= 2 and ls_all[-1] > DIVERGE_FACTOR * ls_all[0]:
        return f"the support loss grew from {ls_all[0]:.3g} to {ls_all[-1]:.3g} instead of falling"
    return None


def check_finite_adaptation(
    losses: Sequence[float] | torch.Tensor | None = None,
    params: dict[str, torch.Tensor] | None = None,
    curves: dict[str, np.ndarray] | None = None,
    final_loss: float | None = None,
    *,
    what: str = "the adaptation",
    advice: str = "",
) -> None:
    """Raise :class:`AdaptationError` when :func:`adaptation_problem` finds one.

    Args:
        what: who adapted, for the message (e.g. "calibration of 'alice'").
        advice: what to do about it, appended to the message.
    """
    problem = adaptation_problem(losses, params, curves, final_loss)
    if problem is not None:
        raise AdaptationError(f"{what} diverged: {problem}. {advice}".strip())


def _safe_rule(
    net,
    feats: dict,
    curves: list[Curve],
    generic: dict,
    weights,
    support_loss,
    steps: int,
    lr: float,
    seq_len: int,
    hop: int,
    basis=None,
) -> dict:
    """The safe rule's per-listener part (:mod:`pdmer.personalize`): support statistics, the listener's
    response to the music (with the base run's ``basis``, :mod:`pdmer.response`; None: none) and the
    held-out check.

    The check adapts again on the first 2/3 of each rated span and scores the rule on the last third.
    """
    from pdmer import response as R
    from pdmer.meta.maml import adapt
    from pdmer.personalize import Support, describe, gate, held_out_check

    ratings = np.concatenate([c.values for c in curves])
    stats = Support.fit(ratings, np.concatenate([generic[c.song_id] for c in curves]))

    def design(c: Curve) -> np.ndarray:
        return R.span(basis.design(feats[c.song_id].local), c.start_step, c.end_step)

    designs = None if basis is None else [design(c) for c in curves]
    beta = None if designs is None else R.fit_songs(designs, [c.values - generic[c.song_id] for c in curves])
    check = None
    if any(weights.gate):
        device = next(net.parameters()).device

        def adapted_on(fit: list[Curve]) -> list[np.ndarray]:
            p_fit, _ = adapt(net, _support_batches(fit, feats, seq_len, device), support_loss, steps, lr)
            return [predict_span(net, feats[c.song_id], c.start_step, c.end_step, seq_len, hop, p_fit) for c in curves]

        check = held_out_check(curves, [generic[c.song_id] for c in curves], adapted_on, designs)
    use = gate(check, weights)
    return {
        "weights": weights,
        "stats": stats,
        "basis": basis,
        "response": beta,  # (P, 2) or None
        "response_curves": {c.song_id: R.curve(x, beta) for c, x in zip(curves, designs)} if designs else {},
        "use": use,
        "held_out_steps": 0 if check is None else len(check.ratings),
        "summary": describe(weights, use),
    }


def _apply_profile_rule(profile: "Profile", generic: np.ndarray, adapted: np.ndarray, local=None) -> np.ndarray:
    """A profile's personal curve: the safe rule with the weights, support statistics, response and checks
    it recorded. ``local``: the song's log-Mel patches (T, frames, mels), for the response component."""
    from pdmer import response as R
    from pdmer.personalize import Support, Weights, combine

    rule = profile.info.get("personalization")
    if rule is None:
        raise ProfileError(
            f"profile {profile.name!r} ({profile.path}) has no 'personalization' record: it was made "
            f"before the safe rule; calibrate {profile.name!r} again"
        )
    stats = Support(np.asarray(rule["support"]["offset"], float), np.asarray(rule["support"]["scale"], float))
    use = np.array([bool(rule["use"]["arousal"]), bool(rule["use"]["valence"])])
    weights = Weights.from_json(rule["weights"])
    resp = None
    if any(weights.response) and rule.get("response") is not None:  # profiles before it have none: zeros
        try:
            basis = R.ResponseBasis.from_json(rule["response"]["basis"])
            beta = np.asarray(rule["response"]["beta"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"profile {profile.name!r} ({profile.path}): unreadable response record ({e})") from None
        if local is None:
            raise ProfileError(f"profile {profile.name!r}: its response component needs the song's features")
        design = basis.design(local)
        if beta.shape != (design.shape[-1], 2) or not np.isfinite(beta).all():
            raise ProfileError(
                f"profile {profile.name!r} ({profile.path}): response beta of shape {beta.shape} does not fit "
                f"its basis ({design.shape[-1]} features x 2)"
            )
        resp = R.curve(design[: len(generic)], beta)
    return combine(generic, adapted, stats, weights, use, resp).astype(np.float32)


def _support_batches(curves: list[Curve], feats: dict, seq_len: int, device) -> list[tuple]:
    """One batch per song: its whole rated span cut into windows of ``seq_len`` steps.

    A 30 s rating (60 steps) is one window, the paper's support sequence; a longer one adds
    windows (the last one aligned to the end), a shorter one is a single shorter window.
    """
    from pdmer.evaluation.inference import window_starts
    from pdmer.meta.tasks import make_batch

    batches = []
    for c in curves:
        length = min(seq_len, c.n_steps)
        crops = [(c, s, length) for s in window_starts(c.n_steps, length, length)]
        batches.append(make_batch(crops, feats, device))  # (W, length, ...)
    return batches
