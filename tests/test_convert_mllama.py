"""`llmkit convert` of Llama 3.2 Vision (mllama): one GGUF, every tensor and key checked."""

from __future__ import annotations

import filecmp
import json
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmkit.convert import convert
from llmkit.convert.mllama import MllamaConverter, read_chat_template
from llmkit.convert.safetensors import MappedFiles, checkpoint_tensors
from llmkit.errors import ConvertError, UsageError
from tests.conftest import run_llmkit
from tests.mllama_model import (
    CHAT_TEMPLATE,
    IMAGE_MEAN,
    IMAGE_STD,
    RESCALE_FACTOR,
    SUPPORTED_ASPECT_RATIOS,
    build_model,
    require_oracle,
    save_checkpoint,
    state_dict_numpy,
)

F32, F16, Q8_0, BF16 = 0, 1, 8, 30  # ggml_type values (ggml.h)

# --- a GGUF reader of the test's own ---------------------------------------------------------
# gguf's GGUFReader takes ~7 s on a 128k-token vocabulary (a numpy view per token); this one
# walks the same format (ggml's docs/gguf.md) in a fraction of a second, independently of the
# gguf package the converter writes with. GGUFReader reads one file below, as a cross-check.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
TYPE_UINT32, TYPE_INT32, TYPE_FLOAT32, TYPE_STRING, TYPE_ARRAY = 4, 5, 6, 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (the file's ne reversed)
    type_id: int
    offset: int  # absolute


@dataclass
class GGUF:
    values: dict[str, Any]
    types: dict[str, tuple[int, ...]]  # (type,) or (ARRAY, item type)
    tensors: dict[str, GGUFTensor]
    path: Path

    def array(self, name: str) -> np.ndarray:
        """The tensor as stored: float32/float16 values, or raw bytes for other types."""
        t = self.tensors[name]
        count = int(np.prod(t.shape))
        if t.type_id == F32:
            return np.fromfile(self.path, "<f4", count, offset=t.offset).reshape(t.shape)
        if t.type_id == F16:
            return np.fromfile(self.path, "<f2", count, offset=t.offset).reshape(t.shape)
        if t.type_id == BF16:
            bits = np.fromfile(self.path, "<u2", count, offset=t.offset).astype(np.uint32)
            return (bits << 16).view(np.float32).reshape(t.shape)
        if t.type_id == Q8_0:
            import gguf

            raw = np.fromfile(self.path, np.uint8, count // 32 * 34, offset=t.offset)
            shape = (*t.shape[:-1], t.shape[-1] // 32 * 34)
            return gguf.quants.dequantize(raw.reshape(shape), gguf.GGMLQuantizationType.Q8_0)
        raise AssertionError(f"type {t.type_id}")


def read_gguf(path: Path) -> GGUF:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return data[pos - n:pos].decode("utf-8")

    def value(kind: int) -> Any:
        if kind == TYPE_STRING:
            return string()
        return take(_SCALARS[kind])

    assert data[:4] == b"GGUF"
    pos = 4
    assert take("<I") == 3
    n_tensors, n_kv = take("<Q"), take("<Q")
    values: dict[str, Any] = {}
    types: dict[str, tuple[int, ...]] = {}
    for _ in range(n_kv):
        key = string()
        kind = take("<I")
        if kind == TYPE_ARRAY:
            item, count = take("<I"), take("<Q")
            types[key] = (kind, item)
            values[key] = [value(item) for _ in range(count)]
        else:
            types[key] = (kind,)
            values[key] = value(kind)
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, tuple(reversed(dims)), take("<I"), take("<Q")))
    alignment = values.get("general.alignment", 32)
    start = pos + (-pos % alignment)
    tensors = {n: GGUFTensor(n, s, t, start + o) for n, s, t, o in infos}
    return GGUF(values, types, tensors, path)


# --- the Hugging Face name of each GGUF tensor (common.md's table, written out here) --------

_TEXT = {"attn_norm.weight": "input_layernorm.weight",
         "ffn_norm.weight": "post_attention_layernorm.weight",
         "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
         "ffn_down.weight": "mlp.down_proj.weight",
         "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
         "attn_v.weight": "self_attn.v_proj.weight",
         "attn_output.weight": "self_attn.o_proj.weight",
         "cross_attn_q.weight": "cross_attn.q_proj.weight",
         "cross_attn_k.weight": "cross_attn.k_proj.weight",
         "cross_attn_v.weight": "cross_attn.v_proj.weight",
         "cross_attn_output.weight": "cross_attn.o_proj.weight",
         "cross_attn_q_norm.weight": "cross_attn.q_norm.weight",
         "cross_attn_k_norm.weight": "cross_attn.k_norm.weight",
         "cross_attn_attn_gate": "cross_attn_attn_gate",
         "cross_attn_mlp_gate": "cross_attn_mlp_gate"}
_VISION_LAYER = {"attn_q.weight": "self_attn.q_proj.weight",
                 "attn_k.weight": "self_attn.k_proj.weight",
                 "attn_v.weight": "self_attn.v_proj.weight",
                 "attn_output.weight": "self_attn.o_proj.weight",
                 "attn_norm.weight": "input_layernorm.weight",
                 "attn_norm.bias": "input_layernorm.bias",
                 "ffn_norm.weight": "post_attention_layernorm.weight",
                 "ffn_norm.bias": "post_attention_layernorm.bias",
                 "ffn_up.weight": "mlp.fc1.weight", "ffn_up.bias": "mlp.fc1.bias",
                 "ffn_down.weight": "mlp.fc2.weight", "ffn_down.bias": "mlp.fc2.bias",
                 "attn_gate": "gate_attn", "ffn_gate": "gate_ffn"}
_VISION = {"v.patch_embd.weight": "patch_embedding.weight",
           "v.class_embd": "class_embedding",
           "v.position_embd.weight": "gated_positional_embedding.embedding",
           "v.position_embd.gate": "gated_positional_embedding.gate",
           "v.tile_position_embd.weight": "gated_positional_embedding.tile_embedding.weight",
           "v.pre_tile_position_embd.weight": "pre_tile_positional_embedding.embedding.weight",
           "v.pre_tile_position_embd.gate": "pre_tile_positional_embedding.gate",
           "v.post_tile_position_embd.weight": "post_tile_positional_embedding.embedding.weight",
           "v.post_tile_position_embd.gate": "post_tile_positional_embedding.gate",
           "v.pre_ln.weight": "layernorm_pre.weight", "v.pre_ln.bias": "layernorm_pre.bias",
           "v.post_ln.weight": "layernorm_post.weight", "v.post_ln.bias": "layernorm_post.bias"}


def hf_name(name: str) -> str:
    """The published (transformers 4.45) name of a GGUF tensor."""
    fixed = {"token_embd.weight": "language_model.model.embed_tokens.weight",
             "output_norm.weight": "language_model.model.norm.weight",
             "output.weight": "language_model.lm_head.weight",
             "mm.0.weight": "multi_modal_projector.weight",
             "mm.0.bias": "multi_modal_projector.bias"}
    if name in fixed:
        return fixed[name]
    if name in _VISION:
        return "vision_model." + _VISION[name]
    if m := re.fullmatch(r"blk\.(\d+)\.(.+)", name):
        return f"language_model.model.layers.{m[1]}.{_TEXT[m[2]]}"
    if m := re.fullmatch(r"v\.(global\.)?blk\.(\d+)\.(.+)", name):
        stack = "global_transformer" if m[1] else "transformer"
        return f"vision_model.{stack}.layers.{m[2]}.{_VISION_LAYER[m[3]]}"
    raise AssertionError(f"unexpected GGUF tensor {name}")


def is_vision_matrix(name: str, shape: tuple[int, ...]) -> bool:
    embedding_table = name.startswith(("v.position_embd.", "v.tile_position_embd.",
                                       "v.pre_tile_position_embd.",
                                       "v.post_tile_position_embd."))
    return (name.startswith(("v.", "mm.")) and len(shape) >= 2 and not embedding_table)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> Any:
    require_oracle()
    return build_model(seed=0)


@pytest.fixture(scope="module")
def weights(model: Any) -> dict[str, np.ndarray]:
    return state_dict_numpy(model, layout="v4")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mllama")


def _checkpoint(model: Any, root: Path, label: str, **options: Any) -> Path:
    # Every checkpoint directory is named alike, so general.name (its name) is the same in
    # every output and files can be compared byte for byte.
    return save_checkpoint(model, root / label / "Llama-3.2-tiny-Vision", **options)


@pytest.fixture(scope="module")
def v4_checkpoint(model: Any, work: Path) -> Path:
    return _checkpoint(model, work, "v4", layout="v4", config_style="rope_scaling")


@pytest.fixture(scope="module")
def f32(v4_checkpoint: Path, work: Path) -> Path:
    out = work / "out" / "v4-f32.gguf"
    convert(v4_checkpoint, out, outtype="f32")
    return out


@pytest.fixture(scope="module")
def f32_gguf(f32: Path) -> GGUF:
    return read_gguf(f32)


@pytest.fixture(scope="module")
def by_outtype(v4_checkpoint: Path, work: Path, f32: Path) -> dict[str, GGUF]:
    files = {"f32": read_gguf(f32)}
    for outtype in ("f16", "bf16", "q8_0"):
        out = work / "out" / f"v4-{outtype}.gguf"
        convert(v4_checkpoint, out, outtype=outtype)
        files[outtype] = read_gguf(out)
    return files


def _converter(directory: Path) -> MllamaConverter:
    files = MappedFiles()
    try:
        config = json.loads((directory / "config.json").read_text())
        return MllamaConverter(directory, config, checkpoint_tensors(directory), files)
    finally:
        files.close()


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _written(directory: Path) -> list[str]:
    """The files a conversion into ``directory`` left there (outputs and temporary files)."""
    return sorted(p.name for p in directory.iterdir() if p.is_file())


def _edit_json(path: Path, edit: Any) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# --- layouts and config styles ------------------------------------------------------------


def test_v4_and_v5_layouts_and_both_rope_configs_give_the_same_file(
        model: Any, work: Path, f32: Path) -> None:
    # The published layout with rope_scaling (f32), transformers 5's layout and config.json
    # (rope_parameters), and each of the two changed alone: every output byte is the same.
    variants = {"v5-rope_parameters": {"layout": "v5", "config_style": "rope_parameters"},
                "v4-rope_parameters": {"layout": "v4", "config_style": "rope_parameters"},
                "v5-rope_scaling": {"layout": "v5", "config_style": "rope_scaling"}}
    for label, options in variants.items():
        out = work / "out" / f"{label}.gguf"
        convert(_checkpoint(model, work, label, **options), out, outtype="f32")
        assert filecmp.cmp(out, f32, shallow=False), label
        out.unlink()


def test_sharded_checkpoint_gives_the_same_file(model: Any, work: Path, f32: Path) -> None:
    directory = _checkpoint(model, work, "sharded", shards=2)
    assert sorted(p.name for p in directory.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    out = work / "out" / "sharded.gguf"
    convert(directory, out, outtype="f32")
    assert filecmp.cmp(out, f32, shallow=False)


def test_bfloat16_and_float16_sources_convert_exactly(model: Any, work: Path) -> None:
    import torch

    for dtype in ("bfloat16", "float16"):
        directory = _checkpoint(model, work, dtype, dtype=dtype)
        out = work / "out" / f"{dtype}.gguf"
        convert(directory, out, outtype="f32")
        gguf_file = read_gguf(out)
        expected = {k: v.detach().to(getattr(torch, dtype)).float().numpy()
                    for k, v in _v4_state(model).items()}
        for name in gguf_file.tensors:
            if name == "rope_freqs.weight":
                continue
            np.testing.assert_array_equal(gguf_file.array(name), expected[hf_name(name)],
                                          err_msg=f"{dtype} {name}")
        out.unlink()


def _v4_state(model: Any) -> dict[str, Any]:
    from tests.mllama_model import v4_name

    return {v4_name(k): v for k, v in model.state_dict().items()}


# --- every tensor -------------------------------------------------------------------------


def test_every_tensor_round_trips_exactly_in_f32(f32_gguf: GGUF,
                                                 weights: dict[str, np.ndarray]) -> None:
    names = [n for n in f32_gguf.tensors if n != "rope_freqs.weight"]
    # One GGUF tensor per checkpoint tensor, none left out, none twice.
    assert sorted(hf_name(n) for n in names) == sorted(weights)
    for name in names:
        t = f32_gguf.tensors[name]
        assert t.type_id == F32, name
        np.testing.assert_array_equal(f32_gguf.array(name), weights[hf_name(name)],
                                      err_msg=name)


def test_shapes_follow_the_layout(f32_gguf: GGUF) -> None:
    shapes = {n: t.shape for n, t in f32_gguf.tensors.items()}
    # vision hidden C 32, patch 14, 4 patches + class = 5 positions, 4 tiles, 8 aspect ratios.
    assert shapes["v.patch_embd.weight"] == (32, 3, 14, 14)  # kept 4-D
    assert shapes["v.tile_position_embd.weight"] == (9, 4 * 5 * 32)
    assert shapes["v.pre_tile_position_embd.weight"] == (9, 4 * 32)
    assert shapes["v.position_embd.weight"] == (5, 32)
    assert shapes["v.position_embd.gate"] == (1,)
    assert shapes["mm.0.weight"] == (64, 96)
    assert shapes["token_embd.weight"] == (128264, 64)
    assert shapes["output.weight"] == (128256, 64)
    assert shapes["blk.1.cross_attn_k_norm.weight"] == (16,)
    assert shapes["blk.3.cross_attn_mlp_gate"] == (1,)
    assert shapes["rope_freqs.weight"] == (8,)
    # Cross-attention layers have no self-attention, and the others no cross-attention.
    for layer in range(5):
        cross = {n for n in shapes if n.startswith(f"blk.{layer}.cross_attn")}
        self_attn = {n for n in shapes if n.startswith(f"blk.{layer}.attn_") and
                     n != f"blk.{layer}.attn_norm.weight"}
        assert (len(cross), len(self_attn)) == ((8, 0) if layer in (1, 3) else (0, 4)), layer
    assert sum(n.startswith("v.blk.") for n in shapes) == 4 * 12
    assert sum(n.startswith("v.global.blk.") for n in shapes) == 2 * 14


def test_rope_freqs_are_transformers_llama3_factors(f32_gguf: GGUF, model: Any) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    text = model.config.text_config
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](text, "cpu")
    base = 1.0 / (500000.0 ** (np.arange(0, 16, 2, dtype=np.float32) / 16))
    # ggml's rope_ext divides each frequency by its factor.
    expected = base / scaled.numpy()
    factors = f32_gguf.array("rope_freqs.weight")
    np.testing.assert_allclose(factors, expected, rtol=1e-6)
    # The tiny config's original context (64) puts the frequencies in all three bands.
    assert factors.min() == 1.0 and factors.max() == 8.0
    assert ((factors > 1) & (factors < 8)).any()


def test_outtypes_type_text_and_vision_tensors(by_outtype: dict[str, GGUF],
                                              weights: dict[str, np.ndarray]) -> None:
    text_type = {"f32": F32, "f16": F16, "bf16": BF16, "q8_0": Q8_0}
    for outtype, gguf_file in by_outtype.items():
        vision_matrix_type = F32 if outtype == "f32" else F16
        for name, t in gguf_file.tensors.items():
            if is_vision_matrix(name, t.shape):
                expected = vision_matrix_type  # never bf16 or q8_0
            elif len(t.shape) == 1 or name.startswith(("v.", "mm.")):
                expected = F32  # norms, gates, biases, rope_freqs, vision embedding tables
            else:
                expected = text_type[outtype]  # text matrices, token_embd and output
            assert t.type_id == expected, (outtype, name)
        assert gguf_file.values["general.file_type"] == {"f32": 0, "f16": 1, "bf16": 32,
                                                          "q8_0": 7}[outtype]
        assert ("general.quantization_version" in gguf_file.values) == (outtype == "q8_0")


def test_outtype_values(by_outtype: dict[str, GGUF], weights: dict[str, np.ndarray]) -> None:
    import torch

    for outtype in ("f16", "bf16", "q8_0"):
        gguf_file = by_outtype[outtype]
        for name, t in gguf_file.tensors.items():
            if name == "rope_freqs.weight":
                continue
            source = weights[hf_name(name)]
            stored = gguf_file.array(name)
            if t.type_id == F32:
                np.testing.assert_array_equal(stored, source, err_msg=name)
            elif t.type_id == F16:
                # Round to nearest even, as numpy's cast.
                np.testing.assert_array_equal(stored, source.astype(np.float16), err_msg=name)
            elif t.type_id == BF16:
                expected = torch.from_numpy(source).to(torch.bfloat16).float().numpy()
                np.testing.assert_array_equal(stored, expected, err_msg=name)
            else:
                # Q8_0: 32 values share a scale max|x|/127, stored in f16; each value is off by
                # at most half a step plus up to 127 steps times the scale's rounding (2^-11).
                blocks = source.reshape(-1, 32)
                step = np.abs(blocks).max(axis=1, keepdims=True) / 127
                error = np.abs(stored.reshape(-1, 32) - blocks)
                assert (error <= step * (0.5 + 127 * 2.0**-11) + 1e-12).all(), name
                assert error.max() > 0, name  # it was quantized


def test_gguf_readers_agree(f32: Path, f32_gguf: GGUF) -> None:
    # gguf's own reader, once, as a check on the test's reader above.
    import gguf

    reader = gguf.GGUFReader(f32)
    assert len(reader.tensors) == len(f32_gguf.tensors) == 148
    for t in reader.tensors:
        ours = f32_gguf.tensors[t.name]
        assert tuple(int(d) for d in reversed(t.shape.tolist())) == ours.shape, t.name
        np.testing.assert_array_equal(np.asarray(t.data).reshape(ours.shape),
                                      f32_gguf.array(t.name), err_msg=t.name)
    assert reader.fields["mllama.vision.image_size"].contents() == 28


# --- metadata ---------------------------------------------------------------------------


def test_metadata_keys_values_and_types(f32_gguf: GGUF) -> None:
    u32, i32_array, f32_, f32_array, string = ((TYPE_UINT32,), (TYPE_ARRAY, TYPE_INT32),
                                               (TYPE_FLOAT32,), (TYPE_ARRAY, TYPE_FLOAT32),
                                               (TYPE_STRING,))
    expected: dict[str, tuple[Any, tuple[int, ...]]] = {
        "general.architecture": ("mllama", string),
        "general.type": ("model", string),
        "general.name": ("Llama-3.2-tiny-Vision", string),
        "mllama.context_length": (512, u32),
        "mllama.embedding_length": (64, u32),
        "mllama.block_count": (5, u32),
        "mllama.feed_forward_length": (128, u32),
        "mllama.attention.head_count": (4, u32),
        "mllama.attention.head_count_kv": (2, u32),
        "mllama.attention.layer_norm_rms_epsilon": (pytest.approx(1e-5), f32_),
        "mllama.rope.freq_base": (500000.0, f32_),
        "mllama.rope.dimension_count": (16, u32),
        "mllama.vocab_size": (128256, u32),
        "mllama.attention.cross_attention_layers": ([1, 3], i32_array),
        "mllama.image_token_id": (128256, u32),
        "mllama.llmkit.weight_layout": ("hf", string),
        "mllama.vision.block_count": (4, u32),
        "mllama.vision.global.block_count": (2, u32),
        "mllama.vision.intermediate_layers_indices": ([0, 2], i32_array),
        "mllama.vision.embedding_length": (32, u32),
        "mllama.vision.feed_forward_length": (128, u32),
        "mllama.vision.attention.head_count": (4, u32),
        "mllama.vision.attention.layer_norm_epsilon": (pytest.approx(1e-5), f32_),
        "mllama.vision.image_size": (28, u32),
        "mllama.vision.patch_size": (14, u32),
        "mllama.vision.max_num_tiles": (4, u32),
        "mllama.vision.num_channels": (3, u32),
        "mllama.vision.output_dim": (96, u32),
        "mllama.vision.supported_aspect_ratios": (
            [n for pair in SUPPORTED_ASPECT_RATIOS for n in pair], i32_array),
        "mllama.vision.image_mean": (pytest.approx(IMAGE_MEAN, rel=1e-7), f32_array),
        "mllama.vision.image_std": (pytest.approx(IMAGE_STD, rel=1e-7), f32_array),
        "mllama.vision.rescale_factor": (pytest.approx(RESCALE_FACTOR, rel=1e-7), f32_),
        "tokenizer.ggml.model": ("gpt2", string),
        "tokenizer.ggml.pre": ("llama-bpe", string),
        "tokenizer.ggml.bos_token_id": (128000, u32),
        "tokenizer.ggml.eos_token_id": (128009, u32),  # <|eot_id|>, the Instruct model's
        "tokenizer.ggml.padding_token_id": (128004, u32),
        "tokenizer.chat_template": (CHAT_TEMPLATE, string),
    }
    values, types = f32_gguf.values, f32_gguf.types
    for key, (value, kind) in expected.items():
        assert values[key] == value, key
        assert types[key] == kind, key
    tokens = values["tokenizer.ggml.tokens"]
    assert len(tokens) == 128257
    assert tokens[128256] == "<|image|>"
    assert tokens[128009] == "<|eot_id|>"
    # The grids in the order transformers' image processor numbers them (its aspect-ratio
    # ids), which is also the order llmkit's own preprocessing gives ids in.
    from transformers.models.mllama.image_processing_pil_mllama import (
        get_all_supported_aspect_ratios,
    )

    from llmkit.engines.mllama.preprocess import tile_layouts

    pairs = values["mllama.vision.supported_aspect_ratios"]
    grids = [tuple(pairs[i:i + 2]) for i in range(0, len(pairs), 2)]
    assert grids == [tuple(r) for r in get_all_supported_aspect_ratios(4)]
    assert grids == list(tile_layouts(4))
    # Nothing else under mllama.: the engine reads exactly these.
    assert {k for k in values if k.startswith("mllama.")} == {
        k for k in expected if k.startswith("mllama.")}


def test_show_reads_the_file(f32: Path) -> None:
    from llmkit.gguf_file import check_file

    info = check_file(f32)
    assert info.architecture == "mllama"
    assert info.context_length == 512
    assert info.chat_template == CHAT_TEMPLATE
    assert info.tensor_count == 148


# --- chat template ------------------------------------------------------------------------


def test_chat_template_json_wins_over_tokenizer_config(v4_checkpoint: Path, work: Path,
                                                       f32_gguf: GGUF) -> None:
    directory = _copy(v4_checkpoint, work / "both-templates" / v4_checkpoint.name)
    _edit_json(directory / "tokenizer_config.json",
               lambda c: c.__setitem__("chat_template", "{{ 'from tokenizer_config' }}"))
    out = work / "out" / "both-templates.gguf"
    convert(directory, out, outtype="f32")
    assert read_gguf(out).values["tokenizer.chat_template"] == CHAT_TEMPLATE
    (directory / "chat_template.json").unlink()
    convert(directory, out, outtype="f32")
    assert read_gguf(out).values["tokenizer.chat_template"] == "{{ 'from tokenizer_config' }}"
    out.unlink()


def test_chat_template_sources(tmp_path: Path) -> None:
    assert read_chat_template(tmp_path) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "A"}))
    assert read_chat_template(tmp_path) == "A"
    # transformers 5 saves a processor's template as chat_template.jinja.
    (tmp_path / "chat_template.jinja").write_text("B")
    assert read_chat_template(tmp_path) == "B"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text("{not json")
    with pytest.raises(ConvertError, match=r"chat_template\.json"):
        read_chat_template(tmp_path)
    (tmp_path / "chat_template.json").write_text(json.dumps({"template": "A"}))
    with pytest.raises(ConvertError, match="no chat_template text"):
        read_chat_template(tmp_path)


