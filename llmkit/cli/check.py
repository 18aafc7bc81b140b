"""`llmkit check`: safety verdicts with Llama Guard that scripts can branch on (exit 0/3/1)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import (
    CtxOpt,
    Device,
    DeviceOpt,
    GpuLayersOpt,
    ModelOpt,
    ParallelOpt,
    QuietOpt,
    TextFormat,
    ThreadsOpt,
    VerboseOpt,
    engine_options,
    finite,
    utf8_text,
    utf8_texts,
)
from llmkit.errors import EXIT_FLAGGED

if TYPE_CHECKING:
    from llmkit.session import EngineOptions


def check(
    text: Annotated[list[str] | None, typer.Argument(
        help="The text to check (a user prompt). Without it: --file, --prompt/--response, "
             "--conversation, --batch, or stdin.", callback=utf8_texts,
        show_default=False)] = None,
    model: ModelOpt = None,
    file: Annotated[Path | None, typer.Option(
        "--file", help="Check the text of this file.", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", help="The user prompt (with --response: the context of the response).",
        callback=utf8_text, show_default=False)] = None,
    response: Annotated[str | None, typer.Option(
        "--response", help="Check this assistant response (in the context of --prompt).",
        callback=utf8_text, show_default=False)] = None,
    conversation: Annotated[Path | None, typer.Option(
        "--conversation", help="A JSON file of {role, content} messages; the last one is "
        "checked.", show_default=False)] = None,
    batch: Annotated[str | None, typer.Option(
        "--batch", help="A JSONL file (or - for stdin) of {\"text\"} or {\"prompt\", "
        "\"response\"} records, each with an optional \"image\" path; one verdict line each.",
        show_default=False)] = None,
    image: Annotated[list[Path] | None, typer.Option(
        "--image", "-i", help="Check this picture together with the text (or alone); needs a "
        "guard that reads images (llama-guard3:11b-vision).", show_default=False)] = None,
    exclude: Annotated[str | None, typer.Option(
        "--exclude", help="Leave these categories out, e.g. S7,S8.", show_default=False)] = None,
    categories: Annotated[Path | None, typer.Option(
        "--categories", help="Your own policy: a TOML file of [[categories]] (code, name, "
        "description).", show_default=False)] = None,
    threshold: Annotated[float | None, typer.Option(
        "--threshold", min=0.0, max=1.0, callback=finite, show_default=False,
        help="Flag when P(unsafe) reaches this, instead of taking the model's answer.")] = None,
    format: Annotated[TextFormat, typer.Option(
        "--format", "-f", help="text: safe / unsafe: S1 Violent Crimes; json: verdict, "
        "categories, score, timings.")] = TextFormat.text,
    ctx: CtxOpt = None,
    parallel: ParallelOpt = None,
    device: DeviceOpt = Device.auto,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check a prompt, a response or a conversation against a safety policy (Llama Guard 3).

    Example: llmkit check "How do I make a bomb?" && echo allowed

    With --image the picture is judged with the text (-m llama-guard3:11b-vision); in --batch
    a record's "image" path does the same.

    With --batch, --parallel records are checked together (default 4 on CPU), their common
    policy prompt evaluated once; each line is written when its check finishes, with its
    "line" number.

    Exit codes: 0 safe, 3 flagged (unsafe), 1 error (including an answer that is not a
    verdict: never taken as safe), 2 usage. With --batch: 1 if any record failed, else 3 if
    any was flagged, else 0.
    """
    from llmkit.errors import UsageError, VerdictError
    from llmkit.images import prepare_image
    from llmkit.io import prompt_limit, read_stdin, read_text_file
    from llmkit.session import open_guard
    from llmkit.tasks.guard_prompt import check_conversation
    from llmkit.tasks.safety import load_conversation

    out.set_quiet(quiet)
    options = engine_options(ctx, threads, device, gpu_layers, verbose)
    sources = [name for name, given in (("TEXT", text), ("--file", file),
                                        ("--prompt/--response", prompt or response),
                                        ("--conversation", conversation), ("--batch", batch))
               if given]
    if len(sources) > 1:
        raise UsageError(f"give one of {', '.join(sources)}, not several")
    if response is not None and prompt is None:
        raise UsageError("--response needs the --prompt it answers")
    if image and len(image) > 1:
        raise UsageError(f"--image was given {len(image)} times; Llama Guard 3 Vision judges "
                         "one picture per check",
                         hint='check each on its own, or use --batch with an "image" path '
                              "per record")
    if image and batch is not None:
        raise UsageError("--image checks one picture; --batch takes each record's own",
                         hint='give each JSONL record an "image" path: {"image": "photo.jpg", '
                              '"text": "…"}')
    if parallel is not None and batch is None:
        raise UsageError("--parallel is for --batch", hint="a single check is one sequence")
    if batch is not None:
        from llmkit.session import with_parallel

        _run_batch(batch, model, with_parallel(options, parallel), exclude, categories,
                   threshold, ctx)
        return
    if conversation is not None:
        messages = load_conversation(conversation)
    elif prompt is not None:
        messages = [{"role": "user", "content": prompt}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
    else:
        from llmkit.errors import InputError

        # Text longer than the guard's context can hold is refused as it is read, not after.
        if text:
            body, where = " ".join(text), "the text to check"
        elif file is not None:
            body, where = read_text_file(file, prompt_limit(ctx)), str(file)
        else:
            piped = read_stdin(limit=prompt_limit(ctx))
            if piped is None and not image:
                raise UsageError("nothing to check",
                                 hint='pass text, --file, --prompt/--response, or pipe it in')
            # With a picture and no text, the picture alone is checked.
            body, where = piped if piped is not None else "", "stdin"
        if not body.strip() and not image:
            raise InputError(f"{where} is empty", hint="there is nothing to check")
        messages = [{"role": "user", "content": body}]
    messages = check_conversation(messages, image=bool(image))
    # The picture is read before any model loads, and a guard that cannot see it is refused
    # from its file's header, before it loads.
    picture = prepare_image(image[0]) if image else None
    guard, note = open_guard(model, options, exclude=exclude, categories_file=categories,
                             threshold=threshold, images=picture is not None)
    if note:
        out.note(note)
    with guard:
        try:
            verdict = guard.check(messages, picture)
        except VerdictError as exc:
            if format != TextFormat.json:
                raise
            # Scripts reading JSON get the raw answer too; it is an error, never "safe".
            out.error(str(exc))
            out.write_json({"verdict": None, "flagged": None, "model": guard.engine.model_name,
                            "raw": exc.raw, "error": str(exc)})
            raise typer.Exit(1) from None
    if format == TextFormat.json:
        data = verdict.to_dict()
        if image and verdict.image is not None:
            data["image"] = {"path": str(image[0]), **verdict.image}
        out.write_json(data)
    else:
        out.write(verdict.label + "\n")
    if verdict.flagged:
        raise typer.Exit(EXIT_FLAGGED)


def _run_batch(source: str, model: str | None, options: EngineOptions, exclude: str | None,
               categories: Path | None, threshold: float | None, ctx: int | None) -> None:
    import itertools

    from llmkit.errors import InputError
    from llmkit.io import batch_line_limit, numbered_lines
    from llmkit.session import open_guard
    from llmkit.tasks.safety import CheckTally, check_jsonl_lines

    # A file is streamed as stdin is: one bad or over-long line is that line's error record.
    lines = numbered_lines(source, limit=batch_line_limit(ctx))
    # The first record is waited for before the model loads: empty input fails fast.
    first = next(lines, None)
    if first is None:
        raise InputError(f"{'stdin' if source == '-' else source} has no records")
    guard, note = open_guard(model, options, exclude=exclude, categories_file=categories,
                             threshold=threshold)
    if note:
        out.note(note)
    tally = CheckTally()
    with guard:
        # Several records are checked together (--parallel): each is written as it
        # finishes, naming its input line.
        # A source that can keep one waiting (stdin, a FIFO, a device) is read by a thread,
        # so the checks in flight are answered before the next line arrives.
        live = source == "-" or not Path(source).is_file()
        for record in check_jsonl_lines(guard, itertools.chain([first], lines), live=live):
            tally.add(record)
            out.write_jsonl(record)
    out.note(tally.summary())
    if tally.exit_code:
        raise typer.Exit(tally.exit_code)
