"""The Python API (llmkit.run, chat, caption, summarize, check, load): the CLI's results as data.

Unit tests drive it with the shared scripted engine; the slow ones compare it with the CLI on
the real SmolLM2 (greedy: the catalog gives smollm2:135m temperature 0) and a tiny SmolVLM.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import llmkit
from llmkit.engines.base import Engine
from llmkit.errors import (
    ContextTooSmallError,
    DocumentError,
    FlaggedError,
    ImageError,
    InputError,
    LlmkitError,
    ModelNotFoundError,
    NotAVisionModelError,
    SchemaError,
    UsageError,
    VerdictError,
)
from tests import images
from tests.conftest import run_llmkit
from tests.fake_engine import Call, FakeEngine, ScriptedGuardEngine

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One llama.cpp thread for the CLI and the API alike, so greedy runs agree."""
    monkeypatch.setenv("LLMKIT_THREADS", "1")
    for variable in ("LLMKIT_VISION_MODEL", "LLMKIT_GUARD_MODEL"):
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeEngine]]:
    """Every model opened by name is a scripted engine (whatever the file), in this list."""
    opened: list[FakeEngine] = []

    def load_engine(path: Any, *, name: str | None = None, mmproj: Any = None,
                    **options: Any) -> FakeEngine:
        engine = FakeEngine("Paris.", model_name=name or Path(path).name,
                            vision=mmproj is not None)
        opened.append(engine)
        return engine

    monkeypatch.setattr("llmkit.session.load_engine", load_engine)
    yield opened


