"""train.target=consensus: the listener-blind losses see the training listeners' mean curve."""

import numpy as np
import pytest
import torch

from pdmer.config import ConfigError, load_config
from pdmer.data.types import Curve
from pdmer.features.cache import SongFeatures
from pdmer.meta.tasks import TaskSampler, consensus_curves


def test_consensus_is_the_per_step_mean_of_the_listeners_who_rated_the_step():
    a = Curve("s", "a", 0, np.full((6, 2), 0.2, np.float32))
    b = Curve("s", "b", 3, np.full((6, 2), -0.4, np.float32))
    mean = consensus_curves([a, b])["s"]
    assert mean.start_step == 0 and mean.n_steps == 9
    np.testing.assert_allclose(mean.values[:3], 0.2, atol=1e-7)
    np.testing.assert_allclose(mean.values[3:6], -0.1, atol=1e-7)
    np.testing.assert_allclose(mean.values[6:], -0.4, atol=1e-7)


def test_consensus_batch_targets_the_mean_on_the_crops_steps():
    rng = np.random.default_rng(0)
    n = 40
    feats = {
        "s": SongFeatures(
            torch.zeros(n, 51, 128, dtype=torch.float16), torch.arange(n, dtype=torch.float32)[:, None], "s"
        ),
        "t": SongFeatures(torch.zeros(n, 51, 128, dtype=torch.float16), -torch.ones(n, 1), "t"),
    }
    curves = {
        f"l{i}": [
            Curve("s", f"l{i}", 0, rng.normal(0, 0.3, (n, 2)).astype(np.float32)),
            Curve("t", f"l{i}", 0, rng.normal(0, 0.3, (n, 2)).astype(np.float32)),
        ]
        for i in range(5)
    }
    sampler = TaskSampler(curves, feats, 10, np.random.default_rng(1))
    mean = np.mean([cs[0].values for cs in curves.values()], 0)
    _, glob, target = sampler.dmer_batch(8, consensus=True)
    checked = 0
    for g, y in zip(glob, target):
        if g[0, 0] >= 0:  # song "s": its global feature is the step index
            start = int(g[0, 0])
            np.testing.assert_allclose(y.numpy(), mean[start : start + 10], atol=1e-6)
            checked += 1
    assert checked
    _, _, own = TaskSampler(curves, feats, 10, np.random.default_rng(1)).dmer_batch(8)
    assert not torch.allclose(own, target)  # the listener's own curves are another target


def test_target_is_a_choice():
    assert load_config("dmer.synthetic.dsaml", ["train.target=consensus"]).train.target == "consensus"
    with pytest.raises(ConfigError, match="train.target"):
        load_config("dmer.synthetic.dsaml", ["train.target=mean"])
