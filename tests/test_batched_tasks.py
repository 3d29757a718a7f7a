"""Tasks adapted together (vmap) give the meta-gradient of tasks adapted one by one."""

import json
import math

import pytest
import torch
from test_maml import G, batch, tiny_model  # the tiny float64 DSAML and its random batches

from pdmer.config import ModelConfig
from pdmer.meta.maml import attach_inner_lrs, call, meta_step, meta_step_batched, split_state, tasks_batched
from pdmer.metrics import attention_loss, emotion_loss
from pdmer.models.dsaml import DSAML, BiLSTM


def loss_fn(model, params, buffers, b):
    local, glob, target = b
    out = call(model, params, buffers, local, glob)
    return emotion_loss(out.pred, target) + attention_loss(out.attn_local, out.attn_global)


def tasks(n=3, query=2):
    return [(batch(10 * i + 1, 1), batch(10 * i + 2, query)) for i in range(n)]


def meta_grads(model, fn, ts, steps, lr, first_order, **kw):
    model.zero_grad()
    stats = fn(model, ts, loss_fn, steps, lr, first_order, **kw)
    return torch.cat([p.grad.flatten() for p in model.parameters()]), stats


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("chunk", [0, 2])
def test_batched_meta_gradient_equals_sequential(first_order, chunk):
    model = tiny_model()
    model.train()  # BatchNorm on batch statistics, as in meta-training (dropout is 0)
    ts = tasks()
    seq, s_stats = meta_grads(model, meta_step, ts, 2, 0.1, first_order)
    bat, b_stats = meta_grads(model, meta_step_batched, ts, 2, 0.1, first_order, chunk=chunk)
    assert rel_err(bat, seq) < 1e-9
    torch.testing.assert_close(b_stats["query_loss"], s_stats["query_loss"])
    torch.testing.assert_close(b_stats["inner_losses"], s_stats["inner_losses"])
    # the check has teeth: one inner step fewer is far off
    fewer, _ = meta_grads(model, meta_step_batched, ts, 1, 0.1, first_order)
    assert rel_err(fewer, seq) > 1e-3


def test_batched_equals_sequential_with_learned_rates_and_without_local_branch():
    for kw in ({}, {"use_local_branch": False}):
        model = tiny_model(**kw)
        attach_inner_lrs(model, 0.1)
        model.double().train()
        with torch.no_grad():  # distinct rates per tensor, so a mix-up between tensors shows
            for i, p in enumerate(model.inner_log_lr.values()):
                p.add_(0.05 * (i % 5))
        ts = tasks(2)
        seq, _ = meta_grads(model, meta_step, ts, 2, 0.1, False)
        bat, _ = meta_grads(model, meta_step_batched, ts, 2, 0.1, False)
        assert rel_err(bat, seq) < 1e-9, kw


def test_batched_step_leaves_modules_as_they_were_and_updates_running_stats():
    model = tiny_model()
    model.train()
    bn = model.cnn.net[1]
    before = bn.running_mean.clone()
    meta_grads(model, meta_step_batched, tasks(2), 1, 0.1, True)
    assert not (bn.running_mean == before).all()  # updated once, after the batched step
    assert not model.lstm.unrolled and not bn.frozen_stats
    assert "unrolled" not in model.lstm.__dict__


def test_unrolled_bilstm_equals_nn_lstm():
    torch.manual_seed(0)
    lstm = BiLSTM(6, 5).double()
    x = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    ref, _ = lstm(x)
    g_ref = torch.autograd.grad(ref.square().sum(), [x, *lstm.parameters()])
    lstm.unrolled = True
    out, _ = lstm(x)
    g_out = torch.autograd.grad(out.square().sum(), [x, *lstm.parameters()])
    torch.testing.assert_close(out, ref)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)
    assert list(lstm.state_dict()) == list(torch.nn.LSTM(6, 5, batch_first=True, bidirectional=True).state_dict())


