"""The chat REPL through a real pseudo-terminal and the real SmolLM2: commands, Ctrl-C, Ctrl-D."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pexpect  # in the dev extra
import pytest

from llmkit import paths

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

PROMPT = ">>> "
MORE = "... "
EXPECT_TIMEOUT = 20  # seconds for one reply of the 135M model, with room for a slow machine
QUESTION = "What is the capital of France?"

Spawn = Callable[..., pexpect.spawn]


@pytest.fixture
def spawn(isolated_home: Path) -> Iterator[Spawn]:
    """Start `llmkit chat [--temperature 0] ARGS` on a pseudo-terminal; wait for the prompt."""
    children: list[pexpect.spawn] = []

    def start(*args: str, greedy: bool = True) -> pexpect.spawn:
        # os.environ already carries the isolated LLMKIT_HOME/HF_HOME (conftest); an empty
        # INPUTRC keeps a developer's readline settings (vi mode, say) out of the test.
        env = dict(os.environ, NO_COLOR="1", TERM="dumb", INPUTRC=os.devnull)
        # One thread: on a busy machine llama.cpp's threads wait on each other (a reply took
        # 7-10 s with all cores against under 1.5 s with one); a 135M model needs no more.
        flags = ["--threads", "1", *(["--temperature", "0"] if greedy else [])]
        child = pexpect.spawn(
            sys.executable, ["-m", "llmkit", "chat", *flags, *args],
            env=env, encoding="utf-8", timeout=EXPECT_TIMEOUT, dimensions=(50, 200),
        )
        children.append(child)
        child.expect_exact(PROMPT)
        return child

    yield start
    for child in children:
        if child.isalive():
            child.terminate(force=True)


def ask(child: pexpect.spawn, line: str) -> str:
    """Send one line; return everything printed until the next prompt (echo included)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return str(child.before)


def leave(child: pexpect.spawn) -> int:
    """Ctrl-D at the prompt; the exit status."""
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    return int(child.exitstatus)


def saved_conversation(child: pexpect.spawn, path: Path) -> dict[str, object]:
    assert "saved" in ask(child, f"/save {path}")
    data: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return data


def test_prompt_answer_and_ctrl_d_exits_zero(spawn: Spawn) -> None:
    child = spawn("--max-tokens", "24")
    assert "chatting with smollm2:135m; /help for commands, Ctrl-D to leave" in child.before
    answer = ask(child, QUESTION)
    assert answer.startswith(QUESTION)  # the terminal's echo, then the streamed reply
    assert "Paris" in answer
    assert leave(child) == 0


def test_help_lists_the_commands(spawn: Spawn) -> None:
    child = spawn()
    out = ask(child, "/help")
    for line in ("/help", "/system [TEXT]", "/clear", "/save FILE", "/load FILE",
                 "/model [NAME]", "/exit, /bye", 'wrap text in """ … """',
                 "end a line with \\ to continue", "Ctrl-C stops a reply"):
        assert line in out, line


def test_unknown_command_is_an_error_and_the_session_goes_on(spawn: Spawn) -> None:
    child = spawn("--max-tokens", "24")
    out = ask(child, "/foo")
    assert "llmkit: error: unknown command /foo (/help lists them)" in out
    assert child.isalive()
    assert "Paris" in ask(child, QUESTION)
    assert leave(child) == 0


def test_system_prompt_show_and_set(spawn: Spawn) -> None:
    child = spawn()
    assert "You are a helpful assistant." in ask(child, "/system")  # the catalog's default
    assert "llmkit: system prompt set" in ask(child, "/system You are a pirate.")
    out = ask(child, "/system")
    assert out.splitlines()[1:] == ["You are a pirate."]


def test_save_clear_load(spawn: Spawn, tmp_path: Path) -> None:
    child = spawn("--max-tokens", "24")
    ask(child, QUESTION)
    ask(child, "/system You are a geography teacher.")
    first = tmp_path / "first.json"
    assert f"llmkit: saved 2 message(s) to {first}" in ask(child, f"/save {first}")
    data = json.loads(first.read_text(encoding="utf-8"))
    assert data["system"] == "You are a geography teacher."
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][0]["content"] == QUESTION
    assert "Paris" in data["messages"][1]["content"]

    assert "llmkit: conversation cleared" in ask(child, "/clear")
    cleared = saved_conversation(child, tmp_path / "cleared.json")
    assert cleared == {"system": "You are a geography teacher.", "messages": []}

    assert f"llmkit: loaded 2 message(s) from {first}" in ask(child, f"/load {first}")
    assert saved_conversation(child, tmp_path / "again.json") == data

    missing = tmp_path / "missing.json"
    assert "llmkit: error: cannot load a conversation: " in ask(child, f"/load {missing}")
    assert "llmkit: error: usage: /save FILE" in ask(child, "/save")
    assert saved_conversation(child, tmp_path / "still.json") == data


