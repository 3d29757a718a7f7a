"""``predict``: whole-song valence and arousal curves, generic and (with a profile) personal."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from pdmer import paths
from pdmer.data.types import STEP_S, DataError
from pdmer.features.audio import audio_by_song
from pdmer.personal.adaptation import (
    _apply_profile_rule,
    check_finite_adaptation,
    predict_span,
)
from pdmer.personal.base import BaseModel, load_base_model
from pdmer.personal.names import REPO, ProfileError, _display
from pdmer.personal.profile import Profile, check_compatible, load_profile
from pdmer.personal.writers import _plot_prediction, _write_prediction_csv

log = logging.getLogger(__name__)

DEFAULT_PREDICTIONS_DIR = paths.predictions_dir()


@dataclass
class SongPrediction:
    """Whole-song curves of one song on the 2 Hz grid.

    Attributes:
        song_id: the audio file stem.
        audio: the audio file.
        times: (T,) seconds, ``0.5 k`` for step k.
        generic: (T, 2) the base model's curve, columns ``LABELS`` = (arousal, valence).
        personal: (T, 2) the calibrated curve, or None without a profile.
        name: the listener, or None.
        model: the base run used.
        model_how: how that run was chosen ("given", "the latest trained run", ...).
        csv: the CSV written (None when nothing was written).
        png: the PNG written (None when not plotted).
    """

    song_id: str
    audio: Path
    times: np.ndarray
    generic: np.ndarray
    personal: np.ndarray | None = None
    name: str | None = None
    model: Path | None = None
    model_how: str = ""
    csv: Path | None = None
    png: Path | None = None

    @property
    def curve(self) -> np.ndarray:
        """The personal curve when there is one, else the generic one: (T, 2) (arousal, valence)."""
        return self.personal if self.personal is not None else self.generic


def predict(
    songs: str | Path | Iterable[str | Path],
    name: str | None = None,
    model: str | Path | None = None,
    *,
    out_dir: str | Path | None = None,
    annotators_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    device: str | None = None,
    write: bool = True,
    plot: bool = True,
    base: BaseModel | None = None,
) -> list[SongPrediction]:
    """Valence and arousal at 2 Hz over whole songs, generic and (with ``name``) personal.

    Songs longer than the training sequence are predicted with sliding windows
    (``eval.hop`` steps apart, overlaps averaged), a few windows per forward pass, so memory
    beyond the song's features does not grow with its length. Songs are processed one at a time.

    Args:
        songs: one audio file or several (song id = file stem; ids must differ).
        name: a calibrated listener; None = the generic curve only.
        model: base run folder; None = the profile's own base run when it is still there,
            else the latest finished run.
        out_dir: where CSV and PNG files go (None = ``<repo>/predictions``): ``<song>.csv`` /
            ``<song>.png``, or ``<song>.<name>.csv`` / ``.png`` with a name. CSV columns
            ``time_s,valence,arousal`` (the personal curve with a name), plus
            ``generic_valence,generic_arousal`` with a name.
        annotators_dir: where profiles live (None = ``<repo>/annotators``).
        runs_dir: where runs live (None = ``<repo>/runs``).
        device: None = the run's ``runtime.device``.
        write: write the CSV files (False: only return the curves).
        plot: write the PNG files (only when ``write``).
        base: an already loaded base model (then ``model``, ``runs_dir``, ``device`` are unused).

    Returns:
        one SongPrediction per song, in order.

    Raises:
        ProfileError: bad name, missing profile, profile from another base model, no run.
        DataError: missing or undecodable audio, a song shorter than 0.5 s.
    """
    paths = [Path(songs)] if isinstance(songs, (str, Path)) else [Path(s) for s in songs]
    if not paths:
        raise DataError("predict needs at least one audio file")
    out = Path(out_dir) if out_dir is not None else DEFAULT_PREDICTIONS_DIR
    if write and out.exists() and not out.is_dir():
        raise DataError(f"{out}: the output folder (--out) is a file; give a folder (it is created if missing)")
    seen = audio_by_song(paths, "their outputs would collide")
    profile = None
    if name is not None:
        profile = load_profile(name, annotators_dir)  # checks the name and the file before the model loads
    base = base or _base_for(profile, name, model, runs_dir, device)
    log.info("model: %s (%s)", _display(base.run), base.how)
    if warning := base.synthetic_warning(paths):
        log.warning(warning)
    params = None
    if profile is not None:
        check_compatible(profile, base)
        params = _profile_params(profile, base)
    results = []
    for sid, path in seen.items():
        pred = _predict_song(base, sid, path, profile, params, name)
        if write:
            out.mkdir(parents=True, exist_ok=True)
            stem = f"{sid}.{name}" if name else sid
            pred.csv = out / f"{stem}.csv"
            _write_prediction_csv(pred.csv, pred)
            if plot:
                pred.png = out / f"{stem}.png"
                _plot_prediction(pred.png, pred)
        results.append(pred)
    return results


def _base_for(profile: Profile | None, name: str | None, model, runs_dir, device) -> BaseModel:
    """The base model of a prediction: the profile's own base run when still there (and no model given), else ``model``."""
    if model is None and profile is not None:
        own = REPO / profile.info["base"].get("run", "")
        if profile.info["base"].get("run") and (own / "checkpoints" / "best.safetensors").is_file():
            base = load_base_model(own, runs_dir, device)
            base.how = f"the base run of profile {name!r}"
            return base
    return load_base_model(model, runs_dir, device)


def _profile_params(profile: Profile, base: BaseModel) -> dict[str, torch.Tensor]:
    """The base model's parameters with the profile's adapted ones in their place."""
    from pdmer.meta.maml import split_state

    start, _ = split_state(base.model)
    return {k: profile.params[k].to(base.device) if k in profile.params else p.detach() for k, p in start.items()}


def _predict_song(
    base: BaseModel, sid: str, path: Path, profile: Profile | None, params, name: str | None
) -> SongPrediction:
    """One song's whole-song curves: generic, and personal (the safe rule on the adapted curve) with a profile."""

    net = base.model.eval()
    seq_len, hop = base.cfg.train.seq_len, base.cfg.eval.hop
    f = base.features(path)
    t0 = time.perf_counter()
    generic = predict_span(net, f, 0, f.n_steps, seq_len, hop)
    personal = None
    if params is not None:
        personal = predict_span(net, f, 0, f.n_steps, seq_len, hop, params)
    if not np.isfinite(generic).all():
        raise ProfileError(f"{path}: the base model {_display(base.run)} predicts NaN or infinite values for this song")
    if personal is not None:  # the adapted model must be sane before the safe rule uses it
        check_finite_adaptation(
            curves={sid: personal},
            what=f"profile {name!r}",
            advice=f"Nothing was written; calibrate {name!r} again, with a lower --inner-lr.",
        )
        personal = _apply_profile_rule(profile, generic, personal, f.local)  # as calibrate chose it (pdmer.personalize)
    pred = SongPrediction(sid, path, np.arange(f.n_steps) * STEP_S, generic, personal, name, base.run, base.how)
    log.debug("%s: %d steps predicted in %.1f s", sid, len(generic), time.perf_counter() - t0)
    return pred
