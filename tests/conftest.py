"""Shared fixtures: tiny overrides that make any experiment run in seconds; a training process killed mid-run.

One torch thread per process (here and in every subprocess a test starts, unless OMP_NUM_THREADS is set
already): the tests' models are tiny, and many tests run two processes at once (ranks, --jobs, a lock
holder). With torch's default of one thread per core, a busy core makes the others spin-wait: measured on
2 cores with 2 other jobs running, one calibration took 20 s with 2 threads and 0.25 s with 1, and
``benchmarks/run.py --quick`` 217 s against 60 s.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by torch when it is first imported, here or in a subprocess
if "torch" in sys.modules:  # imported before this file (by a plugin): set it now
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / ".." / "shared" / "data"


def pytest_collection_modifyitems(items: list) -> None:
    """The files holding slow tests first (stable otherwise): with one worker per core, each takes a
    test file at a time in this order (pyproject's ``--dist loadfile --no-loadscope-reorder``), and a
    long file left for the end would run alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)


def tiny_overrides(tmp: Path, tag: str) -> list[str]:
    """Overrides that shrink data, model and schedule; outputs go under ``tmp``."""
    return [
        f"data.root={tmp / ('synthetic-' + tag)}",
        "data.synthetic.n_clips=8",
        "data.synthetic.n_long=1",
        "data.synthetic.long_min_s=60",
        "data.synthetic.long_max_s=70",
        "data.synthetic.n_listeners=10",
        "data.synthetic.min_songs_per_listener=4",
        "data.synthetic.max_songs_per_listener=6",
        "data.split.val_listeners=2",
        "data.split.test_listeners=2",
        "model.hidden=16",
        "model.heads=2",
        "model.ff=16",
        "model.layers=1",
        "model.lstm_hidden=8",
        "model.head_hidden=8",
        "meta.tasks_per_batch=2",
        "meta.query_songs=2",
        "meta.inner_steps=2",
        "train.iterations=2",
        "train.eval_every=1",
        "train.batch_songs=3",
        f"features.cache_dir={tmp / 'features'}",
        f"runtime.out_dir={tmp / 'runs'}",
        "runtime.progress=false",
    ]


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pdmer")


def calibration_overrides(root: Path, iterations: int) -> list[str]:
    """A tiny DSAML run for listener profiles (tests/test_personal.py, tests/test_batch_calibration.py).

    Its listeners are consistent (carry-over 1 for every personal parameter) and differ by offset, gain,
    lag and smoothing only (``weight_scale=0``); the model uses the global branch only (inner learning
    rate pinned at 0.05). Runs of any ``iterations`` share the benchmark and the feature cache under
    ``root``; each has its own runs folder, so "the latest trained run" of one is never another's.
    """
    return [
        f"data.root={root / 'data'}",
        "data.synthetic.n_clips=16",
        "data.synthetic.n_long=1",
        "data.synthetic.long_min_s=60",
        "data.synthetic.long_max_s=70",
        "data.synthetic.n_listeners=20",
        "data.synthetic.min_songs_per_listener=8",
        "data.synthetic.max_songs_per_listener=12",
        "data.synthetic.carryover=1.0",
        "data.synthetic.offset_carryover=1.0",
        "data.synthetic.weight_scale=0.0",
        "data.split.val_listeners=2",
        "data.split.test_listeners=8",
        "model.hidden=32",
        "model.heads=2",
        "model.ff=64",
        "model.layers=1",
        "model.lstm_hidden=16",
        "model.head_hidden=16",
        "model.use_local_branch=false",
        "meta.inner_lr=0.05",
        "train.outer_lr=3e-3",
        f"train.iterations={iterations}",
        f"train.eval_every={iterations}",
        f"features.cache_dir={root / 'features'}",
        f"runtime.out_dir={root / f'runs-{iterations}'}",
        "runtime.progress=false",
        "runtime.threads=1",
    ]


def calibration_run(tmp_path_factory, iterations: int):
    """A finished tiny run of :func:`calibration_overrides`, its dataset and its listener split."""
    import json
    from types import SimpleNamespace

    import torch

    from pdmer.config import load_config
    from pdmer.data.loading import load_dataset
    from pdmer.personal import load_base_model
    from pdmer.training import train

    root = tmp_path_factory.getbasetemp() / "calibration"
    cfg = load_config("pdmer.synthetic.dsaml", calibration_overrides(root, iterations))
    threads = torch.get_num_threads()
    try:
        run = train(cfg)  # runtime.threads=1: tiny tensors, and other jobs may share the cores
    finally:
        torch.set_num_threads(threads)
    return SimpleNamespace(
        cfg=cfg,
        run=run,
        runs=run.parent,
        ds=load_dataset(cfg.data),
        splits=json.loads((run / "splits.json").read_text()),
        audio=Path(cfg.data.root) / "audio",
        base=load_base_model(run),
    )


@pytest.fixture(scope="session")
def calibrated_tiny(tmp_path_factory):
    """The calibration tests' base model: 40 meta-training iterations (the machinery, not the gain, is tested)."""
    return calibration_run(tmp_path_factory, 40)


def kill_after_saved_state(
    cmd: list[str], state: Path, iteration: int, env: dict, with_descendants: bool = False, timeout_s: float = 300
) -> int:
    """Start a training process, wait until its saved training state reaches ``iteration``, SIGKILL it.

    Args:
        cmd: the training command (run in the repository root).
        state: the run's training-state file (``<run>/`` + ``pdmer.training.state.STATE_FILE``).
        iteration: kill once the saved state is at this iteration or later.
        env: the process environment.
        with_descendants: kill its descendants first (torchrun starts the ranks in sessions of their own).
        timeout_s: how long to wait for the state.

    Returns:
        The iteration of the saved state the killed process left.
    """
    from pdmer.checkpoint import read_meta

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and read_meta(state).get("iteration", 0) >= iteration:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    for pid in [*(descendants(proc.pid) if with_descendants else []), proc.pid]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    return read_meta(state)["iteration"]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), deepest last."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        p0 = todo.pop()
        kids = [p for p, pp in parent.items() if pp == p0]
        out += kids
        todo += kids
    return out
