"""`llmkit list`, `show`, `import` and `rm`: the catalog and the local store."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import ListFormat, TextFormat


def list_models(
    format: Annotated[ListFormat | None, typer.Option(
        "--format", "-f", help="table (default on a terminal) or json.", show_default=False)
    ] = None,
    present: Annotated[bool, typer.Option("--present", help="Only models on this machine.")
                       ] = False,
) -> None:
    """List catalog models and local models side by side.

    Example: llmkit list --format json | jq '.[] | select(.present)'
    """
    from llmkit.gguf_file import human_size
    from llmkit.store import list_models as rows_of

    rows = [r for r in rows_of() if r.present or not present]
    fmt = format or (ListFormat.table if out.stdout_is_tty() else ListFormat.json)
    if fmt == ListFormat.json:
        out.write_json([r.to_dict() for r in rows])
        return
    from rich.table import Table

    cells = []
    for r in rows:
        status = "yes" if r.present else ("unsupported" if not r.supported else "no")
        if r.present and r.source == "embedded":
            status = "yes (embedded)"
        cells.append((r.name, r.kind, human_size(r.size_bytes) if r.present else "-",
                      r.quant or "-", status, r.description))
    headers = ("NAME", "KIND", "SIZE", "QUANT", "PRESENT", "DESCRIPTION")
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    # Only the description gives way on a narrow terminal; names stay whole.
    room = max(12, shutil.get_terminal_size().columns - sum(widths[:-1]) - 2 * len(headers))
    table = Table(box=None, pad_edge=False)
    for column in headers:
        table.add_column(column, no_wrap=True)
    for row in cells:
        desc = row[-1] if len(row[-1]) <= room else row[-1][: room - 1] + "…"
        table.add_row(*row[:-1], desc)
    out.write_table(table)


def show(
    model: Annotated[str, typer.Argument(help="Catalog name, local name, or path to a .gguf.")],
    format: Annotated[TextFormat, typer.Option("--format", "-f")] = TextFormat.text,
) -> None:
    """Print a model's GGUF metadata: architecture, parameters, quantization, context, template.

    Example: llmkit show smollm2:135m
    """
    from llmkit.gguf_file import check_file, human_params, human_size
    from llmkit.memory import show_estimate
    from llmkit.store import resolve

    resolution = resolve(model)
    info = check_file(Path(resolution.model.path))
    memory = show_estimate(Path(resolution.model.path), info.architecture)
    if format == TextFormat.json:
        data = info.to_dict()
        data["name"] = resolution.model.name
        data["gguf_name"] = info.name
        data["memory"] = memory.to_dict() if memory is not None else None
        out.write_json(data)
        return
    lines = [
        ("name", resolution.model.name),
        ("path", info.path),
        ("architecture", info.architecture),
        ("parameters", f"{human_params(info.parameters)} ({info.parameters:,})"),
        ("quantization", info.quantization),
        ("context length", str(info.context_length)),
        ("file size", f"{human_size(info.size_bytes)} ({info.size_bytes:,} bytes)"),
        ("tensors", str(info.tensor_count)),
    ]
    if memory is not None:
        lines.append(("memory", memory.summary()))
    width = max(len(k) for k, _ in lines)
    text = "".join(f"{k.ljust(width)}  {v}\n" for k, v in lines)
    text += "chat template:\n" + (info.chat_template or "(none)") + "\n"
    out.write(text)


def import_model(
    file: Annotated[Path, typer.Argument(help="The .gguf file to register.")],
    name: Annotated[str, typer.Option("--name", help="Name to use it by, e.g. mymodel:q4.")],
    mmproj: Annotated[Path | None, typer.Option(
        "--mmproj", help="Projector GGUF for a vision model.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a model of that name.")
                     ] = False,
) -> None:
    """Register a local GGUF under a name (the file stays where it is).

    Example: llmkit import ./my-model.Q4_K_M.gguf --name mymodel
    """
    from llmkit.store import import_gguf

    model = import_gguf(file, name, mmproj=mmproj, replace=force)
    out.note(f"imported {model.name} ({model.quant}) → {model.path}")


def rm(
    name: Annotated[str, typer.Argument(help="Local model name.")],
) -> None:
    """Unregister a local model (files llmkit downloaded or wrote are deleted).

    Example: llmkit rm mymodel
    """
    from llmkit.store import remove

    model = remove(name)
    out.note(f"removed {model.name}")
