"""Training (plain DMER or MAML meta-training for PDMER), model selection and evaluation.

Model selection uses validation listeners (or, with ``data.split.kind=song``, validation
songs) only; the test split is scored once, at the end, with the selected checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from pdmer import distributed
from pdmer.checkpoint import CheckpointError, atomic_write_text, load_tensors, load_weights, save_tensors, save_weights
from pdmer.config import ExperimentConfig, config_hash
from pdmer.data.loading import MIN_QUERY_STEPS, load_dataset, make_splits, role_curves
from pdmer.data.types import Curve, DataError, Dataset
from pdmer.evaluate import (Adaptation, ListenerResult, apply_weights, evaluate_listener, evaluate_within_song, format_table,
                            paired_gains, plot_listener, summarize)
from pdmer.personalize import COMPONENTS, RULE_DRAWS, Parts, Weights, choose_weights
from pdmer.references import References
from pdmer.meta.maml import attach_inner_lrs, call, meta_step, meta_step_batched, split_state, unrolled_lstm
from pdmer.data.check import fit_to_audio
from pdmer.meta.tasks import TaskSampler
from pdmer.metrics import attention_loss, emotion_loss
from pdmer.models.dsaml import DSAML, count_parameters
from pdmer.runs import STATE_PATH, REPO, add_file_log, check_restart, lock_run, prepare_run_dir, RunBusyError, git_info, resolve_device, run_dir_for

log = logging.getLogger(__name__)


@dataclass
class Context:
    """Everything a run needs besides the model weights."""

    cfg: ExperimentConfig
    device: torch.device
    dataset: Dataset
    splits: dict[str, list[str]]  # listeners: "train", "val", "test", "excluded"
    features: dict
    songs: dict[str, list[str]] | None = None  # song-disjoint split: "train", "val", "test" song ids
    refs: References | None = None  # built on first use (train.references)

    def split_record(self) -> dict:
        """What ``splits.json`` holds: kind, seed, protocol, the listener lists (and song lists)."""
        kind = "song-disjoint" if self.songs is not None else "listener-disjoint"
        out = {"kind": kind, "seed": self.cfg.data.split.seed, "protocol": self.cfg.eval.protocol, **self.splits}
        if self.songs is not None:
            out["songs"] = self.songs
        return out

    def train_curves(self) -> dict[str, list[Curve]]:
        """Training listeners' curves the model may learn from (train songs only in a song split)."""
        return {a: pool for a, (pool, _) in role_curves(self.dataset, self.splits["train"], self.songs, "train").items()}


def make_loss_fn(cfg: ExperimentConfig):
    """The DSAML loss as a MAML task loss ``(model, params, buffers, batch) -> scalar``."""
    use_attn, w = cfg.train.attention_loss, cfg.train.attention_loss_weight
    flat_std, terms = cfg.train.flat_std, tuple(cfg.train.loss_weights)

    bf16 = cfg.train.precision == "bf16"

    def loss_fn(model, params, buffers, batch):
        local, glob, target = batch
        if bf16:  # the forward in bf16 where autocast allows; the loss in fp32
            with torch.autocast(local.device.type, dtype=torch.bfloat16):
                out = call(model, params, buffers, local, glob)
            out = type(out)(*(None if t is None else t.float() for t in (out.pred, out.attn_local, out.attn_global)))
        else:
            out = call(model, params, buffers, local, glob)
        loss = emotion_loss(out.pred, target, flat_std, terms)
        if use_attn:
            loss = loss + w * attention_loss(out.attn_local, out.attn_global)
        return loss

    return loss_fn


def meta_batch(model: nn.Module, tasks: list, loss_fn, cfg: ExperimentConfig, sampler: TaskSampler | None = None) -> dict:
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
        return meta_step_batched(model, tasks, loss_fn, m.inner_steps, m.inner_lr, m.first_order, m.task_chunk,
                                 m.generic_loss_weight)
    if not m.first_order and next(model.parameters()).is_cuda:
        with unrolled_lstm(model):  # cuDNN's LSTM has no double backward: only the LSTM leaves it
            return meta_step(model, tasks, loss_fn, m.inner_steps, m.inner_lr, m.first_order, m.generic_loss_weight)
    return meta_step(model, tasks, loss_fn, m.inner_steps, m.inner_lr, m.first_order, m.generic_loss_weight)


