"""`llmkit pull`: fetch a GGUF from the Hugging Face Hub and register it."""

from __future__ import annotations

from typing import Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import QuietOpt, TextFormat, ThreadsOpt


def pull(
    model: Annotated[str, typer.Argument(
        help="Catalog name (llama3.2:1b, llama3.2:1b@Q8_0), OWNER/REPO:QUANT or "
             "hf.co/OWNER/REPO:QUANT.")],
    quant: Annotated[str | None, typer.Option(
        "--quant", help="Quantization to pull, e.g. Q8_0 (default: the catalog's).",
        show_default=False)] = None,
    from_source: Annotated[bool, typer.Option(
        "--from-source", help="Download the safetensors checkpoint, convert and quantize it "
                              "with llmkit instead of fetching a prebuilt GGUF.")] = False,
    keep: Annotated[bool, typer.Option(
        "--keep", help="With --from-source: keep the intermediate f16 GGUF.")] = False,
    threads: ThreadsOpt = None,
    format: Annotated[TextFormat, typer.Option(
        "--format", "-f", help="json: print the registered model as one JSON object.")
    ] = TextFormat.text,
    quiet: QuietOpt = False,
) -> None:
    """Download a model's GGUF into the Hugging Face cache and register it.

    Example: llmkit pull llama3.2:1b --quant Q8_0
    """
    from llmkit.gguf_file import human_size
    from llmkit.hub import pull as pull_model

    out.set_quiet(quiet)
    if from_source:
        from llmkit.build import build_from_source

        built = build_from_source(model, quant, keep=keep, threads=threads, quiet=quiet)
        out.note(f"built {built.model.name} ({built.model.quant}, "
                 f"{human_size(built.model.size_bytes)}) from {built.source_repo} → "
                 f"{built.model.path}")
        if format == TextFormat.json:
            out.write_json(built.to_dict())
        return
    elif keep:
        from llmkit.errors import UsageError

        raise UsageError("--keep only applies with --from-source")
    result = pull_model(model, quant, progress=out.progress_enabled(), quiet=quiet)
    m = result.model
    verb = "pulled" if result.downloaded else "already here:"
    out.note(f"{verb} {m.name} ({m.quant}, {human_size(m.size_bytes)}) → {m.path}")
    if format == TextFormat.json:
        out.write_json(result.to_dict())
