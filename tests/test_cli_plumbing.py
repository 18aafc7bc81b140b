"""What every command shares: engine options built once, stderr only through _output, and
Ctrl-C answered in one place (app.py) — without loading a model."""

from __future__ import annotations

import ast
import io
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from llmkit.cli import _output as out
from llmkit.cli._batch import BatchFormat, run_cli_batch
from llmkit.cli._options import Device, engine_options
from llmkit.cli.app import run_cli
from llmkit.session import EngineOptions

CLI = Path(__file__).resolve().parent.parent / "llmkit" / "cli"
INTERRUPTED = "llmkit: error: interrupted\n"


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _terminal(monkeypatch: pytest.MonkeyPatch) -> Terminal:
    # Set in the test itself: pytest puts its own capture back in place after fixtures run.
    stream = Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    monkeypatch.setitem(out._state, "quiet", False)
    return stream


# -- engine options ------------------------------------------------------------------------

def test_engine_options_are_built_in_one_place() -> None:
    assert engine_options(None, None, Device.auto, None, False) == EngineOptions()
    assert engine_options(512, 2, Device.gpu, 10, True) == EngineOptions(
        ctx=512, threads=2, device="gpu", gpu_layers=10, verbose=True)


def _source(name: str) -> str:
    return (CLI / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("command", ["run.py", "chat.py", "check.py", "caption.py",
                                     "summarize.py"])
def test_model_commands_take_the_shared_device_option(command: str) -> None:
    source = _source(command)
    assert "EngineOptions(" not in source  # built by engine_options()
    assert "device: DeviceOpt = Device.auto," in source
    assert "type: ignore" not in source


def test_device_help_is_unchanged(capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    for command in ("run", "chat", "check", "caption", "summarize"):
        assert run_cli([command, "--help"]) == 0
        device = [line for line in capsys.readouterr().out.splitlines() if "--device" in line]
        assert len(device) == 1, command
        assert "<auto|cpu|gpu>" in device[0] and "[default: auto]" in device[0]
        assert "auto: GPU when llama.cpp has one." in device[0]


# -- stderr only through _output -----------------------------------------------------------

def _writes_to_a_std_stream(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr in ("stderr", "stdout")
                and isinstance(node.value, ast.Name) and node.value.id == "sys"):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("module", sorted(p.name for p in CLI.glob("*.py")
                                          if p.name not in ("_output.py", "completions.py")))
def test_commands_do_not_touch_stderr_or_stdout_themselves(module: str) -> None:
    assert _writes_to_a_std_stream(ast.parse(_source(module))) == []


def test_progress_is_drawn_in_place_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _terminal(monkeypatch)
    out.progress("[1/2] a.jpg")
    out.progress("converting 2/2 x", keep=True)
    out.progress_clear()
    assert terminal.getvalue() == "\r\033[K[1/2] a.jpg\r\033[Kconverting 2/2 x\n\r\033[K"
    assert out.progress_enabled()
    out.set_quiet(True)
    try:
        assert not out.progress_enabled()
        out.progress("hidden")
        out.progress_clear()
    finally:
        out.set_quiet(False)
    assert terminal.getvalue().endswith("x\n\r\033[K")


def test_progress_is_silent_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    out.progress("[1/2] a.jpg")
    out.progress_clear()
    assert not out.progress_enabled()
    assert capsys.readouterr().err == ""


def test_a_progress_line_stays_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _terminal(monkeypatch)
    out.progress("[1/2] evil\nllmkit: error: forged\x1b[2J.jpg")
    assert terminal.getvalue() == "\r\033[K[1/2] evil\\nllmkit: error: forged\\x1b[2J.jpg"


def test_info_is_text_as_it_is_even_when_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    out.set_quiet(True)
    try:
        out.info("line one\n  line two")
        out.note("hidden")
    finally:
        out.set_quiet(False)
    assert capsys.readouterr().err == "line one\n  line two\n"


def test_traceback_is_the_whole_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    import traceback

    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        out.traceback(exc)
        expected = "".join(traceback.format_exception(exc))
    assert capsys.readouterr().err == expected
    assert expected.startswith("Traceback (most recent call last):")


def test_debugging_follows_llmkit_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, on in (("", False), ("0", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("LLMKIT_DEBUG", value)
        assert out.debugging() is on
    monkeypatch.delenv("LLMKIT_DEBUG")
    assert out.debugging() is False


# -- Ctrl-C, answered once -----------------------------------------------------------------

def test_only_app_turns_ctrl_c_into_interrupted() -> None:
    for path in CLI.glob("*.py"):
        if path.name != "app.py":
            assert "Interrupted" not in path.read_text(encoding="utf-8"), path.name


def _interrupt(*_args: Any, **_kwargs: Any) -> Any:
    raise KeyboardInterrupt


def test_ctrl_c_inside_a_command_is_one_line_and_130(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import llmkit.hub

    monkeypatch.setattr(llmkit.hub, "pull", _interrupt)
    assert run_cli(["pull", "acme/tiny:Q8_0"]) == 130
    assert capsys.readouterr() == ("", INTERRUPTED)


def test_ctrl_c_in_check_batch_keeps_the_lines_answered(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    import llmkit.session
    import llmkit.tasks.safety

    class Guarded:
        engine = None

        def __enter__(self) -> Guarded:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def check_line(_guard: Any, _line: str, number: int) -> dict[str, Any]:
        if number == 2:
            raise KeyboardInterrupt
        return {"line": number, "verdict": "safe", "flagged": False, "error": None}

    monkeypatch.setattr(llmkit.session, "open_guard", lambda *_a, **_k: (Guarded(), None))
    monkeypatch.setattr(llmkit.tasks.safety, "check_jsonl_line", check_line)
    lines = tmp_path / "in.jsonl"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert run_cli(["check", "--batch", str(lines)]) == 130
    captured = capsys.readouterr()
    assert [json.loads(line)["line"] for line in captured.out.splitlines()] == [1]
    assert captured.err == INTERRUPTED


def test_a_json_batch_prints_what_finished_and_lets_ctrl_c_rise(
        capsys: pytest.CaptureFixture[str]) -> None:
    from llmkit.batch import BatchOutput

    def work(path: str) -> dict[str, Any]:
        if path == "b":
            raise KeyboardInterrupt
        return {"path": path, "summary": "done", "error": None}

    cleared: list[bool] = []
    with pytest.raises(KeyboardInterrupt):
        run_cli_batch(["a", "b", "c"], work, BatchOutput(), fmt=BatchFormat.json, single=False,
                      text_field="summary", noun="document", clear=lambda: cleared.append(True))
    assert json.loads(capsys.readouterr().out) == [{"path": "a", "summary": "done",
                                                     "error": None}]
    assert cleared  # the progress line is gone before the message


@pytest.mark.parametrize("fmt", [BatchFormat.text, BatchFormat.jsonl])
def test_other_formats_have_nothing_left_to_print(fmt: BatchFormat,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from llmkit.batch import BatchOutput

    def work(path: str) -> dict[str, Any]:
        if path == "b":
            raise KeyboardInterrupt
        return {"path": path, "summary": "done", "error": None}

    with pytest.raises(KeyboardInterrupt):
        run_cli_batch(["a", "b"], work, BatchOutput(), fmt=fmt, single=False,
                      text_field="summary", noun="document", clear=lambda: None)
    printed = capsys.readouterr().out
    assert printed == ('{"path": "a", "summary": "done", "error": null}\n'
                       if fmt == BatchFormat.jsonl else "==> a <==\ndone\n\n")
