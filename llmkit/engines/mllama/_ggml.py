"""ctypes over llama-cpp-python's own ggml: declarations, an ABI self-test, graph building."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.engines._log import LogTail
from llmkit.engines.ggml_cpu import hide_unsafe_buffer_types, library_file
from llmkit.errors import LlmkitError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# The llama-cpp-python release this module was written against (pyproject pins it); its
# libggml-base.so.0.25.3 and include/ggml.h are the source of every declaration below.
PINNED_LLAMA_CPP = "0.3.36"

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
# sizeof(struct ggml_object) in ggml.c (offs, size, next, type, padding[4]): every tensor in a
# context costs this header plus the tensor itself, which is what ggml_tensor_overhead() returns.
GGML_OBJECT_SIZE = 32
GGML_DEFAULT_GRAPH_SIZE = 2048

ROPE_TYPE_NORMAL = 0
ROPE_TYPE_NEOX = 2  # GGML_ROPE_TYPE_NEOX: rotate halves, as Hugging Face's rotate_half
PREC_F32 = 10  # enum ggml_prec GGML_PREC_F32
TENSOR_FLAG_INPUT = 1
TENSOR_FLAG_OUTPUT = 2
STATUS_SUCCESS = 0  # enum ggml_status
STATUS_ABORTED = 1

DEV_TYPE_CPU, DEV_TYPE_GPU, DEV_TYPE_IGPU, DEV_TYPE_ACCEL, DEV_TYPE_META = range(5)
BUFFER_USAGE_WEIGHTS = 1


class GgmlType(IntEnum):
    """enum ggml_type (ggml.h; values are stored in GGUF files, so they never change)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    BF16 = 30


# (type, block size, bytes per block, ggml_type_name) as ggml.c's type_traits table has them.
_TYPE_FACTS: tuple[tuple[GgmlType, int, int, str], ...] = (
    (GgmlType.F32, 1, 4, "f32"),
    (GgmlType.F16, 1, 2, "f16"),
    (GgmlType.BF16, 1, 2, "bf16"),
    (GgmlType.Q8_0, 32, 34, "q8_0"),
    (GgmlType.Q4_0, 32, 18, "q4_0"),
    (GgmlType.Q4_K, 256, 144, "q4_K"),
    (GgmlType.Q5_K, 256, 176, "q5_K"),
    (GgmlType.Q6_K, 256, 210, "q6_K"),
    (GgmlType.I32, 1, 4, "i32"),
    (GgmlType.I64, 1, 8, "i64"),
)


class Tensor(ctypes.Structure):
    """struct ggml_tensor, field for field as include/ggml.h of ggml 0.25.3 declares it."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class InitParams(ctypes.Structure):
    """struct ggml_init_params (passed by value to ggml_init)."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p),
                ("no_alloc", ctypes.c_bool)]


class GgmlAbiError(LlmkitError):
    """The ggml library found is not the one this engine was written for; nothing may run on it."""


_P = ctypes.c_void_p
_S = ctypes.c_char_p
_I = ctypes.c_int
_I64 = ctypes.c_int64
_SZ = ctypes.c_size_t
_F = ctypes.c_float
_B = ctypes.c_bool
_U8 = ctypes.c_uint8
_PSZ = ctypes.POINTER(ctypes.c_size_t)

