"""A listener's linear response to the music: the safe rule's ``response`` component.

What carries over from one song to the next, for a listener, is partly how they hear the sound
itself: one listener's valence rises when the timbre brightens, another's falls; one's arousal
follows the register of the melody, another's does not. The generic model cannot know which, and
the MAML inner loop learns it only slowly, mixed up with the support song's level. This component
learns it directly and in closed form, from the listener's one support song:

1. **What the music does, per step**: the step's mean log-Mel spectrum (the local patch averaged
   over its frames, the same input the network sees), projected on a few axes and scaled to unit
   variance over the training songs' steps (:class:`ResponseBasis`, fitted once per run on its
   training data, stored in ``personalization.json``), smoothed by a causal exponential filter
   (``TAU_STEPS``) and taken at ``LAGS`` (a listener reacts to what they have just heard, and
   slowly): the design matrix ``X`` (T, n_axes * len(LAGS)).
2. **How the listener responds to it**: a ridge regression of the support's residual (ratings
   minus the generic curve) on ``X``, both centred over the support span, so the support song's
   level (which does not carry over between songs, r < 0.1) is left to the ``offset`` component:
   ``beta = (X'X / n + LAMBDA * I)^-1 X'r / n`` per dimension (:func:`fit`), on the columns of the
   axes that serve that dimension.
3. **On another song**: ``(X_q - mean(X_q)) @ beta`` over the predicted span (:func:`curve`): a
   change of shape with no level of its own, added to the personal curve with the weight the safe
   rule chose on validation listeners (weight 0: nothing; the rule's audit decides per dataset
   whether it helps).

**Which axes** (:meth:`ResponseBasis.fit_personal`). One support song gives a few dozen
autocorrelated steps, so only a few axes can be fitted; which ones decides what the component can
learn. They are the directions of the step spectra along which the *training* listeners' own
responses carry over, learned from the data the run trains on rather than set by hand (the
empirical-Bayes reading of a meta-learned prior: where individual responses vary consistently):

- the step spectra's first ``N_PCA`` principal axes (unit variance), smoothed;
- per training listener and song, the ridge response ``b`` (N_PCA, 2) of their residual from the
  other training listeners' mean curve of that song (leave-one-out: listener-blind, no model);
- per dimension, the cross moment ``S = mean of b_i b_j'`` over pairs of *different* songs of the
  same listener (under ``within_song``, the two halves of one song). Estimation noise is
  independent between the two, so ``S`` estimates the covariance of what carries over only;
- its top ``K_DIRS`` eigenvectors are the axes of that dimension.

Where nothing carries over (``S`` is noise) the axes are arbitrary and the safe rule's audit keeps
the weight at 0; with fewer than ``MIN_PAIRS`` pairs (listeners who rated a single song), the basis
is the first ``K`` principal axes, shared by both dimensions, as before.
``benchmarks/response_study.py`` measures the designs on the embedded benchmark and on VGMIDI's
real listeners.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

K = 4  # principal axes of the step spectra (the fallback basis, shared by both dimensions)
N_PCA = 32  # principal axes the personal directions are sought among
K_DIRS = 2  # personal directions per dimension
DIR_LAMBDA = 0.3  # ridge penalty of the per-song responses the directions are estimated from
MIN_PAIRS = 20  # song pairs of the same training listener needed for personal directions
TAU_STEPS = 3.0  # causal smoothing time constant, in 0.5 s steps
LAGS = (0, 4)  # the steps (0.5 s each) the listener looks back: now and 2 s ago
LAMBDA = 0.1  # ridge penalty, in units of the (unit-variance) features' second moment
FIT_STEPS_MAX = 20000  # training steps the basis is fitted on (a fixed subsample beyond this)
MIN_SUPPORT_STEPS = 8  # fewer support steps fit nothing (beta = 0)
DESIGN_CACHE = 512  # songs whose design matrices a basis keeps


def step_spectra(local: torch.Tensor | np.ndarray) -> np.ndarray:
    """(T, frames, mels) log-Mel patches -> (T, mels) mean spectrum per step, float64."""
    x = local.float().numpy() if isinstance(local, torch.Tensor) else np.asarray(local, dtype=np.float32)
    return x.mean(1).astype(np.float64)


@dataclass
class ResponseBasis:
    """The principal axes of the training songs' step spectra, each scaled to unit variance there."""

    mean: np.ndarray  # (mels,)
    axes: np.ndarray  # (n_axes, mels): projection rows, already divided by each axis's std
    dims: np.ndarray | None = None  # (n_axes,) the dimension each axis serves (0 arousal, 1 valence); None: both
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def mask(self) -> np.ndarray:
        """(P, 2) bool: the design columns (lag-major, as :meth:`design`) each dimension is fitted on."""
        n = len(self.axes)
        dims = np.full(n, -1) if self.dims is None else np.asarray(self.dims)
        per = np.stack([(dims < 0) | (dims == 0), (dims < 0) | (dims == 1)], 1)  # (n_axes, 2)
        return np.tile(per, (len(LAGS), 1))

    @classmethod
    def fit(cls, spectra: list[np.ndarray], k: int = K, seed: int = 0) -> "ResponseBasis":
        """From the step spectra (T_i, mels) of the training songs."""
        s = np.concatenate(spectra).astype(np.float64)
        if len(s) > FIT_STEPS_MAX:
            s = s[np.sort(np.random.default_rng(seed).choice(len(s), FIT_STEPS_MAX, replace=False))]
        if len(s) < 2:
            raise ValueError("the response basis needs at least two training steps")
        mean = s.mean(0)
        _, sv, vt = np.linalg.svd(s - mean, full_matrices=False)
        k = min(k, len(sv))
        sd = sv[:k] / np.sqrt(len(s))
        sd = np.where(sd > 1e-9, sd, 1.0)
        return cls(mean, vt[:k] / sd[:, None])

    @classmethod
    def fit_personal(
        cls,
        spectra: dict[str, np.ndarray],
        curves: list,
        protocol: str = "songs",
        k: int = K_DIRS,
        n_pca: int = N_PCA,
        seed: int = 0,
    ) -> "ResponseBasis":
        """The axes along which the training listeners' responses carry over (module docstring).

        Args:
            spectra: step spectra (T, mels) of the training songs, by song id.
            curves: the training listeners' curves (:class:`pdmer.data.types.Curve`) on those songs.
            protocol: "songs" (pairs of a listener's different songs) or "within_song" (the two
                halves of each curve).
            k: axes per dimension. n_pca: principal axes searched. seed: the PCA's subsample.

        Returns:
            a basis with ``2 * k`` axes (``dims`` says which dimension each serves), or, with fewer
            than ``MIN_PAIRS`` pairs, the first ``K`` principal axes for both dimensions.
        """
        songs = sorted(spectra)
        if not songs:
            raise ValueError("the response basis needs at least one training song")
        pca = cls.fit([spectra[s] for s in songs], k=n_pca, seed=seed)
        z = {s: _smooth((np.asarray(spectra[s], np.float64) - pca.mean) @ pca.axes.T, TAU_STEPS) for s in songs}
        moment, pairs = _carried_moment(z, [c for c in curves if c.song_id in z], protocol)
        if pairs < MIN_PAIRS:
            return cls.fit([spectra[s] for s in songs], seed=seed)
        proj, dims = [], []
        zs = np.concatenate([z[s] for s in songs])  # (steps, n_pca), smoothed
        for d in range(2):
            w, v = np.linalg.eigh(moment[d])
            u = v[:, np.argsort(w)[::-1][: min(k, len(w))]]  # (n_pca, k)
            sd = (zs @ u).std(0)
            u = u / np.where(sd > 1e-9, sd, 1.0)
            proj.append(u.T @ pca.axes)  # (k, mels): projects (spectra - mean) straight onto the scaled axis
            dims += [d] * u.shape[1]
        return cls(pca.mean, np.concatenate(proj), np.array(dims))

    def to_json(self) -> dict:
        out = {"mean": self.mean.tolist(), "axes": self.axes.tolist(), "tau_steps": TAU_STEPS, "lags": list(LAGS)}
        if self.dims is not None:
            out["dims"] = [int(d) for d in self.dims]
        return out

    @classmethod
    def from_json(cls, d: dict) -> "ResponseBasis":
        mean, axes = np.asarray(d["mean"], dtype=np.float64), np.asarray(d["axes"], dtype=np.float64)
        if axes.ndim != 2 or mean.ndim != 1 or axes.shape[1] != len(mean) or not np.isfinite(axes).all():
            raise ValueError(f"a response basis needs axes (K, {len(mean)}) and a mean of the same width")
        dims = d.get("dims")  # absent from bases before personal directions: both dimensions
        if dims is not None:
            dims = np.asarray(dims)
            if dims.shape != (len(axes),) or not np.isin(dims, (0, 1)).all():
                raise ValueError(f"a response basis's dims must give 0 or 1 for each of its {len(axes)} axes")
            dims = dims.astype(int)
        return cls(mean, axes, dims)

    def design(self, local: torch.Tensor | np.ndarray) -> np.ndarray:
        """The design matrix of a whole song: (T, K * len(LAGS)), computed from its first step on.

        The last few songs' matrices are kept (evaluation asks for the same song once per listener).
        """
        key = id(local), tuple(local.shape)
        hit = self._cache.get(key)
        if hit is not None and hit[0] is local:
            return hit[1]
        x = self.design_with(local)
        if len(self._cache) >= DESIGN_CACHE:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (local, x)  # holding ``local`` keeps its id from being reused while cached
        return x

    def design_with(
        self, local: torch.Tensor | np.ndarray, k: int | None = None, tau: float = TAU_STEPS, lags=LAGS
    ) -> np.ndarray:
        """:meth:`design` with other settings, not cached: the first ``k`` axes (None: all), smoothing
        ``tau`` steps, ``lags`` (for studies of the design, ``benchmarks/response_study.py``)."""
        z = (step_spectra(local) - self.mean) @ self.axes[:k].T  # (T, k)
        z = _smooth(z, tau)
        return np.concatenate([_lag(z, lag) for lag in lags], 1)


