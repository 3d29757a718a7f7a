"""The multirate CQT (``features.cqt: multirate``) against the exact one, and the option itself.

The multirate CQT is an approximation of the exact one, not a copy: these tests bound how far
apart they are on synthesised signals (sinusoids across C1..B7, a chord, white and brown noise,
clicks) in the quantities the descriptor takes from the CQT, namely the strongest bin, the
per-frame chroma and the magnitude-weighted pitch register, and check that both have the same
frames. Interior frames only where stated: within the lowest kernel's half-length (0.26 s) of a
song's ends both CQTs see padding (reflected at their own rates), and a lone high sinusoid's
reflection there gives broadband edge energy that differs between them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from pdmer.config import ConfigError, FeatureConfig, config_hash, load_config
from pdmer.features import descriptor as desc
from pdmer.features.audio import resample
from pdmer.features.cache import FeatureExtractor, settings_hash, settings_key

SR = 44100
EXACT, MULTIRATE = FeatureConfig(), FeatureConfig(cqt="multirate")
EDGE = 13  # CQT frames (20 ms) within half the lowest kernel (0.26 s) of a song's ends
PITCHES = [24, 31, 38, 45, 52, 59, 64, 69, 76, 83, 88, 95, 100, 107]  # C1 .. B7


def _tones(midis: list[int], seconds: float, amp: float) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return sum(amp * np.sin(2 * np.pi * 440.0 * 2 ** ((m - 69) / 12) * t) for m in midis).astype(np.float32)


def _exact(x: np.ndarray, n_frames: int) -> np.ndarray:
    return desc.cqt_magnitude(resample(x, SR, 22050), 22050, n_frames, 441)


def _multirate(x: np.ndarray, n_frames: int) -> np.ndarray:
    return desc.multirate_cqt_magnitude(x, SR, n_frames, 0.02)


@pytest.mark.parametrize("midi", PITCHES)
def test_sinusoid_same_bin_and_magnitude(midi):
    x = _tones([midi], 1.5, 0.3)
    E, M = _exact(x, 75), _multirate(x, 75)
    mid = slice(EDGE, -EDGE)
    assert E.shape == M.shape == (75, 84)
    assert (M[mid].argmax(axis=1) == midi - desc.CQT_MIDI0).all()
    assert (E[mid].argmax(axis=1) == midi - desc.CQT_MIDI0).all()
    ratio = M[mid, midi - desc.CQT_MIDI0].mean() / E[mid, midi - desc.CQT_MIDI0].mean()
    assert abs(ratio - 1.0) < 0.01  # measured within 0.4 % at every octave


def test_noise_level_per_octave():
    """Stationary noise gives the same magnitude per octave: the octaves' relative scale is kept."""
    x = (0.1 * np.random.default_rng(0).standard_normal(2 * SR)).astype(np.float32)
    E, M = _exact(x, 100), _multirate(x, 100)
    per_octave = (M[EDGE:-EDGE].mean(axis=0) / E[EDGE:-EDGE].mean(axis=0)).reshape(7, 12).mean(axis=1)
    np.testing.assert_allclose(per_octave, 1.0, atol=0.01)  # measured within 0.4 %


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    brown = np.cumsum(0.01 * rng.standard_normal(2 * SR))
    brown -= np.convolve(brown, np.ones(441) / 441, mode="same")  # no drift below 100 Hz
    sigs = {f"tone {m}": _tones([m], 2.0, 0.3) for m in PITCHES}
    sigs["chord"] = _tones([36, 48, 52, 55, 60, 64, 67, 76], 2.0, 0.1)
    sigs["white noise"] = (0.1 * rng.standard_normal(2 * SR)).astype(np.float32)
    sigs["brown noise"] = brown.astype(np.float32)
    return sigs


def test_chroma_and_pitch_register_close():
    """The descriptor's CQT frame features (``frame_features``): chroma and pitch register."""
    for name, x in _signals().items():
        a, b = desc.frame_features(x, EXACT), desc.frame_features(x, MULTIRATE)
        assert a["chroma"].shape == b["chroma"].shape == (100, 12), name
        chroma = np.abs(a["chroma"] - b["chroma"])  # each frame sums to 1
        assert chroma.mean() < 0.002, name  # measured below 0.001
        assert chroma.sum(axis=1).max() < 0.05, name  # per-frame L1, edges included; measured below 0.04
        semitones = 12.0 * np.abs(a["cqt_pitch"] - b["cqt_pitch"])[EDGE:-EDGE]
        assert semitones.mean() < 0.05 and semitones.max() < 0.3, name


