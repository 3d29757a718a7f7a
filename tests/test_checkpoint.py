"""Checkpoints: safetensors round trip, header checks, never pickle."""

import pickle

import pytest
import torch

from pdmer.checkpoint import CheckpointError, load_weights, read_meta, save_weights
from pdmer.config import ModelConfig
from pdmer.models.dsaml import DSAML

CFG = ModelConfig(hidden=16, layers=1, heads=2, ff=16, lstm_hidden=4, head_hidden=8)


def test_round_trip_parameters_and_buffers(tmp_path):
    torch.manual_seed(0)
    a = DSAML(CFG, 5)
    a.fit_input_stats(torch.randn(10, 51, 128), torch.randn(10, 5) * 3 + 1)
    save_weights(tmp_path / "w.safetensors", a, {"config_hash": "abc", "iteration": 3})
    torch.manual_seed(1)
    b = DSAML(CFG, 5)
    meta = load_weights(tmp_path / "w.safetensors", b, {"config_hash": "abc"})
    assert meta["iteration"] == 3 and read_meta(tmp_path / "w.safetensors")["config_hash"] == "abc"
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)
    assert not list(tmp_path.glob(".*tmp*")), "temporary file left behind"


def test_mismatched_header_or_shape_is_refused(tmp_path):
    save_weights(tmp_path / "w.safetensors", DSAML(CFG, 5), {"config_hash": "abc"})
    with pytest.raises(CheckpointError, match="config_hash"):
        load_weights(tmp_path / "w.safetensors", DSAML(CFG, 5), {"config_hash": "xyz"})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(tmp_path / "w.safetensors", DSAML(CFG, 6))


def test_pickle_file_is_not_loaded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle executed')",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(Exception) as err:
        load_weights(path, DSAML(CFG, 5))
    assert not isinstance(err.value, SystemExit)
