"""Hyperparameter sweeps with optuna: ``python run.py sweep SWEEP.yaml``.

A sweep file (``experiments/sweeps/*.yaml``) names a base experiment, a search space whose
parameters are labelled ``scientific``, ``nuisance`` or ``fixed`` (the tuning playbook's roles),
the objective (a validation metric, ``val/<condition>_<metric>``, and its direction), the sampler
(seeded TPE by default) and the pruner (median by default)::

    experiment: pdmer.synthetic.dsaml
    trials: 30
    objective: {metric: val/personalized_ccc_mean, direction: maximize}
    sampler: {name: tpe, seed: 0}
    pruner: {name: median, n_startup_trials: 5, n_warmup_steps: 100}
    params:
      meta.inner_lr: {role: scientific, type: log_float, low: 1.0e-4, high: 1.0e-1}
      meta.inner_steps: {role: scientific, type: int, low: 1, high: 10}
      meta.first_order: {role: fixed, value: true}

Every trial is a normal run folder (``<sweep dir>/trials/<experiment>.trialNNNN-<hash>/``): it
reports its objective at each validation, so the pruner can stop it early, and its value is the
best validation value it reached. The study lives in an optuna RDB storage (SQLite in the sweep
folder by default, or any URL, e.g. PostgreSQL shared by several machines); running the same
command again continues the study up to the requested number of finished trials.

Bookkeeping rules (also in the README):

- finished = COMPLETE or PRUNED; ``--trials N`` is the study's total of finished trials.
- A trial left RUNNING by a process that died (same host, process gone; or, from another
  machine, no heartbeat for ``GRACE_S`` seconds) is marked FAIL when a sweep process next looks,
  with ``fail_reason`` and a ``stopped.json`` in its run folder. It is not counted and not
  re-queued: the sampler proposes a replacement.
- A process never starts a trial that would take the study past N: trials running elsewhere
  count as claimed, and it waits for them (they may still fail and need replacing). If two
  processes claim the last slot at the same instant, the later trial is marked FAIL with
  ``fail_reason`` "not run" before any training.
- The sampler is re-seeded per trial from (seed, trial number): one process from scratch is
  reproducible, and a resumed or parallel sweep never repeats the same random draws.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import platform
import re
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import optuna
import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from pdmer.config import EXPERIMENTS_DIR, ConfigError, ExperimentConfig, config_hash, find_yaml, load_config, to_yaml
from pdmer.io import atomic_write, atomic_write_text
from pdmer.runs import REPO

log = logging.getLogger(__name__)

SWEEPS_DIR = EXPERIMENTS_DIR / "sweeps"
ROLES = ("scientific", "nuisance", "fixed")
TYPES = ("float", "log_float", "int", "categorical")
# what validation logs (pdmer.training.loop, validate): val/<condition>_<metric>
CONDITIONS = ("generic", "personalized", "consensus", "oracle")
METRICS = ("ccc_mean", "ccc_arousal", "ccc_valence", "rmse_arousal", "rmse_valence")
# conditions a data source can never score (generic data has them only with oracle.csv / consensus.csv)
MISSING_CONDITIONS = {"deam": ("oracle",), "pmemo": ("consensus", "oracle")}
HEARTBEAT_S = 30  # a running trial writes a heartbeat this often (RDB storage)
GRACE_S = 120  # a trial without heartbeat for this long is stale: marked FAIL
POLL_S = 2.0  # how often a process waiting for other processes' trials looks again

_ABSENT = object()
_STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------------
# the sweep file's schema: OmegaConf structured configs (as pdmer.config for experiments), so that an
# unknown key or a wrong type is an error naming the key; what a type cannot say is checked in load_sweep
# (Optional, not `X | None`: OmegaConf reads the annotations, as in pdmer.config)


@dataclass
class ObjectiveFile:
    """``objective``: a validation metric ``val/<condition>_<metric>`` and its direction."""

    metric: Optional[str] = None
    direction: str = "maximize"  # maximize | minimize


@dataclass
class SweepFile:
    """A sweep file's top level."""

    experiment: str = MISSING
    description: Optional[str] = ""
    trials: int = 20  # >= 1
    objective: ObjectiveFile = MISSING
    sampler: Optional[dict[str, Any]] = None  # name + the optuna class's keyword arguments (see _component)
    pruner: Optional[dict[str, Any]] = None
    params: dict[str, Any] = MISSING  # config key -> a parameter, its schema chosen by role and type (PARAM_FILES)


@dataclass
class RangeParamFile:
    """A ``float`` or ``int`` parameter (an int range's numbers must be integral)."""

    role: str = MISSING
    type: str = MISSING
    low: float = MISSING
    high: float = MISSING
    step: Optional[float] = None


@dataclass
class LogRangeParamFile:
    """A ``log_float`` parameter."""

    role: str = MISSING
    type: str = MISSING
    low: float = MISSING
    high: float = MISSING


@dataclass
class ChoicesParamFile:
    """A ``categorical`` parameter: numbers, strings, booleans or nulls."""

    role: str = MISSING
    type: str = MISSING
    choices: list[Any] = MISSING


