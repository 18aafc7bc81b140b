"""Engines: the interface tasks take, and the one place a GGUF's architecture picks its engine."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.engines.base import (
    Engine,
    Generation,
    Message,
    Piece,
    RGBImage,
    SamplingParams,
)

if TYPE_CHECKING:
    from llmkit.engines.llama_cpp import LlamaCppEngine

__all__ = ["Engine", "Generation", "LlamaCppEngine", "Message", "Piece", "RGBImage",
           "SamplingParams", "load_engine"]

# Architectures llama.cpp has no runtime for and llmkit has no engine of its own for yet: a
# file of one is refused here in one sentence, before llama.cpp would fail with "unknown model
# architecture". An engine of llmkit's own (ggml graphs for Llama 3.2 Vision) replaces its
# entry by a loader; every other architecture goes to llama.cpp, which knows its own list.
_NO_ENGINE = {
    "mllama": ("Llama 3.2 Vision (mllama) has no GGUF runtime yet: llama.cpp never merged one",
               "for images use a vision model llama.cpp runs, e.g. gemma3:4b or qwen2.5vl:3b"),
}


def load_engine(model_path: str | Path, *, n_ctx: int | None = None,
                threads: int | None = None, device: str = "auto",
                gpu_layers: int | None = None, verbose: bool = False, name: str | None = None,
                mmproj: str | Path | None = None, n_batch: int | None = None) -> Engine:
    """Load a GGUF model (and its projector) in the engine its architecture needs.

    Args:
        model_path: the .gguf file.
        n_ctx: context size in tokens; default min(4096, the model's training context).
        threads: CPU threads, exactly; default the physical cores others leave idle.
        device: "auto", "cpu" or "gpu".
        gpu_layers: layers to offload (None: all when offloading).
        verbose: pass the native library's log through to stderr.
        name: the model's name for reports (default: the file name).
        mmproj: the vision projector GGUF, for models that read images through one.
        n_batch: tokens per prompt-evaluation batch (None: the engine's default).

    Returns:
        The loaded engine; close it (or use it as a context manager) to free the memory.

    Raises:
        InvalidModelFileError: not a GGUF, damaged, or an architecture nothing here runs.
        DeviceError, UsageError: impossible device settings.
        LlmkitError: the model could not be loaded (usually not enough memory).
    """
    from llmkit.engines.llama_cpp import LlamaCppEngine
    from llmkit.errors import InvalidModelFileError
    from llmkit.gguf_file import check_model_file

    path = Path(model_path)
    architecture = check_model_file(path)
    if architecture in _NO_ENGINE:
        problem, hint = _NO_ENGINE[architecture]
        raise InvalidModelFileError(str(path), problem, hint=hint)
    batch = {} if n_batch is None else {"n_batch": n_batch}
    return LlamaCppEngine(path, n_ctx=n_ctx, threads=threads, device=device,
                          gpu_layers=gpu_layers, verbose=verbose, name=name, mmproj=mmproj,
                          checked=True, **batch)


def __getattr__(name: str) -> Any:
    # The llama.cpp engine's module is imported when first used, so a task that imports the
    # interface (engines.base) does not pull in the engine behind it.
    if name == "LlamaCppEngine":
        from llmkit.engines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine
    raise AttributeError(f"module 'llmkit.engines' has no attribute {name!r}")
