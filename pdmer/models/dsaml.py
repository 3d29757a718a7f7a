"""The DSAML network: dual-scale features -> dual-scale attention transformer -> BiLSTM head.

Follows ``../shared/docs/dsaml.md`` ("Model"; the method's specification, beside the repository).
All sizes come from :class:`pdmer.config.ModelConfig`; ``size: paper`` gives the authors' 1024-wide,
3-layer, 16-head model (about 30 M parameters).

Attention is written out explicitly (no ``scaled_dot_product_attention``): MAML's
second-order gradients need double backward, which SDPA lacks on the CPU, and the
diagonal attention loss needs the maps anyway.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pdmer.config import ModelConfig

PATCH_FRAMES, PATCH_BANDS = 51, 128
# DSAML.fit_skip's schedule (measured on VGMIDI round 1: the fit, and the validation listeners'
# scores, change little between 500 and 3000 steps or between 256 and 512 units; a few seconds)
SKIP_FIT_STEPS, SKIP_FIT_BATCH, SKIP_FIT_LR = 1500, 1024, 1e-3
MASK_VALUE = -1e4  # added to masked attention scores (BERT's convention)


@dataclass
class Output:
    """Model output.

    Attributes:
        pred: (B, T, 2) arousal, valence.
        attn_local: (B, T, T) last-layer attention of the local pass, averaged over heads
            (None when local attention is ablated).
        attn_global: (B, T, T) same for the global pass.
    """

    pred: Tensor
    attn_local: Tensor | None
    attn_global: Tensor | None


class TaskBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same names and state) that can leave its running statistics alone.

    With ``frozen_stats`` set (see :func:`pdmer.meta.maml.tasks_batched`) a training-mode forward
    normalises with the batch statistics, as usual, but does not update the running ones: under
    ``torch.func.vmap`` over tasks, one shared running mean cannot take a different update per task.
    (The layer is always affine with running statistics here.)
    """

    frozen_stats: bool = False
    decomposed: bool = False

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.weight.dtype)  # under bf16 autocast: normalise in fp32 (its backward needs matching dtypes)
        if not (self.training and self.frozen_stats):
            return super().forward(x)
        if not (self.decomposed or torch.is_autocast_enabled(x.device.type)):  # see TaskLayerNorm
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        # batch statistics from elementary ops: like layer norm (TaskLayerNorm), the fused kernel's
        # double backward under vmap with per-task weights is wrong in torch 2.14 (second order only)
        mean = x.mean((0, 2, 3), keepdim=True)
        var = (x - mean).square().mean((0, 2, 3), keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight[:, None, None] + self.bias[:, None, None]


class TaskLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same names and state) with a written-out path for batched tasks.

    With ``decomposed`` set (:func:`pdmer.meta.maml.tasks_batched`) the normalisation is computed
    from elementary ops. Reason: with per-task weights under ``vmap(grad(...))``, torch 2.14's fused
    layer-norm gives wrong second-order gradients w.r.t. the layer's input (off by tens of percent
    against finite differences; first order is right), which second-order MAML needs.
    ``tests/test_batched_tasks.py`` guards it. First order does not need it (the fused kernel is
    faster), so only second-order batched MAML sets it.
    """

    decomposed: bool = False
    in_vmap: bool = False

    def forward(self, x: Tensor) -> Tensor:
        # under vmap with bf16 autocast the fused kernel's backward fails on mixed dtypes
        if not (self.decomposed or (self.in_vmap and torch.is_autocast_enabled(x.device.type))):
            return super().forward(x)
        x = x.to(self.weight.dtype)  # fp32 statistics under bf16 autocast, as the fused kernel keeps them
        dims = tuple(range(-len(self.normalized_shape), 0))
        mean = x.mean(dims, keepdim=True)
        var = (x - mean).square().mean(dims, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.elementwise_affine else y


class BiLSTM(nn.LSTM):
    """One-layer bidirectional, batch-first ``nn.LSTM`` with an unrolled path for ``vmap``.

    Parameters and state dict are ``nn.LSTM``'s, so weights are interchangeable. Normally the
    forward is ``nn.LSTM``'s (fused kernels, cuDNN on the GPU). With ``unrolled`` set it runs a
    written-out recurrence (both directions in one batched matmul per step): ``nn.LSTM`` under
    ``vmap`` with per-task weights falls back to a slow per-sample loop on the CPU and fails with
    cuDNN (``../shared/docs/performance.md``), while this path is plain tensor algebra that vmap batches.
    """

    unrolled: bool = False

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__(input_size, hidden_size, batch_first=True, bidirectional=True)

    def forward(self, x: Tensor, hx=None):
        if not self.unrolled or hx is not None:
            return super().forward(x, hx)
        B, T, _ = x.shape
        H = self.hidden_size
        w_ih = torch.stack([self.weight_ih_l0, self.weight_ih_l0_reverse])  # (2, 4H, I)
        w_hh_t = torch.stack([self.weight_hh_l0, self.weight_hh_l0_reverse]).transpose(1, 2)  # (2, H, 4H)
        bias = torch.stack([self.bias_ih_l0 + self.bias_hh_l0, self.bias_ih_l0_reverse + self.bias_hh_l0_reverse])
        xs = torch.stack([x, x.flip(1)])  # (2, B, T, I): the reverse direction reads the sequence backwards
        gates_x = torch.einsum("dbti,dgi->dbtg", xs, w_ih) + bias[:, None, None]  # (2, B, T, 4H)
        h = c = x.new_zeros(2, B, H)
        outs = []
        for t in range(T):
            gates = gates_x[:, :, t] + torch.bmm(h, w_hh_t)  # (2, B, 4H), gate order i, f, g, o
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h)
        out = torch.stack(outs, dim=2)  # (2, B, T, H)
        return torch.cat([out[0], out[1].flip(1)], dim=-1), None  # (B, T, 2H)


class SpectrogramCNN(nn.Module):
    """Local branch: one 51 x 128 log-Mel patch -> 476 values (dsaml.md, 'Model' 1).

    With ``pool=(pt, pf)`` the patch is first average-pooled by pt frames x pf bands
    (the small size's speed trade-off); (1, 1) is the paper's network.
    """

    def __init__(self, pool: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool) if pool != (1, 1) else nn.Identity()
        # conv, norm, ReLU, max-pool as in the paper, with the pooling before the ReLU: the same
        # function (both are monotone; max-pooling pads with -inf), the ReLU on a quarter of the values
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=(3, 1), padding=(2, 1)),
            TaskBatchNorm2d(8),
            nn.MaxPool2d(2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            TaskBatchNorm2d(16),
            nn.MaxPool2d(2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 1, kernel_size=1),
        )
        with torch.no_grad():
            self.out_dim = self.forward(torch.zeros(2, PATCH_FRAMES, PATCH_BANDS)).shape[1]

    channels_last: bool = False  # set by :func:`channels_last_cnn`

    def forward(self, patches: Tensor) -> Tensor:
        """(N, 51, 128) -> (N, out_dim); out_dim = 476 (14 x 34) without pooling."""
        x = self.pool(patches.unsqueeze(1))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).flatten(1)  # (N, out_dim), from (N, 1, 14, 34) without pooling


@contextlib.contextmanager
def channels_last_cnn(model: nn.Module):
    """Run the local branch's CNN in the channels-last layout inside the block, on the CPU.

    Evaluation on 2 CPU cores is about a fifth faster (its max-pooling and convolutions; the
    sliding-window predictions of every listener). Weights keep their values and objects (the
    optimiser's references hold) and return to the usual layout afterwards, so training is
    unchanged; the predictions differ from the usual layout's in float rounding only. Elsewhere
    (a GPU, a model without the CNN) it does nothing.
    """
    cnn = getattr(model, "cnn", None)
    if not isinstance(cnn, SpectrogramCNN) or next(cnn.parameters()).device.type != "cpu" or cnn.channels_last:
        yield model
        return
    cnn.to(memory_format=torch.channels_last)
    cnn.channels_last = True
    try:
        yield model
    finally:
        cnn.channels_last = False
        cnn.to(memory_format=torch.contiguous_format)


def band_mask(T: int, window: int, device: torch.device | str | None = None) -> Tensor:
    """Additive (T, T) mask: 0 where |i - j| <= window, MASK_VALUE elsewhere."""
    idx = torch.arange(T, device=device)
    far = (idx[:, None] - idx[None, :]).abs() > window
    return torch.zeros(T, T, device=device).masked_fill(far, MASK_VALUE)


class RelativeSelfAttention(nn.Module):
    """Multi-head self-attention with BERT's "relative_key" position scores.

    score(i, j) = (q_i . k_j + q_i . r_{clip(i - j)}) / sqrt(d_head), where r is a learned
    table over distances clipped to [-max_distance, max_distance].
    """

    def __init__(self, hidden: int, heads: int, dropout: float, max_distance: int) -> None:
        super().__init__()
        self.heads, self.d_head = heads, hidden // heads
        self.max_distance = max_distance
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.distance_embedding = nn.Embedding(2 * max_distance + 1, self.d_head)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, mask: Tensor, distance_index: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B, T, H), mask: (T, T) additive, distance_index: (T, T) long -> (B, T, H), (B, heads, T, T)."""
        B, T, H = x.shape
        q = self.query(x).view(B, T, self.heads, self.d_head).transpose(1, 2)  # (B, h, T, d)
        k = self.key(x).view(B, T, self.heads, self.d_head).transpose(1, 2)  # (B, h, T, d)
        v = self.value(x).view(B, T, self.heads, self.d_head).transpose(1, 2)  # (B, h, T, d)
        rel = self.distance_embedding(distance_index)  # (T, T, d)
        scores = q @ k.transpose(-1, -2)  # (B, h, T, T)
        scores = scores + torch.einsum("bhid,ijd->bhij", q, rel)
        scores = scores / math.sqrt(self.d_head) + mask
        probs = scores.softmax(dim=-1)  # (B, h, T, T)
        ctx = self.dropout(probs) @ v  # (B, h, T, d)
        ctx = ctx.transpose(1, 2).reshape(B, T, H)  # (B, T, H)
        return ctx, probs


class EncoderLayer(nn.Module):
    """BERT-style post-LayerNorm transformer layer."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = RelativeSelfAttention(cfg.hidden, cfg.heads, cfg.dropout, cfg.global_window)
        self.attn_out = nn.Linear(cfg.hidden, cfg.hidden)
        self.attn_norm = TaskLayerNorm(cfg.hidden, eps=1e-12)
        self.ff_in = nn.Linear(cfg.hidden, cfg.ff)
        self.ff_out = nn.Linear(cfg.ff, cfg.hidden)
        self.ff_norm = TaskLayerNorm(cfg.hidden, eps=1e-12)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Tensor, distance_index: Tensor) -> tuple[Tensor, Tensor]:
        ctx, probs = self.attention(x, mask, distance_index)
        x = self.attn_norm(x + self.dropout(self.attn_out(ctx)))
        x = self.ff_norm(x + self.dropout(self.ff_out(F.gelu(self.ff_in(x)))))
        return x, probs


class DualScaleEncoder(nn.Module):
    """One encoder, run once with the local band mask and once with the global one.

    Band masks and the distance-index table are cached per (T, device), so they are
    built once per sequence length rather than at every forward.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self._cache: dict[tuple[int, str], tuple[Tensor, Tensor, Tensor]] = {}

    def tables(self, T: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        key = (T, str(device))
        if key not in self._cache:
            idx = torch.arange(T, device=device)
            dist = (idx[:, None] - idx[None, :]).clamp(-self.cfg.global_window, self.cfg.global_window)
            dist = dist + self.cfg.global_window  # (T, T) in [0, 2 * global_window]
            self._cache[key] = (
                band_mask(T, self.cfg.local_window, device),
                band_mask(T, self.cfg.global_window, device),
                dist,
            )
        return self._cache[key]

    def run(self, x: Tensor, mask: Tensor, dist: Tensor) -> tuple[Tensor, Tensor]:
        probs = None
        for layer in self.layers:
            x, probs = layer(x, mask, dist)
        return x, probs.mean(dim=1)  # (B, T, H), last-layer map averaged over heads (B, T, T)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        local_mask, global_mask, dist = self.tables(x.shape[1], x.device)
        out = 0.0
        attn_local = attn_global = None
        if self.cfg.use_local_attention:
            y, attn_local = self.run(x, local_mask, dist)
            out = out + y
        if self.cfg.use_global_attention:
            y, attn_global = self.run(x, global_mask, dist)
            out = out + y
        return torch.sigmoid(out), attn_local, attn_global


class DSAML(nn.Module):
    """Dual-scale attention model for dynamic music emotion recognition.

    Args:
        cfg: model sizes and ablation switches.
        global_dim: width of the global-scale input (descriptor or user embeddings).

    Shapes:
        local: (B, T, 51, 128) log-Mel patches (any float dtype); global_: (B, T, G).
        Output.pred: (B, T, 2) = (arousal, valence) per step.
    """

    def __init__(self, cfg: ModelConfig, global_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.global_dim = global_dim
        H = cfg.hidden
        # input standardisation, fitted on training songs (see `fit_input_stats`) and saved with the weights
        self.register_buffer("local_mean", torch.zeros(()))
        self.register_buffer("local_std", torch.ones(()))
        self.register_buffer("global_mean", torch.zeros(global_dim))
        self.register_buffer("global_std", torch.ones(global_dim))
        if cfg.use_local_branch:
            self.cnn = SpectrogramCNN((cfg.local_pool_time, cfg.local_pool_freq))
            self.local_proj = nn.Linear(self.cnn.out_dim, H)
        self.global_proj = nn.Linear(global_dim, H)
        self.fusion = nn.Linear(H, H)
        self.encoder = DualScaleEncoder(cfg)
        self.lstm = BiLSTM(H, cfg.lstm_hidden)
        self.head = nn.Sequential(
            nn.Linear(2 * cfg.lstm_hidden, cfg.head_hidden),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.head_hidden, 2),
        )
        if cfg.linear_skip:  # a probe of the global features, added to the output (init_linear_skip, fit_skip)
            if cfg.skip_hidden:
                h = cfg.skip_hidden
                self.skip = nn.Sequential(
                    nn.Linear(global_dim, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 2)
                )
            else:
                self.skip = nn.Linear(global_dim, 2)

    @torch.no_grad()
    def fit_input_stats(self, local: Tensor, global_: Tensor) -> None:
        """Set the input standardisation from training data: local (N, 51, 128), global_ (N, G)."""
        self.local_mean.copy_(local.float().mean())
        self.local_std.copy_(local.float().std().clamp_min(1e-3))
        self.global_mean.copy_(global_.float().mean(0))
        self.global_std.copy_(global_.float().std(0).clamp_min(1e-3))

    @torch.no_grad()
    def init_linear_skip(self, coef: Tensor, bias: Tensor, mean: Tensor, std: Tensor) -> None:
        """Start the skip path at a ridge probe ``y = ((x - mean) / std) @ coef + bias`` (on raw global features
        ``x``), expressed on the model's own standardised inputs, and the network's output layer at zero:
        training starts from the probe and learns what it misses."""
        scale = self.global_std / std  # (G,)
        self.skip.weight.copy_((scale[:, None] * coef).T)
        self.skip.bias.copy_(((self.global_mean - mean) / std) @ coef + bias)
        self.head[-1].weight.zero_()
        self.head[-1].bias.zero_()

    def fit_skip(self, global_: Tensor, target: Tensor, steps: int = SKIP_FIT_STEPS, seed: int = 0) -> float:
        """Fit the MLP skip path (``model.skip_hidden`` > 0) to per-step targets, and the network's output
        layer at zero: training starts from this probe and learns what it misses.

        Args:
            global_: (N, G) raw global features of every training step.
            target: (N, 2) the training listeners' average curve on those steps.
            steps: Adam steps on minibatches of :data:`SKIP_FIT_BATCH` steps (MSE).
            seed: the minibatches' and the initialisation's seed.

        Returns:
            the RMSE of the fitted probe on all ``N`` steps.
        """
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.skip:
                if isinstance(m, nn.Linear):
                    bound = 1 / math.sqrt(m.in_features)
                    m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=gen))
                    m.bias.copy_(torch.empty_like(m.bias).uniform_(-bound, bound, generator=gen))
            self.head[-1].weight.zero_()
            self.head[-1].bias.zero_()
            x = ((global_.float() - self.global_mean) / self.global_std).to(self.global_mean.device)
            y = target.float().to(x.device)
        opt = torch.optim.Adam(self.skip.parameters(), lr=SKIP_FIT_LR)
        for _ in range(steps):
            idx = torch.randint(0, len(x), (min(SKIP_FIT_BATCH, len(x)),), generator=gen).to(x.device)
            loss = F.mse_loss(self.skip(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            return float(F.mse_loss(self.skip(x), y).sqrt())

    def forward(self, local: Tensor, global_: Tensor) -> Output:
        return self.sequence(*self.steps(local, global_))

    def steps(self, local: Tensor, global_: Tensor) -> tuple[Tensor, Tensor]:
        """The per-step part of the forward: each step's fused embedding (B, T, H) and its standardised
        global input (B, T, G), each from that step's inputs alone (in eval mode; in training the batch
        norm's statistics mix the steps of a batch). Sliding windows that overlap compute it once per
        step (:func:`pdmer.evaluation.inference.predict_steps`) and run only :meth:`sequence` per window."""
        B, T = global_.shape[:2]
        g = (global_.to(self.global_mean.dtype) - self.global_mean) / self.global_std
        z = self.global_proj(g)  # (B, T, H)
        if self.cfg.use_local_branch:
            x = (local.to(self.local_mean.dtype) - self.local_mean) / self.local_std
            x = self.cnn(x.reshape(B * T, PATCH_FRAMES, PATCH_BANDS))  # (B*T, cnn.out_dim)
            z = z + self.local_proj(x).view(B, T, -1)  # (B, T, H)
        return self.fusion(torch.sigmoid(z)), g  # (B, T, H), (B, T, G)

    def sequence(self, z: Tensor, g: Tensor) -> Output:
        """The rest of the forward, over a sequence of :meth:`steps` outputs: attention, LSTM, head."""
        h, attn_local, attn_global = self.encoder(z)
        with torch.autocast(h.device.type, enabled=False):  # the recurrence and the output layer stay fp32
            h, _ = self.lstm(h.to(self.head[0].weight.dtype))  # (B, T, 2 * lstm_hidden)
            pred = self.head(h)
            if self.cfg.linear_skip:
                pred = pred + self.skip(g.to(pred.dtype))
        return Output(pred, attn_local, attn_global)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