# Every function used, with its C signature (ggml.h, ggml-backend.h, ggml-alloc.h, ggml-cpu.h,
# gguf.h). Pointers are c_void_p both ways, so no call ever truncates one to a C int.
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "ggml_version": (_S, []),
    "ggml_tensor_overhead": (_SZ, []),
    "ggml_graph_overhead_custom": (_SZ, [_SZ, _B]),
    "ggml_init": (_P, [InitParams]),
    "ggml_free": (None, [_P]),
    "ggml_type_size": (_SZ, [_I]),
    "ggml_blck_size": (_I64, [_I]),
    "ggml_type_name": (_S, [_I]),
    "ggml_row_size": (_SZ, [_I, _I64]),
    "ggml_is_quantized": (_B, [_I]),
    "ggml_op_name": (_S, [_I]),
    "ggml_op_desc": (_S, [_P]),
    "ggml_nelements": (_I64, [_P]),
    "ggml_nbytes": (_SZ, [_P]),
    "ggml_n_dims": (_I, [_P]),
    "ggml_is_contiguous": (_B, [_P]),
    "ggml_is_contiguous_1": (_B, [_P]),
    "ggml_get_data": (_P, [_P]),
    "ggml_get_name": (_P, [_P]),
    "ggml_set_name": (_P, [_P, _S]),
    "ggml_set_input": (None, [_P]),
    "ggml_set_output": (None, [_P]),
    "ggml_new_tensor_1d": (_P, [_P, _I, _I64]),
    "ggml_new_tensor_2d": (_P, [_P, _I, _I64, _I64]),
    "ggml_new_tensor_3d": (_P, [_P, _I, _I64, _I64, _I64]),
    "ggml_new_tensor_4d": (_P, [_P, _I, _I64, _I64, _I64, _I64]),
    "ggml_get_tensor": (_P, [_P, _S]),
    "ggml_get_first_tensor": (_P, [_P]),
    "ggml_get_next_tensor": (_P, [_P, _P]),
    "ggml_dup": (_P, [_P, _P]),
    "ggml_add": (_P, [_P, _P, _P]),
    "ggml_sub": (_P, [_P, _P, _P]),
    "ggml_mul": (_P, [_P, _P, _P]),
    "ggml_div": (_P, [_P, _P, _P]),
    "ggml_scale": (_P, [_P, _P, _F]),
    "ggml_norm": (_P, [_P, _P, _F]),
    "ggml_rms_norm": (_P, [_P, _P, _F]),
    "ggml_mul_mat": (_P, [_P, _P, _P]),
    "ggml_prec_set_acc": (_B, [_P, _I]),
    "ggml_get_rows": (_P, [_P, _P, _P]),
    "ggml_set_rows": (_P, [_P, _P, _P, _P]),
    "ggml_gelu_erf": (_P, [_P, _P]),
    "ggml_gelu": (_P, [_P, _P]),
    "ggml_silu": (_P, [_P, _P]),
    "ggml_tanh": (_P, [_P, _P]),
    "ggml_sigmoid": (_P, [_P, _P]),
    "ggml_exp": (_P, [_P, _P]),
    "ggml_sqr": (_P, [_P, _P]),
    "ggml_sqrt": (_P, [_P, _P]),
    "ggml_swiglu_split": (_P, [_P, _P, _P]),
    "ggml_rope_ext": (_P, [_P, _P, _P, _P, _I, _I, _I, _F, _F, _F, _F, _F, _F]),
    "ggml_soft_max_ext": (_P, [_P, _P, _P, _F, _F]),
    "ggml_flash_attn_ext": (_P, [_P, _P, _P, _P, _P, _F, _F, _F]),
    "ggml_concat": (_P, [_P, _P, _P, _I]),
    "ggml_pad": (_P, [_P, _P, _I, _I, _I, _I]),
    "ggml_pad_ext": (_P, [_P, _P, _I, _I, _I, _I, _I, _I, _I, _I]),
    "ggml_view_1d": (_P, [_P, _P, _I64, _SZ]),
    "ggml_view_2d": (_P, [_P, _P, _I64, _I64, _SZ, _SZ]),
    "ggml_view_3d": (_P, [_P, _P, _I64, _I64, _I64, _SZ, _SZ, _SZ]),
    "ggml_view_4d": (_P, [_P, _P, _I64, _I64, _I64, _I64, _SZ, _SZ, _SZ, _SZ]),
    "ggml_reshape_1d": (_P, [_P, _P, _I64]),
    "ggml_reshape_2d": (_P, [_P, _P, _I64, _I64]),
    "ggml_reshape_3d": (_P, [_P, _P, _I64, _I64, _I64]),
    "ggml_reshape_4d": (_P, [_P, _P, _I64, _I64, _I64, _I64]),
    "ggml_permute": (_P, [_P, _P, _I, _I, _I, _I]),
    "ggml_transpose": (_P, [_P, _P]),
    "ggml_cont": (_P, [_P, _P]),
    "ggml_cpy": (_P, [_P, _P, _P]),
    "ggml_cast": (_P, [_P, _P, _I]),
    "ggml_repeat": (_P, [_P, _P, _P]),
    "ggml_sum_rows": (_P, [_P, _P]),
    "ggml_mean": (_P, [_P, _P]),
    "ggml_argmax": (_P, [_P, _P]),
    "ggml_clamp": (_P, [_P, _P, _F, _F]),
    "ggml_new_graph_custom": (_P, [_P, _SZ, _B]),
    "ggml_build_forward_expand": (None, [_P, _P]),
    "ggml_graph_n_nodes": (_I, [_P]),
    "ggml_graph_node": (_P, [_P, _I]),
    "ggml_quantize_chunk": (_SZ, [_I, _P, _P, _I64, _I64, _I64, _P]),
    "ggml_quantize_requires_imatrix": (_B, [_I]),
    "ggml_log_get": (None, [ctypes.POINTER(_P), ctypes.POINTER(_P)]),
    "ggml_log_set": (None, [_P, _P]),
    "ggml_backend_dev_count": (_SZ, []),
    "ggml_backend_dev_get": (_P, [_SZ]),
    "ggml_backend_dev_name": (_S, [_P]),
    "ggml_backend_dev_description": (_S, [_P]),
    "ggml_backend_dev_type": (_I, [_P]),
    "ggml_backend_dev_memory": (None, [_P, _PSZ, _PSZ]),
    "ggml_backend_dev_init": (_P, [_P, _S]),
    "ggml_backend_dev_buffer_type": (_P, [_P]),
    "ggml_backend_dev_supports_op": (_B, [_P, _P]),
    "ggml_backend_dev_backend_reg": (_P, [_P]),
    "ggml_backend_reg_get_proc_address": (_P, [_P, _S]),
    "ggml_backend_get_device": (_P, [_P]),
    "ggml_backend_load_all_from_path": (None, [_S]),
    "ggml_backend_free": (None, [_P]),
    "ggml_backend_name": (_S, [_P]),
    "ggml_backend_get_default_buffer_type": (_P, [_P]),
    "ggml_backend_synchronize": (None, [_P]),
    "ggml_backend_graph_compute": (_I, [_P, _P]),
    "ggml_backend_supports_op": (_B, [_P, _P]),
    "ggml_backend_buft_name": (_S, [_P]),
    "ggml_backend_buft_is_host": (_B, [_P]),
    "ggml_backend_buft_alloc_buffer": (_P, [_P, _SZ]),
    "ggml_backend_buffer_free": (None, [_P]),
    "ggml_backend_buffer_get_base": (_P, [_P]),
    "ggml_backend_buffer_get_size": (_SZ, [_P]),
    "ggml_backend_buffer_clear": (None, [_P, _U8]),
    "ggml_backend_buffer_is_host": (_B, [_P]),
    "ggml_backend_buffer_set_usage": (None, [_P, _I]),
    "ggml_backend_buffer_get_usage": (_I, [_P]),
    "ggml_backend_buffer_get_alloc_size": (_SZ, [_P, _P]),
    "ggml_backend_tensor_set": (None, [_P, _P, _SZ, _SZ]),
    "ggml_backend_tensor_get": (None, [_P, _P, _SZ, _SZ]),
    "ggml_backend_tensor_memset": (None, [_P, _U8, _SZ, _SZ]),
    "ggml_backend_tensor_alloc": (_I, [_P, _P, _P]),
    "ggml_backend_cpu_buffer_from_ptr": (_P, [_P, _SZ]),
    "ggml_backend_cpu_buffer_type": (_P, []),
    "ggml_backend_alloc_ctx_tensors_from_buft": (_P, [_P, _P]),
    "ggml_gallocr_new": (_P, [_P]),
    "ggml_gallocr_free": (None, [_P]),
    "ggml_gallocr_reserve": (_B, [_P, _P]),
    "ggml_gallocr_alloc_graph": (_B, [_P, _P]),
    "ggml_gallocr_get_buffer_size": (_SZ, [_P, _I]),
    "ggml_backend_sched_new": (_P, [ctypes.POINTER(_P), ctypes.POINTER(_P), _I, _SZ, _B, _B]),
    "ggml_backend_sched_free": (None, [_P]),
    "ggml_backend_sched_reserve": (_B, [_P, _P]),
    "ggml_backend_sched_alloc_graph": (_B, [_P, _P]),
    "ggml_backend_sched_graph_compute": (_I, [_P, _P]),
    "ggml_backend_sched_reset": (None, [_P]),
    "ggml_backend_sched_get_n_splits": (_I, [_P]),
    "ggml_backend_sched_get_buffer_size": (_SZ, [_P, _P]),
    "ggml_backend_cpu_init": (_P, []),
    "ggml_backend_cpu_set_n_threads": (None, [_P, _I]),
    "ggml_backend_cpu_set_abort_callback": (None, [_P, _P, _P]),
    "ggml_backend_is_cpu": (_B, [_P]),
    "gguf_free": (None, [_P]),
    "gguf_get_data_offset": (_SZ, [_P]),
    "gguf_get_n_tensors": (_I64, [_P]),
    "gguf_get_tensor_name": (_S, [_P, _I64]),
    "gguf_get_tensor_offset": (_SZ, [_P, _I64]),
    "gguf_get_tensor_type": (_I, [_P, _I64]),
    "gguf_get_tensor_size": (_SZ, [_P, _I64]),
    "gguf_get_tensor_ne": (ctypes.POINTER(_I64), [_P, _I64]),
    "gguf_find_key": (_I64, [_P, _S]),
}


class GgufInitParams(ctypes.Structure):
    """struct gguf_init_params (gguf.h): no_alloc, and where to put the ggml context it creates."""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


_SIGNATURES["gguf_init_from_file"] = (_P, [_S, GgufInitParams])

LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
ABORT_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)
# ggml_backend_dev_get_extra_bufts_t (ggml-backend.h), found by name through
# ggml_backend_reg_get_proc_address: the device's extra buffer types, NULL-terminated.
EXTRA_BUFTS_FN = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)

# The libraries in dependency order; later ones need the earlier ones' symbols.
_LIBRARY_STEMS = ("ggml-base", "ggml-cpu", "ggml")


class Lib:
    """The loaded libraries: ``f`` holds every declared function, by its C name."""

    def __init__(self, directory: Path, handles: list[ctypes.CDLL], version: str) -> None:
        self.directory = directory
        self.handles = handles
        self.package_version = version
        self.f: Any = _Functions()
        self.ggml_version = ""


class _Functions:
    """A namespace the declared ctypes functions are set on."""


_lock = threading.Lock()
_state: dict[str, Any] = {"lib": None, "error": None, "log": None, "verbose": False}
_log = LogTail()


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama-cpp-python")
    except Exception:  # any failure means "unknown", never a crash
        return "(unknown version)"


def _abi_error(version: str, detail: str) -> GgmlAbiError:
    return GgmlAbiError(
        f"the ggml library shipped with llama-cpp-python {version} has a different ABI than "
        f"llmkit's Vision engine was written for ({detail})",
        hint="reinstall the version llmkit pins: "
             f"pip install 'llama-cpp-python=={PINNED_LLAMA_CPP}'",
    )


