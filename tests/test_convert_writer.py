"""The converter's streaming writer: background writes, disk-full handling, released pages."""

from __future__ import annotations

import io
import mmap
from pathlib import Path

import numpy as np
import pytest

from llmkit.convert.safetensors import MappedFiles, read_header
from llmkit.convert.writer import PlannedTensor, _BackgroundWriter, stage_gguf
from llmkit.errors import ConvertError
from tests.checkpoints import write_safetensors


class FullDisk(io.BytesIO):
    """A file that accepts ``room`` bytes, then fails as a full disk does."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self.room:
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_background_writer_keeps_order() -> None:
    out = io.BytesIO()
    with _BackgroundWriter(out) as sink:
        for i in range(200):
            sink.put(bytes([i % 256]) * 1000)
    data = out.getvalue()
    assert len(data) == 200_000
    assert all(data[i * 1000] == i % 256 for i in range(200))


def test_background_writer_reports_a_full_disk() -> None:
    with pytest.raises(OSError, match="No space left"), _BackgroundWriter(FullDisk(5000)) as sink:
        for _ in range(100):
            sink.put(b"x" * 1000)


def test_stage_gguf_on_a_full_disk_leaves_nothing(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf

    values = np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024)
    tensor = PlannedTensor("t.weight", values.shape, gguf.GGMLQuantizationType.F32,
                           lambda a, b: values[a:b])
    real_open = open

    def small_disk(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        handle = real_open(path, mode, *args, **kwargs)  # type: ignore[call-overload]
        if "w" in mode and str(path).endswith(".tmp"):
            original = handle.write

            def write(data: bytes) -> int:
                if handle.tell() + len(data) > 100_000:
                    raise OSError(28, "No space left on device")
                return int(original(data))

            handle.write = write
        return handle

    monkeypatch.setattr("builtins.open", small_disk)
    with pytest.raises(ConvertError, match="No space left on device"):
        stage_gguf(tmp_path / "out.gguf", "llama", lambda w: None, [tensor])
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="no madvise here")
def test_rows_release_the_source_pages(tmp_path: Path) -> None:
    values = np.random.default_rng(0).standard_normal((512, 4096)).astype(np.float32)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"w": values})
    (ref,) = read_header(path)
    files = MappedFiles()
    try:
        released: list[tuple[int, int]] = []
        original = files._release
        files._release = lambda f, a, b: (released.append((a, b)), original(f, a, b))[-1]
        block = files.rows(ref, 100, 200)
        assert np.array_equal(block, values[100:200])
        row = 4096 * 4
        assert released == [(ref.start + 100 * row, ref.start + 200 * row)]
        # Released pages read back correctly (from the page cache or the file).
        assert np.array_equal(files.rows(ref, 0, 512), values)
        order = np.arange(511, -1, -1)
        assert np.array_equal(files.rows(ref, 0, 10, order), values[order[:10]])
        assert released[-1] == (ref.start + 502 * row, ref.start + 512 * row)
    finally:
        files.close()
