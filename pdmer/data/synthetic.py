"""The embedded benchmark: procedural songs rated by simulated listeners.

Nothing is downloaded. Every song is rendered as real audio (44.1 kHz mono wav) from six
musical factor curves sampled at 2 Hz (``FACTORS``): tempo / note density, loudness,
brightness, mode (major vs minor), consonance and register. The factors drift smoothly and
jump at section changes. They are the ground truth the audio is rendered from, and the
emotion curves are computed from them:

* consensus (population-average response), per step ``k``::

      raw_d(k)   = tanh(BIAS[d] + POP_WEIGHTS[d] . factors(k))       d in (arousal, valence)
      consensus  = mean over the population of lag_L(smooth_tau(raw))

  arousal leans on tempo, loudness and brightness; valence on mode, consonance and register.

* listener ``l`` on song ``s`` (noise-free "oracle" curve, then the rating)::

      x        = raw + dW_l . factors            personal factor weights (deviations)
      oracle   = clip(offset_l + gain_l * lag_L(smooth_tau(x)), -1, 1)
      rating   = clip(offset_l + gain_l * lag_L(smooth_tau(x)) + ar1_noise, -1, 1)

  Offsets, personal weights and noise have mean zero and gains mean one, so the consensus is the
  population average of the oracle curves (up to the slider clipping at +-1).

Carry-over: each listener has base parameters (standard-normal latents ``z_base``) and every
song draws fresh ones (``z_fresh``); the song uses ``sqrt(c) * z_base + sqrt(1 - c) * z_fresh``,
so the latents of one listener correlate with ``c`` between two songs. ``c = carryover`` for
gains, factor weights, lag, smoothing and noise level; ``c = offset_carryover`` for the offsets.

Calibration (``calibration_stats`` vs ``deam_calibration_stats``): the defaults reproduce the
order of magnitude of DEAM 2013's per-frame disagreement between raters, the spread of the
averaged curves across songs and how little an averaged curve moves within a 45 s clip.

On disk (the generic layout read by ``pdmer.data.generic.load_generic``)::

    <root>/audio/<song_id>.wav      44.1 kHz mono PCM_16
    <root>/ratings.csv              song_id,annotator_id,time_s,valence,arousal
    <root>/oracle.csv               same columns: noise-free personal curves
    <root>/consensus.csv            same columns, annotator_id "consensus"
    <root>/listeners.json           personal parameters (base and per song)
    <root>/factors.npz              factor curves per song, (T, 6) float32 at 2 Hz from t = 0
    <root>/meta.json                config, generator version, timing
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import lfilter
from scipy.special import ndtr, ndtri

from pdmer import paths
from pdmer.config import ConfigError, SyntheticConfig
from pdmer.data.types import LABELS, STEP_S, Curve, DataError, Dataset, Song
from pdmer.io import swap_dir

log = logging.getLogger(__name__)

GENERATOR_VERSION = "3"
SAMPLE_RATE = 44100
CONSENSUS_ID = "consensus"

FACTORS = ("tempo", "loudness", "brightness", "mode", "consonance", "register")
N_FACTORS = len(FACTORS)

# Population weights of the factors, rows LABELS = (arousal, valence), columns FACTORS.
POP_WEIGHTS = np.array(
    [
        # tempo loud  bright mode  cons  register
        [0.60, 0.45, 0.10, 0.05, 0.05, 0.00],  # arousal
        [0.08, -0.05, 0.00, 0.40, 0.30, 0.08],  # valence
    ]
)
BIAS = np.array([0.0, 0.0])

# What is known of real per-listener data but cannot be computed from the DEAM files here
# (they hold only averages and per-frame std across raters): between two pieces, a listener's
# mean offset from the others correlates weakly (r < 0.1), how far they move the slider
# moderately (r about 0.4).
REAL_LISTENER_TARGETS = {"offset_r": 0.1, "slider_r": 0.4}


@dataclass(frozen=True)
class FactorModel:
    """How the factor curves move (pre-tanh units; a factor is ``tanh`` of the sum)."""

    song_sd: float = 0.55  # song-level mean of each factor
    intensity_sd: float = 0.05  # per-section shared "intensity" (tempo, loudness, brightness, register)
    section_sd: float = 0.05  # per-section, per-factor deviation
    section_min_s: float = 15.0
    section_max_s: float = 40.0
    transition_s: float = 1.5  # section changes are ramps this long
    drift_sd: float = 0.05  # smooth drift: Ornstein-Uhlenbeck per factor
    drift_tau_s: float = 20.0
    intro_s: tuple = (6.0, 16.0)  # long songs: quieter intro / outro, length range
    intro_depth: float = 0.45  # intensity drop at the very start / end of a long song
    # Whole songs vary more than the 45 s excerpts (DEAM: averaged curves of the full-length
    # songs move about 3-5 times more than those of the clips): section contrasts are scaled up.
    long_section_scale: float = 3.0
    # How much each factor moves within a song (section contrasts and drift), order FACTORS.
    # Brightness (timbre) and register (melody height) change most inside a piece; they are
    # also the "contested" factors of ListenerModel, so individual curves move with the music
    # while the consensus stays as flat as DEAM's averaged curves.
    within_scale: tuple = (1.0, 1.0, 8.0, 1.0, 1.0, 8.0)


# Loading of the shared section intensity on each factor (order FACTORS).
INTENSITY_LOADING = np.array([1.0, 1.0, 0.8, 0.0, 0.0, 0.4])


@dataclass(frozen=True)
class ListenerModel:
    """The population of listeners (scales at ``offset_scale = weight_scale = noise_scale = 1``)."""

    offset_sd: float = 0.22  # mean offset per label
    gain_log_sd: float = 0.35  # gain = exp(sd * z - sd^2 / 2), mean 1
    weight_sd: float = 0.20  # personal deviation from POP_WEIGHTS, per label and factor
    # (label, factor) pairs on which listeners disagree in sign: population weight about 0,
    # personal weight sd ``contested_weight_sd`` ("one listener hears brightness as positive,
    # another does not"). This is what one-shot personalization can learn from the audio.
    contested: tuple = (("valence", "brightness"), ("arousal", "register"))
    contested_weight_sd: float = 0.5
    lag_max_s: float = 3.0  # reaction lag uniform in [0, lag_max_s]
    tau_median_s: float = 1.5  # exponential smoothing time constant, log-normal
    tau_log_sd: float = 0.6
    tau_min_s: float = 0.25
    tau_max_s: float = 10.0
    noise_sd: float = 0.09  # AR(1) rating noise, stationary std (mean over listeners; log-normal)
    noise_log_sd: float = 0.6
    noise_tau_s: float = 1.0  # AR(1) time constant


FACTOR_MODEL = FactorModel()
LISTENER_MODEL = ListenerModel()

# Latent layout of one listener's parameters (standard normal each).
_Z_OFFSET = slice(0, 2)
_Z_GAIN = slice(2, 4)
_Z_WEIGHTS = slice(4, 4 + 2 * N_FACTORS)
_Z_LAG = 4 + 2 * N_FACTORS
_Z_TAU = _Z_LAG + 1
_Z_NOISE = _Z_TAU + 1
N_LATENT = _Z_NOISE + 1

# RNG streams: np.random.default_rng([seed, stream, ...]).
_S_SONG, _S_LISTENER, _S_FRESH, _S_AUDIO, _S_ASSIGN = 1, 2, 3, 4, 5


# --------------------------------------------------------------------------------------------
# Listeners
# --------------------------------------------------------------------------------------------


@dataclass
class ListenerParams:
    """One listener's parameters for one song (or their base parameters).

    Attributes:
        offset: (2,) added to the curve, per LABELS.
        gain: (2,) multiplies the (smoothed) response, per LABELS.
        weights: (2, N_FACTORS) deviation from ``POP_WEIGHTS``.
        lag_s: reaction lag in seconds.
        tau_s: exponential smoothing time constant in seconds.
        noise_sd: stationary std of the AR(1) rating noise.
    """

    offset: np.ndarray
    gain: np.ndarray
    weights: np.ndarray
    lag_s: float
    tau_s: float
    noise_sd: float

    @classmethod
    def from_latent(cls, z: np.ndarray, cfg: SyntheticConfig, lm: ListenerModel = LISTENER_MODEL) -> "ListenerParams":
        """Map standard-normal latents (N_LATENT,) to parameters."""
        gs = lm.gain_log_sd
        ns = lm.noise_log_sd
        return cls(
            offset=lm.offset_sd * cfg.offset_scale * z[_Z_OFFSET],
            gain=np.exp(gs * z[_Z_GAIN] - gs**2 / 2),
            weights=_weight_sd(lm) * cfg.weight_scale * z[_Z_WEIGHTS].reshape(2, N_FACTORS),
            lag_s=float(lm.lag_max_s * ndtr(z[_Z_LAG])),
            tau_s=float(np.clip(lm.tau_median_s * np.exp(lm.tau_log_sd * z[_Z_TAU]), lm.tau_min_s, lm.tau_max_s)),
            noise_sd=float(lm.noise_sd * cfg.noise_scale * np.exp(ns * z[_Z_NOISE] - ns**2 / 2)),
        )

    def to_json(self) -> dict:
        return {
            "offset": {lab: round(float(v), 6) for lab, v in zip(LABELS, self.offset, strict=True)},
            "gain": {lab: round(float(v), 6) for lab, v in zip(LABELS, self.gain, strict=True)},
            "weight_dev": {
                lab: {f: round(float(w), 6) for f, w in zip(FACTORS, row, strict=True)}
                for lab, row in zip(LABELS, self.weights, strict=True)
            },
            "lag_s": round(self.lag_s, 6),
            "tau_s": round(self.tau_s, 6),
            "noise_sd": round(self.noise_sd, 6),
        }


def mix_latents(z_base: np.ndarray, z_fresh: np.ndarray, carryover: float, offset_carryover: float) -> np.ndarray:
    """Per-song latents: ``sqrt(c) * z_base + sqrt(1 - c) * z_fresh``, c per parameter family.

    Args:
        z_base: (N_LATENT,) the listener's base latents.
        z_fresh: (N_LATENT,) fresh draws for this song.
        carryover: c for gains, weights, lag, smoothing, noise level.
        offset_carryover: c for the offsets.

    Returns:
        (N_LATENT,) standard normal; correlation with ``z_base``-driven draws of another song = c.
    """
    c = np.full(N_LATENT, float(carryover))
    c[_Z_OFFSET] = offset_carryover
    return np.sqrt(c) * z_base + np.sqrt(1.0 - c) * z_fresh


def respond(x: np.ndarray, lag_s: float, tau_s: float) -> np.ndarray:
    """A listener's reaction: lag by ``lag_s`` then exponential smoothing with ``tau_s``.

    Args:
        x: (T, ...) signal on the 2 Hz step grid from t = 0.
        lag_s: delay in seconds (fractional steps by linear interpolation; before t = lag the
            listener holds the first value).
        tau_s: smoothing time constant in seconds.

    Returns:
        (T, ...) the filtered signal.
    """
    x = np.asarray(x, dtype=np.float64)
    t = np.arange(x.shape[0]) * STEP_S
    src = np.clip(t - lag_s, 0.0, None) / STEP_S  # fractional step index
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, x.shape[0] - 1)
    w = (src - i0).reshape((-1,) + (1,) * (x.ndim - 1))
    lagged = (1 - w) * x[i0] + w * x[i1]  # (T, ...)
    a = 1.0 - np.exp(-STEP_S / tau_s)
    zi = (1 - a) * lagged[:1]  # start at rest on the first value
    y, _ = lfilter([a], [1.0, a - 1.0], lagged, axis=0, zi=zi)
    return y


@functools.lru_cache(maxsize=4)
def _population_filter_nodes(n: int = 64, lm: ListenerModel = LISTENER_MODEL) -> tuple[tuple[float, float], ...]:
    """Quadrature of the population's (lag, tau) distribution: n stratified, paired draws."""
    q = (np.arange(n) + 0.5) / n
    z_lag = ndtri(q)
    z_tau = ndtri(q)[np.random.default_rng(12345).permutation(n)]
    lags = lm.lag_max_s * ndtr(z_lag)
    taus = np.clip(lm.tau_median_s * np.exp(lm.tau_log_sd * z_tau), lm.tau_min_s, lm.tau_max_s)
    return tuple(zip(lags.tolist(), taus.tolist(), strict=True))


