"""Test helper: rewrite a real GGUF's metadata and tensor table byte for byte (mutated copies)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# GGUF value types (the spec's gguf_type): scalars by struct format, then string and array.
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64 = 4, 5, 6, 7, 8, 9, 10


@dataclass
class TensorInfo:
    """One row of the tensor table; ``offset`` is relative to the start of the data."""

    name: str
    dims: list[int]
    type_id: int
    offset: int


class GGUFEdit:
    """A parsed GGUF whose metadata and tensor table can be changed and written back.

    The tensor data is kept as bytes after the header and copied unchanged, so a mutated copy
    differs from the real file only where the test says.
    """

    def __init__(self, data: bytes) -> None:
        self.version = struct.unpack_from("<I", data, 4)[0]
        n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
        self._data = data
        self.pos = 24
        self.kv: dict[str, tuple[int, Any]] = {}
        for _ in range(n_kv):
            key = self._string()
            vtype = self._unpack("<I")
            self.kv[key] = (vtype, self._value(vtype))
        self.blobs: dict[str, bytes] = {}
        self.tensors: list[TensorInfo] = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._unpack("<Q") for _ in range(self._unpack("<I"))]
            self.tensors.append(TensorInfo(name, dims, self._unpack("<I"), self._unpack("<Q")))
        align = self.alignment
        start = -(-self.pos // align) * align
        self.tensor_data = data[start:]
        self.repack = False

    @classmethod
    def load(cls, path: Path) -> GGUFEdit:
        return cls(path.read_bytes())

    @property
    def alignment(self) -> int:
        value = self.kv.get("general.alignment", (UINT32, 32))[1]
        return value if isinstance(value, int) and value > 0 else 32

    # -- reading ---------------------------------------------------------------------------

    def _unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._unpack("<Q")
        text = self._data[self.pos:self.pos + n].decode("utf-8", "surrogateescape")
        self.pos += n
        return text

    def _value(self, vtype: int) -> Any:
        if vtype in SCALARS:
            return self._unpack(SCALARS[vtype])
        if vtype == STRING:
            return self._string()
        item_type, count = self._unpack("<I"), self._unpack("<Q")
        if item_type in SCALARS:
            width = struct.calcsize(SCALARS[item_type])
            items = list(struct.unpack_from(f"<{count}{SCALARS[item_type][1]}", self._data,
                                            self.pos))
            self.pos += width * count
        else:
            items = [self._string() for _ in range(count)]
        return (item_type, items)

    def get(self, key: str) -> Any:
        vtype, value = self.kv[key]
        return value[1] if vtype == ARRAY else value

    # -- changing --------------------------------------------------------------------------

    def set(self, key: str, value: Any, vtype: int | None = None) -> GGUFEdit:
        """Set a scalar or string (type kept from the existing key unless given)."""
        if vtype is None:
            vtype = self.kv[key][0] if key in self.kv else _guess(value)
        self.kv[key] = (vtype, value)
        return self

    def set_array(self, key: str, items: list[Any], item_type: int | None = None) -> GGUFEdit:
        if item_type is None:
            item_type = self.kv[key][1][0] if key in self.kv else _guess(items[0])
        self.kv[key] = (ARRAY, (item_type, list(items)))
        return self

    def remove(self, key: str) -> GGUFEdit:
        del self.kv[key]
        return self

    def tensor(self, name: str) -> TensorInfo:
        return next(t for t in self.tensors if t.name == name)

    def resize(self, name: str, dims: list[int]) -> GGUFEdit:
        """Give a tensor new dimensions, cutting (or zero-padding) its data to match.

        The data section is then laid out again, tensor after tensor, as gguf-py writes it.
        """
        if not self.repack:
            # Each tensor's own bytes, so that the rest can be laid out again around this one.
            self.blobs = {t.name: self.tensor_data[t.offset:t.offset + nbytes(t)]
                          for t in self.tensors}
            self.repack = True
        t = self.tensor(name)
        t.dims = list(dims)
        blob = self.blobs[name][:nbytes(t)]
        self.blobs[name] = blob + b"\0" * (nbytes(t) - len(blob))
        return self

    # -- writing ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        if self.repack:
            data = bytearray()
            for t in self.tensors:
                t.offset = len(data)
                data += self.blobs[t.name]
                data += b"\0" * (-len(data) % self.alignment)
            self.tensor_data = bytes(data)
        out = bytearray(b"GGUF")
        out += struct.pack("<IQQ", self.version, len(self.tensors), len(self.kv))
        for key, (vtype, value) in self.kv.items():
            out += _str(key) + struct.pack("<I", vtype) + _encode(vtype, value)
        for t in self.tensors:
            out += _str(t.name) + struct.pack("<I", len(t.dims))
            out += b"".join(struct.pack("<Q", d) for d in t.dims)
            out += struct.pack("<IQ", t.type_id, t.offset)
        out += b"\0" * (-len(out) % self.alignment)
        return bytes(out) + self.tensor_data

    def write(self, path: Path) -> Path:
        path.write_bytes(self.to_bytes())
        return path


def nbytes(t: TensorInfo) -> int:
    """The size of a tensor's data, from ggml's block sizes (as the gguf package lists them)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(t.type_id)]
    n = 1
    for d in t.dims:
        n *= d
    return n // block * size


def _guess(value: Any) -> int:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return UINT32 if 0 <= value < 2**32 else UINT64
    if isinstance(value, float):
        return FLOAT32
    return STRING


def _str(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(raw)) + raw


def _encode(vtype: int, value: Any) -> bytes:
    if vtype in SCALARS:
        return struct.pack(SCALARS[vtype], value)
    if vtype == STRING:
        return _str(value)
    item_type, items = value
    head = struct.pack("<IQ", item_type, len(items))
    if item_type in SCALARS:
        return head + struct.pack(f"<{len(items)}{SCALARS[item_type][1]}", *items)
    return head + b"".join(_str(s) for s in items)


def tiny_header_gguf(path: Path, seed: int, *, projector: bool = False,
                     embd_shape: tuple[int, int] = (32, 16)) -> bytes:
    """A small GGUF whose header llama.cpp (or mtmd, with ``projector``) accepts.

    Only a few tensors are present, enough to be complete and distinct per ``seed``; the
    header is what a real file of that kind says (layers, heads, tokenizer, clip settings).
    """
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "clip" if projector else "llama")
    writer.add_name(f"tiny-{seed}")
    if projector:
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type("idefics3")
        writer.add_vision_image_size(32)
        writer.add_vision_patch_size(16)
        writer.add_vision_embedding_length(16)
        writer.add_vision_feed_forward_length(32)
        writer.add_vision_block_count(1)
        writer.add_vision_head_count(2)
        writer.add_vision_attention_layernorm_eps(1e-6)
        writer.add_vision_projection_dim(16)
        writer.add_tensor("v.blk.0.ln1.weight", rng.standard_normal(16).astype(np.float32))
    else:
        n_vocab = embd_shape[0]
        writer.add_context_length(64)
        writer.add_block_count(1)
        writer.add_embedding_length(embd_shape[1])
        writer.add_feed_forward_length(32)
        writer.add_head_count(2)
        writer.add_head_count_kv(2)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(n_vocab)])
        writer.add_token_types([1] * n_vocab)
        writer.add_token_merges(["t 1"])
        writer.add_tensor("token_embd.weight",
                          rng.standard_normal(embd_shape).astype(np.float32))
        writer.add_tensor("output_norm.weight", np.ones(embd_shape[1], dtype=np.float32))
        writer.add_tensor("blk.0.attn_norm.weight", np.ones(embd_shape[1], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()
