"""The ggml text decoder and its caches (MllamaModel) equal transformers under Meta's semantics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmkit.engines.mllama import text
from llmkit.engines.mllama.model import MllamaModel
from llmkit.engines.mllama.preprocess import TiledImage, tile_image
from llmkit.errors import DeviceError, InputError, InvalidModelFileError, LlmkitError
from tests import mllama_model as mm
from tests.gguf_edit import GGUFEdit

# Logits of the f32 GGUF with F32 caches against transformers 5.24 (float32, Meta's
# semantics): the brief's bound. Measured 3.5e-6 at most over the 8 aspect ids, text only and
# 20 decode steps (logits up to 5 in size; next-token KL 2e-13).
TOLERANCE_F32 = 1e-3
# The f32 GGUF with the default F16 caches (keys and values rounded to F16; the CPU's flash
# attention then rounds the queries to F16 too): measured 4.8e-3 (KL 5e-7).
TOLERANCE_F16_CACHE = 1.5e-2
# Rounded weights with the default F16 caches, as (max |logit error|, max next-token KL in
# nats) over a prompt and 4 decode steps. Measured on the 8 aspect ids and 20 decode steps:
# f16 GGUF (text and vision matrices F16) 7.1e-3, KL 1.1e-6; q8_0 GGUF (text matrices,
# embedding and output Q8_0; the CPU also rounds activations to Q8_0 for those products)
# 0.155, KL 5e-4: rows of 64 are only two Q8_0 blocks in this tiny model.
TOLERANCE = {"f16": (2.5e-2, 1e-5), "q8_0": (0.4, 2e-3)}

# <|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>What is in this
# image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n: the published template's
# rendering of one image and a question (ids of the real Llama 3.2 tokenizer).
PROMPT = [128000, 128006, 882, 128007, 271, 128256, 3923, 374, 304, 420, 2217, 30, 128009,
          128006, 78191, 128007, 271]
IMAGE_AT = PROMPT.index(mm.IMAGE_TOKEN_ID)
TEXT_PROMPT = [128000, 128006, 882, 128007, 271, 9906, 11, 1268, 527, 499, 3432, 30, 128009,
               128006, 78191, 128007, 271]


@dataclass
class Pixels:
    rgb: bytes
    width: int
    height: int


@dataclass
class Tiny:
    model: Any  # the transformers oracle
    files: dict[str, Path]  # outtype → GGUF
    f32: MllamaModel  # the f32 GGUF with F32 caches


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mm.require_oracle()
    model = mm.build_model(seed=0)
    files = mm.convert_tiny(model, tmp_path_factory.mktemp("text"), ("f32", "f16", "q8_0"))
    forward = MllamaModel.open(files["f32"], threads=1, device="cpu", kv_type="f32")
    yield Tiny(model, files, forward)
    forward.close()


def _tiled(picture: Any, forward: MllamaModel) -> TiledImage:
    return tile_image(Pixels(picture.tobytes(), picture.width, picture.height),
                      mean=forward.image_mean, std=forward.image_std,
                      max_tiles=forward.max_tiles, tile_size=forward.tile_size)


def _picture(aspect_id: int, seed: int = 0) -> Any:
    width, height = mm.ASPECT_PICTURE_SIZES[aspect_id]
    return mm.random_picture(width, height, seed=seed)


def _projector_states(model: Any, picture: Any) -> np.ndarray:
    """transformers' cross-attention states (the projector's output) for one picture, real
    tiles only, as [tokens, n_embd]."""
    import torch

    captured: list[torch.Tensor] = []
    handle = model.model.multi_modal_projector.register_forward_hook(
        lambda _m, _a, out: captured.append(out.detach()))
    try:
        mm.reference_logits(model, PROMPT, picture)
    finally:
        handle.remove()
    inputs = mm.image_inputs(picture, model.config)
    states = captured[0].float().numpy()  # [1, 1, max_tiles, n_patches, n_embd]
    n_embd = states.shape[-1]
    per_tile = states.shape[-2]
    return states.reshape(-1, n_embd)[:inputs.num_tiles * per_tile].copy()


def _kl(reference: np.ndarray, got: np.ndarray) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    p, q = log_softmax(reference), log_softmax(got)
    return float((np.exp(p) * (p - q)).sum())


# ---------------------------------------------------------------------------------------------
# Loading


def test_opens_with_the_forward_contract(tiny: Tiny) -> None:
    f = tiny.f32
    assert (f.n_vocab, f.n_ctx, f.device, f.threads) == (mm.VOCAB_SIZE, 512, "cpu", 1)
    assert f.threads_reason == "set by --threads"
    assert (f.tile_size, f.max_tiles) == (28, 4)
    assert f.image_mean == pytest.approx(mm.IMAGE_MEAN) and f.image_std == pytest.approx(
        mm.IMAGE_STD)
    # Default context: min(4096, the training context), as the llama.cpp engine.
    with MllamaModel.open(tiny.files["f32"], threads=1, n_ctx=64) as small:
        assert small.n_ctx == 64
        with pytest.raises(InputError, match="do not fit the 64-token context"):
            small.eval(list(range(1000, 1065)), 0, None)


def test_gpu_is_refused_on_a_cpu_build(tiny: Tiny) -> None:
    with pytest.raises(DeviceError, match="no GPU offload"):
        MllamaModel.open(tiny.files["f32"], device="gpu")


def _edited(source: Path, target: Path, edit: Any) -> Path:
    gguf = GGUFEdit.load(source)
    edit(gguf)
    return gguf.write(target)


def test_a_misshapen_or_missing_tensor_is_refused_by_name(tiny: Tiny, tmp_path: Path) -> None:
    name = "blk.1.cross_attn_k_norm.weight"
    bad = _edited(tiny.files["f32"], tmp_path / "bad.gguf",
                  lambda g: g.resize(name, [8]))
    with pytest.raises(InvalidModelFileError, match=rf"tensor {name} has shape \[8\], "
                                                    r"expected \[16\]"):
        MllamaModel.open(bad, threads=1)

    def drop(g: GGUFEdit) -> None:
        g.resize("blk.2.ffn_up.weight", g.tensor("blk.2.ffn_up.weight").dims)
        g.tensors = [t for t in g.tensors if t.name != "blk.2.ffn_up.weight"]

    missing = _edited(tiny.files["f32"], tmp_path / "missing.gguf", drop)
    with pytest.raises(InvalidModelFileError, match=r"has no tensor blk\.2\.ffn_up\.weight"):
        MllamaModel.open(missing, threads=1)


# ---------------------------------------------------------------------------------------------
# Parity with transformers (Meta's semantics)


def test_text_only_logits_equal_transformers(tiny: Tiny) -> None:
    want = mm.reference_logits(tiny.model, TEXT_PROMPT)
    got = tiny.f32.eval_rows(TEXT_PROMPT, 0, None)
    np.testing.assert_allclose(got, want, atol=TOLERANCE_F32, rtol=0)
    last = tiny.f32.eval(TEXT_PROMPT, 0, None)
    assert last.shape == (mm.VOCAB_SIZE,) and last.dtype == np.float32
    np.testing.assert_allclose(last, want[-1], atol=TOLERANCE_F32, rtol=0)


@pytest.mark.parametrize("aspect_id", [1, 4, 6])
def test_the_text_side_alone_on_transformers_image_states(tiny: Tiny, aspect_id: int) -> None:
    # The projector output is transformers' own: only the cross-attention K/V, the cross layers
    # and the row masks are llmkit's here.
    picture = _picture(aspect_id)
    tiny.f32.encode_states(_projector_states(tiny.model, picture))
    got = tiny.f32.eval_rows(PROMPT, 0, IMAGE_AT)
    want = mm.reference_logits(tiny.model, PROMPT, picture)
    np.testing.assert_allclose(got, want, atol=TOLERANCE_F32, rtol=0)


@pytest.mark.parametrize("aspect_id", range(1, 9))
def test_an_image_prompt_equals_transformers_for_each_aspect_ratio(tiny: Tiny,
                                                                   aspect_id: int) -> None:
    picture = _picture(aspect_id, seed=aspect_id)
    tiled = _tiled(picture, tiny.f32)
    assert tiled.aspect_ratio_id == aspect_id
    tiny.f32.encode_image(tiled)
    assert tiny.f32.image_tokens == tiled.num_tiles * 5
    got = tiny.f32.eval_rows(PROMPT, 0, IMAGE_AT)
    want = mm.reference_logits(tiny.model, PROMPT, picture)
    np.testing.assert_allclose(got, want, atol=TOLERANCE_F32, rtol=0)


def test_rows_before_the_image_are_the_text_only_model(tiny: Tiny) -> None:
    tiny.f32.encode_image(_tiled(_picture(6), tiny.f32))
    got = tiny.f32.eval_rows(PROMPT, 0, IMAGE_AT)
    text_only = mm.reference_logits(tiny.model, PROMPT[:IMAGE_AT])
    np.testing.assert_allclose(got[:IMAGE_AT], text_only, atol=TOLERANCE_F32, rtol=0)
    # …and the rows from <|image|> on do see it.
    plain = tiny.f32.eval_rows(PROMPT, 0, None)
    assert np.abs(got[IMAGE_AT:] - plain[IMAGE_AT:]).max(axis=1).min() > 0.1
    # With an image kept but image_from None, no row sees it (the cross layers are skipped).
    np.testing.assert_allclose(plain, mm.reference_logits(tiny.model, PROMPT), atol=TOLERANCE_F32,
                               rtol=0)


def test_a_different_picture_changes_the_logits(tiny: Tiny) -> None:
    rows = []
    for seed in (1, 2):
        picture = _picture(6, seed=seed)
        tiny.f32.encode_image(_tiled(picture, tiny.f32))
        rows.append(tiny.f32.eval(PROMPT, 0, IMAGE_AT))
        np.testing.assert_allclose(rows[-1], mm.reference_logits(tiny.model, PROMPT, picture)[-1],
                                   atol=TOLERANCE_F32, rtol=0)
    assert np.abs(rows[0] - rows[1]).max() > 0.3


def test_twenty_cached_decode_steps_equal_transformers(tiny: Tiny) -> None:
    picture = _picture(5, seed=3)
    fed, want = mm.reference_decode(tiny.model, PROMPT, picture, steps=20)
    f = tiny.f32
    f.encode_image(_tiled(picture, f))
    got = [f.eval(PROMPT, 0, IMAGE_AT)]
    reused = []
    for k, token in enumerate(fed):
        got.append(f.eval([token], len(PROMPT) + k, IMAGE_AT))
        assert f.last is not None
        reused.append(f.last.reused)
    np.testing.assert_allclose(np.stack(got), want, atol=TOLERANCE_F32, rtol=0)
    # One decode graph served every step after the first (the window stays under 256).
    assert reused == [False] + [True] * 19
    assert f.n_cached == len(PROMPT) + 20


@pytest.mark.parametrize("matmul_rows", [0, 1, 32],
                         ids=["fused-everywhere", "fused-prompt", "products-everywhere"])
def test_both_cross_attention_paths_equal_transformers(tiny: Tiny, monkeypatch: Any,
                                                       matmul_rows: int) -> None:
    # Steps up to CROSS_MATMUL_ROWS tokens cross-attend with two matrix products, longer ones
    # with the fused kernel: whichever a prompt or a decode step takes must be transformers'.
    monkeypatch.setattr(text, "CROSS_MATMUL_ROWS", matmul_rows)
    picture = _picture(7, seed=4)
    fed, want = mm.reference_decode(tiny.model, PROMPT, picture, steps=3)
    f = tiny.f32
    f.encode_image(_tiled(picture, f))  # drops any kept decode graph: built anew here
    got = [f.eval(PROMPT, 0, IMAGE_AT)]
    got += [f.eval([token], len(PROMPT) + k, IMAGE_AT) for k, token in enumerate(fed)]
    np.testing.assert_allclose(np.stack(got), want, atol=TOLERANCE_F32, rtol=0)
    rows = f.eval_rows(PROMPT, 0, IMAGE_AT)
    np.testing.assert_allclose(rows, mm.reference_logits(tiny.model, PROMPT, picture),
                               atol=TOLERANCE_F32, rtol=0)


def test_text_decode_after_a_text_prompt(tiny: Tiny) -> None:
    fed, want = mm.reference_decode(tiny.model, TEXT_PROMPT, None, steps=6)
    f = tiny.f32
    got = [f.eval(TEXT_PROMPT, 0, None)]
    got += [f.eval([t], len(TEXT_PROMPT) + k, None) for k, t in enumerate(fed)]
    np.testing.assert_allclose(np.stack(got), want, atol=TOLERANCE_F32, rtol=0)


def test_truncating_the_cache_equals_evaluating_from_scratch(tiny: Tiny) -> None:
    f = tiny.f32
    picture = _picture(2, seed=4)
    f.encode_image(_tiled(picture, f))
    f.eval(PROMPT + mm.decode_tokens(8), 0, IMAGE_AT)
    tail = mm.decode_tokens(5, seed=99)
    kept = len(PROMPT) + 3
    got = f.eval_rows(tail, kept, IMAGE_AT)
    whole = PROMPT + mm.decode_tokens(8)[:3] + tail
    want = mm.reference_logits(tiny.model, whole, picture)[kept:]
    np.testing.assert_allclose(got, want, atol=TOLERANCE_F32, rtol=0)
    # Back before the image: text rows only, the cache kept up to there.
    f.eval(TEXT_PROMPT, 0, None)
    back = f.eval_rows(PROMPT[3:], 3, IMAGE_AT)
    np.testing.assert_allclose(back, mm.reference_logits(tiny.model, TEXT_PROMPT[:3] + PROMPT[3:],
                                                         picture)[3:],
                               atol=TOLERANCE_F32, rtol=0)
    assert f.n_cached == len(PROMPT)


def test_misuse_is_refused(tiny: Tiny) -> None:
    f = tiny.f32
    f.eval(TEXT_PROMPT, 0, None)
    with pytest.raises(LlmkitError, match="cache holds 17"):
        f.eval([1000], 18, None)
    with pytest.raises(InputError, match="empty"):
        f.eval([], 0, None)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        f.eval([128264], 0, None)
    f.drop_image()
    with pytest.raises(LlmkitError, match="none is encoded"):
        f.eval(PROMPT, 0, IMAGE_AT)
    with pytest.raises(InputError, match="do not fit"):
        f.encode_states(np.zeros((3, 65), dtype=np.float32))


def test_f16_caches_stay_close(tiny: Tiny) -> None:
    picture = _picture(6, seed=5)
    want = mm.reference_logits(tiny.model, PROMPT, picture)
    with MllamaModel.open(tiny.files["f32"], threads=1) as f:
        assert f.kv_type == "f16"
        f.encode_image(_tiled(picture, f))
        got = f.eval_rows(PROMPT, 0, IMAGE_AT)
    np.testing.assert_allclose(got, want, atol=TOLERANCE_F16_CACHE, rtol=0)


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_rounded_weights_stay_close(tiny: Tiny, outtype: str) -> None:
    picture = _picture(6, seed=6)
    fed, want = mm.reference_decode(tiny.model, PROMPT, picture, steps=4)
    with MllamaModel.open(tiny.files[outtype], threads=1) as f:
        f.encode_image(_tiled(picture, f))
        got = [f.eval(PROMPT, 0, IMAGE_AT)]
        got += [f.eval([t], len(PROMPT) + k, IMAGE_AT) for k, t in enumerate(fed)]
    err = float(np.abs(np.stack(got) - want).max())
    kl = max(_kl(w, g) for w, g in zip(want, got, strict=True))
    atol, max_kl = TOLERANCE[outtype]
    assert err < atol and kl < max_kl, (outtype, err, kl)


def test_graph_reuse_saves_the_build(tiny: Tiny) -> None:
    # Timings on the tiny model: what a decode step costs with its graph built again and with
    # the kept graph computed again (the per-token overhead of graph building).
    f = tiny.f32
    f.eval(TEXT_PROMPT, 0, None)
    assert f.last is not None and not f.last.reused and f.last.build_us > 0
    t0 = time.perf_counter()
    for k in range(10):
        f.eval([1000 + k], len(TEXT_PROMPT) + k, None)
        assert f.last.reused == (k > 0)
    assert (time.perf_counter() - t0) < 10
    # A step crossing the 256-position window boundary builds a new graph.
    assert text.kv_window(255, 1, 512) == 256 and text.kv_window(256, 1, 512) == 512


def test_decode_across_the_attention_window_boundary(tiny: Tiny) -> None:
    # 250 prompt tokens, then 10 decoded ones: the window grows from 256 to 512 positions
    # at position 256, the kept graph is replaced, and the logits stay transformers'.
    prompt = [mm.BOS_TOKEN_ID, *mm.decode_tokens(249, seed=7)]
    fed, want = mm.reference_decode(tiny.model, prompt, None, steps=10)
    f = tiny.f32
    got = [f.eval(prompt, 0, None)]
    reused = []
    for k, token in enumerate(fed):
        got.append(f.eval([token], len(prompt) + k, None))
        assert f.last is not None
        reused.append(f.last.reused)
    np.testing.assert_allclose(np.stack(got), want, atol=TOLERANCE_F32, rtol=0)
    # Positions 250..255 share the 256-window graph; 256 needs the 512 one, kept from then on.
    assert reused == [False, True, True, True, True, True, False, True, True, True]
