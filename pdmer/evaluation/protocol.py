"""The PDMER evaluation protocol: one listener adapted and scored.

Protocol (per listener of the evaluated split): support = ``support_songs`` songs they
rated (chosen once, deterministically), query = all their other songs, whole curves.
Reported conditions:

- ``generic``: the model without adaptation (one curve for every listener);
- ``personalized``: the safe rule (:mod:`pdmer.personalize`): offset, scale, MAML, shape and response components
  with population weights chosen on validation listeners, and a held-out check per listener;
- ``maml``: plain MAML, the model after the inner loop on the support song(s);
- ``offset``: offset-only personalization, no training: the generic curve shifted by the
  listener's mean error of the generic model on the support sequence(s) (per dimension);
- ``others``: the leave-one-out average of the other listeners' curves of the song, and
  ``ridge``: a linear probe of the global descriptor (:mod:`pdmer.references`), both listener-blind;
- ``consensus``: the population's averaged curve, when the dataset knows it (the best a
  listener-blind prediction of the ratings could aim at);
- ``oracle``: the listener's own noise-free curve, when known (synthetic data): the best
  score any model could reach against their noisy ratings.

Metrics are computed per (listener, query song), then averaged.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from torch import nn

from pdmer.data.types import Curve, Dataset
from pdmer.evaluation.inference import predict_curve
from pdmer.meta.maml import Params, adapt
from pdmer.meta.tasks import make_batch
from pdmer.metrics import song_metrics
from pdmer.personalize import Check, Parts, Support, Weights, combine, gate, held_out_check
from pdmer.references import References
from pdmer.response import ResponseBasis
from pdmer.response import curve as response_curve
from pdmer.response import fit_songs as fit_response
from pdmer.response import span as design_span

log = logging.getLogger(__name__)


CONDITIONS = ("generic", "personalized", "maml", "offset", "others", "ridge", "consensus", "oracle")


def choose_support(curves: list[Curve], k: int, seed: int, listener: str, draw: int = 0) -> list[int] | None:
    """Indices of the support curves of a listener: fixed by (seed, listener id, draw).

    Draw 0 is the evaluation protocol's support. Draws 1, 2, ... (the safe rule's choice on
    validation listeners, :func:`pdmer.evaluation.split.rule_parts`) take ``k`` curves not used by an
    earlier draw; None when too few are left.
    """
    key = [seed, zlib.crc32(listener.encode())]
    used: set[int] = set()
    for j in range(draw + 1):
        rng = np.random.default_rng(key if j == 0 else key + [j])
        free = [i for i in range(len(curves)) if i not in used]
        if len(free) < k:
            return None
        pick = sorted(int(free[i]) for i in rng.choice(len(free), size=k, replace=False))
        used.update(pick)
    return pick


def support_batch(curves: list[Curve], features: dict, seq_len: int, device) -> list[tuple]:
    """The support sequences: the first ``seq_len`` steps of each support curve (30 s, as the paper's protocol)."""
    return [make_batch([(c, 0, min(seq_len, c.n_steps))], features, device) for c in curves]


def support_loss_fn(loss_fn):
    """Sum a task loss over several support sequences (they may differ in length)."""

    def f(model, params, buffers, batches):
        return sum(loss_fn(model, params, buffers, b) for b in batches) / len(batches)

    return f


@dataclass
class ListenerResult:
    listener: str
    support: list[str]
    per_song: dict[str, dict[str, dict[str, float]]]  # condition -> song -> metrics
    curves: dict[str, dict[str, np.ndarray]]  # condition -> song -> (T, 2), incl. "ratings"
    parts: list[Parts] = field(default_factory=list)  # what the safe rule combines (one per adaptation)
    use: list[list[bool]] = field(default_factory=list)  # per part: dimensions that passed the held-out check


@dataclass(frozen=True)
class Adaptation:
    """How a listener is adapted to and scored (shared by both test protocols).

    Attributes:
        loss_fn: the task loss of the inner loop (:func:`pdmer.training.context.make_loss_fn`).
        inner_steps, inner_lr: the inner loop (``meta.*``).
        seq_len: support length and sliding-window length in steps (``train.seq_len``).
        hop: sliding-window hop in steps (``eval.hop``).
        support_songs: k of k-shot (``eval.support_songs``; the songs protocol only).
        seed: fixes each listener's support songs (``train.seed``).
        min_query_steps: the within-song protocol skips curves that leave fewer query steps.
        check: run the safe rule's held-out check (a second adaptation on the support's first part).
        draw: which support draw of the listener (:func:`choose_support`; 0 = the protocol's).
        response: the run's learned response basis for the safe rule's ``response`` component
            (:mod:`pdmer.response`); None: that component is zero.
        generic: the generic curves already predicted, ``(song, start step, stop step) -> (T, 2)``
            (read-only arrays): the listeners and support draws of one evaluation with the same
            weights share them, so each span is predicted once (:func:`generic_curve`); None:
            none kept. Never share one between different weights.
    """

    loss_fn: Callable
    inner_steps: int
    inner_lr: float
    seq_len: int
    hop: int
    support_songs: int = 1
    seed: int = 0
    min_query_steps: int = 2
    check: bool = True
    draw: int = 0
    response: ResponseBasis | None = None
    generic: dict | None = None


def generic_curve(model, features: dict, c: Curve, how: Adaptation) -> np.ndarray:
    """The generic model's curve on ``c``'s steps, predicted once per span where ``how.generic`` keeps them."""
    if how.generic is None:
        return predict_curve(model, features[c.song_id], c, how.seq_len, how.hop)
    key = (c.song_id, c.start_step, c.end_step)
    hit = how.generic.get(key)
    if hit is None:
        hit = predict_curve(model, features[c.song_id], c, how.seq_len, how.hop)
        hit.setflags(write=False)  # shared between listeners: nobody may change it in place
        how.generic[key] = hit
    return hit


def _design(features: dict, how: Adaptation, c: Curve) -> np.ndarray | None:
    """The response design matrix on a curve's steps (None without a basis)."""
    if how.response is None:
        return None
    return design_span(how.response.design(features[c.song_id].local), c.start_step, c.end_step)


def _support_parts(
    model, features: dict, support: list[Curve], how: Adaptation
) -> tuple[Params, Support, Check | None, np.ndarray | None]:
    """Adapt on the support sequences; the safe rule's support statistics, held-out check and response."""
    device = next(model.parameters()).device
    seqs = [Curve(c.song_id, c.annotator_id, c.start_step, c.values[: min(how.seq_len, c.n_steps)]) for c in support]
    params, _ = adapt(
        model,
        support_batch(seqs, features, how.seq_len, device),
        support_loss_fn(how.loss_fn),
        how.inner_steps,
        how.inner_lr,
    )
    generic = [generic_curve(model, features, c, how) for c in seqs]
    stats = Support.fit(np.concatenate([c.values for c in seqs]), np.concatenate(generic))
    designs = None if how.response is None else [_design(features, how, c) for c in seqs]
    beta = None if designs is None else fit_response(designs, [c.values - g for c, g in zip(seqs, generic)])

    def adapted_on(fit: list[Curve]) -> list[np.ndarray]:
        p_fit, _ = adapt(
            model,
            support_batch(fit, features, how.seq_len, device),
            support_loss_fn(how.loss_fn),
            how.inner_steps,
            how.inner_lr,
        )
        return [predict_curve(model, features[c.song_id], c, how.seq_len, how.hop, p_fit) for c in seqs]

    check = held_out_check(seqs, generic, adapted_on, designs) if how.check else None
    return params, stats, check, beta


def evaluate_listener(
    model: nn.Module,
    dataset: Dataset,
    features: dict,
    listener: str,
    curves: list[Curve],
    how: Adaptation,
    keep_curves: bool = False,
    queries: list[Curve] | None = None,
    references: References | None = None,
) -> ListenerResult:
    """Score one listener: support song(s) -> adapted model; every other song is a query.

    ``queries`` given (song-disjoint split): the support is drawn from ``curves`` (the
    listener's train-song curves) and only ``queries`` (their val / test songs) are scored.
    The safe rule's condition ("personalized") is filled in by :func:`apply_weights`.
    """
    idx = choose_support(curves, how.support_songs, how.seed, listener, how.draw)
    if idx is None:
        raise ValueError(f"listener {listener}: too few curves for support draw {how.draw}")
    support = [curves[i] for i in idx]
    if queries is None:
        queries = [c for i, c in enumerate(curves) if i not in idx]
    model.eval()
    params, stats, check, beta = _support_parts(model, features, support, how)
    offset = stats.offset.astype(np.float32)  # the offset condition's shift: mean support error of the generic model
    result = ListenerResult(
        listener, [c.song_id for c in support], {c: {} for c in CONDITIONS}, {c: {} for c in (*CONDITIONS, "ratings")}
    )
    part = Parts(stats, check, {}, listener)
    for q in queries:
        part.queries[q.song_id] = _score_query(
            model, dataset, features, listener, q, params, how, result, keep_curves, offset, references, beta
        )
    result.parts.append(part)
    return result


def evaluate_within_song(
    model: nn.Module,
    dataset: Dataset,
    features: dict,
    listener: str,
    curves: list[Curve],
    how: Adaptation,
    keep_curves: bool = False,
    references: References | None = None,
) -> ListenerResult | None:
    """The DEAM authors' test protocol for one listener (dsaml.md, 'Data').

    For each of the listener's curves longer than ``seq_len + min_query_steps - 1`` steps (``how``): the
    model is adapted on the curve's first ``seq_len`` steps (30 s) and scored on the rest of that
    song. Curves too short to leave a query are skipped.

    Returns:
        ListenerResult (``support`` lists "song[first N steps]"), or None when no curve is long enough.
    """
    seq_len = how.seq_len
    model.eval()
    result = ListenerResult(listener, [], {c: {} for c in CONDITIONS}, {c: {} for c in (*CONDITIONS, "ratings")})
    for c in curves:
        if c.n_steps < seq_len + how.min_query_steps:
            continue
        support = Curve(c.song_id, c.annotator_id, c.start_step, c.values[:seq_len])
        query = Curve(c.song_id, c.annotator_id, c.start_step + seq_len, c.values[seq_len:])
        params, stats, check, beta = _support_parts(model, features, [support], how)
        offset = stats.offset.astype(np.float32)
        part = Parts(stats, check, {}, listener)
        part.queries[query.song_id] = _score_query(
            model, dataset, features, listener, query, params, how, result, keep_curves, offset, references, beta
        )
        result.parts.append(part)
        result.support.append(f"{c.song_id}[first {seq_len} steps]")
    if not result.parts:
        return None
    return result


def apply_weights(results: list[ListenerResult], weights: Weights, keep_curves: bool = False) -> None:
    """Fill the ``personalized`` condition (the safe rule with ``weights``) of each result, in place."""
    for r in results:
        r.per_song["personalized"] = {}
        r.curves["personalized"] = {}
        r.use = []
        for part in r.parts:
            use = gate(part.check, weights)
            r.use.append(use.tolist())
            for sid, (ratings, g, a, *resp) in part.queries.items():
                p = combine(g, a, part.support, weights, use, resp[0] if resp else None)
                r.per_song["personalized"][sid] = song_metrics(p, ratings)
                if keep_curves:
                    r.curves["personalized"][sid] = p.astype(np.float32)


def _score_query(
    model,
    dataset: Dataset,
    features: dict,
    listener: str,
    q: Curve,
    params: Params,
    how: Adaptation,
    result: ListenerResult,
    keep_curves: bool,
    offset: np.ndarray | None = None,
    references: References | None = None,
    beta: np.ndarray | None = None,
) -> tuple[np.ndarray, ...]:
    """Predict one query curve (every condition but the safe rule's) and score it.

    Returns:
        (ratings, generic, adapted) of the query, and its response curve when ``beta`` is given
        (the listener's response, :mod:`pdmer.response`): what the safe rule combines.
    """
    f = features[q.song_id]
    preds = {
        "generic": generic_curve(model, features, q, how),
        "maml": predict_curve(model, f, q, how.seq_len, how.hop, params),
    }
    if offset is not None:
        preds["offset"] = preds["generic"] + offset
    if references is not None:
        preds.update(references.predictions(listener, q, f))
    # the consensus as a prediction of a listener's ratings (not of itself: PMEmo's only "listener")
    if (
        dataset.consensus
        and q.song_id in dataset.consensus
        and listener != "consensus"
        and _covers(dataset.consensus[q.song_id], q)
    ):
        preds["consensus"] = _aligned(dataset.consensus[q.song_id], q)
    if dataset.oracle and (listener, q.song_id) in dataset.oracle:
        preds["oracle"] = _aligned(dataset.oracle[(listener, q.song_id)], q)
    for cond, p in preds.items():
        result.per_song[cond][q.song_id] = song_metrics(p, q.values)
        if keep_curves:
            result.curves[cond][q.song_id] = p
    if keep_curves:
        result.curves["ratings"][q.song_id] = q.values
    if beta is None:
        return q.values, preds["generic"], preds["maml"]
    return q.values, preds["generic"], preds["maml"], response_curve(_design(features, how, q), beta)


def _covers(reference: Curve, target: Curve) -> bool:
    return reference.start_step <= target.start_step and target.end_step <= reference.end_step


def _aligned(reference: Curve, target: Curve) -> np.ndarray:
    """``reference``'s values on ``target``'s steps (they must cover them)."""
    off = target.start_step - reference.start_step
    if off < 0 or off + target.n_steps > reference.n_steps:
        raise ValueError(f"reference curve of {reference.song_id!r} does not cover the rated steps")
    return reference.values[off : off + target.n_steps]
