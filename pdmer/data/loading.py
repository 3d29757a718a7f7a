"""Dataset dispatch (``data.source``), and the train / validation / test splits.

Two kinds of split (``data.split.kind``), both written to the run folder's ``splits.json``:

- ``listener`` (default): listener-disjoint. Listeners with enough songs are shuffled (seeded)
  into train / val / test; val and test listeners never train.
- ``song``: song-disjoint. Songs are split into train / val / test (DEAM: its official test
  songs, ids 2001-2058, and val songs drawn from the clips; other data: seeded fractions);
  the model trains on curves of train songs only, is selected on val songs and tested once on
  test songs. A listener may appear in several roles (as in the DEAM authors' protocol).

Either way the listener lists keep the keys "train", "val", "test", "excluded".
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np

from pdmer.config import DataConfig, DeamConfig, PmemoConfig, VgmidiConfig
from pdmer.data.types import Curve, DataError, Dataset

log = logging.getLogger(__name__)

ROLES = ("train", "val", "test")
MIN_QUERY_STEPS = 2  # within-song protocol: steps left after the support for a query (PCC needs 2)


def deam_options(cfg: DeamConfig) -> dict:
    """``data.deam`` -> keyword arguments of :func:`pdmer.data.deam.load_deam`."""
    return {
        "train_max_id": cfg.train_max_id,
        "test_ids": range(cfg.test_first_id, cfg.test_last_id + 1),
        "clip_steps": cfg.clip_steps,
        "clip_start_s": cfg.clip_start_s,
        "flat_mad": cfg.flat_mad,
        "flat_window": cfg.flat_window,
        "min_songs_per_listener": cfg.min_songs_per_listener,
        "min_songs_scope": cfg.min_songs_scope,
        "range_tol": cfg.range_tol,
    }


def pmemo_options(cfg: PmemoConfig) -> dict:
    """``data.pmemo`` -> keyword arguments of :func:`pdmer.data.pmemo.load_pmemo`."""
    return {"scale": cfg.scale, "range_tol": cfg.range_tol}


def vgmidi_options(cfg: VgmidiConfig) -> dict:
    """``data.vgmidi`` -> keyword arguments of :func:`pdmer.data.vgmidi.load_vgmidi`."""
    return {"audio_dir": cfg.audio_dir or None, "soundfont": cfg.soundfont or None, "min_recorded": cfg.min_recorded}


def load_dataset(cfg: DataConfig, require_audio: bool = False) -> Dataset:
    """Load the dataset the config names (labels; audio files are not opened).

    Args:
        cfg: the ``data`` config.
        require_audio: DEAM / PMEmo: a song without its audio file is a label-reader problem;
            False (default) leaves the audio to the audio check that training and
            ``data check`` run next (``pdmer.data.check``), which names every missing file.
            The generic layout always requires an audio file for each rated song.

    Raises:
        DataError: the data failed validation (the message lists every problem).
    """
    from pdmer.data.sources import read_source

    kw = {"require_audio": require_audio} if cfg.source in ("deam", "pmemo") else {}
    return read_source(cfg.source, cfg.root, cfg, **kw)


def _count(value: float, n: int) -> int:
    return int(round(value * n)) if value < 1 else int(value)


def _count_songs(value: float, n: int) -> int:
    """As ``_count``, but a positive fraction gives at least one song."""
    return max(1, _count(value, n)) if value > 0 and n > 1 else _count(value, n)


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
    log.info(
        "listeners: %d train, %d val, %d test, %d excluded",
        *(len(splits[k]) for k in ("train", "val", "test", "excluded")),
    )
    return splits


def split_songs(dataset: Dataset, cfg: DataConfig) -> dict[str, list[str]]:
    """Song-disjoint train / val / test songs, deterministic by ``cfg.split.seed``.

    Test songs are the dataset's official ones when it has them (DEAM: ``info["split"]["test"]``),
    else a ``cfg.split.test_songs`` share of the rated songs; val songs are a
    ``cfg.split.val_songs`` share of the remaining songs (a positive share is at least one
    song); the rest are train songs.

    Returns:
        {"train": [...], "val": [...], "test": [...]} of song ids (rated songs only), sorted.

    Raises:
        DataError: a role would get no song.
    """
    from pdmer.data.common import song_sort_key

    rated = sorted({c.song_id for c in dataset.curves}, key=song_sort_key)
    rng = np.random.default_rng(cfg.split.seed)
    official = (dataset.info.get("split") or {}).get("test")
    if official:
        test_set = set(official)
        test = [s for s in rated if s in test_set]
        rest = [s for s in rated if s not in test_set]
    else:
        order = [rated[i] for i in rng.permutation(len(rated))]
        n_test = _count_songs(cfg.split.test_songs, len(order))
        test, rest = order[:n_test], order[n_test:]
    order = [rest[i] for i in rng.permutation(len(rest))]
    n_val = _count_songs(cfg.split.val_songs, len(order))
    songs = {"train": order[n_val:], "val": order[:n_val], "test": test}
    empty = [k for k in ROLES if not songs[k]]
    if empty:
        raise DataError(
            f"{dataset.name}: {len(rated)} rated songs cannot be split into song-disjoint train / val / test "
            f"({', '.join(f'{k}: {len(songs[k])}' for k in ROLES)}); "
            "adjust data.split.val_songs / data.split.test_songs"
        )
    return {k: sorted(v, key=song_sort_key) for k, v in songs.items()}


def make_splits(
    dataset: Dataset, cfg: DataConfig, support_songs: int = 1, protocol: str = "songs", seq_len: int = 60
) -> tuple[dict[str, list[str]], dict[str, list[str]] | None]:
    """The run's split: listener lists (always) and, for ``split.kind=song``, song lists.

    With ``kind=song`` a listener is in

    - "train" with at least ``cfg.min_songs_per_listener`` curves on train songs;
    - "val" with a curve on a val song and ``support_songs`` curves on train songs (support);
    - "test" with a curve on a test song and, for ``protocol="songs"``, ``support_songs`` curves
      on train songs; for ``protocol="within_song"``, a test-song curve longer than
      ``seq_len + MIN_QUERY_STEPS`` steps (support = its first ``seq_len`` steps);
    - "excluded" in none of them.

    Returns:
        (listeners, songs): listeners as :func:`split_listeners`; songs as :func:`split_songs`
        or None for ``kind=listener``.
    """
    if cfg.split.kind == "listener":
        return split_listeners(dataset, cfg), None
    if cfg.split.kind != "song":
        raise DataError(f"unknown data.split.kind {cfg.split.kind!r}")
    songs = split_songs(dataset, cfg)
    role = {s: k for k in ROLES for s in songs[k]}
    listeners: dict[str, list[str]] = {k: [] for k in (*ROLES, "excluded")}
    for a, cs in dataset.by_annotator().items():
        n = Counter(role[c.song_id] for c in cs)
        roles = []
        if n["train"] >= cfg.min_songs_per_listener:
            roles.append("train")
        if n["val"] >= 1 and n["train"] >= support_songs:
            roles.append("val")
        if protocol == "within_song":
            if any(role[c.song_id] == "test" and c.n_steps >= seq_len + MIN_QUERY_STEPS for c in cs):
                roles.append("test")
        elif n["test"] >= 1 and n["train"] >= support_songs:
            roles.append("test")
        for k in roles or ["excluded"]:
            listeners[k].append(a)
    for k in ROLES:
        if not listeners[k]:
            raise DataError(
                f"{dataset.name}: the song-disjoint split leaves no {k} listener "
                f"({len(songs['train'])} train, {len(songs['val'])} val, {len(songs['test'])} test songs; "
                f"protocol {protocol}, seq_len {seq_len})"
            )
    log.info(
        "songs: %d train, %d val, %d test; listeners: %d train, %d val, %d test, %d excluded",
        *(len(songs[k]) for k in ROLES),
        *(len(listeners[k]) for k in (*ROLES, "excluded")),
    )
    return listeners, songs


def curves_of(dataset: Dataset, listeners: list[str]) -> dict[str, list[Curve]]:
    by = dataset.by_annotator()
    return {a: by[a] for a in listeners}


def role_curves(
    dataset: Dataset, listeners: list[str], songs: dict[str, list[str]] | None, role: str
) -> dict[str, tuple[list[Curve], list[Curve] | None]]:
    """What each listener of a role may use: ``listener -> (pool, queries)``.

    Listener split (``songs`` None): pool = all their curves, queries None (the evaluation
    draws the support from the pool and queries the rest). Song split: pool = their curves on
    train songs; queries = their curves on the role's songs (None for role "train").
    """
    by = curves_of(dataset, listeners)
    if songs is None:
        return {a: (by[a], None) for a in listeners}
    train, mine = set(songs["train"]), set(songs[role])
    return {
        a: (
            [c for c in by[a] if c.song_id in train],
            None if role == "train" else [c for c in by[a] if c.song_id in mine],
        )
        for a in listeners
    }
