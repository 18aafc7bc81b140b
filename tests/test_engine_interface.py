"""Both engines implement the one Engine interface: every member, and the same contracts."""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmkit.engines import load_engine
from llmkit.engines.base import Engine, SamplingParams
from llmkit.engines.llama_cpp import LlamaCppEngine
from llmkit.errors import ContextOverflowError, InputError, InvalidModelFileError, LlmkitError
from tests.conftest import run_llmkit
from tests.fake_engine import LLAMA3, FakeEngine, ScriptedGuardEngine
from tests.fuzz.fake_guard import FakeGuardEngine

# One thread: llama.cpp's spinning workers slow each other down on a small shared machine.
THREADS = 1
N_CTX = 512
GREEDY = SamplingParams(temperature=0.0, max_tokens=3)
STORY = [{"role": "user", "content": "Tell me a very long story about a dragon."}]


def as_engines(fake: FakeEngine, guard: ScriptedGuardEngine, fuzz: FakeGuardEngine,
               real: LlamaCppEngine) -> list[Engine]:
    """Never called: mypy checks that every implementation is an Engine (run mypy on this file)."""
    engines: list[Engine] = [fake, guard, fuzz, real]
    return engines


# -- the interface, read from the Protocol itself ----------------------------------------------


def protocol_members(protocol: type) -> dict[str, object]:
    """Every member a Protocol declares: attributes (as their type), properties and methods."""
    hints = typing.get_type_hints(protocol)  # the class's own attribute annotations
    members: dict[str, object] = {name: hints[name] for name in vars(protocol).get(
        "__annotations__", {})}
    for name, value in vars(protocol).items():
        if isinstance(value, property):
            members[name] = value
        elif inspect.isfunction(value) and value.__qualname__ == f"{protocol.__name__}.{name}":
            members[name] = value  # written in the class body, not added by typing
    return members


ENGINE_MEMBERS = protocol_members(Engine)


def test_the_protocol_is_read_whole() -> None:
    # If this introspection went blind, the checks below would pass on anything.
    assert {"model_name", "n_ctx", "device", "load_ms", "vision", "max_images", "media_marker",
            "chat_template", "threads", "threads_reason", "tokenize", "detokenize",
            "token_pieces", "chat_tokens", "render_chat", "tokenize_pieces",
            "cached_prefix_length", "forget", "generate", "generate_with_images",
            "next_token_logits", "close", "__enter__", "__exit__"} <= set(ENGINE_MEMBERS)
    assert "__init__" not in ENGINE_MEMBERS and "_is_protocol" not in ENGINE_MEMBERS


def signature_problems(declared: Callable[..., object], implemented: Callable[..., object]
                       ) -> list[str]:
    """How ``implemented`` fails to accept every call ``declared`` allows ([] if it does)."""
    want = list(inspect.signature(declared).parameters.values())[1:]  # without self
    have = list(inspect.signature(implemented).parameters.values())[1:]
    by_name = {p.name: p for p in have}
    problems = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for i, p in enumerate(want):
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            if not any(q.kind is p.kind for q in have):
                problems.append(f"takes no *{p.name}")
            continue
        q = by_name.get(p.name)
        if q is None:
            problems.append(f"has no parameter {p.name}")
            continue
        if p.kind in positional and (i >= len(have) or have[i].name != p.name):
            problems.append(f"{p.name} is not positional parameter {i + 1}")
        if p.kind is inspect.Parameter.KEYWORD_ONLY and q.kind not in (
                inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            problems.append(f"{p.name} cannot be passed by keyword")
        if p.default is not inspect.Parameter.empty and q.default != p.default:
            problems.append(f"{p.name} defaults to {q.default!r}, not {p.default!r}")
    declared_names = {p.name for p in want}
    for q in have:
        if (q.name not in declared_names and q.default is inspect.Parameter.empty
                and q.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                   inspect.Parameter.VAR_KEYWORD)):
            problems.append(f"requires {q.name}, which the interface does not pass")
    return problems


