"""`llmkit convert` of SmolVLM: the language model and its mtmd projector, loaded by llama.cpp."""

from __future__ import annotations

import ctypes
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmkit.convert.idefics3 import (
    Idefics3ProjectorConverter,
    byte_level,
    missing_image_tokens,
    text_config,
)
from llmkit.convert.safetensors import MappedFiles, checkpoint_tensors
from llmkit.errors import ConvertError
from tests.checkpoints import _field, build_tiny_llama3
from tests.conftest import run_llmkit
from tests.vision_checkpoints import (
    CHAT_TEMPLATE,
    IMAGE_TOKENS,
    SPECIAL,
    TINY,
    build_smolvlm,
    build_tiny_smolvlm,
)

LAYER_PARTS = ["ln1", "attn_q", "attn_k", "attn_v", "attn_out", "ln2", "ffn_up", "ffn_down"]
PROJECTOR_TENSORS = [
    "v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight",
    *[f"v.blk.{i}.{part}.{kind}" for i in range(TINY.vision_layers) for part in LAYER_PARTS
      for kind in ("weight", "bias")],
    "v.post_ln.weight", "v.post_ln.bias", "mm.model.fc.weight",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("hf") / "SmolVLM-tiny"
    build_tiny_smolvlm(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def converted(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("converted")
    model = out / "model.gguf"
    proc = run_llmkit(["convert", str(tiny), "-o", str(model)])
    assert proc.returncode == 0, proc.stderr
    return {"model": model, "mmproj": out / "mmproj-model.gguf", "proc": proc, "dir": out}


def _reader(path: Path) -> Any:
    import gguf

    return gguf.GGUFReader(path)


# --- the files ------------------------------------------------------------------------


def test_both_files_are_written_and_named_on_stderr(converted: dict[str, Any]) -> None:
    proc = converted["proc"]
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0].startswith(f"llmkit: wrote {converted['model']} (21 tensors, ")
    assert "tokenizer smollm" in lines[0]
    assert lines[1].startswith(
        f"llmkit: wrote the vision projector to {converted['mmproj']} (38 tensors, ")
    assert sorted(p.name for p in converted["dir"].iterdir()) == ["mmproj-model.gguf",
                                                                 "model.gguf"]


def test_projector_metadata(converted: dict[str, Any]) -> None:
    reader = _reader(converted["mmproj"])
    expected = {
        "general.architecture": "clip", "general.type": "mmproj", "general.file_type": 1,
        "clip.projector_type": "idefics3", "clip.has_vision_encoder": True,
        "clip.use_gelu": True, "clip.vision.image_size": 64, "clip.vision.patch_size": 16,
        "clip.vision.embedding_length": 32, "clip.vision.feed_forward_length": 80,
        "clip.vision.block_count": 2, "clip.vision.attention.head_count": 2,
        "clip.vision.projection_dim": 64, "clip.vision.projector.scale_factor": 2,
        "clip.vision.preproc_image_size": 128,
    }
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-6)
    assert _field(reader, "clip.vision.image_mean") == pytest.approx(TINY.image_mean)
    assert _field(reader, "clip.vision.image_std") == pytest.approx(TINY.image_std)


def test_projector_tensors_names_shapes_and_types(converted: dict[str, Any]) -> None:
    from gguf import GGMLQuantizationType as T

    tensors = {t.name: t for t in _reader(converted["mmproj"]).tensors}
    assert sorted(tensors) == sorted(PROJECTOR_TENSORS)
    # GGUF lists dimensions innermost first (ggml's ne), the reverse of numpy/PyTorch.
    shapes = {"v.patch_embd.weight": [16, 16, 3, 32], "v.position_embd.weight": [32, 16],
              "mm.model.fc.weight": [128, 64], "v.blk.0.ffn_up.weight": [32, 80],
              "v.blk.1.ffn_down.weight": [80, 32], "v.blk.0.attn_q.weight": [32, 32],
              "v.blk.1.ffn_up.bias": [80], "v.post_ln.weight": [32]}
    for name, shape in shapes.items():
        assert tensors[name].shape.tolist() == shape, name
    for name, t in tensors.items():
        matrix = len(t.shape) == 2 and name != "v.position_embd.weight"
        assert t.tensor_type == (T.F16 if matrix else T.F32), name


def test_language_model_carries_the_image_tokens_and_template(converted: dict[str, Any],
                                                              tiny: Path) -> None:
    import gguf

    reader = _reader(converted["model"])
    assert _field(reader, "general.architecture") == "llama"
    names = [t.name for t in reader.tensors]
    assert not [n for n in names if n.startswith(("v.", "mm."))]
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= set(names)
    vocab = json.loads((tiny / "tokenizer.json").read_text())["model"]["vocab"]
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(vocab)
    for text in [*SPECIAL, *IMAGE_TOKENS]:
        assert tokens[vocab[text]] == text
        assert types[vocab[text]] == gguf.TokenType.CONTROL, text
    assert "ĊĊ" in tokens  # "\n\n", which mtmd looks up as one token
    assert _field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert _field(reader, "tokenizer.ggml.eos_token_id") == vocab["<end_of_utterance>"]
    assert _field(reader, "tokenizer.ggml.pre") == "smollm"


def test_explicit_mmproj_f32_and_json(tiny: Path, tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType as T

    model, projector = tmp_path / "lm.gguf", tmp_path / "vision" / "proj.gguf"
    proc = run_llmkit(["convert", str(tiny), "-o", str(model), "--mmproj", str(projector),
                       "--outtype", "f32", "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["path"] == str(model) and data["mmproj"] == str(projector)
    assert data["architecture"] == "SmolVLMForConditionalGeneration"
    assert data["mmproj_tensors"] == 38 and data["mmproj_size_bytes"] == projector.stat().st_size
    reader = _reader(projector)
    assert _field(reader, "general.file_type") == 0
    assert {t.tensor_type for t in reader.tensors} == {T.F32}
    assert not (tmp_path / "mmproj-lm.gguf").exists()


def test_bf16_idefics3_to_q8_0_keeps_the_projector_f16(tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType as T

    ckpt = tmp_path / "idefics3"
    build_smolvlm(ckpt, replace(TINY, architecture="Idefics3ForConditionalGeneration"),
                  dtype="bfloat16")
    model = tmp_path / "o.gguf"
    proc = run_llmkit(["convert", str(ckpt), "-o", str(model), "--outtype", "q8_0"])
    assert proc.returncode == 0, proc.stderr
    lm = {t.name: t.tensor_type for t in _reader(model).tensors}
    assert lm["blk.0.ffn_up.weight"] == T.Q8_0
    projector = {t.name: t.tensor_type for t in _reader(tmp_path / "mmproj-o.gguf").tensors}
    assert projector["v.blk.0.ffn_up.weight"] == T.F16
    assert projector["mm.model.fc.weight"] == T.F16
    assert projector["v.patch_embd.weight"] == T.F32


# --- errors -----------------------------------------------------------------------------


def test_mmproj_for_a_text_model_is_a_usage_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny-llama"
    build_tiny_llama3(ckpt)
    proc = run_llmkit(["convert", str(ckpt), "-o", str(tmp_path / "o.gguf"),
                       "--mmproj", str(tmp_path / "p.gguf")])
    assert proc.returncode == 2
    assert proc.stderr == ("llmkit: error: tiny-llama is a text-only model (LlamaForCausalLM); "
                           "it has no vision projector to write (leave out --mmproj)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_missing_vision_tensor(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    build_smolvlm(ckpt, drop=("model.vision_model.encoder.layers.1.mlp.fc2.bias",))
    proc = run_llmkit(["convert", str(ckpt), "-o", str(tmp_path / "o.gguf")])
    assert proc.returncode == 1
    assert proc.stderr == (
        "llmkit: error: the checkpoint lacks the vision tensor "
        "model.vision_model.encoder.layers.1.mlp.fc2.bias (the download may be incomplete)\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing, not even temps


def test_unsupported_architecture_lists_smolvlm(tiny: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "other"
    shutil.copytree(tiny, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (ckpt / "config.json").write_text(json.dumps(config))
    proc = run_llmkit(["convert", str(ckpt), "-o", str(tmp_path / "o.gguf")])
    assert proc.returncode == 1
    assert proc.stderr == (
        "llmkit: error: architecture 'Qwen2VLForConditionalGeneration' is not supported "
        "(supported are Idefics3ForConditionalGeneration, LlamaForCausalLM, "
        "MllamaForConditionalGeneration, SmolVLMForConditionalGeneration)\n")


def test_existing_projector_needs_force(tiny: Path, tmp_path: Path) -> None:
    model, projector = tmp_path / "o.gguf", tmp_path / "mmproj-o.gguf"
    projector.write_bytes(b"keep me")
    proc = run_llmkit(["convert", str(tiny), "-o", str(model)])
    assert proc.returncode == 2
    assert proc.stderr == f"llmkit: error: {projector} exists (pass --force to replace it)\n"
    assert projector.read_bytes() == b"keep me" and not model.exists()
    proc = run_llmkit(["convert", str(tiny), "-o", str(model), "--force"])
    assert proc.returncode == 0, proc.stderr
    assert _field(_reader(projector), "general.architecture") == "clip"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmproj-o.gguf", "o.gguf"]


def test_projector_and_model_at_the_same_path(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    proc = run_llmkit(["convert", str(tiny), "-o", str(out), "--mmproj", str(out)])
    assert proc.returncode == 2
    assert proc.stderr == (f"llmkit: error: the projector and the model would both be {out} "
                           "(give --mmproj another file name)\n")


# --- the pieces, without the CLI -----------------------------------------------------------


def _projector(ckpt: Path, config: dict[str, Any]) -> Idefics3ProjectorConverter:
    files = MappedFiles()
    try:
        converter = Idefics3ProjectorConverter(ckpt, config, checkpoint_tensors(ckpt), files)
        converter.tensors("f16")
        return converter
    finally:
        files.close()


@pytest.mark.parametrize(("change", "message"), [
    ({"intermediate_size": 32}, "intermediate_size equals hidden_size"),
    ({"hidden_act": "relu"}, "activation 'relu' (mtmd's Idefics3 encoder uses GELU)"),
    ({"patch_size": 24}, "image_size 64 is not a multiple of patch_size 24"),
    ({"num_attention_heads": 3}, "hidden_size 32 does not divide into 3 heads"),
    ({"hidden_size": 48}, "tensor model.vision_model.embeddings.patch_embedding.weight has "
                          "shape [32, 3, 16, 16], but config.json implies [48, 3, 16, 16]"),
    ({"num_hidden_layers": 3}, "the checkpoint lacks the vision tensor "
                               "model.vision_model.encoder.layers.2.layer_norm1.weight"),
    ({"num_hidden_layers": 1}, "tensor model.vision_model.encoder.layers.1.layer_norm1.bias "
                               "has no llama.cpp counterpart"),
])
def test_vision_config_problems(tiny: Path, change: dict[str, Any], message: str) -> None:
    config = json.loads((tiny / "config.json").read_text())
    config["vision_config"] |= change
    with pytest.raises(ConvertError) as err:
        _projector(tiny, config)
    assert message in err.value.message


def test_scale_factor_must_divide_the_patch_grid(tiny: Path) -> None:
    config = json.loads((tiny / "config.json").read_text()) | {"scale_factor": 3}
    with pytest.raises(ConvertError, match="4 patches per side do not divide by scale_factor 3"):
        _projector(tiny, config)


def test_missing_image_tokens(tiny: Path, tmp_path: Path) -> None:
    assert missing_image_tokens(tiny, 6) == []
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"]
                           if t["content"] not in ("<global-img>", "<row_2_col_1>")]
    del tok["model"]["vocab"]["ĊĊ"]
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    assert missing_image_tokens(ckpt, 1) == ["<global-img>", "\\n\\n"]
    assert missing_image_tokens(ckpt, 2) == ["<global-img>", "<row_2_col_1>", "\\n\\n"]
    with pytest.raises(ConvertError, match="the tokenizer lacks <global-img>, <row_2_col_1>"):
        _projector(ckpt, json.loads((ckpt / "config.json").read_text()))


def test_preprocessor_config_is_required(tiny: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny, ckpt)
    (ckpt / "preprocessor_config.json").unlink()
    with pytest.raises(ConvertError, match="has no image_mean for the image preprocessor"):
        _projector(ckpt, json.loads((ckpt / "config.json").read_text()))


@pytest.mark.parametrize(("text", "spelled"), [("\n", "Ċ"), ("\n\n", "ĊĊ"), (" a", "Ġa"),
                                               ("é", "Ã©")])
def test_byte_level_spelling(text: str, spelled: str) -> None:
    assert byte_level(text) == spelled


def test_text_config_fills_smolvlm2_gaps() -> None:
    # SmolVLM2's text_config has no num_attention_heads, and Idefics3 keeps vocab_size outside.
    config = {"vocab_size": 49280, "text_config": {"hidden_size": 2048, "head_dim": 64},
              "vision_config": {"hidden_size": 768}}
    merged = text_config(config, {})
    assert merged["num_attention_heads"] == 32 and merged["vocab_size"] == 49280
    assert merged["rms_norm_eps"] == 1e-5 and merged["hidden_size"] == 2048
    assert "vision_config" not in merged and "text_config" not in merged


# --- through llama.cpp and mtmd ------------------------------------------------------------


@contextmanager
def mtmd_session(model_path: Path, mmproj_path: Path) -> Iterator[tuple[Any, Any, Any]]:
    """(llama model, llama context, mtmd context), loaded on the CPU with one thread."""
    import llama_cpp as lc
    import llama_cpp.mtmd_cpp as mtmd

    lc.llama_backend_init()
    params = lc.llama_model_default_params()
    params.n_gpu_layers = 0
    model = lc.llama_model_load_from_file(str(model_path).encode(), params)
    assert model, "llama.cpp could not load the language model"
    cparams = lc.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 512
    cparams.n_threads = cparams.n_threads_batch = 1
    ctx = lc.llama_init_from_model(model, cparams)
    mparams = mtmd.mtmd_context_params_default()
    mparams.use_gpu = False
    mparams.n_threads = 1
    mparams.warmup = False
    vision = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), model, mparams)
    try:
        assert ctx, "llama.cpp could not create a context"
        assert vision, "mtmd could not load the projector"
        yield model, ctx, vision
    finally:
        if vision:
            mtmd.mtmd_free(vision)
        if ctx:
            lc.llama_free(ctx)
        lc.llama_model_free(model)


@contextmanager
def tokenized(vision: Any, text: bytes, rgb: np.ndarray) -> Iterator[Any]:
    """mtmd input chunks for ``text`` (with the default marker) and one RGB image."""
    import llama_cpp.mtmd_cpp as mtmd

    height, width, _ = rgb.shape
    data = (ctypes.c_uint8 * rgb.size).from_buffer_copy(np.ascontiguousarray(rgb).tobytes())
    bitmap = mtmd.mtmd_bitmap_init(width, height, data)
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        inp = mtmd.mtmd_input_text(text=text, text_len=len(text), add_special=False,
                                   parse_special=True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(vision, chunks, ctypes.byref(inp), bitmaps, 1) == 0
        yield chunks
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)


def _chunks(chunks: Any) -> list[tuple[str, Any, list[int]]]:
    """(kind, chunk, text tokens) for every chunk."""
    import llama_cpp.mtmd_cpp as mtmd

    out = []
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            out.append(("text", chunk, [ids[j] for j in range(n.value)]))
        else:
            out.append(("image", chunk, []))
    return out


@pytest.mark.slow
def test_mtmd_tokenizes_and_evaluates_an_image(converted: dict[str, Any], tiny: Path) -> None:
    import llama_cpp as lc
    import llama_cpp.mtmd_cpp as mtmd

    vocab = json.loads((tiny / "tokenizer.json").read_text())["model"]["vocab"]
    marker = mtmd.mtmd_default_marker()
    prompt = b"<|im_start|>User:" + marker + b"Describe.<end_of_utterance>\nAssistant:"
    # 100×60 is resized to 128×76 (longest edge 128), then cut into 2×2 tiles of 64.
    rgb = np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8)
    with mtmd_session(converted["model"], converted["mmproj"]) as (model, ctx, vision), \
            tokenized(vision, prompt, rgb) as chunks:
        assert mtmd.mtmd_support_vision(vision)
        parts = _chunks(chunks)
        images = [chunk for kind, chunk, _ in parts if kind == "image"]
        assert len(images) == 5  # four tiles and the global image
        assert all(mtmd.mtmd_input_chunk_get_n_tokens(c) == TINY.tokens_per_tile
                   for c in images)
        text_ids = [i for kind, _, ids in parts if kind == "text" for i in ids]
        for token in ("<fake_token_around_image>", "<global-img>", "<row_1_col_1>",
                      "<row_2_col_2>", "ĊĊ", "<end_of_utterance>"):
            assert vocab[token] in text_ids, token
        n_past = lc.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(vision, ctx, chunks, 0, 0, 512, True,
                                            ctypes.byref(n_past)) == 0
        assert n_past.value == mtmd.mtmd_helper_get_n_pos(chunks) > 5 * TINY.tokens_per_tile
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        assert np.isfinite(logits).all() and logits.std() > 0


@pytest.mark.slow
def test_image_embeddings_match_transformers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import llama_cpp.mtmd_cpp as mtmd

    # Longest edge = tile size: a 64×64 image is then used as it is, for the global image
    # and the single tile alike, so no resampling stands between the two implementations.
    ckpt = tmp_path / "ckpt"
    build_tiny_smolvlm(ckpt, longest_edge=TINY.image_size)
    model_path = tmp_path / "m.gguf"
    proc = run_llmkit(["convert", str(ckpt), "-o", str(model_path), "--outtype", "f32"])
    assert proc.returncode == 0, proc.stderr
    size = TINY.image_size
    rgb = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    ours = []
    with mtmd_session(model_path, tmp_path / "mmproj-m.gguf") as (_, _, vision), \
            tokenized(vision, mtmd.mtmd_default_marker(), rgb) as chunks:
        for kind, chunk, _ in _chunks(chunks):
            if kind == "image":
                n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                assert mtmd.mtmd_encode_chunk(vision, chunk) == 0
                embd = mtmd.mtmd_get_output_embd(vision)
                ours.append(np.ctypeslib.as_array(embd, shape=(n * TINY.text_hidden,))
                            .reshape(n, TINY.text_hidden).copy())
    assert len(ours) == 2

    hf, info = transformers.SmolVLMForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.eval()
    # Idefics3's processor: rescale by 1/255, then normalize with the checkpoint's mean/std.
    mean, std = np.float32(TINY.image_mean), np.float32(TINY.image_std)
    pixels = (rgb.astype(np.float32) * np.float32(1 / 255) - mean) / std
    pixel_values = torch.from_numpy(pixels.transpose(2, 0, 1).copy())[None, None]
    with torch.no_grad():
        reference = hf.get_image_features(pixel_values=pixel_values).pooler_output[0].numpy()
    assert reference.shape == (TINY.tokens_per_tile, TINY.text_hidden)
    for embedding in ours:
        # ggml's GELU is tabulated in f16 on the CPU: about 1e-4 relative, not f32's 1e-7.
        rel = np.max(np.abs(embedding - reference)) / np.max(np.abs(reference))
        assert rel < 2e-3, rel