def _smooth(x: np.ndarray, tau: float) -> np.ndarray:
    """Causal exponential smoothing along axis 0 (time constant ``tau`` steps), started at x[0]."""
    if tau <= 0 or len(x) == 0:
        return x
    from scipy.signal import lfilter

    a = float(np.exp(-1.0 / tau))
    y, _ = lfilter([1 - a], [1, -a], x, axis=0, zi=a * x[:1])
    return y


def _lag(x: np.ndarray, lag: int) -> np.ndarray:
    """``x`` delayed by ``lag`` steps, the first value repeated before the start."""
    if lag <= 0:
        return x
    return np.concatenate([np.repeat(x[:1], min(lag, len(x)), 0), x[: max(len(x) - lag, 0)]])


def _carried_moment(z: dict[str, np.ndarray], curves: list, protocol: str) -> tuple[np.ndarray, int]:
    """(2, n, n) cross moment of the responses carried over, and the number of pairs it averages.

    Each curve's residual is its ratings minus the other listeners' mean on the same steps (steps no
    other listener rated are dropped); its response is a ridge (``DIR_LAMBDA``) on the smoothed
    principal components ``z`` of its song. Pairs: two different songs of one listener, or the two
    halves of one curve (``within_song``).
    """
    by_song: dict[str, list] = {}
    for c in curves:
        by_song.setdefault(c.song_id, []).append(c)
    n = next(iter(z.values())).shape[1]
    per_listener: dict[str, list[np.ndarray]] = {}
    for sid, cs in by_song.items():
        end = max(c.end_step for c in cs)
        total, count = np.zeros((end, 2)), np.zeros(end)
        for c in cs:
            total[c.start_step : c.end_step] += c.values
            count[c.start_step : c.end_step] += 1
        for c in cs:
            sl = slice(c.start_step, min(c.end_step, len(z[sid])))
            others = count[sl] - 1
            keep = others > 0
            if keep.sum() < 2 * MIN_SUPPORT_STEPS:
                continue
            vals = c.values[: sl.stop - sl.start]
            resid = (vals - (total[sl] - vals) / np.maximum(others, 1)[:, None])[keep]
            x = z[sid][sl][keep]
            if protocol == "within_song":
                h = len(x) // 2
                parts = [fit(x[:h], resid[:h], DIR_LAMBDA), fit(x[h:], resid[h:], DIR_LAMBDA)]
                per_listener[f"{c.annotator_id}\0{sid}"] = parts
            else:
                per_listener.setdefault(c.annotator_id, []).append(fit(x, resid, DIR_LAMBDA))
    moment, pairs = np.zeros((2, n, n)), 0
    for bs in per_listener.values():
        if len(bs) < 2:
            continue
        b = np.stack(bs)  # (m, n, 2)
        tot = b.sum(0)
        for d in range(2):
            moment[d] += np.outer(tot[:, d], tot[:, d]) - b[:, :, d].T @ b[:, :, d]
        pairs += len(bs) * (len(bs) - 1)
    return moment / max(pairs, 1), pairs


