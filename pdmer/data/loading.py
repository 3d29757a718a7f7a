"""Dataset dispatch (``data.source``) and listener-disjoint splits."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from pdmer.config import DataConfig
from pdmer.data.types import Curve, DataError, Dataset

log = logging.getLogger(__name__)


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the dataset the config names.

    Raises:
        DataError: the data failed validation (the message lists every problem).
    """
    if cfg.source == "synthetic":
        from pdmer.data.synthetic import load_synthetic

        return load_synthetic(cfg.synthetic, Path(cfg.root) if cfg.root else None)
    if cfg.source == "generic":
        from pdmer.data.generic import load_generic

        if not cfg.root:
            raise DataError("data.source=generic needs data.root=<folder with audio/ and ratings.csv>")
        return load_generic(Path(cfg.root))
    raise DataError(f"unknown data.source {cfg.source!r}")


def _count(value: float, n: int) -> int:
    return int(round(value * n)) if value < 1 else int(value)


def split_listeners(dataset: Dataset, cfg: DataConfig) -> dict[str, list[str]]:
    """Listener-disjoint train / val / test split, deterministic by ``cfg.split.seed``.

    Listeners with fewer than ``cfg.min_songs_per_listener`` rated songs cannot form a
    task (a support song and a query song); they are listed under "excluded".

    Returns:
        {"train": [...], "val": [...], "test": [...], "excluded": [...]} of annotator ids.
    """
    by = dataset.by_annotator()
    usable = [a for a, cs in by.items() if len(cs) >= cfg.min_songs_per_listener and a != "consensus"]
    excluded = sorted(set(by) - set(usable))
    rng = np.random.default_rng(cfg.split.seed)
    order = [usable[i] for i in rng.permutation(len(usable))]
    n_test = _count(cfg.split.test_listeners, len(order))
    n_val = _count(cfg.split.val_listeners, len(order))
    if len(order) - n_test - n_val < 1:
        raise DataError(
            f"{dataset.name}: {len(order)} usable listeners (with >= {cfg.min_songs_per_listener} songs) "
            f"cannot be split into {n_test} test, {n_val} validation and at least 1 training listener"
        )
    splits = {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test : n_test + n_val]),
        "train": sorted(order[n_test + n_val :]),
        "excluded": excluded,
    }
    log.info("listeners: %d train, %d val, %d test, %d excluded", *(len(splits[k]) for k in ("train", "val", "test", "excluded")))
    return splits


def curves_of(dataset: Dataset, listeners: list[str]) -> dict[str, list[Curve]]:
    by = dataset.by_annotator()
    return {a: by[a] for a in listeners}
