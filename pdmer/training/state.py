"""The full training state of a run (weights, optimiser moments, every RNG): saved and restored exactly."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pdmer.checkpoint import CheckpointError, load_tensors, save_tensors
from pdmer.meta.tasks import TaskSampler
from pdmer.runs import STATE_PATH

STATE_FILE = STATE_PATH  # full training state, relative to the run folder (pdmer.runs)


def save_training_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: TaskSampler, meta: dict
) -> None:
    """Everything needed to continue training exactly: weights, optimiser moments, every RNG.

    One safetensors file (tensors only, never pickle) written atomically: a kill at any moment
    leaves the previous state or the new one. ``meta`` (JSON) carries the iteration, the best
    validation score so far and the RNG states that are not tensors.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, st in optimizer.state_dict()["state"].items():
        for name, v in st.items():
            tensors[f"optim.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    np_state = np.random.get_state()
    rng = {
        "sampler": sampler.rng.bit_generator.state,
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    save_tensors(path, tensors, {**meta, "rng": rng})


def load_training_state(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: TaskSampler, expect: dict
) -> dict:
    """Restore what :func:`save_training_state` wrote (in place); returns its JSON header."""
    tensors, meta = load_tensors(path)
    for k, v in expect.items():
        if meta.get(k) != v:
            raise CheckpointError(f"{path}: {k} is {meta.get(k)!r}, expected {v!r}")
    device = next(model.parameters()).device
    model_state = {k[len("model.") :]: v.to(device) for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit the model: {e}") from None
    opt = optimizer.state_dict()  # param_groups come from the config, as when the state was saved
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v if name == "step" else v.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    rng = meta["rng"]
    sampler.rng.bit_generator.state = rng["sampler"]
    n = rng["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return meta
