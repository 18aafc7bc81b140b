"""One-shot prompts and multi-turn chat on top of any Engine."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit._fs import atomic_write_bytes
from llmkit.engines.base import Engine, Generation, Message, RGBImage, SamplingParams
from llmkit.errors import ContextOverflowError, InputError, LlmkitError, NotAVisionModelError

# Room kept free for the reply when fitting a conversation into the context.
MIN_REPLY_TOKENS = 16
CHAT_REPLY_RESERVE = 512


@dataclass
class Reply:
    """A model's answer with what it took to produce it."""

    model: str
    text: str
    generation: Generation
    dropped_messages: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON shape of `--format json`."""
        g = self.generation
        return {
            "model": self.model,
            "text": self.text,
            "finish_reason": g.finish_reason,
            "usage": {
                "prompt_tokens": g.prompt_tokens,
                "prompt_tokens_evaluated": g.prompt_tokens_evaluated,
                "completion_tokens": g.completion_tokens,
                "total_tokens": g.prompt_tokens + g.completion_tokens,
                # Context cells (or, for Llama 3.2 Vision, cross-attention tokens) the
                # pictures took; 0 without images.
                "image_tokens": g.image_tokens,
            },
            "timings": {
                "prompt_ms": round(g.prompt_ms, 2),
                "generation_ms": round(g.generation_ms, 2),
                "first_token_ms": round(g.first_token_ms, 2),
                "prompt_tokens_per_s": round(g.prompt_tokens_per_s, 2),
                "tokens_per_s": round(g.tokens_per_s, 2),
            },
            "dropped_messages": self.dropped_messages,
        }


def build_user_message(instruction: str | None, context: str | None) -> str:
    """Combine an instruction (from arguments) with context (from stdin) into one message.

    Raises:
        InputError: both are missing or blank.
    """
    # A trailing newline from `echo` or a file is not part of what the user meant to ask.
    parts = [p.rstrip() for p in (context, instruction) if p is not None and p.strip()]
    if not parts:
        raise InputError("the prompt is empty", hint="pass a prompt as an argument or on stdin")
    return "\n\n".join(parts)


def run_prompt(
    engine: Engine,
    prompt: str,
    *,
    system: str | None = None,
    params: SamplingParams | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Reply:
    """Answer one prompt.

    Args:
        engine: a loaded model.
        prompt: the user's message.
        system: an optional system prompt.
        params: sampling settings.
        on_text: receives the reply as it is generated.

    Returns:
        The reply.

    Raises:
        InputError: empty prompt.
        ContextOverflowError: the prompt leaves no room for an answer.
    """
    if not prompt.strip():
        raise InputError("the prompt is empty", hint="pass a prompt as an argument or on stdin")
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    tokens = engine.chat_tokens(messages)
    if len(tokens) + MIN_REPLY_TOKENS > engine.n_ctx:
        raise ContextOverflowError(len(tokens), engine.n_ctx, reserve=MIN_REPLY_TOKENS)
    generation = engine.generate(tokens, params or SamplingParams(), on_text)
    return Reply(engine.model_name, generation.text, generation)


@dataclass
class Conversation:
    """A chat: an optional system prompt and alternating user/assistant messages.

    A user message may carry ``images``: a list of image file paths shown with it.
    """

    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    image_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def rendered(self) -> list[Message]:
        """System prompt first (when set), then the turns (text only)."""
        head: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    @property
    def has_images(self) -> bool:
        """Whether any message shows an image."""
        return any(m.get("images") for m in self.messages)

    @property
    def image_paths(self) -> list[str]:
        """Every image the messages show, in order."""
        return [path for m in self.messages for path in m.get("images") or []]

    def prepared(self, paths: Sequence[str], max_side: int = 2048) -> list[RGBImage]:
        """The images of ``paths``, each read and prepared once and kept for later turns.

        Raises:
            ImageError: an image cannot be read.
        """
        from llmkit.images import prepare_image

        for path in paths:
            if path not in self.image_cache:
                self.image_cache[path] = prepare_image(Path(path), max_side=max_side)
        return [self.image_cache[path] for path in paths]

    def rendered_with_images(self, marker: str, max_side: int = 2048
                             ) -> tuple[list[Message], list[RGBImage]]:
        """The turns with each image's ``marker`` before its message's text, and the images.

        Images are prepared once and kept for later turns.

        Raises:
            ImageError: an image cannot be read.
        """
        messages: list[Message] = [{"role": "system", "content": self.system}] if (
            self.system) else []
        images: list[RGBImage] = []
        for m in self.messages:
            paths = m.get("images") or []
            images += self.prepared(paths, max_side)
            content = "".join(marker for _ in paths) + ("\n" if paths else "") + m["content"]
            messages.append({"role": m["role"], "content": content})
        return messages, images

    def to_dict(self) -> dict[str, Any]:
        """JSON shape used by /save and /load."""
        return {"system": self.system, "messages": self.messages}

    def save(self, path: Path) -> None:
        """Write the conversation as JSON (atomically: a failed save leaves ``path`` as it was).

        Raises:
            LlmkitError: the file cannot be written (a directory, no permission, a full disk).
        """
        import errno

        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        try:
            # Python decodes a non-UTF-8 argument (--system) to lone surrogates; inside JSON
            # strings "\udcff" is a valid escape, so the file stays UTF-8 and loads back as is.
            atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))
        except OSError as exc:
            if isinstance(exc, IsADirectoryError) or path.is_dir():
                problem, hint = "it is a directory", "give a file name, e.g. /save chat.json"
            elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
                problem, hint = "the disk is full", "free some space or save elsewhere"
            elif isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
                problem = ("the file system is read-only" if exc.errno == errno.EROFS
                           else "permission denied")
                hint = "save it somewhere you can write"
            else:
                problem, hint = exc.strerror or str(exc), "save it somewhere else"
            raise LlmkitError(f"cannot save the conversation to {path}: {problem}",
                              hint=hint) from None
        except ValueError:  # a NUL byte in the name
            raise LlmkitError(f"cannot save the conversation to {str(path)!r}: the name holds "
                              "a NUL byte", hint="give another file name") from None

    @classmethod
    def load(cls, path: Path) -> Conversation:
        """Read a conversation written by :meth:`save` (or any list of role/content messages).

        Raises:
            InputError: unreadable file or wrong shape.
        """
        from llmkit.io import parse_json, read_text_file, surrogate_problem

        try:
            text = read_text_file(path)
        except InputError as exc:
            raise InputError(f"cannot load a conversation: {exc.message}", hint=exc.hint
                             ) from None
        except ValueError:  # a NUL byte in the name
            raise InputError(f"cannot load a conversation from {str(path)!r}: the name holds "
                             "a NUL byte") from None
        try:
            data = parse_json(text)  # strict: no NaN, and too deep a nesting is a ValueError
        except ValueError as exc:
            raise InputError(f"cannot load a conversation: {path} is not JSON ({exc})") from None
        if isinstance(data, list):
            data = {"messages": data}
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages
        ):
            raise InputError(f"{path} is not a conversation (expected role/content messages)")
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise InputError(f"{path} is not a conversation (its \"system\" is not text)")
        # JSON can escape half a character, which no tokenizer takes: say which message.
        texts = [("the system prompt", system or "")] + [
            (f"message {i}", m["content"]) for i, m in enumerate(messages, 1)]
        for what, value in texts:
            problem = surrogate_problem(value)
            if problem is not None:
                raise InputError(f"cannot load a conversation: in {path}, {what} {problem}")
        turns: list[dict[str, Any]] = []
        for m in messages:
            turn: dict[str, Any] = {"role": m["role"], "content": m["content"]}
            if isinstance(m.get("images"), list) and all(isinstance(p, str) for p in m["images"]):
                turn["images"] = list(m["images"])
            turns.append(turn)
        if system is None and turns and turns[0]["role"] == "system":
            system = turns.pop(0)["content"]
        return cls(system=system if isinstance(system, str) else None, messages=turns)


def fit_conversation(
    engine: Engine, convo: Conversation, reserve: int
) -> tuple[list[int], int]:
    """Tokenize a conversation, dropping its oldest turns until it fits with ``reserve`` spare.

    The system prompt and the newest user message are never dropped.

    Returns:
        The prompt tokens and how many messages were dropped from ``convo`` (it is modified).

    Raises:
        ContextOverflowError: even the system prompt and the last message do not fit.
    """
    dropped = 0
    while True:
        tokens = engine.chat_tokens(convo.rendered())
        if len(tokens) + reserve <= engine.n_ctx:
            return tokens, dropped
        if len(convo.messages) <= 1:
            raise ContextOverflowError(len(tokens), engine.n_ctx, reserve=reserve)
        dropped += _drop_oldest_turn(convo)


def _drop_oldest_turn(convo: Conversation) -> int:
    """Remove the oldest message, and any that would then open the history other than a user
    turn (chat templates expect one first); returns how many were removed."""
    convo.messages.pop(0)
    dropped = 1
    while len(convo.messages) > 1 and convo.messages[0]["role"] != "user":
        convo.messages.pop(0)
        dropped += 1
    return dropped


def chat_turn(
    engine: Engine,
    convo: Conversation,
    user_text: str,
    *,
    params: SamplingParams | None = None,
    on_text: Callable[[str], None] | None = None,
    images: Sequence[str] = (),
) -> Reply:
    """Add a user message, answer it, and record the answer in ``convo``.

    The engine reuses its KV cache for the part of the conversation it has already seen, so
    a turn costs only the new tokens. An interrupted reply is kept as far as it got.

    Args:
        engine: a loaded model (one with a projector when images are involved).
        convo: the conversation so far; the new turns are appended to it.
        user_text: the new message.
        params: sampling settings.
        on_text: receives the reply as it is generated.
        images: image files shown with this message.

    Raises:
        InputError: empty message.
        ContextOverflowError: the message alone does not fit.
        NotAVisionModelError: images for an engine without a projector.
        ImageError: an image cannot be read.
    """
    if not user_text.strip():
        raise InputError("the message is empty")
    user_text = user_text.rstrip()  # a piped message ends with a newline nobody typed on purpose
    params = params or SamplingParams()
    reserve = min(params.max_tokens or CHAT_REPLY_RESERVE, engine.n_ctx // 4)
    reserve = max(reserve, MIN_REPLY_TOKENS)
    before = list(convo.messages)
    message: dict[str, Any] = {"role": "user", "content": user_text}
    if images:
        message["images"] = [str(p) for p in images]
    convo.messages.append(message)
    try:
        if convo.has_images:
            generation, dropped = _answer_with_images(engine, convo, params, reserve, on_text)
        else:
            tokens, dropped = fit_conversation(engine, convo, reserve)
            generation = engine.generate(tokens, params, on_text)
    except BaseException:
        # Not answered, for whatever reason: leave the history as it was before this turn
        # (fitting may already have dropped older turns while trying to make room).
        convo.messages[:] = before
        raise
    convo.messages.append({"role": "assistant", "content": generation.text})
    return Reply(engine.model_name, generation.text, generation, dropped_messages=dropped)


def _answer_with_images(engine: Engine, convo: Conversation, params: SamplingParams,
                        reserve: int, on_text: Callable[[str], None] | None
                        ) -> tuple[Generation, int]:
    """Answer a conversation that shows images, dropping its oldest turns until it fits."""
    if not engine.vision:
        from llmkit.defaults import default_model_name

        raise NotAVisionModelError(engine.model_name, default_model_name("vision"))
    dropped = 0
    while True:
        messages, images = convo.rendered_with_images(engine.media_marker)
        try:
            generation = engine.generate_with_images(
                messages, images, params, on_text, reserve=reserve)
            return generation, dropped
        except ContextOverflowError:
            if len(convo.messages) <= 1:
                raise
        dropped += _drop_oldest_turn(convo)


def run_prompt_with_images(
    engine: Engine,
    prompt: str,
    images: Sequence[RGBImage],
    *,
    system: str | None = None,
    params: SamplingParams | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Reply:
    """Answer one prompt about one or more prepared images (``llmkit run --image``).

    Raises:
        InputError: empty prompt.
        NotAVisionModelError: the engine has no projector.
        ContextOverflowError: the images and prompt do not fit.
    """
    if not prompt.strip():
        raise InputError("the prompt is empty", hint="pass a prompt as an argument or on stdin")
    if not engine.vision:
        from llmkit.defaults import default_model_name

        raise NotAVisionModelError(engine.model_name, default_model_name("vision"))
    messages: list[Message] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user",
                     "content": engine.media_marker * len(images) + "\n" + prompt.rstrip()})
    generation = engine.generate_with_images(
        messages, images, params or SamplingParams(), on_text, reserve=MIN_REPLY_TOKENS)
    return Reply(engine.model_name, generation.text, generation)


def check_chat_template(engine: Engine, convo: Conversation) -> None:
    """Render ``convo`` with one more user message, as its next turn will be rendered: a
    model whose template fails is refused before the first message is typed (``chat``, and
    ``/model`` beside the model in use).

    Raises:
        LlmkitError: the model's chat template fails on it (whatever the template raised).
    """
    messages = convo.rendered()
    if not messages or messages[-1]["role"] != "user":
        messages.append({"role": "user", "content": "Hello."})
    try:
        engine.chat_tokens(messages)
    except LlmkitError:
        raise
    except Exception as exc:
        raise LlmkitError(
            f"the chat template of {engine.model_name} fails: {type(exc).__name__}: {exc}",
            hint="use another model, or fix its template") from None
