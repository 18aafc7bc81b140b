"""ggml devices, GGUF weights bound zero-copy from a memory map, persistent state, graph compute."""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.engines.mllama._ggml import (
    ABORT_CALLBACK,
    BUFFER_USAGE_WEIGHTS,
    DEV_TYPE_ACCEL,
    DEV_TYPE_CPU,
    DEV_TYPE_GPU,
    DEV_TYPE_IGPU,
    EXTRA_BUFTS_FN,
    STATUS_ABORTED,
    STATUS_SUCCESS,
    Ctx,
    GgmlType,
    GgufInitParams,
    T,
    Tensor,
    captured_log,
    lib,
    numpy_dtype,
)
from llmkit.errors import DeviceError, InvalidModelFileError, LlmkitError
from llmkit.hardware import resolve_device

if TYPE_CHECKING:
    import numpy.typing as npt

_KINDS = {DEV_TYPE_CPU: "cpu", DEV_TYPE_GPU: "gpu", DEV_TYPE_IGPU: "igpu",
          DEV_TYPE_ACCEL: "accel"}

# Addresses of the weight tensors living in an extra (repacking) buffer, for every open
# Weights: the Runner refuses a graph that reads one through a view (_check_repacked_views).
_REPACKED_TENSORS: set[int] = set()


class ComputeError(LlmkitError):
    """ggml could not allocate or compute a graph."""


@dataclass(frozen=True)
class Device:
    """One device in ggml's backend registry."""

    index: int
    name: str
    description: str
    kind: str  # "cpu", "gpu", "igpu", "accel" (or "other")
    memory_free: int
    memory_total: int
    handle: int


def devices() -> list[Device]:
    """Every device ggml's registry knows (the CPU always; GPUs when the build has them).

    Returns:
        The devices in registry order.

    Raises:
        GgmlAbiError: the ggml library failed its self-test.
    """
    loaded = lib()
    f = loaded.f
    if not any(f.ggml_backend_dev_type(f.ggml_backend_dev_get(i)) == DEV_TYPE_CPU
               for i in range(f.ggml_backend_dev_count())):
        # A build with dynamically loaded backends (GGML_BACKEND_DL) registers none until
        # they are loaded from the library folder; llama-cpp-python's wheels link them in.
        f.ggml_backend_load_all_from_path(str(loaded.directory).encode())
    found = []
    for i in range(int(f.ggml_backend_dev_count())):
        dev = f.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        f.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(Device(
            i, (f.ggml_backend_dev_name(dev) or b"").decode("utf-8", "replace"),
            (f.ggml_backend_dev_description(dev) or b"").decode("utf-8", "replace"),
            _KINDS.get(int(f.ggml_backend_dev_type(dev)), "other"), int(free.value),
            int(total.value), int(dev)))
    return found


