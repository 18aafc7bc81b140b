"""bf16/f32/f16 conversions through ggml's vectorised CPU routines, with a numpy fallback.

numpy's float16 cast is several times slower than ggml's (F16C/AVX) row converters, and these
casts are most of a conversion's CPU time. Both round to nearest even, so results are identical.
"""

from __future__ import annotations

import ctypes
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

from llmkit.engines.ggml_cpu import library_file


@lru_cache(maxsize=1)
def _ggml_cpu() -> Any:
    """libggml-cpu from the installed llama-cpp-python (located, not imported), or None."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        # By its soname first: the file llama.cpp's own libraries load, so the process holds
        # one ggml CPU backend (a second copy would have settings of its own).
        path = library_file(Path(location) / "lib", "ggml-cpu")
        if path is not None:
            try:
                lib = ctypes.CDLL(str(path))
                p = ctypes.c_void_p
                for fn in (lib.ggml_cpu_bf16_to_fp32, lib.ggml_cpu_fp32_to_fp16):
                    fn.argtypes = [p, p, ctypes.c_int64]
                    fn.restype = None
                if hasattr(lib, "ggml_cpu_init"):
                    lib.ggml_cpu_init()
                return lib
            except (OSError, AttributeError):
                return None
    return None


def bf16_to_f32(bits: Any) -> Any:
    """uint16 bfloat16 bit patterns → float32 (exact)."""
    import numpy as np

    src = np.ascontiguousarray(bits, dtype=np.uint16)
    lib = _ggml_cpu()
    if lib is None:
        return (src.astype(np.uint32) << 16).view(np.float32)
    out = np.empty(src.shape, dtype=np.float32)
    lib.ggml_cpu_bf16_to_fp32(src.ctypes.data, out.ctypes.data, src.size)
    return out


def f32_to_f16(values: Any) -> Any:
    """float32 → float16, rounding to nearest even."""
    import numpy as np

    src = np.ascontiguousarray(values, dtype=np.float32)
    lib = _ggml_cpu()
    if lib is None:
        return src.astype(np.float16)
    out = np.empty(src.shape, dtype=np.float16)
    lib.ggml_cpu_fp32_to_fp16(src.ctypes.data, out.ctypes.data, src.size)
    return out
