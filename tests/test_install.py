"""A non-editable install run from another folder writes its outputs there, never into site-packages.

The install is offline: a fresh venv (no pip of its own) sees this venv's packages (torch, setuptools, ...)
through a ``.pth`` line, and this venv's pip installs a copy of the source into it with ``--no-deps
--no-build-isolation --no-index``. Skipped, with the reason, where that cannot be done.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import tiny_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def files_under(root: Path) -> set[str]:
    """Every file below ``root`` except byte code (which Python may write beside any module it imports)."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(python of a fresh venv holding a non-editable install of pdmer, its site-packages)."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "pdmer", src / "pdmer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp / "venv"
    made = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a venv: {made.stderr.strip()[-300:]}")
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(
        subprocess.run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "_pdmer_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this venv's packages, last
    pip = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    if pip.returncode != 0:
        pytest.skip(f"cannot install pdmer offline into a fresh venv: {(pip.stderr or pip.stdout).strip()[-500:]}")
    where = subprocess.run(
        [str(py), "-c", "import pdmer; print(pdmer.__file__)"], cwd=tmp, capture_output=True, text=True
    )
    if where.returncode != 0 or not Path(where.stdout.strip()).is_relative_to(site):
        pytest.skip(
            f"the fresh venv does not import the installed pdmer: {where.stdout.strip()} {where.stderr.strip()[-300:]}"
        )
    return py, site


def env_without_home() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PDMER_HOME", "PYTHONPATH")}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_installed_train_writes_into_the_working_folder(installed, tmp_path):
    py, site = installed
    ours = Path(sysconfig.get_paths()["purelib"])
    before, before_ours = files_under(site), files_under(ours)
    work = tmp_path / "elsewhere"
    work.mkdir()
    ov = [
        o
        for o in tiny_overrides(tmp_path, "install")
        if not o.startswith(("data.root=", "features.cache_dir=", "runtime.out_dir="))
    ]  # the defaults: the home folder
    cmd = [
        str(py),
        "-m",
        "pdmer",
        "train",
        str(REPO / "experiments" / "pdmer.synthetic.dsaml.yaml"),
        *ov,
        "eval.plot=false",
        "runtime.threads=1",
    ]
    done = subprocess.run(cmd, cwd=work, env=env_without_home(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert files_under(site) == before, sorted(files_under(site) ^ before)
    assert files_under(ours) == before_ours, sorted(files_under(ours) ^ before_ours)
    runs = list((work / "runs").glob("pdmer.synthetic.dsaml-*/results.json"))
    assert len(runs) == 1, sorted(str(p) for p in work.rglob("*"))[:50]
    assert any((work / "data").glob("synthetic-*")) and (work / "cache" / "features").is_dir()


def test_pdmer_home_overrides_the_working_folder(installed, tmp_path):
    py, _ = installed
    home = tmp_path / "home"
    code = "from pdmer import paths; print(paths.runs_dir()); print(paths.annotators_dir())"
    out = subprocess.run(
        [str(py), "-c", code],
        cwd=tmp_path,
        env={**env_without_home(), "PDMER_HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [str(home.resolve() / "runs"), str(home.resolve() / "annotators")]
