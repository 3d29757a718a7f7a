"""Song -> dual-scale features, with an on-disk cache.

:class:`FeatureExtractor` decodes a song, computes the local patches and the built-in
descriptor once, and stores them in ``<cache_dir>/<audio hash>-<settings hash>.safetensors``
(safetensors only, never pickle; written to a temporary file then renamed, so a crash never
leaves a half-written cache file). The key hashes the audio file's bytes (not its name or
date) and every setting that changes the numbers, so a renamed file still hits the cache and
an edited file or a changed setting misses it. With ``global_encoder: embeddings`` the global
features come from the user's ``<song_id>.npy`` files at every call (they are cheap to read
and the user may replace them); the cache still saves the audio work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pdmer import paths
from pdmer.config import FeatureConfig
from pdmer.data.types import DataError, Song
from pdmer.features import descriptor as _desc
from pdmer.features.audio import check_waveform, load_audio, resample
from pdmer.features.embeddings import embedding_dim, load_embeddings
from pdmer.features.local import frames_per_step, log_mel, n_steps_for, patches_from_log_mel
from pdmer.io import atomic_write, sha256_file

log = logging.getLogger(__name__)

FEATURES_VERSION = "1"  # bump when the local pipeline's numbers change: part of the cache key
DEFAULT_CACHE_DIR = paths.features_cache_dir()


@dataclass
class SongFeatures:
    """Dual-scale inputs of one song on the 0.5 s step grid.

    Attributes:
        local: (n_steps, patch_frames, n_mels) = (n_steps, 51, 128) float16 log-Mel patches.
        global_: (n_steps, G) float32 global features (descriptor or user embeddings).
        song_id: the song ("" when unknown).
    """

    local: torch.Tensor
    global_: torch.Tensor
    song_id: str = ""

    def __post_init__(self) -> None:
        if self.local.ndim != 3 or self.global_.ndim != 2 or self.local.shape[0] != self.global_.shape[0]:
            raise ValueError(
                f"song {self.song_id!r}: local must be (n_steps, frames, mels) and global_ (n_steps, G) "
                f"with the same n_steps, got {tuple(self.local.shape)} and {tuple(self.global_.shape)}"
            )

    @property
    def n_steps(self) -> int:
        return int(self.local.shape[0])

    @property
    def global_dim(self) -> int:
        return int(self.global_.shape[1])

    def slice(self, start: int, stop: int) -> "SongFeatures":
        """Steps ``[start, stop)`` (Python slice semantics; views, no copy).

        Shapes:
            local (stop - start, 51, 128), global_ (stop - start, G)
        """
        return SongFeatures(self.local[start:stop], self.global_[start:stop], self.song_id)


def settings_key(cfg: FeatureConfig) -> dict:
    """Everything that changes the cached numbers (not paths, not the global encoder choice)."""
    return {
        "features_version": FEATURES_VERSION,
        "descriptor_version": _desc.descriptor_version(cfg),  # exact CQT: DESCRIPTOR_VERSION, the key as before
        "sample_rate": cfg.sample_rate,
        "step_s": cfg.step_s,
        "n_fft": cfg.n_fft,
        "hop_length": cfg.hop_length,
        "n_mels": cfg.n_mels,
        "patch_frames": cfg.patch_frames,
        "log_eps": cfg.log_eps,
        "global_window_s": cfg.global_window_s,
    }


def settings_hash(cfg: FeatureConfig) -> str:
    blob = json.dumps(settings_key(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


_file_hashes: dict[tuple[str, int, int], str] = {}


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes (memoised per process on path, size and mtime)."""
    path = Path(path)
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _file_hashes:
        _file_hashes[memo] = sha256_file(path)
    return _file_hashes[memo]


