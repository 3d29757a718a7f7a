"""Dual-scale features: log-Mel patches, the built-in descriptor, user embeddings, the cache."""

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.signal import get_window

import pdmer.features.cache as cache_mod
import pdmer.features.local as local_mod
from pdmer.config import FeatureConfig
from pdmer.data.types import DataError, Song
from pdmer.features import (
    FeatureExtractor,
    SongFeatures,
    descriptor_dim,
    descriptor_names,
    extract_many,
    extract_waveform,
    global_descriptor,
    load_embeddings,
    local_patches,
    log_mel,
    step_summaries,
    window_bounds,
    window_descriptor,
)
from pdmer.features.descriptor import KK_MAJOR, frame_features, window_mean

SR = 44100
CFG = FeatureConfig()
NAMES = descriptor_names(CFG)
IX = {n: i for i, n in enumerate(NAMES)}
SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
PMEMO = SHARED / "pmemo_samples"


# ---------------------------------------------------------------------------- signals


def _noise(seconds: float, amp: float = 1e-3, seed: int = 0) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(int(round(SR * seconds)))).astype(np.float32)


def _chord(midis, seconds: float, amp: float = 0.3, harmonics: int = 4) -> np.ndarray:
    t = np.arange(int(round(SR * seconds))) / SR
    x = np.zeros_like(t)
    for m in midis:
        f = 440.0 * 2 ** ((m - 69) / 12)
        for h in range(1, harmonics + 1):
            x += np.sin(2 * np.pi * f * h * t) / h
    return (amp * x / len(midis) + _noise(seconds, 1e-4)).astype(np.float32)


def _clicks(bpm: float, seconds: float, amp: float = 0.5) -> np.ndarray:
    x = _noise(seconds, 1e-3).astype(np.float64)
    rng = np.random.default_rng(1)
    n = int(0.02 * SR)
    env = np.exp(-np.arange(n) / (0.004 * SR))
    for s in np.arange(0.1, seconds - 0.05, 60.0 / bpm):
        i = int(s * SR)
        x[i : i + n] += amp * rng.standard_normal(n) * env
    return x.astype(np.float32)


def _music(seconds: float, seed: int = 0) -> np.ndarray:
    """A chord progression over clicks: enough structure for every descriptor block."""
    x = _clicks(100, seconds, 0.3).astype(np.float64)
    chords = [[60, 64, 67], [57, 60, 64], [65, 69, 72], [67, 71, 74]]
    seg = int(2.0 * SR)
    for i, a in enumerate(range(0, len(x), seg)):
        c = _chord(chords[(i + seed) % 4], 2.0, 0.25)
        x[a : a + seg] += c[: len(x) - a]
    return x.astype(np.float32)


# ---------------------------------------------------------------------------- local scale


def test_local_shapes_and_step_count():
    for seconds, n_steps in [(0.5, 1), (3.7, 7), (10.0, 20)]:
        p = local_patches(_noise(seconds, 0.1), CFG)
        assert p.shape == (n_steps, 51, 128) and p.dtype == torch.float16
        assert torch.isfinite(p.float()).all()


def test_impulse_lands_in_the_right_step_and_frame():
    x = _noise(6.0, 1e-4)
    x[int(3.25 * SR)] = 0.9  # frame 325 is centred on it: step 6 (audio [3.0, 3.5)), patch frame 25
    p = local_patches(x, CFG).float()
    energy = p.mean(dim=2)  # (n_steps, 51)
    assert int(energy.max(dim=1).values.argmax()) == 6
    assert int(energy[6].argmax()) == 25
    # the 60 ms window (+-30 ms) reaches frames 23..27 only: neighbours stay at the noise floor
    assert energy[6, 25] > energy[5].max() + 5 and energy[6, 25] > energy[7].max() + 5


def test_tone_burst_shows_in_its_step_not_the_neighbours():
    x = _noise(5.0, 1e-4)
    a, b = int(2.1 * SR), int(2.4 * SR)  # inside step 4 = audio [2.0, 2.5)
    x[a:b] += 0.5 * np.sin(2 * np.pi * 1000 * np.arange(b - a) / SR).astype(np.float32)
    p = local_patches(x, CFG).float()
    level = p.amax(dim=(1, 2))  # loudest Mel band of any frame, per step
    assert int(level.argmax()) == 4
    assert level[4] > level[3] + 5 and level[4] > level[5] + 5
    frame_level = p[4].amax(dim=1)
    assert frame_level[15:35].min() > frame_level[:5].max() + 3  # burst at frames 10..40 of the patch