def outer_step(model: nn.Module, optimizer: torch.optim.Optimizer, sampler: TaskSampler, loss_fn, cfg: ExperimentConfig,
               iteration: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """One outer step: zero the gradients, one meta-batch (PDMER) or batch (DMER), clip, step.

    Under torchrun (:mod:`pdmer.distributed`) every rank draws the whole meta-batch, so the
    sampler stays in step with a one-process run's, computes the meta-gradient of its share of
    the tasks, and the gradients are averaged over all tasks before the step: each rank takes the
    one-process step (up to floating-point order). DMER: every rank computes the same batch.

    Returns:
        (loss, stats of :func:`meta_batch` or {}, gradient norm before clipping)
    """
    optimizer.zero_grad(set_to_none=True)
    distributed.seed_step(cfg.train.seed, iteration)
    stats: dict = {}
    if cfg.problem == "pdmer":
        tasks = [sampler.task(cfg.meta.query_songs, cfg.meta.task_sampling == "listener") for _ in range(cfg.meta.tasks_per_batch)]
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
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip) if cfg.train.grad_clip > 0 else torch.zeros(())
    optimizer.step()
    return loss, stats, grad_norm


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def load_features(cfg: ExperimentConfig, dataset: Dataset, progress: bool = True, problems: list[str] | None = None) -> dict:
    """Features of every song (cached).

    Every bad audio file (missing, corrupt, undecodable, silent) is listed, naming the file: in
    ``problems`` when given (the bad songs are left out), else in one DataError.
    """
    from tqdm.auto import tqdm

    from pdmer.features import FeatureExtractor

    cache = Path(cfg.features.cache_dir) if cfg.features.cache_dir else REPO / "cache" / "features"
    fx = FeatureExtractor(cfg.features, cache)
    out, found = {}, []
    for song in tqdm(list(dataset.songs.values()), desc="features", unit="song", disable=not progress or None):
        try:
            out[song.song_id] = fx(song)
        except DataError as e:
            found.append(str(e))
    if problems is not None:
        problems.extend(found)
    elif found:
        raise DataError(f"{len(found)} audio file(s) cannot be used:\n  " + "\n  ".join(found))
    return out


def build_context(cfg: ExperimentConfig) -> Context:
    """Load and check the labels, split them, featurise the audio and fit the curves to it.

    Bad data stops here, before any training, with the messages of ``python run.py data check``
    (labels: every problem with its file and line; audio: every missing, undecodable, silent or
    too short file, by name). A curve whose last step the audio covers only in part loses that
    step, logged and counted in results.json (``pdmer.data.check.fit_to_audio``).
    """
    device = resolve_device(cfg.runtime.device)
    if cfg.runtime.threads > 0:
        torch.set_num_threads(cfg.runtime.threads)
    dataset = load_dataset(cfg.data)
    split_args = (cfg.data, cfg.eval.support_songs, cfg.eval.protocol, cfg.train.seq_len)
    splits, songs = make_splits(dataset, *split_args)  # fails fast, before the audio work
    problems: list[str] = []
    features = load_features(cfg, dataset, cfg.runtime.progress, problems)
    decoded = [c for c in dataset.curves if c.song_id in features]
    fitted, trimmed, found = fit_to_audio(decoded, {s: f.n_steps for s, f in features.items()}, dataset.songs)
    problems += found
    if problems:
        raise DataError(f"{len(problems)} problem(s) with the audio of {dataset.name}:\n  " + "\n  ".join(problems))
    if trimmed:  # the audio ends inside a curve's last step: that step is cut, and said so
        dataset.curves = [c for c in fitted if c.n_steps > 0]
        dataset.info.setdefault("dropped", []).extend(trimmed)
        log.warning("%d curve(s) end in a 0.5 s step that their audio does not cover whole; that last step is cut "
                    "(e.g. song %s, %s)", len(trimmed), trimmed[0]["song_id"], trimmed[0]["reason"])
        splits, songs = make_splits(dataset, *split_args)  # curve lengths changed
    dataset.info["fitted_to_audio"] = len(trimmed)
    return Context(cfg, device, dataset, splits, features, songs)


