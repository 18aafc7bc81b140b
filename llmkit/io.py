"""Input from stdin and files: regular files and pipes only, bounded in size, decoded strictly."""

from __future__ import annotations

import io
import math
import os
import re
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO

from llmkit.errors import InputError, InputFileError, UsageError

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# A token covers at most one vocabulary entry's worth of text, and the longest entries are runs
# of spaces or punctuation: SmolLM2's is 81 bytes (a newline and 80 spaces). 256 leaves room for
# vocabularies with longer runs, so text longer than ctx × this many bytes cannot fit a
# ctx-token context, whatever the model, and reading can stop there instead of tokenizing it.
MAX_TOKEN_BYTES = 256

# A byte of text takes at most six in JSON (\u001f), so a --batch line whose text could fit
# a context is at most this many times the text limit.
_JSON_GROWTH = 6

# Read in pieces this big: enough to keep system calls few, small next to any limit.
_CHUNK = MiB

# How long a named pipe that nothing has open for writing is given for a writer to turn up
# (a script that starts its producer a moment after llmkit); never waited for longer.
PIPE_WRITER_WAIT = 2.0


@dataclass(frozen=True)
class ReadLimit:
    """The most bytes to read of one input, and what to tell the user past that.

    ``why`` completes "stdin is larger than 1 MiB, …"; ``hint`` is the next step.
    """

    size: int
    why: str
    hint: str | None = None

    def exceeded(self, source: str) -> InputFileError:
        """The error for ``source`` being larger than this."""
        return InputFileError(source, f"is larger than {format_size(self.size)}, {self.why}",
                              hint=self.hint)


def prompt_limit(ctx: int | None) -> ReadLimit:
    """The most bytes of text that could fit a ``ctx``-token context (the default one for None)."""
    if ctx is None:
        from llmkit.defaults import DEFAULT_CTX

        ctx = DEFAULT_CTX  # the default context is never larger than this
    return ReadLimit(ctx * MAX_TOKEN_BYTES, f"more than a {ctx}-token context can hold",
                     "raise --ctx, or shorten the input")


def batch_line_limit(ctx: int | None) -> ReadLimit:
    """The longest JSONL line whose text could fit a ``ctx``-token context."""
    text = prompt_limit(ctx)
    return ReadLimit(text.size * _JSON_GROWTH, text.why, text.hint)


# A text file named for its content (a JSON schema, a policy): far beyond any real one.
TEXT_FILE_LIMIT = ReadLimit(16 * MiB, "the most llmkit reads of a text file")

# About 400,000 paths of 80 bytes; a bigger library is captioned in parts.
PATH_LIST_LIMIT = ReadLimit(32 * MiB, "the most llmkit reads as a list of paths",
                            "split it, e.g. with `split -l 100000`, and run once per part")


