"""The data sources (``data.source`` / ``data check --format``): one registry that training and ``data check`` share.

Each :class:`Source` names the folder layout ``data.root`` must hold and reads a dataset with the
options of its ``data.<source>`` config section; the caller adds what differs between training and
``data check`` (``require_audio``, ``strict``, ``render``) as keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pdmer.config import DataConfig
from pdmer.data.types import DataError, Dataset


def _deam(root: Path | None, cfg: DataConfig, **kw) -> Dataset:
    from pdmer.data.deam import load_deam
    from pdmer.data.loading import deam_options

    return load_deam(root, **deam_options(cfg.deam), **kw)


def _pmemo(root: Path | None, cfg: DataConfig, **kw) -> Dataset:
    from pdmer.data.loading import pmemo_options
    from pdmer.data.pmemo import load_pmemo

    return load_pmemo(root, **pmemo_options(cfg.pmemo), **kw)


def _vgmidi(root: Path | None, cfg: DataConfig, **kw) -> Dataset:
    from pdmer.data.loading import vgmidi_options
    from pdmer.data.vgmidi import load_vgmidi

    return load_vgmidi(root, **vgmidi_options(cfg.vgmidi), **kw)


def _generic(root: Path | None, cfg: DataConfig, **kw) -> Dataset:
    from pdmer.data.generic import load_generic

    return load_generic(Path(root), **{"scale": cfg.generic.scale, **kw})


def _synthetic(root: Path | None, cfg: DataConfig, **kw) -> Dataset:
    from pdmer.data.synthetic import load_synthetic

    return load_synthetic(cfg.synthetic, Path(root) if root else None, **kw)


@dataclass(frozen=True)
class Source:
    """One data source.

    Attributes:
        name: the ``data.source`` value.
        layout: what its root folder holds (said when ``data.root`` is missing); None: no root needed.
        read: ``read(root, data_cfg, **kw)`` -> Dataset.
    """

    name: str
    layout: str | None
    read: Callable[..., Dataset]


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("deam", "MEMD_audio/ and annotations/", _deam),
        Source("pmemo", "chorus/ and annotations/", _pmemo),
        Source("vgmidi", "labelled/annotations/ and labelled/midi/", _vgmidi),
        Source("generic", "audio/ and ratings.csv", _generic),
        Source("synthetic", None, _synthetic),
    )
}


def read_source(name: str, root: str | Path | None, cfg: DataConfig, **kw) -> Dataset:
    """Read the dataset of source ``name`` under ``root`` with the options of ``cfg`` (``data``) and ``kw``.

    Raises:
        DataError: an unknown source, a missing root where the source needs one, or what the reader raises.
    """
    source = SOURCES.get(name)
    if source is None:
        raise DataError(f"unknown data.source {name!r}")
    if source.layout is not None and not root:
        raise DataError(f"data.source={name} needs data.root=<folder with {source.layout}>")
    return source.read(Path(root) if root else None, cfg, **kw)


__all__ = ["SOURCES", "Source", "read_source"]
