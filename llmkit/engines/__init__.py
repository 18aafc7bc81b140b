"""Engines: the interface tasks take, and the one place a GGUF's architecture picks its engine."""

from __future__ import annotations

from collections.abc import Callable
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
    from llmkit.gguf_file import Header
    from llmkit.memory import Available, GpuMemory

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
                mmproj: str | Path | None = None, n_batch: int | None = None,
                parallel: int = 1) -> Engine:
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
        parallel: sequences the engine's ``generate_many`` decodes together, each with a
            context of ``n_ctx`` (llama.cpp's engine; the Vision engine decodes one).

    Returns:
        The loaded engine; close it (or use it as a context manager) to free the memory.

    Raises:
        InvalidModelFileError: not a GGUF, damaged, or an architecture nothing here runs.
        DeviceError, UsageError: impossible device settings.
        NotEnoughMemoryError: the estimate from the file's header exceeds the memory the device
            has (checked before anything is loaded, unless LLMKIT_MEMORY_CHECK=0).
        LlmkitError: the model could not be loaded (usually not enough memory).
    """
    from llmkit.engines.llama_cpp import LlamaCppEngine
    from llmkit.gguf_file import check_model_header

    path = Path(model_path)
    architecture, header = check_model_header(path)
    if architecture == "mllama" and mmproj is not None:
        raise _no_projector(path)
    if architecture == "mllama":
        parallel = 1
    check_memory(header, architecture, n_ctx=n_ctx, device=device, gpu_layers=gpu_layers,
                 name=name or path.name, mmproj=mmproj, n_batch=n_batch, parallel=parallel)
    if architecture == "mllama":
        return _load_mllama(path, n_ctx=n_ctx, threads=threads, device=device,
                            gpu_layers=gpu_layers, verbose=verbose, name=name, mmproj=mmproj,
                            n_batch=n_batch)
    batch = {} if n_batch is None else {"n_batch": n_batch}
    return LlamaCppEngine(path, n_ctx=n_ctx, threads=threads, device=device,
                          gpu_layers=gpu_layers, verbose=verbose, name=name, mmproj=mmproj,
                          checked=True, parallel=parallel, **batch)


def check_memory(source: Path | Header, architecture: str, *, n_ctx: int | None, device: str,
                 gpu_layers: int | None, name: str, mmproj: str | Path | None = None,
                 n_batch: int | None = None,
                 cpu: Available | Callable[[], Available | None] | None = None,
                 gpus: Callable[[], list[GpuMemory]] | None = None,
                 gpu_offload: bool | None = None, parallel: int = 1) -> None:
    """Refuse a model that cannot fit, from its header alone, before its engine loads it.

    Args:
        source: the checked GGUF, or its header as already read.
        architecture: its architecture (picks the engine whose rules are estimated).
        n_ctx, device, gpu_layers, n_batch, mmproj: what the engine will be given.
        name: the model's name for the message.
        cpu: the RAM available, or what gives it (default :func:`memory.cpu_available`).
        gpus: the GPUs and their free memory (default: ggml's backend registry, asked only
            when layers would be offloaded).
        gpu_offload: whether the llama.cpp build offloads (default: ask it).
        parallel: sequences decoded together, each with ``n_ctx`` of KV cache.

    Raises:
        NotEnoughMemoryError: it needs more than there is (see :func:`memory.check_fits`).
        UsageError, DeviceError: impossible device settings (the engine's own messages).
    """
    import contextlib
    import dataclasses

    from llmkit import memory
    from llmkit.defaults import DEFAULT_CTX
    from llmkit.hardware import INT32_MAX, resolve_device

    if not memory.check_enabled():
        return
    if n_ctx is not None and not 16 <= n_ctx <= INT32_MAX:
        return  # the engine refuses the context itself, in its own words
    own = architecture in OWN_ENGINES
    if gpus is None:
        gpus = gpu_memory
    if own:
        found = gpus()
        gpu_available = bool(found)
    else:
        if gpu_offload is None:
            from llmkit.engines.llama_cpp import gpu_offload_supported

            gpu_offload = gpu_offload_supported()
        gpu_available = gpu_offload
        found = []
    choice = resolve_device(device, gpu_layers, gpu_available)
    if own and choice.n_gpu_layers > 0:
        return  # some layers only: the Vision engine refuses that itself, in its own words
    gpu: Available | None = None
    if choice.n_gpu_layers != 0:
        if not own:
            found = gpus()
        # The Vision engine runs on the first GPU; llama.cpp splits layers over all of them.
        used = found[:1] if own else found
        if used:
            gpu = memory.Available(sum(g.free for g in used),
                                   ", ".join(g.name for g in used) + " free")
    fp = memory.footprint(source)
    if mmproj is not None:
        # The projector's weights go where the model's do; its image graph is not counted.
        # (A projector that is not there is the engine's to name.)
        with contextlib.suppress(OSError):
            fp = dataclasses.replace(fp, output_bytes=fp.output_bytes
                                     + Path(mmproj).stat().st_size)
    have = cpu() if callable(cpu) else cpu if cpu is not None else memory.cpu_available()

    def plan(ftype: str, names: list[str]) -> Callable[[str, tuple[int, ...], str], str]:
        # llama.cpp's per-tensor choices, as the Vision quantizer follows them (for a Llama's
        # tensors they are what llama-quantize writes: tests/test_memory_real.py).
        from llmkit.engines.mllama.quantize import TypePlan

        return TypePlan.for_tensors(ftype, names).type_of

    batch: int
    if n_batch is not None:
        batch = n_batch
    elif own:
        from llmkit.engines.mllama.engine import EVAL_BATCH as batch
    else:
        from llmkit.engines.llama_cpp import DEFAULT_BATCH as batch
    memory.check_fits(fp, name, n_ctx or fp.default_ctx(DEFAULT_CTX),
                      gpu_layers=choice.n_gpu_layers, cpu=have, gpu=gpu, n_ubatch=batch,
                      plan=plan, parallel=parallel)


def gpu_memory() -> list[GpuMemory]:
    """The GPUs ggml's registry knows, with their free memory; none if ggml cannot say."""
    from llmkit import memory
    from llmkit.engines.mllama._backend import gpu_devices
    from llmkit.errors import LlmkitError

    try:
        return [memory.GpuMemory(d.description or d.name, d.memory_free, d.memory_total)
                for d in gpu_devices()]
    except LlmkitError:
        return []


def _load_mllama(path: Path, *, n_ctx: int | None, threads: int | None, device: str,
                 gpu_layers: int | None, verbose: bool, name: str | None,
                 mmproj: str | Path | None, n_batch: int | None) -> Engine:
    """Llama 3.2 Vision on llmkit's own ggml engine (engines/mllama)."""
    if mmproj is not None:
        raise _no_projector(path)
    from llmkit.engines.mllama.engine import open_engine
    from llmkit.engines.mllama.model import MllamaModel

    def forward(file: Any) -> MllamaModel:
        return MllamaModel(file, n_ctx=n_ctx, threads=threads, device=device,
                           gpu_layers=gpu_layers)

    return open_engine(path, forward, name=name, verbose=verbose, n_batch=n_batch)


def _no_projector(path: Path) -> Exception:
    from llmkit.errors import UsageError

    return UsageError(f"{path.name} is Llama 3.2 Vision, which reads images itself: it has "
                      "no projector", hint="leave out --mmproj")


def __getattr__(name: str) -> Any:
    # The llama.cpp engine's module is imported when first used, so a task that imports the
    # interface (engines.base) does not pull in the engine behind it.
    if name == "LlamaCppEngine":
        from llmkit.engines.llama_cpp import LlamaCppEngine

        return LlamaCppEngine
    raise AttributeError(f"module 'llmkit.engines' has no attribute {name!r}")
