"""Reading GGUF headers with the gguf package: validation and the facts `show` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import InvalidModelFileError

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file says about itself."""

    path: str
    size_bytes: int
    architecture: str
    name: str
    parameters: int
    quantization: str
    context_length: int
    chat_template: str
    tensor_count: int
    gguf_version: int
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "path": self.path,
            "size_bytes": self.size_bytes,
            "architecture": self.architecture,
            "name": self.name,
            "parameters": self.parameters,
            "quantization": self.quantization,
            "context_length": self.context_length,
            "chat_template": self.chat_template,
            "tensor_count": self.tensor_count,
            "gguf_version": self.gguf_version,
            "metadata": self.metadata,
        }


def check_header(path: Path) -> None:
    """Cheap check that ``path`` exists and starts like a GGUF file.

    Raises:
        InvalidModelFileError: missing, a directory, empty, or without the GGUF magic.
    """
    if not path.exists():
        raise InvalidModelFileError(str(path), "no such file")
    if path.is_dir():
        raise InvalidModelFileError(str(path), "is a directory, not a .gguf file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise InvalidModelFileError(str(path), f"cannot be read ({exc.strerror})") from None
    if len(head) == 0:
        raise InvalidModelFileError(str(path), "is empty")
    if head[:4] != GGUF_MAGIC:
        raise InvalidModelFileError(
            str(path),
            "is not a GGUF model file",
            hint="llmkit runs .gguf files; convert Hugging Face checkpoints to GGUF first",
        )
    if len(head) < 8:
        raise InvalidModelFileError(str(path), "is truncated (header incomplete)")


def check_model_file(path: Path) -> None:
    """Check a model file before llama.cpp loads it (llama.cpp aborts where llmkit must error).

    Raises:
        InvalidModelFileError: the file is not a GGUF llama.cpp can safely load.
    """
    check_header(path)


def check_projector_file(path: Path) -> None:
    """Check a vision projector (mmproj) file before mtmd loads it.

    Raises:
        InvalidModelFileError: the file is not a projector GGUF mtmd can safely load.
    """
    check_header(path)


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


# Scalar GGUF value types by id (the GGUF spec's gguf_type enum, as gguf.GGUFValueType):
# uint8 int8 uint16 int16 uint32 int32 float32 bool … uint64 int64 float64.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this are summarized as "[N items]" instead of kept.
_KEEP_ITEMS = 8


@dataclass
class _Tensor:
    name: str
    n_elements: int
    n_dims: int
    type_id: int
    end: int


class _HeaderReader:
    """Walks a GGUF header with bounds checks, so damage is named precisely."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        import struct

        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated()
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, keep: bool = True) -> str:
        n = self.unpack("<Q")
        if n > 1 << 30:
            raise _Corrupt(f"a string of {n} bytes")
        if self.pos + n > self.size:
            raise _Truncated()
        text = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", "replace") if keep else ""
        self.pos += n
        return text

    def value(self, vtype: int) -> Any:
        import struct

        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise _Corrupt(f"unknown metadata value type {vtype}")
        item_type, count = self.unpack("<I"), self.unpack("<Q")
        if count > 1 << 32:
            raise _Corrupt(f"an array of {count} items")
        keep = count <= _KEEP_ITEMS
        if item_type in _SCALARS:
            width = struct.calcsize(_SCALARS[item_type])
            if self.pos + width * count > self.size:
                raise _Truncated()
            items = [struct.unpack_from(_SCALARS[item_type], self.buf, self.pos + i * width)[0]
                     for i in range(count)] if keep else []
            self.pos += width * count
        elif item_type == _STRING:
            items = [self.string(keep) for _ in range(count)]
        else:
            raise _Corrupt(f"an array of value type {item_type}")
        return items if keep else f"[{count} items]"


def _parse(path: Path) -> tuple[int, dict[str, Any], list[_Tensor], int]:
    """Parse header, metadata and tensor table; check the tensor data is all there.

    Returns:
        (GGUF version, metadata, tensors, file size)
    """
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    check_header(path)
    size = path.stat().st_size
    hint = "download or convert it again"
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        reader = _HeaderReader(mm, size)
        try:
            reader.pos = 4
            version = reader.unpack("<I")
            if version not in (2, 3):
                raise _Corrupt(f"unsupported GGUF version {version}")
            n_tensors, n_kv = reader.unpack("<Q"), reader.unpack("<Q")
            if n_tensors > 1 << 20 or n_kv > 1 << 20:
                raise _Corrupt(f"{n_tensors} tensors and {n_kv} metadata keys")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = reader.string()
                meta[key] = reader.value(reader.unpack("<I"))
            tensors: list[_Tensor] = []
            for _ in range(n_tensors):
                name = reader.string()
                n_dims = reader.unpack("<I")
                if n_dims > 8:
                    raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
                n_elements = 1
                for _ in range(n_dims):
                    n_elements *= reader.unpack("<Q")
                type_id, offset = reader.unpack("<I"), reader.unpack("<Q")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
                except (ValueError, KeyError):
                    raise _Corrupt(f"tensor {name} has unknown type {type_id}") from None
                tensors.append(_Tensor(name, n_elements, n_dims, type_id,
                                       offset + n_elements // block * type_size))
        except _Truncated:
            raise InvalidModelFileError(
                str(path), f"is truncated (the header runs past the end at {size} bytes)",
                hint=hint) from None
        except _Corrupt as exc:
            raise InvalidModelFileError(str(path), f"is corrupt ({exc})", hint=hint) from None
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        alignment = 32
    data_start = -(-reader.pos // alignment) * alignment
    needed = data_start + max((t.end for t in tensors), default=0)
    if needed > size:
        raise InvalidModelFileError(
            str(path), f"is truncated ({size} bytes; its tensors need {needed})", hint=hint)
    return version, meta, tensors, size


def check_complete(path: Path) -> None:
    """Check that ``path`` is a GGUF whose header parses and whose tensor data is all present.

    Raises:
        InvalidModelFileError: not a GGUF, corrupt header, or truncated anywhere.
    """
    _parse(path)


def read_info(path: Path) -> GGUFInfo:
    """Parse a GGUF file's metadata and tensor table, and check it is complete.

    gguf's own GGUFReader takes seconds on a large vocabulary (a numpy view per token), so
    the header is walked here with the gguf package's type tables.

    Args:
        path: the .gguf file.

    Returns:
        The file's architecture, size, quantization and other facts.

    Raises:
        InvalidModelFileError: not a GGUF file, corrupt, or truncated.
    """
    from gguf import GGMLQuantizationType, LlamaFileType

    version, meta, tensors, size = _parse(path)
    arch = str(meta.get("general.architecture", "unknown"))
    file_type = meta.get("general.file_type")
    quant = "unknown"
    if isinstance(file_type, int):
        try:
            quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"type {file_type}"
    else:
        # Without general.file_type, name the most common type among the weight matrices.
        counts: dict[str, int] = {}
        for t in tensors:
            if t.n_dims >= 2:
                type_name = GGMLQuantizationType(t.type_id).name
                counts[type_name] = counts.get(type_name, 0) + 1
        if counts:
            quant = max(counts, key=lambda k: counts[k])
    ctx = meta.get(f"{arch}.context_length", 0)
    template = meta.get("tokenizer.chat_template", "")
    return GGUFInfo(
        path=str(path),
        size_bytes=size,
        architecture=arch,
        name=str(meta.get("general.name", path.stem)),
        parameters=sum(t.n_elements for t in tensors),
        quantization=quant,
        context_length=int(ctx) if isinstance(ctx, int) else 0,
        chat_template=template if isinstance(template, str) else "",
        tensor_count=len(tensors),
        gguf_version=version,
        metadata={k: v for k, v in meta.items() if k != "tokenizer.chat_template"},
    )


def human_size(n_bytes: int) -> str:
    """1536 → '1.5 KB' (decimal units, as download sizes are usually shown)."""
    size = float(n_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n_bytes} B"


def human_params(n: int) -> str:
    """134515008 → '135M'."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2f}B"
    if n >= 1_000_000:
        return f"{n / 1e6:.0f}M"
    return f"{n / 1e3:.0f}K"