def test_batched_train_mode_dropout_draws_differ_per_task():
    """With dropout, each task draws its own masks (vmap randomness='different')."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        hidden=8,
        layers=1,
        heads=2,
        ff=8,
        dropout=0.5,
        lstm_hidden=4,
        head_hidden=4,
        local_window=1,
        global_window=3,
        use_local_branch=False,
    )
    model = DSAML(cfg, global_dim=G).double().train()
    same = batch(1, 1)
    params, buffers = split_state(model)
    from torch.func import vmap

    with tasks_batched(model):
        stacked = tuple(torch.stack([t, t]) for t in same)
        preds = vmap(lambda b: call(model, params, buffers, b[0], b[1]).pred, randomness="different")(stacked)
    assert not torch.allclose(preds[0], preds[1])


def test_decomposed_norms_equal_the_fused_ones():
    from pdmer.models.dsaml import TaskBatchNorm2d, TaskLayerNorm

    torch.manual_seed(0)
    ln = TaskLayerNorm(6, eps=1e-12).double()
    bn = TaskBatchNorm2d(3).double().train()
    with torch.no_grad():
        for m in (ln, bn):
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
    x, y = torch.randn(4, 5, 6, dtype=torch.float64), torch.randn(4, 3, 5, 7, dtype=torch.float64)
    ref_ln, ref_bn = ln(x), bn(y)
    stats = bn.running_mean.clone()
    bn.frozen_stats = True
    torch.testing.assert_close(bn(y), ref_bn)  # fused, batch statistics (first-order batched path)
    ln.decomposed = bn.decomposed = True
    torch.testing.assert_close(ln(x), ref_ln)
    torch.testing.assert_close(bn(y), ref_bn)  # written out (second-order batched path)
    torch.testing.assert_close(bn.running_mean, stats)  # frozen: the batched path leaves them alone


@pytest.mark.slow
def test_training_with_batched_tasks_and_bf16_runs_end_to_end(session_tmp):
    """meta.batch_tasks (in chunks) and train.precision=bf16 train, validate and score a tiny run."""
    from conftest import tiny_overrides

    from pdmer.config import config_hash, load_config
    from pdmer.training import train

    base = tiny_overrides(session_tmp, "batched")
    cfg = load_config(
        "pdmer.synthetic.dsaml", base + ["meta.batch_tasks=true", "meta.task_chunk=1", "train.precision=bf16"]
    )
    assert config_hash(cfg) != config_hash(load_config("pdmer.synthetic.dsaml", base))
    run = train(cfg)
    res = json.loads((run / "results.json").read_text())
    assert math.isfinite(res["test"]["personalized"]["ccc_mean"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("first_order", [True, False])
def test_batched_equals_sequential_on_gpu(first_order):
    """On the GPU (cuDNN for convolutions, the unrolled LSTM where vmap or double backward need it)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = tiny_model().float().cuda().train()
    ts = [tuple(tuple(t.float().cuda() for t in b) for b in task) for task in tasks()]
    from pdmer.meta.maml import unrolled_lstm

    model.zero_grad()
    with unrolled_lstm(model):  # cuDNN's LSTM has no double backward
        meta_step(model, ts, loss_fn, 2, 0.1, first_order)
    seq = torch.cat([p.grad.flatten() for p in model.parameters()])
    bat, _ = meta_grads(model, meta_step_batched, ts, 2, 0.1, first_order)
    assert rel_err(bat, seq) < 1e-4


def test_bf16_meta_gradient_stays_close_to_fp32():
    """train.precision=bf16: the meta-gradient within a few percent of fp32's, batched or not."""
    from pdmer.config import load_config
    from pdmer.training.context import make_loss_fn

    model = tiny_model().float().train()
    ts = [tuple(tuple(t.float() for t in b) for b in task) for task in tasks()]
    fp32, bf16 = (
        make_loss_fn(load_config("pdmer.synthetic.dsaml")),
        make_loss_fn(load_config("pdmer.synthetic.dsaml", ["train.precision=bf16"])),
    )
    grads = {}
    for name, fn, lf in (("ref", meta_step, fp32), ("seq", meta_step, bf16), ("bat", meta_step_batched, bf16)):
        model.zero_grad()
        fn(model, ts, lf, 2, 0.1, True)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel_err(grads["seq"], grads["ref"]) < 0.1
    assert rel_err(grads["bat"], grads["ref"]) < 0.1
    assert rel_err(grads["seq"], grads["ref"]) > 0  # bf16 did run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adapt_in_eval_mode_on_gpu_matches_cpu():
    """Test-time adaptation backpropagates through the LSTM in eval mode (cuDNN cannot)."""
    from pdmer.meta.maml import adapt

    model = tiny_model().float().eval()
    support = tuple(t.float() for t in batch(3, 1))
    ref, _ = adapt(model, support, loss_fn, 3, 0.1)
    out, _ = adapt(model.cuda(), tuple(t.cuda() for t in support), loss_fn, 3, 0.1)
    for k in ref:
        torch.testing.assert_close(out[k].cpu(), ref[k], rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("extra", [[], ["meta.batch_tasks=true", "train.precision=bf16"]])
def test_tiny_training_and_evaluation_on_gpu(session_tmp, extra):
    """The whole path on the GPU: meta-training (one by one; batched in bf16), validation, the safe rule, test."""
    from conftest import tiny_overrides

    from pdmer.config import load_config
    from pdmer.training import train

    tag = "gpu-" + ("-".join(e.split("=")[0].split(".")[-1] for e in extra) or "plain")
    run = train(
        load_config("pdmer.synthetic.dsaml", tiny_overrides(session_tmp, tag) + ["runtime.device=cuda", *extra])
    )
    res = json.loads((run / "results.json").read_text())
    assert json.loads((run / "run.json").read_text())["device"].startswith("cuda")
    for cond in ("generic", "personalized", "maml"):
        assert math.isfinite(res["test"][cond]["ccc_mean"]), cond
