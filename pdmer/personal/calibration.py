"""``calibrate``: adapt the meta-trained model to one listener and save their profile."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from pdmer import __version__, store
from pdmer.config import check_setting
from pdmer.data.types import STEP_S, Curve, DataError
from pdmer.features.audio import audio_by_song
from pdmer.personal.adaptation import (
    AdaptationError,
    _safe_rule,
    _support_batches,
    check_finite_adaptation,
    predict_span,
)
from pdmer.personal.base import BaseModel, load_base_model
from pdmer.personal.names import (
    FIT_FILE,
    PROFILE_FILE,
    PROFILE_FORMAT,
    PROFILE_VERSION,
    RATINGS_FILE,
    WEIGHTS_FILE,
    _display,
    profile_dir,
)
from pdmer.personal.profile import (
    Profile,
    _busy,
    _json_bytes,
    _legacy_complete,
    _weights_bytes,
)
from pdmer.personal.ratings import _fit_to_audio, _read_ratings
from pdmer.personal.writers import _plot_fit
from pdmer.personalize import combine

log = logging.getLogger(__name__)


def calibrate(
    name: str,
    audio: str | Path | Iterable[str | Path],
    ratings: str | Path,
    model: str | Path | None = None,
    *,
    annotators_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    keep_history: bool = False,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    device: str | None = None,
    plot: bool = True,
    base: BaseModel | None = None,
) -> Profile:
    """Adapt the meta-trained model to one listener and save their profile.

    The adaptation is the inner loop of meta-training (:func:`pdmer.meta.maml.adapt`, the
    DSAML loss of the base run): ``inner_steps`` SGD steps at ``inner_lr`` on the whole rated
    span of every song given (one song = one-shot, more = k-shot; the loss is averaged over
    songs). The profile replaces an existing one only once completely written.

    Args:
        name: the listener (letters, digits, ``-``, ``_``).
        audio: one audio file or several; each must be rated in ``ratings`` (song id = file stem).
        ratings: CSV ``song_id,annotator_id,time_s,valence,arousal`` or ``time_s,valence,arousal``
            (one song), any rate, values on the [-1, 1] scale.
        model: base run folder; None = the latest finished run in ``runs_dir``.
        annotators_dir: where profiles live (None = ``<repo>/annotators``).
        runs_dir: where runs live (None = ``<repo>/runs``).
        keep_history: move a replaced profile to ``<annotators>/.history/<name>/<UTC time>/``
            instead of deleting it.
        inner_steps: None = the base run's ``meta.inner_steps``.
        inner_lr: None = the base run's ``meta.inner_lr``.
        device: None = the base run's ``runtime.device``.
        plot: write ``fit.png``.
        base: an already loaded base model (then ``model``, ``runs_dir``, ``device`` are unused).

    Returns:
        Profile: the saved profile (``profile.info`` holds the fit metrics).

    Raises:
        ProfileError: bad name, no usable base run, another calibration of ``name`` running now;
            :class:`AdaptationError` when the adaptation diverged (non-finite or absurd weights,
            losses or curves, see :func:`check_finite_adaptation`): then nothing is saved.
        DataError: bad audio or ratings (see :func:`read_ratings`), ratings beyond the audio.
        ConfigError: ``inner_steps`` / ``inner_lr`` out of range (:func:`pdmer.config.check_setting`).
    """
    dest = profile_dir(name, annotators_dir)
    paths = [Path(audio)] if isinstance(audio, (str, Path)) else [Path(a) for a in audio]
    if not paths:
        raise DataError("calibrate needs at least one rated audio file")
    audio_map = audio_by_song(paths, "the ratings could not say which file they rate")
    ratings = Path(ratings)
    _check_settings(inner_steps, inner_lr)
    curves, rates = _read_ratings(ratings, list(audio_map), name)  # cheap checks before loading anything heavy
    job = _Job(name, dest, audio_map, ratings, curves, rates, inner_steps, inner_lr, keep_history, plot)
    return _calibrate_checked(job, lambda: base or load_base_model(model, runs_dir, device))


def _check_settings(inner_steps: int | None, inner_lr: float | None) -> None:
    """``inner_steps`` / ``inner_lr`` in range (:func:`pdmer.config.check_setting`), when given."""
    if inner_steps is not None:
        check_setting("meta.inner_steps", inner_steps, "inner_steps")
    if inner_lr is not None:
        check_setting("meta.inner_lr", inner_lr, "inner_lr")


@dataclass(frozen=True)
class _Job:
    """One listener's calibration once its cheap checks passed: what :func:`calibrate` was given, checked.

    Shared with :func:`pdmer.personal.batch.calibrate_many`, which passes ``feats`` (song id -> features,
    computed once per song for all listeners) and ``ratings_bytes`` (what ``ratings.csv`` holds: this
    listener's rows of a study file; None = the bytes of ``ratings``).
    """

    name: str
    dest: Path  # the profile folder
    audio_map: dict[str, Path]  # song id -> audio file
    ratings: Path
    curves: list[Curve]
    rates: dict  # song id -> the ratings' rate (profile.json)
    inner_steps: int | None  # None: the base run's
    inner_lr: float | None
    keep_history: bool
    plot: bool
    feats: dict | None = None
    ratings_bytes: bytes | None = None


def _calibrate_checked(job: _Job, load_base: Callable[[], BaseModel]) -> Profile:
    """Take the profile's lock, repair what crashed calibrations left, load the base model, calibrate."""
    root = job.dest.parent
    try:
        with store.locked(root, job.name, what="calibrated"):  # one calibration of a name at a time
            store.repair(root, job.name, _legacy_complete)  # what a crashed calibration of this name left
            store.repair_all(root, _legacy_complete)  # and of any other name not being calibrated now
            return _calibrate_locked(job, load_base())
    except store.StoreBusyError as e:
        raise _busy(e, job.name) from None


def _calibrate_locked(job: _Job, base: BaseModel) -> Profile:
    """:func:`calibrate` with the profile's lock held: adapt, check, apply the safe rule, install the profile."""
    log.info("model: %s (%s)", _display(base.run), base.how)
    if warning := base.synthetic_warning(list(job.audio_map.values())):
        log.warning(warning)
    cfg = base.cfg
    steps = cfg.meta.inner_steps if job.inner_steps is None else int(job.inner_steps)
    lr = cfg.meta.inner_lr if job.inner_lr is None else float(job.inner_lr)
    feats = {s: job.feats[s] if job.feats is not None else base.features(p) for s, p in job.audio_map.items()}
    curves, trimmed = _fit_to_audio(job.curves, feats, job.audio_map, job.ratings)
    ad, fc = _adapt_checked(job, base, curves, feats, steps, lr)
    fit = _fit_metrics(curves, fc)
    _log_personalization(job.name, curves, fc.safe)
    base_info = base.describe()
    info = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "name": job.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pdmer_version": __version__,
        "base": {**base_info, "problem": cfg.problem},
        "adaptation": _adaptation_info(cfg, steps, lr, ad),
        "songs": _songs_info(curves, feats, job.audio_map),
        "personalization": _personalization_info(fc.safe),
        "trimmed": trimmed,
        "ratings": _ratings_info(job, curves),
        "fit": fit,
        "files": {"weights": WEIGHTS_FILE, "ratings": RATINGS_FILE, "plot": FIT_FILE if job.plot else None},
    }
    weights_meta = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "name": job.name,
        **{f"base_{k}": v for k, v in base_info.items()},
    }
    files = {
        WEIGHTS_FILE: _weights_bytes(ad.changed, weights_meta),
        RATINGS_FILE: job.ratings.read_bytes() if job.ratings_bytes is None else job.ratings_bytes,
    }
    if job.plot:
        png = io.BytesIO()
        _plot_fit(png, curves, fc.generic, fc.personal, fit, job.name)
        files[FIT_FILE] = png.getvalue()
    files[PROFILE_FILE] = _json_bytes(info)
    kept = store.install(job.dest.parent, job.name, files, job.keep_history)
    if kept is not None:
        log.info("%s: previous profile kept in %s", job.name, kept)
    m = fit["mean"]
    log.info(
        "%s: profile written to %s (fit on support, CCC mean: generic %.3f, personal %.3f)",
        job.name,
        job.dest,
        m["generic"]["ccc_mean"],
        m["personalized"]["ccc_mean"],
    )
    return Profile(job.name, job.dest, info, ad.changed)