def photo_bytes(fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    images.photo((64, 48)).save(buffer, fmt)
    return buffer.getvalue()


# -- the names ------------------------------------------------------------------------------


def test_every_public_name_resolves() -> None:
    for name in llmkit.__all__:
        assert getattr(llmkit, name) is not None, name
    assert {"run", "chat", "caption", "summarize", "check", "load"} <= set(dir(llmkit))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = llmkit.nothing  # type: ignore[attr-defined]


def test_an_engine_is_the_interface() -> None:
    engine: Engine = FakeEngine()  # what mypy checks: the fake is an Engine
    assert llmkit.run("hi", model=engine).text == "OK."


# -- run ------------------------------------------------------------------------------------


def test_run_on_an_open_engine_leaves_it_open() -> None:
    engine = FakeEngine("Paris.")
    reply = llmkit.run("What is the capital of France?", model=engine)
    assert reply.text == "Paris." and reply.model == "fake"
    assert reply.generation.finish_reason == "stop"
    assert reply.to_dict()["text"] == "Paris."
    assert not engine.closed
    assert engine.chats == [[{"role": "user", "content": "What is the capital of France?"}]]
    llmkit.run("Again?", model=engine)  # still usable
    assert len(engine.calls) == 2


def test_run_by_name_closes_what_it_opened(loads: list[FakeEngine]) -> None:
    reply = llmkit.run("hi", model="smollm2:135m")
    assert reply.text == "Paris."
    (engine,) = loads
    assert engine.closed and engine.model_name == "smollm2:135m"


def test_run_uses_the_catalog_defaults_by_name_and_on_an_open_engine(
        loads: list[FakeEngine]) -> None:
    # smollm2:135m's catalog entry: greedy, and a system prompt.
    llmkit.run("hi", model="smollm2:135m")
    same = FakeEngine(model_name="smollm2:135m")
    llmkit.run("hi", model=same)
    for engine in (loads[0], same):
        (call,) = engine.calls
        assert call.params is not None and call.params.temperature == 0.0
        assert call.params.max_tokens == 1024  # the CLI's --max-tokens default
        assert engine.chats[0][0] == {"role": "system", "content": "You are a helpful assistant."}
    other = FakeEngine(model_name="some-file.gguf")  # no catalog entry: llmkit's defaults
    llmkit.run("hi", model=other, system="Be brief.", temperature=0.5, seed=3, max_tokens=0)
    (call,) = other.calls
    assert call.params is not None
    assert (call.params.temperature, call.params.top_p, call.params.seed,
            call.params.max_tokens) == (0.5, 0.95, 3, None)
    assert other.chats[0][0] == {"role": "system", "content": "Be brief."}


def test_run_with_context_is_runs_stdin_and_streams() -> None:
    engine = FakeEngine("A fix.")
    pieces: list[str] = []
    reply = llmkit.run("Write a commit message.", model=engine, context="diff --git a b\n",
                       on_text=pieces.append)
    assert engine.chats[0][-1]["content"] == "diff --git a b\n\nWrite a commit message."
    assert "".join(pieces) == reply.text == "A fix."


def test_run_with_a_json_schema_passes_a_grammar() -> None:
    engine = FakeEngine('{"a": 1}')
    llmkit.run("json please", model=engine,
               json_schema={"type": "object", "properties": {"a": {"type": "integer"}}})
    (call,) = engine.calls
    assert call.params is not None and call.params.grammar and "root" in call.params.grammar
    with pytest.raises(SchemaError):
        llmkit.run("json please", model=engine, json_schema="{not json")
    with pytest.raises(SchemaError):
        llmkit.run("json please", model=engine, json_schema={"bad": float("nan")})


def test_run_with_images() -> None:
    engine = FakeEngine("Red on the left.", vision=True)
    reply = llmkit.run("What is on the left?", model=engine, images=[photo_bytes()])
    assert reply.text == "Red on the left."
    (call,) = engine.calls
    assert call.kind == "generate_with_images" and len(call.images) == 1
    with pytest.raises(NotAVisionModelError):
        llmkit.run("What is this?", model=FakeEngine(), images=[photo_bytes()])


def test_run_refuses_bad_input_with_llmkit_errors() -> None:
    engine = FakeEngine()
    with pytest.raises(InputError, match="the prompt is empty"):
        llmkit.run("  ", model=engine)
    with pytest.raises(InputError, match=r"the prompt holds \\udcff, half of a UTF-16"):
        llmkit.run("caf\udcff", model=engine)
    with pytest.raises(UsageError, match="this engine is already open"):
        llmkit.run("hi", model=engine, ctx=512)
    with pytest.raises(ModelNotFoundError):
        llmkit.run("hi", model="qqqqqqqqqqqq")
    # An image that cannot be read fails before any model is looked up.
    with pytest.raises(ImageError, match="image data"):
        llmkit.run("What is this?", model="qqqqqqqqqqqq", images=[b"not an image"])
    assert engine.calls == []


def test_ctrl_c_raises_keyboard_interrupt() -> None:
    def interrupted(call: Call) -> str:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llmkit.run("hi", model=FakeEngine(interrupted))
    convo = llmkit.Conversation()
    with pytest.raises(KeyboardInterrupt):
        llmkit.chat("hi", model=FakeEngine(interrupted), conversation=convo)
    assert [m["role"] for m in convo.messages] == ["user", "assistant"]  # kept as far as it got


# -- chat -----------------------------------------------------------------------------------


def test_chat_keeps_the_conversation_and_reuses_the_cache() -> None:
    engine = FakeEngine(lambda call: f"Reply {len(engine.calls)}.")
    convo = llmkit.Conversation(system="You are terse.")
    first = llmkit.chat("Hello", model=engine, conversation=convo)
    second = llmkit.chat("And again", model=engine, conversation=convo)
    assert (first.text, second.text) == ("Reply 1.", "Reply 2.")
    assert convo.messages == [
        {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Reply 1."},
        {"role": "user", "content": "And again"}, {"role": "assistant", "content": "Reply 2."}]
    assert engine.chats[-1][0] == {"role": "system", "content": "You are terse."}
    g = second.generation
    assert g.prompt_tokens_evaluated < g.prompt_tokens  # only the new turn was evaluated


def test_chat_without_a_conversation_and_with_the_catalog_system_prompt() -> None:
    engine = FakeEngine("Hi!", model_name="smollm2:135m")
    assert llmkit.chat("Hello", model=engine).text == "Hi!"
    assert engine.chats[0][0]["content"] == "You are a helpful assistant."
    convo = llmkit.Conversation()
    llmkit.chat("Hello", model=engine, conversation=convo, system="Be kind.")
    assert convo.system == "Be kind."
    with pytest.raises(InputError, match="the message is empty"):
        llmkit.chat("", model=engine)


def test_chat_with_an_image_file(tmp_path: Path) -> None:
    picture = images.write_photo_jpeg(tmp_path, size=(64, 48))
    engine = FakeEngine("A gradient.", vision=True)
    convo = llmkit.Conversation()
    reply = llmkit.chat("What is this?", model=engine, conversation=convo, images=[picture])
    assert reply.text == "A gradient."
    assert convo.messages[0]["images"] == [str(picture)]


# -- caption --------------------------------------------------------------------------------


def test_caption_a_file_bytes_and_a_pillow_image(tmp_path: Path) -> None:
    from PIL import Image

    picture = tmp_path / "photo.png"
    picture.write_bytes(photo_bytes())
    engine = FakeEngine("Caption: A colourful gradient.", vision=True)
    record = llmkit.caption(picture, model=engine)
    assert record["path"] == str(picture)
    assert (record["caption"], record["style"], record["model"], record["error"]) == (
        "A colourful gradient.", "short", "fake", None)
    assert record["image"]["width"] == 64 and record["usage"]["image_tokens"] == 16
    from_bytes = llmkit.caption(picture.read_bytes(), model=engine)
    with Image.open(picture) as opened:
        from_pillow = llmkit.caption(opened, model=engine)
    for other in (from_bytes, from_pillow):
        assert other["path"] is None
        assert other["caption"] == record["caption"] and other["image"] == record["image"]
    # The same pixels every way: one image, as the ids its cells get from its pixels say.
    assert len({tuple(t for t in c.prompt if t < 0) for c in engine.calls}) == 1
    assert not engine.closed


def test_caption_styles_prompts_and_limits() -> None:
    engine = FakeEngine("Red, GREEN, red, - blue", vision=True)
    tags = llmkit.caption(photo_bytes(), model=engine, style="tags")
    assert tags["caption"] == "red, green, blue"
    assert engine.calls[-1].params is not None and engine.calls[-1].params.max_tokens == 96
    custom = llmkit.caption(photo_bytes(), model=engine, prompt="Count the colours.",
                            max_tokens=7)
    assert custom["style"] == "custom"
    assert "Count the colours." in engine.calls[-1].text
    assert engine.calls[-1].params is not None and engine.calls[-1].params.max_tokens == 7
    with pytest.raises(InputError, match="unknown style 'poem'"):
        llmkit.caption(photo_bytes(), model=engine, style="poem")


def test_caption_errors(tmp_path: Path) -> None:
    with pytest.raises(NotAVisionModelError):
        llmkit.caption(photo_bytes(), model=FakeEngine())
    with pytest.raises(ImageError, match="not an image"):
        llmkit.caption(images.write_text_as_jpg(tmp_path), model="qqqqqqqqqqqq")
    with pytest.raises(ImageError):
        llmkit.caption(tmp_path / "missing.jpg", model="qqqqqqqqqqqq")
    with pytest.raises(LlmkitError, match="the model gave an empty caption"):
        llmkit.caption(photo_bytes(), model=FakeEngine("  ", vision=True))


def test_caption_a_cmyk_pillow_image() -> None:
    from PIL import Image

    engine = FakeEngine("Cyan.", vision=True)
    record = llmkit.caption(Image.new("CMYK", (32, 16), (255, 0, 0, 0)), model=engine)
    assert record["caption"] == "Cyan." and record["image"]["width"] == 32


# -- summarize ------------------------------------------------------------------------------


def test_summarize_text_a_file_and_bytes(tmp_path: Path) -> None:
    engine = FakeEngine("It is short.", tokens="words")
    summary = llmkit.summarize("A short note about the harbour.", model=engine)
    assert summary.text == "It is short."
    assert (summary.chunks, summary.levels, summary.calls) == (1, 0, 1)
    note = tmp_path / "note.md"
    note.write_text("# Harbour\n\nA short note about the harbour.   \n")
    from_file = llmkit.summarize(note, model=engine, length="short", style="bullets")
    assert from_file.text == "It is short."
    assert "bulleted list" in engine.chats[-1][-1]["content"]
    assert "# Harbour\n\nA short note about the harbour." in engine.chats[-1][-1]["content"]
    llmkit.summarize(note.read_bytes(), model=engine, focus="boats", language="French")
    assert "Focus on: boats. Write in French." in engine.chats[-1][-1]["content"]
    (call, *_) = engine.calls
    assert call.params is not None and call.params.temperature == 0.2  # summaries run cool


def test_summarize_a_long_text_in_chunks() -> None:
    engine = FakeEngine("A part.", tokens="words", n_ctx=400)
    text = " ".join(f"Sentence {i} is about the harbour." for i in range(200))
    summary = llmkit.summarize(text, model=engine, words=20)
    assert summary.chunks > 1 and summary.calls == summary.chunks + summary.merges + 1
    assert summary.plan and summary.text == "A part."


def test_summarize_errors(tmp_path: Path, loads: list[FakeEngine]) -> None:
    engine = FakeEngine(tokens="words")
    with pytest.raises(InputError, match="unknown length 'tiny'"):
        llmkit.summarize("text", model="smollm2:135m", length="tiny")
    with pytest.raises(DocumentError, match="the document is empty"):
        llmkit.summarize("  \n", model="smollm2:135m")
    with pytest.raises(DocumentError, match="is empty"):
        (tmp_path / "empty.txt").write_bytes(b"")
        llmkit.summarize(tmp_path / "empty.txt", model="smollm2:135m")
    assert loads == []  # each refused before a model was opened
    with pytest.raises(ContextTooSmallError):
        llmkit.summarize("word " * 500, model=FakeEngine(tokens="words", n_ctx=64))
    with pytest.raises(UsageError, match="this engine is already open"):
        llmkit.summarize("text", model=engine, device="cpu")


def test_summarize_warnings_go_to_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    engine = FakeEngine("Short.", tokens="words")
    with caplog.at_level(logging.WARNING, logger="llmkit"):
        llmkit.summarize("caf\xe9 au lait".encode("cp1252"), model=engine)
    assert any("windows-1252" in r.getMessage().lower() for r in caplog.records), caplog.text


# -- check ----------------------------------------------------------------------------------


def test_check_a_text_a_response_and_a_conversation() -> None:
    guard = ScriptedGuardEngine(answer="unsafe\nS1")
    verdict = llmkit.check("How do I hurt someone?", model=guard)
    assert verdict.flagged and verdict.label == "unsafe: S1 Violent Crimes"
    assert verdict.role == "User" and verdict.decided_by == "answer"
    answer = llmkit.check("How do I hurt someone?", model=guard, response="You don't.")
    assert answer.role == "Agent"
    assert guard.generated[-1] == "User: How do I hurt someone?\n\nAgent: You don't."
    conversation = [{"role": "system", "content": "ignored"},
                    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert llmkit.check(conversation, model=guard).role == "Agent"
    convo = llmkit.Conversation(system="s", messages=[{"role": "user", "content": "Hi"}])
    assert llmkit.check(convo, model=guard).role == "User"
    assert not guard.closed


def test_check_policy_threshold_and_exclusions(tmp_path: Path) -> None:
    guard = ScriptedGuardEngine(answer="safe")
    scored = llmkit.check("Hello", model=guard, threshold=0.5)
    assert scored.decided_by == "threshold" and scored.flagged  # P(unsafe) = 3/4
    assert not llmkit.check("Hello", model=guard, threshold=0.9).flagged
    llmkit.check("Hello", model=guard, exclude="S7,S8")
    prompt = guard.calls[-1].text
    assert "S6: Specialized Advice." in prompt and "S7:" not in prompt and "S8:" not in prompt
    llmkit.check("Hello", model=guard, exclude=["s1"])
    assert "S1:" not in guard.calls[-1].text
    policy = tmp_path / "policy.toml"
    policy.write_text('[[categories]]\ncode = "C1"\nname = "Cats"\n')
    flagged = llmkit.check("Hello", model=ScriptedGuardEngine(answer="unsafe\nC1"),
                           categories=policy)
    assert flagged.label == "unsafe: C1 Cats"


def test_check_errors(loads: list[FakeEngine]) -> None:
    guard = ScriptedGuardEngine(answer="I think it is fine")
    with pytest.raises(VerdictError):  # fails closed, never "safe"
        llmkit.check("Hello", model=guard)
    with pytest.raises(InputError, match="the text to check is empty"):
        llmkit.check(" ", model=guard)
    with pytest.raises(UsageError, match="response"):
        llmkit.check([{"role": "user", "content": "Hi"}], model=guard, response="Hello")
    with pytest.raises(InputError, match="alternate"):
        llmkit.check([{"role": "assistant", "content": "Hi"}], model=guard)
    with pytest.raises(UsageError, match="cannot exclude S99"):
        llmkit.check("Hello", model=guard, exclude="S99")
    with pytest.raises(InputError, match=r"message 1 holds \\udcff"):
        llmkit.check([{"role": "user", "content": "\udcff"}], model=guard)
    assert loads == []


def test_check_by_name_closes_the_guard(loads: list[FakeEngine]) -> None:
    # A scripted engine with ChatML stands in for the guard loaded by name.
    with pytest.raises(VerdictError):
        llmkit.check("Hello", model="smollm2:135m")
    (engine,) = loads
    assert engine.closed


# -- guard= ----------------------------------------------------------------------------------


def flag_answers(conversation: str) -> str:
    """A guard that passes every prompt and flags every answer."""
    return "unsafe\nS1" if "\n\nAgent: " in conversation else "safe"


def test_a_guarded_run_checks_the_prompt_then_the_answer() -> None:
    engine, guard = FakeEngine("Paris."), ScriptedGuardEngine(answer="safe")
    pieces: list[str] = []
    reply = llmkit.run("Capital of France?", model=engine, guard=guard, on_text=pieces.append)
    assert reply.text == "Paris." and pieces == ["Paris."]  # held back until checked
    assert guard.generated == ["User: Capital of France?",
                               "User: Capital of France?\n\nAgent: Paris."]
    assert not guard.closed and not engine.closed


def test_a_flagged_prompt_is_never_answered() -> None:
    engine = FakeEngine("Paris.")
    with pytest.raises(FlaggedError) as caught:
        llmkit.run("Capital of France?", model=engine,
                   guard=ScriptedGuardEngine(answer="unsafe\nS1"))
    assert caught.value.stage == "prompt" and caught.value.exit_code == 3
    assert str(caught.value) == ("the prompt was flagged by scripted-guard (S1 Violent "
                                 "Crimes); nothing was generated")
    assert engine.calls == []


def test_a_flagged_answer_is_withheld_everywhere(tmp_path: Path) -> None:
    guard = ScriptedGuardEngine(answer=flag_answers)
    pieces: list[str] = []
    with pytest.raises(FlaggedError, match="the answer was flagged") as caught:
        llmkit.run("hi", model=FakeEngine(), guard=guard, on_text=pieces.append)
    assert caught.value.stage == "output" and pieces == []
    convo = llmkit.Conversation()
    with pytest.raises(FlaggedError):
        llmkit.chat("hi", model=FakeEngine(), conversation=convo, guard=guard)
    assert convo.messages == []  # the turn did not happen
    with pytest.raises(FlaggedError, match="the answer was flagged"):
        llmkit.caption(photo_bytes(), model=FakeEngine("A cat.", vision=True), guard=guard)
    with pytest.raises(FlaggedError, match="the answer was flagged"):
        llmkit.summarize("A note.", model=FakeEngine("Short.", tokens="words"), guard=guard)


def test_guarded_caption_and_summary_records() -> None:
    guard = ScriptedGuardEngine(answer="safe")
    record = llmkit.caption(photo_bytes(), model=FakeEngine("A cat.", vision=True),
                            guard=guard)
    assert record["caption"] == "A cat." and record["flagged"] is False
    assert record["guard"]["output"]["verdict"] == "safe"
    assert guard.generated[-1] == "User: Describe this image in one sentence.\n\nAgent: A cat."
    # Your own instruction is input, checked first; a flagged one costs no caption.
    engine = FakeEngine("A cat.", vision=True)
    with pytest.raises(FlaggedError, match="the prompt was flagged"):
        llmkit.caption(photo_bytes(), model=engine, prompt="Describe the weapon.",
                       guard=ScriptedGuardEngine(answer="unsafe\nS9"))
    assert engine.calls == []
    summarizer = FakeEngine("Short.", tokens="words")
    with pytest.raises(FlaggedError, match="the prompt was flagged"):
        llmkit.summarize("A note.", model=summarizer,
                         guard=ScriptedGuardEngine(answer="unsafe\nS1"))
    assert summarizer.calls == []
    assert llmkit.summarize("A note.", model=summarizer, guard=guard).text == "Short."


def test_guard_threshold_and_a_guard_by_name(loads: list[FakeEngine],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # Decided by score (P(unsafe) = 3/4 here), not by the answer.
    guard = ScriptedGuardEngine(answer="unsafe\nS1")
    assert llmkit.run("hi", model=FakeEngine(), guard=guard, guard_threshold=0.9).text == "OK."
    with pytest.raises(FlaggedError):
        llmkit.run("hi", model=FakeEngine(), guard=guard, guard_threshold=0.5)
    # A threshold alone implies the default guard model, opened by name and closed after
    # (a scripted engine whose "safe" and "unsafe" are equally likely: P(unsafe) = 1/2).
    monkeypatch.setenv("LLMKIT_GUARD_MODEL", "smollm2:135m")
    with pytest.raises(FlaggedError):
        llmkit.run("hi", guard_threshold=0.5)
    (opened,) = loads  # only the guard: the refused prompt loaded no model
    assert opened.closed and opened.model_name == "smollm2:135m"
    with pytest.raises(VerdictError):  # a scripted ChatML engine answers no verdict
        llmkit.run("hi", guard="smollm2:135m")


# -- load -----------------------------------------------------------------------------------


def test_load_opens_and_leaves_open(loads: list[FakeEngine], caplog: pytest.LogCaptureFixture,
                                    tmp_path: Path) -> None:
    with caplog.at_level(logging.INFO, logger="llmkit"):
        engine = llmkit.load()  # the default model falls back to the embedded one
    assert engine is loads[0] and not loads[0].closed
    assert engine.model_name == "smollm2:135m"
    assert any("using the embedded smollm2:135m" in r.getMessage() for r in caplog.records)
    with engine:
        llmkit.run("hi", model=engine)
        assert not loads[0].closed
    assert loads[0].closed
    projector = tmp_path / "mmproj.gguf"
    projector.write_bytes(b"GGUF")
    vision = llmkit.load("smollm2:135m", mmproj=projector)
    assert vision.vision
    with pytest.raises(UsageError, match="unknown model kind 'image'"):
        llmkit.load(kind="image")
    with pytest.raises(NotAVisionModelError):
        llmkit.load("smollm2:135m", kind="vision")


# -- against the CLI, with real models --------------------------------------------------------

PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SmolVLM converted by `llmkit convert`; its projector lies beside it."""
    from tests.vision_checkpoints import build_tiny_smolvlm

    ckpt = tmp_path_factory.mktemp("hf") / "SmolVLM-tiny"
    build_tiny_smolvlm(ckpt)
    out = tmp_path_factory.mktemp("vlm")
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out / "vlm.gguf")])
    assert proc.returncode == 0, proc.stderr
    return out / "vlm.gguf"


def cli(args: list[str], *, input: str | None = None, rc: int = 0) -> str:
    proc = run_llmkit(args, input=input)
    assert proc.returncode == rc, proc.stderr
    return proc.stdout


def without_timings(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "timings"}


@pytest.mark.slow
def test_run_and_chat_answer_as_the_cli_does(smollm2_path: Path) -> None:
    reply = llmkit.run(PROMPT, max_tokens=24)  # the default model: the embedded SmolLM2
    assert reply.model == "smollm2:135m"
    assert cli(["run", "--max-tokens", "24", "-q", PROMPT]) == reply.text + "\n"
    data = json.loads(cli(["run", "--max-tokens", "24", "-q", "-f", "json", PROMPT]))
    ours = reply.to_dict()
    assert {k: data[k] for k in ours if k != "timings"} == {
        k: v for k, v in ours.items() if k != "timings"}
    context = "Paris is the capital of France. Berlin is the capital of Germany."
    with_context = llmkit.run("Which city is in Germany?", context=context, max_tokens=16)
    assert cli(["run", "--max-tokens", "16", "-q", "Which city is in Germany?"],
               input=context) == with_context.text + "\n"
    by_path = llmkit.run(PROMPT, model=smollm2_path, temperature=0, max_tokens=16)
    assert cli(["run", "-m", str(smollm2_path), "--temperature", "0", "--max-tokens", "16",
                PROMPT]) == by_path.text + "\n"
    chatted = llmkit.chat(PROMPT, max_tokens=24)
    assert cli(["chat", "--max-tokens", "24", "-q"], input=PROMPT) == chatted.text + "\n"


@pytest.mark.slow
def test_guarded_runs_are_the_clis(smollm2_path: Path) -> None:
    smol = str(smollm2_path)  # standing in for Llama Guard, deciding by threshold
    passed = llmkit.run(PROMPT, max_tokens=16, guard=smol, guard_threshold=1)
    assert cli(["run", "--max-tokens", "16", "-q", "--guard-model", smol,
                "--guard-threshold", "1", PROMPT]) == passed.text + "\n"
    with pytest.raises(FlaggedError) as caught:
        llmkit.run(PROMPT, max_tokens=16, guard=smol, guard_threshold=0)
    proc = run_llmkit(["run", "--max-tokens", "16", "-q", "--guard-model", smol,
                       "--guard-threshold", "0", PROMPT])
    assert (proc.returncode, proc.stdout) == (3, "")
    assert proc.stderr == f"llmkit: flagged: {caught.value}\n"


@pytest.mark.slow
def test_an_open_model_answers_as_one_opened_each_time(tmp_path: Path) -> None:
    with llmkit.load() as model:
        first = llmkit.run(PROMPT, model=model, max_tokens=24)
        convo = llmkit.Conversation()
        llmkit.chat("My name is Ada.", model=model, conversation=convo, max_tokens=16)
        saved = tmp_path / "convo.json"
        convo.save(saved)
        second = llmkit.chat("What is my name?", model=model, conversation=convo,
                             max_tokens=16)
        assert len(convo.messages) == 4
        llmkit.run(PROMPT, model=model, max_tokens=4)  # still open
    assert first.text == llmkit.run(PROMPT, max_tokens=24).text
    # The second turn evaluated only what the cache did not hold.
    assert second.generation.prompt_tokens_evaluated < second.generation.prompt_tokens
    # A conversation /save wrote goes on as in `chat --load` (opened afresh, so the answer
    # is computed exactly as the CLI computes it, without the cache's batch boundaries).
    again = llmkit.chat("What is my name?", conversation=llmkit.Conversation.load(saved),
                        max_tokens=16)
    assert cli(["chat", "--max-tokens", "16", "-q", "--load", str(saved)],
               input="What is my name?") == again.text + "\n"


@pytest.mark.slow
def test_summaries_are_the_clis(tmp_path: Path) -> None:
    from tests.test_e2e_summarize import long_text

    note = tmp_path / "note.md"
    note.write_text(long_text(2))
    summary = llmkit.summarize(note, length="short")
    (record,) = json.loads(cli(["summarize", str(note), "--length", "short", "-q", "-f",
                                "json"]))
    assert record["summary"] == summary.text
    assert (record["chunks"], record["levels"], record["merges"], record["calls"]) == (
        summary.chunks, summary.levels, summary.merges, summary.calls)
    assert record["usage"]["input_tokens"] == summary.input_tokens
    assert record["usage"]["output_tokens"] == summary.output_tokens
    text = long_text(1)
    assert cli(["summarize", "--length", "short", "-q"], input=text) == (
        llmkit.summarize(text, length="short").text + "\n")
    history = tmp_path / "history.md"
    history.write_text(long_text(6))
    chunked = llmkit.summarize(history, length="short", ctx=512)
    (record,) = json.loads(cli(["summarize", str(history), "--length", "short", "--ctx", "512",
                                "-q", "-f", "json"]))
    assert chunked.chunks > 1 and record["chunks"] == chunked.chunks
    assert record["summary"] == chunked.text
    assert record["usage"]["prompt_tokens_evaluated"] == chunked.prompt_tokens_evaluated


@pytest.mark.slow
def test_checks_are_the_clis(smollm2_path: Path) -> None:
    smol = str(smollm2_path)
    flagged = llmkit.check(PROMPT, model=smol, threshold=0)
    assert flagged.flagged and flagged.label == "unsafe"
    assert cli(["check", "-m", smol, "--threshold", "0", PROMPT], rc=3) == "unsafe\n"
    ours = llmkit.check(PROMPT, model=smol, threshold=0.5, exclude="S7").to_dict()
    data = json.loads(cli(["check", "-m", smol, "--threshold", "0.5", "-f", "json", PROMPT,
                           "--exclude", "S7"], rc=3 if ours["flagged"] else 0))
    assert without_timings(data) == without_timings(ours)
    response = llmkit.check(PROMPT, model=smol, response="Paris.", threshold=1)
    assert not response.flagged and response.role == "Agent"
    assert cli(["check", "-m", smol, "--threshold", "1", "--prompt", PROMPT, "--response",
                "Paris."]) == "safe\n"
    with pytest.raises(VerdictError) as caught:  # SmolLM2 is no Llama Guard: fails closed
        llmkit.check(PROMPT, model=smol)
    stderr = run_llmkit(["check", "-m", smol, PROMPT]).stderr
    assert stderr == f"llmkit: error: {caught.value}\n"
    with llmkit.load(smol, kind="guard") as guard:
        on_open = llmkit.check(PROMPT, model=guard, threshold=0.5, exclude="S7").to_dict()
    assert without_timings(on_open) == without_timings(ours)


@pytest.mark.slow
def test_captions_are_the_clis(vlm: Path, tmp_path: Path) -> None:
    from PIL import Image

    picture = tmp_path / "photo.png"
    picture.write_bytes(photo_bytes())
    # A path's file name has no catalog entry, so greedy is asked for, here as in the CLI.
    greedy = {"max_tokens": 8, "temperature": 0}
    flags = ["-m", str(vlm), "--max-tokens", "8", "--temperature", "0", "-q"]
    record = llmkit.caption(picture, model=vlm, **greedy)
    (theirs,) = json.loads(cli(["caption", str(picture), *flags, "-f", "json"]))
    assert without_timings(theirs) == without_timings(record)
    # Bytes and a Pillow image are the same pixels as the file, so the same caption.
    assert llmkit.caption(picture.read_bytes(), model=vlm, **greedy)["caption"] == (
        record["caption"])
    with Image.open(picture) as opened:
        assert llmkit.caption(opened, model=vlm, **greedy)["caption"] == record["caption"]
    answer = llmkit.run("What is this?", model=vlm, images=[picture], **greedy)
    assert cli(["run", *flags, "--image", str(picture), "What is this?"]) == answer.text + "\n"
    with llmkit.load(vlm, kind="vision") as model:
        assert model.vision
        # The first call on a fresh engine computes what a fresh load does.
        assert llmkit.caption(picture, model=model, **greedy)["caption"] == record["caption"]
        assert llmkit.run("What is this?", model=model, images=[picture], **greedy).text
    with pytest.raises(NotAVisionModelError):
        llmkit.caption(picture, model="smollm2:135m")


# -- the README's examples run --------------------------------------------------------------


def readme_examples() -> list[str]:
    """The python blocks of the README's "Python API" section."""
    _, found, rest = README.read_text().partition("\n## Python API\n")
    return re.findall(r"```python\n(.*?)```", rest.split("\n## ", 1)[0], re.S) if found else []


def test_the_readme_has_examples_for_every_function() -> None:
    code = "\n".join(readme_examples())
    for name in ("run", "chat", "caption", "summarize", "check", "load"):
        assert f"llmkit.{name}(" in code, name


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs(index: int, vlm: Path, smollm2_path: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    from tests.test_e2e_summarize import long_text

    # The defaults the examples rely on: the embedded SmolLM2 for text, the tiny SmolVLM for
    # images, and SmolLM2 standing in for Llama Guard (the examples decide by threshold).
    monkeypatch.setenv("LLMKIT_VISION_MODEL", str(vlm))
    monkeypatch.setenv("LLMKIT_GUARD_MODEL", str(smollm2_path))
    monkeypatch.chdir(tmp_path)
    images.write_photo_jpeg(tmp_path, size=(64, 48))
    (tmp_path / "report.md").write_text(long_text(2))
    exec(compile(readme_examples()[index], f"README.md example {index + 1}", "exec"), {})
    assert capsys.readouterr().out.strip()
