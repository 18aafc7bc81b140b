"""The Llama 3.2 Vision engine's shell: real tokenizer and template, a scripted forward pass."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from llmkit.engines.base import Engine, SamplingParams
from llmkit.engines.mllama.engine import EVAL_BATCH, Forward, MllamaEngine, open_engine
from llmkit.engines.mllama.hparams import MllamaFile
from llmkit.engines.mllama.preprocess import TiledImage
from llmkit.errors import ContextOverflowError, InputError, InvalidModelFileError, UsageError
from tests.mllama_model import CHAT_TEMPLATE, IMAGE_MEAN, IMAGE_STD, tokenizer_dir
from tests.test_engine_interface import interface_problems
from tests.test_mllama_hparams import ELEVEN_B

N_VOCAB = 128256
IMAGE_TOKEN = 128256
EOT = 128009  # <|eot_id|>
TILE = 28  # a tiny tile (2x2 patches of 14): tiling stays quick, the layout logic the same
TOKENS_PER_TILE = (TILE // 14) ** 2 + 1
GREEDY = SamplingParams(temperature=0.0)
USER_HEADER = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
TEXT_REPLY = "Hello there!"
COLOUR_REPLIES = {"red": "A red picture.", "green": "A green picture.", "blue": "A blue picture."}


@dataclass(frozen=True)
class Pixels:
    rgb: bytes
    width: int
    height: int


def picture(colour: tuple[int, int, int], width: int = 50, height: int = 20,
            speck: int = 0) -> Pixels:
    """A flat picture; ``speck`` changes one pixel, so two pictures of one colour differ."""
    data = bytearray(bytes(colour) * (width * height))
    data[0] = speck
    return Pixels(bytes(data), width, height)


RED, BLUE = picture((200, 10, 10)), picture((10, 10, 200))  # two tiles of 28 pixels


# -- the model file and its tokenizer ------------------------------------------------------------


def write_mllama_gguf(path: Path, **overrides: Any) -> Path:
    """A weightless Llama 3.2 Vision GGUF: the published 11B's metadata with a tiny tile, the
    real Llama 3.2 Vision tokenizer (as the converter writes it) and the Instruct template."""
    import gguf

    from llmkit.convert.tokenizer import add_tokenizer

    values = {**ELEVEN_B, "mllama.vision.image_size": TILE, "mllama.context_length": 4096,
              **overrides}
    writer = gguf.GGUFWriter(path, "mllama")
    add: dict[type, Callable[[str, Any], None]] = {
        str: writer.add_string, list: writer.add_array, float: writer.add_float32,
        int: writer.add_uint32}
    for key, value in values.items():
        add[type(value)](key, value)
    add_tokenizer(writer, tokenizer_dir(), 128257)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mllama_gguf(tmp_path_factory.mktemp("mllama") / "vision.gguf")


@pytest.fixture(scope="module")
def vocab_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vocab-cache")


# -- a scripted forward pass ---------------------------------------------------------------------


def colour_of(tiled: TiledImage) -> str:
    """The dominant channel of a picture's real tiles."""
    means = tiled.pixels[:tiled.num_tiles].mean(axis=(0, 2, 3))
    return ("red", "green", "blue")[int(np.argmax(means))]


