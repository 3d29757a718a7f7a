"""The training loop: plain DMER or MAML meta-training for PDMER, model selection, then the test.

Model selection uses validation listeners (or, with ``data.split.kind=song``, validation
songs) only; the test split is scored once, at the end, with the selected checkpoint
(:func:`pdmer.evaluation.split.evaluate_and_report`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pdmer import distributed
from pdmer.checkpoint import atomic_write_text, load_weights, save_weights
from pdmer.config import ExperimentConfig, config_hash
from pdmer.evaluation.split import evaluate_and_report, evaluate_split
from pdmer.meta.maml import meta_step, meta_step_batched, split_state, unrolled_lstm
from pdmer.meta.tasks import TaskSampler
from pdmer.models.dsaml import DSAML, count_parameters
from pdmer.runs import RunBusyError, add_file_log, check_restart, lock_run, prepare_run_dir, resolve_device, run_dir_for
from pdmer.training.context import (
    VAL_METRICS,
    Context,
    build_context,
    build_model,
    make_loss_fn,
    seed_everything,
    selection_metric,
)
from pdmer.training.state import STATE_FILE, load_training_state, save_training_state

log = logging.getLogger(__name__)


def meta_batch(
    model: nn.Module, tasks: list, loss_fn, cfg: ExperimentConfig, sampler: TaskSampler | None = None
) -> dict:
    """One meta-batch's gradient into ``model``: tasks together (``meta.batch_tasks``) or one by one.

    With ``train.target=consensus`` the generic term (``meta.generic_loss_weight``) is not each
    task's un-adapted query loss but the DMER loss of one consensus batch of ``train.batch_songs``
    crops from ``sampler``: the meta-learned start is trained as a listener-blind model on the
    listener-blind target.
    """
    if cfg.train.target == "consensus" and cfg.meta.generic_loss_weight > 0:
        plain = dataclasses.replace(cfg, meta=dataclasses.replace(cfg.meta, generic_loss_weight=0.0))
        stats = meta_batch(model, tasks, loss_fn, plain)
        batch = sampler.dmer_batch(cfg.train.batch_songs, consensus=True)
        generic = loss_fn(model, *split_state(model), batch)
        (cfg.meta.generic_loss_weight * generic).backward()
        return {**stats, "generic_loss": generic.detach()}
    m = cfg.meta
    if m.batch_tasks:
        return meta_step_batched(
            model, tasks, loss_fn, m.inner_steps, m.inner_lr, m.first_order, m.task_chunk, m.generic_loss_weight
        )
    if not m.first_order and next(model.parameters()).is_cuda:
        with unrolled_lstm(model):  # cuDNN's LSTM has no double backward: only the LSTM leaves it
            return meta_step(model, tasks, loss_fn, m.inner_steps, m.inner_lr, m.first_order, m.generic_loss_weight)
    return meta_step(model, tasks, loss_fn, m.inner_steps, m.inner_lr, m.first_order, m.generic_loss_weight)


def outer_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: TaskSampler,
    loss_fn,
    cfg: ExperimentConfig,
    iteration: int,
) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One outer step: zero the gradients, one meta-batch (PDMER) or batch (DMER), clip, step.

    PDMER's first ``train.warmup`` steps are DMER steps: the same batch and loss as a DMER run's
    step of the same seed (pre-training, then meta-training).

    Under torchrun (:mod:`pdmer.distributed`) every rank draws the whole meta-batch, so the
    sampler stays in step with a one-process run's, computes the meta-gradient of its share of
    the tasks, and the gradients are averaged over all tasks before the step: each rank takes the
    one-process step (up to floating-point order). DMER: every rank computes the same batch.

    Returns:
        (loss, stats of :func:`meta_batch` or {}, gradient norm before clipping)
    """
    model.zero_grad(set_to_none=True)  # a frozen skip path (train.skip_lr_scale=0) is not in the optimiser
    distributed.seed_step(cfg.train.seed, iteration)
    stats: dict = {}
    if cfg.problem == "pdmer" and iteration > cfg.train.warmup:
        tasks = [
            sampler.task(cfg.meta.query_songs, cfg.meta.task_sampling == "listener")
            for _ in range(cfg.meta.tasks_per_batch)
        ]
        mine = distributed.shard(tasks)
        before = distributed.running_stats(model)  # BatchNorm's, merged over the ranks after the meta-batch
        stats = meta_batch(model, mine, loss_fn, cfg, sampler)
        distributed.merge_running_stats(model, before, tasks if cfg.meta.batch_tasks else None)
        stats = distributed.average_task_gradients(model, stats, len(mine), len(tasks))
        loss = stats["query_loss"]
    else:
        batch = sampler.dmer_batch(cfg.train.batch_songs, cfg.train.target == "consensus")
        loss = loss_fn(model, *split_state(model), batch)
        loss.backward()
        distributed.broadcast_gradients(model)  # and BatchNorm's running statistics
    grad_norm = (
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.train.grad_clip)
        if cfg.train.grad_clip > 0
        else torch.zeros(())
    )
    optimizer.step()
    return loss, stats, grad_norm