def build_model(ctx: Context) -> DSAML:
    g_dim = next(iter(ctx.features.values())).global_.shape[1]
    model = DSAML(ctx.cfg.model, g_dim)
    train_songs = sorted({c.song_id for cs in ctx.train_curves().values() for c in cs})
    local = torch.cat([ctx.features[s].local[::7] for s in train_songs])  # subsample steps: the statistics only
    glob = torch.cat([ctx.features[s].global_ for s in train_songs])
    model.fit_input_stats(local, glob)
    if ctx.cfg.model.linear_skip:
        probe = references(ctx).ridge
        if probe is None:
            raise DataError("model.linear_skip needs training curves to fit its ridge probe")
        f64 = torch.float64
        model.init_linear_skip(torch.tensor(probe.coef, dtype=f64).float(), torch.tensor(probe.bias, dtype=f64).float(),
                               torch.tensor(probe.mean, dtype=f64).float(), torch.tensor(probe.std, dtype=f64).float())
    if ctx.cfg.problem == "pdmer" and ctx.cfg.meta.learn_inner_lr:
        attach_inner_lrs(model, ctx.cfg.meta.inner_lr)
    return model.to(ctx.device)


def references(ctx: Context) -> References:
    """The listener-blind references of ``ctx`` (built once: the others' averages, the ridge probe)."""
    if ctx.refs is None:
        train = [c for cs in ctx.train_curves().values() for c in cs]
        ctx.refs = References(ctx.dataset.curves, train, ctx.features, ctx.cfg.train.seed)
    return ctx.refs


def evaluate_split(model: nn.Module, ctx: Context, split: str, limit: int | None = None, keep_curves: bool = False,
                   weights: Weights | None = None, protocol: str | None = None, draw: int = 0
                   ) -> tuple[dict, list[ListenerResult]]:
    """Score every listener of ``split`` (at most ``limit``); see :mod:`pdmer.evaluate`.

    Listener split: each listener's support song(s) and queries are among all their songs.
    Song split: support from their train songs, queries on the split's songs only.
    ``protocol`` (default: ``eval.protocol`` for test, ``songs`` otherwise) ``within_song``: support =
    the first ``train.seq_len`` steps of each query song, query = the rest of it.

    ``weights``: the safe rule's population weights for the ``personalized`` condition; None
    chooses them on these same listeners (:func:`pdmer.personalize.choose_weights`; in-sample, for
    the checkpoint selection during training).

    ``draw`` (songs protocol): which support draw of each listener (:func:`pdmer.evaluate.choose_support`;
    0 = the protocol's); listeners who rated too few songs for it are left out.
    """
    cfg = ctx.cfg
    protocol = protocol or (cfg.eval.protocol if split == "test" else "songs")
    listeners = ctx.splits[split][:limit] if limit else ctx.splits[split]
    pools = role_curves(ctx.dataset, listeners, ctx.songs, split)
    how = Adaptation(make_loss_fn(cfg), cfg.meta.inner_steps, cfg.meta.inner_lr, cfg.train.seq_len, cfg.eval.hop,
                     cfg.eval.support_songs, cfg.train.seed, MIN_QUERY_STEPS, cfg.eval.safe_check, draw)
    refs = references(ctx)
    k, results = cfg.eval.support_songs, []
    for a in listeners:
        pool, queries = pools[a]
        if protocol == "within_song":
            r = evaluate_within_song(model, ctx.dataset, ctx.features, a, pool if queries is None else queries, how,
                                     keep_curves, refs)
            if r is not None:
                results.append(r)
        elif (len(pool) > k and len(pool) >= k * (draw + 1)) if queries is None else (len(pool) >= k * (draw + 1) and queries):
            results.append(evaluate_listener(model, ctx.dataset, ctx.features, a, pool, how, keep_curves, queries, refs))
    if not results:
        raise DataError(f"no {split} listener can be scored (split {ctx.split_record()['kind']}, protocol {protocol})")
    if weights is None:
        weights, _ = choose_weights([p for r in results for p in r.parts], f"{split} listeners (in-sample)",
                                    use_gate=cfg.eval.safe_check)
    apply_weights(results, weights, keep_curves)
    return summarize(results), results