def library_dir() -> Path:
    """The ``lib`` folder of the installed llama_cpp package (found, not imported).

    Returns:
        The directory holding libggml-base, libggml-cpu and libggml.

    Raises:
        GgmlAbiError: llama-cpp-python is not installed, or ships no ggml libraries there.
    """
    spec = importlib.util.find_spec("llama_cpp")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "lib"
        if library_file(candidate, "ggml-base") is not None:
            return candidate
    raise GgmlAbiError("llama-cpp-python's ggml libraries were not found",
                       hint=f"install it: pip install 'llama-cpp-python=={PINNED_LLAMA_CPP}'")


def _on_log(level: int, text: bytes | None, _user: Any) -> None:
    message = (text or b"").decode("utf-8", "replace")
    _log.append(level, message)
    if _state["verbose"]:
        sys.stderr.write(message)


@contextlib.contextmanager
def captured_log() -> Iterator[list[str]]:
    """ggml's log lines during the block, whoever's logger is installed (it is put back).

    llama_cpp installs its own logger when imported, and llmkit's llama.cpp engine another;
    a short capture around one call (gguf_init_from_file) gets ggml's reason either way.
    """
    f = lib().f
    lines: list[str] = []
    previous, user = ctypes.c_void_p(), ctypes.c_void_p()
    f.ggml_log_get(ctypes.byref(previous), ctypes.byref(user))
    callback = LOG_CALLBACK(lambda _level, text, _user: lines.append(
        (text or b"").decode("utf-8", "replace")))
    f.ggml_log_set(ctypes.cast(callback, ctypes.c_void_p), None)
    try:
        yield lines
    finally:
        f.ggml_log_set(previous, user)


def recent_log() -> list[str]:
    """The last lines ggml logged while this engine's callback was installed."""
    return _log.lines()


def set_verbose(verbose: bool) -> None:
    """Pass ggml's log through to stderr (``-v``) or keep it only for error messages."""
    _state["verbose"] = verbose


def lib() -> Lib:
    """The ggml libraries of the installed llama-cpp-python, declared and self-tested.

    Loaded once per process; a failed load or self-test is remembered, so nothing ever runs
    on a library that failed it.

    Returns:
        The loaded :class:`Lib`.

    Raises:
        GgmlAbiError: the libraries are missing, lack a symbol, or fail the ABI self-test.
    """
    loaded = _state["lib"]
    if loaded is not None:
        return loaded  # type: ignore[no-any-return]
    with _lock:
        if _state["error"] is not None:
            raise _state["error"]
        if _state["lib"] is None:
            try:
                candidate = _load()
                self_test(candidate)
            except GgmlAbiError as exc:
                _state["error"] = exc
                raise
            _install_log(candidate)
            # Before any weights are placed: the extra buffer types ggml's CPU may offer.
            hide_unsafe_buffer_types(candidate.directory)
            _state["lib"] = candidate
        return _state["lib"]  # type: ignore[no-any-return]


def _load() -> Lib:
    version = _package_version()
    directory = library_dir()
    handles: list[ctypes.CDLL] = []
    for stem in _LIBRARY_STEMS:
        path = library_file(directory, stem)
        if path is None:
            raise _abi_error(version, f"lib{stem} is missing from {directory}")
        try:
            handles.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))
        except OSError as exc:
            raise _abi_error(version, f"lib{stem} cannot be loaded: {exc}") from exc
    loaded = Lib(directory, handles, version)
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = None
        for handle in handles:
            try:
                fn = getattr(handle, name)
                break
            except AttributeError:
                continue
        if fn is None:
            raise _abi_error(version, f"it does not export {name}")
        fn.restype = restype
        fn.argtypes = argtypes
        setattr(loaded.f, name, fn)
    loaded.ggml_version = (loaded.f.ggml_version() or b"").decode("ascii", "replace")
    return loaded


def _install_log(loaded: Lib) -> None:
    # Route ggml's log to llmkit unless someone (llama_cpp's own callback, installed by the
    # llama.cpp engine) already did: llama_log_set sets this same ggml logger.
    current = ctypes.c_void_p()
    user = ctypes.c_void_p()
    loaded.f.ggml_log_get(ctypes.byref(current), ctypes.byref(user))
    default = ctypes.cast(loaded.handles[0].ggml_log_callback_default, ctypes.c_void_p).value \
        if hasattr(loaded.handles[0], "ggml_log_callback_default") else None
    if current.value is None or current.value == default:
        callback = LOG_CALLBACK(_on_log)
        _state["log"] = callback  # C keeps only the pointer: hold the object
        loaded.f.ggml_log_set(ctypes.cast(callback, ctypes.c_void_p), None)


# ---------------------------------------------------------------------------------------------
# The ABI self-test


def _check(ok: bool, version: str, detail: str) -> None:
    if not ok:
        raise _abi_error(version, detail)


def self_test(loaded: Lib) -> None:
    """Prove the declarations match the library: struct layout, types, one computed graph.

    Args:
        loaded: freshly loaded libraries (not yet handed to anyone).

    Raises:
        GgmlAbiError: any disagreement, named in the message.
    """
    f, version = loaded.f, loaded.package_version
    mirror = Tensor  # looked up at call time, so a test can put a wrong mirror in its place
    size = ctypes.sizeof(mirror)
    overhead = int(f.ggml_tensor_overhead())
    _check(overhead == GGML_OBJECT_SIZE + size, version,
           f"ggml_tensor_overhead() is {overhead}, the mirrored struct ggml_tensor implies "
           f"{GGML_OBJECT_SIZE + size}")
    for gtype, block, type_size, name in _TYPE_FACTS:
        got = (int(f.ggml_blck_size(gtype)), int(f.ggml_type_size(gtype)),
               (f.ggml_type_name(gtype) or b"").decode())
        _check(got == (block, type_size, name), version,
               f"type {int(gtype)} is {got}, expected {(block, type_size, name)}")

    ctx = f.ggml_init(InitParams(64 * overhead + (1 << 16), None, False))
    _check(bool(ctx), version, "ggml_init failed")
    try:
        _self_test_tensors(f, version, mirror, ctx)
        _self_test_compute(f, version, mirror)
    except GgmlAbiError:
        raise
    except Exception as exc:  # a mirror that cannot even be read is a mismatch too
        raise _abi_error(version, f"the self-test failed: {exc}") from exc
    finally:
        f.ggml_free(ctx)


