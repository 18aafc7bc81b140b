"""The chat REPL through a real pseudo-terminal: streaming, slash commands, Ctrl-C, Ctrl-D."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

PROMPT = ">>> "


@pytest.fixture
def repl(isolated_home: Path) -> Iterator[pexpect.spawn]:
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", COLUMNS="200")
    child = pexpect.spawn(
        sys.executable, ["-m", "llmkit", "chat", "--temperature", "0", "--max-tokens", "60"],
        env=env, encoding="utf-8", timeout=60, dimensions=(50, 200),
    )
    child.expect_exact(PROMPT)
    yield child
    if child.isalive():
        child.terminate(force=True)


def _ask(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact(PROMPT)
    return str(child.before)


def test_question_gets_an_answer_and_ctrl_d_exits_zero(repl: pexpect.spawn) -> None:
    answer = _ask(repl, "What is the capital of France?")
    assert "Paris" in answer
    repl.sendeof()
    repl.expect(pexpect.EOF)
    repl.close()
    assert repl.exitstatus == 0


def test_help_and_unknown_command(repl: pexpect.spawn) -> None:
    out = _ask(repl, "/help")
    for command in ("/system", "/clear", "/save FILE", "/load FILE", "/model", "/exit"):
        assert command in out
    out = _ask(repl, "/frobnicate")
    assert "llmkit: error: unknown command /frobnicate" in out
    assert repl.isalive()


def test_system_prompt_show_and_set(repl: pexpect.spawn) -> None:
    assert "You are a helpful assistant." in _ask(repl, "/system")
    assert "system prompt set" in _ask(repl, "/system You are a pirate.")
    assert "You are a pirate." in _ask(repl, "/system")


def test_save_clear_load(repl: pexpect.spawn, tmp_path: Path) -> None:
    _ask(repl, "What is the capital of France?")
    saved = tmp_path / "convo.json"
    assert "saved 2 message(s)" in _ask(repl, f"/save {saved}")
    data = json.loads(saved.read_text())
    assert data["system"] == "You are a helpful assistant."
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][0]["content"] == "What is the capital of France?"
    assert "Paris" in data["messages"][1]["content"]
    assert "conversation cleared" in _ask(repl, "/clear")
    assert "loaded 2 message(s)" in _ask(repl, f"/load {saved}")
    again = tmp_path / "again.json"
    _ask(repl, f"/save {again}")
    assert json.loads(again.read_text()) == data


def test_switch_model(repl: pexpect.spawn) -> None:
    assert "smollm2:135m" in _ask(repl, "/model")
    assert "now chatting with smollm2:135m" in _ask(repl, "/model smollm2:135m")
    assert "model 'nope:1b' not found" in _ask(repl, "/model nope:1b")
    assert "Paris" in _ask(repl, "What is the capital of France?")


def test_multiline_input(repl: pexpect.spawn, tmp_path: Path) -> None:
    repl.sendline('"""')
    repl.expect_exact("... ")
    repl.sendline("What is the capital")
    repl.expect_exact("... ")
    repl.sendline('of France?"""')
    repl.expect_exact(PROMPT)
    repl.sendline("Thanks \\")
    repl.expect_exact("... ")
    repl.sendline("a lot!")
    repl.expect_exact(PROMPT)
    saved = tmp_path / "m.json"
    _ask(repl, f"/save {saved}")
    users = [m["content"] for m in json.loads(saved.read_text())["messages"]
             if m["role"] == "user"]
    assert users == ["What is the capital\nof France?", "Thanks \na lot!"]


def test_ctrl_c_stops_a_reply_and_the_session_goes_on(isolated_home: Path) -> None:
    env = dict(os.environ, NO_COLOR="1", TERM="dumb")
    child = pexpect.spawn(
        sys.executable, ["-m", "llmkit", "chat", "--temperature", "0", "--max-tokens", "0"],
        env=env, encoding="utf-8", timeout=60,
    )
    child.expect_exact(PROMPT)
    child.sendline("Write a very long story about a dragon who learns to cook.")
    child.expect_exact("learns to cook.\r\n")  # the terminal's echo of the line
    child.expect(r"\w+ \w+ \w+")  # the reply has started streaming
    child.sendintr()
    child.expect_exact("reply stopped")
    child.expect_exact(PROMPT)
    assert "Paris" in _ask(child, "What is the capital of France?")
    child.sendintr()  # Ctrl-C at the prompt does not leave
    child.expect_exact("(Ctrl-D or /exit to leave)")
    child.expect_exact(PROMPT)
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_history_persists(repl: pexpect.spawn, isolated_home: Path) -> None:
    _ask(repl, "/system remember this line")
    repl.sendline("/bye")
    repl.expect(pexpect.EOF)
    history = (isolated_home / "chat_history").read_text()
    assert "/system remember this line" in history
