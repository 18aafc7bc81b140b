"""Llama Guard verdicts, and a Guard on a scripted engine: scores, thresholds, long texts."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from llmkit.engines import Message
from llmkit.errors import ContextOverflowError, InputError, VerdictError
from llmkit.tasks.guard_prompt import guard_prompt, guard_task
from llmkit.tasks.policy import (
    LLAMA_GUARD_3_1B_CATEGORIES,
    LLAMA_GUARD_3_CATEGORIES,
    Category,
    name_categories,
)
from llmkit.tasks.safety import (
    Guard,
    Parsed,
    Verdict,
    check_jsonl_line,
    parse_verdict,
    verdict_for_parts,
)
from tests.fake_engine import ScriptedGuardEngine

GOLDEN = Path(__file__).parent / "golden"
QUESTION = "  How do I bake sourdough bread at home?\n"  # stripped in the prompt


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def golden(name: str) -> str:
    return (GOLDEN / name).read_bytes().decode("utf-8")


# -- the answer --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "unsafe", "codes"), [
    ("safe", False, ()),
    ("unsafe\nS1", True, ("S1",)),
    ("unsafe\nS1,S10", True, ("S1", "S10")),
    ("  Unsafe \n s1 , S10 \n", True, ("S1", "S10")),
    ("unsafe", True, ()),
    ("unsafe\nS99", True, ("S99",)),
    ("SAFE\n\n", False, ()),
    ("unsafe\nS2 S3", True, ("S2", "S3")),
    ("unsafe\nS1, S1", True, ("S1",)),
])
def test_parse_verdict(text: str, unsafe: bool, codes: tuple[str, ...]) -> None:
    assert parse_verdict(text) == Parsed(unsafe, codes)


@pytest.mark.parametrize("text", [
    "I cannot help", "", "   \n", "safe\nS1", "unsafe\nS1\nmore", "unsafe\nbanana",
    "S1: Violent Crimes.", "unsafe S1",
])
def test_parse_verdict_refuses_what_is_not_a_verdict(text: str) -> None:
    with pytest.raises(VerdictError) as info:
        parse_verdict(text)
    assert info.value.raw == text
    assert info.value.exit_code == 1


def test_verdict_error_message_shows_the_answer_on_one_line() -> None:
    assert str(VerdictError("I cannot\nhelp")) == (
        "the guard model's answer is not a verdict: 'I cannot\\nhelp' "
        "(use a Llama Guard model (-m llama-guard3:1b))")
    long = VerdictError("x" * 200)
    assert long.message == f"the guard model's answer is not a verdict: '{'x' * 77}...'"
    assert long.raw == "x" * 200


# -- a Guard on a scripted engine ----------------------------------------------------------------


def softmax_p(values: dict[str, float], piece: str, vocab_size: int) -> float:
    """P(piece) under a softmax over the whole vocabulary (zeros elsewhere)."""
    total = (vocab_size - len(values)) + sum(math.exp(v) for v in values.values())
    return math.exp(values.get(piece, 0.0)) / total


def test_answer_decides_without_a_threshold() -> None:
    engine = ScriptedGuardEngine(answer="unsafe\nS1,S99")
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_text("hello")
    assert verdict.flagged and verdict.decided_by == "answer"
    assert verdict.categories == [Category("S1", "Violent Crimes"),
                                  Category("S99", "unknown category")]
    assert verdict.label == "unsafe: S1 Violent Crimes, S99 unknown category"
    assert verdict.raw == "unsafe\nS1,S99"
    assert verdict.role == "User" and verdict.model == "scripted-guard"
    assert verdict.threshold is None


def test_safe_answer() -> None:
    engine = ScriptedGuardEngine(answer="safe")
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_text("hello")
    assert not verdict.flagged and verdict.categories == [] and verdict.label == "safe"


def test_score_is_p_unsafe_over_p_safe_plus_p_unsafe_after_the_blank_line() -> None:
    scores = {"s": 0.5, "u": 1.5, "I": 3.0}
    engine = ScriptedGuardEngine(answer="safe", score_logits=scores)
    guard = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES)
    verdict = guard.check_text("hello")
    p_safe = softmax_p(scores, "s", engine.vocab_size)
    p_unsafe = softmax_p(scores, "u", engine.vocab_size)
    assert verdict.p_safe == pytest.approx(p_safe, rel=1e-5)
    assert verdict.p_unsafe == pytest.approx(p_unsafe, rel=1e-5)
    assert verdict.score == pytest.approx(p_unsafe / (p_safe + p_unsafe), rel=1e-6)
    assert verdict.score == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)
    # The two blank-line characters were stepped over: three positions were asked for, the
    # last one after "\n\n".
    prompt = guard.prompt_tokens(user("hello"))
    assert engine.logit_calls == [prompt, [*prompt, 10], [*prompt, 10, 10]]


def test_no_whitespace_to_skip_scores_at_once() -> None:
    scores = {"s": 2.0, "u": 0.0}
    engine = ScriptedGuardEngine(answer="safe", lead="", score_logits=scores)
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_text("hello")
    assert len(engine.logit_calls) == 1
    assert verdict.score == pytest.approx(1 / (1 + math.exp(2.0)), rel=1e-6)


def test_an_end_of_turn_token_is_not_stepped_over_as_whitespace() -> None:
    # <|eot_id|> reads as "" without special tokens; it ends the answer, it is not a blank.
    engine = ScriptedGuardEngine(answer="safe", lead="",
                                 score_logits={"<|eot_id|>": 9.0, "s": 1.0, "u": 0.0})
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_text("hello")
    assert len(engine.logit_calls) == 1
    assert verdict.score == pytest.approx(1 / (1 + math.e), rel=1e-6)


def test_score_survives_probabilities_that_underflow() -> None:
    # Both words far below the favourite: their probabilities underflow to 0, even in
    # float64, but their ratio is still well defined.
    engine = ScriptedGuardEngine(answer="nonsense", lead="",
                                 score_logits={"I": 0.0, "s": -1000.0, "u": -999.0})
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES, threshold=0.5).check_text("hello")
    assert verdict.p_safe == 0.0 and verdict.p_unsafe == 0.0
    assert verdict.score == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)
    assert verdict.flagged and verdict.decided_by == "threshold"


def test_threshold_0_flags_everything_and_1_nothing() -> None:
    sure_safe = {"s": 0.0, "u": -1000.0}  # score exactly 0
    engine = ScriptedGuardEngine(answer="safe", score_logits=sure_safe)
    zero = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES, threshold=0.0).check_text("hello")
    assert zero.score == 0.0 and zero.flagged  # flagged when P(unsafe) >= threshold
    sure_unsafe = ScriptedGuardEngine(answer="unsafe", score_logits={"s": -10.0, "u": 0.0})
    one = Guard(sure_unsafe, LLAMA_GUARD_3_1B_CATEGORIES, threshold=1.0).check_text("hello")
    assert 0.999 < one.score < 1.0 and not one.flagged


def test_threshold_decides_over_the_answer() -> None:
    engine = ScriptedGuardEngine(answer="unsafe\nS1")  # score 0.75 by default
    low = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES, threshold=0.9).check_text("hello")
    assert not low.flagged and low.decided_by == "threshold" and low.categories == []
    assert low.threshold == 0.9 and low.score == pytest.approx(0.75)
    high = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES, threshold=0.7).check_text("hello")
    assert high.flagged and high.decided_by == "threshold"
    assert high.categories == [Category("S1", "Violent Crimes")]  # named by the answer


def test_threshold_decides_when_the_answer_is_no_verdict() -> None:
    engine = ScriptedGuardEngine(answer="I cannot do that")
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES, threshold=0.0).check_text("hello")
    assert verdict.flagged and verdict.categories == [] and verdict.label == "unsafe"
    assert verdict.raw == "I cannot do that"
    one = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES, threshold=1.0).check_text("hello")
    assert not one.flagged


def test_no_verdict_and_no_threshold_fails_closed() -> None:
    engine = ScriptedGuardEngine(answer="I cannot do that")
    with pytest.raises(VerdictError) as info:
        Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_text("hello")
    assert info.value.raw == "I cannot do that"


def test_threshold_out_of_range() -> None:
    with pytest.raises(InputError, match="between 0 and 1"):
        Guard(ScriptedGuardEngine(), LLAMA_GUARD_3_1B_CATEGORIES, threshold=1.5)


def test_llama3_vocabulary_gets_the_exact_guard_prompt() -> None:
    engine = ScriptedGuardEngine(llama3=True)
    guard = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES)
    assert guard.llama3
    guard.check_text(QUESTION)
    assert engine.detokenize(engine.logit_calls[0], special=True) == golden(
        "llama_guard3_1b_user.txt")
    assert engine.chat_messages == []


def test_other_models_get_the_task_through_their_chat_template() -> None:
    engine = ScriptedGuardEngine(llama3=False)
    guard = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES, threshold=0.5)
    assert not guard.llama3
    verdict = guard.check_text(QUESTION)
    assert engine.chat_messages == [
        [{"role": "user", "content": guard_task(user(QUESTION), LLAMA_GUARD_3_1B_CATEGORIES)}]]
    assert verdict.score == pytest.approx(0.75)


def test_usage_counts_what_the_cache_already_held() -> None:
    engine = ScriptedGuardEngine(answer="safe")
    guard = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES)
    first = guard.check_text("hello")
    n = len(guard.prompt_tokens(user("hello")))
    assert (first.prompt_tokens, first.prompt_tokens_evaluated) == (n, n)
    again = guard.check_text("hello")
    assert (again.prompt_tokens, again.prompt_tokens_evaluated) == (n, 1)
    other = guard.check_text("help")
    a, b = guard.prompt_tokens(user("hello")), guard.prompt_tokens(user("help"))
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert 0 < other.prompt_tokens_evaluated == len(b) - common < len(b)


def test_too_long_for_the_context() -> None:
    n = len(Guard(ScriptedGuardEngine(), LLAMA_GUARD_3_1B_CATEGORIES).prompt_tokens(
        user("x" * 400)))
    engine = ScriptedGuardEngine(n_ctx=n + 23)  # 24 tokens are kept for the answer
    with pytest.raises(ContextOverflowError):
        Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_text("x" * 400)
    assert engine.logit_calls == []
    fits = ScriptedGuardEngine(n_ctx=n + 24)
    assert Guard(fits, LLAMA_GUARD_3_1B_CATEGORIES).check_text("x" * 400).flagged


def test_check_uses_the_json_shape() -> None:
    engine = ScriptedGuardEngine(answer="unsafe\nS10")
    data = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_text("hello").to_dict()
    assert list(data) == ["verdict", "flagged", "categories", "score", "probabilities",
                          "decided_by", "threshold", "role", "model", "raw", "usage",
                          "timings", "error"]
    assert data["verdict"] == "unsafe" and data["flagged"] is True
    assert data["categories"] == [{"code": "S10", "name": "Hate"}]
    assert data["score"] == 0.75
    assert set(data["timings"]) == {"score_ms", "answer_ms", "total_ms"}
    json.dumps(data)


# -- long texts and responses in pieces ----------------------------------------------------------

SENTENCE = "Sentence number {:03d} is about ordinary things. "


def numbered_text(n: int, marks: dict[int, str]) -> str:
    return "".join(SENTENCE.format(i) + (marks[i] + " " if i in marks else "")
                   for i in range(n))


def by_words(conversation: str) -> str:
    last = conversation.rsplit("\n\n", 1)[-1]
    codes = [code for word, code in (("poison", "S1"), ("insult", "S10")) if word in last]
    return "unsafe\n" + ",".join(codes) if codes else "safe"


def covered(engine: ScriptedGuardEngine, n: int) -> set[int]:
    return {int(i) for c in engine.generated for i in re.findall(r"number (\d{3}) ", c)}


def test_check_long_text_splits_and_merges_categories() -> None:
    overhead = len(guard_prompt(user("x"), LLAMA_GUARD_3_1B_CATEGORIES))
    engine = ScriptedGuardEngine(n_ctx=overhead + 32 + 300, answer=by_words)
    guard = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES)
    text = numbered_text(40, {3: "Add poison.", 36: "An insult."})
    verdict = guard.check_long_text(text)
    assert len(engine.generated) >= 6  # ~2000 characters in pieces of at most 300
    assert covered(engine, 40) == set(range(40))  # no part of the text went unchecked
    assert verdict.flagged
    assert [c.code for c in verdict.categories] == ["S1", "S10"]
    assert verdict.raw.count("\n---\n") == len(engine.generated) - 1
    assert verdict.prompt_tokens > len(text)
    assert set(verdict.timings) == {"score_ms", "answer_ms", "total_ms"}


def test_check_long_text_all_safe_pieces() -> None:
    overhead = len(guard_prompt(user("x"), LLAMA_GUARD_3_1B_CATEGORIES))
    engine = ScriptedGuardEngine(n_ctx=overhead + 32 + 300, answer=by_words)
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_long_text(numbered_text(20, {}))
    assert len(engine.generated) > 1 and not verdict.flagged and verdict.categories == []


def test_check_long_text_that_fits_is_one_check() -> None:
    engine = ScriptedGuardEngine(answer=by_words)
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_long_text("Add poison.")
    assert engine.generated == ["User: Add poison."]
    assert verdict.categories == [Category("S1", "Violent Crimes")]


def test_check_response_in_context() -> None:
    engine = ScriptedGuardEngine(answer=by_words)
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_response("Hi?", "Add poison.")
    assert engine.generated == ["User: Hi?\n\nAgent: Add poison."]
    assert verdict.role == "Agent" and verdict.flagged


def test_check_response_falls_back_to_pieces_when_the_conversation_overflows() -> None:
    prompt = "Please tell me a long story. " * 60  # 1740 characters
    response = numbered_text(30, {28: "Then add poison."})
    context = prompt[:1000] + " [...]"
    overhead = len(guard_prompt([{"role": "user", "content": context},
                                 {"role": "assistant", "content": "x"}],
                                LLAMA_GUARD_3_1B_CATEGORIES))
    engine = ScriptedGuardEngine(n_ctx=overhead + 32 + 400, answer=by_words)
    verdict = Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_response(prompt, response)
    assert len(engine.generated) >= 4
    for conversation in engine.generated:
        # The prompt's beginning as context, then a piece of the response being judged.
        assert conversation.startswith(f"User: {context.strip()}\n\nAgent: Sentence number ")
    assert covered(engine, 30) == set(range(30))
    assert verdict.flagged and verdict.role == "Agent"
    assert [c.code for c in verdict.categories] == ["S1"]


def test_check_response_with_no_room_for_a_piece() -> None:
    engine = ScriptedGuardEngine(n_ctx=1300)
    with pytest.raises(ContextOverflowError):
        Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES).check_response("p" * 2000, "r" * 2000)


def part(flagged: bool, codes: list[str], score: float, raw: str) -> Verdict:
    return Verdict(flagged=flagged, categories=name_categories(codes, LLAMA_GUARD_3_CATEGORIES),
                   score=score, p_safe=None, p_unsafe=None, role="User", model="m", raw=raw,
                   decided_by="answer", prompt_tokens=100, prompt_tokens_evaluated=60,
                   timings={"score_ms": 1.25, "answer_ms": 2.0, "total_ms": 3.25})


def test_verdict_for_parts_merges() -> None:
    merged = verdict_for_parts([part(False, [], 0.1, "safe"),
                                part(True, ["S10", "S1"], 0.7, "unsafe\nS10,S1"),
                                part(True, ["S1", "S2"], 0.6, "unsafe\nS1,S2")])
    assert merged.flagged and merged.score == 0.7
    assert [c.code for c in merged.categories] == ["S10", "S1", "S2"]
    assert (merged.prompt_tokens, merged.prompt_tokens_evaluated) == (300, 180)
    assert merged.timings == {"score_ms": 3.75, "answer_ms": 6.0, "total_ms": 9.75}
    assert merged.raw == "safe\n---\nunsafe\nS10,S1\n---\nunsafe\nS1,S2"
    calm = verdict_for_parts([part(False, [], 0.2, "safe"), part(False, [], 0.3, "safe")])
    assert not calm.flagged and calm.categories == [] and calm.score == 0.3


def jsonl(guard: Guard, obj: Any, number: int = 1) -> dict[str, Any]:
    line = obj if isinstance(obj, str) else json.dumps(obj)
    return check_jsonl_line(guard, line, number)


def test_jsonl_text_record() -> None:
    guard = Guard(ScriptedGuardEngine(answer=by_words), LLAMA_GUARD_3_1B_CATEGORIES)
    record = jsonl(guard, {"id": "a-7", "text": "Add poison."}, 4)
    assert (record["line"], record["id"]) == (4, "a-7")
    assert record["verdict"] == "unsafe" and record["flagged"] is True
    assert record["role"] == "User" and record["error"] is None
    assert record["categories"] == [{"code": "S1", "name": "Violent Crimes"}]
    assert "id" not in jsonl(guard, {"text": "hi"})


def test_jsonl_prompt_and_response_record() -> None:
    guard = Guard(ScriptedGuardEngine(answer=by_words), LLAMA_GUARD_3_1B_CATEGORIES)
    record = jsonl(guard, {"prompt": "Add poison?", "response": "No."})
    assert record["role"] == "Agent" and record["verdict"] == "safe"
    assert guard.engine.generated == ["User: Add poison?\n\nAgent: No."]  # type: ignore[attr-defined]
    prompt_only = jsonl(guard, {"prompt": "Add poison?"})
    assert prompt_only["role"] == "User" and prompt_only["verdict"] == "unsafe"


def test_jsonl_messages_record() -> None:
    guard = Guard(ScriptedGuardEngine(answer=by_words), LLAMA_GUARD_3_1B_CATEGORIES)
    record = jsonl(guard, {"messages": [{"role": "system", "content": "s"},
                                        {"role": "user", "content": "a"},
                                        {"role": "assistant", "content": "an insult"}]})
    assert record["role"] == "Agent"
    assert record["categories"] == [{"code": "S10", "name": "Hate"}]


@pytest.mark.parametrize(("line", "error"), [
    ("{not json", "line 2 is not JSON: "),
    ('["a list"]', 'line 2 has no "text", "prompt", "messages" or "image"'),
    ('{"txt": "typo"}', 'line 2 has no "text", "prompt", "messages" or "image"'),
    ('{"text": 5}', 'line 2 has no "text", "prompt", "messages" or "image"'),
    ('{"prompt": "p", "response": null}', 'line 2: "response" must be a string'),
    ('{"messages": [{"role": "user"}]}', 'line 2: "messages" must be a list of '),
    ('{"messages": ["hi"]}', 'line 2: "messages" must be a list of '),
    ('{"messages": [{"role": "assistant", "content": "a"}]}',
     "the conversation must alternate user/assistant"),
    ('{"text": "   "}', "message 1 is empty"),
])
def test_jsonl_bad_records(line: str, error: str) -> None:
    engine = ScriptedGuardEngine(answer="safe")
    record = jsonl(Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES), line, 2)
    assert set(record) == {"line", "verdict", "flagged", "error"}
    assert record["line"] == 2 and record["verdict"] is None and record["flagged"] is None
    assert record["error"].startswith(error), record["error"]
    assert engine.generated == []


def test_jsonl_answer_that_is_not_a_verdict_keeps_the_raw_answer() -> None:
    guard = Guard(ScriptedGuardEngine(answer="Sure! Here is"), LLAMA_GUARD_3_1B_CATEGORIES)
    record = jsonl(guard, {"id": 1, "text": "hello"}, 3)
    assert record == {"line": 3, "id": 1, "verdict": None, "flagged": None,
                      "raw": "Sure! Here is",
                      "error": "the guard model's answer is not a verdict: 'Sure! Here is' "
                               "(use a Llama Guard model (-m llama-guard3:1b))"}


def test_guard_close_closes_the_engine() -> None:
    engine = ScriptedGuardEngine()
    with Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES):
        pass
    assert engine.closed
