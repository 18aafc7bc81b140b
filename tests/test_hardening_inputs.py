"""Bounded inputs and non-regular files: pipes, devices, sockets, link loops, unreadable
directories, over-long stdin, lines and documents, and images too large to decode."""

from __future__ import annotations

import contextlib
import ctypes
import io
import itertools
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from llmkit.documents import read_document
from llmkit.errors import DocumentError, ImageError, InputError, UsageError
from llmkit.images import prepare_image
from llmkit.io import (
    ReadLimit,
    collect_paths,
    format_size,
    numbered_lines,
    parse_size,
    read_stdin,
    read_text_file,
)
from tests import images as samples
from tests.measure import kill_group, measured, peak_kib

MiB = 1024 * 1024
IMAGES = frozenset({".jpg", ".png"})
TEXTS = frozenset({".txt"})
DEFAULT_PROMPT_ERROR = ("stdin is larger than 1 MiB, more than a 4096-token context can hold "
                        "(raise --ctx, or shorten the input)")


# --- helpers ----------------------------------------------------------------------------------


@dataclass
class Child:
    returncode: int
    stdout: str
    stderr: str
    peak_mb: float  # the child's own peak resident memory (see tests/measure.py)
    seconds: float


def _child_setup(drop_dac: bool) -> Callable[[], None]:
    def setup() -> None:
        # A runaway child (the bugs these tests pin down) must not take the machine with it.
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        if drop_dac and os.geteuid() == 0:
            # root reads through any mode; without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
            # in its bounding set, the exec'd child is refused like any user.
            libc = ctypes.CDLL(None, use_errno=True)
            for cap in (1, 2):
                if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                    raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")
    return setup


def run_child(argv: list[str], *, feed: Iterable[bytes] | None = None, drop_dac: bool = False,
              timeout: float = 120) -> Child:
    """Run a command with stdin fed from ``feed`` (until it ends or the child stops reading),
    and measure the child's own peak memory."""
    report = Path(tempfile.mkdtemp(prefix="llmkit-peak-")) / "peak"
    proc = subprocess.Popen(measured(argv, report),
                            stdin=subprocess.PIPE if feed is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_child_setup(drop_dac), start_new_session=True)
    outputs: dict[str, bytes] = {}

    def write() -> None:
        assert proc.stdin is not None and feed is not None
        try:
            for chunk in feed:
                proc.stdin.write(chunk)
        except OSError:
            pass  # the child stopped reading: what these tests want
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    def read(name: str, stream: Any) -> None:
        outputs[name] = stream.read()

    threads = [threading.Thread(target=read, args=("out", proc.stdout)),
               threading.Thread(target=read, args=("err", proc.stderr))]
    if feed is not None:
        threads.append(threading.Thread(target=write))
    for thread in threads:
        thread.daemon = True
        thread.start()
    timer = threading.Timer(timeout, kill_group, args=(proc.pid,))
    timer.start()
    started = time.monotonic()
    proc.wait()
    seconds = time.monotonic() - started
    timer.cancel()
    for thread in threads:
        thread.join(timeout=10)
    peak = peak_kib(report)
    shutil.rmtree(report.parent, ignore_errors=True)
    return Child(proc.returncode, outputs.get("out", b"").decode("utf-8", "replace"),
                 outputs.get("err", b"").decode("utf-8", "replace"), peak / 1024, seconds)


def llmkit_child(args: list[str], **kwargs: Any) -> Child:
    return run_child([sys.executable, "-m", "llmkit", *args], **kwargs)


def python_child(code: str, *args: str, timeout: float = 60) -> Child:
    return run_child([sys.executable, "-c", textwrap.dedent(code), *args], timeout=timeout)


def endless(chunk: bytes = b"x" * MiB, *, total: int | None = None) -> Iterator[bytes]:
    """Chunks for ever (or up to ``total`` bytes)."""
    if total is None:
        yield from itertools.repeat(chunk)
        return
    sent = 0
    while sent < total:
        yield chunk[:total - sent]
        sent += len(chunk)


