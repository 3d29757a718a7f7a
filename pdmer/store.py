"""A crash-safe store of named folders (listener profiles): lock, manifest, atomic install, recovery.

Layout under a root folder (``annotators/`` for profiles)::

    <NAME>/                       the live entry: its files and MANIFEST (sha256 and size of each)
    .locks/<NAME>.lock            flock held by whoever writes or repairs <NAME> (removed on release)
    .<NAME>.tmp-<ns>-<pid>/       an entry being written (renamed to <NAME> once complete)
    .<NAME>.old-<ns>-<pid>/       the previous entry, set aside during the swap (deleted after it)
    .<NAME>.keep-<ns>-<pid>/      the same, to be moved to .history/<NAME>/ (``keep_history``)
    .history/<NAME>/<UTC time>/   replaced entries kept on request

Writing (:func:`install`) holds the lock, writes every file into a temporary folder, then the
manifest last, syncs them, renames the live entry aside, renames the new one into place and only
then removes (or keeps) the old one. A process killed at any point leaves the complete old entry
or the complete new one, possibly beside leftovers, and possibly *neither under NAME* for the
instant between the two renames. :func:`repair` (run by the next writer, and by a reader that
finds the entry missing or incomplete) restores from what is there, choosing only folders whose
manifest verifies (every file present with its sha256: never the newest by mtime), and deletes
every leftover, so no temporary copy of a listener's data survives the next command.

Only the standard library is used here (a child process that imports it starts at once).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from pdmer.io import fsync_dir, sha256_bytes, sha256_file, swap_dir, write_synced

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "pdmer-manifest"
LOCKS_DIR = ".locks"
HISTORY_DIR = ".history"
LEFTOVER_RE = re.compile(r"^\.(?P<name>[A-Za-z0-9_-]+)\.(?P<kind>tmp|old|keep)-(?P<ns>\d+)(?:-\d+)*$")


class StoreBusyError(OSError):
    """Another process is writing this entry."""


def _fault(stage: str) -> None:
    """A named point of :func:`install`; tests replace this to crash there (raise, or SIGKILL the process)."""


# --------------------------------------------------------------------------------------------
# Lock
# --------------------------------------------------------------------------------------------


@contextmanager
def locked(root: Path, name: str, wait_s: float = 0.0, what: str = "written") -> Iterator[None]:
    """Hold the exclusive lock of entry ``name`` (``<root>/.locks/<name>.lock``, an ``flock``).

    The kernel releases it when the holder ends, however it ends (SIGKILL included), so a crash
    never leaves a stale lock. The holder removes the lock file (and ``.locks/`` when empty) on
    release, so nothing is left behind; a waiter that locked a file removed meanwhile notices
    (its path no longer names that file) and starts again.

    Args:
        wait_s: how long to wait for another holder (0 = fail at once).
        what: for the message: what the other holder is doing with the entry.

    Raises:
        StoreBusyError: another process holds it (the message names its pid).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: nothing is locked
        yield
        return
    locks = Path(root) / LOCKS_DIR
    path = locks / f"{name}.lock"
    deadline = time.monotonic() + wait_s
    while True:
        locks.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # .locks/ removed by a holder releasing meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if time.monotonic() >= deadline:
                raise StoreBusyError(
                    errno.EBUSY,
                    f"{Path(root) / name} is being {what} by another process "
                    f"(pid {holder}); wait for it to end and try again",
                ) from None
            time.sleep(0.05)
            continue
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder removed on release: lock the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            path.unlink()  # while still holding it: whoever waits on this file starts again
            locks.rmdir()
        except OSError:  # another lock file in .locks/, or already gone
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict[str, dict]:
    """``{file name: {"sha256", "bytes"}}`` of a folder's manifest ({} when it has none or it is unreadable)."""
    try:
        m = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    files = m.get("files") if isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT else None
    return files if isinstance(files, dict) else {}


