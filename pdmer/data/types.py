"""The data model shared by every loader: songs, per-listener curves on the 2 Hz grid.

Time convention (one place, used everywhere): step ``k`` of a song covers the audio
``[k * STEP_S, (k + 1) * STEP_S)``; a rating at time ``t`` seconds belongs to step
``round(t / STEP_S)``. A DEAM label ``sample_15000ms`` is step 30, audio [15.0 s, 15.5 s).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STEP_S = 0.5
LABELS = ("arousal", "valence")  # channel order of every (T, 2) array, as in the authors' code


class DataError(ValueError):
    """Bad input data. The message names the file, line or song, and what is wrong."""


@dataclass(frozen=True)
class Song:
    song_id: str
    path: Path
    duration_s: float | None = None  # known after decoding; None until then


@dataclass
class Curve:
    """One listener's ratings of one song on the 2 Hz step grid.

    Attributes:
        song_id: the song.
        annotator_id: the listener ("consensus" for an averaged curve).
        start_step: index of the first rated step (``round(t0 / STEP_S)``).
        values: (T, 2) float32, columns ``LABELS`` = (arousal, valence).
    """

    song_id: str
    annotator_id: str
    start_step: int
    values: np.ndarray

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float32)
        if self.values.ndim != 2 or self.values.shape[1] != 2:
            raise DataError(
                f"song {self.song_id!r}, annotator {self.annotator_id!r}: "
                f"values must be (T, 2), got {self.values.shape}"
            )

    @property
    def n_steps(self) -> int:
        return int(self.values.shape[0])

    @property
    def times(self) -> np.ndarray:
        return (self.start_step + np.arange(self.n_steps)) * STEP_S

    @property
    def end_step(self) -> int:
        """One past the last rated step."""
        return self.start_step + self.n_steps


@dataclass
class Dataset:
    """Songs plus per-listener curves, and (synthetic only) the noise-free truth.

    Attributes:
        name: e.g. "synthetic", "generic:<root>".
        root: folder the data was read from.
        songs: song_id -> Song.
        curves: every per-listener curve.
        oracle: (annotator_id, song_id) -> the listener's noise-free personal curve, when known.
        consensus: song_id -> the population's averaged curve, when known.
        scale: label scale, "deam" (about [-1, 1]) or "unit" ([0, 1]).
    """

    name: str
    root: Path
    songs: dict[str, Song]
    curves: list[Curve]
    oracle: dict[tuple[str, str], Curve] | None = None
    consensus: dict[str, Curve] | None = None
    scale: str = "deam"
    info: dict = field(default_factory=dict)

    def by_annotator(self) -> dict[str, list[Curve]]:
        out: dict[str, list[Curve]] = defaultdict(list)
        for c in self.curves:
            out[c.annotator_id].append(c)
        return {a: sorted(cs, key=lambda c: c.song_id) for a, cs in sorted(out.items())}

    @property
    def annotators(self) -> list[str]:
        return sorted({c.annotator_id for c in self.curves})
