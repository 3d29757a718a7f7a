"""A listener's ratings file: read, validated like a dataset, and put on the 2 Hz grid."""

from __future__ import annotations

import csv
import io
import logging
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from pdmer.data.types import STEP_S, Curve, DataError

log = logging.getLogger(__name__)

MIN_RATED_S = 10.0  # a calibration song must have at least this much rated
MAX_RATINGS_BYTES = 8 * 2**20  # 10 minutes rated at 300 Hz; the model uses 2 Hz
DENSE_PER_STEP = 4  # ratings denser than this many per 0.5 s step are averaged over each step
KNOWN_SCALES = (
    (0.0, 1.0),
    (1.0, 5.0),
    (1.0, 7.0),
    (1.0, 9.0),
    (0.0, 10.0),
    (-10.0, 10.0),
    (0.0, 100.0),
    (-100.0, 100.0),
)


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
    raise DataError(
        f"ratings {path}: {out} of {len(every)} values lie outside {nominal} ({span}; first on line "
        f"{first[0]}: {first[1]}={first[2]:g}): ratings must be on the {nominal} scale{hint}"
    )


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
    path = Path(path)
    rows, header, add = _read_rows(path, songs, name)
    _scale_hint(path, rows, header, scale)
    curves = _checked_curves(path, rows, add, scale)
    by_song = _per_song(path, curves, songs)
    notes = _average_dense(path, rows, header, songs, by_song)
    return [by_song[s] for s in songs], notes


def _ratings_file_size(path: Path) -> int:
    """The size of a ratings file in bytes; a DataError when it is a folder or missing."""
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a ratings file")
    if not path.is_file():
        raise DataError(f"{path}: ratings file not found")
    return path.stat().st_size


def _read_rows(path: Path, songs: Sequence[str], name: str) -> tuple[list[list[str]], list[str], list[tuple[str, str]]]:
    """(CSV rows, header, the id columns to prepend: ``[(column, value)]``) of a ratings file of a sane size and header."""
    from pdmer.data.generic import COLUMNS

    path = Path(path)
    size = _ratings_file_size(path)
    if size > MAX_RATINGS_BYTES:
        raise DataError(
            f"{path}: {size / 2**20:.1f} MB of ratings, over the {MAX_RATINGS_BYTES / 2**20:g} MB a calibration "
            "reads; the model uses 2 Hz (one value per 0.5 s): average the ratings over 0.5 s (or 0.1 s) "
            "steps and calibrate with that file"
        )
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
    return rows, header, add


def _checked_curves(path: Path, rows: list[list[str]], add: list[tuple[str, str]], scale: str) -> dict:
    """``{(song_id, annotator_id): Curve}`` read and checked as a dataset is (:func:`pdmer.data.generic.read_curves`)."""
    from pdmer.data.generic import Problems, read_curves

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
    return curves


def _per_song(path: Path, curves: dict, songs: Sequence[str]) -> dict[str, Curve]:
    """``{song_id: Curve}``: one annotator, every given song rated (at least ``MIN_RATED_S``), no other song rated."""
    by_song: dict[str, Curve] = {}
    errors = []
    annotators = sorted({a for _, a in curves})
    if len(annotators) > 1:
        errors.append(
            f"{path}: ratings of {len(annotators)} annotators ({', '.join(annotators)}); calibration takes one listener's ratings"
        )
    for (sid, _), c in sorted(curves.items()):
        if sid not in songs:
            errors.append(f"{path}: song {sid!r} is rated but no audio was given for it (given: {', '.join(songs)})")
        else:
            by_song[sid] = c
    for sid in songs:
        c = by_song.get(sid)
        if c is None:
            errors.append(
                f"{path}: song {sid!r} (an audio file given) has no ratings; rated songs: {', '.join(sorted({s for s, _ in curves})) or 'none'}"
            )
        elif c is not None and c.n_steps * STEP_S < MIN_RATED_S:
            errors.append(
                f"{path}: song {sid!r} is rated over {c.n_steps * STEP_S:.1f} s only "
                f"({c.start_step * STEP_S:.1f}-{(c.end_step - 1) * STEP_S:.1f} s on the 2 Hz grid); at least {MIN_RATED_S:g} s are needed"
            )
    if errors:
        raise DataError(f"{len(errors)} problem(s) in ratings {path}:\n" + "\n".join(f"  - {e}" for e in errors))
    return by_song


def _average_dense(
    path: Path, rows: list[list[str]], header: list[str], songs: Sequence[str], by_song: dict[str, Curve]
) -> dict:
    """Average dense ratings over each step (``by_song`` updated); ``{song_id: {"rate_hz", "resampling"}}``."""
    # the rows are valid (read_curves checked them): their times and values, per song, in file order
    col = {c: header.index(c) for c in header}
    sid_of = (lambda row: row[col["song_id"]].strip()) if "song_id" in col else (lambda row: songs[0])
    raw_rows: dict[str, list[tuple[float, float, float]]] = {}
    for row in rows[1:]:
        if any(x.strip() for x in row):
            raw_rows.setdefault(sid_of(row), []).append(
                (float(row[col["time_s"]]), float(row[col["arousal"]]), float(row[col["valence"]]))
            )
    notes = {}
    for sid in songs:
        arr = np.asarray(raw_rows[sid], dtype=np.float64)  # (N, 3): time, arousal, valence
        dt = float(np.median(np.diff(arr[:, 0])))
        dense = dt * DENSE_PER_STEP < STEP_S
        if dense:
            by_song[sid] = _dense_average(by_song[sid], arr[:, 0], arr[:, 1:])
            log.info("%s: ratings of %s at %.3g Hz averaged over each 0.5 s step", path.name, sid, 1 / dt)
        notes[sid] = {"rate_hz": round(1 / dt, 3), "resampling": "averaged per step" if dense else "interpolated"}
    return notes


def _fit_to_audio(
    curves: list[Curve], feats: dict, audio: dict[str, Path], ratings: Path
) -> tuple[list[Curve], list[dict]]:
    """The datasets' rule (:func:`pdmer.data.check.fit_to_audio`): ratings must lie inside the audio.

    A last rating inside the audio's final, partial step costs that one step (recorded); ratings
    running further are an error naming the audio file and both lengths.
    """
    from pdmer.data.check import fit_to_audio
    from pdmer.data.types import Song

    fitted, trimmed, problems = fit_to_audio(
        curves, {s: f.n_steps for s, f in feats.items()}, {s: Song(s, p) for s, p in audio.items()}
    )
    if problems:
        raise DataError(f"ratings {ratings} go beyond the audio:\n" + "\n".join(f"  - {m}" for m in problems))
    short = [c for c in fitted if c.n_steps * STEP_S < MIN_RATED_S]
    if short:
        raise DataError(
            f"ratings {ratings}: song {short[0].song_id!r} has {short[0].n_steps * STEP_S:.1f} s rated inside its audio; "
            f"at least {MIN_RATED_S:g} s are needed"
        )
    for t in trimmed:
        log.info("%s: %s", t.get("song_id"), t.get("reason"))
    return fitted, trimmed
