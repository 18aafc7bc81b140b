"""The code stays lint-clean and type-checked: ruff on everything, mypy --strict on llmkit/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/setup --dev")
    return found


def test_ruff_clean() -> None:
    proc = subprocess.run([_tool("ruff"), "check", "llmkit", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict_clean() -> None:
    proc = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_engines_and_the_fake_implement_the_engine_interface() -> None:
    # The Engine Protocol is structural: only a type checker sees an implementation that
    # drifted from it (a renamed keyword, a changed return type), so the shared fake and the
    # file that assigns each engine to an Engine are checked as strictly as llmkit/.
    proc = subprocess.run([_tool("mypy"), "tests/fake_engine.py", "tests/test_engine_interface.py"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