def interface_problems(engine: object) -> list[str]:
    """Every way ``engine`` falls short of :class:`Engine` ([] when it implements it)."""
    problems = []
    cls = type(engine)
    for name, member in ENGINE_MEMBERS.items():
        if not hasattr(engine, name):
            problems.append(f"{cls.__name__} has no {name}")
        elif isinstance(member, type):
            value = getattr(engine, name)
            if not isinstance(value, member):
                problems.append(f"{cls.__name__}.{name} is {value!r}, not a {member.__name__}")
        elif isinstance(member, property):
            assert member.fget is not None
            kind = typing.get_type_hints(member.fget)["return"]
            value = getattr(engine, name)
            if not isinstance(value, kind):
                problems.append(f"{cls.__name__}.{name} is {value!r}, not a {kind.__name__}")
        else:
            implemented = inspect.getattr_static(engine, name)
            if not inspect.isfunction(implemented):
                problems.append(f"{cls.__name__}.{name} is not a method")
                continue
            declared = typing.cast(Callable[..., object], member)
            problems += [f"{cls.__name__}.{name} {p}"
                         for p in signature_problems(declared, implemented)]
    return problems


def test_signature_check_catches_what_would_break_a_caller() -> None:
    class Short:
        def tokenize(self, text: str) -> list[int]:
            return []

    class Renamed:
        def tokenize(self, words: str, *, add_special: bool = False,
                     parse_special: bool = False, extra: int = 0) -> list[int]:
            return []

    declared = ENGINE_MEMBERS["tokenize"]
    assert callable(declared)
    assert signature_problems(declared, Short.tokenize) == [
        "has no parameter add_special", "has no parameter parse_special"]
    assert signature_problems(declared, Renamed.tokenize) == [
        "has no parameter text", "add_special defaults to False, not True",
        "requires words, which the interface does not pass"]


@pytest.mark.parametrize("make", [
    lambda: FakeEngine(), lambda: FakeEngine(vision=True, tokens="words"),
    lambda: ScriptedGuardEngine(), lambda: FakeGuardEngine()],
    ids=["fake", "fake-vision", "scripted-guard", "fuzz-guard"])
def test_the_fakes_implement_every_member(make: Callable[[], FakeEngine]) -> None:
    assert interface_problems(make()) == []


@pytest.fixture(scope="module")
def real(smollm2_path: Path) -> Iterator[LlamaCppEngine]:
    with load_engine(smollm2_path, n_ctx=N_CTX, threads=THREADS) as engine:
        assert isinstance(engine, LlamaCppEngine)  # a llama GGUF goes to llama.cpp
        yield engine


@pytest.mark.slow
def test_the_llama_cpp_engine_implements_every_member(real: LlamaCppEngine) -> None:
    assert interface_problems(real) == []


# -- the same contracts on both engines ----------------------------------------------------------


@pytest.fixture(params=["fake", pytest.param("llama.cpp", marks=pytest.mark.slow)])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    if request.param == "fake":
        with FakeEngine("Once upon a time there was a dragon.", n_ctx=N_CTX) as fake:
            yield fake
        return
    shared: LlamaCppEngine = request.getfixturevalue("real")
    shared.forget()
    yield shared


def test_message_text_never_becomes_a_special_token(engine: Engine) -> None:
    (im_start,) = engine.tokenize("<|im_start|>", add_special=False, parse_special=True)
    assert im_start not in engine.tokenize("<|im_start|>", add_special=False)
    tokens = engine.chat_tokens([{"role": "user", "content": "<|im_start|>system"}])
    plain = engine.chat_tokens([{"role": "user", "content": "hello system"}])
    # Only the template's own headers (SmolLM2's adds a system turn): none from the message.
    assert tokens.count(im_start) == plain.count(im_start) >= 2


def test_tokens_and_pieces_give_the_text_back(engine: Engine) -> None:
    text = "Hello, world! Ünïcödé and 漢字 too."
    tokens = engine.tokenize(text, add_special=False)
    assert engine.detokenize(tokens) == text
    assert b"".join(engine.token_pieces(text)) == text.encode("utf-8")


def test_generation_counts_the_cache_honestly(engine: Engine) -> None:
    prompt = engine.chat_tokens(STORY)
    streamed: list[str] = []
    first = engine.generate(prompt, GREEDY, streamed.append)
    assert (first.prompt_tokens, first.prompt_tokens_evaluated) == (len(prompt), len(prompt))
    assert first.completion_tokens == len(first.tokens) == 3
    assert first.finish_reason == "length" and "".join(streamed) == first.text
    assert engine.cached_prefix_length(prompt) == len(prompt)
    again = engine.generate(prompt, GREEDY)
    assert again.prompt_tokens_evaluated == 1  # the last token is evaluated again for logits
    engine.forget()
    assert engine.cached_prefix_length(prompt) == 0
    assert engine.generate(prompt, GREEDY).prompt_tokens_evaluated == len(prompt)


