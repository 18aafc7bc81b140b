"""Data to stdout, chatter to stderr: the only place the CLI writes."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

_state: dict[str, Any] = {"quiet": False, "console": None}


def set_quiet(quiet: bool) -> None:
    """Silence notes and progress on stderr (errors still show)."""
    _state["quiet"] = quiet


def stderr_console() -> Console:
    """A Rich console on stderr: colour only on a TTY, and never with NO_COLOR."""
    if _state["console"] is None:
        from rich.console import Console

        _state["console"] = Console(
            stderr=True, highlight=False, no_color=bool(os.environ.get("NO_COLOR")),
        )
    console: Console = _state["console"]
    return console


def _plain(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def note(message: str) -> None:
    """An informational line on stderr (hidden by -q)."""
    if not _state["quiet"]:
        _plain(f"llmkit: {message}")


def warn(message: str) -> None:
    """A warning on stderr (hidden by -q)."""
    if not _state["quiet"]:
        _plain(f"llmkit: warning: {message}")


def flagged(message: str) -> None:
    """A safety refusal on stderr; always shown (it explains an exit code)."""
    _plain(f"llmkit: flagged: {message}")


def error(message: str) -> None:
    """An error line on stderr; always shown."""
    _plain(f"llmkit: error: {message}")


def write(text: str) -> None:
    """Stream a piece of data to stdout right away."""
    sys.stdout.write(text)
    sys.stdout.flush()


def write_json(obj: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
    sys.stdout.flush()


def write_jsonl(obj: Any) -> None:
    """One JSON line on stdout, flushed."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()
