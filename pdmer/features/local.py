"""Local scale: one log-Mel patch per 0.5 s step (dsaml.md, 'Inputs, per 0.5 s step').

Mel spectrogram as torchaudio's ``MelSpectrogram`` computes it (n_fft = win = 2646, hop 441,
128 HTK Mel bands without area normalisation, power 2, Hann window, centred frames with reflect
padding; torch's STFT and torchaudio's filterbank, called directly), then
``ln(x + 1e-6)``. It is computed once over the whole song: frame ``f`` is centred on sample
``f * hop`` (time ``f * 10 ms``). Step ``k`` covers audio ``[k * 0.5 s, (k + 1) * 0.5 s)``
and its patch is frames ``[k * 50, k * 50 + 51)``: the 51 frames whose centres lie in
``[k * 0.5 s, (k + 1) * 0.5 s]``.

The STFT is run in chunks of frames on the once-padded signal, which gives the same numbers
as one call over the whole song without holding the full complex spectrogram of a long
song in memory (a 10-minute song would need about 640 MB for it).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torchaudio

from pdmer.config import FeatureConfig

CHUNK_FRAMES = 3000  # STFT frames per chunk (30 s at a 10 ms hop): bounds peak memory


def step_samples(cfg: FeatureConfig) -> int:
    """Samples per step (22050 = 0.5 s at 44.1 kHz); checks that the settings are consistent."""
    n = cfg.sample_rate * cfg.step_s
    if abs(n - round(n)) > 1e-9:
        raise ValueError(f"features.step_s={cfg.step_s} is not a whole number of samples at {cfg.sample_rate} Hz")
    n = int(round(n))
    if n % cfg.hop_length:
        raise ValueError(f"features.hop_length={cfg.hop_length} must divide the step length ({n} samples)")
    return n


def frames_per_step(cfg: FeatureConfig) -> int:
    """STFT frames between two step starts (50 = 0.5 s / 10 ms)."""
    stride = step_samples(cfg) // cfg.hop_length
    if not 1 <= cfg.patch_frames <= stride + 1:
        raise ValueError(f"features.patch_frames={cfg.patch_frames} must be in [1, {stride + 1}] (frames per step + 1)")
    return stride


def n_steps_for(n_samples: int, cfg: FeatureConfig) -> int:
    """Whole steps in a waveform of ``n_samples``: floor(duration / step_s)."""
    return int(n_samples) // step_samples(cfg)


@functools.lru_cache(maxsize=4)
def _mel_parts(sample_rate: int, n_fft: int, n_mels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hann window (n_fft,) and torchaudio's HTK Mel filterbank (n_fft // 2 + 1, n_mels), no norm."""
    fb = torchaudio.functional.melscale_fbanks(
        n_fft // 2 + 1, 0.0, sample_rate / 2.0, n_mels, sample_rate, norm=None, mel_scale="htk"
    )
    return torch.hann_window(n_fft), fb


def _mel_power(seg: torch.Tensor, n_fft: int, hop_length: int, window: torch.Tensor, fb: torch.Tensor) -> torch.Tensor:
    """(frames, n_mels) Mel power of the uncentred frames of ``seg``: the operations of torchaudio's
    ``MelSpectrogram`` (power 2, ``center=False``) called directly, so the same numbers bit for bit
    (``tests/test_features.py``) without the transforms' per-call overhead. (re^2 + im^2 instead of
    ``abs().pow(2)`` would save a little more, but changes the rounding of every feature, and with it
    every cached feature and every trained run's trajectory.)"""
    spec = torch.stft(seg, n_fft, hop_length, window=window, center=False, return_complex=True)  # (n_freq, frames)
    return spec.abs().pow_(2).T @ fb  # (frames, n_mels)


