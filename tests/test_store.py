"""The crash-safe profile store (pdmer.store): a crash at any stage leaves the old or the new entry, whole.

Fault injection: :func:`pdmer.store.install` marks each stage of a write with ``_fault`` (after
each file, after the manifest, before and after each rename, while deleting the old entry). The
tests crash at every one of them, by raising in this process and by SIGKILL of a child process,
then run what the next command runs (:func:`pdmer.store.repair` under the lock) and check that
the entry is byte for byte the complete old one or the complete new one, and that no temporary
or set-aside folder is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdmer import store
from pdmer.io import sha256_bytes

REPO = Path(__file__).resolve().parents[1]
OLD = {
    "weights.safetensors": b"old weights" * 100,
    "ratings.csv": b"time_s,valence,arousal\n1,0,0\n",
    "profile.json": b'{"v": 1}',
}
NEW = {
    "weights.safetensors": b"new weights" * 120,
    "ratings.csv": b"time_s,valence,arousal\n2,0,0\n",
    "fit.png": b"png",
    "profile.json": b'{"v": 2}',
}


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.name != store.MANIFEST}


def stages(tmp: Path, keep_history: bool) -> list[str]:
    """The stages one replacing write goes through, in order."""
    seen: list[str] = []
    root = tmp / "dry"
    store.install(root, "A", OLD)
    orig = store._fault
    store._fault = seen.append
    try:
        store.install(root, "A", NEW, keep_history)
    finally:
        store._fault = orig
    return seen


def check_after(root: Path, keep_history: bool) -> str:
    """What the next command does, then: the entry is whole (old or new) and nothing is left over."""
    with store.locked(root, "A"):
        store.repair(root, "A")
    assert store.check_complete(root / "A") is None
    now = snapshot(root / "A")
    assert now in (OLD, NEW)
    assert store.leftovers(root) == []
    assert sorted(p.name for p in root.iterdir() if p.name != store.HISTORY_DIR) == ["A"]  # no lock file left either
    if keep_history and now == NEW:
        kept = list((root / store.HISTORY_DIR / "A").iterdir())
        assert [snapshot(k) for k in kept] == [OLD]  # the replaced entry was kept, whole
    return "old" if now == OLD else "new"


@pytest.mark.parametrize("keep_history", [False, True])
def test_a_write_that_raises_at_any_stage_leaves_old_or_new(tmp_path, monkeypatch, keep_history):
    names = stages(tmp_path, keep_history)
    assert {
        "wrote profile.json",
        "wrote manifest",
        "set the old entry aside",
        "renamed the new entry into place",
    } <= set(names)
    outcome = []
    for k, stage in enumerate(names):
        root = tmp_path / f"raise{k}"
        store.install(root, "A", OLD)
        calls = iter(range(len(names)))

        def fault(s, calls=calls, k=k):  # bound now: each crash point has its own counter
            if next(calls) == k:
                raise OSError(f"crash at {s!r} (simulated)")

        monkeypatch.setattr(store, "_fault", fault)
        with pytest.raises(OSError, match="simulated"):
            store.install(root, "A", NEW, keep_history)
        monkeypatch.undo()
        outcome.append((stage, check_after(root, keep_history)))
    # the new entry counts from the moment it is in place, never before
    first_new = names.index("renamed the new entry into place")
    assert [o for _, o in outcome] == ["old"] * first_new + ["new"] * (len(names) - first_new), outcome


CHILD = """
import os, signal, sys
from pathlib import Path
from pdmer import store
root, k, keep = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
new = {name: bytes.fromhex(data) for name, data in (kv.split("=") for kv in sys.argv[4:])}
calls = [0]
def fault(stage):
    if calls[0] == k:
        os.kill(os.getpid(), signal.SIGKILL)
    calls[0] += 1
store._fault = fault
with store.locked(root, "A"):
    store.install(root, "A", new, keep)
"""


@pytest.mark.parametrize("keep_history", [False, True])
def test_a_write_killed_at_any_stage_leaves_old_or_new(tmp_path, keep_history):
    names = stages(tmp_path, keep_history)
    outcome = []
    for k, stage in enumerate(names):
        root = tmp_path / f"kill{k}"
        store.install(root, "A", OLD)
        args = [f"{n}={d.hex()}" for n, d in NEW.items()]
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(root), str(k), "1" if keep_history else "0", *args],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            timeout=60,
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        outcome.append((stage, check_after(root, keep_history)))
    first_new = names.index("renamed the new entry into place")
    assert [o for _, o in outcome] == ["old"] * first_new + ["new"] * (len(names) - first_new), outcome


def test_recovery_restores_a_complete_copy_not_the_newest(tmp_path):
    """Issue 18, item 4: a half-deleted copy set aside later (newer mtime, newer name) is never restored."""
    root = tmp_path
    store.install(root, "A", OLD)
    os.rename(root / "A", root / ".A.old-2-2")  # a complete copy set aside, then a crash
    half = root / ".A.old-9-9"
    half.mkdir()
    for name, data in NEW.items():  # a newer copy whose deletion was interrupted
        (half / name).write_bytes(data)
    (half / store.MANIFEST).write_text(
        json.dumps(
            {
                "format": "pdmer-manifest",
                "files": {n: {"sha256": sha256_bytes(d), "bytes": len(d)} for n, d in NEW.items()},
            }
        )
    )
    (half / "weights.safetensors").unlink()
    os.utime(half, (time.time() + 100, time.time() + 100))
    assert store.check_complete(half) is not None
    with store.locked(root, "A"):
        done = store.repair(root, "A")
    assert snapshot(root / "A") == OLD and store.leftovers(root) == []
    assert any("restored" in line and ".A.old-2-2" in line for line in done)


def test_an_incomplete_live_entry_is_replaced_by_a_complete_copy(tmp_path):
    store.install(tmp_path, "A", OLD)
    os.rename(tmp_path / "A", tmp_path / ".A.old-5-5")
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "profile.json").write_bytes(b'{"v": 1')  # a truncated write, no manifest
    with store.locked(tmp_path, "A"):
        store.repair(tmp_path, "A")
    assert snapshot(tmp_path / "A") == OLD and store.leftovers(tmp_path) == []


def test_repair_all_skips_an_entry_being_written(tmp_path):
    store.install(tmp_path, "A", OLD)
    store.install(tmp_path, "B", OLD)
    (tmp_path / ".A.tmp-1-1").mkdir()
    (tmp_path / ".B.tmp-1-1").mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; from pdmer import store\n"
                "with store.locked(Path(sys.argv[1]), 'B'):\n    print('locked', flush=True); time.sleep(60)"
            ),
            str(tmp_path),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        store.repair_all(tmp_path)
        assert [p.name for p, *_ in store.leftovers(tmp_path)] == [".B.tmp-1-1"]  # B's writer owns its folder
        with pytest.raises(store.StoreBusyError, match=f"pid {holder.pid}"):
            with store.locked(tmp_path, "B"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with store.locked(tmp_path, "B"):  # released with its holder, SIGKILL included
        store.repair(tmp_path, "B")
    assert store.leftovers(tmp_path) == []