def gpu_devices() -> list[Device]:
    """The GPU devices (discrete first, then integrated) ggml can run graphs on."""
    found = devices()
    return [d for d in found if d.kind == "gpu"] + [d for d in found if d.kind == "igpu"]


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class Backend:
    """Where graphs run: the CPU, or one GPU with the CPU beside it for what the GPU lacks."""

    def __init__(self, device: str = "auto", threads: int | None = None,
                 gpu_layers: int | None = None) -> None:
        """Args:
            device: "auto" (a GPU when the build has one, else the CPU), "cpu" or "gpu".
            threads: CPU threads for graph compute (None: every core of this process).
            gpu_layers: how many layers to offload (None: all on a GPU), as ``--gpu-layers``.

        Raises:
            UsageError: an unknown device name, or layers asked with device cpu.
            DeviceError: a GPU asked of a build without a GPU backend, or a GPU that fails.
        """
        f = lib().f
        self._f = f
        gpus = gpu_devices()
        # The llama.cpp engine's own rules and messages for --device/--gpu-layers.
        choice = resolve_device(device, gpu_layers, bool(gpus))
        self.gpu_layers = choice.n_gpu_layers  # ALL_LAYERS (-1), 0, or a count
        self.label = choice.label  # "cpu", "gpu", "gpu (N layers)"
        self.cpu: int = f.ggml_backend_cpu_init()
        if not self.cpu:
            raise DeviceError("ggml could not start its CPU backend")
        self.gpu: int | None = None
        self.device: Device | None = None
        if choice.n_gpu_layers != 0:
            self.device = gpus[0]
            self.gpu = f.ggml_backend_dev_init(self.device.handle, None)
            if not self.gpu:
                f.ggml_backend_free(self.cpu)
                raise DeviceError(f"ggml could not start the GPU {self.device.description}",
                                  hint="use --device cpu")
        # ggml's CPU backend asks this between nodes, from the thread that called compute:
        # the one moment Python can run a SIGINT handler during a long graph.
        self.interrupted = False
        self._abort = ABORT_CALLBACK(lambda _data: self.interrupted)
        f.ggml_backend_cpu_set_abort_callback(self.cpu, ctypes.cast(self._abort,
                                                                    ctypes.c_void_p), None)
        self.kind = "gpu" if self.gpu else "cpu"
        self.primary: int = self.gpu or self.cpu
        self.name = (f.ggml_backend_name(self.primary) or b"").decode("utf-8", "replace")
        self.threads = 0
        self.set_threads(threads or _usable_cpus())

    def offloads_layer(self, layer: int, n_layers: int) -> bool:
        """Whether layer ``layer`` of ``n_layers`` lives on the GPU: the last ``gpu_layers``
        do, as llama.cpp offloads them (so the output end of the model is on the GPU)."""
        if not self.gpu:
            return False
        if self.gpu_layers < 0 or self.gpu_layers >= n_layers:
            return True
        return layer >= n_layers - self.gpu_layers

    def set_threads(self, n: int) -> None:
        """Use ``n`` CPU threads for the CPU's share of every later compute.

        Raises:
            ValueError: n below 1.
        """
        if n < 1:
            raise ValueError(f"threads must be 1 or more, not {n}")
        self._f.ggml_backend_cpu_set_n_threads(self.cpu, n)
        self.threads = n

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Let Ctrl-C stop a compute inside the block at the next node (CPU graphs).

        On the main thread SIGINT only sets a flag for ggml's abort callback while the block
        runs; afterwards KeyboardInterrupt is raised, as Python would have.

        Raises:
            KeyboardInterrupt: Ctrl-C was pressed during the block.
        """
        self.interrupted = False
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            yield
            return

        def on_sigint(_signum: int, _frame: object) -> None:
            self.interrupted = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.interrupted:
            self.interrupted = False
            raise KeyboardInterrupt

    def buffer_type(self) -> int:
        """The primary device's default buffer type (where its tensors live)."""
        return int(self._f.ggml_backend_get_default_buffer_type(self.primary))

    def close(self) -> None:
        """Free the backends (after every Runner, Weights and State made with them)."""
        if self.gpu:
            self._f.ggml_backend_free(self.gpu)
            self.gpu = None
        if self.cpu:
            self._f.ggml_backend_free(self.cpu)
            self.cpu = 0

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Reading and writing tensor data


def upload(t: T, array: npt.NDArray[Any]) -> None:
    """Copy ``array`` into ``t``'s (allocated, contiguous) data, any backend.

    Raises:
        ValueError: the array's dtype or size does not match the tensor.
    """
    import numpy as np

    data = np.ascontiguousarray(array)
    if str(data.dtype) != numpy_dtype(t.type) or data.size != t.nelements():
        raise ValueError(f"upload: {data.dtype} {data.shape} into {t!r}")
    if not t.is_contiguous():
        raise ValueError(f"upload: {t!r} is not contiguous")
    if not t.struct.buffer:
        raise ValueError(f"upload: {t!r} has no memory (not allocated, or not in the graph)")
    lib().f.ggml_backend_tensor_set(t.ptr, data.ctypes.data, 0, data.nbytes)


def download(t: T) -> npt.NDArray[Any]:
    """A numpy copy of ``t``'s data in numpy order (``t.shape``), from any backend.

    Raises:
        ValueError: a quantized or non-contiguous tensor (cont() it in the graph first).
    """
    import numpy as np

    if not t.is_contiguous():
        raise ValueError(f"download: {t!r} is not contiguous (cont() it first)")
    if not t.struct.buffer:
        raise ValueError(f"download: {t!r} has no memory (not allocated, or not in the graph)")
    out = np.empty(t.shape, dtype=numpy_dtype(t.type))
    lib().f.ggml_backend_tensor_get(t.ptr, out.ctypes.data, 0, out.nbytes)
    return out


# ---------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class Expected:
    """What the caller expects of one tensor: its numpy-order shape, and the types it takes."""

    shape: tuple[int, ...]
    types: frozenset[int] | None = None


