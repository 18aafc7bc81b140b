"""The engine and chat task on the real model: KV-cache reuse, context fitting, interruption."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmkit.engines import LlamaCppEngine, SamplingParams, load_engine
from llmkit.engines.llama_cpp import grammar_from_json_schema
from llmkit.errors import ContextOverflowError, InputError
from llmkit.tasks.chat import Conversation, chat_turn, fit_conversation, run_prompt

GREEDY = SamplingParams(temperature=0, max_tokens=40)


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> Iterator[LlamaCppEngine]:
    with load_engine(smollm2_path, n_ctx=2048) as e:
        yield e


def test_second_turn_evaluates_only_the_new_tokens(smollm2_path: Path,
        engine: LlamaCppEngine) -> None:
    convo = Conversation(system="You are a helpful assistant.")
    first = chat_turn(engine, convo, "What is the capital of France?", params=GREEDY)
    assert first.generation.prompt_tokens_evaluated == first.generation.prompt_tokens
    second = chat_turn(engine, convo, "And of Germany?", params=GREEDY)
    g = second.generation
    assert g.prompt_tokens > first.generation.prompt_tokens + first.generation.completion_tokens
    # Only the new user turn (and the template's turn markers) is evaluated again.
    assert g.prompt_tokens_evaluated < 20 < g.prompt_tokens
    with load_engine(smollm2_path, n_ctx=2048) as fresh:
        replay = Conversation(system=convo.system, messages=convo.messages[:3])
        tokens, _ = fit_conversation(fresh, replay, 16)
        again = fresh.generate(tokens, GREEDY)
    assert again.prompt_tokens_evaluated == again.prompt_tokens
    assert again.text == second.text


def test_same_prompt_twice_reuses_all_but_one_token(engine: LlamaCppEngine) -> None:
    tokens = engine.chat_tokens([{"role": "user", "content": "Say hi."}])
    engine.generate(tokens, GREEDY)
    again = engine.generate(tokens, GREEDY)
    assert again.prompt_tokens_evaluated == 1


def test_oldest_turns_are_dropped_but_never_the_system_prompt(smollm2_path: Path) -> None:
    with load_engine(smollm2_path, n_ctx=256) as small:
        convo = Conversation(system="You are terse.")
        filler = "Tell me about the history of bread in great detail. " * 3
        dropped_total = 0
        for _ in range(6):
            reply = chat_turn(small, convo, filler, params=SamplingParams(temperature=0,
                                                                          max_tokens=30))
            dropped_total += reply.dropped_messages
        assert dropped_total > 0
        assert convo.system == "You are terse."
        assert convo.messages[0]["role"] == "user"
        rendered = small.render_chat(convo.rendered())
        assert rendered.count("You are terse.") == 1
        assert len(small.chat_tokens(convo.rendered())) <= small.n_ctx


def test_a_message_too_long_for_the_context_is_refused(smollm2_path: Path) -> None:
    with load_engine(smollm2_path, n_ctx=64) as tiny:
        convo = Conversation()
        with pytest.raises(ContextOverflowError):
            chat_turn(tiny, convo, "word " * 200)
        assert convo.messages == []  # the refused message is not left in the history


def test_interrupted_generation_keeps_the_engine_usable(engine: LlamaCppEngine) -> None:
    seen: list[str] = []

    def stop_after_three(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt

    tokens = engine.chat_tokens([{"role": "user", "content": "Write a long poem about rain."}])
    g = engine.generate(tokens, SamplingParams(temperature=0, max_tokens=200), stop_after_three)
    assert g.finish_reason == "interrupted" and g.completion_tokens == 3
    after = run_prompt(engine, "What is the capital of France?",
                       system="You are a helpful assistant.", params=GREEDY)
    assert "Paris" in after.text


def test_tokenize_detokenize_round_trip(engine: LlamaCppEngine) -> None:
    text = "Hello, world! Ünïcödé 你好 🎉 def f(x):\n    return x  "
    assert engine.detokenize(engine.tokenize(text, add_special=False)) == text


def test_grammar_constrains_output_to_json(engine: LlamaCppEngine) -> None:
    schema = '{"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}'
    params = SamplingParams(temperature=0, max_tokens=50, grammar=grammar_from_json_schema(schema))
    reply = run_prompt(engine, "Is the sky blue? Answer in JSON.", params=params)
    assert isinstance(json.loads(reply.text)["ok"], bool)


def test_empty_inputs_are_refused(engine: LlamaCppEngine) -> None:
    with pytest.raises(InputError):
        run_prompt(engine, "  \n")
    with pytest.raises(InputError):
        engine.generate([], GREEDY)


def test_conversation_save_and_load(tmp_path: Path) -> None:
    convo = Conversation(system="S", messages=[{"role": "user", "content": "hi"}])
    path = tmp_path / "c.json"
    convo.save(path)
    assert Conversation.load(path) == convo
    path.write_text(json.dumps([{"role": "system", "content": "S2"},
                                {"role": "user", "content": "yo"}]))
    loaded = Conversation.load(path)
    assert loaded.system == "S2" and loaded.messages == [{"role": "user", "content": "yo"}]
    path.write_text('{"messages": [{"role": 1}]}')
    with pytest.raises(InputError, match="is not a conversation"):
        Conversation.load(path)


def test_any_failure_in_a_turn_leaves_the_history_as_it_was(engine: LlamaCppEngine,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    # Not only llmkit's own errors: a bug or a native failure surfacing as another exception
    # must not leave a half-done turn (an unanswered user message) in the conversation.
    convo = Conversation(messages=[{"role": "user", "content": "Hi"},
                                   {"role": "assistant", "content": "Hello!"}])
    before = [dict(m) for m in convo.messages]

    def broken(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "generate", broken)
    with pytest.raises(RuntimeError):
        chat_turn(engine, convo, "Another question")
    assert convo.messages == before