@dataclass
class FixedParamFile:
    """A ``fixed`` parameter; without ``value``, the base experiment's value."""

    role: str = MISSING
    value: Any = MISSING


PARAM_FILES = {
    "float": RangeParamFile,
    "int": RangeParamFile,
    "log_float": LogRangeParamFile,
    "categorical": ChoicesParamFile,
    "fixed": FixedParamFile,
}


class SweepError(ConfigError):
    """A sweep file, objective or storage is invalid; raised before any training."""


class _QuotaFull(Exception):
    """The requested trials are already finished or running elsewhere (raced for the last slot)."""


@dataclass
class Param:
    """One sweep parameter: searched (scientific / nuisance) or fixed."""

    key: str
    role: str
    type: str = ""  # float | log_float | int | categorical; "" for fixed
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: list = field(default_factory=list)
    value: Any = None  # fixed: the value
    from_base: bool = False  # fixed without a value: the base experiment's value

    @property
    def searched(self) -> bool:
        return self.role != "fixed"

    def spec(self) -> dict:
        """JSON form (summary, study attributes)."""
        if not self.searched:
            return {"role": self.role, "value": self.value}
        out = {"role": self.role, "type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high)
            if self.step is not None:
                out["step"] = self.step
        return out

    def range_text(self) -> str:
        if not self.searched:
            return f"fixed at {_short(self.value)}"
        if self.type == "categorical":
            return "one of " + ", ".join(map(str, self.choices))
        scale = " (log)" if self.type == "log_float" else ""
        step = f" step {self.step}" if self.step is not None else ""
        return f"{self.type.replace('log_', '')} [{self.low}, {self.high}]{scale}{step}"

    def suggest(self, trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(
            self.key, float(self.low), float(self.high), step=self.step, log=self.type == "log_float"
        )


@dataclass
class Sweep:
    """A parsed and checked sweep file (``load_sweep``)."""

    path: Path
    name: str  # the file's stem: the default study name
    experiment: str
    trials: int
    metric: str  # val/<condition>_<metric>
    direction: str  # maximize | minimize
    sampler: dict  # name + keyword arguments
    pruner: dict
    params: list[Param]
    overrides: list[str] = field(default_factory=list)  # command-line overrides on the base experiment
    description: str = ""
    base: ExperimentConfig | None = None  # the base config with the fixed values, once checked

    @property
    def searched(self) -> list[Param]:
        return [p for p in self.params if p.searched]

    @property
    def fixed(self) -> list[Param]:
        return [p for p in self.params if not p.searched]

    @property
    def condition_metric(self) -> tuple[str, str]:
        return _split_metric(self.metric)

    def base_overrides(self) -> list[str]:
        """Command-line overrides, then the fixed parameters."""
        return list(self.overrides) + [f"{p.key}={_fmt(p.value)}" for p in self.fixed]

    def config(self, values: dict[str, Any] | None = None, extra: list[str] | None = None) -> ExperimentConfig:
        """The base experiment with the fixed parameters, ``values`` and ``extra`` overrides."""
        ovs = self.base_overrides() + [f"{k}={_fmt(v)}" for k, v in (values or {}).items()] + list(extra or [])
        return load_config(self.experiment, ovs)

    def definition(self) -> dict:
        """What must not change while a study goes on (checked on resume)."""
        return {
            "experiment": self.experiment,
            "objective": {"metric": self.metric, "direction": self.direction},
            "params": {p.key: p.spec() for p in self.params},
        }


# ---------------------------------------------------------------------------------------------
# sweep files


def resolve_sweep(name_or_path: str | Path) -> Path:
    """Map ``pdmer.synthetic.dsaml`` (a file in ``experiments/sweeps/``) or a path to a YAML file."""
    path, known = find_yaml(name_or_path, SWEEPS_DIR)
    if path is None:
        raise SweepError(
            f"unknown sweep {str(name_or_path)!r}; known: {', '.join(known) or '(none)'} (in {SWEEPS_DIR})"
        )
    return path


def load_sweep(name_or_path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read a sweep file strictly and check it against the experiment's config, before any training.

    Args:
        name_or_path: a file stem in ``experiments/sweeps/`` or a path to a YAML file.
        overrides: dotted ``key=value`` overrides applied to the base experiment of every trial.

    Returns:
        Sweep: the parsed sweep.

    Raises:
        SweepError: an unknown key in the file, a parameter that is not in the config or whose
            range the config refuses, an objective that is not a logged validation metric, a bad
            sampler or pruner option; every message names the key.
    """
    path = resolve_sweep(name_or_path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{where}: a sweep file is a mapping with keys {sorted(_field_names(SweepFile))}")
    if not isinstance(raw.get("objective", {}), dict):
        raise SweepError(f"{where}: objective must be a mapping with keys metric, direction")
    if "params" in raw and (not isinstance(raw["params"], dict) or not raw["params"]):
        raise SweepError(f"{where}: params must be a non-empty mapping of config keys to their search spaces")
    node = _validated(SweepFile, raw, where)
    for key in ("experiment", "objective", "params"):
        if OmegaConf.is_missing(node, key):
            raise SweepError(f"{where}: missing key {key!r}")
    if node.objective.direction not in ("maximize", "minimize"):
        raise SweepError(f"{where}: objective.direction={node.objective.direction!r} must be maximize or minimize")
    if node.trials < 1:
        raise SweepError(f"{where}: trials={node.trials!r} must be an integer >= 1")
    sampler = _component(_plain(node.sampler), "sampler", {"name": "tpe", "seed": 0}, where)
    pruner = _component(_plain(node.pruner), "pruner", {"name": "median"}, where)
    params = [_parse_param(str(k), v, where) for k, v in _plain(node.params).items()]
    if not any(p.searched for p in params):
        raise SweepError(f"{where}: no parameter is searched (every one is fixed)")
    sweep = Sweep(
        path=path,
        name=path.stem,
        experiment=node.experiment,
        trials=node.trials,
        metric=str(node.objective.metric),
        direction=node.objective.direction,
        sampler=sampler,
        pruner=pruner,
        params=params,
        overrides=list(overrides or []),
        description=str(node.description),
    )
    check_sweep(sweep)
    return sweep


def _validated(schema: type, data: dict, where: str, prefix: str = "") -> DictConfig:
    """``data`` merged onto the structured ``schema``: an unknown key or a wrong type is a SweepError naming it."""
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(data))
    except ConfigKeyError as e:
        inner = e.full_key.rsplit(".", 1)[0] + "." if "." in e.full_key else ""
        allowed = ", ".join(sorted(_field_names(e.object_type))) if isinstance(e.object_type, type) else "(none)"
        raise SweepError(f"{where}: unknown key {prefix}{inner}{e.key!r}; allowed: {allowed}") from None
    except OmegaConfBaseException as e:
        msg = str(e.msg or e).splitlines()[0]
        raise SweepError(f"{where}: {prefix}{e.full_key}: {msg}") from None


def _field_names(schema: type) -> set[str]:
    return {f.name for f in fields(schema)} if hasattr(schema, "__dataclass_fields__") else set()


def _plain(node: Any) -> Any:
    """An OmegaConf node (or None) as plain Python dicts and lists."""
    return None if node is None else OmegaConf.to_container(node)


def check_sweep(sweep: Sweep) -> ExperimentConfig:
    """Every check that needs the experiment's config; returns the base config with the fixed values.

    The result is kept on the sweep (``Sweep.base``): checking again returns it.
    """
    if sweep.base is not None:
        return sweep.base
    where = str(sweep.path)
    searched = {p.key for p in sweep.searched}
    overridden = {ov.split("=", 1)[0] for ov in sweep.overrides}
    for ov in sweep.overrides:
        if ov.split("=", 1)[0] in searched:
            raise SweepError(
                f"override {ov!r}: {ov.split('=', 1)[0]} is searched by the sweep ({where}); change its range there"
            )
    try:
        base = load_config(sweep.experiment, list(sweep.overrides))
    except ConfigError as e:
        raise SweepError(f"{where}: base experiment: {e}") from None
    structured = OmegaConf.structured(base)
    for p in sweep.params:
        if p.key == "name" or p.key.startswith("runtime."):
            raise SweepError(f"{where}: params.{p.key}: name and runtime.* do not change results and cannot be swept")
        if OmegaConf.select(structured, p.key, default=_ABSENT) is _ABSENT:
            raise SweepError(
                f"{where}: params.{p.key}: the key {p.key!r} is not in the config of experiment {sweep.experiment!r}"
            )
        if not isinstance(_get(base, p.key), (int, float, str, bool, type(None))):
            raise SweepError(f"{where}: params.{p.key} is a config group, not a value")
        if not p.searched and (p.from_base or p.key in overridden):  # the command line wins over the file
            p.value, p.from_base = _get(base, p.key), p.from_base and p.key not in overridden
    # every bound and choice must be accepted by the config: all lows at once, all highs, then the
    # other choices; a refused set is retried one parameter at a time to name the culprit
    n = max([len(p.choices) for p in sweep.searched if p.type == "categorical"] + [2])
    sets = [
        {
            p.key: p.choices[min(i, len(p.choices) - 1)] if p.type == "categorical" else (p.low if i == 0 else p.high)
            for p in sweep.searched
        }
        for i in range(n)
    ]
    try:
        base = sweep.config()
    except ConfigError:
        for p in sweep.fixed:
            try:
                load_config(sweep.experiment, list(sweep.overrides) + [f"{p.key}={_fmt(p.value)}"])
            except ConfigError as e:
                raise SweepError(f"{where}: params.{p.key}: the fixed value {p.value!r} is refused: {e}") from None
        raise
    for values in sets:
        try:
            sweep.config(values)
        except ConfigError as e_all:
            for key, v in values.items():
                try:
                    sweep.config({key: v})
                except ConfigError as e:
                    raise SweepError(f"{where}: params.{key}: the value {v!r} is refused: {e}") from None
            raise SweepError(f"{where}: params: the values {values} together are refused: {e_all}") from None
    check_objective(sweep.metric, base, where)
    if base.train.eval_every >= base.train.iterations:
        log.warning(
            "train.eval_every=%d >= train.iterations=%d: each trial validates only at its end, so nothing "
            "can be pruned",
            base.train.eval_every,
            base.train.iterations,
        )
    sweep.base = base
    return base


def check_objective(metric: Any, cfg: ExperimentConfig, where: str = "sweep") -> None:
    """The objective must be a validation metric that training logs for this data."""
    known = [f"val/{c}_{m}" for c in CONDITIONS for m in METRICS]
    if not isinstance(metric, str) or not metric:
        raise SweepError(f"{where}: objective.metric is missing; one of: {', '.join(known)}")
    if metric.startswith("test/") or metric.startswith("test_"):
        raise SweepError(
            f"{where}: objective.metric={metric!r} is a test metric: test listeners are scored once, at "
            f"the end, and must never choose hyperparameters; use the validation metric "
            f"{'val/' + metric.split('/', 1)[-1]!r}"
        )
    if metric not in known:
        raise SweepError(f"{where}: objective.metric={metric!r} is never logged; one of: {', '.join(known)}")
    cond, _ = _split_metric(metric)
    if cond in MISSING_CONDITIONS.get(cfg.data.source, ()):
        raise SweepError(
            f"{where}: objective.metric={metric!r} is never logged for data.source={cfg.data.source} "
            f"(it has no {cond} curves)"
        )


def _split_metric(metric: str) -> tuple[str, str]:
    body = metric.split("/", 1)[1]
    for c in CONDITIONS:
        if body.startswith(c + "_"):
            return c, body[len(c) + 1 :]
    raise SweepError(f"objective.metric={metric!r} is not val/<condition>_<metric>")


def _parse_param(key: str, spec: Any, where: str) -> Param:
    """One entry of ``params``, checked against the schema of its role and type (``PARAM_FILES``)."""
    at = f"{where}: params.{key}"
    if not isinstance(spec, dict):
        raise SweepError(f"{at}: expected a mapping with role and type (or role: fixed and value)")
    role = spec.get("role")
    if role not in ROLES:
        raise SweepError(f"{at}: role={role!r} must be one of {ROLES} (the tuning playbook's labels)")
    typ = "fixed" if role == "fixed" else spec.get("type")
    if typ not in TYPES and typ != "fixed":
        raise SweepError(f"{at}: type={typ!r} must be one of {TYPES}")
    node = _validated(PARAM_FILES[typ], spec, where, f"params.{key}.")
    if role == "fixed":
        from_base = OmegaConf.is_missing(node, "value")
        return Param(key, role, value=None if from_base else _plain(node)["value"], from_base=from_base)
    for name in ("low", "high") if typ != "categorical" else ():
        if OmegaConf.is_missing(node, name):
            raise SweepError(f"{at}.{name}: expected a number, got None")
    if typ == "categorical":
        choices = [] if OmegaConf.is_missing(node, "choices") else _plain(node.choices)
        if not choices:
            raise SweepError(f"{at}: choices must be a non-empty list")
        for c in choices:
            if not isinstance(c, (int, float, str, bool)) and c is not None:
                raise SweepError(f"{at}: choice {c!r} is not a number, string, boolean or null")
        return Param(key, role, typ, choices=choices)
    num = int if typ == "int" else float
    low, high = (_number(node[b], num, f"{at}.{b}") for b in ("low", "high"))
    step = _number(node.step, num, f"{at}.step") if node.get("step") is not None else None
    if not low < high:
        raise SweepError(f"{at}: low={low} must be below high={high}")
    if typ == "log_float" and low <= 0:
        raise SweepError(f"{at}: a log_float range needs low > 0 (got {low})")
    if step is not None and step <= 0:
        raise SweepError(f"{at}: step must be > 0")
    return Param(key, role, typ, low=low, high=high, step=step)


def _number(x: float, num: type, at: str) -> float | int:
    """A range's number (already a float: the schema read it) as ``num``: finite, and integral for an int range."""
    if not math.isfinite(x):
        raise SweepError(f"{at}: expected a finite number, got {x!r}")
    if num is int:
        if x != int(x):
            raise SweepError(f"{at}: expected an integer, got {x!r}")
        return int(x)
    return x


def _no_unknown(d: dict, allowed: set, where: str, prefix: str) -> None:
    for k in d:
        if k not in allowed:
            raise SweepError(f"{where}: unknown key {prefix}{k!r}; allowed: {', '.join(sorted(allowed))}")


# samplers and pruners: a name + the optuna class's own keyword arguments (checked by name)
SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}


def _component(spec: Any, kind: str, default: dict, where: str) -> dict:
    spec = dict(default) if spec is None else spec
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: {kind} must be a mapping with a name and options")
    spec = {**{"name": default["name"]}, **spec}
    if kind == "sampler":
        spec.setdefault("seed", default.get("seed"))
    classes = SAMPLERS if kind == "sampler" else PRUNERS
    name = spec["name"]
    if name not in classes:
        raise SweepError(f"{where}: {kind}.name={name!r} must be one of {', '.join(classes)}")
    allowed = {
        n
        for n, p in inspect.signature(classes[name]).parameters.items()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in ("gamma", "weights", "constraints_func")
    }
    _no_unknown({k: v for k, v in spec.items() if k != "name"}, allowed, where, f"{kind}.")
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        _build(classes[name], kwargs)
    except (TypeError, ValueError) as e:
        raise SweepError(f"{where}: {kind} {name}: {e}") from None
    return spec


def _build(cls, kwargs: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for some options
        return cls(**kwargs)


def make_sampler(spec: dict):
    """The sampler of a sweep, re-seeded per trial from (seed, trial number)."""
    cls = SAMPLERS[spec["name"]]
    kwargs = {k: v for k, v in spec.items() if k not in ("name", "seed")}
    return _PerTrialSeeded(lambda seed: _build(cls, {**kwargs, "seed": seed}), spec.get("seed"))


def make_pruner(spec: dict):
    return _build(PRUNERS[spec["name"]], {k: v for k, v in spec.items() if k != "name"})


class _PerTrialSeeded(optuna.samplers.BaseSampler):
    """Delegates each trial to a fresh sampler seeded from (seed, trial number).

    TPE and random sampling keep no state besides their random generator (they read the history
    from the study), so a sweep stays reproducible per trial number while processes that resume
    or share a study never replay each other's random draws.
    """

    def __init__(self, make, seed: int | None):
        self._make, self._seed, self._by_trial = make, seed, {}

    def _for(self, number: int):
        if number not in self._by_trial:
            seed = (
                None
                if self._seed is None
                else int(np.random.SeedSequence([int(self._seed), number]).generate_state(1)[0])
            )
            self._by_trial[number] = self._make(seed)
        return self._by_trial[number]

    def infer_relative_search_space(self, study, trial):
        return self._for(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._for(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._for(trial.number).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self._for(trial.number).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self._for(trial.number).after_trial(study, trial, state, values)
        self._by_trial.pop(trial.number, None)

    def reseed_rng(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# storage


def sweep_dir_for(base: ExperimentConfig, study: str) -> Path:
    """``<runtime.out_dir>/sweeps/<study>/``."""
    out = Path(base.runtime.out_dir)
    if not out.is_absolute():
        out = REPO / out
    return out / "sweeps" / study


def masked(url: str) -> str:
    """The URL without its password (for messages and summaries)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL sqlalchemy cannot parse is shown as the user gave it
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int = GRACE_S):
    """An optuna RDB storage with heartbeats; any failure is a SweepError naming the URL.

    Connecting (and creating optuna's tables) happens here, so an unreachable server, a wrong
    password or a missing driver stop the sweep before any training.
    """
    import sqlalchemy.exc

    kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("postgresql") or url.startswith("mysql"):
        kwargs["connect_args"] = {"connect_timeout": 10}
    elif url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # several processes on one SQLite file wait for its lock
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat options are marked experimental
            return optuna.storages.RDBStorage(
                url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s, grace_period=grace_s
            )
    except ModuleNotFoundError as e:
        hint = " (PostgreSQL: pip install psycopg2-binary)" if "psycopg" in str(e) else ""
        raise SweepError(
            f"cannot open the sweep storage {masked(url)}: its database driver is not installed: {e}{hint}"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, OSError) as e:
        first = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise SweepError(
            f"cannot open the sweep storage {masked(url)}: {first[0] if first else type(e).__name__}"
        ) from None


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class SweepResult:
    """What ``run_sweep`` did."""

    study_name: str
    sweep_dir: Path
    storage: str  # masked URL
    requested: int
    counts: dict[str, int]  # trials by state (complete, pruned, fail, running, waiting)
    ran: list[int]  # trial numbers this process finished
    summary: dict


def run_sweep(
    sweep: Sweep | str | Path,
    trials: int | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    overrides: list[str] | None = None,
) -> SweepResult:
    """Run (or continue) a sweep until its study has ``trials`` finished trials, then summarize it.

    Args:
        sweep: a parsed Sweep, or a sweep file name / path (then ``overrides`` apply).
        trials: finished (complete + pruned) trials the study should have; default: the file's.
        storage: an optuna RDB URL; default: SQLite ``<sweep dir>/study.db``.
        study_name: default: the sweep file's name.

    Returns:
        SweepResult: the sweep folder, trial counts, the trials this process ran and the summary.

    Raises:
        SweepError: bad sweep file, objective or storage (before any training), or a study of the
            same name that was started with another search space or objective.
    """
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep, overrides)
    base = check_sweep(sweep)
    requested = sweep.trials if trials is None else trials
    if requested < 1:
        raise SweepError(f"--trials {requested}: must be >= 1")
    name = study_name or sweep.name
    if not _STUDY_NAME.match(name):
        raise SweepError(f"study name {name!r}: letters, digits, '.', '_' and '-' only (it names a folder)")
    sweep_dir = sweep_dir_for(base, name)
    if storage is None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    rdb = open_storage(url)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        study = optuna.create_study(
            storage=rdb,
            study_name=name,
            direction=sweep.direction,
            load_if_exists=True,
            sampler=make_sampler(sweep.sampler),
            pruner=make_pruner(sweep.pruner),
        )
    except Exception as e:  # noqa: BLE001 - e.g. an existing study with the other direction
        raise SweepError(f"study {name!r} in {masked(url)}: {e}") from None
    _check_same_study(study, sweep, base, masked(url))
    atomic_write_text(sweep_dir / "sweep.yaml", sweep.path.read_text())
    log.info("sweep %s: %d finished trials wanted, storage %s, folder %s", name, requested, masked(url), sweep_dir)

    runner = _TrialRunner(sweep, study, requested, sweep_dir)
    waiting_logged = False
    while True:
        _fail_orphans(study, rdb)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)  # other machines' trials without a heartbeat
        states = _counts(study)
        done = states["complete"] + states["pruned"]
        if done >= requested:
            break
        if done + states["running"] >= requested:  # the rest is running in other processes
            if not waiting_logged:
                log.info(
                    "%d of %d trials finished, %d running in other processes: waiting for them",
                    done,
                    requested,
                    states["running"],
                )
                waiting_logged = True
            time.sleep(POLL_S)
            continue
        waiting_logged = False
        study.optimize(runner, n_trials=1, catch=(_QuotaFull,))
    summary = write_summary(study, sweep, sweep_dir, requested, masked(url), base)
    return SweepResult(name, sweep_dir, masked(url), requested, _counts(study), runner.ran, summary)


def _check_same_study(study, sweep: Sweep, base: ExperimentConfig, where: str) -> None:
    mine = json.loads(json.dumps(sweep.definition(), default=str))
    theirs = study.user_attrs.get("sweep")
    if theirs is None:
        study.set_user_attr("sweep", mine)
        study.set_user_attr("base_config_hash", config_hash(base))
        return
    for part in ("experiment", "objective", "params"):
        if theirs.get(part) != mine.get(part):
            raise SweepError(
                f"study {study.study_name!r} in {where} was started with another {part}: "
                f"{json.dumps(theirs.get(part))} (now {json.dumps(mine.get(part))}); "
                f"give this sweep another name with --study NAME"
            )
    if study.user_attrs.get("base_config_hash") != config_hash(base):
        log.warning(
            "study %s was started from a base config with hash %s, this one has %s (other overrides or data paths?)",
            study.study_name,
            study.user_attrs.get("base_config_hash"),
            config_hash(base),
        )


def _counts(study) -> dict[str, int]:
    out = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    return out


def _process_token(pid: int | None = None) -> str:
    """``pid:start time`` (Linux /proc), so a recycled pid is not taken for the old process."""
    pid = os.getpid() if pid is None else pid
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid}:{stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        return f"{pid}:"


def _alive(token: str) -> bool:
    pid_text = token.split(":", 1)[0]
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # this process runs no trial while it looks for orphans
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    return _process_token(pid) == token or token.endswith(":")


def _fail_orphans(study, storage) -> None:
    """Mark FAIL the trials left RUNNING by dead processes (see the module docstring)."""
    host = platform.node()
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = t.user_attrs.get("process")
        if owner is not None and t.user_attrs.get("host") == host:
            if _alive(owner):
                continue
            why = f"interrupted: process {owner.split(':')[0]} on {host} ended while the trial was running"
        elif owner is None and t.datetime_start is not None and now - t.datetime_start.timestamp() > GRACE_S:
            why = "interrupted: the process that started it ended before it began training"
        else:
            continue  # another machine's trial: its heartbeat decides (optuna.storages.fail_stale_trials)
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", why + "; marked FAIL on restart, not counted")
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        except Exception as e:  # noqa: BLE001 - another process marked it first
            log.debug("trial %d: %s", t.number, e)
            continue
        log.warning("trial %d: %s; marked FAIL (not counted, a new trial replaces it)", t.number, why)
        run = t.user_attrs.get("run_dir")
        if run and Path(run).is_dir() and not (Path(run) / "results.json").exists():
            _write_stopped(Path(run), "interrupted", why)


def _write_stopped(run: Path, reason: str, message: str, **extra) -> None:
    atomic_write_text(
        run / "stopped.json", json.dumps({"reason": reason, "message": message, **extra}, indent=2, default=float)
    )


class _TrialRunner:
    """The optuna objective: one trial = one training run with its own run folder."""

    def __init__(self, sweep: Sweep, study, requested: int, sweep_dir: Path):
        self.sweep, self.study, self.requested, self.sweep_dir = sweep, study, requested, sweep_dir
        self.base_name = check_sweep(sweep).name
        self.ran: list[int] = []

    def __call__(self, trial) -> float:
        from pdmer.runs import run_dir_for
        from pdmer.training import train

        trial.set_user_attr("host", platform.node())
        trial.set_user_attr("process", _process_token())
        self._claim(trial)
        values = {p.key: p.suggest(trial) for p in self.sweep.searched}
        name = f"{self.base_name}.trial{trial.number:04d}"
        cfg = self.sweep.config(values, [f"name={name}", f"runtime.out_dir={self.sweep_dir / 'trials'}"])
        run = run_dir_for(cfg)
        trial.set_user_attr("run_dir", str(run))
        trial.set_user_attr("config_hash", config_hash(cfg))
        cond, metric = self.sweep.condition_metric
        sign = 1.0 if self.sweep.direction == "maximize" else -1.0
        best: dict = {"value": None, "iteration": None}

        def on_validate(it: int, summary: dict) -> None:
            if cond not in summary:
                raise SweepError(
                    f"the objective {self.sweep.metric} is never logged for this data: validation "
                    f"scores only {', '.join(summary)}"
                )
            value = float(summary[cond][metric])
            trial.report(value, it)
            if math.isfinite(value) and (best["value"] is None or sign * value > sign * best["value"]):
                best.update(value=value, iteration=it)
            if it < cfg.train.iterations and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at iteration {it}: {self.sweep.metric} = {value:.4f}")

        hparams = {k: _hparam(v) for k, v in {**values, **{p.key: p.value for p in self.sweep.fixed}}.items()}
        log.info("trial %d: %s", trial.number, ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
        try:
            train(cfg, on_validate=on_validate, hparams=hparams)
        except optuna.TrialPruned as e:
            trial.set_user_attr("stopped_at", best["iteration"])
            log.info("trial %d: %s", trial.number, e)
            self.ran.append(trial.number)
            raise
        except FloatingPointError as e:  # diverged: a (bad) result, not a crash; ranked like a pruned trial
            _write_stopped(run, "diverged", str(e))
            trial.set_user_attr("diverged", str(e))
            log.info("trial %d diverged: %s", trial.number, e)
            self.ran.append(trial.number)
            raise optuna.TrialPruned(f"diverged: {e}") from None
        except (Exception, KeyboardInterrupt) as e:  # optuna marks the trial FAIL and re-raises
            why = "interrupted (KeyboardInterrupt)" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            trial.set_user_attr("fail_reason", why[:1000])
            if run.is_dir() and not (run / "stopped.json").exists():
                _write_stopped(run, type(e).__name__, why)
            raise
        self.ran.append(trial.number)
        if best["value"] is None:  # NaN at every validation: ranked like a diverged trial
            trial.set_user_attr("diverged", f"{self.sweep.metric} was never finite")
            raise optuna.TrialPruned(f"{self.sweep.metric} was never finite")
        trial.set_user_attr("best_iteration", best["iteration"])
        log.info(
            "trial %d: %s = %.4f (best validation, iteration %d), run %s",
            trial.number,
            self.sweep.metric,
            best["value"],
            best["iteration"],
            run,
        )
        return best["value"]

    def _claim(self, trial) -> None:
        """Fail fast (before sampling) when other processes already hold the remaining slots."""
        S = optuna.trial.TrialState
        others = self.study.get_trials(deepcopy=False, states=(S.COMPLETE, S.PRUNED, S.RUNNING))
        done = sum(t.state != S.RUNNING for t in others)
        ahead = sum(t.state == S.RUNNING and t.number < trial.number for t in others)
        if done + ahead >= self.requested:
            trial.set_user_attr(
                "fail_reason",
                f"not run: the {self.requested} requested trials were already finished or running in other processes",
            )
            raise _QuotaFull(f"trial {trial.number} not run: {self.requested} trials finished or running")


def _hparam(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) else str(v)


def _fmt(v: Any) -> str:
    """A value as an override string (``key=<this>``)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _short(v: Any) -> str:
    """A value for a table: floats to 4 significant digits."""
    return f"{v:.4g}" if isinstance(v, float) else _fmt(v)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ---------------------------------------------------------------------------------------------
# summary


def write_summary(study, sweep: Sweep, sweep_dir: Path, requested: int, storage: str, base: ExperimentConfig) -> dict:
    """``summary.json``, ``summary.md``, the plots and ``best.yaml`` in the sweep folder.

    Written by whichever process finishes; every file is replaced atomically.
    """
    S = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == S.COMPLETE]
    summary: dict = {
        "study": study.study_name,
        "sweep_file": str(sweep.path),
        "experiment": sweep.experiment,
        "overrides": sweep.overrides,
        "storage": storage,
        "objective": {
            "metric": sweep.metric,
            "direction": sweep.direction,
            "value": "the best validation value each trial reached",
        },
        "sampler": sweep.sampler,
        "pruner": sweep.pruner,
        "requested": requested,
        "counts": _counts(study),
        "params": {p.key: p.spec() for p in sweep.params},
        "best": None,
        "importances": None,
        "plots": {},
        "trials": [_trial_record(t) for t in trials],
    }
    if complete:
        bt = study.best_trial
        best_yaml = sweep_dir / "best.yaml"
        summary["best"] = {
            "trial": bt.number,
            "value": bt.value,
            "params": bt.params,
            "run_dir": bt.user_attrs.get("run_dir"),
            "best_iteration": bt.user_attrs.get("best_iteration"),
            "config": str(best_yaml),
        }
        write_best_config(sweep, bt, best_yaml, study.study_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study)
        summary["importances"] = {k: float(v) for k, v in imp.items()}
    except Exception as e:  # noqa: BLE001 - e.g. fewer than two complete trials
        summary["importances_note"] = f"not computed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    summary["plots"] = _plots(study, sweep, sweep_dir)
    atomic_write_text(sweep_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    atomic_write_text(sweep_dir / "summary.md", _summary_md(summary, sweep))
    return summary


def _trial_record(t) -> dict:
    rec = {
        "number": t.number,
        "state": t.state.name,
        "value": t.value,
        "params": t.params,
        "last_step": t.last_step,
        "run_dir": t.user_attrs.get("run_dir"),
    }
    for k in ("fail_reason", "diverged", "stopped_at", "best_iteration", "host"):
        if k in t.user_attrs:
            rec[k] = t.user_attrs[k]
    if t.datetime_start and t.datetime_complete:
        rec["seconds"] = round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
    return rec


def write_best_config(sweep: Sweep, trial, path: Path, study_name: str) -> ExperimentConfig:
    """The best trial's full configuration as an experiment YAML (``run.py train best.yaml``)."""
    cfg = sweep.config(trial.params, [f"name={study_name}.best"])
    head = (
        f"# Best configuration of sweep {study_name}: trial {trial.number}, {sweep.metric} = {trial.value:.4f} "
        f"({sweep.direction}, best validation value)\n"
        f"# sweep file: {sweep.path}; base experiment: {sweep.experiment}\n"
        + "".join(f"# {p.key} ({p.role}): {_fmt(trial.params[p.key])}\n" for p in sweep.searched)
        + f"# run it: python run.py train {path}\n"
    )
    atomic_write_text(path, head + to_yaml(cfg))
    return cfg


def _plots(study, sweep: Sweep, sweep_dir: Path) -> dict:
    """PNG plots (optuna.visualization.matplotlib); a plot that cannot be drawn is noted, not fatal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    keys = [p.key for p in sweep.searched]
    jobs = {
        "optimization_history.png": lambda: vis.plot_optimization_history(study, target_name=sweep.metric),
        "parallel_coordinate.png": lambda: vis.plot_parallel_coordinate(study, params=keys, target_name=sweep.metric),
        "intermediate_values.png": lambda: vis.plot_intermediate_values(study),
        "param_importances.png": lambda: vis.plot_param_importances(study, target_name=sweep.metric),
    }
    out = {}
    for fname, draw in jobs.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = draw()
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            try:
                atomic_write(
                    sweep_dir / fname,
                    lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"),
                )
            finally:
                plt.close(fig)
            out[fname] = "written"
        except Exception as e:  # noqa: BLE001
            plt.close("all")
            (sweep_dir / fname).unlink(missing_ok=True)
            out[fname] = f"not drawn: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return out


def _summary_md(s: dict, sweep: Sweep) -> str:
    c = s["counts"]
    lines = [
        f"# Sweep {s['study']}",
        "",
        f"- sweep file: `{s['sweep_file']}`; base experiment `{s['experiment']}`"
        + (f", overrides `{' '.join(s['overrides'])}`" if s["overrides"] else ""),
        f"- objective: {s['objective']['direction']} `{s['objective']['metric']}` (each trial's best validation value)",
        f"- sampler: {_comp(s['sampler'])}; pruner: {_comp(s['pruner'])}",
        f"- storage: `{s['storage']}`",
        f"- trials: {c['complete'] + c['pruned']} of {s['requested']} finished ({c['complete']} complete, "
        f"{c['pruned']} pruned); {c['fail']} failed (not counted), {c['running']} running",
        "",
    ]
    lines += ["## Search space", "", "| parameter | role | range | best |", "|---|---|---|---|"]
    best = s["best"]
    for p in sweep.params:
        val = (
            _short(best["params"][p.key])
            if best and p.key in best["params"]
            else ("" if p.searched else _short(p.value))
        )
        lines.append(f"| `{p.key}` | {p.role} | {p.range_text()} | {val} |")
    lines.append("")
    if best:
        lines += [
            "## Best trial",
            "",
            f"Trial {best['trial']}: `{s['objective']['metric']}` = {best['value']:.4f} at iteration "
            f"{best['best_iteration']}, run folder `{best['run_dir']}`.",
            "",
            f"Best configuration: `{best['config']}` (`python run.py train {best['config']}`).",
            "",
        ]
    else:
        lines += ["## Best trial", "", "No trial has completed yet.", ""]
    lines += ["## Parameter importances", ""]
    if s["importances"]:
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| `{k}` | {v:.3f} |" for k, v in s["importances"].items()]
    else:
        lines.append(s.get("importances_note", "not computed"))
    lines += [
        "",
        "## Trials",
        "",
        "| trial | state | value | " + " | ".join(f"`{p.key}`" for p in sweep.searched) + " | last iteration | note |",
        "|" + "---|" * (len(sweep.searched) + 5),
    ]
    for t in s["trials"]:
        v = "" if t["value"] is None else f"{t['value']:.4f}"
        ps = " | ".join(_short(t["params"][p.key]) if p.key in t["params"] else "" for p in sweep.searched)
        note = t.get("fail_reason") or (f"diverged: {t['diverged']}" if "diverged" in t else "")
        last = "" if t["last_step"] is None else t["last_step"]
        lines.append(f"| {t['number']} | {t['state'].lower()} | {v} | {ps} | {last} | {note} |")
    lines += ["", "## Plots", ""]
    for fname, status in s["plots"].items():
        lines.append(f"![{fname[:-4]}]({fname})" if status == "written" else f"- {fname}: {status}")
    return "\n".join(lines) + "\n"


def _comp(spec: dict) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name")
    return f"{spec['name']}" + (f" ({opts})" if opts else "")
