"""Image files or bytes turned into the raw RGB pixels a vision model's encoder takes."""

from __future__ import annotations

import functools
import importlib
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from llmkit.errors import ImageError, UsageError

if TYPE_CHECKING:
    from PIL import Image, ImageCms

    from llmkit.io import ReadLimit

# Vision encoders work at no more than about 1–2k pixels a side: CLIP/SigLIP towers at 224–896
# px, tiling and dynamic-resolution ones (LLaVA-NeXT, MiniCPM-V, Qwen2-VL) up to roughly 1–2k.
# llama.cpp's mtmd resizes whatever it is given to that, so pixels past 2048 only cost decode
# time and memory (2048² RGB is 12 MiB) without ever reaching the model.
DEFAULT_MAX_SIDE = 2048

# Pillow's own hard limit (2 × Image.MAX_IMAGE_PIXELS, about 13,400 px square): past it Pillow
# refuses to open the file anyway, calling it a possible decompression bomb.
DEFAULT_MAX_PIXELS = 178_956_970

# Pixels count less than the memory they take: a 13000×13000 16-bit PNG passes the pixel limit
# and is a few hundred kilobytes of zlib, and a 200-byte GIF can declare a 164-megapixel canvas
# that its decoder fills with background. Every image becomes 8-bit RGB, which Pillow keeps in
# four bytes a pixel, so the decoded image is bounded at four bytes a pixel whatever its mode
# (a palette or grey pixel costs its RGB, not its one byte), at the size the decoder will
# really produce (JPEG draws big photos at 1/2–1/8), before anything is decoded. 256 MiB holds
# 64 megapixels; converting them to RGB peaks at about four times that.
DEFAULT_MAX_DECODED_BYTES = 256 * 1024 * 1024
_RGB_BYTES = 4

# The encoded file: read whole only from a pipe; from a file Pillow reads what it needs.
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

# A JPEG sent in several scans (progressive, or one component at a time) is decoded into a
# buffer of every 8×8 block's 64 two-byte coefficients at full size, whatever scale it is then
# drawn at, and each scan passes over that whole buffer. Encoders write at most a few dozen
# scans (libjpeg's progressive script 10, mozjpeg's searched ones up to about 20); a few bytes
# each, a hostile file can hold hundreds, each a full pass: 13000×13000 pixels take 33 ms a
# scan on these cores, so a 1 KiB file would cost seconds.
_MAX_JPEG_SCANS = 100
_COEFFICIENT_BYTES = 128
# A marker after entropy-coded data: 0xFF followed by anything but a stuffed zero, a restart
# marker (which stays inside the scan) or a fill byte.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SCAN_READ = 1 << 20

# Enough of the file to recognise what it is when Pillow cannot.
_SNIFF_BYTES = 512

_ORIENTATION_TAG = 0x0112

_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs",
                          b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_VIDEO_BRANDS = frozenset({b"isom", b"iso2", b"mp41", b"mp42", b"qt  ", b"M4V ", b"3gp4",
                           b"3gp5", b"avc1", b"dash"})

# Files that start like this (and are not text) are images; when Pillow cannot identify one,
# it is damaged.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00",
                b"MM\x00*", b"BM", b"\x00\x00\x00\x0cjP  \r\n", b"\xff\x4f\xff\x51", b"8BPS",
                b"qoif")

# What some common non-images start with, for the error message and its hint.
_NON_IMAGE_MAGIC: tuple[tuple[bytes, str, str | None], ...] = (
    (b"%PDF-", "a PDF document",
     "render a page to an image first, e.g. `pdftoppm -png -r 150 in.pdf page`"),
    (b"GGUF", "a GGUF model file", None),
    (b"PK\x03\x04", "a ZIP archive", None),
    (b"\x1f\x8b", "a gzip archive", None),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", None),
    (b"\x7fELF", "a program", None),
    (b"ID3", "an MP3 audio file", None),
    (b"OggS", "an Ogg media file", None),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM video", "extract a frame first, e.g. with ffmpeg"),
)

