"""`llmkit run`: one prompt in, the answer streamed out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._batch import open_cli_guard
from llmkit.cli._options import (
    CtxOpt,
    Device,
    DeviceOpt,
    GpuLayersOpt,
    GuardModelOpt,
    GuardOpt,
    GuardThresholdOpt,
    ImageOpt,
    MaxTokensOpt,
    MmprojOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    SystemOpt,
    TemperatureOpt,
    TextFormat,
    ThreadsOpt,
    TopPOpt,
    VerboseOpt,
    engine_options,
    utf8_texts,
)


def run(
    prompt: Annotated[list[str] | None, typer.Argument(
        help="The prompt. With piped stdin, stdin is the context and this the instruction.",
        callback=utf8_texts, show_default=False)] = None,
    model: ModelOpt = None,
    system: SystemOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = 1024,
    ctx: CtxOpt = None,
    format: Annotated[TextFormat, typer.Option(
        "--format", "-f", help="text streams the answer; json prints one result object.")
    ] = TextFormat.text,
    json_schema: Annotated[Path | None, typer.Option(
        "--json-schema", help="Constrain the answer to JSON matching this schema file.",
        show_default=False)] = None,
    image: ImageOpt = None,
    mmproj: MmprojOpt = None,
    guard: GuardOpt = False,
    guard_model: GuardModelOpt = None,
    guard_threshold: GuardThresholdOpt = None,
    device: DeviceOpt = Device.auto,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Answer one prompt and exit.

    Example: llmkit run "What is the capital of France?"

    With --image the question is about that picture (default model: the vision default).
    With --guard the prompt is checked first and the answer before it is shown (exit 3 when
    flagged).
    """
    from llmkit.engines.llama_cpp import grammar_from_json_schema
    from llmkit.images import prepare_image
    from llmkit.io import MiB, ReadLimit, prompt_limit, read_stdin, read_text_file
    from llmkit.session import (
        default_system_prompt,
        open_engine,
        open_vision_engine,
        sampling_params,
    )
    from llmkit.tasks.chat import build_user_message, run_prompt, run_prompt_with_images
    from llmkit.tasks.guarding import check_input, check_output

    out.set_quiet(quiet)
    # stdin that cannot fit the context is refused as it is read, not once read whole.
    text = build_user_message(" ".join(prompt) if prompt else None,
                              read_stdin(limit=prompt_limit(ctx)))
    schema_limit = ReadLimit(MiB, "the most llmkit reads of a JSON schema")
    grammar = (grammar_from_json_schema(read_text_file(json_schema, schema_limit))
               if json_schema else None)
    options = engine_options(ctx, threads, device, gpu_layers, verbose)
    prepared = [prepare_image(p) for p in image or []]  # before loading: fail fast
    # The guard is loaded and the prompt checked before the model loads: a refused prompt
    # costs no generation model at all.
    checker = open_cli_guard(guard, guard_model, guard_threshold, options)
    if checker is not None:
        # A guard that reads images judges the pictures with the prompt.
        with_guard = check_input(checker, text, prepared)
    if image:
        engine, resolution, note = open_vision_engine(model, options, mmproj=mmproj)
    else:
        engine, resolution = open_engine(model, options)
        note = resolution.note
    if note:
        out.note(note)
    params = sampling_params(resolution, temperature=temperature, top_p=top_p, seed=seed,
                             max_tokens=max_tokens, grammar=grammar)
    # Guarded answers are held back until checked, so they cannot be streamed.
    streaming = format == TextFormat.text and checker is None
    system_prompt = system if system is not None else default_system_prompt(resolution)
    with engine:
        if image:
            reply = run_prompt_with_images(
                engine, text, prepared, system=system_prompt, params=params,
                on_text=out.write if streaming else None)
        else:
            reply = run_prompt(engine, text, system=system_prompt, params=params,
                               on_text=out.write if streaming else None)
    finish = reply.generation.finish_reason
    if checker is not None:
        with checker:
            with_guard = check_output(checker, text, reply.text, with_guard, prepared)
    if streaming:
        out.write("\n")
    elif format == TextFormat.text:
        out.write(reply.text + "\n")
    else:
        data = reply.to_dict()
        if checker is not None:
            data["guard"] = with_guard.to_record()
        data["timings"]["load_ms"] = round(engine.load_ms, 2)
        data["device"] = engine.device
        data["threads"] = engine.threads
        data["threads_reason"] = engine.threads_reason
        out.write_json(data)
    if finish == "interrupted":
        # The engine caught Ctrl-C to hand back the partial answer (printed above); the command
        # still ends as an interrupted one, which app.py reports.
        raise KeyboardInterrupt
    if finish == "context":
        out.warn("the answer stopped because the context is full (raise --ctx)")