def rule_parts(model: nn.Module, ctx: Context) -> tuple[list[Parts], str]:
    """What the safe rule is chosen on: every validation listener under the test protocol.

    Songs protocol: each listener is scored with up to ``RULE_DRAWS`` different support songs in
    turn (the protocol's draw first), so that their vote does not hang on one song's luck; the
    choice averages a listener's draws (:func:`pdmer.personalize.by_listener`).

    Returns:
        (parts, what they are, for the report).
    """
    protocol = ctx.cfg.eval.protocol
    try:
        _, results = evaluate_split(model, ctx, "val", weights=Weights(), protocol=protocol)
    except DataError as e:  # e.g. DEAM's validation clips are no longer than one support sequence
        if protocol == "songs":
            raise
        log.warning("safe personalization: %s; the weights are chosen under the songs protocol instead", e)
        protocol = f"songs (no validation listener can be scored {protocol})"
        _, results = evaluate_split(model, ctx, "val", weights=Weights(), protocol="songs")
    listeners = len(results)
    parts = [p for r in results for p in r.parts]
    draws = 1
    if protocol == "songs":
        for draw in range(1, RULE_DRAWS):
            try:
                _, more = evaluate_split(model, ctx, "val", weights=Weights(), protocol="songs", draw=draw)
            except DataError:  # no validation listener rated enough songs for another draw
                break
            parts += [p for r in more for p in r.parts]
            draws += 1
    what = f"{listeners} validation listeners, protocol {protocol}"
    return parts, what + (f", up to {draws} support draws each ({len(parts)} in all)" if draws > 1 else "")


def choose_rule(model: nn.Module, ctx: Context) -> tuple[Weights, dict]:
    """The safe rule's population weights, chosen on every validation listener under the test protocol."""
    parts, what = rule_parts(model, ctx)
    weights, report = choose_weights(parts, what, use_gate=ctx.cfg.eval.safe_check)
    log.info("safe personalization: weights %s (%s)", {k: getattr(weights, k) for k in COMPONENTS}, weights.chosen_on)
    return weights, report