def format_size(size: int) -> str:
    """``1 MiB``, ``1.5 KiB``, ``100 bytes``: binary units, as limits are set."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size >= scale:
            return (f"{size // scale} {unit}" if size % scale == 0
                    else f"{size / scale:.1f} {unit}")
    return "1 byte" if size == 1 else f"{size} bytes"


def size_argument(size: int) -> str:
    """A size as it is typed on the command line: ``64M``, ``512K``, ``1000``."""
    for suffix, scale in (("G", GiB), ("M", MiB), ("K", KiB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{suffix}"
    return str(size)


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_SCALES = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}


def parse_size(text: str, option: str) -> int:
    """``32M`` → 33554432: bytes, or with k, M, G or T (binary; a trailing B or iB is allowed).

    Raises:
        UsageError: not a size, or zero.
    """
    match = _SIZE.fullmatch(text)
    size = int(float(match.group(1)) * _SCALES[match.group(2).lower()]) if match else 0
    if size < 1:
        raise UsageError(f"{option} must be a size such as 32M, not '{text}'",
                         hint="bytes, or with k, M or G: 1M is 1,048,576 bytes")
    return size


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


def parse_json(text: str | bytes, *, strict: bool = True) -> Any:
    """JSON as RFC 8259 defines it, which is less than Python's json module reads.

    NaN, Infinity and numbers beyond a float's range (``1e999``) are refused: JSON has no such
    numbers, so jq and JavaScript cannot read them, and llmkit would echo them into its own
    output. ``strict=False`` lets them through, for files written by Python's json module
    (Hugging Face configs). Either way, nesting deep enough to exhaust the decoder's recursion
    is a ValueError, not a RecursionError.

    Raises:
        ValueError: not JSON; the message says why.
    """
    import json

    try:
        if not strict:
            return json.loads(text)
        return json.loads(text, parse_constant=_not_a_json_number, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("it nests arrays or objects too deeply") from None


def _not_a_json_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number")
    return value


def printable(text: str) -> str:
    """``text`` with its unprintable characters as escapes (``\\n``, ``\\x1b``, ``\\u202e``).

    For words a file supplies (a tensor name, a metadata key) that go into a one-line message:
    a newline there would forge a second "llmkit: error" line, and an escape sequence would
    reach the terminal as it is.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def surrogate_problem(text: str) -> str | None:
    """Why ``text`` is not Unicode text, or None when it is.

    A JSON escape such as ``"\\ud800"`` decodes to half of a UTF-16 surrogate pair, which no
    encoder (and no tokenizer) takes; the sentence completes "the text …".
    """
    match = _SURROGATE.search(text)
    if match is None:
        return None
    return (f"holds \\u{ord(match.group()):04x}, half of a UTF-16 surrogate pair, which is not "
            "a character")


def _why(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc)


def open_problem(path: Path, exc: OSError) -> str:
    """Why ``path`` could not be opened, as the end of a sentence that starts with its name."""
    if isinstance(exc, FileNotFoundError):
        return "is a symbolic link to a missing file" if os.path.islink(path) else "does not exist"
    # Windows refuses to open a directory with EACCES rather than EISDIR.
    if isinstance(exc, IsADirectoryError) or (isinstance(exc, PermissionError)
                                               and path.is_dir()):
        return "is a directory"
    return f"cannot be read ({_why(exc)})"


def _refusal(path: Path, mode: int) -> str | None:
    """Why a file of this type is not read (None for a regular file or a pipe)."""
    if stat.S_ISREG(mode) or stat.S_ISFIFO(mode):
        return None
    if stat.S_ISDIR(mode):
        # A directory reaches a reader when a walk could not list it: say why, as the walk
        # would have.
        try:
            with os.scandir(path):
                pass
        except OSError as exc:
            return f"is a directory that cannot be read ({_why(exc)})"
        return "is a directory"
    if stat.S_ISCHR(mode):
        return "is a character device, not a file"
    if stat.S_ISBLK(mode):
        return "is a block device, not a file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a file"
    return "is not a regular file"


# Opening never waits: not for a FIFO's writer (O_NONBLOCK), not to become a terminal's
# controlling process (O_NOCTTY).
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


