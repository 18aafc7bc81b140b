"""Hugging Face checkpoints (safetensors) → GGUF, without torch: one module per architecture."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.convert.llama import LlamaConverter
from llmkit.convert.safetensors import MappedFiles, checkpoint_tensors
from llmkit.convert.tokenizer import add_tokenizer
from llmkit.convert.writer import OUTTYPES, write_gguf
from llmkit.errors import ConvertError, UsageError

# Hugging Face `architectures` names → converter. Llama Guard 3 and SmolLM2 are Llama models.
CONVERTERS: dict[str, type[LlamaConverter]] = {
    "LlamaForCausalLM": LlamaConverter,
}


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` wrote."""

    path: str
    architecture: str
    outtype: str
    tensors: int
    size_bytes: int
    tokenizer: str
    seconds: float


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory.

    Raises:
        ConvertError: missing or not JSON.
    """
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{directory} has no config.json",
                           hint="point at a Hugging Face checkpoint directory") from None
    except (OSError, ValueError) as exc:
        raise ConvertError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return config


def convert(
    source: Path,
    output: Path,
    *,
    outtype: str = "f16",
    on_tensor: Callable[[int, int, str], None] | None = None,
) -> ConvertResult:
    """Convert a local Hugging Face checkpoint directory to a GGUF file.

    Args:
        source: directory with config.json, *.safetensors and the tokenizer files.
        output: the .gguf to write (atomically: a temporary name, renamed when complete).
        outtype: f32, f16, bf16 or q8_0 for the weight matrices (norms stay f32).
        on_tensor: progress callback (index, total, tensor name).

    Returns:
        What was written.

    Raises:
        ConvertError: unsupported architecture or tokenizer, damaged checkpoint, write failure.
        UsageError: unknown outtype.
    """
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown output type '{outtype}'", hint=f"use {', '.join(OUTTYPES)}")
    if not source.is_dir():
        raise ConvertError(f"{source} is not a directory")
    started = time.perf_counter()
    config = read_config(source)
    archs = config.get("architectures") or []
    arch = archs[0] if archs else ""
    converter_cls = CONVERTERS.get(arch)
    if converter_cls is None:
        raise ConvertError(
            f"architecture '{arch or 'unknown'}' is not supported",
            hint=f"supported are {', '.join(sorted(CONVERTERS))}",
        )
    files = MappedFiles()
    try:
        converter = converter_cls(source, config, checkpoint_tensors(source), files)
        planned = converter.tensors(outtype)
        description: dict[str, str] = {}

        def metadata(writer: Any) -> None:
            converter.metadata(writer, outtype, config.get("_name_or_path") or source.name)
            description["tokenizer"] = add_tokenizer(writer, source, converter.n_vocab)

        write_gguf(output, converter.arch, metadata, planned, on_tensor)
    finally:
        files.close()
    return ConvertResult(
        path=str(output), architecture=arch, outtype=outtype, tensors=len(planned),
        size_bytes=output.stat().st_size, tokenizer=description.get("tokenizer", ""),
        seconds=time.perf_counter() - started,
    )
