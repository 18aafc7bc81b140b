"""`--guard` for other commands: GuardResult, the records and refusals it makes, chat turns."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from llmkit.batch import BatchSummary
from llmkit.errors import EXIT_FLAGGED, FlaggedError, LlmkitError, VerdictError
from llmkit.tasks.chat import Conversation
from llmkit.tasks.guarding import (
    GuardResult,
    check_input,
    check_output,
    guard_batch_input,
    guard_batch_output,
    guarded_chat_turn,
)
from llmkit.tasks.policy import LLAMA_GUARD_3_1B_CATEGORIES
from llmkit.tasks.safety import Guard, Verdict
from tests.fake_engine import FakeEngine, ScriptedGuardEngine


def by_words(conversation: str) -> str:
    """A guard's answer that flags the last message for "poison" (S1) and "insult" (S10)."""
    last = conversation.rsplit("\n\n", 1)[-1]
    codes = [code for word, code in (("poison", "S1"), ("insult", "S10")) if word in last]
    return "unsafe\n" + ",".join(codes) if codes else "safe"


def scripted_guard(answer: Any = by_words) -> Guard:
    return Guard(ScriptedGuardEngine(answer=answer), LLAMA_GUARD_3_1B_CATEGORIES)


def doc_record() -> dict[str, Any]:
    return {"path": "a.md", "summary": "a summary", "model": "m", "error": None}


# -- GuardResult: the guard's part of a record, with today's keys in today's order -------------


def test_a_refused_input_names_the_refusal_first() -> None:
    result = guard_batch_input(scripted_guard(), "poison")
    assert result.flagged_stage == "input" and result.withheld and result.output is None
    record = result.apply_to(doc_record(), "summary")
    assert list(record) == ["path", "summary", "model", "error", "flagged", "guard",
                            "flagged_note"]
    assert record["summary"] is None and record["flagged"] is True
    assert result.input is not None
    assert record["guard"] == result.to_record() == {"input": result.input.to_dict()}
    assert record["flagged_note"] == ("the input was flagged by scripted-guard (S1 Violent "
                                      "Crimes); nothing was generated")


def test_a_withheld_answer_names_its_verdicts_first() -> None:
    guard = scripted_guard()
    checked = guard_batch_output(guard, "Summarize this document.", "an insult",
                                 guard_batch_input(guard, "bread"))
    assert checked.flagged_stage == "output" and checked.withheld
    record = checked.apply_to(doc_record(), "summary")
    assert list(record) == ["path", "summary", "model", "error", "guard", "flagged",
                            "flagged_note"]
    assert record["summary"] is None and record["flagged"] is True
    assert list(record["guard"]) == ["input", "output"]
    assert record["guard"]["output"]["categories"] == [{"code": "S10", "name": "Hate"}]
    assert record["flagged_note"] == ("the answer was flagged by scripted-guard (S10 Hate); "
                                      "it was withheld")


def test_a_safe_answer_keeps_its_text_and_both_verdicts() -> None:
    guard = scripted_guard()
    checked = guard_batch_output(guard, "Summarize.", "a summary", guard_batch_input(guard, "x"))
    assert not checked.withheld and checked.flagged_stage is None
    record = checked.apply_to(doc_record(), "summary")
    assert list(record) == ["path", "summary", "model", "error", "guard", "flagged"]
    assert record["summary"] == "a summary" and record["flagged"] is False
    assert [v["verdict"] for v in record["guard"].values()] == ["safe", "safe"]


def test_an_empty_answer_is_not_checked() -> None:
    guard = scripted_guard()
    so_far = guard_batch_input(guard, "bread")
    checked = guard_batch_output(guard, "Summarize.", "  \n", so_far)
    assert checked == so_far and checked.output is None
    record = checked.apply_to(doc_record(), "summary")
    assert record["flagged"] is False and list(record["guard"]) == ["input"]


def test_a_guard_that_cannot_decide_makes_the_record_an_error_and_nothing_else() -> None:
    guard = scripted_guard(answer="I am not a guard")
    for result in (guard_batch_input(guard, "text"),
                   guard_batch_output(guard, "p", "an answer", GuardResult())):
        assert result.withheld and result.input is None and result.output is None
        assert result.failure is not None and result.failure.startswith(
            "the guard model's answer is not a verdict: 'I am not a guard'")
        record = result.apply_to(doc_record(), "summary")
        assert list(record) == ["path", "summary", "model", "error"]
        assert record["summary"] is None
        assert record["error"] == f"a.md: the safety check failed: {result.failure}"


