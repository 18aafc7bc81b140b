"""The batch contract: JSONL records, torn lines, skipping, sidecars, and input expansion."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from llmkit.batch import (
    BatchOutput,
    RecordLog,
    SidecarPlan,
    run_batch,
    should_skip,
    sidecar_path,
)
from llmkit.errors import InputError, LlmkitError
from llmkit.io import collect_paths, item_key, split_path_list

IMAGES = frozenset({".jpg", ".png"})


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_record_log_appends_whole_lines_and_remembers_successes(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "records.jsonl"
    with RecordLog(out) as log:
        log.append({"path": "a.jpg", "caption": "x", "error": None})
        log.append({"path": "b.jpg", "caption": None, "error": "is empty"})
        assert log.done("a.jpg")
        assert not log.done("b.jpg")  # failures are retried on the next run
    assert [r["path"] for r in _lines(out)] == ["a.jpg", "b.jpg"]
    with RecordLog(out) as again:
        assert again.done("a.jpg")
        assert again.done(os.path.abspath("a.jpg"))
        assert not again.done("b.jpg")


def test_record_log_cuts_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    out.write_text('{"path": "a.jpg", "error": null}\n{"path": "b.jp')
    with RecordLog(out) as log:
        assert log.done("a.jpg")
        assert not log.done("b.jpg")
        log.append({"path": "b.jpg", "error": None})
    assert [r["path"] for r in _lines(out)] == ["a.jpg", "b.jpg"]


def test_record_log_refuses_a_file_that_is_not_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "notes.jsonl"
    out.write_text("hello\n")
    with pytest.raises(InputError, match="line 1 is not JSON"):
        RecordLog(out)


def test_record_log_in_an_unwritable_place(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(InputError, match="cannot open"):
        RecordLog(blocker / "records.jsonl")


def test_record_log_full_disk_leaves_no_partial_line(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "records.jsonl"
    log = RecordLog(out)
    log.append({"path": "a.jpg", "error": None})
    real_write = os.write

    def half_write(fd: int, data: bytes) -> int:
        real_write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_write)
    with pytest.raises(LlmkitError, match="No space left"):
        log.append({"path": "b.jpg", "error": None})
    monkeypatch.undo()
    log.close()
    assert out.read_text() == '{"path": "a.jpg", "error": null}\n'


def test_sidecar_path() -> None:
    assert sidecar_path(Path("d/photo.jpg"), ".txt") == Path("d/photo.txt")
    assert sidecar_path(Path("d/photo.jpeg"), "caption") == Path("d/photo.caption")
    assert sidecar_path(Path("a.b.png"), ".alt.txt") == Path("a.b.alt.txt")


def test_run_batch_writes_sidecars_records_and_counts(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "c.jpg").write_bytes(b"x")
    (tmp_path / "c.txt").write_text("earlier caption\n")
    paths = [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg")]

    def work(path: str) -> dict[str, Any]:
        if path.endswith("b.jpg"):
            return {"path": path, "caption": None, "error": "broken"}
        return {"path": path, "caption": f"caption of {Path(path).name}", "error": None}

    seen: list[str] = []
    with RecordLog(tmp_path / "out.jsonl") as log:
        log.append({"path": paths[2], "caption": "earlier caption", "error": None})
        output = BatchOutput(log=log, sidecars=SidecarPlan.build(paths, ".txt", siblings=IMAGES),
                             skip_existing=True)
        summary = run_batch(paths, work, output, text_field="caption",
                            on_record=lambda r: seen.append(r["path"]))
    assert (summary.done, summary.skipped, summary.failed) == (1, 1, 1)
    assert summary.line("image") == "3 images: 1 done, 1 skipped, 1 failed"
    assert (tmp_path / "a.txt").read_text() == "caption of a.jpg\n"
    assert not (tmp_path / "b.txt").exists()
    assert (tmp_path / "c.txt").read_text() == "earlier caption\n"
    assert seen == paths[:2]
    assert [r["path"] for r in _lines(tmp_path / "out.jsonl")] == [paths[2], *paths[:2]]


def test_should_skip_needs_the_flag(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    path = str(tmp_path / "a.jpg")
    plan = SidecarPlan.build([path], ".txt", siblings=IMAGES)
    assert not should_skip(path, BatchOutput(sidecars=plan))
    assert should_skip(path, BatchOutput(sidecars=plan, skip_existing=True))


def test_item_key_normalises() -> None:
    assert item_key("./x/../a.jpg") == item_key("a.jpg") == os.path.abspath("a.jpg")


def _tree(root: Path) -> None:
    for rel in ("a.jpg", "b.PNG", "notes.txt", ".hidden.jpg", "sub/c.jpg", "sub/deeper/d.png",
                ".git/e.jpg"):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_collect_paths_directories_globs_and_files(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert collect_paths(["."], suffixes=IMAGES) == ["a.jpg", "b.PNG"]
    assert collect_paths(["."], suffixes=IMAGES, recursive=True) == [
        "a.jpg", "b.PNG", "sub/c.jpg", "sub/deeper/d.png"]
    # A named file is taken whatever its suffix; a quoted glob is expanded; duplicates go.
    assert collect_paths(["notes.txt", "*.jpg", "a.jpg", "sub/**/*.png"], suffixes=IMAGES) == [
        "notes.txt", "a.jpg", "sub/deeper/d.png"]
    # A missing file stays in the list so the batch reports it.
    assert collect_paths(["missing.jpg"], suffixes=IMAGES) == ["missing.jpg"]
    assert collect_paths(["nothing-*.jpg"], suffixes=IMAGES) == ["nothing-*.jpg"]


def test_collect_paths_from_stdin(tmp_path: Path) -> None:
    listing = io.BytesIO(b"a.jpg\nb.jpg\n\nc d.jpg\n")
    assert collect_paths(["-"], suffixes=IMAGES, stdin=listing) == ["a.jpg", "b.jpg", "c d.jpg"]
    nul = io.BytesIO(b"a.jpg\0new\nline.jpg\0")
    assert collect_paths(["-"], suffixes=IMAGES, stdin=nul) == ["a.jpg", "new\nline.jpg"]
    assert split_path_list(b"x\r\ny\r\n") == ["x", "y"]
    # Names are bytes: one that is not UTF-8 is listed like one found in a directory (before,
    # the whole list was refused as "not UTF-8").
    odd = io.BytesIO(b"a.jpg\n\xff.jpg\n")
    assert collect_paths(["-"], suffixes=IMAGES, stdin=odd) == ["a.jpg", os.fsdecode(b"\xff.jpg")]


def test_collect_paths_empty(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no input files"):
        collect_paths([str(tmp_path)], suffixes=IMAGES)
    with pytest.raises(InputError, match="no input files"):
        collect_paths(["-"], suffixes=IMAGES, stdin=io.BytesIO(b"\n"))
