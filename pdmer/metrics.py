"""Per-song metrics (RMSE, PCC, CCC for arousal and valence) and the DSAML training loss.

Metrics are computed per song (per sequence) and then averaged over songs, never pooled
over frames (dsaml.md, 'Loss and metrics').
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pdmer.data.types import LABELS

METRICS = ("rmse", "pcc", "ccc")


def song_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Metrics of one song.

    Args:
        pred, target: (T, 2) arrays, columns (arousal, valence).

    Returns:
        ``{"rmse_arousal": ..., "pcc_arousal": ..., "ccc_arousal": ..., ... valence, "ccc_mean": ...}``.
        PCC is NaN when either curve is constant (undefined); CCC stays defined.
    """
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != 2:
        raise ValueError(f"pred {pred.shape} and target {target.shape} must both be (T, 2)")
    out = {}
    for c, label in enumerate(LABELS):
        rmse, pcc, ccc = row_metrics(pred[None, :, c], target[:, c])
        out[f"rmse_{label}"], out[f"pcc_{label}"], out[f"ccc_{label}"] = float(rmse[0]), float(pcc[0]), float(ccc[0])
    out["ccc_mean"] = (out["ccc_arousal"] + out["ccc_valence"]) / 2
    return out


def row_metrics(p: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(RMSE, PCC, CCC) of each row of ``p`` (G, T) against one target curve ``t`` (T,), each (G,).

    Population moments (``ddof=0``); PCC is NaN where either curve is constant, CCC where both are
    constant and equal (no spread and no bias: undefined)."""
    sp, st = p.std(1), t.std()
    cov = np.mean((p - p.mean(1, keepdims=True)) * (t - t.mean()), 1)
    denom = sp**2 + st**2 + (p.mean(1) - t.mean()) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        pcc = np.where((sp > 0) & (st > 0), cov / (sp * st), np.nan)
        ccc = np.where(denom > 0, 2 * cov / denom, np.nan)
    return np.sqrt(np.mean((p - t) ** 2, 1)), pcc, ccc


def average(per_song: list[dict[str, float]]) -> dict[str, float]:
    """Mean over songs of each metric (NaNs skipped), plus ``ccc_mean`` and the song count."""
    if not per_song:
        return {}
    keys = per_song[0].keys()
    out = {
        k: float(np.nanmean([m[k] for m in per_song])) if any(np.isfinite(m[k]) for m in per_song) else float("nan")
        for k in keys
    }
    out["ccc_mean"] = (out["ccc_arousal"] + out["ccc_valence"]) / 2
    out["n_songs"] = len(per_song)
    return out


def batch_terms(pred: Tensor, target: Tensor, eps: float = 1e-8) -> dict[str, Tensor]:
    """Differentiable per-sequence RMSE, PCC, CCC.

    Args:
        pred, target: (B, T, 2).

    Returns:
        dict of (B, 2) tensors, keys "rmse", "pcc", "ccc".
    """
    pm, tm = pred.mean(1, keepdim=True), target.mean(1, keepdim=True)
    pc, tc = pred - pm, target - tm  # (B, T, 2)
    cov = (pc * tc).mean(1)  # (B, 2)
    pv, tv = (pc**2).mean(1), (tc**2).mean(1)  # (B, 2)
    rmse = ((pred - target) ** 2).mean(1).add(eps).sqrt()
    pcc = cov / (pv * tv + eps**2).sqrt().clamp_min(eps)  # finite gradient where a curve is constant
    ccc = 2 * cov / (pv + tv + (pm - tm).squeeze(1) ** 2 + eps)
    return {"rmse": rmse, "pcc": pcc, "ccc": ccc}


def emotion_loss(
    pred: Tensor, target: Tensor, flat_std: float = 0.0, weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> Tensor:
    """1 - mean(CCC, PCC, 1 - RMSE) over arousal and valence, per sequence, averaged over the batch.

    ``flat_std`` > 0: where a sequence's target barely moves (its std over the sequence below
    ``flat_std``), its PCC is undefined (as in :func:`song_metrics`) and its CCC says nothing
    about movement: those two terms are replaced by ``1 - RMSE`` for that (sequence, dimension),
    so a listener who rests the slider teaches the level only, not noise correlations.
    ``weights`` (CCC, PCC, 1 - RMSE): the terms' weights (the paper's loss: equal).
    """
    t = batch_terms(pred, target)
    fit = 1 - t["rmse"]  # (B, 2)
    ccc, pcc = t["ccc"], t["pcc"]
    if flat_std > 0:
        flat = target.std(1, unbiased=False) < flat_std  # (B, 2)
        ccc, pcc = torch.where(flat, fit, ccc), torch.where(flat, fit, pcc)
    wc, wp, wf = weights
    score = (wc * ccc + wp * pcc + wf * fit) / (wc + wp + wf)  # (B, 2)
    return 1 - score.mean()


def attention_loss(
    attn_local: Tensor | None, attn_global: Tensor | None, local_target: float = 0.9, global_target: float = 0.1
) -> Tensor:
    """MSE of the batch-averaged last-layer attention diagonals against 0.9 (local) and 0.1 (global)."""
    loss = torch.zeros(())
    if attn_local is not None:
        loss = loss.to(attn_local) + ((attn_local.mean(0).diagonal() - local_target) ** 2).mean()
    if attn_global is not None:
        loss = loss.to(attn_global) + ((attn_global.mean(0).diagonal() - global_target) ** 2).mean()
    return loss
