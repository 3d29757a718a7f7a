"""Meta-training on several processes (``torchrun``): ranks, the explicit gradient all-reduce, barriers.

DDP's wrapper does not serve MAML (``torch.autograd.grad`` bypasses its hooks and it has no
double backward), so the meta-gradient is reduced by hand: the parameters are broadcast from
rank 0 once, every rank draws the whole meta-batch (the task sampler stays in step with a
one-process run's), computes the meta-gradient of its share of the tasks, the ``.grad`` tensors
are summed over the ranks, each weighted by its share, and divided by the task count; every rank
then takes the same optimiser step. Rank 0 alone writes the run folder, validates and tests.

Without torchrun's environment (``WORLD_SIZE`` unset or 1) every function here is a no-op that
leaves a one-process run bit-identical. gloo on the CPU, NCCL on CUDA (one GPU per process:
``cuda`` is the process's ``LOCAL_RANK`` device).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT = timedelta(hours=2)  # a collective waits this long (rank 0 validating or testing keeps the others waiting)


def requested() -> bool:
    """True when launched by torchrun (or by hand) with a world size above 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or a one-process run: the process that writes files."""
    return rank() == 0


def init(device: torch.device | str = "cpu") -> bool:
    """Join the process group torchrun's environment describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...).

    Idempotent; nothing happens without a world size above 1. On CUDA each process takes the GPU
    of its ``LOCAL_RANK``. Ranks other than 0 log warnings only (rank 0 logs for the run).

    Returns:
        True when running distributed.
    """
    if active():
        return True
    if not requested():
        return False
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)
    atexit.register(_shutdown)
    if not is_main():
        logging.getLogger("pdmer").setLevel(logging.WARNING)
    return True


def _shutdown() -> None:
    if active():
        dist.destroy_process_group()


def _device() -> torch.device:
    """Where collectives' tensors must be: the current GPU with NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes the data and feature caches), then the others."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of ``items`` (sizes differ by at most one)."""
    n, w, r = len(items), world_size(), rank()
    return list(items[r * n // w : (r + 1) * n // w])


def check_shardable(n_tasks: int) -> None:
    """Every rank needs at least one task of each meta-batch."""
    if world_size() > n_tasks:
        from pdmer.config import ConfigError

        raise ConfigError(
            f"meta.tasks_per_batch={n_tasks} is smaller than the {world_size()} processes: every process "
            f"needs at least one task; raise meta.tasks_per_batch or start fewer processes"
        )


def seed_step(seed: int, iteration: int) -> None:
    """Distributed only: reseed torch's RNG (dropout) from (seed, iteration, rank).

    Ranks then draw different dropout masks, and a resumed run the same ones as an uninterrupted
    run, without saving every rank's RNG. (A one-process run keeps its own RNG stream untouched.)
    """
    if active():
        torch.manual_seed((seed * 1_000_003 + iteration) * 1024 + rank())


def _grads(params: list[nn.Parameter]) -> tuple[torch.Tensor, torch.Tensor]:
    """All gradients in one flat buffer (zeros where None) and a 0/1 mask of which parameters have one."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    has = torch.tensor([float(p.grad is not None) for p in params], device=flat.device)
    return flat, has


def _set_grads(params: list[nn.Parameter], flat: torch.Tensor, has: torch.Tensor) -> None:
    i = 0
    for p, h in zip(params, has.tolist()):
        g = flat[i : i + p.numel()].view_as(p)
        i += p.numel()
        p.grad = g.to(p.dtype).clone() if h else None


def average_task_gradients(model: nn.Module, stats: dict, mine: int, total: int) -> dict:
    """Turn each rank's meta-gradient (an average over its ``mine`` tasks) into the average over all ``total``.

    ``sum over ranks (mine_r / total) * grad_r``: the generic consensus term, which every rank
    adds in full, keeps its weight (the shares sum to 1). ``stats``' ``query_loss`` and
    ``inner_losses`` are averaged the same way, so every rank logs and checks the same values.

    Returns:
        ``stats`` with the averaged losses (unchanged in a one-process run).
    """
    if not active():
        return stats
    dev = _device()
    params = [p for p in model.parameters() if p.requires_grad]
    flat, has = _grads(params)
    w = mine / total
    keys = [k for k in ("query_loss", "inner_losses") if k in stats]
    losses = [torch.as_tensor(stats[k]).detach().float().reshape(-1) for k in keys]
    packed = torch.cat([flat.float().to(dev) * w, *(x.to(dev) * w for x in losses)])
    dist.all_reduce(packed)
    has = has.to(dev)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    _set_grads(params, packed[: flat.numel()].to(flat.device), has)
    out, i = dict(stats), flat.numel()
    for k, x in zip(keys, losses):
        out[k] = packed[i : i + x.numel()].reshape(torch.as_tensor(stats[k]).shape).to(torch.as_tensor(stats[k]).device)
        i += x.numel()
    return out


def broadcast_gradients(model: nn.Module) -> None:
    """Rank 0's gradients and BatchNorm running statistics on every rank (DMER: every rank computed the same batch; this keeps them exactly equal)."""
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat, has = _grads(params)
    dev = _device()
    flat, has = flat.to(dev), has.to(dev)
    dist.broadcast(flat, 0)
    dist.broadcast(has, 0)
    _set_grads(params, flat, has)
    with torch.no_grad():
        for m in _norms(model):
            for t in (m.running_mean, m.running_var, m.num_batches_tracked):
                _broadcast_(t)


def broadcast_json(obj=None):
    """Rank 0's JSON-able ``obj`` on every rank (as UTF-8 bytes in a tensor: no pickle)."""
    if not active():
        return obj
    dev = _device()
    data = json.dumps(obj).encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(size, 0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=dev)
    if is_main():
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, 0)
    return json.loads(buf.cpu().numpy().tobytes().decode())


def _broadcast_(t: torch.Tensor) -> None:
    """In place, from rank 0 (through the backend's device when ``t`` lives elsewhere)."""
    dev = _device()
    if t.device == dev:
        dist.broadcast(t, 0)
    else:
        tmp = t.to(dev)
        dist.broadcast(tmp, 0)
        t.copy_(tmp)


def share_state(model: nn.Module, optimizer: torch.optim.Optimizer, sampler, start: int) -> int:
    """Rank 0's training state on every rank: weights and buffers, optimiser moments, sampler RNG, iteration.

    Called once, after rank 0 has built its model and, with ``--resume``, loaded its saved state
    (the others never read the run folder, so it may live on rank 0's machine only).

    Returns:
        rank 0's ``start`` iteration.
    """
    if not active():
        return start
    if is_main():
        log.info("distributed: %d processes (%s); rank 0 writes the run folder", world_size(), dist.get_backend())
    with torch.no_grad():
        for t in model.state_dict().values():
            _broadcast_(t)
    opt = optimizer.state_dict()
    spec = (
        [
            [int(i), name, list(v.shape), str(v.dtype).removeprefix("torch."), v.device.type]
            for i, st in opt["state"].items()
            for name, v in st.items()
            if torch.is_tensor(v)
        ]
        if is_main()
        else None
    )
    head = broadcast_json(
        {"start": start, "optim": spec, "sampler": sampler.rng.bit_generator.state} if is_main() else None
    )
    if head["optim"]:
        state: dict[int, dict] = {}
        for i, name, shape, dtype, device in head["optim"]:
            t = opt["state"][i][name] if is_main() else torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
            _broadcast_(t)
            state.setdefault(i, {})[name] = t
        if not is_main():
            optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    sampler.rng.bit_generator.state = head["sampler"]
    return int(head["start"])


def _norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def running_stats(model: nn.Module) -> list[tuple[torch.Tensor, ...]] | None:
    """Distributed only: the BatchNorm running statistics before a meta-batch (for :func:`merge_running_stats`)."""
    if not active():
        return None
    return [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in _norms(model)]


def merge_running_stats(model: nn.Module, before: list | None, tasks: list | None = None) -> None:
    """Give every rank the BatchNorm running statistics a one-process run would have after the meta-batch.

    Tasks one by one: rank r made ``k_r`` EMA updates from the same start ``s``, ending at
    ``e_r = (1 - m)^k_r s + u_r``; one process makes them all, in rank order, so the result is
    chained: ``x <- e_r + (1 - m)^k_r (x - s)``. Tasks batched (``tasks`` given, all of the
    meta-batch): one process makes one update from all tasks' support songs
    (:func:`pdmer.meta.maml.meta_step_batched`), which every rank repeats here from ``s``.
    (``train.target=consensus``: the consensus batch's update then counts once per rank, an
    approximation that touches only the running statistics, not the parameters.)
    """
    if before is None or not before:
        return
    norms = _norms(model)
    if tasks is not None:
        from pdmer.meta.maml import call, split_state, stack_tasks

        with torch.no_grad():
            for m, (mean0, var0, n0) in zip(norms, before):
                m.running_mean.copy_(mean0)
                m.running_var.copy_(var0)
                m.num_batches_tracked.copy_(n0)
            flat = tuple(t.flatten(0, 1) for t in stack_tasks([s for s, _ in tasks]))  # (n * B, ...)
            call(model, *split_state(model), *flat[:-1])
        return
    dev = _device()
    for m, (mean0, var0, n0) in zip(norms, before):
        if m.momentum is None:
            raise NotImplementedError(
                "BatchNorm with momentum=None (a cumulative average) is not merged over processes"
            )
        c = mean0.numel()
        k = (m.num_batches_tracked - n0).to(torch.float64).reshape(1)
        pack = torch.cat([m.running_mean.to(torch.float64), m.running_var.to(torch.float64), k]).to(dev)
        parts = [torch.empty_like(pack) for _ in range(world_size())]
        dist.all_gather(parts, pack)
        mean, var, total = mean0.to(torch.float64), var0.to(torch.float64), 0
        s_mean, s_var = mean.clone(), var.clone()
        for p in parts:  # ranks in task order
            p = p.to(mean.device)
            kr = int(p[-1].item())
            decay = (1.0 - m.momentum) ** kr
            mean = p[:c] + decay * (mean - s_mean)
            var = p[c : 2 * c] + decay * (var - s_var)
            total += kr
        with torch.no_grad():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n0 + total)
