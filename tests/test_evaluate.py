"""Sliding-window inference: coverage, one-pass equivalence, memory independent of length."""

import numpy as np
import pytest
import torch

from pdmer.config import ModelConfig
from pdmer.evaluation.inference import blend_weights, predict_steps, window_starts
from pdmer.evaluation.protocol import choose_support
from pdmer.models.dsaml import DSAML


class Feats:
    def __init__(self, n, G=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.local = torch.randn(n, 51, 128, generator=g).half()
        self.global_ = torch.randn(n, G, generator=g)
        self.n_steps = n


def model():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=16, layers=1, heads=2, ff=16, dropout=0.0, lstm_hidden=4, head_hidden=8)
    return DSAML(cfg, 4).eval()


@pytest.mark.parametrize("n,length,hop", [(10, 60, 30), (60, 60, 30), (61, 60, 30), (200, 60, 30), (200, 60, 7)])
def test_windows_cover_every_step(n, length, hop):
    starts = window_starts(n, length, hop)
    covered = np.zeros(n, bool)
    for s in starts:
        covered[s : s + min(length, n)] = True
        assert s + min(length, n) <= n
    assert covered.all()


def test_sliding_equals_one_pass_where_one_pass_fits():
    m, f = model(), Feats(60)
    with torch.no_grad():
        one = m(f.local[None, 5:45], f.global_[None, 5:45]).pred[0].numpy()
    np.testing.assert_allclose(predict_steps(m, f, 5, 45, seq_len=60, hop=30), one, rtol=1e-5, atol=1e-6)