# Pillow's wording when it recognised the format but lacks a decoder for this variant of it.
_UNSUPPORTED_WORDS = ("not available", "not supported", "unsupported", "cannot find loader",
                      "cannot handle", "unknown raw mode")

_CONVERT_HINT = "convert it to PNG or JPEG first"


@dataclass(frozen=True)
class PreparedImage:
    """An image as a vision encoder takes it: 8-bit RGB, row-major, upright, bounded in size.

    ``original_width``/``original_height`` are the size stored in the file, before the EXIF
    orientation (``transposed``) and any downscaling; ``width``/``height`` describe ``rgb``.
    """

    rgb: bytes = field(repr=False)  # width × height × 3 bytes; megabytes, so kept out of repr
    width: int
    height: int
    original_width: int
    original_height: int
    format: str  # Pillow's name for the file format: "JPEG", "PNG", "GIF", "WEBP", …
    mode: str  # the file's own pixel mode: "RGB", "RGBA", "P", "I;16", "CMYK", …
    frames: int = 1  # frames in an animation (or pages in a TIFF); only the first is used
    transposed: bool = False  # an EXIF orientation other than 1 was applied
    downscaled: bool = False  # the longest side was brought down to max_side
    decode_scale: int = 1  # the JPEG decoder's own reduction (1, 2, 4 or 8) before resizing
    flattened: bool = False  # transparency was composited onto white
    color_managed: bool = False  # an embedded ICC profile was converted to sRGB


def prepare_image(
    source: Path | bytes,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    name: str | None = None,
) -> PreparedImage:
    """Decode an image into upright 8-bit RGB no larger than ``max_side`` on its longest side.

    EXIF orientation is applied first; transparency is composited onto white; greyscale,
    palette, CMYK, 16-bit, float, YCbCr, LAB and HSV pixels become RGB; an embedded ICC profile
    is converted to sRGB when Pillow has LittleCMS; animations give their first frame.

    Args:
        source: the image file, or its bytes.
        max_side: the longest side of the result; larger images are scaled down to it.
        max_pixels: refuse images with more pixels than this (decompression bombs).
        max_bytes: refuse files (or bytes) larger than this; a pipe is read no further.
        max_decoded_bytes: refuse images whose decoded pixels, as the RGB they become (four
            bytes each), would take more memory than this, counted from the header at the size
            the decoder draws them; and JPEGs sent in several scans whose full-size
            coefficients would.
        name: what to call the image in error messages; defaults to the path, or
            "image data" for bytes.

    Returns:
        The pixels and what was done to them.

    Raises:
        ImageError: the file is missing, unreadable, not a file or a pipe (a device, a socket,
            a directory), empty, not an image, truncated or corrupt, in a format Pillow cannot
            decode, or too large.
        UsageError: a limit is below 1.
    """
    for value, what in ((max_side, "the longest image side"), (max_pixels, "the image pixel "
                        "limit"), (max_bytes, "the image file limit"),
                        (max_decoded_bytes, "the decoded image limit")):
        if value < 1:
            raise UsageError(f"{what} must be at least 1, not {value}")
    limits = _Limits(max_side, max_pixels, max_decoded_bytes)
    if isinstance(source, bytes):
        label = name or "image data"
        if len(source) > max_bytes:
            too_large = _file_limit(max_bytes).exceeded(label)
            raise ImageError(label, too_large.reason, hint=too_large.hint)
        return _prepare(io.BytesIO(source), label, limits)
    path = Path(source)
    label = name or str(path)
    with _open_file(path, label, max_bytes) as stream:
        return _prepare(stream, label, limits)


@dataclass(frozen=True)
class _Limits:
    max_side: int
    max_pixels: int
    max_decoded_bytes: int


def _file_limit(size: int) -> ReadLimit:
    from llmkit.io import ReadLimit

    return ReadLimit(size, "the most llmkit reads of one image", "downscale or recompress it first")


