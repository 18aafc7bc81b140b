"""File helpers: atomic writes, JSON that carries any file name, and advisory locks."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Temporary files are named `.NAME.llmkit-HOST-PID-RANDOM.tmp`: recognisable as ours, and
# owned by a process that a later writer on the same host can ask about.
_TEMP_RE = re.compile(r"\A\..*\.llmkit-(?P<host>[A-Za-z0-9]*)-(?P<pid>[0-9]+)-[0-9a-f]{8}\.tmp\Z",
                      re.DOTALL)
_NAME_MAX = 255
_swept: set[str] = set()


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def _temp_name(name: str) -> str:
    import secrets

    tail = f".llmkit-{_host()}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    # Names are limited in bytes: shorten the copy of a long name, never the tail we parse.
    while len(os.fsencode(f".{name}{tail}")) > _NAME_MAX and name:
        name = name[:-1]
    return f".{name}{tail}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process (EPERM): alive
    return True


def _sweep_stale_temps(directory: Path) -> None:
    """Remove temporary files of writers on this host that died (SIGKILL, power cut).

    Each directory is looked at once per process, the first time llmkit writes into it.
    """
    key = os.path.abspath(directory)
    if key in _swept or os.name == "nt":  # os.kill(pid, 0) would end the process on Windows
        return
    _swept.add(key)
    host = _host()
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        match = _TEMP_RE.match(entry) if entry.startswith(".") else None
        if match is None or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            os.unlink(directory / entry)


def temp_path(path: Path) -> Path:
    """A new temporary name beside ``path``, owned by this process, to rename into place.

    Stale ones left by dead writers in that directory are removed first (see
    ``_sweep_stale_temps``), so a killed conversion or write leaves no lasting litter.
    """
    _sweep_stale_temps(path.parent)
    return path.with_name(_temp_name(path.name))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place.

    A new file gets the mode a plain ``open(path, "w")`` would give it (0666 less the umask);
    a replaced file keeps its mode. Temporary files left by killed writers are removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode: int | None = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    tmp = temp_path(path)
    # Created by os.open with 0o666 so that the kernel applies the umask, as open() does
    # (mkstemp would make it 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_dumps(obj: Any, *, indent: int | None = None) -> str:
    """JSON text that is valid UTF-8 even when it holds file names that are not.

    Python gives a name's undecodable bytes as lone surrogates (b"\\xff" → "\\udcff"); they
    are written as ``\\udcff`` escapes, which ``os.fsencode(json.loads(...))`` turns back into
    the original bytes. Other characters stay as they are. Numbers JSON cannot write (NaN and
    infinities, which a damaged model's metadata or logits can hold) are written as null,
    where Python's json would write NaN, which no JSON reader takes.
    """
    try:
        text = json.dumps(obj, ensure_ascii=False, indent=indent, allow_nan=False)
    except ValueError:  # "Out of range float values are not JSON compliant"
        text = json.dumps(_finite(obj), ensure_ascii=False, indent=indent)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _finite(obj: Any) -> Any:
    """``obj`` with every float that is not finite replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on an open file without waiting; False if it is held.

    The lock belongs to the open file and goes when it is closed (or the process dies).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks, run unlocked
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if needed) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, run unlocked
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
