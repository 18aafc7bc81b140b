"""The Llama 3.2 Vision Engine around a forward pass: prompts, images, sampling and its caches."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from llmkit.chat_template import ChatTemplateRejected, new_media_marker
from llmkit.engines._llama_vocab import Sampled, TextStream, VocabText
from llmkit.engines.base import Generation, Message, RGBImage, SamplingParams
from llmkit.engines.mllama.preprocess import TiledImage, tile_image
from llmkit.errors import (
    ContextOverflowError,
    InputError,
    InvalidModelFileError,
    LlmkitError,
    UsageError,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from llmkit.engines.mllama.hparams import MllamaFile
    from llmkit.engines.mllama.vocab import VocabModel

__all__ = ["EVAL_BATCH", "Forward", "MllamaEngine", "open_engine"]

# Prompt tokens handed to one Forward.eval call by default (llama.cpp's default batch): a long
# prompt is evaluated in such batches, so a forward pass never holds the attention scores of a
# whole context at once.
EVAL_BATCH = 512
IMAGE_TOKEN_TEXT = "<|image|>"


class Forward(Protocol):
    """The model's forward pass, as the engine drives it (implemented on ggml).

    It holds the self-attention KV cache and the cross-attention keys and values of one image.
    Members that only report are read-only properties, so a plain attribute satisfies them too.
    """

    @property
    def n_ctx(self) -> int:
        """Context length the self-attention cache was sized for."""
        ...

    @property
    def n_vocab(self) -> int:
        """Width of the logits (128256 for the published models)."""
        ...

    @property
    def device(self) -> str:
        """Where it computes, in the user's words ("cpu", "cuda", …)."""
        ...

    @property
    def threads(self) -> int:
        """CPU threads it computes with now."""
        ...

    @property
    def threads_reason(self) -> str:
        """Why that many threads."""
        ...

    @property
    def tile_size(self) -> int:
        """Tile side in pixels (``vision.image_size``)."""
        ...

    @property
    def max_tiles(self) -> int:
        """Tiles per image (``vision.max_num_tiles``)."""
        ...

    @property
    def image_mean(self) -> tuple[float, float, float]:
        """Per-channel mean the tiles are normalized with."""
        ...

    @property
    def image_std(self) -> tuple[float, float, float]:
        """Per-channel standard deviation the tiles are normalized with."""
        ...

    def encode_image(self, tiled: TiledImage) -> None:
        """Run the vision tower on this image and keep its cross-attention K/V (replacing any
        image kept before)."""
        ...

    def drop_image(self) -> None:
        """Forget the kept image (its cross-attention K/V)."""
        ...

    def eval(self, tokens: Sequence[int], n_past: int, image_from: int | None
             ) -> npt.NDArray[np.float32]:
        """Truncate the self-attention cache to ``n_past`` tokens, append ``tokens`` at
        positions ``n_past``…, and return the logits of the LAST token ([n_vocab] float32).
        Rows at positions >= ``image_from`` attend to the kept image; earlier rows (and all
        rows when None) see none."""
        ...

    def close(self) -> None:
        """Free everything; calling it again does nothing."""
        ...


def image_key(image: RGBImage) -> str:
    """The identity of a picture: a hash of its RGB bytes and its size."""
    digest = hashlib.blake2b(image.rgb, digest_size=16)
    digest.update(f"{image.width}x{image.height}".encode())
    return digest.hexdigest()


