"""The ggml vision tower and projector equal transformers' under Meta's semantics (tiny model)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from llmkit.engines.mllama import vision
from llmkit.engines.mllama._backend import Backend, Runner, Weights
from llmkit.engines.mllama._ggml import GgmlType
from llmkit.engines.mllama.hparams import MllamaFile, read_mllama
from llmkit.engines.mllama.preprocess import TiledImage, tile_image
from llmkit.errors import InvalidModelFileError, UsageError
from tests import mllama_model as mm

# The projector's output (the cross-attention states) against transformers 5.24 in float32:
# measured ≤ 3e-6 on every aspect-ratio id; the brief's bound is 1e-3.
TOLERANCE_F32 = 1e-3
# An f16 GGUF keeps the vision matrices in F16 and the CPU rounds the activations to F16 for
# those products: measured 2.1e-3 to 3.2e-3 on states up to ~5 in size (ids 1-8).
TOLERANCE_F16 = 1e-2
# transformers 5.24 as it is (layer OUTPUTS as the intermediate states) must be told apart.
UNPATCHED_MIN_DIFFERENCE = 1.0

TEXT_WIDTH = 64  # tiny_config's text hidden size: the projector's output


@dataclass
class Pixels:
    rgb: bytes
    width: int
    height: int


@dataclass
class Tower:
    model: Any
    file: MllamaFile
    f16: MllamaFile
    backend: Backend
    runner: Runner
    weights: Weights
    weights16: Weights


@pytest.fixture(scope="module")
def tower(tmp_path_factory: pytest.TempPathFactory) -> Any:
    mm.require_oracle()
    model = mm.build_model(seed=0)
    files = {outtype: read_mllama(path) for outtype, path in
             mm.convert_tiny(model, tmp_path_factory.mktemp("vision"), ("f32", "f16")).items()}
    backend = Backend("cpu", threads=2)
    runner = Runner(backend)
    shapes = vision.expected_tensors(files["f32"].vision, TEXT_WIDTH)
    weights = Weights(files["f32"].path, backend, expected=shapes)
    weights16 = Weights(files["f16"].path, backend, expected=shapes)
    yield Tower(model, files["f32"], files["f16"], backend, runner, weights, weights16)
    weights.close()
    weights16.close()
    runner.close()
    backend.close()


def _tiled(picture: Any, file: MllamaFile) -> TiledImage:
    vp = file.vision
    return tile_image(Pixels(picture.tobytes(), picture.width, picture.height),
                      mean=vp.image_mean, std=vp.image_std, max_tiles=vp.max_tiles,
                      tile_size=vp.image_size)


def _reference(model: Any, picture: Any, *, meta: bool = True) -> np.ndarray:
    """The cross-attention states transformers hands the text model for one picture:
    ``multi_modal_projector(vision_outputs)`` reshaped as MllamaModel.forward does it."""
    import torch

    inputs = mm.image_inputs(picture, model.config)
    with torch.no_grad(), mm.meta_semantics(model, vision_inputs=meta, pre_image_rows=meta):
        states = model.model.vision_model(**inputs.torch_kwargs()).last_hidden_state
        projected = model.model.multi_modal_projector(states)
        out = projected.reshape(-1, states.shape[-2], TEXT_WIDTH)
    # [images·tiles, n_patches, D] → one row per vision token, tile-major.
    result: np.ndarray = out.reshape(-1, TEXT_WIDTH).numpy()
    return result


# ---------------------------------------------------------------------------------------------
# Inputs


def test_patch_rows_times_the_weight_are_the_convolution(tower: Tower) -> None:
    import torch

    vp = tower.file.vision
    tiled = _tiled(mm.random_picture(56, 56, seed=1), tower.file)
    rows = vision.patches(tiled, vp)
    assert rows.shape == (4, 4, 3 * 14 * 14) and rows.dtype == np.float32
    conv = tower.model.model.vision_model.patch_embedding
    with torch.no_grad():
        want = conv(torch.from_numpy(tiled.pixels)).flatten(2).transpose(1, 2).numpy()
    weight = conv.weight.detach().numpy().reshape(vp.n_embd, -1)
    np.testing.assert_allclose(rows @ weight.T, want, atol=1e-5)


def test_the_attention_mask_is_transformers_own() -> None:
    mm.require_oracle()
    import torch
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    vp = _tiny_params()
    for real in range(1, 5):
        tile_mask = [1] * real + [0] * (4 - real)
        got = vision.attention_mask(tuple(tile_mask), vp)
        assert got.shape == (32, 32) and got.dtype == np.float16
        hf = _prepare_aspect_ratio_attention_mask(torch.tensor([tile_mask]), vp.n_patches,
                                                  vp.n_padded, torch.float32)[0, 0].numpy()
        assert np.array_equal(got == -np.inf, hf < 0)
        assert set(np.unique(got).tolist()) == {0.0, -np.inf}
        assert not (got == -np.inf).all(axis=1).any()  # every query sees some key


def _tiny_params() -> Any:
    from llmkit.engines.mllama.hparams import VisionParams

    return VisionParams(
        n_embd=32, n_layer=4, n_global=2, n_ff=128, n_head=4, eps=1e-5, image_size=28,
        patch_size=14, max_tiles=4, channels=3, output_dim=96, intermediate=(0, 2),
        aspect_ratios=tuple((r, c) for r, c in mm.SUPPORTED_ASPECT_RATIOS),
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), rescale=1 / 255)


def test_tiles_that_do_not_fit_the_model_are_refused(tower: Tower) -> None:
    vp = tower.file.vision
    tiled = _tiled(mm.random_picture(28, 28), tower.file)
    small = tile_image(Pixels(bytes(3 * 20 * 20), 20, 20), mean=vp.image_mean,
                       std=vp.image_std, max_tiles=vp.max_tiles, tile_size=14)
    with pytest.raises(UsageError, match=r"tiled as \[4, 3, 14, 14\], but this model takes "
                                         r"tiles \[4, 3, 28, 28\]"):
        vision.patches(small, vp)
    wrong_id = TiledImage(tiled.pixels, 1, 1, 9, tiled.tile_mask)
    with pytest.raises(UsageError, match="aspect-ratio id 9"):
        vision.vision_inputs(wrong_id, vp)


def test_tensor_shapes_are_every_vision_tensor_of_the_file(tower: Tower) -> None:
    vp = tower.file.vision
    shapes = vision.tensor_shapes(vp, TEXT_WIDTH)
    in_file = {n: e.shape for n, e in tower.file.tensors.items()
               if n.startswith(("v.", "mm."))}
    assert shapes == in_file
    # The types the converter writes are the ones expected (the fixture bound both files).
    expected = vision.expected_tensors(vp, TEXT_WIDTH)
    for file, matrix_type in ((tower.file, GgmlType.F32), (tower.f16, GgmlType.F16)):
        for name, entry in file.tensors.items():
            if name in expected:
                is_matrix = expected[name].types == {GgmlType.F32, GgmlType.F16}
                assert entry.type_id == (matrix_type if is_matrix else GgmlType.F32), name
    assert expected["v.patch_embd.weight"].types == {GgmlType.F32, GgmlType.F16}
    assert expected["v.tile_position_embd.weight"].types == {GgmlType.F32}
    # A tower of another width than the file's is refused by name, before any graph.
    with pytest.raises(InvalidModelFileError, match=r"tensor v\.patch_embd\.weight has shape"):
        Weights(tower.file.path, tower.backend,
                expected=vision.tensor_shapes(dataclasses.replace(vp, n_embd=16), TEXT_WIDTH))


# ---------------------------------------------------------------------------------------------
# The projector's output against transformers


@pytest.mark.parametrize("aspect_id", sorted(mm.ASPECT_PICTURE_SIZES))
def test_each_aspect_ratio_equals_transformers_with_meta_semantics(tower: Tower,
                                                                    aspect_id: int) -> None:
    width, height = mm.ASPECT_PICTURE_SIZES[aspect_id]
    picture = mm.random_picture(width, height, seed=aspect_id)
    tiled = _tiled(picture, tower.file)
    assert tiled.aspect_ratio_id == aspect_id
    vp = tower.file.vision
    got = vision.encode(tower.weights, vp, tiled, tower.runner)
    want = _reference(tower.model, picture)
    assert got.shape == want.shape == (4 * 5, TEXT_WIDTH)
    assert np.abs(got - want).max() < TOLERANCE_F32
    flash = vision.encode(tower.weights, vp, tiled, tower.runner, flash_attn=True)
    assert np.abs(flash - want).max() < TOLERANCE_F32
    # transformers 5.24 unpatched (intermediate states one layer late) is far from both.
    plain = _reference(tower.model, picture, meta=False)
    assert np.abs(plain - want).max() > UNPATCHED_MIN_DIFFERENCE
    assert np.abs(plain - got).max() > UNPATCHED_MIN_DIFFERENCE


def test_a_one_tile_picture_with_three_padding_tiles(tower: Tower) -> None:
    # Smaller than a tile and not square: enlarged into one tile, the rest of it padded.
    picture = mm.random_picture(19, 11, seed=7)
    tiled = _tiled(picture, tower.file)
    assert tiled.aspect_ratio_id == 1 and tiled.tile_mask == (1, 0, 0, 0)
    assert not tiled.pixels[1:].any()
    got = vision.encode(tower.weights, tower.file.vision, tiled, tower.runner)
    want = _reference(tower.model, picture)
    assert np.abs(got - want).max() < TOLERANCE_F32
    # The padding tiles' rows are computed too (their tokens attend to tile 0's real ones)
    # and differ from tile 0's: the token order is tile-major.
    rows = got.reshape(4, 5, TEXT_WIDTH)
    assert np.abs(rows[1:]).max() > 0.1
    assert np.abs(rows[1] - rows[0]).max() > 0.1


def test_an_f16_gguf_within_its_tolerance(tower: Tower) -> None:
    worst = 0.0
    for aspect_id in (1, 4, 6, 8):
        width, height = mm.ASPECT_PICTURE_SIZES[aspect_id]
        picture = mm.random_picture(width, height, seed=aspect_id)
        got = vision.encode(tower.weights16, tower.f16.vision, _tiled(picture, tower.f16),
                            tower.runner)
        worst = max(worst, float(np.abs(got - _reference(tower.model, picture)).max()))
    assert 1e-5 < worst < TOLERANCE_F16  # F16 weights: rounded, but close


def test_build_inside_a_bigger_graph_and_a_prepared_graph_takes_other_pictures(
        tower: Tower) -> None:
    vp = tower.file.vision
    first = mm.random_picture(56, 28, seed=11)  # 1 × 2 tiles, two padding tiles
    inputs = vision.vision_inputs(_tiled(first, tower.file), vp)
    extra = np.random.default_rng(0).standard_normal((TEXT_WIDTH, 8)).astype(np.float32)

    def graph(ctx: Any) -> list[Any]:
        states = vision.build(ctx, tower.weights, vp, inputs)
        # A later consumer in the same graph (as the cross-attention K/V projections are).
        return [states, ctx.mul_mat(ctx.cont(ctx.transpose(ctx.input(extra))), states)]

    with tower.runner.prepare(graph) as prepared:
        states, product = prepared.compute()
        assert np.abs(states - _reference(tower.model, first)).max() < TOLERANCE_F32
        np.testing.assert_allclose(product, states @ extra, atol=1e-4)
        # Any grid has the same shapes: the same graph takes a 3 × 1 and a 2 × 2 picture.
        for width, height, seed in ((28, 84, 12), (56, 56, 13)):
            picture = mm.random_picture(width, height, seed=seed)
            tiled = _tiled(picture, tower.file)
            assert tiled.aspect_ratio_id != inputs.aspect_ratio_id
            vision.set_inputs(prepared, vision.vision_inputs(tiled, vp))
            again, _ = prepared.compute()
            assert np.abs(again - _reference(tower.model, picture)).max() < TOLERANCE_F32
            assert np.abs(again - states).max() > 0.1


def test_encode_time_of_the_tiny_model(tower: Tower) -> None:
    tiled = _tiled(mm.random_picture(56, 56, seed=3), tower.file)
    vp = tower.file.vision
    vision.encode(tower.weights, vp, tiled, tower.runner)  # warm
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        vision.encode(tower.weights, vp, tiled, tower.runner)
        best = min(best, time.perf_counter() - start)
    # Measured 1.3-1.5 ms on a quiet 2-core machine (build, allocate, compute, read back).
    assert best < 0.5