@pytest.mark.parametrize("seconds", [0.74, 1.5])
def test_click_peaks_in_the_same_frame(seconds):
    x = np.zeros(3 * SR, dtype=np.float32)
    x[int(round(seconds * SR))] = 1.0
    frame = int(round(seconds / 0.02))
    for C in (_exact(x, 150), _multirate(x, 150)):
        per_octave = C.reshape(-1, 7, 12).sum(axis=2)  # (frames, octaves)
        assert (per_octave.argmax(axis=0) == frame).all()


@pytest.mark.parametrize("n", [SR, int(1.37 * SR), 882 * 50 - 3, 882 * 50 - 2, 882 * 50 - 1, 5000])
def test_same_frame_count(n):
    """Lengths around a frame boundary included, where the two resampled lengths round differently."""
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    assert _exact(x, 10**6).shape == _multirate(x, 10**6).shape


def test_option_changes_the_cache_key_only_when_multirate():
    assert settings_key(EXACT)["descriptor_version"] == desc.DESCRIPTOR_VERSION  # old caches still hit
    assert settings_key(MULTIRATE)["descriptor_version"] != desc.DESCRIPTOR_VERSION
    assert settings_hash(EXACT) != settings_hash(MULTIRATE)
    default = load_config("pdmer.synthetic.dsaml")
    assert config_hash(load_config("pdmer.synthetic.dsaml", ["features.cqt=exact"])) == config_hash(default)
    assert config_hash(load_config("pdmer.synthetic.dsaml", ["features.cqt=multirate"])) != config_hash(default)


def test_unknown_option_is_an_error():
    with pytest.raises(ConfigError, match="features.cqt"):
        load_config("pdmer.synthetic.dsaml", ["features.cqt=fast"])
    with pytest.raises(ConfigError, match="features.cqt='fast'"):
        FeatureExtractor(FeatureConfig(cqt="fast"), use_cache=False)
    with pytest.raises(ConfigError, match="features.cqt"):
        desc.frame_features(np.zeros(SR, dtype=np.float32), FeatureConfig(cqt="fast"))


def test_speed_script_runs(tmp_path):
    """``benchmarks/cqt_speed.py`` on a short song, so that the script cannot rot (its figures are not these)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cqt_speed.py"
    spec = importlib.util.spec_from_file_location("cqt_speed", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "cqt.json"
    assert script.main(["--song-s", "3", "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["times"]) == {"cqt", "descriptor", "features"}
    assert res["chroma_mean_abs_diff"] < 0.002
    assert "speed-up" in script.table(res)


def test_accuracy_table_compares_the_two_descriptors_reproductions(tmp_path):
    """The README's accuracy table reads both reproductions of an experiment and says which metric got worse."""
    from pdmer.config import load_config
    from pdmer.reproduce import base_hash

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "cqt_speed.py"
    spec = importlib.util.spec_from_file_location("cqt_speed", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    name = "pdmer.synthetic.dsaml"
    published = tmp_path / "published"  # what `run.py tables` copies to experiments/results/
    published.mkdir()
    for kind, rmse in (("exact", 0.40), ("multirate", 0.45)):
        metric = {m: {"mean": 0.1, "std": 0.01} for m in script.ACCURACY_METRICS}
        metric["rmse_arousal"] = {"mean": rmse, "std": 0.01}
        table = {
            "experiment": name,
            "config_hash": base_hash(load_config(name, [f"features.cqt={kind}"])),
            "seeds": [0, 1, 2],
            "date": "2026-12-02",
            "test": {"generic": metric, "personalized": metric},
        }
        if kind == "exact":  # this machine's reproduction
            (tmp_path / "reproduce" / kind).mkdir(parents=True)
            (tmp_path / "reproduce" / kind / "table.json").write_text(json.dumps(table))
        else:  # a published copy only: a machine that never ran it regenerates the table too
            (published / f"{name}-{table['config_hash']}.json").write_text(json.dumps(table))
    text = script.accuracy_table(tmp_path, published)
    row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` generic"))
    assert "0.400 ± 0.010 / 0.450 ± 0.010 (+0.050, **worse**)" in row
    assert row.count("within the seed spread") == len(script.ACCURACY_METRICS) - 1
    assert "| `pdmer.vgmidi.dsaml` | not run yet with the exact and multirate descriptor" in text