def test_switch_model(spawn: Spawn) -> None:
    child = spawn("--max-tokens", "24")
    assert ask(child, "/model").splitlines()[1:] == ["smollm2:135m"]
    assert "llmkit: now chatting with smollm2:135m" in ask(child, "/model smollm2:135m")
    assert "llmkit: error: model 'nope:1b' not found" in ask(child, "/model nope:1b")
    assert "Paris" in ask(child, QUESTION)
    assert leave(child) == 0


def test_switching_model_applies_its_sampling_defaults(spawn: Spawn, smollm2_path: Path) -> None:
    # A bare path has no catalog entry (temperature 0.8, random seed); smollm2:135m's entry
    # makes it greedy, so after switching the same question gets the same answer each time.
    child = spawn("-m", str(smollm2_path), "--max-tokens", "40", greedy=False)
    assert "now chatting with smollm2:135m" in ask(child, "/model smollm2:135m")
    answers = []
    for _ in range(3):
        ask(child, "/clear")
        answers.append(ask(child, "Tell me a short joke."))
    assert answers[0] == answers[1] == answers[2]
    assert leave(child) == 0


def test_multiline_input(spawn: Spawn, tmp_path: Path) -> None:
    child = spawn("--max-tokens", "30")
    child.sendline('"""')
    child.expect_exact(MORE)
    child.sendline("What is the capital")
    child.expect_exact(MORE)
    child.sendline('of France?"""')
    child.expect_exact(PROMPT)
    child.sendline("Thanks \\")
    child.expect_exact(MORE)
    child.sendline("a lot!")
    child.expect_exact(PROMPT)
    ask(child, '"""One line in quotes."""')
    data = saved_conversation(child, tmp_path / "multi.json")
    messages = data["messages"]
    assert isinstance(messages, list)
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == ["What is the capital\nof France?", "Thanks \na lot!", "One line in quotes."]


def test_ctrl_c_stops_a_long_reply_and_the_session_goes_on(spawn: Spawn, tmp_path: Path) -> None:
    child = spawn("--max-tokens", "0")  # unlimited: only Ctrl-C ends the story early
    story = "Write a very long story about a dragon."
    child.sendline(story)
    child.expect_exact(story + "\r\n")  # the terminal's echo of the line
    child.expect(r"\w+\W+\w+\W+\w+")  # the reply is streaming
    child.sendintr()
    child.expect_exact("llmkit: reply stopped")
    child.expect_exact(PROMPT)
    data = saved_conversation(child, tmp_path / "stopped.json")
    messages = data["messages"]
    assert isinstance(messages, list)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["content"].strip()  # the reply is kept as far as it got
    ask(child, "/clear")
    assert "Paris" in ask(child, QUESTION)
    assert leave(child) == 0


def test_ctrl_c_at_the_prompt_does_not_leave(spawn: Spawn, tmp_path: Path) -> None:
    child = spawn("--max-tokens", "30")
    child.sendintr()
    child.expect_exact("llmkit: (Ctrl-D or /exit to leave)")
    child.expect_exact(PROMPT)
    # Ctrl-C on a continuation line drops the unfinished message.
    child.sendline('"""')
    child.expect_exact(MORE)
    child.sendline("never sent")
    child.expect_exact(MORE)
    child.sendintr()
    child.expect_exact("llmkit: (Ctrl-D or /exit to leave)")
    child.expect_exact(PROMPT)
    assert child.isalive()
    assert saved_conversation(child, tmp_path / "none.json")["messages"] == []
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_history_persists_across_sessions(spawn: Spawn) -> None:
    child = spawn("--max-tokens", "20")
    ask(child, "/system remember this line")
    ask(child, "Say hello.")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = paths.history_path()
    lines = history.read_text(encoding="utf-8").splitlines()
    assert lines[-3:] == ["/system remember this line", "Say hello.", "/bye"]

    # A new session reads it back: Ctrl-P (previous line) three times recalls the /system line.
    child = spawn()
    child.send("\x10\x10\x10\r")
    child.expect_exact("llmkit: system prompt set")
    child.expect_exact(PROMPT)
    assert ask(child, "/system").splitlines()[1:] == ["remember this line"]
    assert leave(child) == 0
