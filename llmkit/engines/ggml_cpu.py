"""ggml's CPU backend as both engines load it: its library files and its weight buffers."""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

# Extra weight buffer types of ggml's CPU backend that llmkit keeps out of use. The AMX one
# (Intel Sapphire Rapids and later) crashes the process in ggml_backend_amx_mul_mat on the
# first prompt for Q4_0, Q4_1, Q8_0 and every K-quant whose rows are a multiple of 256
# (a Llama-3.2-shaped Q4_K_M among them): the tile configuration it loads from the stack is
# invalid as llama-cpp-python 0.3.36's ggml is compiled (llama.cpp issue #20824, PR #26954).
# Without it, llama.cpp and the Vision engine take the next choice, ggml's CPU_REPACK and the
# plain CPU kernels, exactly as on a processor without AMX.
UNSAFE_EXTRA_BUFTS = frozenset({"AMX"})

_lock = threading.Lock()
_state: dict[str, list[str] | None] = {"hidden": None}


def library_file(directory: Path, stem: str) -> Path | None:
    """The file of ggml library ``stem`` ("ggml-base", "ggml-cpu"…) in ``directory``, if any.

    The sonames come first: they are the names libllama's NEEDED entries load, so dlopen hands
    back the very handles llama_cpp already holds (one ggml in the process, never two).
    """
    for name in (f"lib{stem}.so.0", f"lib{stem}.so", f"lib{stem}.0.dylib", f"lib{stem}.dylib",
                 f"{stem}.dll"):
        path = directory / name
        if path.is_file():
            return path
    return None


def hide_unsafe_buffer_types(directory: Path) -> list[str]:
    """Remove :data:`UNSAFE_EXTRA_BUFTS` from the CPU device's list of extra buffer types.

    The list is the NULL-terminated array that ``ggml_backend_dev_get_extra_bufts`` returns,
    which llama.cpp reads at every model load (make_cpu_buft_list) and the Vision engine when
    it places weights; it lives in ggml's memory for the whole process, so one edit before the
    first load covers both. Safe to call more than once and from several threads.

    Args:
        directory: the folder holding llama-cpp-python's ggml libraries.

    Returns:
        The names of the buffer types removed (in this call or an earlier one).
    """
    with _lock:
        hidden = _state["hidden"]
        if hidden is None:
            hidden = _hide(directory)
            _state["hidden"] = hidden
        return list(hidden)


def hidden_buffer_types() -> list[str]:
    """What :func:`hide_unsafe_buffer_types` removed so far (empty before it ran)."""
    return list(_state["hidden"] or [])


def _hide(directory: Path) -> list[str]:
    base_path = library_file(directory, "ggml-base")
    ggml_path = library_file(directory, "ggml")
    if base_path is None or ggml_path is None:
        return []  # not a layout llmkit knows: nothing to edit
    try:
        base = ctypes.CDLL(str(base_path))
        ggml = ctypes.CDLL(str(ggml_path))
        # The CPU backend as libggml's registry holds it: the very instance llama.cpp uses,
        # whichever file of libggml-cpu the process happened to load first.
        reg_by_name = ggml.ggml_backend_reg_by_name
        dev_get = base.ggml_backend_reg_dev_get
        proc = base.ggml_backend_reg_get_proc_address
        buft_name = base.ggml_backend_buft_name
    except (OSError, AttributeError):
        return []
    reg_by_name.restype = ctypes.c_void_p
    reg_by_name.argtypes = [ctypes.c_char_p]
    dev_get.restype = ctypes.c_void_p
    dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    proc.restype = ctypes.c_void_p
    proc.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    buft_name.restype = ctypes.c_char_p
    buft_name.argtypes = [ctypes.c_void_p]
    reg = reg_by_name(b"CPU")
    dev = dev_get(reg, 0) if reg else None
    address = proc(reg, b"ggml_backend_dev_get_extra_bufts") if reg else None
    if not dev or not address:
        return []
    listed = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(dev)
    if not listed:
        return []
    entries: list[int] = []
    while listed[len(entries)]:
        entries.append(int(listed[len(entries)]))
    names = [(buft_name(b) or b"").decode("utf-8", "replace") for b in entries]
    kept = [b for b, name in zip(entries, names, strict=True) if name not in UNSAFE_EXTRA_BUFTS]
    if len(kept) == len(entries):
        return []
    # Shift the kept types down and fill the rest with NULLs: same length, still terminated.
    for i in range(len(entries)):
        listed[i] = kept[i] if i < len(kept) else None
    return [name for name in names if name in UNSAFE_EXTRA_BUFTS]