def test_a_prompt_must_fit_and_must_not_be_empty(engine: Engine) -> None:
    for call in (lambda p: engine.generate(p, GREEDY), engine.next_token_logits):
        with pytest.raises(InputError, match=r"^the prompt is empty$"):
            call([])
        too_long = (engine.tokenize("hello " * engine.n_ctx, add_special=False)
                    )[:engine.n_ctx]
        with pytest.raises(ContextOverflowError):
            call(too_long)


def test_logits_are_float32_over_the_vocabulary(engine: Engine) -> None:
    import numpy as np

    logits = engine.next_token_logits(engine.chat_tokens(STORY))
    assert logits.dtype == np.float32 and logits.ndim == 1
    assert logits.shape[0] > max(engine.tokenize("<|im_end|>", add_special=False,
                                                 parse_special=True))


@dataclass(frozen=True)
class Pixels:
    rgb: bytes
    width: int
    height: int


def test_images_for_a_text_model_are_refused_in_one_sentence(engine: Engine) -> None:
    assert engine.vision is False
    image = Pixels(bytes(2 * 2 * 3), 2, 2)
    with pytest.raises(LlmkitError) as info:
        engine.generate_with_images([{"role": "user", "content": engine.media_marker + "\nhi"}],
                                    [image], GREEDY)
    assert str(info.value) == f"{engine.model_name} has no vision projector loaded"


def test_closing_twice_is_harmless() -> None:
    fake = FakeEngine()
    with fake:
        pass
    fake.close()
    assert fake.closed
    with pytest.raises(RuntimeError, match="used after close"):
        fake.tokenize("hi")


# -- the fake's scripting ------------------------------------------------------------------------


def test_the_fake_images_pair_markers_and_keep_a_seen_image() -> None:
    fake = FakeEngine("A red square.", vision=True, image_tokens=8)
    image = Pixels(b"\xff\0\0" * 4, 2, 2)
    messages = [{"role": "user", "content": fake.media_marker + "\nWhat is this?"}]
    with pytest.raises(InputError, match=r"^the prompt marks 1 image\(s\) but 2 were given$"):
        fake.generate_with_images(messages, [image, image], GREEDY)
    first = fake.generate_with_images(messages, [image], SamplingParams(temperature=0))
    assert first.text == "A red square." and first.image_tokens == 8
    assert first.prompt_tokens == len(fake.chat_tokens(
        [{"role": "user", "content": "\nWhat is this?"}])) + 8
    follow = [*messages, {"role": "assistant", "content": first.text},
              {"role": "user", "content": "And now?"}]
    second = fake.generate_with_images(follow, [image], SamplingParams(temperature=0))
    assert second.prompt_tokens_evaluated < second.prompt_tokens - 8  # image kept
    with pytest.raises(ContextOverflowError):
        fake.generate_with_images(messages, [image], GREEDY, reserve=fake.n_ctx)
    assert [c.kind for c in fake.calls] == ["generate_with_images"] * 2
    assert fake.calls[0].images == [image] and fake.calls[0].messages == messages


def test_the_fake_answers_from_the_call_and_honours_the_context() -> None:
    fake = FakeEngine(lambda call: f"{len(call.messages or [])} messages, {call.text[:12]!r}",
                      n_ctx=64)
    prompt = fake.chat_tokens([{"role": "user", "content": "hi"}])
    reply = fake.generate(prompt, SamplingParams())
    assert reply.text == "1 messages, '<|im_start|>'" and reply.finish_reason == "stop"
    room = 64 - len(prompt)
    long = FakeEngine("x" * 100, n_ctx=64).generate(prompt, SamplingParams())
    assert (long.completion_tokens, long.finish_reason) == (room, "context")
    assert fake.calls[0].result is reply and fake.calls[0].params == SamplingParams()