def _adapt_checked(
    job: _Job, base: BaseModel, curves: list[Curve], feats: dict, steps: int, lr: float
) -> tuple[_Adaptation, _SupportCurves]:
    """Adapt, check for divergence, apply the safe rule; a diverged base-run inner loop falls back to generic.

    With the user's own inner loop (``inner_steps`` / ``inner_lr`` given) a divergence is their
    setting's doing: :class:`AdaptationError`, and nothing is saved.
    """
    ad = _adapt(base, job.name, curves, feats, steps, lr)
    what = f"calibration of {job.name!r}"
    own = job.inner_steps is not None or job.inner_lr is not None  # the user's inner loop, not the base run's
    advice = (
        f"Nothing was saved{' (the existing profile is unchanged)' if job.dest.exists() else ''}; lower the inner "
        f"learning rate (--inner-lr, {lr:g} here) or the number of steps (--inner-steps, {steps} here)."
        if own
        else ""
    )
    try:
        check_finite_adaptation(ad.losses, ad.params, final_loss=ad.final_loss, what=what, advice=advice)
        return ad, _support_curves(base, curves, feats, ad, steps, lr, what, advice)
    except AdaptationError as e:
        if own:  # settings the user chose: tell them, save nothing
            raise
        # the base run's own inner loop diverged on these ratings: the safe rule's fallback, the generic model
        log.warning("%s: your profile falls back to the generic model (your curves are the generic ones)", e)
        return _generic_fallback(base, curves, feats, ad, str(e))


