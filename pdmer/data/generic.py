"""The generic on-disk layout, for user data and the synthetic benchmark alike.

::

    <root>/audio/<song_id>.<wav|flac|mp3|ogg>
    <root>/ratings.csv      song_id,annotator_id,time_s,valence,arousal   (required)
    <root>/oracle.csv       same columns: noise-free personal curves       (optional)
    <root>/consensus.csv    same columns, one annotator per song           (optional)

Column order in the CSV files is free (extra columns are ignored); note that the internal
arrays are ``(arousal, valence)`` = ``LABELS`` whatever the CSV order.

Ratings may come at any rate: each (song, annotator) is resampled by linear interpolation onto
the 2 Hz step grid, at the steps ``k`` whose time ``k * STEP_S`` lies inside the rated time span
(a tolerance of 1e-6 s absorbs float noise). Ratings already on the grid pass through exactly.

Validation collects every problem and raises one ``DataError`` listing them, each naming the
file, line and song / annotator: missing file or column, non-numeric value, NaN or inf, value
out of range, duplicate or non-increasing times within one (song, annotator), fewer than 2
ratings, a rated song without an audio file. Values on the DEAM scale must satisfy
``|v| <= DEAM_RANGE`` (1.05: 5 % tolerance over the nominal [-1, 1]); on the unit scale
``-0.05 <= v <= 1.05``.

Audio is not decoded here: ``Song.duration_s`` stays None.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from pdmer.data import common
from pdmer.data.types import LABELS, STEP_S, Curve, DataError, Dataset, Song

log = logging.getLogger(__name__)

AUDIO_EXTS = (".wav", ".flac", ".mp3", ".ogg")
COLUMNS = ("song_id", "annotator_id", "time_s", "valence", "arousal")
DEAM_RANGE = 1.05  # |v| allowed on the DEAM scale (nominal [-1, 1], 5 % tolerance)
UNIT_RANGE = (-0.05, 1.05)  # allowed on the unit scale (nominal [0, 1])
TIME_TOL = 1e-6  # seconds: grid times this close outside the rated span still count as inside
_EXTS = "|".join(e[1:] for e in AUDIO_EXTS)  # "wav|flac|mp3|ogg", as messages name them
MAX_LISTED = 200  # problems spelled out in one DataError; the rest are counted


class Problems(common.Problems):
    """The generic layout's :class:`pdmer.data.common.Problems`: each message names its file, line and
    song / annotator itself; listed as "- " items (up to ``MAX_LISTED``) under "N problem(s) in dataset ROOT"."""

    def __init__(self) -> None:
        super().__init__(limit=MAX_LISTED, bullet="- ")

    def raise_if_any(self, root: Path) -> None:
        super().raise_if_any(f"dataset {root}")

    # the messages as text: pdmer.personal.ratings rewrites them to name the user's file, not its temporary copy
    @property
    def items(self) -> list[str]:
        return self.messages()

    @items.setter
    def items(self, messages: list[str]) -> None:
        self[:] = [common.Problem(None, None, m) for m in messages]


def resample_to_grid(times: np.ndarray, values: np.ndarray) -> tuple[int, np.ndarray]:
    """Linear interpolation of ratings onto the 2 Hz step grid.

    Args:
        times: (N,) strictly increasing seconds, N >= 2.
        values: (N, 2) ratings at those times.

    Returns:
        (start_step, (T, 2) float64) for the steps ``k`` with ``k * STEP_S`` inside
        ``[times[0], times[-1]]`` (T may be 0 when the span holds no grid time).
    """
    k0 = math.ceil(times[0] / STEP_S - TIME_TOL / STEP_S)
    k1 = math.floor(times[-1] / STEP_S + TIME_TOL / STEP_S)
    if k1 < k0:
        return k0, np.zeros((0, 2))
    grid = np.arange(k0, k1 + 1) * STEP_S  # (T,)
    out = np.stack([np.interp(grid, times, values[:, d]) for d in range(values.shape[1])], axis=1)  # (T, 2)
    return k0, out


Row = tuple[int, float, float, float]  # (line, time_s, arousal, valence) of one valid CSV row


def read_curves(
    path: Path, problems: Problems, scale: str, required: bool, seen: set[str]
) -> dict[tuple[str, str], Curve] | None:
    """Read one ratings-like CSV into (song_id, annotator_id) -> Curve, adding problems.

    Every song id met on a row (valid or not) is added to ``seen``.
    """
    if not path.is_file():
        if required:
            problems.add(f"{path}: file not found (expected columns {','.join(COLUMNS)})")
        return None
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = _header(path, reader, problems)
        if header is None:
            return None
        groups, tainted, n_rows = _read_rows(path.name, reader, header, problems, scale, seen)
    if n_rows == 0:
        problems.add(f"{path}: no data rows")
    curves: dict[tuple[str, str], Curve] = {}
    for key, rows in groups.items():
        if key in tainted:
            continue  # its bad rows are reported; no follow-up problems from the rows left out
        curve = _curve(path.name, key, rows, problems)
        if curve is not None:
            curves[key] = curve
    return curves


def _header(path: Path, reader, problems: Problems) -> list[str] | None:
    """The header row, stripped; None (and a problem) when it is absent or lacks a column."""
    try:
        header = next(reader)
    except StopIteration:
        problems.add(f"{path}: empty file (expected header {','.join(COLUMNS)})")
        return None
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        problems.add(
            f"{path} line 1: missing column(s) {', '.join(missing)} (header is {','.join(header)!r}; "
            f"expected {','.join(COLUMNS)})"
        )
        return None
    return header


def _read_rows(
    name: str, reader, header: list[str], problems: Problems, scale: str, seen: set[str]
) -> tuple[dict[tuple[str, str], list[Row]], set[tuple[str, str]], int]:
    """The data rows, checked one by one: (valid rows per (song, annotator), the keys with a bad row, rows read)."""
    lo, hi = (-DEAM_RANGE, DEAM_RANGE) if scale == "deam" else UNIT_RANGE
    col = {c: header.index(c) for c in COLUMNS}
    ct, ca, cv = col["time_s"], col["arousal"], col["valence"]
    width = len(header)
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    tainted: set[tuple[str, str]] = set()  # (song, annotator) with a bad row: already reported
    n_rows = 0
    for row in reader:
        line = reader.line_num
        if not row or all(not x.strip() for x in row):
            continue
        n_rows += 1
        if len(row) < width:
            problems.add(f"{name} line {line}: {len(row)} fields, header has {width}")
            continue
        sid, aid = row[col["song_id"]].strip(), row[col["annotator_id"]].strip()
        if not sid or not aid:
            problems.add(f"{name} line {line} (song {sid!r}, annotator {aid!r}): empty song_id or annotator_id")
            continue
        seen.add(sid)
        try:  # the common case first: three finite numbers in range (float() ignores surrounding whitespace)
            t, a, v = float(row[ct]), float(row[ca]), float(row[cv])
            if 0 <= t < math.inf and lo <= a <= hi and lo <= v <= hi:  # NaN fails every comparison
                groups[sid, aid].append((line, t, a, v))
                continue
        except ValueError:
            pass
        nums = _numbers(row, col, f"{name} line {line} (song {sid!r}, annotator {aid!r})", problems, lo, hi, scale)
        if nums is None:
            tainted.add((sid, aid))
        else:
            groups[sid, aid].append((line, nums["time_s"], nums["arousal"], nums["valence"]))
    return groups, tainted, n_rows


def _numbers(
    row: list[str], col: dict[str, int], where: str, problems: Problems, lo: float, hi: float, scale: str
) -> dict[str, float] | None:
    """time_s, valence and arousal of one row; None (and its problems) when one is not a finite number in range."""
    nums = {}
    for c in ("time_s", "valence", "arousal"):
        text = row[col[c]].strip()
        try:
            v = float(text)
        except ValueError:
            problems.add(f"{where}: {c}={text!r} is not a number")
            continue
        if not math.isfinite(v):
            problems.add(f"{where}: {c}={text!r} is not finite")
            continue
        nums[c] = v
    if len(nums) < 3:
        return None
    ok = True
    if nums["time_s"] < 0:
        problems.add(f"{where}: time_s={nums['time_s']} is negative")
        ok = False
    for c in ("valence", "arousal"):
        if not lo <= nums[c] <= hi:
            problems.add(f"{where}: {c}={nums[c]} is outside [{lo}, {hi}] ({scale} scale)")
            ok = False
    return nums if ok else None


def _curve(name: str, key: tuple[str, str], rows: list[Row], problems: Problems) -> Curve | None:
    """One (song, annotator)'s rows resampled onto the step grid; None (and a problem) when the times are bad."""
    sid, aid = key
    where = f"{name} (song {sid!r}, annotator {aid!r})"
    bad = False
    for (l0, t0, _, _), (l1, t1, _, _) in zip(rows, rows[1:], strict=False):
        if t1 == t0:
            problems.add(
                f"{name} line {l1} (song {sid!r}, annotator {aid!r}): duplicate time_s={t1} (also on line {l0})"
            )
            bad = True
        elif t1 < t0:
            problems.add(
                f"{name} line {l1} (song {sid!r}, annotator {aid!r}): time_s={t1} is not after "
                f"time_s={t0} on line {l0} (times must increase)"
            )
            bad = True
    if len(rows) < 2:
        problems.add(f"{where}, line {rows[0][0]}: only {len(rows)} rating(s); at least 2 are needed")
        bad = True
    if bad:
        return None
    arr = np.array([r[1:] for r in rows])  # (N, 3): time, arousal, valence
    start, vals = resample_to_grid(arr[:, 0], arr[:, 1:])
    if len(vals) == 0:
        problems.add(
            f"{where}, lines {rows[0][0]}-{rows[-1][0]}: rated span {arr[0, 0]}-{arr[-1, 0]} s "
            f"contains no {STEP_S} s grid time"
        )
        return None
    return Curve(sid, aid, start, vals)