def test_sliding_windows_average_overlaps():
    m, f = model(), Feats(90)
    got = predict_steps(m, f, 0, 90, seq_len=60, hop=30)  # windows [0, 60) and [30, 90)
    with torch.no_grad():
        a = m(f.local[None, 0:60], f.global_[None, 0:60]).pred[0].numpy()
        b = m(f.local[None, 30:90], f.global_[None, 30:90]).pred[0].numpy()
    w = blend_weights(60).numpy()[:, None]
    np.testing.assert_allclose(got[:30], a[:30], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        got[30:60], (w[30:] * a[30:] + w[:30] * b[:30]) / (w[30:] + w[:30]), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(got[60:], b[30:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_windows,batch_steps", [(1, 1024), (2, 1024), (32, 1024), (32, 7)])
def test_per_step_part_once_per_step_equals_whole_windows_with_adapted_weights(batch_windows, batch_steps):
    """predict_steps runs the per-step part (CNN, projections) once per step and only the sequence
    part per window: the same curve as the whole model on each window, with the model's weights and
    with adapted ones swapped in, however the steps are chunked."""
    from pdmer.meta.maml import call, split_state

    m, f = model(), Feats(200)
    params, buffers = split_state(m)
    params = {k: v.detach() + 0.05 * torch.randn_like(v) for k, v in params.items()}  # "adapted" weights
    w = blend_weights(60).double()[:, None]
    for p in (None, params):
        total, weight = torch.zeros(200, 2, dtype=torch.float64), torch.zeros(200, 1, dtype=torch.float64)
        with torch.no_grad():
            for s in window_starts(200, 60, 30):
                args = (f.local[None, s : s + 60], f.global_[None, s : s + 60])
                out = m(*args) if p is None else call(m, p, buffers, *args)
                total[s : s + 60] += w * out.pred[0].double()
                weight[s : s + 60] += w
        got = predict_steps(m, f, 0, 200, 60, 30, p, batch_windows=batch_windows, batch_steps=batch_steps)
        np.testing.assert_allclose(got, (total / weight).float().numpy(), rtol=1e-5, atol=1e-6)
    # the adapted weights do change the curve (the comparison above is not of two generic curves)
    assert np.abs(predict_steps(m, f, 0, 200, 60, 30, params) - predict_steps(m, f, 0, 200, 60, 30)).max() > 1e-3


class EdgyModel(torch.nn.Module):
    """Predicts the step's first global feature, plus a bias at the edges of its window (as a
    model with little context there does): the seams of a naive overlap average."""

    def __init__(self, edge=3, bias=0.5):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.edge, self.bias = edge, bias

    def steps(self, local, glob):
        return glob, glob

    def sequence(self, z, glob):
        from types import SimpleNamespace

        pred = self.w * z[..., :1].repeat(1, 1, 2)  # (W, L, 2)
        art = torch.zeros(z.shape[1], 1)
        art[: self.edge] = art[-self.edge :] = self.bias
        return SimpleNamespace(pred=pred + art)

    def forward(self, local, glob):
        return self.sequence(*self.steps(local, glob))


@pytest.mark.parametrize("hop", [30, 15])
def test_window_blending_leaves_no_seam(hop):
    """A song longer than two windows: where windows meet, the blend follows the windows' centres."""
    n = 200
    f = Feats(n)
    f.global_[:, 0] = torch.sin(torch.arange(n) / 9.0)  # a smooth "true" curve
    got = predict_steps(EdgyModel(), f, 0, n, seq_len=60, hop=hop)
    truth = f.global_[:, :1].repeat(1, 2).numpy()
    err = np.abs(got - truth)[3:-3]  # the song's own first and last steps have one window only
    assert err.max() < 0.06, f"seam of {err.max():.3f} where windows meet"
    jumps = np.abs(np.diff(got[:, 0]))
    assert jumps[3:-3].max() < 0.2  # the true curve moves at most 1/9 per step
    # the naive (uniform) average of the same windows leaves seams of bias / 2: the test can fail
    naive = np.zeros((n, 1))
    count = np.zeros((n, 1))
    for s in window_starts(n, 60, hop):
        naive[s : s + 60] += f.global_[s : s + 60, :1].numpy() + np.r_[[0.5] * 3, [0.0] * 54, [0.5] * 3][:, None]
        count[s : s + 60] += 1
    assert np.abs(naive / count - truth[:, :1])[3:-3].max() > 4 * err.max()


def test_support_choice_is_deterministic_and_listener_specific():
    curves = list(range(20))
    a = choose_support(curves, 1, 0, "L001")
    assert a == choose_support(curves, 1, 0, "L001")
    assert len({tuple(choose_support(curves, 1, 0, f"L{i:03d}")) for i in range(20)}) > 3
    assert len(choose_support(curves, 3, 0, "L001")) == 3


def test_paired_gain_by_listener():
    from pdmer.evaluation.protocol import ListenerResult
    from pdmer.evaluation.report import paired_gain

    def result(name, gains):
        per = {"generic": {}, "personalized": {}}
        for i, g in enumerate(gains):
            per["generic"][f"s{i}"] = {"ccc_mean": 0.1}
            per["personalized"][f"s{i}"] = {"ccc_mean": 0.1 + g}
        return ListenerResult(name, ["x"], per, {})

    out = paired_gain([result("a", [0.1, 0.3]), result("b", [-0.1]), result("c", [0.2])], n_boot=2000)
    assert out["mean"] == pytest.approx((0.2 - 0.1 + 0.2) / 3)
    assert out["listeners_improved"] == 2 and out["listeners"] == 3
    assert out["ci95"][0] <= out["mean"] <= out["ci95"][1]


def test_offset_condition_shifts_generic_by_mean_support_error():
    from pathlib import Path

    from pdmer.data.types import Curve, Dataset
    from pdmer.evaluation.protocol import Adaptation, evaluate_listener
    from pdmer.metrics import song_metrics

    m, f = model(), Feats(90)
    feats = {"s1": f, "s2": f}
    rng = np.random.default_rng(0)
    sup = Curve("s1", "L1", 10, rng.uniform(-1, 1, (40, 2)).astype(np.float32))
    qry = Curve("s2", "L1", 0, rng.uniform(-1, 1, (70, 2)).astype(np.float32))
    dataset = Dataset("test", Path("."), {}, [sup, qry])

    def loss_fn(model_, params, buffers, batch):
        from pdmer.meta.maml import call

        local, glob, target = batch
        return ((call(model_, params, buffers, local, glob).pred - target) ** 2).mean()

    # queries given: the support is drawn from [sup] only
    r = evaluate_listener(m, dataset, feats, "L1", [sup], Adaptation(loss_fn, 1, 0.01, 30, 15, 1, 0), True, [qry])
    shift = (sup.values[:30] - predict_steps(m, f, 10, 40, 30, 15)).mean(0)
    generic = predict_steps(m, f, 0, 70, 30, 15)
    np.testing.assert_allclose(r.curves["offset"]["s2"], generic + shift, rtol=1e-5, atol=1e-5)
    assert r.per_song["offset"]["s2"] == pytest.approx(song_metrics(generic + shift, qry.values))
    assert set(r.per_song["generic"]) == set(r.per_song["maml"]) == {"s2"}


def test_support_draws_are_distinct_and_draw_0_is_the_protocols():
    from pdmer.data.types import Curve

    curves = [Curve(f"s{i}", "L001", 0, np.zeros((10, 2), np.float32)) for i in range(7)]
    first = choose_support(curves, 2, 0, "L001")
    assert choose_support(curves, 2, 0, "L001", draw=0) == first
    draws = [choose_support(curves, 2, 0, "L001", draw=j) for j in range(3)]
    assert len({i for d in draws for i in d}) == 6  # no song is a support twice
    assert choose_support(curves, 2, 0, "L001", draw=3) is None  # one song left: not enough for a draw


def test_generic_curves_are_predicted_once_per_span_and_change_nothing(monkeypatch):
    """Listeners of one evaluation share the generic curves (Adaptation.generic): same results, fewer passes."""
    from pathlib import Path

    from pdmer.data.types import Curve, Dataset
    from pdmer.evaluation import protocol
    from pdmer.evaluation.protocol import Adaptation, evaluate_listener

    m = model()
    feats = {"s1": Feats(90, seed=1), "s2": Feats(70, seed=2), "s3": Feats(60, seed=3)}
    rng = np.random.default_rng(0)

    def curves(listener):
        return [
            Curve("s1", listener, 0, rng.uniform(-1, 1, (90, 2)).astype(np.float32)),
            Curve("s2", listener, 0, rng.uniform(-1, 1, (70, 2)).astype(np.float32)),
            Curve("s3", listener, 0, rng.uniform(-1, 1, (60, 2)).astype(np.float32)),
        ]

    pools = {a: curves(a) for a in ("L1", "L2", "L3")}
    dataset = Dataset("test", Path("."), {}, [c for cs in pools.values() for c in cs])

    def loss_fn(model_, params, buffers, batch):
        from pdmer.meta.maml import call

        local, glob, target = batch
        return ((call(model_, params, buffers, local, glob).pred - target) ** 2).mean()

    calls = []
    real = protocol.predict_curve
    monkeypatch.setattr(protocol, "predict_curve", lambda *a, **k: calls.append(a[2]) or real(*a, **k))

    def run(generic):
        calls.clear()
        how = Adaptation(loss_fn, 1, 0.01, 30, 15, 1, 0, generic=generic)
        out = [evaluate_listener(m, dataset, feats, a, pool, how, True) for a, pool in pools.items()]
        return out, len(calls)

    alone, n_alone = run(None)
    shared, n_shared = run({})
    assert n_shared < n_alone
    for a, b in zip(alone, shared):
        assert a.support == b.support and a.per_song == b.per_song
        for pa, pb in zip(a.parts, b.parts):
            assert pa.queries.keys() == pb.queries.keys()
            for sid in pa.queries:
                for x, y in zip(pa.queries[sid], pb.queries[sid]):
                    np.testing.assert_array_equal(x, y)
            np.testing.assert_array_equal(pa.check.generic, pb.check.generic)
            np.testing.assert_array_equal(pa.check.adapted, pb.check.adapted)