def _ar1(rng: np.random.Generator, n: int, sd: float, tau_s: float) -> np.ndarray:
    """Stationary AR(1) noise, (n, 2), std ``sd``, time constant ``tau_s``."""
    rho = np.exp(-STEP_S / tau_s)
    e = rng.standard_normal((n, 2))
    e[1:] *= np.sqrt(1 - rho**2)
    y, _ = lfilter([1.0], [1.0, -rho], e, axis=0, zi=np.zeros((1, 2)))
    return sd * y


# --------------------------------------------------------------------------------------------
# Songs and factor curves
# --------------------------------------------------------------------------------------------


@dataclass
class SongSpec:
    """A procedural song: its id, length and factor curves.

    Attributes:
        song_id: ``clip_000`` or ``long_000``.
        duration_s: length in seconds (a multiple of STEP_S).
        factors: (T, N_FACTORS) in [-1, 1], step k = audio [k * STEP_S, (k + 1) * STEP_S).
        entropy: seed path of its random streams.
    """

    song_id: str
    duration_s: float
    factors: np.ndarray
    entropy: tuple

    @property
    def n_steps(self) -> int:
        return int(self.factors.shape[0])


def _ramp_smooth(x: np.ndarray, n: int) -> np.ndarray:
    """Moving average of (T, F) over n steps (edges repeated): a jump becomes a ramp."""
    if n <= 1:
        return x
    pad = np.concatenate([np.repeat(x[:1], n // 2, 0), x, np.repeat(x[-1:], n - 1 - n // 2, 0)])
    c = np.cumsum(np.concatenate([np.zeros((1, x.shape[1])), pad]), axis=0)
    return (c[n:] - c[:-n]) / n


def _weight_sd(lm: "ListenerModel") -> np.ndarray:
    """(2, N_FACTORS) sd of the personal weight deviations."""
    sd = np.full((2, N_FACTORS), lm.weight_sd)
    for label, factor in lm.contested:
        sd[LABELS.index(label), FACTORS.index(factor)] = lm.contested_weight_sd
    return sd


def song_factors(
    rng: np.random.Generator, duration_s: float, is_long: bool, fm: FactorModel = FACTOR_MODEL
) -> np.ndarray:
    """Draw the factor curves of one song.

    A clip is an excerpt of a song (it starts inside a section); a long song is a whole song,
    with a quieter intro and outro.

    Args:
        rng: the song's generator.
        duration_s: song length in seconds.
        is_long: a whole song rather than an excerpt.
        fm: the factor model.

    Returns:
        (T, N_FACTORS) float64 in (-1, 1), T = duration_s / STEP_S.
    """
    n = int(round(duration_s / STEP_S))
    t = (np.arange(n) + 0.5) * STEP_S  # step centres
    mean = rng.normal(0.0, fm.song_sd, N_FACTORS)
    # sections
    pos = 0.0 if is_long else -rng.uniform(0.0, fm.section_max_s)
    bounds = []
    while pos < duration_s:
        bounds.append(pos)
        pos += rng.uniform(fm.section_min_s, fm.section_max_s)
    bounds = np.array(bounds)
    scale = fm.long_section_scale if is_long else 1.0
    intensity = rng.normal(0.0, scale * fm.intensity_sd, len(bounds))
    within = np.asarray(fm.within_scale)  # (F,)
    dev = rng.normal(0.0, scale * fm.section_sd, (len(bounds), N_FACTORS)) * within
    level = intensity[:, None] * INTENSITY_LOADING[None, :] + dev  # (n_sections, F)
    sec = np.searchsorted(bounds, t, side="right") - 1
    curves = _ramp_smooth(level[sec], int(round(fm.transition_s / STEP_S)))  # (T, F)
    # smooth drift
    rho = np.exp(-STEP_S / fm.drift_tau_s)
    e = rng.standard_normal((n, N_FACTORS))
    e[1:] *= np.sqrt(1 - rho**2)
    drift, _ = lfilter([1.0], [1.0, -rho], e, axis=0, zi=np.zeros((1, N_FACTORS)))
    curves = curves + fm.drift_sd * within * drift
    if is_long:
        intro = rng.uniform(*fm.intro_s)
        outro = rng.uniform(*fm.intro_s)
        shape = np.clip(1.0 - t / intro, 0, 1) + np.clip(1.0 - (duration_s - t) / outro, 0, 1)  # (T,)
        curves = curves - fm.intro_depth * shape[:, None] * INTENSITY_LOADING[None, :]
    return np.tanh(mean[None, :] + curves)


def consensus_raw(factors: np.ndarray) -> np.ndarray:
    """The population's instantaneous response, (T, 2) in (-1, 1), before lag and smoothing."""
    return np.tanh(BIAS[None, :] + factors @ POP_WEIGHTS.T)  # (T, 2)


def consensus_curve(factors: np.ndarray) -> np.ndarray:
    """The consensus (population-average noise-free response) of a song.

    Args:
        factors: (T, N_FACTORS) factor curves from t = 0.

    Returns:
        (T, 2) the population-average of ``lag(smooth(consensus_raw))`` over the listeners'
        (lag, tau) distribution; equals the mean oracle curve over listeners (up to clipping).
    """
    raw = consensus_raw(factors)
    return np.mean([respond(raw, lag, tau) for lag, tau in _population_filter_nodes()], axis=0)  # (T, 2)


def personal_curve(factors: np.ndarray, p: ListenerParams) -> np.ndarray:
    """A listener's noise-free response to a song, before clipping to the slider range.

    Args:
        factors: (T, N_FACTORS) factor curves from t = 0.
        p: the listener's parameters for this song.

    Returns:
        (T, 2) ``offset + gain * lag(smooth(raw + dW . factors))``.
    """
    x = consensus_raw(factors) + factors @ p.weights.T  # (T, 2)
    return p.offset[None, :] + p.gain[None, :] * respond(x, p.lag_s, p.tau_s)


def _song_plan(cfg: SyntheticConfig) -> list[tuple[str, float, bool, tuple]]:
    plan = []
    for i in range(cfg.n_clips):
        plan.append((f"clip_{i:03d}", float(cfg.clip_s), False, (0, i)))
    for j in range(cfg.n_long):
        rng = np.random.default_rng([cfg.seed, _S_SONG, 1, j, 0])
        d = round(rng.uniform(cfg.long_min_s, cfg.long_max_s) / STEP_S) * STEP_S
        plan.append((f"long_{j:03d}", float(d), True, (1, j)))
    return plan


# --------------------------------------------------------------------------------------------
# Simulation (everything but the audio)
# --------------------------------------------------------------------------------------------


@dataclass
class Simulation:
    """The benchmark in memory: songs, listeners and all curves (no audio).

    Attributes:
        cfg: the config.
        songs: the songs, clips first.
        base: listener_id -> base parameters.
        params: (listener_id, song_id) -> that song's parameters.
        ratings: (listener_id, song_id) -> rating curve (with noise).
        oracle: (listener_id, song_id) -> noise-free personal curve.
        consensus: song_id -> consensus curve over the rated span.
    """

    cfg: SyntheticConfig
    songs: list[SongSpec]
    base: dict[str, ListenerParams]
    params: dict[tuple[str, str], ListenerParams]
    ratings: dict[tuple[str, str], Curve]
    oracle: dict[tuple[str, str], Curve]
    consensus: dict[str, Curve]

    def to_dataset(self, root: Path | None = None) -> Dataset:
        """The in-memory curves as a Dataset (song paths point to ``root/audio``, unwritten)."""
        root = Path(root) if root is not None else default_root(self.cfg)
        songs = {s.song_id: Song(s.song_id, root / "audio" / f"{s.song_id}.wav", s.duration_s) for s in self.songs}
        curves = [self.ratings[k] for k in sorted(self.ratings, key=lambda k: (k[1], k[0]))]
        return Dataset(
            name=f"synthetic-{config_hash(self.cfg)}",
            root=root,
            songs=songs,
            curves=curves,
            oracle=dict(self.oracle),
            consensus=dict(self.consensus),
            scale="deam",
            info={"factors": FACTORS, "in_memory": True},
        )


def _check_cfg(cfg: SyntheticConfig) -> None:
    for key in ("carryover", "offset_carryover"):
        v = getattr(cfg, key)
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"data.synthetic.{key}={v} must be in [0, 1]")
    if cfg.clip_s <= cfg.label_start_s or cfg.long_min_s <= cfg.label_start_s:
        raise ConfigError("data.synthetic: clip_s and long_min_s must be longer than label_start_s")
    if cfg.long_max_s < cfg.long_min_s:
        raise ConfigError("data.synthetic.long_max_s must be >= long_min_s")
    if cfg.min_songs_per_listener < 1 or cfg.max_songs_per_listener < cfg.min_songs_per_listener:
        raise ConfigError("data.synthetic: need 1 <= min_songs_per_listener <= max_songs_per_listener")
    if cfg.n_clips + cfg.n_long < 1 or cfg.n_listeners < 1:
        raise ConfigError("data.synthetic: need at least one song and one listener")
    for key in ("offset_scale", "weight_scale", "noise_scale"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"data.synthetic.{key} must be >= 0")


def _assign(cfg: SyntheticConfig, n_songs: int) -> list[np.ndarray]:
    """Which songs each listener rates: a random subset, balanced so every song gets raters."""
    rng = np.random.default_rng([cfg.seed, _S_ASSIGN])
    counts = np.zeros(n_songs)
    out = []
    for _ in range(cfg.n_listeners):
        k = int(rng.integers(cfg.min_songs_per_listener, cfg.max_songs_per_listener + 1))
        k = min(k, n_songs)
        priority = counts + 3.0 * rng.random(n_songs)  # fewest raters first, with randomness
        chosen = np.sort(np.argsort(priority, kind="stable")[:k])
        counts[chosen] += 1
        out.append(chosen)
    return out


def simulate(cfg: SyntheticConfig) -> Simulation:
    """Draw songs (factor curves), listeners and every curve; no audio.

    Deterministic: each song, listener and (listener, song) pair has its own random stream
    derived from ``cfg.seed``, so a song's factors do not depend on the number of listeners.

    Args:
        cfg: the benchmark config.

    Returns:
        Simulation.
    """
    _check_cfg(cfg)
    start = int(round(cfg.label_start_s / STEP_S))
    songs = []
    for sid, dur, is_long, key in _song_plan(cfg):
        rng = np.random.default_rng([cfg.seed, _S_SONG, *key, 1])
        songs.append(SongSpec(sid, dur, song_factors(rng, dur, is_long), key))

    consensus = {s.song_id: Curve(s.song_id, CONSENSUS_ID, start, consensus_curve(s.factors)[start:]) for s in songs}

    base, params, ratings, oracle = {}, {}, {}, {}
    assignment = _assign(cfg, len(songs))
    for li in range(cfg.n_listeners):
        lid = f"L{li:03d}"
        z_base = np.random.default_rng([cfg.seed, _S_LISTENER, li]).standard_normal(N_LATENT)
        base[lid] = ListenerParams.from_latent(z_base, cfg)
        for si in assignment[li]:
            s = songs[si]
            rng = np.random.default_rng([cfg.seed, _S_FRESH, li, *s.entropy])
            z = mix_latents(z_base, rng.standard_normal(N_LATENT), cfg.carryover, cfg.offset_carryover)
            p = ListenerParams.from_latent(z, cfg)
            clean = personal_curve(s.factors, p)  # (T, 2)
            noisy = clean + _ar1(rng, s.n_steps, p.noise_sd, LISTENER_MODEL.noise_tau_s)
            params[lid, s.song_id] = p
            oracle[lid, s.song_id] = Curve(s.song_id, lid, start, np.clip(clean[start:], -1, 1))
            ratings[lid, s.song_id] = Curve(s.song_id, lid, start, np.clip(noisy[start:], -1, 1))
    return Simulation(cfg, songs, base, params, ratings, oracle, consensus)


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------

TABLE_LEN = 2048
N_LEVELS = 16
N_HARMONICS = 20
MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
MINOR = np.array([0, 2, 3, 5, 7, 8, 10])
_TABLES: np.ndarray | None = None


def _wavetables() -> np.ndarray:
    """(N_LEVELS * TABLE_LEN,) float32: single-cycle waves from dark (steep rolloff) to bright."""
    global _TABLES
    if _TABLES is None:
        n = np.arange(1, N_HARMONICS + 1)
        p = np.linspace(3.0, 0.6, N_LEVELS)  # harmonic rolloff exponent per level
        amps = n[None, :] ** -p[:, None]  # (L, H)
        ph = 2 * np.pi * np.arange(TABLE_LEN) / TABLE_LEN
        waves = amps @ np.sin(n[:, None] * ph[None, :])  # (L, TABLE_LEN)
        waves /= np.sqrt(np.mean(waves**2, axis=1, keepdims=True)) * np.sqrt(2)  # rms of a unit sine
        _TABLES = waves.astype(np.float32).reshape(-1)
    return _TABLES


def _voice(
    n: int,
    onsets: np.ndarray,
    gate: np.ndarray,
    freq: np.ndarray,
    amp: np.ndarray,
    level: np.ndarray,
    attack_s: float,
    decay_s: float,
) -> np.ndarray:
    """A wavetable voice: each note (a chord of V tones) lasts until the next onset (or its gate).

    Args:
        n: number of samples.
        onsets: (N_notes,) increasing sample indices.
        gate: (N_notes,) note lengths in samples (cut by the next onset).
        freq, amp: (N_notes,) or (N_notes, V) Hz and linear amplitude of each tone.
        level: (N_notes,) wavetable brightness level.
        attack_s, decay_s: envelope (linear attack, exponential decay).

    Returns:
        (n,) float32.
    """
    if len(onsets) == 0:
        return np.zeros(n, np.float32)
    freq = np.asarray(freq, dtype=np.float64).reshape(len(onsets), -1)  # (N, V)
    amp = np.broadcast_to(np.asarray(amp, dtype=np.float64).reshape(len(onsets), -1), freq.shape)  # (N, V)
    onsets = np.concatenate([[0], onsets]).astype(np.int64)  # a silent note before the first
    gate = np.concatenate([[0], gate])
    freq = np.concatenate([np.zeros((1, freq.shape[1])), freq])
    amp = np.concatenate([np.zeros((1, amp.shape[1])), amp])
    level = np.concatenate([[0], level])
    lengths = np.diff(np.append(onsets, n))
    keep = lengths > 0
    onsets, gate, freq, amp, level, lengths = (a[keep] for a in (onsets, gate, freq, amp, level, lengths))
    gate = np.minimum(gate, lengths)
    # float32 / int32 throughout: the phase rounding (< 1 table sample) is far below audibility
    tsince = np.arange(n, dtype=np.int32) - np.repeat(onsets.astype(np.int32), lengths)  # samples since onset
    n_env = int(4 * decay_s * SAMPLE_RATE) + 1
    te = np.arange(n_env) / SAMPLE_RATE
    env_table = (np.minimum(1.0, te / attack_s) * np.exp(-te / decay_s)).astype(np.float32)
    env = env_table[np.minimum(tsince, n_env - 1)]  # (n,) shared by the tones
    release = (np.repeat(gate.astype(np.int32), lengths) - tsince).astype(np.float32)
    release *= np.float32(1.0 / (0.01 * SAMPLE_RATE))
    np.clip(release, 0.0, 1.0, out=release)
    env *= release
    table_base = np.repeat(level.astype(np.int32) * TABLE_LEN, lengths)
    out = np.zeros(n, np.float32)
    for v in range(freq.shape[1]):
        inc = np.repeat((freq[:, v] * TABLE_LEN / SAMPLE_RATE).astype(np.float32), lengths)
        idx = (tsince * inc).astype(np.int32) & (TABLE_LEN - 1)  # TABLE_LEN is a power of two
        idx |= table_base
        x = _wavetables()[idx]  # (n,)
        x *= np.repeat(amp[:, v].astype(np.float32), lengths)
        out += x
    out *= env
    return out


def _place(out: np.ndarray, onsets: np.ndarray, amps: np.ndarray, sample: np.ndarray) -> None:
    for o, a in zip(onsets.tolist(), amps.tolist(), strict=True):
        m = min(len(sample), len(out) - o)
        if m > 0:
            out[o : o + m] += a * sample[:m]


def render_song(factors: np.ndarray, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Render the audio of one song from its factor curves.

    Tempo sets the beat rate (65-170 bpm) and how many sixteenths carry notes and hi-hats;
    loudness the master gain (-22 to -2 dB); brightness the harmonic rolloff of the wavetables
    and the hi-hat level; mode the share of bars in major; consonance the share of bars with
    a dissonant cluster tone and chromatic melody notes, and the detuning; register the pitch
    centre (MIDI 48-72).

    Args:
        factors: (T, N_FACTORS) in [-1, 1] at 2 Hz.
        duration_s: seconds.
        rng: the song's audio generator.

    Returns:
        (duration_s * SAMPLE_RATE,) float32 in (-1, 1).
    """
    # the parts draw from rng in this order (score, melody, chords, drums): the audio depends on it
    sc = _Score.of(factors, duration_s, rng)
    voices = np.zeros(sc.n, np.float32)
    _melody(sc, voices, rng)
    _chords(sc, voices, rng)
    _bass(sc, voices)
    _drums(sc, voices, rng)
    # master loudness, soft clip
    ts = (np.arange(0, sc.n, 441) + 220) / SAMPLE_RATE  # 100 Hz control
    gain_db = -12.0 + 10.0 * sc.at(_LOUDNESS, ts)
    gain = np.repeat((10.0 ** (gain_db / 20.0)).astype(np.float32), 441)[: sc.n]
    return np.tanh(voices * gain * 1.6).astype(np.float32)


_TEMPO, _LOUDNESS, _BRIGHTNESS, _MODE, _CONSONANCE, _REGISTER = range(N_FACTORS)


@dataclass
class _Score:
    """One song's sixteenth-note grid and what the factors set on it (arrays of shape (N16,) unless said)."""

    factors: np.ndarray  # (T, N_FACTORS)
    n: int  # samples
    s16: np.ndarray  # sixteenth index
    on16: np.ndarray  # onset sample
    pos: np.ndarray  # position in the beat (0-3)
    dens: np.ndarray  # note density in [0, 1] (tempo)
    bright: np.ndarray  # brightness in [-1, 1]
    level: np.ndarray  # wavetable level (brightness)
    q_diss: np.ndarray  # share of dissonance (consonance)
    centre: np.ndarray  # pitch centre, MIDI (register)
    tonic: int
    u: np.ndarray  # (N16, 6) the per-sixteenth random draws
    major: np.ndarray  # (bars,) bar in major
    dissonant: np.ndarray  # (bars,) bar with a cluster tone
    degree: np.ndarray  # (bars,) chord degree
    bar_of: np.ndarray  # bar of each sixteenth

    @classmethod
    def of(cls, factors: np.ndarray, duration_s: float, rng: np.random.Generator) -> _Score:
        sr = SAMPLE_RATE
        n = int(round(duration_s * sr))
        step_t = (np.arange(factors.shape[0]) + 0.5) * STEP_S

        def at(col: int, times: np.ndarray) -> np.ndarray:
            return np.interp(times, step_t, factors[:, col])

        # musical time: sixteenth-note grid from the tempo curve
        tc = np.arange(0.0, duration_s + 0.01, 0.01)
        bpm = 105.0 * 2.0 ** (0.7 * at(_TEMPO, tc))
        phase16 = np.concatenate([[0.0], np.cumsum(bpm[:-1] / 60.0 * 4 * 0.01)])  # sixteenths elapsed
        s16 = np.arange(int(phase16[-1]))
        t16 = np.interp(s16, phase16, tc)  # (N16,) seconds
        bright = at(_BRIGHTNESS, t16)
        tonic = 48 + int(rng.integers(0, 12))
        u = rng.random((len(s16), 6))  # all per-sixteenth random draws
        # per bar: mode, chord degree, dissonance
        bar_starts = np.flatnonzero(s16 % 16 == 0)
        p_major = (1 + at(_MODE, t16)) / 2
        q_diss = (1 - at(_CONSONANCE, t16)) / 2
        # four-bar phrases with a clear tonal centre: I - (ii|IV|vi) - (IV|V|vi) - V
        phrase = [[0], [1, 3, 5], [3, 4, 5], [4]]
        degree = [phrase[b % 4][int(rng.integers(len(phrase[b % 4])))] for b in range(len(bar_starts))]
        return cls(
            factors=factors,
            n=n,
            s16=s16,
            on16=np.minimum((t16 * sr).astype(np.int64), n - 1),
            pos=s16 % 4,
            dens=(at(_TEMPO, t16) + 1) / 2,
            bright=bright,
            level=np.clip(np.round((bright + 1) / 2 * (N_LEVELS - 1)), 0, N_LEVELS - 1).astype(int),
            q_diss=q_diss,
            centre=60.0 + 12.0 * at(_REGISTER, t16),
            tonic=tonic,
            u=u,
            major=u[bar_starts, 0] < p_major[bar_starts],
            dissonant=u[bar_starts, 1] < q_diss[bar_starts],
            degree=np.array(degree, dtype=int),
            bar_of=s16 // 16,
        )

    def at(self, col: int, times: np.ndarray) -> np.ndarray:
        """Factor ``col`` interpolated at ``times`` (seconds)."""
        step_t = (np.arange(self.factors.shape[0]) + 0.5) * STEP_S
        return np.interp(times, step_t, self.factors[:, col])

    def midi_of(self, deg: np.ndarray, is_major: np.ndarray) -> np.ndarray:
        """MIDI notes of scale degrees ``deg`` in major or minor."""
        sc = np.where(is_major[:, None], MAJOR[None, :], MINOR[None, :])  # (N, 7)
        return self.tonic + 12 * (deg // 7) + np.take_along_axis(sc, (deg % 7)[:, None], 1)[:, 0]


def _hz(m: np.ndarray) -> np.ndarray:
    return 440.0 * 2.0 ** ((m - 69.0) / 12.0)


def _melody(sc: _Score, voices: np.ndarray, rng: np.random.Generator) -> None:
    """The melody, added into ``voices``: a walk over the scale pulled to the register, chromatic when dissonant."""
    sr, u, pos = SAMPLE_RATE, sc.u, sc.pos
    p_note = np.where(pos == 0, 0.85, np.where(pos == 2, 0.2 + 0.6 * sc.dens, 0.65 * sc.dens**2))
    mel = np.flatnonzero(u[:, 2] < p_note)
    if not len(mel):
        return
    target = np.round((sc.centre[mel] - sc.tonic) * 7 / 12).astype(int)
    steps = rng.choice([-2, -1, -1, 0, 1, 1, 2], size=len(mel))
    deg_list = []
    d = int(target[0])
    for st, tg in zip(steps.tolist(), target.tolist(), strict=True):  # random walk pulled towards the register
        d += st - (1 if d > tg + 3 else -1 if d < tg - 3 else 0)
        deg_list.append(d)
    deg = np.array(deg_list)
    chromatic = np.where(u[mel, 3] < 0.4 * sc.q_diss[mel], rng.choice([-1, 1], len(mel)), 0)
    m = sc.midi_of(deg, sc.major[sc.bar_of[mel]]) + chromatic
    amp = 0.22 * (0.75 + 0.25 * (pos[mel] == 0)) * (0.85 + 0.3 * u[mel, 4])
    gate = np.full(len(mel), int(0.6 * sr))
    voices += _voice(sc.n, sc.on16[mel], gate, _hz(m), amp, sc.level[mel], 0.005, 0.35)


def _chords(sc: _Score, voices: np.ndarray, rng: np.random.Generator) -> None:
    """Chords, added into ``voices``: at bar starts, again at half bars when dense; a cluster tone when dissonant."""
    sr, u, s16 = SAMPLE_RATE, sc.u, sc.s16
    ch = np.flatnonzero((s16 % 16 == 0) | ((s16 % 16 == 8) & (u[:, 2] < sc.dens)))
    if not len(ch):
        return
    cb = sc.bar_of[ch]
    major = sc.major[cb]
    root_deg = sc.degree[cb] + 7 * np.round((sc.centre[ch] - 12 - sc.tonic) / 12).astype(int)
    detune = 1.0 + 0.02 * sc.q_diss[ch] * (u[ch, 5] - 0.5)
    lvl = np.clip(sc.level[ch] - 3, 0, N_LEVELS - 1)
    gate = np.full(len(ch), int(4 * sr))
    root = sc.midi_of(root_deg, major)
    extra = np.where(sc.dissonant[cb], root + rng.choice([1, 6, 11], len(ch)), root + 12)
    tones = np.stack(
        [
            _hz(root),
            _hz(sc.midi_of(root_deg + 2, major)) * detune,
            _hz(sc.midi_of(root_deg + 4, major)),
            _hz(extra) / detune,
        ],
        axis=1,
    )  # (N, 4)
    amps = np.stack([np.full(len(ch), 0.11)] * 3 + [np.where(sc.dissonant[cb], 0.10, 0.06)], axis=1)  # (N, 4)
    voices += _voice(sc.n, sc.on16[ch], gate, tones, amps, lvl, 0.03, 1.6)


def _bass(sc: _Score, voices: np.ndarray) -> None:
    """Bass notes on beats (more of them when dense), added into ``voices``."""
    u, pos, dens = sc.u, sc.pos, sc.dens
    bs = np.flatnonzero(((pos == 0) & (u[:, 3] < 0.5 + 0.5 * dens)) | ((pos == 2) & (u[:, 3] < 0.3 * dens)))
    if not len(bs):
        return
    rd = sc.degree[sc.bar_of[bs]] + 7 * np.round((sc.centre[bs] - 24 - sc.tonic) / 12).astype(int)
    m = np.maximum(sc.midi_of(rd, sc.major[sc.bar_of[bs]]), 31)
    lvl = np.clip(sc.level[bs] - 5, 0, N_LEVELS - 1)
    gate = np.full(len(bs), int(0.4 * SAMPLE_RATE))
    voices += _voice(sc.n, sc.on16[bs], gate, _hz(m), np.full(len(bs), 0.28), lvl, 0.01, 0.4)


def _drums(sc: _Score, voices: np.ndarray, rng: np.random.Generator) -> None:
    """Kicks and hi-hats added into ``voices`` (hi-hat level with brightness)."""
    sr, pos, dens = SAMPLE_RATE, sc.pos, sc.dens
    tk = np.arange(int(0.25 * sr)) / sr
    kick = (np.sin(2 * np.pi * np.cumsum(45 + 65 * np.exp(-tk / 0.03)) / sr) * np.exp(-tk / 0.07)).astype(np.float32)
    kicks = np.flatnonzero((sc.s16 % 8 == 0) | ((pos == 0) & (dens > 0.6)))
    _place(voices, sc.on16[kicks], np.full(len(kicks), 0.45), kick)
    th = np.arange(int(0.06 * sr)) / sr
    hat = (np.diff(rng.standard_normal(len(th) + 1)) * np.exp(-th / 0.012) * 0.5).astype(np.float32)
    hats = np.flatnonzero((pos % 2 == 0) | (sc.u[:, 4] < dens))
    _place(voices, sc.on16[hats], 0.03 + 0.10 * (sc.bright[hats] + 1) / 2, hat)


def _render_to_file(args: tuple) -> tuple[str, float]:
    import soundfile as sf

    song_id, factors, duration_s, entropy, seed, path = args
    t0 = time.perf_counter()
    rng = np.random.default_rng([seed, _S_AUDIO, *entropy])
    audio = render_song(factors, duration_s, rng)
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    return song_id, time.perf_counter() - t0


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def render_audio(sim: Simulation, audio_dir: Path, workers: int | None = None) -> dict[str, float]:
    """Write ``<audio_dir>/<song_id>.wav`` for every song, in parallel processes.

    Args:
        sim: the simulation (its factor curves).
        audio_dir: existing folder.
        workers: processes (None = the CPUs available; 1 = in this process).

    Returns:
        song_id -> seconds spent rendering and writing it.
    """
    jobs = [
        (s.song_id, s.factors, s.duration_s, s.entropy, sim.cfg.seed, str(Path(audio_dir) / f"{s.song_id}.wav"))
        for s in sorted(sim.songs, key=lambda s: -s.duration_s)  # longest first: better balance
    ]
    workers = min(workers or _default_workers(), len(jobs))
    if workers <= 1:
        return dict(_render_to_file(j) for j in jobs)
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        return dict(ex.map(_render_to_file, jobs))


# --------------------------------------------------------------------------------------------
# Writing and loading
# --------------------------------------------------------------------------------------------

CSV_HEADER = ("song_id", "annotator_id", "time_s", "valence", "arousal")


def _write_curves(path: Path, curves: list[Curve]) -> int:
    """Write curves in the generic layout (CSV columns valence, arousal). Returns the row count."""
    rows = 0
    with open(path, "w", newline="") as f:
        f.write(",".join(CSV_HEADER) + "\n")
        for c in curves:
            vals = np.round(c.values.astype(np.float64), 4) + 0.0  # no "-0.0000"
            lines = [
                f"{c.song_id},{c.annotator_id},{t:.1f},{v:.4f},{a:.4f}\n"
                for t, a, v in zip(c.times.tolist(), vals[:, 0].tolist(), vals[:, 1].tolist(), strict=True)
            ]
            f.writelines(lines)
            rows += len(lines)
    return rows


def config_hash(cfg: SyntheticConfig) -> str:
    """Short hash of the config and the generator version (names the default cache folder)."""
    blob = json.dumps({"cfg": dataclasses.asdict(cfg), "version": GENERATOR_VERSION}, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:8]


def default_root(cfg: SyntheticConfig) -> Path:
    """``<repo>/data/synthetic-<hash>``."""
    return paths.data_dir() / f"synthetic-{config_hash(cfg)}"


def _replace_dir(tmp: Path, root: Path) -> None:
    """Move the finished ``tmp`` folder to ``root``, replacing (and deleting) an old one."""
    old = swap_dir(tmp, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def generate(cfg: SyntheticConfig, root: Path, workers: int | None = None) -> Path:
    """Generate the benchmark into ``root`` (audio, ratings and the truths).

    Everything is written into a temporary folder beside ``root`` and renamed at the end, so a
    killed generation never leaves a half-written ``root``. An existing ``root`` is replaced.

    Args:
        cfg: the benchmark config.
        root: destination folder.
        workers: rendering processes (None = the CPUs available).

    Returns:
        root.
    """
    root = Path(root)
    t0 = time.perf_counter()
    log.info(
        "generating synthetic benchmark into %s (%d clips, %d long songs, %d listeners)",
        root,
        cfg.n_clips,
        cfg.n_long,
        cfg.n_listeners,
    )
    sim = simulate(cfg)
    t_sim = time.perf_counter() - t0
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (tmp / "audio").mkdir()
        t1 = time.perf_counter()
        per_song = render_audio(sim, tmp / "audio", workers)
        t_audio = time.perf_counter() - t1
        t2 = time.perf_counter()
        order = sorted(sim.ratings, key=lambda k: (k[1], k[0]))  # by song, then listener
        n_rows = _write_curves(tmp / "ratings.csv", [sim.ratings[k] for k in order])
        _write_curves(tmp / "oracle.csv", [sim.oracle[k] for k in order])
        _write_curves(tmp / "consensus.csv", [sim.consensus[s.song_id] for s in sim.songs])
        _write_truths(tmp, sim)
        t_write = time.perf_counter() - t2
        timing = {"simulate": t_sim, "audio": t_audio, "audio_cpu": sum(per_song.values()), "write": t_write}
        meta = _meta(cfg, sim, n_rows, {**timing, "total": time.perf_counter() - t0})
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
        _replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("synthetic benchmark written to %s in %.1f s", root, time.perf_counter() - t0)
    return root


def _write_truths(folder: Path, sim: Simulation) -> None:
    """The listeners' parameters (``listeners.json``) and the songs' factor curves (``factors.npz``)."""
    listeners = {
        lid: {
            "base": p.to_json(),
            "songs": {sid: sim.params[lid, sid].to_json() for (l2, sid) in sorted(sim.params) if l2 == lid},
        }
        for lid, p in sim.base.items()
    }
    with open(folder / "listeners.json", "w") as f:
        json.dump(
            {
                "labels": LABELS,
                "factors": FACTORS,
                "population_weights": {
                    lab: dict(zip(FACTORS, POP_WEIGHTS[i].tolist(), strict=True)) for i, lab in enumerate(LABELS)
                },
                "note": "weight_dev = personal deviation from population_weights; per-song parameters mix the "
                "base latents with fresh ones (carryover)",
                "listeners": listeners,
            },
            f,
            indent=1,
        )
    np.savez(
        folder / "factors.npz",
        factor_names=np.array(FACTORS),
        **{s.song_id: s.factors.astype(np.float32) for s in sim.songs},
    )


def _meta(cfg: SyntheticConfig, sim: Simulation, n_rows: int, timing: dict[str, float]) -> dict:
    """``meta.json``: the generator, its config and models, counts and ``timing`` (seconds per stage)."""
    return {
        "generator": "pdmer.data.synthetic",
        "version": GENERATOR_VERSION,
        "config": dataclasses.asdict(cfg),
        "config_hash": config_hash(cfg),
        "sample_rate": SAMPLE_RATE,
        "labels": LABELS,
        "factors": FACTORS,
        "scale": "deam",
        "n_songs": len(sim.songs),
        "n_listeners": len(sim.base),
        "n_curves": len(sim.ratings),
        "n_ratings": n_rows,
        "audio_s": round(sum(s.duration_s for s in sim.songs), 1),
        "factor_model": dataclasses.asdict(FACTOR_MODEL),
        "listener_model": dataclasses.asdict(LISTENER_MODEL),
        "timing_s": {k: round(v, 3) for k, v in timing.items()},
    }


def _meta_matches(root: Path, cfg: SyntheticConfig) -> bool:
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("version") == GENERATOR_VERSION and meta.get("config") == json.loads(
        json.dumps(dataclasses.asdict(cfg))
    )


def load_synthetic(cfg: SyntheticConfig, root: Path | None = None) -> Dataset:
    """The benchmark as a Dataset, generated on first use and read back through ``load_generic``.

    Args:
        cfg: the benchmark config.
        root: folder (None = ``<repo>/data/synthetic-<hash of cfg>``). Regenerated when missing
            or when its meta.json holds another config or generator version.

    Returns:
        Dataset with ``oracle`` (noise-free personal curves) and ``consensus`` filled;
        ``info["synthetic"]`` is meta.json.
    """
    from pdmer.data.generic import load_generic

    root = Path(root) if root is not None else default_root(cfg)
    if not _meta_matches(root, cfg):
        generate(cfg, root)
    ds = load_generic(root, name=f"synthetic-{config_hash(cfg)}")
    if ds.oracle is None or ds.consensus is None:
        raise DataError(f"{root}: synthetic benchmark without oracle.csv / consensus.csv")
    ds.info["synthetic"] = json.loads((root / "meta.json").read_text())
    return ds


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def _pair_corr(per_listener: dict[str, list[float]]) -> float:
    """Correlation of a listener's value on one song with the same listener's on another
    (all ordered pairs of distinct songs, pooled over listeners)."""
    xs, ys = [], []
    for vals in per_listener.values():
        v = np.asarray(vals)
        if len(v) < 2:
            continue
        i, j = np.where(~np.eye(len(v), dtype=bool))
        xs.append(v[i])
        ys.append(v[j])
    if not xs:
        return float("nan")
    return float(np.corrcoef(np.concatenate(xs), np.concatenate(ys))[0, 1])


def calibration_stats(dataset: Dataset, window_steps: int = 60) -> dict:
    """The figures that compare simulated raters with real ones, on the first ``window_steps``
    rated steps of every song (60 = DEAM's 15-45 s).

    Args:
        dataset: ratings of several raters per song.
        window_steps: steps from the first rated step of each song.

    Returns:
        dict, each figure per label (``{"arousal": x, "valence": y}``):
        ``frame_std`` mean per-frame std across raters (ddof 1); ``spread`` std across songs of
        the mean of the averaged curve; ``within`` mean within-song std of the averaged curve;
        ``offset_r`` between-song correlation of a listener's mean offset from the other raters;
        ``slider_r`` the same for the within-song std of their ratings (how far they move the
        slider). Plus ``raters_per_song`` and ``n_songs``.
    """
    by_song: dict[str, list[Curve]] = {}
    for c in dataset.curves:
        by_song.setdefault(c.song_id, []).append(c)
    frame_std = [[], []]
    means, withins = [], []
    offsets = [dict(), dict()]
    sliders = [dict(), dict()]
    n_raters = []
    for _sid, cs in sorted(by_song.items()):
        if len(cs) < 2:
            continue
        s0 = min(c.start_step for c in cs)
        m = np.full((len(cs), window_steps, 2), np.nan)  # (raters, steps, 2)
        for r, c in enumerate(cs):
            a, b = max(c.start_step, s0), min(c.end_step, s0 + window_steps)
            if b > a:
                m[r, a - s0 : b - s0] = c.values[a - c.start_step : b - c.start_step]
        cnt = np.sum(~np.isnan(m[..., 0]), axis=0)  # (steps,)
        ok = cnt >= 2
        if not ok.any():
            continue
        n_raters.append(float(cnt[ok].mean()))
        sd = np.nanstd(m[:, ok], axis=0, ddof=1)  # (steps_ok, 2)
        avg = np.nanmean(m[:, ok], axis=0)  # (steps_ok, 2)
        tot = np.nansum(m[:, ok], axis=0)
        means.append(avg.mean(0))
        withins.append(avg.std(0))
        for d in range(2):
            frame_std[d].append(sd[:, d])
        for r, c in enumerate(cs):
            row = m[r, ok]  # (steps_ok, 2)
            have = ~np.isnan(row[:, 0])
            if have.sum() < 2:
                continue
            others = (tot[have] - row[have]) / (cnt[ok][have] - 1)[:, None]  # mean of the other raters
            off = (row[have] - others).mean(0)
            sl = row[have].std(0)
            for d in range(2):
                offsets[d].setdefault(c.annotator_id, []).append(off[d])
                sliders[d].setdefault(c.annotator_id, []).append(sl[d])
    means, withins = np.array(means), np.array(withins)
    out = {
        "frame_std": {lab: float(np.mean(np.concatenate(frame_std[d]))) for d, lab in enumerate(LABELS)},
        "spread": {lab: float(means[:, d].std()) for d, lab in enumerate(LABELS)},
        "within": {lab: float(withins[:, d].mean()) for d, lab in enumerate(LABELS)},
        "offset_r": {lab: _pair_corr(offsets[d]) for d, lab in enumerate(LABELS)},
        "slider_r": {lab: _pair_corr(sliders[d]) for d, lab in enumerate(LABELS)},
        "raters_per_song": float(np.mean(n_raters)),
        "n_songs": len(means),
    }
    return out


def _read_deam_matrix(path: Path) -> np.ndarray:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return np.array([[float(x) if x.strip() else np.nan for x in r[1:]] for r in rows[1:] if r])


def deam_calibration_stats(deam_dir: Path | None = None) -> dict:
    """The same figures as ``calibration_stats`` from the real DEAM 2013 files.

    Reads ``2013_{arousal,valence}_cont_std.csv`` (per-frame std across raters) and
    ``2013_{arousal,valence}_cont_average.csv`` (averaged curves), 744 songs x 15-45 s.
    The per-listener correlations are not computable from these files; see
    ``REAL_LISTENER_TARGETS``.

    Args:
        deam_dir: folder with the files (None = ``<repo>/../shared/data/deam``).

    Returns:
        dict with ``frame_std``, ``spread``, ``within`` per label and ``n_songs``.

    Raises:
        FileNotFoundError: a file is missing.
    """
    deam_dir = Path(deam_dir) if deam_dir is not None else paths.shared_data_dir() / "deam"
    out: dict = {"frame_std": {}, "spread": {}, "within": {}}
    for lab in LABELS:
        sd = _read_deam_matrix(deam_dir / f"2013_{lab}_cont_std.csv")
        avg = _read_deam_matrix(deam_dir / f"2013_{lab}_cont_average.csv")
        out["frame_std"][lab] = float(np.nanmean(sd))
        out["spread"][lab] = float(np.nanstd(np.nanmean(avg, axis=1)))
        out["within"][lab] = float(np.nanmean(np.nanstd(avg, axis=1)))
        out["n_songs"] = int(avg.shape[0])
    return out
