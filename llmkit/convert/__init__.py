"""Hugging Face checkpoints (safetensors) → GGUF, without torch: one module per architecture."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.convert.idefics3 import Idefics3ProjectorConverter, Idefics3TextConverter
from llmkit.convert.llama import LlamaConverter
from llmkit.convert.mllama import MllamaConverter
from llmkit.convert.safetensors import MappedFiles, checkpoint_tensors
from llmkit.convert.tokenizer import add_tokenizer
from llmkit.convert.writer import OUTTYPES, discard, publish, stage_gguf
from llmkit.errors import ConvertError, UsageError
from llmkit.gguf_file import check_output, special_file
from llmkit.io import parse_json

# Hugging Face `architectures` names → converter of the language model. Llama Guard 3 and
# SmolLM2 are Llama models; SmolVLM's text model is one too. Llama 3.2 Vision (mllama) is one
# file holding the text model, the vision tower and the projector, for llmkit's own engine.
CONVERTERS: dict[str, type[LlamaConverter] | type[MllamaConverter]] = {
    "LlamaForCausalLM": LlamaConverter,
    "Idefics3ForConditionalGeneration": Idefics3TextConverter,
    "SmolVLMForConditionalGeneration": Idefics3TextConverter,
    "MllamaForConditionalGeneration": MllamaConverter,
}
# Architectures whose one GGUF holds the vision tower too: its engine reads images itself.
SELF_CONTAINED_VISION = frozenset({"MllamaForConditionalGeneration"})
# Architectures with a vision tower → converter of its projector, a second GGUF that
# llama.cpp's multimodal library (mtmd) loads beside the language model.
PROJECTORS: dict[str, type[Idefics3ProjectorConverter]] = {
    "Idefics3ForConditionalGeneration": Idefics3ProjectorConverter,
    "SmolVLMForConditionalGeneration": Idefics3ProjectorConverter,
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
    mmproj: str | None = None  # the vision projector, for vision models
    mmproj_tensors: int = 0
    mmproj_size_bytes: int = 0


def default_mmproj_path(output: Path) -> Path:
    """Where a vision model's projector goes unless named: ``mmproj-<OUT name>`` beside OUT."""
    return output.with_name(f"mmproj-{output.name}")


# What a conversion reads from a checkpoint directory, by name ending.
_READ_SUFFIXES = (".json", ".safetensors", ".model", ".jinja")


def _check_regular_files(directory: Path) -> None:
    """Refuse FIFOs, devices and sockets among the files a conversion reads.

    Opening a FIFO blocks until something writes to it, and /dev/zero never ends.

    Raises:
        ConvertError: such a file is there.
    """
    for entry in sorted(directory.iterdir()):
        kind = special_file(entry) if entry.name.endswith(_READ_SUFFIXES) else None
        if kind is not None:
            raise ConvertError(f"{entry} is {kind}, not a regular file",
                               hint="a checkpoint directory holds the model's own files")


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory.

    Raises:
        ConvertError: missing or not JSON.
    """
    path = directory / "config.json"
    try:
        config = parse_json(path.read_text(encoding="utf-8"), strict=False)
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
    mmproj: Path | None = None,
    force: bool = True,
    on_tensor: Callable[[int, int, str], None] | None = None,
) -> ConvertResult:
    """Convert a local Hugging Face checkpoint directory to GGUF.

    A vision model (SmolVLM / Idefics3) becomes two files: the language model at ``output``
    and its projector for llama.cpp's mtmd. Every file is written under a temporary name and
    renamed into place only once all of them are complete and verified.

    Args:
        source: directory with config.json, *.safetensors and the tokenizer files (and, for a
            vision model, preprocessor_config.json).
        output: the .gguf to write for the language model.
        outtype: f32, f16, bf16 or q8_0 for the weight matrices (norms stay f32). A projector
            is written in f32 for f32 and in f16 otherwise.
        mmproj: where a vision model's projector goes (default: `default_mmproj_path`).
        force: replace existing files; when False, an existing output is a UsageError.
        on_tensor: progress callback (index, total, tensor name), once per file's tensors.

    Returns:
        What was written.

    Raises:
        ConvertError: unsupported architecture or tokenizer, damaged checkpoint, write failure.
        UsageError: unknown outtype; ``mmproj`` for a text-only model; an output that exists
            without ``force``; the projector and the model at the same path.
    """
    if outtype not in OUTTYPES:
        raise UsageError(f"unknown output type '{outtype}'", hint=f"use {', '.join(OUTTYPES)}")
    if not source.is_dir():
        raise ConvertError(f"{source} is not a directory")
    started = time.perf_counter()
    _check_regular_files(source)
    config = read_config(source)
    archs = config.get("architectures") or []
    arch = archs[0] if archs else ""
    converter_cls = CONVERTERS.get(arch)
    if converter_cls is None:
        raise ConvertError(
            f"architecture '{arch or 'unknown'}' is not supported",
            hint=f"supported are {', '.join(sorted(CONVERTERS))}",
        )
    projector_cls = PROJECTORS.get(arch)
    if mmproj is not None and converter_cls is MllamaConverter:
        raise UsageError(f"{source.name} is a Llama 3.2 Vision model ({arch}), whose vision "
                         "tower goes into the model file itself; there is no projector to "
                         "write", hint="leave out --mmproj")
    if mmproj is not None and projector_cls is None:
        raise UsageError(f"{source.name} is a text-only model ({arch}); it has no vision "
                         "projector to write", hint="leave out --mmproj")
    mmproj_path = (mmproj or default_mmproj_path(output)) if projector_cls else None
    if mmproj_path is not None and mmproj_path.resolve() == output.resolve():
        raise UsageError(f"the projector and the model would both be {output}",
                         hint="give --mmproj another file name")
    for path in (output, mmproj_path):
        if path is not None:
            check_output(path, force=force)
    name = config.get("_name_or_path") or source.name
    files = MappedFiles()
    staged: list[tuple[Path, Path]] = []
    try:
        tensors = checkpoint_tensors(source)
        converter = converter_cls(source, config, tensors, files)
        planned = converter.tensors(outtype)
        # The projector is planned (and so checked) before anything is written.
        projector = projector_cls(source, config, tensors, files) if projector_cls else None
        projector_planned = projector.tensors(outtype) if projector is not None else []
        description: dict[str, str] = {}

        def metadata(writer: Any) -> None:
            converter.metadata(writer, outtype, name)
            description["tokenizer"] = add_tokenizer(writer, source, converter.n_vocab,
                                                     converter.chat_template)

        staged.append((stage_gguf(output, converter.arch, metadata, planned, on_tensor),
                       output))
        if projector is not None and mmproj_path is not None:

            def projector_metadata(writer: Any) -> None:
                projector.metadata(writer, outtype, name)

            staged.append((stage_gguf(mmproj_path, projector.arch, projector_metadata,
                                      projector_planned, on_tensor), mmproj_path))
        # The language model goes into place last: once it is there, so is its projector.
        publish(staged[::-1])
    finally:
        discard(staged)
        files.close()
    return ConvertResult(
        path=str(output), architecture=arch, outtype=outtype, tensors=len(planned),
        size_bytes=output.stat().st_size, tokenizer=description.get("tokenizer", ""),
        seconds=time.perf_counter() - started,
        mmproj=str(mmproj_path) if mmproj_path is not None else None,
        mmproj_tensors=len(projector_planned),
        mmproj_size_bytes=mmproj_path.stat().st_size if mmproj_path is not None else 0,
    )
