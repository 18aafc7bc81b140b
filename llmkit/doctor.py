"""What `llmkit doctor` reports: versions, llama.cpp build, threads, paths, models present."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from llmkit import paths
from llmkit.hardware import measure_threads, physical_cores


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> dict[str, Any]:
    """Gather the facts; loads llama.cpp's library but no model."""
    from llmkit.engines import llama_cpp
    from llmkit.engines.ggml_cpu import hidden_buffer_types
    from llmkit.errors import StoreError
    from llmkit.store import list_models

    threads = measure_threads()  # before llama.cpp's library loads: this process is idle
    lc = llama_cpp.llama_module()
    gpu = bool(lc.llama_supports_gpu_offload())
    info = lc.llama_print_system_info().decode("utf-8", "replace").strip()
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "huggingface")
    # A damaged store is one of the facts doctor reports, not a reason to stop reporting.
    try:
        present, store = [r.name for r in list_models() if r.present], "ok"
    except StoreError as exc:
        present, store = [], str(exc)
    return {
        "llmkit": _version("llmkit"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "llama_cpp_python": _version("llama-cpp-python"),
        "backends": llama_cpp.backends(),
        "gpu_offload": gpu,
        "system_info": info,
        # Weight buffers ggml offers that llmkit keeps out of use (AMX: its kernels crash).
        "cpu_buffers_not_used": hidden_buffer_types(),
        "vision_engine": _vision_engine(),
        "physical_cores": physical_cores(),
        "default_threads": threads.threads,
        "threads_reason": threads.reason,
        "paths": {
            "home": str(paths.home()),
            "manifest": str(paths.manifest_path()),
            "user_catalog": str(paths.user_catalog_path()),
            "hf_home": hf_home,
        },
        "hf_offline": os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false"),
        "store": store,
        "models_present": present,
        "memory": _memory(gpu),
    }


def _memory(gpu: bool) -> dict[str, Any]:
    """What the memory check compares a model's estimate with: RAM (None where unknown) and
    each GPU's free memory."""
    from llmkit.engines import gpu_memory
    from llmkit.memory import cpu_available

    ram = cpu_available()
    return {
        "available": ram.bytes if ram is not None else None,
        "source": ram.source if ram is not None else None,
        "gpus": [{"name": g.name, "free": g.free, "total": g.total}
                 for g in (gpu_memory() if gpu else [])],
    }


def _vision_engine() -> str:
    """Whether llmkit's own engine (Llama 3.2 Vision) can run on the ggml library installed:
    "ok", or the self-test's sentence."""
    from llmkit.engines.mllama import _ggml
    from llmkit.errors import LlmkitError

    try:
        _ggml.lib()
    except LlmkitError as exc:
        return str(exc)
    return "ok (ggml ABI checked)"
