"""`llmkit --help` and `llmkit list` stay fast: they never load llama.cpp's native library."""

from __future__ import annotations

import subprocess
import sys

import pytest

DRIVER = """
import sys
from llmkit.cli.app import run_cli
code = run_cli({args!r})
sys.stdout.flush()
print("\\nLLAMA_LOADED=" + str("llama_cpp" in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["list", "--format", "json"], ["run", "--help"],
                                  ["show", "smollm2:135m"]])
def test_command_does_not_import_llama_cpp(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(args=args)],
                          capture_output=True, text=True, timeout=60)
    assert "LLAMA_LOADED=False" in proc.stderr, proc.stderr


def test_import_llmkit_is_light() -> None:
    code = ("import sys, llmkit; heavy = {'llama_cpp', 'numpy', 'gguf', 'PIL', "
            "'huggingface_hub', 'typer'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