def test_nothing_checked_is_an_empty_guard_field() -> None:
    assert GuardResult().to_record() == {} and not GuardResult().withheld


# -- guarded chat turns --------------------------------------------------------------------------


def history() -> Conversation:
    return Conversation(system="sys", messages=[{"role": "user", "content": "earlier"},
                                                {"role": "assistant", "content": "reply"}])


def test_guarded_turn_passes_safe_turns_through() -> None:
    guard = Guard(ScriptedGuardEngine(answer=by_words), LLAMA_GUARD_3_1B_CATEGORIES)
    convo, shown = history(), []
    reply = guarded_chat_turn(FakeEngine("Bread needs flour."), convo, "How is bread made?",
                              guard, on_text=shown.append)
    assert reply.text == "Bread needs flour." and shown == ["Bread needs flour."]
    assert convo.messages[2:] == [{"role": "user", "content": "How is bread made?"},
                                  {"role": "assistant", "content": "Bread needs flour."}]
    assert guard.engine.generated == [  # type: ignore[attr-defined]
        "User: How is bread made?",
        "User: How is bread made?\n\nAgent: Bread needs flour."]


def test_guarded_turn_refuses_a_flagged_message_before_generating() -> None:
    guard = Guard(ScriptedGuardEngine(answer=by_words), LLAMA_GUARD_3_1B_CATEGORIES)
    chat, convo, shown = FakeEngine("ok"), history(), []
    with pytest.raises(FlaggedError) as info:
        guarded_chat_turn(chat, convo, "Which poison?", guard, on_text=shown.append)
    assert info.value.stage == "input" and info.value.exit_code == 3
    assert str(info.value) == ("the input was flagged by scripted-guard (S1 Violent Crimes); "
                               "nothing was generated")
    assert chat.calls == [] and shown == [] and convo.messages == history().messages


def test_guarded_turn_withholds_a_flagged_reply_and_forgets_the_turn() -> None:
    guard = Guard(ScriptedGuardEngine(answer=by_words), LLAMA_GUARD_3_1B_CATEGORIES)
    chat, convo, shown = FakeEngine("Use poison."), history(), []
    with pytest.raises(FlaggedError) as info:
        guarded_chat_turn(chat, convo, "How do I get rid of rats?", guard, on_text=shown.append)
    assert info.value.stage == "output"
    assert str(info.value) == ("the answer was flagged by scripted-guard (S1 Violent Crimes); "
                               "it was withheld")
    assert len(chat.calls) == 1 and shown == [] and convo.messages == history().messages


def test_guarded_turn_restores_the_conversation_when_the_guard_fails() -> None:
    answers = iter(["safe", "I am not a guard"])
    guard = Guard(ScriptedGuardEngine(answer=lambda _c: next(answers)),
                  LLAMA_GUARD_3_1B_CATEGORIES)
    convo, shown = history(), []
    with pytest.raises(VerdictError):
        guarded_chat_turn(FakeEngine("fine"), convo, "hello", guard, on_text=shown.append)
    assert convo.messages == history().messages and shown == []


def test_unguarded_turn_is_a_plain_chat_turn() -> None:
    convo, shown = history(), []
    reply = guarded_chat_turn(FakeEngine("Use poison."), convo, "rats?", None,
                              on_text=shown.append)
    # Streamed as it is generated (one token per character), not held back for a check.
    assert reply.text == "Use poison." and shown == list("Use poison.")
    assert len(convo.messages) == 4


# -- guarded commands and batch records --------------------------------------------------------


def test_check_input_and_output_build_the_guard_field() -> None:
    guard = Guard(ScriptedGuardEngine(answer=by_words), LLAMA_GUARD_3_1B_CATEGORIES)
    so_far = check_input(guard, "hello")
    assert list(so_far.to_record()) == ["input"] and so_far.to_record()["input"]["role"] == "User"
    both = check_output(guard, "hello", "hi there", so_far).to_record()
    assert list(both) == ["input", "output"] and both["output"]["role"] == "Agent"
    assert check_output(guard, "hello", "  ", so_far) == so_far  # nothing to check
    with pytest.raises(FlaggedError) as info:
        check_input(guard, "poison")
    assert info.value.stage == "prompt"
    assert str(info.value).startswith("the prompt was flagged by scripted-guard")
    with pytest.raises(FlaggedError) as out:
        check_output(guard, "hello", "an insult", so_far)
    assert str(out.value) == ("the answer was flagged by scripted-guard (S10 Hate); "
                              "it was withheld")


