"""Listener names and profile folders: a name never leads a path out of the annotators folder."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from pdmer import paths, store

log = logging.getLogger(__name__)

REPO = paths.home()  # outputs' home (pdmer.paths: $PDMER_HOME, else the working folder's project)
DEFAULT_ANNOTATORS_DIR = paths.annotators_dir()
PROFILE_FORMAT = "pdmer-profile"
PROFILE_VERSION = 1
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
RESERVED_NAMES = frozenset({"example"})
WEIGHTS_FILE = "weights.safetensors"
PROFILE_FILE = "profile.json"
RATINGS_FILE = "ratings.csv"
FIT_FILE = "fit.png"
HISTORY_DIR = store.HISTORY_DIR  # replaced profiles kept with keep_history


class ProfileError(ValueError):
    """A profile name, file or base model is invalid; the message says which and where."""


def check_name(name: str) -> str:
    """Validate a listener name: 1-64 letters, digits, ``-`` or ``_``.

    Args:
        name: the name given by the user.

    Returns:
        the name, unchanged.

    Raises:
        ProfileError: anything else (a path separator, ``..``, a leading dot, spaces,
            non-ASCII letters, an empty or reserved name).
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ProfileError(
            f"invalid listener name {name!r}: use 1-64 letters, digits, '-' or '_' (no path separators, dots or spaces)"
        )
    if name in RESERVED_NAMES:
        raise ProfileError(f"the name {name!r} is reserved (annotators/{name}/ is kept in git); choose another")
    return name


def _root(annotators_dir: str | Path | None) -> Path:
    return Path(annotators_dir) if annotators_dir is not None else DEFAULT_ANNOTATORS_DIR


def profile_dir(name: str, annotators_dir: str | Path | None = None) -> Path:
    """The folder of a profile, checked to lie directly inside the annotators folder.

    Args:
        name: listener name (checked with :func:`check_name`).
        annotators_dir: the annotators folder (None = ``<repo>/annotators``).

    Returns:
        ``<annotators_dir>/<name>``.
    """
    check_name(name)
    root = _root(annotators_dir)
    path = root / name
    if path.resolve().parent != root.resolve():  # belt and braces: the regex already forbids this
        raise ProfileError(f"profile name {name!r} would leave {root}")
    return path


def _display(path: Path) -> str:
    """A path relative to the home folder when inside it (what profile.json and messages show)."""
    return paths.display(path, REPO)
