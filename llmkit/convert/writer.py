"""Streaming GGUF output: tensors written block by block, to a temporary name, then renamed."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import ConvertError

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

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    done = False
    try:
        add_metadata(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, _float32(), t.nbytes, raw_dtype=t.qtype)
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        assert writer.fout is not None
        fout = writer.fout[0]
        align = writer.data_alignment
        for i, t in enumerate(tensors):
            if on_tensor is not None:
                on_tensor(i, len(tensors), t.name)
            fout.write(b"\0" * (-fout.tell() % align))
            written = 0
            for a, b in _blocks(t):
                data = _encode(t.rows(a, b), t.qtype)
                fout.write(data)
                written += len(data)
            if written != t.nbytes:
                raise ConvertError(f"tensor {t.name}: wrote {written} bytes, expected {t.nbytes}")
            fout.write(b"\0" * (-written % align))
        fout.flush()
        os.fsync(fout.fileno())
        fout.close()
        from llmkit.gguf_file import read_info

        info = read_info(tmp)  # the whole header parses and every tensor's data is present
        if info.tensor_count != len(tensors):
            raise ConvertError(f"the output has {info.tensor_count} tensors, not {len(tensors)}")
        done = True
        return tmp
    except OSError as exc:
        raise ConvertError(f"cannot write {path}: {exc.strerror or exc}",
                           hint="check free disk space and permissions") from None
    finally:
        if writer.fout:
            for fh in writer.fout:
                with contextlib.suppress(OSError):
                    fh.close()
        if not done:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


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
