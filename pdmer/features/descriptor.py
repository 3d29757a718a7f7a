"""Built-in global encoder: a frozen, hand-designed music descriptor of a 30 s window.

The paper feeds a 1024-d embedding of a 30 s window from a large pre-trained audio model
(ImageBind). Weights cannot be downloaded here, so this module offers a deterministic,
training-free stand-in that describes the same 30 s context with classic music-emotion
features (loudness, brightness, rhythm, tonality/mode, register, noisiness).

How it is computed (O(n_steps), one pass over the song):

1. Frame-level features on three grids, each aligned to the 0.5 s steps (a frame belongs to
   the step that contains its centre, so every step has the same number of frames):
   - log-Mel frames (10 ms hop, the local-scale spectrogram, reused): pooled Mel bands,
     onset strength (spectral flux), spectral centroid, spectral flatness;
   - 10 ms blocks of the waveform: RMS level in dBFS;
   - an nnAudio CQT at 22.05 kHz (C1..B7, 84 bins, 20 ms hop): chroma and pitch register;
     with ``features.cqt: multirate`` the same bins from :class:`MultirateCQT` (short kernels
     on the signal halved once per octave, faster, with its own descriptor version
     :func:`descriptor_version`).
2. Per-step summaries: the mean over the step's frames of every frame feature and of its
   square, the step's chroma, its onset count and onset-envelope autocorrelation terms.
   All of these are *additive* over time.
3. Window statistics: the mean of each summary over the step's 30 s window, from cumulative
   sums (window edges may fall on half steps; the cumulative sum is interpolated linearly,
   which weights an edge step by the fraction of it inside the window). Means, standard
   deviations (sqrt(E[x^2] - E[x]^2)), tempo and mode features are then functions of these
   window means.

The window of step k is ``[c - 15 s, c + 15 s)`` with centre ``c = (k + 0.5) * 0.5 s``,
shifted to lie inside the song when the song is at least 30 s long (otherwise the whole
song). :func:`window_descriptor` gives the descriptor of any other span (for example a
whole 30 s training clip).

Blocks of the descriptor (G = 93 with 128 Mel bands; :func:`descriptor_names` lists them);
each value is in the unit given, chosen so that typical music lies within about [-3, 3]:

=====================  ====  ==================================================================
block                  dims  content
=====================  ====  ==================================================================
mel_mean               32    window mean of log-Mel pooled into 32 bands, (ln power + 5) / 5
mel_std                32    window std of the same pooled bands, ln power / 2
onset_mean, onset_std  2     spectral flux (mean over bands of the positive 20 ms increase of
                             ln Mel power), mean and std
onset_rate             1     detected onsets per second / 4
tempo                  1     log2(tempo / 120 BPM), tempo = best lag of the onset
                             autocorrelation in 40-200 BPM under a log-normal prior at 120 BPM
pulse_clarity          1     that autocorrelation's peak value (0 none .. 1 periodic)
rms_mean, rms_std      2     RMS level of 10 ms blocks in dBFS / 20 (mean), dB / 10 (std)
centroid_mean, _std    2     spectral centroid (from Mel power) in octaves re 1 kHz
flatness_mean, _std    2     log spectral flatness over Mel bands (0 = white noise, very
                             negative = tonal), / 5; a consonance / noisiness proxy
pitch_mean, pitch_std  2     CQT-magnitude-weighted mean pitch per frame, octaves re C4
chroma_key             12    window chroma (frame chroma = CQT energy per pitch class, each
                             frame normalised to sum 1; window mean, times 12) rotated so that
                             the estimated tonic is first: key-invariant pitch-class profile
mode_major, mode_minor 2     max Pearson correlation of the window chroma with the 12
                             rotations of the Krumhansl-Kessler major / minor profiles
mode_diff              1     mode_major - mode_minor (> 0 leans major)
tonalness              1     10 * (1 - entropy of the window chroma / ln 12): 0 = flat
                             chroma (noise, no tonal centre), larger = fewer pitch classes
=====================  ====  ==================================================================
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import maximum_filter1d, uniform_filter1d
from scipy.signal import firwin, upfirdn
from torch import Tensor

from pdmer.config import FeatureConfig, check_choice
from pdmer.features.audio import resample
from pdmer.features.local import frames_per_step, log_mel, n_steps_for, step_samples

DESCRIPTOR_VERSION = "2"  # bump when the numbers change: part of the cache key
MULTIRATE_VERSION = "1"  # bump when the multirate CQT's numbers change (see descriptor_version)

DESC_SAMPLE_RATE = 22050  # CQT rate (or the song's rate when lower)
CQT_FRAMES_PER_STEP = 25  # 20 ms hop at 0.5 s steps
CQT_FMIN = 32.703  # C1 (MIDI 24)
CQT_MIDI0 = 24
CQT_BINS = 84  # 7 octaves, C1..B7 (3951 Hz)
CQT_CHUNK_FRAMES = 3000  # CQT frames per chunk: bounds memory on long songs
CQT_OCTAVES = CQT_BINS // 12
# Multirate CQT: the top octave (C7..B7) at 12.8 kHz, where B7 is at 0.62 of Nyquist and a 20 ms
# hop is 256 = 4 * 2**6 samples, so the six halvings down to the C1 octave (200 Hz) keep integer hops.
MR_SAMPLE_RATE = 12800
# Half-band low-pass before each halving (Kaiser-windowed sinc, beta 9). An octave's kernels
# reach 0.69 of its Nyquist (top bin 0.62, plus the Hann main lobe's 12 %): the filter is flat
# there within 0.001 dB and below -90 dB from 1.31 of the new Nyquist, the band that folds into it.
# 41 taps put the centre on an even tap, so output j sits on input 2j; the other even taps are
# zero (to 1e-19, a half-band filter's), which :func:`_halve` uses.
HALFBAND = firwin(41, 0.5, window=("kaiser", 9.0))
MEL_POOL_BANDS = 32
ONSET_LAG_S = 0.02  # spectral-flux lag
PEAK_HALF_S = 0.03  # an onset is a local maximum within +-30 ms ...
PEAK_MEAN_HALF_S = 0.5  # ... above the +-0.5 s moving mean of the envelope ...
PEAK_DELTA = 0.3  # ... by at least this (ln-power units; stationary noise stays within ~0.1)
TEMPO_MIN_BPM, TEMPO_MAX_BPM = 40.0, 200.0
TEMPO_PRIOR_BPM, TEMPO_PRIOR_OCT = 120.0, 1.0
EPS = 1e-8

# Krumhansl-Kessler key profiles, tonic first.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])


def _n_pool(cfg: FeatureConfig) -> int:
    return min(MEL_POOL_BANDS, cfg.n_mels)


def _tempo_lags(cfg: FeatureConfig) -> np.ndarray:
    hop_s = cfg.hop_length / cfg.sample_rate
    lo = int(np.ceil(60.0 / TEMPO_MAX_BPM / hop_s))
    hi = int(np.floor(60.0 / TEMPO_MIN_BPM / hop_s))
    return np.arange(lo, hi + 1)


def descriptor_names(cfg: FeatureConfig) -> list[str]:
    """Name of every descriptor dimension, in order (see the module docstring)."""
    p = _n_pool(cfg)
    names = [f"mel_mean_{i}" for i in range(p)] + [f"mel_std_{i}" for i in range(p)]
    names += ["onset_mean", "onset_std", "onset_rate", "tempo", "pulse_clarity"]
    names += ["rms_mean", "rms_std", "centroid_mean", "centroid_std", "flatness_mean", "flatness_std"]
    names += ["pitch_mean", "pitch_std"]
    names += [f"chroma_key_{i}" for i in range(12)]
    names += ["mode_major", "mode_minor", "mode_diff", "tonalness"]
    return names


def descriptor_dim(cfg: FeatureConfig) -> int:
    """Dimension G of the built-in descriptor (93 with the default 128 Mel bands)."""
    return len(descriptor_names(cfg))


@dataclass
class StepSummaries:
    """Additive per-step summaries; any window's descriptor is a function of their window mean.

    Attributes:
        values: (n_steps, S) float64; layout in ``slices``.
        slices: block name -> slice of the S columns: ``frame`` (mean of each frame feature),
            ``frame_sq`` (mean of its square), ``chroma`` (12), ``onset_rate`` (1, per second),
            ``ac`` (autocorrelation of the onset envelope at each tempo lag), ``ac0`` (1, lag 0).
        n_frame: number of frame features (pooled Mel bands + 5 scalars).
        lags: (n_lags,) tempo lags in frames.
        frame_s: duration of one frame in seconds (the hop).
    """

    values: np.ndarray
    slices: dict[str, slice]
    n_frame: int
    lags: np.ndarray
    frame_s: float

    @property
    def n_steps(self) -> int:
        return int(self.values.shape[0])


class OctaveCQT:
    """nnAudio's CQT (``CQT1992v2``, librosa normalisation, magnitude), one octave at a time.

    nnAudio pads every kernel to the width of the lowest bin's (32,768 samples at 22.05 kHz) and
    convolves all 84 at that width; a kernel of an octave higher is half as long and the rest is
    zeros. Here each octave's kernels are cut to their own nonzero span and convolved separately:
    the same sums without the zero taps (about 3.5x fewer multiply-adds), equal to nnAudio's output
    up to float rounding (``tests/test_features.py``).

    Called on ``seg`` (n,) of a reflect-padded signal like nnAudio's ``center=False`` call: frame
    ``f`` covers ``seg[f * hop : f * hop + kernel_width]``; returns (84, frames).
    """

    def __init__(self, sr: int, hop: int) -> None:
        from nnAudio.features import CQT

        ref = CQT(
            sr=sr, hop_length=hop, fmin=CQT_FMIN, n_bins=CQT_BINS, bins_per_octave=12, center=False, verbose=False
        )
        self.hop, self.kernel_width = hop, int(ref.kernel_width)
        real, imag = ref.cqt_kernels_real[:, 0], ref.cqt_kernels_imag[:, 0]  # (84, W)
        self.scale = torch.sqrt(ref.lenghts.float()).view(-1, 1)  # (84, 1) librosa normalisation
        self.octaves = []  # (bins, first tap, kernels (2 * 12, 1, taps)): real parts, then minus the imaginary ones
        for lo in range(0, CQT_BINS, 12):
            bins = slice(lo, min(lo + 12, CQT_BINS))
            used = torch.nonzero((real[bins].abs() + imag[bins].abs()).sum(0) > 0).flatten()
            a, b = int(used.min()), int(used.max()) + 1
            kernels = torch.cat([real[bins, a:b], -imag[bins, a:b]]).unsqueeze(1).contiguous()
            self.octaves.append((bins, a, kernels))

    def __call__(self, seg: Tensor) -> Tensor:
        n_frames = 1 + (seg.shape[-1] - self.kernel_width) // self.hop
        out = torch.empty(CQT_BINS, n_frames)
        for bins, a, kernels in self.octaves:
            taps = kernels.shape[-1]
            x = seg[a : a + (n_frames - 1) * self.hop + taps]
            y = torch.nn.functional.conv1d(x[None, None], kernels, stride=self.hop)[0]  # (2 * bins, frames)
            n = y.shape[0] // 2
            out[bins] = torch.sqrt((y[:n] * self.scale[bins]).pow(2) + (y[n:] * self.scale[bins]).pow(2))
        return out


@functools.lru_cache(maxsize=2)
def _cqt(sr: int, hop: int) -> OctaveCQT:
    return OctaveCQT(sr, hop)


def cqt_magnitude(wave: np.ndarray, sample_rate: int, n_frames: int, hop: int) -> np.ndarray:
    """CQT magnitude (C1..B7, 84 bins), frame ``f`` centred on sample ``f * hop``.

    Computed in chunks on the once reflect-padded signal, equal to one centred call.

    Args:
        wave: (n,) float32 at ``sample_rate``.
        n_frames: frames to compute from the start (at most ``1 + n // hop``).

    Returns:
        np.ndarray: (n_frames, 84) float32.
    """
    cqt = _cqt(int(sample_rate), int(hop))
    kw = int(cqt.kernel_width)
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    half = kw // 2
    if x.shape[0] > half:
        xp = torch.nn.functional.pad(x[None, None], (half, half), mode="reflect")[0, 0]
    else:  # shorter than half a kernel (only for sub-second songs): zero padding
        xp = torch.nn.functional.pad(x, (half, half))
    n_frames = min(n_frames, 1 + (xp.shape[0] - kw) // hop)
    out = np.empty((n_frames, CQT_BINS), dtype=np.float32)
    with torch.no_grad():
        for a in range(0, n_frames, CQT_CHUNK_FRAMES):
            b = min(a + CQT_CHUNK_FRAMES, n_frames)
            seg = xp[a * hop : (b - 1) * hop + kw]
            out[a:b] = cqt(seg).T.numpy()  # (84, b - a) -> (b - a, 84)
    return out


def descriptor_version(cfg: FeatureConfig) -> str:
    """The descriptor's version under these settings, part of the feature cache key.

    ``features.cqt: exact`` gives :data:`DESCRIPTOR_VERSION` itself (the key of features cached
    before the option existed); ``multirate`` appends its own version, so cached features of the
    two never mix.

    Raises:
        ConfigError: an unknown ``features.cqt`` (:func:`pdmer.config.check_choice`).
    """
    if check_choice("features.cqt", cfg.cqt) == "exact":
        return DESCRIPTOR_VERSION
    return f"{DESCRIPTOR_VERSION}-multirate{MULTIRATE_VERSION}"


class MultirateCQT:
    """The 84 bins of :class:`OctaveCQT` from one 12-kernel bank applied at seven rates.

    The standard multi-rate construction (librosa's ``cqt``): the top octave is analysed at
    :data:`MR_SAMPLE_RATE`, and each lower octave on the signal low-passed (:data:`HALFBAND`)
    and halved once more, down to 200 Hz for C1..B1. An octave's rate is then the same multiple
    of its lowest frequency at every octave, so nnAudio's kernels for 12 bins at the C1 octave's
    rate serve all of them: 103 taps instead of up to 11,338, on a signal up to 64 times shorter.
    The hop halves with the rate, so frame ``f`` is centred on ``f * 20 ms`` at every octave.

    Magnitudes match :class:`OctaveCQT`'s at 22.05 kHz: the kernels are L1-normalised (unit gain at
    their centre frequency whatever their rate), then scaled by the square root of the kernel
    length the bin has at 22.05 kHz (librosa's normalisation there), so a sinusoid and stationary
    noise give the same magnitude in every octave as the exact CQT does, which chroma (normalised
    per frame across octaves) and the magnitude-weighted pitch register rely on. The numbers
    differ slightly (other kernel lengths after rounding, the filters' ripple, the edges).

    Called on a signal at :data:`MR_SAMPLE_RATE` with ``hop`` at that rate (divisible by
    2**6); returns (84, frames), frame ``f`` centred on sample ``f * hop`` (reflect padding).
    """

    def __init__(self, hop: int) -> None:
        from nnAudio.utils import create_cqt_kernels

        if hop % 2 ** (CQT_OCTAVES - 1):
            raise ValueError(
                f"multirate CQT hop {hop} at {MR_SAMPLE_RATE} Hz is not divisible by {2 ** (CQT_OCTAVES - 1)}"
            )
        q = 1.0 / (2.0 ** (1.0 / 12) - 1.0)  # nnAudio's Q at filter_scale 1
        low_rate = MR_SAMPLE_RATE // 2 ** (CQT_OCTAVES - 1)  # the C1 octave's rate
        bank, width, _, _ = create_cqt_kernels(q, low_rate, CQT_FMIN, n_bins=12, bins_per_octave=12, norm=1)
        used = np.flatnonzero(np.abs(bank).sum(axis=0) > 0)
        a, b = int(used.min()), int(used.max()) + 1
        real = torch.from_numpy(np.ascontiguousarray(bank.real[:, a:b]))
        imag = torch.from_numpy(np.ascontiguousarray(bank.imag[:, a:b]))
        self.kernels = torch.cat([real, -imag]).unsqueeze(1).contiguous()  # (2 * 12, 1, taps)
        self.first = a - width // 2  # offset of the first tap from the frame centre (nnAudio centres at width // 2)
        freqs = CQT_FMIN * 2.0 ** (np.arange(CQT_BINS) / 12.0)
        lengths = np.ceil(q * DESC_SAMPLE_RATE / freqs)  # OctaveCQT's kernel lengths at 22.05 kHz
        self.scale = torch.sqrt(torch.from_numpy(lengths).float()).view(CQT_OCTAVES, 12, 1)
        self.hop = hop
        # padding at the top rate: at the lowest rate it still covers half a kernel plus the
        # samples the halvings' zero extension spoils at the padded signal's ends
        self.pad = 2 ** (CQT_OCTAVES - 1) * (-self.first + len(HALFBAND))

    def __call__(self, x: Tensor, n_frames: int) -> Tensor:
        n_frames = min(n_frames, 1 + x.shape[0] // self.hop)
        mode = "reflect" if x.shape[0] > self.pad else "constant"  # zero padding only for songs under 0.47 s
        s = torch.nn.functional.pad(x[None, None], (self.pad, self.pad), mode=mode)[0, 0].numpy()
        taps = self.kernels.shape[-1]
        out = torch.empty(CQT_OCTAVES, 12, n_frames)
        for k in range(CQT_OCTAVES):  # k halvings: octave CQT_OCTAVES - 1 - k
            o, hop, pad = CQT_OCTAVES - 1 - k, self.hop >> k, self.pad >> k
            if k:
                s = _halve(s)
            start = pad + self.first
            seg = torch.from_numpy(np.ascontiguousarray(s[start : start + (n_frames - 1) * hop + taps]))
            y = torch.nn.functional.conv1d(seg[None, None], self.kernels, stride=hop)[0]  # (2 * 12, frames)
            out[o] = torch.sqrt(y[:12].pow(2) + y[12:].pow(2)) * self.scale[o]
        return out.reshape(CQT_BINS, n_frames)


def _halve(s: np.ndarray) -> np.ndarray:
    """Low-pass ``s`` with :data:`HALFBAND` and keep every other sample; output j is centred on s[2j].

    Polyphase form: the filter's only nonzero even tap is its centre, so the even samples are
    just scaled and the odd ones convolved with the 20 odd taps, half the work of the direct form.

    Shapes:
        s: (n,) float32 -> (ceil(n / 2),) float32
    """
    c = len(HALFBAND) // 2  # 20
    odd_taps = HALFBAND[1::2].astype(np.float32)  # offsets -19, -17, ..., 19 from the centre
    even = s[0::2]
    conv = upfirdn(odd_taps, s[1::2])  # full convolution: conv[j + c // 2 - 1] = sum over s[2j +- odd]
    return np.float32(HALFBAND[c]) * even + conv[c // 2 - 1 :][: even.shape[0]]


@functools.lru_cache(maxsize=2)
def _multirate_cqt(hop: int) -> MultirateCQT:
    return MultirateCQT(hop)


def exact_cqt_grid(sample_rate: int, hop_s: float) -> tuple[int, int]:
    """The exact CQT's sample rate (``min(DESC_SAMPLE_RATE, sample_rate)``) and its hop in samples there.

    Raises:
        ValueError: ``hop_s`` is not a whole number of samples at that rate (a step of
            ``step_s`` must be :data:`CQT_FRAMES_PER_STEP` whole hops).
    """
    dsr = min(DESC_SAMPLE_RATE, int(sample_rate))
    hop = dsr * hop_s
    if abs(hop - round(hop)) > 1e-9 or round(hop) < 1:
        step = hop_s * CQT_FRAMES_PER_STEP
        raise ValueError(f"step of {step:g} s at {dsr} Hz is not a multiple of {CQT_FRAMES_PER_STEP} CQT hops")
    return dsr, int(round(hop))


def multirate_cqt_magnitude(wave: np.ndarray, sample_rate: int, n_frames: int, hop_s: float) -> np.ndarray:
    """CQT magnitude from :class:`MultirateCQT` (C1..B7, 84 bins), frame ``f`` centred on ``f * hop_s``.

    Args:
        wave: (n,) float32 at ``sample_rate``; resampled once to :data:`MR_SAMPLE_RATE`.
        n_frames: frames to compute from the start; at most as many as :func:`cqt_magnitude`
            gives on the same song (``1 + n_ds // hop_ds`` on its resampled signal), so that
            the two CQTs have the same number of frames at every song length.
        hop_s: the hop in seconds (20 ms): a whole number of 2**6 samples at 12.8 kHz.

    Returns:
        np.ndarray: (n_frames, 84) float32.
    """
    hop = MR_SAMPLE_RATE * hop_s
    if abs(hop - round(hop)) > 1e-9:
        raise ValueError(f"a hop of {hop_s} s is not a whole number of samples at {MR_SAMPLE_RATE} Hz")
    dsr, exact_hop = exact_cqt_grid(sample_rate, hop_s)
    n_ds = -(-len(wave) * dsr // int(sample_rate))  # the exact CQT's signal length (see resample)
    n_frames = min(n_frames, 1 + n_ds // exact_hop)
    cqt = _multirate_cqt(int(round(hop)))
    x = torch.from_numpy(resample(np.asarray(wave, dtype=np.float32), sample_rate, MR_SAMPLE_RATE))
    with torch.no_grad():
        return cqt(x, n_frames).T.numpy()  # (84, frames) -> (frames, 84)


def mel_centres(cfg: FeatureConfig) -> np.ndarray:
    """Centre frequencies (Hz) of torchaudio's HTK Mel bands (f_min 0, f_max sr / 2)."""
    m_max = 2595.0 * np.log10(1.0 + (cfg.sample_rate / 2) / 700.0)
    m = np.linspace(0.0, m_max, cfg.n_mels + 2)[1:-1]
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def _pool_matrix(n_mels: int, n_pool: int) -> np.ndarray:
    """(n_mels, n_pool) averaging of contiguous groups of Mel bands."""
    P = np.zeros((n_mels, n_pool))
    for j, idx in enumerate(np.array_split(np.arange(n_mels), n_pool)):
        P[idx, j] = 1.0 / len(idx)
    return P


def _per_step_mean(x: np.ndarray, n_steps: int) -> np.ndarray:
    """(n_steps * m, d) frames -> (n_steps, d) mean over each step's m frames."""
    return x.reshape(n_steps, -1, x.shape[-1]).mean(axis=1)  # (n_steps, m, d) -> (n_steps, d)


def frame_features(
    wave: np.ndarray, cfg: FeatureConfig, logmel: torch.Tensor | np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Frame-level features on their step-aligned grids (a helper of :func:`step_summaries`).

    Args:
        wave: (n,) float32 mono at ``cfg.sample_rate``, at least one step long.
        cfg: feature settings.
        logmel: optional (>= n_steps * 50, n_mels) log-Mel from :func:`~pdmer.features.local.log_mel`.

    Returns:
        dict of frame arrays, the 10 ms grid first (F = n_steps * 50 frames, 50 per step),
        then the 20 ms CQT grid (Fc = n_steps * 25 frames, 25 per step):
        ``frame`` (F, P + 4): P pooled log-Mel bands, onset strength, RMS dBFS, centroid
        (octaves re 1 kHz), log flatness; ``onset_env`` (F,); ``onset_peak`` (F,) bool;
        ``cqt_pitch`` (Fc,) octaves re C4; ``chroma`` (Fc, 12), each frame summing to 1.
    """
    n_steps = n_steps_for(len(wave), cfg)
    if n_steps < 1:
        raise ValueError(f"waveform of {len(wave)} samples is shorter than one step")
    m = frames_per_step(cfg)
    F = n_steps * m
    hop_s = cfg.hop_length / cfg.sample_rate
    if logmel is None:
        logmel = log_mel(wave, cfg, n_frames=F)
    L = np.asarray(logmel[:F], dtype=np.float64)  # (F, n_mels)
    if L.shape[0] < F:
        raise ValueError(f"log-Mel has {L.shape[0]} frames, {F} needed")

    pooled = L @ _pool_matrix(cfg.n_mels, _n_pool(cfg))  # (F, P)

    lag = max(1, int(round(ONSET_LAG_S / hop_s)))
    onset = np.zeros(F)
    onset[lag:] = np.maximum(L[lag:] - L[:-lag], 0.0).mean(axis=1)

    expL = np.exp(L)  # (F, n_mels) Mel power + eps
    power = np.maximum(expL - cfg.log_eps, 0.0)  # (F, n_mels) Mel power
    fc = mel_centres(cfg)
    tot = power.sum(axis=1)
    centroid = (power @ fc + EPS * fc.mean()) / (tot + EPS)
    centroid = np.log2(centroid / 1000.0)
    flatness = L.mean(axis=1) - np.log(expL.mean(axis=1))  # ln(geo mean / arith mean) of P + eps

    blocks = np.asarray(wave[: n_steps * step_samples(cfg)]).reshape(F, cfg.hop_length)  # (F, hop) view
    ms = np.empty(F)
    for a in range(0, F, 6000):  # chunks: no float64 copy of a long song
        b = blocks[a : a + 6000].astype(np.float64)
        ms[a : a + 6000] = (b * b).mean(axis=1)
    rms_db = 10.0 * np.log10(ms + 1e-10)

    # onsets: local maxima of the envelope, clearly above its local mean
    half = max(1, int(round(PEAK_HALF_S / hop_s)))
    mhalf = max(1, int(round(PEAK_MEAN_HALF_S / hop_s)))
    is_max = onset >= maximum_filter1d(onset, 2 * half + 1, mode="nearest")
    peak = is_max & (onset > uniform_filter1d(onset, 2 * mhalf + 1, mode="nearest") + PEAK_DELTA)

    # CQT on the reduced-rate signal (the multirate one resamples by itself)
    Fc = n_steps * CQT_FRAMES_PER_STEP
    descriptor_version(cfg)  # validates features.cqt
    if cfg.cqt == "exact":
        dsr, cqt_hop = exact_cqt_grid(cfg.sample_rate, cfg.step_s / CQT_FRAMES_PER_STEP)
        x_ds = resample(np.asarray(wave, dtype=np.float32), cfg.sample_rate, dsr)
        C = cqt_magnitude(x_ds, dsr, Fc, cqt_hop).astype(np.float64)  # (Fc', 84)
    else:
        C = multirate_cqt_magnitude(wave, cfg.sample_rate, Fc, cfg.step_s / CQT_FRAMES_PER_STEP).astype(np.float64)
    if C.shape[0] < Fc:  # resampling rounding can lose the very last frame
        C = np.concatenate([C, np.repeat(C[-1:], Fc - C.shape[0], axis=0)], axis=0)
    midi = CQT_MIDI0 + np.arange(CQT_BINS)
    w = C + EPS
    pitch = ((w @ midi) / w.sum(axis=1) - 60.0) / 12.0  # (Fc,) octaves re C4
    chroma = (C**2).reshape(Fc, CQT_BINS // 12, 12).sum(axis=1)  # (Fc, octaves, 12) -> (Fc, 12) energy
    chroma = (chroma + EPS) / (chroma.sum(axis=1, keepdims=True) + 12 * EPS)  # each frame sums to 1

    frame = np.concatenate([pooled, np.stack([onset, rms_db, centroid, flatness], axis=1)], axis=1)  # (F, P + 4)
    return {"frame": frame, "cqt_pitch": pitch, "chroma": chroma, "onset_env": onset, "onset_peak": peak}


def step_summaries(
    wave: np.ndarray, cfg: FeatureConfig, logmel: torch.Tensor | np.ndarray | None = None
) -> StepSummaries:
    """Per-step additive summaries of a song (the expensive part, done once per song).

    Args:
        wave: (n,) float32 mono at ``cfg.sample_rate``, at least one step long.
        cfg: feature settings.
        logmel: optional log-Mel of the song (see :func:`frame_features`), to avoid recomputing it.

    Returns:
        StepSummaries with ``values`` of shape (n_steps, S).
    """
    ff = frame_features(wave, cfg, logmel)
    n_steps = n_steps_for(len(wave), cfg)
    m = frames_per_step(cfg)
    hop_s = cfg.hop_length / cfg.sample_rate

    # pitch lives on the CQT grid: its per-step mean / mean square are taken there
    frame_mean = np.concatenate(
        [_per_step_mean(ff["frame"], n_steps), _per_step_mean(ff["cqt_pitch"][:, None], n_steps)], axis=1
    )
    frame_sq = np.concatenate(
        [_per_step_mean(ff["frame"] ** 2, n_steps), _per_step_mean(ff["cqt_pitch"][:, None] ** 2, n_steps)], axis=1
    )
    chroma = _per_step_mean(ff["chroma"], n_steps)  # (n_steps, 12)
    onset_rate = ff["onset_peak"].reshape(n_steps, m).sum(axis=1, keepdims=True) / cfg.step_s  # (n_steps, 1)

    # onset-envelope autocorrelation terms, local mean removed; lag products go to the step of t
    env = ff["onset_env"]
    mhalf = max(1, int(round(PEAK_MEAN_HALF_S / hop_s)))
    e = env - uniform_filter1d(env, 2 * mhalf + 1, mode="nearest")
    lags = _tempo_lags(cfg)
    F = e.shape[0]
    prods = np.zeros((F, len(lags)))
    for j, L in enumerate(lags):
        if L < F:
            prods[: F - L, j] = e[: F - L] * e[L:]
    ac = _per_step_mean(prods, n_steps)  # (n_steps, n_lags)
    ac0 = _per_step_mean((e**2)[:, None], n_steps)  # (n_steps, 1)

    blocks = {
        "frame": frame_mean,
        "frame_sq": frame_sq,
        "chroma": chroma,
        "onset_rate": onset_rate,
        "ac": ac,
        "ac0": ac0,
    }
    slices, start = {}, 0
    for name, arr in blocks.items():
        slices[name] = slice(start, start + arr.shape[1])
        start += arr.shape[1]
    values = np.concatenate(list(blocks.values()), axis=1)
    return StepSummaries(values=values, slices=slices, n_frame=frame_mean.shape[1], lags=lags, frame_s=hop_s)


def window_bounds(n_steps: int, cfg: FeatureConfig) -> tuple[np.ndarray, np.ndarray]:
    """The 30 s window of every step, in step units (may fall on half steps).

    Returns:
        (starts, stops): (n_steps,) float64 each. Window of step k is
        ``[k + 0.5 - W / 2, k + 0.5 + W / 2)`` with W = global_window_s / step_s (60),
        shifted into ``[0, n_steps]`` when n_steps >= W, else ``[0, n_steps)``.
    """
    W = cfg.global_window_s / cfg.step_s
    k = np.arange(n_steps, dtype=np.float64)
    if n_steps >= W:
        starts = np.clip(k + 0.5 - W / 2.0, 0.0, n_steps - W)
        return starts, starts + W
    return np.zeros(n_steps), np.full(n_steps, float(n_steps))


def window_mean(per_step: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """Mean of per-step values over (possibly fractional) step intervals, via cumulative sums.

    The cumulative sum is interpolated linearly inside a step, so a partly covered step
    counts with the fraction covered. O(n_steps + n_windows).

    Args:
        per_step: (n_steps, d).
        starts, stops: (m,) interval bounds in step units, 0 <= start < stop <= n_steps.

    Returns:
        np.ndarray: (m, d) float64.
    """
    x = np.asarray(per_step, dtype=np.float64)
    n = x.shape[0]
    C = np.zeros((n + 1, x.shape[1]))
    C[1:] = np.cumsum(x, axis=0)

    def P(t: np.ndarray) -> np.ndarray:
        t = np.clip(np.asarray(t, dtype=np.float64), 0.0, n)
        i = np.minimum(np.floor(t).astype(np.int64), n - 1)
        return C[i] + (t - i)[:, None] * (C[i + 1] - C[i])

    width = np.asarray(stops, dtype=np.float64) - np.asarray(starts, dtype=np.float64)
    return (P(stops) - P(starts)) / np.maximum(width, EPS)[:, None]


def _profile_bank(profile: np.ndarray) -> np.ndarray:
    """(12 rotations, 12) z-scored profiles; row r has its tonic at pitch class r."""
    bank = np.stack([np.roll(profile, r) for r in range(12)])
    bank = bank - bank.mean(axis=1, keepdims=True)
    return bank / np.linalg.norm(bank, axis=1, keepdims=True)


def descriptor_from_means(s: StepSummaries, means: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Turn window means of the step summaries into descriptors.

    Args:
        s: the song's summaries (for the layout).
        means: (m, S) window means of ``s.values``.

    Returns:
        np.ndarray: (m, G) float32, finite.
    """
    p = _n_pool(cfg)
    fm = means[:, s.slices["frame"]]
    fsq = means[:, s.slices["frame_sq"]]
    std = np.sqrt(np.maximum(fsq - fm**2, 0.0))
    i_on, i_rms, i_cen, i_flat, i_pitch = p, p + 1, p + 2, p + 3, p + 4

    # tempo from the window's onset autocorrelation
    ac = means[:, s.slices["ac"]] / (means[:, s.slices["ac0"]] + EPS)  # (m, n_lags), normalised
    bpm = 60.0 / (s.lags * s.frame_s)
    prior = np.exp(-0.5 * (np.log2(bpm / TEMPO_PRIOR_BPM) / TEMPO_PRIOR_OCT) ** 2)
    best = np.argmax(ac * prior[None, :], axis=1)
    tempo = np.log2(bpm[best] / TEMPO_PRIOR_BPM)
    clarity = np.clip(ac.max(axis=1), 0.0, 1.0)

    # tonality from the window chroma
    chroma = means[:, s.slices["chroma"]] + EPS
    pc = chroma / chroma.sum(axis=1, keepdims=True)  # (m, 12), sums to 1
    z = pc - pc.mean(axis=1, keepdims=True)
    zn = z / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-6)
    r_maj = zn @ _profile_bank(KK_MAJOR).T  # (m, 12 tonics)
    r_min = zn @ _profile_bank(KK_MINOR).T
    best_major = r_maj.max(axis=1) >= r_min.max(axis=1)
    tonic = np.where(best_major, r_maj.argmax(axis=1), r_min.argmax(axis=1))
    idx = (tonic[:, None] + np.arange(12)[None, :]) % 12
    chroma_key = 12.0 * np.take_along_axis(pc, idx, axis=1)  # (m, 12), tonic first, mean 1
    tonalness = 10.0 * (1.0 + (pc * np.log(pc)).sum(axis=1) / np.log(12.0))  # 10 * (1 - entropy / ln 12)

    cols = [
        (fm[:, :p] + 5.0) / 5.0,
        std[:, :p] / 2.0,
        fm[:, i_on : i_on + 1],
        std[:, i_on : i_on + 1],
        means[:, s.slices["onset_rate"]] / 4.0,
        tempo[:, None],
        clarity[:, None],
        fm[:, i_rms : i_rms + 1] / 20.0,
        std[:, i_rms : i_rms + 1] / 10.0,
        fm[:, i_cen : i_cen + 1],
        std[:, i_cen : i_cen + 1],
        fm[:, i_flat : i_flat + 1] / 5.0,
        std[:, i_flat : i_flat + 1] / 5.0,
        fm[:, i_pitch : i_pitch + 1],
        std[:, i_pitch : i_pitch + 1],
        chroma_key,
        r_maj.max(axis=1, keepdims=True),
        r_min.max(axis=1, keepdims=True),
        (r_maj.max(axis=1) - r_min.max(axis=1))[:, None],
        tonalness[:, None],
    ]
    out = np.concatenate(cols, axis=1).astype(np.float32)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def window_descriptor(s: StepSummaries, starts: np.ndarray, stops: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Descriptor of arbitrary spans of a song (e.g. one whole 30 s training clip).

    Args:
        s: the song's :class:`StepSummaries`.
        starts, stops: (m,) span bounds in steps (fractions allowed), within [0, n_steps].
        cfg: feature settings.

    Returns:
        np.ndarray: (m, G) float32.
    """
    starts = np.atleast_1d(np.asarray(starts, dtype=np.float64))
    stops = np.atleast_1d(np.asarray(stops, dtype=np.float64))
    return descriptor_from_means(s, window_mean(s.values, starts, stops), cfg)


def step_descriptors(s: StepSummaries, cfg: FeatureConfig) -> np.ndarray:
    """Descriptor of the 30 s window centred on every step (see :func:`window_bounds`).

    Returns:
        np.ndarray: (n_steps, G) float32.
    """
    starts, stops = window_bounds(s.n_steps, cfg)
    return window_descriptor(s, starts, stops, cfg)


def global_descriptor(
    wave: np.ndarray, cfg: FeatureConfig, logmel: torch.Tensor | np.ndarray | None = None
) -> np.ndarray:
    """The built-in global feature of every step of a song.

    Args:
        wave: (n,) float32 mono at ``cfg.sample_rate``, at least one step long.
        cfg: feature settings.
        logmel: optional log-Mel of the song, reused if given.

    Returns:
        np.ndarray: (n_steps, G) float32, finite; G = :func:`descriptor_dim`.
    """
    return step_descriptors(step_summaries(wave, cfg, logmel), cfg)
