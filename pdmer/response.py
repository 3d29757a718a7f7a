"""A listener's linear response to the music: the safe rule's ``response`` component.

What carries over from one song to the next, for a listener, is partly how they hear the sound
itself: one listener's valence rises when the timbre brightens, another's falls; one's arousal
follows the register of the melody, another's does not. The generic model cannot know which, and
the MAML inner loop learns it only slowly, mixed up with the support song's level. This component
learns it directly and in closed form, from the listener's one support song:

1. **What the music does, per step**: the step's mean log-Mel spectrum (the local patch averaged
   over its frames, the same input the network sees), projected on the first ``K`` principal
   axes of the training songs' steps and scaled to unit variance there (:class:`ResponseBasis`,
   fitted once per run on its training songs, stored in ``personalization.json``), smoothed by a
   causal exponential filter (``TAU_STEPS``) and taken at ``LAGS`` (a listener reacts to what
   they have just heard, and slowly): the design matrix ``X`` (T, K * len(LAGS)).
2. **How the listener responds to it**: a ridge regression of the support's residual (ratings
   minus the generic curve) on ``X``, both centred over the support span, so the support song's
   level (which does not carry over between songs, r < 0.1) is left to the ``offset`` component:
   ``beta = (X'X / n + LAMBDA * I)^-1 X'r / n`` per dimension (:func:`fit`).
3. **On another song**: ``(X_q - mean(X_q)) @ beta`` over the predicted span (:func:`curve`): a
   change of shape with no level of its own, added to the personal curve with the weight the safe
   rule chose on validation listeners (weight 0: nothing; the rule's audit decides per dataset
   whether it helps).

The constants are fixed, not tuned per run (the safe rule's weight shrinks further where the data
say so); ``benchmarks/response_study.py`` measures the alternatives on the embedded benchmark and on
VGMIDI's real listeners.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

K = 4  # principal axes of the step spectra
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
    axes: np.ndarray  # (K, mels): projection rows, already divided by each axis's std
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

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

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "axes": self.axes.tolist(), "tau_steps": TAU_STEPS, "lags": list(LAGS)}

    @classmethod
    def from_json(cls, d: dict) -> "ResponseBasis":
        mean, axes = np.asarray(d["mean"], dtype=np.float64), np.asarray(d["axes"], dtype=np.float64)
        if axes.ndim != 2 or mean.ndim != 1 or axes.shape[1] != len(mean) or not np.isfinite(axes).all():
            raise ValueError(f"a response basis needs axes (K, {len(mean)}) and a mean of the same width")
        return cls(mean, axes)

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
        return lagged((step_spectra(local) - self.mean) @ self.axes[:k].T, tau, lags)


def lagged(z: np.ndarray, tau: float = TAU_STEPS, lags=LAGS) -> np.ndarray:
    """Per-step features (T, k) -> a design matrix (T, k * len(lags)): smoothed causally (``tau``
    steps), then taken at each of ``lags``."""
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


def fit(design: np.ndarray, residual: np.ndarray, lam: float = LAMBDA) -> np.ndarray:
    """The listener's response ``beta`` (P, 2): ridge of the centred residual (T, 2) on the centred design (T, P).

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
    return np.linalg.solve(x.T @ x / n + lam * np.eye(x.shape[1]), x.T @ r / n)


def curve(design: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The response on a span (T, 2): the centred design times ``beta``, no level of its own."""
    x = np.asarray(design, dtype=np.float64)
    if len(x) == 0:
        return np.zeros((0, beta.shape[1]))
    return (x - x.mean(0)) @ beta


def fit_songs(designs: list[np.ndarray], residuals: list[np.ndarray], lam: float = LAMBDA) -> np.ndarray:
    """:func:`fit` over several support songs: each song's design and residual centred on its own
    (a listener's level differs from song to song), then one ridge over them all."""
    if not designs:
        raise ValueError("no support song to fit a response on")
    x = np.concatenate([d - d.mean(0) if len(d) else d for d in designs])
    r = np.concatenate([np.asarray(e, dtype=np.float64) - np.mean(e, 0) if len(e) else e for e in residuals])
    return fit(x, r, lam)


def span(design: np.ndarray, start: int, stop: int) -> np.ndarray:
    """The rows of a whole song's design for the steps [start, stop), checked against its length."""
    if start < 0 or stop > len(design) or start > stop:
        raise ValueError(f"steps [{start}, {stop}) are outside the song's {len(design)} steps")
    return design[start:stop]
