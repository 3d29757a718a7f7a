"""Audio decoding: any file soundfile can read -> float32 mono at 44.1 kHz.

Decoding uses soundfile (libsndfile: WAV, FLAC, OGG, MP3 with libsndfile >= 1.1), mixing to
mono by averaging channels, and resampling with ``torchaudio.functional.resample``. Every
problem is a :class:`~pdmer.data.types.DataError` whose message names the file.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from pdmer.data.types import DataError

log = logging.getLogger(__name__)

# Peak amplitude below which a file counts as silent: 1e-4 = -80 dBFS.
SILENCE_PEAK = 1e-4


def audio_duration(path: str | Path) -> float:
    """Duration in seconds from the file header (cheap: nothing is decoded).

    For MP3 the header gives an estimate that can differ from the decoded length by a
    fraction of a second; :func:`load_audio` is the reference.

    Raises:
        DataError: missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: audio file not found")
    try:
        return float(sf.info(str(path)).duration)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        raise DataError(f"{path}: cannot read audio header ({e})") from None


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample a mono float32 waveform with torchaudio's windowed-sinc resampler.

    Shapes:
        wave: (n,) -> (ceil(n * new_sr / orig_sr),)
    """
    if int(orig_sr) == int(new_sr):
        return np.ascontiguousarray(wave, dtype=np.float32)
    with torch.no_grad():
        out = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), int(orig_sr), int(new_sr))
    return out.numpy()


def check_waveform(wave: np.ndarray, name: str) -> np.ndarray:
    """Validate a decoded waveform and return it as float32 mono.

    Args:
        wave: (n,) mono or (n, channels) samples, nominal range [-1, 1].
        name: what to call the source in error messages (a file path or a song id).

    Returns:
        np.ndarray: (n,) float32, channels averaged.

    Raises:
        DataError: empty, NaN/inf samples, or silent (peak below -80 dBFS).
    """
    wave = np.asarray(wave)
    if wave.ndim == 2:
        if wave.shape[0] == 0 or wave.shape[1] == 0:
            raise DataError(f"{name}: audio is empty (0 samples)")
        if not np.isfinite(wave).all():
            raise DataError(f"{name}: audio contains NaN or infinite samples")
        wave = wave.astype(np.float32, copy=False).mean(axis=1)  # (n, ch) -> (n,)
    elif wave.ndim == 1:
        if wave.size == 0:
            raise DataError(f"{name}: audio is empty (0 samples)")
        if not np.isfinite(wave).all():
            raise DataError(f"{name}: audio contains NaN or infinite samples")
        wave = wave.astype(np.float32, copy=False)
    else:
        raise DataError(f"{name}: waveform must be (n,) or (n, channels), got shape {wave.shape}")
    peak = float(np.max(np.abs(wave)))
    if peak < SILENCE_PEAK:
        raise DataError(f"{name}: audio is silent (peak {peak:.2e}, below {SILENCE_PEAK:g} = -80 dBFS)")
    return np.ascontiguousarray(wave)


def load_audio(path: str | Path, sample_rate: int = 44100) -> np.ndarray:
    """Decode an audio file to float32 mono at ``sample_rate``.

    Args:
        path: any format libsndfile decodes (WAV, FLAC, OGG, MP3).
        sample_rate: output rate in Hz; other rates are resampled.

    Returns:
        np.ndarray: (n,) float32 mono, n = round(duration * sample_rate) (up to one sample).

    Raises:
        DataError: missing file, undecodable or corrupt file, empty, silent, NaN samples.
            The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (n, channels)
    except Exception as e:
        raise DataError(f"{path}: cannot decode audio, corrupt or unsupported format ({e})") from None
    wave = check_waveform(data, str(path))
    if sr != sample_rate:
        log.debug("%s: resampling %d Hz -> %d Hz", path, sr, sample_rate)
        wave = resample(wave, sr, sample_rate)
    return wave
