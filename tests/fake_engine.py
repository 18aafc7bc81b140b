"""A scripted engine for unit tests: llmkit's Engine interface without a model, just as strict."""

from __future__ import annotations

import codecs
import hashlib
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from llmkit.chat_template import Piece, new_media_marker
from llmkit.engines.base import Generation, Message, RGBImage, SamplingParams
from llmkit.errors import ContextOverflowError, InputError, LlmkitError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["CHATML", "IMAGE_TOKEN", "LLAMA3", "LLAMA3_VISION", "Call", "FakeEngine",
           "ScriptedGuardEngine", "Template", "Vocabulary", "chatml_template",
           "guard_conversation", "llama3_template"]

Template = Callable[[Sequence[Message]], list[Piece]]
"""A chat template: a conversation as prompt pieces, ending where the answer starts. Only the
trusted pieces (the markup) may hold special tokens; roles and contents go in untrusted ones."""

Tokens = Literal["chars", "bytes", "words"]
Kind = Literal["generate", "generate_with_images", "next_token_logits"]


def chatml_template(messages: Sequence[Message]) -> list[Piece]:
    """ChatML, as SmolLM2 and Qwen write it (and llama.cpp's fallback)."""
    pieces: list[Piece] = []
    for m in messages:
        pieces += [Piece("<|im_start|>", True), Piece(m["role"], False), Piece("\n", True),
                   Piece(m["content"], False), Piece("<|im_end|>\n", True)]
    return [*pieces, Piece("<|im_start|>assistant\n", True)]


def llama3_template(messages: Sequence[Message]) -> list[Piece]:
    """Llama 3's header format (BOS first, as its template writes it)."""
    pieces = [Piece("<|begin_of_text|>", True)]
    for m in messages:
        pieces += [Piece("<|start_header_id|>", True), Piece(m["role"], False),
                   Piece("<|end_header_id|>\n\n", True), Piece(m["content"], False),
                   Piece("<|eot_id|>", True)]
    return [*pieces, Piece("<|start_header_id|>assistant<|end_header_id|>\n\n", True)]


@dataclass(frozen=True)
class Vocabulary:
    """A vocabulary's special tokens and the chat template that goes with them."""

    specials: tuple[str, ...]
    """Special-token texts; they get ids 256, 257, … in this order."""
    bos: str | None
    """Put first by ``tokenize(add_special=True)`` and ``chat_tokens`` (None: no BOS)."""
    template: Template
    source: str
    """The Jinja text reported as ``chat_template``."""


CHATML = Vocabulary(
    specials=("<|im_start|>", "<|im_end|>", "<|endoftext|>"), bos=None, template=chatml_template,
    source="{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = Vocabulary(
    specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
              "<|end_header_id|>", "<|eot_id|>"),
    bos="<|begin_of_text|>", template=llama3_template,
    source="{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
           "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
           "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
           "{% endif %}")

LLAMA3_VISION = Vocabulary(
    specials=(*LLAMA3.specials, "<|image|>"), bos=LLAMA3.bos, template=llama3_template,
    source=LLAMA3.source)
"""Llama 3.2 Vision's specials: ``<|image|>`` in a token prompt stands for a picture."""
IMAGE_TOKEN = "<|image|>"

_WORD = re.compile(r"\s*\S+|\s+")


@dataclass
class Call:
    """One inference call, as the engine saw it."""

    kind: Kind
    prompt: list[int]
    """The prompt's tokens (an image prompt's images are runs of negative ids)."""
    text: str
    """The prompt as text, special tokens written out (images as ``media_marker``)."""
    messages: list[Message] | None
    """The conversation the prompt was made from by ``chat_tokens`` (or given with images)."""
    params: SamplingParams | None
    images: list[RGBImage] = field(default_factory=list)
    result: Generation | None = None


