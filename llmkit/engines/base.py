"""The one engine interface every task takes, and the plain values that cross it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from llmkit.chat_template import Piece

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = ["Engine", "Generation", "Message", "Piece", "RGBImage", "SamplingParams"]

Message = Mapping[str, Any]
"""A chat turn: ``role`` and ``content`` (text), and for tool use an assistant's
``tool_calls`` or a tool's ``tool_call_id``, as Hugging Face chat templates read them."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature`` 0 means greedy."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = None
    grammar: str | None = None


@dataclass
class Generation:
    """The result of one generation, with counts and timings."""

    text: str
    prompt_tokens: int
    prompt_tokens_evaluated: int
    completion_tokens: int
    finish_reason: str  # "stop", "length", "context", "interrupted" or "cancelled"
    prompt_ms: float
    generation_ms: float
    first_token_ms: float
    tokens: list[int] = field(default_factory=list, repr=False)
    image_tokens: int = 0

    @property
    def prompt_tokens_per_s(self) -> float:
        """Prompt tokens evaluated per second (0 when nothing was evaluated)."""
        if self.prompt_ms <= 0:
            return 0.0
        return self.prompt_tokens_evaluated / (self.prompt_ms / 1000)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second."""
        if self.generation_ms <= 0:
            return 0.0
        return self.completion_tokens / (self.generation_ms / 1000)


class RGBImage(Protocol):
    """Pixels ready for a vision projector: ``width`` × ``height`` × 3 bytes, row by row."""

    @property
    def rgb(self) -> bytes: ...

    @property
    def width(self) -> int: ...

    @property
    def height(self) -> int: ...


class Engine(Protocol):
    """What every task needs from a loaded model, and what every engine implements.

    One context whose KV cache is reused across calls: a prompt that starts like the last one
    evaluates only what is new. No type of a native library crosses this interface, so a
    second engine (Llama 3.2 Vision on ggml) and the tests' scripted fake implement it as
    llama.cpp's does. Abilities a model may lack are members that say so (:attr:`vision`),
    never names to probe for.
    """

    model_name: str
    """The name the user gave (catalog name, or the file's)."""
    n_ctx: int
    """Context length in tokens: prompt plus answer must fit."""
    device: str
    """Where the model runs, in the user's words ("cpu", "cuda", "metal", …)."""
    load_ms: float
    """How long loading took."""

    @property
    def vision(self) -> bool:
        """Whether the model reads images (:meth:`generate_with_images` works)."""
        ...

    @property
    def max_images(self) -> int | None:
        """How many images one conversation may show (None: as many as fit the context)."""
        ...

    @property
    def media_marker(self) -> str:
        """The text that marks an image's place in a message for :meth:`generate_with_images`."""
        ...

    @property
    def chat_template(self) -> str:
        """The model's chat template (Jinja source)."""
        ...

    @property
    def threads(self) -> int:
        """CPU threads the engine computes with now."""
        ...

    @property
    def threads_reason(self) -> str:
        """Why that many threads, in words (for doctor and ``--format json``)."""
        ...

    # -- tokenizer -------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False
                 ) -> list[int]:
        """Token ids of ``text`` (BOS first when ``add_special``; special-token text matched
        as such only when ``parse_special``, which is for trusted text alone)."""
        ...

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """The text of ``tokens`` (special tokens written out only when ``special``)."""
        ...

    def token_pieces(self, text: str) -> list[bytes]:
        """The bytes each token of ``text`` stands for (no special tokens), in order."""
        ...

    @property
    def reads_tools(self) -> bool:
        """Whether the model's chat template writes function definitions into the prompt, so
        that ``tools`` can be given to :meth:`chat_tokens`."""
        ...

    def chat_tokens(self, messages: Sequence[Message], *,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """The prompt tokens of a conversation through the model's chat template, ending
        where the assistant's answer starts; message text never becomes special tokens.
        ``tools``: OpenAI-style function definitions, written by the template (untrusted
        text too)."""
        ...

    def render_chat(self, messages: Sequence[Message], *,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The conversation through the model's chat template as text, ending where the
        answer starts: for showing or timing a prompt; :meth:`chat_tokens` is what to run."""
        ...

    def tokenize_pieces(self, pieces: Sequence[Piece]) -> list[int]:
        """Token ids of text pieces, special tokens parsed only in trusted ones."""
        ...

    # -- the context -----------------------------------------------------------------------
    def cached_prefix_length(self, tokens: Sequence[int], *,
                             images: Sequence[RGBImage] = ()) -> int:
        """How many leading tokens of ``tokens`` the KV cache already holds (with ``images``:
        as for :meth:`next_token_logits`, a cached row counts only if it saw the same picture)."""
        ...

    def forget(self) -> None:
        """Empty the KV cache, so the next prompt is evaluated from its first token."""
        ...

    # -- inference -------------------------------------------------------------------------
    def generate(self, prompt: Sequence[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None, *,
                 images: Sequence[RGBImage] = ()) -> Generation:
        """Evaluate ``prompt`` (reusing the cached prefix) and sample a continuation,
        streaming complete UTF-8 text to ``on_text``; Ctrl-C ends it as "interrupted".

        ``images``: the pictures the prompt's image tokens stand for, in order (a prompt built
        from the model's own markup, such as Llama Guard 3 Vision's ``<|image|>``; one token
        per picture). An engine that cannot read pictures in a token prompt raises the
        LlmkitError sentence; a picture already encoded is not encoded again."""
        ...

    def generate_with_images(self, messages: Sequence[Message], images: Sequence[RGBImage],
                             params: SamplingParams,
                             on_text: Callable[[str], None] | None = None, *,
                             reserve: int = 0) -> Generation:
        """Answer a conversation whose messages mark each image's place with
        :attr:`media_marker`. Raises LlmkitError when the model has no :attr:`vision`."""
        ...

    def next_token_logits(self, prompt: Sequence[int], *,
                          images: Sequence[RGBImage] = ()) -> npt.NDArray[np.float32]:
        """Evaluate ``prompt`` and return the logits of the token that would follow it
        (``images`` as for :meth:`generate`)."""
        ...

    def close(self) -> None:
        """Free the model and its context; calling it again does nothing."""
        ...

    def __enter__(self) -> Engine: ...

    def __exit__(self, *exc: object) -> None: ...