def _open_file(path: Path, label: str, max_bytes: int) -> IO[bytes]:
    """The file, or a pipe's bytes in memory (Pillow seeks); devices and sockets refused."""
    from llmkit.errors import InputFileError
    from llmkit.io import seekable_input

    try:
        return seekable_input(path, _file_limit(max_bytes), name=label)
    except InputFileError as exc:
        raise ImageError(label, exc.reason, hint=exc.hint) from None
    except OSError as exc:
        raise ImageError(label, f"cannot be read ({exc.strerror or exc})") from None


def _prepare(stream: IO[bytes], label: str, limits: _Limits) -> PreparedImage:
    try:
        head = stream.read(_SNIFF_BYTES)
        stream.seek(0)
    except OSError as exc:
        raise ImageError(label, f"cannot be read ({exc.strerror or exc})") from None
    if not head:
        raise ImageError(label, "is empty")
    container = _heif_container(head)
    if container is not None:
        _require_heif_support(label, container)

    from PIL import Image, UnidentifiedImageError

    # Pillow warns (rather than raises) between MAX_IMAGE_PIXELS and twice that, where our own
    # limit decides instead, and about damage it reads past (corrupt EXIF, a TIFF tag larger
    # than the file): a library prints nothing, and Python would show each as a source line of
    # Pillow's on stderr. catch_warnings swaps process-wide filters, which is fine for a CLI
    # but would race with another thread doing the same.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = Image.open(stream)
        except Image.DecompressionBombError:
            limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
            raise ImageError(label, f"is too large (over {limit:,} pixels)",
                             hint="downscale it first") from None
        except UnidentifiedImageError:
            raise _unidentified(label, head, container) from None
        except MemoryError:
            raise ImageError(label, "is too large to decode in memory") from None
        except Exception as exc:
            # Plugins raise OSError, ValueError, EOFError, struct.error… on broken headers.
            raise _decode_error(label, None, exc) from exc
        with image:
            return _decode(image, label, limits)


def _decode(image: Image.Image, label: str, limits: _Limits) -> PreparedImage:
    from PIL import Image

    fmt = image.format or "unknown"
    if fmt == "EPS":
        # Pillow renders PostScript by running Ghostscript on it: a full interpreter that we
        # do not start on whatever file a glob happens to match.
        raise ImageError(label, "is a PostScript file, which llmkit does not render",
                         hint=_CONVERT_HINT)
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(label, "is truncated or corrupt (it has no pixels)")
    if width * height > limits.max_pixels:
        raise ImageError(label, f"is too large ({width}×{height} pixels, over the limit of "
                                f"{limits.max_pixels:,})", hint="downscale it first")
    target = _fit(width, height, limits.max_side)
    mode = image.mode
    try:
        # Counting frames walks a GIF's blocks and seeks back to frame 0, before any decoding.
        frames = int(getattr(image, "n_frames", 1))
        decode_scale = 1
        if target != (width, height) and image.draft(None, target) is not None:
            # The JPEG decoder scales by 1/2, 1/4 or 1/8 in the DCT domain while decoding,
            # never below the size asked for, so the resize below only finishes the job: a
            # 6000×4000 photo is decoded as 3000×2000, a quarter of the pixels.
            decode_scale = _draft_scale(width, height, image.size)
        _check_decoded_size(image, label, limits.max_decoded_bytes)
        if fmt in ("JPEG", "MPO"):
            _check_jpeg_scans(image, (width, height), label, limits.max_decoded_bytes)
        image.load()
        transpose = _orientation_transpose(image)
        upright = image if transpose is None else image.transpose(transpose)
        rgb, flattened, color_managed = _to_rgb(upright)
        swapped = transpose is not None and _swaps_axes(transpose)
        final = (target[1], target[0]) if swapped else target
        if rgb.size != final:
            # reducing_gap=3 box-reduces by whole factors first and resamples the rest with
            # Lanczos; Pillow documents it as indistinguishable from plain Lanczos.
            rgb = rgb.resize(final, Image.Resampling.LANCZOS, reducing_gap=3.0)
        data = rgb.tobytes()
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(label, "is too large to decode in memory") from None
    except Exception as exc:
        raise _decode_error(label, fmt, exc) from exc
    return PreparedImage(
        rgb=data, width=rgb.width, height=rgb.height,
        original_width=width, original_height=height,
        format=fmt, mode=mode, frames=frames,
        transposed=transpose is not None,
        downscaled=target != (width, height),
        decode_scale=decode_scale,
        flattened=flattened, color_managed=color_managed,
    )