def fit(design: np.ndarray, residual: np.ndarray, lam: float = LAMBDA, mask: np.ndarray | None = None) -> np.ndarray:
    """The listener's response ``beta`` (P, 2): ridge of the centred residual (T, 2) on the centred design (T, P).

    ``mask`` (P, 2) bool (:attr:`ResponseBasis.mask`): dimension ``d`` is fitted on the columns
    ``mask[:, d]`` only, the others' coefficients 0; None: every column for both.
    Fewer than ``MIN_SUPPORT_STEPS`` steps, or a non-finite input: zeros (no response).
    """
    x, r = np.asarray(design, dtype=np.float64), np.asarray(residual, dtype=np.float64)
    if len(x) != len(r):
        raise ValueError(f"design has {len(x)} steps, residual {len(r)}")
    beta = np.zeros((x.shape[1], r.shape[1]))
    if len(x) < MIN_SUPPORT_STEPS or not (np.isfinite(x).all() and np.isfinite(r).all()):
        return beta
    x, r = x - x.mean(0), r - r.mean(0)
    n = len(x)
    if mask is None:
        return np.linalg.solve(x.T @ x / n + lam * np.eye(x.shape[1]), x.T @ r / n)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != beta.shape:
        raise ValueError(f"mask of shape {mask.shape} for a design of {x.shape[1]} columns and {r.shape[1]} dimensions")
    for d in range(r.shape[1]):
        xd = x[:, mask[:, d]]
        beta[mask[:, d], d] = np.linalg.solve(xd.T @ xd / n + lam * np.eye(xd.shape[1]), xd.T @ r[:, d] / n)
    return beta


def curve(design: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The response on a span (T, 2): the centred design times ``beta``, no level of its own."""
    x = np.asarray(design, dtype=np.float64)
    if len(x) == 0:
        return np.zeros((0, beta.shape[1]))
    return (x - x.mean(0)) @ beta


def fit_songs(
    designs: list[np.ndarray], residuals: list[np.ndarray], lam: float = LAMBDA, mask: np.ndarray | None = None
) -> np.ndarray:
    """:func:`fit` over several support songs: each song's design and residual centred on its own
    (a listener's level differs from song to song), then one ridge over them all."""
    if not designs:
        raise ValueError("no support song to fit a response on")
    x = np.concatenate([d - d.mean(0) if len(d) else d for d in designs])
    r = np.concatenate([np.asarray(e, dtype=np.float64) - np.mean(e, 0) if len(e) else e for e in residuals])
    return fit(x, r, lam, mask)


def span(design: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The rows of a whole song's design for the steps [start, stop), checked against its length."""
    if start < 0 or stop > len(design) or start > stop:
        raise ValueError(f"steps [{start}, {stop}) are outside the song's {len(design)} steps")
    return design[start:stop]
