"""Where pdmer writes its outputs and finds its experiment files: the one place that says so.

Outputs (run folders, feature caches, generated data, listener profiles, predictions) go under the
*home* folder:

- ``$PDMER_HOME`` when that environment variable is set (a path; ``~`` is expanded);
- else the project of the current working folder: the nearest folder at or above it whose
  ``pyproject.toml`` names the ``pdmer`` project (the repository, from anywhere inside it);
- else the current working folder itself.

So a non-editable ``pip install .`` run from another folder writes there, never into site-packages.
The package's own folder is only read (the rating page's static files, this module's fallbacks).

Experiment files (``experiments/*.yaml``) are read from ``<home>/experiments/`` when it holds any,
else from the source checkout the package was imported from (an editable install), else from
``$PDMER_HOME``'s or the working folder's ``experiments/`` (named in the error of an unknown name).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ENV = "PDMER_HOME"
PACKAGE_DIR = Path(__file__).resolve().parent  # read-only: the installed (or checked-out) package
_NAME = re.compile(r'^\s*name\s*=\s*["\']pdmer["\']\s*$', re.MULTILINE)


def _is_project(folder: Path) -> bool:
    """Whether ``folder/pyproject.toml`` declares the pdmer project."""
    f = folder / "pyproject.toml"
    try:
        return f.is_file() and bool(_NAME.search(f.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False


def find_project(start: str | Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working folder) that is the pdmer project."""
    here = Path(start if start is not None else Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if _is_project(folder):
            return folder
    return None


def home() -> Path:
    """The folder outputs go under: ``$PDMER_HOME``, else the working folder's project, else the working folder."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser().resolve()
    return find_project() or Path.cwd().resolve()


def source_root() -> Path | None:
    """The source checkout the package was imported from (an editable install or ``PYTHONPATH``), else None."""
    root = PACKAGE_DIR.parent
    return root if _is_project(root) else None


def code_root() -> Path:
    """Where the code's git provenance is read: the source checkout, else the home folder."""
    return source_root() or home()


def runs_dir() -> Path:
    """``<home>/runs``: training runs and sweeps (``runtime.out_dir`` relative paths start here)."""
    return home() / "runs"


def features_cache_dir() -> Path:
    """``<home>/cache/features``: the feature cache (``features.cache_dir`` unset)."""
    return home() / "cache" / "features"


def data_dir() -> Path:
    """``<home>/data``: generated data (the synthetic benchmark)."""
    return home() / "data"


def annotators_dir() -> Path:
    """``<home>/annotators``: listener profiles."""
    return home() / "annotators"


def predictions_dir() -> Path:
    """``<home>/predictions``: predicted curves and plots."""
    return home() / "predictions"


def shared_data_dir() -> Path:
    """``<home>/../shared/data``: the read-only data sets beside the repository."""
    return home().parent / "shared" / "data"


def experiments_dir() -> Path:
    """The folder of the experiment files (see the module docstring for the order)."""
    own = home() / "experiments"
    if any(own.glob("*.yaml")):
        return own
    src = source_root()
    if src is not None and (src / "experiments").is_dir():
        return src / "experiments"
    return own


def display(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` relative to ``root`` (default: the home folder) when inside it (what messages and files show)."""
    try:
        return str(Path(path).resolve().relative_to(Path(root) if root is not None else home()))
    except ValueError:
        return str(path)


__all__ = [
    "ENV",
    "PACKAGE_DIR",
    "annotators_dir",
    "code_root",
    "data_dir",
    "display",
    "experiments_dir",
    "features_cache_dir",
    "find_project",
    "home",
    "predictions_dir",
    "runs_dir",
    "shared_data_dir",
    "source_root",
]
