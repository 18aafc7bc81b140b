"""The summarize algorithm with a scripted engine: one pass, map and merge, budgets, errors."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from llmkit.engines import SamplingParams
from llmkit.errors import ContextTooSmallError, InputError
from llmkit.tasks.summarize import (
    Summarizer,
    SummaryOptions,
    _complete_sentences,
    check_options,
    final_instruction,
    part_instruction,
    summary_record,
)
from tests.fake_engine import Call, FakeEngine


class WordEngine(FakeEngine):
    """One token per word (with the whitespace before it); answers with a fixed number of
    words, ending in a sentence, within the token limit it is given."""

    def __init__(self, n_ctx: int, answer_words: int = 30) -> None:
        def answer(call: Call) -> str:
            assert call.params is not None
            n = min(answer_words, call.params.max_tokens or answer_words)
            return " ".join(f"w{i}" for i in range(n - 1)) + " end."

        super().__init__(answer, tokens="words", n_ctx=n_ctx, model_name="words")

    @property
    def prompts(self) -> list[str]:
        """The last message (the instruction and the text) of every prompt answered."""
        bodies = []
        for call in self.calls:
            assert call.messages is not None, "a prompt that chat_tokens did not make"
            bodies.append(call.messages[-1]["content"])
        return bodies


def _document(paragraphs: int, words: int = 40) -> str:
    return "\n\n".join(" ".join(f"p{p}w{i}" for i in range(words)) + "." for p in
                       range(paragraphs))


def test_a_short_document_is_one_call() -> None:
    engine = WordEngine(n_ctx=2048)
    summary = Summarizer(engine, SummaryOptions()).summarize(_document(3))
    assert (summary.chunks, summary.levels, summary.merges, summary.calls) == (1, 0, 0, 1)
    assert summary.input_tokens == 120
    assert engine.prompts[0].startswith(final_instruction(SummaryOptions(), from_parts=False))
    assert summary.text.endswith("end.")


def test_a_long_document_is_mapped_and_merged_and_nothing_is_dropped() -> None:
    engine = WordEngine(n_ctx=700, answer_words=60)
    text = _document(60)  # 2,400 words: several contexts' worth
    seen: list[tuple[str, int, int]] = []
    plans: list[list[dict[str, object]]] = []
    summary = Summarizer(engine, SummaryOptions(overlap=16),
                         on_progress=lambda s, i, n: seen.append((s, i, n)),
                         on_plan=plans.append).summarize(text)
    assert summary.chunks == len(plans[0]) > 4
    assert summary.calls == summary.chunks + summary.merges + 1
    assert summary.levels >= 1
    # Every word of the document went to the model in some chunk prompt.
    part = part_instruction(SummaryOptions())
    chunk_prompts = [p for p in engine.prompts if p.startswith(part)]
    assert len(chunk_prompts) == summary.chunks
    sent = set(" ".join(chunk_prompts).split())
    assert set(text.split()) <= sent
    # Chunks tile the text exactly.
    spans = [step["chars"] for step in plans[0]]
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert [s for s in seen if s[0] == "chunk"] == [
        ("chunk", i, summary.chunks) for i in range(1, summary.chunks + 1)]
    assert seen[-1] == ("summary", 1, 1)


def test_merging_recurses_until_one_summary_fits() -> None:
    # Long partial answers force more than one merge level.
    engine = WordEngine(n_ctx=600, answer_words=500)
    summary = Summarizer(engine, SummaryOptions(length="short")).summarize(_document(120))
    assert summary.levels >= 2
    assert summary.merges >= 2
    assert summary.calls == summary.chunks + summary.merges + 1


def test_the_prefix_is_shared_by_every_chunk_prompt() -> None:
    engine = WordEngine(n_ctx=700)
    Summarizer(engine, SummaryOptions(focus="costs", language="French")).summarize(
        _document(40))
    part = part_instruction(SummaryOptions(focus="costs", language="French"))
    assert "Focus on: costs." in part and "Write in French." in part
    chunk_prompts = [p for p in engine.prompts if p.startswith(part)]
    assert len(chunk_prompts) > 2


def test_context_too_small() -> None:
    with pytest.raises(ContextTooSmallError, match="too small to summarize in") as info:
        Summarizer(WordEngine(n_ctx=120), SummaryOptions()).summarize(_document(40))
    assert info.value.needed > 120
    assert "raise --ctx to at least" in str(info.value)


def test_empty_and_bad_options() -> None:
    with pytest.raises(InputError, match="empty"):
        Summarizer(WordEngine(n_ctx=500), SummaryOptions()).summarize("  \n ")
    with pytest.raises(InputError, match="unknown length"):
        check_options(SummaryOptions(length="huge"))
    with pytest.raises(InputError, match="unknown style"):
        check_options(SummaryOptions(style="poem"))


def test_answer_room_follows_length_words_and_max_tokens() -> None:
    assert SummaryOptions(length="short").answer_tokens() < SummaryOptions().answer_tokens()
    assert SummaryOptions(words=10).answer_tokens() == 52
    assert SummaryOptions(style="headline").target_words() == 12
    capped = SummaryOptions(params=replace(SamplingParams(), max_tokens=7))
    assert capped.answer_tokens() == 7


@pytest.mark.parametrize(("text", "bullets", "expected"), [
    ("One. Two is cut", False, "One."),
    ("No end at all", False, "No end at all"),
    ('He said "yes." Then', False, 'He said "yes."'),
    ("- a\n- b\n- c is cu", True, "- a\n- b"),
])
def test_complete_sentences(text: str, bullets: bool, expected: str) -> None:
    assert _complete_sentences(text, bullets=bullets) == expected


def test_record_shape() -> None:
    engine = WordEngine(n_ctx=2048)
    summary = Summarizer(engine, SummaryOptions()).summarize(_document(2))
    record = summary_record("a.md", summary, model="words", fmt="markdown")
    assert set(record) == {"path", "summary", "model", "error", "format", "finish_reason",
                           "chunks", "levels", "merges", "calls", "usage", "timings"}
    assert set(record["usage"]) == {"input_tokens", "prompt_tokens", "prompt_tokens_evaluated",
                                    "output_tokens"}
    failed = summary_record("b.md", None, model="words", error="b.md is empty")
    assert failed == {"path": "b.md", "summary": None, "model": "words",
                      "error": "b.md is empty"}
