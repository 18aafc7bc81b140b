"""What the batch commands (caption, summarize) share on the command line: output and guard."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum
from typing import TYPE_CHECKING, Any

import typer

from llmkit.cli import _output as out

if TYPE_CHECKING:
    from llmkit.batch import BatchOutput, BatchSummary
    from llmkit.session import EngineOptions
    from llmkit.tasks.safety import Guard


class BatchFormat(str, Enum):
    """Output format of batch commands."""

    text = "text"
    json = "json"
    jsonl = "jsonl"


def open_cli_guard(guard: bool, guard_model: str | None, guard_threshold: float | None,
                   options: EngineOptions) -> Guard | None:
    """The safety model of `--guard`, `--guard-model` or `--guard-threshold`, or None."""
    if not (guard or guard_model or guard_threshold is not None):
        return None
    from llmkit.session import open_guard

    checker, note = open_guard(guard_model, options, threshold=guard_threshold)
    if note:
        out.note(note)
    return checker


def note_all_skipped(count: int, noun: str) -> None:
    """The summary line of a rerun that found nothing new (and loaded no model)."""
    out.note(f"{count} {noun}{'s' * (count != 1)}: 0 done, {count} skipped, 0 failed")


def run_cli_batch(items: Iterable[str], work: Callable[[str], dict[str, Any]],
                  output: BatchOutput, *, fmt: BatchFormat, single: bool, text_field: str,
                  noun: str, clear: Callable[[], None],
                  error_record: Callable[[str, str], dict[str, Any]] | None = None,
                  work_many: Callable[[list[str]], Iterable[tuple[str, dict[str, Any]]]]
                  | None = None) -> None:
    """Run a batch, printing each record as it is saved, then the summary; exits non-zero
    (1 failed, ``EXIT_FLAGGED`` flagged) the way the command's help says.

    Text format prints the result alone for a single input, ``==> path <==`` blocks for
    several; failures and flagged items are reported on stderr in text format (and always
    for a single input). JSON prints one array at the end (after Ctrl-C too: the records
    finished so far, in input order whatever order they finished in), JSONL one line per
    record as it finishes. ``work_many``: as :func:`llmkit.batch.run_batch`'s. A closed
    stdout ends the batch (exit 141);
    what is already in ``--out`` and the sidecars stays.
    """
    from llmkit.batch import run_batch

    items = list(items)
    records: list[dict[str, Any]] = []
    place: dict[str, int] = {}
    for index, path in enumerate(items):
        place.setdefault(path, index)

    def in_order() -> list[dict[str, Any]]:
        return sorted(records, key=lambda r: place.get(str(r.get("path")), len(place)))

    def emit(record: dict[str, Any]) -> None:
        clear()
        if record.get("error") and (fmt == BatchFormat.text or single):
            out.error(str(record["error"]))
        if record.get("flagged"):
            out.flagged(f"{record['path']}: {record.pop('flagged_note', '')}")
        if fmt == BatchFormat.jsonl:
            out.write_jsonl(record)
        elif fmt == BatchFormat.json:
            records.append(record)
        elif record.get(text_field) is not None:
            out.write(record[text_field] + "\n" if single
                      else f"==> {record['path']} <==\n{record[text_field]}\n\n")

    try:
        summary: BatchSummary = run_batch(
            items, work, output, text_field=text_field, on_record=emit,
            before_save=lambda r: r.pop("flagged_note", None), error_record=error_record,
            work_many=work_many)
    except BaseException as exc:
        clear()
        if isinstance(exc, KeyboardInterrupt) and fmt == BatchFormat.json:
            out.write_json(in_order())  # what finished is saved: stdout must not lose it either
        raise  # Ctrl-C ends the command in app.py, as everywhere
    if fmt == BatchFormat.json:
        out.write_json(in_order())
    if not single or summary.skipped:
        out.note(summary.line(noun))
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)