def _self_test_tensors(f: Any, version: str, mirror: type[Tensor], ctx: int) -> None:
    a = f.ggml_new_tensor_2d(ctx, GgmlType.F32, 3, 2)
    q = f.ggml_new_tensor_3d(ctx, GgmlType.Q8_0, 64, 3, 2)
    _check(bool(a) and bool(q), version, "ggml_new_tensor failed")
    ma, mq = mirror.from_address(a), mirror.from_address(q)
    _check(ma.type == GgmlType.F32 and mq.type == GgmlType.Q8_0, version,
           f"struct ggml_tensor.type reads {ma.type}/{mq.type}")
    _check(tuple(ma.ne) == (3, 2, 1, 1) and tuple(mq.ne) == (64, 3, 2, 1), version,
           f"struct ggml_tensor.ne reads {tuple(ma.ne)}")
    _check(tuple(ma.nb) == (4, 12, 24, 24) and tuple(mq.nb) == (34, 68, 204, 408), version,
           f"struct ggml_tensor.nb reads {tuple(ma.nb)} / {tuple(mq.nb)}")
    _check(int(f.ggml_nelements(q)) == 384 and int(f.ggml_nbytes(q)) == 408, version,
           "ggml_nelements/ggml_nbytes disagree with the shape")
    _check(ma.data is not None and ma.data == f.ggml_get_data(a), version,
           "struct ggml_tensor.data disagrees with ggml_get_data()")
    _check(ma.buffer is None and ma.view_src is None and ma.extra is None, version,
           "struct ggml_tensor.buffer/view_src/extra are not NULL on a plain tensor")
    # The longest name ggml keeps (GGML_MAX_NAME - 1 bytes), so a shorter mirror shows.
    probe = (b"abi-probe-" * 7)[: GGML_MAX_NAME - 1]
    f.ggml_set_name(a, probe)
    _check(ma.name == probe, version, f"struct ggml_tensor.name reads {ma.name!r}")
    _check(f.ggml_get_name(a) == ctypes.addressof(ma) + mirror.name.offset, version,
           "ggml_get_name() does not point at struct ggml_tensor.name")
    f.ggml_set_input(a)
    _check(ma.flags & TENSOR_FLAG_INPUT == TENSOR_FLAG_INPUT, version,
           f"struct ggml_tensor.flags reads {ma.flags} after ggml_set_input")
    view = f.ggml_view_1d(ctx, a, 2, 8)
    mv = mirror.from_address(view)
    _check(mv.view_src == a and mv.view_offs == 8 and mv.src[0] == a
           and mv.data == ma.data + 8, version,
           "struct ggml_tensor.view_src/view_offs/src/data disagree on a view")
    _check(f.ggml_op_name(mv.op) == b"VIEW", version,
           f"struct ggml_tensor.op reads {mv.op} on a view")
    b = f.ggml_new_tensor_2d(ctx, GgmlType.F32, 3, 4)
    prod = mirror.from_address(f.ggml_mul_mat(ctx, a, b))
    _check(f.ggml_op_name(prod.op) == b"MUL_MAT" and prod.src[0] == a and prod.src[1] == b
           and tuple(prod.ne) == (2, 4, 1, 1), version,
           "struct ggml_tensor.op/src/ne disagree on ggml_mul_mat")
    scaled = mirror.from_address(f.ggml_scale(ctx, a, 0.5))
    first = struct.unpack("<f", struct.pack("<i", scaled.op_params[0]))[0]
    _check(first == 0.5, version, f"struct ggml_tensor.op_params reads {first} for a scale of 0.5")


def _self_test_compute(f: Any, version: str, mirror: type[Tensor]) -> None:
    overhead = int(f.ggml_tensor_overhead())
    ctx = f.ggml_init(InitParams(16 * overhead + int(f.ggml_graph_overhead_custom(16, False)),
                                 None, True))
    backend = f.ggml_backend_cpu_init()
    buf = None
    try:
        _check(bool(ctx) and bool(backend), version, "ggml_init/ggml_backend_cpu_init failed")
        a = f.ggml_new_tensor_2d(ctx, GgmlType.F32, 3, 2)  # numpy (2, 3)
        b = f.ggml_new_tensor_2d(ctx, GgmlType.F32, 3, 2)
        f.ggml_set_input(a)
        f.ggml_set_input(b)
        out = f.ggml_scale(ctx, f.ggml_add(ctx, f.ggml_mul_mat(ctx, a, b),
                                           f.ggml_new_tensor_2d(ctx, GgmlType.F32, 2, 2)), 2.0)
        bias = mirror.from_address(out).src[0]
        bias = mirror.from_address(bias).src[1]
        f.ggml_set_output(out)
        graph = f.ggml_new_graph_custom(ctx, 16, False)
        f.ggml_build_forward_expand(graph, out)
        # Allocate through a plain buffer: every leaf and node gets its own place.
        buft = f.ggml_backend_get_default_buffer_type(backend)
        buf = f.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)
        _check(bool(buf), version, "ggml_backend_alloc_ctx_tensors_from_buft failed")
        _check(mirror.from_address(a).buffer == buf, version,
               "struct ggml_tensor.buffer disagrees with the buffer that allocated it")
        av = (ctypes.c_float * 6)(1, 2, 3, 4, 5, 6)
        bv = (ctypes.c_float * 6)(1, 0, -1, 0.5, 0.25, 2)
        cv = (ctypes.c_float * 4)(0.5, -0.5, 1.5, -1.5)
        f.ggml_backend_tensor_set(a, av, 0, 24)
        f.ggml_backend_tensor_set(b, bv, 0, 24)
        f.ggml_backend_tensor_set(bias, cv, 0, 16)
        status = f.ggml_backend_graph_compute(backend, graph)
        _check(status == STATUS_SUCCESS, version, f"ggml_backend_graph_compute returned {status}")
        got = (ctypes.c_float * 4)()
        f.ggml_backend_tensor_get(out, got, 0, 16)
        # out[n][m] = 2 * (sum_k a[m][k] * b[n][k] + bias[n][m]): b @ a.T in numpy terms.
        rows_a = [(1, 2, 3), (4, 5, 6)]
        rows_b = [(1, 0, -1), (0.5, 0.25, 2)]
        expected = [2 * (sum(x * y for x, y in zip(ra, rb, strict=True)) + cv[n * 2 + m])
                    for n, rb in enumerate(rows_b) for m, ra in enumerate(rows_a)]
        _check(all(abs(g - e) < 1e-5 for g, e in zip(got, expected, strict=True)), version,
               f"a 2x3 matrix product computed {list(got)}, expected {expected}")
    finally:
        if buf:
            f.ggml_backend_buffer_free(buf)
        if backend:
            f.ggml_backend_free(backend)
        if ctx:
            f.ggml_free(ctx)


# ---------------------------------------------------------------------------------------------
# Graph building: tensors as T (a pointer with its shape), operations as Ctx methods

# numpy (dtype.kind, itemsize) → ggml type: cheaper to look up than the dtype's name.
_KIND_TYPES = {("f", 4): GgmlType.F32, ("f", 2): GgmlType.F16, ("i", 4): GgmlType.I32,
               ("i", 8): GgmlType.I64}
_TYPE_DTYPES = {GgmlType.F32: "float32", GgmlType.F16: "float16", GgmlType.I32: "int32",
                GgmlType.I64: "int64"}


def _fns() -> Any:
    loaded = _state["lib"]
    return (loaded if loaded is not None else lib()).f


class T:
    """A ggml tensor: its address, and its shape read once through the struct mirror.

    ``ne`` is ggml's order (``ne[0]`` is the innermost, fastest dimension); ``shape`` is the
    numpy order of the same tensor (``ne`` reversed, trailing ones of ``ne`` dropped).
    """

    __slots__ = ("_dense", "_ne", "_type", "ptr")

    def __init__(self, ptr: int | None) -> None:
        if not ptr:
            raise ValueError("ggml returned a NULL tensor (its context is full?)")
        self.ptr: int = ptr
        self._ne: tuple[int, int, int, int] | None = None
        # True when known to be packed in every dimension (a new tensor or an op's result);
        # None for views, whose strides are read when a check needs them.
        self._dense: bool | None = None
        self._type: int | None = None

    @property
    def struct(self) -> Tensor:
        """The tensor's struct, read in place through the mirror."""
        return Tensor.from_address(self.ptr)

    @property
    def ne(self) -> tuple[int, int, int, int]:
        """Elements per dimension, innermost first (a tensor's shape never changes)."""
        if self._ne is None:
            n = Tensor.from_address(self.ptr).ne
            self._ne = (n[0], n[1], n[2], n[3])
        return self._ne

    @property
    def nb(self) -> tuple[int, int, int, int]:
        """Strides in bytes per dimension, innermost first."""
        n = Tensor.from_address(self.ptr).nb
        return (n[0], n[1], n[2], n[3])

    @property
    def type(self) -> int:
        """The ``enum ggml_type`` value (a :class:`GgmlType` for the common ones)."""
        if self._type is None:
            self._type = int(Tensor.from_address(self.ptr).type)
        return self._type

    @property
    def name(self) -> str:
        """The tensor's name ('' when unnamed)."""
        return bytes(Tensor.from_address(self.ptr).name).split(b"\0", 1)[0].decode("utf-8",
                                                                                    "replace")

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order: ``ne`` reversed after dropping its trailing ones (at least one dim)."""
        ne = list(self.ne)
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        return tuple(reversed(ne))

    def nbytes(self) -> int:
        """Bytes the tensor's data spans (ggml_nbytes)."""
        return int(_fns().ggml_nbytes(self.ptr))

    def nelements(self) -> int:
        """Number of elements."""
        return self.ne[0] * self.ne[1] * self.ne[2] * self.ne[3]

    def is_contiguous(self) -> bool:
        """Whether the elements lie densely in row-major order (no gaps, no permutation)."""
        return bool(self._dense) or bool(_fns().ggml_is_contiguous(self.ptr))

    def set_name(self, name: str) -> T:
        """Name the tensor (ggml keeps at most 63 bytes); returns the tensor."""
        _fns().ggml_set_name(self.ptr, name.encode("utf-8")[: GGML_MAX_NAME - 1])
        return self

    def __repr__(self) -> str:
        return f"T({self.name!r}, type={self.type}, ne={self.ne})"


