"""Input from stdin and files, decoded strictly so bad bytes are reported, not guessed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import BinaryIO

from llmkit.errors import InputError


def stdin_is_tty() -> bool:
    """True when a person is typing at stdin (no pipe, no file, no /dev/null)."""
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def decode_text(data: bytes, source: str) -> str:
    """Decode UTF-8 (a leading BOM is dropped).

    Raises:
        InputError: the bytes are not UTF-8, naming the offset of the first bad byte.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1].hex()
        raise InputError(
            f"{source} is not UTF-8 text (byte 0x{bad} at offset {exc.start})",
            hint="convert it first, e.g. `iconv -f latin1 -t utf-8`",
        ) from None


def read_stdin(stream: BinaryIO | None = None) -> str | None:
    """All of stdin as text, or None when stdin is a terminal or absent.

    Raises:
        InputError: stdin is not UTF-8.
    """
    if stream is None:
        if stdin_is_tty() or sys.stdin is None:
            return None
        stream = sys.stdin.buffer
    data = stream.read()
    return decode_text(data, "stdin")


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's contents.

    Raises:
        InputError: missing, unreadable, a directory, or not UTF-8.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from None
    return decode_text(data, str(path))
