"""What every dataset reader shares: the problems idiom, dropped-item records, id and value parsing, summaries.

A reader collects what is wrong in its files in one :class:`Problems` (a list of :class:`Problem`:
file, line, message) and ends with :meth:`Problems.raise_if_any`, which raises them all as one
``DataError``; ``strict=False`` readers return them instead. What is left out on purpose is a
:func:`drop_record` in ``Dataset.info["dropped"]``.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pdmer.data.types import LABELS, STEP_S, Curve, DataError, Dataset

_MAX_LISTED = 50  # problems listed in one DataError message
CONSENSUS = "consensus"  # annotator_id of an averaged curve


@dataclass(frozen=True)
class Problem:
    """One thing wrong in an input file.

    ``file`` None: ``message`` names its place itself (the generic layout's "ratings.csv line 3 (song ...)").
    """

    file: Path | None
    line: int | None  # 1-based line of the file (1 = header); None for the whole file
    message: str

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        where = f"{self.file}:{self.line}" if self.line is not None else f"{self.file}"
        return f"{where}: {self.message}"


class Problems(list):
    """The problems found while reading a dataset, raised all at once as one ``DataError``.

    A list of :class:`Problem`: readers ``append(Problem(file, line, message))`` (or :meth:`add` a
    message that names its place) and end with :meth:`raise_if_any`.

    Args:
        items: problems to start with.
        limit: problems spelled out in the error; the rest are counted ("... and N more").
        bullet: what precedes each listed problem after the indent ("- " in the generic layout).
    """

    def __init__(self, items: Iterable[Problem] = (), *, limit: int = _MAX_LISTED, bullet: str = "") -> None:
        super().__init__(items)
        self.limit = limit
        self.bullet = bullet

    def add(self, message: str, file: Path | None = None, line: int | None = None) -> None:
        """Add one problem; without ``file`` the message names its place itself."""
        self.append(Problem(file, line, message))

    def messages(self) -> list[str]:
        """One line per problem ("file:line: message")."""
        return [str(p) for p in self]

    def raise_if_any(self, what: str) -> None:
        """Raise one ``DataError`` "N problem(s) in WHAT:" listing every problem, if there are any."""
        if not self:
            return
        lines = [f"  {self.bullet}{p}" for p in self[: self.limit]]
        if len(self) > self.limit:
            lines.append(f"  ... and {len(self) - self.limit} more")
        raise DataError(f"{len(self)} problem(s) in {what}:\n" + "\n".join(lines))


def drop_record(
    stage: str,
    action: str,
    reason: str,
    *,
    song_id: str | None = None,
    annotator_id: str | None = None,
    file: Path | None = None,
    **extra,
) -> dict:
    """One entry of ``Dataset.info["dropped"]`` (plain types, JSON-ready)."""
    rec = {
        "stage": stage,
        "action": action,
        "reason": reason,
        "song_id": song_id,
        "annotator_id": annotator_id,
        "file": None if file is None else str(file),
    }
    rec.update(extra)
    return rec


def canonical_id(raw: str) -> str | None:
    """``"2"``, ``" 2 "``, ``"2.0"`` -> ``"2"``; None when not a non-negative integer."""
    s = raw.strip()
    try:
        x = float(s)
    except ValueError:
        return None
    if not math.isfinite(x) or x < 0 or x != int(x):
        return None
    return str(int(x))


def parse_value(cell: str) -> float | None:
    """A numeric cell -> float (NaN for an empty or NaN cell); None when not a number."""
    s = cell.strip()
    if s == "" or s.lower() == "nan":
        return math.nan
    try:
        return float(s)
    except ValueError:
        return None


def summarize(dataset: Dataset) -> dict:
    """Counts and ranges of a dataset, for ``check_*`` reports (plain types, JSON-ready).

    Returns:
        songs, listeners (annotators other than "consensus"), curves, songs_per_listener
        (min / median / max), steps_per_curve (min / median / max), labelled time in seconds
        of the per-listener curves and of the consensus, and per-label [min, max] ranges.
    """

    def stats(xs: list[int]) -> dict:
        if not xs:
            return {"min": None, "median": None, "max": None}
        return {"min": int(min(xs)), "median": float(np.median(xs)), "max": int(max(xs))}

    def ranges(curves: list[Curve]) -> dict:
        if not curves:
            return {name: None for name in LABELS}
        v = np.concatenate([c.values for c in curves], axis=0)  # (sum T, 2)
        return {name: [float(v[:, i].min()), float(v[:, i].max())] for i, name in enumerate(LABELS)}

    listeners = [c for c in dataset.curves if c.annotator_id != CONSENSUS]
    songs_per = Counter(c.annotator_id for c in listeners)
    consensus = list((dataset.consensus or {}).values())
    return {
        "songs": len(dataset.songs),
        "listeners": len(songs_per),
        "curves": len(dataset.curves),
        "songs_per_listener": stats(list(songs_per.values())),
        "steps_per_curve": stats([c.n_steps for c in dataset.curves]),
        "labelled_time_s": {
            "curves": float(sum(c.n_steps for c in dataset.curves) * STEP_S),
            "consensus": float(sum(c.n_steps for c in consensus) * STEP_S),
        },
        "label_range": {"curves": ranges(dataset.curves), "consensus": ranges(consensus)},
        "scale": dataset.scale,
    }


def read_csv_rows(path: Path, problems: Problems) -> list[tuple[int, list[str]]] | None:
    """All rows of a CSV file with their 1-based line numbers; None (and a problem) if unreadable."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            rows = []
            for row in reader:
                rows.append((reader.line_num, row))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        problems.append(Problem(path, None, f"cannot read: {e}"))
        return None
    if not rows:
        problems.append(Problem(path, None, "empty file (no header)"))
        return None
    return rows


def song_sort_key(song_id: str) -> tuple[int, str]:
    """Integer ids in numeric order, any other id after them."""
    return (int(song_id), song_id) if song_id.isdigit() else (1 << 62, song_id)


__all__ = [
    "CONSENSUS",
    "Problem",
    "Problems",
    "canonical_id",
    "drop_record",
    "parse_value",
    "read_csv_rows",
    "song_sort_key",
    "summarize",
]