def _can_repeat(small: tuple[int, ...], big: tuple[int, ...]) -> bool:
    return all(s != 0 and b % s == 0 for s, b in zip(small, big, strict=True))


_type_sizes: dict[int, int] = {}
_FLOAT_TYPES = frozenset({GgmlType.F32, GgmlType.F16, GgmlType.BF16})


def _dense_rows(t: T) -> bool:
    """Whether ``ne[0]`` is packed (``nb[0]`` is the element size): not a transposed view.

    The CPU kernels of add/mul, rms_norm, mul_mat's second operand and the unary ops assert
    it (ggml-cpu binary-ops.cpp, ops.cpp), and an assert aborts the process.
    """
    if t._dense:
        return True
    s = Tensor.from_address(t.ptr)
    size = _type_sizes.get(s.type)
    if size is None:
        size = _type_sizes[s.type] = int(_fns().ggml_type_size(s.type))
    return bool(s.nb[0] == size)


def _padded_1d(t: T) -> bool:
    # ggml.c's ggml_is_padded_1d, which ggml_scale asserts: rows packed, dims 1..3 packed.
    if t._dense:
        return True
    s = Tensor.from_address(t.ptr)
    return _dense_rows(t) and s.nb[2] == s.nb[1] * s.ne[1] and s.nb[3] == s.nb[2] * s.ne[2]


def _f32(t: T, what: str) -> None:
    if t.type != GgmlType.F32:
        raise ValueError(f"{what}: {t!r} must be F32 (cast() it first)")


def _need(ok: bool, what: str, t: T) -> None:
    if not ok:
        raise ValueError(f"{what}: {t!r} is not laid out as ggml needs here (cont() it first)")