def _find_audio(audio_dir: Path, problems: Problems) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if not audio_dir.is_dir():
        problems.add(f"{audio_dir}: audio folder not found (expected audio/<song_id>.<{_EXTS}>)")
        return found
    for p in sorted(audio_dir.iterdir()):
        if p.is_file() and p.suffix.lower() in AUDIO_EXTS:
            if p.stem in found:
                problems.add(f"{audio_dir}: song {p.stem!r} has two audio files ({found[p.stem].name}, {p.name})")
                continue
            found[p.stem] = p
    return found


def load_generic(root: Path, name: str | None = None, scale: str = "deam") -> Dataset:
    """Read a dataset in the generic layout (see the module docstring).

    Args:
        root: the dataset folder.
        name: Dataset.name (None = ``generic:<root>``).
        scale: "deam" (values about [-1, 1]) or "unit" ([0, 1]); sets the range check.

    Returns:
        Dataset: ``songs`` = every audio file (durations None), ``curves`` = ratings on the
        2 Hz grid, ``oracle`` / ``consensus`` when their files exist (else None).

    Raises:
        DataError: listing every problem found, each naming the file, line and song / annotator.
    """
    if scale not in ("deam", "unit"):
        raise ValueError(f"scale={scale!r} is not 'deam' or 'unit'")
    root = Path(root)
    problems = Problems()
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    audio = _find_audio(root / "audio", problems)
    seen: dict[str, set[str]] = {f: set() for f in ("ratings.csv", "oracle.csv", "consensus.csv")}
    ratings = read_curves(root / "ratings.csv", problems, scale, True, seen["ratings.csv"]) or {}
    oracle = read_curves(root / "oracle.csv", problems, scale, False, seen["oracle.csv"])
    consensus_curves = read_curves(root / "consensus.csv", problems, scale, False, seen["consensus.csv"])

    if (root / "audio").is_dir():
        for fname, sids in seen.items():
            for sid in sorted(sids):
                if sid not in audio:
                    problems.add(f"{fname}: song {sid!r} has no audio file {root / 'audio'}/{sid}.<{_EXTS}>")
    consensus = None
    if consensus_curves is not None:
        consensus = {}
        for (sid, aid), c in sorted(consensus_curves.items()):
            if sid in consensus:
                problems.add(
                    f"consensus.csv: song {sid!r} has more than one annotator "
                    f"({consensus[sid].annotator_id!r}, {aid!r}); one consensus curve per song"
                )
                continue
            consensus[sid] = c
    problems.raise_if_any(root)

    songs = {sid: Song(sid, p) for sid, p in audio.items()}
    unrated = sorted(set(audio) - {s for s, _ in ratings})
    if unrated:
        log.info("%s: %d song(s) with audio but no ratings (kept in Dataset.songs)", root, len(unrated))
    curves = [ratings[k] for k in sorted(ratings)]  # by song, then annotator
    return Dataset(
        name=name or f"generic:{root}",
        root=root,
        songs=songs,
        curves=curves,
        oracle={(aid, sid): c for (sid, aid), c in oracle.items()} if oracle is not None else None,
        consensus=consensus,
        scale=scale,
        info={"labels": LABELS, "unrated_songs": unrated},
    )
