"""Training sequences and MAML tasks built from per-listener curves and cached features.

A *sequence* is a crop of ``seq_len`` steps of one listener's curve of one song; its
inputs are the song's feature steps at the same indices. A *task* (PDMER) is one
listener: support = one song, query = ``query_songs`` other songs of that listener
(drawn with replacement when the listener has fewer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pdmer.data.types import Curve, DataError

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor, Tensor]  # local (B, L, 51, 128), global (B, L, G), target (B, L, 2)


def check_alignment(curves: list[Curve], features: dict, songs: dict | None = None) -> None:
    """Every curve must lie inside its song's feature steps (labels never outrun the audio).

    Args:
        curves: the rated curves.
        features: song id -> SongFeatures.
        songs: song id -> Song, to name the audio file in the error (``Dataset.songs``).

    Raises:
        DataError: listing every song whose audio is missing or shorter than its ratings, one
            line each, naming the audio file (the same lines as ``python run.py data check``).
    """
    from pdmer.data.check import alignment_problems

    problems = alignment_problems(curves, {s: f.n_steps for s, f in features.items()}, songs)
    if problems:
        raise DataError(f"{len(problems)} song(s) whose ratings do not fit the audio:\n  " + "\n  ".join(problems))


def make_batch(crops: list[tuple[Curve, int, int]], features: dict, device: torch.device | str = "cpu") -> Batch:
    """Stack crops ``(curve, offset, length)`` (offset relative to the curve start) into a batch."""
    local, glob, target = [], [], []
    for curve, offset, length in crops:
        f = features[curve.song_id]
        s = curve.start_step + offset
        local.append(f.local[s : s + length])
        glob.append(f.global_[s : s + length])
        target.append(torch.from_numpy(curve.values[offset : offset + length]))
    return (
        torch.stack(local).to(device, non_blocking=True),  # (B, L, 51, 128)
        torch.stack(glob).to(device, non_blocking=True),  # (B, L, G)
        torch.stack(target).to(device, non_blocking=True),  # (B, L, 2)
    )


def consensus_curves(curves: list[Curve]) -> dict[str, Curve]:
    """Song id -> the mean of ``curves`` of that song, per step, over the listeners that rated it.

    A step no curve covers (between two that do not overlap) takes the mean of the nearest
    covered steps before and after; crops of rated curves never reach it anyway.
    """
    by_song: dict[str, list[Curve]] = {}
    for c in curves:
        by_song.setdefault(c.song_id, []).append(c)
    out = {}
    for sid, cs in by_song.items():
        start, end = min(c.start_step for c in cs), max(c.end_step for c in cs)
        total, count = np.zeros((end - start, 2)), np.zeros(end - start)
        for c in cs:
            total[c.start_step - start : c.end_step - start] += c.values
            count[c.start_step - start : c.end_step - start] += 1
        steps = np.flatnonzero(count > 0)
        mean = total[steps] / count[steps, None]
        full = np.stack([np.interp(np.arange(end - start), steps, mean[:, d]) for d in range(2)], 1)
        out[sid] = Curve(sid, "consensus", start, full.astype(np.float32))
    return out


@dataclass
class TaskSampler:
    """Draws DMER batches and PDMER tasks from training listeners' curves.

    Args:
        curves: listener id -> their curves (training listeners only).
        features: song id -> SongFeatures.
        seq_len: steps per sequence; curves shorter than this are left out of training.
        rng: numpy Generator (the sampler's only source of randomness).
        device: where batches go.

    ``dmer_batch(..., consensus=True)`` targets each drawn crop with the training listeners' mean
    curve of its song on the same steps (``train.target=consensus``), averaged over every curve
    given here, the short ones included.
    """

    curves: dict[str, list[Curve]]
    features: dict
    seq_len: int
    rng: np.random.Generator
    device: torch.device | str = "cpu"

    def __post_init__(self) -> None:
        self.consensus = consensus_curves([c for cs in self.curves.values() for c in cs])
        kept = {a: [c for c in cs if c.n_steps >= self.seq_len] for a, cs in self.curves.items()}
        short = sum(len(cs) for cs in self.curves.values()) - sum(len(cs) for cs in kept.values())
        if short:
            log.warning(
                "%d training curves shorter than seq_len=%d steps are left out of training", short, self.seq_len
            )
        self.curves = {a: cs for a, cs in kept.items() if len(cs) >= 2}
        if not self.curves:
            raise DataError(f"no training listener has 2 or more curves of at least {self.seq_len} steps")
        self.listeners = sorted(self.curves)
        self.all_curves = [c for a in self.listeners for c in self.curves[a]]

    def crop(self, curve: Curve) -> tuple[Curve, int, int]:
        offset = int(self.rng.integers(0, curve.n_steps - self.seq_len + 1))
        return curve, offset, self.seq_len

    def dmer_batch(self, batch_songs: int, consensus: bool = False) -> Batch:
        """``batch_songs`` crops of curves drawn uniformly (with their listener's or the consensus target)."""
        idx = self.rng.choice(len(self.all_curves), size=batch_songs, replace=len(self.all_curves) < batch_songs)
        crops = [self.crop(self.all_curves[i]) for i in idx]
        if consensus:
            crops = [self._as_consensus(*crop) for crop in crops]
        return make_batch(crops, self.features, self.device)

    def _as_consensus(self, curve: Curve, offset: int, length: int) -> tuple[Curve, int, int]:
        mean = self.consensus[curve.song_id]
        return mean, curve.start_step + offset - mean.start_step, length

    def task(self, query_songs: int, by_listener: bool = True) -> tuple[Batch, Batch]:
        """One task: (support batch of 1 sequence, query batch of ``query_songs`` sequences).

        ``by_listener=False`` is the "random tasks" ablation: support and query curves are
        drawn from the whole pool, regardless of who rated them.
        """
        if by_listener:
            a = self.listeners[int(self.rng.integers(len(self.listeners)))]
            pool = self.curves[a]
            s = int(self.rng.integers(len(pool)))
            others = [c for i, c in enumerate(pool) if i != s]
            q = self.rng.choice(len(others), size=query_songs, replace=len(others) < query_songs)
            support, query = [pool[s]], [others[i] for i in q]
        else:
            idx = self.rng.choice(len(self.all_curves), size=query_songs + 1, replace=False)
            support, query = [self.all_curves[idx[0]]], [self.all_curves[i] for i in idx[1:]]
        return (
            make_batch([self.crop(c) for c in support], self.features, self.device),
            make_batch([self.crop(c) for c in query], self.features, self.device),
        )
