"""The chat REPL survives failing commands and turns: /save, /load, /model, odd input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pexpect  # in the dev extra
import pytest

from llmkit.chat_template import Piece
from tests.fake_engine import FakeEngine
from tests.test_repl import (  # the REPL tests' pty helpers and fixture
    EXPECT_TIMEOUT,
    PROMPT,
    QUESTION,
    Spawn,
    ask,
    leave,
    saved_conversation,
    spawn,
)

__all__ = ["spawn"]  # a fixture, used by name

slow = pytest.mark.slow  # loads SmolLM2 (every test here but the last)


def _with_template(source: Path, target: Path, template: str) -> Path:
    """A copy of a GGUF whose chat template is ``template`` (padded to the original's length,
    so every offset in the file stays as it was)."""
    from llmkit.gguf_file import read_info

    original = read_info(source).chat_template.encode("utf-8")
    new = template.encode("utf-8")
    assert len(new) <= len(original)
    data = source.read_bytes()
    assert data.count(original) == 1
    target.write_bytes(data.replace(original, new + b" " * (len(original) - len(new))))
    return target


# A template that raises when rendered, and one that does not even compile.
RAISING = "{{ raise_exception('this template is broken on purpose') }}"
UNCOMPILABLE = "{% for message in messages %}{{ message['content'] }}"


@pytest.fixture(scope="module")
def broken_models(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory
                  ) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("broken-templates")
    return {
        "raising": _with_template(smollm2_path, folder / "raising.gguf", RAISING),
        "uncompilable": _with_template(smollm2_path, folder / "uncompilable.gguf",
                                       UNCOMPILABLE),
    }


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("llmkit: error:")]


@slow
@pytest.mark.timeout(120)
def test_save_to_a_directory_is_one_error_and_the_chat_goes_on(spawn: Spawn,
                                                              tmp_path: Path) -> None:
    child = spawn("--max-tokens", "24")
    ask(child, QUESTION)
    folder = tmp_path / "chats"
    folder.mkdir()
    out = ask(child, f"/save {folder}")
    assert _errors(out) == [f"llmkit: error: cannot save the conversation to {folder}: it is "
                            "a directory (give a file name, e.g. /save chat.json)"]
    assert list(folder.iterdir()) == []  # no temporary file left behind
    data = saved_conversation(child, tmp_path / "kept.json")
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]  # type: ignore[index]
    assert leave(child) == 0


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux") or not _unshare_works(),
                    reason="needs a private mount namespace (unshare -rm) for a full tmpfs")
def test_save_on_a_full_disk_is_one_error_and_the_chat_goes_on(tmp_path: Path) -> None:
    # A real full file system: a 64 KiB tmpfs filled to the last page, in a mount namespace of
    # the chat's own, so nothing outside the test sees it.
    disk = tmp_path / "disk"
    disk.mkdir()
    elsewhere = tmp_path / "elsewhere.json"
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", INPUTRC=os.devnull)
    script = (f"mount -t tmpfs -o size=64k tmpfs {disk} && "
              f"dd if=/dev/zero of={disk}/fill bs=4k 2>/dev/null; "
              f'exec "$0" -m llmkit chat --threads 1 --temperature 0 --max-tokens 24')
    child = pexpect.spawn("unshare", ["-rm", "sh", "-c", script, sys.executable], env=env,
                          encoding="utf-8", timeout=EXPECT_TIMEOUT, dimensions=(50, 200))
    try:
        child.expect_exact(PROMPT)
        ask(child, QUESTION)
        target = disk / "chat.json"
        out = ask(child, f"/save {target}")
        assert _errors(out) == [f"llmkit: error: cannot save the conversation to {target}: the "
                                "disk is full (free some space or save elsewhere)"]
        assert child.isalive()
        assert f"saved 2 message(s) to {elsewhere}" in ask(child, f"/save {elsewhere}")
        assert leave(child) == 0
    finally:
        if child.isalive():
            child.terminate(force=True)
    data = json.loads(elsewhere.read_text(encoding="utf-8"))
    assert data["messages"][0]["content"] == QUESTION


@slow
@pytest.mark.timeout(120)
def test_load_of_a_bad_file_keeps_the_conversation(spawn: Spawn, tmp_path: Path) -> None:
    child = spawn("--max-tokens", "24")
    ask(child, QUESTION)
    before = saved_conversation(child, tmp_path / "before.json")
    bad = {
        "deep.json": b"[" * 100_000 + b"]" * 100_000,
        "not-json.json": b"{not json",
        "shape.json": b'{"messages": [{"role": "user"}]}',
        "system.json": b'{"system": 5, "messages": []}',
        "latin1.json": '[{"role": "user", "content": "café"}]'.encode("latin-1"),
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    expected = {
        "deep.json": "is not JSON (it nests arrays or objects too deeply)",
        "not-json.json": "is not JSON",
        "shape.json": "is not a conversation (expected role/content messages)",
        "system.json": 'is not a conversation (its "system" is not text)',
        "latin1.json": "is not UTF-8 text",
    }
    for name, words in [*expected.items(), (".", "is a directory")]:
        out = ask(child, f"/load {tmp_path / name}")
        errors = _errors(out)
        assert len(errors) == 1 and words in errors[0], (name, out)
        assert "unexpected" not in out
    assert saved_conversation(child, tmp_path / "after.json") == before
    assert "Paris" in ask(child, QUESTION)  # the model still answers
    assert leave(child) == 0


@slow
@pytest.mark.timeout(120)
def test_an_unclosed_quote_in_a_command_is_a_usage_error(spawn: Spawn) -> None:
    child = spawn("--max-tokens", "24")
    out = ask(child, '/save "unclosed.json')
    assert _errors(out) == ["llmkit: error: usage: /save FILE (No closing quotation)"]
    assert "Paris" in ask(child, QUESTION)
    assert leave(child) == 0


@slow
@pytest.mark.timeout(120)
def test_a_line_that_is_not_utf8_is_reported_and_not_sent(tmp_path: Path) -> None:
    # GNU readline drops such bytes itself; Python without it (libedit builds, minimal images)
    # hands them on as lone surrogates, which no tokenizer can encode.
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", INPUTRC=os.devnull, LC_ALL="C.UTF-8")
    code = ("import sys; sys.modules['readline'] = None; from llmkit.cli.app import main; "
            "main()")
    child = pexpect.spawn(sys.executable, ["-c", code, "chat", "--threads", "1",
                                           "--temperature", "0", "--max-tokens", "24"],
                          env=env, encoding="utf-8", codec_errors="replace",
                          timeout=EXPECT_TIMEOUT, dimensions=(50, 200))
    child.expect_exact(PROMPT)
    os.write(child.child_fd, b"caf\xe9?\r")  # Latin-1 from a terminal not set to UTF-8
    child.expect_exact(PROMPT)
    assert _errors(str(child.before)) == [
        "llmkit: error: that line is not UTF-8 text and was not sent (the chat goes on; set "
        "the terminal to UTF-8)"]
    assert saved_conversation(child, tmp_path / "none.json")["messages"] == []
    assert "Paris" in ask(child, QUESTION)
    assert leave(child) == 0


@slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["raising", "uncompilable"])
def test_switching_to_a_model_whose_template_fails_keeps_the_current_one(
        spawn: Spawn, broken_models: dict[str, Path], tmp_path: Path, kind: str) -> None:
    child = spawn("--max-tokens", "24")
    ask(child, QUESTION)
    before = saved_conversation(child, tmp_path / "before.json")
    broken = broken_models[kind]
    out = ask(child, f"/model {broken}")
    errors = _errors(out)
    assert len(errors) == 1, out
    assert "template" in errors[0] and errors[0].endswith("; still chatting with smollm2:135m")
    assert "now chatting" not in out and "unexpected" not in out
    assert ask(child, "/model").splitlines()[1:] == ["smollm2:135m"]
    assert saved_conversation(child, tmp_path / "after.json") == before
    assert "Paris" in ask(child, "And what is the capital of France, again?")
    assert leave(child) == 0


@slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["raising", "uncompilable"])
def test_chat_with_a_model_whose_template_fails_stops_before_the_first_message(
        broken_models: dict[str, Path], kind: str) -> None:
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", INPUTRC=os.devnull)
    child = pexpect.spawn(sys.executable, ["-m", "llmkit", "chat", "--threads", "1", "-m",
                                           str(broken_models[kind])],
                          env=env, encoding="utf-8", timeout=EXPECT_TIMEOUT)
    child.expect(pexpect.EOF)
    child.close()
    output = str(child.before)
    assert child.exitstatus == 1
    errors = _errors(output)
    assert len(errors) == 1 and "template" in errors[0], output
    assert PROMPT not in output and "Traceback" not in output and "unexpected" not in output


def failing_template(messages: object) -> list[Piece]:
    """A prompt rendering that fails in a way nobody planned for."""
    raise RuntimeError("the native library had a bad day")


def test_an_unforeseen_failure_in_a_turn_is_one_error_and_the_conversation_stays(
        capsys: pytest.CaptureFixture[str]) -> None:
    from llmkit.cli.chat import _Repl
    from llmkit.engines import SamplingParams
    from llmkit.session import EngineOptions
    from llmkit.tasks.chat import Conversation

    convo = Conversation(system="be brief", messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    before = [dict(m) for m in convo.messages]
    engine = FakeEngine(template=failing_template, n_ctx=512, model_name="failing")
    repl = _Repl(engine, convo, SamplingParams(), EngineOptions(),
                 lambda _res: SamplingParams())
    repl._answer("and now?")
    assert convo.messages == before  # not left holding an unanswered message
    assert engine.forgotten == 1  # the KV cache may hold half a turn: dropped
    assert capsys.readouterr().err.splitlines() == [
        "llmkit: error: unexpected RuntimeError: the native library had a bad day (the chat "
        "goes on; LLMKIT_DEBUG=1 shows the traceback)"]
