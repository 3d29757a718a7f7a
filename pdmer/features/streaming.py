"""Features of long songs, decoded and featurised segment by segment (memory does not grow with the song)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from pdmer.data.types import DataError
from pdmer.features.audio import check_audio_file

log = logging.getLogger(__name__)

STREAM_MIN_S = 180.0  # songs longer than this are featurised in segments (unless cached)
STREAM_CORE_S = 120.0  # steps kept from each segment
STREAM_MARGIN_S = 20.0  # context on each side (at least half the global window + 5 s of filter context)


def song_features(
    path: Path, extractor, stream_min_s: float | None = None, core_s: float | None = None, margin_s: float | None = None
):
    """Features of one song; a long song is decoded and featurised segment by segment.

    Songs up to ``stream_min_s`` (and songs already in the feature cache, or MP3 files whose
    length the header only estimates) go through ``extractor`` as in training. A longer
    song is read ``core_s`` seconds at a time with ``margin_s`` seconds of context on each
    side (segments start on step boundaries, context is clipped at the song's ends), so the
    decoded audio held at once does not grow with the song. Each step's 30 s global window
    and every filter around it lie inside its segment, so the features equal the whole-song
    ones up to float rounding (checked by the tests); only the features themselves,
    about 13 KB per 0.5 s step, are kept for the whole song.

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

    from pdmer.features import SongFeatures, compute_features, load_embeddings, resample
    from pdmer.features.local import step_samples

    cfg = extractor.cfg
    out_step = step_samples(cfg)
    n_steps = -(-frames * cfg.sample_rate // sr) // out_step  # floor(resampled length / step), as load_audio
    window = int(np.ceil(cfg.global_window_s / cfg.step_s))  # W: steps of the global window
    core = max(window, int(round(core_s / cfg.step_s)))  # a first segment must hold a whole window
    margin = int(np.ceil(max(margin_s, cfg.global_window_s / 2 + 5.0) / cfg.step_s))
    g_dim = extractor.global_dim
    local = torch.empty(n_steps, cfg.patch_frames, cfg.n_mels, dtype=torch.float16)  # (n_steps, 51, 128)
    glob = torch.empty(n_steps, g_dim, dtype=torch.float32)  # (n_steps, G)
    peak = 0.0
    t0 = time.perf_counter()
    try:
        with sf.SoundFile(str(path)) as f:
            for k0 in range(0, n_steps, core):
                k1 = min(k0 + core, n_steps)
                last = k1 + margin >= n_steps
                # first step of the segment; the last segment also holds the song's final window
                s0 = max(0, min(k0 - margin, n_steps - window - margin) if last else k0 - margin)
                f.seek(s0 * in_step)
                want = (min(k1 + margin, n_steps) - s0) * in_step
                block = f.read(
                    frames - s0 * in_step if last else want, dtype="float32", always_2d=True
                )  # (n, channels)
                if not np.isfinite(block).all():
                    raise DataError(f"{path}: audio contains NaN or infinite samples")
                x = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]  # (n,)
                del block
                peak = max(peak, float(np.max(np.abs(x))) if x.size else 0.0)
                if sr != cfg.sample_rate:
                    x = resample(x, sr, cfg.sample_rate)
                seg_local, seg_desc = compute_features(np.ascontiguousarray(x, dtype=np.float32), cfg)
                del x
                a, b = k0 - s0, k0 - s0 + (k1 - k0)
                if seg_local.shape[0] < b:
                    raise DataError(
                        f"{path}: audio ended early (step {s0 + seg_local.shape[0]} of {n_steps}); "
                        "the file may be truncated"
                    )
                local[k0:k1] = seg_local[a:b]
                if cfg.global_encoder == "descriptor":
                    glob[k0:k1] = seg_desc[a:b]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot decode audio, corrupt or unsupported format ({e})") from None
    from pdmer.features.audio import SILENCE_PEAK

    if peak < SILENCE_PEAK:
        raise DataError(f"{path}: audio is silent (peak {peak:.2e}, below {SILENCE_PEAK:g} = -80 dBFS)")
    if cfg.global_encoder == "embeddings":
        glob = torch.from_numpy(load_embeddings(cfg.embeddings_dir, path.stem, n_steps))
    log.debug("%s: %d steps featurised in segments in %.1f s", path.name, n_steps, time.perf_counter() - t0)
    return SongFeatures(local=local, global_=glob, song_id=path.stem)