def check_complete(folder: Path, legacy: Callable[[Path], str | None] | None = None) -> str | None:
    """What is wrong with a stored folder, or None when it is complete.

    Complete = its manifest lists every file with its size and sha256 and each one matches.
    A folder written before manifests existed is judged by ``legacy`` (None: incomplete).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    if not (folder / MANIFEST).exists():
        if legacy is not None:
            return legacy(folder)
        return f"{folder}: no {MANIFEST}"
    files = read_manifest(folder)
    if not files:
        return f"{folder}/{MANIFEST}: unreadable or empty"
    for fname, rec in files.items():
        p = folder / fname
        if Path(fname).name != fname or not p.is_file():
            return f"{p}: missing"
        if p.stat().st_size != rec.get("bytes") or sha256_file(p) != rec.get("sha256"):
            return f"{p}: does not match {MANIFEST} (changed or incomplete)"
    return None


# --------------------------------------------------------------------------------------------
# Leftovers and recovery
# --------------------------------------------------------------------------------------------


def leftovers(root: Path, name: str | None = None) -> list[tuple[Path, str, str, int]]:
    """``(path, name, kind, ns)`` of the temporary and set-aside folders under ``root``."""
    root = Path(root)
    out = []
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = LEFTOVER_RE.match(p.name)
        if m and (name is None or m["name"] == name):
            out.append((p, m["name"], m["kind"], int(m["ns"])))
    return out


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _keep(root: Path, name: str, folder: Path) -> Path:
    kept = root / HISTORY_DIR / name / _stamp()
    kept.parent.mkdir(parents=True, exist_ok=True)
    os.rename(folder, kept)
    return kept


def repair(root: Path, name: str, legacy: Callable[[Path], str | None] | None = None) -> list[str]:
    """Bring entry ``name`` back to a clean state after a crash; call with its lock held.

    If ``<root>/<name>`` is missing or incomplete and a set-aside copy (``old`` / ``keep``) is
    complete, that copy is restored (the most recently set aside of the complete ones, by the
    time in its name). Then every leftover of ``name`` is removed, except that a complete
    ``keep`` copy goes to ``.history/<name>/`` as its calibration asked. An incomplete live
    entry with nothing to restore is left for the reader to report.

    Returns:
        what was done, one line each (also logged).
    """
    root = Path(root)
    dest = root / name
    done: list[str] = []
    found = leftovers(root, name)
    if not found:
        return done
    if check_complete(dest, legacy) is not None:
        aside = sorted(
            (f for f in found if f[2] in ("old", "keep") and check_complete(f[0], legacy) is None), key=lambda f: f[3]
        )
        if aside:
            src = aside[-1][0]
            if dest.exists():
                broken = root / f".{name}.old-0-broken-{os.getpid()}"
                os.rename(dest, broken)
                found.append((broken, name, "old", 0))
                done.append(f"{dest}: incomplete ({check_complete(broken, legacy)}), replaced")
            os.rename(src, dest)
            found = [f for f in found if f[0] != src]
            done.append(f"{dest}: restored the complete copy set aside by an interrupted write ({src.name})")
    for path, _, kind, _ in found:
        if kind == "keep" and check_complete(path, legacy) is None:
            done.append(f"{name}: kept the replaced entry in {_keep(root, name, path)}")
        else:
            _remove(path)
            done.append(f"{name}: removed the leftover {path.name}")
    for line in done:
        log.warning("%s", line)
    return done


def repair_all(root: Path, legacy: Callable[[Path], str | None] | None = None) -> list[str]:
    """:func:`repair` every entry that has leftovers and is not being written now (its lock is free)."""
    done: list[str] = []
    for name in sorted({f[1] for f in leftovers(root)}):
        try:
            with locked(root, name):
                done += repair(root, name, legacy)
        except StoreBusyError:
            continue  # being written: its writer cleans up after itself
    return done


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def install(root: Path, name: str, files: dict[str, bytes], keep_history: bool = False) -> Path | None:
    """Write entry ``name`` = ``files`` (name -> content), replacing the old one only once complete.

    Call with the lock held (:func:`locked`) and after :func:`repair`. The stages, each marked
    by :func:`_fault`: every file written into ``.<name>.tmp-*``, the manifest, the old entry
    renamed aside, the new one renamed into place, the old one deleted (file by file) or moved to
    ``.history/<name>/<UTC time>/``.

    Returns:
        where the replaced entry was kept (``keep_history``), else None.
    """
    root = Path(root)
    dest = root / name
    root.mkdir(parents=True, exist_ok=True)
    tag = f"{time.time_ns()}-{os.getpid()}"
    tmp = root / f".{name}.tmp-{tag}"
    tmp.mkdir(mode=0o755)
    try:
        manifest = {}
        for fname, data in files.items():
            write_synced(tmp / fname, data)
            manifest[fname] = {"sha256": sha256_bytes(data), "bytes": len(data)}
            _fault(f"wrote {fname}")
        write_synced(
            tmp / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "version": 1, "files": manifest}, indent=2).encode()
        )
        fsync_dir(tmp)
        _fault("wrote manifest")
        old = swap_dir(tmp, dest, aside=root / f".{name}.{'keep' if keep_history else 'old'}-{tag}", fault=_fault)
        fsync_dir(root)
        _fault("renamed the new entry into place")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is None:
        return None
    if keep_history:
        kept = _keep(root, name, old)
        _fault("kept the old entry")
        return kept
    for p in sorted(old.iterdir()):
        p.unlink()
        _fault("deleting the old entry")
    old.rmdir()
    _fault("deleted the old entry")
    return None


__all__ = [
    "MANIFEST",
    "StoreBusyError",
    "check_complete",
    "install",
    "leftovers",
    "locked",
    "read_manifest",
    "repair",
    "repair_all",
]
