"""The benchmark script runs (quick mode, CPU) and reports every figure the README shows."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_quick_mode_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    p = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    s = res["summary"]
    for key in (
        "meta_batched_s",
        "meta_sequential_s",
        "meta_speedup",
        "dmer_step_s",
        "calibrate_s",
        "predict_rtf",
        "predict_rtf_multirate",
        "predict_peak_rss_gib",
        "predict_long_peak_rss_gib",
        "listeners_per_s",
        "listeners_batched_per_s",
    ):
        assert math.isfinite(s[key]) and s[key] > 0, key
    assert res["precisions"]["fp32"]["meta_batched"]["shape"]["tasks"] == 2  # quick shapes
    assert "batched speed-up" in p.stdout and "x real time" in p.stdout and "listeners/s" in p.stdout
    assert res["listeners"]["listeners"] == 2
    assert (res["predict"]["cqt"], res["predict_multirate"]["cqt"]) == ("exact", "multirate")  # both descriptors
    assert "features.cqt=multirate" in p.stdout