def twin_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the songs test protocol: what training depends on is the same (validation
    always uses the songs protocol, and a listener split does not depend on the protocol)."""
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, protocol="songs"))


def training_twin(cfg: ExperimentConfig) -> Path | None:
    """A finished run that trained exactly as ``cfg`` would, differing only in ``eval.protocol``.

    Only for a listener split (a song split's roles depend on the protocol). Its best checkpoint
    is then ``cfg``'s too, so a within-song evaluation of a trained experiment costs no training.
    """
    if cfg.eval.protocol == "songs" or cfg.data.split.kind != "listener":
        return None
    twin = twin_config(cfg)
    for run in sorted(run_dir_for(twin).parent.glob(f"*-{config_hash(twin)}")):
        if (
            (run / "results.json").is_file()
            and (run / "checkpoints" / "best.safetensors").is_file()
            and (run / "checkpoints" / "last.safetensors").is_file()
        ):
            return run
    busy = run_dir_for(twin)
    if busy.is_dir():  # being trained right now: training here too would only repeat it, and differ
        try:
            with lock_run(busy):
                pass
        except RunBusyError:
            raise RunBusyError(
                f"{busy.name}, the songs-protocol run this one would reuse (only eval.protocol differs), "
                "is being trained by another process: wait for it to finish, then run this again"
            ) from None
    return None


def train(
    cfg: ExperimentConfig,
    *,
    on_validate: Callable[[int, dict], None] | None = None,
    hparams: dict | None = None,
    resume: bool = False,
    force: bool = False,
) -> Path:
    """Train, select on validation listeners, evaluate on test listeners; returns the run folder.

    At every validation the full training state (weights, optimiser, iteration, best score, every
    RNG) is written atomically to ``checkpoints/state/latest.safetensors``. ``resume=True``
    continues from it (a fresh start when there is none): a run killed at any moment, resumed,
    ends with the same metrics as an uninterrupted run of the same seed on the same machine.

    ``on_validate(iteration, summary)``, when given, is called after each validation with its
    ``{condition: {metric: value}}`` (a sweep reports and prunes from it). An exception it raises
    (e.g. ``optuna.TrialPruned``) ends training: the run folder gets ``stopped.json`` (iteration,
    reason, validation scores) and the exception propagates. ``hparams`` go to tensorboard's HParams
    view with the selected checkpoint's validation scores (``best_val/<condition>_<metric>``).

    One process at a time trains a run folder (:func:`pdmer.runs.lock_run`): a second one gets
    :class:`pdmer.runs.RunBusyError` before it writes anything. Data that fails its checks is
    refused before the run folder exists. A fresh start (no ``resume``) over an interrupted run
    is refused (:class:`pdmer.runs.RunStartedError`) unless ``force`` (:func:`pdmer.runs.check_restart`).
    """
    seed_everything(cfg.train.seed)
    t0 = time.time()
    if distributed.init(resolve_device(cfg.runtime.device)) and cfg.problem == "pdmer":
        distributed.check_shardable(cfg.meta.tasks_per_batch)
    with distributed.main_first():  # rank 0 writes the data and feature caches, the others read them
        ctx = build_context(cfg)  # checks the data: a refused run creates no folder
    if not distributed.is_main():  # torchrun: rank 0 writes the run folder
        _follow(cfg, ctx)
        return run_dir_for(cfg)
    with lock_run(run_dir_for(cfg)):
        check_restart(run_dir_for(cfg), resume, force)  # never throw an interrupted run's progress away silently
        return _train(cfg, ctx, t0, on_validate=on_validate, hparams=hparams, resume=resume)


def _train(
    cfg: ExperimentConfig,
    ctx: Context,
    t0: float,
    *,
    on_validate: Callable[[int, dict], None] | None,
    hparams: dict | None,
    resume: bool,
) -> Path:
    run = prepare_run_dir(cfg, ctx.device)
    (run / "stopped.json").unlink(missing_ok=True)  # left by an earlier, stopped attempt
    handler = add_file_log(run)
    try:
        return _train_in(run, cfg, ctx, t0, on_validate=on_validate, hparams=hparams, resume=resume)
    finally:  # the run's log file is closed however training ends (error, pruned trial, Ctrl-C)
        logging.getLogger("pdmer").removeHandler(handler)
        handler.close()


def _train_in(
    run: Path,
    cfg: ExperimentConfig,
    ctx: Context,
    t0: float,
    *,
    on_validate: Callable[[int, dict], None] | None,
    hparams: dict | None,
    resume: bool,
) -> Path:
    """:func:`_train` inside its run folder, its log file open."""
    from torch.utils.tensorboard import SummaryWriter

    atomic_write_text(run / "splits.json", json.dumps(ctx.split_record(), indent=2))
    model, sampler, optimizer, loss_fn = training_parts(ctx)
    log.info("run %s: %s model, %d parameters, device %s", run.name, cfg.size, count_parameters(model), ctx.device)
    meta = {"config_hash": config_hash(cfg), "experiment": cfg.name, "global_dim": model.global_dim}
    sel = _Selection(run, ctx, model, optimizer, sampler, meta, on_validate)
    start = _start_from(run, model, optimizer, sampler, meta, sel.best, sel.selected, resume)
    sel.writer = SummaryWriter(str(run / "tb"), purge_step=start + 1 if start else None)  # drop events after the state
    try:
        twin = _reuse_twin(run, cfg, model, meta, sel.best) if start == 0 else None
        if twin is not None:
            start = cfg.train.iterations
        start = distributed.share_state(model, optimizer, sampler, start)  # torchrun: rank 0's state on every rank
        if start == 0 and sel.best["iteration"] < 0 and cfg.train.select_start and cfg.train.iterations:
            sel(0)  # the starting point is a candidate of the selection (not again on a resume from it)
        _iterate(sel, loss_fn, start)
        if sel.best["iteration"] < 0:  # iterations == 0: evaluate the initial model
            sel(0)
        if twin is None:
            save_weights(run / "checkpoints" / "last.safetensors", model, {**meta, "iteration": cfg.train.iterations})
        else:
            shutil.copyfile(twin / "checkpoints" / "last.safetensors", run / "checkpoints" / "last.safetensors")
        load_weights(run / "checkpoints" / "best.safetensors", model, {"config_hash": meta["config_hash"]})
        evaluate_and_report(model, ctx, run, sel.writer, train_seconds=time.time() - t0, best=sel.best)
        if hparams:
            scores = {f"best_val/{c}_{k}": float(m[k]) for c, m in sel.selected.items() for k in VAL_METRICS}
            sel.writer.add_hparams(hparams, scores, run_name=".")  # "." = this run's own tb/ folder
    finally:
        sel.writer.close()
    return run


@dataclasses.dataclass
class _Selection:
    """The checkpoint selection: validate, keep the best checkpoint, save the state a resume starts from."""

    run: Path
    ctx: Context
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: TaskSampler
    meta: dict
    on_validate: Callable[[int, dict], None] | None
    writer: object = None  # the run's SummaryWriter
    best: dict = dataclasses.field(default_factory=lambda: {"iteration": -1, "value": -float("inf")})
    selected: dict = dataclasses.field(default_factory=dict)  # validation summary of the best checkpoint

    def __call__(self, it: int) -> None:
        cfg = self.ctx.cfg
        cond, metric = selection_metric(cfg)
        summary, _ = evaluate_split(self.model, self.ctx, "val", cfg.train.val_listeners_max)
        for c, m in summary.items():
            for k in VAL_METRICS:
                self.writer.add_scalar(f"val/{c}_{k}", m[k], it)
        value, best = summary[cond][metric], self.best
        if value > best["value"]:
            best.update(iteration=it, value=value)
            self.selected.update(summary)
            save_weights(
                self.run / "checkpoints" / "best.safetensors",
                self.model,
                {**self.meta, "iteration": it, f"val_{cond}_{metric}": value},
            )
        log.info(
            "iteration %d: val %s %s = %.4f (best %.4f at %d)",
            it,
            cond,
            metric,
            value,
            best["value"],
            best["iteration"],
        )
        self.model.train()
        save_training_state(
            self.run / STATE_FILE,
            self.model,
            self.optimizer,
            self.sampler,
            {**self.meta, "iteration": it, "best": best, "selected": self.selected},
        )
        if self.on_validate is not None:
            try:
                self.on_validate(it, summary)
            except BaseException as e:  # e.g. a pruned sweep trial: leave the run folder in a clear state
                stopped = {"iteration": it, "reason": type(e).__name__, "message": str(e), "val": summary}
                atomic_write_text(self.run / "stopped.json", json.dumps(stopped, indent=2, default=float))
                raise


def _iterate(sel: _Selection, loss_fn, start: int) -> None:
    """The outer steps after ``start``, logged to tensorboard, validated every ``train.eval_every``."""
    from tqdm.auto import tqdm

    cfg, model, writer = sel.ctx.cfg, sel.model, sel.writer
    bar = tqdm(
        range(start + 1, cfg.train.iterations + 1),
        desc=f"{cfg.problem} {cfg.name}",
        initial=start,
        total=cfg.train.iterations,
        disable=not cfg.runtime.progress or None,
        dynamic_ncols=True,
    )
    model.train()
    for it in bar:
        loss, stats, grad_norm = outer_step(model, sel.optimizer, sel.sampler, loss_fn, cfg, it)
        if "inner_losses" in stats:  # a meta-step (not a DMER step, nor a warm-up step)
            inner = stats["inner_losses"].cpu()  # one host sync per meta-batch
            writer.add_scalar("train/inner_loss_first", inner[0].item(), it)
            writer.add_scalar("train/inner_loss_last", inner[-1].item(), it)
        loss_value = float(loss.detach())
        writer.add_scalar("train/loss", loss_value, it)
        writer.add_scalar("train/grad_norm", float(grad_norm), it)
        bar.set_postfix(loss=f"{loss_value:.3f}", best=f"{sel.best['value']:.3f}")
        if not np.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss became {loss_value} at iteration {it}; lower train.outer_lr or meta.inner_lr"
            )
        if it % cfg.train.eval_every == 0 or it == cfg.train.iterations:
            sel(it)


def _start_from(
    run: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: TaskSampler,
    meta: dict,
    best: dict,
    selected: dict,
    resume: bool,
) -> int:
    """The iteration training starts from: the saved state's with ``resume`` (``best`` and ``selected`` restored
    in place), else 0 (an earlier attempt's state is removed, so that it is never resumed into this one)."""
    state_path = run / STATE_FILE
    if resume and state_path.exists():
        saved = load_training_state(state_path, model, optimizer, sampler, {"config_hash": meta["config_hash"]})
        best.update(saved["best"])
        selected.update(saved["selected"])
        log.info(
            "resumed %s from iteration %d (best %.4f at %d)",
            run.name,
            saved["iteration"],
            best["value"],
            best["iteration"],
        )
        return saved["iteration"]
    if resume:
        log.info("no training state in %s: starting from iteration 0", run.name)
    else:
        state_path.unlink(missing_ok=True)
    return 0


def _reuse_twin(run: Path, cfg: ExperimentConfig, model: nn.Module, meta: dict, best: dict) -> Path | None:
    """The finished run that trained exactly as this one (:func:`training_twin`): its weights become this
    run's best checkpoint (``best`` updated in place) and training is skipped. None: train."""
    twin = training_twin(cfg)
    if twin is None:
        return None
    load_weights(twin / "checkpoints" / "best.safetensors", model, {"config_hash": config_hash(twin_config(cfg))})
    twin_best = json.loads((twin / "results.json").read_text()).get("best") or {}
    best.update(
        iteration=int(twin_best.get("iteration", cfg.train.iterations)), value=float(twin_best.get("value", 0.0))
    )
    save_weights(
        run / "checkpoints" / "best.safetensors", model, {**meta, "iteration": best["iteration"], "twin": str(twin)}
    )
    log.info(
        "%s trains exactly as the finished run %s (only eval.protocol differs): its weights are reused, "
        "training is skipped",
        run.name,
        twin.name,
    )
    return twin


def param_groups(model: DSAML, cfg: ExperimentConfig) -> list[dict]:
    """The outer optimiser's parameter groups: the skip path (``model.linear_skip``) at
    ``train.skip_lr_scale`` times ``train.outer_lr`` (left out when 0: it stays at its fitted start),
    the rest at ``train.outer_lr``."""
    skip = list(model.skip.parameters()) if cfg.model.linear_skip else []
    if not skip or cfg.train.skip_lr_scale == 1.0:
        return [{"params": list(model.parameters())}]
    ids = {id(p) for p in skip}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
    if cfg.train.skip_lr_scale > 0:
        groups.append({"params": skip, "lr": cfg.train.outer_lr * cfg.train.skip_lr_scale})
    return groups


def training_parts(ctx: Context) -> tuple[DSAML, TaskSampler, torch.optim.Optimizer, Callable]:
    """A fresh run's model, task sampler, optimiser and loss (the same on every rank of a torchrun launch)."""
    cfg = ctx.cfg
    model = build_model(ctx)
    sampler = TaskSampler(
        ctx.train_curves(), ctx.features, cfg.train.seq_len, np.random.default_rng(cfg.train.seed), ctx.device
    )
    optimizer = torch.optim.Adam(param_groups(model, cfg), lr=cfg.train.outer_lr)
    return model, sampler, optimizer, make_loss_fn(cfg)


def _follow(cfg: ExperimentConfig, ctx: Context) -> None:
    """A rank other than 0 of a torchrun launch: rank 0's outer steps on its share of each meta-batch.

    It writes nothing and neither validates nor tests; it waits in the next all-reduce while
    rank 0 does, and leaves after the last step.
    """
    model, sampler, optimizer, loss_fn = training_parts(ctx)
    start = distributed.share_state(model, optimizer, sampler, 0)  # rank 0's weights, moments, RNG and iteration
    model.train()
    for it in range(start + 1, cfg.train.iterations + 1):
        loss, _, _ = outer_step(model, optimizer, sampler, loss_fn, cfg, it)
        if not np.isfinite(float(loss.detach())):  # the averaged loss: rank 0 stops at the same step
            raise FloatingPointError(
                f"training loss became {float(loss)} at iteration {it} (rank {distributed.rank()})"
            )
