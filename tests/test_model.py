"""DSAML shapes, band masks checked through gradients, ablation switches."""

import pytest
import torch

from pdmer.config import ModelConfig, load_config
from pdmer.models.dsaml import DSAML, DualScaleEncoder, SpectrogramCNN, count_parameters

G = 6


def tiny(**kw):
    base = dict(
        hidden=16, layers=2, heads=2, ff=16, dropout=0.0, lstm_hidden=4, head_hidden=8, local_window=2, global_window=4
    )
    base.update(kw)
    return ModelConfig(**base)


def test_cnn_output_size_matches_paper():
    assert SpectrogramCNN().out_dim == 476  # 14 x 34 (dsaml.md)
    assert SpectrogramCNN((2, 2)).out_dim < 476


@pytest.mark.parametrize("T", [1, 7, 60])
def test_forward_shapes(T):
    torch.manual_seed(0)
    m = DSAML(tiny(), G).eval()
    out = m(torch.randn(3, T, 51, 128).half(), torch.randn(3, T, G))
    assert out.pred.shape == (3, T, 2)
    assert out.attn_local.shape == out.attn_global.shape == (3, T, T)
    torch.testing.assert_close(out.attn_local.sum(-1), torch.ones(3, T))


@pytest.mark.parametrize("which,window", [("local", 2), ("global", 4)])
@pytest.mark.parametrize("layers", [1, 2])
def test_band_mask_through_gradients(which, window, layers):
    """An encoder output step must not depend on inputs farther than layers * window."""
    torch.manual_seed(0)
    cfg = tiny(layers=layers, use_local_attention=which == "local", use_global_attention=which == "global")
    enc = DualScaleEncoder(cfg).eval()
    T, t = 25, 12
    x = torch.randn(1, T, cfg.hidden, requires_grad=True)
    out, _, _ = enc(x)
    (grad,) = torch.autograd.grad(out[0, t].sum(), x)
    dep = grad[0].abs().sum(-1) > 0  # (T,) which input steps influence step t
    reach = layers * window
    idx = torch.arange(T)
    assert not dep[(idx - t).abs() > reach].any(), "output depends on inputs outside the band"
    assert dep[(idx - t).abs() <= reach].all(), "output ignores inputs inside the band"


def test_ablation_switches():
    torch.manual_seed(0)
    x = (torch.randn(2, 10, 51, 128), torch.randn(2, 10, G))
    out = DSAML(tiny(use_local_attention=False), G).eval()(*x)
    assert out.attn_local is None and out.attn_global is not None
    m = DSAML(tiny(use_local_branch=False), G).eval()
    assert not hasattr(m, "cnn")
    assert m(*x).pred.shape == (2, 10, 2)


def test_paper_size_is_about_30M_parameters():
    cfg = load_config(None, ["size=paper"])
    n = count_parameters(DSAML(cfg.model, 1024))
    assert 28e6 < n < 33e6


def test_mlp_skip_path_fits_a_nonlinear_target_and_starts_the_model_there():
    """model.skip_hidden: the MLP skip path learns a per-step target the linear probe cannot, the network's
    output layer starts at zero (the model predicts the probe), and the fit is the same for the same seed."""
    torch.manual_seed(0)
    x = torch.randn(4000, G) * 3 + 1  # raw global features, far from standardised
    y = torch.stack([torch.tanh(x[:, 0] * x[:, 1] / 4), torch.sin(x[:, 2])], 1) * 0.5  # (N, 2), not linear in x
    models = []
    for _ in range(2):
        m = DSAML(tiny(linear_skip=True, skip_hidden=32), G)
        m.fit_input_stats(torch.randn(10, 51, 128), x)
        rmse = m.fit_skip(x, y, steps=600, seed=3)
        models.append(m)
    a, b = models
    assert all(torch.equal(p, q) for p, q in zip(a.skip.parameters(), b.skip.parameters(), strict=True))
    coef = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution
    linear = (torch.cat([x, torch.ones(len(x), 1)], 1) @ coef - y).pow(2).mean().sqrt()
    assert rmse < 0.5 * float(linear)  # the best linear probe is far worse
    a.eval()
    g = x[:60][None]
    with torch.no_grad():
        out = a(torch.randn(1, 60, 51, 128).half(), g).pred
        probe = a.skip((g - a.global_mean) / a.global_std)
    torch.testing.assert_close(out, probe)
    assert float((out - y[:60]).pow(2).mean().sqrt()) < 0.6 * float(linear)


def test_channels_last_cnn_predicts_the_same_and_leaves_training_unchanged():
    """Evaluation's CPU layout (``channels_last_cnn``): the same curves up to float rounding, the same
    parameter objects and values after it, and a training step after it equals one without it."""
    import copy

    from pdmer.models.dsaml import channels_last_cnn

    torch.manual_seed(0)
    m = DSAML(tiny(), 10)
    twin = copy.deepcopy(m)
    loc, glo = torch.randn(3, 12, 51, 128), torch.randn(3, 12, 10)
    with torch.no_grad():
        want = m.eval()(loc, glo).pred
        params = [p for p in m.parameters()]
        before = [p.detach().clone() for p in params]
        with channels_last_cnn(m):
            assert m.cnn.channels_last and m.cnn.net[4].weight.is_contiguous(memory_format=torch.channels_last)
            got = m(loc, glo).pred
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not m.cnn.channels_last and all(p.is_contiguous() for p in m.parameters())
    assert [p for p in m.parameters()] == params and all(torch.equal(p, b) for p, b in zip(params, before))
    for model in (m, twin):
        model.train()
        model.zero_grad()
        model(loc, glo).pred.square().mean().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(m.parameters(), twin.parameters()))
