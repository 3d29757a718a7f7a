"""A listener's linear response to the music: the safe rule's ``response`` component.

What carries over from one song to the next, for a listener, is partly how they hear the sound
itself: one listener's valence rises when the timbre brightens, another's falls; one's arousal
follows the register of the melody, another's does not. The generic model cannot know which, and
the MAML inner loop learns it only slowly, mixed up with the support song's level. This component
learns it directly and in closed form, from the listener's one support song:

1. **What the music does, per step**: two views of the step's spectrum (:func:`step_views`: the
   local patch's log-Mel averaged over its frames, the same input the network sees, and the log of
   its mean Mel power, which the loudest bands dominate), on the ``N_IN`` principal axes of the
   training songs' steps (unit variance there), smoothed by a causal exponential filter
   (``TAU_STEPS``) and taken at ``LAGS`` (a listener reacts to what they have just heard, and
   slowly). Which directions of these a listener's response follows, and carries from one song to
   the next, is **learned** per dimension from the training listeners (:meth:`ResponseBasis.learn`):
   ``K`` directions per dimension, meta-trained so that the ridge fit of step 2 on one song of a
   listener predicts their residual on another of their songs (a closed-form ridge inner loop,
   differentiated through; early-stopped on held-out training listeners). Where the held-out
   listeners say nothing carries over, the directions are zero and the component adds nothing.
   The basis is fitted once per run and stored in ``personalization.json``. The design matrix of a
   song is ``X`` (T, 2, K * len(LAGS)): per dimension, its own directions.
2. **How the listener responds to it**: a ridge regression of the support's residual (ratings
   minus the generic curve) on ``X``, both centred over the support span, so the support song's
   level (which does not carry over between songs, r < 0.1) is left to the ``offset`` component:
   ``beta_d = (X_d'X_d / n + LAMBDA * I)^-1 X_d'r_d / n`` per dimension ``d`` (:func:`fit`).
3. **On another song**: ``(X_q - mean(X_q)) @ beta`` over the predicted span (:func:`curve`): a
   change of shape with no level of its own, added to the personal curve with the weight the safe
   rule chose on validation listeners (weight 0: nothing; the rule's audit decides per dataset
   whether it helps).

The constants are fixed, not tuned per run (the safe rule's weight shrinks further where the data
say so); ``benchmarks/response_designs.py`` measures the alternatives on the embedded benchmark and on
VGMIDI's real listeners. A basis of the earlier form (one set of ``K`` principal axes of the mean
log-Mel for both dimensions, :meth:`ResponseBasis.fit`; design (T, K * len(LAGS))) still loads and
applies, so profiles calibrated before keep their curves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

K = 4  # principal axes of the step spectra (the earlier, unlearned basis: ResponseBasis.fit)
N_IN = 32  # principal axes of the step views the learned directions are combinations of
K_LEARN = 8  # learned directions per dimension
LEARN_STEPS = 400  # Adam steps of the meta-training of the directions
LEARN_BATCH = 128  # (support, query) pairs per step
LEARN_LR = 0.01
LEARN_EVERY = 25  # steps between the held-out checks (the best one is kept)
LEARN_HELD_OUT = 0.2  # share of the training listeners held out for the early stopping
LEARN_HELD_PAIRS = 1000  # pairs the held-out score is taken on
MIN_LEARN_LISTENERS = 10  # fewer training listeners with two songs: the unlearned first axes instead
SUPPORT_STEPS = 60  # a support sequence while learning: 30 s, the paper's
QUERY_STEPS = 90  # at most this many steps of the query song while learning
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


def step_views(local: torch.Tensor | np.ndarray) -> np.ndarray:
    """(T, frames, mels) log-Mel patches -> (T, 2 * mels): per step, the mean log-Mel spectrum
    (:func:`step_spectra`) and the log of the mean Mel power (the power view: its loudest bands
    dominate it), float64."""
    x = local if isinstance(local, torch.Tensor) else torch.from_numpy(np.asarray(local, dtype=np.float32))
    x = x.float()
    power = x.exp().mean(1).log()  # ln power + 1e-6 >= -13.9, and well under float32's exp limit
    return np.concatenate([x.mean(1).double().numpy(), power.double().numpy()], 1)


@dataclass
class ResponseBasis:
    """How a song's steps become the response's design matrix.

    ``views`` names the per-step input (``"spectra"``: :func:`step_spectra`, the earlier basis;
    ``"views"``: :func:`step_views`), ``mean`` its training mean, and ``axes`` the projection rows:
    (P, F) shared by both dimensions (the earlier basis: design (T, P * len(LAGS))), or (2, P, F), one
    set per dimension (the learned basis: design (T, 2, P * len(LAGS))). ``report`` says how it was
    learned (empty for the earlier basis).
    """

    mean: np.ndarray  # (F,)
    axes: np.ndarray  # (P, F) or (2, P, F): projection rows
    views: str = "spectra"
    report: dict = field(default_factory=dict, compare=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def fit(cls, spectra: list[np.ndarray], k: int = K, seed: int = 0) -> "ResponseBasis":
        """The earlier, unlearned basis: the first ``k`` principal axes of the training songs' step
        spectra (T_i, mels), shared by both dimensions."""
        mean, axes = _principal_axes(spectra, k, seed)
        return cls(mean, axes)

    @classmethod
    def learn(cls, local: dict, curves: list, protocol: str = "songs", seed: int = 0) -> "ResponseBasis":
        """The learned basis: per dimension, ``K_LEARN`` directions among the first ``N_IN`` principal
        axes of the step views, meta-trained on the training listeners for the cross-song prediction.

        Args:
            local: song id -> its log-Mel patches (T, frames, mels), every song of ``curves``.
            curves: the training listeners' curves (:class:`pdmer.data.types.Curve`). A curve's
                residual is its ratings minus the other training listeners' mean on its steps
                (:class:`pdmer.references.OthersAverage`: the population's part, without a model).
            protocol: ``songs``: a task is a support sequence of one of the listener's songs and
                another of their songs as the query (what pdmer's protocol scores); ``within_song``:
                the first ``SUPPORT_STEPS`` of a song and the rest of it.
            seed: the draws of tasks and of the held-out listeners.

        Each step of the meta-training draws ``LEARN_BATCH`` tasks of the listeners not held out,
        fits the response on each support by ridge (:func:`fit`, centred, ``LAMBDA``) through the
        current directions, and lowers the query's mean squared residual after the response minus
        before it (the same centring: the response has no level). Every ``LEARN_EVERY`` steps the
        same is scored on fixed tasks of the held-out listeners, and the best directions are kept; if
        none of them lowers the held-out residual, nothing carries over and the directions are zero.
        With fewer than ``MIN_LEARN_LISTENERS`` usable listeners, the first ``K_LEARN`` axes unlearned.
        """
        from pdmer.references import OthersAverage

        songs = sorted({c.song_id for c in curves if c.song_id in local})
        if not songs:
            raise ValueError("the response basis needs at least one training song")
        views = {s: step_views(local[s]) for s in songs}
        mean, axes = _principal_axes([views[s] for s in songs], N_IN, seed)
        z = {s: lagged((views[s] - mean) @ axes.T) for s in songs}  # smoothed and lagged, once per song
        n_in = axes.shape[0]
        k = min(K_LEARN, n_in)
        others = OthersAverage([c for c in curves if c.song_id in z])
        tasks: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for c in curves:
            if c.song_id not in z:
                continue
            base = others(c.annotator_id, c)
            steps = min(c.n_steps, len(z[c.song_id]) - c.start_step)
            if base is None or steps < SUPPORT_STEPS + (MIN_SUPPORT_STEPS if protocol == "within_song" else 0):
                continue
            x = z[c.song_id][c.start_step : c.start_step + steps]
            r = (c.values - base)[:steps].astype(np.float64)
            if np.isfinite(x).all() and np.isfinite(r).all():
                tasks.setdefault(c.annotator_id, []).append((x, r))
        if protocol == "songs":
            tasks = {a: v for a, v in tasks.items() if len(v) >= 2}
        listeners = sorted(tasks)
        init = np.zeros((2, n_in, k))
        init[:, :k, :k] = np.eye(k)
        report = {
            "inputs": f"step views on {n_in} principal axes",
            "directions": k,
            "protocol": protocol,
            "listeners": len(listeners),
        }
        if len(listeners) < MIN_LEARN_LISTENERS:
            p = init
            report["learned"] = f"no: {len(listeners)} training listeners with tasks (< {MIN_LEARN_LISTENERS})"
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # small products: one thread is faster, and the result the same on any machine
            try:
                p, learned = _learn_directions(tasks, listeners, init, protocol, seed)
            finally:
                torch.set_num_threads(threads)
            report.update(learned)
        rows = np.einsum("dik,if->dkf", p, axes)  # (2, k, F): directions in the views' own units
        return cls(mean, rows, "views", report)

    @property
    def carries(self) -> bool:
        """False where the learned directions are zero (nothing carries over)."""
        return bool(np.abs(self.axes).max() > 0)

    def to_json(self) -> dict:
        return {
            "mean": self.mean.tolist(),
            "axes": self.axes.tolist(),
            "views": self.views,
            "tau_steps": TAU_STEPS,
            "lags": list(LAGS),
            "report": self.report,
        }

    @classmethod
    def from_json(cls, d: dict) -> "ResponseBasis":
        mean, axes = np.asarray(d["mean"], dtype=np.float64), np.asarray(d["axes"], dtype=np.float64)
        views = d.get("views", "spectra")  # records before the learned basis: the mean log-Mel
        if views not in ("spectra", "views"):
            raise ValueError(f"a response basis's views must be 'spectra' or 'views', not {views!r}")
        shape_ok = axes.ndim == 2 or (axes.ndim == 3 and axes.shape[0] == 2)
        if not shape_ok or mean.ndim != 1 or axes.shape[-1] != len(mean) or not np.isfinite(axes).all():
            raise ValueError(f"a response basis needs axes (P, {len(mean)}) or (2, P, {len(mean)}), finite")
        if not np.isfinite(mean).all() or (views == "views" and len(mean) % 2):
            raise ValueError("a response basis needs a finite mean (an even width for the two views)")
        return cls(mean, axes, views, dict(d.get("report") or {}))

    def design(self, local: torch.Tensor | np.ndarray) -> np.ndarray:
        """The design matrix of a whole song, computed from its first step on: (T, P * len(LAGS)) for
        the earlier basis, (T, 2, P * len(LAGS)) for a learned one.

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
        x = step_views(local) if self.views == "views" else step_spectra(local)
        if x.shape[1] != len(self.mean):
            raise ValueError(f"the song has {x.shape[1]} features per step, the response basis {len(self.mean)}")
        x = x - self.mean
        if self.axes.ndim == 2:
            return lagged(x @ self.axes[:k].T, tau, lags)
        return np.stack([lagged(x @ a[:k].T, tau, lags) for a in self.axes], 1)


def _principal_axes(rows: list[np.ndarray], k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), axes (k, F)): the first ``k`` principal axes of the stacked rows, each divided by
    its standard deviation there (a fixed subsample of ``FIT_STEPS_MAX`` rows beyond that)."""
    s = np.concatenate(rows).astype(np.float64)
    if len(s) > FIT_STEPS_MAX:
        s = s[np.sort(np.random.default_rng(seed).choice(len(s), FIT_STEPS_MAX, replace=False))]
    if len(s) < 2:
        raise ValueError("the response basis needs at least two training steps")
    mean = s.mean(0)
    _, sv, vt = np.linalg.svd(s - mean, full_matrices=False)
    k = min(k, len(sv))
    sd = sv[:k] / np.sqrt(len(s))
    sd = np.where(sd > 1e-9, sd, 1.0)
    return mean, vt[:k] / sd[:, None]


def _learn_directions(tasks: dict, listeners: list[str], init: np.ndarray, protocol: str, seed: int):
    """:meth:`ResponseBasis.learn`'s meta-training: (directions (2, n_in, k), report)."""
    rng = np.random.default_rng(seed)
    order = list(listeners)
    rng.shuffle(order)
    n_held = max(int(round(len(order) * LEARN_HELD_OUT)), 2)
    held, train = order[:n_held], order[n_held:]
    n_lags = len(LAGS)

    def draw(who: list[str], r: np.random.Generator, n: int) -> list[tuple]:
        out = []
        for _ in range(n):
            a = who[r.integers(len(who))]
            if protocol == "within_song":
                x, y = tasks[a][r.integers(len(tasks[a]))]
                xs, ys, xq, yq = x[:SUPPORT_STEPS], y[:SUPPORT_STEPS], x[SUPPORT_STEPS:], y[SUPPORT_STEPS:]
            else:
                i, j = r.choice(len(tasks[a]), 2, replace=False)
                (xs, ys), (xq, yq) = tasks[a][i], tasks[a][j]
                o = r.integers(0, len(xs) - SUPPORT_STEPS + 1)
                xs, ys = xs[o : o + SUPPORT_STEPS], ys[o : o + SUPPORT_STEPS]
            q = r.integers(0, max(len(xq) - QUERY_STEPS, 0) + 1)
            out.append((xs, ys, xq[q : q + QUERY_STEPS], yq[q : q + QUERY_STEPS]))
        return out

    def batch(pairs: list[tuple]) -> tuple:
        t = max(len(p[2]) for p in pairs)
        xq, yq, m = (
            np.zeros((len(pairs), t, pairs[0][2].shape[1])),
            np.zeros((len(pairs), t, 2)),
            np.zeros((len(pairs), t, 1)),
        )
        for b, p in enumerate(pairs):
            xq[b, : len(p[2])], yq[b, : len(p[2])], m[b, : len(p[2])] = p[2], p[3], 1.0
        xs, ys = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        return tuple(torch.from_numpy(v) for v in (xs, ys, xq, yq, m))

    p = torch.tensor(init, dtype=torch.float64, requires_grad=True)

    def loss(b: tuple) -> torch.Tensor:
        """Mean over tasks and dimensions of the query's mean squared residual after minus before."""
        xs, ys, xq, yq, m = b
        cnt = m.sum(1, keepdim=True)
        out = 0.0
        for d in range(2):
            w = torch.block_diag(*[p[d]] * n_lags)  # the lags of one projection
            s, q = xs @ w, xq @ w
            s, rs = s - s.mean(1, keepdim=True), ys[..., d : d + 1] - ys[..., d : d + 1].mean(1, keepdim=True)
            q = q - (q * m).sum(1, keepdim=True) / cnt
            rq = (yq[..., d : d + 1] - (yq[..., d : d + 1] * m).sum(1, keepdim=True) / cnt) * m
            n = s.shape[1]
            a = s.transpose(1, 2) @ s / n + LAMBDA * torch.eye(s.shape[2], dtype=s.dtype)
            beta = torch.linalg.solve(a, s.transpose(1, 2) @ rs / n)
            err = rq - (q @ beta) * m
            out = out + ((err**2).sum((1, 2)) - (rq**2).sum((1, 2))) / cnt[:, 0, 0]
        return out.mean() / 2

    held_batch = batch(draw(held, np.random.default_rng(seed + 1), LEARN_HELD_PAIRS))
    opt = torch.optim.Adam([p], lr=LEARN_LR)
    best, best_p, best_step = 0.0, np.zeros_like(init), None
    for step in range(LEARN_STEPS + 1):
        if step % LEARN_EVERY == 0:
            with torch.no_grad():
                v = float(loss(held_batch))
            if v < best:
                best, best_p, best_step = v, p.detach().numpy().copy(), step
            if step == LEARN_STEPS:
                break
        opt.zero_grad()
        loss(batch(draw(train, rng, LEARN_BATCH))).backward()
        opt.step()
    report = {
        "learned": "yes" if best_step is not None else "no: no direction lowered the held-out listeners' residual",
        "held_out_listeners": len(held),
        "held_out_change": best,  # mean squared residual after minus before, per step and dimension
        "best_step": best_step,
        "steps": LEARN_STEPS,
    }
    return best_p, report


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
    """The listener's response ``beta`` (P, 2): ridge of the centred residual (T, 2) on the centred design,
    (T, P) shared by both dimensions or (T, 2, P) one per dimension.

    Fewer than ``MIN_SUPPORT_STEPS`` steps, or a non-finite input: zeros (no response).
    """
    x, r = np.asarray(design, dtype=np.float64), np.asarray(residual, dtype=np.float64)
    if len(x) != len(r):
        raise ValueError(f"design has {len(x)} steps, residual {len(r)}")
    if x.ndim == 3 and x.shape[1] != r.shape[1]:
        raise ValueError(f"design has {x.shape[1]} dimensions, residual {r.shape[1]}")
    beta = np.zeros((x.shape[-1], r.shape[1]))
    if len(x) < MIN_SUPPORT_STEPS or not (np.isfinite(x).all() and np.isfinite(r).all()):
        return beta
    x, r = x - x.mean(0), r - r.mean(0)
    n, eye = len(x), np.eye(x.shape[-1])
    if x.ndim == 2:
        return np.linalg.solve(x.T @ x / n + lam * eye, x.T @ r / n)
    for d in range(r.shape[1]):
        xd = x[:, d]
        beta[:, d] = np.linalg.solve(xd.T @ xd / n + lam * eye, xd.T @ r[:, d] / n)
    return beta


def curve(design: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The response on a span (T, 2): the centred design times ``beta``, no level of its own."""
    x = np.asarray(design, dtype=np.float64)
    if len(x) == 0:
        return np.zeros((0, beta.shape[1]))
    x = x - x.mean(0)
    return x @ beta if x.ndim == 2 else np.einsum("tdp,pd->td", x, beta)


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