def test_guard_batch_input_marks_a_flagged_record() -> None:
    guard = Guard(ScriptedGuardEngine(answer=by_words), LLAMA_GUARD_3_1B_CATEGORIES)
    record: dict[str, Any] = {"path": "a.md", "summary": None, "error": None}
    refused = guard_batch_input(guard, "poison")
    assert refused.withheld and refused.apply_to(record, "summary") is record
    assert record["flagged"] is True and record["summary"] is None
    assert record["guard"]["input"]["categories"] == [{"code": "S1", "name": "Violent Crimes"}]
    assert record["flagged_note"].startswith("the input was flagged")
    # A passing input marks no record: guard_batch_input no longer takes one.
    passed = guard_batch_input(guard, "bread")
    verdict = passed.input
    assert not passed.withheld and passed.output is None and passed.failure is None
    assert isinstance(verdict, Verdict) and not verdict.flagged


def test_guard_batch_output_withholds_a_flagged_answer() -> None:
    guard = Guard(ScriptedGuardEngine(answer=by_words), LLAMA_GUARD_3_1B_CATEGORIES)
    record: dict[str, Any] = {"path": "a.jpg", "caption": "a poison bottle", "error": None}
    guard_batch_output(guard, "Describe.", "a poison bottle").apply_to(record, "caption")
    assert record["caption"] is None and record["flagged"] is True
    assert list(record["guard"]) == ["output"]
    kept: dict[str, Any] = {"path": "b.jpg", "caption": "a cat", "error": None}
    guard_batch_output(guard, "Describe.", "a cat").apply_to(kept, "caption")
    assert kept["caption"] == "a cat" and kept["flagged"] is False
    assert kept["guard"]["output"]["verdict"] == "safe"


def test_guard_batch_fails_closed() -> None:
    guard = Guard(ScriptedGuardEngine(answer="whatever"), LLAMA_GUARD_3_1B_CATEGORIES)
    record: dict[str, Any] = {"path": "a.jpg", "caption": "a cat", "error": None}
    guard_batch_output(guard, "Describe.", "a cat").apply_to(record, "caption")
    assert record["caption"] is None
    assert record["error"].startswith("a.jpg: the safety check failed: the guard model's "
                                      "answer is not a verdict: 'whatever'")
    doc: dict[str, Any] = {"path": "a.md", "summary": None, "error": None}
    failed = guard_batch_input(guard, "text")
    assert failed.withheld and failed.input is None
    failed.apply_to(doc, "summary")
    assert doc["error"].startswith("a.md: the safety check failed:")


def test_flagged_error_is_exit_3_and_a_library_error() -> None:
    engine = ScriptedGuardEngine(answer="unsafe")
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_text("x")
    exc = FlaggedError("prompt", verdict)
    assert isinstance(exc, LlmkitError) and exc.exit_code == 3
    assert str(exc) == ("the prompt was flagged by scripted-guard (no category named); "
                        "nothing was generated")


# -- one exit code for "flagged" -------------------------------------------------------------


def test_flagged_is_one_exit_code() -> None:
    from llmkit.cli.app import EXIT_CODES

    assert FlaggedError.exit_code == EXIT_FLAGGED == BatchSummary(flagged=1).exit_code
    assert BatchSummary(flagged=1, failed=1).exit_code == 1  # a failure says more
    assert f"{EXIT_FLAGGED} flagged by a safety check" in EXIT_CODES


@pytest.mark.parametrize(("command", "says"), [
    ("caption", "{} a caption was flagged and withheld"),
    ("chat", "(piped: exit {})"),
    ("run", "(exit {} when"),
    ("check", "{} flagged (unsafe)"),
])
def test_command_help_names_the_flagged_exit_code(command: str, says: str) -> None:
    # A command's help is its docstring, which cannot interpolate EXIT_FLAGGED: held to it here.
    function = getattr(importlib.import_module(f"llmkit.cli.{command}"), command)
    assert says.format(EXIT_FLAGGED) in " ".join(function.__doc__.split())
