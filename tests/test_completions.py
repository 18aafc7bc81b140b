"""Shell completions: checked-in scripts match the app, parse, and complete real words."""

from __future__ import annotations

import enum
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from llmkit.cli.app import app as llmkit_app
from llmkit.cli.completions import SHELLS, completion_script
from llmkit.errors import UsageError
from tests.conftest import run_llmkit

ROOT = Path(__file__).resolve().parent.parent
FILES = {"bash": "llmkit.bash", "zsh": "_llmkit", "fish": "llmkit.fish"}


def _checked_in(shell: str) -> Path:
    return ROOT / "completions" / FILES[shell]


def _llmkit_script(shell: str) -> str:
    """What `llmkit completions SHELL` prints, run in this process."""
    result = CliRunner().invoke(llmkit_app, ["completions", shell])
    assert result.exit_code == 0, result.output
    return result.stdout


def _context(app: typer.Typer) -> typer.Context:
    """A context of ``app`` as its commands receive one, from a hidden command run once."""
    seen: list[typer.Context] = []

    @app.command("context", hidden=True)
    def context(ctx: typer.Context) -> None:
        seen.append(ctx)

    result = CliRunner().invoke(app, ["context"])
    assert result.exit_code == 0, result.output
    return seen[0]


# --- the checked-in scripts and the command -------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_checked_in_script_is_fresh(shell: str) -> None:
    on_disk = _checked_in(shell).read_text(encoding="utf-8")
    assert on_disk == _llmkit_script(shell), (
        f"completions/{FILES[shell]} differs from `llmkit completions {shell}`: "
        "run scripts/gen-completions and commit the result")


