"""The benchmark script runs (quick mode, CPU) and reports every figure the README shows."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_script(name: str):
    """A script of ``benchmarks/`` imported as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        "log_mel_model_rtf",
    ):
        assert math.isfinite(s[key]) and s[key] > 0, key
    assert res["precisions"]["fp32"]["meta_batched"]["shape"]["tasks"] == 2  # quick shapes
    assert "batched speed-up" in p.stdout and "x real time" in p.stdout and "listeners/s" in p.stdout
    assert res["listeners"]["listeners"] == 2
    assert (res["predict"]["cqt"], res["predict_multirate"]["cqt"]) == ("exact", "multirate")  # both descriptors
    assert "features.cqt=multirate" in p.stdout
    assert res["log_mel"]["song_s"] == res["predict"]["song_s"]  # the same song's log-Mel (no timing compared)
    assert "log-Mel alone" in p.stdout and "the model's windows as they are" in p.stdout


def test_fit_study_scores_model_probe_and_ceiling(tmp_path):
    """``benchmarks/fit_study.py`` on the tiny benchmark, so the script cannot rot (its figures are not these)."""
    from conftest import tiny_overrides

    study = _load_script("fit_study")
    overrides = [o for o in tiny_overrides(tmp_path, "fit") if not o.startswith("train.iterations")]
    args = ["dmer.synthetic.dsaml", *overrides, "model.linear_skip=true", "--iterations", "2", "--every", "1"]
    assert study.main([*args, "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("dmer.synthetic.dsaml-*.json")
    rows = json.loads(path.read_text())["rows"]
    whats = [(r["what"], r["iteration"]) for r in rows]
    assert whats[:3] == [("val consensus", None), ("val ridge", None), ("train fit ridge", None)]
    assert [i for w, i in whats if w == "val model"] == [0, 1, 2]
    # model.linear_skip starts the network at the probe: before the first step both score the same
    probe = {w: r for r, (w, i) in zip(rows, whats, strict=True) if i is None}
    start = {w: r for r, (w, i) in zip(rows, whats, strict=True) if i == 0}
    for k in ("rmse_arousal", "rmse_valence", "ccc_mean"):
        assert start["val model"][k] == pytest.approx(probe["val ridge"][k], abs=1e-4), k
        assert start["train fit model"][k] == pytest.approx(probe["train fit ridge"][k], abs=1e-4), k
    assert probe["val consensus"]["rmse_arousal"] != probe["val ridge"]["rmse_arousal"]


def test_response_study_measures_the_default_response(tmp_path, capsys):
    """``benchmarks/response_study.py --quick`` on the tiny benchmark: one row, the module's constants,
    finite changes over the listeners (its figures are not these)."""
    from conftest import tiny_overrides

    from pdmer import response as R

    study = _load_script("response_study")
    for protocol in ("across", "within"):
        table = study.main(
            ["pdmer.synthetic.dsaml", *tiny_overrides(tmp_path, "resp"), "--quick", "--protocol", protocol]
        )
        ((key, row),) = table.items()
        assert key == ((R.K, R.TAU_STEPS, R.LAGS), R.LAMBDA)
        assert row["listeners"] >= 5 and np.isfinite(row["mean"]).all()
    assert "| 4 | 3 | 0,4 | 0.1 |" in capsys.readouterr().out


def test_audit_folds_study_restores_the_rule_and_finds_no_gain_where_there_is_none(tmp_path):
    """``benchmarks/audit_folds_study.py``: a table row per panel size and population; the null
    population passes rarely, the real one more often; the module's audit settings are left as they were."""
    from pdmer import personalize as P

    study = _load_script("audit_folds_study")
    before = P.CV_FOLDS, P.CV_REPEATS, P.PICK_LEVEL
    text = study.main(["--trials", "20", "--out", str(tmp_path / "t.md")])
    assert (P.CV_FOLDS, P.CV_REPEATS, P.PICK_LEVEL) == before
    rows = [r.split("|")[1:-1] for r in text.splitlines() if r.startswith("| ") and r.split("|")[1].strip().isdigit()]
    assert len(rows) == len(study.LISTENERS) * len(study.SCENARIOS)
    rate = {(int(r[0]), r[1].strip()): [float(x) for x in r[2:]] for r in rows}
    assert max(rate[60, "null"]) <= 0.1 < max(rate[60, "real"])
    assert (tmp_path / "t.md").read_text() == text


def test_command1_timing_reads_the_phases_and_reaches_the_readme(tmp_path, monkeypatch):
    """``benchmarks/command1_time.py``: the phases from a run's log; ``run.py tables`` quotes the latest timing."""
    import json
    from datetime import datetime, timezone

    from pdmer import reproduce

    c1 = _load_script("command1_time")
    log = tmp_path / "train.log"
    log.write_text(
        "2026-12-07 05:08:02,769 INFO pdmer.training.loop: run x: small model\n"
        "2026-12-07 05:09:52,844 INFO pdmer.training.loop: iteration 50: val personalized ccc_mean = 0.04\n"
        "2026-12-07 05:22:47,734 INFO pdmer.training.loop: iteration 400: val personalized ccc_mean = 0.04\n"
        "2026-12-07 05:25:33,312 INFO pdmer.evaluation.split: safe personalization: weights {}\n"
    )
    start = datetime(2026, 12, 7, 5, 6, 2, tzinfo=timezone.utc).timestamp()
    assert c1._phases(log, start) == {
        "data_and_features": 2.0,
        "first_checkpoint": 3.83,
        "last_checkpoint": 16.75,
        "rule_chosen": 19.52,
    }
    monkeypatch.setattr(reproduce, "REPO", tmp_path)
    assert reproduce._command1_figure() is None
    folder = tmp_path / "benchmarks" / "results" / "command1"
    folder.mkdir(parents=True)
    base = {"commit": "a" * 40, "cores": 2, "gain_ccc_mean": 0.043, "gain_ci95": [0.03, 0.056]}
    (folder / "old.json").write_text(json.dumps({**base, "date": "2026-12-01", "minutes": 30.0}))
    (folder / "new.json").write_text(json.dumps({**base, "date": "2026-12-07", "minutes": 16.25}))
    (folder / "broken.json").write_text("{")
    text = reproduce._command1_figure()
    assert "16.2 min on 2 cores (2026-12-07, aaaaaaa)" in text and "[+0.030, +0.056]" in text


def test_response_designs_learns_the_axis_along_which_responses_carry_over():
    """A planted personal response (each listener's own coefficient on one fixed direction of the
    features, the same on every song) is found as the top learned axis; the per-song noise and the
    other directions are not."""
    from pdmer.data.types import Curve

    study = _load_script("response_designs")
    rng = np.random.default_rng(0)
    n_feat, n_songs, steps = 8, 12, 80
    planted = np.zeros(n_feat)
    planted[[2, 5]] = [0.6, -0.8]
    z = {f"s{i}": rng.standard_normal((steps, n_feat)) for i in range(n_songs)}
    curves = []
    for a in range(30):
        coef = rng.standard_normal(2)  # the listener's response, per dimension, carried over
        for i in rng.choice(n_songs, 4, replace=False):
            x = z[f"s{i}"] @ planted  # (steps,)
            fresh = rng.standard_normal((n_feat, 2)) * 0.3  # a response of this song only
            y = x[:, None] * coef[None] + z[f"s{i}"] @ fresh + 0.5 * rng.standard_normal((steps, 2))
            curves.append(Curve(f"s{i}", f"l{a}", 0, y.astype(np.float32)))
    axes = study._carried_axes(z, curves, "across")
    for d in range(2):
        top = axes[d][:, 0]
        assert abs(top @ planted) > 0.95  # unit vectors: cosine
    # with no carried-over part, the top axis is not the planted one
    no_carry = [Curve(c.song_id, c.annotator_id, 0, rng.permutation(c.values)) for c in curves]
    assert abs(study._carried_axes(z, no_carry, "across")[0][:, 0] @ planted) < 0.9


def test_musical_descriptors_follow_loudness_brightness_and_pitch():
    """The ``musical descriptors`` design's three cues, each moved alone on a rendered tone: louder
    raises loudness only, more upper harmonics raise brightness, an octave up raises pitch height
    by about one (log2 of the frequency)."""
    import torch

    from pdmer.config import FeatureConfig
    from pdmer.features.descriptor import mel_centres
    from pdmer.features.local import log_mel

    study = _load_script("response_designs")
    cfg = FeatureConfig()
    t = np.arange(cfg.sample_rate) / cfg.sample_rate

    def cues(f0: float, amp: float, harmonics: int) -> np.ndarray:
        wave = sum(amp / h * np.sin(2 * np.pi * f0 * h * t) for h in range(1, harmonics + 1)).astype(np.float32)
        patch = log_mel(wave, cfg)[:50].reshape(1, 50, -1)  # one step's frames
        return study._descriptors(torch.as_tensor(patch), mel_centres(cfg))[0]  # (loudness, brightness, pitch)

    base = cues(220.0, 0.1, 8)
    louder, brighter, higher = cues(220.0, 0.4, 8), cues(220.0, 0.1, 30), cues(440.0, 0.1, 8)
    assert louder[0] - base[0] == pytest.approx(2 * np.log(4.0), abs=0.05)  # power: amplitude squared
    assert abs(louder[1] - base[1]) < 0.05 and abs(louder[2] - base[2]) < 0.05
    assert brighter[1] > base[1] + 1.0
    assert 0.7 < higher[2] - base[2] < 1.3


def test_variants_table_reads_paired_changes_weights_and_provenance(tmp_path):
    """benchmarks/variants_table.py: one row per results.json, the recorded means and intervals, the
    chosen weights, the commit; a pattern that matches nothing is an error."""
    study = _load_script("variants_table")
    for seed, gain in ((0, 0.04), (1, 0.02)):
        run = tmp_path / f"run{seed}"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"train": {"seed": seed}}))
        cell = lambda m: {"mean": m, "ci95": [m - 0.01, m + 0.01]}  # noqa: E731
        res = {
            "paired": {
                "personalized": {"ccc_mean": cell(gain), "rmse_arousal": cell(-0.002), "rmse_valence": cell(0.001)}
            },
            "personalization": {"weights": {"response": [0.75, 1.0], "maml": [0.0, 0.0]}},
            "evaluated_at": {"commit": "abcdef0123", "dirty": seed == 1},
            "best": {"iteration": 50 * (seed + 1)},
        }
        (run / "results.json").write_text(json.dumps(res))
    out = tmp_path / "t.md"
    study.main([f"mine={tmp_path}/run*/results.json", "--out", str(out)])
    text = out.read_text()
    assert "| mine | 0 | +0.040 [+0.030, +0.050] | -0.002 [-0.012, +0.008] | +0.001 [-0.009, +0.011] |" in text
    assert "| response 0.75/1 | 50 | abcdef0 |" in text
    assert "| mine | 1 | +0.020 [+0.010, +0.030]" in text and "| 100 | abcdef0 (uncommitted changes) |" in text
    with pytest.raises(SystemExit):
        study.main([f"none={tmp_path}/nothing*/results.json"])


def test_response_designs_scores_every_design_on_a_trained_run(tmp_path):
    """``benchmarks/response_designs.py`` on a tiny trained run, so the script cannot rot (its figures
    are not these): every design at both weights, ``true factors`` on the embedded benchmark, and
    ``spectra`` itself is 0 against ``spectra``."""
    from conftest import tiny_overrides

    from pdmer.config import load_config
    from pdmer.training import train

    study = _load_script("response_designs")
    run = train(load_config("pdmer.synthetic.dsaml", tiny_overrides(tmp_path, "designs")))
    out = tmp_path / "designs.md"
    text = study.main([str(run), "--out", str(out)])
    assert out.read_text().strip() == text.strip()
    names = (
        "spectra",
        "spectra + flux",
        "learned personal axes",
        "musical descriptors",
        "network embedding",
        "true factors",
    )
    for name in names:
        for w in study.WEIGHTS:
            (row,) = [line for line in text.splitlines() if line.startswith(f"| {name} | {w:g} |")]
            assert "nan" not in row
    assert all(line.endswith("|  |") for line in text.splitlines() if line.startswith("| spectra |"))
