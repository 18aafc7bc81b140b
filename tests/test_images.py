"""prepare_image: exact pixels for every mode, orientation, animation and size; every error."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import threading
import time
import types
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageFile, features

from llmkit import images as images_module
from llmkit.errors import ImageError, UsageError
from llmkit.images import DEFAULT_MAX_SIDE, PreparedImage, prepare_image
from tests import images as samples

WHITE = samples.WHITE

# --- helpers -----------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def pixels(prepared: PreparedImage) -> list[tuple[int, int, int]]:
    data = prepared.rgb
    assert len(data) == prepared.width * prepared.height * 3
    return [(data[i], data[i + 1], data[i + 2]) for i in range(0, len(data), 3)]


def pixel(prepared: PreparedImage, x: int, y: int) -> tuple[int, int, int]:
    i = (y * prepared.width + x) * 3
    return prepared.rgb[i], prepared.rgb[i + 1], prepared.rgb[i + 2]


def near(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims the given size, with a token IDAT: nothing to decode."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


def reason_of(source: Path | bytes, **kwargs: object) -> ImageError:
    with pytest.raises(ImageError) as caught:
        prepare_image(source, **kwargs)  # type: ignore[arg-type]
    return caught.value


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return samples.write_large_jpeg(tmp_path_factory.mktemp("large"))


@pytest.fixture
def fresh_heif_registration() -> Iterator[None]:
    images_module._heif_opener_registered.cache_clear()
    yield
    images_module._heif_opener_registered.cache_clear()


# --- transparency ------------------------------------------------------------------------------


def test_transparent_pixel_becomes_white_and_opaque_pixel_keeps_its_colour() -> None:
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (12, 34, 56, 255))
    image.putpixel((1, 0), (200, 10, 10, 0))
    prepared = prepare_image(encode(image))
    assert prepared.rgb == bytes([12, 34, 56, 255, 255, 255])
    assert (prepared.width, prepared.height, prepared.mode) == (2, 1, "RGBA")
    assert prepared.flattened


def test_partial_alpha_is_composited_onto_white_with_exact_rounding() -> None:
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (200, 100, 0, 51))  # 20 % over white
    image.putpixel((1, 0), (0, 0, 0, 128))
    assert pixels(prepare_image(encode(image))) == [(244, 224, 204), (127, 127, 127)]


def test_grey_with_alpha_is_composited_onto_white() -> None:
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (50, 255))
    image.putpixel((1, 0), (50, 0))
    assert pixels(prepare_image(encode(image))) == [(50, 50, 50), WHITE]


def test_alpha_png_sample_is_red_then_white_not_black(tmp_path: Path) -> None:
    prepared = prepare_image(samples.write_alpha_png(tmp_path))
    assert pixel(prepared, 0, 0) == samples.RED
    assert pixel(prepared, prepared.width - 1, prepared.height - 1) == samples.WHITE


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_index_becomes_white(fmt: str) -> None:
    image = Image.new("P", (2, 1), 0)
    image.putpalette([10, 20, 30, 200, 0, 0])
    image.putpixel((1, 0), 1)
    prepared = prepare_image(encode(image, fmt, transparency=1))
    assert pixels(prepared) == [(10, 20, 30), WHITE]
    assert prepared.mode == "P" and prepared.flattened


def test_palette_with_per_entry_alpha_is_composited() -> None:
    image = Image.new("P", (3, 1), 0)
    image.putpalette([10, 20, 30, 0, 0, 0, 200, 100, 0])
    image.putpixel((1, 0), 1)
    image.putpixel((2, 0), 2)
    # tRNS: entry 0 opaque, entry 1 transparent (black underneath), entry 2 at alpha 51.
    prepared = prepare_image(encode(image, transparency=bytes([255, 0, 51])))
    assert pixels(prepared) == [(10, 20, 30), WHITE, (244, 224, 204)]


def test_rgb_colour_key_transparency_becomes_white() -> None:
    image = Image.new("RGB", (2, 1), (1, 2, 3))
    image.putpixel((1, 0), (9, 9, 9))
    assert pixels(prepare_image(encode(image, transparency=(9, 9, 9)))) == [(1, 2, 3), WHITE]


def test_opaque_rgb_passes_through_unchanged() -> None:
    image = samples.photo((40, 30))
    prepared = prepare_image(encode(image))
    assert prepared.rgb == image.tobytes()
    assert not (prepared.flattened or prepared.transposed or prepared.downscaled)


# --- modes -------------------------------------------------------------------------------------


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    path = samples.write_gray16_png(tmp_path, values=(0, 32896, 65535, 257 * 100, 255, 128))
    prepared = prepare_image(path)
    assert prepared.mode == "I;16"
    # 255 and 128 are dark in 16 bits: Pillow's own convert("L") would make them 255 and 128.
    assert pixels(prepared) == [(0, 0, 0), (128, 128, 128), (255, 255, 255), (100, 100, 100),
                                (1, 1, 1), (0, 0, 0)]


@pytest.mark.parametrize("mode", ["I;16B", "I;16"])
def test_sixteen_bit_tiff_in_either_byte_order(mode: str) -> None:
    image = Image.new(mode, (3, 1))
    for x, value in enumerate((0, 32896, 65535)):
        image.putpixel((x, 0), value)
    prepared = prepare_image(encode(image, "TIFF"))
    assert prepared.mode == mode
    assert pixels(prepared) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_32_bit_integers_in_16_bit_range_scale_like_16_bit() -> None:
    image = Image.new("I", (3, 1))
    for x, value in enumerate((0, 32896, 65535)):
        image.putpixel((x, 0), value)
    prepared = prepare_image(encode(image, "TIFF"))
    assert prepared.mode == "I"
    assert pixels(prepared) == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_32_bit_integers_outside_16_bits_are_stretched() -> None:
    image = Image.new("I", (3, 1))
    for x, value in enumerate((-100, 0, 155)):
        image.putpixel((x, 0), value)
    assert pixels(prepare_image(encode(image, "TIFF"))) == [(0, 0, 0), (100, 100, 100),
                                                            (255, 255, 255)]


@pytest.mark.parametrize(("values", "expected"), [
    ((0.0, 0.5, 1.0), (0, 128, 255)),  # normalised floats
    ((0.0, 12.4, 254.6), (0, 12, 255)),  # already 0–255
    ((-1.0, 0.0, 3.0), (0, 64, 255)),  # anything else is stretched
])
def test_float_images_are_scaled(values: tuple[float, ...], expected: tuple[int, ...]) -> None:
    image = Image.new("F", (3, 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    prepared = prepare_image(encode(image, "TIFF"))
    assert prepared.mode == "F"
    assert pixels(prepared) == [(v, v, v) for v in expected]


def test_grey_and_bilevel_become_grey_rgb() -> None:
    grey = Image.new("L", (2, 1), 7)
    grey.putpixel((1, 0), 250)
    assert pixels(prepare_image(encode(grey))) == [(7, 7, 7), (250, 250, 250)]
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert pixels(prepare_image(encode(bilevel))) == [(0, 0, 0), WHITE]


def test_cmyk_tiff_is_converted() -> None:
    image = Image.new("CMYK", (3, 1), (255, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 255, 0))
    image.putpixel((2, 0), (0, 0, 0, 255))
    prepared = prepare_image(encode(image, "TIFF"))
    assert prepared.mode == "CMYK"
    assert pixels(prepared) == [samples.CYAN, samples.YELLOW, (0, 0, 0)]


def test_cmyk_jpeg_adobe_inverted_is_converted(tmp_path: Path) -> None:
    path = samples.write_cmyk_jpeg(tmp_path)
    assert b"Adobe" in path.read_bytes()[:200]  # libjpeg marks CMYK as Adobe-inverted
    prepared = prepare_image(path)
    assert (prepared.format, prepared.mode) == ("JPEG", "CMYK")
    assert near(pixel(prepared, 4, 4), samples.CYAN, 6)
    assert near(pixel(prepared, prepared.width - 4, 4), samples.YELLOW, 6)


def test_ycbcr_and_lab_tiffs_are_converted() -> None:
    ycbcr = prepare_image(encode(Image.new("YCbCr", (1, 1), (76, 85, 255)), "TIFF"))
    assert ycbcr.mode == "YCbCr" and near(pixel(ycbcr, 0, 0), samples.RED, 2)
    # LAB (100, 0, 0) is white and (0, 0, 0) black; Pillow stores a and b offset by 128.
    lab = Image.new("LAB", (2, 1), (255, 128, 128))
    lab.putpixel((1, 0), (0, 128, 128))
    prepared = prepare_image(encode(lab, "TIFF"))
    assert prepared.mode == "LAB"
    assert near(pixel(prepared, 0, 0), WHITE, 2) and near(pixel(prepared, 1, 0), (0, 0, 0), 2)


@pytest.mark.parametrize(("mode", "value", "expected"), [
    ("HSV", (0, 255, 255), (255, 0, 0)),
    ("HSV", (85, 255, 255), (0, 255, 0)),
    ("RGBX", (1, 2, 3, 0), (1, 2, 3)),
    ("RGBa", (100, 50, 0, 255), (100, 50, 0)),
    ("RGBa", (0, 0, 0, 0), (255, 255, 255)),
    ("La", (40, 255), (40, 40, 40)),
    ("La", (0, 0), (255, 255, 255)),
    ("PA", (0, 0), (255, 255, 255)),
])
def test_in_memory_modes_become_rgb(mode: str, value: tuple[int, ...],
                                    expected: tuple[int, int, int]) -> None:
    # Modes no file format stores: the conversion step on its own.
    image = Image.new(mode, (1, 1), value)
    if mode == "PA":
        image.putpalette([9, 9, 9])
    rgb, _, _ = images_module._to_rgb(image)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == expected


# --- colour management -------------------------------------------------------------------------


def grey_ramp() -> Image.Image:
    image = Image.new("RGB", (3, 1), (128, 128, 128))
    image.putpixel((0, 0), (0, 0, 0))
    image.putpixel((2, 0), WHITE)
    return image


def test_embedded_profile_is_converted_to_srgb() -> None:
    data = encode(grey_ramp(), icc_profile=samples.linear_rgb_icc_profile())
    prepared = prepare_image(data)
    assert prepared.color_managed
    # Linear 50 % light is sRGB 188; black and white stay put.
    black, mid, white = pixels(prepared)
    assert black == (0, 0, 0) and white == WHITE
    assert near(mid, (188, 188, 188), 1)


def test_srgb_and_broken_profiles_leave_pixels_alone() -> None:
    from PIL import ImageCms

    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    for profile in (srgb, b"not an ICC profile at all"):
        prepared = prepare_image(encode(grey_ramp(), icc_profile=profile))
        assert not prepared.color_managed
        assert prepared.rgb == grey_ramp().tobytes()


# --- orientation -------------------------------------------------------------------------------


# Where the stored pixel (x, y) of a W×H image is shown, straight from the EXIF 2.32 meaning of
# each orientation (which stored row and column are the visual top and left).
def shown_at(orientation: int, x: int, y: int, w: int, h: int) -> tuple[int, int]:
    return {
        1: (x, y),
        2: (w - 1 - x, y),
        3: (w - 1 - x, h - 1 - y),
        4: (x, h - 1 - y),
        5: (y, x),
        6: (h - 1 - y, x),
        7: (h - 1 - y, w - 1 - x),
        8: (y, w - 1 - x),
    }[orientation]


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_every_exif_orientation_puts_every_pixel_in_place(orientation: int, fmt: str) -> None:
    w, h = 3, 2
    stored = Image.new("RGB", (w, h))
    colours = {(x, y): (40 * x + 10, 100 * y + 20, 7 * (x + y)) for x in range(w)
               for y in range(h)}
    for xy, colour in colours.items():
        stored.putpixel(xy, colour)
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"lossless": True} if fmt == "WEBP" else {}
    prepared = prepare_image(encode(stored, fmt, exif=exif, **extra))
    swapped = orientation >= 5
    assert (prepared.width, prepared.height) == ((h, w) if swapped else (w, h))
    assert (prepared.original_width, prepared.original_height) == (w, h)
    assert prepared.transposed == (orientation != 1)
    for (x, y), colour in colours.items():
        assert pixel(prepared, *shown_at(orientation, x, y, w, h)) == colour


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_sample_is_upright(tmp_path: Path, orientation: int) -> None:
    prepared = prepare_image(samples.write_exif_rotated_jpeg(tmp_path, orientation))
    assert (prepared.width, prepared.height) == (64, 32)
    assert prepared.transposed
    assert near(pixel(prepared, 4, 4), samples.RED, 12)
    assert near(pixel(prepared, 60, 28), samples.BLUE, 12)
    assert near(pixel(prepared, 60, 4), samples.BLUE, 12)


def test_orientation_and_draft_downscale_together(tmp_path: Path) -> None:
    upright = Image.new("RGB", (800, 1200), samples.BLUE)
    upright.paste(samples.RED, (0, 0, 400, 600))
    path = tmp_path / "tall.jpg"
    samples.save_with_orientation(upright, path, 6, quality=92)
    prepared = prepare_image(path, max_side=256)
    assert (prepared.original_width, prepared.original_height) == (1200, 800)  # as stored
    assert (prepared.width, prepared.height) == (171, 256)
    assert prepared.decode_scale == 4 and prepared.downscaled and prepared.transposed
    assert near(pixel(prepared, 20, 20), samples.RED, 12)
    assert near(pixel(prepared, 150, 240), samples.BLUE, 12)


def test_broken_orientation_values_are_ignored() -> None:
    for value in (0, 9, 65535):
        exif = Image.Exif()
        exif[0x0112] = value
        prepared = prepare_image(encode(grey_ramp(), exif=exif))
        assert not prepared.transposed and prepared.rgb == grey_ramp().tobytes()


# --- animation ---------------------------------------------------------------------------------


def test_first_gif_frame_is_used_with_its_transparency(tmp_path: Path) -> None:
    prepared = prepare_image(samples.write_animated_gif(tmp_path))
    assert (prepared.format, prepared.frames) == ("GIF", 3)
    assert pixel(prepared, 0, 0) == WHITE  # the transparent block
    assert pixel(prepared, 7, 7) == WHITE
    assert pixel(prepared, 8, 8) == samples.RED
    assert pixel(prepared, 31, 23) == samples.RED


@pytest.mark.parametrize(("fmt", "params"), [
    ("PNG", {}),
    ("WEBP", {"lossless": True}),
    ("GIF", {}),
])
def test_first_frame_of_an_animation_is_used(fmt: str, params: dict[str, object]) -> None:
    frames = [Image.new("RGB", (8, 6), colour) for colour in (samples.RED, samples.GREEN,
                                                                 samples.BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100,
                  **params)
    prepared = prepare_image(data)
    assert prepared.frames == 3
    assert set(pixels(prepared)) == {samples.RED}


@pytest.mark.skipif(not features.check_module("avif"), reason="this Pillow has no AVIF")
def test_avif_is_read_natively_with_orientation() -> None:
    upright = Image.new("RGB", (32, 16), samples.BLUE)
    upright.paste(samples.RED, (0, 0, 16, 8))
    out = io.BytesIO()
    samples.save_with_orientation(upright, out, 6, format="AVIF", quality=95)
    prepared = prepare_image(out.getvalue())
    assert (prepared.format, prepared.width, prepared.height) == ("AVIF", 32, 16)
    assert near(pixel(prepared, 3, 3), samples.RED, 16)
    assert near(pixel(prepared, 28, 12), samples.BLUE, 16)


# --- size --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "max_side", "expected"), [
    ((1000, 500), 300, (300, 150)),
    ((500, 1000), 300, (150, 300)),
    ((1001, 333), 500, (500, 166)),  # 333 × 500 / 1001 = 166.3
    ((999, 1000), 10, (10, 10)),  # 9.99 rounds to 10
    ((5000, 3), 100, (100, 1)),  # never below one pixel
    ((640, 480), 640, (640, 480)),  # already small enough: untouched
])
def test_downscale_keeps_aspect_and_lands_on_max_side(
        size: tuple[int, int], max_side: int, expected: tuple[int, int]) -> None:
    image = samples.photo(size, noise=False)
    prepared = prepare_image(encode(image, "PNG", compress_level=1), max_side=max_side)
    assert (prepared.width, prepared.height) == expected
    assert prepared.downscaled == (expected != size)
    assert prepared.decode_scale == 1  # PNG has no draft mode


def test_downscale_filters_rather_than_skipping_pixels() -> None:
    # One-pixel stripes of black and white: nearest-neighbour would keep pure stripes,
    # a proper filter averages them to grey.
    stripes = Image.new("L", (400, 100), 0)
    for x in range(0, 400, 2):
        stripes.paste(255, (x, 0, x + 1, 100))
    prepared = prepare_image(encode(stripes), max_side=100)
    assert all(110 <= r <= 145 and r == g == b for r, g, b in pixels(prepared))


def test_default_max_side() -> None:
    assert DEFAULT_MAX_SIDE == 2048


def test_camera_sized_jpeg_is_decoded_in_draft_mode(large_jpeg: Path) -> None:
    started = time.perf_counter()
    prepared = prepare_image(large_jpeg)
    elapsed = time.perf_counter() - started
    assert (prepared.original_width, prepared.original_height) == (6000, 4000)
    assert (prepared.width, prepared.height) == (2048, 1365)
    assert prepared.decode_scale == 2  # decoded as 3000×2000, then resized
    assert len(prepared.rgb) == 2048 * 1365 * 3
    # About 0.2 s on a busy two-core machine; this only catches a lost draft or a slow filter.
    assert elapsed < 3.0, elapsed
    small = prepare_image(large_jpeg, max_side=512)
    assert (small.width, small.height, small.decode_scale) == (512, 341, 8)


# --- errors ------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    error = reason_of(tmp_path / "nope.jpg")
    assert error.reason == "does not exist"
    assert error.path == str(tmp_path / "nope.jpg")
    assert error.message == f"{tmp_path / 'nope.jpg'} does not exist"


def test_directory(tmp_path: Path) -> None:
    assert reason_of(tmp_path).reason == "is a directory"


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = samples.write_photo_jpeg(tmp_path)
    if os.geteuid() == 0:
        # root reads through chmod 000, so stand in for the kernel's refusal.
        def refuse(target: object, *args: object, **kwargs: object) -> object:
            raise PermissionError(13, "Permission denied", str(target))

        monkeypatch.setattr(os, "open", refuse)
    else:
        path.chmod(0)
    assert reason_of(path).reason == "cannot be read (permission denied)"


def test_empty_file_and_empty_bytes(tmp_path: Path) -> None:
    assert reason_of(samples.write_empty_file(tmp_path)).reason == "is empty"
    error = reason_of(b"")
    assert (error.path, error.reason, error.message) == ("image data", "is empty",
                                                         "image data is empty")


def test_text_named_jpg(tmp_path: Path) -> None:
    error = reason_of(samples.write_text_as_jpg(tmp_path))
    assert error.reason == "is not an image Pillow can read (looks like text)"
    assert str(error) == f"{tmp_path / 'notes.jpg'} {error.reason}"


@pytest.mark.parametrize(("data", "looks_like"), [
    (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "a PDF document"),
    (b"GGUF\x03\x00\x00\x00" + bytes(40), "a GGUF model file"),
    (b"PK\x03\x04\x14\x00" + bytes(40), "a ZIP archive"),
    (b"<!DOCTYPE html>\n<html><body>Not found</body></html>", "an HTML page"),
    (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "an SVG drawing"),
    (b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + bytes(64), "a video"),
    (struct.pack("<Q", 30) + b'{"w":{"dtype":"F32","shape":[1]}}', "a safetensors file"),
    ("Grüße, naïve café — ünïcode text\n".encode(), "text"),
])
def test_not_an_image_says_what_it_looks_like(data: bytes, looks_like: str) -> None:
    error = reason_of(data, name="upload.png")
    assert error.reason == f"is not an image Pillow can read (looks like {looks_like})"
    assert error.path == "upload.png"


def test_random_binary_is_not_an_image() -> None:
    data = bytes((i * 97 + 13) % 256 for i in range(300))
    assert reason_of(data).reason == "is not an image Pillow can read"


def test_truncated_jpeg(tmp_path: Path) -> None:
    path = samples.write_truncated_jpeg(tmp_path)
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    assert reason_of(path).reason == "is truncated or corrupt"
    assert reason_of(path.read_bytes()).reason == "is truncated or corrupt"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is before


@pytest.mark.parametrize("keep", [3, 20, 200])
def test_image_cut_short_anywhere_is_truncated(tmp_path: Path, keep: int) -> None:
    jpeg = samples.write_photo_jpeg(tmp_path).read_bytes()
    png = encode(samples.photo((64, 64)))
    assert reason_of(jpeg[:keep]).reason == "is truncated or corrupt"
    assert reason_of(png[:keep]).reason == "is truncated or corrupt"


def test_format_pillow_recognises_but_cannot_decode() -> None:
    # A placeable Windows Metafile: Pillow reads the header but has no renderer off Windows.
    wmf = (b"\xd7\xcd\xc6\x9a\x00\x00" + struct.pack("<4hH", 0, 0, 72, 72, 72) + bytes(6)
           + b"\x01\x00\t\x00" + bytes(40))
    error = reason_of(wmf, name="drawing.wmf")
    assert error.reason == "is a kind of WMF file Pillow cannot decode"
    assert error.hint == "convert it to PNG or JPEG first"


def test_postscript_is_refused_without_running_ghostscript() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n"
    assert reason_of(eps).reason == "is a PostScript file, which llmkit does not render"


def test_decompression_bomb_is_a_clear_error() -> None:
    error = reason_of(png_header_only(30000, 30000))
    assert error.reason.startswith("is too large (over ")


def test_pixel_limit_is_ours_and_pillow_warnings_stay_quiet() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Over Pillow's warning threshold (89 M pixels), under its hard limit.
        error = reason_of(png_header_only(9500, 9500), max_pixels=50_000_000)
        small = reason_of(encode(grey_ramp()), max_pixels=2)
    assert error.reason == "is too large (9500×9500 pixels, over the limit of 50,000,000)"
    assert small.reason == "is too large (3×1 pixels, over the limit of 2)"
    assert caught == []


def test_heic_without_pillow_heif_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                  fresh_heif_registration: None) -> None:
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails, installed or not
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100)
    error = reason_of(heic, name="IMG_0001.HEIC")
    assert error.reason == "is a HEIC image, which needs the optional pillow-heif package"
    assert error.hint == "pip install 'llmkit[heif]'"
    assert "pip install 'llmkit[heif]'" in str(error)


def test_avif_without_any_decoder_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                  fresh_heif_registration: None) -> None:
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    monkeypatch.setattr(images_module, "_pillow_reads_avif", lambda: False)
    avif = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(100)
    error = reason_of(avif)
    assert error.reason == "is an AVIF image, which needs the optional pillow-heif package"
    assert error.hint == "pip install 'llmkit[heif]'"


def test_pillow_heif_is_registered_once_and_only_for_heif(monkeypatch: pytest.MonkeyPatch,
                                                         fresh_heif_registration: None) -> None:
    calls: list[str] = []
    fake = types.ModuleType("pillow_heif")
    fake.register_heif_opener = lambda: calls.append("heif")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pillow_heif", fake)
    prepare_image(encode(grey_ramp()))
    assert calls == []  # a PNG never touches pillow-heif
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100)
    # The fake registers no decoder, so the file stays unreadable: as a damaged HEIC.
    assert reason_of(heic).reason == "is truncated or corrupt"
    assert reason_of(heic).reason == "is truncated or corrupt"
    assert calls == ["heif"]


def test_bad_limits_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        prepare_image(encode(grey_ramp()), max_side=0)
    with pytest.raises(UsageError):
        prepare_image(encode(grey_ramp()), max_pixels=0)


# --- inputs and outputs ------------------------------------------------------------------------


def test_bytes_and_path_give_the_same_pixels(tmp_path: Path) -> None:
    path = samples.write_photo_jpeg(tmp_path)
    from_path = prepare_image(path)
    from_bytes = prepare_image(path.read_bytes())
    assert from_path == from_bytes
    assert (from_path.width, from_path.height, from_path.format) == (640, 480, "JPEG")


def test_a_pipe_is_read_whole(tmp_path: Path) -> None:
    # Pillow must seek, and a pipe (/dev/stdin, <(…)) cannot.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    data = encode(grey_ramp())

    def feed() -> None:
        with open(fifo, "wb") as writer:
            writer.write(data)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        assert prepare_image(fifo).rgb == grey_ramp().tobytes()
    finally:
        feeder.join(timeout=10)


def test_repr_leaves_out_the_pixels() -> None:
    prepared = prepare_image(encode(samples.photo((64, 64))))
    assert "rgb" not in repr(prepared) and len(repr(prepared)) < 400


def test_every_sample_prepares_or_fails_clearly(tmp_path: Path) -> None:
    paths = samples.write_all(tmp_path)
    for key in ("photo", "alpha", "animated", "gray16", "exif_rotated", "cmyk"):
        prepared = prepare_image(paths[key])
        assert len(prepared.rgb) == prepared.width * prepared.height * 3 > 0
    assert reason_of(paths["text"]).reason.endswith("(looks like text)")
    assert reason_of(paths["truncated"]).reason == "is truncated or corrupt"
    assert reason_of(paths["empty"]).reason == "is empty"


def test_importing_the_module_does_not_import_pillow() -> None:
    code = "import sys, llmkit.images; print(sorted(m for m in sys.modules if m == 'PIL'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("read_size", [2, 3, 7, 1 << 20])  # two: a marker is two bytes
def test_jpeg_scans_are_counted_across_reads_and_past_segments(
        read_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(images_module, "_SCAN_READ", read_size)
    count = images_module._count_jpeg_scans
    for mode, progressive, expected in (("RGB", False, (1, 3)), ("RGB", True, (10, 3)),
                                        ("L", True, (6, 1)), ("CMYK", True, (18, 4))):
        buffer = io.BytesIO()
        # Scan markers inside an EXIF segment are payload, skipped by its length.
        samples.photo((40, 24)).convert(mode).save(
            buffer, "JPEG", progressive=progressive, exif=b"Exif\x00\x00" + b"\xff\xda" * 9)
        buffer.seek(7)
        assert count(buffer, 101) == expected
        assert buffer.tell() == 7  # left where it was, for Pillow
    # Counting stops at the limit it is given, and at the end of a file that never ends its
    # image: a trailing run of 0xFF once kept the reader at the last byte forever (fuzzing).
    buffer = io.BytesIO()
    samples.photo((40, 24)).save(buffer, "JPEG", progressive=True)
    assert count(buffer, 4)[0] == 4
    unended = buffer.getvalue()[:-2] + b"\xff" * 40
    assert count(io.BytesIO(unended), 101) == (10, 3)
    assert count(io.BytesIO(b"\xff\xd8" + b"\xff" * 40), 101) == (0, 0)