@dataclass
class FakeForward:
    """A forward pass whose logits follow a script, computed from ITS OWN cache.

    Each row it holds records which picture it attended to. On every evaluation it checks the
    one thing a real model needs of the shell: every row it now holds saw exactly the picture
    (or none) that this prompt's semantics give its position. The logits prefer the next token
    of a reply chosen by what the last row saw (the text reply, or one naming the picture's
    colour), counted from the last assistant header.
    """

    n_ctx: int = 512
    n_vocab: int = N_VOCAB
    device: str = "cpu"
    threads: int = 1
    threads_reason: str = "set by the test"
    tile_size: int = TILE
    max_tiles: int = 4
    image_mean: tuple[float, float, float] = (IMAGE_MEAN[0], IMAGE_MEAN[1], IMAGE_MEAN[2])
    image_std: tuple[float, float, float] = (IMAGE_STD[0], IMAGE_STD[1], IMAGE_STD[2])
    rows: list[tuple[int, str | None]] = field(default_factory=list)
    image: str | None = None
    encoded: list[TiledImage] = field(default_factory=list)
    evals: list[tuple[list[int], int, int | None]] = field(default_factory=list)
    replies: dict[str | None, list[int]] = field(default_factory=dict)
    header: list[int] = field(default_factory=list)
    interrupt_on_eval: int | None = None
    max_batch: int = EVAL_BATCH
    closed: int = 0

    def __post_init__(self) -> None:
        self.base: npt.NDArray[np.float32] = (-(np.arange(N_VOCAB) % 97) / 100).astype(
            np.float32)

    def encode_image(self, tiled: TiledImage) -> None:
        assert not self.closed
        self.encoded.append(tiled)
        digest = hashlib.blake2b(tiled.pixels.tobytes(), digest_size=8).hexdigest()
        self.image = f"{colour_of(tiled)}:{digest}"

    def drop_image(self) -> None:
        self.image = None

    def eval(self, tokens: Sequence[int], n_past: int, image_from: int | None
             ) -> npt.NDArray[np.float32]:
        assert not self.closed
        assert tokens and 0 <= n_past <= len(self.rows), (n_past, len(self.rows))
        assert len(tokens) <= self.max_batch and n_past + len(tokens) <= self.n_ctx
        self.evals.append((list(tokens), n_past, image_from))
        if self.interrupt_on_eval == len(self.evals):
            raise KeyboardInterrupt
        if image_from is not None:
            assert self.image is not None, "rows attend to an image that was never encoded"
        del self.rows[n_past:]

        def sees(position: int) -> str | None:
            return self.image if image_from is not None and position >= image_from else None

        self.rows.extend((t, sees(n_past + i)) for i, t in enumerate(tokens))
        for position, (_, seen) in enumerate(self.rows):
            assert seen == sees(position), (
                f"row {position} attended to {seen}, this prompt needs {sees(position)}")
        return self.logits()

    def logits(self) -> npt.NDArray[np.float32]:
        tokens = [t for t, _ in self.rows]
        start = 0
        n = len(self.header)
        for i in range(len(tokens) - n, -1, -1):
            if n and tokens[i:i + n] == self.header:
                start = i + n
                break
        seen = self.rows[-1][1]
        reply = self.replies.get(seen.split(":")[0] if seen else None, [])
        k = len(tokens) - start
        logits = self.base.copy()
        logits[reply[k] if k < len(reply) else EOT] += 10.0
        logits[EOT] += 5.0
        return logits

    def close(self) -> None:
        self.closed += 1


def as_forward(fake: FakeForward) -> Forward:
    """Never called: mypy checks that the fake is a Forward (run mypy on this file)."""
    return fake


def as_engine(engine: MllamaEngine) -> Engine:
    """Never called: mypy checks that MllamaEngine is an Engine."""
    return engine


def open_fake(model_path: Path, vocab_cache: Path, fake: FakeForward | None = None,
              **replies: str) -> tuple[MllamaEngine, FakeForward]:
    """The engine over a scripted forward pass, with the replies tokenized by the real
    tokenizer (``text=`` for text prompts, a colour name for a picture of that colour)."""
    fake = fake or FakeForward()
    seen: list[MllamaFile] = []

    def factory(file: MllamaFile) -> Forward:
        seen.append(file)
        return fake

    engine = open_engine(model_path, factory, cache_dir=vocab_cache)
    assert seen and seen[0].vision.image_size == TILE
    fake.header = engine.tokenize(ASSISTANT_HEADER, add_special=False, parse_special=True)
    scripts = {"text": TEXT_REPLY, **COLOUR_REPLIES, **replies}
    fake.replies = {(None if name == "text" else name): engine.tokenize(text, add_special=False)
                    for name, text in scripts.items()}
    return engine, fake


@pytest.fixture
def pair(model_path: Path, vocab_cache: Path) -> Iterator[tuple[MllamaEngine, FakeForward]]:
    engine, fake = open_fake(model_path, vocab_cache)
    with engine:
        yield engine, fake


def ask(engine: MllamaEngine, text: str, image: bool = True) -> list[dict[str, str]]:
    marker = engine.media_marker + "\n" if image else ""
    return [{"role": "user", "content": marker + text}]


# -- the interface -------------------------------------------------------------------------------


