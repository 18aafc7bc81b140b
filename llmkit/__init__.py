"""llmkit: run local language and vision models through llama.cpp."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Conversation",
    "Engine",
    "LlmkitError",
    "SamplingParams",
    "chat_turn",
    "open_engine",
    "resolve",
    "run_prompt",
]

if TYPE_CHECKING:
    from llmkit.engines import Engine, SamplingParams
    from llmkit.errors import LlmkitError
    from llmkit.session import open_engine
    from llmkit.store import resolve
    from llmkit.tasks.chat import Conversation, chat_turn, run_prompt

_LAZY = {
    "Engine": "llmkit.engines",
    "SamplingParams": "llmkit.engines",
    "LlmkitError": "llmkit.errors",
    "open_engine": "llmkit.session",
    "resolve": "llmkit.store",
    "Conversation": "llmkit.tasks.chat",
    "chat_turn": "llmkit.tasks.chat",
    "run_prompt": "llmkit.tasks.chat",
}


def __getattr__(name: str) -> Any:
    # Heavy modules load only when used, so `import llmkit` stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")
