"""A rating page's submission: checked, binned onto the 2 Hz grid, written in the generic layout.

The page sends the pointer samples it took against the audio clock (``currentTime``), one
series per dimension, so that the two-pass mode (DEAM's: valence on one pass, arousal on the
next) and the 2-D pad send the same thing::

    {"mode": "pad" | "passes",
     "songs": [{"song": 0, "valence": [[t, x], ...], "arousal": [[t, x], ...]}, ...]}

``song`` is an index into the songs named on the command line (no path ever comes from the
browser), ``t`` seconds from the start of the audio, ``x`` in [-1, 1].

Binning: step ``k`` covers ``[0.5 k, 0.5 k + 0.5)`` s (``pdmer.data.types``) and takes the mean
of the samples inside it, per dimension; it is written with ``time_s = 0.5 k``, the time that
``calibrate`` maps back to step ``k``. Only whole steps of the audio are kept (samples inside the
audio's final partial step are dropped), and only steps that both dimensions reach. Steps with no
sample (a short stall of the page's timer) are left out of the file; ``calibrate`` interpolates
across them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from pdmer.data.types import STEP_S

MAX_RATE_HZ = 100.0  # samples per second of audio accepted per dimension (the page sends 40)
TIME_TOL_S = 0.05  # a sample this far past the end of the audio still counts as inside
MAX_GAP_S = 2.0  # longer holes in a rated span are refused (rate the song again)
FLAT_MAD = 0.01  # DEAM's filter: a curve whose mean absolute deviation is below this never moved
DIMENSIONS = ("valence", "arousal")
MODES = ("pad", "passes")


class SubmissionError(ValueError):
    """A submission that is refused; ``status`` is the HTTP status to answer with.

    400: malformed or hostile (not JSON, NaN, wrong types, times out of order or beyond the song);
    422: well-formed but not enough to calibrate on (too short, a long hole, a curve that never moved).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class RatedSong:
    """One song's ratings on the 2 Hz grid.

    Attributes:
        index: the song's index in the command line's ``--audio`` list.
        song_id: its id (file stem).
        steps: (T,) int, increasing step indices.
        valence, arousal: (T,) float, the mean of the samples inside each step.
        raw: the submitted series, dimension -> (N, 2) array of (t, x).
    """

    index: int
    song_id: str
    steps: np.ndarray
    valence: np.ndarray
    arousal: np.ndarray
    raw: dict[str, np.ndarray]

    @property
    def times(self) -> np.ndarray:
        return self.steps * STEP_S

    @property
    def rated_s(self) -> float:
        """Seconds of audio from the first to the last rated step, both included."""
        return float((self.steps[-1] - self.steps[0] + 1) * STEP_S) if len(self.steps) else 0.0


def _reject_constant(name: str):
    raise SubmissionError(f"the submission contains {name}: every value must be a finite number")


def parse_json(body: bytes) -> object:
    """JSON without NaN / Infinity (Python's json module accepts them by default)."""
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except SubmissionError:
        raise
    except (UnicodeDecodeError, ValueError) as e:
        raise SubmissionError(f"the submission is not valid JSON ({e})") from None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _series(raw, where: str, duration_s: float) -> np.ndarray:
    """Check one dimension's samples: a list of [t, x], finite, t increasing inside the audio, |x| <= 1."""
    if not isinstance(raw, list):
        raise SubmissionError(f"{where}: expected a list of [time_s, value] pairs, got {type(raw).__name__}")
    limit = int(MAX_RATE_HZ * duration_s) + 10
    if len(raw) > limit:
        raise SubmissionError(
            f"{where}: {len(raw)} samples for {duration_s:.1f} s of audio (at most {limit}, {MAX_RATE_HZ:g} per second)"
        )
    for i, s in enumerate(raw):
        if not (isinstance(s, list) and len(s) == 2 and _is_number(s[0]) and _is_number(s[1])):
            raise SubmissionError(f"{where}, sample {i}: expected [time_s, value] (two numbers), got {str(s)[:60]}")
    arr = np.array(raw, dtype=np.float64).reshape(-1, 2)  # (N, 2): t, x
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise SubmissionError(f"{where}, sample {i}: {raw[i]} is not finite")
    t, x = arr[:, 0], arr[:, 1]
    for i in np.flatnonzero((t < 0) | (t > duration_s + TIME_TOL_S))[:1]:
        raise SubmissionError(f"{where}, sample {i}: time {t[i]:g} s is outside the song (0 to {duration_s:.2f} s)")
    for i in np.flatnonzero(np.abs(x) > 1.0)[:1]:
        raise SubmissionError(f"{where}, sample {i}: value {x[i]:g} is outside [-1, 1]")
    for i in np.flatnonzero(np.diff(t) <= 0)[:1]:
        raise SubmissionError(
            f"{where}, sample {i + 1}: time {t[i + 1]:g} s is not after {t[i]:g} s (times must increase)"
        )
    return arr


