"""Run folders: ``runs/<experiment>-<config hash>/`` with config, provenance and results."""
from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from pdmer.checkpoint import atomic_write_text
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
