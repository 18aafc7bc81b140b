"""Quantizing a Llama 3.2 Vision GGUF's text weights through ggml's own quantizer."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import QuantizeError, UsageError

# The file types this quantizer writes, by the name users know from llama-quantize, with the
# type of an ordinary text matrix. Each follows llama.cpp's own choices for the tensors of a
# Llama (llama-quant.cpp, llama_tensor_get_type) as far as they concern the tensors an mllama
# file has; the vision tower and projector are never quantized (Ollama's quantizer keeps them
# too: they are 1.7 GB of 7.9 and their errors reach every text token through the cross
# attention).
BASE_TYPES: dict[str, str] = {
    "Q4_0": "Q4_0", "Q5_0": "Q5_0", "Q8_0": "Q8_0", "Q6_K": "Q6_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q3_K_M": "Q3_K",
}
DEFAULT_TYPE = "Q4_K_M"
# Tensors whose names start so are the vision tower and projector; they keep their type.
KEEP_PREFIXES = ("v.", "mm.")
# A K-quant block spans 256 elements of a row; rows of another width take llama.cpp's
# fallback for the type (llama_tensor_get_type, "convert_incompatible_tensor").
_FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every
    third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class TypePlan:
    """Counts llama.cpp's rules need: how many self-attention V and FFN-down matrices there
    are, and which of them a name is."""

    ftype: str
    n_attn_v: int
    n_ffn_down: int
    _attn_v: dict[str, int] = field(default_factory=dict)
    _ffn_down: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_tensors(cls, ftype: str, names: list[str]) -> TypePlan:
        """The plan for a file holding tensors ``names`` (in file order).

        Raises:
            UsageError: ``ftype`` is not one this quantizer writes.
        """
        key = ftype.upper()
        if key not in BASE_TYPES:
            raise UsageError(f"{ftype} is not available for Llama 3.2 Vision models",
                             hint=f"choose one of {', '.join(BASE_TYPES)}")
        # Layer order, not file order, numbers them, as llama.cpp counts while it walks layers;
        # only the text model's (the vision tower's v.blk.N keep their type and do not count).
        text = [n for n in names if not n.startswith(KEEP_PREFIXES)]
        attn_v = sorted((n for n in text if n.endswith(".attn_v.weight")), key=_layer_of)
        ffn_down = sorted((n for n in text if n.endswith(".ffn_down.weight")), key=_layer_of)
        return cls(key, len(attn_v), len(ffn_down),
                   {n: i for i, n in enumerate(attn_v)}, {n: i for i, n in enumerate(ffn_down)})

    def type_of(self, name: str, shape: tuple[int, ...], current: str) -> str:
        """The type tensor ``name`` (numpy-order ``shape``, now of type ``current``) gets.

        One-dimensional tensors (norms, gates, biases), ``rope_freqs``, the vision tower and the
        projector keep their type.
        """
        if (len(shape) < 2 or name.startswith(KEEP_PREFIXES) or name == "rope_freqs.weight"
                or name.endswith("_norm.weight")):
            return current
        chosen = self._rule(name)
        width = shape[-1]
        if chosen.endswith("_K") and width % 256 != 0:
            chosen = _FALLBACK[chosen]
        if width % _block_size(chosen) != 0:
            chosen = "F16"
        return chosen

    def _rule(self, name: str) -> str:
        ftype, base = self.ftype, BASE_TYPES[self.ftype]
        if name == "output.weight":
            # llama.cpp gives the output matrix Q6_K whatever the type, unless it is Q8_0.
            return "Q8_0" if base == "Q8_0" else "Q6_K"
        if name in self._attn_v:
            i, n = self._attn_v[name], self.n_attn_v
            if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                return "Q6_K"
            if ftype == "Q4_K_S" and i < 4:
                return "Q5_K"
            if ftype == "Q3_K_M":
                return "Q5_K" if i < 2 else "Q4_K"
        if name in self._ffn_down:
            i, n = self._ffn_down[name], self.n_ffn_down
            if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                return "Q6_K"
            if ftype == "Q4_K_S" and i < n // 8:
                return "Q5_K"
            if ftype == "Q3_K_M":
                # llama.cpp keeps Q3_K here only for Falcon.
                return "Q5_K" if i < n // 16 else "Q4_K"
        if ftype == "Q3_K_M" and name.endswith(".attn_output.weight"):
            return "Q4_K"
        return base


def _layer_of(name: str) -> int:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else -1


def _block_size(type_name: str) -> int:
    import gguf

    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0])


def describe(plan: TypePlan, tensors: list[tuple[str, tuple[int, ...], str]]) -> dict[str, Any]:
    """How many tensors get each type (for a report): {type: count}."""
    counts: dict[str, int] = {}
    for name, shape, current in tensors:
        chosen = plan.type_of(name, shape, current)
        counts[chosen] = counts.get(chosen, 0) + 1
    return dict(sorted(counts.items()))


# Source types the quantizer reads as float32 rows; a quantized source would be quantized twice
# (llama-quantize refuses that too without --allow-requantize).
_FLOAT_SOURCES = ("F32", "F16", "BF16")


def stage_quantized(source: Path, output: Path, ftype: str, *, threads: int = 1,
                    on_tensor: Callable[[int, int, str], None] | None = None) -> Path:
    """Write ``source`` with its text weights quantized to ``ftype``, under a temporary name.

    Every metadata key is copied (general.file_type set to the new type); each tensor gets
    the type :class:`TypePlan` chooses, quantized from float32 rows by ggml_quantize_chunk
    (the kernels llama-quantize uses, without an importance matrix), streamed block by block
    as the converter writes. Tensors that keep their type are copied byte for byte.

    Args:
        source: an mllama GGUF with float (F32/F16/BF16) text weights.
        output: the final name (the temporary one is derived from it; the caller renames).
        ftype: one of :data:`BASE_TYPES`.
        threads: rows of a block are quantized on this many threads (ggml's kernels run
            outside the GIL).
        on_tensor: progress callback (index, total, tensor name).

    Returns:
        The temporary file, complete and checked.

    Raises:
        UsageError: an unknown type.
        QuantizeError: a text weight is already quantized.
        ConvertError: the output could not be written.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="quantize") as pool:
        return _stage(source, output, ftype, pool, max(1, threads), on_tensor)


