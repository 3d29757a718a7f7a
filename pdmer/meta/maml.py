"""MAML written on ``torch.func`` (functional_call + autograd.grad), first- and second-order.

Semantics follow learn2learn's ``MAML(first_order=...)``: the inner loop takes
``inner_steps`` plain SGD steps ``theta_i <- theta_i - inner_lr * grad`` on the support
set; the query loss at the adapted parameters is differentiated w.r.t. the initial
parameters. Second-order keeps the graph of the inner gradients (``create_graph=True``);
first-order treats them as constants, so the meta-gradient is the query gradient at the
adapted parameters.

Two ways to run a meta-batch, with the same gradients (``tests/test_maml.py`` checks it):

- :func:`meta_step`: tasks one after another (``meta.batch_tasks: false``), the reference;
- :func:`meta_step_batched`: the tasks of a meta-batch (or chunks of ``meta.task_chunk`` of
  them) adapted together: per-task parameters carry a leading task axis and every inner
  step is one ``torch.func.vmap`` over ``torch.func.grad`` of the task loss.

Nothing here calls ``.item()``: inner losses are returned as a tensor so the caller can
sync once per meta-batch.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

Params = dict[str, Tensor]
LR_PREFIX = "inner_log_lr."  # learned per-tensor inner learning rates (MAML++ "LSLR"), never adapted
# loss(model, params, buffers, batch) -> scalar tensor
TaskLoss = Callable[[nn.Module, Params, Params, tuple], Tensor]


def split_state(model: nn.Module) -> tuple[Params, Params]:
    """The parameters that adaptation changes (live leaves) and everything else the forward needs.

    Learned inner learning rates (``inner_log_lr.*``) are passed with the buffers: they set the
    inner loop's step sizes and are meta-learned, but never adapted themselves.
    """
    params, buffers = {}, dict(model.named_buffers())
    for k, p in model.named_parameters():
        if k.startswith(LR_PREFIX):
            buffers[k] = p
        elif p.requires_grad:
            params[k] = p
    return params, buffers


def _safe(name: str) -> str:
    return name.replace(".", "__")


def attach_inner_lrs(model: nn.Module, init_lr: float) -> None:
    """Give ``model`` one learnable log learning rate per parameter tensor (MAML++'s LSLR).

    They are registered as ``model.inner_log_lr`` so they are saved with the weights and
    optimised by the outer loop; :func:`inner_loop` uses them instead of a fixed rate.
    """
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad and not k.startswith(LR_PREFIX)]
    model.inner_log_lr = nn.ParameterDict(
        {_safe(k): nn.Parameter(torch.tensor(float(init_lr), dtype=p.dtype, device=p.device).log()) for k, p in named}
    )


def step_sizes(buffers: Params, params: Params, lr: float) -> dict[str, Tensor | float]:
    """Per-parameter inner step sizes: learned ones when the model has them, else ``lr``."""
    return {k: buffers[LR_PREFIX + _safe(k)].exp() if LR_PREFIX + _safe(k) in buffers else lr for k in params}


def call(model: nn.Module, params: Params, buffers: Params, *args, **kwargs):
    """``model(*args)`` with ``params`` and ``buffers`` swapped in."""
    return functional_call(model, (params, buffers), args, kwargs)


class _Method(nn.Module):
    """``module.<name>`` as a module's forward, so ``functional_call`` can swap weights in for it."""

    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module = module
        self.name = name

    def forward(self, *args, **kwargs):
        return getattr(self.module, self.name)(*args, **kwargs)


def call_method(model: nn.Module, name: str, params: Params | None, buffers: Params, *args, **kwargs):
    """``model.<name>(*args)`` with ``params`` and ``buffers`` swapped in (None: the model's own weights)."""
    if params is None:
        return getattr(model, name)(*args, **kwargs)
    state = {f"module.{k}": v for d in (params, buffers) for k, v in d.items()}
    return functional_call(_Method(model, name), state, args, kwargs)


def inner_loop(
    model: nn.Module,
    params: Params,
    buffers: Params,
    support: tuple,
    loss_fn: TaskLoss,
    steps: int,
    lr: float,
    first_order: bool,
) -> tuple[Params, Tensor]:
    """Adapt ``params`` to one task's support set.

    Args:
        model: the network (its own parameters are not modified).
        params: starting parameters; must require grad.
        buffers: buffers (BatchNorm running statistics), passed through.
        support: the support batch handed to ``loss_fn``.
        loss_fn: task loss.
        steps: number of SGD steps.
        lr: inner learning rate (ignored for tensors with a learned rate, see attach_inner_lrs).
        first_order: if False, keep the graph of each inner gradient (second-order MAML).

    Returns:
        (adapted params, (steps,) detached inner losses before each step).
    """
    losses = []
    rates = step_sizes(buffers, params, lr)
    for _ in range(steps):
        loss = loss_fn(model, params, buffers, support)
        grads = torch.autograd.grad(loss, tuple(params.values()), create_graph=not first_order, allow_unused=True)
        params = {k: (p if g is None else p - rates[k] * g) for (k, p), g in zip(params.items(), grads, strict=True)}
        losses.append(loss.detach())
    if not losses:
        return params, torch.zeros(0)
    return params, torch.stack(losses)


def adapt(
    model: nn.Module,
    support: tuple,
    loss_fn: TaskLoss,
    steps: int,
    lr: float,
) -> tuple[Params, Tensor]:
    """Test-time adaptation: start from the model's weights, no meta-gradient kept.

    The returned parameters are detached; the model itself is left untouched.
    """
    params, buffers = split_state(model)
    buffers = {k: v.detach() for k, v in buffers.items()}
    start = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    # cuDNN's LSTM refuses a backward in eval mode: on the GPU the LSTM runs unrolled here
    cuda = any(p.is_cuda for p in params.values())
    with torch.enable_grad(), unrolled_lstm(model) if cuda else nullcontext():
        adapted, losses = inner_loop(model, start, buffers, support, loss_fn, steps, lr, first_order=True)
    return {k: p.detach() for k, p in adapted.items()}, losses


def meta_step(
    model: nn.Module,
    tasks: list[tuple[tuple, tuple]],
    loss_fn: TaskLoss,
    steps: int,
    lr: float,
    first_order: bool,
    generic_weight: float = 0.0,
) -> dict[str, Tensor]:
    """Accumulate the meta-gradient of a meta-batch into ``model``'s ``.grad`` fields.

    Each task's query loss is backpropagated as soon as it is computed (its graph is
    freed at once) and scaled by 1 / n_tasks, so ``.grad`` holds the task average.
    The caller zeroes gradients before and steps the optimiser after.

    Args:
        tasks: list of (support batch, query batch).
        generic_weight: adds ``generic_weight *`` the query loss of the un-adapted parameters
            (the generic model's) to each task's loss, so the meta-learned initialisation is
            also a good listener-blind model (``meta.generic_loss_weight``).

    Returns:
        {"query_loss": scalar, "inner_losses": (steps,)} averaged over tasks, detached.
    """
    params, buffers = split_state(model)
    n = len(tasks)
    query_total: Tensor | float = 0.0
    inner_total: Tensor | float = 0.0
    for support, query in tasks:
        adapted, inner = inner_loop(model, params, buffers, support, loss_fn, steps, lr, first_order)
        loss = loss_fn(model, adapted, buffers, query)
        total = loss + generic_weight * loss_fn(model, params, buffers, query) if generic_weight else loss
        (total / n).backward()
        query_total = query_total + loss.detach()  # stays on the device: no host sync per task
        inner_total = inner_total + inner
    return {"query_loss": query_total / n, "inner_losses": inner_total / n}


@contextmanager
def _flags(model: nn.Module, flags: tuple[str, ...]) -> Iterator[None]:
    touched = []
    for m in model.modules():
        for flag in flags:
            if hasattr(type(m), flag):
                touched.append((m, flag))
                setattr(m, flag, True)
    try:
        yield
    finally:
        for m, flag in touched:
            m.__dict__.pop(flag, None)  # back to the class default (False)


def unrolled_lstm(model: nn.Module):
    """Context: LSTMs that can (``BiLSTM``) run their written-out recurrence (no cuDNN)."""
    return _flags(model, ("unrolled",))


def tasks_batched(model: nn.Module, second_order: bool = True):
    """Switch ``model``'s modules to their vmap-safe paths for the duration of the block.

    Modules that declare ``unrolled`` (:class:`pdmer.models.dsaml.BiLSTM`) run their written-out
    recurrence; modules that declare ``frozen_stats`` (``TaskBatchNorm2d``) normalise with batch
    statistics without touching their running ones. With ``second_order``, norms that declare
    ``decomposed`` (``TaskLayerNorm``, ``TaskBatchNorm2d``) are computed from elementary ops, whose
    double backward under vmap is right (the fused kernels' is not, in torch 2.14).
    """
    return _flags(model, ("unrolled", "frozen_stats", "in_vmap") + (("decomposed",) if second_order else ()))


def stack_tasks(batches: list[tuple]) -> tuple:
    """Stack the per-task batches ``(local, global, target)`` along a new leading task axis."""
    return tuple(torch.stack(parts) for parts in zip(*batches, strict=True))


def batched_inner_loop(
    model: nn.Module,
    params: Params,
    buffers: Params,
    support: tuple,
    loss_fn: TaskLoss,
    steps: int,
    lr: float,
    first_order: bool,
) -> tuple[Params, Tensor]:
    """:func:`inner_loop` for ``m`` tasks at once; call it inside :func:`tasks_batched`.

    Args:
        params: shared starting parameters (no task axis).
        support: batch tensors with a leading task axis, ``(m, B, ...)`` (:func:`stack_tasks`).
        Other arguments as in :func:`inner_loop`.

    Returns:
        (adapted params with a leading task axis ``(m, ...)``, (m, steps) detached inner losses).
    """
    m = support[0].shape[0]
    rates = step_sizes(buffers, params, lr)

    def task_loss(p: Params, batch: tuple) -> Tensor:
        return loss_fn(model, p, buffers, batch)

    per_task = vmap(grad_and_value(task_loss), in_dims=(0, 0), randomness="different")
    fast = {k: p.unsqueeze(0).expand(m, *p.shape) for k, p in params.items()}
    losses = []
    for _ in range(steps):
        # first order: the inner gradient is a constant, so it is taken off the outer graph
        grads, loss = per_task({k: p.detach() for k, p in fast.items()} if first_order else fast, support)
        fast = {k: p - rates[k] * grads[k] for k, p in fast.items()}
        losses.append(loss.detach())
    inner = torch.stack(losses, dim=1) if losses else torch.zeros(m, 0)
    return fast, inner


def meta_step_batched(
    model: nn.Module,
    tasks: list[tuple[tuple, tuple]],
    loss_fn: TaskLoss,
    steps: int,
    lr: float,
    first_order: bool,
    chunk: int = 0,
    generic_weight: float = 0.0,
) -> dict[str, Tensor]:
    """:func:`meta_step` with the tasks adapted together (``meta.batch_tasks: true``).

    Same contract and the same meta-gradient as :func:`meta_step` (up to floating-point
    order). Every task's batches must have the same shapes (they do: fixed ``seq_len``,
    ``query_songs``). ``chunk`` > 0 processes that many tasks per vmap and frees each chunk's
    graph before the next (memory against speed); 0 takes the whole meta-batch at once.

    BatchNorm: inside the batched inner loops the layers normalise with batch statistics
    (as in training mode) but cannot update their running statistics per task; those are
    updated once per meta-batch afterwards, by a no-grad forward of the support songs at the
    meta-parameters (the sequential path updates them at every inner step instead).
    """
    params, buffers = split_state(model)
    n = len(tasks)
    chunk = n if chunk <= 0 else min(chunk, n)
    query_total: Tensor | float = 0.0
    inner_total: Tensor | float = 0.0
    with tasks_batched(model, second_order=not first_order):
        for i in range(0, n, chunk):
            part = tasks[i : i + chunk]
            support, query = stack_tasks([s for s, _ in part]), stack_tasks([q for _, q in part])
            adapted, inner = batched_inner_loop(model, params, buffers, support, loss_fn, steps, lr, first_order)
            losses = vmap(lambda p, b: loss_fn(model, p, buffers, b), randomness="different")(adapted, query)  # (m,)
            total = losses.sum()
            if generic_weight:
                generic = vmap(lambda b: loss_fn(model, params, buffers, b), randomness="different")(query)  # (m,)
                total = total + generic_weight * generic.sum()
            (total / n).backward()
            query_total = query_total + losses.detach().sum()
            inner_total = inner_total + inner.sum(0)
    if model.training and any(getattr(m, "track_running_stats", False) for m in model.modules()):
        with torch.no_grad():
            flat = tuple(t.flatten(0, 1) for t in stack_tasks([s for s, _ in tasks]))  # (n * B, ...)
            call(model, params, buffers, *flat[:-1])
    return {"query_loss": query_total / n, "inner_losses": inner_total / n}