def test_patches_overlap_by_one_frame():
    p = local_patches(_noise(3.0, 0.1), CFG)
    assert torch.equal(p[0, 50], p[1, 0]) and torch.equal(p[1, 50], p[2, 0])


def _reference_log_mel(x: np.ndarray, n_fft=2646, hop=441, n_mels=128, sr=SR) -> np.ndarray:
    """numpy/scipy STFT (periodic Hann, reflect-centred) + a hand-built HTK filterbank."""
    xp = np.pad(x.astype(np.float64), (n_fft // 2, n_fft // 2), mode="reflect")
    n_frames = 1 + len(x) // hop
    frames = np.lib.stride_tricks.sliding_window_view(xp, n_fft)[::hop][:n_frames]  # (T, n_fft)
    power = np.abs(np.fft.rfft(frames * get_window("hann", n_fft, fftbins=True), axis=1)) ** 2  # (T, F)
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    hz2mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    mel2hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # noqa: E731
    f_pts = mel2hz(np.linspace(hz2mel(0.0), hz2mel(sr / 2), n_mels + 2))
    fb = np.zeros((len(freqs), n_mels))
    for i in range(n_mels):
        lo, c, hi = f_pts[i], f_pts[i + 1], f_pts[i + 2]
        fb[:, i] = np.maximum(0, np.minimum((freqs - lo) / (c - lo), (hi - freqs) / (hi - c)))
    return np.log(power @ fb + 1e-6)


def test_log_mel_matches_an_independent_implementation():
    x = (_chord([57, 64], 2.0, 0.3) + _noise(2.0, 0.02)).astype(np.float32)
    ref = _reference_log_mel(x)
    ours = log_mel(x, CFG).numpy()
    assert ours.shape == ref.shape == (1 + len(x) // 441, 128)
    np.testing.assert_allclose(ours, ref, atol=2e-3)
    # the float16 patches carry the same numbers (rounding < 0.01 in this range)
    p = local_patches(x, CFG).float().numpy()
    np.testing.assert_allclose(p[2], ref[100:151], atol=1e-2)


def test_chunked_stft_equals_one_call(monkeypatch):
    x = _noise(4.0, 0.1)
    monkeypatch.setattr(local_mod, "CHUNK_FRAMES", 37)  # many chunks, ragged last one
    ours = log_mel(x, CFG)
    mel = torchaudio.transforms.MelSpectrogram(SR, n_fft=2646, hop_length=441, n_mels=128, power=2.0, center=True)
    ref = torch.log(mel(torch.from_numpy(x)).T + 1e-6)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_log_mel_is_torchaudios_bit_for_bit():
    """The log-Mel calls torch's STFT and torchaudio's filterbank itself: the numbers of torchaudio's
    transform exactly (so cached features and trained runs stay valid), over several chunks."""
    x = _noise(70.0, 0.1)  # 7001 frames: three chunks of CHUNK_FRAMES, the last ragged
    mel = torchaudio.transforms.MelSpectrogram(SR, n_fft=2646, hop_length=441, n_mels=128, power=2.0, center=True)
    assert torch.equal(log_mel(x, CFG), torch.log(mel(torch.from_numpy(x)).T + 1e-6))


def test_chunked_cqt_equals_one_centred_call(monkeypatch):
    from nnAudio.features import CQT

    import pdmer.features.descriptor as desc_mod

    x = _chord([45, 64], 3.0)[::2].copy()  # 22.05 kHz
    monkeypatch.setattr(desc_mod, "CQT_CHUNK_FRAMES", 29)
    ours = desc_mod.cqt_magnitude(x, 22050, 1 + len(x) // 441, 441)
    ref = CQT(sr=22050, hop_length=441, fmin=desc_mod.CQT_FMIN, n_bins=84, center=True, verbose=False)(
        torch.from_numpy(x)
    )
    ref = ref[0].T.numpy()  # (84, T) -> (T, 84)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * ref.max())


# ---------------------------------------------------------------------------- descriptor


def test_descriptor_shape_finite_deterministic():
    x = _music(12.0)
    g1 = global_descriptor(x, CFG)
    g2 = global_descriptor(x, CFG)
    assert g1.shape == (24, descriptor_dim(CFG)) == (24, len(NAMES)) and g1.dtype == np.float32
    assert len(set(NAMES)) == len(NAMES) and 64 <= len(NAMES) <= 128
    assert np.isfinite(g1).all()
    np.testing.assert_array_equal(g1, g2)
    # a song shorter than the 30 s window: every step sees the whole song
    np.testing.assert_array_equal(g1, np.repeat(g1[:1], 24, axis=0))
    # chroma rotated to the key sums to 12
    key = [IX[f"chroma_key_{i}"] for i in range(12)]
    np.testing.assert_allclose(g1[:, key].sum(axis=1), 12.0, rtol=1e-4)


def test_descriptor_is_finite_on_near_silence_and_noise():
    for x in (_noise(3.0, 2e-4), _noise(3.0, 0.3)):
        assert np.isfinite(global_descriptor(x, CFG)).all()


def test_window_bounds_follow_the_time_convention():
    starts, stops = window_bounds(100, CFG)  # 50 s song, 30 s = 60-step windows
    np.testing.assert_allclose(stops - starts, 60.0)
    assert starts[0] == 0.0 and starts[29] == 0.0 and starts[30] == 0.5  # centre (k + 0.5) * 0.5 s
    assert starts[50] == 20.5 and stops[50] == 80.5
    assert stops[-1] == 100.0 and starts[70] == 40.0  # shifted inside the song at the end
    s2, e2 = window_bounds(20, CFG)
    assert (s2 == 0).all() and (e2 == 20).all()


def test_window_mean_equals_brute_force():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    starts = np.array([0.0, 3.5, 10.25, 39.0, 0.0])
    stops = np.array([40.0, 9.5, 12.75, 40.0, 0.5])
    got = window_mean(x, starts, stops)
    for j, (a, b) in enumerate(zip(starts, stops, strict=False)):
        w = np.clip(np.minimum(np.arange(40) + 1, b) - np.maximum(np.arange(40), a), 0, 1)  # overlap of each step
        np.testing.assert_allclose(got[j], (w[:, None] * x).sum(0) / (b - a), rtol=1e-12)


def test_window_statistics_by_cumsum_equal_direct_computation():
    x = _music(40.0)  # 80 steps: clipped windows at both ends, half-step edges in the middle
    ff = frame_features(x, CFG)
    s = step_summaries(x, CFG)
    g = window_descriptor(s, *window_bounds(80, CFG), CFG)
    starts, stops = window_bounds(80, CFG)
    for k in (0, 10, 40, 79):
        a, b = starts[k], stops[k]
        # direct: weighted frame statistics; a step half inside the window weighs 1/2
        w = np.clip(np.minimum(np.arange(80) + 1, b) - np.maximum(np.arange(80), a), 0, 1)  # (80,)
        w10, w20 = np.repeat(w, 50), np.repeat(w, 25)  # per frame, 10 ms and 20 ms (CQT) grids

        def stats(v, wf):
            m = (wf[:, None] * v).sum(0) / wf.sum()
            return m, np.sqrt((wf[:, None] * (v - m) ** 2).sum(0) / wf.sum())

        mean, std = stats(ff["frame"], w10)
        np.testing.assert_allclose(g[k, IX["mel_mean_0"] : IX["mel_mean_31"] + 1], (mean[:32] + 5) / 5, atol=1e-5)
        np.testing.assert_allclose(g[k, IX["mel_std_0"] : IX["mel_std_31"] + 1], std[:32] / 2, atol=1e-4)
        np.testing.assert_allclose(g[k, [IX["onset_mean"], IX["onset_std"]]], [mean[32], std[32]], atol=1e-5)
        np.testing.assert_allclose(g[k, [IX["rms_mean"], IX["rms_std"]]], [mean[33] / 20, std[33] / 10], atol=1e-5)
        np.testing.assert_allclose(g[k, [IX["centroid_mean"], IX["centroid_std"]]], [mean[34], std[34]], atol=1e-5)
        np.testing.assert_allclose(
            g[k, [IX["flatness_mean"], IX["flatness_std"]]], [mean[35] / 5, std[35] / 5], atol=1e-5
        )
        peaks = (w10 * ff["onset_peak"]).sum()
        assert g[k, IX["onset_rate"]] == pytest.approx(peaks / ((b - a) * 0.5) / 4, abs=1e-5)
        pm, ps = stats(ff["cqt_pitch"][:, None], w20)
        np.testing.assert_allclose(g[k, [IX["pitch_mean"], IX["pitch_std"]]], [pm[0], ps[0]], atol=1e-5)
        chroma = (w20[:, None] * ff["chroma"]).sum(0) / w20.sum()
        r_major = max(np.corrcoef(chroma, np.roll(KK_MAJOR, r))[0, 1] for r in range(12))
        assert g[k, IX["mode_major"]] == pytest.approx(r_major, abs=1e-4)
    # steps whose window is clipped to the song start share it
    np.testing.assert_array_equal(g[0], g[29])
    assert not np.array_equal(g[29], g[30])


def test_louder_signal_moves_loudness_dims_only_by_the_gain():
    x = _music(8.0)
    g1, g2 = global_descriptor(x, CFG)[0], global_descriptor(4 * x, CFG)[0]  # +12.04 dB
    assert g2[IX["rms_mean"]] - g1[IX["rms_mean"]] == pytest.approx(20 * np.log10(4) / 20, abs=2e-3)
    assert g2[IX["rms_std"]] == pytest.approx(g1[IX["rms_std"]], abs=2e-3)
    low_bands = [IX[f"mel_mean_{i}"] for i in range(4, 16)]  # well above the 1e-6 floor
    np.testing.assert_allclose(g2[low_bands] - g1[low_bands], np.log(16) / 5, atol=0.02)
    for name in ("pitch_mean", "mode_major", "mode_minor", "tempo"):
        assert g2[IX[name]] == pytest.approx(g1[IX[name]], abs=1e-3)


def test_brighter_and_higher_signal_moves_centroid_and_pitch():
    low = global_descriptor(_chord([48], 6.0), CFG)[0]  # C3
    high = global_descriptor(_chord([84], 6.0), CFG)[0]  # C6
    assert high[IX["centroid_mean"]] - low[IX["centroid_mean"]] > 2.0  # octaves
    assert high[IX["pitch_mean"]] - low[IX["pitch_mean"]] == pytest.approx(3.0, abs=0.3)
    assert high[IX["mel_mean_31"]] >= low[IX["mel_mean_31"]]


def test_faster_signal_moves_onset_rate_and_tempo():
    slow = global_descriptor(_clicks(60, 12.0), CFG)[0]
    fast = global_descriptor(_clicks(120, 12.0), CFG)[0]
    assert slow[IX["onset_rate"]] * 4 == pytest.approx(1.0, abs=0.3)  # onsets per second
    assert fast[IX["onset_rate"]] * 4 == pytest.approx(2.0, abs=0.3)
    assert slow[IX["tempo"]] == pytest.approx(-1.0, abs=0.1)  # log2(60 / 120)
    assert fast[IX["tempo"]] == pytest.approx(0.0, abs=0.1)
    assert fast[IX["pulse_clarity"]] > 0.5 and slow[IX["pulse_clarity"]] > 0.5


def test_mode_features_are_key_invariant_and_tell_major_from_minor():
    c_major = global_descriptor(_chord([60, 64, 67], 6.0), CFG)[0]
    g_major = global_descriptor(_chord([55, 59, 62], 6.0), CFG)[0]
    c_minor = global_descriptor(_chord([60, 63, 67], 6.0), CFG)[0]
    assert c_major[IX["mode_diff"]] > 0.05 > -0.05 > c_minor[IX["mode_diff"]]
    tonal = [IX[n] for n in NAMES if n.startswith(("chroma_key", "mode_"))]
    np.testing.assert_allclose(c_major[tonal], g_major[tonal], atol=0.05)
    noise = global_descriptor(_noise(6.0, 0.2), CFG)[0]
    assert noise[IX["tonalness"]] < 0.1 < c_major[IX["tonalness"]]
    assert noise[IX["flatness_mean"]] > c_major[IX["flatness_mean"]]


def test_long_song_is_handled_per_step():
    x = np.concatenate([0.1 * _music(30.0), _music(30.0, seed=1)])  # quiet then loud, 60 s
    g = global_descriptor(x, CFG)
    assert g.shape == (120, descriptor_dim(CFG)) and np.isfinite(g).all()
    rms = g[:, IX["rms_mean"]]
    assert rms[-1] > rms[60] > rms[0]
    assert np.all(np.diff(rms[29:91]) > 0)  # the window slides through the change


# ---------------------------------------------------------------------------- extractor and cache


def _write(path: Path, x: np.ndarray, sr: int = SR) -> Path:
    sf.write(path, x, sr, subtype="FLOAT")
    return path


def test_song_features_and_slice():
    f = extract_waveform(_music(5.0), SR, CFG, song_id="a")
    assert isinstance(f, SongFeatures) and f.n_steps == 10 and f.song_id == "a"
    assert f.local.shape == (10, 51, 128) and f.local.dtype == torch.float16
    assert f.global_.shape == (10, descriptor_dim(CFG)) and f.global_.dtype == torch.float32
    s = f.slice(2, 6)
    assert s.n_steps == 4 and torch.equal(s.local, f.local[2:6]) and torch.equal(s.global_, f.global_[2:6])
    with pytest.raises(ValueError, match="same n_steps"):
        SongFeatures(f.local, f.global_[:3])


def test_waveform_path_equals_file_path_and_resamples(tmp_path):
    x = _music(4.0)
    p = _write(tmp_path / "s.wav", x)
    from_file = FeatureExtractor(CFG, tmp_path / "cache")(p)
    from_wave = extract_waveform(x, SR, CFG, song_id="s")
    assert from_file.song_id == "s"
    torch.testing.assert_close(from_file.local, from_wave.local, atol=0, rtol=0)
    torch.testing.assert_close(from_file.global_, from_wave.global_, atol=0, rtol=0)
    stereo_22k = np.stack([x[::2], x[::2]], axis=1)
    assert extract_waveform(stereo_22k, 22050, CFG).n_steps == 8


def test_too_short_song_is_an_error(tmp_path):
    p = _write(tmp_path / "short.wav", _noise(0.3, 0.1))
    with pytest.raises(DataError, match="short.wav.*shorter than one"):
        FeatureExtractor(CFG, tmp_path / "cache")(p)


def test_cache_hit_miss_and_format(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    p = _write(tmp_path / "song.wav", _music(4.0))
    fx = FeatureExtractor(CFG, cache)
    first = fx(Song("song", p))
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    t = load_file(str(files[0]))
    assert t["local"].dtype == torch.float16 and t["global"].dtype == torch.float32
    torch.testing.assert_close(t["local"], first.local)
    with safe_open(str(files[0]), "pt") as fh:
        assert fh.metadata()["format"] == "pdmer-features"

    calls = []
    real = cache_mod.compute_features

    def counting(wave, cfg):
        calls.append(1)
        return real(wave, cfg)

    def failing(wave, cfg):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(cache_mod, "compute_features", failing)
    again = FeatureExtractor(CFG, cache)(Song("song", p))
    assert torch.equal(again.local, first.local) and torch.equal(again.global_, first.global_)
    # the key is the audio content: a renamed copy hits the cache too
    copy = tmp_path / "renamed.wav"
    copy.write_bytes(p.read_bytes())
    assert FeatureExtractor(CFG, cache)(copy).song_id == "renamed"

    monkeypatch.setattr(cache_mod, "compute_features", counting)
    FeatureExtractor(FeatureConfig(global_window_s=20.0), cache)(p)  # changed setting
    assert len(calls) == 1
    _write(p, _music(4.0) * 0.5)  # changed audio bytes, same name
    FeatureExtractor(CFG, cache)(p)
    assert len(calls) == 2
    FeatureExtractor(CFG, cache, use_cache=False)(p)
    assert len(calls) == 3
    assert len(list(cache.glob("*.safetensors"))) == 3


def test_corrupt_cache_file_is_recomputed(tmp_path, caplog):
    p = _write(tmp_path / "song.wav", _music(3.0))
    fx = FeatureExtractor(CFG, tmp_path / "cache")
    ref = fx(p)
    fx.cache_path(p).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        again = fx(p)
    assert "recomputing" in caplog.text
    assert torch.equal(again.local, ref.local)


def test_default_cache_dir_is_in_the_repo():
    fx = FeatureExtractor(CFG)
    assert fx.cache_dir == Path(__file__).resolve().parents[1] / "cache" / "features"
    assert FeatureExtractor(FeatureConfig(cache_dir="/x/y")).cache_dir == Path("/x/y")


def test_extract_many(tmp_path):
    paths = [_write(tmp_path / f"{i}.wav", _music(3.0 + i, seed=i)) for i in range(3)]
    songs = {str(i): Song(str(i), p) for i, p in enumerate(paths)}
    out = extract_many(songs, CFG, tmp_path / "cache")
    assert list(out) == ["0", "1", "2"]
    assert [f.n_steps for f in out.values()] == [6, 8, 10]
    with pytest.raises(DataError, match="twice"):
        extract_many([paths[0], Song("0", paths[1])], CFG, tmp_path / "cache")


# ---------------------------------------------------------------------------- user embeddings


def test_embeddings_files(tmp_path):
    d = tmp_path / "emb"
    d.mkdir()
    np.save(d / "one.npy", np.arange(16, dtype=np.float32))
    np.save(d / "per_step.npy", np.ones((7, 16), dtype=np.float64))
    np.save(d / "wrong.npy", np.ones((5, 16), dtype=np.float32))
    e = load_embeddings(d, "one", 7)
    assert e.shape == (7, 16) and e.dtype == np.float32 and (e[3] == np.arange(16)).all()
    assert load_embeddings(d, "per_step", 7).shape == (7, 16)
    with pytest.raises(DataError, match=r"wrong\.npy.*5 embedding rows.*7 steps"):
        load_embeddings(d, "wrong", 7)
    with pytest.raises(DataError, match=r"song 'absent'.*" + str(d).replace("\\", "\\\\")):
        load_embeddings(d, "absent", 7)


def test_extractor_with_user_embeddings(tmp_path):
    d = tmp_path / "emb"
    d.mkdir()
    np.save(d / "s.npy", np.full((8, 24), 0.5, dtype=np.float32))
    p = _write(tmp_path / "s.wav", _music(4.0))
    cfg = FeatureConfig(global_encoder="embeddings", embeddings_dir=str(d))
    fx = FeatureExtractor(cfg, tmp_path / "cache")
    assert fx.global_dim == 24
    f = fx(Song("s", p))
    assert f.global_.shape == (8, 24) and f.local.shape == (8, 51, 128)
    assert torch.all(f.global_ == 0.5)
    with pytest.raises(DataError, match="song 'other'"):
        fx(Song("other", p))
    with pytest.raises(ValueError, match="embeddings_dir"):
        FeatureExtractor(FeatureConfig(global_encoder="embeddings"))


# ---------------------------------------------------------------------------- real audio


@pytest.mark.skipif(
    not PMEMO.is_dir(), reason="../shared/data/pmemo_samples (real PMEmo mp3s) not available on this machine"
)
def test_real_pmemo_songs_end_to_end(tmp_path):
    import json

    files = sorted(PMEMO.glob("*.mp3"))
    songs = [Song(p.stem, p) for p in files]
    out = extract_many(songs, CFG, tmp_path / "cache")
    assert set(out) == {p.stem for p in files}
    for p in files:
        f = out[p.stem]
        assert f.local.shape[1:] == (51, 128) and f.global_.shape[1] == descriptor_dim(CFG)
        assert 80 <= f.n_steps <= 130
        assert torch.isfinite(f.local.float()).all() and torch.isfinite(f.global_).all()
        dyn = json.loads(p.with_suffix(".json").read_text())["dynamic"]
        assert round(max(dyn["t"]) / 0.5) < f.n_steps + 2  # the labels fit on the song's step grid
