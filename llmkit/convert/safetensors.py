"""safetensors checkpoints read as numpy memory maps: no torch, nothing loaded until touched."""

from __future__ import annotations

import contextlib
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import ConvertError
from llmkit.io import parse_json

# safetensors dtype names → (numpy dtype string, bytes per element). BF16 has no numpy
# dtype; it is read as uint16 and widened by shifting into the high half of a float32.
DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8),
          "I64": ("<i8", 8), "I32": ("<i4", 4), "I16": ("<i2", 2), "I8": ("i1", 1),
          "U8": ("u1", 1), "BOOL": ("?", 1)}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie."""

    name: str
    dtype: str  # safetensors name: F32, F16, BF16, …
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> list[TensorRef]:
    """The tensor table of one .safetensors file.

    Raises:
        ConvertError: not a safetensors file, truncated, or an unknown dtype.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if n > min(size - 8, 100 << 20):
                raise ConvertError(f"{path} is not a safetensors file (bad header length)")
            header = parse_json(fh.read(n), strict=False)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"cannot read {path}: {exc}") from None
    base = 8 + n
    refs = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = info.get("dtype")
        if dtype not in DTYPES:
            raise ConvertError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * DTYPES[dtype][1]:
            raise ConvertError(f"{path}: tensor {name} has inconsistent offsets")
        if base + end > size:
            raise ConvertError(f"{path} is truncated (tensor {name} runs past the end)")
        refs.append(TensorRef(name, dtype, shape, path, base + begin, base + end))
    return refs


def checkpoint_tensors(directory: Path) -> dict[str, TensorRef]:
    """Every tensor of a checkpoint directory (single file or sharded with an index).

    Raises:
        ConvertError: no safetensors files (e.g. only PyTorch .bin files), or duplicates.
    """
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = list(directory.glob("*.bin")) + list(directory.glob("*.pt"))
        hint = " (only PyTorch .bin files: llmkit reads safetensors)" if bins else ""
        raise ConvertError(f"no .safetensors files in {directory}{hint}")
    tensors: dict[str, TensorRef] = {}
    for file in files:
        for ref in read_header(file):
            if ref.name in tensors:
                raise ConvertError(f"tensor {ref.name} appears in two files")
            tensors[ref.name] = ref
    return tensors


class MappedFiles:
    """Open memory maps of a checkpoint's files, shared by all tensor reads."""

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[Any, mmap.mmap]] = {}

    def array(self, ref: TensorRef) -> Any:
        """The tensor as a read-only numpy view on the memory map (BF16 as uint16)."""
        import numpy as np

        if ref.file not in self._maps:
            fh = open(ref.file, "rb")  # noqa: SIM115 - closed in close()
            self._maps[ref.file] = (fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
        mm = self._maps[ref.file][1]
        dtype = np.dtype(DTYPES[ref.dtype][0])
        count = (ref.end - ref.start) // dtype.itemsize
        return np.frombuffer(mm, dtype=dtype, count=count, offset=ref.start).reshape(ref.shape)

    def rows(self, ref: TensorRef, a: int, b: int, order: Any | None = None) -> Any:
        """Rows a..b-1 of a tensor (or rows ``order[a:b]``) widened to a float32 copy.

        The source pages are handed back to the OS once copied: a mapped file's pages count
        in the process's resident memory while mapped, so without this a conversion's RSS
        climbs to the size of the whole checkpoint. They stay in the page cache, so reading
        them again is cheap.
        """
        data = self.array(ref)
        block = data[a:b] if order is None else data[order[a:b]]
        out = to_float32(block, ref.dtype)  # always a fresh array (astype copies)
        del block
        row_bytes = (ref.end - ref.start) // max(1, ref.shape[0]) if ref.shape else 0
        if order is None:
            first, last = a, b
        else:
            picked = order[a:b]
            first, last = int(picked.min()), int(picked.max()) + 1
        self._release(ref.file, ref.start + first * row_bytes, ref.start + last * row_bytes)
        return out

    def reader(self, ref: TensorRef, order: Any | None = None) -> Any:
        """A ``rows(a, b)`` function over a tensor, as a planned output tensor takes it."""

        def rows(a: int, b: int) -> Any:
            return self.rows(ref, a, b, order)

        return rows

    def _release(self, file: Path, start: int, end: int) -> None:
        if not hasattr(mmap, "MADV_DONTNEED") or file not in self._maps:
            return
        mm = self._maps[file][1]
        aligned = start - start % mmap.PAGESIZE
        if end > aligned:
            with contextlib.suppress(OSError, ValueError):
                mm.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)

    def close(self) -> None:
        """Release the maps (views made from them must be gone)."""
        for fh, mm in self._maps.values():
            # A view may still exist; the OS unmaps at exit then.
            with contextlib.suppress(BufferError):
                mm.close()
            fh.close()
        self._maps.clear()


def to_float32(array: Any, dtype: str) -> Any:
    """Widen a block of checkpoint values to float32 (exact for F16 and BF16)."""
    import numpy as np

    from llmkit.convert._fastcast import bf16_to_f32

    if dtype == "BF16":
        return bf16_to_f32(array)
    return array.astype(np.float32)
