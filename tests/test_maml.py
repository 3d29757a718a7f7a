"""MAML meta-gradients against finite differences on a tiny float64 DSAML."""

import pytest
import torch

from pdmer.config import ModelConfig
from pdmer.meta.maml import adapt, call, inner_loop, meta_step, split_state
from pdmer.metrics import emotion_loss
from pdmer.models.dsaml import DSAML

T, G = 8, 5


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        hidden=8,
        layers=1,
        heads=2,
        ff=8,
        dropout=0.0,
        lstm_hidden=4,
        head_hidden=4,
        local_window=1,
        global_window=3,
        **kw,
    )
    return DSAML(cfg, global_dim=G).double()


def batch(seed, B=2):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, 51, 128, generator=g, dtype=torch.float64),
        torch.randn(B, T, G, generator=g, dtype=torch.float64),
        torch.rand(B, T, 2, generator=g, dtype=torch.float64) * 2 - 1,
    )


def loss_fn(model, params, buffers, b):
    local, glob, target = b
    return emotion_loss(call(model, params, buffers, local, glob).pred, target)


def query_after_adaptation(model, flat, names, shapes, support, query, steps, lr, first_order):
    flat = flat.detach().requires_grad_(True)  # the inner loop differentiates w.r.t. it
    params = {}
    i = 0
    for n, s in zip(names, shapes, strict=False):
        k = int(torch.tensor(s).prod()) if len(s) else 1
        params[n] = flat[i : i + k].view(s)
        i += k
    _, buffers = split_state(model)
    adapted, _ = inner_loop(model, params, buffers, support, loss_fn, steps, lr, first_order)
    return loss_fn(model, adapted, buffers, query)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_matches_finite_differences(first_order):
    model = tiny_model()
    model.eval()  # BatchNorm on running stats: the loss is a pure function of the parameters
    support, query = batch(1, B=1), batch(2, B=2)
    steps, lr = 2, 0.1
    model.zero_grad()
    meta_step(model, [(support, query)], loss_fn, steps, lr, first_order)
    params, buffers = split_state(model)
    names = list(params)
    analytic = torch.cat([params[n].grad.flatten() for n in names])

    if first_order:
        # FOMAML: the meta-gradient is the query gradient at the adapted parameters
        adapted, _ = inner_loop(
            model,
            {k: p.detach().requires_grad_() for k, p in params.items()},
            buffers,
            support,
            loss_fn,
            steps,
            lr,
            True,
        )
        theta = torch.cat([adapted[n].detach().flatten() for n in names])

        def f(flat):
            return query_after_adaptation(
                model, flat, names, [params[n].shape for n in names], support, query, 0, lr, True
            )

    else:
        theta = torch.cat([params[n].detach().flatten() for n in names])

        def f(flat):
            return query_after_adaptation(
                model, flat, names, [params[n].shape for n in names], support, query, steps, lr, False
            )

    rng = torch.Generator().manual_seed(0)
    idx = torch.randperm(theta.numel(), generator=rng)[:40]
    eps = 1e-6
    numeric = []
    for i in idx:
        e = torch.zeros_like(theta)
        e[i] = eps
        with torch.enable_grad():
            numeric.append(((f(theta + e) - f(theta - e)) / (2 * eps)).item())
    numeric = torch.tensor(numeric, dtype=torch.float64)
    torch.testing.assert_close(analytic[idx], numeric, rtol=1e-4, atol=1e-7)


def test_second_order_differs_from_first_order():
    model = tiny_model()
    model.eval()
    support, query = batch(1, B=1), batch(2)
    grads = []
    for fo in (True, False):
        model.zero_grad()
        meta_step(model, [(support, query)], loss_fn, 2, 0.5, fo)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert (grads[0] - grads[1]).norm() > 1e-6 * grads[1].norm()


def test_adapt_leaves_model_untouched_and_lowers_support_loss():
    model = tiny_model()
    model.eval()
    support = batch(3, B=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted, losses = adapt(model, support, loss_fn, steps=10, lr=0.05)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    _, buffers = split_state(model)
    with torch.no_grad():
        after = loss_fn(model, adapted, buffers, support)
    assert losses.shape == (10,)
    assert after < losses[0]


@pytest.mark.parametrize("first_order", [False, True])
def test_learned_inner_lr_gradient_matches_finite_differences(first_order):
    """MAML++ per-tensor rates: d(query loss)/d(log lr) by autograd equals finite differences.

    For first-order MAML the inner gradients are constants, but the adapted parameters still
    depend on the rates (theta' = theta - exp(a) * g), so the rates get an exact gradient.
    """
    from pdmer.meta.maml import LR_PREFIX, attach_inner_lrs

    model = tiny_model()
    model.eval()
    attach_inner_lrs(model, 0.1)
    support, query = batch(1, B=1), batch(2, B=2)
    model.zero_grad()
    meta_step(model, [(support, query)], loss_fn, 2, 0.1, first_order)
    names = [k for k, _ in model.named_parameters() if k.startswith(LR_PREFIX)][:6]
    eps = 1e-6
    # the unperturbed inner trajectory's gradients (the constants of first-order MAML)
    params0, buffers0 = split_state(model)
    traj_steps = {k: [] for k in params0}
    cur = {k: v.detach().requires_grad_() for k, v in params0.items()}
    for _ in range(2):
        grads = torch.autograd.grad(loss_fn(model, cur, buffers0, support), tuple(cur.values()))
        rates = {k: buffers0[LR_PREFIX + k.replace(".", "__")].exp().detach() for k in cur}
        for (k, _v), g in zip(cur.items(), grads, strict=False):
            traj_steps[k].append(g)
        cur = {k: (v - rates[k] * g).detach().requires_grad_() for (k, v), g in zip(cur.items(), grads, strict=False)}

    def rate_of(k):
        return dict(model.named_parameters())[LR_PREFIX + k.replace(".", "__")].detach().exp()

    for name in names:
        p = dict(model.named_parameters())[name]
        analytic = p.grad.item()
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                p += sign * eps
            params, buffers = split_state(model)
            if first_order:
                # first-order: the inner gradients are constants taken on the unperturbed trajectory
                adapted = {k: v.detach() - sum(traj_steps[k]) * rate_of(k) for k, v in params.items()}
                values.append(loss_fn(model, adapted, buffers, query).item())
            else:
                with torch.enable_grad():
                    start = {k: v.detach().requires_grad_() for k, v in params.items()}
                    adapted, _ = inner_loop(
                        model, start, {k: v.detach() for k, v in buffers.items()}, support, loss_fn, 2, 0.1, False
                    )
                    values.append(loss_fn(model, adapted, buffers, query).item())
            with torch.no_grad():
                p -= sign * eps
        numeric = (values[0] - values[1]) / (2 * eps)
        assert analytic == pytest.approx(numeric, rel=1e-4, abs=1e-8), name
