"""Llama 3.2 Vision hyperparameters read from a GGUF header: every value checked, named on error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmkit.engines.mllama.hparams import read_mllama
from llmkit.errors import InvalidModelFileError
from llmkit.gguf_file import read_header

# The published 11B model's values (config.json of meta-llama/Llama-3.2-11B-Vision-Instruct).
ELEVEN_B: dict[str, Any] = {
    "mllama.context_length": 131072, "mllama.embedding_length": 4096,
    "mllama.block_count": 40, "mllama.feed_forward_length": 14336,
    "mllama.attention.head_count": 32, "mllama.attention.head_count_kv": 8,
    "mllama.attention.layer_norm_rms_epsilon": 1e-5, "mllama.rope.freq_base": 500000.0,
    "mllama.rope.dimension_count": 128, "mllama.vocab_size": 128256,
    "mllama.attention.cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
    "mllama.image_token_id": 128256, "mllama.llmkit.weight_layout": "hf",
    "mllama.vision.block_count": 32, "mllama.vision.global.block_count": 8,
    "mllama.vision.intermediate_layers_indices": [3, 7, 15, 23, 30],
    "mllama.vision.embedding_length": 1280, "mllama.vision.feed_forward_length": 5120,
    "mllama.vision.attention.head_count": 16,
    "mllama.vision.attention.layer_norm_epsilon": 1e-5, "mllama.vision.image_size": 560,
    "mllama.vision.patch_size": 14, "mllama.vision.max_num_tiles": 4,
    "mllama.vision.num_channels": 3, "mllama.vision.output_dim": 7680,
    "mllama.vision.supported_aspect_ratios": [1, 1, 1, 2, 1, 3, 1, 4, 2, 1, 2, 2, 3, 1, 4, 1],
    "mllama.vision.image_mean": [0.48145466, 0.4578275, 0.40821073],
    "mllama.vision.image_std": [0.26862954, 0.26130258, 0.27577711],
    "mllama.vision.rescale_factor": 1 / 255,
}


def _write(path: Path, values: dict[str, Any], *, arch: str = "mllama") -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    for key, value in values.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    writer.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_published_values_are_read(tmp_path: Path) -> None:
    f = read_mllama(_write(tmp_path / "m.gguf", ELEVEN_B))
    assert f.text.head_dim == 128 and f.text.n_head_kv == 8
    assert f.text.cross_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert f.vision.n_patches == 1601 and f.vision.n_padded == 1608
    assert f.vision.aspect_ratios[4] == (2, 1) and len(f.vision.aspect_ratios) == 8
    assert f.vision.image_mean[0] == pytest.approx(0.48145466)
    assert f.tensors["output_norm.weight"].shape == (4,)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("mllama.attention.cross_attention_layers", [3, 40], "distinct layers below"),
    ("mllama.attention.cross_attention_layers", [3, 3], "distinct layers below"),
    ("mllama.attention.head_count_kv", 5, "do not divide evenly"),
    ("mllama.attention.head_count_kv", 64, "between 1 and 32"),
    ("mllama.embedding_length", 0, "between 1 and"),
    ("mllama.rope.dimension_count", 64, "rotates whole heads"),
    ("mllama.rope.freq_base", -1.0, "must be a positive number"),
    ("mllama.vision.output_dim", 7000, "not the 6 states of 1280"),
    ("mllama.vision.intermediate_layers_indices", [3, 32], "distinct layers below"),
    ("mllama.vision.supported_aspect_ratios", [1, 1, 5, 1], "pairs of at most"),
    ("mllama.vision.supported_aspect_ratios", [1, 1, 2], "pairs of at most"),
    ("mllama.vision.image_std", [0.2, 0.0, 0.2], "deviations positive"),
    ("mllama.vision.image_mean", [0.5, 0.5], "3 values each"),
    ("mllama.vision.patch_size", 13, "not a whole number of mllama.vision.patch_size"),
    ("mllama.vision.num_channels", 4, "between 3 and 3"),
    ("mllama.vision.block_count", "32", "is string; it must be uint32"),
    ("mllama.vision.image_mean", [1, 2, 3], "is an array of int32; it must be an array of floats"),
])
def test_bad_values_are_named(tmp_path: Path, key: str, value: Any, message: str) -> None:
    values = {**ELEVEN_B, key: value}
    with pytest.raises(InvalidModelFileError) as caught:
        read_mllama(_write(tmp_path / "bad.gguf", values))
    assert message in caught.value.problem
    assert key in caught.value.problem


def test_missing_key_is_named(tmp_path: Path) -> None:
    values = dict(ELEVEN_B)
    del values["mllama.vision.image_std"]
    with pytest.raises(InvalidModelFileError, match=r"mllama\.vision\.image_std is missing"):
        read_mllama(_write(tmp_path / "m.gguf", values))


def test_a_file_in_another_layout_is_refused(tmp_path: Path) -> None:
    values = dict(ELEVEN_B)
    del values["mllama.llmkit.weight_layout"]  # as Ollama's converter writes it
    with pytest.raises(InvalidModelFileError, match="from another converter") as caught:
        read_mllama(_write(tmp_path / "ollama.gguf", values))
    assert "llmkit convert" in (caught.value.hint or "")


def test_another_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match=r"is a llama model, not Llama 3\.2 Vision"):
        read_mllama(_write(tmp_path / "l.gguf", {}, arch="llama"))


def test_header_gives_absolute_tensor_offsets(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.gguf", ELEVEN_B)
    h = read_header(path)
    entry = h.tensors()["output_norm.weight"]
    data = path.read_bytes()[entry.offset:entry.offset + entry.nbytes]
    assert np.frombuffer(data, dtype=np.float32).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert entry.offset % h.alignment == 0 and entry.ne == (4,)
