"""The embedded benchmark: layout, determinism, listener model, calibration, audio."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from scipy.signal import butter, find_peaks, sosfilt

from pdmer.config import SyntheticConfig
from pdmer.data import synthetic as S
from pdmer.data.synthetic import (
    FACTORS,
    REAL_LISTENER_TARGETS,
    ListenerParams,
    calibration_stats,
    consensus_curve,
    deam_calibration_stats,
    generate,
    load_synthetic,
    personal_curve,
    simulate,
)
from pdmer.data.types import STEP_S, Curve, Dataset, Song

DEAM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "deam"
SMALL = SyntheticConfig(
    n_clips=6,
    n_long=1,
    long_min_s=60.0,
    long_max_s=75.0,
    n_listeners=8,
    min_songs_per_listener=3,
    max_songs_per_listener=5,
)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn") / "bench"
    generate(SMALL, root)
    return root


def read_rows(path: Path) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    out = defaultdict(list)
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        assert r.fieldnames == ["song_id", "annotator_id", "time_s", "valence", "arousal"]
        for row in r:
            out[row["song_id"], row["annotator_id"]].append(
                (float(row["time_s"]), float(row["valence"]), float(row["arousal"]))
            )
    return out


# ---------------------------------------------------------------------------- layout, round trip


def test_layout(small_root):
    for name in ("ratings.csv", "oracle.csv", "consensus.csv", "listeners.json", "factors.npz", "meta.json"):
        assert (small_root / name).is_file(), name
    assert not list(small_root.parent.glob(".bench.tmp-*")), "temporary folder left behind"
    meta = json.loads((small_root / "meta.json").read_text())
    assert meta["config"] == dataclasses.asdict(SMALL)
    assert meta["version"] == S.GENERATOR_VERSION and meta["timing_s"]["total"] > 0
    ids = [f"clip_{i:03d}" for i in range(6)] + ["long_000"]
    fz = np.load(small_root / "factors.npz")
    assert list(fz["factor_names"]) == list(FACTORS)
    for sid in ids:
        info = sf.info(small_root / "audio" / f"{sid}.wav")
        assert (info.samplerate, info.channels, info.subtype) == (44100, 1, "PCM_16")
        f = fz[sid]
        assert f.shape == (round(info.frames / 44100 / STEP_S), len(FACTORS))
        assert np.all(np.abs(f) <= 1)
        assert np.all(f.std(0) > 0), "factors move within a song"
    assert sf.info(small_root / "audio" / "clip_000.wav").frames == 45 * 44100
    assert 60 <= sf.info(small_root / "audio" / "long_000.wav").duration <= 75
    lj = json.loads((small_root / "listeners.json").read_text())
    assert sorted(lj["listeners"]) == [f"L{i:03d}" for i in range(8)]
    rated = read_rows(small_root / "ratings.csv")
    for lid, entry in lj["listeners"].items():
        songs = sorted(s for s, a in rated if a == lid)
        assert 3 <= len(songs) <= 5 and sorted(entry["songs"]) == songs
        for p in [entry["base"], *entry["songs"].values()]:
            assert 0 <= p["lag_s"] <= 3 and p["tau_s"] > 0 and min(p["gain"].values()) > 0
            assert set(p["weight_dev"]["arousal"]) == set(FACTORS)
    cons = read_rows(small_root / "consensus.csv")
    assert sorted(cons) == [(sid, "consensus") for sid in ids]
    assert set(read_rows(small_root / "oracle.csv")) == set(rated)


def test_round_trip_through_load_generic(small_root):
    mtime = (small_root / "meta.json").stat().st_mtime_ns
    ds = load_synthetic(SMALL, small_root)
    assert (small_root / "meta.json").stat().st_mtime_ns == mtime, "matching meta.json: no regeneration"
    sim = simulate(SMALL)
    assert set(ds.songs) == {s.song_id for s in sim.songs}
    assert all(s.path.is_file() for s in ds.songs.values())
    assert len(ds.curves) == len(sim.ratings)
    for c in ds.curves:
        np.testing.assert_allclose(c.values, sim.ratings[c.annotator_id, c.song_id].values, atol=6e-5)
        assert c.start_step == 30
    assert set(ds.oracle) == set(sim.oracle)
    for k, c in ds.oracle.items():
        np.testing.assert_allclose(c.values, sim.oracle[k].values, atol=6e-5)
    for sid, c in ds.consensus.items():
        np.testing.assert_allclose(c.values, sim.consensus[sid].values, atol=6e-5)
    assert ds.info["synthetic"]["config_hash"] == S.config_hash(SMALL)
    a, b = calibration_stats(ds), calibration_stats(sim.to_dataset())
    for fig in ("frame_std", "spread", "within"):
        for lab in ("arousal", "valence"):
            assert a[fig][lab] == pytest.approx(b[fig][lab], abs=1e-3)


def test_time_grid(small_root):
    fz = np.load(small_root / "factors.npz")
    for name in ("ratings.csv", "oracle.csv", "consensus.csv"):
        for (sid, _), rows in read_rows(small_root / name).items():
            t = np.array([r[0] for r in rows])
            duration = fz[sid].shape[0] * STEP_S
            np.testing.assert_array_equal(t, np.arange(15.0, duration, STEP_S))  # 15 s .. end, every 0.5 s
            v = np.array([r[1:] for r in rows])
            assert np.all(np.abs(v) <= 1)


def test_deterministic_and_seeded(small_root, tmp_path):
    again = generate(SMALL, tmp_path / "again", workers=1)  # also: independent of the worker count
    files = ["ratings.csv", "oracle.csv", "consensus.csv"] + [
        f"audio/{p.name}" for p in sorted((small_root / "audio").iterdir())
    ]
    for name in files:
        assert (again / name).read_bytes() == (small_root / name).read_bytes(), name
    other = tmp_path / "other"
    shutil.copytree(small_root, other)
    ds = load_synthetic(dataclasses.replace(SMALL, seed=1), other)  # meta.json differs: regenerated in place
    assert ds.info["synthetic"]["config"]["seed"] == 1
    assert not list(tmp_path.glob(".other.*")), "temporary or old folder left behind"
    for name in files:
        assert (other / name).read_bytes() != (small_root / name).read_bytes(), name


def test_killed_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "render_audio", boom)
    with pytest.raises(KeyboardInterrupt):
        generate(SMALL, tmp_path / "bench")
    assert list(tmp_path.iterdir()) == []


def test_default_root():
    root = S.default_root(SMALL)
    assert root.parent == Path(__file__).resolve().parents[1] / "data"
    assert root.name.startswith("synthetic-") and len(root.name) == len("synthetic-") + 8
    assert S.default_root(dataclasses.replace(SMALL, seed=1)) != root
    assert S.default_root(dataclasses.replace(SMALL)) == root


# ---------------------------------------------------------------------------- listener model


def _params(**kw) -> ListenerParams:
    base = dict(
        offset=np.zeros(2), gain=np.ones(2), weights=np.zeros((2, len(FACTORS))), lag_s=1.0, tau_s=1.5, noise_sd=0.0
    )
    base.update(kw)
    return ListenerParams(**base)


def test_personal_weights_change_the_shape_not_only_the_level():
    t = np.arange(200) * STEP_S
    factors = np.zeros((200, len(FACTORS)))
    b = FACTORS.index("brightness")
    factors[:, b] = np.where(t < 50, -0.6, 0.6) + 0.2 * np.sin(t / 7)  # a section change and a drift
    w_pos, w_neg = np.zeros((2, len(FACTORS))), np.zeros((2, len(FACTORS)))
    w_pos[0, b], w_neg[0, b] = 0.4, -0.4  # one hears brightness as arousing, the other as calming
    c_pos = personal_curve(factors, _params(weights=w_pos))
    c_neg = personal_curve(factors, _params(weights=w_neg))
    d = c_pos[:, 0] - c_neg[:, 0]
    assert np.std(d - d.mean()) > 0.2, "beyond a constant offset"
    assert np.corrcoef(c_pos[:, 0], factors[:, b])[0, 1] > 0.9
    assert np.corrcoef(c_neg[:, 0], factors[:, b])[0, 1] < -0.9
    np.testing.assert_allclose(c_pos[:, 1], c_neg[:, 1])  # valence weights equal
    # no offset can map one onto the other: the best constant shift leaves a large error
    assert np.abs(d - d.mean()).max() > 0.3


def test_generated_personal_curves_differ_in_shape():
    sim = simulate(dataclasses.replace(SMALL, n_listeners=20))
    resid = []
    for (_lid, sid), c in sim.oracle.items():
        d = c.values - sim.consensus[sid].values  # (T, 2)
        resid.append(np.std(d - d.mean(0), axis=0).max())
    assert np.median(resid) > 0.01


def test_consensus_is_the_population_average():
    rng = np.random.default_rng(3)
    factors = S.song_factors(rng, 120.0, is_long=True)
    cfg = SyntheticConfig()
    z = rng.standard_normal((3000, S.N_LATENT))
    mean = np.mean([personal_curve(factors, ListenerParams.from_latent(zi, cfg)) for zi in z], axis=0)  # (T, 2)
    cons = consensus_curve(factors)
    assert np.abs(mean - cons).max() < 0.03
    assert np.corrcoef(mean[:, 0], cons[:, 0])[0, 1] > 0.98


def _pair_r(sim: S.Simulation, get) -> float:
    """Correlation of a parameter between consecutive rated songs of the same listener."""
    by_l = defaultdict(list)
    for (lid, _sid), p in sorted(sim.params.items()):
        by_l[lid].append(np.atleast_1d(get(p)))
    x, y = [], []
    for vals in by_l.values():
        for a, b in zip(vals, vals[1:], strict=False):
            x.append(a)
            y.append(b)
    return float(np.corrcoef(np.concatenate(x), np.concatenate(y))[0, 1])


GETTERS = {
    "weights": lambda p: p.weights.ravel(),
    "log_gain": lambda p: np.log(p.gain),
    "lag": lambda p: p.lag_s,
    "log_tau": lambda p: np.log(p.tau_s),
    "offset": lambda p: p.offset,
}


def test_carryover_one_keeps_the_listener():
    cfg = dataclasses.replace(SMALL, n_listeners=10, carryover=1.0, offset_carryover=1.0)
    sim = simulate(cfg)
    for (lid, _sid), p in sim.params.items():
        b = sim.base[lid]
        for get in GETTERS.values():
            np.testing.assert_allclose(get(p), get(b), rtol=1e-12, atol=1e-12)
    # the offsets have their own knob
    sim = simulate(dataclasses.replace(cfg, offset_carryover=0.1))
    assert all(np.allclose(p.weights, sim.base[lid].weights) for (lid, _), p in sim.params.items())
    assert not any(np.allclose(p.offset, sim.base[lid].offset) for (lid, _), p in sim.params.items())


def test_carryover_zero_gives_uncorrelated_songs():
    cfg = dataclasses.replace(
        SMALL,
        n_clips=20,
        n_long=0,
        n_listeners=150,
        min_songs_per_listener=6,
        max_songs_per_listener=8,
        carryover=0.0,
        offset_carryover=0.0,
    )
    sim0 = simulate(cfg)
    sim5 = simulate(dataclasses.replace(cfg, carryover=0.5, offset_carryover=0.5))
    for name, get in GETTERS.items():
        assert abs(_pair_r(sim0, get)) < 0.1, name
        assert 0.35 < _pair_r(sim5, get) < 0.65, name


def test_default_offset_carryover_is_low():
    assert SyntheticConfig().offset_carryover == pytest.approx(0.1)
    with pytest.raises(ValueError, match="offset_carryover"):
        simulate(dataclasses.replace(SMALL, offset_carryover=1.5))


# ---------------------------------------------------------------------------- calibration


def test_calibration_stats_by_hand():
    a1 = np.array([[0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.5, 0.6], [0.2, 0.3, 0.4, 0.5]])  # song s1, raters X Y Z
    a2 = np.array([[0.0] * 4, [0.2] * 4, [0.4] * 4])  # song s2
    curves = [
        Curve(sid, r, 30, np.stack([m[i], -m[i]], axis=1))
        for sid, m in (("s1", a1), ("s2", a2))
        for i, r in enumerate("XYZ")
    ]
    ds = Dataset("t", Path("."), {s: Song(s, Path(s)) for s in ("s1", "s2")}, curves)
    st = calibration_stats(ds, window_steps=4)
    for lab in ("arousal", "valence"):
        assert st["frame_std"][lab] == pytest.approx((0.1 + 0.2) / 2)
        assert st["spread"][lab] == pytest.approx(np.std([0.35, 0.2]))
        assert st["within"][lab] == pytest.approx(np.std([0.2, 0.3, 0.4, 0.5]) / 2)
        assert st["slider_r"][lab] == pytest.approx(-1.0)
    # mean offset from the other two raters: X -0.15 / -0.3, Y 0.15 / 0, Z 0 / 0.3 (arousal)
    x = [-0.15, -0.3, 0.15, 0.0, 0.0, 0.3]
    y = [-0.3, -0.15, 0.0, 0.15, 0.3, 0.0]
    assert st["offset_r"]["arousal"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert st["raters_per_song"] == 3 and st["n_songs"] == 2


needs_deam = pytest.mark.skipif(
    not DEAM.is_dir(), reason=f"real DEAM files not found at {DEAM} (shared data folder absent)"
)


@needs_deam
def test_deam_figures_match_an_independent_reading():
    st = deam_calibration_stats(DEAM)
    for lab in ("arousal", "valence"):
        sd = np.genfromtxt(DEAM / f"2013_{lab}_cont_std.csv", delimiter=",", skip_header=1)[:, 1:]
        avg = np.genfromtxt(DEAM / f"2013_{lab}_cont_average.csv", delimiter=",", skip_header=1)[:, 1:]
        assert st["frame_std"][lab] == pytest.approx(np.nanmean(sd))
        assert st["spread"][lab] == pytest.approx(np.std(np.nanmean(avg, 1)))
        assert st["within"][lab] == pytest.approx(np.mean(np.nanstd(avg, 1)))
    assert st["n_songs"] == 744
    # the figures the defaults are calibrated to
    assert st["frame_std"]["arousal"] == pytest.approx(0.337, abs=0.005)
    assert st["within"]["valence"] == pytest.approx(0.032, abs=0.003)


@needs_deam
def test_defaults_are_calibrated_to_deam():
    real = deam_calibration_stats(DEAM)
    syn = calibration_stats(simulate(SyntheticConfig()).to_dataset())  # the default benchmark, no audio
    for fig in ("frame_std", "spread", "within"):
        for lab in ("arousal", "valence"):
            ratio = syn[fig][lab] / real[fig][lab]
            assert 0.5 < ratio < 2.0, f"{fig} {lab}: synthetic {syn[fig][lab]:.3f} vs DEAM {real[fig][lab]:.3f}"
    for lab in ("arousal", "valence"):
        assert abs(syn["offset_r"][lab]) < REAL_LISTENER_TARGETS["offset_r"], syn["offset_r"]
        target = REAL_LISTENER_TARGETS["slider_r"]
        assert target / 2 < syn["slider_r"][lab] < target * 2, syn["slider_r"]
    assert 8 <= syn["raters_per_song"] <= 20  # DEAM 2013: about 10 raters per song


# ---------------------------------------------------------------------------- audio follows the factors


def _render(col: str, value: float, seconds: float = 20.0, seed: int = 0) -> np.ndarray:
    f = np.zeros((int(seconds / STEP_S), len(FACTORS)))
    f[:, FACTORS.index(col)] = value
    return S.render_song(f, seconds, np.random.default_rng(seed))


def _power(x: np.ndarray, n: int = 1 << 14) -> tuple[np.ndarray, np.ndarray]:
    fr = x[: len(x) // n * n].reshape(-1, n)
    p = (np.abs(np.fft.rfft(fr * np.hanning(n), axis=1)) ** 2).sum(0)
    return np.fft.rfftfreq(n, 1 / 44100), p


def _centroid(x: np.ndarray, fmax: float = 22050) -> float:
    f, p = _power(x)
    ok = f < fmax
    return float((f[ok] * p[ok]).sum() / p[ok].sum())


def _chroma(x: np.ndarray) -> np.ndarray:
    f, p = _power(x, 1 << 15)
    ok = (f > 60) & (f < 2000)
    pc = np.round(12 * np.log2(f[ok] / 440) + 69).astype(int) % 12
    c = np.bincount(pc, weights=p[ok], minlength=12)
    return c / c.sum()


def _hat_rate(x: np.ndarray) -> float:
    h = sosfilt(butter(4, 4000, "hp", fs=44100, output="sos"), x)
    e = np.sqrt((h[: len(h) // 220 * 220].reshape(-1, 220) ** 2).mean(1))  # 5 ms energy
    peaks, _ = find_peaks(e, prominence=0.1 * e.max(), distance=5)
    return len(peaks) / (len(x) / 44100)


def test_audio_follows_the_factors():
    levels = (-0.8, 0.0, 0.8)
    rms = [np.sqrt(np.mean(_render("loudness", v) ** 2)) for v in levels]
    assert rms[0] < rms[1] < rms[2] and 20 * np.log10(rms[2] / rms[0]) > 10
    cent = [_centroid(_render("brightness", v)) for v in levels]
    assert cent[0] < cent[1] < cent[2] and cent[2] > 1.5 * cent[0]
    low = [_centroid(_render("register", v), fmax=2000) for v in levels]
    assert low[0] < low[1] < low[2]
    rate = [_hat_rate(_render("tempo", v)) for v in levels]
    assert rate[0] < rate[1] < rate[2] and rate[2] > 2 * rate[0]
    # mode: major minus minor chroma shows the raised 3rd, 6th, 7th against the lowered ones
    d = _chroma(_render("mode", 1.0, 45)) - _chroma(_render("mode", -1.0, 45))
    tmpl = np.zeros(12)
    tmpl[[4, 9, 11]], tmpl[[3, 8, 10]] = 1, -1
    fit = max(np.corrcoef(np.roll(tmpl, k), d)[0, 1] for k in range(12))
    assert fit > 0.8
    # consonance: dissonant bars put energy outside any diatonic scale

    def out_of_scale(c: np.ndarray) -> float:
        major = np.zeros(12)
        major[[0, 2, 4, 5, 7, 9, 11]] = 1
        return min(1 - (c * np.roll(major, k)).sum() for k in range(12))

    assert (
        out_of_scale(_chroma(_render("consonance", -1.0, 45)))
        > out_of_scale(_chroma(_render("consonance", 1.0, 45))) + 0.03
    )
    x = _render("loudness", 1.0)
    assert np.abs(x).max() < 1.0 and x.dtype == np.float32
