"""The notebooks in notebooks/: executed top to bottom (nbclient), and kept without outputs in git.

Each notebook is copied to a temporary folder and run there with its kernel's working directory in
that folder; a cell tagged ``parameters`` is followed by an injected one (papermill's convention)
setting ``QUICK = True`` (tiny settings that train in seconds), ``OUT`` (a temporary folder for
every output: data, features, runs, profiles) and ``REPO``. Any error in any cell fails the test,
which names the cell; the executed copy is left in the temporary folder for reading.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the test extra: pip install -e '.[test]'")
nbclient = pytest.importorskip("nbclient", reason="the notebook tests need the test extra: pip install -e '.[test]'")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def parameters(nb) -> int:
    """Index of the cell tagged ``parameters`` (every notebook has exactly one)."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def inject(nb, values: dict) -> None:
    """Insert a cell assigning ``values`` right after the ``parameters`` cell."""
    src = "# injected by tests/test_notebooks.py\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(src)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(parameters(nb) + 1, cell)


def execute(path: Path, workdir: Path, values: dict):
    """Run a copy of the notebook at ``path`` inside ``workdir``; raises on the first failing cell."""
    copy = workdir / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    inject(nb, values)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    try:
        client.execute()
    finally:
        nbformat.write(nb, workdir / f"{path.stem}.executed.ipynb")
    return nb


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quickstart.ipynb", "02_reading_results.ipynb", "03_your_own_data.ipynb"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_outputs_stripped(path):
    """Outputs and execution counts stay out of git, so diffs show only the source."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    parameters(nb)
    dirty = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts: clear them before committing"


def repo_outputs() -> set[str]:
    """What the notebooks would leave in the repository if they ignored OUT (their defaults, alice's profile)."""
    places = [REPO / "runs" / "notebooks", REPO / "annotators" / "alice", REPO / "predictions"]
    return {str(p) for place in places if place.exists() for p in [place, *place.rglob("*")]}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    out = tmp_path / "out"
    before = repo_outputs()
    nb = execute(path, tmp_path, {"QUICK": True, "OUT": str(out), "REPO": str(REPO)})
    assert any(c.cell_type == "code" and c.outputs for c in nb.cells), f"{path.name}: no cell printed anything"
    assert out.is_dir() and any(out.iterdir()), f"{path.name}: wrote nothing under OUT"
    assert repo_outputs() <= before, f"{path.name} wrote into the repository: {sorted(repo_outputs() - before)[:5]}"
