"""GGUF headers: the facts `show` prints, and the checks that keep llama.cpp from aborting."""

from __future__ import annotations

import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmkit.errors import InvalidModelFileError, UsageError
from llmkit.io import printable

GGUF_MAGIC = b"GGUF"
HINT = "download or convert it again"


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


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_file(path: Path) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a directory, else None.

    Decided from ``stat`` alone: opening a FIFO for reading blocks until someone writes to it,
    and a device such as /dev/zero never ends.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, kind in _SPECIAL_KINDS:
        if test(mode):
            return kind
    return None


def check_output(path: Path, *, force: bool) -> None:
    """Check that a GGUF may be written at ``path`` (renamed into place over what is there).

    Raises:
        UsageError: ``path`` exists and ``force`` is false, or it is a directory, a device or
            a FIFO, which a rename would replace (as root, even /dev/null).
    """
    if path.is_dir():
        raise UsageError(f"{path} is a directory", hint="give the path of the .gguf to write")
    kind = special_file(path)
    if kind is not None:
        raise UsageError(f"{path} is {kind}, not a file llmkit can replace",
                         hint="give the path of the .gguf to write")
    if path.exists() and not force:
        raise UsageError(f"{path} exists", hint="pass --force to replace it")


def check_header(path: Path) -> None:
    """Cheap check that ``path`` is a regular file that starts like a GGUF file.

    Raises:
        InvalidModelFileError: missing, a directory or other non-regular file, empty, or
            without the GGUF magic.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InvalidModelFileError(str(path), "no such file") from None
    except OSError as exc:
        raise InvalidModelFileError(str(path), f"cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise InvalidModelFileError(str(path), "is a directory, not a .gguf file")
    kind = special_file(path)
    if kind is not None or not stat.S_ISREG(mode):
        raise InvalidModelFileError(str(path), f"is {kind or 'not a regular file'}, not a "
                                    ".gguf file", hint="give the path of a model file")
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


# -- walking the header -----------------------------------------------------------------------


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


# GGUF value types by id (the GGUF spec's gguf_type enum, as gguf.GGUFValueType):
# uint8 int8 uint16 int16 uint32 int32 float32 bool string array uint64 int64 float64.
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL = 0, 1, 2, 3, 4, 5, 6, 7
STRING, ARRAY, UINT64, INT64, FLOAT64 = 8, 9, 10, 11, 12
_SCALARS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
            FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_TYPE_NAMES = {UINT8: "uint8", INT8: "int8", UINT16: "uint16", INT16: "int16", UINT32: "uint32",
               INT32: "int32", FLOAT32: "float32", BOOL: "bool", STRING: "string",
               ARRAY: "array", UINT64: "uint64", INT64: "int64", FLOAT64: "float64"}
_INTS = frozenset({UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64})
_FLOATS = frozenset({FLOAT32, FLOAT64})
# Arrays longer than this are summarized as "[N items]" in `show`'s metadata.
_KEEP_ITEMS = 8
# Numeric arrays up to this length are read whole, for the checks (per-layer values).
_READ_ITEMS = 4096
# ggml's limits (ggml.h): dimensions per tensor and bytes in a tensor name, with its NUL.
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
_U64 = struct.Struct("<Q")


@dataclass
class _Tensor:
    name: str
    dims: tuple[int, ...]
    type_id: int
    offset: int  # relative to the start of the data section
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)

    @property
    def n_dims(self) -> int:
        return len(self.dims)


@dataclass
class _Array:
    item_type: int
    count: int
    items: list[Any] | None  # None when too long to keep


@dataclass
class _Parsed:
    """A GGUF header as read: metadata values (arrays as _Array), tensors, and where data lies."""

    path: Path
    version: int
    values: dict[str, Any]
    types: dict[str, int]
    tokens: list[bytes] | None
    tensors: list[_Tensor]
    size: int
    alignment: int
    data_start: int


class _HeaderReader:
    """Walks a GGUF header with bounds checks, so damage is named precisely."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise _Truncated()
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def raw_string(self) -> bytes:
        n = self.unpack("<Q")
        if n > 1 << 30:
            raise _Corrupt(f"a string of {n} bytes")
        if self.pos + n > self.size:
            raise _Truncated()
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw

    def string(self) -> str:
        return self.raw_string().decode("utf-8", "replace")

    def strings(self, count: int, keep: bool) -> list[bytes] | None:
        """Walk ``count`` strings; the loop is tight because vocabularies hold 100k+ of them."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        kept: list[bytes] = []
        append = kept.append
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated()
            (n,) = unpack(buf, pos)
            pos += 8
            end = pos + n
            if end > size:
                if n > 1 << 30:
                    raise _Corrupt(f"a string of {n} bytes")
                raise _Truncated()
            if keep:
                append(buf[pos:end])
            pos = end
        self.pos = pos
        return kept if keep else None

    def value(self, vtype: int, keep_strings: bool = False) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY:
            raise _Corrupt(f"unknown metadata value type {vtype}")
        item_type, count = self.unpack("<I"), self.unpack("<Q")
        if count > 1 << 32:
            raise _Corrupt(f"an array of {count} items")
        if item_type in _SCALARS:
            fmt = _SCALARS[item_type]
            width = struct.calcsize(fmt)
            if self.pos + width * count > self.size:
                raise _Truncated()
            items = (list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
                     if count <= _READ_ITEMS else None)
            self.pos += width * count
            return _Array(item_type, count, items)
        if item_type == STRING:
            raw = self.strings(count, keep=keep_strings or count <= _KEEP_ITEMS)
            return _Array(STRING, count, raw)
        raise _Corrupt(f"an array of value type {item_type}")


def _parse(path: Path) -> _Parsed:
    """Parse header, metadata and tensor table; check the layout and that the data is all there.

    Raises:
        InvalidModelFileError: not a GGUF, corrupt, truncated, or laid out as llama.cpp refuses.
    """
    import mmap

    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    check_header(path)
    size = path.stat().st_size
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
            values: dict[str, Any] = {}
            types: dict[str, int] = {}
            tokens: list[bytes] | None = None
            for _ in range(n_kv):
                key = reader.string()
                if key in values:
                    raise _Corrupt(f"the metadata key {key} appears twice")
                vtype = reader.unpack("<I")
                is_vocab = key == "tokenizer.ggml.tokens"
                value = reader.value(vtype, keep_strings=is_vocab)
                if is_vocab and isinstance(value, _Array) and value.item_type == STRING:
                    tokens = value.items
                values[key], types[key] = value, vtype
            tensors: list[_Tensor] = []
            seen: set[str] = set()
            for _ in range(n_tensors):
                name = reader.string()
                if name in seen:
                    raise _Corrupt(f"tensor {name} appears twice")
                seen.add(name)
                if len(name.encode("utf-8")) >= GGML_MAX_NAME:
                    raise _Corrupt(f"tensor name {name[:40]}… is longer than ggml allows")
                n_dims = reader.unpack("<I")
                if not 1 <= n_dims <= GGML_MAX_DIMS:
                    raise _Corrupt(f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to "
                                   f"{GGML_MAX_DIMS})")
                dims = tuple(reader.unpack("<Q") for _ in range(n_dims))
                type_id, offset = reader.unpack("<I"), reader.unpack("<Q")
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
                except (ValueError, KeyError):
                    raise _Corrupt(f"tensor {name} has unknown type {type_id}") from None
                if any(d == 0 for d in dims):
                    raise _Corrupt(f"tensor {name} has a dimension of 0 {list(dims)}")
                if math.prod(dims) >= 1 << 62:
                    raise _Corrupt(f"tensor {name} has {math.prod(dims)} elements")
                if dims[0] % block:
                    raise _Corrupt(
                        f"tensor {name} has rows of {dims[0]} values, not a multiple of its "
                        f"type's block of {block} ({GGMLQuantizationType(type_id).name})")
                tensors.append(_Tensor(name, dims, type_id, offset,
                                       math.prod(dims) // block * type_size))
        except _Truncated:
            raise InvalidModelFileError(
                str(path), f"is truncated (the header runs past the end at {size} bytes)",
                hint=HINT) from None
        except _Corrupt as exc:
            # Tensor names and keys are the file's words: shown escaped (see _Checks.fail).
            raise InvalidModelFileError(str(path), f"is corrupt ({printable(str(exc))})",
                                        hint=HINT) from None
    alignment = values.get("general.alignment", 32)
    if "general.alignment" in values and (
            types["general.alignment"] != UINT32 or alignment <= 0
            or alignment & (alignment - 1)):
        raise InvalidModelFileError(
            str(path), f"is corrupt (general.alignment is {_show(alignment)}; it must be a "
                       "uint32 power of two)", hint=HINT)
    data_start = -(-reader.pos // alignment) * alignment
    # gguf.cpp requires each tensor right after the one before, padded to the alignment.
    expected = 0
    for t in tensors:
        if t.offset != expected:
            raise InvalidModelFileError(
                str(path), f"is corrupt (tensor {printable(t.name)} starts at offset "
                           f"{t.offset} of the data, not at {expected} where the tensor before "
                           "it ends)", hint=HINT)
        expected = t.offset + -(-t.nbytes // alignment) * alignment
    needed = data_start + (tensors[-1].offset + tensors[-1].nbytes if tensors else 0)
    if needed > size:
        raise InvalidModelFileError(
            str(path), f"is truncated ({size} bytes; its tensors need {needed})", hint=HINT)
    return _Parsed(path, version, values, types, tokens, tensors, size, alignment, data_start)


def _show(value: Any) -> str:
    if isinstance(value, _Array):
        return f"an array of {value.count} {_TYPE_NAMES.get(value.item_type, '?')}"
    if isinstance(value, str):
        return repr(value[:60])
    return str(value)


def _plain(value: Any) -> Any:
    """A metadata value as `show` prints it: short arrays as lists, long ones summarized."""
    if not isinstance(value, _Array):
        return value
    if value.items is None or value.count > _KEEP_ITEMS:
        return f"[{value.count} items]"
    if value.item_type == STRING:
        return [bytes(b).decode("utf-8", "replace") for b in value.items]
    return list(value.items)


# -- what llama.cpp asserts on ----------------------------------------------------------------

# llama.cpp's limits (src/llama-hparams.h of the version llama-cpp-python 0.3.36 vendors).
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
# llama_rope_scaling_type_from_string; anything else trips a GGML_ASSERT in load_hparams.
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# Tokenizer models llama_vocab::load knows; "none"/"no_vocab" load but cannot tokenize.
TOKENIZER_MODELS = ("llama", "bert", "gpt2", "t5", "rwkv", "plamo2")
NO_TOKENIZER = ("none", "no_vocab")
SPECIAL_TOKENS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "mask",
                  "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep",
                  "prefix", "suffix", "middle")
# The ids llama_vocab::load starts from for each tokenizer model (llama-vocab.cpp); a file's own
# id replaces one only when it is inside the vocabulary, else llama.cpp warns and keeps this.
DEFAULT_SPECIAL_IDS: dict[str, dict[str, int]] = {
    "llama": {"bos": 1, "eos": 2, "unknown": 0},
    "bert": {"bos": 101, "unknown": 100, "seperator": 102, "padding": 0, "mask": 103},
    "gpt2": {"bos": 11, "eos": 11},
    "t5": {"eos": 1, "unknown": 2, "padding": 0},
    "plamo2": {"bos": 1, "eos": 2, "unknown": 0, "padding": 3},
}
# Architectures every layer of which has attention: a layer with no key/value heads would
# divide by zero or trip a shape assert in the graph. (Hybrid recurrent models put 0 there on
# purpose, so the rule is not applied to every architecture.)
DENSE_ATTENTION = frozenset({
    "llama", "llama4", "mistral3", "gemma", "gemma2", "gemma3", "qwen2", "qwen2vl",
    "qwen25vl", "qwen3", "qwen3vl", "phi3", "starcoder2", "smollm3", "olmo2", "granite",
    "deci", "exaone", "cohere2", "internlm2", "stablelm", "baichuan",
})
# Whose graphs assert head size == RoPE dimensions == value head size (models/llama*.cpp).
ROPE_IS_HEAD = frozenset({"llama", "llama4", "deci", "mistral3"})
# Multimodal RoPE: four sections of the rotary dimensions; their sum divides in the kernel.
MROPE = frozenset({"qwen2vl", "qwen25vl", "qwen3vl", "qwen3vlmoe"})
_BLK = re.compile(r"blk\.(\d+)\.")
_V_BLK = re.compile(r"v\.blk\.(\d+)\.")


class _Checks:
    """Typed access to metadata keys; every problem is an InvalidModelFileError for the file."""

    def __init__(self, parsed: _Parsed) -> None:
        self.p = parsed

    def fail(self, problem: str, hint: str = HINT) -> InvalidModelFileError:
        # Problems name the file's own keys, architecture and tensor names, which may hold a
        # newline (a forged second error line) or a terminal escape sequence: escaped here.
        return InvalidModelFileError(str(self.p.path), printable(problem), hint=hint)

    def has(self, key: str) -> bool:
        return key in self.p.values

    def _type_error(self, key: str, wanted: str) -> InvalidModelFileError:
        value = self.p.values[key]
        got = (f"an array of {_TYPE_NAMES.get(value.item_type, '?')}"
               if isinstance(value, _Array) else _TYPE_NAMES.get(self.p.types[key], "?"))
        return self.fail(f"{key} is {got}, but llama.cpp reads it as {wanted}")

    def u32(self, key: str, *, required: bool = False, default: int = 0) -> int:
        if key not in self.p.values:
            if required:
                raise self.fail(f"{key} is missing")
            return default
        if self.p.types[key] != UINT32:
            raise self._type_error(key, "uint32")
        return int(self.p.values[key])

    def f32(self, key: str, *, default: float | None = None) -> float | None:
        if key not in self.p.values:
            return default
        if self.p.types[key] != FLOAT32:
            raise self._type_error(key, "float32")
        return float(self.p.values[key])

    def string(self, key: str, *, required: bool = False) -> str | None:
        if key not in self.p.values:
            if required:
                raise self.fail(f"{key} is missing")
            return None
        if self.p.types[key] != STRING:
            raise self._type_error(key, "a string")
        return str(self.p.values[key])

    def per_layer(self, key: str, n_layer: int, *, default: int) -> list[int]:
        """A uint32 key or a per-layer array of n_layer ints (llama.cpp's get_key_or_arr)."""
        value = self.p.values.get(key)
        if value is None:
            return [default] * n_layer
        if not isinstance(value, _Array):
            return [self.u32(key)] * n_layer
        if value.item_type not in (UINT32, INT32):
            raise self._type_error(key, "uint32 or an array of them")
        if value.count != n_layer:
            raise self.fail(f"{key} has {value.count} entries, one per layer was expected "
                            f"({n_layer})")
        assert value.items is not None  # n_layer <= LLAMA_MAX_LAYERS < _READ_ITEMS
        return [int(v) for v in value.items]

    def array(self, key: str) -> _Array | None:
        value = self.p.values.get(key)
        if value is None:
            return None
        if not isinstance(value, _Array):
            raise self._type_error(key, "an array")
        return value

    def positive(self, key: str, value: float, what: str) -> None:
        if not (math.isfinite(value) and value > 0):
            raise self.fail(f"{key} is {value}; {what} must be a positive number")

    def finite_floats(self, prefix: str) -> None:
        """NaN or infinity in any float of the architecture's hyperparameters."""
        for key, value in self.p.values.items():
            if not key.startswith(prefix):
                continue
            items = (value.items or [] if isinstance(value, _Array)
                     and value.item_type in _FLOATS else
                     [value] if self.p.types[key] in _FLOATS else [])
            for item in items:
                if not math.isfinite(item):
                    raise self.fail(f"{key} is {item}; it must be a finite number")

    def layer_indices(self, pattern: re.Pattern[str], n_layer: int, key: str, *,
                      extra_ok: bool = False) -> None:
        """The ``blk.N`` tensors present are exactly those of layers 0 … n_layer-1 (or, with
        ``extra_ok``, at least those: mtmd loads a projector's tensors by name and leaves
        unused layers alone, and published converters keep the layer a model skips)."""
        present = set()
        for t in self.p.tensors:
            m = pattern.match(t.name)
            if m:
                present.add(int(m.group(1)))
        if present == set(range(n_layer)) or (extra_ok and present >= set(range(n_layer))):
            return
        if not present:
            raise self.fail(f"{key} is {n_layer}, but the file holds no layer tensors")
        top = max(present)
        if top >= n_layer or len(present) != top + 1:
            missing = sorted(set(range(max(top + 1, n_layer))) - present)
            holds = (f"tensors for {len(present)} layers (up to layer {top})"
                     if not missing or top >= n_layer else
                     f"no tensors for layer {missing[0]}")
            raise self.fail(f"{key} is {n_layer}, but the file holds {holds}")
        raise self.fail(f"{key} is {n_layer}, but the file holds tensors for {len(present)} "
                        "layers")


def _check_model(parsed: _Parsed) -> str:
    """What llama.cpp's load_hparams, vocabulary loader and graphs assert on, checked first.

    Sources (the llama.cpp that llama-cpp-python 0.3.36 vendors): src/llama-model.cpp
    load_hparams (layer and expert counts, RoPE scaling type), src/llama-model-loader.cpp
    (key types, per-layer arrays), src/llama-vocab.cpp load (token arrays read by index,
    duplicate tokens, SPM byte tokens), src/models/*.cpp (head sizes), ggml-cpu (norm epsilon).
    """
    c = _Checks(parsed)
    arch = c.string("general.architecture")
    if arch is None:
        raise c.fail("has no general.architecture, so llama.cpp cannot tell what model it is")
    if arch == "clip":
        raise c.fail("is a vision projector (mmproj), not a model",
                     hint="pass the language model with -m and this file with --mmproj")
    a = f"{arch}."
    n_layer = c.u32(a + "block_count", required=True)
    if not 1 <= n_layer <= LLAMA_MAX_LAYERS:
        raise c.fail(f"{a}block_count is {n_layer}, but a model has 1 to {LLAMA_MAX_LAYERS} "
                     "layers")
    if c.u32(a + "nextn_predict_layers") > n_layer:
        raise c.fail(f"{a}nextn_predict_layers is larger than {a}block_count ({n_layer})")
    c.layer_indices(_BLK, n_layer, a + "block_count")
    c.finite_floats(a)

    n_embd = c.u32(a + "embedding_length")
    heads = c.per_layer(a + "attention.head_count", n_layer, default=0)
    kv_heads = c.per_layer(a + "attention.head_count_kv", n_layer, default=-1)
    kv_heads = [h if k == -1 else k for h, k in zip(heads, kv_heads, strict=True)]
    c.per_layer(a + "feed_forward_length", n_layer, default=0)
    for il, (h, kv) in enumerate(zip(heads, kv_heads, strict=True)):
        where = f" in layer {il}" if len(set(heads)) > 1 or len(set(kv_heads)) > 1 else ""
        if h == 0 and arch in DENSE_ATTENTION:
            raise c.fail(f"{a}attention.head_count is 0{where}; every layer of a {arch} model "
                         "has attention heads")
        if kv == 0 and h > 0 and arch in DENSE_ATTENTION:
            raise c.fail(f"{a}attention.head_count_kv is 0{where}; every layer of a {arch} "
                         "model has key/value heads")
        if kv > h or (kv and h % kv):
            raise c.fail(f"{a}attention.head_count_kv is {kv}{where}, which does not divide "
                         f"the {h} attention heads")
    if heads[0] > 0:
        explicit = c.has(a + "attention.key_length") and c.has(a + "attention.value_length")
        if not explicit and (n_embd == 0 or n_embd % heads[0]):
            raise c.fail(f"{a}embedding_length is {n_embd}, which does not divide into "
                         f"{heads[0]} attention heads ({a}attention.head_count)")
        key_len = c.u32(a + "attention.key_length", default=n_embd // heads[0])
        value_len = c.u32(a + "attention.value_length", default=n_embd // heads[0])
        for name, size in (("key_length", key_len), ("value_length", value_len)):
            if size == 0:
                raise c.fail(f"{a}attention.{name} is 0; an attention head has a size")
        n_rot = c.u32(a + "rope.dimension_count", default=key_len)
        if n_rot > key_len or n_rot % 2:
            raise c.fail(f"{a}rope.dimension_count is {n_rot}; it must be even and at most "
                         f"the head size ({key_len})")
        if arch in ROPE_IS_HEAD and not key_len == value_len == n_rot:
            raise c.fail(f"{a}rope.dimension_count ({n_rot}), the key head size ({key_len}) "
                         f"and the value head size ({value_len}) differ; a {arch} model "
                         "needs them equal")
    _check_experts(c, a, n_layer, arch)
    _check_rope(c, a, arch)
    for key in (a + "attention.layer_norm_rms_epsilon", a + "attention.layer_norm_epsilon"):
        eps = c.f32(key)
        if eps is not None:
            c.positive(key, eps, "a norm epsilon")
    _check_vocab(c)
    return arch


def _check_experts(c: _Checks, a: str, n_layer: int, arch: str) -> None:
    n_expert = c.u32(a + "expert_count")
    used = max(c.per_layer(a + "expert_used_count", n_layer, default=0))
    groups = c.u32(a + "expert_group_count")
    group_used = c.u32(a + "expert_group_used_count")
    if n_expert > LLAMA_MAX_EXPERTS:
        raise c.fail(f"{a}expert_count is {n_expert}; llama.cpp runs at most "
                     f"{LLAMA_MAX_EXPERTS} experts")
    if used > n_expert:
        raise c.fail(f"{a}expert_used_count is {used}, more than {a}expert_count ({n_expert})")
    if n_expert > 0:
        if used == 0:
            raise c.fail(f"{a}expert_used_count is 0, but the model has {n_expert} experts")
        if groups >= n_expert or (groups > 1 and (n_expert % groups or not
                                                  0 < group_used < groups)):
            raise c.fail(f"{a}expert_group_count ({groups}) and expert_group_used_count "
                         f"({group_used}) do not split the {n_expert} experts into groups")
    elif groups:
        raise c.fail(f"{a}expert_group_count is {groups}, but the model has no experts")
    elif arch == "llama4":
        raise c.fail(f"{a}expert_count is 0; llama.cpp cannot load a llama4 model without "
                     "experts")


def _check_rope(c: _Checks, a: str, arch: str) -> None:
    scaling = c.string(a + "rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise c.fail(f"{a}rope.scaling.type is {scaling!r}; llama.cpp knows "
                     f"{', '.join(ROPE_SCALING_TYPES)}")
    for key in (a + "rope.freq_base", a + "rope.freq_base_swa"):
        base = c.f32(key)
        if base is not None:
            c.positive(key, base, "a RoPE base frequency")
    factor = c.f32(a + "rope.scaling.factor")
    if factor is not None and factor < 0:
        raise c.fail(f"{a}rope.scaling.factor is {factor}; it cannot be negative")
    if arch in MROPE:
        sections = c.array(a + "rope.dimension_sections")
        items = sections.items if sections is not None else None
        if (sections is None or sections.item_type not in (UINT32, INT32) or items is None
                or len(items) != 4 or min(items) < 0 or sum(items) == 0):
            raise c.fail(f"{a}rope.dimension_sections must be four non-negative counts, not "
                         "all zero (multimodal RoPE divides by their sum)")


def _check_vocab(c: _Checks) -> None:
    """The vocabulary arrays llama.cpp indexes by token id without bounds checks."""
    tok = "tokenizer.ggml."
    model = c.string(tok + "model", required=True)
    if model in NO_TOKENIZER:
        raise c.fail(f"{tok}model is {model!r}: the file has no tokenizer, and llmkit needs one "
                     "to turn text into tokens", hint="use a GGUF that includes its vocabulary")
    if model not in TOKENIZER_MODELS:
        raise c.fail(f"{tok}model is {model!r}; llama.cpp knows {', '.join(TOKENIZER_MODELS)}")
    tokens = c.array(tok + "tokens")
    if tokens is None or tokens.item_type != STRING:
        raise c.fail(f"{tok}tokens is missing or not a list of strings")
    n_vocab = tokens.count
    if not 0 < n_vocab < 1 << 31:
        raise c.fail(f"{tok}tokens has {n_vocab} tokens")
    for key, item_type in ((tok + "scores", FLOAT32), (tok + "token_type", INT32)):
        values = c.array(key)
        if values is None:
            continue
        # llama_vocab::load reads these through a raw pointer, one entry per token.
        if values.item_type != item_type:
            raise c.fail(f"{key} is an array of {_TYPE_NAMES.get(values.item_type, '?')}, but "
                         f"llama.cpp reads it as {_TYPE_NAMES[item_type]}")
        if values.count != n_vocab:
            raise c.fail(f"{key} has {values.count} entries for {n_vocab} tokens")
    if model == "gpt2":
        merges = c.array(tok + "merges")
        if merges is None or merges.item_type != STRING:
            raise c.fail(f"{tok}merges is missing or not a list of strings (a BPE vocabulary "
                         "needs its merges)")
    defaults = DEFAULT_SPECIAL_IDS.get(model, {})
    for name in SPECIAL_TOKENS:
        key = f"{tok}{name}_token_id"
        token_id = c.u32(key) if c.has(key) else None
        if token_id is not None and token_id < n_vocab:
            continue
        # An id past the vocabulary is ignored by llama.cpp (published files have such padding
        # ids and run): what must be inside it is the id llama.cpp then uses, its default.
        default = defaults.get(name)
        if default is not None and default >= n_vocab:
            given = f"is {token_id}" if token_id is not None else "is not set"
            raise c.fail(f"{key} {given}, and llama.cpp's default for it ({default}) is past "
                         f"the vocabulary of {n_vocab} tokens")
    words = c.p.tokens
    if words is None:
        return
    # llama.cpp maps each token's text to its id and asserts that no two share one; it
    # names empty tokens "[EMPTY_<id>]" first.
    texts = [w if w else f"[EMPTY_{i}]".encode() for i, w in enumerate(words)]
    if len(set(texts)) != len(texts):
        first: dict[bytes, int] = {}
        for i, w in enumerate(texts):
            if w in first:
                shown = bytes(w).decode("utf-8", "replace")[:40]
                raise c.fail(f"{tok}tokens lists {shown!r} twice (tokens {first[w]} and {i})")
            first[w] = i
    if model == "llama":
        # SentencePiece byte fallback looks up "<0xXX>" (or the raw byte) for any byte it has
        # no piece for, with std::map::at: a missing one ends the process mid-tokenization.
        known = set(texts)
        # (Byte 0 has no raw form: as a C string it is empty.)
        missing = [b for b in range(256) if f"<0x{b:02X}>".encode() not in known
                   and (b == 0 or bytes([b]) not in known)]
        if missing:
            raise c.fail(f"{tok}tokens lacks the byte token <0x{missing[0]:02X}> (and "
                         f"{len(missing) - 1} more) that a SentencePiece ('llama') vocabulary "
                         "needs for bytes it has no piece for")


def _check_projector(parsed: _Parsed) -> None:
    """What mtmd's clip loader and graphs divide by or assert on (tools/mtmd/clip.cpp)."""
    c = _Checks(parsed)
    arch = c.string("general.architecture")
    if arch != "clip":
        what = f"a {arch} model" if arch else "not a projector"
        raise c.fail(f"is {what}, not a vision projector (mmproj)",
                     hint="pass the mmproj-*.gguf file published with the model")
    has_vision = c.p.values.get("clip.has_vision_encoder")
    if has_vision is not True:
        raise c.fail("has no vision encoder (clip.has_vision_encoder is not true), so it "
                     "cannot read images", hint="use the model's image projector")
    v = "clip.vision."
    c.finite_floats("clip.")
    image_size = c.u32(v + "image_size", required=True)
    patch_size = c.u32(v + "patch_size", required=True)
    if image_size > 1 << 15:
        raise c.fail(f"{v}image_size is {image_size}; image encoders take at most "
                     f"{1 << 15} pixels a side")
    if not 0 < patch_size <= image_size or image_size % patch_size:
        raise c.fail(f"{v}image_size ({image_size}) is not a whole number of "
                     f"{v}patch_size ({patch_size}) patches")
    n_embd = c.u32(v + "embedding_length", required=True)
    n_head = c.u32(v + "attention.head_count", required=True)
    if n_head == 0 or n_embd == 0 or n_embd % n_head:
        raise c.fail(f"{v}embedding_length ({n_embd}) does not divide into {n_head} attention "
                     f"heads ({v}attention.head_count)")
    if c.u32(v + "feed_forward_length", required=True) == 0:
        raise c.fail(f"{v}feed_forward_length is 0")
    n_layer = c.u32(v + "block_count", required=True)
    if not 1 <= n_layer <= LLAMA_MAX_LAYERS:
        raise c.fail(f"{v}block_count is {n_layer}, but an image encoder has 1 to "
                     f"{LLAMA_MAX_LAYERS} layers")
    c.layer_indices(_V_BLK, n_layer, v + "block_count", extra_ok=True)
    eps = c.f32(v + "attention.layer_norm_epsilon")
    if eps is None:
        raise c.fail(f"{v}attention.layer_norm_epsilon is missing")
    c.positive(v + "attention.layer_norm_epsilon", eps, "a norm epsilon")
    for key in (v + "image_mean", v + "image_std"):
        values = c.array(key)
        if values is None:
            continue
        if values.item_type != FLOAT32 or values.count != 3 or not values.items:
            raise c.fail(f"{key} must be three float32 values (red, green, blue)")
        if key.endswith("std") and min(values.items) <= 0:
            raise c.fail(f"{key} has a value of {min(values.items)}; pixels are divided by it")
    scale = c.p.values.get(v + "projector.scale_factor")
    if scale is not None:
        scale = c.u32(v + "projector.scale_factor")
        per_side = image_size // patch_size
        projector_type = c.string("clip.projector_type") or ""
        # Idefics3's pixel shuffle folds scale × scale patches into one token.
        if scale == 0 or scale > per_side or (projector_type == "idefics3" and per_side % scale):
            raise c.fail(f"{v}projector.scale_factor is {scale}, which does not divide the "
                         f"{per_side} patches per side of an image")


# -- public entry points ----------------------------------------------------------------------


def check_model_file(path: Path) -> str:
    """Check a model file before llama.cpp loads it (llama.cpp aborts where llmkit must error).

    Returns:
        The model's architecture (``general.architecture``), which picks its engine.

    Raises:
        InvalidModelFileError: not a regular file, not a complete GGUF, a projector, or header
            values llama.cpp would abort on.
    """
    return _check_model(_parse(path))


def check_model_header(path: Path) -> tuple[str, Header]:
    """:func:`check_model_file`, giving the checked header too, so that a caller that reads the
    header as well (the memory estimate) does not parse the file a second time.

    Raises:
        InvalidModelFileError: as :func:`check_model_file`.
    """
    parsed = _parse(path)
    return _check_model(parsed), Header(parsed)


def check_projector_file(path: Path) -> None:
    """Check a vision projector (mmproj) file before mtmd loads it.

    Raises:
        InvalidModelFileError: not a regular file, not a complete GGUF, not an image
            projector, or clip metadata mtmd would divide by zero or assert on.
    """
    _check_projector(_parse(path))


def check_file(path: Path, kind: str | None = None) -> GGUFInfo:
    """Check a model or a projector and describe it.

    Used where a file is taken in (show, import, pull, quantize, convert's output), so that
    whatever llmkit accepts, llama.cpp can load.

    Args:
        path: the .gguf file.
        kind: "model" or "projector"; None checks the file as what it says it is.

    Raises:
        InvalidModelFileError: as :func:`check_model_file` or :func:`check_projector_file`.
    """
    parsed = _parse(path)
    if kind is None:
        kind = "projector" if parsed.values.get("general.architecture") == "clip" else "model"
    if kind == "projector":
        _check_projector(parsed)
    else:
        _check_model(parsed)
    return _info(parsed)


def check_complete(path: Path) -> None:
    """Check that ``path`` is a GGUF whose header parses and whose tensor data is all present.

    Raises:
        InvalidModelFileError: not a GGUF, corrupt header, or truncated anywhere.
    """
    _parse(path)


def read_info(path: Path) -> GGUFInfo:
    """Parse a GGUF file's metadata and tensor table, and check it is complete.

    gguf's own GGUFReader takes seconds on a large vocabulary (a numpy view per token), so
    the header is walked here with the gguf package's type tables. The values are not checked
    against what llama.cpp accepts; :func:`check_file` does that.

    Args:
        path: the .gguf file.

    Returns:
        The file's architecture, size, quantization and other facts.

    Raises:
        InvalidModelFileError: not a GGUF file, corrupt, or truncated.
    """
    return _info(_parse(path))


def _info(parsed: _Parsed) -> GGUFInfo:
    from gguf import GGMLQuantizationType, LlamaFileType

    meta = {k: _plain(v) for k, v in parsed.values.items()}
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
        for t in parsed.tensors:
            if t.n_dims >= 2:
                type_name = GGMLQuantizationType(t.type_id).name
                counts[type_name] = counts.get(type_name, 0) + 1
        if counts:
            quant = max(counts, key=lambda k: counts[k])
    ctx = meta.get(f"{arch}.context_length", 0)
    template = meta.get("tokenizer.chat_template", "")
    return GGUFInfo(
        path=str(parsed.path),
        size_bytes=parsed.size,
        architecture=arch,
        name=str(meta.get("general.name", parsed.path.stem)),
        parameters=sum(t.n_elements for t in parsed.tensors),
        quantization=quant,
        context_length=int(ctx) if isinstance(ctx, int) and not isinstance(ctx, bool) else 0,
        chat_template=template if isinstance(template, str) else "",
        tensor_count=len(parsed.tensors),
        gguf_version=parsed.version,
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


# -- a checked header for llmkit's own engines -------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF as its header describes it, bounds already checked."""

    name: str
    ne: tuple[int, ...]
    """Dimensions in ggml's order (``ne[0]`` the innermost)."""
    type_id: int
    """The ggml type (``gguf.GGMLQuantizationType`` value)."""
    offset: int
    """Where its data starts, from the start of the file."""
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Dimensions in numpy's order (the outermost first)."""
        return self.ne[::-1]


class Header(_Checks):
    """A GGUF header read with the checks every load gets: typed metadata and tensor table.

    For engines of llmkit's own (Llama 3.2 Vision), which take their hyperparameters from the
    file: every value they trust comes through these accessors, so a wrong type, a missing key
    or an array of the wrong length is one InvalidModelFileError naming the key.
    """

    def _type_error(self, key: str, wanted: str) -> InvalidModelFileError:
        value = self.p.values[key]
        got = (f"an array of {_TYPE_NAMES.get(value.item_type, '?')}"
               if isinstance(value, _Array) else _TYPE_NAMES.get(self.p.types[key], "?"))
        return self.fail(f"{key} is {got}; it must be {wanted}")

    @property
    def path(self) -> Path:
        """The file."""
        return self.p.path

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return self.p.size

    @property
    def data_start(self) -> int:
        """Where the tensor data section starts (aligned)."""
        return self.p.data_start

    @property
    def alignment(self) -> int:
        """The data section's alignment in bytes."""
        return int(self.p.alignment)

    def tensors(self) -> dict[str, TensorEntry]:
        """Every tensor by name, in file order."""
        start = self.p.data_start
        return {t.name: TensorEntry(t.name, t.dims, t.type_id, start + t.offset, t.nbytes)
                for t in self.p.tensors}

    def ints(self, key: str, *, required: bool = True, max_len: int = _READ_ITEMS
             ) -> list[int]:
        """An array of integers (any integer type).

        Raises:
            InvalidModelFileError: missing (when required), not an integer array, or longer
                than ``max_len``.
        """
        value = self.array(key)
        if value is None:
            if required:
                raise self.fail(f"{key} is missing")
            return []
        if value.item_type not in _INTS:
            raise self._type_error(key, "an array of integers")
        if value.count > max_len or value.items is None:
            raise self.fail(f"{key} has {value.count} entries; at most {max_len} are expected")
        return [int(v) for v in value.items]

    def floats(self, key: str, *, required: bool = True, max_len: int = _READ_ITEMS
               ) -> list[float]:
        """An array of finite floats.

        Raises:
            InvalidModelFileError: missing (when required), not a float array, longer than
                ``max_len``, or holding NaN or infinity.
        """
        value = self.array(key)
        if value is None:
            if required:
                raise self.fail(f"{key} is missing")
            return []
        if value.item_type not in _FLOATS:
            raise self._type_error(key, "an array of floats")
        if value.count > max_len or value.items is None:
            raise self.fail(f"{key} has {value.count} entries; at most {max_len} are expected")
        items = [float(v) for v in value.items]
        if not all(math.isfinite(v) for v in items):
            raise self.fail(f"{key} holds a value that is not a finite number")
        return items

    def require_f32(self, key: str) -> float:
        """A float32 key that must be present and finite.

        Raises:
            InvalidModelFileError: missing, not float32, or not finite.
        """
        value = self.f32(key)
        if value is None:
            raise self.fail(f"{key} is missing")
        if not math.isfinite(value):
            raise self.fail(f"{key} is {value}; it must be a finite number")
        return value


def read_header(path: Path) -> Header:
    """Parse and check a GGUF's layout (as every load does) and give typed access to it.

    Raises:
        InvalidModelFileError: not a regular file, not a complete GGUF, or corrupt.
    """
    return Header(_parse(path))
