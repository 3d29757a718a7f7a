"""DEAM label readers: the official folder layout -> ``Dataset`` (labels only, no audio decoding).

Layout read (as distributed by the DEAM authors)::

    <root>/MEMD_audio/<song_id>.mp3
    <root>/annotations/annotations averaged per song/dynamic (per second annotations)/{arousal,valence}.csv
        header ``song_id,sample_15000ms,sample_15500ms,...``; trailing cells may be empty
    <root>/annotations/annotations per each rater/dynamic (per second annotations)/{arousal,valence}/<song_id>.csv
        header ``WorkerId,sample_15000ms,...``; one row per worker

Time: column ``sample_<ms>ms`` is step ``ms / 500`` (``sample_15000ms`` -> step 30, audio
[15.0 s, 15.5 s)). Columns must lie on the 0.5 s grid and be consecutive.

Two kinds of findings are kept apart:

* **problems**: the files are wrong (NaN inside a curve, a value out of range, a non-numeric
  cell, a bad or missing column, a worker listed twice for one song). By default they are all
  collected and raised as one ``DataError`` that lists each with its file and line; with
  ``strict=False`` the bad rows/files are skipped and the problems are returned.
* **dropped**: the data is valid but something is left out on purpose (a file without a
  ``WorkerId`` column, a rater who gave only arousal or only valence, a flat curve, a listener
  with too few songs, ...). Each is a record in ``Dataset.info["dropped"]`` and each filter's
  counts and ids are in ``Dataset.info["filters"]``.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from pdmer.config import DeamConfig
from pdmer.data.common import (
    CONSENSUS,
    Problem,
    Problems,
    canonical_id,
    drop_record,
    parse_value,
    read_csv_rows,
    song_sort_key,
    summarize,
)
from pdmer.data.types import LABELS, STEP_S, Curve, DataError, Dataset, Song

log = logging.getLogger(__name__)

AUDIO_DIR = Path("MEMD_audio")
AVERAGED_DIR = Path("annotations", "annotations averaged per song", "dynamic (per second annotations)")
RATERS_DIR = Path("annotations", "annotations per each rater", "dynamic (per second annotations)")
_D = DeamConfig()  # the DEAM options' defaults, declared once: pdmer.config.DeamConfig (data.deam)
TEST_IDS = range(_D.test_first_id, _D.test_last_id + 1)  # the 58 full-length songs of DEAM 2015, the authors' test set

_SAMPLE_COLUMN = re.compile(r"^sample_(\d+(?:\.\d*)?)ms$")


# ---------------------------------------------------------------------------------------------
# CSV pieces


def _header(row: list[str]) -> list[str]:
    names = [h.strip() for h in row]
    while names and names[-1] == "":  # a trailing comma in the header
        names.pop()
    return names


def parse_sample_columns(names: list[str], path: Path, problems: Problems) -> int | None:
    """``["sample_15000ms", "sample_15500ms", ...]`` -> the step of the first column (30).

    Every column must be ``sample_<ms>ms`` on the 0.5 s grid, one step after the previous one.
    Returns None (with a problem naming the file and column) otherwise.
    """
    if not names:
        problems.append(Problem(path, 1, "no sample_<ms>ms columns"))
        return None
    steps: list[int] = []
    for j, name in enumerate(names):
        m = _SAMPLE_COLUMN.match(name)
        if m is None:
            problems.append(Problem(path, 1, f"column {name!r} is not a sample_<ms>ms column"))
            return None
        k = float(m.group(1)) / (STEP_S * 1000)
        if abs(k - round(k)) > 1e-6:
            problems.append(
                Problem(path, 1, f"column {name!r}: {float(m.group(1)) / 1000:g} s is not on the {STEP_S:g} s grid")
            )
            return None
        k = int(round(k))
        if steps and k <= steps[-1]:
            problems.append(Problem(path, 1, f"column {name!r} does not increase after {names[j - 1]!r}"))
            return None
        if steps and k != steps[-1] + 1:
            missing = ", ".join(
                f"sample_{int(s * STEP_S * 1000)}ms" for s in range(steps[-1] + 1, min(k, steps[-1] + 4))
            )
            problems.append(
                Problem(
                    path,
                    1,
                    f"missing column(s) between {names[j - 1]!r} and {name!r} "
                    f"(expected {missing}{', ...' if k - steps[-1] > 4 else ''})",
                )
            )
            return None
        steps.append(k)
    return steps[0]


def _parse_curve_cells(
    cells: list[str], columns: list[str], path: Path, line: int, problems: Problems, lo: float, hi: float
) -> tuple[int, np.ndarray] | None:
    """The sample cells of one row -> (offset of the first value, values (T,)).

    Empty or NaN cells before the first and after the last value are allowed (trailing cells
    are empty in DEAM); one between two values is a problem. Returns None on any problem,
    ``(0, empty)`` for a row without values.
    """
    n_before = len(problems)
    extra = [c for c in cells[len(columns) :] if c.strip()]
    if extra:
        problems.append(
            Problem(
                path,
                line,
                f"row has {len(columns) + len(extra)}+ value cells, header has {len(columns)} sample columns",
            )
        )
    cells = cells[: len(columns)]
    values = np.full(len(cells), np.nan)
    missing = np.zeros(len(cells), dtype=bool)  # empty or NaN cell (bad cells are problems instead)
    for j, cell in enumerate(cells):
        x = parse_value(cell)
        if x is None:
            problems.append(Problem(path, line, f"column {columns[j]}: non-numeric value {cell.strip()!r}"))
        elif math.isnan(x):
            missing[j] = True
        elif math.isinf(x) or not lo <= x <= hi:
            problems.append(Problem(path, line, f"column {columns[j]}: value {x:g} out of range [{lo:g}, {hi:g}]"))
        else:
            values[j] = x
    present = np.flatnonzero(~missing)
    if present.size:
        first, last = int(present[0]), int(present[-1])
        holes = [columns[j] for j in range(first, last + 1) if missing[j]]
        if holes:
            problems.append(
                Problem(
                    path,
                    line,
                    f"missing value (empty or NaN) inside the curve at column(s) "
                    f"{', '.join(holes[:5])}{' ...' if len(holes) > 5 else ''}",
                )
            )
    if len(problems) > n_before:
        return None
    if not present.size:
        return 0, values[:0]
    return first, values[first : last + 1]


def _join(
    song_id: str,
    annotator_id: str,
    a: tuple[int, np.ndarray],
    v: tuple[int, np.ndarray],
    files: tuple[Path, Path],
    dropped: list[dict],
) -> Curve | None:
    """Arousal and valence of one (song, annotator), each (start_step, values), -> one Curve."""
    (sa, va), (sv, vv) = a, v
    where = {"song_id": song_id, "annotator_id": annotator_id}
    if len(va) == 0 or len(vv) == 0:
        empty = "arousal" if len(va) == 0 else "valence"
        dropped.append(drop_record("read", "dropped", f"no {empty} values", file=files[LABELS.index(empty)], **where))
        return None
    start, end = max(sa, sv), min(sa + len(va), sv + len(vv))
    if end <= start:
        dropped.append(
            drop_record(
                "read",
                "dropped",
                "arousal and valence do not overlap in time",
                file=files[0],
                arousal_steps=[sa, sa + len(va)],
                valence_steps=[sv, sv + len(vv)],
                **where,
            )
        )
        return None
    if (sa, len(va)) != (sv, len(vv)):
        dropped.append(
            drop_record(
                "read",
                "trimmed",
                "arousal and valence cover different steps; kept the common ones",
                file=files[0],
                arousal_steps=[sa, sa + len(va)],
                valence_steps=[sv, sv + len(vv)],
                kept_steps=[start, end],
                **where,
            )
        )
    values = np.stack([va[start - sa : end - sa], vv[start - sv : end - sv]], axis=1)  # (T, 2) arousal, valence
    return Curve(song_id, annotator_id, start, values)


# ---------------------------------------------------------------------------------------------
# Averaged labels


def _read_averaged_file(
    path: Path, problems: Problems, dropped: list[dict], lo: float, hi: float
) -> dict[str, tuple[int, np.ndarray]]:
    rows = read_csv_rows(path, problems)
    if rows is None:
        return {}
    names = _header(rows[0][1])
    if not names or names[0] != "song_id":
        problems.append(Problem(path, 1, f"missing column 'song_id' (first column is {names[0] if names else ''!r})"))
        return {}
    start = parse_sample_columns(names[1:], path, problems)
    if start is None:
        return {}
    out: dict[str, tuple[int, np.ndarray]] = {}
    seen: dict[str, int] = {}
    for line, row in rows[1:]:
        if not any(c.strip() for c in row):
            continue
        sid = canonical_id(row[0])
        if sid is None:
            problems.append(Problem(path, line, f"song_id {row[0].strip()!r} is not an integer"))
            continue
        if sid in seen:
            problems.append(Problem(path, line, f"song {sid} listed twice (also line {seen[sid]})"))
            continue
        seen[sid] = line
        parsed = _parse_curve_cells(row[1:], names[1:], path, line, problems, lo, hi)
        if parsed is None:
            continue
        if parsed[1].size == 0:
            dropped.append(drop_record("read", "dropped", "row has no values", song_id=sid, file=path, line=line))
            continue
        out[sid] = (start + parsed[0], parsed[1])
    return out


def _read_averaged(root: Path, problems: Problems, dropped: list[dict], range_tol: float) -> dict[str, Curve]:
    folder = Path(root) / AVERAGED_DIR
    files = tuple(folder / f"{name}.csv" for name in LABELS)
    channels = []
    for path in files:
        if not path.is_file():
            problems.append(Problem(path, None, "file not found"))
            channels.append({})
        else:
            channels.append(_read_averaged_file(path, problems, dropped, -1 - range_tol, 1 + range_tol))
    a, v = channels
    out: dict[str, Curve] = {}
    for sid in sorted(set(a) | set(v), key=song_sort_key):
        if sid not in a or sid not in v:
            missing = "arousal" if sid not in a else "valence"
            dropped.append(
                drop_record(
                    "read",
                    "dropped",
                    f"song has no {missing} row in the averaged labels",
                    song_id=sid,
                    annotator_id=CONSENSUS,
                    file=files[LABELS.index(missing)],
                )
            )
            continue
        curve = _join(sid, CONSENSUS, a[sid], v[sid], files, dropped)
        if curve is not None:
            out[sid] = curve
    return out


def read_deam_averaged(
    root: str | Path,
    *,
    range_tol: float = _D.range_tol,
    strict: bool = True,
    problems: list[Problem] | None = None,
    dropped: list[dict] | None = None,
) -> dict[str, Curve]:
    """The averaged ("consensus") dynamic labels of every song.

    Args:
        root: the DEAM folder (holding ``annotations/``).
        range_tol: values must lie in [-1 - range_tol, 1 + range_tol].
        strict: raise one ``DataError`` listing every problem; with False, skip bad rows.
        problems: if given, problems are appended to it.
        dropped: if given, records of what was left out or trimmed are appended to it (a song in
            only one of the two files; arousal and valence of different lengths: 7 of the full
            songs in the official files differ by one step, the common steps are kept).

    Returns:
        song_id -> Curve with annotator_id "consensus", values (T, 2) = (arousal, valence).
    """
    found = Problems()
    out = _read_averaged(Path(root), found, dropped if dropped is not None else [], range_tol)
    if problems is not None:
        problems.extend(found)
    if strict:
        found.raise_if_any(f"DEAM averaged labels under {Path(root) / AVERAGED_DIR}")
    return out


# ---------------------------------------------------------------------------------------------
# Per-rater labels


def _read_rater_file(
    path: Path, song_id: str, problems: Problems, dropped: list[dict], lo: float, hi: float
) -> dict[str, tuple[int, np.ndarray] | None] | None:
    """One per-rater file -> worker -> (start_step, values), or None for a rejected row (a problem).

    Returns None when the whole file is skipped.
    """
    rows = read_csv_rows(path, problems)
    if rows is None:
        return None
    names = _header(rows[0][1])
    if not names or names[0] != "WorkerId":
        dropped.append(
            drop_record(
                "read",
                "skipped",
                "file has no WorkerId column (skipped, as the authors did)",
                song_id=song_id,
                file=path,
            )
        )
        return None
    start = parse_sample_columns(names[1:], path, problems)
    if start is None:
        return None
    out: dict[str, tuple[int, np.ndarray] | None] = {}
    seen: dict[str, int] = {}
    for line, row in rows[1:]:
        if not any(c.strip() for c in row):
            continue
        worker = row[0].strip()
        if not worker:
            problems.append(Problem(path, line, "empty WorkerId"))
            continue
        if worker in seen:
            problems.append(
                Problem(path, line, f"worker {worker!r} listed twice for song {song_id} (also line {seen[worker]})")
            )
            out[worker] = None
            continue
        seen[worker] = line
        parsed = _parse_curve_cells(row[1:], names[1:], path, line, problems, lo, hi)
        out[worker] = None if parsed is None else (start + parsed[0], parsed[1])
    return out


def _read_raters(root: Path, problems: Problems, dropped: list[dict], range_tol: float) -> list[Curve]:
    folder = Path(root) / RATERS_DIR
    files: dict[str, dict[str, Path]] = defaultdict(dict)  # song_id -> channel -> file
    for name in LABELS:
        sub = folder / name
        if not sub.is_dir():
            problems.append(Problem(sub, None, "folder not found"))
            continue
        for path in sorted(sub.glob("*.csv")):
            sid = canonical_id(path.stem)
            if sid is None:
                problems.append(Problem(path, None, f"file name {path.stem!r} is not a song id"))
                continue
            if sid in files and name in files[sid]:
                problems.append(Problem(path, None, f"song {sid} has two {name} files (also {files[sid][name]})"))
                continue
            files[sid][name] = path
    curves: list[Curve] = []
    for sid in sorted(files, key=song_sort_key):
        per_channel = []
        for name in LABELS:
            path = files[sid].get(name)
            if path is None:
                per_channel.append({})
                continue
            got = _read_rater_file(path, sid, problems, dropped, -1 - range_tol, 1 + range_tol)
            per_channel.append(got or {})
        a, v = per_channel
        paths = tuple(files[sid].get(name, folder / name / f"{sid}.csv") for name in LABELS)
        for worker in sorted(set(a) | set(v)):
            rejected = [name for name, ch in zip(LABELS, (a, v), strict=True) if worker in ch and ch[worker] is None]
            if rejected:
                dropped.append(
                    drop_record(
                        "read",
                        "dropped",
                        f"{' and '.join(rejected)} rejected (see problems); the rating is left out",
                        song_id=sid,
                        annotator_id=worker,
                        file=paths[LABELS.index(rejected[0])],
                    )
                )
                continue
            if worker not in a or worker not in v:
                given, missing = ("arousal", "valence") if worker in a else ("valence", "arousal")
                dropped.append(
                    drop_record(
                        "read",
                        "dropped",
                        f"rater gave {given} but no {missing}",
                        song_id=sid,
                        annotator_id=worker,
                        file=paths[LABELS.index(given)],
                    )
                )
                continue
            curve = _join(sid, worker, a[worker], v[worker], paths, dropped)
            if curve is not None:
                curves.append(curve)
    return curves


def read_deam_raters(
    root: str | Path,
    *,
    range_tol: float = _D.range_tol,
    strict: bool = True,
    problems: list[Problem] | None = None,
    dropped: list[dict] | None = None,
) -> list[Curve]:
    """Every listener's dynamic labels, arousal and valence joined by (song, WorkerId); no filters.

    Files without a ``WorkerId`` column are skipped, and a rater who gave only arousal or only
    valence is left out; both are recorded in ``dropped``. Arguments as ``read_deam_averaged``.

    Returns:
        Curves sorted by song then worker, values (T, 2) = (arousal, valence).
    """
    found = Problems()
    out = _read_raters(Path(root), found, dropped if dropped is not None else [], range_tol)
    if problems is not None:
        problems.extend(found)
    if strict:
        found.raise_if_any(f"DEAM per-rater labels under {Path(root) / RATERS_DIR}")
    return out


# ---------------------------------------------------------------------------------------------
# Dataset


def _crop(curve: Curve, lo: int, hi: int) -> Curve | None:
    start, end = max(curve.start_step, lo), min(curve.end_step, hi)
    if end <= start:
        return None
    if (start, end) == (curve.start_step, curve.end_step):
        return curve
    return Curve(
        curve.song_id, curve.annotator_id, start, curve.values[start - curve.start_step : end - curve.start_step]
    )


def _flat_channels(curve: Curve, window: int, threshold: float) -> tuple[list[str], list[float]]:
    w = curve.values[:window].astype(np.float64)  # (<=window, 2)
    mad = np.abs(w - w.mean(axis=0)).mean(axis=0)  # (2,) mean absolute deviation per label
    return [LABELS[i] for i in range(2) if mad[i] < threshold], [float(m) for m in mad]


def _read_labels(
    root: Path, problems: Problems, dropped: list[dict], range_tol: float
) -> tuple[dict[str, Curve] | None, list[Curve]]:
    """(consensus, per-rater curves) of both annotation folders; a missing one is recorded in ``dropped``."""
    have_avg, have_raters = (root / AVERAGED_DIR).is_dir(), (root / RATERS_DIR).is_dir()
    if not have_avg and not have_raters:
        raise DataError(f"no DEAM annotations under {root}: expected {root / AVERAGED_DIR} and/or {root / RATERS_DIR}")
    consensus: dict[str, Curve] | None = None
    if have_avg:
        consensus = _read_averaged(root, problems, dropped, range_tol)
    else:
        dropped.append(drop_record("read", "skipped", "no averaged-label folder", file=root / AVERAGED_DIR))
    curves: list[Curve] = []
    if have_raters:
        curves = _read_raters(root, problems, dropped, range_tol)
    else:
        dropped.append(drop_record("read", "skipped", "no per-rater folder", file=root / RATERS_DIR))
    return consensus, curves


def _songs(
    root: Path, song_ids: list[str], problems: Problems, require_audio: bool
) -> tuple[dict[str, Song], list[str]]:
    """The songs (``MEMD_audio/<id>.mp3``) and those whose audio is missing (a problem each if ``require_audio``)."""
    songs = {s: Song(s, root / AUDIO_DIR / f"{s}.mp3") for s in song_ids}
    missing_audio = [s for s, song in songs.items() if not song.path.is_file()]
    if require_audio:
        problems.extend(Problem(songs[s].path, None, f"audio of song {s} not found") for s in missing_audio)
    return songs, missing_audio


def _read_counts(dropped: list[dict]) -> dict[str, int]:
    """What reading left out: files skipped, raters with one label only, curves trimmed to common steps."""
    return {
        "n_files_skipped": sum(r["action"] == "skipped" and r["song_id"] is not None for r in dropped),
        "n_one_label_raters": sum("rater gave" in r["reason"] for r in dropped),
        "n_trimmed": sum(r["action"] == "trimmed" for r in dropped),
    }


def _split_rule(train_max_id: int, test_ids: list[int]) -> Callable[[str], str | None]:
    """song id -> "train" (id <= ``train_max_id``), "test" (in ``test_ids``) or None (neither)."""
    test_set = set(test_ids)

    def split_of(sid: str) -> str | None:
        i = int(sid)
        return "test" if i in test_set else "train" if i <= train_max_id else None

    return split_of


def _split(
    curves: list[Curve], consensus: dict[str, Curve] | None, split_of, train_max_id: int, dropped: list[dict]
) -> tuple[list[Curve], dict[str, Curve] | None, dict]:
    """Filter 1 (split): the songs outside the train and test ids dropped."""
    all_ids = {c.song_id for c in curves} | set(consensus or {})
    outside = sorted((s for s in all_ids if split_of(s) is None), key=song_sort_key)
    for sid in outside:
        dropped.append(
            drop_record("split", "dropped", f"song id is neither <= {train_max_id} (train) nor a test id", song_id=sid)
        )
    n_before = len(curves)
    curves = [c for c in curves if split_of(c.song_id) is not None]
    if consensus is not None:
        consensus = {s: c for s, c in consensus.items() if split_of(s) is not None}
    return curves, consensus, {"songs_dropped": outside, "n_curves_dropped": n_before - len(curves)}


def _crop_clips(
    curves: list[Curve],
    consensus: dict[str, Curve] | None,
    split_of,
    clip_start_s: float,
    clip_steps: int,
    dropped: list[dict],
) -> tuple[list[Curve], dict[str, Curve] | None, dict]:
    """Filter 2 (crop): train-song curves and their consensus cut to ``clip_steps`` steps from ``clip_start_s``."""
    n_cropped, n_short = 0, 0
    lo = int(round(clip_start_s / STEP_S))
    hi = lo + int(clip_steps)

    def crop(c: Curve) -> Curve | None:
        nonlocal n_cropped, n_short
        if split_of(c.song_id) != "train":
            return c
        out = _crop(c, lo, hi)
        if out is None:
            dropped.append(
                drop_record(
                    "crop",
                    "dropped",
                    f"no values in steps [{lo}, {hi})",
                    song_id=c.song_id,
                    annotator_id=c.annotator_id,
                )
            )
            return None
        n_cropped += out is not c
        n_short += out.n_steps < clip_steps
        return out

    curves = [c for c in map(crop, curves) if c is not None]
    if consensus is not None:
        consensus = {s: c for s, c in ((s, crop(c)) for s, c in consensus.items()) if c is not None}
    return curves, consensus, {"steps": [lo, hi], "n_cropped": n_cropped, "n_shorter_than_clip": n_short}


def _drop_flat(curves: list[Curve], flat_window: int, flat_mad: float, dropped: list[dict]) -> tuple[list[Curve], dict]:
    """Filter 3 (flat): listener curves whose slider was not moved dropped."""
    kept, flat_ids = [], []
    for c in curves:
        flat, mad = _flat_channels(c, flat_window, flat_mad)
        if flat:
            flat_ids.append([c.song_id, c.annotator_id])
            dropped.append(
                drop_record(
                    "flat",
                    "dropped",
                    f"flat curve ({', '.join(flat)}: mean absolute deviation "
                    f"over the first {flat_window} values < {flat_mad:g})",
                    song_id=c.song_id,
                    annotator_id=c.annotator_id,
                    mad=mad,
                )
            )
        else:
            kept.append(c)
    return kept, {"threshold": flat_mad, "window": flat_window, "n_dropped": len(flat_ids), "dropped": flat_ids}


def _drop_few_songs(
    curves: list[Curve], split_of, min_songs: int, scope: str, dropped: list[dict]
) -> tuple[list[Curve], dict]:
    """Filter 4 (min_songs): listeners with fewer than ``min_songs`` songs (counted in ``scope``) dropped."""
    counted = [c for c in curves if scope == "all" or split_of(c.song_id) == "train"]
    n_songs = Counter(c.annotator_id for c in counted)
    few = {a: n for a, n in sorted(n_songs.items()) if n < min_songs}
    for a, n in few.items():
        dropped.append(
            drop_record(
                "min_songs",
                "dropped",
                f"listener has {n} song(s), fewer than {min_songs}",
                annotator_id=a,
                n_songs=n,
            )
        )
    n_before = len(curves)
    curves = [c for c in curves if c.annotator_id not in few or (scope == "train" and split_of(c.song_id) != "train")]
    return curves, {
        "min_songs_per_listener": min_songs,
        "scope": scope,
        "n_listeners_dropped": len(few),
        "listeners_dropped": few,
        "n_curves_dropped": n_before - len(curves),
    }


def load_deam(
    root: str | Path,
    *,
    train_max_id: int = _D.train_max_id,
    test_ids: Iterable[int] = TEST_IDS,
    clip_steps: int | None = _D.clip_steps,
    clip_start_s: float = _D.clip_start_s,
    flat_mad: float | None = _D.flat_mad,
    flat_window: int = _D.flat_window,
    min_songs_per_listener: int = _D.min_songs_per_listener,
    min_songs_scope: str = _D.min_songs_scope,
    range_tol: float = _D.range_tol,
    require_audio: bool = False,
    strict: bool = True,
) -> Dataset:
    """DEAM as the DSAML authors used it: per-listener curves plus the averaged consensus.

    Filters run in this order, each recording what it removed in ``info["filters"][name]`` and
    one record per item in ``info["dropped"]``:

    1. split: songs with id <= ``train_max_id`` (45 s clips) are "train", ids in ``test_ids``
       (full songs 2001-2058) are "test" (``info["split"]``); any other song is dropped.
    2. crop: train-song curves (and their consensus) are cut to ``clip_steps`` steps from
       ``clip_start_s`` (60 steps = 15-44.5 s). ``clip_steps=None`` keeps them whole.
    3. flat: a listener curve whose mean absolute deviation over its first ``flat_window``
       values is below ``flat_mad`` for arousal or for valence (slider not moved) is dropped.
       ``flat_mad=None`` disables it.
    4. min_songs: listeners with fewer than ``min_songs_per_listener`` songs are dropped
       (authors: 15 songs or fewer -> 16). ``min_songs_scope="all"`` counts all their kept
       songs; ``"train"`` counts train songs and drops only their train curves.

    Args:
        root: the DEAM folder. Either annotation folder may be absent (recorded in
            ``info["dropped"]``), not both.
        range_tol: values must lie in [-1 - range_tol, 1 + range_tol].
        require_audio: a song without ``MEMD_audio/<id>.mp3`` is a problem (default: only counted
            in ``info["missing_audio"]``).
        strict: raise one ``DataError`` listing every problem (file and line); with False, bad
            rows/files are skipped and the problems listed in ``info["problems"]``.

    Returns:
        Dataset with ``curves`` = per-listener curves, ``consensus`` = averaged curves (None when
        the averaged files are absent), ``scale="deam"``; song paths ``MEMD_audio/<id>.mp3``.
    """
    root = Path(root)
    if min_songs_scope not in ("all", "train"):
        raise ValueError(f"min_songs_scope must be 'all' or 'train', got {min_songs_scope!r}")
    test_ids = sorted({int(i) for i in test_ids})
    options = {
        "train_max_id": train_max_id,
        "test_ids": test_ids,
        "clip_steps": clip_steps,
        "clip_start_s": clip_start_s,
        "flat_mad": flat_mad,
        "flat_window": flat_window,
        "min_songs_per_listener": min_songs_per_listener,
        "min_songs_scope": min_songs_scope,
        "range_tol": range_tol,
        "require_audio": require_audio,
    }
    problems = Problems()
    dropped: list[dict] = []
    consensus, curves = _read_labels(root, problems, dropped, range_tol)
    if strict:
        problems.raise_if_any(f"DEAM data under {root}")
    filters: dict[str, dict] = {
        "read": {
            "n_curves": len(curves),
            "n_consensus": len(consensus or {}),
            **_read_counts(dropped),
        }
    }
    split_of = _split_rule(train_max_id, test_ids)
    curves, consensus, filters["split"] = _split(curves, consensus, split_of, train_max_id, dropped)
    if clip_steps is not None:
        curves, consensus, filters["crop"] = _crop_clips(curves, consensus, split_of, clip_start_s, clip_steps, dropped)
    if flat_mad:
        curves, filters["flat"] = _drop_flat(curves, flat_window, flat_mad, dropped)
    curves, filters["min_songs"] = _drop_few_songs(curves, split_of, min_songs_per_listener, min_songs_scope, dropped)

    song_ids = sorted({c.song_id for c in curves} | set(consensus or {}), key=song_sort_key)
    songs, missing_audio = _songs(root, song_ids, problems, require_audio)
    if require_audio and strict:
        problems.raise_if_any(f"DEAM data under {root}")
    curves.sort(key=lambda c: (song_sort_key(c.song_id), c.annotator_id))
    info = {
        "source": "deam",
        "options": options,
        "split": {k: [s for s in song_ids if split_of(s) == k] for k in ("train", "test")},
        "filters": filters,
        "dropped": dropped,
        "missing_audio": missing_audio,
        "problems": problems.messages(),
    }
    log.info(
        "DEAM %s: %d songs, %d listener curves, %d listeners; %d dropped/trimmed, %d problem(s)",
        root,
        len(songs),
        len(curves),
        len({c.annotator_id for c in curves}),
        len(dropped),
        len(problems),
    )
    return Dataset(
        name=f"deam:{root}", root=root, songs=songs, curves=curves, consensus=consensus, scale="deam", info=info
    )


def check_deam(root: str | Path, **options) -> dict:
    """Validate a DEAM folder without raising: what ``load_deam`` would keep, drop and reject.

    Args:
        root: the DEAM folder.
        **options: as ``load_deam`` (``strict`` is forced to False).

    Returns:
        ``{"dataset", "root", "ok", "summary", "split", "filters", "dropped", "missing_audio",
        "problems"}``; ``summary`` as ``summarize`` (songs, listeners, songs per listener,
        labelled time, label ranges); ``split`` song counts; ``missing_audio`` a count;
        ``problems`` one line per problem, "file:line: message".
    """
    options["strict"] = False
    try:
        ds = load_deam(root, **options)
    except DataError as e:
        return {
            "dataset": "deam",
            "root": str(root),
            "ok": False,
            "summary": None,
            "split": None,
            "filters": None,
            "dropped": [],
            "missing_audio": 0,
            "problems": [str(e)],
        }
    return {
        "dataset": "deam",
        "root": str(root),
        "ok": not ds.info["problems"],
        "summary": summarize(ds),
        "split": {k: len(v) for k, v in ds.info["split"].items()},
        "filters": ds.info["filters"],
        "dropped": ds.info["dropped"],
        "missing_audio": len(ds.info["missing_audio"]),
        "problems": ds.info["problems"],
    }
