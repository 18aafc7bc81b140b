"""Images cut into the tiles Llama 3.2 Vision was trained on, chosen as Meta's processor does."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from llmkit.engines.base import RGBImage

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

# The published checkpoints' preprocessor_config.json: 560-pixel tiles, at most 4 per image.
TILE_SIZE = 560
MAX_TILES = 4


@lru_cache(maxsize=16)
def tile_layouts(max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (rows, columns) grid of at most ``max_tiles`` tiles, in the order whose 1-based
    position is the model's aspect-ratio id: (1, 1), (1, 2), …, (1, n), (2, 1), …"""
    return tuple((rows, cols) for rows in range(1, max_tiles + 1)
                 for cols in range(1, max_tiles + 1) if rows * cols <= max_tiles)


def choose_layout(height: int, width: int, *, max_tiles: int = MAX_TILES,
                  tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """The grid an image of ``height`` × ``width`` pixels is fitted into.

    Each grid scales the image by the smaller of its two side ratios. The smallest scale that
    enlarges (or keeps) the image wins; when every grid would shrink it, the largest scale;
    equal scales go to the smallest canvas, then to the first grid in :func:`tile_layouts`.
    """
    if height < 1 or width < 1:
        raise ValueError(f"an image of {width}×{height} pixels has nothing to tile")
    layouts = tile_layouts(max_tiles)
    # The same divisions as the reference, so that equal scales compare equal bit for bit.
    scales = [min(rows * tile_size / height, cols * tile_size / width) for rows, cols in layouts]
    growing = [s for s in scales if s >= 1]
    chosen = min(growing) if growing else max(scales)
    candidates = [layout for layout, s in zip(layouts, scales, strict=True) if s == chosen]
    return min(candidates, key=lambda layout: layout[0] * layout[1])


def fit_to_canvas(height: int, width: int, canvas_height: int, canvas_width: int,
                  tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """The (height, width) the image is resized to inside its canvas, keeping its aspect.

    Each side's target is its own length held between one tile and the canvas; the side
    that needs the smaller scale takes its target, the other follows (at least one pixel).
    """
    target_width = min(max(width, tile_size), canvas_width)
    target_height = min(max(height, tile_size), canvas_height)
    scale_h = target_height / height
    scale_w = target_width / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_height), target_width
    return target_height, min(math.floor(width * scale_h) or 1, target_width)


@dataclass(frozen=True)
class TiledImage:
    """An image as the vision encoder takes it."""

    pixels: npt.NDArray[np.float32]
    """(max_tiles, 3, tile, tile): normalized tiles row by row, then all-zero tiles."""
    rows: int
    cols: int
    aspect_ratio_id: int
    """1-based position of (rows, cols) in :func:`tile_layouts`."""
    tile_mask: tuple[int, ...]
    """1 for each real tile (and always for the first), 0 for the padding tiles."""

    @property
    def num_tiles(self) -> int:
        """How many tiles hold the picture."""
        return self.rows * self.cols


def tile_image(image: RGBImage, *, mean: tuple[float, float, float],
               std: tuple[float, float, float], max_tiles: int = MAX_TILES,
               tile_size: int = TILE_SIZE) -> TiledImage:
    """Resize (bilinear, aspect kept), pad, normalize and cut an image into tiles.

    The steps and their order are those of Meta's and Hugging Face's Mllama processors:
    the padding is added before normalizing, so padded pixels hold ``-mean/std`` like the
    training data, while the tiles beyond the grid are zeros.

    Args:
        image: upright 8-bit RGB pixels (what :func:`llmkit.images.prepare_image` gives).
        mean: per-channel mean, from the checkpoint's preprocessor_config.json.
        std: per-channel standard deviation, from the same file.
        max_tiles: the checkpoint's ``max_image_tiles``.
        tile_size: the checkpoint's tile side in pixels.

    Returns:
        The tiles, their grid, its aspect-ratio id and the tile mask.

    Raises:
        ValueError: an empty image, or pixel bytes that do not match its size.
    """
    import numpy as np
    from PIL import Image

    if len(image.rgb) != image.width * image.height * 3:
        raise ValueError(f"{len(image.rgb)} bytes do not make a {image.width}×{image.height} "
                         "RGB image")
    rows, cols = choose_layout(image.height, image.width, max_tiles=max_tiles,
                               tile_size=tile_size)
    new_height, new_width = fit_to_canvas(image.height, image.width, rows * tile_size,
                                          cols * tile_size, tile_size)
    picture = Image.frombytes("RGB", (image.width, image.height), image.rgb)
    if (new_width, new_height) != (image.width, image.height):
        picture = picture.resize((new_width, new_height), Image.Resampling.BILINEAR)
    canvas = np.zeros((3, rows * tile_size, cols * tile_size), dtype=np.float32)
    canvas[:, :new_height, :new_width] = np.asarray(picture, dtype=np.float32).transpose(2, 0, 1)
    canvas *= np.float32(1 / 255)
    canvas -= np.asarray(mean, dtype=np.float32)[:, None, None]
    canvas /= np.asarray(std, dtype=np.float32)[:, None, None]
    tiles = canvas.reshape(3, rows, tile_size, cols, tile_size).transpose(1, 3, 0, 2, 4)
    pixels = np.zeros((max_tiles, 3, tile_size, tile_size), dtype=np.float32)
    pixels[:rows * cols] = tiles.reshape(rows * cols, 3, tile_size, tile_size)
    mask = tuple(1 if i < max(1, rows * cols) else 0 for i in range(max_tiles))
    return TiledImage(pixels=pixels, rows=rows, cols=cols,
                      aspect_ratio_id=tile_layouts(max_tiles).index((rows, cols)) + 1,
                      tile_mask=mask)