def _stage(source: Path, output: Path, ftype: str, pool: Any, workers: int,
           on_tensor: Callable[[int, int, str], None] | None) -> Path:
    import gguf
    import numpy as np

    from llmkit.convert.writer import PlannedTensor, stage_gguf
    from llmkit.engines.mllama import _ggml

    reader = gguf.GGUFReader(source)
    entries = [(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name,
                t) for t in reader.tensors]
    plan = TypePlan.for_tensors(ftype, [name for name, *_ in entries])
    planned: list[PlannedTensor] = []
    for name, shape, current, tensor in entries:
        chosen = plan.type_of(name, shape, current)
        qtype = gguf.GGMLQuantizationType[chosen]
        raw = np.asarray(tensor.data)
        if chosen == current:
            # Rows of bytes, as the file holds them: nothing is decoded or re-encoded.
            by_rows = raw.reshape(shape[0], -1).view(np.uint8) if len(shape) > 1 else \
                raw.reshape(1, -1).view(np.uint8)
            planned.append(PlannedTensor(name, shape, qtype, _byte_rows(by_rows, len(shape)),
                                         encode=_as_bytes))
            continue
        if current not in _FLOAT_SOURCES:
            raise QuantizeError(f"{source.name} holds {name} as {current} already; quantizing "
                                "it again would lose more than quantizing once",
                                hint="start from the F16, BF16 or F32 conversion")
        matrix = raw.reshape(shape[0], -1)
        planned.append(PlannedTensor(name, shape, qtype, _float_rows(matrix, current),
                                     encode=_ggml_encoder(_ggml, int(qtype), pool, workers)))

    def metadata(writer: Any) -> None:
        _copy_metadata(reader, writer, _FILE_TYPES[plan.ftype])

    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    return stage_gguf(output, arch, metadata, planned, on_tensor)


# llama_ftype values (llama.h), what general.file_type records.
_FILE_TYPES = {"Q4_0": 2, "Q8_0": 7, "Q5_0": 8, "Q3_K_M": 12, "Q4_K_S": 14, "Q4_K_M": 15,
               "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}


def _as_bytes(rows: Any) -> bytes:
    return bytes(rows.data) if rows.flags.c_contiguous else rows.tobytes()


def _byte_rows(by_rows: Any, n_dims: int) -> Callable[[int, int], Any]:
    def rows(a: int, b: int) -> Any:
        # A 1-D tensor is planned as elements a..b-1; its bytes are one row here.
        return by_rows if n_dims == 1 else by_rows[a:b]

    return rows


def _float_rows(matrix: Any, current: str) -> Callable[[int, int], Any]:
    import numpy as np

    def rows(a: int, b: int) -> Any:
        block = matrix[a:b]
        if current == "BF16":
            return (np.asarray(block).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.asarray(block, dtype=np.float32)

    return rows


def _ggml_encoder(ggml: Any, gtype: int, pool: Any, workers: int) -> Callable[[Any], bytes]:
    import numpy as np

    def encode(rows: Any) -> bytes:
        if workers == 1 or len(rows) < 2 * workers:
            return bytes(ggml.quantize(gtype, rows).data)
        # Rows quantize independently: each thread takes a run of them, in order.
        parts = pool.map(lambda part: ggml.quantize(gtype, part), np.array_split(rows, workers))
        return b"".join(bytes(p.data) for p in parts)

    return encode


def _copy_metadata(reader: Any, writer: Any, file_type: int) -> None:
    """Every key of the source but the writer's own, strings copied as bytes (a vocabulary
    need not be valid UTF-8), general.file_type replaced and general.quantization_version set
    (as llama-quantize sets it on every file it writes)."""
    import gguf

    vt = gguf.GGUFValueType
    for name, fld in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type",
                                                 "general.alignment",
                                                 "general.quantization_version"):
            continue
        main = vt(fld.types[0])
        if main == vt.ARRAY:
            sub = vt(fld.types[-1])
            if sub == vt.STRING:
                value: Any = [bytes(fld.parts[i]) for i in fld.data]
            else:
                value = [fld.parts[i].tolist()[0] for i in fld.data]
            writer.add_key_value(name, value, main, sub_type=sub)
        elif main == vt.STRING:
            writer.add_key_value(name, bytes(fld.parts[fld.data[0]]), main)
        else:
            writer.add_key_value(name, fld.parts[fld.data[0]].tolist()[0], main)
    writer.add_uint32("general.file_type", file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
