"""Inference by sliding windows, and the PDMER evaluation protocol.

Protocol (per listener of the evaluated split): support = ``support_songs`` songs they
rated (chosen once, deterministically), query = all their other songs, whole curves.
Reported conditions:

- ``generic``: the model without adaptation (one curve for every listener);
- ``personalized``: the model after the inner loop on the support song(s);
- ``offset``: offset-only personalization, no training: the generic curve shifted by the
  listener's mean error of the generic model on the support sequence(s) (per dimension);
- ``consensus``: the population's averaged curve, when the dataset knows it (the best a
  listener-blind prediction of the ratings could aim at);
- ``oracle``: the listener's own noise-free curve, when known (synthetic data): the best
  score any model could reach against their noisy ratings.

Metrics are computed per (listener, query song), then averaged.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from pdmer.data.types import Curve, Dataset
from pdmer.meta.maml import Params, adapt, call, split_state
from pdmer.meta.tasks import make_batch
from pdmer.metrics import average, song_metrics

log = logging.getLogger(__name__)

CONDITIONS = ("generic", "personalized", "offset", "consensus", "oracle")


def window_starts(n: int, length: int, hop: int) -> list[int]:
    """Starts of windows of ``length`` covering ``range(n)``; the last one ends at n."""
    if n <= length:
        return [0]
    starts = list(range(0, n - length + 1, hop))
    if starts[-1] != n - length:
        starts.append(n - length)
    return starts


@torch.no_grad()
def predict_steps(
    model: nn.Module,
    feats,
    start: int,
    stop: int,
    seq_len: int,
    hop: int,
    params: Params | None = None,
    batch_windows: int = 32,
) -> np.ndarray:
    """Predict steps ``[start, stop)`` of one song.

    Songs longer than ``seq_len`` are cut into windows of ``seq_len`` steps every ``hop``
    steps (the last window aligned to the end); each step's prediction is the mean over the
    windows that contain it, for arousal and valence alike. A span that fits in one window
    is predicted in one pass. Memory depends on ``seq_len`` and ``batch_windows``, not on
    the song's length.

    Args:
        model: a DSAML model (put in eval mode by the caller).
        feats: SongFeatures of the song.
        params: adapted parameters to swap in (None = the model's own).

    Returns:
        (stop - start, 2) float32 array, columns (arousal, valence).
    """
    n = stop - start
    length = min(seq_len, n)
    device = next(model.parameters()).device
    _, buffers = split_state(model)
    total = torch.zeros(n, 2, dtype=torch.float64)
    count = torch.zeros(n, 1, dtype=torch.float64)
    starts = window_starts(n, length, hop)
    for i in range(0, len(starts), batch_windows):
        chunk = starts[i : i + batch_windows]
        local = torch.stack([feats.local[start + s : start + s + length] for s in chunk]).to(device)  # (W, L, 51, 128)
        glob = torch.stack([feats.global_[start + s : start + s + length] for s in chunk]).to(device)  # (W, L, G)
        out = model(local, glob) if params is None else call(model, params, buffers, local, glob)
        pred = out.pred.double().cpu()  # (W, L, 2)
        for j, s in enumerate(chunk):
            total[s : s + length] += pred[j]
            count[s : s + length] += 1
    return (total / count).float().numpy()


def predict_curve(model, feats, curve: Curve, seq_len: int, hop: int, params: Params | None = None) -> np.ndarray:
    return predict_steps(model, feats, curve.start_step, curve.end_step, seq_len, hop, params)


def choose_support(curves: list[Curve], k: int, seed: int, listener: str) -> list[int]:
    """Indices of the support curves of a listener: fixed by (seed, listener id)."""
    rng = np.random.default_rng([seed, zlib.crc32(listener.encode())])
    return sorted(rng.choice(len(curves), size=k, replace=False).tolist())


def support_batch(curves: list[Curve], features: dict, seq_len: int, device) -> list[tuple]:
    """The support sequences: the first ``seq_len`` steps of each support curve (30 s, as the paper's protocol)."""
    return [make_batch([(c, 0, min(seq_len, c.n_steps))], features, device) for c in curves]


def support_loss_fn(loss_fn):
    """Sum a task loss over several support sequences (they may differ in length)."""

    def f(model, params, buffers, batches):
        return sum(loss_fn(model, params, buffers, b) for b in batches) / len(batches)

    return f


def support_offset(model: nn.Module, features: dict, curves: list[Curve], seq_len: int, hop: int) -> np.ndarray:
    """Mean (ratings - generic prediction) over the support sequences: the ``offset`` condition's shift.

    The support sequences are those the inner loop adapts on (the first ``seq_len`` steps of
    each support curve). Returns a (2,) float32 array (arousal, valence).
    """
    errors = []
    for c in curves:
        n = min(seq_len, c.n_steps)
        pred = predict_steps(model, features[c.song_id], c.start_step, c.start_step + n, seq_len, hop)  # (n, 2)
        errors.append(c.values[:n] - pred)
    return np.concatenate(errors).mean(0).astype(np.float32)


@dataclass
class ListenerResult:
    listener: str
    support: list[str]
    per_song: dict[str, dict[str, dict[str, float]]]  # condition -> song -> metrics
    curves: dict[str, dict[str, np.ndarray]]  # condition -> song -> (T, 2), incl. "ratings"


@dataclass(frozen=True)
class Adaptation:
    """How a listener is adapted to and scored (shared by both test protocols).

    Attributes:
        loss_fn: the task loss of the inner loop (:func:`pdmer.train.make_loss_fn`).
        inner_steps, inner_lr: the inner loop (``meta.*``).
        seq_len: support length and sliding-window length in steps (``train.seq_len``).
        hop: sliding-window hop in steps (``eval.hop``).
        support_songs: k of k-shot (``eval.support_songs``; the songs protocol only).
        seed: fixes each listener's support songs (``train.seed``).
        min_query_steps: the within-song protocol skips curves that leave fewer query steps.
    """

    loss_fn: Callable
    inner_steps: int
    inner_lr: float
    seq_len: int
    hop: int
    support_songs: int = 1
    seed: int = 0
    min_query_steps: int = 2


def evaluate_listener(
    model: nn.Module,
    dataset: Dataset,
    features: dict,
    listener: str,
    curves: list[Curve],
    how: Adaptation,
    keep_curves: bool = False,
    queries: list[Curve] | None = None,
) -> ListenerResult:
    """Score one listener: support song(s) -> adapted model; every other song is a query.

    ``queries`` given (song-disjoint split): the support is drawn from ``curves`` (the
    listener's train-song curves) and only ``queries`` (their val / test songs) are scored.
    """
    seq_len, hop = how.seq_len, how.hop
    idx = choose_support(curves, how.support_songs, how.seed, listener)
    support = [curves[i] for i in idx]
    if queries is None:
        queries = [c for i, c in enumerate(curves) if i not in idx]
    device = next(model.parameters()).device
    model.eval()
    params, _ = adapt(model, support_batch(support, features, seq_len, device), support_loss_fn(how.loss_fn), how.inner_steps, how.inner_lr)
    offset = support_offset(model, features, support, seq_len, hop)
    per_song: dict[str, dict] = {c: {} for c in CONDITIONS}
    kept: dict[str, dict] = {c: {} for c in (*CONDITIONS, "ratings")}
    for q in queries:
        _score_query(model, dataset, features, listener, q, params, seq_len, hop, per_song, kept, keep_curves, offset)
    return ListenerResult(listener, [c.song_id for c in support], per_song, kept)


def evaluate_within_song(
    model: nn.Module,
    dataset: Dataset,
    features: dict,
    listener: str,
    curves: list[Curve],
    how: Adaptation,
    keep_curves: bool = False,
) -> ListenerResult | None:
    """The DEAM authors' test protocol for one listener (dsaml.md, 'Data').

    For each of the listener's curves longer than ``seq_len + min_query_steps - 1`` steps (``how``): the
    model is adapted on the curve's first ``seq_len`` steps (30 s) and scored on the rest of that
    song. Curves too short to leave a query are skipped.

    Returns:
        ListenerResult (``support`` lists "song[first N steps]"), or None when no curve is long enough.
    """
    seq_len, hop = how.seq_len, how.hop
    device = next(model.parameters()).device
    model.eval()
    per_song: dict[str, dict] = {c: {} for c in CONDITIONS}
    kept: dict[str, dict] = {c: {} for c in (*CONDITIONS, "ratings")}
    support_names = []
    for c in curves:
        if c.n_steps < seq_len + how.min_query_steps:
            continue
        support = Curve(c.song_id, c.annotator_id, c.start_step, c.values[:seq_len])
        query = Curve(c.song_id, c.annotator_id, c.start_step + seq_len, c.values[seq_len:])
        params, _ = adapt(model, support_batch([support], features, seq_len, device), support_loss_fn(how.loss_fn),
                          how.inner_steps, how.inner_lr)
        offset = support_offset(model, features, [support], seq_len, hop)
        _score_query(model, dataset, features, listener, query, params, seq_len, hop, per_song, kept, keep_curves, offset)
        support_names.append(f"{c.song_id}[first {seq_len} steps]")
    if not support_names:
        return None
    return ListenerResult(listener, support_names, per_song, kept)


def _score_query(model, dataset: Dataset, features: dict, listener: str, q: Curve, params: Params, seq_len: int, hop: int,
                 per_song: dict, kept: dict, keep_curves: bool, offset: np.ndarray | None = None) -> None:
    """Predict one query curve (generic, personalized, offset; consensus and oracle when known) and score it."""
    f = features[q.song_id]
    preds = {
        "generic": predict_curve(model, f, q, seq_len, hop),
        "personalized": predict_curve(model, f, q, seq_len, hop, params),
    }
    if offset is not None:
        preds["offset"] = preds["generic"] + offset
    # the consensus as a prediction of a listener's ratings (not of itself: PMEmo's only "listener")
    if dataset.consensus and q.song_id in dataset.consensus and listener != "consensus" and _covers(dataset.consensus[q.song_id], q):
        preds["consensus"] = _aligned(dataset.consensus[q.song_id], q)
    if dataset.oracle and (listener, q.song_id) in dataset.oracle:
        preds["oracle"] = _aligned(dataset.oracle[(listener, q.song_id)], q)
    for cond, p in preds.items():
        per_song[cond][q.song_id] = song_metrics(p, q.values)
        if keep_curves:
            kept[cond][q.song_id] = p
    if keep_curves:
        kept["ratings"][q.song_id] = q.values


def _covers(reference: Curve, target: Curve) -> bool:
    return reference.start_step <= target.start_step and target.end_step <= reference.end_step


def _aligned(reference: Curve, target: Curve) -> np.ndarray:
    """``reference``'s values on ``target``'s steps (they must cover them)."""
    off = target.start_step - reference.start_step
    if off < 0 or off + target.n_steps > reference.n_steps:
        raise ValueError(f"reference curve of {reference.song_id!r} does not cover the rated steps")
    return reference.values[off : off + target.n_steps]


def summarize(results: list[ListenerResult]) -> dict[str, dict[str, float]]:
    """Average metrics per condition over every (listener, query song)."""
    out = {}
    for cond in CONDITIONS:
        songs = [m for r in results for m in r.per_song[cond].values()]
        if songs:
            out[cond] = average(songs)
    return out


def paired_gain(results: list[ListenerResult], metric: str = "ccc_mean", n_boot: int = 10000, seed: int = 0) -> dict:
    """Personalized minus generic, per listener (mean over their query songs), then over listeners.

    The listener is the unit of the bootstrap (query songs of one listener are not independent).

    Returns:
        {"mean", "ci95": [lo, hi], "listeners_improved", "listeners"}; empty when undefined.
    """
    gains = []
    for r in results:
        g, p = r.per_song["generic"], r.per_song["personalized"]
        songs = [s for s in g if s in p and np.isfinite(g[s][metric]) and np.isfinite(p[s][metric])]
        if songs:
            gains.append(np.mean([p[s][metric] - g[s][metric] for s in songs]))
    if not gains:
        return {}
    gains = np.asarray(gains)
    rng = np.random.default_rng(seed)
    boot = gains[rng.integers(0, len(gains), size=(n_boot, len(gains)))].mean(1)
    return {
        "metric": metric,
        "mean": float(gains.mean()),
        "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))],
        "listeners_improved": int((gains > 0).sum()),
        "listeners": int(len(gains)),
    }


def format_table(summary: dict[str, dict[str, float]], title: str = "") -> str:
    """A Markdown table: one row per condition."""
    cols = ["ccc_mean", "ccc_arousal", "ccc_valence", "pcc_arousal", "pcc_valence", "rmse_arousal", "rmse_valence"]
    head = "| condition | " + " | ".join(c.replace("_", " ") for c in cols) + " | songs |"
    lines = [f"**{title}**", ""] if title else []
    lines += [head, "|" + "---|" * (len(cols) + 2)]
    for cond, m in summary.items():
        cells = " | ".join(f"{m[c]:.3f}" for c in cols)
        lines.append(f"| {cond} | {cells} | {m['n_songs']} |")
    return "\n".join(lines)


def plot_listener(result: ListenerResult, path, song_id: str | None = None) -> str:
    """PNG of one listener's query song: ratings, generic, personalized (and oracle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    song_id = song_id or sorted(result.curves["ratings"])[0]
    ratings = result.curves["ratings"][song_id]
    t = np.arange(len(ratings)) * 0.5
    fig, axes = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True)
    styles = {"ratings": ("k", "-", 1.6), "generic": ("tab:blue", "-", 1.2), "personalized": ("tab:red", "-", 1.4), "oracle": ("tab:green", "--", 1.0)}
    for c, label in enumerate(("arousal", "valence")):
        ax = axes[c]
        for cond, (color, ls, lw) in styles.items():
            curves = result.curves.get(cond, {})
            if song_id in curves:
                ax.plot(t, curves[song_id][:, c], color=color, ls=ls, lw=lw, label=cond)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"listener {result.listener}, query song {song_id} (support: {', '.join(result.support)})")
    axes[1].set_xlabel("seconds from the first rating")
    axes[0].legend(loc="upper right", fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return song_id
