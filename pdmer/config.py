"""Typed experiment configuration.

An experiment is one YAML file in ``experiments/`` merged onto the dataclass defaults
below, then dotted ``key=value`` overrides. OmegaConf structured configs do the typing:
an unknown key or a value of the wrong type is an error that names the key.

The run folder is ``runs/<experiment>-<hash>`` where the hash covers everything that can
change a result; device, threads, logging and output paths stay out of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pdmer.paths import experiments_dir

EXPERIMENTS_DIR = experiments_dir()  # pdmer.paths says where (the project folder, else the source checkout)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key."""


@dataclass
class SyntheticConfig:
    """The embedded benchmark: procedural songs rated by simulated listeners."""

    seed: int = 0
    n_clips: int = 300  # 45 s clips, DEAM-like (300: about 14 raters per song with 150 listeners, DEAM about 10)
    clip_s: float = 45.0
    n_long: int = 12  # longer songs for the long-song path
    long_min_s: float = 120.0
    long_max_s: float = 240.0
    label_start_s: float = 15.0  # as DEAM: ratings start 15 s into the song
    # 150: 22 validation listeners (the safe rule's choice and the checkpoint selection) and 30 test
    # listeners at the default split; with 60 (9 and 12) the choice swung between seeds and thread counts
    n_listeners: int = 150
    min_songs_per_listener: int = 20
    max_songs_per_listener: int = 40
    # How much of a listener's personal parameters carries over from one song to the next:
    # 0 = a new random listener for every song, 1 = the same parameters on every song.
    carryover: float = 0.8  # 0.8 reproduces the real between-song r of slider movement (about 0.4)
    # The same for the listener's mean offsets (arousal, valence). Real listeners' mean offset
    # from the others correlates only weakly between two pieces (r < 0.1), hence the low default.
    offset_carryover: float = 0.1
    # Scale of each personal parameter family (1 = the defaults, calibrated to DEAM).
    offset_scale: float = 1.0
    weight_scale: float = 1.0
    noise_scale: float = 1.0


@dataclass
class SplitConfig:
    """Train / validation / test split, written to the run folder (``splits.json``).

    ``kind: listener`` (default): listener-disjoint; validation and test listeners never train.
    ``kind: song``: song-disjoint; training uses train songs only, validation scores val songs,
    test scores test songs (DEAM: its official test songs, ids 2001-2058; other data:
    ``test_songs``). Listeners may appear in several roles (the DEAM authors' protocol).
    """

    kind: str = "listener"  # listener | song
    val_listeners: float = 0.15  # kind=listener: fraction (<1) or count (>=1)
    test_listeners: float = 0.2  # kind=listener
    val_songs: float = 0.15  # kind=song: fraction (<1) or count (>=1) of the non-test songs
    test_songs: float = 0.2  # kind=song, data without official test songs: fraction or count
    seed: int = 0


@dataclass
class DeamConfig:
    """DEAM options (``pdmer.data.deam.load_deam``); the defaults are the DSAML authors' conventions."""

    train_max_id: int = 2000  # ids <= this: the 45 s clips, training songs
    test_first_id: int = 2001  # ids test_first_id..test_last_id: the full-length 2015 songs, test songs
    test_last_id: int = 2058
    clip_steps: Optional[int] = 60  # clip curves cut to this many steps from clip_start_s (null: whole)
    clip_start_s: float = 15.0
    flat_mad: Optional[float] = (
        0.01  # drop a curve whose mean |x - mean| over its first flat_window values is below (null: off)
    )
    flat_window: int = 60
    min_songs_per_listener: int = 16  # authors: annotators with 15 songs or fewer are dropped
    min_songs_scope: str = "all"  # all | train: which songs count towards min_songs_per_listener
    range_tol: float = 0.01  # labels must lie in [-1 - range_tol, 1 + range_tol]


@dataclass
class PmemoConfig:
    """PMEmo2019 options (``pdmer.data.pmemo.load_pmemo``)."""

    scale: str = "native"  # native: [0, 1] as published | deam: 2x - 1, onto DEAM's [-1, 1]
    range_tol: float = 1e-6