def _check_decoded_size(image: Image.Image, label: str, limit: int) -> None:
    """Refuse an image whose pixels, as the decoder is about to draw them, exceed ``limit``."""
    from llmkit.io import format_size

    width, height = image.size  # after draft(): the size the decoder will really produce
    needed = width * height * _RGB_BYTES
    if needed > limit:
        raise ImageError(label, f"is too large to decode ({width}×{height} pixels take "
                                f"{format_size(needed)} as RGB, over the limit of "
                                f"{format_size(limit)})", hint="downscale it first")


def _check_jpeg_scans(image: Image.Image, size: tuple[int, int], label: str, limit: int) -> None:
    """Refuse a JPEG of full ``size`` whose scans would buffer more than ``limit`` of
    coefficients, or pass over them too often."""
    from PIL import ImageFile

    from llmkit.io import format_size

    if not isinstance(image, ImageFile.ImageFile) or image.fp is None:
        return
    scans, first_bands = _count_jpeg_scans(image.fp, _MAX_JPEG_SCANS + 1)
    if scans > _MAX_JPEG_SCANS:
        raise ImageError(label, f"is a JPEG of more than {_MAX_JPEG_SCANS} scans, which no "
                                "encoder writes", hint="re-save it as a baseline JPEG or PNG")
    layers = getattr(image, "layer", [])
    if scans <= 1 and not image.info.get("progressive") and first_bands >= len(layers):
        return  # one scan of every band: decoded a row of blocks at a time
    width, height = size
    needed = _jpeg_blocks(layers, width, height) * _COEFFICIENT_BYTES
    if needed > limit:
        raise ImageError(label, f"is too large to decode ({width}×{height} pixels sent in "
                                f"{scans} scans buffer {format_size(needed)} of coefficients, "
                                f"over the limit of {format_size(limit)})",
                         hint="downscale it first, or re-save it as a baseline JPEG")


