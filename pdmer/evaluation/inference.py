"""Inference by sliding windows: a whole song's curve from a model that sees ``seq_len`` steps at a time."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pdmer.data.types import Curve
from pdmer.meta.maml import Params, call_method, split_state
from pdmer.models.dsaml import channels_last_cnn

BATCH_STEPS = 1024  # steps per pass of the model's per-step part (its CNN): bounds memory


def window_starts(n: int, length: int, hop: int) -> list[int]:
    """Starts of windows of ``length`` covering ``range(n)``; the last one ends at n."""
    if n <= length:
        return [0]
    starts = list(range(0, n - length + 1, hop))
    if starts[-1] != n - length:
        starts.append(n - length)
    return starts


def blend_weights(length: int) -> torch.Tensor:
    """Overlap-add taper of a window of ``length`` steps: ``sin^2`` (never 0, peaks at the centre).

    At a hop of half the window the tapers of neighbouring windows sum to a constant, so each
    step is mostly predicted by the window where it is most central and window edges leave no
    seam (a model's prediction is least reliable at the edges of its context).
    """
    i = torch.arange(length, dtype=torch.float64)
    return torch.sin(torch.pi * (i + 0.5) / length) ** 2


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
    batch_steps: int = BATCH_STEPS,
) -> np.ndarray:
    """Predict steps ``[start, stop)`` of one song.

    Songs longer than ``seq_len`` are cut into windows of ``seq_len`` steps every ``hop``
    steps (the last window aligned to the end); each step's prediction is the weighted mean over
    the windows that contain it, the weights a taper that favours the window where the step is
    most central (:func:`blend_weights`), for arousal and valence alike. A span that fits in one
    window is predicted in one pass. The per-step part of the model (the CNN on each patch and the
    projections, :meth:`DSAML.steps`) runs once per step, not once per window that holds it: only
    the attention, the LSTM and the head see each window. Memory depends on ``seq_len``,
    ``batch_windows`` and ``batch_steps``, not on the song's length (the per-step embeddings, a
    few hundred bytes a step, are kept for the span).

    Args:
        model: a DSAML model (put in eval mode by the caller).
        feats: SongFeatures of the song.
        params: adapted parameters to swap in (None = the model's own).
        batch_windows: windows per pass of the sequence part.
        batch_steps: steps per pass of the per-step part (at most ``batch_windows * seq_len``).

    Returns:
        (stop - start, 2) float32 array, columns (arousal, valence).
    """
    n = stop - start
    length = min(seq_len, n)
    device = next(model.parameters()).device
    _, buffers = split_state(model)
    chunk_steps = max(1, min(batch_steps, batch_windows * length))
    z, g = [], []
    with channels_last_cnn(model):  # on the CPU the CNN runs channels-last: about a third faster
        if params is not None and device.type == "cpu":  # adapted kernels in the same layout
            params = {
                k: v.contiguous(memory_format=torch.channels_last) if v.ndim == 4 else v for k, v in params.items()
            }
        for i in range(start, stop, chunk_steps):
            j = min(i + chunk_steps, stop)
            zi, gi = call_method(
                model, "steps", params, buffers, feats.local[i:j][None].to(device), feats.global_[i:j][None].to(device)
            )
            z.append(zi[0])
            g.append(gi[0])
    z, g = torch.cat(z), torch.cat(g)  # (n, H), (n, G)
    total = torch.zeros(n, 2, dtype=torch.float64)
    weight = torch.zeros(n, 1, dtype=torch.float64)
    taper = blend_weights(length)[:, None]  # (L, 1)
    starts = window_starts(n, length, hop)
    for i in range(0, len(starts), batch_windows):
        chunk = starts[i : i + batch_windows]
        zw = torch.stack([z[s : s + length] for s in chunk])  # (W, L, H)
        gw = torch.stack([g[s : s + length] for s in chunk])  # (W, L, G)
        pred = call_method(model, "sequence", params, buffers, zw, gw).pred.double().cpu()  # (W, L, 2)
        for j, s in enumerate(chunk):
            total[s : s + length] += taper * pred[j]
            weight[s : s + length] += taper
    return (total / weight).float().numpy()


def predict_curve(model, feats, curve: Curve, seq_len: int, hop: int, params: Params | None = None) -> np.ndarray:
    return predict_steps(model, feats, curve.start_step, curve.end_step, seq_len, hop, params)
