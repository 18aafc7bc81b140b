"""The engine and the chat task on the real SmolLM2 GGUF through real llama.cpp."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from llmkit.engines import LlamaCppEngine, SamplingParams, load_engine
from llmkit.engines.llama_cpp import grammar_from_json_schema
from llmkit.errors import ContextOverflowError, InputError, InvalidModelFileError, SchemaError
from llmkit.tasks.chat import (
    Conversation,
    build_user_message,
    chat_turn,
    fit_conversation,
    run_prompt,
)

pytestmark = pytest.mark.slow

# One thread: on a small shared machine llama.cpp's spinning worker threads slow each other
# down badly when other processes compete for the cores.
THREADS = 1
SYSTEM = "You are a helpful assistant."
FRANCE = "What is the capital of France?"
GREEDY = SamplingParams(temperature=0, max_tokens=40)


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> Iterator[LlamaCppEngine]:
    with load_engine(smollm2_path, n_ctx=2048, threads=THREADS) as e:
        yield e


@pytest.fixture(scope="module")
def small(smollm2_path: Path) -> Iterator[LlamaCppEngine]:
    with load_engine(smollm2_path, n_ctx=256, threads=THREADS) as e:
        yield e


def _fresh(path: Path, n_ctx: int = 2048) -> LlamaCppEngine:
    return load_engine(path, n_ctx=n_ctx, threads=THREADS)


# -- loading ----------------------------------------------------------------------------------


def test_engine_facts(engine: LlamaCppEngine, smollm2_path: Path) -> None:
    assert engine.n_ctx == 2048
    assert engine.n_ctx_train == 8192
    assert engine.model_name == smollm2_path.name
    assert engine.device == "cpu"
    assert engine.threads == THREADS
    assert engine.n_params == 134_515_008
    assert engine.metadata("general.architecture") == "llama"
    assert engine.metadata("no.such.key") is None
    assert "<|im_start|>" in engine.chat_template
    assert engine.load_ms > 0


def test_default_context_is_capped_at_4096(smollm2_path: Path) -> None:
    with load_engine(smollm2_path, threads=THREADS, name="smol") as e:
        assert e.n_ctx == 4096
        assert e.model_name == "smol"


def test_small_context_is_what_was_asked(smollm2_path: Path) -> None:
    # llama.cpp pads the context to 256 tokens; the engine must keep to the requested size.
    with load_engine(smollm2_path, n_ctx=64, threads=THREADS) as tiny:
        assert tiny.n_ctx == 64
        prompt = tiny.tokenize("word " * 100)
        assert 64 < len(prompt) < 256
        with pytest.raises(ContextOverflowError) as info:
            tiny.generate(prompt, GREEDY)
        assert info.value.n_ctx == 64


def test_context_smaller_than_16_is_refused(smollm2_path: Path) -> None:
    with pytest.raises(InputError, match="--ctx 8 is too small"):
        load_engine(smollm2_path, n_ctx=8, threads=THREADS)


def test_loading_a_truncated_file_names_the_damage(smollm2_path: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = smollm2_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelFileError, match="is truncated"):
        load_engine(cut, threads=THREADS)


def test_loading_a_text_file_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello")
    with pytest.raises(InvalidModelFileError, match="is not a GGUF model file"):
        load_engine(fake, threads=THREADS)


# -- tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "Ünïcödé, 你好, emoji 🎉🦀 and ∑ math",
    "def f(x):\n\treturn x ** 2\n",
    "a",
])
def test_tokenize_detokenize_round_trip(engine: LlamaCppEngine, text: str) -> None:
    tokens = engine.tokenize(text, add_special=False)
    assert tokens
    assert engine.detokenize(tokens) == text


def test_long_text_round_trip(engine: LlamaCppEngine) -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 200
    assert engine.detokenize(engine.tokenize(text, add_special=False)) == text


def test_special_tokens_are_parsed_only_when_asked(engine: LlamaCppEngine) -> None:
    marker = "<|im_start|>"
    assert len(engine.tokenize(marker, add_special=False, parse_special=True)) == 1
    assert len(engine.tokenize(marker, add_special=False)) > 1
    special = engine.tokenize(marker, add_special=False, parse_special=True)
    assert engine.detokenize(special, special=True) == marker
    assert engine.detokenize(special) == ""


def test_chat_tokens_render_the_template(engine: LlamaCppEngine) -> None:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FRANCE}]
    rendered = engine.render_chat(messages)
    assert rendered == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
                        f"<|im_start|>user\n{FRANCE}<|im_end|>\n<|im_start|>assistant\n")
    tokens = engine.chat_tokens(messages)
    assert engine.detokenize(tokens, special=True) == rendered


# -- generation -------------------------------------------------------------------------------


def test_greedy_answer(engine: LlamaCppEngine) -> None:
    reply = run_prompt(engine, FRANCE, system=SYSTEM, params=GREEDY)
    assert reply.text == "The capital of France is Paris."
    g = reply.generation
    assert g.finish_reason == "stop"
    assert g.completion_tokens == len(g.tokens) > 0
    assert engine.detokenize(g.tokens) == reply.text
    assert g.prompt_ms > 0 and g.generation_ms > 0 and g.first_token_ms > 0
    data = reply.to_dict()
    assert data["usage"]["total_tokens"] == g.prompt_tokens + g.completion_tokens
    assert data["model"] == engine.model_name


def test_max_tokens_stops_with_length(engine: LlamaCppEngine) -> None:
    tokens = engine.chat_tokens([{"role": "user", "content": "Write a long story about a cat."}])
    g = engine.generate(tokens, SamplingParams(temperature=0, max_tokens=5))
    assert g.completion_tokens == 5
    assert g.finish_reason == "length"


def test_full_context_stops_with_context(smollm2_path: Path) -> None:
    with load_engine(smollm2_path, n_ctx=64, threads=THREADS) as tiny:
        tokens = tiny.chat_tokens([{"role": "user",
                                    "content": "Count from 1 to 100, separated by commas."}])
        g = tiny.generate(tokens, SamplingParams(temperature=0))
        assert g.finish_reason == "context"
        assert g.prompt_tokens + g.completion_tokens == tiny.n_ctx


def test_seed_makes_sampling_repeatable(engine: LlamaCppEngine) -> None:
    tokens = engine.chat_tokens([{"role": "user", "content": "Tell me a fact about cats."}])
    params = SamplingParams(temperature=0.9, seed=1234, max_tokens=20)
    first = engine.generate(tokens, params)
    second = engine.generate(tokens, params)
    assert first.text and first.text == second.text


def test_same_prompt_twice_evaluates_one_token(engine: LlamaCppEngine) -> None:
    tokens = engine.chat_tokens([{"role": "user", "content": "Say hello."}])
    engine.generate(tokens, GREEDY)
    again = engine.generate(tokens, GREEDY)
    assert again.prompt_tokens_evaluated == 1


def test_empty_prompts_are_refused(engine: LlamaCppEngine) -> None:
    with pytest.raises(InputError, match="the prompt is empty"):
        engine.generate([], GREEDY)
    with pytest.raises(InputError, match="the prompt is empty"):
        run_prompt(engine, " \n\t")


def test_prompt_that_leaves_no_room_for_an_answer(small: LlamaCppEngine) -> None:
    with pytest.raises(ContextOverflowError) as info:
        run_prompt(small, "Tell me about bread. " * 60)
    assert "tokens but the context holds 240 (256 minus 16 reserved for the answer)" in str(
        info.value)


def test_interrupted_generation_keeps_the_engine_usable(engine: LlamaCppEngine) -> None:
    before = run_prompt(engine, FRANCE, system=SYSTEM, params=GREEDY)
    seen: list[str] = []

    def stop_after_three(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            raise KeyboardInterrupt

    tokens = engine.chat_tokens([{"role": "user", "content": "Write a long poem about rain."}])
    g = engine.generate(tokens, SamplingParams(temperature=0, max_tokens=200), stop_after_three)
    assert g.finish_reason == "interrupted"
    assert g.completion_tokens == 3
    assert g.text == "".join(seen)
    after = run_prompt(engine, FRANCE, system=SYSTEM, params=GREEDY)
    assert after.text == before.text == "The capital of France is Paris."
    # And the interrupted prompt itself still gives the same greedy start when run again.
    whole = engine.generate(tokens, SamplingParams(temperature=0, max_tokens=10))
    assert whole.text.startswith(g.text)


def test_grammar_constrained_output_is_valid_json(engine: LlamaCppEngine) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    grammar = grammar_from_json_schema(json.dumps(schema))
    reply = run_prompt(engine, "Describe Paris as JSON with its population.", system=SYSTEM,
                       params=SamplingParams(temperature=0, max_tokens=120, grammar=grammar))
    data = json.loads(reply.text)
    jsonschema.validate(data, schema)


def test_bad_schemas_are_refused() -> None:
    with pytest.raises(SchemaError, match="the JSON schema is not valid JSON"):
        grammar_from_json_schema("{not json")


# -- chat: KV-cache reuse and context fitting -------------------------------------------------


def test_second_turn_evaluates_only_the_new_turn(engine: LlamaCppEngine,
        smollm2_path: Path) -> None:
    convo = Conversation(system=SYSTEM)
    first = chat_turn(engine, convo, FRANCE, params=GREEDY)
    f = first.generation
    cached = engine.chat_tokens([{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": FRANCE}]) + f.tokens

    second = chat_turn(engine, convo, "And of Germany?", params=GREEDY)
    g = second.generation
    prompt = engine.chat_tokens(convo.rendered()[:-1])
    assert g.prompt_tokens == len(prompt)
    common = 0
    for a, b in zip(cached, prompt, strict=False):
        if a != b:
            break
        common += 1
    # Everything already in the cache is reused; only the new user turn is evaluated.
    assert common >= f.prompt_tokens + f.completion_tokens
    assert g.prompt_tokens_evaluated == g.prompt_tokens - common
    assert g.prompt_tokens_evaluated < 20
    assert g.prompt_tokens_evaluated * 3 < g.prompt_tokens
    assert [m["role"] for m in convo.messages] == ["user", "assistant", "user", "assistant"]
    assert convo.messages[3]["content"] == second.text

    with _fresh(smollm2_path) as fresh:
        replay = fresh.generate(fresh.chat_tokens(convo.rendered()[:-1]), GREEDY)
    assert replay.prompt_tokens_evaluated == replay.prompt_tokens
    assert replay.text == second.text


def _long_turns(n_pairs: int) -> list[dict[str, str]]:
    messages = []
    for i in range(n_pairs):
        messages.append({"role": "user",
                         "content": f"Question {i}: tell me about the history of bread. " * 4})
        messages.append({"role": "assistant",
                         "content": f"Answer {i}: bread is old and was baked everywhere. " * 4})
    return messages


def test_fit_conversation_drops_oldest_turns_but_keeps_the_system_prompt(
        small: LlamaCppEngine) -> None:
    messages = _long_turns(4)
    messages.append({"role": "user", "content": "Last question: what about rye?"})
    convo = Conversation(system="You are terse.", messages=list(messages))
    assert len(small.chat_tokens(convo.rendered())) > small.n_ctx

    tokens, dropped = fit_conversation(small, convo, 32)
    assert dropped > 0 and dropped % 2 == 0  # whole user/assistant pairs go
    assert convo.messages == messages[dropped:]
    assert convo.system == "You are terse."
    assert convo.messages[0]["role"] == "user"
    assert convo.messages[-1]["content"] == "Last question: what about rye?"
    assert tokens == small.chat_tokens(convo.rendered())
    assert len(tokens) + 32 <= small.n_ctx
    # Dropping one pair fewer would not have fitted: only what had to go went.
    wider = Conversation(system="You are terse.", messages=messages[dropped - 2:])
    assert len(small.chat_tokens(wider.rendered())) + 32 > small.n_ctx
    rendered = small.detokenize(tokens, special=True)
    assert rendered.startswith("<|im_start|>system\nYou are terse.<|im_end|>")


def test_fit_conversation_keeps_everything_that_fits(small: LlamaCppEngine) -> None:
    convo = Conversation(system="S", messages=[{"role": "user", "content": "hi"}])
    tokens, dropped = fit_conversation(small, convo, 16)
    assert dropped == 0 and len(convo.messages) == 1
    assert tokens == small.chat_tokens(convo.rendered())


def test_fit_conversation_refuses_when_the_last_message_alone_is_too_long(
        small: LlamaCppEngine) -> None:
    convo = Conversation(system="S", messages=[{"role": "user", "content": "bread " * 400}])
    with pytest.raises(ContextOverflowError):
        fit_conversation(small, convo, 16)
    assert convo.system == "S" and len(convo.messages) == 1


def test_chat_turn_reports_dropped_messages(small: LlamaCppEngine) -> None:
    convo = Conversation(system="You are terse.", messages=_long_turns(3))
    reply = chat_turn(small, convo, "And rye?", params=SamplingParams(temperature=0,
                                                                      max_tokens=8))
    assert reply.dropped_messages > 0
    assert convo.system == "You are terse."
    assert convo.messages[-2] == {"role": "user", "content": "And rye?"}
    assert convo.messages[-1] == {"role": "assistant", "content": reply.text}
    assert len(convo.messages) == 6 + 2 - reply.dropped_messages


def test_chat_turn_that_does_not_fit_leaves_the_history_alone(small: LlamaCppEngine) -> None:
    convo = Conversation(system="S", messages=[{"role": "user", "content": "hi"},
                                               {"role": "assistant", "content": "hello"}])
    with pytest.raises(ContextOverflowError):
        chat_turn(small, convo, "bread " * 400)
    assert convo.messages == [{"role": "user", "content": "hi"},
                              {"role": "assistant", "content": "hello"}]


def test_chat_turn_strips_the_piped_newline_and_refuses_empty(engine: LlamaCppEngine) -> None:
    convo = Conversation()
    with pytest.raises(InputError, match="the message is empty"):
        chat_turn(engine, convo, "  \n")
    assert convo.messages == []
    chat_turn(engine, convo, "Hi!\n", params=SamplingParams(temperature=0, max_tokens=4))
    assert convo.messages[0] == {"role": "user", "content": "Hi!"}


@pytest.mark.parametrize(("instruction", "context", "message"), [
    ("Summarize.", "Some text.\n", "Some text.\n\nSummarize."),
    ("Hi", None, "Hi"),
    (None, "From stdin\n", "From stdin"),
    ("  ", "ctx", "ctx"),
])
def test_build_user_message(instruction: str | None, context: str | None,
                            message: str) -> None:
    assert build_user_message(instruction, context) == message


@pytest.mark.parametrize(("instruction", "context"), [(None, None), ("", ""), (" ", "\n")])
def test_build_user_message_refuses_empty(instruction: str | None,
                                          context: str | None) -> None:
    with pytest.raises(InputError, match="the prompt is empty"):
        build_user_message(instruction, context)
