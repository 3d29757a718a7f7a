"""Features of long songs, decoded and featurised segment by segment (memory does not grow with the song)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from pdmer.data.types import DataError
from pdmer.features.audio import check_audio_file, downmix

log = logging.getLogger(__name__)

STREAM_MIN_S = 180.0  # songs longer than this are featurised in segments (unless cached)
STREAM_CORE_S = 120.0  # steps kept from each segment
STREAM_MARGIN_S = 5.0  # audio context on each side: the filters of the step summaries reach about 2 s


def song_features(
    path: Path, extractor, stream_min_s: float | None = None, core_s: float | None = None, margin_s: float | None = None
):
    """Features of one song; a long song is decoded and featurised segment by segment.

    Songs up to ``stream_min_s`` (and songs already in the feature cache, or MP3 files whose
    length the header only estimates) go through ``extractor`` as in training. A longer
    song is read ``core_s`` seconds at a time with ``margin_s`` seconds of context on each
    side (segments start on step boundaries, context is clipped at the song's ends), so the
    decoded audio held at once does not grow with the song. Each segment gives its steps'
    local patches and the descriptor's per-step summaries
    (:func:`pdmer.features.cache.local_and_summaries`), whose filters (the STFT, the CQT's
    kernels, the onset envelope's moving mean, the tempo lags up to 1.5 s) all lie inside
    the margin; the descriptors, each a function of the summaries' mean over its step's 30 s
    window, are then taken once over the whole song. So the features equal the whole-song
    ones up to float rounding (checked by the tests), and each segment's audio is
    featurised with only the margins on top (about 8 % more audio than the song at the
    defaults, where a margin of half the global window would cost a third). Only the
    features themselves, about 13 KB per 0.5 s step, and the summaries (under 1 KB a step)
    are kept for the whole song.

    Args:
        path: the audio file (song id = file stem).
        extractor: a :class:`pdmer.features.FeatureExtractor`.
        stream_min_s, core_s, margin_s: None = ``STREAM_MIN_S``, ``STREAM_CORE_S``, ``STREAM_MARGIN_S``.

    Returns:
        SongFeatures.

    Raises:
        DataError: missing, undecodable, silent or NaN audio; a song shorter than one step.
    """
    import soundfile as sf

    stream_min_s = STREAM_MIN_S if stream_min_s is None else stream_min_s
    core_s = STREAM_CORE_S if core_s is None else core_s
    margin_s = STREAM_MARGIN_S if margin_s is None else margin_s
    cfg = extractor.cfg
    path = check_audio_file(path)
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises several types
        raise DataError(f"{path}: cannot read audio header ({e})") from None
    sr, frames = int(info.samplerate), int(info.frames)
    in_step = sr * cfg.step_s
    if (
        frames / max(sr, 1) <= stream_min_s
        or info.format == "MPEG"
        or abs(in_step - round(in_step)) > 1e-9
        or (extractor.use_cache and extractor.cache_path(path).is_file())
    ):
        return extractor(path)
    return _in_segments(path, extractor, sr, frames, int(round(in_step)), core_s, margin_s)


def _in_segments(path: Path, extractor, sr: int, frames: int, in_step: int, core_s: float, margin_s: float):
    """:func:`song_features` of a long song: ``in_step`` input samples per step, segments of ``core_s`` + margins."""
    import soundfile as sf

    from pdmer.features import SongFeatures, load_embeddings, resample
    from pdmer.features.cache import local_and_summaries
    from pdmer.features.descriptor import StepSummaries, step_descriptors
    from pdmer.features.local import step_samples

    cfg = extractor.cfg
    out_step = step_samples(cfg)
    n_steps = -(-frames * cfg.sample_rate // sr) // out_step  # floor(resampled length / step), as load_audio
    core = max(1, int(round(core_s / cfg.step_s)))
    margin = max(0, int(np.ceil(margin_s / cfg.step_s)))
    descriptor = cfg.global_encoder == "descriptor"
    local = torch.empty(n_steps, cfg.patch_frames, cfg.n_mels, dtype=torch.float16)  # (n_steps, 51, 128)
    rows: list[np.ndarray] = []  # the summaries of each segment's core steps
    summaries = None
    peak = 0.0
    t0 = time.perf_counter()
    try:
        with sf.SoundFile(str(path)) as f:
            for k0 in range(0, n_steps, core):
                k1 = min(k0 + core, n_steps)
                last = k1 + margin >= n_steps
                s0 = max(0, k0 - margin)  # first step of the segment
                f.seek(s0 * in_step)
                want = (k1 + margin - s0) * in_step
                block = f.read(frames - s0 * in_step if last else want, dtype="float32", always_2d=True)  # (n, ch)
                if not np.isfinite(block).all():
                    raise DataError(f"{path}: audio contains NaN or infinite samples")
                x = downmix(block)  # (n,)
                del block
                peak = max(peak, float(np.max(np.abs(x))) if x.size else 0.0)
                if sr != cfg.sample_rate:
                    x = resample(x, sr, cfg.sample_rate)
                seg_local, seg_sum = local_and_summaries(np.ascontiguousarray(x, dtype=np.float32), cfg, descriptor)
                del x
                a, b = k0 - s0, k1 - s0
                if seg_local.shape[0] < b:
                    raise DataError(
                        f"{path}: audio ended early (step {s0 + seg_local.shape[0]} of {n_steps}); "
                        "the file may be truncated"
                    )
                local[k0:k1] = seg_local[a:b]
                if seg_sum is not None:
                    rows.append(seg_sum.values[a:b])
                    summaries = seg_sum
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot decode audio, corrupt or unsupported format ({e})") from None
    from pdmer.features.audio import SILENCE_PEAK

    if peak < SILENCE_PEAK:
        raise DataError(f"{path}: audio is silent (peak {peak:.2e}, below {SILENCE_PEAK:g} = -80 dBFS)")
    if descriptor:
        whole = StepSummaries(
            np.concatenate(rows), summaries.slices, summaries.n_frame, summaries.lags, summaries.frame_s
        )
        glob = torch.from_numpy(step_descriptors(whole, cfg))  # (n_steps, G)
    else:
        glob = torch.from_numpy(load_embeddings(cfg.embeddings_dir, path.stem, n_steps))
    log.debug("%s: %d steps featurised in segments in %.1f s", path.name, n_steps, time.perf_counter() - t0)
    return SongFeatures(local=local, global_=glob, song_id=path.stem)