class _Candidates:
    """A llama_token_data_array over numpy logits, refilled for each sampling step."""

    def __init__(self, lc: Any, n_vocab: int) -> None:
        import numpy as np

        self._lc = lc
        self._n = n_vocab
        # llama_token_data (llama.h): int32 id, float logit, float p; 12 bytes, no padding.
        self._array = np.zeros(n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._data = self._array.ctypes.data_as(ctypes.POINTER(lc.llama_token_data))
        self._cur = lc.llama_token_data_array(self._data, n_vocab, -1, False)
        self._ref = ctypes.byref(self._cur)

    def sample(self, sampler: Any, logits: npt.NDArray[np.float32]) -> int:
        """Apply the sampler chain to ``logits``, accept the chosen token and return it, as
        llama.cpp's own ``llama_sampler_sample`` does over a context's logits."""
        array = self._array
        # The samplers sort and shrink the array in place (and may move ``data``): reset all.
        array["id"] = self._ids
        array["logit"] = logits[:self._n]
        array["p"] = 0.0
        cur = self._cur
        cur.data, cur.size, cur.selected, cur.sorted = self._data, self._n, -1, False
        self._lc.llama_sampler_apply(sampler, self._ref)
        if not 0 <= cur.selected < cur.size:
            raise LlmkitError("llama.cpp's sampler chose no token")
        token = int(cur.data[cur.selected].id)
        self._lc.llama_sampler_accept(sampler, token)
        return token


class MllamaEngine(VocabText):
    """Llama 3.2 Vision (mllama) behind the Engine interface, around a :class:`Forward`.

    The tokenizer, chat template and samplers are llama.cpp's own, on a vocabulary-only model
    (:mod:`llmkit.engines.mllama.vocab`). The engine keeps the tokens the self-attention cache
    holds, with the picture (and its ``<|image|>`` position) the rows after it attended to, and
    evaluates only what a new prompt does not share with them. The picture's cross-attention
    K/V stay in the forward pass: a follow-up question about the same picture does not encode
    it again.
    """

    def __init__(self, forward: Forward, vocab: VocabModel, *, name: str,
                 image_token: int, tokens_per_tile: int, n_batch: int = EVAL_BATCH,
                 load_ms: float = 0.0) -> None:
        """Wrap a forward pass and the model's vocabulary.

        Args:
            forward: the model's forward pass; the engine closes it.
            vocab: the vocabulary-only model of the same GGUF; the engine closes it.
            name: the model's name for reports.
            image_token: the id of ``<|image|>`` (``mllama.image_token_id``).
            tokens_per_tile: patches per tile plus the class token (1601 published): an
                image's :attr:`Generation.image_tokens` are its tiles times this.
            n_batch: prompt tokens per :meth:`Forward.eval` call.
            load_ms: how long loading took.

        Raises:
            InvalidModelFileError: the vocabulary and the forward pass do not fit together.
        """
        self._forward = forward
        self._vocab_model = vocab
        self._lc = vocab.lc
        self._model = vocab.model
        self._vocab = vocab.vocab
        self.model_name = name
        self.n_ctx = int(forward.n_ctx)
        self.device = forward.device
        self.load_ms = load_ms
        self.n_batch = max(1, n_batch)
        self._image_token = image_token
        self._tokens_per_tile = tokens_per_tile
        self._marker = new_media_marker()
        self._cached: list[int] = []
        # The rows of the cache from _cached_from on attended to the picture _cached_image.
        self._cached_from: int | None = None
        self._cached_image: str | None = None
        # The picture whose cross-attention K/V the forward pass keeps, and its tiles.
        self._kept_image: str | None = None
        self._kept_tiles = 0
        self._closed = True  # until the checks pass: a refused engine closes nothing itself
        if not 0 < forward.n_vocab <= vocab.n_tokens:
            raise InvalidModelFileError(
                name, f"gives {forward.n_vocab} logits for a vocabulary of {vocab.n_tokens}")
        if self._token_text(image_token) != IMAGE_TOKEN_TEXT:
            raise InvalidModelFileError(
                name, f"has no {IMAGE_TOKEN_TEXT} token at mllama.image_token_id "
                      f"({image_token})", hint="convert the checkpoint again")
        self._closed = False

    # -- facts ----------------------------------------------------------------------------

    @property
    def vision(self) -> bool:
        """Llama 3.2 Vision reads images."""
        return True

    @property
    def max_images(self) -> int | None:
        """One: the cross-attention layers attend to one image's tiles (the model was trained
        with one image per conversation, and Meta's reference takes one)."""
        return 1

    @property
    def media_marker(self) -> str:
        """The text that stands for the image inside a user message; random per engine, so no
        text a user writes can stand for an image."""
        return self._marker

    @property
    def threads(self) -> int:
        """CPU threads the forward pass computes with now."""
        return int(self._forward.threads)

    @property
    def threads_reason(self) -> str:
        """Why that many threads."""
        return self._forward.threads_reason

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the forward pass and the vocabulary; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            self._forward.close()
        finally:
            self._vocab_model.close()
            self._model = None

    def __enter__(self) -> MllamaEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter shutdown the modules close() needs may already be gone.
        with contextlib.suppress(Exception):
            self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the engine of {self.model_name} was used after close()")

    # -- prompts --------------------------------------------------------------------------

    def _typed_messages(self, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """The messages as the template takes them: a user message holding the media marker
        becomes the typed parts ``[{"type": "image"}, {"type": "text", "text": …}]``.

        The image part comes first and the text straight after it, as in the model card's
        examples (Meta's prompt format puts ``<|image|>`` directly before the question), so the
        newline the tasks write after the marker is dropped with it.

        Raises:
            InputError: the marker is in a message that is not the user's.
        """
        marker = self._marker
        typed: list[dict[str, Any]] = []
        for message in messages:
            content = message.get("content", "")
            if marker not in content:
                typed.append(dict(message))
                continue
            if message.get("role") != "user":
                raise InputError(f"an image can only be part of a user message, not of a "
                                 f"{message.get('role')!r} one")
            before, _, after = content.partition(marker)
            text = before + after.removeprefix("\n")
            typed.append({**message, "content": [{"type": "image"},
                                                 {"type": "text", "text": text}]})
        return typed

    def render_chat(self, messages: Sequence[Message], *,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The conversation through the model's chat template as text, ending where the answer
        starts; an image's place (:attr:`media_marker`) renders as ``<|image|>``.

        Raises:
            ChatTemplateError: the template is not valid Jinja or exceeded a rendering bound.
            ChatTemplateRejected: the template refused the conversation.
            InputError: the media marker is in a message that is not the user's.
        """
        return self._chat_template().render(self._typed_messages(messages), tools=tools)

    def _image_prompt(self, messages: Sequence[Message], n_images: int) -> list[int]:
        """The prompt tokens of a conversation that may show one picture.

        Raises:
            UsageError: a system prompt beside a picture, which the template refuses.
            ChatTemplateError, ChatTemplateRejected, InputError: as :meth:`render_chat`.
        """
        typed = self._typed_messages(messages)
        try:
            text, escapes = self._render_prompt(typed)
        except ChatTemplateRejected:
            if n_images and any(m.get("role") == "system" for m in messages):
                # The published template raises "Prompting with images is incompatible with
                # system messages."
                raise UsageError(
                    f"{self.model_name} cannot take a system prompt together with an image "
                    "(its chat template refuses it)",
                    hint="leave out the system prompt and put its instruction in the prompt",
                ) from None
            raise
        return self._with_bos(self._text_tokens(text, escapes))

    # -- the context ----------------------------------------------------------------------

    def _seen(self, position: int) -> str | None:
        """The picture the cached row at ``position`` attended to (None: no picture)."""
        if self._cached_from is not None and position >= self._cached_from:
            return self._cached_image
        return None

    def _valid_prefix(self, tokens: Sequence[int], image: str | None,
                      image_from: int | None) -> int:
        """How many leading rows of the cache a prompt can keep: the same tokens, each having
        attended to the same picture (or to none) as the prompt's rows will."""
        common = 0
        for a, b in zip(self._cached, tokens, strict=False):
            if a != b:
                break
            common += 1
        # Which picture a row sees changes only at the two image positions.
        for p in sorted({x for x in (self._cached_from, image_from) if x is not None}):
            wanted = image if image_from is not None and p >= image_from else None
            if p < common and self._seen(p) != wanted:
                return p
        return common

    def cached_prefix_length(self, tokens: Sequence[int], *,
                             images: Sequence[RGBImage] = ()) -> int:
        """How many leading tokens of ``tokens`` the cache already holds: rows that attended to
        a picture count only for a prompt showing the same picture at the same place (a text
        prompt sees none).

        Raises:
            InputError, UsageError: ``images`` that do not pair with the prompt's
                ``<|image|>`` tokens (see :meth:`generate`).
        """
        image_from, key, _ = self._token_images(tokens, images)
        return self._valid_prefix(tokens, key, image_from)

    def _token_images(self, tokens: Sequence[int], images: Sequence[RGBImage]
                      ) -> tuple[int | None, str | None, RGBImage | None]:
        """Where a token prompt shows its picture: (the ``<|image|>`` position, the picture's
        key, the picture), or Nones for a prompt without pictures.

        Raises:
            InputError: the ``<|image|>`` tokens and the pictures do not pair up.
            UsageError: more than one picture.
        """
        if not images:
            return None, None, None
        if len(images) > 1:
            raise UsageError(
                f"{self.model_name} takes one image per conversation, and this one has "
                f"{len(images)}", hint="ask about each picture in a conversation of its own")
        places = [i for i, t in enumerate(tokens) if t == self._image_token]
        if len(places) != 1:
            raise InputError(f"the prompt has {len(places)} {IMAGE_TOKEN_TEXT} tokens for one "
                             "picture")
        return places[0], image_key(images[0]), images[0]

    def forget(self) -> None:
        """Empty the self-attention cache's bookkeeping, so the next prompt is evaluated from
        its first token; the kept picture stays encoded."""
        self._cached.clear()
        self._cached_from = None
        self._cached_image = None

    def _eval(self, tokens: Sequence[int], n_past: int, image_from: int | None,
              image: str | None) -> npt.NDArray[np.float32]:
        """Evaluate ``tokens`` after the first ``n_past`` cached rows (in batches of
        :attr:`n_batch`); the logits of the last one."""
        forward, batch = self._forward, self.n_batch
        logits: npt.NDArray[np.float32] | None = None
        for start in range(0, len(tokens), batch):
            part = tokens[start:start + batch]
            at = n_past + start
            # The forward pass truncates its cache first: so does the record, so that an
            # interrupted evaluation leaves it describing rows the cache still holds.
            del self._cached[at:]
            if self._cached_from is not None and self._cached_from >= at:
                self._cached_from = self._cached_image = None
            logits = forward.eval(part, at, image_from)
            self._cached.extend(part)
            if image_from is not None:
                self._cached_from, self._cached_image = image_from, image
        if logits is None:
            raise InputError("the prompt is empty")
        return logits

    # -- inference ------------------------------------------------------------------------

    def next_token_logits(self, prompt: Sequence[int], *,
                          images: Sequence[RGBImage] = ()) -> npt.NDArray[np.float32]:
        """Evaluate ``prompt`` and return the logits of the token that would follow it.

        Args:
            prompt: token ids.
            images: the picture the prompt's ``<|image|>`` token stands for (at most one), as
                for :meth:`generate`.

        Returns:
            A float32 numpy array of the model's logits width (a copy).

        Raises:
            InputError: empty prompt, or a picture without its ``<|image|>`` token.
            UsageError: more than one picture.
            ContextOverflowError: the prompt does not fit.
        """
        import numpy as np

        self._check_open()
        if not prompt:
            raise InputError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(len(prompt), self.n_ctx)
        image_from, key, picture = self._token_images(prompt, images)
        keep = min(self._valid_prefix(prompt, key, image_from), len(prompt) - 1)
        if picture is not None and key is not None:
            self._encode(picture, key)
        return np.array(self._eval(prompt[keep:], keep, image_from, key), dtype=np.float32,
                        copy=True)

    def generate(self, prompt: Sequence[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None, *,
                 images: Sequence[RGBImage] = ()) -> Generation:
        """Evaluate ``prompt`` (reusing the cached prefix) and sample a continuation.

        Args:
            prompt: token ids, e.g. from :meth:`chat_tokens`, or a prompt written in the
                model's own markup (Llama Guard 3 Vision's) holding one ``<|image|>`` token.
            params: sampling settings, an optional max token count and grammar.
            on_text: called with each new piece of text as soon as it is complete UTF-8.
            images: the picture that ``<|image|>`` stands for (at most one): rows from that
                token on attend to it. A picture the forward pass holds already is not encoded
                again, and cached rows that saw it are kept.

        Returns:
            The generated text, token counts and timings.

        Raises:
            InputError: empty prompt, or a picture without its ``<|image|>`` token.
            UsageError: more than one picture.
            ContextOverflowError: the prompt does not fit in the context.
            SchemaError: llama.cpp cannot parse the grammar.
        """
        self._check_open()
        if not prompt:
            raise InputError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(len(prompt), self.n_ctx)
        image_from, key, picture = self._token_images(prompt, images)
        keep = min(self._valid_prefix(prompt, key, image_from), len(prompt) - 1)
        result = self._run(prompt, keep, image_from, key, params, on_text, picture)
        result.image_tokens = self._kept_tiles * self._tokens_per_tile if images else 0
        return result

    def generate_with_images(self, messages: Sequence[Message], images: Sequence[RGBImage],
                             params: SamplingParams,
                             on_text: Callable[[str], None] | None = None, *,
                             reserve: int = 0) -> Generation:
        """Answer a conversation that shows (at most) one picture, at :attr:`media_marker`.

        The picture is cut into tiles and encoded once; a follow-up about the same picture
        keeps its encoding and every cached row of the conversation it shares.

        Args:
            messages: role/content messages; the picture's place is marked in a user message.
            images: the one picture (or none), as RGB pixels.
            params: sampling settings.
            on_text: receives the reply as it is generated.
            reserve: context cells that must stay free for the answer.

        Returns:
            The generated text with counts (``image_tokens``: the picture's tiles times the
            tokens per tile its cross-attention reads) and timings.

        Raises:
            InputError: the markers and the images do not pair up, or a marker outside a user
                message.
            UsageError: more than one picture, or a system prompt beside one.
            ContextOverflowError: the prompt does not fit in the context.
        """
        self._check_open()
        marker = self._marker
        marks = sum(m.get("content", "").count(marker) for m in messages)
        if marks != len(images):
            raise InputError(f"the prompt marks {marks} image(s) but {len(images)} were given")
        if len(images) > 1:
            raise UsageError(
                f"{self.model_name} takes one image per conversation, and this one has "
                f"{len(images)}", hint="ask about each picture in a conversation of its own")
        tokens = self._image_prompt(messages, len(images))
        image_from: int | None = None
        key: str | None = None
        if images:
            places = [i for i, t in enumerate(tokens) if t == self._image_token]
            if len(places) != 1:
                raise LlmkitError(
                    f"the chat template of {self.model_name} put {len(places)} "
                    f"{IMAGE_TOKEN_TEXT} tokens in a prompt with one picture",
                    hint="use the model's published chat template")
            image_from, key = places[0], image_key(images[0])
        n_prompt = len(tokens)
        if n_prompt >= self.n_ctx or n_prompt + reserve > self.n_ctx:
            raise ContextOverflowError(n_prompt, self.n_ctx, reserve=reserve)
        keep = min(self._valid_prefix(tokens, key, image_from), n_prompt - 1)
        picture = images[0] if images else None
        result = self._run(tokens, keep, image_from, key, params, on_text, picture)
        result.image_tokens = self._kept_tiles * self._tokens_per_tile if images else 0
        return result

    def _encode(self, picture: RGBImage, key: str) -> None:
        """Tile the picture and have the forward pass encode it (unless it holds it already)."""
        if key == self._kept_image:
            return
        forward = self._forward
        try:
            tiled = tile_image(picture, mean=forward.image_mean, std=forward.image_std,
                               max_tiles=forward.max_tiles, tile_size=forward.tile_size)
        except ValueError as exc:
            raise InputError(f"the image cannot be prepared: {exc}") from None
        self._kept_image = None  # until the encoding has finished
        try:
            forward.encode_image(tiled)
        except BaseException:
            # Interrupted or failed half-way: leave the forward pass holding no picture.
            with contextlib.suppress(Exception):
                forward.drop_image()
            raise
        self._kept_image, self._kept_tiles = key, tiled.num_tiles

    def _run(self, tokens: Sequence[int], keep: int, image_from: int | None,
             image: str | None, params: SamplingParams,
             on_text: Callable[[str], None] | None, picture: RGBImage | None = None
             ) -> Generation:
        """Encode the picture if needed, evaluate the prompt after ``keep`` cached rows, and
        sample; Ctrl-C ends it as "interrupted"."""
        lc = self._lc
        sampler = self._sampler(params)
        t0 = time.perf_counter()
        t_prompt = t0
        try:
            if picture is not None and image is not None:
                self._encode(picture, image)
            logits = self._eval(tokens[keep:], keep, image_from, image)
            t_prompt = time.perf_counter()
            sampled = self._sample_loop(sampler, logits, params, self.n_ctx - len(tokens),
                                        on_text, image_from, image)
        except KeyboardInterrupt:
            sampled = Sampled([], [], "interrupted", t_prompt)
        finally:
            lc.llama_sampler_free(sampler)
        return sampled.generation(len(tokens), len(tokens) - keep if t_prompt > t0 else 0,
                                  t0, t_prompt)

    def _sample_loop(self, sampler: Any, logits: npt.NDArray[np.float32],
                     params: SamplingParams, room: int,
                     on_text: Callable[[str], None] | None, image_from: int | None,
                     image: str | None) -> Sampled:
        """Sample and evaluate tokens until end of generation, the token limit, or a full
        context. The last token is not evaluated: nothing would read its logits."""
        stream = TextStream(self._lc, self._vocab, on_text)
        generated: list[int] = []
        out = Sampled(stream.pieces, generated, "length", time.perf_counter())
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        candidates = _Candidates(self._lc, int(self._forward.n_vocab))
        is_eog, vocab, cached = self._lc.llama_vocab_is_eog, self._vocab, self._cached
        try:
            while len(generated) < limit:
                token = candidates.sample(sampler, logits)
                if is_eog(vocab, token):
                    out.finish = "stop"
                    break
                if not generated:
                    out.t_first = time.perf_counter()
                generated.append(token)
                stream.push(token)
                if len(generated) < limit:
                    logits = self._eval((token,), len(cached), image_from, image)
            else:
                if params.max_tokens is None or params.max_tokens > room:
                    out.finish = "context"
            stream.finish()
        except KeyboardInterrupt:
            out.finish = "interrupted"
        return out


def open_engine(path: str | Path, forward_factory: Callable[[MllamaFile], Forward], *,
                name: str | None = None, verbose: bool = False, n_batch: int | None = None,
                cache_dir: Path | None = None) -> MllamaEngine:
    """Open a Llama 3.2 Vision GGUF: its checked header, its tokenizer, its forward pass.

    Args:
        path: the mllama GGUF (llmkit's layout).
        forward_factory: builds the forward pass from the checked file (device, threads and
            context size are the factory's to apply).
        name: the model's name for reports (default: the file name).
        verbose: pass llama.cpp's log through to stderr.
        n_batch: prompt tokens per forward evaluation (None: :data:`EVAL_BATCH`).
        cache_dir: where the tokenizer's companion GGUF is cached (default
            :func:`llmkit.engines.mllama.vocab.cache_dir`).

    Returns:
        The engine; close it (or use it as a context manager) to free the memory.

    Raises:
        InvalidModelFileError: not a Llama 3.2 Vision GGUF in llmkit's layout, or damaged.
        LlmkitError: what the forward factory raises (devices, memory).
    """
    from llmkit.engines.mllama.hparams import read_mllama
    from llmkit.engines.mllama.vocab import VocabModel

    t0 = time.perf_counter()
    file = read_mllama(Path(path))
    vocab = VocabModel(file.path, file.text, directory=cache_dir, verbose=verbose)
    try:
        forward = forward_factory(file)
    except BaseException:
        vocab.close()
        raise
    try:
        return MllamaEngine(forward, vocab, name=name or file.path.name,
                            image_token=file.text.image_token,
                            tokens_per_tile=file.vision.n_patches,
                            n_batch=EVAL_BATCH if n_batch is None else n_batch,
                            load_ms=(time.perf_counter() - t0) * 1000)
    except BaseException:
        forward.close()
        vocab.close()
        raise

