"""README command 1 as a new user runs it: a fresh clone, ``python run.py``, timed; what it printed.

    python benchmarks/command1_time.py             # clone HEAD into a temporary folder, run it, write the JSON
    python benchmarks/command1_time.py --keep DIR  # clone into DIR and keep it (its run folder, its logs)

The clone has no ``data/``, ``cache/`` or ``runs/``, so the run generates the embedded benchmark,
computes its features, trains, selects and evaluates, as on a new machine. The install (``pip install``)
is not part of the time (it depends on the network); the clone's ``run.py`` runs with this
interpreter, whose environment must hold pdmer's dependencies. Writes
``benchmarks/results/command1/<machine>.json``: the wall time and the time of each phase (from the run's
log), the cores, the commit, and the gain the run printed with its 95 % interval; ``python run.py
tables`` puts the latest such figure in the README, beside the per-seed times of the table's runs.
HEAD must be committed (the clone is of HEAD).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "command1"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ ")


def _phases(log: Path, start: float) -> dict[str, float]:
    """Minutes from the start to the first training log line, to the first validation, to the last, to the rule choice."""
    marks: dict[str, float] = {}
    if not log.is_file():
        return marks
    for line in log.read_text().splitlines():
        m = STAMP.match(line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
        if "pdmer.training.loop: run " in line:
            marks.setdefault("data_and_features", t)
        elif "val personalized" in line:
            marks.setdefault("first_checkpoint", t)
            marks["last_checkpoint"] = t
        elif "safe personalization: weights" in line:
            marks["rule_chosen"] = t
    return {k: round((v - start) / 60, 2) for k, v in marks.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, default=None, help="clone into this (new) folder and keep it")
    args = ap.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    holder = None if args.keep else tempfile.TemporaryDirectory(prefix="pdmer-command1-")
    root = args.keep or Path(holder.name)
    clone = root / "pdmer"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDMER_")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "run.py"], cwd=clone, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    (root / "command1.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"command 1 failed (exit {proc.returncode}); its output is in {root / 'command1.log'}")
    runs = sorted((clone / "runs").glob("pdmer.synthetic.dsaml-*/results.json"))
    results = json.loads(runs[-1].read_text())
    gain = results["paired"]["personalized"]["ccc_mean"]
    out = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip(),
        "uncommitted_changes": bool(dirty.stdout.strip()),
        "machine": platform.node(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "minutes": round(wall / 60, 2),
        "phases_minutes": _phases(runs[-1].parent / "train.log", t0),
        "what": "fresh clone, `python run.py` (no install), benchmark generation, features, training, evaluation",
        "gain_ccc_mean": results["gain_ccc_mean"],
        "gain_ci95": [gain["ci95"][0], gain["ci95"][1]],
        "weights": results["personalization"]["weights"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', platform.node()) or 'machine'}.json").write_text(
        json.dumps(out, indent=2) + "\n"
    )
    print(json.dumps(out, indent=2))
    if holder is not None:
        holder.cleanup()
    return out


if __name__ == "__main__":
    main()