class FakeEngine:
    """A scripted stand-in for a loaded model that implements :class:`llmkit.engines.Engine`.

    It is strict where the real engine is: text is encoded as UTF-8 first (a lone surrogate
    fails), message text never becomes special tokens, a prompt must fit ``n_ctx`` (else
    ContextOverflowError; an empty one is an InputError), ``max_tokens`` cuts the answer
    (finish_reason "length", or "context" when the context is what ran out), and the KV cache
    is modelled: ``cached_prefix_length`` and ``prompt_tokens_evaluated`` say what the last
    call left behind, ``forget`` empties it. A closed engine refuses every call.

    How to script it:

    - ``answer``: the text every generation answers, or a callable of the :class:`Call` (its
      prompt text, messages, params, images) returning it; a callable that raises
      KeyboardInterrupt is a Ctrl-C (finish_reason "interrupted").
    - ``logits``: what :meth:`next_token_logits` gives, as {token text: logit} (each text one
      token), or a callable of the prompt text returning that; every other token gets
      ``base_logit``.
    - ``tokens``: "chars" (one token per character: Latin-1 characters are ids 0–255, other
      characters get ids as they are first seen), "bytes" (one per UTF-8 byte) or "words" (one
      per word with the whitespace before it).
    - ``vocabulary``: :data:`CHATML` (default) or :data:`LLAMA3` (whose ``<|start_header_id|>``
      is one token, as Guard looks for), or your own; ``template`` replaces its chat template
      (e.g. one that raises, as a broken GGUF template does).
    - ``vision``: whether :meth:`generate_with_images` works; each image takes
      ``image_tokens`` context cells; ``max_images`` caps the images of one conversation.

    What it records: ``calls`` (every generation and logits call, in order, as :class:`Call`),
    ``chats`` (every conversation given to ``chat_tokens``), ``forgotten`` (how often the cache
    was emptied), ``encoded`` (how many pictures given to ``generate``/``next_token_logits``
    a real engine would have encoded: not the one it holds already) and ``closed``.
    """

    def __init__(self, answer: str | Callable[[Call], str] = "OK.", *,
                 logits: Mapping[str, float] | Callable[[str], Mapping[str, float]] | None = None,
                 base_logit: float = 0.0, tokens: Tokens = "chars",
                 vocabulary: Vocabulary = CHATML, template: Template | None = None,
                 n_ctx: int = 4096, vision: bool = False, image_tokens: int = 16,
                 media_marker: str | None = None, model_name: str = "fake",
                 max_images: int | None = None) -> None:
        if tokens not in ("chars", "bytes", "words"):
            raise ValueError(f"unknown tokenizer mode {tokens!r}")
        self.model_name = model_name
        self.n_ctx = n_ctx
        self.device = "cpu"
        self.load_ms = 0.0
        self.answer = answer
        self.logits = logits
        self.base_logit = base_logit
        self.mode: Tokens = tokens
        self.vocabulary = vocabulary
        self.template = template or vocabulary.template
        self.image_tokens = image_tokens
        self._vision = vision
        self._max_images = max_images
        self._marker = media_marker if media_marker is not None else new_media_marker()
        self._special_ids = {text: 256 + i for i, text in enumerate(vocabulary.specials)}
        longest_first = sorted(vocabulary.specials, key=len, reverse=True)
        self._special_split = re.compile(  # "((?!))" never matches: no specials, no split
            "(" + ("|".join(re.escape(s) for s in longest_first) or "(?!)") + ")")
        self._ids: dict[str, int] = {}  # pieces beyond Latin-1 / the bytes, with their ids
        # Each token's bytes by id, without and with special tokens written out.
        low = [bytes([i]) if tokens == "bytes" else chr(i).encode("utf-8") for i in range(256)]
        self._plain_bytes = [*low, *(b"" for _ in vocabulary.specials)]
        self._special_bytes = [*low, *(s.encode("utf-8") for s in vocabulary.specials)]
        self._cache: list[int] = []
        self._rendered: OrderedDict[tuple[int, ...], list[Message]] = OrderedDict()
        self.calls: list[Call] = []
        self.chats: list[list[Message]] = []
        self.forgotten = 0
        self.encoded = 0
        self._kept_image: int | None = None
        self.closed = False

    # -- what the model says about itself -------------------------------------------------

    @property
    def vision(self) -> bool:
        """Whether :meth:`generate_with_images` works."""
        return self._vision

    @property
    def max_images(self) -> int | None:
        """How many images one conversation may show (None: no limit)."""
        return self._max_images

    @property
    def media_marker(self) -> str:
        """The text that marks an image's place (random per engine unless given)."""
        return self._marker

    @property
    def chat_template(self) -> str:
        """The vocabulary's chat template as Jinja text."""
        return self.vocabulary.source

    @property
    def threads(self) -> int:
        """Always 1."""
        return 1

    @property
    def threads_reason(self) -> str:
        """Why 1."""
        return "a scripted engine"

    @property
    def vocab_size(self) -> int:
        """Tokens in the vocabulary so far (the length of a logits array)."""
        return 256 + len(self.vocabulary.specials) + len(self._ids)

    def special_id(self, text: str) -> int:
        """The id of a special token.

        Raises:
            KeyError: the vocabulary has no such special token.
        """
        return self._special_ids[text]

    # -- tokenizer --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{self.model_name} was used after close()")

    def _piece_id(self, piece: str) -> int:
        if len(piece) == 1 and ord(piece) < 256:
            return ord(piece)
        found = self._ids.get(piece)
        if found is None:
            found = self.vocab_size
            self._ids[piece] = found
            self._plain_bytes.append(piece.encode("utf-8"))
            self._special_bytes.append(self._plain_bytes[-1])
        return found

    def _plain(self, text: str) -> list[int]:
        """Tokens of text in which nothing is special."""
        data = text.encode("utf-8")  # strict, as the real engine hands text to llama.cpp
        if self.mode == "bytes":
            return list(data)
        if self.mode == "chars":
            return [o if (o := ord(c)) < 256 else self._piece_id(c) for c in text]
        return [self._piece_id(w) for w in _WORD.findall(text)]

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False
                 ) -> list[int]:
        """Token ids of ``text``: BOS first when ``add_special`` (and the vocabulary has one),
        special-token text matched as such only when ``parse_special``."""
        self._check_open()
        out = self._with_bos([]) if add_special else []
        if not parse_special:
            return out + self._plain(text)
        run: list[str] = []
        self._trusted_text(text, run, out)
        return out + self._plain("".join(run))

    def _trusted_text(self, text: str, run: list[str], out: list[int]) -> None:
        """Add trusted text to a prompt being built: its special tokens become ids (ending the
        plain run before them), the rest joins the run."""
        for i, part in enumerate(self._special_split.split(text)):
            if i % 2:
                out.extend(self._plain("".join(run)))
                run.clear()
                out.append(self._special_ids[part])
            elif part:
                run.append(part)

    def _pieces_tokens(self, pieces: Sequence[Piece]) -> list[int]:
        # Runs between special tokens are tokenized whole, as the real engine does.
        out: list[int] = []
        run: list[str] = []
        for piece in pieces:
            if piece.trusted:
                self._trusted_text(piece.text, run, out)
            else:
                run.append(piece.text)
        return out + self._plain("".join(run))

    def _with_bos(self, tokens: list[int]) -> list[int]:
        bos = self.vocabulary.bos
        if bos is not None and tokens[:1] != [self._special_ids[bos]]:
            tokens.insert(0, self._special_ids[bos])
        return tokens

    def _token_bytes(self, token: int, special: bool) -> bytes:
        table = self._special_bytes if special else self._plain_bytes
        if not 0 <= token < len(table):
            raise ValueError(f"token {token} is not in the vocabulary of {self.model_name}")
        return table[token]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The text of ``tokens``; special tokens are written out only when ``special``.

        Raises:
            ValueError: a token outside the vocabulary.
        """
        self._check_open()
        table = self._special_bytes if special else self._plain_bytes
        if tokens and not 0 <= min(tokens) <= max(tokens) < len(table):
            bad = next(t for t in tokens if not 0 <= t < len(table))
            raise ValueError(f"token {bad} is not in the vocabulary of {self.model_name}")
        return b"".join([table[t] for t in tokens]).decode("utf-8", "replace")

    def token_pieces(self, text: str) -> list[bytes]:
        """Each token's bytes (they join back to ``text`` in UTF-8)."""
        return [self._token_bytes(t, False) for t in self.tokenize(text, add_special=False)]

    reads_tools = False  # the scripted template writes no function definitions

    def chat_tokens(self, messages: Sequence[Message], *,
                    tools: Sequence[Any] | None = None) -> list[int]:
        """The conversation through the chat template, BOS once where the vocabulary has one;
        only the template's markup becomes special tokens."""
        self._check_open()
        self.chats.append([dict(m) for m in messages])
        tokens = self._with_bos(self._pieces_tokens(self.template(messages)))
        self._remember(tokens, messages)
        return tokens

    def render_chat(self, messages: Sequence[Message], *,
                    tools: Sequence[Any] | None = None) -> str:
        """The conversation through the chat template, as text."""
        self._check_open()
        return "".join(p.text for p in self.template(messages))

    def tokenize_pieces(self, pieces: Sequence[Piece]) -> list[int]:
        """Token ids of prompt pieces, special tokens parsed only in trusted ones; no BOS."""
        self._check_open()
        return self._pieces_tokens(pieces)

    def _remember(self, tokens: list[int], messages: Sequence[Message]) -> None:
        # So that a generation can tell the script which conversation its prompt came from;
        # bounded, as a fuzz run renders many.
        key = tuple(tokens)
        self._rendered[key] = [dict(m) for m in messages]
        self._rendered.move_to_end(key)
        while len(self._rendered) > 16:
            self._rendered.popitem(last=False)

    def _token_for(self, text: str) -> int:
        if text in self._special_ids:
            return self._special_ids[text]
        tokens = self._plain(text)
        if len(tokens) != 1:
            raise ValueError(f"{text!r} is {len(tokens)} tokens for {self.model_name}, not one")
        return tokens[0]

    # -- the KV cache -----------------------------------------------------------------------

    def cached_prefix_length(self, tokens: Sequence[int], *,
                             images: Sequence[RGBImage] = ()) -> int:
        """How many leading tokens of ``tokens`` the cache holds from the last call (a row at
        an ``<|image|>`` token counts only for the same picture)."""
        effective = self._token_images(tokens, images)
        n = 0
        for a, b in zip(self._cache, effective, strict=False):
            if a != b:
                break
            n += 1
        return n

    def forget(self) -> None:
        """Empty the cache."""
        self._check_open()
        self._cache.clear()
        self.forgotten += 1

    # -- inference --------------------------------------------------------------------------

    def _check_prompt(self, prompt: Sequence[int]) -> None:
        self._check_open()
        if not prompt:
            raise InputError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(len(prompt), self.n_ctx)

    def _image_id(self, image: RGBImage) -> int:
        """The negative cache id that stands for a picture (from its pixels)."""
        digest = hashlib.blake2b(image.rgb, digest_size=4)
        digest.update(f"{image.width}x{image.height}".encode())
        return -1 - (int(digest.hexdigest(), 16) & 0x0FFFFFFF)

    def _token_images(self, tokens: Sequence[int], images: Sequence[RGBImage]) -> list[int]:
        """The prompt as the cache sees it: each ``<|image|>`` token replaced by its picture's
        id, so that a cached row counts only for the same picture.

        Raises:
            LlmkitError: pictures for an engine without vision.
            UsageError: more pictures than ``max_images``.
            InputError: the ``<|image|>`` tokens and the pictures do not pair up.
        """
        if not images:
            return list(tokens)
        if not self.vision:
            raise LlmkitError(f"{self.model_name} has no vision projector loaded")
        if self._max_images is not None and len(images) > self._max_images:
            raise UsageError(f"{self.model_name} takes {self._max_images} image(s) per "
                             f"conversation, and this one has {len(images)}")
        marker = self._special_ids.get(IMAGE_TOKEN)
        places = [i for i, t in enumerate(tokens) if t == marker]
        if len(places) != len(images):
            raise InputError(f"the prompt has {len(places)} {IMAGE_TOKEN} tokens for "
                             f"{len(images)} picture(s)")
        effective = list(tokens)
        for place, image in zip(places, images, strict=True):
            effective[place] = self._image_id(image)
        return effective

    def _encode(self, images: Sequence[RGBImage]) -> None:
        """Count the pictures a real engine would have to encode (not the one it holds)."""
        for image in images:
            key = self._image_id(image)
            if key != self._kept_image:
                self._kept_image = key
                self.encoded += 1

    def next_token_logits(self, prompt: Sequence[int], *,
                          images: Sequence[RGBImage] = ()) -> npt.NDArray[np.float32]:
        """The scripted logits after ``prompt`` (which then fills the cache).

        Raises:
            InputError: empty prompt, or ``images`` that do not pair with its ``<|image|>``
                tokens.
            ContextOverflowError: the prompt does not fit.
            LlmkitError: ``images`` for an engine without vision.
        """
        import numpy as np

        self._check_prompt(prompt)
        tokens = list(prompt)
        effective = self._token_images(tokens, images)
        self._encode(images)
        text = self.detokenize(tokens, special=True)
        self.calls.append(Call("next_token_logits", tokens, text, self._rendered.get(
            tuple(tokens)), None, list(images)))
        self._cache = effective
        script = self.logits(text) if callable(self.logits) else (self.logits or {})
        values = {self._token_for(piece): value for piece, value in script.items()}
        logits = np.full(self.vocab_size, self.base_logit, dtype=np.float32)
        for token, value in values.items():
            logits[token] = value
        return logits

    def generate(self, prompt: Sequence[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None, *,
                 images: Sequence[RGBImage] = ()) -> Generation:
        """The scripted answer to ``prompt``, cut by ``params.max_tokens`` and the context,
        streamed token by token to ``on_text``; ``images`` are the pictures its ``<|image|>``
        tokens stand for (each one cell, as in Llama 3.2 Vision).

        Raises:
            InputError: empty prompt, or ``images`` that do not pair with its ``<|image|>``
                tokens.
            ContextOverflowError: the prompt does not fit.
            LlmkitError: ``images`` for an engine without vision.
        """
        self._check_prompt(prompt)
        tokens = list(prompt)
        effective = self._token_images(tokens, images)
        keep = min(self.cached_prefix_length(tokens, images=images), len(tokens) - 1)
        self._encode(images)
        call = Call("generate", tokens, self.detokenize(tokens, special=True),
                    self._rendered.get(tuple(tokens)), params, list(images))
        result = self._answer(call, effective, len(tokens), len(tokens) - keep, on_text)
        result.image_tokens = len(images)
        return result

    def generate_with_images(self, messages: Sequence[Message], images: Sequence[RGBImage],
                             params: SamplingParams,
                             on_text: Callable[[str], None] | None = None, *,
                             reserve: int = 0) -> Generation:
        """The scripted answer to a conversation whose messages mark each image's place with
        :attr:`media_marker`; each image is ``image_tokens`` cells of the context.

        Raises:
            LlmkitError: the engine has no vision.
            InputError: the markers and the images do not pair up.
            ContextOverflowError: the prompt with its images does not fit.
        """
        self._check_open()
        if not self.vision:
            raise LlmkitError(f"{self.model_name} has no vision projector loaded")
        if self._max_images is not None and len(images) > self._max_images:
            raise UsageError(f"{self.model_name} takes {self._max_images} image(s) per "
                             f"conversation, and this one has {len(images)}")
        pieces = self.template(messages)
        text = "".join(p.text for p in pieces)
        marker = self.media_marker
        if text.count(marker) != len(images):
            raise InputError(f"the prompt marks {text.count(marker)} image(s) but "
                             f"{len(images)} were given")
        # Text runs and images as the real engine lays them out: each image a run of one
        # negative id per cell, from its pixels, so the cache keeps an image seen before.
        plan: list[int] = []
        starts: list[int] = []
        runs = self._split_at_marker(pieces, marker)
        for i, run in enumerate(runs):
            run_tokens = self._pieces_tokens(run)
            plan += self._with_bos(run_tokens) if i == 0 else run_tokens
            if i < len(images):
                image = images[i]
                digest = hashlib.blake2b(image.rgb, digest_size=4)
                digest.update(f"{image.width}x{image.height}".encode())
                starts.append(len(plan))
                plan += [-1 - (int(digest.hexdigest(), 16) & 0x0FFFFFFF)] * self.image_tokens
        n_cells = len(plan)
        if n_cells >= self.n_ctx or n_cells + reserve > self.n_ctx:
            raise ContextOverflowError(n_cells, self.n_ctx, reserve=reserve)
        keep = min(self.cached_prefix_length(plan), n_cells - 1)
        for start in starts:
            if start < keep < start + self.image_tokens:
                keep = start  # half an image cannot be kept
        call = Call("generate_with_images", plan, text, [dict(m) for m in messages], params,
                    list(images))
        result = self._answer(call, plan, n_cells, n_cells - keep, on_text)
        result.image_tokens = self.image_tokens * len(images)
        return result

    @staticmethod
    def _split_at_marker(pieces: Sequence[Piece], marker: str) -> list[list[Piece]]:
        runs: list[list[Piece]] = [[]]
        for piece in pieces:
            parts = piece.text.split(marker)
            for j, part in enumerate(parts):
                if j:
                    runs.append([])
                if part:
                    runs[-1].append(Piece(part, piece.trusted))
        return runs

    def _answer(self, call: Call, prompt: list[int], n_prompt: int, evaluated: int,
                on_text: Callable[[str], None] | None) -> Generation:
        """Generate the scripted answer after ``prompt`` as the real sampling loop would."""
        params = call.params or SamplingParams()
        self.calls.append(call)
        t0 = time.perf_counter()
        self._cache = list(prompt)
        t_prompt = t_first = time.perf_counter()
        room = self.n_ctx - len(prompt)
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        pieces: list[str] = []
        generated: list[int] = []
        finish = "stop"
        try:
            text = self.answer(call) if callable(self.answer) else self.answer
            answer = self.tokenize(text, add_special=False)
            if len(answer) >= limit:  # the loop ends before the end-of-turn token is sampled
                answer = answer[:limit]
                finish = ("context" if params.max_tokens is None or params.max_tokens > room
                          else "length")
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            for token in answer:
                if not generated:
                    t_first = time.perf_counter()
                generated.append(token)
                self._cache.append(token)
                piece = decoder.decode(self._token_bytes(token, False))
                if piece:
                    pieces.append(piece)
                    if on_text is not None:
                        on_text(piece)
            tail = decoder.decode(b"", final=True)
            if tail:
                pieces.append(tail)
                if on_text is not None:
                    on_text(tail)
        except KeyboardInterrupt:
            finish = "interrupted"
        t_end = time.perf_counter()
        call.result = Generation(
            text="".join(pieces), prompt_tokens=n_prompt, prompt_tokens_evaluated=evaluated,
            completion_tokens=len(generated), finish_reason=finish,
            prompt_ms=(t_prompt - t0) * 1000, generation_ms=(t_end - t_prompt) * 1000,
            first_token_ms=(max(t_first, t_prompt) - t0) * 1000, tokens=generated)
        return call.result

    def close(self) -> None:
        """Mark the engine closed (calling it again does nothing)."""
        self.closed = True

    def __enter__(self) -> FakeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CONVERSATION = re.compile(r"<BEGIN CONVERSATION>\n\n(?:(.*)\n\n)?<END CONVERSATION>", re.S)


def guard_conversation(prompt_text: str) -> str:
    """The conversation a Llama Guard prompt assesses: the text between its markers (empty
    for a picture checked alone, which Llama Guard 3 Vision's prompt gives no line)."""
    match = _CONVERSATION.search(prompt_text)
    assert match, prompt_text
    return match.group(1) or ""


class ScriptedGuardEngine(FakeEngine):
    """A guard model: one token per character (Latin-1), scripted logits and answers.

    At the answer position (right after the assistant header) the model first "writes" the
    characters of ``lead`` (logit 10 each, e.g. a blank line), then gives the logits of
    ``score_logits(conversation)``; ``answer(conversation)`` is what generate returns.
    ``conversation`` is the text between <BEGIN CONVERSATION> and <END CONVERSATION>. A Llama 3
    vocabulary (``llama3``) gets Llama Guard's own prompt; ChatML the task through
    ``chat_tokens``. Guards answer greedily: any other sampling fails the test.
    """

    def __init__(self, *, llama3: bool = True, n_ctx: int = 8192, lead: str = "\n\n",
                 answer: str | Callable[[str], str] = "unsafe\nS1",
                 score_logits: Mapping[str, float] | Callable[[str], Mapping[str, float]]
                 | None = None, vision: bool = False) -> None:
        scores = score_logits if score_logits is not None else {
            "s": 0.0, "u": math.log(3.0), "I": 2.0}
        header = "<|end_header_id|>" if llama3 else "<|im_start|>assistant\n"

        def logits(text: str) -> Mapping[str, float]:
            assert header in text, text
            written = len(text) - text.rindex(header) - len(header)
            if written < len(lead):
                return {lead[written]: 10.0}
            return scores(guard_conversation(text)) if callable(scores) else scores

        def reply(call: Call) -> str:
            assert call.params is not None and call.params.temperature == 0.0
            conversation = guard_conversation(call.text)
            return answer(conversation) if callable(answer) else answer

        vocabulary = (LLAMA3_VISION if vision else LLAMA3) if llama3 else CHATML
        super().__init__(reply, logits=logits, vocabulary=vocabulary, n_ctx=n_ctx,
                         model_name="scripted-guard", vision=vision, max_images=1 if vision
                         else None)

    @property
    def logit_calls(self) -> list[list[int]]:
        """The prompt of every next_token_logits call."""
        return [c.prompt for c in self.calls if c.kind == "next_token_logits"]

    @property
    def generated(self) -> list[str]:
        """The conversation part of each prompt answered."""
        return [guard_conversation(c.text) for c in self.calls if c.kind == "generate"]

    @property
    def chat_messages(self) -> list[list[Message]]:
        """Every conversation given to chat_tokens."""
        return self.chats
