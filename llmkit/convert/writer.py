"""Streaming GGUF output: tensors written block by block, to a temporary name, then renamed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from llmkit.errors import ConvertError, InvalidModelFileError

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
# Elements per block of rows streamed at a time: bounds peak memory to a few tens of MB.
BLOCK_ELEMENTS = 4 << 20


@dataclass
class PlannedTensor:
    """A tensor of the output: its GGUF name, numpy-order shape, type, and where rows come from.

    ``rows(a, b)`` returns rows a..b-1 as float32 (for 1-D tensors: elements a..b-1).
    """

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    rows: Callable[[int, int], Any]
    # Turns what ``rows`` gives into the tensor's bytes, for types gguf-py cannot write
    # (k-quants, through ggml) or rows that are already bytes; None: the writer's own encoding.
    encode: Callable[[Any], bytes] | None = None

    @property
    def nbytes(self) -> int:
        import gguf

        count = 1
        for d in self.shape:
            count *= d
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return count // block * size


def tensor_type(outtype: str, shape: tuple[int, ...], name: str) -> Any:
    """The GGUF type a tensor gets: norms and 1-D tensors stay float32, as llama.cpp expects."""
    from gguf import GGMLQuantizationType as T

    if len(shape) < 2 or name.endswith("_norm.weight") or name == "rope_freqs.weight":
        return T.F32
    if outtype == "f32":
        return T.F32
    if outtype == "bf16":
        return T.BF16
    if outtype == "q8_0" and shape[-1] % 32 == 0:
        return T.Q8_0
    return T.F16


def file_type(outtype: str) -> int:
    """general.file_type for an output type."""
    from gguf import LlamaFileType as F

    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
                "q8_0": F.MOSTLY_Q8_0}[outtype])


def _encode(block: Any, qtype: Any) -> bytes:
    import gguf
    import numpy as np

    if qtype == gguf.GGMLQuantizationType.F32:
        return bytes(np.ascontiguousarray(block, dtype="<f4").data)
    if qtype == gguf.GGMLQuantizationType.F16:
        from llmkit.convert._fastcast import f32_to_f16

        return bytes(f32_to_f16(block).data)
    return bytes(np.ascontiguousarray(gguf.quants.quantize(block, qtype)).data)


def _blocks(t: PlannedTensor) -> Iterator[tuple[int, int]]:
    rows = t.shape[0]
    per_row = 1
    for d in t.shape[1:]:
        per_row *= d
    step = max(1, BLOCK_ELEMENTS // max(1, per_row)) if len(t.shape) > 1 else rows
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def stage_gguf(
    path: Path,
    arch: str,
    add_metadata: Callable[[Any], None],
    tensors: list[PlannedTensor],
    on_tensor: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write a complete, verified GGUF under a temporary name next to ``path``.

    The caller renames the result into place (or deletes it): a conversion that writes
    several files renames them only once every one is complete.

    Args:
        path: the final file name; the temporary one is derived from it.
        arch: GGUF architecture name (e.g. "llama", "clip").
        add_metadata: adds key/values (and the tokenizer) to a gguf.GGUFWriter.
        tensors: the output tensors, in file order.
        on_tensor: progress callback (index, total, name).

    Returns:
        The temporary file.

    Raises:
        ConvertError: the output could not be written (e.g. disk full); nothing is left behind.
    """
    import gguf

    from llmkit._fs import temp_path

    path.parent.mkdir(parents=True, exist_ok=True)
    # Named as this process's, so a rerun after a SIGKILL removes the gigabytes left behind.
    tmp = temp_path(path)
    writer = gguf.GGUFWriter(tmp, arch)
    done = False
    try:
        add_metadata(writer)
        stream = _TensorStream(tensors, on_tensor, writer.data_alignment)
        for streamed in stream.tensors:
            # Annotated as an ndarray, but the writer reads only dtype, nbytes and tofile, as
            # for its lazy tensors. The bytes are little-endian, as the file: none are swapped.
            writer.add_tensor(streamed.name, cast(Any, streamed), raw_shape=streamed.shape,
                              raw_dtype=streamed.qtype, tensor_endianess=gguf.GGUFEndian.LITTLE)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        with stream:
            writer.write_tensors_to_file()
        writer.close()
        _fsync(tmp)
        from llmkit.gguf_file import check_file

        # The whole header parses, every tensor's data is present, and llama.cpp can load it.
        try:
            info = check_file(tmp)
        except InvalidModelFileError as exc:
            raise ConvertError(f"the converted {path.name} would not load: {exc.problem}",
                               hint="the checkpoint's config.json does not match its weights"
                               ) from None
        if info.tensor_count != len(tensors):
            raise ConvertError(f"the output has {info.tensor_count} tensors, not {len(tensors)}")
        done = True
        return tmp
    except OSError as exc:
        raise ConvertError(f"cannot write {path}: {exc.strerror or exc}",
                           hint="check free disk space and permissions") from None
    finally:
        with contextlib.suppress(OSError):
            writer.close()
        if not done:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _fsync(path: Path) -> None:
    """Make a closed file durable (fsync applies to the file, whichever descriptor asks)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _StreamedTensor:
    """A planned tensor in the shape gguf's writer takes: its bytes are made as it writes them.

    ``GGUFWriter.write_tensors_to_file`` writes each tensor with ``tofile(fout)`` once it has
    checked ``nbytes``, and pads it itself; gguf's own lazy tensors
    (``gguf.lazy.LazyNumpyTensor``) are computed at that moment through the same two members.
    Those materialise a whole tensor; this one hands the file block after block, so memory
    stays near one block (a 128k-token embedding is 0.5 GB in f16) while the writer keeps its
    state machine, offsets and padding.
    """

    def __init__(self, stream: _TensorStream, index: int, planned: PlannedTensor) -> None:
        self._stream = stream
        self._index = index
        self._planned = planned
        self.name = planned.name
        self.shape = planned.shape
        self.qtype = planned.qtype
        self.nbytes = planned.nbytes
        self.dtype = _float32()  # what add_tensor_info is told; raw_dtype gives the real type

    def tofile(self, fout: Any) -> None:
        """Hand the tensor's bytes for ``fout`` (the writer's file) to the writing thread.

        They are all in the file before the writer itself next writes to it.

        Raises:
            ConvertError: the rows gave more or fewer bytes than the tensor's size.
            OSError: the file could not be written.
        """
        self._stream.write(fout, self._index, self._planned)


class _TensorStream:
    """The tensors of one output, and the thread that writes their blocks (started lazily,
    on the file the writer hands to the first ``tofile``, and joined on exit)."""

    def __init__(self, tensors: list[PlannedTensor],
                 on_tensor: Callable[[int, int, str], None] | None, alignment: int) -> None:
        self.tensors = [_StreamedTensor(self, i, t) for i, t in enumerate(tensors)]
        self._on_tensor = on_tensor
        self._alignment = alignment
        self._sink: _BackgroundWriter | None = None

    def write(self, fout: Any, index: int, t: PlannedTensor) -> None:
        if self._on_tensor is not None:
            self._on_tensor(index, len(self.tensors), t.name)
        if self._sink is None:
            self._sink = _BackgroundWriter(fout).__enter__()
        written = 0
        for a, b in _blocks(t):
            rows = t.rows(a, b)
            data = t.encode(rows) if t.encode is not None else _encode(rows, t.qtype)
            self._sink.put(data)
            written += len(data)
        if written != t.nbytes:
            raise ConvertError(f"tensor {t.name}: wrote {written} bytes, expected {t.nbytes}")
        # A tensor whose size is not a multiple of the alignment is padded by the writer,
        # straight into the file, once this returns: the thread must be done by then. The
        # others (nearly all) it leaves alone, so their writes overlap the next conversion.
        if t.nbytes % self._alignment:
            self._sink.drain()

    def __enter__(self) -> _TensorStream:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.__exit__(exc_type, exc, tb)


class _BackgroundWriter:
    """Writes blocks on a second thread while the caller converts the next ones.

    Writing gigabytes is the slowest part of a conversion; file writes and the numpy/ggml
    casts both release the GIL, so the two overlap. The queue is short, bounding memory to a
    few blocks. Written ranges are handed to the kernel for write-back at once (Linux
    sync_file_range), so the final fsync finds little left to do and the page cache never
    fills with gigabytes of dirty pages that stall every later write.
    """

    _DEPTH = 4
    _FLUSH_EVERY = 64 << 20

    def __init__(self, fout: Any) -> None:
        import queue
        import threading

        self._fout = fout
        self._queue: queue.Queue[bytes | None] = queue.Queue(self._DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gguf-writer", daemon=True)
        self._kick = _sync_file_range()

    def __enter__(self) -> _BackgroundWriter:
        self._thread.start()
        return self

    def put(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        if data:
            self._queue.put(data)

    def drain(self) -> None:
        """Return once every block put so far is in the file (the caller writes to it next).

        Raises:
            OSError: a write failed.
        """
        self._queue.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        fout = self._fout
        start = fout.tell()
        unflushed = 0
        while True:
            data = self._queue.get()
            try:
                if data is None:
                    return
                if self._error is not None:
                    continue  # drain so the producer never blocks on a full queue
                fout.write(data)
                unflushed += len(data)
                if self._kick is not None and unflushed >= self._FLUSH_EVERY:
                    fout.flush()
                    end = fout.tell()
                    self._kick(fout.fileno(), start, end - start)
                    start, unflushed = end, 0
            except BaseException as exc:  # reported to the producer on its next put or exit
                self._error = exc
            finally:
                self._queue.task_done()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None and exc_type is None:
            raise self._error


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start write-back without waiting."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int

    def kick(fd: int, offset: int, nbytes: int) -> None:
        function(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure only costs speed

    return kick


def publish(staged: list[tuple[Path, Path]]) -> None:
    """Rename staged files (temporary, final) into place, in order; leftovers are deleted.

    Raises:
        ConvertError: a rename failed.
    """
    try:
        for tmp, final in staged:
            try:
                os.replace(tmp, final)
            except OSError as exc:
                raise ConvertError(f"cannot write {final}: {exc.strerror or exc}",
                                   hint="check free disk space and permissions") from None
    finally:
        discard(staged)


def discard(staged: list[tuple[Path, Path]]) -> None:
    """Delete the temporary files of staged outputs that were not renamed."""
    for tmp, _ in staged:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _float32() -> Any:
    import numpy as np

    return np.dtype(np.float32)
