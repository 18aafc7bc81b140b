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


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


class _HeaderReader:
    """Walks a GGUF header with bounds checks, so damage is named precisely."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n < 0:
            raise _Corrupt("negative length")
        if self.pos + n > len(self.data):
            raise _Truncated()
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def string(self) -> None:
        n = self.u64()
        if n > 1 << 30:
            raise _Corrupt(f"string of {n} bytes")
        self.take(n)

    def value(self, vtype: int, depth: int = 0) -> None:
        # Sizes of the scalar GGUF value types, by type id (gguf spec: GGUFValueType).
        sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        if vtype in sizes:
            self.take(sizes[vtype])
        elif vtype == 8:
            self.string()
        elif vtype == 9 and depth == 0:
            item_type, count = self.u32(), self.u64()
            if count > 1 << 32:
                raise _Corrupt(f"array of {count} items")
            if item_type in sizes:
                self.take(sizes[item_type] * count)
            else:
                for _ in range(count):
                    self.value(item_type, depth + 1)
        else:
            raise _Corrupt(f"unknown value type {vtype}")


def check_complete(path: Path) -> None:
    """Walk the whole header and tensor table and check the file holds every tensor's data.

    Raises:
        InvalidModelFileError: not a GGUF, corrupt header, or truncated anywhere.
    """
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    check_header(path)
    size = path.stat().st_size
    hint = "download or convert it again"
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        reader = _HeaderReader(memoryview(mm))
        try:
            try:
                reader.take(4)
                version = reader.u32()
                if version not in (2, 3):
                    raise _Corrupt(f"unsupported GGUF version {version}")
                n_tensors, n_kv = reader.u64(), reader.u64()
                if n_tensors > 1 << 20 or n_kv > 1 << 20:
                    raise _Corrupt(f"{n_tensors} tensors and {n_kv} metadata keys")
                alignment = 32
                for _ in range(n_kv):
                    key_len = reader.u64()
                    if key_len > 1 << 16:
                        raise _Corrupt(f"a metadata key of {key_len} bytes")
                    key = bytes(reader.take(key_len))
                    vtype = reader.u32()
                    start = reader.pos
                    reader.value(vtype)
                    if key == b"general.alignment" and vtype == 4:
                        alignment = int.from_bytes(reader.data[start:start + 4], "little") or 32
                end = 0
                for _ in range(n_tensors):
                    reader.string()
                    n_dims = reader.u32()
                    if n_dims > 8:
                        raise _Corrupt(f"a tensor with {n_dims} dimensions")
                    n_elements = 1
                    for _ in range(n_dims):
                        n_elements *= reader.u64()
                    ttype, offset = reader.u32(), reader.u64()
                    try:
                        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                    except (ValueError, KeyError):
                        raise _Corrupt(f"unknown tensor type {ttype}") from None
                    end = max(end, offset + n_elements // block * type_size)
                data_start = -(-reader.pos // alignment) * alignment
            finally:
                reader.data.release()
        except _Truncated:
            raise InvalidModelFileError(
                str(path), f"is truncated (the header runs past the end at {size} bytes)",
                hint=hint) from None
        except _Corrupt as exc:
            raise InvalidModelFileError(str(path), f"is corrupt ({exc})", hint=hint) from None
    if data_start + end > size:
        raise InvalidModelFileError(
            str(path), f"is truncated ({size} bytes; its tensors need {data_start + end})",
            hint=hint)


def _field_value(reader_field: Any) -> Any:
    from gguf import GGUFValueType

    types = reader_field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 1 and types[1] == GGUFValueType.STRING:
            return [bytes(reader_field.parts[i]).decode("utf-8", "replace")
                    for i in reader_field.data]
        return [reader_field.parts[i].tolist()[0] for i in reader_field.data]
    part = reader_field.parts[reader_field.data[0]]
    if types[0] == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", "replace")
    value = part.tolist()[0]
    return value


def _summarize(value: Any) -> Any:
    if isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} items]"
    return value


def read_info(path: Path) -> GGUFInfo:
    """Parse a GGUF file's metadata and tensor table, and check it is complete.

    Args:
        path: the .gguf file.

    Returns:
        The file's architecture, size, quantization and other facts.

    Raises:
        InvalidModelFileError: not a GGUF file, corrupt, or truncated.
    """
    check_complete(path)
    try:
        from gguf import GGUFReader, LlamaFileType

        reader = GGUFReader(path, "r")
    except Exception as exc:  # gguf raises many types on corrupt input; all mean "corrupt"
        raise InvalidModelFileError(
            str(path), f"is corrupt or truncated ({type(exc).__name__}: {exc})",
            hint="download or convert it again",
        ) from None
    size = path.stat().st_size
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = _field_value(fld)
        except Exception:  # one odd field should not hide the rest
            meta[key] = "?"
    arch = str(meta.get("general.architecture", "unknown"))
    file_type = meta.get("general.file_type")
    quant = "unknown"
    if isinstance(file_type, int):
        try:
            quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            quant = f"type {file_type}"
    else:
        # Without general.file_type, name the most common tensor type among 2-D weights.
        counts: dict[str, int] = {}
        for t in reader.tensors:
            if len(t.shape) >= 2:
                counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        if counts:
            quant = max(counts, key=lambda k: counts[k])
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    ctx = meta.get(f"{arch}.context_length", 0)
    return GGUFInfo(
        path=str(path),
        size_bytes=size,
        architecture=arch,
        name=str(meta.get("general.name", path.stem)),
        parameters=n_params,
        quantization=quant,
        context_length=int(ctx) if isinstance(ctx, int) else 0,
        chat_template=str(meta.get("tokenizer.chat_template", "")),
        tensor_count=len(reader.tensors),
        gguf_version=int(meta.get("GGUF.version", 3) or 3),
        metadata={k: _summarize(v) for k, v in meta.items() if k != "tokenizer.chat_template"},
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