@dataclass
class GenericConfig:
    """The generic layout (``pdmer.data.generic.load_generic``)."""

    scale: str = "deam"  # deam: values about [-1, 1] | unit: [0, 1]


@dataclass
class VgmidiConfig:
    """VGMIDI options (``pdmer.data.vgmidi.load_vgmidi``); the defaults follow the annotation tool's rules."""

    audio_dir: str = ""  # rendered audio cache ("" = <repo>/cache/vgmidi-audio)
    soundfont: str = ""  # General MIDI .sf2 ("" = Debian's fluid-soundfont-gm)
    min_recorded: float = 0.5  # share of a curve's bins the listener must have recorded


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | generic | deam | pmemo | vgmidi
    root: str = ""  # generic / deam / pmemo: dataset folder; synthetic: cache folder ("" = data/synthetic-<hash>)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    generic: GenericConfig = field(default_factory=GenericConfig)
    deam: DeamConfig = field(default_factory=DeamConfig)
    pmemo: PmemoConfig = field(default_factory=PmemoConfig)
    vgmidi: VgmidiConfig = field(default_factory=VgmidiConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    min_songs_per_listener: int = 2  # a task needs a support song and at least one query song


@dataclass
class FeatureConfig:
    """Dual-scale inputs per 0.5 s step (dsaml.md, 'Inputs')."""

    sample_rate: int = 44100
    step_s: float = 0.5
    n_fft: int = 2646
    hop_length: int = 441
    n_mels: int = 128
    patch_frames: int = 51
    log_eps: float = 1e-6
    global_encoder: str = "descriptor"  # descriptor | embeddings
    global_window_s: float = 30.0
    # the descriptor's CQT: exact (nnAudio's kernels at 22.05 kHz, descriptor version 2) or
    # multirate (the same bins from short kernels on a signal halved per octave: about twice as
    # fast with its resampling, slightly different numbers, its own descriptor version and cache key)
    cqt: str = "exact"  # exact | multirate
    embeddings_dir: str = ""  # global_encoder=embeddings: one <song_id>.npy per song
    cache_dir: str = ""  # "" = <repo>/cache/features


@dataclass
class ModelConfig:
    """DSAML sizes; ``size: paper`` sets the authors' sizes (see ``PAPER_MODEL``)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    ff: int = 256
    dropout: float = 0.1
    lstm_hidden: int = 64
    head_hidden: int = 64
    local_window: int = 5  # steps each side, local band mask
    global_window: int = 30  # steps each side, global band mask
    # average-pool the 51 x 128 patch by (time, freq) before the CNN: the CNN is memory-bound
    # on the CPU, and 2 x 2 makes the small model 4x cheaper; the paper size uses 1 x 1
    local_pool_time: int = 2
    local_pool_freq: int = 2
    use_local_branch: bool = True  # spectrogram CNN; False = global embedding only
    use_local_attention: bool = True
    use_global_attention: bool = True
    # a linear path from the global features to the output, started at the ridge probe of the
    # training listeners' average curves (pdmer.references.RidgeProbe): the network learns the rest
    linear_skip: bool = False
    # with linear_skip: 0 = that path is the (linear) ridge probe; N > 0 = an MLP (two hidden
    # layers of N units) fitted to the same average curves on every training step at once before
    # training (DSAML.fit_skip): it learns the known pieces, which the windowed training does not
    skip_hidden: int = 0


PAPER_MODEL = dict(
    hidden=1024,
    layers=3,
    heads=16,
    ff=2048,
    dropout=0.1,
    lstm_hidden=256,
    head_hidden=256,
    local_pool_time=1,
    local_pool_freq=1,
)


@dataclass
class MetaConfig:
    """MAML over per-listener tasks (PDMER)."""

    inner_lr: float = 0.05  # inner SGD rate (initial value when learn_inner_lr); paper 5e-3, 0.05 measured better here
    # MAML++ "LSLR": one learned inner rate per parameter tensor, meta-learned by the outer loop
    learn_inner_lr: bool = False
    inner_steps: int = 5
    first_order: bool = True
    tasks_per_batch: int = 4
    query_songs: int = 4  # per task, drawn with replacement if the listener has fewer
    task_sampling: str = "listener"  # listener | random (ablation: tasks mix listeners)
    # adapt the tasks of a meta-batch together (vmap over per-task parameters) instead of one by
    # one; same meta-gradient (tested), faster where launches or Python overhead dominate (GPU)
    batch_tasks: bool = False
    task_chunk: int = 0  # with batch_tasks: tasks per vmap (memory against speed); 0 = all at once
    # weight of the un-adapted (generic) model's query loss in the meta-objective: keeps the
    # meta-learned initialisation a good listener-blind model (0 = plain MAML's objective)
    generic_loss_weight: float = 0.0


@dataclass
class TrainConfig:
    iterations: int = 400  # outer (meta-)iterations, or optimiser steps for DMER
    outer_lr: float = 1e-3
    batch_songs: int = 15  # DMER batch
    seq_len: int = 60  # steps per training sequence (30 s)
    attention_loss: bool = True  # diagonal attention loss (dsaml.md, 'Loss')
    attention_loss_weight: float = 1.0
    # a training sequence whose target's std is below this (per dimension) counts in the loss by
    # its RMSE only (its PCC is undefined, its CCC says nothing about movement); 0 = the paper's loss
    flat_std: float = 0.0
    # weights of the loss terms (CCC, PCC, 1 - RMSE); the paper weighs them equally
    loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # the target of the listener-blind losses (DMER's loss, pdmer's meta.generic_loss_weight term):
    # listener = each training listener's own curve (the paper); consensus = the mean of the training
    # listeners' curves of the song on the same steps: the same minimiser for the RMSE term, with far
    # less gradient noise where listeners disagree (VGMIDI: per-step std 0.37-0.39 across listeners)
    target: str = "listener"
    grad_clip: float = 1.0
    # the skip path's (model.linear_skip) outer learning rate, as a fraction of outer_lr: 0 keeps
    # it at its fitted start (the network learns only what it misses), 1 = trained like the rest
    skip_lr_scale: float = 1.0
    # validate the model before the first outer step too, so that the starting point (the fitted
    # skip path, the network's output at zero) is a candidate of the checkpoint selection
    select_start: bool = False
    # pdmer: the first `warmup` outer steps are plain DMER steps (the listener-blind loss on
    # train.target, the DMER run's batches of the same seed), meta-training takes over after them:
    # the meta-learned start begins at a trained listener-blind model (pre-train, then meta-train)
    # and the selection sees the DMER checkpoints as candidates too; 0 = meta-train from the start
    warmup: int = 0
    precision: str = "fp32"  # fp32 | bf16 (autocast of the forward; losses and norms stay fp32)
    eval_every: int = 50
    val_listeners_max: int = 24  # validation listeners scored at each evaluation
    seed: int = 0


@dataclass
class EvalConfig:
    support_songs: int = 1  # k-shot
    # test protocol: songs = support on `support_songs` whole songs, queries on the listener's other
    # (test) songs; within_song = the DEAM authors': per (test song, listener), support = the first
    # train.seq_len steps of that song, query = the rest of it. Validation always uses `songs`.
    protocol: str = "songs"  # songs | within_song
    hop: int = 30  # sliding-window hop in steps for songs longer than seq_len
    # safe personalization (pdmer.personalize): the per-listener held-out check on the last third
    # of the support sequence (false: the population weights alone decide)
    safe_check: bool = True
    plot: bool = True


@dataclass
class RuntimeConfig:
    """Does not change results; excluded from the run hash."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # 0 = torch default
    out_dir: str = "runs"
    progress: bool = True


@dataclass
class ExperimentConfig:
    name: str = "pdmer.synthetic.dsaml"
    problem: str = "pdmer"  # pdmer (meta-learning) | dmer (plain training)
    size: str = "small"  # small | paper
    data: DataConfig = field(default_factory=DataConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


CHOICES = {
    "problem": ("pdmer", "dmer"),
    "size": ("small", "paper"),
    "data.source": ("synthetic", "generic", "deam", "pmemo", "vgmidi"),
    "data.split.kind": ("listener", "song"),
    "data.generic.scale": ("deam", "unit"),
    "data.deam.min_songs_scope": ("all", "train"),
    "data.pmemo.scale": ("native", "deam"),
    "eval.protocol": ("songs", "within_song"),
    "features.global_encoder": ("descriptor", "embeddings"),
    "features.cqt": ("exact", "multirate"),
    "meta.task_sampling": ("listener", "random"),
    "train.precision": ("fp32", "bf16"),
    "train.target": ("listener", "consensus"),
}


def find_yaml(name_or_path: str | Path, folder: Path) -> tuple[Path | None, list[str]]:
    """An existing YAML path, or ``<folder>/<name>.yaml``; else (None, the names known in ``folder``)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p, []
    candidate = folder / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate, []
    return None, sorted(q.stem for q in folder.glob("*.yaml"))


def resolve_experiment(name_or_path: str) -> Path:
    """Map ``pdmer.synthetic.dsaml`` or a path to an existing YAML file."""
    path, known = find_yaml(name_or_path, EXPERIMENTS_DIR)
    if path is None:
        raise ConfigError(f"unknown experiment {name_or_path!r}; known: {', '.join(known)}")
    return path


def load_config(experiment: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Defaults <- experiment YAML <- dotted overrides, validated.

    Args:
        experiment: experiment name (file stem in ``experiments/``) or path to a YAML file;
            None keeps the defaults.
        overrides: ``["train.iterations=10", "model.hidden=64"]``.

    Returns:
        ExperimentConfig: a plain dataclass instance (not an OmegaConf node).

    Raises:
        ConfigError: unknown key, wrong type, malformed override or invalid choice.
    """
    base = OmegaConf.structured(ExperimentConfig)
    layers = []
    where = "defaults"
    try:
        if experiment is not None:
            path = resolve_experiment(experiment)
            where = str(path)
            file_cfg = _load_yaml(path)
            if "name" not in file_cfg:
                file_cfg.name = path.stem
            layers.append(file_cfg)
        cfg = OmegaConf.merge(base, *layers)
        where = "overrides"
        for ov in overrides or []:
            if "=" not in ov:
                raise ConfigError(f"override {ov!r} is not of the form key=value")
            key = ov.split("=", 1)[0]
            if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
                raise ConfigError(f"unknown config key {key!r} in override {ov!r}")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([ov]))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"{where}: invalid config key {key!r}: {msg}") from None
    out: ExperimentConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    if out.size == "paper":
        # paper sizes apply unless a file or override set the key explicitly
        explicit = set(_explicit_keys(layers, overrides or [], "model"))
        for k, v in PAPER_MODEL.items():
            if k not in explicit:
                setattr(out.model, k, v)
    validate(out)
    return out


