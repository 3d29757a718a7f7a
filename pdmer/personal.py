"""Personal profiles: calibrate the meta-trained model to one listener, then predict with it.

:func:`calibrate` runs the inner loop of meta-training (same loss, number of steps and
learning rate as the base run, unless overridden) on a listener's ratings of one or more
songs and saves a *profile*; :func:`predict` writes whole-song valence / arousal curves,
generic and (with a profile) personal. ``python run.py calibrate`` / ``predict`` call them.

A profile is a folder ``<annotators>/<NAME>/`` (``<annotators>`` = ``<repo>/annotators``
unless given)::

    profile.json          who, when, base run (config hash, feature hash, weights sha256),
                          songs used, inner steps and lr, fit metrics on the support song(s)
    weights.safetensors   the adapted parameters only (the base run's buffers are unchanged);
                          its header repeats the base model's hashes
    ratings.csv           a byte copy of the ratings file the profile was calibrated on
    fit.png               ratings, generic and personal curves on the support song(s)
    MANIFEST.json         size and sha256 of each file above, written last: the profile is complete

Safety:

- names are letters, digits, ``-`` and ``_`` (at most 64), so no path leaves ``<annotators>``;
  ``example`` is reserved for the example ratings kept in git;
- weights are read with safetensors only: a pickle (``torch.save``) is refused, never
  unpickled, since unpickling can run code;
- a profile is used only with the base model it was calibrated on: the run's config hash,
  the feature settings' hash and the checkpoint's sha256 must all match, otherwise the
  error names both models.

Crash safety (:mod:`pdmer.store`): one calibration of a name at a time (an ``flock`` on
``<annotators>/.locks/<NAME>.lock``; a second one is refused at once). A profile is written into
``<annotators>/.<NAME>.tmp-*`` with ``MANIFEST.json`` (sha256 of every file) last, and renamed into
place only once complete; the previous profile is renamed aside first and deleted (or, with
``keep_history``, moved to ``<annotators>/.history/<NAME>/<UTC time>/``) only after the new one is
in place. After a crash at any point, the next calibration or read of that name restores a
complete copy (one whose manifest verifies) and deletes every leftover. Names cannot start with
a dot, so these folders never clash with a profile.

Divergence: a calibration whose loss, weights or support curves are non-finite or absurd is
refused (:func:`check_finite_adaptation`) and nothing is saved; a profile with non-finite weights
is refused when read.

Time convention (``pdmer.data.types``): step ``k`` covers audio ``[0.5 k, 0.5 k + 0.5)`` s and is
written with ``time_s = 0.5 k``, so a prediction CSV read back as ratings lands on the same steps.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from pdmer import paths, store
from pdmer.checkpoint import load_weights, read_meta
from pdmer.io import atomic_write_text, sha256_file
from pdmer.config import ConfigError, ExperimentConfig, check_setting, config_hash
from pdmer.data.types import LABELS, STEP_S, Curve, DataError
from pdmer.personalize import combine

log = logging.getLogger(__name__)

REPO = paths.home()  # outputs' home (pdmer.paths: $PDMER_HOME, else the working folder's project)
DEFAULT_ANNOTATORS_DIR = paths.annotators_dir()
DEFAULT_RUNS_DIR = paths.runs_dir()
DEFAULT_PREDICTIONS_DIR = paths.predictions_dir()

PROFILE_FORMAT = "pdmer-profile"
PROFILE_VERSION = 1
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESERVED_NAMES = frozenset({"example"})
MIN_RATED_S = 10.0  # a calibration song must have at least this much rated
PREDICT_BATCH_WINDOWS = 4  # sliding windows per forward pass in predict: bounds memory
WEIGHTS_FILE = "weights.safetensors"
PROFILE_FILE = "profile.json"
RATINGS_FILE = "ratings.csv"
FIT_FILE = "fit.png"
HISTORY_DIR = store.HISTORY_DIR  # replaced profiles kept with keep_history


class ProfileError(ValueError):
    """A profile name, file or base model is invalid; the message says which and where."""


# --------------------------------------------------------------------------------------------
# Names and folders
# --------------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """Validate a listener name: 1-64 letters, digits, ``-`` or ``_``.

    Args:
        name: the name given by the user.

    Returns:
        the name, unchanged.

    Raises:
        ProfileError: anything else (a path separator, ``..``, a leading dot, spaces,
            non-ASCII letters, an empty or reserved name).
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ProfileError(
            f"invalid listener name {name!r}: use 1-64 letters, digits, '-' or '_' "
            "(no path separators, dots or spaces)"
        )
    if name in RESERVED_NAMES:
        raise ProfileError(f"the name {name!r} is reserved (annotators/{name}/ is kept in git); choose another")
    return name


def _root(annotators_dir: str | Path | None) -> Path:
    return Path(annotators_dir) if annotators_dir is not None else DEFAULT_ANNOTATORS_DIR


def profile_dir(name: str, annotators_dir: str | Path | None = None) -> Path:
    """The folder of a profile, checked to lie directly inside the annotators folder.

    Args:
        name: listener name (checked with :func:`check_name`).
        annotators_dir: the annotators folder (None = ``<repo>/annotators``).

    Returns:
        ``<annotators_dir>/<name>``.
    """
    check_name(name)
    root = _root(annotators_dir)
    path = root / name
    if path.resolve().parent != root.resolve():  # belt and braces: the regex already forbids this
        raise ProfileError(f"profile name {name!r} would leave {root}")
    return path


# --------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------