def compute_features(wave: np.ndarray, cfg: FeatureConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Local patches and built-in descriptor of a validated waveform (no cache).

    The log-Mel is computed once and shared by both scales.

    Args:
        wave: (n,) float32 mono at ``cfg.sample_rate``, at least one step long.
        cfg: feature settings.

    Returns:
        (local, descriptor): (n_steps, 51, 128) float16 and (n_steps, G) float32 tensors.
    """
    local, summaries = local_and_summaries(wave, cfg)
    return local, torch.from_numpy(_desc.step_descriptors(summaries, cfg))


def local_and_summaries(
    wave: np.ndarray, cfg: FeatureConfig, summaries: bool = True
) -> tuple[torch.Tensor, _desc.StepSummaries | None]:
    """Local patches and the descriptor's per-step summaries of a waveform (one log-Mel for both).

    The summaries need only a few seconds of audio around each step, where the descriptor
    needs the step's whole 30 s window: a long song is featurised segment by segment to
    this point, and its descriptors are taken once from the joined summaries
    (:mod:`pdmer.features.streaming`).

    Args:
        wave: (n,) float32 mono at ``cfg.sample_rate``, at least one step long.
        cfg: feature settings.
        summaries: False skips the descriptor's work (returns None for it).

    Returns:
        (local, summaries): (n_steps, 51, 128) float16 patches and the song's
        :class:`~pdmer.features.descriptor.StepSummaries` (n_steps rows), or None.
    """
    n_steps = n_steps_for(len(wave), cfg)
    stride = frames_per_step(cfg)
    logmel = log_mel(wave, cfg, n_frames=max((n_steps - 1) * stride + cfg.patch_frames, n_steps * stride))
    local = patches_from_log_mel(logmel, n_steps, cfg)
    return local, (_desc.step_summaries(wave, cfg, logmel) if summaries else None)


def _check_long_enough(wave: np.ndarray, cfg: FeatureConfig, name: str) -> int:
    n_steps = n_steps_for(len(wave), cfg)
    if n_steps < 1:
        raise DataError(
            f"{name}: audio is {len(wave) / cfg.sample_rate:.3f} s long, shorter than one {cfg.step_s} s step"
        )
    return n_steps


class FeatureExtractor:
    """Song -> :class:`SongFeatures`, cached on disk.

    Args:
        cfg: feature settings.
        cache_dir: cache folder; None takes ``cfg.cache_dir``, or ``<repo>/cache/features``
            when that is "".
        use_cache: False computes every time and writes nothing.

    Example:
        >>> fx = FeatureExtractor(FeatureConfig())
        >>> f = fx(Song("108", Path("108.mp3")))
        >>> f.local.shape, f.global_.shape   # (98, 51, 128), (98, 93)
    """

    def __init__(self, cfg: FeatureConfig, cache_dir: str | Path | None = None, use_cache: bool = True) -> None:
        self.cfg = cfg
        if cache_dir is None:
            cache_dir = cfg.cache_dir or DEFAULT_CACHE_DIR
        self.cache_dir = Path(cache_dir)
        self.use_cache = use_cache
        if cfg.global_encoder not in ("descriptor", "embeddings"):
            raise ValueError(
                f"features.global_encoder={cfg.global_encoder!r} is not one of ('descriptor', 'embeddings')"
            )
        if cfg.global_encoder == "embeddings" and not cfg.embeddings_dir:
            raise ValueError(
                "features.global_encoder=embeddings needs features.embeddings_dir (a folder of <song_id>.npy)"
            )
        frames_per_step(cfg)  # validates step / hop / patch settings early
        _desc.descriptor_version(cfg)  # validates features.cqt early
        self._global_dim: int | None = None

    @property
    def global_dim(self) -> int:
        """G: descriptor dimension, or the embeddings' D (read from the folder's first file)."""
        if self._global_dim is None:
            if self.cfg.global_encoder == "descriptor":
                self._global_dim = _desc.descriptor_dim(self.cfg)
            else:
                self._global_dim = embedding_dim(self.cfg.embeddings_dir)
        return self._global_dim

    def cache_path(self, audio_path: str | Path) -> Path:
        """Where the cache file of an audio file goes (hashes its bytes)."""
        return self.cache_dir / f"{file_hash(audio_path)[:20]}-{settings_hash(self.cfg)}.safetensors"

    def __call__(self, song: Song | str | Path) -> SongFeatures:
        """Features of one song.

        Args:
            song: a :class:`~pdmer.data.types.Song`, or an audio path (song id = file stem).

        Returns:
            SongFeatures: local (n_steps, 51, 128) float16, global_ (n_steps, G) float32,
            n_steps = floor(duration / 0.5 s).

        Raises:
            DataError: bad audio (see :func:`~pdmer.features.audio.load_audio`), a song
                shorter than one step, or a missing / mis-shaped embedding file.
        """
        if isinstance(song, Song):
            song_id, path = song.song_id, Path(song.path)
        else:
            path = Path(song)
            song_id = path.stem
        if not path.is_file():
            raise DataError(f"{path}: audio file not found (song {song_id!r})")
        local, desc = self._audio_features(path)
        return self._assemble(local, desc, song_id)

    def from_waveform(self, wave: np.ndarray, sample_rate: int, song_id: str = "") -> SongFeatures:
        """Features of an already decoded waveform (not cached).

        Args:
            wave: (n,) or (n, channels) samples in [-1, 1]; channels are averaged.
            sample_rate: its rate; resampled to ``cfg.sample_rate`` when different.
            song_id: needed with ``global_encoder: embeddings`` (names the .npy file).

        Returns:
            SongFeatures as :meth:`__call__`.
        """
        name = f"song {song_id!r}" if song_id else "waveform"
        x = check_waveform(wave, name)
        if sample_rate != self.cfg.sample_rate:
            x = resample(x, sample_rate, self.cfg.sample_rate)
        _check_long_enough(x, self.cfg, name)
        local, desc = compute_features(x, self.cfg)
        return self._assemble(local, desc, song_id)

    # -- internals --------------------------------------------------------------------------

    def _assemble(self, local: torch.Tensor, desc: torch.Tensor, song_id: str) -> SongFeatures:
        if self.cfg.global_encoder == "embeddings":
            if not song_id:
                raise DataError("global_encoder=embeddings needs a song id to find <song_id>.npy")
            glob = torch.from_numpy(load_embeddings(self.cfg.embeddings_dir, song_id, local.shape[0]))
        else:
            glob = desc
        return SongFeatures(local=local, global_=glob, song_id=song_id)

    def _audio_features(self, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        cache_file = self.cache_path(path) if self.use_cache else None
        if cache_file is not None and cache_file.is_file():
            hit = self._read_cache(cache_file)
            if hit is not None:
                log.debug("%s: features from cache %s", path, cache_file.name)
                return hit
        t0 = time.perf_counter()
        wave = load_audio(path, self.cfg.sample_rate)
        n_steps = _check_long_enough(wave, self.cfg, str(path))
        local, desc = compute_features(wave, self.cfg)
        log.debug("%s: %d steps featurised in %.1f s", path.name, n_steps, time.perf_counter() - t0)
        if cache_file is not None:
            self._write_cache(cache_file, local, desc, path, len(wave))
        return local, desc

    def _read_cache(self, cache_file: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            t = load_file(str(cache_file))
            local, desc = t["local"], t["global"]
            ok = (
                local.dtype == torch.float16
                and local.ndim == 3
                and tuple(local.shape[1:]) == (self.cfg.patch_frames, self.cfg.n_mels)
                and desc.ndim == 2
                and desc.shape[0] == local.shape[0]
                and desc.shape[1] == _desc.descriptor_dim(self.cfg)
            )
        except (SafetensorError, KeyError, OSError, ValueError) as e:
            log.warning("%s: unreadable cache file, recomputing (%s)", cache_file, e)
            return None
        if not ok:
            log.warning("%s: cache file has unexpected shapes, recomputing", cache_file)
            return None
        return local, desc

    def _write_cache(
        self, cache_file: Path, local: torch.Tensor, desc: torch.Tensor, path: Path, n_samples: int
    ) -> None:
        meta = {
            "format": "pdmer-features",
            "audio_file": path.name,
            "audio_sha256": file_hash(path),
            "n_samples": str(n_samples),
            "settings": json.dumps(settings_key(self.cfg), sort_keys=True),
        }
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tensors = {"local": local.contiguous(), "global": desc.contiguous()}
            atomic_write(cache_file, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        except OSError as e:  # a read-only or full disk must not stop training
            log.warning("%s: could not write the feature cache (%s)", cache_file, e)


def extract_waveform(wave: np.ndarray, sample_rate: int, cfg: FeatureConfig, song_id: str = "") -> SongFeatures:
    """Features of a decoded waveform (no cache); see :meth:`FeatureExtractor.from_waveform`.

    Shapes:
        wave (n,) or (n, channels) -> local (n_steps, 51, 128), global_ (n_steps, G)
    """
    return FeatureExtractor(cfg, use_cache=False).from_waveform(wave, sample_rate, song_id)


def extract_many(
    songs: Iterable[Song | str | Path] | Mapping[str, Song],
    cfg: FeatureConfig,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> dict[str, SongFeatures]:
    """Features of many songs, kept in memory (and cached on disk).

    Args:
        songs: Songs or audio paths, or a ``song_id -> Song`` mapping (e.g. ``Dataset.songs``).
        cfg: feature settings.
        cache_dir: as in :class:`FeatureExtractor`.
        progress: show a tqdm progress bar.

    Returns:
        dict: song_id -> SongFeatures, in input order.

    Raises:
        DataError: any bad song (the first one met), or two songs with the same id.
    """
    items = list(songs.values()) if isinstance(songs, Mapping) else list(songs)
    fx = FeatureExtractor(cfg, cache_dir)
    out: dict[str, SongFeatures] = {}
    it = items
    if progress:
        from tqdm import tqdm

        it = tqdm(items, desc="features", unit="song")
    for s in it:
        f = fx(s)
        if f.song_id in out:
            raise DataError(f"song id {f.song_id!r} appears twice ({s})")
        out[f.song_id] = f
    return out


__all__ = [
    "SongFeatures",
    "FeatureExtractor",
    "compute_features",
    "local_and_summaries",
    "extract_many",
    "extract_waveform",
    "file_hash",
    "settings_hash",
    "DEFAULT_CACHE_DIR",
]