def _load_yaml(path: Path):
    """A YAML mapping as an OmegaConf node; a malformed file is a ConfigError naming its line."""
    import yaml

    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}{at}: not valid YAML ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read ({e})") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(
            f"{path}: expected a mapping of config keys (e.g. `train: {{iterations: 100}}`), "
            f"got a {type(node).__name__}"
        )
    return node


def _explicit_keys(layers, overrides: list[str], section: str) -> list[str]:
    keys = []
    for layer in layers:
        sec = layer.get(section) if hasattr(layer, "get") else None
        if sec is not None:
            keys.extend(str(k) for k in sec.keys())
    for ov in overrides:
        k = ov.split("=", 1)[0]
        if k.startswith(section + "."):
            keys.append(k[len(section) + 1 :])
    return keys


# --------------------------------------------------------------------------------------------
# Numeric settings: one table, used by the config, ``train``, ``calibrate`` and ``sweep``
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting accepts: an int or a finite float, in a range."""

    integer: bool = False
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None
    lt: float | None = None

    def text(self) -> str:
        parts = [
            f">= {self.ge:g}" if self.ge is not None else "",
            f"> {self.gt:g}" if self.gt is not None else "",
            f"<= {self.le:g}" if self.le is not None else "",
            f"< {self.lt:g}" if self.lt is not None else "",
        ]
        return ("an integer" if self.integer else "a finite number") + "".join(
            f"{' ' if i == 0 else ' and '}{p}" for i, p in enumerate(q for q in parts if q)
        )

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and (not isinstance(value, int) and not float(value).is_integer()):
            return False
        if not math.isfinite(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )


POSITIVE, NONNEGATIVE, AT_LEAST_1 = Bound(gt=0), Bound(ge=0), Bound(integer=True, ge=1)
COUNT = Bound(integer=True, ge=0)
FRACTION = Bound(ge=0, le=1)

# Every numeric setting with a range; any other float must still be finite (see validate).
SETTINGS: dict[str, Bound] = {
    "data.synthetic.carryover": FRACTION,
    "data.synthetic.offset_carryover": FRACTION,
    "data.split.val_listeners": NONNEGATIVE,
    "data.split.test_listeners": NONNEGATIVE,
    "data.split.val_songs": NONNEGATIVE,
    "data.split.test_songs": NONNEGATIVE,
    "data.deam.range_tol": NONNEGATIVE,
    "data.deam.flat_window": AT_LEAST_1,
    "data.pmemo.range_tol": NONNEGATIVE,
    "features.sample_rate": AT_LEAST_1,
    "features.step_s": POSITIVE,
    "features.n_fft": AT_LEAST_1,
    "features.hop_length": AT_LEAST_1,
    "features.n_mels": AT_LEAST_1,
    "features.patch_frames": AT_LEAST_1,
    "features.log_eps": POSITIVE,
    "features.global_window_s": POSITIVE,
    "model.hidden": AT_LEAST_1,
    "model.layers": AT_LEAST_1,
    "model.heads": AT_LEAST_1,
    "model.ff": AT_LEAST_1,
    "model.dropout": Bound(ge=0, lt=1),
    "model.lstm_hidden": AT_LEAST_1,
    "model.head_hidden": AT_LEAST_1,
    "model.local_window": COUNT,
    "model.global_window": COUNT,
    "model.local_pool_time": AT_LEAST_1,
    "model.local_pool_freq": AT_LEAST_1,
    "model.skip_hidden": COUNT,
    "meta.inner_lr": POSITIVE,
    "meta.inner_steps": AT_LEAST_1,
    "meta.tasks_per_batch": AT_LEAST_1,
    "meta.query_songs": AT_LEAST_1,
    "meta.task_chunk": COUNT,  # 0 = all tasks of a meta-batch at once
    "meta.generic_loss_weight": NONNEGATIVE,
    "train.flat_std": NONNEGATIVE,
    "train.iterations": COUNT,
    "train.warmup": COUNT,  # pdmer: plain DMER steps before meta-training
    "train.outer_lr": POSITIVE,
    "train.batch_songs": AT_LEAST_1,
    "train.seq_len": AT_LEAST_1,
    "train.attention_loss_weight": NONNEGATIVE,
    "train.grad_clip": NONNEGATIVE,  # 0 = no clipping
    "train.skip_lr_scale": NONNEGATIVE,  # 0 = the skip path frozen at its fitted start
    "train.eval_every": AT_LEAST_1,
    "train.val_listeners_max": COUNT,  # 0 = all validation listeners
    "eval.support_songs": AT_LEAST_1,
    "eval.hop": AT_LEAST_1,
    "runtime.threads": COUNT,  # 0 = torch's default
}

DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_setting(key: str, value: Any, flag: str | None = None) -> Any:
    """Check one numeric setting against :data:`SETTINGS` (and finiteness); returns it unchanged.

    Args:
        key: the dotted config key, e.g. ``meta.inner_lr``.
        value: the value to check.
        flag: how the user gave it (e.g. ``--inner-lr``), named in the message instead of ``key``.

    Raises:
        ConfigError: naming the setting, the value and what it must be.
    """
    bound = SETTINGS.get(key, Bound())
    if not bound.accepts(value):
        who = f"{flag} (= {key})" if flag else key
        raise ConfigError(f"{who}={value!r} is refused: it must be {bound.text()}")
    return value


def check_choice(key: str, value: Any) -> Any:
    """Check one setting against its allowed values in :data:`CHOICES`; returns it unchanged.

    Raises:
        ConfigError: naming the setting, the value and the allowed values.
    """
    allowed = CHOICES[key]
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    return value


def check_device_spec(spec: str, key: str = "runtime.device") -> str:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N`` (whether it exists is checked where it is used)."""
    if not isinstance(spec, str) or not DEVICE_RE.fullmatch(spec):
        raise ConfigError(f"{key}={spec!r} is not a device: use auto, cpu, cuda, cuda:N or mps")
    return spec


