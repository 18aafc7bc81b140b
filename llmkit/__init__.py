"""llmkit: run local language and vision models through llama.cpp."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "Conversation",
    "Engine",
    "LlmkitError",
    "Reply",
    "SamplingParams",
    "Summary",
    "Verdict",
    "caption",
    "chat",
    "chat_turn",
    "check",
    "load",
    "open_engine",
    "resolve",
    "run",
    "run_prompt",
    "summarize",
]

if TYPE_CHECKING:
    from llmkit.api import caption, chat, check, load, run, summarize
    from llmkit.engines import Engine, SamplingParams
    from llmkit.errors import LlmkitError
    from llmkit.session import open_engine
    from llmkit.store import resolve
    from llmkit.tasks.chat import Conversation, Reply, chat_turn, run_prompt
    from llmkit.tasks.safety import Verdict
    from llmkit.tasks.summarize import Summary

_LAZY = {
    "caption": "llmkit.api",
    "chat": "llmkit.api",
    "check": "llmkit.api",
    "load": "llmkit.api",
    "run": "llmkit.api",
    "summarize": "llmkit.api",
    "Engine": "llmkit.engines",
    "SamplingParams": "llmkit.engines",
    "LlmkitError": "llmkit.errors",
    "open_engine": "llmkit.session",
    "resolve": "llmkit.store",
    "Conversation": "llmkit.tasks.chat",
    "Reply": "llmkit.tasks.chat",
    "chat_turn": "llmkit.tasks.chat",
    "run_prompt": "llmkit.tasks.chat",
    "Verdict": "llmkit.tasks.safety",
    "Summary": "llmkit.tasks.summarize",
}


def __getattr__(name: str) -> Any:
    # Heavy modules load only when used, so `import llmkit` stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
