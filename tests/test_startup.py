"""Startup stays light: help, list, show and early errors never load llama.cpp."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import run_llmkit

# Runs in a fresh interpreter; the verdict goes to stderr after a marker, as stdout is the
# command's own output (list and show write JSON or text there).
DRIVER = """
import json, sys
from llmkit.cli.app import run_cli
after_import = "llama_cpp" in sys.modules
code = run_cli({args!r})
sys.stdout.flush()
sys.stderr.write("\\n@@" + json.dumps({{
    "code": code,
    "after_import": after_import,
    "loaded": sorted(m for m in sys.modules if m == "llama_cpp" or m.startswith("llama_cpp.")),
}}) + "\\n")
"""


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One llama.cpp thread per run: spinning workers crawl on a busy two-core machine."""
    monkeypatch.setenv("LLMKIT_THREADS", "1")


def _drive(args: list[str]) -> tuple[dict[str, object], str]:
    proc = subprocess.run([sys.executable, "-c", DRIVER.format(args=args)],
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert "@@" in proc.stderr, proc.stderr
    verdict = json.loads(proc.stderr.rsplit("@@", 1)[1])
    assert proc.returncode == 0, proc.stderr
    return verdict, proc.stdout


@pytest.mark.parametrize(("args", "code"), [
    (["--help"], 0),
    (["--version"], 0),
    (["run", "--help"], 0),
    (["chat", "--help"], 0),
    (["list"], 0),
    (["list", "--format", "json"], 0),
    (["list", "--format", "table"], 0),
    (["show", "smollm2:135m"], 0),
    (["show", "smollm2:135m", "--format", "json"], 0),
    (["run", "-m", "qqqqqqqqqqqq", "hi"], 1),
    (["run", "-m", "llama3.2:3b", "hi"], 1),
    (["run", ""], 1),
])
def test_command_does_not_import_llama_cpp(args: list[str], code: int) -> None:
    verdict, stdout = _drive(args)
    assert verdict["code"] == code
    assert verdict["after_import"] is False
    assert verdict["loaded"] == []
    if code == 0:
        assert stdout


def test_the_driver_would_notice_llama_cpp() -> None:
    # A command that runs a model must load it: proves the check above can fail.
    verdict, _ = _drive(["run", "-q", "-m", "smollm2:135m", "--max-tokens", "1", "hi"])
    assert verdict["code"] == 0
    assert "llama_cpp" in verdict["loaded"]  # type: ignore[operator]


def test_list_output_is_json_in_the_driver() -> None:
    _, stdout = _drive(["list"])
    assert any(row["name"] == "smollm2:135m" for row in json.loads(stdout))


def test_import_llmkit_is_light() -> None:
    code = ("import sys, llmkit, llmkit.cli.app; "
            "print(sorted({'llama_cpp', 'numpy', 'gguf', 'PIL', 'huggingface_hub'} "
            "& set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_python_api_is_light() -> None:
    # Every public name, the Python API's functions included, is there without llama.cpp,
    # numpy or the Jinja sandbox: they load when a model does.
    code = ("import sys, llmkit\n"
            "names = [getattr(llmkit, name) for name in llmkit.__all__]\n"
            "print(sorted({'llama_cpp', 'numpy', 'gguf', 'PIL', 'huggingface_hub', 'jinja2', "
            "'typer'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_exits_0() -> None:
    proc = run_llmkit(["--help"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for command in ("run", "chat", "caption", "summarize", "check", "list", "show", "import",
                    "rm", "pull"):
        assert command in proc.stdout
    flat = " ".join(proc.stdout.split())
    assert ("Exit codes: 0 ok, 1 error, 2 usage error, 3 flagged by a safety check (check, "
            "--guard), 130 interrupted (Ctrl-C)") in flat


def test_short_help_flag() -> None:
    proc = run_llmkit(["run", "-h"])
    assert proc.returncode == 0
    assert "--json-schema" in proc.stdout and "--max-tokens" in proc.stdout