def _numeric_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            yield from _numeric_leaves(v, key + ".")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            yield key, v


def validate(cfg: ExperimentConfig) -> None:
    """Every check of a loaded config: choices, numeric ranges (:data:`SETTINGS`), finite floats, cross-checks."""
    for key, value in _numeric_leaves(cfg):
        check_setting(key, value)
    check_device_spec(cfg.runtime.device)
    for key in CHOICES:
        check_choice(key, _get(cfg, key))
    m = cfg.model
    if m.hidden % m.heads:
        raise ConfigError(f"model.hidden={m.hidden} must be divisible by model.heads={m.heads}")
    if not (m.use_local_attention or m.use_global_attention):
        raise ConfigError("model.use_local_attention and model.use_global_attention cannot both be false")
    d = cfg.data.deam
    if d.test_last_id < d.test_first_id or d.test_first_id <= d.train_max_id:
        raise ConfigError(
            f"data.deam: test ids {d.test_first_id}..{d.test_last_id} must be a non-empty range above "
            f"train_max_id={d.train_max_id}"
        )
    if d.clip_steps is not None and d.clip_steps < 1:
        raise ConfigError("data.deam.clip_steps must be >= 1 (or null to keep whole curves)")
    if d.flat_mad is not None and not Bound(ge=0).accepts(d.flat_mad):
        raise ConfigError(f"data.deam.flat_mad={d.flat_mad!r} must be a finite number >= 0 (or null: off)")
    if cfg.train.warmup and cfg.problem != "pdmer":
        raise ConfigError(f"train.warmup={cfg.train.warmup} is for problem=pdmer (DMER steps before meta-training)")
    if cfg.train.warmup > cfg.train.iterations:
        raise ConfigError(
            f"train.warmup={cfg.train.warmup} must not exceed train.iterations={cfg.train.iterations}"
            " (the warm-up steps are among the outer steps)"
        )
    lw = cfg.train.loss_weights
    if len(lw) != 3 or not all(Bound(ge=0).accepts(x) for x in lw) or sum(lw) <= 0:
        raise ConfigError(
            f"train.loss_weights={list(lw)!r} must be three finite numbers >= 0 (CCC, PCC, 1 - RMSE), not all 0"
        )


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: ExperimentConfig) -> str:
    """Short hash of everything that can change a result (not runtime, not the name)."""
    d = to_dict(cfg)
    d.pop("runtime")
    d.pop("name")
    _drop_inactive(d)
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:8]