class Ctx:
    """A ggml context holding only tensor metadata (no_alloc), plus the graph built in it.

    Data lives in backend buffers: weights in theirs, persistent state in its own, and the
    tensors made here in the compute buffer a runner allocates for the graph. Arrays given to
    :meth:`input` are copied into their tensors after that allocation.
    """

    def __init__(self, max_tensors: int = 16384, graph: bool = True,
                 max_leaves: int = 8192) -> None:
        """Args:
            max_tensors: most tensors made here (inputs, and one per op or view).
            graph: whether to make a graph (weights and state need none).
            max_leaves: most tensors from elsewhere (weights, state) the graph may read.

        ggml aborts the process when a context or a graph overflows, so both are sized
        here to hold everything the counts allow, and :meth:`_t` refuses a tensor past them.
        """
        self._f = _fns()
        f = self._f
        self.max_tensors = max_tensors
        # Every node is a tensor made here; a leaf is one made here or one from elsewhere.
        self.graph_size = max_tensors + max_leaves if graph else 0
        mem = (max_tensors + 2) * int(f.ggml_tensor_overhead()) + 4096
        if graph:
            mem += int(f.ggml_graph_overhead_custom(self.graph_size, False))
        self.ptr: int = f.ggml_init(InitParams(mem, None, True))
        if not self.ptr:
            raise MemoryError(f"ggml_init could not reserve {mem} bytes of tensor metadata")
        self.made = 0
        self.graph: int | None = f.ggml_new_graph_custom(self.ptr, self.graph_size, False) \
            if graph else None
        self.inputs: list[tuple[T, Any]] = []

    def _t(self, ptr: int | None, dense: bool | None = True) -> T:
        # Checked after the call: the context has room for two tensors past max_tensors.
        self.made += 1
        if self.made > self.max_tensors:
            raise ValueError(f"more than {self.max_tensors} tensors in one graph context "
                             "(raise max_tensors)")
        t = T(ptr)
        t._dense = dense
        return t

    def close(self) -> None:
        """Free the context (every tensor made in it becomes invalid)."""
        if self.ptr:
            self._f.ggml_free(self.ptr)
            self.ptr = 0
            self.graph = None
            self.inputs = []

    def __enter__(self) -> Ctx:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- tensors -------------------------------------------------------------------------------

    def new(self, gtype: int, *ne: int, name: str | None = None) -> T:
        """A new tensor of ``gtype`` with 1 to 4 dimensions ``ne`` (innermost first)."""
        f, c = self._f, self.ptr
        # Empty tensors are refused: several CPU kernels divide by a dimension (an abort).
        if not 1 <= len(ne) <= 4 or any(n < 1 for n in ne):
            raise ValueError(f"a tensor needs 1 to 4 dimensions of at least 1, not {ne}")
        block = int(f.ggml_blck_size(gtype))
        if ne[0] % block:
            raise ValueError(f"ne[0]={ne[0]} is not a multiple of type {gtype}'s block {block}")
        if len(ne) == 1:
            t = self._t(f.ggml_new_tensor_1d(c, gtype, ne[0]))
        elif len(ne) == 2:
            t = self._t(f.ggml_new_tensor_2d(c, gtype, ne[0], ne[1]))
        elif len(ne) == 3:
            t = self._t(f.ggml_new_tensor_3d(c, gtype, ne[0], ne[1], ne[2]))
        else:
            t = self._t(f.ggml_new_tensor_4d(c, gtype, ne[0], ne[1], ne[2], ne[3]))
        if name:
            t.set_name(name)
        return t

    def input(self, array: npt.NDArray[Any], name: str | None = None) -> T:
        """A graph input holding ``array`` (float32, float16, int32 or int64; up to 4 dims).

        The tensor's ``ne`` is the array's shape reversed; the data is copied in after the
        graph is allocated (the array is kept until then).
        """
        import numpy as np

        gtype = _KIND_TYPES.get((array.dtype.kind, array.dtype.itemsize))
        if gtype is None:
            raise ValueError("graph inputs are float32, float16, int32 or int64, "
                             f"not {array.dtype}")
        if not 1 <= array.ndim <= 4:
            raise ValueError(f"graph inputs have 1 to 4 dimensions, not {array.ndim}")
        data = np.ascontiguousarray(array)
        t = self.new(gtype, *reversed(data.shape), name=name)
        self._mark_input(t)
        self.inputs.append((t, data))
        return t

    def _mark_input(self, t: T) -> None:
        # Also an output: ggml's allocator reuses an input's memory once its last reader has
        # run, which would leave a graph computed again with stale inputs (ggml-alloc.c frees
        # everything but outputs).
        self._f.ggml_set_input(t.ptr)
        self._f.ggml_set_output(t.ptr)

    def input_bytes(self, gtype: int, ne: Sequence[int], data: npt.NDArray[Any],
                    name: str | None = None) -> T:
        """A graph input of any type (quantized too) filled with the raw bytes ``data``.

        Raises:
            ValueError: ``data`` is not exactly the tensor's size in bytes.
        """
        import numpy as np

        raw = np.ascontiguousarray(data).view(np.uint8)
        t = self.new(gtype, *ne, name=name)
        if raw.nbytes != t.nbytes():
            raise ValueError(f"{raw.nbytes} bytes for a {t.nbytes()}-byte tensor {t.ne}")
        self._mark_input(t)
        self.inputs.append((t, raw))
        return t

    def expand(self, t: T) -> T:
        """Add ``t`` and everything it depends on to the graph now (after what is there)."""
        if self.graph is None:
            raise ValueError("this context was made without a graph")
        self._f.ggml_build_forward_expand(self.graph, t.ptr)
        return t

    def n_nodes(self) -> int:
        """Nodes in the graph so far."""
        return int(self._f.ggml_graph_n_nodes(self.graph)) if self.graph else 0

    # -- element-wise ----------------------------------------------------------------------------

    def _writable(self, dst: T, what: str) -> None:
        # Weights lie in a read-only memory map of the model file: a write would be SIGSEGV.
        s = Tensor.from_address(dst.ptr)
        while s.view_src:
            s = Tensor.from_address(s.view_src)
        if s.buffer and self._f.ggml_backend_buffer_get_usage(s.buffer) == BUFFER_USAGE_WEIGHTS:
            raise ValueError(f"{what}: {dst!r} is (a view of) a model weight, never written")

    def _broadcast(self, fn: Any, a: T, b: T, what: str) -> T:
        if not _can_repeat(b.ne, a.ne):
            raise ValueError(f"{what}: {b.ne} does not broadcast onto {a.ne}")
        # ggml-cpu binary-ops.cpp takes src1 of src0's type, or F32 beside an F16/BF16 src0;
        # any other pair aborts ("binary_op: unsupported types").
        if a.type not in _FLOAT_TYPES or (b.type != a.type and b.type != GgmlType.F32):
            raise ValueError(f"{what}: types {a.type} and {b.type} do not combine")
        _need(_dense_rows(a), what, a)
        _need(_dense_rows(b), what, b)
        return self._t(fn(self.ptr, a.ptr, b.ptr))

    def add(self, a: T, b: T) -> T:
        """a + b, ``b`` broadcast over ``a`` (each ``a.ne[i]`` a multiple of ``b.ne[i]``)."""
        return self._broadcast(self._f.ggml_add, a, b, "add")

    def sub(self, a: T, b: T) -> T:
        """a - b, ``b`` broadcast over ``a``."""
        return self._broadcast(self._f.ggml_sub, a, b, "sub")

    def mul(self, a: T, b: T) -> T:
        """a * b element-wise, ``b`` broadcast over ``a``."""
        return self._broadcast(self._f.ggml_mul, a, b, "mul")

    def div(self, a: T, b: T) -> T:
        """a / b element-wise, ``b`` broadcast over ``a``."""
        return self._broadcast(self._f.ggml_div, a, b, "div")

    def scale(self, a: T, s: float) -> T:
        """a * s (``a`` packed in every dimension but the last: cont() a permuted view)."""
        _need(_padded_1d(a), "scale", a)
        return self._t(self._f.ggml_scale(self.ptr, a.ptr, s))

    def _unary(self, fn: Any, a: T, what: str) -> T:
        _need(_dense_rows(a), what, a)
        return self._t(fn(self.ptr, a.ptr))

    def gelu_erf(self, a: T) -> T:
        """Exact GELU, x·Φ(x) with erf (as torch's nn.GELU() default)."""
        return self._unary(self._f.ggml_gelu_erf, a, "gelu_erf")

    def gelu(self, a: T) -> T:
        """GELU, ggml's tanh approximation."""
        return self._unary(self._f.ggml_gelu, a, "gelu")

    def silu(self, a: T) -> T:
        """x·sigmoid(x)."""
        return self._unary(self._f.ggml_silu, a, "silu")

    def tanh(self, a: T) -> T:
        """tanh(x)."""
        return self._unary(self._f.ggml_tanh, a, "tanh")

    def sigmoid(self, a: T) -> T:
        """1 / (1 + e^-x)."""
        return self._unary(self._f.ggml_sigmoid, a, "sigmoid")

    def exp(self, a: T) -> T:
        """e^x."""
        return self._unary(self._f.ggml_exp, a, "exp")

    def sqr(self, a: T) -> T:
        """x²."""
        return self._unary(self._f.ggml_sqr, a, "sqr")

    def sqrt(self, a: T) -> T:
        """√x."""
        return self._unary(self._f.ggml_sqrt, a, "sqrt")

    def clamp(self, a: T, lo: float, hi: float) -> T:
        """x held within [lo, hi]."""
        return self._t(self._f.ggml_clamp(self.ptr, a.ptr, lo, hi))

    def swiglu(self, gate: T, up: T) -> T:
        """silu(gate) * up (Llama's MLP), one fused op."""
        if gate.ne != up.ne:
            raise ValueError(f"swiglu: gate {gate.ne} and up {up.ne} differ")
        _need(bool(self._f.ggml_is_contiguous_1(gate.ptr)), "swiglu", gate)
        _need(bool(self._f.ggml_is_contiguous_1(up.ptr)), "swiglu", up)
        return self._t(self._f.ggml_swiglu_split(self.ptr, gate.ptr, up.ptr))

    # -- reductions and norms --------------------------------------------------------------------

    def norm(self, a: T, eps: float) -> T:
        """(x - mean) / sqrt(var + eps) over ``ne[0]`` (LayerNorm without weight and bias)."""
        _need(_dense_rows(a), "norm", a)
        _f32(a, "norm")
        return self._t(self._f.ggml_norm(self.ptr, a.ptr, eps))

    def rms_norm(self, a: T, eps: float, weight: T | None = None) -> T:
        """x / sqrt(mean(x²) + eps) over ``ne[0]``, times ``weight`` when given (RMSNorm)."""
        _need(_dense_rows(a), "rms_norm", a)
        _f32(a, "rms_norm")
        t = self._t(self._f.ggml_rms_norm(self.ptr, a.ptr, eps))
        return self.mul(t, weight) if weight is not None else t

    def layer_norm(self, a: T, weight: T, bias: T | None, eps: float) -> T:
        """LayerNorm over ``ne[0]``: norm(x)·weight + bias (torch.nn.LayerNorm)."""
        t = self.mul(self.norm(a, eps), weight)
        return self.add(t, bias) if bias is not None else t

    def linear(self, x: T, weight: T, bias: T | None = None) -> T:
        """x·weightᵀ + bias (torch.nn.Linear): weight ne [in, out] (HF [out, in]), x ne [in, …]."""
        t = self.mul_mat(weight, x)
        return self.add(t, bias) if bias is not None else t

    def sum_rows(self, a: T) -> T:
        """Sum over ``ne[0]`` (result ne[0] = 1)."""
        return self._t(self._f.ggml_sum_rows(self.ptr, a.ptr))

    def mean(self, a: T) -> T:
        """Mean over ``ne[0]`` (result ne[0] = 1)."""
        return self._t(self._f.ggml_mean(self.ptr, a.ptr))

    def argmax(self, a: T) -> T:
        """Index of the largest value of each row (I32, one per row of a matrix)."""
        return self._t(self._f.ggml_argmax(self.ptr, a.ptr))

    # -- products, lookups -----------------------------------------------------------------------

    def mul_mat(self, a: T, b: T, prec_f32: bool = False) -> T:
        """Matrix product: ``a`` ne [K, M, …], ``b`` ne [K, N, …] → ne [M, N, …] (= b @ a.T).

        ``a`` may be quantized (the weight); ``b`` is broadcast over ``a``'s dims 2 and 3.
        ``prec_f32`` asks backends that would accumulate in F16 (CUDA) for F32.
        """
        an, bn = a.ne, b.ne
        if an[0] != bn[0] or bn[2] % an[2] or bn[3] % an[3]:
            raise ValueError(f"mul_mat: a {an} and b {bn} do not multiply")
        _need(_dense_rows(a), "mul_mat", a)
        _need(_dense_rows(b), "mul_mat", b)
        # F16 activations only meet F16 weights; anything else has no CPU kernel and the
        # scheduler aborts ("cur_backend_id != -1").
        if b.type != GgmlType.F32 and not (b.type == a.type == GgmlType.F16):
            raise ValueError(f"mul_mat: a {a.type} with b {b.type} (b must be F32)")
        t = self._t(self._f.ggml_mul_mat(self.ptr, a.ptr, b.ptr))
        if prec_f32:
            self._f32_accumulation(t)
        return t

    def _f32_accumulation(self, t: T) -> None:
        # ggml_prec_set_acc replaces the deprecated ggml_mul_mat_set_prec and
        # ggml_flash_attn_ext_set_prec (ggml.h, TAG_GGML_PREC); false means the op takes none.
        if not self._f.ggml_prec_set_acc(t.ptr, PREC_F32):
            raise ValueError(f"ggml refused F32 accumulation for {t!r}")

    def get_rows(self, a: T, rows: T) -> T:
        """Rows ``rows`` (I32) of ``a`` (ne [E, R, …]) → ne [E, len(rows), …] in F32."""
        if rows.type != GgmlType.I32 or a.ne[2] != rows.ne[1] or rows.ne[3] != 1:
            raise ValueError(f"get_rows: indices {rows.ne} type {rows.type} do not fit {a.ne}")
        return self._t(self._f.ggml_get_rows(self.ptr, a.ptr, rows.ptr))

    def set_rows(self, dst: T, src: T, rows: T) -> T:
        """Write the rows of ``src`` into rows ``rows`` (I64 or I32) of ``dst``; a view of dst.

        dst ne [E, R, a, b], src ne [E, n, a, b], rows ne [n, …]. The result must be expanded
        into the graph (``Ctx.expand``) for the write to happen.
        """
        dn, sn, rn = dst.ne, src.ne, rows.ne
        if (dn[0] != sn[0] or dn[2] != sn[2] or dn[3] != sn[3] or rn[0] != sn[1]
                or rows.type not in (GgmlType.I32, GgmlType.I64)
                or dn[2] % rn[1] or dn[3] % rn[2]):
            raise ValueError(f"set_rows: dst {dn}, src {sn}, rows {rn} do not fit")
        self._writable(dst, "set_rows")
        return self._t(self._f.ggml_set_rows(self.ptr, dst.ptr, src.ptr, rows.ptr), None)

    # -- positions and attention -----------------------------------------------------------------

    def rope_ext(self, a: T, positions: T, freq_factors: T | None, n_dims: int, mode: int,
                 freq_base: float, *, n_ctx_orig: int = 0, freq_scale: float = 1.0,
                 ext_factor: float = 0.0, attn_factor: float = 1.0, beta_fast: float = 32.0,
                 beta_slow: float = 1.0) -> T:
        """Rotary embedding of ``a`` (ne [head_dim, heads, tokens, 1]) at ``positions`` (I32).

        theta_i = pos · freq_base^(-2i/n_dims) / freq_factors[i]; ``mode`` ROPE_TYPE_NEOX
        rotates the two halves (Hugging Face's rotate_half). The YaRN defaults disable YaRN.
        """
        if positions.type != GgmlType.I32 or positions.ne[0] != a.ne[2]:
            raise ValueError(f"rope_ext: positions {positions.ne} do not fit {a.ne}")
        if n_dims > a.ne[0] or n_dims % 2:
            raise ValueError(f"rope_ext: n_dims {n_dims} does not fit head size {a.ne[0]}")
        if freq_factors is not None and (freq_factors.type != GgmlType.F32
                                         or freq_factors.ne[0] < n_dims // 2):
            raise ValueError(f"rope_ext: freq factors {freq_factors.ne} fit no {n_dims} dims")
        return self._t(self._f.ggml_rope_ext(
            self.ptr, a.ptr, positions.ptr, freq_factors.ptr if freq_factors else None, n_dims,
            mode, n_ctx_orig, freq_base, freq_scale, ext_factor, attn_factor, beta_fast,
            beta_slow))

    def soft_max_ext(self, a: T, mask: T | None, scale: float, max_bias: float = 0.0) -> T:
        """softmax(a·scale + mask) over ``ne[0]``; mask (F16/F32) ne [n_kv, ≥rows, h', b'].

        A row masked everywhere (-inf) comes out NaN (flash_attn_ext gives it zeros), and NaN
        survives a multiplication by zero: keep such rows out, or use flash_attn_ext.
        """
        if mask is not None:
            an, mn = a.ne, mask.ne
            if (mn[0] != an[0] or mn[1] < an[1] or an[2] % mn[2] or an[3] % mn[3]
                    or mask.type not in (GgmlType.F16, GgmlType.F32)):
                raise ValueError(f"soft_max_ext: mask {mn} does not fit {an}")
        _need(a.is_contiguous(), "soft_max_ext", a)
        _f32(a, "soft_max_ext")
        return self._t(self._f.ggml_soft_max_ext(self.ptr, a.ptr, mask.ptr if mask else None, scale,
                                           max_bias))

    def flash_attn_ext(self, q: T, k: T, v: T, mask: T | None, scale: float,
                       max_bias: float = 0.0, logit_softcap: float = 0.0,
                       prec_f32: bool = True) -> T:
        """softmax(q·kᵀ·scale + mask)·v in one fused op.

        q ne [D, n_q, H, B]; k ne [D, n_kv, H_kv, B]; v ne [Dv, n_kv, H_kv, B] (not
        transposed); mask F16 ne [n_kv, ≥n_q, 1|H, 1|B]. H must be a multiple of H_kv (GQA).
        Returns ne [Dv, H, n_q, B]: heads and queries swapped. ``prec_f32`` asks for F32
        accumulation (backends otherwise may use F16).
        """
        qn, kn, vn = q.ne, k.ne, v.ne
        if (qn[0] != kn[0] or kn[1] != vn[1] or kn[2] != vn[2] or qn[2] % kn[2]
                or qn[3] % kn[3]):
            raise ValueError(f"flash_attn_ext: q {qn}, k {kn}, v {vn} do not fit")
        if mask is not None:
            mn = mask.ne
            # ggml_flash_attn_ext asserts an F16 mask (ggml.c): anything else would abort.
            if (mask.type != GgmlType.F16 or mn[0] != kn[1] or mn[1] < qn[1]
                    or qn[2] % mn[2] or qn[3] % mn[3]):
                raise ValueError(f"flash_attn_ext: mask {mn} type {mask.type} does not fit")
        t = self._t(self._f.ggml_flash_attn_ext(self.ptr, q.ptr, k.ptr, v.ptr,
                                          mask.ptr if mask else None, scale, max_bias,
                                          logit_softcap))
        if prec_f32:
            self._f32_accumulation(t)
        return t

    # -- shapes ----------------------------------------------------------------------------------

    def concat(self, a: T, b: T, dim: int) -> T:
        """a and b joined along ``dim`` (ggml order); other dims and types must agree."""
        an, bn = a.ne, b.ne
        if not 0 <= dim < 4 or a.type != b.type or any(
                an[i] != bn[i] for i in range(4) if i != dim):
            raise ValueError(f"concat: {an} and {bn} do not join along dim {dim}")
        return self._t(self._f.ggml_concat(self.ptr, a.ptr, b.ptr, dim))

    def pad(self, a: T, p0: int = 0, p1: int = 0, p2: int = 0, p3: int = 0) -> T:
        """Zeros appended at the end of each dimension."""
        return self._t(self._f.ggml_pad(self.ptr, a.ptr, p0, p1, p2, p3))

    def pad_ext(self, a: T, lp0: int = 0, rp0: int = 0, lp1: int = 0, rp1: int = 0,
                lp2: int = 0, rp2: int = 0, lp3: int = 0, rp3: int = 0) -> T:
        """Zeros before (lp) and after (rp) each dimension."""
        return self._t(self._f.ggml_pad_ext(self.ptr, a.ptr, lp0, rp0, lp1, rp1, lp2, rp2, lp3,
                                            rp3))

    def view(self, a: T, ne: Sequence[int], nb: Sequence[int] = (), offset: int = 0) -> T:
        """A view of ``a``: ``ne`` (1-4 dims), strides ``nb[1:]`` in bytes, ``offset`` bytes in.

        ``nb`` gives the strides of dims 1.. (``nb[0]`` is the element size and not passed);
        by default the view is dense. The view must stay inside ``a``'s bytes.
        """
        f, c = self._f, self.ptr
        dims = len(ne)
        if not 1 <= dims <= 4 or offset < 0:
            raise ValueError(f"view: {ne} at offset {offset}")
        row = int(f.ggml_row_size(a.type, ne[0]))
        strides = list(nb)
        if not nb:
            dense = row
            for n in ne[1:]:
                strides.append(dense)
                dense *= n
        if len(strides) != dims - 1:
            raise ValueError(f"view: {dims} dims need {dims - 1} strides, not {len(strides)}")
        extent = offset + row + sum((n - 1) * s for n, s in zip(ne[1:], strides, strict=True))
        if any(n <= 0 for n in ne) or extent > a.nbytes():
            raise ValueError(f"view: {tuple(ne)} with strides {strides} at offset {offset} "
                             f"reaches byte {extent} of a {a.nbytes()}-byte tensor")
        if dims == 1:
            return self._t(f.ggml_view_1d(c, a.ptr, ne[0], offset), None)
        if dims == 2:
            return self._t(f.ggml_view_2d(c, a.ptr, ne[0], ne[1], strides[0], offset), None)
        if dims == 3:
            return self._t(f.ggml_view_3d(c, a.ptr, ne[0], ne[1], ne[2], strides[0], strides[1],
                                          offset), None)
        return self._t(f.ggml_view_4d(c, a.ptr, ne[0], ne[1], ne[2], ne[3], strides[0],
                                      strides[1], strides[2], offset), None)

    def reshape(self, a: T, *ne: int) -> T:
        """``a`` (contiguous) seen with dimensions ``ne`` (same element count)."""
        f, c = self._f, self.ptr
        count = 1
        for n in ne:
            count *= n
        if not 1 <= len(ne) <= 4 or count != a.nelements():
            raise ValueError(f"reshape: {a.ne} has {a.nelements()} elements, not {tuple(ne)}")
        if not a.is_contiguous():
            raise ValueError("reshape: the tensor is not contiguous (cont() it first)")
        if len(ne) == 1:
            return self._t(f.ggml_reshape_1d(c, a.ptr, ne[0]))
        if len(ne) == 2:
            return self._t(f.ggml_reshape_2d(c, a.ptr, ne[0], ne[1]))
        if len(ne) == 3:
            return self._t(f.ggml_reshape_3d(c, a.ptr, ne[0], ne[1], ne[2]))
        return self._t(f.ggml_reshape_4d(c, a.ptr, ne[0], ne[1], ne[2], ne[3]))

    def permute(self, a: T, ax0: int, ax1: int, ax2: int, ax3: int) -> T:
        """A view with dim i of ``a`` moved to position ``ax_i`` (ggml's convention)."""
        if sorted((ax0, ax1, ax2, ax3)) != [0, 1, 2, 3]:
            raise ValueError(f"permute: {(ax0, ax1, ax2, ax3)} is not a permutation of 0..3")
        return self._t(self._f.ggml_permute(self.ptr, a.ptr, ax0, ax1, ax2, ax3), None)

    def transpose(self, a: T) -> T:
        """A view with dims 0 and 1 swapped."""
        return self._t(self._f.ggml_transpose(self.ptr, a.ptr), None)

    def cont(self, a: T, *ne: int) -> T:
        """A contiguous copy of ``a`` (then reshaped to ``ne`` when given)."""
        t = self._t(self._f.ggml_cont(self.ptr, a.ptr))
        return self.reshape(t, *ne) if ne else t

    def cpy(self, a: T, b: T) -> T:
        """Copy ``a`` into ``b`` (same element count; converts types); a view of ``b``.

        Expand the result into the graph for the copy to happen.
        """
        if a.nelements() != b.nelements():
            raise ValueError(f"cpy: {a.ne} into {b.ne}")
        self._writable(b, "cpy")
        return self._t(self._f.ggml_cpy(self.ptr, a.ptr, b.ptr), None)

    def cast(self, a: T, gtype: int) -> T:
        """``a`` converted to ``gtype``."""
        return self._t(self._f.ggml_cast(self.ptr, a.ptr, gtype))

    def repeat(self, a: T, like: T) -> T:
        """``a`` tiled to the shape of ``like``."""
        if not _can_repeat(a.ne, like.ne):
            raise ValueError(f"repeat: {a.ne} does not tile {like.ne}")
        return self._t(self._f.ggml_repeat(self.ptr, a.ptr, like.ptr))

    def dup(self, a: T) -> T:
        """A copy of ``a``."""
        return self._t(self._f.ggml_dup(self.ptr, a.ptr))


def numpy_dtype(gtype: int) -> str:
    """The numpy dtype name of a non-quantized ggml type (F32, F16, I32, I64).

    Raises:
        ValueError: a type numpy has no dtype for (quantized, BF16).
    """
    try:
        return _TYPE_DTYPES[GgmlType(gtype)]
    except (KeyError, ValueError):
        raise ValueError(f"ggml type {gtype} has no numpy dtype") from None


def quantize(gtype: int, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """Quantize a float32 matrix (rows × n_per_row) to ``gtype`` with ggml_quantize_chunk.

    Args:
        gtype: a ggml type (Q8_0, Q4_K, Q6_K, F16, …) that needs no importance matrix.
        rows: 2-D float32 array; its row length must be a multiple of the type's block size.

    Returns:
        The quantized bytes, shaped (rows, bytes per row).

    Raises:
        ValueError: a type that needs an importance matrix, or a row length it cannot take.
    """
    import numpy as np

    f = _fns()
    src = np.ascontiguousarray(rows, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError(f"quantize takes a matrix, not {src.ndim} dimensions")
    n_rows, n_per_row = src.shape
    if f.ggml_quantize_requires_imatrix(gtype):
        raise ValueError(f"ggml type {gtype} needs an importance matrix")
    if n_per_row % int(f.ggml_blck_size(gtype)):
        raise ValueError(f"a row of {n_per_row} does not split into type {gtype}'s blocks")
    row_bytes = int(f.ggml_row_size(gtype, n_per_row))
    out = np.empty((n_rows, row_bytes), dtype=np.uint8)
    written = int(f.ggml_quantize_chunk(gtype, src.ctypes.data, out.ctypes.data, 0, n_rows,
                                        n_per_row, None))
    if written != out.nbytes:
        raise ValueError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out
