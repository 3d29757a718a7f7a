"""Reference predictions that every evaluation reports beside the models (listener-blind).

- ``others``: the leave-one-out average of the OTHER listeners' curves of the song, on the
  steps they rated (needs at least one other listener): what a listener-blind predictor that
  has seen the song's ratings could reach. It uses other listeners' ratings of the test song,
  so it is a reference, not a model.
- ``ridge``: a linear probe of the global descriptor: ridge regression from each step's global
  features to the average curve of the training listeners (the training songs only, in a
  song split), its penalty chosen by leave-songs-out cross-validation on those songs.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from pdmer.data.types import Curve

log = logging.getLogger(__name__)

ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 1e4, 1e5, 1e6)  # VGMIDI chooses 1e4-1e5
CV_FOLDS = 5


class OthersAverage:
    """Per-song sums of every listener's curve, for leave-one-out averages."""

    def __init__(self, curves: list[Curve], include_consensus: bool = False) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._count: dict[str, np.ndarray] = {}
        self._own: dict[tuple[str, str], Curve] = {}
        by_song: dict[str, list[Curve]] = defaultdict(list)
        for c in curves:
            if include_consensus or c.annotator_id != "consensus":
                by_song[c.song_id].append(c)
                self._own[c.annotator_id, c.song_id] = c
        for sid, cs in by_song.items():
            end = max(c.end_step for c in cs)
            s, n = np.zeros((end, 2)), np.zeros((end, 1))
            for c in cs:
                s[c.start_step : c.end_step] += c.values
                n[c.start_step : c.end_step] += 1
            self._sum[sid], self._count[sid] = s, n

    def __call__(self, listener: str, q: Curve) -> np.ndarray | None:
        """The other listeners' mean on ``q``'s steps; None where some step has no other listener."""
        if q.song_id not in self._sum or q.end_step > len(self._sum[q.song_id]) or q.start_step < 0:
            return None
        s = self._sum[q.song_id][q.start_step : q.end_step].copy()
        n = self._count[q.song_id][q.start_step : q.end_step].copy()
        own = self._own.get((listener, q.song_id))
        if own is not None:
            lo, hi = max(own.start_step, q.start_step), min(own.end_step, q.end_step)
            if hi > lo:
                s[lo - q.start_step : hi - q.start_step] -= own.values[lo - own.start_step : hi - own.start_step]
                n[lo - q.start_step : hi - q.start_step] -= 1
        if (n < 1).any():
            return None
        return (s / n).astype(np.float32)


def consensus_steps(train_curves: list[Curve], features: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every step of the training songs that a training listener rated: its global features and
    the training listeners' average curve there (what :class:`RidgeProbe` and the model's MLP skip
    path, ``model.skip_hidden``, are fitted to).

    Returns:
        (x, y, song): (N, G) float64 global features, (N, 2) average ratings, (N,) song index.

    Raises:
        ValueError: no training curve has features.
    """
    avg = OthersAverage(train_curves, include_consensus=True)  # PMEmo: the averaged curves are all there is
    xs, ys, groups = [], [], []
    for i, sid in enumerate(sorted({c.song_id for c in train_curves})):
        if sid not in features or sid not in avg._count:
            continue
        count = avg._count[sid][:, 0]
        steps = np.flatnonzero(count > 0)
        steps = steps[steps < features[sid].n_steps]
        if len(steps) == 0:
            continue
        xs.append(features[sid].global_[steps].double().numpy())
        ys.append(avg._sum[sid][steps] / count[steps, None])
        groups.append(np.full(len(steps), i))
    if not xs:
        raise ValueError("ridge probe: no training curve with features")
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(groups)


class RidgeProbe:
    """Ridge regression of the average training curve on the global features, per step."""

    def __init__(self, train_curves: list[Curve], features: dict, seed: int = 0) -> None:
        x, y, g = consensus_steps(train_curves, features)
        self.mean, self.std = x.mean(0), x.std(0) + 1e-8
        z = (x - self.mean) / self.std
        self.alpha, self.cv = self._choose_alpha(z, y, g, seed)
        self.coef, self.bias = self._fit(z, y, self.alpha)
        log.info(
            "ridge probe: %d steps of %d songs, alpha %g (leave-songs-out CV RMSE %s)",
            len(x),
            len(np.unique(g)),
            self.alpha,
            {a: round(v, 4) for a, v in self.cv.items()},
        )

    @staticmethod
    def _moments(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """What every penalty's fit on these steps shares: the means and the centred cross-products."""
        ym, zm = y.mean(0), z.mean(0)
        zc = z - zm
        return zm, ym, zc.T @ zc, zc.T @ (y - ym)

    @staticmethod
    def _solve(moments: tuple[np.ndarray, ...], alpha: float) -> tuple[np.ndarray, np.ndarray]:
        zm, ym, gram, cross = moments
        coef = np.linalg.solve(gram + alpha * np.eye(len(gram)), cross)
        return coef, ym - zm @ coef

    @classmethod
    def _fit(cls, z: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        return cls._solve(cls._moments(z, y), alpha)

    def _choose_alpha(self, z: np.ndarray, y: np.ndarray, g: np.ndarray, seed: int) -> tuple[float, dict]:
        songs = np.unique(g)
        if len(songs) < 2:
            return 10.0, {}
        k = min(CV_FOLDS, len(songs))
        fold_of = {s: i % k for i, s in enumerate(np.random.default_rng(seed).permutation(songs))}
        f = np.array([fold_of[s] for s in g])
        err: dict[float, list[float]] = {a: [] for a in ALPHAS}
        for k in np.unique(f):  # each fold's cross-products once, then one solve per penalty
            moments = self._moments(z[f != k], y[f != k])
            for a in ALPHAS:
                coef, bias = self._solve(moments, a)
                err[a].append(((z[f == k] @ coef + bias - y[f == k]) ** 2).mean())
        cv = {a: float(np.sqrt(np.mean(e))) for a, e in err.items()}
        return min(cv, key=cv.get), cv

    def __call__(self, feats, q: Curve) -> np.ndarray:
        x = feats.global_[q.start_step : q.end_step].double().numpy()
        return (((x - self.mean) / self.std) @ self.coef + self.bias).astype(np.float32)


class References:
    """The listener-blind references of an evaluation (see the module docstring)."""

    def __init__(self, all_curves: list[Curve], train_curves: list[Curve], features: dict, seed: int = 0) -> None:
        self.others = OthersAverage(all_curves)
        try:
            self.ridge: RidgeProbe | None = RidgeProbe(train_curves, features, seed)
        except ValueError as e:
            log.warning("%s: no ridge reference", e)
            self.ridge = None

    def predictions(self, listener: str, q: Curve, feats) -> dict[str, np.ndarray]:
        out = {}
        o = self.others(listener, q)
        if o is not None:
            out["others"] = o
        if self.ridge is not None:
            out["ridge"] = self.ridge(feats, q)
        return out