def features_hash(cfg: ExperimentConfig) -> str:
    """Hash of every feature setting that changes the model's inputs (not paths)."""
    from pdmer.features.cache import settings_key

    blob = json.dumps({"settings": settings_key(cfg.features), "global_encoder": cfg.features.global_encoder}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _display(path: Path) -> str:
    """A path relative to the home folder when inside it (what profile.json and messages show)."""
    return paths.display(path, REPO)


def find_latest_run(runs_dir: str | Path | None = None) -> Path:
    """The most recently finished training run.

    A finished run has ``config.json``, ``checkpoints/best.safetensors`` and ``results.json``
    (a run still training has no ``results.json`` and is skipped).

    Args:
        runs_dir: the runs folder (None = ``<repo>/runs``).

    Returns:
        the run folder whose ``results.json`` is newest.

    Raises:
        ProfileError: no finished run.
    """
    runs = Path(runs_dir) if runs_dir is not None else DEFAULT_RUNS_DIR
    done = [
        r for r in (runs.iterdir() if runs.is_dir() else [])
        if (r / "results.json").is_file() and (r / "config.json").is_file() and (r / "checkpoints" / "best.safetensors").is_file()
    ]
    if not done:
        raise ProfileError(f"no finished training run in {runs}: train one first (`python run.py`), or pass --model RUN_DIR")
    return max(done, key=lambda r: ((r / "results.json").stat().st_mtime_ns, r.name))


def _resolve_run(model: str | Path | None, runs_dir: str | Path | None) -> tuple[Path, str]:
    """(run folder, how it was chosen)."""
    if model is None:
        return find_latest_run(runs_dir), "the latest trained run"
    p = Path(model)
    if not p.is_dir():
        alt = (Path(runs_dir) if runs_dir is not None else DEFAULT_RUNS_DIR) / str(model)
        if alt.is_dir():
            p = alt
    if not (p / "config.json").is_file() or not (p / "checkpoints" / "best.safetensors").is_file():
        raise ProfileError(f"{model}: not a finished run folder (needs config.json and checkpoints/best.safetensors)")
    if not (p / "results.json").is_file():
        raise ProfileError(f"{model}: this run has not finished training (no results.json): {_run_activity(p)}; "
                           "its checkpoint may still change. Pass a finished run, or none for the latest finished one")
    return p, "given"


def _run_activity(run: Path) -> str:
    """Whether a run folder without results is being trained now (the pid in its lock file is alive) or was stopped."""
    from pdmer.runs import LOCK_FILE

    try:
        pid = int((run / LOCK_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid > 0:
        try:
            os.kill(pid, 0)
            return f"it is being trained by process {pid}"
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, another user's
            return f"it is being trained by process {pid}"
    return "it was stopped before the end (continue it with `python run.py train ... --resume`)"


def check_audio_file(path: str | Path) -> Path:
    """An audio path that exists, is a file and is not empty.

    Raises:
        DataError: naming the path and what it is instead (missing, a folder, 0 bytes).
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not an audio file (give the file itself, e.g. {p}/song.wav)")
    if not p.exists():
        raise DataError(f"{p}: audio file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file (an audio file is needed)")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty (0 bytes), not audio")
    return p


@dataclass
class BaseModel:
    """A trained run ready for inference and adaptation.

    Attributes:
        run: the run folder.
        cfg: its resolved config.
        model: the DSAML network with the best checkpoint loaded, in eval mode.
        config_hash: the run's config hash.
        features_hash: :func:`features_hash` of its feature settings.
        weights_sha256: sha256 of ``checkpoints/best.safetensors``.
        how: how the run was chosen ("given", "the latest trained run", ...).
    """

    run: Path
    cfg: ExperimentConfig
    model: torch.nn.Module
    config_hash: str
    features_hash: str
    weights_sha256: str
    how: str = "given"
    _extractor: object = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def features(self, path: str | Path):
        """Dual-scale features of an audio file (see :func:`song_features`)."""
        if self._extractor is None:
            from pdmer.features import FeatureExtractor

            self._extractor = FeatureExtractor(self.cfg.features)
        return song_features(Path(path), self._extractor)

    @property
    def rule(self):
        """The safe personalization weights the run chose on its validation listeners (``personalization.json``).

        A run without them (trained before the safe rule, or stopped before its test) personalizes
        nothing: the weights are 0 and the curve stays generic, said in ``chosen_on``.
        """
        from pdmer.personalize import Weights
        from pdmer.train import RULE_FILE

        path = self.run / RULE_FILE
        if not path.is_file():
            return Weights(chosen_on=f"none: {_display(path)} is missing, so nothing is personalized "
                                     "(run `python run.py evaluate RUN_DIR` to choose the weights)")
        try:
            return Weights.from_json(json.loads(path.read_text())["weights"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ProfileError(f"{path}: unreadable safe personalization weights ({e})") from None

    def describe(self) -> dict:
        return {
            "run": _display(self.run),
            "experiment": self.cfg.name,
            "config_hash": self.config_hash,
            "features_hash": self.features_hash,
            "weights_sha256": self.weights_sha256,
        }


def load_base_model(model: str | Path | None = None, runs_dir: str | Path | None = None, device: str | None = None) -> BaseModel:
    """Load a finished run's best checkpoint for calibration or prediction.

    Args:
        model: run folder (or a run name under ``runs_dir``); None = the latest finished run.
        runs_dir: where to look for runs (None = ``<repo>/runs``).
        device: "cpu", "cuda", ... (None = the run's ``runtime.device``, usually ``auto``).

    Returns:
        BaseModel.

    Raises:
        ProfileError: no such run, or its checkpoint is not a safetensors file that fits its config.
    """
    from safetensors import SafetensorError

    from pdmer.checkpoint import CheckpointError
    from pdmer.models.dsaml import DSAML
    from pdmer.runs import load_run_config, resolve_device

    run, how = _resolve_run(model, runs_dir)
    cfg = load_run_config(run)
    ckpt = run / "checkpoints" / "best.safetensors"
    chash = config_hash(cfg)
    try:
        meta = read_meta(ckpt)
        g_dim = meta.get("global_dim")
        if g_dim is None:
            from pdmer.features import FeatureExtractor

            g_dim = FeatureExtractor(cfg.features).global_dim
        net = DSAML(cfg.model, int(g_dim))
        from safetensors import safe_open

        from pdmer.meta.maml import LR_PREFIX, attach_inner_lrs

        with safe_open(str(ckpt), framework="pt") as f:
            if any(k.startswith(LR_PREFIX) for k in f.keys()):  # meta-learned inner rates (meta.learn_inner_lr)
                attach_inner_lrs(net, cfg.meta.inner_lr)
        load_weights(ckpt, net, {"config_hash": chash})
    except SafetensorError as e:
        raise ProfileError(f"{ckpt}: not a safetensors checkpoint ({e})") from None
    except CheckpointError as e:
        raise ProfileError(str(e)) from None
    try:
        dev = resolve_device(device or cfg.runtime.device)
    except ConfigError:
        if device is not None:
            raise
        log.warning("%s was trained with runtime.device=%s, which this machine lacks: using %s", run.name,
                    cfg.runtime.device, resolve_device("auto"))
        dev = resolve_device("auto")
    net = net.to(dev).eval()
    return BaseModel(run, cfg, net, chash, features_hash(cfg), sha256_file(ckpt), how)


# --------------------------------------------------------------------------------------------
# Features of long songs, in segments
# --------------------------------------------------------------------------------------------

STREAM_MIN_S = 180.0  # songs longer than this are featurised in segments (unless cached)
STREAM_CORE_S = 120.0  # steps kept from each segment
STREAM_MARGIN_S = 20.0  # context on each side (at least half the global window + 5 s of filter context)


def song_features(path: Path, extractor, stream_min_s: float | None = None, core_s: float | None = None, margin_s: float | None = None):
    """Features of one song; a long song is decoded and featurised segment by segment.

    Songs up to ``stream_min_s`` (and songs already in the feature cache, or MP3 files whose
    length the header only estimates) go through ``extractor`` as in training. A longer
    song is read ``core_s`` seconds at a time with ``margin_s`` seconds of context on each
    side (segments start on step boundaries, context is clipped at the song's ends), so the
    decoded audio held at once does not grow with the song. Each step's 30 s global window
    and every filter around it lie inside its segment, so the features equal the whole-song
    ones up to float rounding (checked by the tests); only the features themselves,
    about 13 KB per 0.5 s step, are kept for the whole song.

    Args:
        path: the audio file (song id = file stem).
        extractor: a :class:`pdmer.features.FeatureExtractor`.
        stream_min_s, core_s, margin_s: None = ``STREAM_MIN_S``, ``STREAM_CORE_S``, ``STREAM_MARGIN_S``.

    Returns:
        SongFeatures.

    Raises:
        DataError: missing, undecodable, silent or NaN audio; a song shorter than one step.
    """
    import soundfile as sf

    from pdmer.features import SongFeatures, compute_features, load_embeddings, resample
    from pdmer.features.local import step_samples

    stream_min_s = STREAM_MIN_S if stream_min_s is None else stream_min_s
    core_s = STREAM_CORE_S if core_s is None else core_s
    margin_s = STREAM_MARGIN_S if margin_s is None else margin_s
    cfg = extractor.cfg
    path = check_audio_file(path)
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises several types
        raise DataError(f"{path}: cannot read audio header ({e})") from None
    sr, frames = int(info.samplerate), int(info.frames)
    in_step = sr * cfg.step_s
    if (
        frames / max(sr, 1) <= stream_min_s
        or info.format == "MPEG"
        or abs(in_step - round(in_step)) > 1e-9
        or (extractor.use_cache and extractor.cache_path(path).is_file())
    ):
        return extractor(path)
    in_step = int(round(in_step))
    out_step = step_samples(cfg)
    n_steps = -(-frames * cfg.sample_rate // sr) // out_step  # floor(resampled length / step), as load_audio
    window = int(np.ceil(cfg.global_window_s / cfg.step_s))  # W: steps of the global window
    core = max(window, int(round(core_s / cfg.step_s)))  # a first segment must hold a whole window
    margin = int(np.ceil(max(margin_s, cfg.global_window_s / 2 + 5.0) / cfg.step_s))
    g_dim = extractor.global_dim
    local = torch.empty(n_steps, cfg.patch_frames, cfg.n_mels, dtype=torch.float16)  # (n_steps, 51, 128)
    glob = torch.empty(n_steps, g_dim, dtype=torch.float32)  # (n_steps, G)
    peak = 0.0
    t0 = time.perf_counter()
    try:
        with sf.SoundFile(str(path)) as f:
            for k0 in range(0, n_steps, core):
                k1 = min(k0 + core, n_steps)
                last = k1 + margin >= n_steps
                # first step of the segment; the last segment also holds the song's final window
                s0 = max(0, min(k0 - margin, n_steps - window - margin) if last else k0 - margin)
                f.seek(s0 * in_step)
                want = (min(k1 + margin, n_steps) - s0) * in_step
                block = f.read(frames - s0 * in_step if last else want, dtype="float32", always_2d=True)  # (n, channels)
                if not np.isfinite(block).all():
                    raise DataError(f"{path}: audio contains NaN or infinite samples")
                x = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]  # (n,)
                del block
                peak = max(peak, float(np.max(np.abs(x))) if x.size else 0.0)
                if sr != cfg.sample_rate:
                    x = resample(x, sr, cfg.sample_rate)
                seg_local, seg_desc = compute_features(np.ascontiguousarray(x, dtype=np.float32), cfg)
                del x
                a, b = k0 - s0, k0 - s0 + (k1 - k0)
                if seg_local.shape[0] < b:
                    raise DataError(f"{path}: audio ended early (step {s0 + seg_local.shape[0]} of {n_steps}); the file may be truncated")
                local[k0:k1] = seg_local[a:b]
                if cfg.global_encoder == "descriptor":
                    glob[k0:k1] = seg_desc[a:b]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot decode audio, corrupt or unsupported format ({e})") from None
    from pdmer.features.audio import SILENCE_PEAK

    if peak < SILENCE_PEAK:
        raise DataError(f"{path}: audio is silent (peak {peak:.2e}, below {SILENCE_PEAK:g} = -80 dBFS)")
    if cfg.global_encoder == "embeddings":
        glob = torch.from_numpy(load_embeddings(cfg.embeddings_dir, path.stem, n_steps))
    log.debug("%s: %d steps featurised in segments in %.1f s", path.name, n_steps, time.perf_counter() - t0)
    return SongFeatures(local=local, global_=glob, song_id=path.stem)


# --------------------------------------------------------------------------------------------
# Ratings
# --------------------------------------------------------------------------------------------


MAX_RATINGS_BYTES = 8 * 2**20  # 10 minutes rated at 300 Hz; the model uses 2 Hz
DENSE_PER_STEP = 4  # ratings denser than this many per 0.5 s step are averaged over each step
KNOWN_SCALES = ((0.0, 1.0), (1.0, 5.0), (1.0, 7.0), (1.0, 9.0), (0.0, 10.0), (-10.0, 10.0), (0.0, 100.0), (-100.0, 100.0))


def read_ratings(path: str | Path, songs: Sequence[str], name: str, scale: str = "deam") -> list[Curve]:
    """Read one listener's ratings, validated like a dataset and resampled to 2 Hz.

    Two layouts are accepted (column order free, extra columns ignored):
    ``song_id,annotator_id,time_s,valence,arousal`` (the generic dataset format; one
    annotator) or ``time_s,valence,arousal`` (one song: then exactly one song may be given;
    ``song_id`` without ``annotator_id`` works too).

    Args:
        path: the ratings CSV.
        songs: the song ids the ratings must cover (audio file stems), each rated.
        name: the listener's name (the annotator id when the file has none).
        scale: "deam" (values in [-1, 1], 5 % tolerance) or "unit" ([0, 1]).

    Ratings up to ``DENSE_PER_STEP`` per 0.5 s step are linearly interpolated onto the grid
    times ``0.5 k`` (as datasets are); denser ones (a slider logged at 50 Hz, say) are averaged
    over each step's span ``[0.5 k, 0.5 k + 0.5)`` instead (the time convention above, and what
    ``python run.py rate`` does), so the curve does not pick single samples.

    Returns:
        one Curve per song, in the order of ``songs``, values (arousal, valence) on the 2 Hz grid.

    Raises:
        DataError: every problem found, each naming the file, line and song: missing file or
            column, non-numeric / NaN / out-of-range values (with a hint when the whole file
            is on another scale, e.g. 1-9), times not increasing, fewer than 2 ratings, a rated
            song that was not given, a given song that is not rated, more than one annotator,
            under ``MIN_RATED_S`` seconds rated, or a file over ``MAX_RATINGS_BYTES``.
    """
    return _read_ratings(path, songs, name, scale)[0]


def _scale_hint(path: Path, rows: list[list[str]], header: list[str], scale: str) -> None:
    """One error with a hint when many values lie outside the scale: the file is on another one (e.g. 1-9)."""
    from pdmer.data.generic import DEAM_RANGE, UNIT_RANGE

    lo, hi = (-DEAM_RANGE, DEAM_RANGE) if scale == "deam" else UNIT_RANGE
    cols = {c: header.index(c) for c in ("valence", "arousal")}
    vals: dict[str, list[float]] = {"valence": [], "arousal": []}
    first = None
    for i, row in enumerate(rows[1:], start=2):
        for c, j in cols.items():
            try:
                v = float(row[j])
            except (IndexError, ValueError):
                continue
            if np.isfinite(v):
                vals[c].append(v)
                if first is None and not lo <= v <= hi:
                    first = (i, c, v)
    every = vals["valence"] + vals["arousal"]
    out = sum(not lo <= v <= hi for v in every)
    if out < 5:  # a few stray values: the per-line errors say where
        return
    vmin, vmax = min(every), max(every)
    guess = next(((a, b) for a, b in KNOWN_SCALES if a <= vmin and vmax <= b and (a, b) != (0.0, 1.0)), None)
    nominal = "[-1, 1]" if scale == "deam" else "[0, 1]"
    hint = ""
    if guess is not None and scale == "deam":
        mid, half = (guess[0] + guess[1]) / 2, (guess[1] - guess[0]) / 2
        hint = f"; they look like a {guess[0]:g}-{guess[1]:g} scale: rescale them with x' = (x - {mid:g}) / {half:g}"
    span = ", ".join(f"{c} {min(v):g} to {max(v):g}" for c, v in vals.items() if v)
    raise DataError(f"ratings {path}: {out} of {len(every)} values lie outside {nominal} ({span}; first on line "
                    f"{first[0]}: {first[1]}={first[2]:g}): ratings must be on the {nominal} scale{hint}")


def _dense_average(curve: Curve, times: np.ndarray, values: np.ndarray) -> Curve:
    """``curve`` with each step's value = the mean of the ratings in its span ``[0.5 k, 0.5 k + 0.5)`` (gaps keep theirs)."""
    grid = (curve.start_step + np.arange(curve.n_steps)) * STEP_S  # (T,)
    eps = 1e-6  # a rating logged at 20.0 s as 19.9999999 belongs to the step from 20.0 s
    lo = np.searchsorted(times, grid - eps, side="left")
    hi = np.searchsorted(times, grid + STEP_S - eps, side="left")
    csum = np.concatenate([np.zeros((1, 2)), np.cumsum(values, axis=0)])  # (N + 1, 2)
    n = (hi - lo)[:, None]  # (T, 1)
    mean = (csum[hi] - csum[lo]) / np.maximum(n, 1)
    out = np.where(n > 0, mean, curve.values)
    return Curve(curve.song_id, curve.annotator_id, curve.start_step, out)


def _read_ratings(path: str | Path, songs: Sequence[str], name: str, scale: str = "deam") -> tuple[list[Curve], dict]:
    """:func:`read_ratings`, and ``{song_id: {"rate_hz", "resampling"}}`` of how each song was put on the grid."""
    from pdmer.data.generic import COLUMNS, Problems, read_curves

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a ratings file")
    if not path.is_file():
        raise DataError(f"{path}: ratings file not found")
    size = path.stat().st_size
    if size > MAX_RATINGS_BYTES:
        raise DataError(f"{path}: {size / 2**20:.1f} MB of ratings, over the {MAX_RATINGS_BYTES / 2**20:g} MB a calibration "
                        "reads; the model uses 2 Hz (one value per 0.5 s): average the ratings over 0.5 s (or 0.1 s) "
                        "steps and calibrate with that file")
    raw = path.read_bytes().decode("utf-8-sig", errors="replace")
    rows = list(csv.reader(io.StringIO(raw, newline="")))
    header = [h.strip() for h in rows[0]] if rows else []
    need = {"time_s", "valence", "arousal"}
    if not rows or not need <= set(header):
        raise DataError(
            f"{path} line 1: header is {','.join(header)!r}; expected "
            f"{','.join(COLUMNS)} or time_s,valence,arousal (one song)"
        )
    add = []
    if "song_id" not in header:
        if len(songs) != 1:
            raise DataError(
                f"{path}: ratings without a song_id column rate one song, but {len(songs)} songs were given "
                f"({', '.join(songs)}); add a song_id column (= the audio file name without extension)"
            )
        add.append(("song_id", songs[0]))
    if "annotator_id" not in header:
        add.append(("annotator_id", name))
    _scale_hint(path, rows, header, scale)
    problems = Problems()
    with tempfile.TemporaryDirectory(prefix="pdmer-ratings-") as tmp:
        src = path
        if add:  # the same rows with the missing id columns prepended: line numbers stay the same
            src = Path(tmp) / path.name
            with open(src, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow([k for k, _ in add] + rows[0])
                for row in rows[1:]:
                    w.writerow(([v for _, v in add] + row) if any(x.strip() for x in row) else [])
        curves = read_curves(src, problems, scale, True, set()) or {}
        problems.items = [m.replace(str(src), str(path)) for m in problems.items]
    try:
        problems.raise_if_any(path)
    except DataError as e:
        raise DataError(str(e).replace(f"in dataset {path}", f"in ratings {path}", 1)) from None

    by_song: dict[str, Curve] = {}
    errors = []
    annotators = sorted({a for _, a in curves})
    if len(annotators) > 1:
        errors.append(f"{path}: ratings of {len(annotators)} annotators ({', '.join(annotators)}); calibration takes one listener's ratings")
    for (sid, _), c in sorted(curves.items()):
        if sid not in songs:
            errors.append(f"{path}: song {sid!r} is rated but no audio was given for it (given: {', '.join(songs)})")
        else:
            by_song[sid] = c
    for sid in songs:
        c = by_song.get(sid)
        if c is None:
            errors.append(f"{path}: song {sid!r} (an audio file given) has no ratings; rated songs: {', '.join(sorted({s for s, _ in curves})) or 'none'}")
        elif c is not None and c.n_steps * STEP_S < MIN_RATED_S:
            errors.append(
                f"{path}: song {sid!r} is rated over {c.n_steps * STEP_S:.1f} s only "
                f"({c.start_step * STEP_S:.1f}-{(c.end_step - 1) * STEP_S:.1f} s on the 2 Hz grid); at least {MIN_RATED_S:g} s are needed"
            )
    if errors:
        raise DataError(f"{len(errors)} problem(s) in ratings {path}:\n" + "\n".join(f"  - {e}" for e in errors))
    # the rows are valid (read_curves checked them): their times and values, per song, in file order
    col = {c: header.index(c) for c in header}
    sid_of = (lambda row: row[col["song_id"]].strip()) if "song_id" in col else (lambda row: songs[0])
    raw_rows: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows[1:]:
        if any(x.strip() for x in row):
            raw_rows.setdefault(sid_of(row), []).append(
                (float(row[col["time_s"]]), float(row[col["arousal"]]), float(row[col["valence"]])))
    notes = {}
    for sid in songs:
        arr = np.asarray(raw_rows[sid], dtype=np.float64)  # (N, 3): time, arousal, valence
        dt = float(np.median(np.diff(arr[:, 0])))
        dense = dt * DENSE_PER_STEP < STEP_S
        if dense:
            by_song[sid] = _dense_average(by_song[sid], arr[:, 0], arr[:, 1:])
            log.info("%s: ratings of %s at %.3g Hz averaged over each 0.5 s step", path.name, sid, 1 / dt)
        notes[sid] = {"rate_hz": round(1 / dt, 3), "resampling": "averaged per step" if dense else "interpolated"}
    return [by_song[s] for s in songs], notes


def _fit_to_audio(curves: list[Curve], feats: dict, audio: dict[str, Path], ratings: Path) -> tuple[list[Curve], list[dict]]:
    """The datasets' rule (:func:`pdmer.data.check.fit_to_audio`): ratings must lie inside the audio.

    A last rating inside the audio's final, partial step costs that one step (recorded); ratings
    running further are an error naming the audio file and both lengths.
    """
    from pdmer.data.check import fit_to_audio
    from pdmer.data.types import Song

    fitted, trimmed, problems = fit_to_audio(curves, {s: f.n_steps for s, f in feats.items()}, {s: Song(s, p) for s, p in audio.items()})
    if problems:
        raise DataError(f"ratings {ratings} go beyond the audio:\n" + "\n".join(f"  - {m}" for m in problems))
    short = [c for c in fitted if c.n_steps * STEP_S < MIN_RATED_S]
    if short:
        raise DataError(f"ratings {ratings}: song {short[0].song_id!r} has {short[0].n_steps * STEP_S:.1f} s rated inside its audio; "
                        f"at least {MIN_RATED_S:g} s are needed")
    for t in trimmed:
        log.info("%s: %s", t.get("song_id"), t.get("reason"))
    return fitted, trimmed


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------


@dataclass
class Profile:
    """A calibrated listener.

    Attributes:
        name: the listener name.
        path: the profile folder.
        info: the content of ``profile.json``.
        params: adapted parameters, name -> tensor (a subset of the base model's parameters).
    """

    name: str
    path: Path
    info: dict
    params: dict[str, torch.Tensor]

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def fit_png(self) -> Path:
        return self.path / FIT_FILE

    @property
    def files(self) -> list[Path]:
        return [self.path / f for f in (PROFILE_FILE, WEIGHTS_FILE, RATINGS_FILE, FIT_FILE, store.MANIFEST) if (self.path / f).exists()]



def _safe_rule(net, feats: dict, curves: list[Curve], generic: dict, weights, support_loss, steps: int, lr: float,
               seq_len: int, hop: int) -> dict:
    """The safe rule's per-listener part (:mod:`pdmer.personalize`): support statistics and the held-out check.

    The check adapts again on the first 2/3 of each rated span and scores the rule on the last third.
    """
    from pdmer.evaluate import predict_steps
    from pdmer.meta.maml import adapt
    from pdmer.personalize import CHECK_SHARE, MIN_CHECK_STEPS, Check, Support, describe, gate

    ratings = np.concatenate([c.values for c in curves])
    stats = Support.fit(ratings, np.concatenate([generic[c.song_id] for c in curves]))
    held_n = [int(round(c.n_steps * CHECK_SHARE)) for c in curves]
    check = None
    if weights.gate and all(n >= MIN_CHECK_STEPS and c.n_steps - n >= MIN_CHECK_STEPS for n, c in zip(held_n, curves)):
        fit = [Curve(c.song_id, c.annotator_id, c.start_step, c.values[: c.n_steps - n]) for c, n in zip(curves, held_n)]
        device = next(net.parameters()).device
        p_fit, _ = adapt(net, _support_batches(fit, feats, seq_len, device), support_loss, steps, lr)
        a_held = [predict_steps(net, feats[c.song_id], c.start_step, c.end_step, seq_len, hop, p_fit,
                                batch_windows=PREDICT_BATCH_WINDOWS)[f.n_steps:] for c, f in zip(curves, fit)]
        check = Check(np.concatenate([c.values[f.n_steps:] for c, f in zip(curves, fit)]),
                      np.concatenate([generic[c.song_id][f.n_steps:] for c, f in zip(curves, fit)]),
                      np.concatenate(a_held),
                      Support.fit(np.concatenate([f.values for f in fit]),
                                  np.concatenate([generic[c.song_id][: f.n_steps] for c, f in zip(curves, fit)])))
    use = gate(check, weights)
    return {"weights": weights, "stats": stats, "use": use, "held_out_steps": 0 if check is None else len(check.ratings),
            "summary": describe(weights, use)}


def _apply_profile_rule(profile: "Profile", generic: np.ndarray, adapted: np.ndarray) -> np.ndarray:
    """A profile's personal curve: the safe rule with the weights, support statistics and checks it recorded."""
    from pdmer.personalize import Support, Weights, combine

    rule = profile.info.get("personalization")
    if rule is None:
        raise ProfileError(f"profile {profile.name!r} ({profile.path}) has no 'personalization' record: it was made "
                           f"before the safe rule; calibrate {profile.name!r} again")
    stats = Support(np.asarray(rule["support"]["offset"], float), np.asarray(rule["support"]["scale"], float))
    use = np.array([bool(rule["use"]["arousal"]), bool(rule["use"]["valence"])])
    return combine(generic, adapted, stats, Weights.from_json(rule["weights"]), use).astype(np.float32)


def _support_batches(curves: list[Curve], feats: dict, seq_len: int, device) -> list[tuple]:
    """One batch per song: its whole rated span cut into windows of ``seq_len`` steps.

    A 30 s rating (60 steps) is one window, the paper's support sequence; a longer one adds
    windows (the last one aligned to the end), a shorter one is a single shorter window.
    """
    from pdmer.evaluate import window_starts
    from pdmer.meta.tasks import make_batch

    batches = []
    for c in curves:
        length = min(seq_len, c.n_steps)
        crops = [(c, s, length) for s in window_starts(c.n_steps, length, length)]
        batches.append(make_batch(crops, feats, device))  # (W, length, ...)
    return batches


def _weights_bytes(params: dict[str, torch.Tensor], meta: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in params.items()}, metadata={"pdmer": json.dumps(meta)})


def _plot_fit(path: Path, curves: list[Curve], generic: dict, personal: dict, fit: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = curves[:4]
    fig, axes = plt.subplots(len(shown), 2, figsize=(11, 2.8 * len(shown) + 0.4), squeeze=False)
    for i, c in enumerate(shown):
        t = c.times
        for j, label in enumerate(LABELS):
            ax = axes[i, j]
            ax.plot(t, c.values[:, j], color="k", lw=1.6, label=f"{name}'s ratings")
            ax.plot(t, generic[c.song_id][:, j], color="tab:blue", lw=1.2, label="generic")
            ax.plot(t, personal[c.song_id][:, j], color="tab:red", lw=1.4, label="personal (calibrated)")
            m = fit["per_song"][c.song_id]
            ax.set_title(f"{c.song_id}: {label}  CCC generic {m['generic'][f'ccc_{label}']:.2f}, personal {m['personalized'][f'ccc_{label}']:.2f}", fontsize=9)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[i, 0].set_xlabel("time in the song (s)")
        axes[i, 1].set_xlabel("time in the song (s)")
    axes[0, 0].legend(loc="best", fontsize=8)
    more = f" (first 4 of {len(curves)} songs)" if len(curves) > 4 else ""
    fig.suptitle(f"calibration of {name!r}: fit on the support song(s){more}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _json_default(o):
    return str(o) if isinstance(o, Path) else float(o)


def _finite_json(o):
    """``o`` with every non-finite float replaced by None, so that the JSON written is valid (no ``Infinity``)."""
    if isinstance(o, dict):
        return {k: _finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_json(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def _json_bytes(info: dict) -> bytes:
    return json.dumps(_finite_json(info), indent=2, default=_json_default, allow_nan=False).encode()


# --------------------------------------------------------------------------------------------
# Divergence: the one check of an adapted model, before anything is saved or used
# --------------------------------------------------------------------------------------------

PRED_LIMIT = 5.0  # |curve| beyond this, on a [-1, 1] scale, is absurd
DIVERGE_FACTOR = 2.0  # a support loss that ends above this times its start has diverged


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


# --------------------------------------------------------------------------------------------
# The profile store (pdmer.store): lock, manifest, atomic install, recovery
# --------------------------------------------------------------------------------------------


def _legacy_complete(folder: Path) -> str | None:
    """Completeness of a profile written before manifests: profile.json readable and its files there."""
    try:
        info = json.loads((folder / PROFILE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{folder / PROFILE_FILE}: unreadable ({e})"
    if not isinstance(info, dict) or info.get("format") != PROFILE_FORMAT:
        return f"{folder / PROFILE_FILE}: not a pdmer profile"
    for f in (WEIGHTS_FILE, RATINGS_FILE, (info.get("files") or {}).get("plot")):
        if f and not (folder / f).is_file():
            return f"{folder / f}: missing"
    return None


def _busy(e: store.StoreBusyError, name: str) -> ProfileError:
    return ProfileError(f"{e.strerror}: another calibration of {name!r} is running; nothing was changed")


def _settle(root: Path, name: str) -> None:
    """Before reading a profile: repair a crashed write of it (if no one is writing it now)."""
    dest = root / name
    if not store.leftovers(root, name):  # nothing a crash left: nothing to restore or delete
        return
    try:
        with store.locked(root, name):
            store.repair(root, name, _legacy_complete)
    except store.StoreBusyError:  # being calibrated: the swap of folders takes an instant
        deadline = time.monotonic() + 2.0
        while store.check_complete(dest, _legacy_complete) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    except OSError as e:  # a read-only folder: read what is there
        log.warning("%s: cannot repair (%s)", dest, e)


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
    audio_map: dict[str, Path] = {}
    for p in paths:
        check_audio_file(p)
        if p.stem in audio_map:
            raise DataError(f"two audio files have the song id {p.stem!r}: {audio_map[p.stem]} and {p}")
        audio_map[p.stem] = p
    ratings = Path(ratings)
    if inner_steps is not None:
        check_setting("meta.inner_steps", inner_steps, "inner_steps")
    if inner_lr is not None:
        check_setting("meta.inner_lr", inner_lr, "inner_lr")
    curves, rates = _read_ratings(ratings, list(audio_map), name)  # cheap checks before loading anything heavy
    root = dest.parent
    try:
        with store.locked(root, name, what="calibrated"):  # one calibration of a name at a time
            return _calibrate_locked(name, dest, audio_map, ratings, curves, rates, model, runs_dir, device, base,
                                     inner_steps, inner_lr, keep_history, plot)
    except store.StoreBusyError as e:
        raise _busy(e, name) from None


def _calibrate_locked(name, dest, audio_map, ratings, curves, rates, model, runs_dir, device, base, inner_steps, inner_lr,
                      keep_history, plot) -> Profile:
    """:func:`calibrate` once its cheap checks passed, with the profile's lock held."""
    from pdmer.evaluate import predict_steps, support_loss_fn
    from pdmer.meta.maml import LR_PREFIX, adapt, split_state
    from pdmer.metrics import average, song_metrics
    from pdmer.train import make_loss_fn

    root = dest.parent
    store.repair(root, name, _legacy_complete)  # what a crashed calibration of this name left
    store.repair_all(root, _legacy_complete)  # and of any other name not being calibrated now
    base = base or load_base_model(model, runs_dir, device)
    log.info("model: %s (%s)", _display(base.run), base.how)
    cfg = base.cfg
    steps = cfg.meta.inner_steps if inner_steps is None else int(inner_steps)
    lr = cfg.meta.inner_lr if inner_lr is None else float(inner_lr)

    feats = {sid: base.features(p) for sid, p in audio_map.items()}
    curves, trimmed = _fit_to_audio(curves, feats, audio_map, ratings)

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
    log.info("%s: adapted in %.1f s, %d steps at lr %g, support loss %.4f -> %.4f",
             name, time.perf_counter() - t0, steps, lr, float(losses[0]), final_loss)
    what = f"calibration of {name!r}"
    advice = (f"Nothing was saved{' (the existing profile is unchanged)' if dest.exists() else ''}; lower the inner "
              f"learning rate (--inner-lr, {lr:g} here) or the number of steps (--inner-steps, {steps} here).")
    check_finite_adaptation(losses, params, final_loss=final_loss, what=what, advice=advice)

    seq_len, hop = cfg.train.seq_len, cfg.eval.hop
    generic, personal, per_song = {}, {}, {}
    for c in curves:
        f = feats[c.song_id]
        generic[c.song_id] = predict_steps(net, f, c.start_step, c.end_step, seq_len, hop, batch_windows=PREDICT_BATCH_WINDOWS)
        personal[c.song_id] = predict_steps(net, f, c.start_step, c.end_step, seq_len, hop, params, batch_windows=PREDICT_BATCH_WINDOWS)
    check_finite_adaptation(curves=personal, what=what, advice=advice)
    adapted = personal
    safe = _safe_rule(net, feats, curves, generic, base.rule, support_loss, steps, lr, seq_len, hop)
    personal = {sid: combine(generic[sid], adapted[sid], safe["stats"], safe["weights"], safe["use"]).astype(np.float32)
                for sid in generic}
    for c in curves:
        per_song[c.song_id] = {"generic": song_metrics(generic[c.song_id], c.values),
                               "personalized": song_metrics(personal[c.song_id], c.values),
                               "maml": song_metrics(adapted[c.song_id], c.values)}
    if not safe["use"].any() or safe["weights"].is_generic():
        log.warning("%s: your rating%s said little that carries over to other songs (%s); your curves stay the generic "
                    "ones. Rating a second song helps: calibrate with two --audio/--ratings songs (k-shot).",
                    name, "s" if len(curves) > 1 else "", safe["summary"])
    else:
        log.info("%s: personalized: %s", name, safe["summary"])
    fit = {
        "note": "on the support song(s) the adaptation was fitted to: not a held-out score",
        "per_song": per_song,
        "mean": {k: average([m[k] for m in per_song.values()]) for k in ("generic", "personalized", "maml")},
    }
    from pdmer import __version__
    from pdmer.features.cache import file_hash

    base_info = base.describe()
    info = {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pdmer_version": __version__,
        "base": {**base_info, "problem": cfg.problem},
        "adaptation": {
            "inner_steps": steps,
            "inner_lr": lr,
            "inner_lr_learned": learned_lr,  # True: the base run's meta-learned per-tensor rates were used, not inner_lr
            "first_order": True,
            "loss": "DSAML loss of the base run: 1 - mean(CCC, PCC, 1 - RMSE) over arousal and valence"
                    + (" + diagonal attention loss" if cfg.train.attention_loss else ""),
            "seq_len": seq_len,
            "support_windows": int(sum(b[0].shape[0] for b in support)),
            "support_loss": [round(float(x), 6) for x in losses],  # before each step
            "support_loss_after": round(final_loss, 6),
            "parameters_saved": len(changed),
            "values_saved": int(sum(v.numel() for v in changed.values())),
        },
        "songs": [
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
        ],
        "personalization": {
            "rule": "pdmer.personalize: generic + the offset, scale and MAML components, weighted by the base run's "
                    "weights and kept per dimension where a held-out last third of the rated span confirms them",
            "weights": safe["weights"].to_json(),
            "use": {label: bool(u) for label, u in zip(("arousal", "valence"), safe["use"])},
            "support": safe["stats"].to_json(),
            "held_out_steps": safe["held_out_steps"],
            "personalized": bool(safe["use"].any() and not safe["weights"].is_generic()),
            "summary": safe["summary"],
        },
        "trimmed": trimmed,
        "ratings": {"file": RATINGS_FILE, "source": str(ratings), "annotator_id": curves[0].annotator_id, "scale": "deam", "resampled_to_hz": 1 / STEP_S,
                    "per_song": rates},
        "fit": fit,
        "files": {"weights": WEIGHTS_FILE, "ratings": RATINGS_FILE, "plot": FIT_FILE if plot else None},
    }
    weights_meta = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "name": name, **{f"base_{k}": v for k, v in base_info.items()}}

    files = {WEIGHTS_FILE: _weights_bytes(changed, weights_meta), RATINGS_FILE: ratings.read_bytes()}
    if plot:
        png = io.BytesIO()
        _plot_fit(png, curves, generic, personal, fit, name)
        files[FIT_FILE] = png.getvalue()
    files[PROFILE_FILE] = _json_bytes(info)
    kept = store.install(root, name, files, keep_history)
    if kept is not None:
        log.info("%s: previous profile kept in %s", name, kept)
    m = fit["mean"]
    log.info("%s: profile written to %s (fit on support, CCC mean: generic %.3f, personal %.3f)",
             name, dest, m["generic"]["ccc_mean"], m["personalized"]["ccc_mean"])
    return Profile(name, dest, info, changed)


def _read_profile_weights(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header metadata and tensors of a profile's weights, with safetensors only."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ProfileError(f"{path}: weights file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    kind = ""
    if head.startswith(b"PK\x03\x04"):
        kind = " (it looks like a torch.save zip archive, which holds a pickle)"
    elif head[:1] == b"\x80":
        kind = " (it looks like a pickle)"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("pdmer", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ProfileError(
            f"{path}: refused, not a safetensors file{kind}: {e}. Profiles are read with safetensors only "
            "and never unpickled, since a pickle can run code when loaded."
        ) from None
    return meta, tensors


def load_profile(name: str, annotators_dir: str | Path | None = None, base: BaseModel | None = None) -> Profile:
    """Read a profile; with ``base``, check that it was calibrated on that model.

    Args:
        name: the listener name.
        annotators_dir: where profiles live (None = ``<repo>/annotators``).
        base: the model to use it with (see :func:`check_compatible`).

    Returns:
        Profile.

    Raises:
        ProfileError: bad name, missing, incomplete (its manifest does not verify) or malformed
            profile, a weights file that is not safetensors (never unpickled) or that holds
            NaN / infinite values, or a base-model mismatch.
    """
    path = profile_dir(name, annotators_dir)
    _settle(path.parent, name)
    pj = path / PROFILE_FILE
    if not pj.is_file():
        known = sorted(p.name for p in _root(annotators_dir).iterdir() if (p / PROFILE_FILE).is_file()) if _root(annotators_dir).is_dir() else []
        raise ProfileError(f"no profile {name!r}: {pj} not found (profiles here: {', '.join(known) or 'none'}); "
                           f"create one with `python run.py calibrate --name {name} ...`")
    def no_constants(c):
        raise ValueError(f"{c} is not a JSON number (a diverged calibration?)")

    try:
        info = json.loads(pj.read_text(), parse_constant=no_constants)
    except ValueError as e:
        raise ProfileError(f"{pj}: not valid JSON ({e}); calibrate {name!r} again") from None
    if info.get("format") != PROFILE_FORMAT or not isinstance(info.get("base"), dict):
        raise ProfileError(f"{pj}: not a pdmer profile (format {info.get('format')!r})")
    if info.get("version", 0) > PROFILE_VERSION:
        raise ProfileError(f"{pj}: profile version {info.get('version')} is newer than this pdmer reads ({PROFILE_VERSION})")
    meta, params = _read_profile_weights(path / WEIGHTS_FILE)
    for k in ("config_hash", "features_hash", "weights_sha256"):
        if meta.get(f"base_{k}") != info["base"].get(k):
            raise ProfileError(f"{path}: profile.json and {WEIGHTS_FILE} disagree on the base model's {k} "
                               f"({info['base'].get(k)!r} vs {meta.get(f'base_{k}')!r}); calibrate again")
    incomplete = store.check_complete(path, _legacy_complete)
    if incomplete is not None:
        raise ProfileError(f"profile {name!r} is incomplete or was changed after calibration ({incomplete}); "
                           f"calibrate {name!r} again")
    for k, v in params.items():
        if not bool(torch.isfinite(v).all()):
            raise ProfileError(f"{path / WEIGHTS_FILE}: tensor {k!r} holds {int((~torch.isfinite(v)).sum())} NaN or "
                               f"infinite value(s): this profile is unusable (its calibration diverged); calibrate "
                               f"{name!r} again, with a lower --inner-lr")
    if info.get("name") not in (None, name):  # a copied folder: its name is the folder's, not the one inside
        log.warning("%s: profile.json names %r; the profile is %r (its folder)", pj, info.get("name"), name)
    profile = Profile(name, path, info, params)
    if base is not None:
        check_compatible(profile, base)
    return profile


def check_compatible(profile: Profile, base: BaseModel) -> None:
    """Refuse a profile calibrated on another base model or feature configuration.

    Raises:
        ProfileError: naming both models (run, config hash, feature hash, checkpoint sha256).
    """
    had = profile.info["base"]
    now = base.describe()
    checks = [("features_hash", "feature configuration"), ("config_hash", "model config"), ("weights_sha256", "checkpoint")]
    bad = [what for key, what in checks if had.get(key) != now[key]]
    if bad:
        songs = " ".join(f"--audio {s['audio']}" for s in profile.info.get("songs", []))
        raise ProfileError(
            f"profile {profile.name!r} ({profile.path}) was calibrated on a different base model ({', '.join(bad)} differ):\n"
            f"  profile: {had.get('run')} (config {had.get('config_hash')}, features {had.get('features_hash')}, "
            f"checkpoint sha256 {str(had.get('weights_sha256'))[:12]})\n"
            f"  model:   {now['run']} (config {now['config_hash']}, features {now['features_hash']}, "
            f"checkpoint sha256 {now['weights_sha256'][:12]})\n"
            f"calibrate again on this model: python run.py calibrate --name {profile.name} {songs} "
            f"--ratings {_display(profile.path / RATINGS_FILE)} --model {now['run']}"
        )
    shapes = dict(base.model.named_parameters())
    for k, v in profile.params.items():
        if k not in shapes or tuple(shapes[k].shape) != tuple(v.shape):
            raise ProfileError(f"{profile.weights_path}: tensor {k!r} {tuple(v.shape)} does not fit the model {now['run']}")


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


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


def _write_prediction_csv(path: Path, p: SongPrediction) -> None:
    a, v = LABELS.index("arousal"), LABELS.index("valence")
    cols = ["time_s", "valence", "arousal"] + (["generic_valence", "generic_arousal"] if p.personal is not None else [])
    lines = [",".join(cols)]
    cur = p.curve
    for i, t in enumerate(p.times):
        row = [f"{t:.1f}", f"{cur[i, v]:.4f}", f"{cur[i, a]:.4f}"]
        if p.personal is not None:
            row += [f"{p.generic[i, v]:.4f}", f"{p.generic[i, a]:.4f}"]
        lines.append(",".join(row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _plot_prediction(path: Path, p: SongPrediction) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, v = LABELS.index("arousal"), LABELS.index("valence")
    curves = [("generic", p.generic, "tab:blue")] + ([(f"personal ({p.name})", p.personal, "tab:red")] if p.personal is not None else [])
    n = len(curves)
    fig = plt.figure(figsize=(4.2 * n + 6.5, 4.6))
    grid = fig.add_gridspec(2, n + 1, width_ratios=[1] * n + [1.7])
    for i, (label, c, color) in enumerate(curves):
        ax = fig.add_subplot(grid[:, i])
        ax.plot(c[:, v], c[:, a], color=color, lw=0.6, alpha=0.5)
        sc = ax.scatter(c[:, v], c[:, a], c=p.times, cmap="viridis", s=7, zorder=3)
        ax.plot(c[0, v], c[0, a], "o", mfc="none", mec="k", ms=8, label="start")
        ax.axhline(0, color="0.7", lw=0.8)
        ax.axvline(0, color="0.7", lw=0.8)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.set_aspect("equal")
        ax.set_xlabel("valence")
        if i == 0:
            ax.set_ylabel("arousal")
        ax.set_title(label, color=color, fontsize=10)
        ax.legend(loc="lower right", fontsize=7)
    fig.colorbar(sc, ax=fig.axes[:n], shrink=0.8, label="time (s)")
    for row, (j, label) in enumerate(((a, "arousal"), (v, "valence"))):
        ax = fig.add_subplot(grid[row, n])
        for name, c, color in curves:
            ax.plot(p.times, c[:, j], color=color, lw=1.2, label=name)
        ax.set_ylabel(label)
        ax.set_ylim(-1, 1)
        ax.grid(alpha=0.3)
        if row == 0:
            ax.legend(loc="upper right", fontsize=7)
        else:
            ax.set_xlabel("time (s)")
    who = f" for {p.name}" if p.name else ""
    fig.suptitle(f"{p.song_id}{who} (model {p.model.name if p.model else '?'})", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


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
    from pdmer.evaluate import predict_steps

    paths = [Path(songs)] if isinstance(songs, (str, Path)) else [Path(s) for s in songs]
    if not paths:
        raise DataError("predict needs at least one audio file")
    out = Path(out_dir) if out_dir is not None else DEFAULT_PREDICTIONS_DIR
    if write and out.exists() and not out.is_dir():
        raise DataError(f"{out}: the output folder (--out) is a file; give a folder (it is created if missing)")
    seen: dict[str, Path] = {}
    for p in paths:
        check_audio_file(p)
        if p.stem in seen:
            raise DataError(f"two songs have the id {p.stem!r} ({seen[p.stem]} and {p}): their outputs would collide")
        seen[p.stem] = p
    profile = None
    if name is not None:
        profile = load_profile(name, annotators_dir)  # checks the name and the file before the model loads
    if base is None:
        if model is None and profile is not None:
            own = REPO / profile.info["base"].get("run", "")
            if profile.info["base"].get("run") and (own / "checkpoints" / "best.safetensors").is_file():
                base = load_base_model(own, runs_dir, device)
                base.how = f"the base run of profile {name!r}"
        if base is None:
            base = load_base_model(model, runs_dir, device)
    log.info("model: %s (%s)", _display(base.run), base.how)
    if profile is not None:
        check_compatible(profile, base)
    params = None
    if profile is not None:
        from pdmer.meta.maml import split_state

        start, _ = split_state(base.model)
        params = {k: profile.params[k].to(base.device) if k in profile.params else p.detach() for k, p in start.items()}
    net = base.model.eval()
    seq_len, hop = base.cfg.train.seq_len, base.cfg.eval.hop
    results = []
    for sid, path in seen.items():
        f = base.features(path)
        t0 = time.perf_counter()
        generic = predict_steps(net, f, 0, f.n_steps, seq_len, hop, batch_windows=PREDICT_BATCH_WINDOWS)
        personal = predict_steps(net, f, 0, f.n_steps, seq_len, hop, params, batch_windows=PREDICT_BATCH_WINDOWS) if params is not None else None
        if not np.isfinite(generic).all():
            raise ProfileError(f"{path}: the base model {_display(base.run)} predicts NaN or infinite values for this song")
        if personal is not None:  # the adapted model must be sane before the safe rule uses it
            check_finite_adaptation(curves={sid: personal}, what=f"profile {name!r}",
                                    advice=f"Nothing was written; calibrate {name!r} again, with a lower --inner-lr.")
            personal = _apply_profile_rule(profile, generic, personal)  # as calibrate chose it (pdmer.personalize)
        pred = SongPrediction(sid, path, np.arange(f.n_steps) * STEP_S, generic, personal, name, base.run, base.how)
        del f
        log.debug("%s: %d steps predicted in %.1f s", sid, len(generic), time.perf_counter() - t0)
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


__all__ = [
    "BaseModel",
    "Profile",
    "ProfileError",
    "SongPrediction",
    "AdaptationError",
    "adaptation_problem",
    "calibrate",
    "check_audio_file",
    "check_compatible",
    "check_finite_adaptation",
    "check_name",
    "find_latest_run",
    "load_base_model",
    "load_profile",
    "predict",
    "profile_dir",
    "read_ratings",
]
