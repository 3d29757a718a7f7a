"""Profiles on disk (:mod:`pdmer.store`: lock, manifest, atomic install, recovery): read, checked, serialised."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pdmer import store
from pdmer.personal.base import BaseModel
from pdmer.personal.names import (
    FIT_FILE,
    PROFILE_FILE,
    PROFILE_FORMAT,
    PROFILE_VERSION,
    RATINGS_FILE,
    WEIGHTS_FILE,
    ProfileError,
    _display,
    _root,
    profile_dir,
)

log = logging.getLogger(__name__)


@dataclass
class Profile:
    """A calibrated listener.

    Attributes:
        name: the listener name.
        path: the profile folder.
        info: the content of ``profile.json``.
        params: adapted parameters, name -> tensor (a subset of the base model's parameters).
    """

    name: str
    path: Path
    info: dict
    params: dict[str, torch.Tensor]

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def fit_png(self) -> Path:
        return self.path / FIT_FILE

    @property
    def files(self) -> list[Path]:
        return [
            self.path / f
            for f in (PROFILE_FILE, WEIGHTS_FILE, RATINGS_FILE, FIT_FILE, store.MANIFEST)
            if (self.path / f).exists()
        ]


def _weights_bytes(params: dict[str, torch.Tensor], meta: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in params.items()}, metadata={"pdmer": json.dumps(meta)})


def _json_default(o):
    return str(o) if isinstance(o, Path) else float(o)


def _finite_json(o):
    """``o`` with every non-finite float replaced by None, so that the JSON written is valid (no ``Infinity``)."""
    if isinstance(o, dict):
        return {k: _finite_json(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite_json(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return float(o) if np.isfinite(o) else None
    return o


def _json_bytes(info: dict) -> bytes:
    return json.dumps(_finite_json(info), indent=2, default=_json_default, allow_nan=False).encode()


def _legacy_complete(folder: Path) -> str | None:
    """Completeness of a profile written before manifests: profile.json readable and its files there."""
    try:
        info = json.loads((folder / PROFILE_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"{folder / PROFILE_FILE}: unreadable ({e})"
    if not isinstance(info, dict) or info.get("format") != PROFILE_FORMAT:
        return f"{folder / PROFILE_FILE}: not a pdmer profile"
    for f in (WEIGHTS_FILE, RATINGS_FILE, (info.get("files") or {}).get("plot")):
        if f and not (folder / f).is_file():
            return f"{folder / f}: missing"
    return None


def _busy(e: store.StoreBusyError, name: str) -> ProfileError:
    return ProfileError(f"{e.strerror}: another calibration of {name!r} is running; nothing was changed")


def _settle(root: Path, name: str) -> None:
    """Before reading a profile: repair a crashed write of it (if no one is writing it now)."""
    dest = root / name
    if not store.leftovers(root, name):  # nothing a crash left: nothing to restore or delete
        return
    try:
        with store.locked(root, name):
            store.repair(root, name, _legacy_complete)
    except store.StoreBusyError:  # being calibrated: the swap of folders takes an instant
        deadline = time.monotonic() + 2.0
        while store.check_complete(dest, _legacy_complete) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
    except OSError as e:  # a read-only folder: read what is there
        log.warning("%s: cannot repair (%s)", dest, e)


def _read_profile_weights(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Header metadata and tensors of a profile's weights, with safetensors only."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ProfileError(f"{path}: weights file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    kind = ""
    if head.startswith(b"PK\x03\x04"):
        kind = " (it looks like a torch.save zip archive, which holds a pickle)"
    elif head[:1] == b"\x80":
        kind = " (it looks like a pickle)"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("pdmer", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ProfileError(
            f"{path}: refused, not a safetensors file{kind}: {e}. Profiles are read with safetensors only "
            "and never unpickled, since a pickle can run code when loaded."
        ) from None
    return meta, tensors


def load_profile(name: str, annotators_dir: str | Path | None = None, base: BaseModel | None = None) -> Profile:
    """Read a profile; with ``base``, check that it was calibrated on that model.

    Args:
        name: the listener name.
        annotators_dir: where profiles live (None = ``<repo>/annotators``).
        base: the model to use it with (see :func:`check_compatible`).

    Returns:
        Profile.

    Raises:
        ProfileError: bad name, missing, incomplete (its manifest does not verify) or malformed
            profile, a weights file that is not safetensors (never unpickled) or that holds
            NaN / infinite values, or a base-model mismatch.
    """
    path = profile_dir(name, annotators_dir)
    _settle(path.parent, name)
    pj = path / PROFILE_FILE
    if not pj.is_file():
        known = (
            sorted(p.name for p in _root(annotators_dir).iterdir() if (p / PROFILE_FILE).is_file())
            if _root(annotators_dir).is_dir()
            else []
        )
        raise ProfileError(
            f"no profile {name!r}: {pj} not found (profiles here: {', '.join(known) or 'none'}); "
            f"create one with `python run.py calibrate --name {name} ...`"
        )

    def no_constants(c):
        raise ValueError(f"{c} is not a JSON number (a diverged calibration?)")

    try:
        info = json.loads(pj.read_text(), parse_constant=no_constants)
    except ValueError as e:
        raise ProfileError(f"{pj}: not valid JSON ({e}); calibrate {name!r} again") from None
    if info.get("format") != PROFILE_FORMAT or not isinstance(info.get("base"), dict):
        raise ProfileError(f"{pj}: not a pdmer profile (format {info.get('format')!r})")
    if info.get("version", 0) > PROFILE_VERSION:
        raise ProfileError(
            f"{pj}: profile version {info.get('version')} is newer than this pdmer reads ({PROFILE_VERSION})"
        )
    meta, params = _read_profile_weights(path / WEIGHTS_FILE)
    for k in ("config_hash", "features_hash", "weights_sha256"):
        if meta.get(f"base_{k}") != info["base"].get(k):
            raise ProfileError(
                f"{path}: profile.json and {WEIGHTS_FILE} disagree on the base model's {k} "
                f"({info['base'].get(k)!r} vs {meta.get(f'base_{k}')!r}); calibrate again"
            )
    incomplete = store.check_complete(path, _legacy_complete)
    if incomplete is not None:
        raise ProfileError(
            f"profile {name!r} is incomplete or was changed after calibration ({incomplete}); calibrate {name!r} again"
        )
    for k, v in params.items():
        if not bool(torch.isfinite(v).all()):
            raise ProfileError(
                f"{path / WEIGHTS_FILE}: tensor {k!r} holds {int((~torch.isfinite(v)).sum())} NaN or "
                f"infinite value(s): this profile is unusable (its calibration diverged); calibrate "
                f"{name!r} again, with a lower --inner-lr"
            )
    if info.get("name") not in (None, name):  # a copied folder: its name is the folder's, not the one inside
        log.warning("%s: profile.json names %r; the profile is %r (its folder)", pj, info.get("name"), name)
    profile = Profile(name, path, info, params)
    if base is not None:
        check_compatible(profile, base)
    return profile


def check_compatible(profile: Profile, base: BaseModel) -> None:
    """Refuse a profile calibrated on another base model or feature configuration.

    Raises:
        ProfileError: naming both models (run, config hash, feature hash, checkpoint sha256).
    """
    had = profile.info["base"]
    now = base.describe()
    checks = [
        ("features_hash", "feature configuration"),
        ("config_hash", "model config"),
        ("weights_sha256", "checkpoint"),
    ]
    bad = [what for key, what in checks if had.get(key) != now[key]]
    if bad:
        songs = " ".join(f"--audio {s['audio']}" for s in profile.info.get("songs", []))
        raise ProfileError(
            f"profile {profile.name!r} ({profile.path}) was calibrated on a different base model ({', '.join(bad)} differ):\n"
            f"  profile: {had.get('run')} (config {had.get('config_hash')}, features {had.get('features_hash')}, "
            f"checkpoint sha256 {str(had.get('weights_sha256'))[:12]})\n"
            f"  model:   {now['run']} (config {now['config_hash']}, features {now['features_hash']}, "
            f"checkpoint sha256 {now['weights_sha256'][:12]})\n"
            f"calibrate again on this model: python run.py calibrate --name {profile.name} {songs} "
            f"--ratings {_display(profile.path / RATINGS_FILE)} --model {now['run']}"
        )
    shapes = dict(base.model.named_parameters())
    for k, v in profile.params.items():
        if k not in shapes or tuple(shapes[k].shape) != tuple(v.shape):
            raise ProfileError(
                f"{profile.weights_path}: tensor {k!r} {tuple(v.shape)} does not fit the model {now['run']}"
            )