def test_the_engine_implements_every_member(pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, _ = pair
    assert interface_problems(engine) == []
    assert (engine.vision, engine.n_ctx, engine.device, engine.threads) == (True, 512, "cpu", 1)
    assert engine.threads_reason == "set by the test" and engine.model_name == "vision.gguf"
    assert engine.chat_template == CHAT_TEMPLATE and engine.load_ms > 0
    assert len(engine.media_marker) == 6 and engine.media_marker not in CHAT_TEMPLATE


def test_closing_closes_the_forward_pass_once(model_path: Path, vocab_cache: Path) -> None:
    engine, fake = open_fake(model_path, vocab_cache)
    with engine:
        pass
    engine.close()
    assert fake.closed == 1
    with pytest.raises(RuntimeError, match="used after close"):
        engine.generate([1, 2], GREEDY)


# -- the tokenizer -------------------------------------------------------------------------------


def test_tokens_are_those_of_the_published_tokenizer(pair: tuple[MllamaEngine, FakeForward]
                                                     ) -> None:
    from tokenizers import Tokenizer

    engine, _ = pair
    reference = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json"))
    for text in ("Hello, world!", "  spaces\tand\nnewlines 12345", "Ünïcödé 漢字 🦙 café"):
        assert engine.tokenize(text, add_special=False) == reference.encode(
            text, add_special_tokens=False).ids
        assert engine.tokenize(text) == reference.encode(text).ids  # BOS first
        assert engine.detokenize(engine.tokenize(text, add_special=False)) == text
        assert b"".join(engine.token_pieces(text)) == text.encode("utf-8")
    assert engine.tokenize("<|image|>", add_special=False, parse_special=True) == [IMAGE_TOKEN]
    assert IMAGE_TOKEN not in engine.tokenize("<|image|>", add_special=False)
    assert engine.detokenize([IMAGE_TOKEN], special=True) == "<|image|>"


def test_the_companion_vocabulary_is_cached_and_reused(model_path: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import llmkit._fs

    cache = tmp_path / "cache"
    engine, _ = open_fake(model_path, cache)
    engine.close()
    (companion,) = cache.iterdir()
    assert companion.name.startswith("mllama-vocab-") and companion.suffix == ".gguf"
    first = companion.stat()

    def no_write(path: Path, data: bytes) -> None:
        raise AssertionError(f"{path} was written again")

    monkeypatch.setattr(llmkit._fs, "atomic_write_bytes", no_write)
    engine, _ = open_fake(model_path, cache)
    engine.close()
    again = companion.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert list(cache.iterdir()) == [companion]


def test_the_companion_is_a_llama_vocabulary_with_the_source_s_tokenizer(
        model_path: Path, tmp_path: Path) -> None:
    from llmkit.gguf_file import read_header

    engine, _ = open_fake(model_path, tmp_path)
    engine.close()
    (companion,) = tmp_path.iterdir()
    source, copy = read_header(model_path), read_header(companion)
    assert copy.string("general.architecture") == "llama" and copy.tensors() == {}
    assert copy.u32("llama.context_length") == 4096 and copy.u32("llama.block_count") == 40
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
        a, b = source.array(key), copy.array(key)
        assert a is not None and b is not None and (a.count, a.items) == (b.count, b.items)
    assert copy.array("tokenizer.ggml.tokens").count == 128257  # type: ignore[union-attr]
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        assert copy.string(key) == source.string(key)
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id"):
        assert copy.u32(key) == source.u32(key)


def test_the_companion_is_written_atomically(model_path: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    renamed: list[tuple[str, str]] = []
    real_replace = os.replace

    def killed(fd: int) -> None:
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(RuntimeError, match="killed while writing"):
        open_fake(model_path, cache)
    assert list(cache.iterdir()) == []  # neither a half file nor its temporary
    monkeypatch.undo()

    def replace(src: str | Path, dst: str | Path) -> None:
        renamed.append((str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    engine, _ = open_fake(model_path, cache)
    engine.close()
    ((src, dst),) = renamed
    (companion,) = cache.iterdir()
    assert dst == str(companion) and Path(src).parent == cache
    assert Path(src).name.startswith(f".{companion.name}.llmkit-")


def test_a_damaged_cached_companion_is_replaced(model_path: Path, tmp_path: Path) -> None:
    engine, _ = open_fake(model_path, tmp_path)
    engine.close()
    (companion,) = tmp_path.iterdir()
    size = companion.stat().st_size
    companion.write_bytes(companion.read_bytes()[:size // 2])  # a cache cut short
    engine, _ = open_fake(model_path, tmp_path)
    with engine:
        assert engine.tokenize("Hello", add_special=False) == [9906]
    assert companion.stat().st_size == size


def test_an_unwritable_cache_still_loads(model_path: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    engine, _ = open_fake(model_path, blocked / "cache")
    with engine:
        assert engine.tokenize("Hello", add_special=False) == [9906]


def test_files_of_another_layout_are_refused_before_anything_loads(tmp_path: Path) -> None:
    path = write_mllama_gguf(tmp_path / "ollama.gguf", **{"mllama.llmkit.weight_layout": "x"})

    def never(file: MllamaFile) -> Forward:
        raise AssertionError("the forward pass was built")

    with pytest.raises(InvalidModelFileError, match="from another converter"):
        open_engine(path, never, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_an_image_token_id_that_is_not_the_image_token_is_refused(tmp_path: Path) -> None:
    path = write_mllama_gguf(tmp_path / "odd.gguf", **{"mllama.image_token_id": 128000})
    fake = FakeForward()
    with pytest.raises(InvalidModelFileError, match=r"has no <\|image\|> token"):
        open_fake(path, tmp_path / "cache", fake)
    assert fake.closed == 1


# -- text ----------------------------------------------------------------------------------------


def test_greedy_text_follows_the_logits_and_streams(pair: tuple[MllamaEngine, FakeForward]
                                                    ) -> None:
    engine, fake = pair
    prompt = engine.chat_tokens(ask(engine, "Say hello.", image=False))
    assert prompt[0] == 128000 and prompt.count(128000) == 1  # BOS once (the template's)
    streamed: list[str] = []
    out = engine.generate(prompt, GREEDY, streamed.append)
    assert (out.text, out.finish_reason, "".join(streamed)) == (TEXT_REPLY, "stop", TEXT_REPLY)
    assert out.tokens == fake.replies[None]
    assert (out.prompt_tokens, out.prompt_tokens_evaluated) == (len(prompt), len(prompt))
    assert out.completion_tokens == len(out.tokens) and out.image_tokens == 0
    # The prompt once, then each generated token (the last one too: EOT followed it).
    assert fake.evals[0] == (prompt, 0, None)
    assert [e[1] for e in fake.evals[1:]] == list(range(len(prompt), len(prompt) + len(
        out.tokens)))
    assert fake.encoded == []


def test_a_follow_up_evaluates_only_what_is_new(pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, fake = pair
    turn = ask(engine, "Say hello.", image=False)
    first = engine.generate(engine.chat_tokens(turn), GREEDY)
    convo = [*turn, {"role": "assistant", "content": first.text},
             {"role": "user", "content": "Again."}]
    prompt = engine.chat_tokens(convo)
    cached = engine.cached_prefix_length(prompt)
    # Everything up to the answer's last token is still cached (then <|eot_id|> differs).
    assert prompt[:cached] == [t for t, _ in fake.rows][:cached]
    assert cached == len(engine.chat_tokens(turn)) + len(first.tokens)
    fake.evals.clear()
    again = engine.generate(prompt, GREEDY)
    assert fake.evals[0] == (prompt[cached:], cached, None)
    assert again.prompt_tokens_evaluated == len(prompt) - cached and again.text == TEXT_REPLY
    same = engine.generate(prompt, GREEDY)
    assert same.prompt_tokens_evaluated == 1  # the last token again, for fresh logits
    engine.forget()
    assert engine.cached_prefix_length(prompt) == 0
    assert engine.generate(prompt, GREEDY).prompt_tokens_evaluated == len(prompt)


def test_max_tokens_ends_with_length_and_skips_the_last_evaluation(
        pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, fake = pair
    prompt = engine.chat_tokens(ask(engine, "Say hello.", image=False))
    out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=2))
    assert (out.completion_tokens, out.finish_reason) == (2, "length")
    assert out.tokens == fake.replies[None][:2]
    assert len(fake.evals) == 2  # the prompt and the first token: nothing reads the second's
    assert engine.cached_prefix_length([*prompt, *out.tokens]) == len(prompt) + 1


def test_a_full_context_ends_with_context(model_path: Path, vocab_cache: Path) -> None:
    engine, _ = open_fake(model_path, vocab_cache, FakeForward(n_ctx=40),
                             text="one two three four five six seven eight nine ten")
    with engine:
        prompt = engine.chat_tokens(ask(engine, "Count.", image=False))
        out = engine.generate(prompt, GREEDY)
        assert (out.completion_tokens, out.finish_reason) == (40 - len(prompt), "context")
        with pytest.raises(ContextOverflowError):
            engine.generate(engine.tokenize("word " * 40)[:40], GREEDY)
        with pytest.raises(InputError, match=r"^the prompt is empty$"):
            engine.generate([], GREEDY)


def test_streamed_text_is_whole_characters_across_token_boundaries(
        model_path: Path, vocab_cache: Path) -> None:
    reply = "🦙 café 漢字 ok"
    engine, _ = open_fake(model_path, vocab_cache, text=reply)
    with engine:
        pieces = engine.token_pieces(reply)
        broken = [p for p in pieces if p.decode("utf-8", "replace") != p.decode("utf-8",
                                                                                 "ignore")]
        assert broken, "the reply must have a character split across tokens"
        streamed: list[str] = []
        out = engine.generate(engine.chat_tokens(ask(engine, "Hi", image=False)), GREEDY,
                              streamed.append)
        assert out.text == reply and "".join(streamed) == reply
        assert all("\ufffd" not in s for s in streamed)
        assert len(streamed) < len(out.tokens)  # split characters waited for their last byte


def test_a_json_schema_grammar_constrains_the_answer(pair: tuple[MllamaEngine, FakeForward]
                                                     ) -> None:
    from llmkit.engines.llama_cpp import grammar_from_json_schema

    engine, _ = pair
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    params = SamplingParams(temperature=0, max_tokens=40,
                            grammar=grammar_from_json_schema(json.dumps(schema)))
    out = engine.generate(engine.chat_tokens(ask(engine, "Colour?", image=False)), params)
    assert out.finish_reason == "stop"
    assert json.loads(out.text)["colour"] in ("red", "blue")
    assert out.text != TEXT_REPLY


def test_sampling_with_a_seed_repeats(pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, _ = pair
    prompt = engine.chat_tokens(ask(engine, "Say hello.", image=False))
    params = SamplingParams(temperature=1.5, top_k=50, top_p=1.0, min_p=0.0, seed=7,
                            max_tokens=6)
    first, second = engine.generate(prompt, params), engine.generate(prompt, params)
    assert first.tokens == second.tokens and first.completion_tokens > 0
    others = {tuple(engine.generate(prompt, SamplingParams(
        temperature=1.5, top_k=50, top_p=1.0, min_p=0.0, seed=seed, max_tokens=6)).tokens)
        for seed in range(8, 16)}
    assert others - {tuple(first.tokens)}  # the seed matters: the logits leave room to choose


def test_next_token_logits_are_the_forward_s(pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, fake = pair
    prompt = engine.chat_tokens(ask(engine, "Say hello.", image=False))
    logits = engine.next_token_logits(prompt)
    assert logits.dtype == np.float32 and logits.shape == (N_VOCAB,)
    assert int(np.argmax(logits)) == fake.replies[None][0]
    logits[:] = 0  # a copy: the engine's own state is untouched
    assert int(np.argmax(engine.next_token_logits(prompt))) == fake.replies[None][0]
    assert fake.evals[-1] == ([prompt[-1]], len(prompt) - 1, None)
    with pytest.raises(InputError, match=r"^the prompt is empty$"):
        engine.next_token_logits([])


def test_ctrl_c_ends_a_generation_and_leaves_the_cache_usable(
        pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, fake = pair
    prompt = engine.chat_tokens(ask(engine, "Say hello.", image=False))
    fake.interrupt_on_eval = 3
    out = engine.generate(prompt, GREEDY)
    assert out.finish_reason == "interrupted" and out.completion_tokens == 2
    fake.interrupt_on_eval = None
    assert engine.cached_prefix_length([*prompt, *out.tokens]) <= len(fake.rows)
    again = engine.generate(prompt, GREEDY)
    assert again.text == TEXT_REPLY and again.prompt_tokens_evaluated == 1


# -- images --------------------------------------------------------------------------------------


def test_an_image_renders_as_the_template_and_model_card_write_it(
        pair: tuple[MllamaEngine, FakeForward]) -> None:
    import jinja2
    import jinja2.ext

    engine, fake = pair
    rendered = engine.render_chat(ask(engine, "What is in this picture?"))
    assert rendered == ("<|begin_of_text|>" + USER_HEADER + "<|image|>What is in this picture?"
                        "<|eot_id|>" + ASSISTANT_HEADER)
    # Hugging Face's apply_chat_template runs the template in this environment, on typed parts.
    reference = jinja2.Environment(trim_blocks=True, lstrip_blocks=True,
                                   extensions=[jinja2.ext.loopcontrols]).from_string(
        CHAT_TEMPLATE).render(messages=[{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}],
        bos_token="<|begin_of_text|>", add_generation_prompt=True)
    assert rendered == reference
    # The tokens the model gets are the published tokenizer's for that text (Hugging Face's
    # tokenizers match the added special tokens in it), <|image|> included.
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_dir() / "tokenizer.json")).encode(
        rendered, add_special_tokens=False).ids
    engine.generate_with_images(ask(engine, "What is in this picture?"), [RED],
                                SamplingParams(temperature=0, max_tokens=1))
    assert fake.evals[0] == (ids, 0, ids.index(IMAGE_TOKEN))


def test_an_image_is_encoded_once_and_answers_from_its_row_on(
        pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, fake = pair
    turn = ask(engine, "What is in this picture?")
    first = engine.generate_with_images(turn, [RED], GREEDY)
    assert first.text == COLOUR_REPLIES["red"] and first.finish_reason == "stop"
    prompt, n_past, image_from = fake.evals[0]
    assert n_past == 0 and image_from is not None and prompt[image_from] == IMAGE_TOKEN
    assert prompt.count(IMAGE_TOKEN) == 1
    assert prompt == engine.tokenize(engine.render_chat(turn), add_special=False,
                                     parse_special=True)
    (tiled,) = fake.encoded
    assert (tiled.rows, tiled.cols) == (1, 2)  # 50x20 is fitted to two tiles side by side
    assert first.image_tokens == 2 * TOKENS_PER_TILE and first.prompt_tokens == len(prompt)

    follow = [*turn, {"role": "assistant", "content": first.text},
              {"role": "user", "content": "And its colour?"}]
    fake.evals.clear()
    second = engine.generate_with_images(follow, [RED], GREEDY)
    assert len(fake.encoded) == 1  # the same picture is not encoded again
    assert second.text == COLOUR_REPLIES["red"]
    assert fake.evals[0][1] == len(prompt) + len(first.tokens) > image_from
    assert fake.evals[0][2] == image_from
    assert second.prompt_tokens_evaluated == second.prompt_tokens - fake.evals[0][1]


def test_another_picture_is_encoded_and_no_row_that_saw_the_old_one_is_kept(
        pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, fake = pair
    engine.generate_with_images(ask(engine, "What is this?"), [RED], GREEDY)
    fake.evals.clear()
    out = engine.generate_with_images(ask(engine, "What is this?"), [BLUE], GREEDY)
    assert out.text == COLOUR_REPLIES["blue"] and len(fake.encoded) == 2
    _, n_past, image_from = fake.evals[0]
    assert image_from is not None and n_past == image_from  # the text before it is kept
    # A picture of the same colour with one pixel changed is another picture too.
    engine.generate_with_images(ask(engine, "What is this?"), [picture((10, 10, 200),
                                                                       speck=99)], GREEDY)
    assert len(fake.encoded) == 3


def test_text_after_an_image_sees_no_image(pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, fake = pair
    turn = ask(engine, "Say hello.")
    image_prompt = engine.tokenize(engine.render_chat(turn), add_special=False,
                                   parse_special=True)
    engine.generate_with_images(turn, [RED], GREEDY)
    image_from = image_prompt.index(IMAGE_TOKEN)
    assert engine.cached_prefix_length(image_prompt) == image_from
    out = engine.generate(image_prompt, GREEDY)  # the same tokens, as text: no picture
    assert out.text == TEXT_REPLY and fake.evals[-len(out.tokens) - 1][1:] == (image_from,
                                                                                None)
    again = engine.generate_with_images(turn, [RED], GREEDY)  # the picture is still kept
    assert again.text == COLOUR_REPLIES["red"] and len(fake.encoded) == 1


def test_a_conversation_without_a_picture_is_plain_text(pair: tuple[MllamaEngine, FakeForward]
                                                         ) -> None:
    engine, fake = pair
    out = engine.generate_with_images(ask(engine, "Say hello.", image=False), [], GREEDY)
    assert out.text == TEXT_REPLY and out.image_tokens == 0 and fake.encoded == []
    assert fake.evals[0][2] is None


def test_a_second_picture_is_refused_in_one_line(pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, fake = pair
    turn = ask(engine, "What is this?")
    first = engine.generate_with_images(turn, [RED], GREEDY)
    fake.evals.clear()
    two = [*turn, {"role": "assistant", "content": first.text},
           {"role": "user", "content": engine.media_marker + "\nAnd this one?"}]
    with pytest.raises(UsageError) as info:
        engine.generate_with_images(two, [RED, BLUE], GREEDY)
    assert str(info.value) == ("vision.gguf takes one image per conversation, and this one has 2 "
                               "(ask about each picture in a conversation of its own)")
    assert fake.evals == [] and len(fake.encoded) == 1


def test_a_system_prompt_beside_a_picture_is_refused_in_one_line(
        pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, fake = pair
    messages = [{"role": "system", "content": "Be brief."}, *ask(engine, "What is this?")]
    with pytest.raises(UsageError) as info:
        engine.generate_with_images(messages, [RED], GREEDY)
    assert str(info.value) == (
        "vision.gguf cannot take a system prompt together with an image (its chat template "
        "refuses it) (leave out the system prompt and put its instruction in the prompt)")
    assert fake.encoded == [] and fake.evals == []
    # Without a picture the system prompt is the template's own business.
    text = engine.generate_with_images(messages[:1] + ask(engine, "Hi", image=False), [], GREEDY)
    assert text.text == TEXT_REPLY


def test_markers_and_images_must_pair_up(pair: tuple[MllamaEngine, FakeForward]) -> None:
    engine, _ = pair
    with pytest.raises(InputError, match=r"^the prompt marks 1 image\(s\) but 0 were given$"):
        engine.generate_with_images(ask(engine, "What?"), [], GREEDY)
    with pytest.raises(InputError, match=r"^the prompt marks 0 image\(s\) but 1 were given$"):
        engine.generate_with_images(ask(engine, "What?", image=False), [RED], GREEDY)
    wrong = [{"role": "assistant", "content": engine.media_marker + "\nlook"}]
    with pytest.raises(InputError, match="only be part of a user message"):
        engine.generate_with_images(wrong, [RED], GREEDY)
    with pytest.raises(ContextOverflowError):
        engine.generate_with_images(ask(engine, "What?"), [RED], GREEDY, reserve=engine.n_ctx)


def test_image_token_text_from_the_user_stays_text(pair: tuple[MllamaEngine, FakeForward]
                                                   ) -> None:
    engine, fake = pair
    sneaky = "Describe <|image|> and <|eot_id|> please."
    tokens = engine.chat_tokens(ask(engine, sneaky, image=False))
    plain = engine.chat_tokens(ask(engine, "Describe this.", image=False))
    assert IMAGE_TOKEN not in tokens and tokens.count(EOT) == plain.count(EOT) == 2  # the
    # template's own (system and user turns) only
    assert engine.detokenize(tokens, special=True).count(sneaky) == 1
    engine.generate_with_images(ask(engine, sneaky), [RED], GREEDY)
    prompt = fake.evals[0][0]
    assert prompt.count(IMAGE_TOKEN) == 1 and prompt.count(EOT) == 1
    assert engine.detokenize(prompt, special=True).count("<|image|>" + sneaky) == 1


def test_an_interrupted_encoding_leaves_no_half_picture(pair: tuple[MllamaEngine, FakeForward],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    engine, fake = pair
    real = fake.encode_image

    def interrupted(tiled: TiledImage) -> None:
        fake.image = "half"
        raise KeyboardInterrupt

    monkeypatch.setattr(fake, "encode_image", interrupted)
    out = engine.generate_with_images(ask(engine, "What is this?"), [RED], GREEDY)
    assert out.finish_reason == "interrupted" and out.prompt_tokens_evaluated == 0
    assert fake.image is None and fake.evals == []
    monkeypatch.setattr(fake, "encode_image", real)
    again = engine.generate_with_images(ask(engine, "What is this?"), [RED], GREEDY)
    assert again.text == COLOUR_REPLIES["red"] and len(fake.encoded) == 1


def test_long_prompts_are_evaluated_in_batches(model_path: Path, vocab_cache: Path) -> None:
    engine, fake = open_fake(model_path, vocab_cache, FakeForward(n_ctx=2048))
    with engine:
        prompt = engine.chat_tokens(ask(engine, "word " * 700, image=False))
        assert len(prompt) > EVAL_BATCH
        engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1))
        assert [(len(t), n) for t, n, _ in fake.evals] == [
            (EVAL_BATCH, 0), (len(prompt) - EVAL_BATCH, EVAL_BATCH)]
    small = FakeForward(max_batch=8)
    engine = open_engine(model_path, lambda f: small, n_batch=8, cache_dir=vocab_cache)
    with engine:
        prompt = engine.chat_tokens(ask(engine, "Say hello.", image=False))
        engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1))
        assert [n for _, n, _ in small.evals] == list(range(0, len(prompt), 8))


def test_pieces_take_special_tokens_only_from_trusted_markup(
        pair: tuple[MllamaEngine, FakeForward]) -> None:
    from llmkit.chat_template import Piece

    engine, _ = pair
    tokens = engine.tokenize_pieces([Piece("<|start_header_id|>", True), Piece("user", False),
                                     Piece("<|end_header_id|>\n\n", True),
                                     Piece("<|image|><|eot_id|>", False)])
    assert tokens[:3] == [128006, 882, 128007]
    assert IMAGE_TOKEN not in tokens and EOT not in tokens
    assert engine.detokenize(tokens, special=True) == (
        "<|start_header_id|>user<|end_header_id|>\n\n<|image|><|eot_id|>")


# -- over the ggml forward pass, against transformers ----------------------------------------


def greedy_reference(model: Any, prompt: Sequence[int], image: Any, steps: int) -> list[int]:
    """transformers' greedy continuation with Meta's semantics (uncached, one row at a time)."""
    from tests.mllama_model import reference_logits

    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(np.argmax(reference_logits(model, ids, image)[-1])))
    return ids[len(prompt):]


def test_over_the_ggml_forward_pass_the_engine_answers_as_transformers(tmp_path: Path) -> None:
    from tests.mllama_model import build_model, random_picture, require_oracle, save_checkpoint

    require_oracle()
    model_module = pytest.importorskip("llmkit.engines.mllama.model")
    from llmkit.convert import convert

    model = build_model(seed=0)
    gguf_path = tmp_path / "tiny.gguf"
    convert(save_checkpoint(model, tmp_path / "checkpoint"), gguf_path, outtype="f32")
    engine = open_engine(gguf_path, lambda f: model_module.MllamaModel(f, n_ctx=256, threads=1),
                         cache_dir=tmp_path / "cache")
    with engine:
        image = random_picture(56, 28, seed=3)  # aspect-ratio id 2: two tiles side by side
        pixels = Pixels(image.tobytes(), image.width, image.height)
        turn = ask(engine, "What is this?")
        prompt = engine.tokenize(engine.render_chat(turn), add_special=False,
                                 parse_special=True)
        first = engine.generate_with_images(turn, [pixels], SamplingParams(temperature=0,
                                                                           max_tokens=6))
        assert first.tokens == greedy_reference(model, prompt, image, 6)
        assert first.image_tokens == 2 * TOKENS_PER_TILE
        follow = [*turn, {"role": "assistant", "content": first.text},
                  {"role": "user", "content": "More?"}]
        again = engine.generate_with_images(follow, [pixels], SamplingParams(temperature=0,
                                                                            max_tokens=4))
        prompt = engine.tokenize(engine.render_chat(follow), add_special=False,
                                 parse_special=True)
        assert again.tokens == greedy_reference(model, prompt, image, 4)
        assert again.prompt_tokens_evaluated < again.prompt_tokens - len(first.tokens)
        text = engine.chat_tokens([{"role": "user", "content": "Hi"}])
        assert engine.generate(text, SamplingParams(temperature=0, max_tokens=4)).tokens == (
            greedy_reference(model, text, None, 4))