def _ratings_info(job: _Job, curves: list[Curve]) -> dict:
    """profile.json's ``ratings``: where they came from and how they were resampled."""
    return {
        "file": RATINGS_FILE,
        "source": str(job.ratings),
        "annotator_id": curves[0].annotator_id,
        "scale": "deam",
        "resampled_to_hz": 1 / STEP_S,
        "per_song": job.rates,
    }


@dataclass
class _Adaptation:
    """One listener's inner loop: its support, loss, adapted parameters and what they changed."""

    support: list[tuple]
    support_loss: Callable
    params: dict[str, torch.Tensor]
    losses: list
    final_loss: float
    learned_lr: bool
    changed: dict[str, torch.Tensor]


def _adapt(base: BaseModel, name: str, curves: list[Curve], feats: dict, steps: int, lr: float) -> _Adaptation:
    """The inner loop of meta-training on the whole rated span of every song (not yet checked for divergence)."""
    from pdmer.evaluation.protocol import support_loss_fn
    from pdmer.meta.maml import LR_PREFIX, adapt, split_state
    from pdmer.training.context import make_loss_fn

    cfg = base.cfg
    net = base.model.eval()
    t0 = time.perf_counter()
    support = _support_batches(curves, feats, cfg.train.seq_len, base.device)
    support_loss = support_loss_fn(make_loss_fn(cfg))
    params, losses = adapt(net, support, support_loss, steps, lr)
    start, rest = split_state(net)
    with torch.no_grad():
        final_loss = float(support_loss(net, params, {k: v.detach() for k, v in rest.items()}, support))
    learned_lr = any(k.startswith(LR_PREFIX) for k in rest)
    changed = {k: v.cpu() for k, v in params.items() if not torch.equal(v, start[k].detach())}
    log.info(
        "%s: adapted in %.1f s, %d steps at lr %g, support loss %.4f -> %.4f",
        name,
        time.perf_counter() - t0,
        steps,
        lr,
        float(losses[0]),
        final_loss,
    )
    return _Adaptation(support, support_loss, params, losses, final_loss, learned_lr, changed)


@dataclass
class _SupportCurves:
    """Curves on the support songs (song id -> (T, 2)): generic, adapted (MAML) and personal (the safe rule's)."""

    generic: dict[str, np.ndarray]
    adapted: dict[str, np.ndarray]
    personal: dict[str, np.ndarray]
    safe: dict


def _support_curves(
    base: BaseModel, curves: list[Curve], feats: dict, ad: _Adaptation, steps: int, lr: float, what: str, advice: str
) -> _SupportCurves:
    """Generic and adapted curves of the rated spans, the adapted ones checked, then the safe rule applied."""

    net = base.model
    seq_len, hop = base.cfg.train.seq_len, base.cfg.eval.hop
    generic, adapted = {}, {}
    for c in curves:
        f = feats[c.song_id]
        generic[c.song_id] = predict_span(net, f, c.start_step, c.end_step, seq_len, hop)
        adapted[c.song_id] = predict_span(net, f, c.start_step, c.end_step, seq_len, hop, ad.params)
    check_finite_adaptation(curves=adapted, what=what, advice=advice)
    safe = _safe_rule(
        net, feats, curves, generic, base.rule, ad.support_loss, steps, lr, seq_len, hop, base.response_basis
    )
    personal = {
        sid: combine(
            generic[sid], adapted[sid], safe["stats"], safe["weights"], safe["use"], safe["response_curves"].get(sid)
        ).astype(np.float32)
        for sid in generic
    }
    return _SupportCurves(generic, adapted, personal, safe)


