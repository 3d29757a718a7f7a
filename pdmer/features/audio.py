"""Audio decoding: any file soundfile can read -> float32 mono at 44.1 kHz.

Decoding uses soundfile (libsndfile: WAV, FLAC, OGG, MP3 with libsndfile >= 1.1), mixing to
mono by averaging channels, and resampling with ``torchaudio.functional.resample``. Every
problem is a :class:`~pdmer.data.types.DataError` whose message names the file.
"""

from __future__ import annotations

import logging
import math
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


RESAMPLE_CHUNK = 1 << 21  # input samples per resampling chunk (about 48 s at 44.1 kHz)
READ_BLOCK = 1 << 20  # frames per decoding block


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample a mono float32 waveform with torchaudio's windowed-sinc resampler.

    Long inputs are processed in chunks that overlap by far more than the filter's support,
    which gives the numbers of one call without its large intermediate buffers.

    Shapes:
        wave: (n,) -> (ceil(n * new_sr / orig_sr),)
    """
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    x = np.ascontiguousarray(wave, dtype=np.float32)
    if orig_sr == new_sr:
        return x
    g = math.gcd(orig_sr, new_sr)
    o, m = orig_sr // g, new_sr // g  # output block of m samples per o input samples
    n = len(x)
    if n <= RESAMPLE_CHUNK:
        with torch.no_grad():
            return torchaudio.functional.resample(torch.from_numpy(x), orig_sr, new_sr).numpy()
    target = -(-n * m // o)  # ceil
    margin = o * -(-1024 // o)  # input samples, a multiple of o, >> the filter half-width (~6 / cutoff)
    step = o * max(1, RESAMPLE_CHUNK // o)
    out = np.empty(target, dtype=np.float32)
    with torch.no_grad():
        for s in range(0, n, step):
            e = min(s + step, n)
            a, b = max(0, s - margin), min(n, e + margin)  # a is a multiple of o: output grids align
            y = torchaudio.functional.resample(torch.from_numpy(x[a:b]), orig_sr, new_sr).numpy()
            j0 = s // o * m
            j1 = target if e == n else e // o * m
            off = (s - a) // o * m
            out[j0:j1] = y[off : off + (j1 - j0)]
    return out


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
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            # decode block by block, mixing to mono as we go: no (n, channels) copy of a long song
            buf = np.empty(max(int(f.frames), 0), dtype=np.float32)  # header length (an estimate for MP3)
            pos, extra = 0, []
            for block in f.blocks(blocksize=READ_BLOCK, dtype="float32", always_2d=True):  # (b, channels)
                if not np.isfinite(block).all():
                    raise DataError(f"{path}: audio contains NaN or infinite samples")
                mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
                k = min(len(mono), len(buf) - pos)
                buf[pos : pos + k] = mono[:k]
                pos += k
                if k < len(mono):
                    extra.append(mono[k:].copy())
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot decode audio, corrupt or unsupported format ({e})") from None
    data = np.concatenate([buf[:pos], *extra]) if extra else buf[:pos]
    wave = check_waveform(data, str(path))
    if sr != sample_rate:
        log.debug("%s: resampling %d Hz -> %d Hz", path, sr, sample_rate)
        wave = resample(wave, sr, sample_rate)
    return wave


def audio_by_song(paths: list[Path], why: str) -> dict[str, Path]:
    """Song id (the file's stem) -> path, each file checked by :func:`check_audio_file`.

    Two files with one song id are refused (``why``: what the clash would break).
    """
    out: dict[str, Path] = {}
    for p in paths:
        check_audio_file(p)
        if p.stem in out:
            raise DataError(f"two songs have the id {p.stem!r} ({out[p.stem]} and {p}): {why}")
        out[p.stem] = p
    return out


def check_audio_file(path: str | Path) -> Path:
    """An audio path that exists, is a file and is not empty.

    Raises:
        DataError: naming the path and what it is instead (missing, a folder, 0 bytes).
    """
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not an audio file (give the file itself, e.g. {p}/song.wav)")
    if not p.exists():
        raise DataError(f"{p}: audio file not found")
    if not p.is_file():
        raise DataError(f"{p}: not a regular file (an audio file is needed)")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty (0 bytes), not audio")
    return p
