"""One code style, enforced: ruff's linter and formatter (configured in
pyproject.toml) find nothing to change in gkg_pyg, experiments and tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PATHS = ["gkg_pyg", "experiments", "tests"]


def ruff() -> list[str]:
    """The ruff command of this environment (the test extra installs it)."""
    beside = Path(sys.executable).with_name("ruff")
    if beside.exists():
        return [str(beside)]
    if shutil.which("ruff"):
        return [shutil.which("ruff")]
    pytest.skip("ruff is not installed (pip install -e '.[test]')")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*ruff(), *args, *PATHS], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_check():
    proc = run("check", "--no-cache")
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"


def test_ruff_format():
    proc = run("format", "--check", "--no-cache")
    assert proc.returncode == 0, (
        f"files not formatted (run: ruff format {' '.join(PATHS)}):\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    )
