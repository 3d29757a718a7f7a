"""Model checkpoints as safetensors (never pickle), written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pdmer.io import atomic_write, atomic_write_bytes, atomic_write_text  # noqa: F401  (the last two: re-exported)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model or config it is loaded into."""


def save_weights(path: Path, model: nn.Module, meta: dict | None = None) -> None:
    """Save ``model.state_dict()`` (parameters and buffers) to ``path``; ``meta`` goes in the header."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"pdmer": json.dumps(meta or {})}))


def read_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("pdmer", "{}"))


def load_weights(path: Path, model: nn.Module, expect: dict | None = None) -> dict:
    """Load weights saved by :func:`save_weights` into ``model`` (strict).

    Args:
        expect: header entries that must match (e.g. ``{"config_hash": ...}``).

    Returns:
        the header metadata.

    Raises:
        CheckpointError: a header entry or the tensor names/shapes do not match.
    """
    path = Path(path)
    meta = read_meta(path)
    for k, v in (expect or {}).items():
        if meta.get(k) != v:
            raise CheckpointError(f"{path}: {k} is {meta.get(k)!r}, expected {v!r}")
    state = load_file(str(path), device=str(next(model.parameters()).device))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit the model: {e}") from None
    return meta


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Save named tensors and a JSON header to one safetensors file, atomically (write, then rename).

    A process killed at any moment leaves either the previous file or the new one, never a
    partial file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(
        path, lambda tmp: save_file(tensors, str(tmp), metadata={"pdmer": json.dumps(meta or {}, default=float)})
    )


def load_tensors(path: Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and JSON header written by :func:`save_tensors`."""
    return load_file(str(path), device=device), read_meta(path)
