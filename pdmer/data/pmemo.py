"""PMEmo2019 label readers: the official folder layout -> ``Dataset`` (labels only, no audio decoding).

Layout read (as distributed by the PMEmo authors)::

    <root>/chorus/<musicId>.mp3
    <root>/annotations/dynamic_annotations.csv   musicId,frameTime,Arousal(mean),Valence(mean)
    <root>/annotations/static_annotations.csv    musicId,Arousal(mean),Valence(mean)

Labels are on [0, 1], 2 Hz from 15.5 s (``frameTime`` 15.5 -> step 31, audio [15.5 s, 16.0 s)).

PMEmo's public release has only curves averaged over its listeners: there are no per-listener
curves. ``load_pmemo`` therefore returns the averaged curves twice: in ``consensus`` and in
``curves``, with annotator_id "consensus" (one pseudo-listener). Such a dataset serves plain
DMER training and evaluation; it cannot make personalized (per-listener) tasks.

Problems (frameTime off the 0.5 s grid, non-increasing or with gaps, NaN, values out of [0, 1],
non-numeric cells, missing columns, a musicId without its audio file) are collected and raised
as one ``DataError`` naming each file and line; ``strict=False`` skips the bad songs instead and
lists the problems in ``Dataset.info["problems"]``.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

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
from pdmer.data.types import STEP_S, Curve, DataError, Dataset, Song

log = logging.getLogger(__name__)

AUDIO_DIR = Path("chorus")
DYNAMIC_FILE = Path("annotations", "dynamic_annotations.csv")
STATIC_FILE = Path("annotations", "static_annotations.csv")
ID_COLUMN, TIME_COLUMN = "musicId", "frameTime"
LABEL_COLUMNS = ("Arousal(mean)", "Valence(mean)")  # in LABELS order
SCALES = {"native": "unit", "deam": "deam"}  # option -> Dataset.scale


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")


def _rescale(values: np.ndarray, scale: str) -> np.ndarray:
    """[0, 1] -> the requested scale ("deam": 2x - 1, onto [-1, 1])."""
    return values * 2.0 - 1.0 if scale == "deam" else values


def _columns(header: list[str], wanted: tuple[str, ...], path: Path, problems: Problems) -> list[int] | None:
    names = [h.strip() for h in header]
    missing = [w for w in wanted if w not in names]
    if missing:
        problems.append(Problem(path, 1, f"missing column(s) {', '.join(missing)} (header: {','.join(names)})"))
        return None
    return [names.index(w) for w in wanted]


def _labels(
    row: list[str], idx: list[int], path: Path, line: int, problems: Problems, lo: float, hi: float
) -> list[float] | None:
    """The arousal and valence cells of one row, checked; None on a problem."""
    out, ok = [], True
    for name, j in zip(LABEL_COLUMNS, idx, strict=True):
        x = parse_value(row[j]) if j < len(row) else math.nan
        if x is None:
            problems.append(Problem(path, line, f"column {name}: non-numeric value {row[j].strip()!r}"))
            ok = False
        elif math.isnan(x):
            problems.append(Problem(path, line, f"column {name}: missing value (empty or NaN)"))
            ok = False
        elif math.isinf(x) or not lo <= x <= hi:
            problems.append(Problem(path, line, f"column {name}: value {x:g} out of range [0, 1]"))
            ok = False
        out.append(x)
    return out if ok else None


def _read_dynamic(
    root: Path, scale: str, range_tol: float, problems: Problems
) -> tuple[dict[str, Curve], dict[str, int]]:
    """-> (musicId -> Curve, musicId -> line of its first row)."""
    path = root / DYNAMIC_FILE
    if not path.is_file():
        problems.append(Problem(path, None, "file not found"))
        return {}, {}
    rows = read_csv_rows(path, problems)
    if rows is None:
        return {}, {}
    idx = _columns(rows[0][1], (ID_COLUMN, TIME_COLUMN) + LABEL_COLUMNS, path, problems)
    if idx is None:
        return {}, {}
    frames: dict[str, list[tuple[int, int, list[float]]]] = defaultdict(list)  # id -> [(line, step, [a, v])]
    last: dict[str, tuple[int, int]] = {}  # id -> (line, step) of its previous row
    out_of_order: set[str] = set()  # songs whose order is already reported: not checked again
    first_line: dict[str, int] = {}
    bad: set[str] = set()
    lo, hi = -range_tol, 1 + range_tol
    for line, row in rows[1:]:
        if not any(c.strip() for c in row):
            continue
        cell = [row[j] if j < len(row) else "" for j in idx]  # musicId, frameTime, arousal, valence
        sid = canonical_id(cell[0])
        if sid is None:
            problems.append(Problem(path, line, f"musicId {cell[0].strip()!r} is not an integer"))
            continue
        first_line.setdefault(sid, line)
        t = parse_value(cell[1])
        step = None
        if t is None or not math.isfinite(t):
            problems.append(Problem(path, line, f"frameTime {cell[1].strip()!r} is not a number"))
        elif abs(t / STEP_S - round(t / STEP_S)) > 1e-6:
            problems.append(Problem(path, line, f"frameTime {t:g} s is not on the {STEP_S:g} s grid"))
        else:
            step = int(round(t / STEP_S))
        if step is None:
            out_of_order.add(sid)
        elif sid in last and sid not in out_of_order:
            prev_line, prev = last[sid]
            if step <= prev:
                problems.append(
                    Problem(
                        path,
                        line,
                        f"musicId {sid}: frameTime {t:g} does not increase "
                        f"(previous {prev * STEP_S:g} at line {prev_line})",
                    )
                )
                out_of_order.add(sid)
            elif step != prev + 1:
                problems.append(
                    Problem(
                        path,
                        line,
                        f"musicId {sid}: frameTime jumps from {prev * STEP_S:g} "
                        f"(line {prev_line}) to {t:g}: missing frames",
                    )
                )
                out_of_order.add(sid)
        if step is not None:
            last[sid] = (line, step)
        labels = _labels(cell, [2, 3], path, line, problems, lo, hi)
        if step is None or labels is None or sid in out_of_order:
            bad.add(sid)
            continue
        frames[sid].append((line, step, labels))
    curves = {}
    for sid in sorted(frames, key=song_sort_key):
        if sid in bad or not frames[sid]:
            continue
        values = np.array([f[2] for f in frames[sid]], dtype=np.float64)  # (T, 2) arousal, valence
        curves[sid] = Curve(sid, CONSENSUS, frames[sid][0][1], _rescale(values, scale))
    return curves, first_line


def _read_static(root: Path, scale: str, range_tol: float, problems: Problems) -> dict[str, np.ndarray]:
    path = root / STATIC_FILE
    rows = read_csv_rows(path, problems)
    if rows is None:
        return {}
    idx = _columns(rows[0][1], (ID_COLUMN,) + LABEL_COLUMNS, path, problems)
    if idx is None:
        return {}
    out: dict[str, np.ndarray] = {}
    seen: dict[str, int] = {}
    for line, row in rows[1:]:
        if not any(c.strip() for c in row):
            continue
        sid = canonical_id(row[idx[0]]) if idx[0] < len(row) else None
        if sid is None:
            problems.append(Problem(path, line, "musicId is not an integer"))
            continue
        if sid in seen:
            problems.append(Problem(path, line, f"musicId {sid} listed twice (also line {seen[sid]})"))
            continue
        seen[sid] = line
        labels = _labels(row, idx[1:], path, line, problems, -range_tol, 1 + range_tol)
        if labels is not None:
            out[sid] = _rescale(np.array(labels, dtype=np.float64), scale)  # (2,) arousal, valence
    return out


def read_pmemo_dynamic(
    root: str | Path,
    *,
    scale: str = "native",
    range_tol: float = 1e-6,
    strict: bool = True,
    problems: list[Problem] | None = None,
) -> dict[str, Curve]:
    """The averaged dynamic labels of every chorus.

    Args:
        root: the PMEmo2019 folder (holding ``annotations/``).
        scale: "native" ([0, 1], as in the files) or "deam" (2x - 1, onto [-1, 1]).
        range_tol: values must lie in [-range_tol, 1 + range_tol] (before rescaling).
        strict: raise one ``DataError`` listing every problem; with False, skip the bad songs.
        problems: if given, problems are appended to it.

    Returns:
        musicId -> Curve with annotator_id "consensus", values (T, 2) = (arousal, valence).
    """
    _check_scale(scale)
    found = Problems()
    curves, _ = _read_dynamic(Path(root), scale, range_tol, found)
    if problems is not None:
        problems.extend(found)
    if strict:
        found.raise_if_any(f"PMEmo dynamic labels {Path(root) / DYNAMIC_FILE}")
    return curves


def read_pmemo_static(
    root: str | Path,
    *,
    scale: str = "native",
    range_tol: float = 1e-6,
    strict: bool = True,
    problems: list[Problem] | None = None,
) -> dict[str, np.ndarray]:
    """The static (whole-chorus) labels: musicId -> (2,) array (arousal, valence). Arguments as above."""
    _check_scale(scale)
    found = Problems()
    out = _read_static(Path(root), scale, range_tol, found)
    if problems is not None:
        problems.extend(found)
    if strict:
        found.raise_if_any(f"PMEmo static labels {Path(root) / STATIC_FILE}")
    return out


def load_pmemo(
    root: str | Path, *, scale: str = "native", require_audio: bool = True, range_tol: float = 1e-6, strict: bool = True
) -> Dataset:
    """PMEmo2019 as a Dataset of averaged curves (its per-listener curves are not public).

    Args:
        root: the PMEmo2019 folder.
        scale: "native" keeps [0, 1] (``Dataset.scale == "unit"``); "deam" maps 2x - 1 onto
            [-1, 1] (``Dataset.scale == "deam"``), the scale of DEAM and of the DSAML model.
        require_audio: a musicId without ``chorus/<musicId>.mp3`` is a problem (named by the
            dynamic file and the line of its first row); False only lists them in
            ``info["missing_audio"]``.
        range_tol: labels must lie in [-range_tol, 1 + range_tol] before rescaling.
        strict: raise one ``DataError`` listing every problem; with False, bad songs are
            skipped and the problems listed in ``info["problems"]``.

    Returns:
        Dataset whose ``consensus`` holds the averaged curves and whose ``curves`` holds the same
        curves with annotator_id "consensus"; ``info["static"]`` = musicId -> [arousal, valence]
        of the static file (on the same scale), ``info["dropped"]`` what was left out and why.
    """
    _check_scale(scale)
    root = Path(root)
    if not (root / DYNAMIC_FILE).is_file():
        raise DataError(f"no PMEmo dynamic labels: {root / DYNAMIC_FILE} not found")
    problems = Problems()
    dropped: list[dict] = []
    consensus, first_line = _read_dynamic(root, scale, range_tol, problems)
    static: dict[str, np.ndarray] = {}
    if (root / STATIC_FILE).is_file():
        static = _read_static(root, scale, range_tol, problems)
    else:
        dropped.append(drop_record("read", "skipped", "no static label file", file=root / STATIC_FILE))
    for sid in sorted(set(first_line) - set(consensus), key=song_sort_key):
        dropped.append(
            drop_record(
                "read",
                "dropped",
                "song has problems in its dynamic labels",
                song_id=sid,
                annotator_id=CONSENSUS,
                file=root / DYNAMIC_FILE,
                line=first_line[sid],
            )
        )
    songs = {s: Song(s, root / AUDIO_DIR / f"{s}.mp3") for s in consensus}
    missing_audio = [s for s in sorted(first_line, key=song_sort_key) if not (root / AUDIO_DIR / f"{s}.mp3").is_file()]
    if require_audio:
        for s in missing_audio:
            problems.append(
                Problem(
                    root / DYNAMIC_FILE, first_line[s], f"musicId {s} has no audio file {root / AUDIO_DIR / f'{s}.mp3'}"
                )
            )
            if s in consensus:
                del consensus[s], songs[s]
    if strict:
        problems.raise_if_any(f"PMEmo data under {root}")
    no_dynamic = sorted(set(static) - set(consensus), key=song_sort_key)
    if no_dynamic:
        dropped.append(
            drop_record(
                "read",
                "dropped",
                "static labels without dynamic labels (not used as curves)",
                file=root / STATIC_FILE,
                song_ids=no_dynamic,
            )
        )
    info = {
        "source": "pmemo",
        "options": {"scale": scale, "require_audio": require_audio, "range_tol": range_tol},
        "per_listener": False,  # curves are the averaged ones, annotator_id "consensus"
        "static": {s: [float(x) for x in v] for s, v in static.items()},
        "no_static": [s for s in consensus if s not in static],
        "dropped": dropped,
        "missing_audio": missing_audio,
        "problems": problems.messages(),
    }
    log.info(
        "PMEmo %s: %d songs (averaged curves only), scale %s; %d dropped, %d problem(s)",
        root,
        len(songs),
        SCALES[scale],
        len(dropped),
        len(problems),
    )
    return Dataset(
        name=f"pmemo:{root}",
        root=root,
        songs=songs,
        curves=list(consensus.values()),
        consensus=consensus,
        scale=SCALES[scale],
        info=info,
    )


def check_pmemo(root: str | Path, **options) -> dict:
    """Validate a PMEmo2019 folder without raising (as ``check_deam``).

    Args:
        root: the PMEmo2019 folder.
        **options: as ``load_pmemo`` (``strict`` is forced to False).

    Returns:
        ``{"dataset", "root", "ok", "summary", "dropped", "missing_audio", "no_static", "problems"}``;
        ``summary`` as ``pdmer.data.deam.summarize``; ``problems`` one "file:line: message" each.
    """
    options["strict"] = False
    try:
        ds = load_pmemo(root, **options)
    except DataError as e:
        return {
            "dataset": "pmemo",
            "root": str(root),
            "ok": False,
            "summary": None,
            "dropped": [],
            "missing_audio": 0,
            "no_static": 0,
            "problems": [str(e)],
        }
    return {
        "dataset": "pmemo",
        "root": str(root),
        "ok": not ds.info["problems"],
        "summary": summarize(ds),
        "dropped": ds.info["dropped"],
        "missing_audio": len(ds.info["missing_audio"]),
        "no_static": len(ds.info["no_static"]),
        "problems": ds.info["problems"],
    }