def test_base_model_without_template(model: Any, work: Path) -> None:
    directory = _checkpoint(model, work, "base", chat_template=None)
    converter = _converter(directory)
    assert converter.chat_template is None


# --- the CLI -----------------------------------------------------------------------------


def test_cli_convert_writes_one_file_and_show_reads_it(v4_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = out / "v.gguf"
    proc = run_llmkit(["convert", str(v4_checkpoint), "-o", str(target), "--outtype", "q8_0"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"llmkit: wrote {target} (148 tensors, ")
    assert "tokenizer llama-bpe" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1  # no projector line, no library warnings
    assert [p.name for p in out.iterdir()] == ["v.gguf"]
    shown = run_llmkit(["show", str(target)])
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"^architecture\s+mllama$", shown.stdout, re.M)
    assert re.search(r"^quantization\s+Q8_0$", shown.stdout, re.M)
    assert re.search(r"^tensors\s+148$", shown.stdout, re.M)


def test_cli_refuses_mmproj(v4_checkpoint: Path, tmp_path: Path) -> None:
    proc = run_llmkit(["convert", str(v4_checkpoint), "-o", str(tmp_path / "v.gguf"),
                       "--mmproj", str(tmp_path / "p.gguf")])
    assert proc.returncode == 2, proc.stderr
    assert "no projector to write" in proc.stderr
    assert "leave out --mmproj" in proc.stderr
    assert _written(tmp_path) == []


def test_mmproj_is_a_usage_error_in_the_library(v4_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"Llama 3\.2 Vision"):
        convert(v4_checkpoint, tmp_path / "v.gguf", mmproj=tmp_path / "p.gguf")
    assert _written(tmp_path) == []


# --- broken checkpoints -----------------------------------------------------------------


def test_missing_preprocessor_config_is_a_clear_error(model: Any, work: Path,
                                                      tmp_path: Path) -> None:
    directory = _checkpoint(model, work, "no-preprocessor", preprocessor=False)
    with pytest.raises(ConvertError) as info:
        convert(directory, tmp_path / "v.gguf")
    assert "has no preprocessor_config.json" in info.value.message
    assert info.value.hint is not None and "model's repository" in info.value.hint
    assert _written(tmp_path) == []  # nothing written, no temporary file left


def test_broken_preprocessor_config(v4_checkpoint: Path, work: Path, tmp_path: Path) -> None:
    directory = _copy(v4_checkpoint, work / "broken-preprocessor" / v4_checkpoint.name)
    (directory / "preprocessor_config.json").write_text('{"size": ')
    with pytest.raises(ConvertError, match=r"cannot read .*preprocessor_config\.json"):
        convert(directory, tmp_path / "v.gguf")
    assert _written(tmp_path) == []


def test_truncated_shard_names_the_file(model: Any, work: Path, tmp_path: Path) -> None:
    directory = _checkpoint(model, work, "truncated", shards=2)
    shard = directory / "model-00002-of-00002.safetensors"
    with shard.open("r+b") as fh:
        fh.truncate(shard.stat().st_size - 100)
    with pytest.raises(ConvertError, match=r"model-00002-of-00002\.safetensors is truncated"):
        convert(directory, tmp_path / "v.gguf")
    assert _written(tmp_path) == []


def _rewrite_weights(directory: Path, edit: Any) -> None:
    from safetensors.numpy import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


WEIGHT_EDITS = {
    "missing k_norm": (
        lambda t: t.pop("language_model.model.layers.3.cross_attn.k_norm.weight"),
        "lacks the tensor language_model.model.layers.3.cross_attn.k_norm.weight"),
    "missing lm_head": (lambda t: t.pop("language_model.lm_head.weight"),
                        "lacks the tensor language_model.lm_head.weight"),
    "missing tile embedding": (
        lambda t: t.pop("vision_model.gated_positional_embedding.tile_embedding.weight"),
        "lacks the tensor vision_model.gated_positional_embedding.tile_embedding.weight"),
    "extra vision tensor": (
        lambda t: t.__setitem__("vision_model.extra.weight", np.zeros(3, np.float32)),
        "tensor vision_model.extra.weight is not part of"),
    "self-attention in a cross layer": (
        lambda t: t.__setitem__("language_model.model.layers.1.self_attn.q_proj.weight",
                                np.zeros((64, 64), np.float32)),
        "layer 1 is a cross-attention layer, without self-attention"),
    "cross-attention in a self layer": (
        lambda t: t.__setitem__("language_model.model.layers.2.cross_attn_attn_gate",
                                np.zeros(1, np.float32)),
        "layer 2 is not in cross_attention_layers"),
    "unknown prefix": (lambda t: t.__setitem__("encoder.weight", np.zeros(3, np.float32)),
                       "tensor encoder.weight is not part of a Llama 3.2 Vision checkpoint"),
    "mixed layouts": (
        lambda t: t.__setitem__("model.vision_model.class_embedding",
                                t.pop("vision_model.class_embedding")),
        re.escape("mixes key layouts: language_model.lm_head.weight (transformers 4) and "
                  "model.vision_model.class_embedding (transformers 5)")),
    "wrong shape": (
        lambda t: t.__setitem__("multi_modal_projector.weight", np.zeros((64, 64), np.float32)),
        r"multi_modal_projector.weight has shape \[64, 64\], but config.json implies \[64, 96\]"),
    "integer weights": (
        lambda t: t.__setitem__("vision_model.class_embedding", np.zeros(32, np.int64)),
        "vision_model.class_embedding is I64"),
}


@pytest.mark.parametrize("case", list(WEIGHT_EDITS))
def test_wrong_tensors_are_named(case: str, v4_checkpoint: Path, tmp_path: Path) -> None:
    edit, message = WEIGHT_EDITS[case]
    directory = _copy(v4_checkpoint, tmp_path / "ckpt")
    _rewrite_weights(directory, edit)
    with pytest.raises(ConvertError, match=message):
        convert(directory, tmp_path / "v.gguf")
    assert not (tmp_path / "v.gguf").exists()


def _text(key: str, value: Any) -> Any:
    return lambda c: c["text_config"].__setitem__(key, value)


def _vision(key: str, value: Any) -> Any:
    return lambda c: c["vision_config"].__setitem__(key, value)


def _rope(key: str, value: Any) -> Any:
    return lambda c: c["text_config"]["rope_scaling"].__setitem__(key, value)


CONFIG_EDITS = {
    "heads do not divide hidden": (_text("num_attention_heads", 6), "does not divide into 6"),
    "kv heads do not divide heads": (_text("num_key_value_heads", 3), "does not divide"),
    "cross layer past the end": (_text("cross_attention_layers", [1, 5]),
                                 "cross_attention_layers holds 5; its entries must lie in 0..4"),
    "cross layer twice": (_text("cross_attention_layers", [1, 1, 3]), "lists a layer twice"),
    "cross layers not a list": (_text("cross_attention_layers", 3), "not a list"),
    "zero layers": (_text("num_hidden_layers", 0), "num_hidden_layers is 0"),
    "layers not a number": (_text("hidden_size", "64"), "hidden_size is '64', not a whole"),
    "negative rms eps": (_text("rms_norm_eps", -1e-5), "rms_norm_eps is -1e-05"),
    "text activation": (_text("hidden_act", "gelu"), "text_config.hidden_act is 'gelu'"),
    "tied embeddings": (_text("tie_word_embeddings", True), "tie_word_embeddings"),
    "rope type": (_rope("rope_type", "yarn"), "RoPE type 'yarn' is not supported"),
    "rope factor missing": (lambda c: c["text_config"]["rope_scaling"].pop("factor"),
                            "llama3 RoPE scaling lacks factor"),
    "rope theta zero": (_text("rope_theta", 0), "rope_theta is 0"),
    "rope low above high": (_rope("low_freq_factor", 5.0), "low_freq_factor must be below"),
    "image token past embeddings": (lambda c: c.__setitem__("image_token_index", 128264),
                                    "image_token_index is 128264"),
    "image token not <|image|>": (lambda c: c.__setitem__("image_token_index", 128257),
                                  "does not have <|image|> as token 128257"),
    "intermediate layer past the end": (_vision("intermediate_layers_indices", [0, 4]),
                                        "intermediate_layers_indices holds 4"),
    "vision output dim": (_vision("vision_output_dim", 64),
                          "vision_output_dim is 64, but hidden_size × .* is 96"),
    "vision activation": (_vision("hidden_act", "gelu_pytorch_tanh"),
                          "vision_config.hidden_act is 'gelu_pytorch_tanh'"),
    "vision heads": (_vision("attention_heads", 5), "does not divide into 5 attention heads"),
    "patch does not divide image": (_vision("patch_size", 13), "not a multiple of patch_size"),
    "channels": (_vision("num_channels", 4), "num_channels is 4"),
    "aspect ratios reordered": (
        _vision("supported_aspect_ratios", [[1, 2], [1, 1], [1, 3], [1, 4], [2, 1], [2, 2],
                                            [3, 1], [4, 1]]),
        "supported_aspect_ratios .* are not the 8 grids"),
    "too many tiles": (_vision("max_num_tiles", 65), "max_num_tiles is 65"),
    "non-square image": (_vision("image_size", [28, 42]), "only square sizes"),
    "max tiles differ from the processor's": (
        lambda c: (c["vision_config"].__setitem__("max_num_tiles", 3),
                   c["vision_config"].__setitem__(
                       "supported_aspect_ratios", [[1, 1], [1, 2], [1, 3], [2, 1], [3, 1]])),
        "max_image_tiles is 4, but the vision encoder's max_num_tiles is 3"),
    "vision config not an object": (lambda c: c.__setitem__("vision_config", [1]),
                                    "vision_config is list, not an object"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_bad_config_values(case: str, v4_checkpoint: Path, tmp_path: Path) -> None:
    edit, message = CONFIG_EDITS[case]
    directory = _copy(v4_checkpoint, tmp_path / "ckpt")
    _edit_json(directory / "config.json", edit)
    with pytest.raises(ConvertError, match=message):
        _converter(directory)


def test_tile_embedding_shape_is_checked(v4_checkpoint: Path, tmp_path: Path) -> None:
    # Three tiles: 5 aspect ratios (+ id 0) and 3·5·32 values a row, not the 9 × 4·5·32 held.
    directory = _copy(v4_checkpoint, tmp_path / "ckpt")
    _edit_json(directory / "config.json", lambda c: (
        _vision("max_num_tiles", 3)(c),
        _vision("supported_aspect_ratios", [[1, 1], [1, 2], [1, 3], [2, 1], [3, 1]])(c)))
    _edit_json(directory / "preprocessor_config.json",
               lambda p: p.__setitem__("max_image_tiles", 3))
    with pytest.raises(ConvertError, match=r"tile_embedding.weight has shape \[9, 640\], but "
                                           r"config.json implies \[6, 480\]"):
        _converter(directory)


def test_tensor_shapes_are_checked_against_the_config(v4_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    # A config that is consistent in itself but describes a bigger tile: the position and
    # tile-position tables are the first tensors whose shapes no longer match.
    directory = _copy(v4_checkpoint, tmp_path / "ckpt")
    _edit_json(directory / "config.json", _vision("image_size", 42))
    _edit_json(directory / "preprocessor_config.json",
               lambda p: p.__setitem__("size", {"height": 42, "width": 42}))
    with pytest.raises(ConvertError, match=r"gated_positional_embedding.embedding has shape "
                                           r"\[5, 32\], but config.json implies \[10, 32\]"):
        _converter(directory)


PREPROCESSOR_EDITS = {
    "tile size": (lambda p: p.__setitem__("size", {"height": 56, "width": 56}),
                  "tile size 56 is not the vision encoder's image_size 28"),
    "non-square tile": (lambda p: p.__setitem__("size", {"height": 28, "width": 56}),
                        "tiles are square"),
    "size without height": (lambda p: p.__setitem__("size", {"shortest_edge": 28}),
                            "must give the tile's height and width"),
    "max tiles": (lambda p: p.__setitem__("max_image_tiles", 2), "max_image_tiles is 2"),
    "two means": (lambda p: p.__setitem__("image_mean", [0.5, 0.5]),
                  "image_mean is .*, not three numbers"),
    "zero std": (lambda p: p.__setitem__("image_std", [0.2, 0.0, 0.2]),
                 "a standard deviation is positive"),
    "no rescale": (lambda p: p.__setitem__("do_rescale", False), "do_rescale is False"),
    "other rescale": (lambda p: p.__setitem__("rescale_factor", 1 / 127.5),
                      "rescale_factor is 0.00784"),
    "no padding": (lambda p: p.__setitem__("do_pad", False), "do_pad is False"),
    "another processor": (lambda p: p.__setitem__("image_processor_type", "CLIPImageProcessor"),
                          "describes a CLIPImageProcessor"),
}


@pytest.mark.parametrize("case", list(PREPROCESSOR_EDITS))
def test_bad_preprocessor_values(case: str, v4_checkpoint: Path, tmp_path: Path) -> None:
    edit, message = PREPROCESSOR_EDITS[case]
    directory = _copy(v4_checkpoint, tmp_path / "ckpt")
    _edit_json(directory / "preprocessor_config.json", edit)
    with pytest.raises(ConvertError, match=message):
        _converter(directory)


def test_preprocessor_not_an_object(v4_checkpoint: Path, tmp_path: Path) -> None:
    directory = _copy(v4_checkpoint, tmp_path / "ckpt")
    (directory / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ConvertError, match="is not a JSON object"):
        _converter(directory)


def test_normalization_off_is_mean_zero_std_one(v4_checkpoint: Path, tmp_path: Path) -> None:
    directory = _copy(v4_checkpoint, tmp_path / "ckpt")
    _edit_json(directory / "preprocessor_config.json",
               lambda p: p.__setitem__("do_normalize", False))
    converter = _converter(directory)
    assert (converter.image_mean, converter.image_std) == ([0.0] * 3, [1.0] * 3)


def test_transformers5_processor_config(v4_checkpoint: Path, tmp_path: Path) -> None:
    # transformers 5 may save the image processor inside processor_config.json instead.
    directory = _copy(v4_checkpoint, tmp_path / "ckpt")
    settings = json.loads((directory / "preprocessor_config.json").read_text())
    settings["image_std"] = [0.3, 0.3, 0.3]
    (directory / "preprocessor_config.json").unlink()
    (directory / "processor_config.json").write_text(json.dumps({"image_processor": settings}))
    assert _converter(directory).image_std == [0.3, 0.3, 0.3]


def test_missing_fields_get_transformers_defaults(v4_checkpoint: Path, tmp_path: Path) -> None:
    # Fields config.json may leave out: the converter fills them as MllamaConfig does.
    from transformers import MllamaConfig

    directory = _copy(v4_checkpoint, tmp_path / "ckpt")

    def strip(c: dict[str, Any]) -> None:
        for key in ("rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act"):
            c["text_config"].pop(key)
        c["text_config"]["rope_scaling"].pop("original_max_position_embeddings")
        for key in ("norm_eps", "supported_aspect_ratios", "hidden_act", "num_channels"):
            c["vision_config"].pop(key)
        c.pop("image_token_index")

    _edit_json(directory / "config.json", strip)
    converter = _converter(directory)
    reference = MllamaConfig(**json.loads((directory / "config.json").read_text()))
    text, vision = reference.text_config, reference.vision_config
    assert converter.rms_eps == text.rms_norm_eps
    assert converter.n_ctx == text.max_position_embeddings == 131072
    assert converter.rope_theta == text.rope_parameters["rope_theta"] == 500000.0
    assert converter.rope["original_max_position_embeddings"] == text.rope_parameters[
        "original_max_position_embeddings"] == 131072
    assert converter.v_eps == vision.norm_eps
    assert converter.aspect_ratios == [list(r) for r in vision.supported_aspect_ratios]
    assert converter.v_channels == vision.num_channels
    assert converter.image_token == reference.image_token_index


def test_rope_parameters_without_scaling_are_plain_rope(v4_checkpoint: Path,
                                                        tmp_path: Path) -> None:
    directory = _copy(v4_checkpoint, tmp_path / "ckpt")

    def plain(c: dict[str, Any]) -> None:
        c["text_config"].pop("rope_scaling")
        c["text_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}

    _edit_json(directory / "config.json", plain)
    converter = _converter(directory)
    assert converter.rope_theta == 10000.0
    assert converter.rope_factors == [1.0] * 8


def test_tile_embedding_is_streamed_by_rows(v4_checkpoint: Path, f32: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # With blocks smaller than one row of the tile-position table, each row is read alone
    # (on the real model a row is 4·1601·1280 floats, 33 MB), and the file is the same.
    from llmkit.convert import writer

    asked: list[tuple[str, int]] = []
    real_rows = MappedFiles.rows

    def rows(self: MappedFiles, ref: Any, a: int, b: int, order: Any = None) -> Any:
        asked.append((ref.name, b - a))
        return real_rows(self, ref, a, b, order)

    monkeypatch.setattr(writer, "BLOCK_ELEMENTS", 600)
    monkeypatch.setattr(MappedFiles, "rows", rows)
    out = tmp_path / "v.gguf"
    convert(v4_checkpoint, out, outtype="f32")
    tile = [n for name, n in asked
            if name == "vision_model.gated_positional_embedding.tile_embedding.weight"]
    assert tile == [1] * 9
    assert filecmp.cmp(out, f32, shallow=False)
