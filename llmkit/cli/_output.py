"""Data to stdout, chatter to stderr: the only place the CLI writes."""

from __future__ import annotations

import codecs
import contextlib
import io
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from llmkit._fs import json_dumps
from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

_state: dict[str, Any] = {"quiet": False, "console": None}

# How the two streams write what UTF-8 cannot: a file name's undecodable bytes (given by
# Python as U+DC80..U+DCFF) as those bytes again, anything else as a backslash escape.
NAME_ERRORS = "llmkit-names"


def _names(exc: UnicodeError) -> tuple[str | bytes, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    bad = exc.object[exc.start:exc.end]
    if all("\udc80" <= ch <= "\udcff" for ch in bad):
        return bytes(ord(ch) - 0xDC00 for ch in bad), exc.end
    return codecs.backslashreplace_errors(exc)


codecs.register_error(NAME_ERRORS, _names)


class StdoutClosed(BaseException):
    """The reader of stdout went away (``| head``): the command stops, exit code 141.

    A BaseException, like KeyboardInterrupt, so that no handler of item errors records it
    as one item's failure and goes on writing into the closed pipe.
    """


def prepare_streams() -> None:
    """Let stdout and stderr carry file names that are not UTF-8 (see ``NAME_ERRORS``)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors != NAME_ERRORS:
            with contextlib.suppress(OSError, ValueError):  # closed: nothing more is written
                stream.reconfigure(errors=NAME_ERRORS)


def silence_stdout() -> None:
    """Point stdout's descriptor at /dev/null, so what is still buffered can go nowhere
    quietly (no "Exception ignored" at exit, no second error)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # not a real descriptor (tests capturing output): nothing to flush at exit


def _output_error(exc: OSError) -> LlmkitError:
    return LlmkitError(f"cannot write the output: {exc.strerror or exc}",
                       hint="stdout goes to a full or failing disk; free some space or send the "
                            "output elsewhere, then run again")


def _stdout_failed(exc: OSError) -> NoReturn:
    silence_stdout()
    if isinstance(exc, BrokenPipeError):
        raise StdoutClosed() from None
    raise _output_error(exc) from None


def stdout_error(exc: OSError) -> LlmkitError | None:
    """The sentence for ``exc`` when it was raised by printing that is not ours (Typer's help,
    a Rich table): the innermost frame of its traceback is in Typer or Rich; else None."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", "")) if tb is not None else ""
    if not module.startswith(("typer.", "rich.")):
        return None
    silence_stdout()
    return _output_error(exc)


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


# C0 and C1 control characters and DEL: in a message they would end the line early (a forged
# second "llmkit: error" line) or drive the terminal. Names that are not UTF-8 (lone surrogates)
# are left alone: the stream's error handler writes their own bytes.
_CONTROLS = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0))}


def _stderr(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr is closed or full: the exit code is all that is left to say it


def _plain(message: str) -> None:
    # Every message is one line, whatever text from a file, a model or a user it quotes.
    _stderr(message.translate(_CONTROLS) + "\n")


def debugging() -> bool:
    """True when ``LLMKIT_DEBUG`` asks for tracebacks instead of one-line errors."""
    return os.environ.get("LLMKIT_DEBUG", "") not in ("", "0")


def stdout_is_tty() -> bool:
    """True when stdout is a terminal (a person reads it, not a program)."""
    return sys.stdout.isatty()


def progress_enabled() -> bool:
    """True when progress lines are shown: stderr is a terminal and -q was not given."""
    if _state["quiet"]:
        return False
    try:
        return sys.stderr.isatty()
    except (ValueError, AttributeError):  # closed, or no stderr at all
        return False


def progress(line: str, *, keep: bool = False) -> None:
    """Show ``line`` in place of the previous progress line on stderr; with ``keep``, end it so
    it stays. Nothing off a terminal or with -q (see :func:`progress_enabled`)."""
    if progress_enabled():
        _stderr(f"\r\033[K{line.translate(_CONTROLS)}" + ("\n" if keep else ""))


def progress_clear() -> None:
    """Erase the progress line, so the next message starts on a clean line (terminal only)."""
    if progress_enabled():
        _stderr("\r\033[K")


def info(text: str) -> None:
    """Text that was asked for on stderr as it is, several lines allowed, shown even with -q
    (the chat's /help, /system, /model: replies to the user, not data for a pipe)."""
    _stderr(text + "\n")


def traceback(exc: BaseException) -> None:
    """The full traceback of ``exc`` on stderr (``LLMKIT_DEBUG``)."""
    import traceback as tb

    _stderr("".join(tb.format_exception(exc)))


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
    """Stream a piece of data to stdout right away.

    Raises:
        StdoutClosed: the reader went away.
        LlmkitError: stdout cannot be written (a full disk, an I/O error).
    """
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError as exc:
        _stdout_failed(exc)


def write_json(obj: Any) -> None:
    """One JSON document on stdout (file names that are not UTF-8 as ``\\udcXX`` escapes)."""
    write(json_dumps(obj, indent=2) + "\n")


def write_jsonl(obj: Any) -> None:
    """One JSON line on stdout, flushed."""
    write(json_dumps(obj) + "\n")


def write_table(table: Table) -> None:
    """A Rich table on stdout, its cells as they are (no highlighting of numbers or paths).

    A failing stdout is answered by app.py (see :func:`stdout_error`), as for Typer's help.
    """
    from rich.console import Console

    Console(highlight=False).print(table)
