"""The converter's streaming writer: background writes, disk-full handling, released pages."""

from __future__ import annotations

import io
import mmap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from llmkit.convert import writer
from llmkit.convert.safetensors import MappedFiles, read_header
from llmkit.convert.writer import PlannedTensor, _BackgroundWriter, _encode, stage_gguf
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


def test_background_writer_drains_before_the_caller_writes() -> None:
    out = io.BytesIO()
    with _BackgroundWriter(out) as sink:
        for i in range(50):
            sink.put(bytes([i]) * 1000)
            if i % 7 == 0:
                sink.drain()
                assert len(out.getvalue()) == (i + 1) * 1000  # nothing left in flight
    assert len(out.getvalue()) == 50_000


def test_streamed_tensors_are_written_as_gguf_writes_them(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Block by block through the writer's lazy-tensor path, the bytes are those of gguf's
    own eager path: same offsets, same padding, same data."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    planned = []
    for name, shape, qtype in [("a.weight", (7,), kinds.F32), ("b.weight", (3, 5), kinds.F16),
                               ("c.weight", (5, 64), kinds.Q8_0), ("d.weight", (9, 3), kinds.F32),
                               ("e.weight", (4, 96), kinds.BF16)]:
        values = rng.standard_normal(shape).astype(np.float32)
        planned.append(PlannedTensor(name, shape, qtype, lambda a, b, v=values: v[a:b]))
    monkeypatch.setattr(writer, "BLOCK_ELEMENTS", 64)  # several blocks in most tensors
    monkeypatch.setattr("llmkit.gguf_file.check_file",
                        lambda path: SimpleNamespace(tensor_count=len(planned)))
    seen: list[tuple[int, int, str]] = []
    staged = stage_gguf(tmp_path / "out.gguf", "llama", lambda w: w.add_uint32("x.n", 1),
                        planned, lambda i, n, name: seen.append((i, n, name)))
    assert seen == [(i, 5, t.name) for i, t in enumerate(planned)]

    eager = gguf.GGUFWriter(tmp_path / "eager.gguf", "llama")
    eager.add_uint32("x.n", 1)
    for t in planned:
        data = np.frombuffer(_encode(t.rows(0, t.shape[0]), t.qtype), dtype=np.uint8)
        eager.add_tensor(t.name, data.reshape(t.shape[0], -1) if len(t.shape) > 1 else data,
                         raw_dtype=t.qtype)
    eager.write_header_to_file()
    eager.write_kv_data_to_file()
    eager.write_tensors_to_file()
    eager.close()
    assert staged.read_bytes() == (tmp_path / "eager.gguf").read_bytes()


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
