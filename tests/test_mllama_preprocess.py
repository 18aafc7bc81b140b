"""Llama 3.2 Vision tiles equal Hugging Face's MllamaImageProcessor's (the oracle extra)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llmkit.engines.mllama.preprocess import (
    choose_layout,
    fit_to_canvas,
    tile_image,
    tile_layouts,
)
from llmkit.images import prepare_image

# The published checkpoints' preprocessor_config.json (CLIP's statistics, not the class's 0.5).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Pixels:
    rgb: bytes
    width: int
    height: int


def _random(width: int, height: int, seed: int = 0) -> Pixels:
    data = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Pixels(data.tobytes(), width, height)


def _oracle(image: Pixels) -> dict[str, np.ndarray]:
    pil_module = pytest.importorskip("transformers.models.mllama.image_processing_pil_mllama")
    processor = pil_module.MllamaImageProcessorPil(
        size={"height": 560, "width": 560}, image_mean=list(MEAN), image_std=list(STD),
        max_image_tiles=4)
    picture = Image.frombytes("RGB", (image.width, image.height), image.rgb)
    out = processor(images=[[picture]], return_tensors="np")
    return {key: np.asarray(out[key]) for key in ("pixel_values", "aspect_ratio_ids",
                                                   "aspect_ratio_mask")} | {
        "num_tiles": np.asarray(out["num_tiles"])}


def test_the_layouts_are_the_models_aspect_ratio_ids() -> None:
    assert tile_layouts(4) == ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@pytest.mark.parametrize(("height", "width", "layout"), [
    (560, 560, (1, 1)),      # fits one tile exactly: kept, not upscaled to 2×2
    (561, 561, (2, 2)),      # just over: the smallest enlarging grid
    (560, 1120, (1, 2)), (1120, 560, (2, 1)),
    (100, 4000, (1, 4)), (4000, 100, (4, 1)),
    (4000, 6000, (2, 2)),    # shrinks: the largest scale
    (3, 2, (1, 1)),
])
def test_choose_layout(height: int, width: int, layout: tuple[int, int]) -> None:
    assert choose_layout(height, width) == layout


def test_fit_to_canvas_keeps_the_aspect_and_at_least_one_pixel() -> None:
    assert fit_to_canvas(4000, 6000, 1120, 1120) == (746, 1120)
    assert fit_to_canvas(1, 4000, 560, 2240) == (1, 2240)
    assert fit_to_canvas(3, 2, 560, 560) == (560, 373)


@pytest.mark.parametrize(("width", "height"), [
    (2, 3), (560, 560), (1120, 560), (560, 1120), (6000, 4000), (4000, 100), (100, 4000),
    (1000, 700), (300, 1700), (561, 1), (1700, 1120),
])
def test_tiles_equal_hugging_faces_processor(width: int, height: int) -> None:
    image = _random(width, height, seed=width * 7 + height)
    ours = tile_image(image, mean=MEAN, std=STD)
    theirs = _oracle(image)
    assert ours.aspect_ratio_id == int(theirs["aspect_ratio_ids"][0, 0])
    assert list(ours.tile_mask) == theirs["aspect_ratio_mask"][0, 0].tolist()
    assert ours.num_tiles == int(theirs["num_tiles"][0][0])
    expected = theirs["pixel_values"][0, 0]
    assert ours.pixels.shape == expected.shape == (4, 3, 560, 560)
    np.testing.assert_allclose(ours.pixels, expected, rtol=0, atol=2e-6)


def test_every_aspect_ratio_id_is_reached() -> None:
    seen = {tile_image(_random(w, h), mean=MEAN, std=STD).aspect_ratio_id
            for w, h in [(500, 500), (1000, 500), (1600, 500), (2200, 500), (500, 1000),
                         (1000, 1000), (500, 1600), (500, 2200)]}
    assert seen == set(range(1, 9))


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "RGB"])
def test_any_mode_goes_through_llmkits_own_preparation_first(mode: str, tmp_path: Path) -> None:
    # llmkit's Pillow step (EXIF, modes, alpha, size bounds) runs before tiling, as for every
    # vision model; the tiles of what it gives equal the processor's for the same pixels.
    path = tmp_path / "picture.png"
    Image.new("RGB", (700, 300), (200, 40, 90)).convert(mode).save(path)
    prepared = prepare_image(path)
    ours = tile_image(prepared, mean=MEAN, std=STD)
    theirs = _oracle(Pixels(prepared.rgb, prepared.width, prepared.height))
    np.testing.assert_allclose(ours.pixels, theirs["pixel_values"][0, 0], rtol=0, atol=2e-6)
    assert (ours.rows, ours.cols) == (1, 2)


def test_bytes_that_do_not_match_the_size_are_refused() -> None:
    with pytest.raises(ValueError, match="do not make"):
        tile_image(Pixels(b"\0" * 10, 2, 2), mean=MEAN, std=STD)
