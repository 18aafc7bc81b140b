"""Test images written to disk: photos, alpha, animation, 16-bit, EXIF, CMYK and broken files."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import IO

from PIL import Image

# Colours the helpers paint, so tests can assert on what comes out.
RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)
CYAN = (0, 255, 255)
YELLOW = (255, 255, 0)

# The transpose that stores an upright picture so that EXIF orientation N shows it upright
# again: the inverse of what a viewer applies (only 6 and 8 are not their own inverse).
STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def photo(size: tuple[int, int], *, noise: bool = True) -> Image.Image:
    """A photo-like RGB picture: red rises left to right, green top to bottom, blue is grain.

    The grain gives the JPEG encoder real detail to code, so decode times resemble a camera's.
    """
    ramp = Image.linear_gradient("L")  # 256×256, black at the top to white at the bottom
    red = ramp.transpose(Image.Transpose.ROTATE_90).transpose(
        Image.Transpose.FLIP_LEFT_RIGHT).resize(size)
    green = ramp.resize(size)
    blue = Image.effect_noise(size, 48) if noise else Image.new("L", size, 128)
    return Image.merge("RGB", (red, green, blue))


def write_photo_jpeg(directory: Path, name: str = "photo.jpg",
                     size: tuple[int, int] = (640, 480), quality: int = 90) -> Path:
    """A JPEG photo-like gradient (see ``photo``)."""
    path = directory / name
    photo(size).save(path, "JPEG", quality=quality)
    return path


def write_large_jpeg(directory: Path, name: str = "large.jpg",
                     size: tuple[int, int] = (6000, 4000)) -> Path:
    """A 24-megapixel camera-sized JPEG (6000×4000 unless told otherwise)."""
    return write_photo_jpeg(directory, name, size, quality=90)


def write_alpha_png(directory: Path, name: str = "alpha.png",
                    size: tuple[int, int] = (64, 48)) -> Path:
    """An RGBA PNG: the left half opaque RED, the right half fully transparent *black*.

    Prepared correctly, the right half is WHITE; dropping alpha would show black.
    """
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    image.paste((*RED, 255), (0, 0, size[0] // 2, size[1]))
    path = directory / name
    image.save(path, "PNG")
    return path


def write_animated_gif(directory: Path, name: str = "animated.gif",
                       size: tuple[int, int] = (32, 24)) -> Path:
    """A palette GIF of three frames, RED, GREEN and BLUE, all with transparency index 3.

    The first frame has a transparent 8×8 block in its top-left corner.
    """
    palette = [*RED, *GREEN, *BLUE, 0, 0, 0]
    frames = []
    for index in range(3):
        frame = Image.new("P", size, index)
        frame.putpalette(palette)
        frames.append(frame)
    frames[0].paste(3, (0, 0, 8, 8))
    path = directory / name
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], transparency=3,
                   duration=100, loop=0, disposal=2, optimize=False)
    return path


def write_gray16_png(directory: Path, name: str = "gray16.png",
                     values: tuple[int, ...] = (0, 32896, 65535), scale: int = 1) -> Path:
    """A 16-bit greyscale PNG: one column per value (each ``scale`` px wide), ``scale`` rows."""
    image = Image.new("I;16", (len(values), 1))
    for x, value in enumerate(values):
        image.putpixel((x, 0), value)
    if scale > 1:
        image = image.resize((len(values) * scale, scale), Image.Resampling.NEAREST)
    path = directory / name
    image.save(path, "PNG")
    return path


def save_with_orientation(upright: Image.Image, path: Path | IO[bytes], orientation: int,
                          **params: object) -> None:
    """Save ``upright`` transposed so that EXIF ``orientation`` turns it upright again.

    A file object needs ``format=`` among ``params``.
    """
    stored = upright if orientation == 1 else upright.transpose(
        STORE_FOR_ORIENTATION[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, **params)  # type: ignore[arg-type]


def write_exif_rotated_jpeg(directory: Path, orientation: int = 6, name: str | None = None,
                            size: tuple[int, int] = (64, 32)) -> Path:
    """A JPEG that shows, once its EXIF orientation is applied, a ``size`` picture of BLUE with
    a RED quarter in the top-left corner. Stored sideways for orientations 5–8."""
    upright = Image.new("RGB", size, BLUE)
    upright.paste(RED, (0, 0, size[0] // 2, size[1] // 2))
    path = directory / (name or f"orientation-{orientation}.jpg")
    save_with_orientation(upright, path, orientation, quality=95)
    return path


def write_cmyk_jpeg(directory: Path, name: str = "cmyk.jpg",
                    size: tuple[int, int] = (64, 32)) -> Path:
    """A CMYK JPEG (Adobe-inverted, as libjpeg writes it): left half cyan, right half yellow."""
    image = Image.new("CMYK", size, (0, 0, 255, 0))
    image.paste((255, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    path = directory / name
    image.save(path, "JPEG", quality=95)
    return path


def write_text_as_jpg(directory: Path, name: str = "notes.jpg") -> Path:
    """A text file wearing a .jpg name."""
    path = directory / name
    path.write_text("These are my notes, not a picture.\nSecond line.\n", encoding="utf-8")
    return path


def write_truncated_jpeg(directory: Path, name: str = "truncated.jpg") -> Path:
    """A JPEG cut off halfway through its image data (the header is intact)."""
    full = write_photo_jpeg(directory, name)
    data = full.read_bytes()
    full.write_bytes(data[:len(data) // 2])
    return full


def write_empty_file(directory: Path, name: str = "empty.jpg") -> Path:
    """A zero-byte file."""
    path = directory / name
    path.write_bytes(b"")
    return path


def write_all(directory: Path, *, large: bool = False) -> dict[str, Path]:
    """Every kind above, by a short name; the 6000×4000 JPEG (about a second) only on request."""
    paths = {
        "photo": write_photo_jpeg(directory),
        "alpha": write_alpha_png(directory),
        "animated": write_animated_gif(directory),
        "gray16": write_gray16_png(directory, scale=16),
        "exif_rotated": write_exif_rotated_jpeg(directory, 6),
        "cmyk": write_cmyk_jpeg(directory),
        "text": write_text_as_jpg(directory),
        "truncated": write_truncated_jpeg(directory),
        "empty": write_empty_file(directory),
    }
    if large:
        paths["large"] = write_large_jpeg(directory)
    return paths


def linear_rgb_icc_profile(description: str = "Linear RGB (test)") -> bytes:
    """An ICC v2 display profile with sRGB's primaries but a linear (gamma 1.0) tone curve.

    Mid-grey 128 in it is 50 % light, which is sRGB 188: a colour conversion that is easy to
    see. Built by hand because ImageCms can only create sRGB, LAB and XYZ profiles.
    """
    def s15(value: float) -> bytes:
        return struct.pack(">i", round(value * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    text = description.encode("ascii") + b"\0"
    desc = (b"desc" + bytes(4) + struct.pack(">I", len(text)) + text
            + struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + bytes(67))
    curve = b"curv" + bytes(4) + struct.pack(">I", 0)  # no entries: the identity curve
    tags = [
        (b"desc", desc),
        (b"cprt", b"text" + bytes(4) + b"No copyright\0"),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),  # D50, the profile connection space's white
        # sRGB's primaries, Bradford-adapted to D50 (as in every sRGB v2 profile).
        (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)),
        (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)),
        (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table = struct.pack(">I", len(tags))
    body = b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        table += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000)
              + b"mntr" + b"RGB " + b"XYZ " + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)
              + b"acsp" + bytes(4) + bytes(4) + bytes(4) + bytes(4) + bytes(8)
              + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(4)
              + bytes(16) + bytes(28))
    assert len(header) == 128
    return header + table + body
