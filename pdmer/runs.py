"""Run folders: ``runs/<experiment>-<config hash>/`` with config, provenance and results."""
from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch

from pdmer.checkpoint import CheckpointError, atomic_write_text
from pdmer.config import ExperimentConfig, config_hash, from_dict, to_dict, to_yaml

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


def git_info(exclude: tuple[str, ...] = ()) -> dict:
    """HEAD's commit and whether tracked files differ from it (paths under ``exclude`` do not count)."""

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    pathspec = ["--", ".", *(f":(exclude){p}" for p in exclude)] if exclude else []
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", *pathspec)) if commit else None
    return {"commit": commit or None, "dirty": dirty}


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"runtime.device={spec!r} but no CUDA device is available")
    return dev


def run_dir_for(cfg: ExperimentConfig) -> Path:
    out = Path(cfg.runtime.out_dir)
    if not out.is_absolute():
        out = REPO / out
    return out / f"{cfg.name}-{config_hash(cfg)}"


class RunBusyError(CheckpointError):
    """The run folder is being trained by another process."""


LOCK_FILE = ".lock"


@contextmanager
def lock_run(run: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder: one training process per folder at a time.

    Two processes training one folder would overwrite each other's checkpoints and training
    state. The lock is an ``flock`` on ``<run>/.lock``: the kernel releases it when the process
    ends, however it ends (SIGKILL included), so a killed run never leaves a stale lock and
    ``--resume`` can always take it. Raises :class:`RunBusyError` at once (no waiting) when
    another process holds it. Where ``fcntl`` does not exist (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    run.mkdir(parents=True, exist_ok=True)
    fd = os.open(run / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunBusyError(f"{run} is being trained by another process (pid {holder}); wait for it to end, "
                               "or stop it and continue with --resume") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def prepare_run_dir(cfg: ExperimentConfig, device: torch.device) -> Path:
    """Create the run folder and write the resolved config and provenance."""
    run = run_dir_for(cfg)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    atomic_write_text(run / "config.yaml", to_yaml(cfg))
    atomic_write_text(run / "config.json", json.dumps(to_dict(cfg), indent=2))
    info = {
        "experiment": cfg.name,
        "config_hash": config_hash(cfg),
        "git": git_info(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    atomic_write_text(run / "run.json", json.dumps(info, indent=2))
    return run


def load_run_config(run: Path) -> ExperimentConfig:
    path = Path(run) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run} is not a run folder (no config.json)")
    return from_dict(json.loads(path.read_text()))


def add_file_log(run: Path) -> logging.Handler:
    handler = logging.FileHandler(run / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("pdmer").addHandler(handler)
    return handler
