"""Reading GGUF headers: the real model's facts, and damage named precisely."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from llmkit.errors import InvalidModelFileError
from llmkit.gguf_file import check_complete, check_header, human_params, human_size, read_info

HINT = "download or convert it again"


@pytest.fixture(scope="module")
def model_bytes(smollm2_path: Path) -> bytes:
    return smollm2_path.read_bytes()


def _damage(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> InvalidModelFileError:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InvalidModelFileError) as info:
        read_info(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")
    return info.value


def _write_gguf(path: Path, *, arch: str = "llama", tensors: dict[str, np.ndarray] | None = None,
                template: str | None = None, context: int | None = 2048,
                file_type: int | None = None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("Tiny Test")
    if context is not None:
        writer.add_context_length(context)
    if template is not None:
        writer.add_chat_template(template)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_array("test.many", list(range(20)))
    writer.add_array("test.few", ["a", "b"])
    writer.add_bool("test.flag", True)
    for name, array in (tensors or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# -- the real model ---------------------------------------------------------------------------


def test_read_info_of_the_real_model(smollm2_path: Path) -> None:
    info = read_info(smollm2_path)
    assert info.path == str(smollm2_path)
    assert info.size_bytes == smollm2_path.stat().st_size
    assert info.architecture == "llama"
    assert info.quantization == "Q4_1"
    assert info.context_length == 8192
    assert info.parameters == 134_515_008
    assert info.tensor_count == 272
    assert info.gguf_version == 3
    assert info.chat_template.startswith("{% for message in messages %}")
    assert "<|im_start|>" in info.chat_template
    assert info.metadata["general.architecture"] == "llama"
    assert info.metadata["llama.block_count"] == 30
    # Long arrays are summarized; the template is kept out of the metadata (it has its field).
    assert info.metadata["tokenizer.ggml.tokens"] == "[49152 items]"
    assert "tokenizer.chat_template" not in info.metadata
    data = info.to_dict()
    assert data["architecture"] == "llama" and data["chat_template"] == info.chat_template


def test_check_complete_accepts_the_real_model(smollm2_path: Path) -> None:
    check_header(smollm2_path)
    check_complete(smollm2_path)


# -- damage -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError) as info:
        read_info(tmp_path / "nope.gguf")
    assert info.value.problem == "no such file"


def test_directory(tmp_path: Path) -> None:
    folder = tmp_path / "dir.gguf"
    folder.mkdir()
    with pytest.raises(InvalidModelFileError) as info:
        read_info(folder)
    assert info.value.problem == "is a directory, not a .gguf file"


def test_empty_file(tmp_path: Path) -> None:
    err = _damage(tmp_path, b"")
    assert err.problem == "is empty"


@pytest.mark.parametrize("data", [b"hello, this is a text file\n", b"PK\x03\x04zipzipzip",
                                  b"GGU", b"\x00" * 100])
def test_not_a_gguf(tmp_path: Path, data: bytes) -> None:
    err = _damage(tmp_path, data)
    assert err.problem == "is not a GGUF model file"
    assert err.hint == "llmkit runs .gguf files; convert Hugging Face checkpoints to GGUF first"


def test_magic_only(tmp_path: Path) -> None:
    err = _damage(tmp_path, b"GGUF\x03\x00")
    assert err.problem == "is truncated (header incomplete)"


def test_truncated_in_the_tensor_data(tmp_path: Path, model_bytes: bytes) -> None:
    half = len(model_bytes) // 2
    err = _damage(tmp_path, model_bytes[:half])
    assert err.problem == f"is truncated ({half} bytes; its tensors need {len(model_bytes)})"
    assert err.hint == HINT


def test_missing_only_the_last_byte(tmp_path: Path, model_bytes: bytes) -> None:
    err = _damage(tmp_path, model_bytes[:-1])
    assert err.problem.startswith(f"is truncated ({len(model_bytes) - 1} bytes")


def test_truncated_in_the_header(tmp_path: Path, model_bytes: bytes) -> None:
    err = _damage(tmp_path, model_bytes[:5000])
    assert err.problem == "is truncated (the header runs past the end at 5000 bytes)"
    assert err.hint == HINT


def test_real_header_then_random_bytes(tmp_path: Path, model_bytes: bytes) -> None:
    # Magic, version and counts are real; the metadata that should follow is noise.
    noise = random.Random(0).randbytes(1 << 20)
    err = _damage(tmp_path, model_bytes[:24] + noise)
    assert err.problem.startswith("is corrupt (a string of ")
    assert err.hint == HINT


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_magic_then_garbage(tmp_path: Path, seed: int) -> None:
    err = _damage(tmp_path, b"GGUF" + random.Random(seed).randbytes(4096))
    assert err.problem.startswith("is corrupt (unsupported GGUF version ")


def test_unsupported_version(tmp_path: Path, model_bytes: bytes) -> None:
    err = _damage(tmp_path, model_bytes[:4] + (9).to_bytes(4, "little") + model_bytes[8:4096])
    assert err.problem == "is corrupt (unsupported GGUF version 9)"


def test_absurd_tensor_count(tmp_path: Path, model_bytes: bytes) -> None:
    data = bytearray(model_bytes[:4096])
    data[8:16] = (2**40).to_bytes(8, "little")
    err = _damage(tmp_path, bytes(data))
    assert err.problem.startswith("is corrupt (1099511627776 tensors")


def test_unknown_tensor_type(tmp_path: Path, model_bytes: bytes) -> None:
    data = bytearray(model_bytes)
    name = b"token_embd.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    assert n_dims == 2
    type_at = at + 4 + 8 * n_dims
    data[type_at:type_at + 4] = (250).to_bytes(4, "little")
    err = _damage(tmp_path, bytes(data))
    assert err.problem == "is corrupt (tensor token_embd.weight has unknown type 250)"


def test_unknown_metadata_value_type(tmp_path: Path, model_bytes: bytes) -> None:
    data = bytearray(model_bytes[:1 << 20])
    key = b"general.architecture"
    at = data.index(key) + len(key)
    data[at:at + 4] = (77).to_bytes(4, "little")
    err = _damage(tmp_path, bytes(data))
    assert err.problem == "is corrupt (unknown metadata value type 77)"


# -- small files written with gguf-py ----------------------------------------------------------


def test_small_gguf_written_by_gguf_py(tmp_path: Path) -> None:
    weights = {
        "a.weight": np.zeros((4, 8), dtype=np.float32),
        "b.weight": np.zeros((4, 8), dtype=np.float32),
        "c.weight": np.zeros((4, 8), dtype=np.float16),
        "norm": np.zeros((8,), dtype=np.float16),
    }
    path = _write_gguf(tmp_path / "tiny.gguf", tensors=weights, template="{{ messages }}")
    info = read_info(path)
    assert info.architecture == "llama"
    assert info.name == "Tiny Test"
    assert info.context_length == 2048
    assert info.chat_template == "{{ messages }}"
    assert info.tensor_count == 4
    assert info.parameters == 3 * 32 + 8
    # Without general.file_type the most common type among matrices names the quantization.
    assert info.quantization == "F32"
    assert info.metadata["test.many"] == "[20 items]"
    assert info.metadata["test.few"] == ["a", "b"]
    assert info.metadata["test.flag"] is True


def test_file_type_names_the_quantization(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "q.gguf", file_type=15,  # MOSTLY_Q4_K_M
                       tensors={"w": np.zeros((2, 32), dtype=np.float32)})
    assert read_info(path).quantization == "Q4_K_M"


def test_missing_facts_have_defaults(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "bare.gguf", arch="mystery", context=None)
    info = read_info(path)
    assert info.architecture == "mystery"
    assert info.context_length == 0
    assert info.chat_template == ""
    assert info.tensor_count == 0 and info.parameters == 0
    assert info.quantization == "unknown"


def test_small_gguf_truncated_by_one_byte(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "t.gguf", tensors={"w": np.ones((16, 16), dtype=np.float32)})
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    with pytest.raises(InvalidModelFileError, match="is truncated"):
        check_complete(path)


# -- human-readable numbers -------------------------------------------------------------------


@pytest.mark.parametrize(("n", "text"), [
    (0, "0 B"), (999, "999 B"), (1536, "1.5 KB"), (98_362_432, "98.4 MB"),
    (4_920_000_000, "4.9 GB"), (3 * 10**15, "3000.0 TB"),
])
def test_human_size(n: int, text: str) -> None:
    assert human_size(n) == text


@pytest.mark.parametrize(("n", "text"), [
    (134_515_008, "135M"), (1_235_814_400, "1.24B"), (52_000, "52K"), (1_000_000, "1M"),
])
def test_human_params(n: int, text: str) -> None:
    assert human_params(n) == text
