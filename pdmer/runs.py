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

from pdmer import paths
from pdmer.checkpoint import CheckpointError, atomic_write_text, read_meta
from pdmer.config import ConfigError, ExperimentConfig, check_device_spec, config_hash, from_dict, to_dict, to_yaml

REPO = paths.home()  # outputs' home (pdmer.paths: $PDMER_HOME, else the working folder's project)
log = logging.getLogger(__name__)


def git_info(exclude: tuple[str, ...] = ()) -> dict:
    """HEAD's commit and whether tracked files differ from it (paths under ``exclude`` do not count)."""

    def git(*args):
        try:
            return subprocess.run(
                ["git", *args], cwd=paths.code_root(), capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "HEAD")
    pathspec = ["--", ".", *(f":(exclude){p}" for p in exclude)] if exclude else []
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", *pathspec)) if commit else None
    return {"commit": commit or None, "dirty": dirty}


_STARTED_WITH: dict | None = None  # git_info() at this process's first code_info() call


def code_info() -> dict:
    """The code this process runs: :func:`git_info` as it was at the process's first call
    (``pdmer.cli.main`` makes that call when it starts), not as the working tree is now.

    A long run (training, then evaluation an hour later) loaded its modules when it started; the
    tree may have moved on since. Where it has, ``tree_now`` holds :func:`git_info` now (modules
    imported late may come from it).
    """
    global _STARTED_WITH
    now = git_info()
    if _STARTED_WITH is None:
        _STARTED_WITH = now
    out = dict(_STARTED_WITH)
    if now != _STARTED_WITH:
        out["tree_now"] = now
    return out


def resolve_device(spec: str, key: str = "runtime.device") -> torch.device:
    """The torch device for ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        ConfigError: not a device name, or a device this machine does not have (naming those it has).
    """
    check_device_spec(spec, key)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"{key}={spec!r} but this machine has no CUDA device; use {key}=cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(
                f"{key}={spec!r} but this machine has {n} CUDA device(s): " + ", ".join(f"cuda:{i}" for i in range(n))
            )
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"{key}={spec!r} but MPS is not available on this machine; use {key}=cpu (or auto)")
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
            raise RunBusyError(
                f"{run} is being trained by another process (pid {holder}); wait for it to end, "
                "or stop it and continue with --resume"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class RunStartedError(CheckpointError):
    """A fresh start was asked for over a run folder that holds an interrupted run's progress."""


STATE_PATH = Path("checkpoints") / "state" / "latest.safetensors"  # the training state, relative to a run folder
# what a run folder's training writes; a forced fresh start removes it so that the folder holds one history
RUN_OUTPUTS = ("train.log", "tb", "results.json", "results.md", "curves.png", "stopped.json", str(STATE_PATH))


def check_restart(run: Path, resume: bool, force: bool) -> None:
    """Refuse to start a run folder from iteration 0 over an interrupted run, unless ``force``.

    A folder whose training began (a training state or a log) but did not finish (no
    ``results.json``) holds progress that a fresh start would throw away: that needs
    ``--resume`` (continue) or ``--force`` (start again). With ``force``, the earlier attempt's
    log, tensorboard events, results and state are removed, so the folder holds one history.
    Call it with the folder's lock held (:func:`lock_run`).

    Raises:
        RunStartedError: naming the folder, how far it got, and both ways on.
    """
    if resume:
        return
    state, logf, done = run / STATE_PATH, run / "train.log", (run / "results.json").exists()
    if not done and (state.exists() or logf.exists()) and not force:
        at = ""
        if state.exists():
            try:
                at = f" (training state at iteration {read_meta(state).get('iteration')})"
            except Exception:  # an unreadable state still counts as progress
                at = " (training state present)"
        raise RunStartedError(
            f"{run} holds an interrupted run{at} with no results yet; continue it with --resume, "
            "or start it again from iteration 0 with --force (its progress is then discarded)"
        )
    if force:
        import shutil

        gone = [name for name in RUN_OUTPUTS if (run / name).exists()]
        for name in gone:
            p = run / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if gone:
            log.info("%s: starting again from iteration 0 (--force); removed %s", run.name, ", ".join(gone))


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