def log_mel(wave: np.ndarray, cfg: FeatureConfig, n_frames: int | None = None) -> torch.Tensor:
    """Log-Mel spectrogram of a whole song, frame ``f`` centred on sample ``f * hop``.

    Args:
        wave: (n,) float32 mono at ``cfg.sample_rate``; n must exceed ``n_fft // 2``.
        cfg: feature settings (n_fft, hop_length, n_mels, log_eps).
        n_frames: how many frames to compute from the start (default: all, ``1 + n // hop``).

    Returns:
        torch.Tensor: (n_frames, n_mels) float32, ``ln(mel_power + log_eps)``.
    """
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    total = 1 + x.shape[0] // cfg.hop_length
    n_frames = total if n_frames is None else min(int(n_frames), total)
    pad = cfg.n_fft // 2
    if x.shape[0] <= pad:
        raise ValueError(f"waveform of {x.shape[0]} samples is too short for n_fft={cfg.n_fft}")
    xp = torch.nn.functional.pad(x[None, None], (pad, pad), mode="reflect")[0, 0]  # (n + 2 * pad,)
    window, fb = _mel_parts(cfg.sample_rate, cfg.n_fft, cfg.n_mels)
    out = torch.empty(n_frames, cfg.n_mels, dtype=torch.float32)
    with torch.no_grad():
        for a in range(0, n_frames, CHUNK_FRAMES):
            b = min(a + CHUNK_FRAMES, n_frames)
            seg = xp[a * cfg.hop_length : (b - 1) * cfg.hop_length + cfg.n_fft]
            out[a:b] = _mel_power(seg, cfg.n_fft, cfg.hop_length, window, fb)  # (b - a, n_mels)
        return out.add_(cfg.log_eps).log_()


def patches_from_log_mel(logmel: torch.Tensor, n_steps: int, cfg: FeatureConfig) -> torch.Tensor:
    """Cut the per-step patches out of a whole-song log-Mel.

    Args:
        logmel: (n_frames, n_mels) with n_frames >= (n_steps - 1) * stride + patch_frames.
        n_steps: number of steps.

    Returns:
        torch.Tensor: (n_steps, patch_frames, n_mels) float16; patch k = frames
        ``[k * stride, k * stride + patch_frames)`` with stride = frames per step (50).
        float16 halves memory and disk; its rounding (under 0.004 for |x| < 16, i.e. the whole
        range of ln(power + 1e-6) for audio in [-1, 1]) is far below the feature's noise.
    """
    stride = frames_per_step(cfg)
    need = (n_steps - 1) * stride + cfg.patch_frames
    if n_steps <= 0:
        return torch.empty(0, cfg.patch_frames, cfg.n_mels, dtype=torch.float16)
    if logmel.shape[0] < need:
        raise ValueError(f"log-Mel has {logmel.shape[0]} frames, {need} needed for {n_steps} steps")
    win = logmel[:need].unfold(0, cfg.patch_frames, stride)  # (n_steps, n_mels, patch_frames)
    return win.transpose(1, 2).to(torch.float16).contiguous()  # (n_steps, patch_frames, n_mels)


def local_patches(wave: np.ndarray, cfg: FeatureConfig) -> torch.Tensor:
    """Per-step log-Mel patches of a song.

    Args:
        wave: (n,) float32 mono at ``cfg.sample_rate``.
        cfg: feature settings.

    Returns:
        torch.Tensor: (n_steps, 51, 128) float16 (patch_frames x n_mels), n_steps = floor(n / 22050).

    Shapes:
        wave (n,) -> (floor(n * 2 / sample_rate), patch_frames, n_mels)
    """
    n_steps = n_steps_for(len(wave), cfg)
    stride = frames_per_step(cfg)
    if n_steps == 0:
        return torch.empty(0, cfg.patch_frames, cfg.n_mels, dtype=torch.float16)
    logmel = log_mel(wave, cfg, n_frames=(n_steps - 1) * stride + cfg.patch_frames)
    return patches_from_log_mel(logmel, n_steps, cfg)
