"""Shell completions: checked-in scripts match the app, parse, and complete real words."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from llmkit.cli.completions import completion_script
from tests.conftest import run_llmkit

ROOT = Path(__file__).resolve().parent.parent
FILES = {"bash": "llmkit.bash", "zsh": "_llmkit", "fish": "llmkit.fish"}


@pytest.mark.parametrize("shell", sorted(FILES))
def test_checked_in_scripts_are_fresh(shell: str) -> None:
    on_disk = (ROOT / "completions" / FILES[shell]).read_text(encoding="utf-8")
    assert on_disk == completion_script(shell), (
        f"completions/{FILES[shell]} is stale: run scripts/gen-completions")


def test_completions_command_prints_the_script() -> None:
    proc = run_llmkit(["completions", "fish"])
    assert proc.returncode == 0 and proc.stdout == completion_script("fish")
    bad = run_llmkit(["completions", "tcsh"])
    assert bad.returncode == 2 and "Invalid value" in bad.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_scripts_parse(shell: str) -> None:
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} is not installed")
    proc = subprocess.run([exe, "-n", str(ROOT / "completions" / FILES[shell])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _bash_complete(line: str) -> list[str]:
    words = line.split(" ")
    script = (
        f"source {ROOT / 'completions' / 'llmkit.bash'}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_llmkit\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          cwd=ROOT / "completions")
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


def test_bash_completes_commands_options_and_choices() -> None:
    assert "run" in _bash_complete("llmkit ru")
    assert _bash_complete("llmkit run --dev") == ["--device"]
    assert _bash_complete("llmkit run --device ") == ["auto", "cpu", "gpu"]
    assert "--load" in _bash_complete("llmkit chat --")
    assert "smollm2:135m" in _bash_complete("llmkit run -m smol")
    assert _bash_complete("llmkit list --format ") == ["table", "json"]


def test_fish_completes_subcommands_and_choices() -> None:
    fish = shutil.which("fish")
    if fish is None:
        pytest.skip("fish is not installed")
    script = f"source {ROOT / 'completions' / 'llmkit.fish'}; complete -C 'llmkit run --device '"
    proc = subprocess.run([fish, "-c", script], capture_output=True, text=True)
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == ["auto", "cpu", "gpu"]
