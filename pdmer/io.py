"""Crash-safe file writes and file hashes: the one home of each.

- :func:`atomic_write` (and its ``_bytes``/``_text`` forms) writes a file beside its destination,
  flushes it to disk and renames it into place: a process killed at any moment leaves the previous
  file or the new one under ``path``, never a partial one.
- :func:`swap_dir` does the same for a whole folder (by renames).
- :func:`sha256_file` hashes a file's bytes in chunks.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Callable

_CHUNK = 1 << 20


def _tmp_for(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique per process and call."""
    return path.with_name(f".{path.name}.{os.getpid()}-{time.monotonic_ns()}.tmp")


def fsync_file(path: str | Path) -> None:
    """Flush a written file's bytes to disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (renames, new files) to disk where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def write_synced(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk (not atomic: for files inside a folder swapped later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` atomically: ``write(tmp)`` writes a temporary file beside it, flushed, then renamed.

    Args:
        path: the destination (its folder must exist).
        write: writes the whole content to the path it is given (e.g. ``safetensors.save_file``,
            ``fig.savefig`` with an explicit ``format``, since the temporary name ends in ``.tmp``).

    The temporary file is removed when ``write`` or the rename fails.
    """
    path = Path(path)
    tmp = _tmp_for(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: write_synced(tmp, data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write_bytes(path, text.encode())


def swap_dir(tmp: Path, dest: Path, aside: Path | None = None, fault=None) -> Path | None:
    """Put the finished folder ``tmp`` in place of ``dest`` by renames, never leaving a half-written ``dest``.

    The previous ``dest`` is first renamed to ``aside`` (default ``.<name>.old-<pid>-<ns>`` beside
    it); if the final rename fails, it is put back and the error propagates. ``fault(stage)``, when
    given, is called before and after the previous folder is set aside (fault-injection tests).

    Returns:
        the folder set aside (the caller deletes or keeps it), or None if ``dest`` did not exist.
    """
    old = None
    if dest.exists():
        if fault is not None:
            fault("before setting the old entry aside")
        old = aside or dest.parent / f".{dest.name}.old-{os.getpid()}-{time.monotonic_ns()}"
        os.rename(dest, old)
        if fault is not None:
            fault("set the old entry aside")
    try:
        os.rename(tmp, dest)
    except BaseException:
        if old is not None and not dest.exists():
            os.rename(old, dest)  # put the previous version back
        raise
    return old


def sha256_bytes(data: bytes) -> str:
    """SHA-256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "fsync_file",
    "sha256_bytes",
    "sha256_file",
    "swap_dir",
    "write_synced",
]
