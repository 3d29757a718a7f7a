"""Checkpoints and resume: a run killed with SIGKILL, resumed, ends as an uninterrupted run; determinism."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kill_after_saved_state, tiny_overrides

from pdmer.config import load_config
from pdmer.runs import RunBusyError, lock_run
from pdmer.training import train
from pdmer.training.state import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
NAME = "pdmer.synthetic.dsaml"
ITERATIONS = 12


def overrides(tmp: Path, out: str) -> list[str]:
    ov = [o for o in tiny_overrides(tmp, "resume") if not o.startswith("runtime.out_dir=")]
    return ov + [
        f"train.iterations={ITERATIONS}",
        "train.eval_every=2",
        "runtime.threads=1",
        "eval.plot=false",
        f"runtime.out_dir={tmp / out}",
    ]


def metrics_of(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    return {"test": res["test"], "best_iteration": res["best"]["iteration"], "best_value": res["best"]["value"]}


@pytest.fixture(scope="module")
def reference(session_tmp):
    """An uninterrupted run (also builds the data and the feature cache the other runs reuse)."""
    return train(load_config(NAME, overrides(session_tmp, "runs-reference")))


@pytest.mark.slow
def test_same_seed_same_metrics(reference, session_tmp):
    # resume=True with no saved state: a fresh start
    again = train(load_config(NAME, overrides(session_tmp, "runs-again")), resume=True)
    assert again != reference
    assert metrics_of(again) == metrics_of(reference)


@pytest.mark.slow
def test_other_seed_other_metrics(reference, session_tmp):
    other = train(load_config(NAME, overrides(session_tmp, "runs-seed1") + ["train.seed=1"]))
    assert metrics_of(other)["test"] != metrics_of(reference)["test"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(reference, session_tmp):
    ov = overrides(session_tmp, "runs-killed")
    run = reference.parent.parent / "runs-killed" / reference.name
    cmd = [sys.executable, "run.py", "train", NAME, *ov]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed_at = kill_after_saved_state(cmd, run / STATE_FILE, 2, env)
    assert 2 <= killed_at < ITERATIONS and not (run / "results.json").exists()
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed {run.name} from iteration {killed_at}" in (run / "train.log").read_text()
    assert metrics_of(run) == metrics_of(reference)


@pytest.mark.slow
def test_a_folder_being_trained_is_not_trained_twice(reference, session_tmp):
    """A second process on a folder in training gets a clear error before it writes anything."""
    files = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file() and p.name != ".lock"}
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from pdmer.runs import lock_run\n"
                "with lock_run(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)"
            ),
            str(reference),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunBusyError, match=f"being trained by another process \\(pid {holder.pid}\\)"):
            train(load_config(NAME, overrides(session_tmp, "runs-reference")), resume=True)
        cli = subprocess.run(
            [sys.executable, "run.py", "train", NAME, "--force", *overrides(session_tmp, "runs-reference")],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
        )
        assert cli.returncode == 2 and "being trained by another process" in cli.stderr
    finally:
        holder.kill()
        holder.wait()
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file() and p.name != ".lock"} == files
    with lock_run(reference):  # a killed holder leaves no stale lock (flock dies with its process)
        pass


def test_state_write_interrupted_before_rename_keeps_the_previous_state(tmp_path, monkeypatch):
    import torch

    from pdmer import io
    from pdmer.checkpoint import load_tensors, save_tensors

    path = tmp_path / "state" / "latest.safetensors"
    save_tensors(path, {"w": torch.ones(3)}, {"iteration": 2})

    def killed(*args):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(io.os, "replace", killed)  # the one atomic write (pdmer.io) renames last
    with pytest.raises(KeyboardInterrupt):
        save_tensors(path, {"w": torch.zeros(3)}, {"iteration": 4})
    tensors, meta = load_tensors(path)
    assert meta["iteration"] == 2 and torch.equal(tensors["w"], torch.ones(3))