def _drop_inactive(d: dict) -> None:
    """Remove from a config dict what cannot change a result: the options of unused data sources
    (the embedded benchmark's among them, so that changing its defaults leaves real-data runs as they were),
    ``model.skip_hidden`` where it changes nothing (no skip path, or the linear one it was
    before the option existed, so those runs keep their hashes), and the training options added
    later at the values that change nothing (``train.skip_lr_scale`` 1 or without a skip path,
    ``train.select_start`` off, ``train.warmup`` 0)."""
    data = d["data"]
    for source in ("synthetic", "generic", "deam", "pmemo", "vgmidi"):
        if data.get("source") != source:
            data.pop(source, None)
    if not d["model"].get("linear_skip") or not d["model"].get("skip_hidden"):
        d["model"].pop("skip_hidden", None)
    train = d["train"]
    if not d["model"].get("linear_skip") or train.get("skip_lr_scale", 1.0) == 1.0:
        train.pop("skip_lr_scale", None)
    if not train.get("select_start", False):
        train.pop("select_start", None)
    if not train.get("warmup", 0):
        train.pop("warmup", None)


def from_dict(d: dict) -> ExperimentConfig:
    """Rebuild a config saved in a run folder (strict: unknown keys are errors)."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(d))
    except OmegaConfBaseException as e:
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        raise ConfigError(f"saved config: invalid key {getattr(e, 'full_key', None)!r}: {msg}") from None
    out = OmegaConf.to_object(cfg)
    validate(out)
    return out
