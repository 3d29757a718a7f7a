"""Audio -> dual-scale inputs per 0.5 s step (dsaml.md, 'Inputs, per 0.5 s step').

- local scale: :func:`local_patches`, one (51, 128) log-Mel patch per step;
- global scale: :func:`global_descriptor` (built-in, no download) or user embeddings
  (:func:`load_embeddings`, one ``<song_id>.npy`` per song);
- :class:`FeatureExtractor` / :func:`extract_many`: both scales of a song, cached on disk.
"""

from pdmer.features.audio import audio_duration, check_waveform, load_audio, resample
from pdmer.features.cache import (
    DEFAULT_CACHE_DIR,
    FeatureExtractor,
    SongFeatures,
    compute_features,
    extract_many,
    extract_waveform,
)
from pdmer.features.descriptor import (
    StepSummaries,
    descriptor_dim,
    descriptor_names,
    global_descriptor,
    step_summaries,
    window_bounds,
    window_descriptor,
)
from pdmer.features.embeddings import embedding_dim, load_embeddings
from pdmer.features.local import local_patches, log_mel, n_steps_for

__all__ = [
    "DEFAULT_CACHE_DIR",
    "FeatureExtractor",
    "SongFeatures",
    "StepSummaries",
    "audio_duration",
    "check_waveform",
    "compute_features",
    "descriptor_dim",
    "descriptor_names",
    "embedding_dim",
    "extract_many",
    "extract_waveform",
    "global_descriptor",
    "load_audio",
    "load_embeddings",
    "local_patches",
    "log_mel",
    "n_steps_for",
    "resample",
    "step_summaries",
    "window_bounds",
    "window_descriptor",
]
