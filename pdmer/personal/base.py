"""Base models: finding a finished training run and loading its best checkpoint for inference and adaptation."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pdmer import paths
from pdmer.checkpoint import load_weights, read_meta
from pdmer.config import ConfigError, ExperimentConfig, config_hash
from pdmer.features.streaming import song_features
from pdmer.io import sha256_file
from pdmer.personal.names import ProfileError, _display

log = logging.getLogger(__name__)

DEFAULT_RUNS_DIR = paths.runs_dir()


def features_hash(cfg: ExperimentConfig) -> str:
    """Hash of every feature setting that changes the model's inputs (not paths)."""
    from pdmer.features.cache import settings_key

    blob = json.dumps(
        {"settings": settings_key(cfg.features), "global_encoder": cfg.features.global_encoder}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def find_latest_run(runs_dir: str | Path | None = None) -> Path:
    """The most recently finished training run.

    A finished run has ``config.json``, ``checkpoints/best.safetensors`` and ``results.json``
    (a run still training has no ``results.json`` and is skipped).

    Args:
        runs_dir: the runs folder (None = ``<repo>/runs``).

    Returns:
        the run folder whose ``results.json`` is newest.

    Raises:
        ProfileError: no finished run.
    """
    runs = Path(runs_dir) if runs_dir is not None else DEFAULT_RUNS_DIR
    done = [
        r
        for r in (runs.iterdir() if runs.is_dir() else [])
        if (r / "results.json").is_file()
        and (r / "config.json").is_file()
        and (r / "checkpoints" / "best.safetensors").is_file()
    ]
    if not done:
        raise ProfileError(
            f"no finished training run in {runs}: train one first (`python run.py`), or pass --model RUN_DIR"
        )
    return max(done, key=lambda r: ((r / "results.json").stat().st_mtime_ns, r.name))


def _resolve_run(model: str | Path | None, runs_dir: str | Path | None) -> tuple[Path, str]:
    """(run folder, how it was chosen)."""
    if model is None:
        return find_latest_run(runs_dir), "the latest trained run"
    p = Path(model)
    if not p.is_dir():
        alt = (Path(runs_dir) if runs_dir is not None else DEFAULT_RUNS_DIR) / str(model)
        if alt.is_dir():
            p = alt
    if not (p / "config.json").is_file() or not (p / "checkpoints" / "best.safetensors").is_file():
        raise ProfileError(f"{model}: not a finished run folder (needs config.json and checkpoints/best.safetensors)")
    if not (p / "results.json").is_file():
        raise ProfileError(
            f"{model}: this run has not finished training (no results.json): {_run_activity(p)}; "
            "its checkpoint may still change. Pass a finished run, or none for the latest finished one"
        )
    return p, "given"


def _run_activity(run: Path) -> str:
    """Whether a run folder without results is being trained now (the pid in its lock file is alive) or was stopped."""
    from pdmer.runs import LOCK_FILE

    try:
        pid = int((run / LOCK_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        pid = 0
    if pid > 0:
        try:
            os.kill(pid, 0)
            return f"it is being trained by process {pid}"
        except ProcessLookupError:
            pass
        except PermissionError:  # alive, another user's
            return f"it is being trained by process {pid}"
    return "it was stopped before the end (continue it with `python run.py train ... --resume`)"


@dataclass
class BaseModel:
    """A trained run ready for inference and adaptation.

    Attributes:
        run: the run folder.
        cfg: its resolved config.
        model: the DSAML network with the best checkpoint loaded, in eval mode.
        config_hash: the run's config hash.
        features_hash: :func:`features_hash` of its feature settings.
        weights_sha256: sha256 of ``checkpoints/best.safetensors``.
        how: how the run was chosen ("given", "the latest trained run", ...).
    """

    run: Path
    cfg: ExperimentConfig
    model: torch.nn.Module
    config_hash: str
    features_hash: str
    weights_sha256: str
    how: str = "given"
    _extractor: object = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.run.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def features(self, path: str | Path):
        """Dual-scale features of an audio file (see :func:`song_features`)."""
        if self._extractor is None:
            from pdmer.features import FeatureExtractor

            self._extractor = FeatureExtractor(self.cfg.features)
        return song_features(Path(path), self._extractor)

    def synthetic_warning(self, audio: list[Path]) -> str | None:
        """A warning when this model knows only the synthetic benchmark and ``audio`` is not the benchmark's.

        The embedded benchmark's curves are generated from its own audio; a model trained on them
        alone has learned nothing about how real listeners hear real music (calibrating real VGMIDI
        listeners on it raised their RMSE). Audio inside the benchmark's data folder is fine.
        """
        if getattr(self.cfg.data, "source", None) != "synthetic":
            return None
        given = bool(self.cfg.data.root)  # else the benchmark lives in <home>/data/synthetic-<hash>
        root = Path(self.cfg.data.root) if given else Path("data")
        root = (root if root.is_absolute() else paths.home() / root).resolve()

        def benchmark(a: Path) -> bool:
            a = Path(a).resolve()
            if not a.is_relative_to(root) or a == root:
                return False
            return given or a.relative_to(root).parts[0].startswith("synthetic")

        outside = [Path(a).name for a in audio if not benchmark(a)]
        if not outside:
            return None
        return (
            f"{self.name} was trained on pdmer's synthetic benchmark only (data.source=synthetic): it knows nothing "
            f"of real music, so its curves for {', '.join(outside[:3])}{' ...' if len(outside) > 3 else ''} mean "
            "little. Train a base model on real listeners (e.g. python run.py train pdmer.vgmidi.dsaml) and pass "
            "--model RUN_DIR."
        )

    @property
    def rule(self):
        """The safe personalization weights the run chose on its validation listeners (``personalization.json``).

        A run without them (trained before the safe rule, or stopped before its test) personalizes
        nothing: the weights are 0 and the curve stays generic, said in ``chosen_on``.
        """
        from pdmer.evaluation.split import RULE_FILE
        from pdmer.personalize import Weights

        path = self.run / RULE_FILE
        if not path.is_file():
            return Weights(
                chosen_on=f"none: {_display(path)} is missing, so nothing is personalized "
                "(run `python run.py evaluate RUN_DIR` to choose the weights)"
            )
        try:
            return Weights.from_json(json.loads(path.read_text())["weights"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ProfileError(f"{path}: unreadable safe personalization weights ({e})") from None

    @property
    def response_basis(self):
        """The basis of the safe rule's response component the run fitted (``personalization.json``), or None
        (runs evaluated before it: that component stays zero, as its weights are)."""
        from pdmer.evaluation.split import RULE_FILE
        from pdmer.response import ResponseBasis

        path = self.run / RULE_FILE
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text()).get("response")
            return None if record is None else ResponseBasis.from_json(record)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProfileError(f"{path}: unreadable response basis ({e})") from None

    def describe(self) -> dict:
        return {
            "run": _display(self.run),
            "experiment": self.cfg.name,
            "config_hash": self.config_hash,
            "features_hash": self.features_hash,
            "weights_sha256": self.weights_sha256,
        }


def load_base_model(
    model: str | Path | None = None, runs_dir: str | Path | None = None, device: str | None = None
) -> BaseModel:
    """Load a finished run's best checkpoint for calibration or prediction.

    Args:
        model: run folder (or a run name under ``runs_dir``); None = the latest finished run.
        runs_dir: where to look for runs (None = ``<repo>/runs``).
        device: "cpu", "cuda", ... (None = the run's ``runtime.device``, usually ``auto``).

    Returns:
        BaseModel.

    Raises:
        ProfileError: no such run, or its checkpoint is not a safetensors file that fits its config.
    """
    from safetensors import SafetensorError

    from pdmer.checkpoint import CheckpointError
    from pdmer.models.dsaml import DSAML
    from pdmer.runs import load_run_config, resolve_device

    run, how = _resolve_run(model, runs_dir)
    cfg = load_run_config(run)
    ckpt = run / "checkpoints" / "best.safetensors"
    chash = config_hash(cfg)
    try:
        meta = read_meta(ckpt)
        g_dim = meta.get("global_dim")
        if g_dim is None:
            from pdmer.features import FeatureExtractor

            g_dim = FeatureExtractor(cfg.features).global_dim
        net = DSAML(cfg.model, int(g_dim))
        from safetensors import safe_open

        from pdmer.meta.maml import LR_PREFIX, attach_inner_lrs

        with safe_open(str(ckpt), framework="pt") as f:
            if any(k.startswith(LR_PREFIX) for k in f.keys()):  # meta-learned inner rates (meta.learn_inner_lr)
                attach_inner_lrs(net, cfg.meta.inner_lr)
        load_weights(ckpt, net, {"config_hash": chash})
    except SafetensorError as e:
        raise ProfileError(f"{ckpt}: not a safetensors checkpoint ({e})") from None
    except CheckpointError as e:
        raise ProfileError(str(e)) from None
    try:
        dev = resolve_device(device or cfg.runtime.device)
    except ConfigError:
        if device is not None:
            raise
        log.warning(
            "%s was trained with runtime.device=%s, which this machine lacks: using %s",
            run.name,
            cfg.runtime.device,
            resolve_device("auto"),
        )
        dev = resolve_device("auto")
    net = net.to(dev).eval()
    return BaseModel(run, cfg, net, chash, features_hash(cfg), sha256_file(ckpt), how)