def _jpeg_blocks(layers: list[tuple[Any, ...]], width: int, height: int) -> int:
    """8×8 blocks of coefficients in all components of a ``width``×``height`` JPEG."""
    factors = [(int(layer[1]), int(layer[2])) for layer in layers if len(layer) >= 3]
    if not factors or any(not (1 <= h <= 4 and 1 <= v <= 4) for h, v in factors):
        # libjpeg refuses such sampling factors itself; count one full-size block per band.
        return max(1, len(factors)) * -(-width // 8) * -(-height // 8)
    most_h, most_v = max(h for h, _ in factors), max(v for _, v in factors)
    return sum(-(-width * h // (8 * most_h)) * -(-height * v // (8 * most_v))
               for h, v in factors)


def _count_jpeg_scans(stream: IO[bytes], stop: int) -> tuple[int, int]:
    """Start-of-scan markers in the JPEG from ``stream``'s start to its first end of image,
    and how many bands the first scan holds.

    Segments (an EXIF thumbnail's own scan included) are skipped by their lengths; counting
    stops at ``stop``. The stream is left where it was.
    """
    was = stream.tell()
    try:
        scans, first_bands, position = 0, 0, 2  # past the start-of-image marker
        while scans < stop:
            position = _next_jpeg_marker(stream, position)
            if position < 0:
                break
            stream.seek(position + 1)
            head = stream.read(4)
            if len(head) < 3 or head[0] == 0xD9:  # the end, or end of image
                break
            if head[0] == 0xDA:
                scans += 1
                if scans == 1 and len(head) == 4:
                    first_bands = head[3]
            # Every marker that reaches here has a length: standalone ones are 0x01 and
            # restarts, which the marker pattern skips.
            position += 2 + int.from_bytes(head[1:3], "big")
        return scans, first_bands
    finally:
        stream.seek(was)


def _next_jpeg_marker(stream: IO[bytes], position: int) -> int:
    """Where the next marker's 0xFF is, from ``position`` on; -1 at the end of the stream."""
    stream.seek(position)
    while True:
        chunk = stream.read(_SCAN_READ)
        found = _JPEG_MARKER.search(chunk)
        if found is not None:
            return position + found.start()
        if len(chunk) < _SCAN_READ:
            return -1  # the end of the stream (a last 0xFF there has no code after it)
        # A 0xFF at the end of the chunk may be a marker whose code comes next.
        keep = 1 if chunk.endswith(b"\xff") else 0
        position += len(chunk) - keep
        stream.seek(position)


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size that brings the longest side down to max_side, keeping the aspect ratio."""
    if max(width, height) <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, (height * max_side + width // 2) // width)
    return max(1, (width * max_side + height // 2) // height), max_side


def _draft_scale(width: int, height: int, drafted: tuple[int, int]) -> int:
    # Pillow's JPEG draft rounds up: each side becomes ceil(side / scale).
    for scale in (8, 4, 2):
        if (-(-width // scale), -(-height // scale)) == drafted:
            return scale
    return 1


def _orientation_transpose(image: Image.Image) -> Image.Transpose | None:
    """The transpose that makes the image upright, as ImageOps.exif_transpose would apply."""
    from PIL import Image

    try:
        # getexif also reads tiff:Orientation from XMP when the EXIF block has none.
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:
        # A camera's mangled EXIF block must not stop the pixels being used; they are fine.
        return None
    # EXIF 2.32, tag 0x0112: 2 mirrored, 3 rotated 180°, 4 mirrored vertically, 5 transposed,
    # 6 needs 90° clockwise, 7 transversed, 8 needs 90° counter-clockwise. Anything else is 1.
    return {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_270,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_90,
    }.get(orientation) if isinstance(orientation, int) else None


def _swaps_axes(transpose: Image.Transpose) -> bool:
    from PIL import Image

    return transpose in (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270,
                         Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90)


def _to_rgb(image: Image.Image) -> tuple[Image.Image, bool, bool]:
    """8-bit RGB pixels, and whether transparency was flattened and colours converted to sRGB."""
    icc = image.info.get("icc_profile")
    flattened = False
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # A transparency key in 16-bit units is rare enough (PNG tRNS on 16-bit grey) to drop.
        image = _to_8bit(image)
    elif _has_transparency(image):
        image = _flatten_on_white(image)
        flattened = True
    elif image.mode in ("P", "RGBX", "YCbCr", "HSV"):
        image = image.convert("RGB")
    elif image.mode == "1":
        image = image.convert("L")
    color_managed = False
    if isinstance(icc, bytes) and icc and image.mode in ("RGB", "CMYK", "L"):
        converted = _to_srgb(image, icc)
        if converted is not None:
            image, color_managed = converted, True
    if image.mode == "LAB":
        image = _lab_to_rgb(image)
    if image.mode != "RGB":
        # L → grey RGB; CMYK without a profile → Pillow's (255-C)(255-K) formula. Pillow has
        # already undone Adobe's inverted CMYK while decoding the JPEG.
        image = image.convert("RGB")
    return image, flattened, color_managed


def _has_transparency(image: Image.Image) -> bool:
    # Image.has_transparency_data does this, but only from Pillow 10.1.
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite onto white, as viewers show transparency; black would hide dark logos and text."""
    from PIL import Image

    # A palette's transparency key, or an L/RGB colour key, becomes a real alpha channel here.
    if image.mode in ("L", "LA", "La", "1"):
        grey = image.convert("LA")
        base = Image.new("L", grey.size, 255)
        base.paste(grey.getchannel("L"), mask=grey.getchannel("A"))
        return base
    rgba = image.convert("RGBA")
    base = Image.new("RGB", rgba.size, (255, 255, 255))
    # RGBA pasted onto RGB through its own alpha: the same pixels as pasting its RGB through
    # its A band, without two more full-size copies.
    base.paste(rgba, mask=rgba)
    return base


@functools.cache
def _sixteen_bit_table() -> list[int]:
    # round(v × 255 / 65535) in integers: 65535 → 255, 32896 → 128, 0 → 0.
    return [(v * 255 + 32767) // 65535 for v in range(65536)]


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer or float pixels into 0–255 grey.

    Pillow's own convert("L") clips instead of scaling, so 16-bit 65535 and 300 both become 255.
    """
    if image.mode != "F":
        ints = image.convert("I")
        low, high = ints.getextrema()
        if isinstance(low, int) and isinstance(high, int) and low >= 0 and high <= 65535:
            # The usual case (16-bit PNG/TIFF/PGM, which older Pillow opens as "I"): exact, by
            # a 65536-entry table.
            return ints.point(_sixteen_bit_table(), "L")
        image = ints.convert("F")
    low, high = image.getextrema()
    lo, hi = float(low), float(high)  # type: ignore[arg-type]
    if lo >= 0.0 and hi <= 1.0:
        scale, offset = 255.0, 0.0  # normalised floats (scientific and HDR TIFFs)
    elif lo >= 0.0 and hi <= 255.0:
        scale, offset = 1.0, 0.0  # already 0–255, e.g. from convert("F") of 8-bit data
    elif hi > lo:
        scale = 255.0 / (hi - lo)  # any other range is stretched to fill 0–255
        offset = -lo * scale
    else:
        scale, offset = 0.0, 255.0 if lo > 0 else 0.0
    # "F" → "L" truncates, so +0.5 rounds to nearest.
    scaled = image.point(_linear(scale, offset + 0.5))
    return scaled.convert("L")


def _linear(scale: float, offset: float) -> Callable[[Any], Any]:
    # Image.point accepts only affine expressions for "I" and "F" images.
    return lambda value: value * scale + offset


def _to_srgb(image: Image.Image, icc: bytes) -> Image.Image | None:
    """The image converted from its embedded profile to sRGB, or None to leave it as is."""
    transform = _srgb_transform(icc, image.mode)
    if transform is None:
        return None
    try:
        return transform.apply(image)
    except Exception:
        return None


@functools.lru_cache(maxsize=16)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    # Cached: a batch of photos from one camera or phone shares one profile.
    try:
        from PIL import ImageCms
    except ImportError:
        # Pillow built without LittleCMS. Unconverted colours are a little off (Display P3
        # looks duller, some CMYK shifts), which a caption survives; refusing would not help.
        return None
    space = {"RGB": "RGB", "CMYK": "CMYK", "GRAY": "L"}
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if space.get(profile.profile.xcolor_space.strip()) != mode:
            return None
        if mode == "RGB" and (profile.profile.profile_description or "").startswith("sRGB"):
            return None  # already sRGB: a transform would only cost a pass over the pixels
        return ImageCms.buildTransform(profile, ImageCms.createProfile("sRGB"), mode, "RGB")
    except Exception:
        # A damaged or unusual profile (LittleCMS rejects some v4 and device-link ones): the
        # pixels are still good, only uncorrected.
        return None


def _lab_to_rgb(image: Image.Image) -> Image.Image:
    try:
        from PIL import ImageCms

        transform = ImageCms.buildTransform(ImageCms.createProfile("LAB"),
                                            ImageCms.createProfile("sRGB"), "LAB", "RGB")
        return transform.apply(image)
    except ImportError:
        # Without LittleCMS, keep the lightness: a grey picture beats none.
        return image.getchannel("L").convert("RGB")


def _heif_container(head: bytes) -> str | None:
    """"HEIC" or "AVIF" when the bytes are an ISO-BMFF file with such a brand, else None."""
    if head[4:8] != b"ftyp":
        return None
    size = int.from_bytes(head[:4], "big")
    brands = {head[8:12]} | {head[i:i + 4] for i in range(16, min(size, len(head)) - 3, 4)}
    # AVIF files also list mif1, so AVIF is looked for first.
    if brands & _AVIF_BRANDS:
        return "AVIF"
    if brands & _HEIF_BRANDS:
        return "HEIC"
    return None


def _pillow_reads_avif() -> bool:
    from PIL import features

    try:
        return bool(features.check_module("avif"))
    except ValueError:
        return False  # Pillow before 11.2 has no AVIF module to ask about


@functools.cache
def _heif_opener_registered() -> bool:
    """Register pillow-heif's openers with Pillow, once; False when it is not installed."""
    try:
        # Imported by name: an optional extra, with no type information for mypy to find.
        pillow_heif = importlib.import_module("pillow_heif")
        # pillow-heif applies HEIF's own rotation (irot/imir) while decoding and resets the EXIF
        # orientation to 1, so the transpose in _decode does not turn a photo twice.
        pillow_heif.register_heif_opener()
        if not _pillow_reads_avif() and hasattr(pillow_heif, "register_avif_opener"):
            pillow_heif.register_avif_opener()  # pillow-heif before 1.0 also reads AVIF
    except (ImportError, OSError):
        return False
    return True


def _require_heif_support(label: str, container: str) -> None:
    # Pillow 11.2+ reads AVIF itself when built with libavif.
    if container == "AVIF" and _pillow_reads_avif():
        return
    if _heif_opener_registered():
        return
    article = "an" if container == "AVIF" else "a"
    raise ImageError(label, f"is {article} {container} image, which needs the optional "
                            "pillow-heif package", hint="pip install 'llmkit[heif]'")


def _unidentified(label: str, head: bytes, container: str | None) -> ImageError:
    """The error for bytes Pillow does not recognise, saying what they look like instead."""
    looks_like, hint = _looks_like(head)
    if container is not None or (looks_like is None and _starts_like_an_image(head)):
        return ImageError(label, "is truncated or corrupt")
    reason = "is not an image Pillow can read"
    if looks_like:
        reason += f" (looks like {looks_like})"
    return ImageError(label, reason, hint=hint)


def _starts_like_an_image(head: bytes) -> bool:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    # A file cut off inside its signature (3 bytes of a PNG) counts too.
    return any(head.startswith(magic) or (len(head) >= 3 and magic.startswith(head))
               for magic in _IMAGE_MAGIC)


def _looks_like(head: bytes) -> tuple[str | None, str | None]:
    for magic, what, hint in _NON_IMAGE_MAGIC:
        if head.startswith(magic):
            return what, hint
    if head[4:8] == b"ftyp" and head[8:12] in _VIDEO_BRANDS:
        return "a video", "extract a frame first, e.g. with ffmpeg"
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"AVI "):
        return ("a WAV audio file", None) if head[8:12] == b"WAVE" else ("a video", None)
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file", None
    text = _as_text(head)
    if text is None:
        return None, None
    lowered = text.lstrip().lower()
    if lowered.startswith(("<!doctype html", "<html")):
        return "an HTML page", "was it downloaded from a page rather than the image's own URL?"
    if "<svg" in lowered:
        return "an SVG drawing", "render it to PNG first, e.g. `rsvg-convert -o out.png in.svg`"
    return "text", None


def _as_text(head: bytes) -> str | None:
    if not head or b"\x00" in head:
        return None
    # The sniffed prefix may end inside a multi-byte UTF-8 character.
    for cut in range(4):
        try:
            text = head[:len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        printable = sum(ch.isprintable() or ch in "\t\r\n\f" for ch in text)
        return text if text and printable >= 0.95 * len(text) else None
    return None


def _decode_error(label: str, fmt: str | None, exc: Exception) -> ImageError:
    """Pillow's exception for a file it identified but could not decode, as our error."""
    text = str(exc).lower()
    if "decompression bomb" in text or "too large" in text:
        return ImageError(label, "is too large to decode safely", hint="downscale it first")
    if any(words in text for words in _UNSUPPORTED_WORDS):
        kind = f"a kind of {fmt} file" if fmt else "in a form"
        return ImageError(label, f"is {kind} Pillow cannot decode", hint=_CONVERT_HINT)
    return ImageError(label, "is truncated or corrupt")
