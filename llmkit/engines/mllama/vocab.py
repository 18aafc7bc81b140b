"""Llama 3.2 Vision's tokenizer: llama.cpp's own BPE through a vocabulary-only companion GGUF."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import InvalidModelFileError

if TYPE_CHECKING:
    from llmkit.engines.mllama.hparams import TextParams

# Bumped whenever what a companion holds changes, so that caches written before are not reused.
COMPANION_FORMAT = 1

# GGUF value type ids (the GGUF spec's gguf_type) and the byte width of each fixed-size one.
_STRING, _ARRAY = 8, 9
_WIDTHS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_UINT32, _FLOAT32 = 4, 6
_TOKENS_KEY = b"tokenizer.ggml.tokens"
_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT

_HINT = "convert the checkpoint again with `llmkit convert`"


def tokenizer_entries(path: Path) -> list[bytes]:
    """Every ``tokenizer.*`` key-value entry of a GGUF, as its raw bytes, in file order.

    Read straight from the header (the values stay bytes: 128,257 tokens and 280,147 merges
    are copied, never decoded), after :func:`llmkit.gguf_file.read_header` has checked it.

    Raises:
        InvalidModelFileError: the file cannot be read, or its header is damaged.
    """
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _walk(mm)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise InvalidModelFileError(str(path), f"has a damaged GGUF header ({exc})",
                                    hint=_HINT) from None
    except OSError as exc:
        raise InvalidModelFileError(str(path), f"cannot be read: {exc.strerror or exc}") from None


def _walk(mm: mmap.mmap) -> list[bytes]:
    if mm[:4] != b"GGUF":
        raise ValueError("no GGUF magic")
    (version,) = struct.unpack_from("<I", mm, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}")
    _, n_kv = struct.unpack_from("<QQ", mm, 8)
    pos, size = 24, len(mm)
    entries: list[bytes] = []
    for _ in range(n_kv):
        start = pos
        (n,) = struct.unpack_from("<Q", mm, pos)
        key = mm[pos + 8:pos + 8 + n].decode("utf-8")
        (vtype,) = struct.unpack_from("<I", mm, pos + 8 + n)
        pos += 12 + n
        if vtype in _WIDTHS:
            pos += _WIDTHS[vtype]
        elif vtype == _STRING:
            pos += 8 + struct.unpack_from("<Q", mm, pos)[0]
        elif vtype == _ARRAY:
            item_type, count = struct.unpack_from("<IQ", mm, pos)
            pos += 12
            if item_type in _WIDTHS:
                pos += _WIDTHS[item_type] * count
            elif item_type == _STRING:
                unpack = struct.unpack_from
                for _ in range(count):
                    pos += 8 + unpack("<Q", mm, pos)[0]
            else:
                raise ValueError(f"an array of value type {item_type} under {key}")
        else:
            raise ValueError(f"value type {vtype} under {key}")
        if pos > size:
            raise ValueError(f"{key} runs past the end of the file")
        if key.startswith("tokenizer."):
            entries.append(bytes(mm[start:pos]))
    return entries


def _entry(key: str, vtype: int, payload: bytes) -> bytes:
    raw = key.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw + struct.pack("<I", vtype) + payload


def companion_bytes(entries: Sequence[bytes], text: TextParams) -> bytes:
    """A tensor-less GGUF of architecture "llama" holding ``entries`` (the source's
    tokenizer keys) byte for byte.

    llama.cpp refuses architecture "mllama", but a vocabulary-only load of a "llama" file reads
    nothing but ``general.*`` and ``tokenizer.*`` (llama-model.cpp ``load_hparams`` returns
    before the architecture's keys when ``vocab_only``). The keys that function requires right
    after that return are written as well, from the source model, so that a loader which reads
    them anyway still accepts the file.
    """
    def u32(name: str, value: int) -> bytes:
        return _entry(f"llama.{name}", _UINT32, struct.pack("<I", value))

    arch = b"llama"
    head = [
        _entry("general.architecture", _STRING, struct.pack("<Q", len(arch)) + arch),
        u32("context_length", text.n_ctx_train), u32("embedding_length", text.n_embd),
        u32("block_count", text.n_layer), u32("attention.head_count", text.n_head),
        u32("attention.head_count_kv", text.n_head_kv),
        _entry("llama.attention.layer_norm_rms_epsilon", _FLOAT32,
               struct.pack("<f", text.rms_eps)),
    ]
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, len(head) + len(entries)) + b"".join(
        [*head, *entries])
    # The (empty) data section starts at the default alignment, as the GGUF spec lays it out.
    return data + bytes(-len(data) % _ALIGNMENT)


def cache_dir() -> Path:
    """Where companion vocabularies are kept: ``<llmkit home>/cache/vocab``."""
    from llmkit.paths import home

    return home() / "cache" / "vocab"


def companion_path(data: bytes, directory: Path | None = None) -> Path:
    """The cached companion GGUF holding ``data``, written first if it is not there.

    Its name is a hash of its bytes, so the files of one model (each quantization) share one
    companion and a changed tokenizer never meets a stale one. It is written under a temporary
    name and renamed into place, so no reader ever sees half a file.

    Raises:
        OSError: the cache directory cannot be written.
    """
    from llmkit._fs import atomic_write_bytes

    digest = hashlib.blake2b(data, digest_size=16)
    digest.update(f"format {COMPANION_FORMAT}".encode())
    path = (directory or cache_dir()) / f"mllama-vocab-{digest.hexdigest()}.gguf"
    with contextlib.suppress(OSError):
        if path.stat().st_size == len(data):
            return path
    atomic_write_bytes(path, data)
    return path


@contextlib.contextmanager
def _companion_file(data: bytes, directory: Path | None) -> Iterator[Path]:
    """The cached companion, or (when the cache cannot be written) one in a temporary folder
    that lives only while llama.cpp reads it."""
    try:
        path: Path | None = companion_path(data, directory)
    except OSError:
        path = None
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="llmkit-vocab-") as tmp:
        yield companion_path(data, Path(tmp))


class VocabModel:
    """A vocabulary-only llama.cpp model of an mllama GGUF's tokenizer (no weights)."""

    def __init__(self, path: Path, text: TextParams, *, directory: Path | None = None,
                 verbose: bool = False) -> None:
        """Load the tokenizer of the mllama GGUF ``path`` through its companion.

        Args:
            path: the mllama GGUF, its header already checked (``hparams.read_mllama``).
            text: its text model's hyperparameters.
            directory: the companions' cache folder (default :func:`cache_dir`).
            verbose: pass llama.cpp's log through to stderr.

        Raises:
            InvalidModelFileError: the file has no tokenizer, or one llama.cpp cannot load.
        """
        from llmkit.engines._llama_vocab import deferred_interrupt
        from llmkit.engines.llama_cpp import llama_module, recent_log

        entries = tokenizer_entries(path)
        if not any(e[8:8 + len(_TOKENS_KEY)] == _TOKENS_KEY for e in entries):
            raise InvalidModelFileError(str(path), "has no tokenizer (tokenizer.ggml.tokens)",
                                        hint=_HINT)
        lc = llama_module(verbose)
        self.lc: Any = lc
        self.model: Any = None
        params = lc.llama_model_default_params()
        params.vocab_only = True
        params.n_gpu_layers = 0
        with _companion_file(companion_bytes(entries, text), directory) as companion:
            self.companion = companion
            with deferred_interrupt():
                self.model = lc.llama_model_load_from_file(str(companion).encode("utf-8"),
                                                           params)
        if not self.model:
            reasons = [line.split("error loading model:", 1)[1].strip() for line in recent_log()
                       if "error loading model:" in line]
            detail = reasons[-1] if reasons and reasons[-1] else "llama.cpp refused it"
            raise InvalidModelFileError(str(path), "has a tokenizer llama.cpp cannot load: "
                                        f"{detail}", hint=_HINT)
        self.vocab: Any = lc.llama_model_get_vocab(self.model)
        self.n_tokens = int(lc.llama_vocab_n_tokens(self.vocab))

    def close(self) -> None:
        """Free the vocabulary; calling it again does nothing."""
        if self.model:
            from llmkit.engines._llama_vocab import deferred_interrupt

            with deferred_interrupt():
                self.lc.llama_model_free(self.model)
            self.model = None