class _Pipe(io.RawIOBase):
    """A pipe's descriptor, with what was read while looking for its writer put back first."""

    def __init__(self, fd: int, pending: bytes) -> None:
        super().__init__()
        self._fd = fd
        self._pending = pending

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._pending:
            data, self._pending = self._pending[:len(view)], self._pending[len(view):]
        else:
            data = os.read(self._fd, len(view))
        view[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def _first_bytes(fd: int, label: str) -> bytes:
    """Start reading a pipe opened without waiting, and make it block from then on."""
    try:
        data = os.read(fd, _CHUNK)
    except BlockingIOError:
        data = None  # a writer holds it and has not written yet: wait for it, as `cat` does
    if data == b"":
        # Nothing has the pipe open for writing. A writer may be a moment away; give it that,
        # and no more. Linux reports neither data nor hang-up for a FIFO that never had a
        # writer, so the poll waits for one to come (and write, or leave).
        import select

        if not hasattr(select, "poll"):
            raise InputFileError(label, "is a pipe that nothing is writing to")
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(int(PIPE_WRITER_WAIT * 1000)):
            raise InputFileError(label, "is a pipe that nothing is writing to")
    os.set_blocking(fd, True)
    return data or b""


def open_input(path: Path, *, name: str | None = None) -> BinaryIO:
    """Open a regular file or a pipe to read, refusing anything else, never blocking on the open.

    Devices, sockets and directories are refused by their type, before they are opened. A
    pipe (a FIFO, ``<(…)``, ``/dev/stdin``) must have a writer when it is opened, or get one
    within ``PIPE_WRITER_WAIT`` seconds; its reads then block as usual.

    Args:
        path: the file.
        name: what to call it in messages (default: the path).

    Raises:
        InputFileError: missing, unreadable, not a file or a pipe, or a pipe nothing writes to.
    """
    label = name or str(path)
    try:
        refusal = _refusal(path, os.stat(path).st_mode)
    except OSError as exc:
        raise InputFileError(label, open_problem(path, exc)) from None
    if refusal is not None:
        raise InputFileError(label, refusal)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise InputFileError(label, open_problem(path, exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        # What was opened, which a rename since the stat may have changed.
        refusal = _refusal(path, mode)
        if refusal is not None:
            raise InputFileError(label, refusal)
        pending = _first_bytes(fd, label) if stat.S_ISFIFO(mode) else None
        if pending is None and hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    if pending is not None:
        return io.BufferedReader(_Pipe(fd, pending))
    return os.fdopen(fd, "rb")


def read_capped(stream: BinaryIO, limit: ReadLimit, source: str) -> bytes:
    """Everything ``stream`` holds, reading no more than one byte past ``limit``.

    Raises:
        InputFileError: there is more than the limit.
    """
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(min(_CHUNK, limit.size + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit.size:
            raise limit.exceeded(source)


def _check_size(stream: BinaryIO, limit: ReadLimit, label: str) -> None:
    # A regular file says its size: one too large is refused before any of it is read.
    info = os.fstat(stream.fileno())
    if stat.S_ISREG(info.st_mode) and info.st_size > limit.size:
        raise limit.exceeded(label)


_EMPTY_PIPE = "is an empty pipe (nothing was written to it)"


def read_input(path: Path, limit: ReadLimit, *, name: str | None = None) -> bytes:
    """All the bytes of a regular file or a pipe, refusing one larger than ``limit``.

    Raises:
        InputFileError: as :func:`open_input`, an empty pipe, or too large.
    """
    label = name or str(path)
    with open_input(path, name=label) as stream:
        _check_size(stream, limit, label)
        data = read_capped(stream, limit, label)
        if not data and not stream.seekable():
            raise InputFileError(label, _EMPTY_PIPE)
    return data


def seekable_input(path: Path, limit: ReadLimit, *, name: str | None = None) -> BinaryIO:
    """A regular file open at its start, or a pipe's bytes (read up to ``limit``) in memory.

    Raises:
        InputFileError: as :func:`read_input`.
    """
    label = name or str(path)
    stream = open_input(path, name=label)
    try:
        _check_size(stream, limit, label)
        if stream.seekable():
            return stream
        data = read_capped(stream, limit, label)
    except BaseException:
        stream.close()
        raise
    stream.close()
    if not data:
        raise InputFileError(label, _EMPTY_PIPE)
    return io.BytesIO(data)


def read_stdin(stream: BinaryIO | None = None, *, limit: ReadLimit | None = None) -> str | None:
    """All of stdin as text, or None when stdin is a terminal or absent.

    Reading stops one byte past ``limit`` (default: what the default context can hold), so an
    endless stream ends in an error, not in memory growing without end.

    Raises:
        InputError: stdin is not UTF-8, or larger than the limit.
    """
    if stream is None:
        if stdin_is_tty() or sys.stdin is None:
            return None
        stream = sys.stdin.buffer
    data = read_capped(stream, limit or prompt_limit(None), "stdin")
    return decode_text(data, "stdin")


def read_text_file(path: Path, limit: ReadLimit = TEXT_FILE_LIMIT) -> str:
    """A UTF-8 text file's contents (a regular file or a pipe, up to ``limit``).

    Raises:
        InputError: missing, unreadable, not a file or a pipe, too large, or not UTF-8.
    """
    return decode_text(read_input(path, limit), str(path))


def item_key(path: str) -> str:
    """How two mentions of the same input are recognised: the absolute, normalised path."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


_GLOB_CHARS = frozenset("*?[")


class _Inputs:
    """The inputs found so far, each once: names of one file (links) count as one."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.seen: set[object] = set()
        self.walked: set[tuple[int, int]] = set()  # directories entered, by (device, inode)

    def add(self, path: str, identity: tuple[int, int] | None = None) -> None:
        if identity is None:
            try:
                info = os.stat(path)
                identity = (info.st_dev, info.st_ino)
            except OSError:
                pass
        if identity is None:
            key: object = item_key(path)  # missing (the batch will say so): known by name
        else:
            key = identity
        if key not in self.seen:
            self.seen.add(key)
            self.paths.append(path)

    def enter(self, info: os.stat_result) -> bool:
        """Whether a directory is new to this walk (False: a loop, or a second link to it)."""
        identity = (info.st_dev, info.st_ino)
        if identity in self.walked:
            return False
        self.walked.add(identity)
        return True


def _listing(directory: Path, found: _Inputs) -> Iterator[os.DirEntry[str]]:
    """A directory's entries in name order; one that cannot be listed becomes an input itself,
    so the batch records it as failed and goes on."""
    try:
        with os.scandir(directory) as entries:
            listed = sorted(entries, key=lambda e: e.name)
    except OSError:
        found.add(str(directory))
        return iter(())
    return iter(listed)


def _walk(top: Path, suffixes: frozenset[str], recursive: bool, found: _Inputs) -> None:
    """The files under ``top`` whose suffix is in ``suffixes``: depth first, in name order.

    A loop, not recursion, so no depth is too deep. Symbolic links are followed, each
    directory entered once (a link back up is not re-entered, two links to one directory
    give its files once). Only regular files are taken: a FIFO would block a reader, and
    devices and sockets are nobody's photo or document, as `find -type f` sees it.
    """
    try:
        if not found.enter(os.stat(top)):
            return
    except OSError:
        found.add(str(top))
        return
    stack = [(top, _listing(top, found))]
    while stack:
        directory, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        if entry.name.startswith("."):
            continue  # .git, .DS_Store, editor droppings: never anyone's input
        path = directory / entry.name
        try:
            info = entry.stat()  # follows a symbolic link
        except OSError:
            # A dangling link, or an entry that cannot be looked at: one with a wanted suffix
            # stays an input, so the batch says what is wrong with it.
            if PurePath(entry.name).suffix.lower() in suffixes:
                found.add(str(path))
            continue
        if stat.S_ISDIR(info.st_mode):
            if recursive and found.enter(info):
                stack.append((path, _listing(path, found)))
        elif stat.S_ISREG(info.st_mode) and PurePath(entry.name).suffix.lower() in suffixes:
            found.add(str(path), (info.st_dev, info.st_ino))


def split_path_list(data: bytes) -> list[str]:
    """Paths from `find -print0` (NUL-separated) or one per line; blank lines are ignored.

    File names are bytes: each is decoded as the file system's names are (``os.fsdecode``),
    so a name that is not UTF-8 is taken like one found in a directory, not refused.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]  # a BOM from an editor is not part of the first name
    parts = data.split(b"\0") if b"\0" in data else data.split(b"\n")
    return [os.fsdecode(p.strip(b"\r\n")) for p in parts if p.strip()]


def _takes(path: str) -> bool:
    """Whether a glob match is an input: a regular file, or something whose problem (a dangling
    link, say) the batch should report; pipes, devices and sockets are not."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def collect_paths(
    args: list[str],
    *,
    suffixes: frozenset[str],
    recursive: bool = False,
    stdin: BinaryIO | None = None,
) -> list[str]:
    """Expand command-line inputs into the files to process, each once, in order.

    A file is taken whatever its name or type (a named pipe is read; a device is refused by
    its reader); a directory gives the regular files inside it whose suffix is in
    ``suffixes`` (all levels with ``recursive``; a directory that cannot be listed is kept,
    so the batch reports it as failed); a pattern such as ``'photos/*.jpg'`` is expanded here
    too, so it works when quoted or in a cron line, and takes regular files as a walk does;
    ``-`` reads a list of paths from stdin (at most ``PATH_LIST_LIMIT``). A path that does
    not exist is kept, so the batch reports it as failed. Several names of one file (symbolic
    or hard links) give it once, under the first name met.

    Raises:
        InputError: nothing to process, or stdin is not a list of paths, or is too long.
    """
    import glob

    found = _Inputs()
    for arg in args:
        if arg == "-":
            if stdin is None:
                if stdin_is_tty() or sys.stdin is None:
                    raise InputError("'-' reads paths from stdin, but stdin is a terminal",
                                     hint="pipe a list of paths, e.g. `find . -name '*.jpg' |`")
                stdin = sys.stdin.buffer
            listing = read_capped(stdin, PATH_LIST_LIMIT, "stdin")
            for listed in split_path_list(listing):
                found.add(listed)
            continue
        path = Path(arg).expanduser()
        if path.is_dir():
            _walk(path, suffixes, recursive, found)
        elif not path.exists() and _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True))
            for match in matches:
                if Path(match).is_dir():
                    _walk(Path(match), suffixes, recursive, found)
                elif _takes(match):
                    found.add(match)
            if not matches:
                found.add(arg)
        else:
            found.add(str(path) if arg.startswith("~") else arg)
    if not found.paths:
        raise InputError("no input files found",
                         hint="name files, directories (-r to recurse) or globs, or '-' for stdin")
    return found.paths


def _bounded_lines(stream: BinaryIO, limit: ReadLimit) -> Iterator[bytes | None]:
    """The raw lines of a stream as they arrive; None for one longer than ``limit``, which is
    skipped without being kept."""
    while True:
        line = stream.readline(limit.size + 1)
        if not line:
            return
        if len(line) <= limit.size or line.endswith(b"\n"):
            yield line
            continue
        while not line.endswith(b"\n"):
            line = stream.readline(_CHUNK)
            if not line:
                break
        yield None


def numbered_lines(source: str, *, limit: ReadLimit | None = None
                   ) -> Iterator[tuple[int, str | InputError]]:
    """The non-blank lines of a file, or of stdin for ``-``, with their line numbers.

    Lines are read as they arrive, never the whole input at once, so a caller can answer each
    line before a pipe closes; a line that is not UTF-8, or longer than ``limit`` (default:
    what could fit the default context), comes as an error for that line alone.

    Raises:
        InputError: the file is missing, unreadable or not a file, or stdin is a terminal.
    """
    limit = limit or batch_line_limit(None)
    if source == "-":
        if stdin_is_tty() or sys.stdin is None:
            raise InputError("'-' reads lines from stdin, but stdin is a terminal",
                             hint="pipe JSONL in, or name a file")
        yield from _numbered(sys.stdin.buffer, limit)
        return
    with open_input(Path(source)) as stream:
        yield from _numbered(stream, limit)


def _numbered(stream: BinaryIO, limit: ReadLimit) -> Iterator[tuple[int, str | InputError]]:
    for number, raw in enumerate(_bounded_lines(stream, limit), 1):
        if raw is None:
            yield number, limit.exceeded(f"line {number}")
            continue
        try:
            line = decode_text(raw, f"line {number}")
        except InputError as exc:
            yield number, exc
            continue
        if line.strip():
            yield number, line.rstrip("\r\n")
