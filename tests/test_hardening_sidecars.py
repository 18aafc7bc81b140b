"""`caption --sidecar` end to end: never over an input, one caption per file, odd names, | head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.test_e2e_caption import vlm  # noqa: F401  (the tiny SmolVLM fixture)

pytestmark = pytest.mark.slow

STRICT = {"PYTHONIOENCODING": "utf-8"}  # an en_US.UTF-8 user: stdout refuses non-UTF-8


def _caption(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "llmkit", "caption", *args, "-n", "4"],
                          capture_output=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, **STRICT}, timeout=300, **kwargs)


def _records(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def _png_named(path: Path) -> Path:
    images.write_alpha_png(path.parent, path.name)
    return path


def test_an_image_named_like_its_sidecar_is_never_overwritten(vlm: Path,  # noqa: F811
                                                               tmp_path: Path) -> None:
    pic = _png_named(tmp_path / "pic.txt")  # a PNG whose name ends in the sidecar extension
    photo = images.write_photo_jpeg(tmp_path, "a.jpg")
    before = pic.read_bytes(), photo.read_bytes()
    proc = _caption([str(pic), str(photo), "-m", str(vlm), "--sidecar"])
    assert proc.returncode == 1
    assert (pic.read_bytes(), photo.read_bytes()) == before
    assert (tmp_path / "a.txt").read_text().strip()  # the other image went on
    assert (f"llmkit: error: {pic}: its sidecar {pic} is the image itself (rename the file, "
            "or choose another --sidecar-ext such as .caption.txt)\n").encode() in proc.stderr
    assert b"2 images: 1 done, 0 skipped, 1 failed" in proc.stderr
    # --sidecar-ext .jpg on a.jpg: refused before any model is looked for (this one is gone).
    again = _caption([str(photo), "-m", str(tmp_path / "gone.gguf"), "--sidecar-ext", ".jpg",
                      "--skip-existing", "-f", "jsonl"])
    assert again.returncode == 1
    assert photo.read_bytes() == before[1]
    [record] = _records(again.stdout)
    assert record["caption"] is None and "is the image itself" in record["error"]


def test_images_sharing_a_stem_keep_both_captions(vlm: Path, tmp_path: Path  # noqa: F811
                                                  ) -> None:
    album = tmp_path / "album"
    album.mkdir()
    images.write_photo_jpeg(album, "photo.jpg")
    _png_named(album / "photo.png")
    images.write_photo_jpeg(album, "lone.jpg")
    old = os.umask(0o022)
    try:
        first = _caption([str(album), "-m", str(vlm), "--sidecar", "-f", "jsonl"])
    finally:
        os.umask(old)
    assert first.returncode == 0, first.stderr
    captions = {Path(r["path"]).name: r["caption"] for r in _records(first.stdout)}
    assert (album / "photo.jpg.txt").read_text() == captions["photo.jpg"] + "\n"
    assert (album / "photo.png.txt").read_text() == captions["photo.png"] + "\n"
    assert (album / "lone.txt").read_text() == captions["lone.jpg"] + "\n"
    assert not (album / "photo.txt").exists()
    assert (album / "lone.txt").stat().st_mode & 0o777 == 0o644  # as `open(..., "w")` gives
    # The same names when one of them is captioned alone: it is done already.
    alone = _caption([str(album / "photo.png"), "-m", str(tmp_path / "gone.gguf"), "--sidecar",
                      "--skip-existing"])
    assert alone.returncode == 0, alone.stderr
    assert b"1 image: 0 done, 1 skipped, 0 failed" in alone.stderr
    assert not (album / "photo.txt").exists()


def test_a_non_utf8_image_name_is_captioned_and_recognised(vlm: Path,  # noqa: F811
                                                           tmp_path: Path) -> None:
    album = tmp_path / "album"
    album.mkdir()
    images.write_photo_jpeg(album, "plain.jpg")
    odd = os.fsencode(album) + b"/\xff.jpg"
    images.write_photo_jpeg(album, os.fsdecode(b"\xff.jpg"))
    out = tmp_path / "records.jsonl"
    args = [str(album), "-m", str(vlm), "--sidecar", "--out", str(out), "-f", "jsonl"]
    first = _caption(args)
    assert first.returncode == 0, first.stderr
    assert sorted(os.fsencode(r["path"]) for r in _records(first.stdout)) == sorted(
        [odd, os.fsencode(album / "plain.jpg")])
    assert _records(out.read_bytes()) == _records(first.stdout)
    assert os.path.exists(os.fsencode(album) + b"/\xff.txt")
    rerun = _caption([*args, "--skip-existing"])
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout == b"" and b"2 images: 0 done, 2 skipped, 0 failed" in rerun.stderr
    text = _caption([os.fsdecode(odd), str(album / "plain.jpg"), "-m", str(vlm)])
    assert text.returncode == 0, text.stderr
    assert b"==> " + odd + b" <==\n" in text.stdout


def test_a_batch_piped_into_head_stops_with_141_and_keeps_its_work(vlm: Path,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    album = tmp_path / "album"
    album.mkdir()
    for i in range(6):
        images.write_photo_jpeg(album, f"p{i}.jpg")
    out = tmp_path / "records.jsonl"
    args = [str(album), "-m", str(vlm), "--sidecar", "--out", str(out), "-f", "jsonl", "-n", "4",
            "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", "caption", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **STRICT})
    assert proc.stdout is not None and proc.stderr is not None
    first = json.loads(proc.stdout.readline())  # `| head -n1`
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141
    assert err == b""
    saved = _records(out.read_bytes())
    assert saved[0]["path"] == first["path"] and 2 <= len(saved) < 6
    # Each recorded image has its sidecar: the image whose line found no reader is kept too.
    assert sorted(p.name for p in album.glob("*.txt")) == sorted(
        Path(r["path"]).with_suffix(".txt").name for r in saved)
    rerun = _caption([*args, "--skip-existing"])
    assert rerun.returncode == 0, rerun.stderr
    assert len(_records(rerun.stdout)) == 6 - len(saved)
    assert len(list(album.glob("*.txt"))) == 6
