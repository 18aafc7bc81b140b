"""Options shared by several commands, as Annotated types."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmkit.errors import EXIT_FLAGGED
from llmkit.hardware import INT32_MAX, MAX_PARALLEL, MAX_THREADS

if TYPE_CHECKING:
    from llmkit.session import EngineOptions


def finite(value: float | None) -> float | None:
    """Refuse NaN and infinities: Click's ranges let NaN through (every comparison is false)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def utf8_text(value: str | None) -> str | None:
    """Refuse text that is not UTF-8: Python passes such argument bytes on as lone surrogates,
    which no tokenizer can encode."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start].encode("utf-8", "surrogateescape").hex()
            raise typer.BadParameter(f"it is not UTF-8 text (byte 0x{bad} at character "
                                     f"{exc.start})") from None
    return value


def utf8_texts(values: list[str] | None) -> list[str] | None:
    """:func:`utf8_text` for each of a repeatable option or an argument list."""
    for value in values or []:
        utf8_text(value)
    return values


class Device(str, Enum):
    """Where to run the model."""

    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


class TextFormat(str, Enum):
    """Output format of one-shot commands."""

    text = "text"
    json = "json"


class ListFormat(str, Enum):
    """Output format of listings."""

    table = "table"
    json = "json"


MODEL_HELP = "Catalog name (llama3.2:1b), local name, or path to a .gguf file."

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help=MODEL_HELP,
                                              show_default=False)]
# Every model command declares these five (ctx, device, gpu_layers, threads, verbose) with
# these defaults, and hands them to engine_options().
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto: GPU when llama.cpp has one.")]
GpuLayersOpt = Annotated[int | None, typer.Option(
    "--gpu-layers", min=0, max=INT32_MAX, show_default=False,
    help="Layers to offload to the GPU (default: all when offloading).")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", "-t", min=1, max=MAX_THREADS, show_default=False,
    help="CPU threads, exactly (default: the physical cores other processes leave idle).")]
CtxOpt = Annotated[int | None, typer.Option(
    "--ctx", "-c", min=16, max=INT32_MAX,
    help="Context size in tokens (default: min(4096, the model's)).", show_default=False)]
ParallelOpt = Annotated[int | None, typer.Option(
    "--parallel", "-P", min=1, max=MAX_PARALLEL, show_default=False,
    help="Items decoded together, each with its own --ctx (default: 4 on CPU, 8 on a GPU; "
         "1 is one at a time).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Show llama.cpp's log on stderr.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No notes or progress on stderr.")]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="System prompt.",
                                               callback=utf8_text, show_default=False)]
TemperatureOpt = Annotated[float | None, typer.Option(
    "--temperature", min=0.0, max=5.0, callback=finite, show_default=False,
    help="Sampling temperature; 0 is greedy (default: the model's, else 0.8).")]
TopPOpt = Annotated[float | None, typer.Option(
    "--top-p", min=0.0, max=1.0, callback=finite, show_default=False,
    help="Nucleus sampling (default: the model's, else 0.95).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed for repeatable output.",
                                             show_default=False)]
MaxTokensOpt = Annotated[int, typer.Option(
    "--max-tokens", "-n", min=0, help="Most tokens to generate; 0 = until the context is full.")]
MmprojOpt = Annotated[Path | None, typer.Option(
    "--mmproj", help="Vision projector GGUF (default: the model's own, or the one mmproj-*.gguf "
    "beside it).", show_default=False)]
ImageOpt = Annotated[list[Path] | None, typer.Option(
    "--image", "-i", help="An image to ask about (repeat for several); needs a vision model.",
    show_default=False)]
GuardOpt = Annotated[bool, typer.Option(
    "--guard", help="Check the input before and the output after with a safety model; "
    f"flagged output is withheld (exit {EXIT_FLAGGED}).")]
GuardModelOpt = Annotated[str | None, typer.Option(
    "--guard-model", help="The safety model for --guard (default llama-guard3:1b); implies "
    "--guard.", show_default=False)]
GuardThresholdOpt = Annotated[float | None, typer.Option(
    "--guard-threshold", min=0.0, max=1.0, callback=finite, show_default=False,
    help="Flag when the safety model's P(unsafe) reaches this, instead of taking its answer.")]


def engine_options(ctx: int | None, threads: int | None, device: Device, gpu_layers: int | None,
                   verbose: bool) -> EngineOptions:
    """The hardware and context settings of a model command, from its options.

    Args:
        ctx: ``--ctx`` (None: the engine's default).
        threads: ``--threads`` (None: the idle physical cores).
        device: ``--device``.
        gpu_layers: ``--gpu-layers`` (None: all when offloading).
        verbose: ``--verbose`` (llama.cpp's log on stderr).

    Returns:
        The options every model is opened with (session.open_engine and friends).
    """
    from llmkit.session import EngineOptions

    return EngineOptions(ctx=ctx, threads=threads, device=device.value, gpu_layers=gpu_layers,
                         verbose=verbose)
