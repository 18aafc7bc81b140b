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

# Architectures llama.cpp has no runtime for, run by an engine of llmkit's own on the ggml
# library llama-cpp-python ships (Llama 3.2 Vision: its cross-attention layers and vision tower
# as ggml graphs). Every other architecture goes to llama.cpp, which knows its own list. Such an
# engine reads images itself: its one GGUF holds the vision tower, and there is no projector.
OWN_ENGINES = frozenset({"mllama"})


def reads_images_itself(architecture: str) -> bool:
    """Whether a GGUF of this architecture sees images without a projector (mmproj) file."""
    return architecture in OWN_ENGINES


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
    from llmkit.gguf_file import check_model_file

    path = Path(model_path)
    architecture = check_model_file(path)
    if architecture == "mllama":
        return _load_mllama(path, n_ctx=n_ctx, threads=threads, device=device,
                            gpu_layers=gpu_layers, verbose=verbose, name=name, mmproj=mmproj,
                            n_batch=n_batch)
    batch = {} if n_batch is None else {"n_batch": n_batch}
    return LlamaCppEngine(path, n_ctx=n_ctx, threads=threads, device=device,
                          gpu_layers=gpu_layers, verbose=verbose, name=name, mmproj=mmproj,
                          checked=True, **batch)


def _load_mllama(path: Path, *, n_ctx: int | None, threads: int | None, device: str,
                 gpu_layers: int | None, verbose: bool, name: str | None,
                 mmproj: str | Path | None, n_batch: int | None) -> Engine:
    """Llama 3.2 Vision on llmkit's own ggml engine (engines/mllama)."""
    from llmkit.errors import UsageError

    if mmproj is not None:
        raise UsageError(f"{path.name} is Llama 3.2 Vision, which reads images itself: it has "
                         "no projector", hint="leave out --mmproj")
    from llmkit.engines.mllama.engine import open_engine
    from llmkit.engines.mllama.model import MllamaModel

    def forward(file: Any) -> MllamaModel:
        return MllamaModel(file, n_ctx=n_ctx, threads=threads, device=device,
                           gpu_layers=gpu_layers)

    return open_engine(path, forward, name=name, verbose=verbose, n_batch=n_batch)


def __getattr__(name: str) -> Any:
    # The llama.cpp engine's module is imported when first used, so a task that imports the
    # interface (engines.base) does not pull in the engine behind it.
    if name == "LlamaCppEngine":
        from llmkit.engines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine
    raise AttributeError(f"module 'llmkit.engines' has no attribute {name!r}")
