"""Shared fixtures: tiny overrides that make any experiment run in seconds."""
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def tiny_overrides(tmp: Path, tag: str) -> list[str]:
    """Overrides that shrink data, model and schedule; outputs go under ``tmp``."""
    return [
        f"data.root={tmp / ('synthetic-' + tag)}",
        "data.synthetic.n_clips=8",
        "data.synthetic.n_long=1",
        "data.synthetic.long_min_s=60",
        "data.synthetic.long_max_s=70",
        "data.synthetic.n_listeners=10",
        "data.synthetic.min_songs_per_listener=4",
        "data.synthetic.max_songs_per_listener=6",
        "data.split.val_listeners=2",
        "data.split.test_listeners=2",
        "model.hidden=16",
        "model.heads=2",
        "model.ff=16",
        "model.layers=1",
        "model.lstm_hidden=8",
        "model.head_hidden=8",
        "meta.tasks_per_batch=2",
        "meta.query_songs=2",
        "meta.inner_steps=2",
        "train.iterations=2",
        "train.eval_every=1",
        "train.batch_songs=3",
        f"features.cache_dir={tmp / 'features'}",
        f"runtime.out_dir={tmp / 'runs'}",
        "runtime.progress=false",
    ]


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pdmer")
