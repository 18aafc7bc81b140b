"""Input from stdin and files, decoded strictly so bad bytes are reported, not guessed."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
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


def open_problem(path: Path, exc: OSError) -> str:
    """Why ``path`` could not be opened, as the end of a sentence that starts with its name."""
    if isinstance(exc, FileNotFoundError):
        return "does not exist"
    # Windows refuses to open a directory with EACCES rather than EISDIR.
    if isinstance(exc, IsADirectoryError) or (isinstance(exc, PermissionError)
                                               and path.is_dir()):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "cannot be read (permission denied)"
    return f"cannot be read ({exc.strerror or exc})"


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


_GLOB_CHARS = frozenset("*?[")


def _walk(directory: Path, suffixes: frozenset[str], recursive: bool) -> list[str]:
    found: list[str] = []
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise InputError(f"cannot read directory {directory}: {exc.strerror}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue  # .git, .DS_Store, editor droppings: never anyone's input
        if entry.is_dir():
            if recursive:
                found.extend(_walk(entry, suffixes, recursive))
        elif entry.suffix.lower() in suffixes:
            found.append(str(entry))
    return found


def split_path_list(text: str) -> list[str]:
    """Paths from `find -print0` (NUL-separated) or one per line; blank lines are ignored."""
    parts = text.split("\0") if "\0" in text else text.splitlines()
    return [p.strip("\r\n") for p in parts if p.strip()]


def collect_paths(
    args: list[str],
    *,
    suffixes: frozenset[str],
    recursive: bool = False,
    stdin: BinaryIO | None = None,
) -> list[str]:
    """Expand command-line inputs into the files to process, each once, in order.

    A file is taken whatever its name; a directory gives the files inside it whose suffix is in
    ``suffixes`` (all levels with ``recursive``); a pattern such as ``'photos/*.jpg'`` is
    expanded here too, so it works when quoted or in a cron line; ``-`` reads a list of paths
    from stdin. A path that does not exist is kept, so the batch reports it as failed.

    Raises:
        InputError: nothing to process, or stdin is not a list of paths.
    """
    import glob

    from llmkit.batch import unique

    paths: list[str] = []
    for arg in args:
        if arg == "-":
            if stdin is None:
                if stdin_is_tty() or sys.stdin is None:
                    raise InputError("'-' reads paths from stdin, but stdin is a terminal",
                                     hint="pipe a list of paths, e.g. `find . -name '*.jpg' |`")
                stdin = sys.stdin.buffer
            paths.extend(split_path_list(decode_text(stdin.read(), "stdin")))
            continue
        path = Path(arg).expanduser()
        if path.is_dir():
            paths.extend(_walk(path, suffixes, recursive))
        elif not path.exists() and _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True))
            for match in matches:
                if Path(match).is_dir():
                    paths.extend(_walk(Path(match), suffixes, recursive))
                else:
                    paths.append(match)
            if not matches:
                paths.append(arg)
        else:
            paths.append(str(path) if arg.startswith("~") else arg)
    result = list(unique(paths))
    if not result:
        raise InputError("no input files found",
                         hint="name files, directories (-r to recurse) or globs, or '-' for stdin")
    return result


def numbered_lines(source: str) -> Iterator[tuple[int, str | InputError]]:
    """The non-blank lines of a file, or of stdin for ``-``, with their line numbers.

    stdin is read line by line as it arrives, so a caller can answer each line before the
    pipe closes; a stdin line that is not UTF-8 comes as an error for that line alone.

    Raises:
        InputError: the file is missing, unreadable or not UTF-8, or stdin is a terminal.
    """
    if source != "-":
        for number, line in enumerate(read_text_file(Path(source)).splitlines(), 1):
            if line.strip():
                yield number, line
        return
    if stdin_is_tty() or sys.stdin is None:
        raise InputError("'-' reads lines from stdin, but stdin is a terminal",
                         hint="pipe JSONL in, or name a file")
    for number, raw in enumerate(iter(sys.stdin.buffer.readline, b""), 1):
        try:
            line = decode_text(raw, f"line {number}")
        except InputError as exc:
            yield number, exc
            continue
        if line.strip():
            yield number, line
