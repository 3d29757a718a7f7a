"""Second global option: embeddings a user computed elsewhere (ImageBind, MERT, CLAP, ...).

One file per song, ``<dir>/<song_id>.npy``, holding either
- shape (D,): one embedding for the whole song, repeated over every step (the paper's
  training setting: one ImageBind embedding of the 30 s clip), or
- shape (n_steps, D): one embedding per 0.5 s step (the paper's test setting: the embedding
  of the 30 s window centred on each step), with exactly the song's number of steps.

Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pdmer.data.types import DataError


def embedding_path(directory: str | Path, song_id: str) -> Path:
    """``<directory>/<song_id>.npy``."""
    return Path(directory) / f"{song_id}.npy"


def embedding_dim(directory: str | Path) -> int:
    """Dimension D of the embeddings in a folder (read from the first ``.npy`` file's header).

    Raises:
        DataError: the folder is missing or holds no ``.npy`` file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"embeddings folder {directory} not found (features.embeddings_dir)")
    files = sorted(directory.glob("*.npy"))
    if not files:
        raise DataError(f"embeddings folder {directory} holds no <song_id>.npy file")
    arr = _load(files[0])
    return int(arr.shape[-1])


def _load(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise DataError(f"{path}: cannot read embedding file ({e})") from None
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
        raise DataError(f"{path}: embedding must have shape (D,) or (n_steps, D), got {arr.shape}")
    return arr


def load_embeddings(directory: str | Path, song_id: str, n_steps: int) -> np.ndarray:
    """Per-step global features of one song from a folder of user embeddings.

    Args:
        directory: folder with one ``<song_id>.npy`` per song.
        song_id: the song.
        n_steps: the song's number of 0.5 s steps (from its audio).

    Returns:
        np.ndarray: (n_steps, D) float32.

    Raises:
        DataError: missing file (names the song and the folder), wrong shape, a row count
            other than n_steps (names the file and both counts), or non-finite values.
    """
    directory = Path(directory)
    path = embedding_path(directory, song_id)
    if not path.is_file():
        raise DataError(f"song {song_id!r}: no embedding file {path.name} in folder {directory}")
    arr = np.asarray(_load(path), dtype=np.float32)
    if arr.ndim == 1:
        arr = np.broadcast_to(arr[None, :], (n_steps, arr.shape[0]))  # (D,) -> (n_steps, D)
    elif arr.shape[0] != n_steps:
        raise DataError(
            f"{path}: {arr.shape[0]} embedding rows but the song has {n_steps} steps; "
            f"expected shape ({n_steps}, D) or (D,)"
        )
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: embedding contains NaN or infinite values")
    return np.array(arr, dtype=np.float32, order="C", copy=True)  # writable, detached from the file