def _ne_of(shape: Sequence[int]) -> tuple[int, int, int, int]:
    padded = [*reversed(shape), 1, 1, 1, 1]
    return (padded[0], padded[1], padded[2], padded[3])


class Weights:
    """Every tensor of a GGUF as a ggml tensor, its data bound where it lies in the file.

    On the CPU, tensors point into a read-only memory map of the file (no copy; the kernel
    pages data in as graphs touch it). Tensors that ``offload`` selects are copied once into
    a buffer of the backend's primary device (a GPU), then the map is only kept for the rest.

    With ``repack`` (a CPU backend), the matrices the CPU has faster kernels for in another
    layout (Q4_0, Q4_K, IQ4_NL… as ggml-cpu's repack.cpp chooses for this processor) are
    copied once into the CPU's extra buffer type, which rearranges them as they are set, and
    their pages of the map are released; llama.cpp does the same by default (``--repack``).
    """

    def __init__(self, path: str | os.PathLike[str], backend: Backend,
                 expected: Mapping[str, Expected | tuple[int, ...]] | None = None,
                 offload: Callable[[str], bool] | None = None, *,
                 repack: bool = True) -> None:
        """Args:
            path: the GGUF file.
            backend: where the graphs using these weights run.
            expected: name → shape (numpy order, as the Hugging Face checkpoint's) or
                :class:`Expected`; every name must exist with that shape (and type).
            offload: which tensors go to the primary device's own buffer (default: all of
                them on a GPU backend, none on the CPU).
            repack: on a CPU-only backend, give the matrices ggml's CPU has interleaved
                kernels for to its extra buffer type (:attr:`repacked` names them); False
                keeps every tensor in the map.

        Raises:
            InvalidModelFileError: not a readable GGUF, a tensor outside the file, a missing
                tensor or one of another shape or type than expected.
        """
        import numpy as np

        f = lib().f
        self._f = f
        self.path = str(path)
        self.tensors: dict[str, T] = {}
        self._ctxs: list[Ctx] = []
        self._buffers: list[int] = []
        self._map: Any = None
        self.repacked: dict[str, str] = {}  # name → extra buffer type ("CPU_REPACK")
        self.repacked_bytes = 0
        self._repacked_ptrs: list[int] = []
        try:
            self.file_size = Path(path).stat().st_size
        except OSError as exc:
            raise InvalidModelFileError(self.path, f"cannot be read ({exc.strerror})") from exc
        if offload is None:
            offload = (lambda _name: True) if backend.gpu else (lambda _name: False)
        self.offloaded_bytes = 0
        self.mapped_bytes = 0
        try:
            entries, data_offset = self._read_index(f)
            self._check(entries, data_offset, expected or {})
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r") \
                if self.file_size else None
            self._bind(entries, data_offset, backend, offload,
                       repack and backend.gpu is None)
            if not self.mapped_bytes:
                self._map = None  # everything was copied to the device: unmap the file
        except BaseException:
            self.close()
            raise

    def _read_index(self, f: Any) -> tuple[list[tuple[str, int, tuple[int, ...], int, int]],
                                           int]:
        with captured_log() as lines:
            gguf = f.gguf_init_from_file(self.path.encode(), GgufInitParams(True, None))
        if not gguf:
            # gguf.cpp logs why ("gguf_init_from_reader: invalid magic characters: …"); the
            # first line it logged names the cause, later ones only that reading failed.
            reasons = [line.split(": ", 1)[-1].strip() for line in lines]
            why = f" ({reasons[0]})" if reasons and reasons[0] else ""
            raise InvalidModelFileError(self.path, f"is not a GGUF file ggml can read{why}",
                                        hint="convert the model again with llmkit convert")
        try:
            data_offset = int(f.gguf_get_data_offset(gguf))
            entries = []
            for i in range(int(f.gguf_get_n_tensors(gguf))):
                name = (f.gguf_get_tensor_name(gguf, i) or b"").decode("utf-8", "replace")
                ne_ptr = f.gguf_get_tensor_ne(gguf, i)
                ne = tuple(int(ne_ptr[d]) for d in range(4))
                entries.append((name, int(f.gguf_get_tensor_type(gguf, i)), ne,
                                int(f.gguf_get_tensor_offset(gguf, i)),
                                int(f.gguf_get_tensor_size(gguf, i))))
            return entries, data_offset
        finally:
            f.gguf_free(gguf)

    def _check(self, entries: list[tuple[str, int, tuple[int, ...], int, int]],
               data_offset: int, expected: Mapping[str, Expected | tuple[int, ...]]) -> None:
        by_name = {e[0]: e for e in entries}
        for name, want in expected.items():
            spec = want if isinstance(want, Expected) else Expected(tuple(want))
            entry = by_name.get(name)
            if entry is None:
                raise InvalidModelFileError(self.path, f"has no tensor {name}",
                                            hint="convert the model again with llmkit convert")
            _, gtype, ne, _, _ = entry
            if ne != _ne_of(spec.shape):
                shape = tuple(reversed([n for n in ne]))
                while len(shape) > len(spec.shape) and shape[0] == 1:
                    shape = shape[1:]
                raise InvalidModelFileError(
                    self.path, f"tensor {name} has shape {list(shape)}, expected "
                    f"{list(spec.shape)}", hint="convert the model again with llmkit convert")
            if spec.types is not None and gtype not in spec.types:
                raise InvalidModelFileError(
                    self.path, f"tensor {name} has ggml type {_type_name(gtype)}, expected "
                    f"{' or '.join(_type_name(t) for t in sorted(spec.types))}",
                    hint="convert the model again with llmkit convert")
        for name, _, _, offset, size in entries:
            if data_offset + offset + size > self.file_size:
                raise InvalidModelFileError(
                    self.path, f"tensor {name} lies past the end of the file (truncated?)",
                    hint="download or convert the model again")

    def _bind(self, entries: list[tuple[str, int, tuple[int, ...], int, int]],
              data_offset: int, backend: Backend, offload: Callable[[str], bool],
              repack: bool) -> None:
        f = self._f
        copied = [e for e in entries if offload(e[0])]
        kept = [e for e in entries if not offload(e[0])]
        extra = _repack_plan(kept, backend) if repack else {}
        base = int(self._map.ctypes.data) if self._map is not None else 0
        # (tensors, where): "map" binds them in place, "device" copies them to the primary
        # device, an extra buffer type (an int) copies them there, which repacks them.
        groups: list[tuple[list[tuple[str, int, tuple[int, ...], int, int]], str | int]] = [
            ([e for e in kept if e[0] not in extra], "map"), (copied, "device")]
        for buft in dict.fromkeys(extra.values()):
            groups.append(([e for e in kept if extra.get(e[0]) == buft], buft))
        for group, where in groups:
            if not group:
                continue
            ctx = Ctx(max_tensors=len(group), graph=False)
            self._ctxs.append(ctx)
            made = []
            for name, gtype, ne, offset, size in group:
                t = ctx.new(gtype, *ne, name=name)
                if t.nbytes() != size:
                    raise InvalidModelFileError(self.path, f"tensor {name} has an odd size")
                self.tensors[name] = t
                made.append((t, data_offset + offset, size))
            if where == "device":
                buf = f.ggml_backend_alloc_ctx_tensors_from_buft(ctx.ptr, backend.buffer_type())
                if not buf:
                    raise DeviceError(f"{backend.name} has no room for the model's weights",
                                      hint="offload fewer layers (--gpu-layers) or use the CPU")
                self._buffers.append(buf)
                f.ggml_backend_buffer_set_usage(buf, BUFFER_USAGE_WEIGHTS)
                for t, start, size in made:
                    f.ggml_backend_tensor_set(t.ptr, base + start, 0, size)
                    self.offloaded_bytes += size
            elif where == "map":
                # One CPU buffer over the whole map; each tensor's data is its place in it.
                buf = f.ggml_backend_cpu_buffer_from_ptr(base, self.file_size)
                if not buf:
                    raise DeviceError("ggml could not wrap the model file's memory map")
                self._buffers.append(buf)
                f.ggml_backend_buffer_set_usage(buf, BUFFER_USAGE_WEIGHTS)
                for t, start, size in made:
                    status = f.ggml_backend_tensor_alloc(buf, t.ptr, base + start)
                    if status != STATUS_SUCCESS:
                        raise InvalidModelFileError(self.path, f"tensor {t.name} cannot be "
                                                    f"mapped (ggml status {status})")
                    self.mapped_bytes += size
            else:
                self._fill_extra(ctx, int(where), made, base)

    def _fill_extra(self, ctx: Ctx, buft: int, made: list[tuple[T, int, int]],
                    base: int) -> None:
        f = self._f
        buf = f.ggml_backend_alloc_ctx_tensors_from_buft(ctx.ptr, buft)
        if not buf:
            raise DeviceError("the CPU has no room for the model's repacked weights",
                              hint="free some memory, or use a smaller quantization")
        self._buffers.append(buf)
        f.ggml_backend_buffer_set_usage(buf, BUFFER_USAGE_WEIGHTS)
        label = (f.ggml_backend_buft_name(buft) or b"?").decode("utf-8", "replace")
        for t, start, size in made:
            # Allocation gave each tensor its repack traits (repack.cpp's init_tensor, from
            # the same choice the probe asked about); setting one without them would
            # dereference NULL, so a disagreement stops here instead.
            if not t.struct.extra:
                raise DeviceError(f"ggml's {label} buffer has no layout for tensor {t.name}",
                                  hint="this is a bug in llmkit; please report it")
            # repack.cpp's set_tensor rearranges the rows into interleaved blocks as it copies.
            f.ggml_backend_tensor_set(t.ptr, base + start, 0, size)
            _REPACKED_TENSORS.add(t.ptr)
            self._repacked_ptrs.append(t.ptr)
            self.repacked[t.name] = label
            self.repacked_bytes += size
            self._release(start, size)

    def _release(self, start: int, size: int) -> None:
        # The copy was read through the map, so its pages count in this process's RSS until
        # they are dropped from the mapping (a read-only shared map: nothing is lost, a later
        # touch pages them in again). Whole pages, so neighbours' edges may page in again.
        raw = getattr(self._map, "_mmap", None)
        advice = getattr(mmap, "MADV_DONTNEED", None)
        if raw is None or advice is None or not size:
            return
        page = mmap.PAGESIZE
        lo = start // page * page
        hi = min(-(-(start + size) // page) * page, self.file_size)
        with contextlib.suppress(OSError, ValueError):
            raw.madvise(advice, lo, hi - lo)

    def __getitem__(self, name: str) -> T:
        return self.tensors[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def close(self) -> None:
        """Free the tensors, their buffers and the map."""
        _REPACKED_TENSORS.difference_update(self._repacked_ptrs)
        self._repacked_ptrs = []
        for buf in self._buffers:
            self._f.ggml_backend_buffer_free(buf)
        self._buffers = []
        for ctx in self._ctxs:
            ctx.close()
        self._ctxs = []
        self.tensors = {}
        self._map = None

    def __enter__(self) -> Weights:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def extra_buffer_types(backend: Backend) -> list[int]:
    """The CPU device's extra buffer types (AMX, KleidiAI, CPU_REPACK… as this ggml was built
    with), in the order llama.cpp's make_cpu_buft_list (src/llama-model.cpp) tries them.

    Args:
        backend: whose CPU backend to ask.

    Returns:
        Buffer type handles; empty where the CPU backend offers none.
    """
    f = lib().f
    dev = f.ggml_backend_get_device(backend.cpu)
    reg = f.ggml_backend_dev_backend_reg(dev) if dev else None
    address = f.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts") \
        if reg else None
    if not address:
        return []
    listed = EXTRA_BUFTS_FN(address)(dev)
    found: list[int] = []
    while listed and listed[len(found)]:
        found.append(int(listed[len(found)]))
    return found


def _multiplied(name: str, ne: tuple[int, ...]) -> bool:
    # Only a matrix that graphs use as mul_mat's first operand may be repacked: the extra
    # buffer type runs nothing else on it (repack.cpp's supports_op), and its bytes are no
    # longer rows. The embedding tables (token_embd, the vision position/class/patch
    # embeddings) are read by get_rows, add or conv instead, as llama.cpp's tensor table
    # (src/llama-arch.cpp LLM_TENSOR_INFOS: token_embd GGML_OP_GET_ROWS) records.
    return ne[1] > 1 and ne[2] == ne[3] == 1 and "embd" not in name


def _repack_plan(entries: Sequence[tuple[str, int, tuple[int, ...], int, int]],
                 backend: Backend) -> dict[str, int]:
    """Which of ``entries`` go to which extra buffer type: the first whose mul_mat ggml's CPU
    device runs with that weight in it, as llama.cpp's weight_buft_supported
    (src/llama-model-loader.cpp) asks with a 512-row F32 probe product."""
    bufts = extra_buffer_types(backend)
    if not bufts:
        return {}
    f = lib().f
    dev = f.ggml_backend_get_device(backend.cpu)
    plan: dict[str, int] = {}
    with Ctx(max_tensors=3 * len(entries) + 1, graph=False) as ctx:
        for name, gtype, ne, _, _ in entries:
            if not _multiplied(name, ne):
                continue
            w = ctx.new(gtype, *ne)
            op = ctx.new(GgmlType.F32, ne[0], 512)
            product = f.ggml_mul_mat(ctx.ptr, w.ptr, op.ptr)
            if not product:
                continue
            mirror = Tensor.from_address(w.ptr)
            for buft in bufts:
                # A zero-size buffer of that type only tells supports_op where the weight
                # would lie; repack.cpp then asks its own choice of layout for this type and
                # shape (ggml_repack_get_optimal_repack_type), the one set_tensor would use.
                dummy = f.ggml_backend_buft_alloc_buffer(buft, 0)
                if not dummy:
                    continue
                mirror.buffer = dummy
                try:
                    supported = bool(f.ggml_backend_dev_supports_op(dev, product))
                finally:
                    mirror.buffer = None
                    f.ggml_backend_buffer_free(dummy)
                if supported:
                    plan[name] = buft
                    break
    return plan


def _type_name(gtype: int) -> str:
    try:
        return GgmlType(gtype).name
    except ValueError:
        return str(gtype)


# ---------------------------------------------------------------------------------------------
# Persistent state


class State:
    """Tensors that outlive graphs (KV caches, cross-attention K/V) in their own buffer.

    Graphs write into them (``Ctx.cpy`` into a view, ``Ctx.set_rows``) and read views of
    them; a runner's allocator never places or reuses them, so they survive every later graph.
    """

    def __init__(self, backend: Backend, specs: Mapping[str, tuple[int, Sequence[int]]],
                 on_primary: bool = True) -> None:
        """Args:
            backend: whose device holds the tensors.
            specs: name → (ggml type, ne in ggml order, innermost first).
            on_primary: on the backend's primary device (the GPU, if any); False keeps them
                in CPU memory (the caches of layers left on the CPU by ``gpu_layers``).

        Raises:
            DeviceError: the device has no room for them.
        """
        f = lib().f
        self._f = f
        self._ctx = Ctx(max_tensors=len(specs), graph=False)
        self.tensors: dict[str, T] = {}
        self._buffer = 0
        try:
            for name, (gtype, ne) in specs.items():
                self.tensors[name] = self._ctx.new(gtype, *ne, name=name)
            if specs:
                buft = backend.buffer_type() if on_primary else \
                    int(f.ggml_backend_cpu_buffer_type())
                self._buffer = f.ggml_backend_alloc_ctx_tensors_from_buft(self._ctx.ptr, buft)
                if not self._buffer:
                    raise DeviceError(f"{backend.name} has no room for the caches")
                f.ggml_backend_buffer_clear(self._buffer, 0)
        except BaseException:
            self.close()
            raise
        self.nbytes = int(f.ggml_backend_buffer_get_size(self._buffer)) if self._buffer else 0

    def __getitem__(self, name: str) -> T:
        return self.tensors[name]

    def write(self, name: str, array: npt.NDArray[Any]) -> None:
        """Fill the tensor ``name`` from ``array`` (same dtype and element count)."""
        upload(self.tensors[name], array)

    def read(self, name: str) -> npt.NDArray[Any]:
        """A numpy copy of the tensor ``name``."""
        return download(self.tensors[name])

    def clear(self) -> None:
        """Zero every tensor."""
        if self._buffer:
            self._f.ggml_backend_buffer_clear(self._buffer, 0)

    def close(self) -> None:
        """Free the buffer and the tensors."""
        if self._buffer:
            self._f.ggml_backend_buffer_free(self._buffer)
            self._buffer = 0
        self._ctx.close()
        self.tensors = {}

    def __enter__(self) -> State:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Compute


@dataclass
class Timings:
    """Where a graph's time went, in µs (build, alloc, upload: once, when it was prepared)."""

    build_us: float = 0.0
    alloc_us: float = 0.0
    upload_us: float = 0.0
    compute_us: float = 0.0
    download_us: float = 0.0
    n_nodes: int = 0


class Graph:
    """A built and allocated graph; compute it again after giving its inputs new data.

    Valid until its runner prepares another graph (which reuses the same compute buffers) or
    until :meth:`close`; a stale graph refuses to compute rather than read freed memory.
    """

    def __init__(self, runner: Runner, ctx: Ctx, outputs: list[T], generation: int,
                 timings: Timings, unused: dict[str, T]) -> None:
        self._runner = runner
        self._ctx = ctx
        self.outputs = outputs
        self._generation = generation
        self.timings = timings
        self._inputs = {t.name: t for t, _ in ctx.inputs if t.name}
        self._inputs.update(unused)

    @property
    def n_nodes(self) -> int:
        """Nodes in the graph."""
        return self.timings.n_nodes

    def _check_live(self) -> None:
        if not self._ctx.ptr or self._generation != self._runner.generation:
            raise ValueError("this graph's buffers were given to a later graph (prepare it again)")

    def set(self, name: str, array: npt.NDArray[Any]) -> None:
        """Give the input named ``name`` new data (same dtype and element count).

        Raises:
            KeyError: no input of that name.
            ValueError: another dtype or size, or a stale graph.
        """
        self._check_live()
        t = self._inputs[name]
        if t.struct.buffer:
            upload(t, array)

    def compute(self) -> list[npt.NDArray[Any]]:
        """Compute the graph and read its outputs back (numpy order, ``T.shape``).

        Raises:
            ComputeError: ggml failed to compute.
            KeyboardInterrupt: Ctrl-C stopped the compute (CPU graphs stop at the next node).
            ValueError: a stale graph.
        """
        self._check_live()
        f = self._runner._f
        t1 = time.perf_counter()
        with self._runner.backend.interruptible():
            status = f.ggml_backend_sched_graph_compute(self._runner.sched, self._ctx.graph)
        if status == STATUS_ABORTED:
            # Ctrl-C arrived after the last node; interruptible() raised for the rest.
            raise KeyboardInterrupt
        if status != STATUS_SUCCESS:
            raise ComputeError(f"ggml failed to compute a graph (status {status})")
        t2 = time.perf_counter()
        results = [download(t) for t in self.outputs]
        t3 = time.perf_counter()
        self.timings.compute_us = (t2 - t1) * 1e6
        self.timings.download_us = (t3 - t2) * 1e6
        return results

    def close(self) -> None:
        """Free the graph's metadata (its tensors become invalid)."""
        self._ctx.close()
        self._inputs = {}

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Runner:
    """Builds, allocates and computes graphs on one backend, reusing its compute buffers.

    Each graph gets a fresh metadata context and the caller's build function; ggml's
    scheduler allocates it in buffers it keeps from graph to graph, so the tensors of an
    earlier graph are invalid once a later one is prepared: data that must outlive a graph
    belongs in a :class:`State` (caches) and is written there by the graph.
    """

    def __init__(self, backend: Backend, max_tensors: int = 16384,
                 max_leaves: int = 8192, check_ops: bool = True) -> None:
        """Args:
            backend: where to compute.
            max_tensors: most tensors one build may make (inputs, op results, views).
            max_leaves: most weights and state tensors one graph may read.
            check_ops: before allocating, ask the backends whether they run every node
                (~0.5 µs a node), since the scheduler aborts on one that none runs.

        Raises:
            ComputeError: ggml could not create its scheduler.
        """
        f = lib().f
        self._f = f
        self.backend = backend
        self.max_tensors = max_tensors
        self.max_leaves = max_leaves
        self.check_ops = check_ops
        # The scheduler takes the backends by priority, the CPU last (ggml requires it there);
        # its graph size bounds nodes plus leaves plus the copies it adds between backends.
        chain = [b for b in (backend.gpu, backend.cpu) if b]
        self._backends = (ctypes.c_void_p * len(chain))(*chain)
        self.sched: int = f.ggml_backend_sched_new(
            self._backends, None, len(chain), 2 * (max_tensors + max_leaves), False, True)
        if not self.sched:
            raise ComputeError("ggml could not create a graph scheduler")
        self.generation = 0
        self.timings = Timings()

    def prepare(self, build: Callable[[Ctx], Sequence[T]]) -> Graph:
        """Build a graph with ``build`` and allocate it (invalidating the previous graph).

        Args:
            build: called with a fresh :class:`Ctx`; makes inputs with ``ctx.input(array,
                name=…)``, expands side effects (cache writes) with ``ctx.expand`` in the
                order they must happen, and returns the tensors to read back (each
                contiguous, F32/F16/I32/I64).

        Returns:
            The allocated :class:`Graph`, its inputs already holding the build's arrays.

        Raises:
            ComputeError: the graph could not be allocated.
        """
        f = self._f
        timings = Timings()
        t0 = time.perf_counter()
        ctx = Ctx(self.max_tensors, True, self.max_leaves)
        try:
            outputs = list(build(ctx))
            for t in outputs:
                f.ggml_set_output(t.ptr)
                ctx.expand(t)
            timings.n_nodes = ctx.n_nodes()
            if self.check_ops:
                self._check_supported(ctx, timings.n_nodes)
            t1 = time.perf_counter()
            self.generation += 1
            f.ggml_backend_sched_reset(self.sched)
            if not f.ggml_backend_sched_alloc_graph(self.sched, ctx.graph):
                raise ComputeError(f"ggml could not allocate a {timings.n_nodes}-node graph on "
                                   f"{self.backend.name}", hint="use a smaller context or image")
            t2 = time.perf_counter()
            # An input the outputs do not depend on is not in the graph and has no memory
            # (ggml would abort on the copy): it is left out, and Graph.set ignores it.
            used = [(t, data) for t, data in ctx.inputs if t.struct.buffer]
            for t, data in used:
                f.ggml_backend_tensor_set(t.ptr, data.ctypes.data, 0, data.nbytes)
            unused = {t.name: t for t, _ in ctx.inputs if t.name and not t.struct.buffer}
            ctx.inputs = [(t, None) for t, _ in used]  # uploaded: let the arrays go
            t3 = time.perf_counter()
        except BaseException:
            ctx.close()
            raise
        timings.build_us = (t1 - t0) * 1e6
        timings.alloc_us = (t2 - t1) * 1e6
        timings.upload_us = (t3 - t2) * 1e6
        return Graph(self, ctx, outputs, self.generation, timings, unused)

    def _check_supported(self, ctx: Ctx, n_nodes: int) -> None:
        f = self._f
        chain = list(self._backends)
        for i in range(n_nodes):
            node = f.ggml_graph_node(ctx.graph, i)
            if not any(f.ggml_backend_supports_op(b, node) for b in chain):
                s = T(node).struct
                types = [_type_name(T(p).type) for p in s.src if p]
                raise ValueError(f"no backend of {self.backend.name} runs "
                                 f"{(f.ggml_op_desc(node) or b'?').decode()} on "
                                 f"{', '.join(types) or 'no operands'}")
            if _REPACKED_TENSORS:
                self._check_repacked_views(node)

    def _check_repacked_views(self, node: int) -> None:
        # ggml_backend_supports_op sees a repacked weight's buffer only on the weight itself:
        # a view of one has no buffer until allocation, passes, and then computes on
        # interleaved blocks as if they were rows (mul_mat even picks the repacked kernel
        # for the view's shape at the view's offset). A view node itself reads nothing.
        s = Tensor.from_address(node)
        if s.view_src:
            return
        for src in s.src:
            if src and Tensor.from_address(src).view_src in _REPACKED_TENSORS:
                root = T(Tensor.from_address(src).view_src)
                raise ValueError(f"{(self._f.ggml_op_desc(node) or b'?').decode()} reads a view "
                                 f"of the repacked weight {root.name} (use the weight whole, "
                                 "or load the weights with repack=False)")

    def run(self, build: Callable[[Ctx], Sequence[T]]) -> list[npt.NDArray[Any]]:
        """Build, allocate and compute a graph once; return its outputs as numpy arrays.

        Args:
            build: as for :meth:`prepare`.

        Returns:
            One array per returned tensor, in numpy order (``T.shape``).

        Raises:
            ComputeError: the graph could not be allocated or computed.
        """
        with self.prepare(build) as graph:
            results = graph.compute()
            self.timings = graph.timings
        return results

    def compute_buffer_bytes(self) -> int:
        """Bytes of compute buffer the scheduler holds on the primary device."""
        return int(self._f.ggml_backend_sched_get_buffer_size(self.sched, self.backend.primary))

    def close(self) -> None:
        """Free the scheduler and its compute buffers."""
        if self.sched:
            self._f.ggml_backend_sched_free(self.sched)
            self.sched = 0
            self.generation += 1

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