def test_the_fake_tokenizer_modes() -> None:
    words = FakeEngine(tokens="words")
    assert len(words.tokenize("one two  three\n", add_special=False)) == 4  # the last is "\n"
    assert words.token_pieces("a b") == [b"a", b" b"]
    assert FakeEngine(tokens="bytes").tokenize("é", add_special=False) == [0xC3, 0xA9]
    chars = FakeEngine()
    assert chars.tokenize("aé漢", add_special=False)[:2] == [ord("a"), ord("é")]
    with pytest.raises(UnicodeEncodeError):
        chars.tokenize("\ud800")  # a lone surrogate cannot reach a real tokenizer either
    llama3 = FakeEngine(vocabulary=LLAMA3)
    assert llama3.tokenize("hi")[0] == llama3.special_id("<|begin_of_text|>")
    assert len(llama3.tokenize("<|start_header_id|>", add_special=False,
                               parse_special=True)) == 1
    logits = FakeEngine(logits={"a": 2.0, "<|im_end|>": 1.0}, base_logit=-1.0)
    values = logits.next_token_logits(logits.tokenize("x"))
    assert values[ord("a")] == 2.0 and values[logits.special_id("<|im_end|>")] == 1.0
    assert values[ord("b")] == -1.0


# -- choosing the engine by architecture ---------------------------------------------------------


MLLAMA_PROBLEM = ("is a Llama 3.2 Vision GGUF from another converter (Ollama's, say), whose "
                  "weights are laid out differently (convert the Hugging Face checkpoint with "
                  "`llmkit convert`)")


@pytest.fixture
def mllama_gguf(tmp_path: Path) -> Path:
    """A small GGUF that says it is Llama 3.2 Vision (its keys under ``mllama.``), as another
    converter writes one: without llmkit's layout key."""
    from tests.gguf_edit import STRING, GGUFEdit, tiny_header_gguf

    edit = GGUFEdit(tiny_header_gguf(tmp_path / "tiny.gguf", 11))
    edit.kv = {("m" + key if key.startswith("llama.") else key): value
               for key, value in edit.kv.items()}
    edit.kv["general.architecture"] = (STRING, "mllama")
    return edit.write(tmp_path / "vision.gguf")


def test_load_engine_gives_mllama_to_its_own_engine_without_asking_llama_cpp(
        mllama_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llmkit.engines.llama_cpp as llama_cpp_engine

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("llama.cpp was asked to load it")

    monkeypatch.setattr(llama_cpp_engine, "LlamaCppEngine", never)
    monkeypatch.setattr(llama_cpp_engine, "llama_module", never)
    with pytest.raises(InvalidModelFileError) as info:
        load_engine(mllama_gguf)
    assert str(info.value) == f"{mllama_gguf}: {MLLAMA_PROBLEM}"


def test_run_refuses_a_foreign_mllama_file_in_one_line_without_asking_llama_cpp(
        mllama_gguf: Path, tmp_path: Path) -> None:
    # A llama_cpp that cannot be imported: touching llama.cpp at all would show in stderr.
    stub = tmp_path / "stub" / "llama_cpp"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('llama.cpp was asked')\n")
    path = os.pathsep.join([str(stub.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    proc = run_llmkit(["run", "-m", str(mllama_gguf), "hi"], env={"PYTHONPATH": path})
    assert proc.returncode == 1
    assert proc.stderr == f"llmkit: error: {mllama_gguf}: {MLLAMA_PROBLEM}\n"
    assert proc.stdout == ""


def test_the_vision_engine_is_chosen_for_mllama_and_implements_every_member(
        tmp_path: Path) -> None:
    from llmkit.engines.mllama.engine import MllamaEngine
    from llmkit.errors import UsageError
    from tests.mllama_model import build_model, convert_tiny, require_oracle

    require_oracle()
    path = convert_tiny(build_model(seed=1), tmp_path)["f16"]
    with load_engine(path, n_ctx=256, threads=1) as engine:
        assert isinstance(engine, MllamaEngine)
        assert interface_problems(engine) == []
        assert (engine.vision, engine.max_images, engine.device) == (True, 1, "cpu")
    with pytest.raises(UsageError, match="reads images itself: it has no projector"):
        load_engine(path, mmproj=path)


def test_a_library_caller_cannot_wrap_llama_cpp_s_32_bit_counts(smollm2_path: Path) -> None:
    # The CLI's option ranges stop these; a library caller reaches the engine directly, where
    # 2**32 + 16 tokens would have become a 16-token context.
    from llmkit.errors import InputError, UsageError

    with pytest.raises(InputError, match=r"larger than llama\.cpp can hold"):
        load_engine(smollm2_path, n_ctx=2**32 + 16)
    with pytest.raises(UsageError, match="--gpu-layers must be at most 2147483647"):
        load_engine(smollm2_path, gpu_layers=2**32)
