"""The cron contract shared by batch commands: JSONL records, sidecars, skipping finished work."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit._fs import atomic_write_text
from llmkit.errors import InputError, LlmkitError


def item_key(path: str) -> str:
    """How two mentions of the same input are recognised: the absolute, normalised path."""
    return os.path.normpath(os.path.abspath(os.path.expanduser(path)))


class RecordLog:
    """An append-only JSONL file of finished records (``--out FILE.jsonl``).

    Each record is written with one ``write`` on a file opened for appending and then flushed
    to disk, so a killed process leaves whole lines only, and two processes appending to the
    same file do not interleave inside a line. A line left half-written by a full disk is
    cut off when the file is opened again, so the next record starts on a line of its own.
    """

    def __init__(self, path: Path, *, key_field: str = "path") -> None:
        """Open (or create) the log and read which items it already holds.

        Raises:
            InputError: the file cannot be read or written, or is not JSONL.
        """
        self.path = path
        self.key_field = key_field
        self._done: set[str] = set()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot open {path}: {exc.strerror}") from None
        try:
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
                record = json.loads(line)
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
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError(28, "short write")
            os.fsync(self._fd)
        except OSError as exc:
            os.ftruncate(self._fd, size)
            raise LlmkitError(f"cannot write to {self.path}: {exc.strerror or exc}",
                              hint="free some disk space and run again; finished items are kept"
                              ) from None
        key = record.get(self.key_field)
        if isinstance(key, str) and not record.get("error"):
            self._done.add(item_key(key))

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sidecar_path(path: Path, ext: str) -> Path:
    """``photo.jpg`` → ``photo.txt`` for ext ``.txt`` (a leading dot is added when missing)."""
    if not ext.startswith("."):
        ext = "." + ext
    return path.with_name(path.stem + ext)


def write_sidecar(path: Path, text: str) -> None:
    """Write a sidecar file atomically, ending in a newline.

    Raises:
        LlmkitError: the directory is not writable or the disk is full.
    """
    try:
        atomic_write_text(path, text.rstrip("\n") + "\n")
    except OSError as exc:
        raise LlmkitError(f"cannot write {path}: {exc.strerror or exc}") from None


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
        """1 when an item failed, else 3 when one was flagged, else 0."""
        return 1 if self.failed else 3 if self.flagged else 0


@dataclass(frozen=True)
class BatchOutput:
    """Where a batch's results go besides stdout."""

    log: RecordLog | None = None
    sidecar_ext: str | None = None
    skip_existing: bool = False


def should_skip(path: str, output: BatchOutput) -> bool:
    """Whether ``--skip-existing`` finds this item already finished (sidecar or record)."""
    if not output.skip_existing:
        return False
    if output.sidecar_ext is not None and sidecar_path(Path(path), output.sidecar_ext).exists():
        return True
    return output.log is not None and output.log.done(path)


def run_batch(
    items: Iterable[str],
    work: Callable[[str], dict[str, Any]],
    output: BatchOutput,
    *,
    text_field: str,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    on_skip: Callable[[str], None] | None = None,
    before_save: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """Process items one at a time, saving each result the moment it exists.

    Args:
        items: input paths.
        work: turns one path into a record (with ``error`` set when it failed); exceptions
            other than KeyboardInterrupt and disk errors are the worker's to catch.
        output: the JSONL log, sidecar extension and skip rule.
        text_field: the record field written to sidecars.
        on_record: called with each new record after it has been saved.
        on_skip: called with each skipped path.
        before_save: may remove fields meant for the screen only, on a copy saved to the log.

    Returns:
        How many items were done, skipped and failed.
    """
    summary = BatchSummary()
    for path in items:
        if should_skip(path, output):
            summary.skipped += 1
            if on_skip is not None:
                on_skip(path)
            continue
        record = work(path)
        if record.get("error"):
            summary.failed += 1
            summary.failures.append(path)
        elif record.get("flagged"):
            summary.flagged += 1  # withheld: no sidecar
        else:
            if output.sidecar_ext is not None:
                write_sidecar(sidecar_path(Path(path), output.sidecar_ext),
                              str(record.get(text_field) or ""))
            summary.done += 1
        if output.log is not None:
            saved = dict(record)
            if before_save is not None:
                before_save(saved)
            output.log.append(saved)
        if on_record is not None:
            on_record(record)
    return summary


def unique(paths: Iterable[str]) -> Iterator[str]:
    """Each input once, in first-mention order (a glob and a directory may name one file)."""
    seen: set[str] = set()
    for path in paths:
        key = item_key(path)
        if key not in seen:
            seen.add(key)
            yield path
