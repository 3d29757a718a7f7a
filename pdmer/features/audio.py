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


# resampling: input samples per call (about 24 s at 44.1 kHz; bounds its buffers) and per row of a
# call (about 6 s): on 2 cores 44.1 -> 22.05 kHz runs about four times as fast as in 48 s chunks
RESAMPLE_CHUNK = 1 << 20
RESAMPLE_ROW = 1 << 18
READ_BLOCK = 1 << 20  # frames per decoding block


def downmix(block: np.ndarray) -> np.ndarray:
    """Mono mix of decoded audio: the channels' mean, as ``block.mean(axis=1)`` computes it.

    The channels are added one at a time: the same float32 numbers as numpy's mean over the short
    last axis (bit for bit for stereo), about eight times faster on a long song.

    Shapes:
        block: (n, channels) -> (n,) float32
    """
    block = np.asarray(block, dtype=np.float32)
    if block.shape[1] == 1:
        return block[:, 0]
    mono = block[:, 0].copy()
    for c in range(1, block.shape[1]):
        mono += block[:, c]
    mono /= np.float32(block.shape[1])
    return mono


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Resample a mono float32 waveform with torchaudio's windowed-sinc resampler.

    The input is cut into rows of :data:`RESAMPLE_ROW` samples, each with context on both sides
    far wider than the filter's support (zeros beyond the song's ends, as torchaudio pads), and
    the rows go through torchaudio as one batch, :data:`RESAMPLE_CHUNK` input samples per call.
    That gives the numbers of one call over the whole song (each output sample is the same dot
    product) without its large intermediate buffers, and runs several times as fast: torch's
    one-channel strided convolution is slow on one long row.

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
    step = o * max(1, RESAMPLE_ROW // o)  # input samples per row, a multiple of o: output grids align
    if n <= step:
        with torch.no_grad():
            return torchaudio.functional.resample(torch.from_numpy(x), orig_sr, new_sr).numpy()
    target = -(-n * m // o)  # ceil
    margin = o * -(-1024 // o)  # input samples, a multiple of o, >> the filter half-width (~6 / cutoff)
    rows = -(-n // step)
    padded = np.zeros(rows * step + 2 * margin, dtype=np.float32)
    padded[margin : margin + n] = x
    framed = torch.from_numpy(padded).unfold(0, step + 2 * margin, step)  # (rows, step + 2 * margin) view
    k, off = step // o * m, margin // o * m  # outputs per row; outputs of the left context
    per_call = max(1, RESAMPLE_CHUNK // step)
    out = np.empty(rows * k, dtype=np.float32)
    with torch.no_grad():
        for r in range(0, rows, per_call):
            y = torchaudio.functional.resample(framed[r : r + per_call], orig_sr, new_sr)  # (rows', outputs)
            out[r * k : r * k + y.shape[0] * k] = y[:, off : off + k].reshape(-1).numpy()
    return out[:target]


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
        wave = downmix(wave)  # (n, ch) -> (n,)
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
                mono = downmix(block)
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
