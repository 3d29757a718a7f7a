"""What a run needs besides its weights: data, split, features, references, loss, the model.

:func:`build_context` loads and checks the data and featurises the audio once; every other
part of training and evaluation reads it from the :class:`Context`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pdmer.config import ExperimentConfig
from pdmer.data.check import fit_to_audio
from pdmer.data.loading import load_dataset, make_splits, role_curves
from pdmer.data.types import Curve, DataError, Dataset
from pdmer.meta.maml import attach_inner_lrs, call
from pdmer.metrics import attention_loss, emotion_loss
from pdmer.models.dsaml import DSAML
from pdmer.references import References
from pdmer.response import ResponseBasis
from pdmer.runs import REPO, resolve_device

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
    response: ResponseBasis | None = None  # built on first use (response_basis)

    def split_record(self) -> dict:
        """What ``splits.json`` holds: kind, seed, protocol, the listener lists (and song lists)."""
        kind = "song-disjoint" if self.songs is not None else "listener-disjoint"
        out = {"kind": kind, "seed": self.cfg.data.split.seed, "protocol": self.cfg.eval.protocol, **self.splits}
        if self.songs is not None:
            out["songs"] = self.songs
        return out

    def train_curves(self) -> dict[str, list[Curve]]:
        """Training listeners' curves the model may learn from (train songs only in a song split)."""
        return {
            a: pool for a, (pool, _) in role_curves(self.dataset, self.splits["train"], self.songs, "train").items()
        }


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def load_features(
    cfg: ExperimentConfig, dataset: Dataset, progress: bool = True, problems: list[str] | None = None
) -> dict:
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
        log.warning(
            "%d curve(s) end in a 0.5 s step that their audio does not cover whole; that last step is cut "
            "(e.g. song %s, %s)",
            len(trimmed),
            trimmed[0]["song_id"],
            trimmed[0]["reason"],
        )
        splits, songs = make_splits(dataset, *split_args)  # curve lengths changed
    dataset.info["fitted_to_audio"] = len(trimmed)
    return Context(cfg, device, dataset, splits, features, songs)


def build_model(ctx: Context, fit_skip: bool = True) -> DSAML:
    """A fresh model for ``ctx``: input statistics from the training songs, the skip path (``model.linear_skip``)
    started at its probe; ``fit_skip=False`` leaves an MLP skip path unfitted (weights loaded next)."""
    g_dim = next(iter(ctx.features.values())).global_.shape[1]
    model = DSAML(ctx.cfg.model, g_dim)
    train_curves = [c for cs in ctx.train_curves().values() for c in cs]
    train_songs = sorted({c.song_id for c in train_curves})
    local = torch.cat([ctx.features[s].local[::7] for s in train_songs])  # subsample steps: the statistics only
    glob = torch.cat([ctx.features[s].global_ for s in train_songs])
    model.fit_input_stats(local, glob)
    if ctx.cfg.model.linear_skip and ctx.cfg.model.skip_hidden and fit_skip:
        from pdmer.references import consensus_steps

        try:
            x, y, _ = consensus_steps(train_curves, ctx.features)
        except ValueError:
            raise DataError("model.skip_hidden needs training curves to fit the skip path to") from None
        rmse = model.fit_skip(torch.from_numpy(x), torch.from_numpy(y), seed=ctx.cfg.train.seed)
        log.info(
            "skip path: an MLP of %d units fitted to %d training steps (RMSE %.4f)",
            ctx.cfg.model.skip_hidden,
            len(x),
            rmse,
        )
    elif ctx.cfg.model.linear_skip and not ctx.cfg.model.skip_hidden:
        probe = references(ctx).ridge
        if probe is None:
            raise DataError("model.linear_skip needs training curves to fit its ridge probe")
        f64 = torch.float64
        model.init_linear_skip(
            torch.tensor(probe.coef, dtype=f64).float(),
            torch.tensor(probe.bias, dtype=f64).float(),
            torch.tensor(probe.mean, dtype=f64).float(),
            torch.tensor(probe.std, dtype=f64).float(),
        )
    if ctx.cfg.problem == "pdmer" and ctx.cfg.meta.learn_inner_lr:
        attach_inner_lrs(model, ctx.cfg.meta.inner_lr)
    return model.to(ctx.device)


def references(ctx: Context) -> References:
    """The listener-blind references of ``ctx`` (built once: the others' averages, the ridge probe)."""
    if ctx.refs is None:
        train = [c for cs in ctx.train_curves().values() for c in cs]
        ctx.refs = References(ctx.dataset.curves, train, ctx.features, ctx.cfg.train.seed)
    return ctx.refs


def response_basis(ctx: Context) -> ResponseBasis:
    """The basis of the safe rule's ``response`` component (:mod:`pdmer.response`), learned once from the
    training listeners' curves under the test protocol (deterministic: the same data, split and
    ``train.seed`` give the same basis)."""
    if ctx.response is None:
        curves = [c for cs in ctx.train_curves().values() for c in cs if c.song_id in ctx.features]
        local = {c.song_id: ctx.features[c.song_id].local for c in curves}
        ctx.response = ResponseBasis.learn(local, curves, ctx.cfg.eval.protocol, ctx.cfg.train.seed)
    return ctx.response


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


VAL_METRICS = (
    "ccc_mean",
    "ccc_arousal",
    "ccc_valence",
    "rmse_arousal",
    "rmse_valence",
)  # logged as val/<condition>_<metric>


def selection_metric(cfg: ExperimentConfig) -> tuple[str, str]:
    return ("personalized" if cfg.problem == "pdmer" else "generic"), "ccc_mean"
