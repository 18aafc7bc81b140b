"""`llmkit summarize`: documents of any length, one summary each, nothing silently cut."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from llmkit.cli import _output as out
from llmkit.cli._batch import BatchFormat, note_all_skipped, open_cli_guard, run_cli_batch
from llmkit.cli._options import (
    CtxOpt,
    Device,
    DeviceOpt,
    GpuLayersOpt,
    GuardModelOpt,
    GuardOpt,
    GuardThresholdOpt,
    ModelOpt,
    ParallelOpt,
    QuietOpt,
    SeedOpt,
    SystemOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopPOpt,
    VerboseOpt,
    engine_options,
    utf8_text,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from llmkit.documents import Document


class Length(str, Enum):
    """How long the summary is."""

    short = "short"
    medium = "medium"
    long = "long"


class SummaryStyle(str, Enum):
    """The summary's shape."""

    paragraph = "paragraph"
    bullets = "bullets"
    tldr = "tldr"
    headline = "headline"


class InputFormat(str, Enum):
    """How to read the input, when its name or content does not say."""

    text = "text"
    markdown = "markdown"
    html = "html"
    pdf = "pdf"


def summarize(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Documents, directories, globs, or - for stdin (the default when piped).",
        show_default=False)] = None,
    model: ModelOpt = None,
    length: Annotated[Length, typer.Option(
        "--length", "-l", help="short (~50 words), medium (~120) or long (~300).")
    ] = Length.medium,
    words: Annotated[int | None, typer.Option(
        "--words", "-w", min=1, help="About this many words (instead of --length).",
        show_default=False)] = None,
    style: Annotated[SummaryStyle, typer.Option(
        "--style", help="paragraph, bullets, tldr (one or two sentences) or headline.")
    ] = SummaryStyle.paragraph,
    focus: Annotated[str | None, typer.Option(
        "--focus", help="Aim the summary at a question or topic.", callback=utf8_text,
        show_default=False)] = None,
    language: Annotated[str | None, typer.Option(
        "--language", help="Write the summary in this language.", callback=utf8_text,
        show_default=False)] = None,
    as_format: Annotated[InputFormat | None, typer.Option(
        "--as", help="Read inputs as this format (default: from the name or the content).",
        show_default=False)] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r",
                                            help="Look into subdirectories too.")] = False,
    max_bytes: Annotated[str, typer.Option(
        "--max-bytes", help="Refuse documents larger than this, e.g. 100M (k, M, G: binary "
        "units).")] = "32M",
    format: Annotated[BatchFormat | None, typer.Option(
        "--format", "-f", help="text (default), json (one array at the end) or jsonl (one "
        "record per document as it finishes).", show_default=False)] = None,
    out_file: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Append one JSON record per document to this JSONL file.",
        show_default=False)] = None,
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="Skip documents that already have a record in --out.")
    ] = False,
    system: SystemOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", "-n", min=1, show_default=False,
        help="Most tokens in the final summary (default: from the length).")] = None,
    ctx: CtxOpt = None,
    parallel: ParallelOpt = None,
    guard: GuardOpt = False,
    guard_model: GuardModelOpt = None,
    guard_threshold: GuardThresholdOpt = None,
    device: DeviceOpt = Device.auto,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Summarize documents of any length; long ones are split, summarized and merged.

    Example: llmkit summarize report.md --length short

    --parallel documents are summarized at a time (default 4 on CPU), and the pieces of a
    long one side by side, the instruction evaluated once; a merge level waits only for the
    pieces it merges; --guard's checks of several documents run side by side too. Records
    are written as each document is done.

    Exit codes: 0 all summarized or skipped, 1 a document or the model failed, 2 usage,
    3 a document or its summary was flagged (--guard), 130 Ctrl-C.
    """
    from llmkit.batch import BatchOutput, RecordLog, should_skip
    from llmkit.documents import DOCUMENT_SUFFIXES
    from llmkit.errors import UsageError
    from llmkit.io import collect_paths, parse_size, stdin_is_tty
    from llmkit.session import (
        default_system_prompt,
        open_engine,
        sampling_params,
        with_parallel,
    )
    from llmkit.tasks.summarize import (
        SummaryJob,
        SummaryOptions,
        check_options,
        document_label,
        summarize_file,
        summarize_files,
        summary_temperature,
    )

    out.set_quiet(quiet)
    checker = None
    limit = parse_size(max_bytes, "--max-bytes")
    args = list(inputs or [])
    if not args:
        if stdin_is_tty():
            raise UsageError("nothing to summarize",
                             hint="name documents, or pipe text: `cat notes.txt | llmkit "
                                  "summarize`")
        args = ["-"]
    if args.count("-") > 1:
        raise UsageError("'-' (stdin) can be given once")
    if skip_existing and out_file is None:
        raise UsageError("--skip-existing needs --out FILE.jsonl to know what is done")
    stdin_doc = _read_stdin_document(as_format, limit) if "-" in args else None
    named = [a for a in args if a != "-"]
    paths = collect_paths(named, suffixes=DOCUMENT_SUFFIXES, recursive=recursive) if named else []
    items = paths + (["-"] if stdin_doc is not None else [])
    single = len(items) == 1 and not (named and Path(named[0]).is_dir())
    log = RecordLog(out_file) if out_file is not None else None
    try:
        output = BatchOutput(log=log, skip_existing=skip_existing)
        todo = [p for p in items if p == "-" or not should_skip(p, output)]
        if not todo:
            note_all_skipped(len(items), "document")
            return
        settings = engine_options(ctx, threads, device, gpu_layers, verbose)
        # With several documents the guard's checks share sequences too (in the same number).
        checker = open_cli_guard(guard, guard_model, guard_threshold,
                                 with_parallel(settings, parallel) if len(todo) > 1 else settings)
        engine, resolution = open_engine(model, with_parallel(settings, parallel))
        if resolution.note:
            out.note(resolution.note)
        spec = resolution.spec
        temperature = summary_temperature(temperature, spec.temperature if spec else None)
        options = SummaryOptions(
            length=length.value, words=words, style=style.value, focus=focus,
            language=language,
            system=system if system is not None else default_system_prompt(resolution),
            params=sampling_params(resolution, temperature=temperature, top_p=top_p, seed=seed,
                                   max_tokens=max_tokens))
        check_options(options)
        job = SummaryJob(options=options, format=as_format.value if as_format else None,
                         max_bytes=limit)
        show_plan = verbose and not quiet

        def work(path: str) -> dict[str, Any]:
            label = document_label(path)
            return summarize_file(
                engine, path, job, document=stdin_doc if path == "-" else None, guard=checker,
                on_warning=out.warn, on_progress=_Progress(label).show,
                on_plan=(lambda plan: _show_plan(label, plan)) if show_plan else None)

        def work_many(paths: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
            # Several documents at once: each one's pieces are reported as they finish.
            documents = {"-": stdin_doc} if stdin_doc is not None else {}
            return summarize_files(
                engine, paths, job, documents=documents, guard=checker, on_warning=out.warn,
                on_progress=lambda path: _Progress(document_label(path)).show,
                on_plan=(lambda path, plan: _show_plan(document_label(path), plan))
                if show_plan else None)

        many = len(todo) > 1 and getattr(engine, "parallel", 1) > 1
        with engine:
            run_cli_batch(items, work, output, fmt=format or BatchFormat.text, single=single,
                          text_field="summary", noun="document", clear=out.progress_clear,
                          work_many=work_many if many else None)
    finally:
        if log is not None:
            log.close()
        if checker is not None:
            checker.close()


def _read_stdin_document(as_format: InputFormat | None, max_bytes: int) -> Document:
    """stdin as a Document (read before the model loads, so a bad pipe fails fast); reading
    stops past ``max_bytes``, so an endless stream is an error, not memory without end."""
    from llmkit.documents import document_limit, read_document
    from llmkit.io import read_capped

    data = (read_capped(sys.stdin.buffer, document_limit(max_bytes), "stdin")
            if sys.stdin is not None else b"")
    return read_document(data, name="stdin", format=as_format.value if as_format else None,
                         max_bytes=max_bytes)


class _Progress:
    """``report.md: chunk 3/12`` on stderr: in place on a terminal, a line each otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.chunked = False

    def show(self, stage: str, i: int, n: int) -> None:
        if stage == "plan":
            self.chunked = True
            out.note(f"{self.label}: longer than the context; {i} chunks of at most {n} "
                     "tokens, summarized then merged")
            return
        if not self.chunked:
            return  # a one-pass summary needs no progress
        line = f"{self.label}: {stage} {i}/{n}"
        if out.progress_enabled():
            out.progress(line)
        else:
            out.note(line)


def _show_plan(label: str, plan: list[dict[str, Any]]) -> None:
    for step in plan:
        a, b = step["chars"]
        out.note(f"{label}: chunk {step['chunk']}: characters {a}–{b}, {step['tokens']} tokens "
                 f"(with {step['overlap_chars']} characters of overlap), ends at a "
                 f"{step['ends_at']} boundary")