def _generic_fallback(
    base: BaseModel, curves: list[Curve], feats: dict, ad: _Adaptation, why: str
) -> tuple[_Adaptation, _SupportCurves]:
    """A diverged adaptation replaced by none: no adapted weights, the generic curve, the reason recorded."""
    from pdmer.meta.maml import split_state
    from pdmer.personalize import Support, Weights

    net, seq_len, hop = base.model, base.cfg.train.seq_len, base.cfg.eval.hop
    generic = {c.song_id: predict_span(net, feats[c.song_id], c.start_step, c.end_step, seq_len, hop) for c in curves}
    ratings = np.concatenate([c.values for c in curves])
    safe = {
        "weights": Weights(chosen_on=f"fallback: {why}"),
        "stats": Support.fit(ratings, np.concatenate([generic[c.song_id] for c in curves])),
        "use": np.zeros(2, dtype=bool),
        "held_out_steps": 0,
        "summary": f"{why}: your curves are the generic ones (calibrate again, or rate another song)",
        "fallback": why,
    }
    start, _ = split_state(net)
    params = {k: v.detach() for k, v in start.items()}
    return replace(ad, params=params, changed={}), _SupportCurves(generic, generic, generic, safe)


def _fit_metrics(curves: list[Curve], fc: _SupportCurves) -> dict:
    """profile.json's ``fit``: per song and mean metrics of the generic, personal and MAML curves on the support."""
    from pdmer.metrics import average, song_metrics

    per_song = {
        c.song_id: {
            "generic": song_metrics(fc.generic[c.song_id], c.values),
            "personalized": song_metrics(fc.personal[c.song_id], c.values),
            "maml": song_metrics(fc.adapted[c.song_id], c.values),
        }
        for c in curves
    }
    return {
        "note": "on the support song(s) the adaptation was fitted to: not a held-out score",
        "per_song": per_song,
        "mean": {k: average([m[k] for m in per_song.values()]) for k in ("generic", "personalized", "maml")},
    }


def _log_personalization(name: str, curves: list[Curve], safe: dict) -> None:
    """How much was personalized; a plain warning when the rating said little (rate a second song: k-shot)."""
    if "fallback" in safe:  # a diverged adaptation: said already, and not the listener's doing
        return
    if not safe["use"].any() or safe["weights"].is_generic():
        log.warning(
            "%s: your rating%s said little that carries over to other songs (%s); your curves stay the generic "
            "ones. Rating a second song helps: calibrate with two --audio/--ratings songs (k-shot).",
            name,
            "s" if len(curves) > 1 else "",
            safe["summary"],
        )
    else:
        log.info("%s: personalized: %s", name, safe["summary"])


def _adaptation_info(cfg, steps: int, lr: float, ad: _Adaptation) -> dict:
    """profile.json's ``adaptation``: how the inner loop ran and what it saved."""
    return {
        "inner_steps": steps,
        "inner_lr": lr,
        "inner_lr_learned": ad.learned_lr,  # True: the base run's meta-learned per-tensor rates were used, not inner_lr
        "first_order": True,
        "loss": "DSAML loss of the base run: 1 - mean(CCC, PCC, 1 - RMSE) over arousal and valence"
        + (" + diagonal attention loss" if cfg.train.attention_loss else ""),
        "seq_len": cfg.train.seq_len,
        "support_windows": int(sum(b[0].shape[0] for b in ad.support)),
        "support_loss": [round(float(x), 6) for x in ad.losses],  # before each step
        "support_loss_after": round(ad.final_loss, 6),
        "parameters_saved": len(ad.changed),
        "values_saved": int(sum(v.numel() for v in ad.changed.values())),
    }


def _songs_info(curves: list[Curve], feats: dict, audio_map: dict[str, Path]) -> list[dict]:
    """profile.json's ``songs``: each support song's file, hash, length and rated span."""
    from pdmer.features.cache import file_hash

    return [
        {
            "song_id": c.song_id,
            "audio": str(audio_map[c.song_id]),
            "audio_sha256": file_hash(audio_map[c.song_id]),
            "audio_s": feats[c.song_id].n_steps * STEP_S,
            "rated_from_s": c.start_step * STEP_S,
            "rated_to_s": (c.end_step - 1) * STEP_S,
            "rated_steps": c.n_steps,
        }
        for c in curves
    ]


def _personalization_info(safe: dict) -> dict:
    """profile.json's ``personalization``: the safe rule's weights, support statistics and checks (predict reuses them)."""
    response = None
    if safe.get("response") is not None:
        response = {"beta": safe["response"].tolist(), "basis": safe["basis"].to_json()}
    return {
        "rule": "pdmer.personalize: generic + the offset, scale, MAML, shape and response components, weighted by "
        "the base run's weights and kept per dimension where a held-out last third of the rated span confirms them",
        "weights": safe["weights"].to_json(),
        "response": response,  # the listener's linear response to the music (pdmer.response); None: none
        "use": {label: bool(u) for label, u in zip(("arousal", "valence"), safe["use"])},
        "support": safe["stats"].to_json(),
        "held_out_steps": safe["held_out_steps"],
        "personalized": bool(safe["use"].any() and not safe["weights"].is_generic()),
        "summary": safe["summary"],
        **({"fallback": safe["fallback"]} if "fallback" in safe else {}),
    }
