"""`llmkit caption`: captions for one photo or a folder of thousands, safe to rerun from cron."""

from __future__ import annotations

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
    MmprojOpt,
    ModelOpt,
    ParallelOpt,
    QuietOpt,
    SeedOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopPOpt,
    VerboseOpt,
    engine_options,
    utf8_text,
)

if TYPE_CHECKING:
    from collections.abc import Iterator


class Style(str, Enum):
    """Ready-made caption instructions."""

    short = "short"
    detailed = "detailed"
    alt_text = "alt-text"
    tags = "tags"


def caption(
    inputs: Annotated[list[str], typer.Argument(
        help="Images, directories, globs, or - to read paths from stdin.", show_default=False)],
    model: ModelOpt = None,
    mmproj: MmprojOpt = None,
    prompt: Annotated[str | None, typer.Option(
        "--prompt", "-p", help="Your own instruction instead of a --style.",
        callback=utf8_text, show_default=False)] = None,
    style: Annotated[Style, typer.Option(
        "--style", help="short: one sentence; detailed; alt-text: under 125 characters for "
        "screen readers; tags: comma-separated keywords.")] = Style.short,
    recursive: Annotated[bool, typer.Option("--recursive", "-r",
                                            help="Look into subdirectories too.")] = False,
    format: Annotated[BatchFormat | None, typer.Option(
        "--format", "-f", help="text (default), json (one array at the end) or jsonl (one "
        "record per image as it finishes).", show_default=False)] = None,
    out_file: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Append one JSON record per image to this JSONL file as each "
        "finishes.", show_default=False)] = None,
    sidecar: Annotated[bool, typer.Option(
        "--sidecar", help="Write each caption next to its image (photo.jpg → photo.txt; "
        "photo.jpg.txt when photo.png is there too); never over an input.")
    ] = False,
    sidecar_ext: Annotated[str, typer.Option(
        "--sidecar-ext", help="Extension of sidecar files (implies --sidecar).")] = ".txt",
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="Skip images already done: with a sidecar (--sidecar) and a "
        "record in --out (--out), whichever were asked for.")] = False,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", "-n", min=1, show_default=False,
        help="Most tokens per caption (default: by style, 64–512).")] = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    max_side: Annotated[int, typer.Option(
        "--max-side", min=64, help="Downscale images whose longest side is larger.")] = 2048,
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
    """Caption images with a vision model; the model is loaded once for the whole batch.

    Example: llmkit caption photos/ -r --style alt-text --sidecar --skip-existing

    The captions of --parallel images are written together (default 4 on CPU); each image
    is encoded when a sequence is free for it; --guard's checks of the captions run as many
    at a time. Records are written as each image is done.

    Exit codes: 0 all captioned or skipped, 1 an image or the model failed, 2 usage,
    3 a caption was flagged and withheld (--guard), 130 Ctrl-C.
    """
    from llmkit.batch import BatchOutput, RecordLog, SidecarPlan, should_skip
    from llmkit.io import collect_paths
    from llmkit.session import open_vision_engine, sampling_params, with_parallel
    from llmkit.tasks.caption import (
        DEFAULT_MAX_TOKENS,
        IMAGE_SUFFIXES,
        CaptionJob,
        caption_file,
        caption_files,
        caption_record,
        instruction_for,
    )
    from llmkit.tasks.guarding import check_input

    out.set_quiet(quiet)
    instruction, style_name = instruction_for(style.value, prompt)
    paths = collect_paths(inputs, suffixes=IMAGE_SUFFIXES, recursive=recursive)
    single = len(paths) == 1 and "-" not in inputs and not Path(inputs[0]).is_dir()
    use_sidecar = sidecar or sidecar_ext != ".txt"
    plan = SidecarPlan.build(paths, sidecar_ext, siblings=IMAGE_SUFFIXES) if use_sidecar else None
    log = RecordLog(out_file) if out_file is not None else None
    checker = None
    try:
        output = BatchOutput(log=log, sidecars=plan, skip_existing=skip_existing)
        todo = [p for p in paths if not should_skip(p, output)]
        if not todo:
            # Nothing new since the last run: don't even load the model.
            if not single or skip_existing:
                note_all_skipped(len(paths), "image")
            return

        def refused(path: str, reason: str) -> dict[str, Any]:
            return caption_record(path, style_name, model=None, error=reason)

        if plan is not None and all(plan.refusal(p) for p in todo):
            # Every image left would be refused its sidecar: no model is needed to say so.
            run_cli_batch(paths, _no_work, output, fmt=format or BatchFormat.text,
                          single=single, text_field="caption", noun="image",
                          clear=lambda: None, error_record=refused)
            return
        options = engine_options(ctx, threads, device, gpu_layers, verbose)
        # Several images: the captions and the guard's checks of them decode in parallel.
        batch_options = with_parallel(options, parallel) if len(todo) > 1 else options
        checker = open_cli_guard(guard, guard_model, guard_threshold, batch_options)
        if checker is not None and prompt is not None:
            check_input(checker, instruction)  # your own instruction is input too
        engine, resolution, note = open_vision_engine(model, batch_options, mmproj=mmproj)
        if note:
            out.note(note)
        params = sampling_params(resolution, temperature=temperature, top_p=top_p, seed=seed,
                                 max_tokens=max_tokens or DEFAULT_MAX_TOKENS[style_name])
        job = CaptionJob(instruction=instruction, style=style_name, params=params,
                         max_side=max_side)
        progress = _Progress(len(todo))

        def work(path: str) -> dict[str, Any]:
            progress.start(path)
            return caption_file(engine, path, job, guard=checker)

        def work_many(todo: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
            return caption_files(engine, todo, job, guard=checker, on_start=progress.start)

        many = len(todo) > 1 and getattr(engine, "parallel", 1) > 1
        with engine:
            run_cli_batch(paths, work, output, fmt=format or BatchFormat.text, single=single,
                          text_field="caption", noun="image", clear=progress.done,
                          error_record=refused, work_many=work_many if many else None)
    finally:
        if log is not None:
            log.close()
        if checker is not None:
            checker.close()


def _no_work(path: str) -> dict[str, Any]:
    raise AssertionError(f"{path} was to be refused before any work")  # pragma: no cover


class _Progress:
    """``[3/50] photo.jpg`` on stderr while an image is worked on, only on a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.enabled = total > 1 and out.progress_enabled()

    def start(self, path: str) -> None:
        self.count += 1
        if self.enabled:
            out.progress(f"[{self.count}/{self.total}] {path}")

    def done(self) -> None:
        if self.enabled:
            out.progress_clear()
