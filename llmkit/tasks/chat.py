"""One-shot prompts and multi-turn chat on top of any TextEngine."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit._fs import atomic_write_text
from llmkit.engine import Generation, Message, SamplingParams, TextEngine
from llmkit.errors import ContextOverflowError, InputError

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
    engine: TextEngine,
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
    """A chat: an optional system prompt and alternating user/assistant messages."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def rendered(self) -> list[Message]:
        """System prompt first (when set), then the turns."""
        head: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.messages)

    def to_dict(self) -> dict[str, Any]:
        """JSON shape used by /save and /load."""
        return {"system": self.system, "messages": self.messages}

    def save(self, path: Path) -> None:
        """Write the conversation as JSON (atomically)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> Conversation:
        """Read a conversation written by :meth:`save` (or any list of role/content messages).

        Raises:
            InputError: unreadable file or wrong shape.
        """
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(f"cannot load a conversation from {path}: {exc}") from None
        if isinstance(data, list):
            data = {"messages": data}
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages
        ):
            raise InputError(f"{path} is not a conversation (expected role/content messages)")
        system = data.get("system")
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        if system is None and turns and turns[0]["role"] == "system":
            system = turns.pop(0)["content"]
        return cls(system=system if isinstance(system, str) else None, messages=turns)


def fit_conversation(
    engine: TextEngine, convo: Conversation, reserve: int
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
        convo.messages.pop(0)
        dropped += 1
        # Keep the history starting with a user turn, as chat templates expect.
        while len(convo.messages) > 1 and convo.messages[0]["role"] != "user":
            convo.messages.pop(0)
            dropped += 1


def chat_turn(
    engine: TextEngine,
    convo: Conversation,
    user_text: str,
    *,
    params: SamplingParams | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Reply:
    """Add a user message, answer it, and record the answer in ``convo``.

    The engine reuses its KV cache for the part of the conversation it has already seen, so
    a turn costs only the new tokens. An interrupted reply is kept as far as it got.

    Raises:
        InputError: empty message.
        ContextOverflowError: the message alone does not fit.
    """
    if not user_text.strip():
        raise InputError("the message is empty")
    user_text = user_text.rstrip()  # a piped message ends with a newline nobody typed on purpose
    params = params or SamplingParams()
    reserve = min(params.max_tokens or CHAT_REPLY_RESERVE, engine.n_ctx // 4)
    reserve = max(reserve, MIN_REPLY_TOKENS)
    before = list(convo.messages)
    convo.messages.append({"role": "user", "content": user_text})
    try:
        tokens, dropped = fit_conversation(engine, convo, reserve)
    except (ContextOverflowError, KeyboardInterrupt):
        # Not answered: leave the history as it was before this turn (fit_conversation may
        # already have dropped older turns while trying to make room).
        convo.messages[:] = before
        raise
    generation = engine.generate(tokens, params, on_text)
    convo.messages.append({"role": "assistant", "content": generation.text})
    return Reply(engine.model_name, generation.text, generation, dropped_messages=dropped)
