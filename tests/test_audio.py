"""Audio decoding: formats, channel mixing, resampling, and every kind of bad file."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import pdmer.features.audio as audio_mod
from pdmer.data.types import DataError
from pdmer.features.audio import audio_duration, check_waveform, load_audio, resample

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
PMEMO = SHARED / "pmemo_samples"


def _tone(sr: int, seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)])


def test_mono_44k_int16_roundtrip(tmp_path):
    x = _tone(44100, 1.5)
    p = tmp_path / "a.wav"
    sf.write(p, x, 44100, subtype="PCM_16")
    y = load_audio(p)
    assert y.dtype == np.float32 and y.shape == (len(x),)
    np.testing.assert_allclose(y, x, atol=1e-4)
    assert audio_duration(p) == pytest.approx(1.5)


def test_96k_stereo_is_mixed_and_resampled(tmp_path):
    sr, seconds = 96000, 2.0
    left = _tone(sr, seconds, 440.0, 0.6)
    right = _tone(sr, seconds, 440.0, 0.2)
    p = tmp_path / "hi.wav"
    sf.write(p, np.stack([left, right], axis=1), sr, subtype="PCM_24")
    y = load_audio(p)
    assert y.ndim == 1 and y.dtype == np.float32
    assert abs(len(y) - 44100 * seconds) <= 1
    assert _peak_hz(y, 44100) == pytest.approx(440.0, abs=1.0)
    # mono = mean of the channels: amplitude (0.6 + 0.2) / 2
    assert np.abs(y[1000:-1000]).max() == pytest.approx(0.4, rel=0.02)


def test_22k_is_upsampled(tmp_path):
    sr, seconds = 22050, 3.0
    p = tmp_path / "lo.flac"
    sf.write(p, _tone(sr, seconds, 1000.0), sr)
    y = load_audio(p)
    assert abs(len(y) - 44100 * seconds) <= 1
    assert len(y) / 44100 == pytest.approx(audio_duration(p), abs=1e-3)
    assert _peak_hz(y, 44100) == pytest.approx(1000.0, abs=1.0)


def test_other_target_rate(tmp_path):
    p = tmp_path / "a.wav"
    sf.write(p, _tone(44100, 1.0), 44100)
    assert abs(len(load_audio(p, sample_rate=16000)) - 16000) <= 1


def test_block_decoding_equals_one_read(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = (0.3 * rng.standard_normal((100_003, 2))).astype(np.float32)
    p = tmp_path / "st.wav"
    sf.write(p, x, 44100, subtype="FLOAT")
    monkeypatch.setattr(audio_mod, "READ_BLOCK", 4096)  # many blocks, ragged last one
    np.testing.assert_array_equal(load_audio(p), x.mean(axis=1))


@pytest.mark.parametrize("orig, new", [(44100, 22050), (96000, 44100), (22050, 44100)])
def test_chunked_resampling_equals_one_call(monkeypatch, orig, new):
    import torch
    import torchaudio

    x = np.random.default_rng(1).standard_normal(250_001).astype(np.float32)
    ref = torchaudio.functional.resample(torch.from_numpy(x), orig, new).numpy()
    monkeypatch.setattr(audio_mod, "RESAMPLE_ROW", 30_011)  # many rows, ragged last one, zero-padded
    monkeypatch.setattr(audio_mod, "RESAMPLE_CHUNK", 70_000)  # two rows per call, a lone row in the last
    got = resample(x, orig, new)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-6)


@pytest.mark.parametrize("channels", [1, 2, 3, 6])
def test_downmix_is_the_channel_mean(channels):
    from pdmer.features.audio import downmix

    x = np.random.default_rng(channels).standard_normal((10_001, channels)).astype(np.float32)
    got = downmix(x)
    assert got.shape == (10_001,) and got.dtype == np.float32
    if channels <= 2:
        np.testing.assert_array_equal(got, x.mean(axis=1))  # bit for bit
    np.testing.assert_allclose(got, x.astype(np.float64).mean(axis=1), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "not found"),
        ("corrupt", "cannot decode"),
        ("truncated", "cannot decode"),
        ("empty", "empty"),
        ("silent", "silent"),
        ("quiet", "silent"),
        ("nan", "NaN"),
    ],
)
def test_bad_files_raise_data_error_naming_the_file(tmp_path, kind, message):
    p = tmp_path / f"bad_{kind}.wav"
    if kind == "corrupt":
        p.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        sf.write(p, _tone(44100, 1.0), 44100)
        p.write_bytes(p.read_bytes()[:30])  # header cut in the middle
    elif kind == "empty":
        sf.write(p, np.zeros((0,), dtype=np.float32), 44100)
    elif kind == "silent":
        sf.write(p, np.zeros(44100, dtype=np.float32), 44100)
    elif kind == "quiet":
        sf.write(p, _tone(44100, 1.0, amp=3e-5), 44100, subtype="FLOAT")  # -90 dBFS
    elif kind == "nan":
        x = _tone(44100, 1.0)
        x[1234] = np.nan
        sf.write(p, x, 44100, subtype="FLOAT")
    with pytest.raises(DataError, match=message) as err:
        load_audio(p)
    assert p.name in str(err.value)


def test_duration_of_missing_or_corrupt_file(tmp_path):
    with pytest.raises(DataError, match="nope.wav"):
        audio_duration(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all" * 10)
    with pytest.raises(DataError, match="bad.wav"):
        audio_duration(bad)


def test_check_waveform_arrays():
    x = np.stack([_tone(100, 1.0), -_tone(100, 1.0)], axis=1) + 0.25  # (n, 2)
    np.testing.assert_allclose(check_waveform(x, "w"), 0.25, atol=1e-6)
    with pytest.raises(DataError, match="song 'x'.*empty"):
        check_waveform(np.zeros(0), "song 'x'")
    with pytest.raises(DataError, match="NaN"):
        check_waveform(np.array([0.1, np.inf]), "w")
    with pytest.raises(DataError, match="silent"):
        check_waveform(np.zeros(10), "w")
    with pytest.raises(DataError, match="shape"):
        check_waveform(np.zeros((2, 2, 2)), "w")


@pytest.mark.skipif(
    not PMEMO.is_dir(), reason="../shared/data/pmemo_samples (real PMEmo mp3s) not available on this machine"
)
def test_real_pmemo_mp3s_decode():
    files = sorted(PMEMO.glob("*.mp3"))
    assert files
    for p in files:
        y = load_audio(p)
        assert y.dtype == np.float32 and y.ndim == 1
        assert np.isfinite(y).all() and 0.01 < np.abs(y).max() < 2.0  # decoded MP3s of loud masters overshoot 1.0
        seconds = len(y) / 44100
        assert 40.0 < seconds < 65.0
        # the MP3 header's duration is an estimate, close to the decoded length
        assert audio_duration(p) == pytest.approx(seconds, abs=0.5)