def bin_to_grid(samples: np.ndarray, n_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the samples inside each 0.5 s step.

    Args:
        samples: (N, 2) rows (t, x), t in seconds.
        n_steps: whole steps of the audio; samples at ``t >= n_steps * 0.5`` are dropped.

    Returns:
        (steps (K,) int, increasing; means (K,) float) for the steps holding at least one sample.
    """
    k = np.floor(samples[:, 0] / STEP_S).astype(np.int64)  # (N,) step of each sample
    keep = (k >= 0) & (k < n_steps)
    k, x = k[keep], samples[keep, 1]
    steps, inverse = np.unique(k, return_inverse=True)
    sums = np.bincount(inverse, weights=x, minlength=len(steps))
    counts = np.bincount(inverse, minlength=len(steps))
    return steps, sums / np.maximum(counts, 1)


def parse_submission(body: bytes, songs: list[tuple[str, float]], min_rated_s: float) -> tuple[str, list[RatedSong]]:
    """Check a submission and bin it.

    Args:
        body: the request body.
        songs: (song_id, duration_s) of each song the page may rate, by index.
        min_rated_s: seconds each submitted song must cover (``calibrate``'s minimum).

    Returns:
        (mode, one RatedSong per submitted song, in submission order).

    Raises:
        SubmissionError: with the HTTP status (400 or 422) and a message naming the song, dimension and sample.
    """
    data = parse_json(body)
    if not isinstance(data, dict):
        raise SubmissionError('the submission must be a JSON object {"mode": ..., "songs": [...]}')
    unknown = sorted(set(data) - {"mode", "songs"})
    if unknown:
        raise SubmissionError(f"unknown field(s) in the submission: {', '.join(map(str, unknown))[:200]}")
    mode = data.get("mode", "pad")
    if mode not in MODES:
        raise SubmissionError(f"mode {str(mode)[:40]!r} is not one of {', '.join(MODES)}")
    items = data.get("songs")
    if not isinstance(items, list) or not items:
        raise SubmissionError('the submission has no rated song ("songs" must be a non-empty list)')
    if len(items) > len(songs):
        raise SubmissionError(f"{len(items)} songs submitted, but only {len(songs)} can be rated")
    out: list[RatedSong] = []
    seen: set[int] = set()
    for j, item in enumerate(items):
        if not isinstance(item, dict):
            raise SubmissionError(
                f'songs[{j}]: expected an object {{"song": index, "valence": [...], "arousal": [...]}}'
            )
        extra = sorted(set(item) - {"song", *DIMENSIONS})
        if extra:
            raise SubmissionError(f"songs[{j}]: unknown field(s) {', '.join(map(str, extra))[:200]}")
        idx = item.get("song")
        if not (isinstance(idx, int) and not isinstance(idx, bool) and 0 <= idx < len(songs)):
            raise SubmissionError(
                f'songs[{j}]: "song" must be the index of a song on the page (0 to {len(songs) - 1}), got {str(idx)[:40]}'
            )
        if idx in seen:
            raise SubmissionError(f"songs[{j}]: song {idx} is submitted twice")
        seen.add(idx)
        sid, duration = songs[idx]
        series = {}
        for dim in DIMENSIONS:
            if dim not in item:
                raise SubmissionError(f"song {sid!r}: no {dim} samples")
            series[dim] = _series(item[dim], f"song {sid!r}, {dim}", duration)
        n_steps = int(math.floor(duration / STEP_S + 1e-9))
        binned = {dim: bin_to_grid(series[dim], n_steps) for dim in DIMENSIONS}
        steps = np.intersect1d(binned["valence"][0], binned["arousal"][0])  # (K,) steps both dimensions reach
        vals = {dim: binned[dim][1][np.searchsorted(binned[dim][0], steps)] for dim in DIMENSIONS}
        rated = RatedSong(idx, sid, steps, vals["valence"], vals["arousal"], series)
        if rated.rated_s < min_rated_s:
            raise SubmissionError(
                f"song {sid!r}: {rated.rated_s:.1f} s rated; at least {min_rated_s:g} s are needed "
                "(rate it again, further into the song)",
                422,
            )
        gaps = np.diff(steps) - 1  # (K-1,) missing steps between rated ones
        if len(gaps) and gaps.max() * STEP_S > MAX_GAP_S:
            i = int(np.argmax(gaps))
            raise SubmissionError(
                f"song {sid!r}: nothing rated from {(steps[i] + 1) * STEP_S:.1f} s to {steps[i + 1] * STEP_S:.1f} s "
                f"(holes up to {MAX_GAP_S:g} s are bridged); rate it again",
                422,
            )
        mad = {dim: float(np.mean(np.abs(vals[dim] - vals[dim].mean()))) for dim in DIMENSIONS}
        if all(m < FLAT_MAD for m in mad.values()):
            raise SubmissionError(
                f"song {sid!r}: the rating never moved (mean absolute deviation {mad['valence']:.4f} valence, "
                f"{mad['arousal']:.4f} arousal): it tells the model nothing about you; follow the music "
                "and rate it again",
                422,
            )
        out.append(rated)
    return mode, out


def ratings_csv(rated: list[RatedSong], annotator: str) -> str:
    """The ratings in the generic layout: ``song_id,annotator_id,time_s,valence,arousal``, one row per step."""
    lines = ["song_id,annotator_id,time_s,valence,arousal"]
    for r in rated:
        for k, v, a in zip(r.steps, r.valence, r.arousal):
            lines.append(f"{r.song_id},{annotator},{k * STEP_S:.1f},{v:.4f},{a:.4f}")
    return "\n".join(lines) + "\n"
