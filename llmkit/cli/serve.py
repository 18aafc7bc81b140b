"""`llmkit serve`: models over HTTP in OpenAI's API, with Llama Guard moderation."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import (
    MODEL_HELP,
    CtxOpt,
    Device,
    DeviceOpt,
    GpuLayersOpt,
    GuardModelOpt,
    GuardThresholdOpt,
    ParallelOpt,
    QuietOpt,
    ThreadsOpt,
    VerboseOpt,
    engine_options,
)


def serve(
    model: Annotated[list[str] | None, typer.Option(
        "--model", "-m", help=MODEL_HELP + " Repeat to serve several; a request's \"model\" "
        "picks one.", show_default=False)] = None,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on; anything but loopback needs an API key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535,
                                      help="Port (0: a free one, printed at start).")] = 8080,
    parallel: ParallelOpt = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="LLMKIT_API_KEY", show_envvar=True, show_default=False,
        help="Require 'Authorization: Bearer KEY' on every route but /health.")] = None,
    guard: Annotated[bool, typer.Option(
        "--guard", help="Check every prompt and answer with a safety model (flagged: "
        "finish_reason content_filter); it also answers /v1/moderations.")] = False,
    guard_model: GuardModelOpt = None,
    guard_threshold: GuardThresholdOpt = None,
    moderations_only: Annotated[bool, typer.Option(
        "--moderations-only", help="Load the safety model for /v1/moderations only; chats "
        "are not checked.")] = False,
    queue: Annotated[int | None, typer.Option(
        "--queue", min=0, show_default=False,
        help="Requests that may wait for a model beyond --parallel (default: 8 per "
        "sequence); past it, 429 with Retry-After.")] = None,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", "-n", min=1, show_default=False,
        help="The most tokens one answer may ask for (default: what its context holds).")
    ] = None,
    max_body: Annotated[int, typer.Option(
        "--max-body", min=1, help="The largest request body, in MiB (413 past it).")] = 8,
    allow_files: Annotated[Path | None, typer.Option(
        "--allow-files", file_okay=False, dir_okay=True, exists=True, show_default=False,
        help="Let image_url name files in this folder (by default only data: URLs are "
        "read; nothing is ever fetched).")] = None,
    max_image_pixels: Annotated[int, typer.Option(
        "--max-image-pixels", min=1, help="The most pixels an image may have (400 past it).")
    ] = 40_000_000,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1.0, help="Seconds a request may take, queued and generating "
        "(504 past it).")] = 600.0,
    shutdown_timeout: Annotated[float, typer.Option(
        "--shutdown-timeout", min=0.0, help="On SIGINT/SIGTERM, seconds to let requests in "
        "flight finish before ending them.")] = 120.0,
    ctx: CtxOpt = None,
    device: DeviceOpt = Device.auto,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Serve models over HTTP with OpenAI's API, until Ctrl-C or SIGTERM (then the requests
    in flight finish, and it exits 0).

    Example: llmkit serve -m llama3.2:1b --guard --port 8080

    Routes: GET /v1/models, POST /v1/chat/completions (tools, and images as data: URLs for
    vision models), POST /v1/completions, POST /v1/embeddings, POST /v1/moderations (with a
    safety model), GET /health. Requests decode together, up to
    --parallel per model; more wait in a bounded queue (429 when full).
    """
    from llmkit.server import ServeSettings, check_bind, open_service, require_serve_extra
    from llmkit.server import serve as run_server
    from llmkit.server.service import Limits
    from llmkit.session import with_parallel

    out.set_quiet(quiet)
    require_serve_extra()  # before any model loads
    check_bind(host, api_key)
    options = with_parallel(engine_options(ctx, threads, device, gpu_layers, verbose), parallel)

    def loaded(name: str, engine: object) -> None:
        sequences = getattr(engine, "parallel", 1)
        out.info(f"loaded {name}: {sequences} sequence{'s' * (sequences != 1)} of "
                 f"{getattr(engine, 'n_ctx', '?')} tokens")

    service = open_service(model or [], options, guard=guard or moderations_only,
                           guard_model=guard_model, guard_threshold=guard_threshold,
                           guard_chats=not moderations_only,
                           limits=Limits(max_tokens=max_tokens, timeout_s=timeout,
                                         max_image_pixels=max_image_pixels,
                                         allow_files=allow_files),
                           queue=queue,
                           on_loaded=loaded)
    settings = ServeSettings(host=host, port=port, api_key=api_key,
                             max_body=max_body * 1024 * 1024,
                             shutdown_timeout_s=shutdown_timeout, access_log=not quiet)
    run_server(service, settings, on_listening=lambda url: out.note(f"serving on {url}"),
               log_level="warning" if quiet else "info")
