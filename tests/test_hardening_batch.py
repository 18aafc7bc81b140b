"""Batch outputs under attack: sidecars that would hit inputs, shared logs, odd names, modes."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from llmkit import _fs, batch
from llmkit.batch import BatchOutput, RecordLog, run_batch, should_skip
from llmkit.errors import LlmkitError, UsageError
from tests.small_disk import fill, small_disk

FF = os.fsdecode(b"\xff.jpg")  # a file name that is not UTF-8, as Python gives it
IMAGES = frozenset({".jpg", ".png"})


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


# --- atomic writes: mode, stale temporary files ------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_write_gives_a_new_file_the_umask_mode(tmp_path: Path, umask: int,
                                                      mode: int) -> None:
    old = os.umask(umask)
    try:
        _fs.atomic_write_text(tmp_path / "a.txt", "x\n")
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x\n")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == mode
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == mode


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old\n")
    target.chmod(0o640)
    _fs.atomic_write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o777 == 0o640


_WRITER = """
import os, signal, sys, time
from pathlib import Path
from llmkit import _fs
if sys.argv[2] == "die":
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
else:
    os.fsync = lambda fd: time.sleep(120)
_fs.atomic_write_text(Path(sys.argv[1]), "from the child\\n")
"""


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_a_killed_writer_leaves_a_temp_that_the_next_write_removes(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), "die"])
    assert child.wait(timeout=60) == -signal.SIGKILL
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(".x.txt.llmkit-")
    assert f"-{child.pid}-" in left[0]  # owned by a pid that a later writer can ask about
    _fs.atomic_write_text(target, "again\n")
    assert target.read_text() == "again\n"
    assert _temps(tmp_path) == []


def test_a_live_writers_temp_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), "wait"])
    try:
        deadline = time.monotonic() + 60
        while not _temps(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.02)
        left = _temps(tmp_path)
        assert len(left) == 1 and f"-{child.pid}-" in left[0]
        _fs.atomic_write_text(target, "mine\n")
        assert _temps(tmp_path) == left
    finally:
        child.kill()
        child.wait()


def test_temp_path_for_other_writers_sweeps_dead_ones(tmp_path: Path) -> None:
    # What convert and quantize can use for files that are not written in one piece.
    target = tmp_path / "model.gguf"
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), "die"])
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert len(_temps(tmp_path)) == 1
    fresh = _fs.temp_path(target)
    assert _temps(tmp_path) == []
    assert fresh.parent == tmp_path and f"-{os.getpid()}-" in fresh.name
    assert fresh.name.startswith(".model.gguf.llmkit-") and not fresh.exists()
    long = _fs.temp_path(tmp_path / ("x" * 250))
    assert len(os.fsencode(long.name)) <= 255


def test_json_dumps_carries_names_that_are_not_utf8() -> None:
    text = _fs.json_dumps({"path": f"photos/{FF}", "caption": "café ☕"})
    assert text.encode("utf-8")  # valid UTF-8
    assert "\\udcff" in text and "café ☕" in text
    assert os.fsencode(json.loads(text)["path"]) == b"photos/\xff.jpg"


# --- the record log: names, failed writes, one writer ------------------------------------------

def test_record_log_records_and_recognises_a_non_utf8_name(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    name = str(tmp_path / FF)
    with RecordLog(out) as log:
        log.append({"path": name, "caption": "x", "error": None})
    data = out.read_bytes()
    data.decode("utf-8")
    assert b"\\udcff" in data
    assert os.fsencode(_lines(out)[0]["path"]) == os.fsencode(tmp_path) + b"/\xff.jpg"
    with RecordLog(out) as again:
        assert again.done(name)


def test_a_failed_write_never_cuts_what_another_writer_appended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "records.jsonl"
    log = RecordLog(out)
    log.append({"path": "a.jpg", "error": None})
    real_write = os.write

    def other_writer_then_full(fd: int, data: bytes) -> int:
        # Something that does not take llmkit's lock appends and fsyncs a record first.
        with open(out, "ab") as other:
            other.write(b'{"path": "other.jpg", "error": null}\n')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", other_writer_then_full)
    with pytest.raises(LlmkitError, match="No space left"):
        log.append({"path": "b.jpg", "error": None})
    monkeypatch.setattr(os, "write", real_write)
    log.close()
    assert [r["path"] for r in _lines(out)] == ["a.jpg", "other.jpg"]
    assert b"\0" not in out.read_bytes()


def test_a_short_write_is_finished_or_cut_back_to_whole_lines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "records.jsonl"
    log = RecordLog(out)
    log.append({"path": "a.jpg", "error": None})
    real_write = os.write
    calls: list[int] = []

    def short_then_full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data[:5])  # the disk had room for five bytes
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(LlmkitError, match="No space left"):
        log.append({"path": "b.jpg", "error": None})
    monkeypatch.setattr(os, "write", real_write)
    assert len(calls) == 2  # the rest was tried before giving up
    log.append({"path": "c.jpg", "error": None})
    log.close()
    assert [r["path"] for r in _lines(out)] == ["a.jpg", "c.jpg"]


def test_one_writer_owns_an_out_file(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    first = RecordLog(out)
    with pytest.raises(LlmkitError, match="another llmkit") as caught:
        RecordLog(out)
    assert "--out" in str(caught.value)
    first.close()
    with RecordLog(out) as second:  # free again once the first is closed
        second.append({"path": "a.jpg", "error": None})


def test_only_the_owner_cuts_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    owner = RecordLog(out)
    owner.append({"path": "a.jpg", "error": None})
    with open(out, "ab") as fh:
        fh.write(b'{"path": "b.jp')  # the owner's line in flight, as another process sees it
    before = out.read_bytes()
    with pytest.raises(LlmkitError):
        RecordLog(out)
    assert out.read_bytes() == before
    owner.close()
    with RecordLog(out) as next_owner:
        assert next_owner.done("a.jpg") and not next_owner.done("b.jpg")
    assert out.read_bytes() == b'{"path": "a.jpg", "error": null}\n'


_HOLDER = """
import sys, time
from pathlib import Path
from llmkit.batch import RecordLog
log = RecordLog(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_another_process_holding_the_log_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "records.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        with pytest.raises(LlmkitError, match="another llmkit"):
            RecordLog(out)
    finally:
        holder.kill()
        holder.wait()
    RecordLog(out).close()  # a dead holder's lock is gone


# --- sidecars: never over an input, never two captions in one file ------------------------------

def _plan(paths: list[Path], ext: str = ".txt") -> batch.SidecarPlan:
    return batch.SidecarPlan.build([str(p) for p in paths], ext, siblings=IMAGES)


def _png(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    return path


def test_a_sidecar_that_would_be_the_input_itself_is_refused(tmp_path: Path) -> None:
    pic = _png(tmp_path / "pic.txt")
    plan = _plan([pic])
    assert "is the image itself" in plan.refusal(str(pic))
    jpg = _png(tmp_path / "a.jpg")
    assert "is the image itself" in _plan([jpg], ".jpg").refusal(str(jpg))


def test_a_sidecar_that_is_another_input_is_refused(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.jpg")
    other = _png(tmp_path / "a.txt")  # a PNG named .txt, also captioned in this batch
    plan = _plan([a, other])
    assert "a.txt" in plan.refusal(str(a)) and "another input" in plan.refusal(str(a))


def test_a_sidecar_that_links_to_an_input_is_refused(tmp_path: Path) -> None:
    # A hard link is also how a case-insensitive file system answers for `A.TXT` vs `a.txt`:
    # the same file under a second name, recognised by (st_dev, st_ino).
    a = _png(tmp_path / "a.jpg")
    b = _png(tmp_path / "b.jpg")
    (tmp_path / "a.txt").symlink_to(b)
    os.link(a, tmp_path / "b.txt")
    plan = _plan([a, b])
    assert "input" in plan.refusal(str(a))
    assert "input" in plan.refusal(str(b))


def test_a_file_that_is_not_a_caption_is_never_replaced(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.jpg")
    _png(tmp_path / "a.txt")  # not an input this time, but not a caption either
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "b.txt").mkdir()
    plan = _plan([a, tmp_path / "b.jpg"])
    assert "not a text file" in plan.refusal(str(a))
    assert "not a regular file" in plan.refusal(str(tmp_path / "b.jpg"))


def test_images_sharing_a_stem_get_their_full_names(tmp_path: Path) -> None:
    jpg = _png(tmp_path / "photo.jpg")
    png = _png(tmp_path / "photo.png")
    lone = _png(tmp_path / "lone.jpg")
    (tmp_path / "photo.md").write_text("not an image: does not count\n")
    plan = _plan([jpg, png, lone])
    assert plan.target(str(jpg)) == tmp_path / "photo.jpg.txt"
    assert plan.target(str(png)) == tmp_path / "photo.png.txt"
    assert plan.target(str(lone)) == tmp_path / "lone.txt"
    # The same names when only one of them is captioned: they come from the directory.
    assert _plan([png]).target(str(png)) == tmp_path / "photo.png.txt"


def test_stems_that_differ_only_in_case_share_a_sidecar_too(tmp_path: Path) -> None:
    upper = _png(tmp_path / "Photo.jpg")
    lower = _png(tmp_path / "photo.png")
    plan = _plan([upper, lower])
    assert plan.target(str(upper)) == tmp_path / "Photo.jpg.txt"
    assert plan.target(str(lower)) == tmp_path / "photo.png.txt"


def test_a_sidecar_extension_must_be_an_extension(tmp_path: Path) -> None:
    for ext in ("", ".", "../x", "a/b", "x\0y"):
        with pytest.raises(UsageError, match="--sidecar-ext"):
            _plan([tmp_path / "a.jpg"], ext)
    assert _plan([tmp_path / "a.jpg"], "alt.txt").target(str(tmp_path / "a.jpg")) == \
        tmp_path / "a.alt.txt"


def _caption(path: str) -> dict[str, Any]:
    return {"path": path, "caption": f"caption of {os.path.basename(path)}", "error": None}


def test_run_batch_refuses_an_item_and_goes_on(tmp_path: Path) -> None:
    pic = _png(tmp_path / "pic.txt")
    ok = _png(tmp_path / "ok.jpg")
    before = pic.read_bytes()
    paths = [str(pic), str(ok)]
    worked: list[str] = []

    def work(path: str) -> dict[str, Any]:
        worked.append(path)
        return _caption(path)

    with RecordLog(tmp_path / "out.jsonl") as log:
        output = BatchOutput(log=log, sidecars=_plan([pic, ok]), skip_existing=True)
        assert not should_skip(str(pic), output)  # the "sidecar" that exists is the image
        summary = run_batch(paths, work, output, text_field="caption")
    assert pic.read_bytes() == before
    assert worked == [str(ok)]  # no model time is spent on an item that cannot be saved
    assert (summary.done, summary.failed) == (1, 1)
    records = _lines(tmp_path / "out.jsonl")
    assert records[0]["path"] == str(pic) and records[0]["caption"] is None
    assert "pic.txt" in records[0]["error"]
    assert (tmp_path / "ok.txt").read_text() == "caption of ok.jpg\n"


def test_a_sidecar_that_cannot_be_written_is_one_failed_item(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        a = _png(disk / "a.jpg")
        b = _png(tmp_path / "b.jpg")
        plan = _plan([a, b])
        fill(disk)
        records: list[dict[str, Any]] = []
        summary = run_batch([str(a), str(b)], _caption, BatchOutput(sidecars=plan),
                            text_field="caption", on_record=records.append)
        assert not (disk / "a.txt").exists()
        assert sorted(p.name for p in disk.iterdir()) == ["a.jpg", "filler"]  # no temp left
    assert (summary.done, summary.failed) == (1, 1)
    assert "No space left" in records[0]["error"] and records[0]["caption"]  # text kept
    assert (tmp_path / "b.txt").read_text() == "caption of b.jpg\n"


def test_record_log_on_a_full_disk(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        out = disk / "records.jsonl"
        log = RecordLog(out)
        log.append({"path": "a.jpg", "error": None})
        fill(disk)
        with pytest.raises(LlmkitError, match="No space left"):
            log.append({"path": "b.jpg", "caption": "x" * 20000, "error": None})
        log.close()
        assert out.read_bytes() == b'{"path": "a.jpg", "error": null}\n'
        (disk / "filler").unlink()
        with RecordLog(out) as again:
            assert again.done("a.jpg") and not again.done("b.jpg")


def test_skip_existing_needs_every_output_that_was_asked_for(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.jpg")
    with RecordLog(tmp_path / "out.jsonl") as log:
        log.append(_caption(str(a)))  # recorded by a run without --sidecar
        output = BatchOutput(log=log, sidecars=_plan([a]), skip_existing=True)
        assert not should_skip(str(a), output)  # its sidecar was never written
        (tmp_path / "a.txt").write_text("caption\n")
        assert should_skip(str(a), output)
    (tmp_path / "b.jpg").write_bytes(b"x")
    (tmp_path / "b.txt").write_text("caption\n")
    with RecordLog(tmp_path / "out.jsonl") as log:
        output = BatchOutput(log=log, sidecars=_plan([tmp_path / "b.jpg"]), skip_existing=True)
        assert not should_skip(str(tmp_path / "b.jpg"), output)  # no record in --out yet


def test_a_plan_with_an_image_extension_stays_the_same_on_rerun(tmp_path: Path) -> None:
    a = _png(tmp_path / "a.jpg")
    first = _plan([a], ".png")
    assert first.target(str(a)) == tmp_path / "a.png" and first.refusal(str(a)) is None
    first.write(str(a), "a caption")
    # a.png is now a sidecar, not a second image claiming the stem: the same name again.
    again = _plan([a], ".png")
    assert again.target(str(a)) == tmp_path / "a.png" and again.refusal(str(a)) is None


# --- stdout and stderr -------------------------------------------------------------------------

def test_streams_write_a_names_own_bytes_and_escape_the_rest() -> None:
    import io

    from llmkit.cli import _output as out

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", errors=out.NAME_ERRORS)
    stream.write(f"==> {FF} <==\n\ud800 café\n")
    stream.flush()
    assert raw.getvalue() == b"==> \xff.jpg <==\n\\ud800 caf\xc3\xa9\n"


def test_a_closed_stderr_does_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from llmkit.cli import _output as out

    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stderr", closed)
    out.error("nowhere to say it")  # the exit code is all that is left
