"""Style: the repository passes ruff's lint and format checks (configured in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return [exe]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff(args):
    out = subprocess.run(ruff() + args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (
        f"ruff {' '.join(args)} found problems (fix with `ruff {args[0]}"
        f"{' --fix' if args[0] == 'check' else ''} .`):\n{out.stdout[-4000:]}{out.stderr[-2000:]}"
    )