class EndlessStream(io.RawIOBase):
    """A stdin that never ends; it gives up loudly after ``give_up`` bytes, so an unbounded
    reader fails the test instead of hanging it."""

    def __init__(self, pattern: bytes = b"a.jpg\n", give_up: int = 256 * MiB) -> None:
        self.pattern = pattern
        self.give_up = give_up
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.served > self.give_up:
            raise AssertionError(f"read {self.served} bytes of an endless stream")
        view = memoryview(buffer).cast("B")
        n = len(view)
        data = (self.pattern * (n // len(self.pattern) + 1))[:n]
        view[:n] = data
        self.served += n
        return n


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def make_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


def feed_fifo(path: Path, chunks: Iterable[bytes]) -> threading.Thread:
    """A writer for a FIFO, on a thread; it stops when the reader goes away."""

    def write() -> None:
        try:
            with open(path, "wb") as writer:
                for chunk in chunks:
                    writer.write(chunk)
        except OSError:
            pass

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    return thread


def collect_in_child(args: list[str], recursive: bool, suffixes: Iterable[str]) -> Any:
    """collect_paths in a child process, so a walk that never ends cannot hang the tests."""
    child = python_child("""
        import json, sys
        from llmkit.io import collect_paths
        args, recursive, suffixes = json.loads(sys.argv[1])
        print(json.dumps(collect_paths(args, suffixes=frozenset(suffixes), recursive=recursive)))
        """, json.dumps([args, recursive, sorted(suffixes)]), timeout=30)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    return json.loads(child.stdout)


def reasons_in_child(path: Path) -> dict[str, str]:
    """What each reader says about ``path``, found in a child with a deadline and bounded memory."""
    child = python_child("""
        import json, sys
        from pathlib import Path
        from llmkit.documents import read_document
        from llmkit.images import prepare_image
        from llmkit.io import numbered_lines, read_text_file
        path = Path(sys.argv[1])
        found = {}
        for name, reader in (("image", prepare_image), ("document", read_document),
                             ("text", read_text_file),
                             ("lines", lambda p: next(numbered_lines(str(p))))):
            try:
                reader(path)
                found[name] = "read"
            except Exception as exc:
                found[name] = str(exc)
        print(json.dumps(found))
        """, str(path), timeout=20)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    result: dict[str, str] = json.loads(child.stdout)
    return result


# --- directory walks: regular files only, each directory once ---------------------------------


def test_a_walk_and_a_quoted_glob_take_regular_files_only(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    make_fifo(tmp_path / "pipe.jpg")
    with make_socket(tmp_path / "sock.jpg"):
        assert collect_paths([str(tmp_path)], suffixes=IMAGES) == [str(tmp_path / "a.jpg")]
        assert collect_paths([str(tmp_path / "*.jpg")], suffixes=IMAGES) == [
            str(tmp_path / "a.jpg")]
        # Named one by one, they are the user's choice: the reader says what each one is.
        named = [str(tmp_path / n) for n in ("pipe.jpg", "sock.jpg")]
        assert collect_paths(named, suffixes=IMAGES) == named


def test_a_link_loop_is_not_reentered(tmp_path: Path) -> None:
    # Before: 41 inputs for one image (the walk went round until ELOOP).
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "loop").symlink_to(".")
    assert collect_in_child([str(tmp_path)], True, IMAGES) == [str(tmp_path / "a.jpg")]


def test_symlinked_directories_are_walked_once_and_two_loops_end(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "a.jpg").write_bytes(b"a")
    (root / "sub" / "b.jpg").write_bytes(b"b")
    (outside / "c.jpg").write_bytes(b"c")
    (root / "l1").symlink_to(outside)
    (root / "l2").symlink_to(outside)  # a second way to the same directory
    (root / "sub" / "up").symlink_to("..")  # two loops: the walk grew without end
    (root / "sub" / "again").symlink_to("../sub")
    assert collect_in_child([str(root)], True, IMAGES) == [
        str(root / "a.jpg"), str(root / "l1" / "c.jpg"), str(root / "sub" / "b.jpg")]
    # Named again, or through another link: each directory is walked once, under the first
    # name met (here sub/up leads to root before root itself is named).
    assert collect_in_child([str(root / "sub"), str(root), str(root / "l2")], True, IMAGES) == [
        str(root / "sub" / "b.jpg"), str(root / "sub" / "up" / "a.jpg"),
        str(root / "sub" / "up" / "l1" / "c.jpg")]


def test_names_of_one_file_are_one_input(tmp_path: Path) -> None:
    first = tmp_path / "a.jpg"
    first.write_bytes(b"x")
    (tmp_path / "b.jpg").symlink_to("a.jpg")
    os.link(first, tmp_path / "c.jpg")
    assert collect_paths([str(tmp_path)], suffixes=IMAGES) == [str(first)]
    assert collect_paths([str(tmp_path / "c.jpg"), str(first)], suffixes=IMAGES) == [
        str(tmp_path / "c.jpg")]


def test_a_dangling_link_stays_an_input_that_says_so(tmp_path: Path) -> None:
    (tmp_path / "gone.jpg").symlink_to("nowhere.jpg")
    assert collect_paths([str(tmp_path)], suffixes=IMAGES) == [str(tmp_path / "gone.jpg")]
    with pytest.raises(ImageError) as caught:
        prepare_image(tmp_path / "gone.jpg")
    assert caught.value.reason == "is a symbolic link to a missing file"


def test_deep_trees_do_not_exhaust_the_stack(tmp_path: Path) -> None:
    deep = tmp_path
    for _ in range(1200):  # past Python's recursion limit; a walk is a loop, not recursion
        deep = deep / "d"
        deep.mkdir()
    (deep / "x.txt").write_text("deep")
    try:
        assert collect_paths([str(tmp_path)], suffixes=TEXTS, recursive=True) == [
            str(deep / "x.txt")]
    finally:
        # pytest removes old temporary directories recursively and would hit the recursion
        # limit on this tree in a later run: take it down here, deepest first.
        (deep / "x.txt").unlink()
        while deep != tmp_path:
            deep.rmdir()
            deep = deep.parent


def _refuse_listing(monkeypatch: pytest.MonkeyPatch, locked: Path) -> None:
    # root lists any directory, so stand in for the kernel's refusal (the CLI tests below
    # drop root's capabilities instead).
    real = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_directory_is_one_input_that_fails(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("a")
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "b.txt").write_text("b")
    (tmp_path / "z.txt").write_text("z")
    _refuse_listing(monkeypatch, locked)
    assert collect_paths([str(tmp_path)], suffixes=TEXTS, recursive=True) == [
        str(tmp_path / "a.txt"), str(locked), str(tmp_path / "z.txt")]
    # Named at the top, too: one failed input, not an aborted batch.
    assert collect_paths([str(locked)], suffixes=TEXTS) == [str(locked)]
    reason = "is a directory that cannot be read (permission denied)"
    with pytest.raises(DocumentError) as document:
        read_document(locked)
    assert document.value.message == f"{locked} {reason}"
    with pytest.raises(ImageError) as image:
        prepare_image(locked)
    assert image.value.reason == reason


# --- non-regular files: refused by name, pipes never hang on open -----------------------------


def test_devices_and_sockets_are_refused_without_reading(tmp_path: Path) -> None:
    # Before: read_document('/dev/zero') read for ever, growing memory.
    assert reasons_in_child(Path("/dev/zero")) == {
        name: "/dev/zero is a character device, not a file"
        for name in ("image", "document", "text", "lines")}
    with make_socket(tmp_path / "s.txt"):
        where = tmp_path / "s.txt"
        assert reasons_in_child(where) == {name: f"{where} is a socket, not a file"
                                           for name in ("image", "document", "text", "lines")}


def test_a_fifo_with_no_writer_does_not_hang(tmp_path: Path) -> None:
    # Before: open() of a FIFO waited for a writer that never came. Now a writer gets a
    # moment to turn up, and then the pipe is refused.
    fifo = make_fifo(tmp_path / "p.txt")
    started = time.monotonic()
    assert reasons_in_child(fifo) == {
        name: f"{fifo} is a pipe that nothing is writing to"
        for name in ("image", "document", "text", "lines")}
    assert time.monotonic() - started < 15


def test_a_pipe_is_read_up_to_its_cap(tmp_path: Path) -> None:
    fifo = make_fifo(tmp_path / "p.png")
    writer = feed_fifo(fifo, endless())
    with pytest.raises(ImageError) as image:
        prepare_image(fifo, max_bytes=MiB)
    assert image.value.message == (f"{fifo} is larger than 1 MiB, the most llmkit reads of one "
                                   "image")
    writer.join(timeout=10)
    assert not writer.is_alive()
    writer = feed_fifo(fifo, endless())
    with pytest.raises(DocumentError) as document:
        read_document(fifo, max_bytes=2 * MiB)
    assert document.value.message == (f"{fifo} is larger than 2 MiB, the most llmkit reads of "
                                       "one document")
    assert document.value.hint == "raise --max-bytes, e.g. --max-bytes 4M"
    writer.join(timeout=10)


def test_a_regular_file_over_the_cap_is_refused_by_its_size(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_bytes(b"word " * (MiB // 2))  # 2.5 MiB
    with pytest.raises(DocumentError, match="is larger than 1 MiB"):
        read_document(big, max_bytes=MiB)
    assert read_document(big, max_bytes=3 * MiB).text.startswith("word word")
    with pytest.raises(DocumentError, match="is larger than 1 MiB"):
        read_document(big.read_bytes(), max_bytes=MiB)
    with pytest.raises(InputError, match="is larger than 1 MiB, more than a 4096-token"):
        read_text_file(big, ReadLimit(MiB, "more than a 4096-token context can hold"))
    image = samples.write_photo_jpeg(tmp_path)
    with pytest.raises(ImageError, match="is larger than 1 KiB, the most llmkit reads"):
        prepare_image(image, max_bytes=1024)
    with pytest.raises(ImageError, match="is larger than 1 KiB"):
        prepare_image(image.read_bytes(), max_bytes=1024)


# --- bounded text: stdin, lines, path lists ---------------------------------------------------


def test_read_stdin_stops_at_what_the_context_can_hold() -> None:
    stream = EndlessStream(b"word ")
    with pytest.raises(InputError) as caught:
        read_stdin(io.BufferedReader(stream))
    assert str(caught.value) == DEFAULT_PROMPT_ERROR
    assert stream.served < 2 * MiB
    limit = ReadLimit(100, "more than a 16-token context can hold", "raise --ctx")
    with pytest.raises(InputError, match="stdin is larger than 100 bytes"):
        read_stdin(io.BytesIO(b"x" * 101), limit=limit)
    assert read_stdin(io.BytesIO(b"x" * 100), limit=limit) == "x" * 100


def test_a_path_list_on_stdin_is_bounded() -> None:
    stream = EndlessStream()
    with pytest.raises(InputError) as caught:
        collect_paths(["-"], suffixes=IMAGES, stdin=io.BufferedReader(stream))
    assert caught.value.message == ("stdin is larger than 32 MiB, the most llmkit reads as a "
                                    "list of paths")
    assert stream.served < 34 * MiB


def test_a_batch_file_streams_and_a_bad_line_is_that_line_only(tmp_path: Path) -> None:
    # Before: one non-UTF-8 line rejected the whole file, while stdin made it one record.
    batch = tmp_path / "batch.jsonl"
    batch.write_bytes(b'{"text": "one"}\n{"text": "caf\xe9"}\n\n{"text": "three"}\n')
    lines = list(numbered_lines(str(batch)))
    assert [(n, x if isinstance(x, str) else str(x)) for n, x in lines] == [
        (1, '{"text": "one"}'),
        (2, "line 2 is not UTF-8 text (byte 0xe9 at offset 13) "
            "(convert it first, e.g. `iconv -f latin1 -t utf-8`)"),
        (4, '{"text": "three"}'),
    ]


def test_an_over_long_line_is_one_error_and_the_rest_goes_on(tmp_path: Path) -> None:
    batch = tmp_path / "batch.jsonl"
    batch.write_bytes(b"short\n" + b"y" * 5000 + b"\nafter\nlast")
    limit = ReadLimit(1000, "more than a 16-token context can hold", "raise --ctx")
    lines = [(n, x if isinstance(x, str) else str(x))
             for n, x in numbered_lines(str(batch), limit=limit)]
    assert lines == [(1, "short"),
                     (2, "line 2 is larger than 1000 bytes, more than a 16-token context can "
                         "hold (raise --ctx)"),
                     (3, "after"), (4, "last")]


def test_numbered_lines_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"missing\.jsonl does not exist"):
        next(numbered_lines(str(tmp_path / "missing.jsonl")))


@pytest.mark.parametrize(("text", "size"), [
    ("1", 1), ("512", 512), ("4k", 4096), ("4K", 4096), ("32M", 32 * MiB), ("32MiB", 32 * MiB),
    ("1.5M", 3 * MiB // 2), ("2G", 2 << 30), ("100MB", 100 * MiB), (" 7m ", 7 * MiB),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text, "--max-bytes") == size


@pytest.mark.parametrize("text", ["", "0", "-1", "M", "12X", "1e9", "nan", "1.5.5M"])
def test_parse_size_refuses_nonsense(text: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_size(text, "--max-bytes")
    assert caught.value.message.startswith(f"--max-bytes must be a size such as 32M, not '{text}'")


@pytest.mark.parametrize(("size", "text"), [
    (1, "1 byte"), (100, "100 bytes"), (1024, "1 KiB"), (1536, "1.5 KiB"), (MiB, "1 MiB"),
    (32 * MiB, "32 MiB"), (6 * MiB, "6 MiB"), (384 * 1024, "384 KiB"), (1 << 30, "1 GiB"),
])
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


# --- images: decoded size bounded before decoding ---------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_zero_png(path: Path, width: int, height: int) -> Path:
    """A valid 16-bit greyscale PNG of zeros: a few hundred KiB that decode to gigabytes."""
    packer = zlib.compressobj(9)
    row = b"\x00" * (1 + 2 * width)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b""))
    return path


PREPARE_IN_CHILD = """
    import json, resource, sys
    from llmkit.images import prepare_image
    kwargs = json.loads(sys.argv[2])
    try:
        image = prepare_image(sys.argv[1], **kwargs)
        result = {"size": [image.width, image.height], "mode": image.mode}
    except Exception as exc:
        result = {"error": str(exc)}
    # VmHWM, not getrusage: ru_maxrss carries the parent's peak across fork and exec.
    hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    result["peak_mb"] = int(hwm[0].split()[1]) / 1024
    print(json.dumps(result))
    """


def prepare_in_child(path: Path, **kwargs: Any) -> dict[str, Any]:
    child = python_child(PREPARE_IN_CHILD, str(path), json.dumps(kwargs), timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]
    result: dict[str, Any] = json.loads(child.stdout)
    return result


def test_a_small_png_that_decodes_to_gigabytes_is_refused_before_decoding(tmp_path: Path) -> None:
    # Before: 13000×13000 16-bit pixels passed the pixel limit and took 2.9 GB to decode.
    bomb = write_zero_png(tmp_path / "bomb.png", 13000, 13000)
    assert bomb.stat().st_size < 2 * MiB
    result = prepare_in_child(bomb)
    assert result["error"] == (
        f"{bomb} is too large to decode (13000×13000 pixels take 644.7 MiB as RGB, over the "
        "limit of 256 MiB) (downscale it first)")
    assert result["peak_mb"] < 150, result


def test_a_real_16_bit_image_is_bounded_by_its_bytes_not_its_pixels(tmp_path: Path) -> None:
    noise = Image.effect_noise((3000, 2000), 64).convert("I").point(lambda v: v * 250)
    path = tmp_path / "scan16.png"
    noise.convert("I;16").save(path, "PNG")
    ok = prepare_in_child(path)
    assert (ok["size"], ok["mode"]) == ([2048, 1365], "I;16"), ok
    # Decoded 16-bit (11 MiB) and every conversion after it stay within a few times that.
    assert ok["peak_mb"] < 250, ok
    refused = prepare_in_child(path, max_decoded_bytes=8 * MiB)
    assert refused["error"] == (f"{path} is too large to decode (3000×2000 pixels take 22.9 MiB "
                                "as RGB, over the limit of 8 MiB) (downscale it first)")


def test_a_big_jpeg_counts_at_the_size_its_decoder_draws(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    samples.photo((4000, 3000)).save(path, "JPEG", quality=80)
    # Drawn at an eighth (500×375), it is small whatever its full size would take.
    small = prepare_image(path, max_side=500, max_decoded_bytes=2 * MiB)
    assert (small.width, small.height, small.decode_scale) == (500, 375, 8)
    with pytest.raises(ImageError) as caught:
        prepare_image(path, max_side=4000, max_decoded_bytes=2 * MiB)
    assert caught.value.reason == ("is too large to decode (4000×3000 pixels take 45.8 MiB as "
                                   "RGB, over the limit of 2 MiB)")


def write_huge_canvas_gif(path: Path, width: int, height: int) -> Path:
    """A 16×16 GIF frame with a transparent colour, on a ``width``×``height`` canvas that the
    decoder fills with background: a few hundred bytes for any size (a fuzzer's find)."""
    frame = Image.new("P", (16, 16), 1)
    frame.putpalette([0, 0, 0, 255, 0, 0] * 128)
    buffer = io.BytesIO()
    frame.save(buffer, "GIF", transparency=1)
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen, not the frame
    path.write_bytes(bytes(data))
    return path


def test_a_tiny_gif_on_a_huge_canvas_is_counted_as_the_rgb_it_becomes(tmp_path: Path) -> None:
    # Before: 33729×4872 palette pixels took 157 MiB as decoded, so they passed the bound, and
    # flattening them onto white took 2.2 GB and seconds (18 s on a busy machine).
    bomb = write_huge_canvas_gif(tmp_path / "canvas.gif", 9000, 8000)
    assert bomb.stat().st_size < 1024
    result = prepare_in_child(bomb)
    assert result["error"] == (f"{bomb} is too large to decode (9000×8000 pixels take 274.7 MiB "
                               "as RGB, over the limit of 256 MiB) (downscale it first)")
    assert result["peak_mb"] < 100, result
    # Under the bound, decoding and flattening peak near four times the RGB image (61 MiB).
    fits = prepare_in_child(write_huge_canvas_gif(tmp_path / "fits.gif", 4000, 4000))
    assert (fits["size"], fits["mode"]) == ([2048, 2048], "P"), fits
    assert fits["peak_mb"] < 4 * 61 + 60, fits


def progressive_jpeg_bomb(width: int, height: int, *, extra_scans: int = 0,
                          subsampling: int = 2) -> bytes:
    """A progressive JPEG of 16×16 pixels whose header says ``width``×``height`` (libjpeg fills
    what the scans lack), with one of its scans repeated ``extra_scans`` more times."""
    buffer = io.BytesIO()
    samples.photo((16, 16)).save(buffer, "JPEG", progressive=True, subsampling=subsampling)
    data, out, scans, position = buffer.getvalue(), [b"\xff\xd8"], [], 2
    while data[position + 1] != 0xD9:
        code = data[position + 1]
        end = position + 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if code == 0xDA:  # the entropy-coded data runs to the next marker
            while data[end] != 0xFF or data[end + 1] in (0, *range(0xD0, 0xD8)):
                end += 1
        segment = data[position:end]
        if code == 0xC2:
            segment = segment[:5] + struct.pack(">HH", height, width) + segment[9:]
        if code == 0xDA:
            scans.append(segment)
        out.append(segment)
        position = end
    out += [scans[1]] * extra_scans + [b"\xff\xd9"]
    return b"".join(out)


def test_a_progressive_jpeg_is_bounded_by_its_coefficients_and_its_scans(tmp_path: Path) -> None:
    # A progressive JPEG is decoded into every block's coefficients at full size, however small
    # it is then drawn: before, 854 bytes claiming 13000×13000 pixels took 1 GB.
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(progressive_jpeg_bomb(13000, 13000, subsampling=0))
    assert huge.stat().st_size < 1024
    result = prepare_in_child(huge)
    assert result["error"] == (
        f"{huge} is too large to decode (13000×13000 pixels sent in 10 scans buffer 967.0 MiB of "
        "coefficients, over the limit of 256 MiB) (downscale it first, or re-save it as a "
        "baseline JPEG)")
    assert result["peak_mb"] < 100, result
    # The same pixels in one baseline scan are drawn at a quarter, a row of blocks at a time.
    baseline = tmp_path / "baseline.jpg"
    samples.photo((13000, 13000), noise=False).save(baseline, "JPEG", quality=10)
    drawn = prepare_in_child(baseline)
    assert drawn["size"] == [2048, 2048], drawn
    # Each repeated scan is a pass over all the coefficients; before, 100 of them in 1.3 KiB
    # cost seconds. Real progressive files (10 scans here) still decode.
    many = progressive_jpeg_bomb(4000, 3000, extra_scans=95)
    with pytest.raises(ImageError) as caught:
        prepare_image(many)
    assert caught.value.reason == "is a JPEG of more than 100 scans, which no encoder writes"
    assert prepare_image(progressive_jpeg_bomb(4000, 3000, extra_scans=90)).width == 2048
    buffer = io.BytesIO()
    samples.photo((640, 480)).save(buffer, "JPEG", progressive=True, exif=b"Exif\x00\x00"
                                   + b"\xff\xda" * 200)  # scan markers inside a segment
    assert prepare_image(buffer.getvalue()).width == 640


def test_image_limits_must_be_positive() -> None:
    data = samples.photo((4, 4)).tobytes()
    with pytest.raises(UsageError):
        prepare_image(data, max_bytes=0)
    with pytest.raises(UsageError):
        prepare_image(data, max_decoded_bytes=0)


# --- the CLI: one line, promptly, in bounded memory -------------------------------------------


def test_run_stops_reading_stdin_that_cannot_fit(smollm2_path: Path) -> None:
    # Before: 48 MiB on stdin was read whole and tokenized (about 1.9 GB) before the check.
    child = llmkit_child(["run", "-m", str(smollm2_path), "summarize this"],
                         feed=endless(total=48 * MiB))
    assert (child.returncode, child.stdout) == (1, "")
    assert child.stderr == f"llmkit: error: {DEFAULT_PROMPT_ERROR}\n"
    assert child.peak_mb < 150, child.peak_mb
    # An endless stream, and a context given: the bound follows --ctx.
    endless_child = llmkit_child(["run", "-m", str(smollm2_path), "--ctx", "512", "go"],
                                 feed=endless(), timeout=60)
    assert endless_child.returncode == 1
    assert endless_child.stderr == (
        "llmkit: error: stdin is larger than 128 KiB, more than a 512-token context can hold "
        "(raise --ctx, or shorten the input)\n")
    assert endless_child.peak_mb < 150 and endless_child.seconds < 30


def test_run_refuses_a_device_or_an_oversized_schema(smollm2_path: Path, tmp_path: Path) -> None:
    child = llmkit_child(["run", "-m", str(smollm2_path), "--json-schema", "/dev/zero", "hi"],
                         timeout=60)
    assert (child.returncode, child.stderr) == (
        1, "llmkit: error: /dev/zero is a character device, not a file\n")
    schema = tmp_path / "schema.json"
    schema.write_bytes(b"{" + b" " * (2 * MiB) + b"}")
    big = llmkit_child(["run", "-m", str(smollm2_path), "--json-schema", str(schema), "hi"])
    assert (big.returncode, big.stderr) == (
        1, f"llmkit: error: {schema} is larger than 1 MiB, the most llmkit reads of a JSON "
           "schema\n")


def test_check_stops_reading_stdin_and_refuses_devices() -> None:
    # Both are refused before any guard model is looked for.
    child = llmkit_child(["check"], feed=endless(), timeout=60)
    assert (child.returncode, child.stdout) == (1, "")
    assert child.stderr == f"llmkit: error: {DEFAULT_PROMPT_ERROR}\n"
    assert child.peak_mb < 150
    device = llmkit_child(["check", "--file", "/dev/zero"], timeout=60)
    assert (device.returncode, device.stderr) == (
        1, "llmkit: error: /dev/zero is a character device, not a file\n")
    ctx = llmkit_child(["check", "--ctx", "64"], feed=endless(total=MiB))
    assert ctx.stderr == ("llmkit: error: stdin is larger than 16 KiB, more than a 64-token "
                          "context can hold (raise --ctx, or shorten the input)\n")


def test_summarize_stops_reading_a_document_past_max_bytes() -> None:
    child = llmkit_child(["summarize"], feed=endless(), timeout=60)
    assert (child.returncode, child.stdout) == (1, "")
    assert child.stderr == ("llmkit: error: stdin is larger than 32 MiB, the most llmkit reads "
                            "of one document (raise --max-bytes, e.g. --max-bytes 64M)\n")
    assert child.peak_mb < 200, child.peak_mb
    small = llmkit_child(["summarize", "--max-bytes", "1M", "-"], feed=endless(total=2 * MiB))
    assert small.stderr == ("llmkit: error: stdin is larger than 1 MiB, the most llmkit reads "
                            "of one document (raise --max-bytes, e.g. --max-bytes 2M)\n")


@pytest.mark.parametrize("value", ["0", "lots", "-5M"])
def test_summarize_max_bytes_is_a_usage_error_when_not_a_size(value: str) -> None:
    child = llmkit_child(["summarize", "--max-bytes", value, "x.txt"])
    assert child.returncode == 2
    assert child.stderr.startswith(f"llmkit: error: --max-bytes must be a size such as 32M, not "
                                   f"'{value}'")
    assert child.stderr.count("\n") == 1


def test_caption_stops_reading_an_endless_path_list() -> None:
    child = llmkit_child(["caption", "-"], feed=endless(b"photos/a.jpg\n" * 80000), timeout=60)
    assert (child.returncode, child.stdout) == (1, "")
    assert child.stderr.startswith("llmkit: error: stdin is larger than 32 MiB, the most llmkit "
                                   "reads as a list of paths (")
    assert child.peak_mb < 250, child.peak_mb


# --- end to end with a real model: batches go on past every odd input -------------------------


def _records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_summarize_batch_past_pipes_devices_loops_and_a_locked_directory(
        smollm2_path: Path, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("The harbour opened in 1850 and employed forty people.\n")
    (docs / "z.txt").write_text("The library moved to the old mill in 1902.\n")
    make_fifo(docs / "pipe.txt")  # before: the batch hung here for ever
    (docs / "sub" / "loop").symlink_to("..")
    (docs / "same.txt").symlink_to("a.txt")
    locked = docs / "locked"
    locked.mkdir()
    (locked / "b.txt").write_text("never read")
    locked.chmod(0)
    try:
        child = llmkit_child(["summarize", "-m", str(smollm2_path), str(docs), "/dev/zero", "-r",
                              "--format", "jsonl", "--max-tokens", "16", "-q"],
                             drop_dac=True, timeout=240)
    finally:
        locked.chmod(0o755)
    records = {r["path"]: r for r in _records(child.stdout)}
    # Documents are summarized --parallel at a time: each line names its document.
    assert sorted(records) == sorted([str(docs / "a.txt"), str(locked), str(docs / "z.txt"),
                                      "/dev/zero"]), child.stderr
    assert records[str(docs / "a.txt")]["error"] is None
    assert records[str(docs / "z.txt")]["error"] is None
    assert records[str(locked)]["error"] == (
        f"{locked} is a directory that cannot be read (permission denied)")
    assert records["/dev/zero"]["error"] == "/dev/zero is a character device, not a file"
    assert child.returncode == 1


@pytest.mark.slow
def test_check_batch_file_and_stdin_agree_on_bad_lines(smollm2_path: Path,
                                                       tmp_path: Path) -> None:
    lines = (b'{"text": "hello"}\n{"text": "caf\xe9"}\n{"text": "' + b"w " * MiB + b'"}\n'
             b'{"text": "bye"}\n')
    batch = tmp_path / "batch.jsonl"
    batch.write_bytes(lines)
    args = ["check", "-m", str(smollm2_path), "--threshold", "1", "--ctx", "1024", "--batch"]
    from_file = llmkit_child([*args, str(batch)], timeout=240)
    from_stdin = llmkit_child([*args, "-"], feed=[lines], timeout=240)
    for child in (from_file, from_stdin):
        # Checked together, records are written as they finish, each naming its line.
        records = sorted(_records(child.stdout), key=lambda r: r["line"])
        assert [r["line"] for r in records] == [1, 2, 3, 4], child.stderr
        assert [r["verdict"] for r in records] == ["safe", None, None, "safe"]
        assert records[1]["error"] == ("line 2 is not UTF-8 text (byte 0xe9 at offset 13) "
                                       "(convert it first, e.g. `iconv -f latin1 -t utf-8`)")
        assert records[2]["error"] == ("line 3 is larger than 1.5 MiB, more than a 1024-token "
                                       "context can hold (raise --ctx, or shorten the input)")
        assert child.returncode == 1
        assert child.peak_mb < 400, child.peak_mb


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SmolVLM converted by `llmkit convert`; its projector lies beside it."""
    from tests.conftest import run_llmkit
    from tests.vision_checkpoints import build_tiny_smolvlm

    ckpt = tmp_path_factory.mktemp("hf") / "SmolVLM-tiny"
    build_tiny_smolvlm(ckpt)
    out = tmp_path_factory.mktemp("vlm")
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out / "vlm.gguf")])
    assert proc.returncode == 0, proc.stderr
    return out / "vlm.gguf"


@pytest.mark.slow
def test_caption_batch_reads_named_pipes_and_goes_past_everything_else(
        vlm: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = samples.write_photo_jpeg(photos)
    make_fifo(photos / "pipe.jpg")  # found by the walk: left out (before: the batch hung)
    (photos / "loop").symlink_to(".")  # before: 41 records for one image
    locked = photos / "private"
    locked.mkdir()
    samples.write_photo_jpeg(locked)
    locked.chmod(0)
    named = make_fifo(tmp_path / "fed.png")  # named on the command line: read
    writer = feed_fifo(named, [_png_bytes(samples.photo((64, 48)))])
    try:
        child = llmkit_child(["caption", str(photos), str(named), "/dev/zero", "-r",
                              "-m", str(vlm), "--format", "jsonl", "--max-tokens", "4"],
                             drop_dac=True, timeout=240)
    finally:
        locked.chmod(0o755)
        writer.join(timeout=10)
    records = _records(child.stdout)
    # Images are captioned --parallel at a time: each line names its image.
    assert sorted(r["path"] for r in records) == sorted(
        [str(photo), str(locked), str(named), "/dev/zero"]), child.stderr
    by_path = {r["path"]: r for r in records}
    assert by_path[str(photo)]["error"] is None and by_path[str(photo)]["caption"]
    assert by_path[str(named)]["error"] is None, by_path[str(named)]
    assert by_path[str(named)]["image"]["original_width"] == 64
    assert by_path[str(locked)]["error"] == (
        f"{locked} is a directory that cannot be read (permission denied)")
    assert by_path["/dev/zero"]["error"] == "/dev/zero is a character device, not a file"
    assert child.returncode == 1
    assert child.stderr.strip().endswith("4 images: 2 done, 0 skipped, 2 failed")


def _png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()