STATE_FILE = STATE_PATH  # full training state, relative to the run folder (pdmer.runs)
RULE_FILE = "personalization.json"  # the safe rule's weights chosen on validation listeners (calibrate uses them)


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: TaskSampler, meta: dict) -> None:
    """Everything needed to continue training exactly: weights, optimiser moments, every RNG.

    One safetensors file (tensors only, never pickle) written atomically: a kill at any moment
    leaves the previous state or the new one. ``meta`` (JSON) carries the iteration, the best
    validation score so far and the RNG states that are not tensors.
    """
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, st in optimizer.state_dict()["state"].items():
        for name, v in st.items():
            tensors[f"optim.{i}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = st
    np_state = np.random.get_state()
    rng = {
        "sampler": sampler.rng.bit_generator.state,
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    save_tensors(path, tensors, {**meta, "rng": rng})


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: TaskSampler,
                        expect: dict) -> dict:
    """Restore what :func:`save_training_state` wrote (in place); returns its JSON header."""
    tensors, meta = load_tensors(path)
    for k, v in expect.items():
        if meta.get(k) != v:
            raise CheckpointError(f"{path}: {k} is {meta.get(k)!r}, expected {v!r}")
    device = next(model.parameters()).device
    model_state = {k[len("model."):]: v.to(device) for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(model_state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not fit the model: {e}") from None
    opt = optimizer.state_dict()  # param_groups come from the config, as when the state was saved
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v if name == "step" else v.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    rng = meta["rng"]
    sampler.rng.bit_generator.state = rng["sampler"]
    n = rng["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    return meta


VAL_METRICS = ("ccc_mean", "ccc_arousal", "ccc_valence", "rmse_arousal", "rmse_valence")  # logged as val/<condition>_<metric>


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
        if (run / "results.json").is_file() and (run / "checkpoints" / "best.safetensors").is_file() \
                and (run / "checkpoints" / "last.safetensors").is_file():
            return run
    busy = run_dir_for(twin)
    if busy.is_dir():  # being trained right now: training here too would only repeat it, and differ
        try:
            with lock_run(busy):
                pass
        except RunBusyError:
            raise RunBusyError(f"{busy.name}, the songs-protocol run this one would reuse (only eval.protocol differs), "
                               "is being trained by another process: wait for it to finish, then run this again") from None
    return None


def selection_metric(cfg: ExperimentConfig) -> tuple[str, str]:
    return ("personalized" if cfg.problem == "pdmer" else "generic"), "ccc_mean"


def train(cfg: ExperimentConfig, *, on_validate: Callable[[int, dict], None] | None = None,
          hparams: dict | None = None, resume: bool = False, force: bool = False) -> Path:
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


def _train(cfg: ExperimentConfig, ctx: Context, t0: float, *, on_validate: Callable[[int, dict], None] | None,
           hparams: dict | None, resume: bool) -> Path:
    run = prepare_run_dir(cfg, ctx.device)
    (run / "stopped.json").unlink(missing_ok=True)  # left by an earlier, stopped attempt
    handler = add_file_log(run)
    try:
        return _train_in(run, cfg, ctx, t0, on_validate=on_validate, hparams=hparams, resume=resume)
    finally:  # the run's log file is closed however training ends (error, pruned trial, Ctrl-C)
        logging.getLogger("pdmer").removeHandler(handler)
        handler.close()


def _train_in(run: Path, cfg: ExperimentConfig, ctx: Context, t0: float, *,
              on_validate: Callable[[int, dict], None] | None, hparams: dict | None, resume: bool) -> Path:
    """:func:`_train` inside its run folder, its log file open."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.auto import tqdm

    atomic_write_text(run / "splits.json", json.dumps(ctx.split_record(), indent=2))
    model, sampler, optimizer, loss_fn = training_parts(ctx)
    log.info("run %s: %s model, %d parameters, device %s", run.name, cfg.size, count_parameters(model), ctx.device)
    cond, metric = selection_metric(cfg)
    best = {"iteration": -1, "value": -float("inf")}
    selected: dict = {}  # validation summary of the best (selected) checkpoint
    meta = {"config_hash": config_hash(cfg), "experiment": cfg.name, "global_dim": model.global_dim}
    start = 0
    state_path = run / STATE_FILE
    if resume and state_path.exists():
        saved = load_training_state(state_path, model, optimizer, sampler, {"config_hash": meta["config_hash"]})
        start = saved["iteration"]
        best.update(saved["best"])
        selected.update(saved["selected"])
        log.info("resumed %s from iteration %d (best %.4f at %d)", run.name, start, best["value"], best["iteration"])
    elif resume:
        log.info("no training state in %s: starting from iteration 0", run.name)
    else:
        state_path.unlink(missing_ok=True)  # an earlier attempt's state must not be resumed into this one
    writer = SummaryWriter(str(run / "tb"), purge_step=start + 1 if start else None)  # drop events logged after the state

    def validate(it: int) -> None:
        summary, _ = evaluate_split(model, ctx, "val", cfg.train.val_listeners_max)
        for c, m in summary.items():
            for k in VAL_METRICS:
                writer.add_scalar(f"val/{c}_{k}", m[k], it)
        value = summary[cond][metric]
        if value > best["value"]:
            best.update(iteration=it, value=value)
            selected.update(summary)
            save_weights(run / "checkpoints" / "best.safetensors", model, {**meta, "iteration": it, f"val_{cond}_{metric}": value})
        log.info("iteration %d: val %s %s = %.4f (best %.4f at %d)", it, cond, metric, value, best["value"], best["iteration"])
        model.train()
        save_training_state(state_path, model, optimizer, sampler,
                            {**meta, "iteration": it, "best": best, "selected": selected})
        if on_validate is not None:
            try:
                on_validate(it, summary)
            except BaseException as e:  # e.g. a pruned sweep trial: leave the run folder in a clear state
                atomic_write_text(run / "stopped.json", json.dumps(
                    {"iteration": it, "reason": type(e).__name__, "message": str(e), "val": summary}, indent=2, default=float))
                writer.close()
                raise

    twin = training_twin(cfg) if start == 0 else None
    if twin is not None:  # the same training, finished already: take its weights instead of training again
        load_weights(twin / "checkpoints" / "best.safetensors", model, {"config_hash": config_hash(twin_config(cfg))})
        twin_best = json.loads((twin / "results.json").read_text()).get("best") or {}
        best.update(iteration=int(twin_best.get("iteration", cfg.train.iterations)), value=float(twin_best.get("value", 0.0)))
        save_weights(run / "checkpoints" / "best.safetensors", model, {**meta, "iteration": best["iteration"], "twin": str(twin)})
        log.info("%s trains exactly as the finished run %s (only eval.protocol differs): its weights are reused, "
                 "training is skipped", run.name, twin.name)
        start = cfg.train.iterations
    start = distributed.share_state(model, optimizer, sampler, start)  # torchrun: rank 0's state on every rank
    bar = tqdm(range(start + 1, cfg.train.iterations + 1), desc=f"{cfg.problem} {cfg.name}", initial=start,
               total=cfg.train.iterations, disable=not cfg.runtime.progress or None, dynamic_ncols=True)
    model.train()
    for it in bar:
        loss, stats, grad_norm = outer_step(model, optimizer, sampler, loss_fn, cfg, it)
        if cfg.problem == "pdmer":
            inner = stats["inner_losses"].cpu()  # one host sync per meta-batch
            writer.add_scalar("train/inner_loss_first", inner[0].item(), it)
            writer.add_scalar("train/inner_loss_last", inner[-1].item(), it)
        loss_value = float(loss.detach())
        writer.add_scalar("train/loss", loss_value, it)
        writer.add_scalar("train/grad_norm", float(grad_norm), it)
        bar.set_postfix(loss=f"{loss_value:.3f}", best=f"{best['value']:.3f}")
        if not np.isfinite(loss_value):
            raise FloatingPointError(f"training loss became {loss_value} at iteration {it}; lower train.outer_lr or meta.inner_lr")
        if it % cfg.train.eval_every == 0 or it == cfg.train.iterations:
            validate(it)
    if best["iteration"] < 0:  # iterations == 0: evaluate the initial model
        validate(0)
    if twin is None:
        save_weights(run / "checkpoints" / "last.safetensors", model, {**meta, "iteration": cfg.train.iterations})
    else:
        shutil.copyfile(twin / "checkpoints" / "last.safetensors", run / "checkpoints" / "last.safetensors")
    load_weights(run / "checkpoints" / "best.safetensors", model, {"config_hash": meta["config_hash"]})
    evaluate_and_report(model, ctx, run, writer, train_seconds=time.time() - t0, best=best)
    if hparams:
        scores = {f"best_val/{c}_{k}": float(m[k]) for c, m in selected.items() for k in VAL_METRICS}
        writer.add_hparams(hparams, scores, run_name=".")  # "." = this run's own tb/ folder
    writer.close()
    return run


def training_parts(ctx: Context) -> tuple[DSAML, TaskSampler, torch.optim.Optimizer, Callable]:
    """A fresh run's model, task sampler, optimiser and loss (the same on every rank of a torchrun launch)."""
    cfg = ctx.cfg
    model = build_model(ctx)
    sampler = TaskSampler(ctx.train_curves(), ctx.features, cfg.train.seq_len, np.random.default_rng(cfg.train.seed), ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.outer_lr)
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
            raise FloatingPointError(f"training loss became {float(loss)} at iteration {it} (rank {distributed.rank()})")


def evaluate_and_report(model, ctx: Context, run: Path, writer=None, **extra) -> dict:
    """Score test listeners once, write results.json / results.md / curves.png."""
    cfg = ctx.cfg
    t0 = time.time()
    weights, rule_report = choose_rule(model, ctx)
    atomic_write_text(run / RULE_FILE, json.dumps({"weights": weights.to_json(), "report": rule_report}, indent=2, default=float))
    test, per_listener = evaluate_split(model, ctx, "test", keep_curves=True, weights=weights)
    cond, metric = selection_metric(cfg)
    results = {
        "experiment": cfg.name,
        "config_hash": config_hash(cfg),
        "problem": cfg.problem,
        "data": ctx.dataset.name,
        "label_scale": ctx.dataset.scale,
        "curves_cut_to_audio": ctx.dataset.info.get("fitted_to_audio", 0),
        "selection": {"split": "val", "condition": cond, "metric": metric},
        "listeners": {k: len(v) for k, v in ctx.splits.items()},
        "split": {"kind": ctx.split_record()["kind"], "protocol": cfg.eval.protocol,
                  **({"songs": {k: len(v) for k, v in ctx.songs.items()}} if ctx.songs is not None else {})},
        "support_songs": cfg.eval.support_songs,
        "test": test,
        "gain_ccc_mean": test["personalized"]["ccc_mean"] - test["generic"]["ccc_mean"],
        "gain_per_listener": paired_gains(per_listener)["ccc_mean"],
        "personalization": {"weights": weights.to_json(), "report": rule_report,
                            "listeners_personalized": sum(any(u[d] and any(weights.of(d)) for u in r.use for d in range(2))
                                                          for r in per_listener)},
        "paired": {c: paired_gains(per_listener, c) for c in ("personalized", "maml", "offset")},
        "per_listener": {
            r.listener: {"support": r.support, "use": r.use,
                         **{c: {s: m for s, m in r.per_song[c].items()} for c in ("generic", "personalized", "maml")}}
            for r in per_listener
        },
        "eval_seconds": time.time() - t0,
        "evaluated_at": git_info(),  # a finished run re-evaluated later (run.py evaluate) differs from run.json's
        **extra,
    }
    if writer is not None:
        for c, m in test.items():
            for k in ("ccc_mean", "ccc_arousal", "ccc_valence"):
                writer.add_scalar(f"test/{c}_{k}", m[k], 0)
    atomic_write_text(run / "results.json", json.dumps(results, indent=2, default=float))
    if cfg.eval.protocol == "within_song":
        how = f"support: the first {cfg.train.seq_len} steps of each test song, query: the rest"
    else:
        how = f"one-shot ({cfg.eval.support_songs} support song)"
    songs = f", {len(ctx.songs['test'])} test songs" if ctx.songs is not None else ""
    table = format_table(test, f"{cfg.name}: test listeners ({results['listeners']['test']}{songs}), {how}; labels on the "
                               f"{ctx.dataset.scale} scale")
    atomic_write_text(run / "results.md", table + "\n")
    if cfg.eval.plot and per_listener:
        r = max(per_listener, key=lambda r: len(r.per_song["personalized"]))
        plot_listener(r, run / "curves.png")
    return results


def evaluate_run(run: Path, split: str = "test") -> dict:
    """Re-evaluate a finished run's best checkpoint (``python run.py evaluate RUN_DIR``)."""
    from pdmer.runs import load_run_config

    cfg = load_run_config(run)
    ctx = build_context(cfg)
    model = build_model(ctx)
    load_weights(Path(run) / "checkpoints" / "best.safetensors", model, {"config_hash": config_hash(cfg)})
    if split == "test":
        return evaluate_and_report(model, ctx, Path(run))
    summary, _ = evaluate_split(model, ctx, split)
    return {"experiment": cfg.name, split: summary}
