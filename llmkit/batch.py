"""The cron contract shared by batch commands: JSONL records, sidecars, skipping finished work."""

from __future__ import annotations

import codecs
import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit._fs import atomic_write_text, json_dumps, try_lock
from llmkit.errors import EXIT_FLAGGED, InputError, LlmkitError, UsageError
from llmkit.io import item_key, parse_json


class RecordLog:
    """An append-only JSONL file of finished records (``--out FILE.jsonl``).

    Each record is written with one ``write`` on a file opened for appending and then flushed
    to disk, so a killed process leaves whole lines only. One process owns the file at a time
    (an advisory lock on it, held while the log is open): a second run on the same file is
    refused rather than doing every item again. A failed write removes only its own bytes; a
    line left half-written by a crash is cut off by the next owner when it opens the file.
    """

    def __init__(self, path: Path, *, key_field: str = "path") -> None:
        """Open (or create) the log, take ownership of it, and read which items it holds.

        Raises:
            InputError: the file cannot be read or written, is not a regular file, or is not
                JSONL.
            LlmkitError: another process has the file open as its log.
        """
        self.path = path
        self.key_field = key_field
        self._done: set[str] = set()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK,
                               0o666)
        except OSError as exc:
            raise InputError(f"cannot open {path}: {exc.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(self._fd).st_mode):
                raise InputError(f"{path} is not a regular file",
                                 hint="--out appends to a JSONL file; name a file")
            os.set_blocking(self._fd, True)
            if not try_lock(self._fd):
                raise LlmkitError(
                    f"{path} is being written by another llmkit run",
                    hint="wait for it to finish, or give this run another --out; a later run "
                         "with --skip-existing does only what is still missing")
            self._load()
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self) -> None:
        with open(self._fd, "rb", closefd=False) as fh:
            fh.seek(0)
            data = fh.read()
        if data and not data.endswith(b"\n"):
            # A torn last line (disk full, power cut): drop it so the rerun redoes that item.
            cut = data.rfind(b"\n") + 1
            os.ftruncate(self._fd, cut)
            data = data[:cut]
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = parse_json(line, strict=False)  # too deep a nesting: a ValueError
            except ValueError:
                raise InputError(f"{self.path} line {number} is not JSON",
                                 hint="--out appends to a JSONL file written by llmkit") from None
            if not isinstance(record, dict):
                continue
            key = record.get(self.key_field)
            if isinstance(key, str) and not record.get("error"):
                self._done.add(item_key(key))

    def done(self, key: str) -> bool:
        """Whether a record without an error already exists for ``key``."""
        return item_key(key) in self._done

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as a line, durably.

        Raises:
            LlmkitError: the disk is full or the write failed (nothing partial is left).
        """
        line = (json_dumps(record) + "\n").encode("utf-8")
        start = os.fstat(self._fd).st_size
        written = 0
        try:
            while written < len(line):
                count = os.write(self._fd, line[written:])
                if count <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += count
            os.fsync(self._fd)
        except OSError as exc:
            self._cut_back(start, line)
            raise LlmkitError(f"cannot write to {self.path}: {exc.strerror or exc}",
                              hint="free some disk space and run again; finished items are kept"
                              ) from None
        key = record.get(self.key_field)
        if isinstance(key, str) and not record.get("error"):
            self._done.add(item_key(key))

    def _cut_back(self, start: int, line: bytes) -> None:
        """Remove what a failed write left of ``line`` after ``start``, and nothing else.

        The bytes are compared with the line first: whatever else is there (a record appended
        by something that ignores the lock) stays, and the file never grows here, so no NUL
        bytes appear.
        """
        with contextlib.suppress(OSError):
            size = os.fstat(self._fd).st_size
            if start < size <= start + len(line) and os.pread(
                    self._fd, size - start, start) == line[:size - start]:
                os.ftruncate(self._fd, start)

    def close(self) -> None:
        """Close the file (which lets another run own it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sidecar_extension(ext: str) -> str:
    """``txt`` → ``.txt`` (a leading dot is added when missing).

    Raises:
        UsageError: ``ext`` is empty, only dots, or holds a path separator or NUL.
    """
    if not ext.startswith("."):
        ext = "." + ext
    if not ext.strip(".") or "\0" in ext or "/" in ext or (os.altsep and os.altsep in ext) \
            or os.sep in ext:
        raise UsageError(f"--sidecar-ext {ext!r} is not a file extension",
                         hint="give one such as .txt or .alt.txt")
    return ext


def sidecar_path(path: Path, ext: str, *, full_name: bool = False) -> Path:
    """``photo.jpg`` → ``photo.txt`` for ext ``.txt``; ``photo.jpg.txt`` with ``full_name``."""
    return path.with_name((path.name if full_name else path.stem) + sidecar_extension(ext))


def write_sidecar(path: Path, text: str) -> None:
    """Write a sidecar file atomically, ending in a newline.

    Raises:
        LlmkitError: the directory is not writable or the disk is full.
    """
    try:
        atomic_write_text(path, text.rstrip("\n") + "\n")
    except OSError as exc:
        raise LlmkitError(f"cannot write {path}: {exc.strerror or exc}",
                          hint="the caption is in the record; fix this and run again") from None


_SIDECAR_HINT = "rename the file, or choose another --sidecar-ext such as .caption.txt"


def _identity(path: Path | str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino)


def _is_text(path: Path) -> bool:
    """Whether a regular file's start is UTF-8 text without NUL bytes, as captions are."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return b"\0" not in head


@dataclass(frozen=True)
class SidecarPlan:
    """Where each input's sidecar goes, decided for the whole batch before any is written.

    ``photo.jpg`` → ``photo.txt``. When its directory holds another image with the same stem
    (``photo.png``; or ``Photo.jpg``, since stems are compared without case as some file
    systems do), each of them is named in full instead (``photo.jpg.txt``, ``photo.png.txt``),
    so two captions never share a file, and the names come from the directory alone, not from
    which files a run was given. An item is refused (``refusal``) when its sidecar would be an
    input of the batch (the same path, or the same file through a link, compared by device and
    inode), an existing file that is not text or not a regular file, or another item's sidecar.
    """

    ext: str
    targets: Mapping[str, Path]
    refused: Mapping[str, str]
    inputs: Mapping[tuple[int, int], str]  # (st_dev, st_ino) → the input's path
    input_keys: frozenset[str]

    @classmethod
    def build(cls, paths: Sequence[str], ext: str, *, siblings: frozenset[str]) -> SidecarPlan:
        """Plan the sidecars of ``paths``.

        Args:
            paths: the batch's inputs.
            ext: the sidecar extension (``.txt``).
            siblings: lower-case suffixes of the files that could claim the same sidecar
                (the image suffixes a directory is searched for).

        Raises:
            UsageError: ``ext`` is not an extension.
        """
        ext = sidecar_extension(ext)
        stems: dict[str, dict[str, set[str]]] = {}  # directory → casefolded stem → names

        def claimants(path: Path) -> set[str]:
            directory = os.path.abspath(path.parent)
            if directory not in stems:
                by_stem: dict[str, set[str]] = {}
                with contextlib.suppress(OSError):
                    for name in os.listdir(directory):
                        entry = Path(name)
                        # A name ending in the extension is a sidecar (or is refused as one).
                        if entry.suffix.lower() in siblings and not name.casefold().endswith(
                                ext.casefold()):
                            by_stem.setdefault(entry.stem.casefold(), set()).add(name)
                stems[directory] = by_stem
            return stems[directory].get(path.stem.casefold(), set()) | {path.name}

        targets: dict[str, Path] = {}
        inputs: dict[tuple[int, int], str] = {}
        for raw in paths:
            path = Path(raw)
            targets[item_key(raw)] = sidecar_path(path, ext, full_name=len(claimants(path)) > 1)
            identity = _identity(path)
            if identity is not None:
                inputs.setdefault(identity, raw)
        plan = cls(ext=ext, targets=targets, refused={}, inputs=inputs,
                   input_keys=frozenset(item_key(p) for p in paths))
        refused: dict[str, str] = {}
        owners: dict[str, str] = {}
        for raw in paths:
            key = item_key(raw)
            reason = plan._check(raw)
            target_key = item_key(str(targets[key])).casefold()
            if reason is None and target_key in owners:
                first = owners[target_key]
                reason = (f"{raw}: its sidecar {targets[key]} would also be {first}'s "
                          f"({_SIDECAR_HINT})")
                refused.setdefault(item_key(first), f"{first}: its sidecar {targets[key]} "
                                                     f"would also be {raw}'s ({_SIDECAR_HINT})")
            owners.setdefault(target_key, raw)
            if reason is not None:
                refused[key] = reason
        return cls(ext=ext, targets=targets, refused=refused, inputs=inputs,
                   input_keys=plan.input_keys)

    def target(self, path: str) -> Path:
        """The sidecar of ``path`` (one of the planned inputs)."""
        return self.targets[item_key(path)]

    def refusal(self, path: str) -> str | None:
        """Why ``path`` gets no sidecar (and is not captioned), or None."""
        return self.refused.get(item_key(path))

    def _check(self, path: str) -> str | None:
        """What is wrong with writing ``path``'s sidecar now, if anything."""
        target = self.target(path)
        own = _identity(path)
        identity = _identity(target)
        if item_key(str(target)) == item_key(path) or (identity is not None and identity == own):
            return f"{path}: its sidecar {target} is the image itself ({_SIDECAR_HINT})"
        if item_key(str(target)) in self.input_keys:
            return f"{path}: its sidecar {target} is another input of this batch ({_SIDECAR_HINT})"
        if identity is not None and identity in self.inputs:
            return (f"{path}: its sidecar {target} is a link to the input "
                    f"{self.inputs[identity]} ({_SIDECAR_HINT})")
        try:
            info = os.stat(target)
        except (OSError, ValueError):
            return None  # nothing there yet (or a dangling link, which the rename replaces)
        if not stat.S_ISREG(info.st_mode):
            return (f"{path}: its sidecar {target} exists and is not a regular file "
                    f"({_SIDECAR_HINT})")
        if not _is_text(target):
            return (f"{path}: its sidecar {target} exists and is not a text file, so it is not "
                    f"replaced ({_SIDECAR_HINT})")
        return None

    def write(self, path: str, text: str) -> None:
        """Write ``path``'s sidecar, checking again that it hits no input and no other file.

        Raises:
            LlmkitError: the sidecar must not or cannot be written.
        """
        reason = self.refusal(path) or self._check(path)
        if reason is not None:
            raise LlmkitError(reason)
        write_sidecar(self.target(path), text)


@dataclass
class BatchSummary:
    """Counts for the closing line on stderr."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    flagged: int = 0  # withheld by a safety check (--guard)
    failures: list[str] = field(default_factory=list)

    def line(self, noun: str) -> str:
        """``12 done, 3 skipped, 1 failed`` with the noun for the items."""
        total = self.done + self.skipped + self.failed + self.flagged
        text = (f"{total} {noun}{'' if total == 1 else 's'}: {self.done} done, "
                f"{self.skipped} skipped, {self.failed} failed")
        return text + (f", {self.flagged} flagged" if self.flagged else "")

    @property
    def exit_code(self) -> int:
        """1 when an item failed, else ``EXIT_FLAGGED`` when one was flagged, else 0."""
        return 1 if self.failed else EXIT_FLAGGED if self.flagged else 0


@dataclass(frozen=True)
class BatchOutput:
    """Where a batch's results go besides stdout."""

    log: RecordLog | None = None
    sidecars: SidecarPlan | None = None
    skip_existing: bool = False


def should_skip(path: str, output: BatchOutput) -> bool:
    """Whether ``--skip-existing`` finds this item finished: every output asked for has it.

    With both ``--sidecar`` and ``--out``, an item is skipped only when its sidecar exists
    and the log holds a record without an error for it; an item that is refused its sidecar
    is never skipped (it gets an error record instead).
    """
    if not output.skip_existing or (output.sidecars is None and output.log is None):
        return False
    if output.sidecars is not None and (output.sidecars.refusal(path) is not None
                                        or not output.sidecars.target(path).exists()):
        return False
    return output.log is None or output.log.done(path)


def run_batch(
    items: Iterable[str],
    work: Callable[[str], dict[str, Any]],
    output: BatchOutput,
    *,
    text_field: str,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_skip: Callable[[str], None] | None = None,
    before_save: Callable[[dict[str, Any]], None] | None = None,
    error_record: Callable[[str, str], dict[str, Any]] | None = None,
    work_many: Callable[[list[str]], Iterable[tuple[str, dict[str, Any]]]] | None = None,
) -> BatchSummary:
    """Process items, saving each result the moment it exists: one at a time with
    ``work``, or all those to do handed to ``work_many``, which yields ``(path, record)``
    as each finishes (in any order; refused and skipped items are settled first).

    Args:
        items: input paths.
        work: turns one path into a record (with ``error`` set when it failed); exceptions
            other than KeyboardInterrupt and disk errors are the worker's to catch.
        output: the JSONL log, sidecar extension and skip rule.
        text_field: the record field written to sidecars.
        on_record: called with each new record after it has been saved.
        on_skip: called with each skipped path.
        before_save: may remove fields meant for the screen only, on a copy saved to the log.
        error_record: the record of an item refused before ``work`` (its sidecar would hit
            an input); by default ``path``, ``text_field`` (null) and ``error``.
        work_many: many items at once (parallel sequences); ``work`` is then not called.

    Returns:
        How many items were done, skipped and failed.
    """
    summary = BatchSummary()

    def save(path: str, record: dict[str, Any]) -> None:
        if not record.get("error") and not record.get("flagged") and output.sidecars is not None:
            try:
                output.sidecars.write(path, str(record.get(text_field) or ""))
            except LlmkitError as exc:
                record["error"] = str(exc)  # the text stays in the record
        if record.get("error"):
            summary.failed += 1
            summary.failures.append(path)
        elif record.get("flagged"):
            summary.flagged += 1  # withheld: no sidecar
        else:
            summary.done += 1
        if output.log is not None:
            saved = dict(record)
            if before_save is not None:
                before_save(saved)
            output.log.append(saved)
        if on_record is not None:
            on_record(record)

    todo: list[str] = []
    for path in items:
        refusal = output.sidecars.refusal(path) if output.sidecars is not None else None
        if refusal is None and should_skip(path, output):
            summary.skipped += 1
            if on_skip is not None:
                on_skip(path)
            continue
        if refusal is not None:  # no model time for a result that could not be saved
            save(path, error_record(path, refusal) if error_record is not None
                 else {"path": path, text_field: None, "error": refusal})
        elif work_many is not None:
            todo.append(path)
        else:
            save(path, work(path))
    if todo and work_many is not None:
        for path, record in work_many(todo):
            save(path, record)
    return summary

