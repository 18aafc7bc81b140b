"""`llmkit convert` and `llmkit quantize`: make GGUF files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import QuietOpt, TextFormat, ThreadsOpt


def _progress() -> Callable[[int, int, str], None] | None:
    """A per-tensor progress callback when progress is shown (a terminal, no -q), else None."""
    if not out.progress_enabled():
        return None

    def show(i: int, total: int, name: str) -> None:
        out.progress(f"converting {i + 1}/{total} {name}", keep=i + 1 == total)

    return show


def convert(
    source: Annotated[str, typer.Argument(
        help="Checkpoint directory, or a Hugging Face repository (OWNER/REPO).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .gguf file to write.")],
    mmproj: Annotated[Path | None, typer.Option(
        "--mmproj", help="Where a vision model's projector goes (default: mmproj-OUT beside OUT).",
        show_default=False)] = None,
    outtype: Annotated[str, typer.Option(
        "--outtype", help="Weight type: f32, f16, bf16 or q8_0 (norms stay f32).")] = "f16",
    force: Annotated[bool, typer.Option(
        "--force", help="Replace OUT (and the projector) if they exist.")] = False,
    format: Annotated[TextFormat, typer.Option("--format", "-f")] = TextFormat.text,
    quiet: QuietOpt = False,
) -> None:
    """Convert a Hugging Face checkpoint (safetensors) to GGUF, without torch.

    A vision model (SmolVLM) also gets its projector for llama.cpp's mtmd, in a second file.

    Example: llmkit convert ./SmolLM2-135M-Instruct -o smollm2-f16.gguf
    """
    from llmkit.convert import convert as run_convert
    from llmkit.gguf_file import check_output, human_size
    from llmkit.hub import checkpoint_dir

    out.set_quiet(quiet)
    # Checked again once the checkpoint is known; here they fail before any download.
    for path in (output, mmproj):
        if path is not None:
            check_output(path, force=force)
    directory = checkpoint_dir(source, quiet=quiet)
    result = run_convert(directory, output, outtype=outtype.lower(), mmproj=mmproj, force=force,
                         on_tensor=_progress())
    if format == TextFormat.json:
        out.write_json(result.__dict__)
        return
    out.note(f"wrote {result.path} ({result.tensors} tensors, "
             f"{human_size(result.size_bytes)}, tokenizer {result.tokenizer}) "
             f"in {result.seconds:.1f} s")
    if result.mmproj is not None:
        out.note(f"wrote the vision projector to {result.mmproj} ({result.mmproj_tensors} "
                 f"tensors, {human_size(result.mmproj_size_bytes)})")


def quantize(
    source: Annotated[Path, typer.Argument(help="Input GGUF (usually F16, BF16 or F32).")],
    output: Annotated[Path | None, typer.Argument(
        help="Output GGUF (default: next to the input, named after the type).",
        show_default=False)] = None,
    type: Annotated[str, typer.Option("--type", help="Q4_K_M, Q8_0, Q5_K_M, IQ4_XS, …")
                    ] = "Q4_K_M",
    threads: ThreadsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    imatrix: Annotated[Path | None, typer.Option(
        "--imatrix", help="Importance matrix from llama-imatrix (needed for IQ1/IQ2 types).",
        show_default=False)] = None,
    format: Annotated[TextFormat, typer.Option("--format", "-f")] = TextFormat.text,
    quiet: QuietOpt = False,
) -> None:
    """Quantize a GGUF with llama.cpp's own quantizer; the result is loaded once to check it.

    Example: llmkit quantize smollm2-f16.gguf --type Q4_K_M
    """
    from llmkit.errors import UsageError
    from llmkit.gguf_file import human_size
    from llmkit.quantize import TYPES
    from llmkit.quantize import quantize as run_quantize

    out.set_quiet(quiet)
    if output is not None and not output.exists() and output.name.upper() in TYPES:
        # `llmkit quantize in.gguf Q4_K_M` would write a file named Q4_K_M at the default type.
        raise UsageError(f"'{output}' is a quantization type, not an output file",
                         hint=f"write --type {output.name.upper()}")
    result = run_quantize(source, type, output, threads=threads, force=force, imatrix=imatrix)
    if format == TextFormat.json:
        out.write_json(result.__dict__)
    else:
        out.note(f"{result.type}: {human_size(result.size_in)} → {human_size(result.size_out)} "
                 f"({result.size_out / result.size_in:.0%}) in {result.seconds:.1f} s → "
                 f"{result.output}")