def test_command_prints_the_script_and_rejects_other_shells() -> None:
    proc = run_llmkit(["completions", "bash"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _llmkit_script("bash")
    bad = run_llmkit(["completions", "tcsh"])
    assert bad.returncode == 2
    assert bad.stdout == ""
    assert "Invalid value" in bad.stderr and "tcsh" in bad.stderr
    with pytest.raises(UsageError):
        completion_script("tcsh", _context(_toy_app()))


def test_generating_does_not_load_llama_cpp() -> None:
    code = ("import sys; from typer.testing import CliRunner; from llmkit.cli.app import app; "
            "results = [CliRunner().invoke(app, ['completions', s]) "
            "for s in ('bash', 'zsh', 'fish')]; "
            "assert all(r.exit_code == 0 and r.stdout for r in results), results; "
            "assert 'llama_cpp' not in sys.modules, 'llama_cpp was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


# --- syntax -----------------------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_script_parses(shell: str) -> None:
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} is not installed")
    proc = subprocess.run([exe, "-n", str(_checked_in(shell))], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# --- bash, by calling the completion function as bash would ----------------------------


def _comp_words(line: str) -> list[str]:
    """COMP_WORDS as bash builds them: split at blanks, and ':' and '=' are words of their own."""
    words = re.findall(r"[:=]+|[^\s:=]+", line)
    return [*words, ""] if line.endswith(" ") else words


def bash_complete(script: Path, line: str, cwd: Path | None = None) -> list[str]:
    words = _comp_words(line)
    code = "\n".join([
        f"source {shlex.quote(str(script))}",
        f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})",
        f"COMP_CWORD={len(words) - 1}",
        "_llmkit",
        'printf "%s\\n" "${COMPREPLY[@]}"',
    ])
    proc = subprocess.run(["bash", "-c", code], capture_output=True, text=True,
                          cwd=cwd or ROOT / "completions", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


def test_bash_completes_commands_options_and_choices() -> None:
    script = _checked_in("bash")
    assert "run" in bash_complete(script, "llmkit ru")
    assert bash_complete(script, "llmkit run --dev") == ["--device"]
    assert bash_complete(script, "llmkit run --device ") == ["auto", "cpu", "gpu"]
    assert bash_complete(script, "llmkit chat -q --device ") == ["auto", "cpu", "gpu"]
    assert bash_complete(script, "llmkit list --format ") == ["table", "json"]
    assert bash_complete(script, "llmkit completions ") == ["bash", "zsh", "fish"]
    assert "--load" in bash_complete(script, "llmkit chat --")
    assert "-m" in bash_complete(script, "llmkit run -")
    assert bash_complete(script, "llmkit -") == ["--version", "-h", "--help"]


def test_bash_completes_values_after_colons_and_equals_signs() -> None:
    script = _checked_in("bash")
    assert "smollm2:135m" in bash_complete(script, "llmkit run -m smol")
    # bash replaces only the text after the last ':' or '=' of the word.
    assert bash_complete(script, "llmkit run -m smollm2:") == ["135m"]
    assert bash_complete(script, "llmkit run --model=smollm2:1") == ["135m"]
    assert bash_complete(script, "llmkit run --device=g") == ["gpu"]


def test_bash_skips_option_values_when_finding_the_argument(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    script = _checked_in("bash")
    # "json" is the value of -f, not the first positional argument.
    assert bash_complete(script, "llmkit show -f json ", tmp_path)[-1:] == ["model.gguf"]
    assert "notes.txt" not in bash_complete(script, "llmkit show -f json ", tmp_path)
    assert bash_complete(script, "llmkit run -m x hello ", tmp_path) == []  # a prompt: free text
    assert bash_complete(script, "llmkit run --temperature ", tmp_path) == []


# --- zsh and fish, through the shells themselves --------------------------------------


def test_fish_completes_commands_options_and_choices() -> None:
    fish = shutil.which("fish")
    if fish is None:
        pytest.skip("fish is not installed")

    def complete(line: str) -> list[str]:
        code = f"source {shlex.quote(str(_checked_in('fish')))}; complete -C {shlex.quote(line)}"
        proc = subprocess.run([fish, "--no-config", "-c", code], capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        return [line.split("\t")[0] for line in proc.stdout.splitlines()]

    assert "run" in complete("llmkit ru")
    assert complete("llmkit run --dev") == ["--device"]
    assert complete("llmkit run --device ") == ["auto", "cpu", "gpu"]
    assert complete("llmkit completions ") == ["bash", "fish", "zsh"]
    assert "smollm2:135m" in complete("llmkit chat -q -m smol")
    assert "--load" in complete("llmkit chat --")


def test_zsh_completes_through_compinit() -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed")
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, TERM="dumb", PS1="% ")
    child = pexpect.spawn(zsh, ["-f", "-i"], env=env, encoding="utf-8", timeout=15,
                          dimensions=(24, 200), cwd=str(ROOT / "completions"))
    try:
        child.sendline(f"fpath=({shlex.quote(str(ROOT / 'completions'))} $fpath); "
                       "autoload -U compinit; compinit -u -D; PS1='ZSH> '; print READY")
        child.expect_exact("READY\r\n")
        child.expect_exact("ZSH> ")
        child.send("llmkit run --device \t")
        child.expect(r"auto +cpu +gpu")
        child.send("\x03")
        child.expect_exact("ZSH> ")
        child.send("llmkit run -m smollm2:\t")
        child.expect_exact("smollm2:135m")
        child.send("\x03")
        child.expect_exact("ZSH> ")
        child.send("llmkit complet\t")
        child.expect_exact("completions ")
    finally:
        child.terminate(force=True)


# --- the generator is generic: groups, argument types, multi-value options -------------


class Color(str, enum.Enum):
    red = "red"
    blue = "blue"


def _toy_app() -> typer.Typer:
    app = typer.Typer(context_settings={"help_option_names": ["-h", "--help"]})
    models = typer.Typer(help="Manage models.")

    @models.command("pull")
    def pull(
        model: Annotated[str, typer.Argument()],
        color: Annotated[Color, typer.Option("--color", "-c")] = Color.red,
        out: Annotated[Path | None, typer.Option("--out", "-o", file_okay=False)] = None,
    ) -> None:
        """Pull it."""

    @app.command("caption")
    def caption(
        images: Annotated[list[Path], typer.Argument()],
        pair: Annotated[tuple[int, int], typer.Option("--pair")] = (0, 0),
        secret: Annotated[bool, typer.Option("--secret", hidden=True)] = False,
    ) -> None:
        """Caption 'images': [all] of them."""

    app.add_typer(models, name="models")
    return app


@pytest.fixture
def toy_dir(tmp_path: Path) -> Path:
    """A directory holding cat.jpg and subdir/, with the toy app's scripts in scripts/."""
    (tmp_path / "scripts").mkdir()
    for shell in SHELLS:
        (tmp_path / "scripts" / FILES[shell]).write_text(
            completion_script(shell, _context(_toy_app())))
    (tmp_path / "cat.jpg").write_bytes(b"")
    (tmp_path / "subdir").mkdir()
    return tmp_path


def test_generic_bash(toy_dir: Path) -> None:
    script = toy_dir / "scripts" / FILES["bash"]
    assert bash_complete(script, "llmkit ", toy_dir) == ["caption", "models"]
    assert bash_complete(script, "llmkit models ", toy_dir) == ["pull"]
    assert bash_complete(script, "llmkit models -", toy_dir) == ["-h", "--help"]
    assert bash_complete(script, "llmkit models pull --c", toy_dir) == ["--color"]
    assert bash_complete(script, "llmkit models pull -c ", toy_dir) == ["red", "blue"]
    assert bash_complete(script, "llmkit models pull -o s", toy_dir) == ["scripts", "subdir"]
    assert bash_complete(script, "llmkit models pull -o c", toy_dir) == []  # not a directory
    # --pair takes two values; then come images (files), again and again.
    assert sorted(bash_complete(script, "llmkit caption --pair 1 2 ", toy_dir)) == [
        "cat.jpg", "scripts", "subdir"]
    assert "cat.jpg" in bash_complete(script, "llmkit caption a.jpg b.jpg ", toy_dir)
    assert bash_complete(script, "llmkit caption --", toy_dir) == ["--pair", "--help"]


@pytest.mark.parametrize("shell", SHELLS)
def test_generic_scripts_parse(shell: str, toy_dir: Path) -> None:
    exe = shutil.which(shell)
    if exe is None:
        pytest.skip(f"{shell} is not installed")
    proc = subprocess.run([exe, "-n", str(toy_dir / "scripts" / FILES[shell])], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_generic_fish(toy_dir: Path) -> None:
    fish = shutil.which("fish")
    if fish is None:
        pytest.skip("fish is not installed")

    def complete(line: str) -> list[str]:
        script = toy_dir / "scripts" / FILES["fish"]
        code = f"source {shlex.quote(str(script))}; complete -C {shlex.quote(line)}"
        proc = subprocess.run([fish, "--no-config", "-c", code], capture_output=True,
                              text=True, timeout=30, cwd=toy_dir)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        return [line.split("\t")[0] for line in proc.stdout.splitlines()]

    assert complete("llmkit ") == ["caption", "models"]
    assert complete("llmkit models ") == ["pull"]
    assert complete("llmkit models pull -c ") == ["blue", "red"]
    assert complete("llmkit caption --pair 1 2 ") == ["cat.jpg", "scripts/", "subdir/"]
