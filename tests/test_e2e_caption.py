"""`llmkit caption`, `run --image` and `chat --image` end to end: a converted SmolVLM in mtmd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.conftest import run_llmkit
from tests.vision_checkpoints import build_tiny_smolvlm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SmolVLM converted by `llmkit convert`; its projector lies beside it."""
    ckpt = tmp_path_factory.mktemp("hf") / "SmolVLM-tiny"
    build_tiny_smolvlm(ckpt)
    out = tmp_path_factory.mktemp("vlm")
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out / "vlm.gguf")])
    assert proc.returncode == 0, proc.stderr
    assert (out / "mmproj-vlm.gguf").is_file()
    return out / "vlm.gguf"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return images.write_all(tmp_path_factory.mktemp("pictures"), large=True)


def _records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


GOOD = ["photo", "alpha", "animated", "gray16", "exif_rotated", "cmyk", "large"]
BAD = {"text": "not an image", "truncated": "truncated", "empty": "empty"}


def test_one_image_prints_its_caption(vlm: Path, pictures: dict[str, Path]) -> None:
    proc = run_llmkit(["caption", str(pictures["photo"]), "-m", str(vlm), "--max-tokens", "8",
                       "--temperature", "0"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert proc.stdout.count("\n") == 1  # one caption, one line
    assert "projector mmproj-vlm.gguf found beside vlm.gguf" in proc.stderr
    # Greedy with a seed is repeatable: the same caption again.
    again = run_llmkit(["caption", str(pictures["photo"]), "-m", str(vlm), "--max-tokens", "8",
                        "--temperature", "0", "-q"])
    assert again.stdout == proc.stdout
    assert again.stderr == ""


def test_batch_of_every_kind(vlm: Path, pictures: dict[str, Path], tmp_path: Path) -> None:
    order = GOOD + list(BAD)
    out = tmp_path / "captions.jsonl"
    proc = run_llmkit(["caption", *[str(pictures[k]) for k in order], "-m", str(vlm),
                       "--format", "jsonl", "--out", str(out), "--max-tokens", "6"])
    assert proc.returncode == 1, proc.stderr  # some images failed
    records = _records(proc.stdout)
    assert _records(out.read_text()) == records
    # Images are captioned --parallel at a time: each line names its image, in finish order.
    inputs = [str(pictures[k]) for k in order]
    records.sort(key=lambda r: inputs.index(str(r["path"])))
    assert [r["path"] for r in records] == inputs
    by_kind = dict(zip(order, records, strict=True))
    for kind in GOOD:
        record = by_kind[kind]
        assert record["error"] is None, record
        assert record["caption"], record
        assert record["model"] == "vlm.gguf"
        assert record["usage"]["image_tokens"] > 0
        assert record["usage"]["completion_tokens"] > 0
    for kind, reason in BAD.items():
        assert by_kind[kind]["caption"] is None
        assert reason in by_kind[kind]["error"], by_kind[kind]
    large = by_kind["large"]["image"]
    assert (large["original_width"], large["original_height"]) == (6000, 4000)
    assert max(large["width"], large["height"]) <= 2048
    rotated = by_kind["exif_rotated"]["image"]
    # Orientation 6 is stored on its side; the model sees it upright.
    assert (rotated["width"], rotated["height"]) == (rotated["original_height"],
                                                     rotated["original_width"])
    assert proc.stderr.strip().endswith("10 images: 7 done, 0 skipped, 3 failed")


def test_text_and_json_formats(vlm: Path, pictures: dict[str, Path]) -> None:
    args = [str(pictures["photo"]), str(pictures["alpha"]), str(pictures["empty"]),
            "-m", str(vlm), "--max-tokens", "4"]
    text = run_llmkit(["caption", *args])
    assert text.returncode == 1
    assert f"==> {pictures['photo']} <==\n" in text.stdout
    assert f"==> {pictures['alpha']} <==\n" in text.stdout
    assert str(pictures["empty"]) not in text.stdout  # failures go to stderr
    assert f"llmkit: error: {pictures['empty']} is empty" in text.stderr
    as_json = run_llmkit(["caption", *args, "--format", "json"])
    data = json.loads(as_json.stdout)
    assert [r["path"] for r in data] == [str(pictures[k]) for k in ("photo", "alpha", "empty")]
    assert data[2]["error"] and data[0]["error"] is None


def test_sidecars_and_skip_existing(vlm: Path, tmp_path: Path) -> None:
    album = tmp_path / "album"
    (album / "2024").mkdir(parents=True)
    images.write_photo_jpeg(album, "a.jpg")
    images.write_alpha_png(album / "2024", "b.png")
    (album / "notes.md").write_text("not a picture, and not picked up from a directory\n")
    args = ["caption", str(album), "-r", "-m", str(vlm), "--sidecar", "--max-tokens", "4"]
    first = run_llmkit(args)
    assert first.returncode == 0, first.stderr
    assert (album / "a.txt").read_text().strip()
    assert (album / "2024" / "b.txt").read_text().strip()
    assert not (album / "notes.txt").exists()
    before = {p: p.stat().st_mtime_ns for p in album.rglob("*.txt")}
    rerun = run_llmkit([*args, "--skip-existing", "--format", "jsonl"])
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout == ""
    assert "2 images: 0 done, 2 skipped, 0 failed" in rerun.stderr
    assert {p: p.stat().st_mtime_ns for p in album.rglob("*.txt")} == before
    # A new photo: only it is captioned.
    images.write_photo_jpeg(album, "c.jpg")
    third = run_llmkit([*args, "--skip-existing", "--format", "jsonl"])
    assert [r["path"] for r in _records(third.stdout)] == [str(album / "c.jpg")]
    assert "3 images: 1 done, 2 skipped, 0 failed" in third.stderr


def test_rerun_with_out_file_does_no_work(vlm: Path, pictures: dict[str, Path],
                                          tmp_path: Path) -> None:
    out = tmp_path / "done.jsonl"
    paths = [str(pictures["photo"]), str(pictures["animated"])]
    first = run_llmkit(["caption", *paths, "-m", str(vlm), "--out", str(out), "-n", "4"])
    assert first.returncode == 0, first.stderr
    # No model is even loaded on the rerun: a missing model file would otherwise fail.
    rerun = run_llmkit(["caption", *paths, "-m", str(tmp_path / "gone.gguf"), "--out", str(out),
                        "--skip-existing"])
    assert rerun.returncode == 0, rerun.stderr
    assert "2 images: 0 done, 2 skipped, 0 failed" in rerun.stderr
    assert len(_records(out.read_text())) == 2


def test_paths_from_stdin(vlm: Path, pictures: dict[str, Path]) -> None:
    listing = "\n".join(str(pictures[k]) for k in ("photo", "gray16")) + "\n"
    proc = run_llmkit(["caption", "-", "-m", str(vlm), "-f", "jsonl", "-n", "4"], input=listing)
    assert proc.returncode == 0, proc.stderr
    assert [r["path"] for r in _records(proc.stdout)] == [str(pictures["photo"]),
                                                          str(pictures["gray16"])]


def _camera_roll(folder: Path, count: int, pictures: dict[str, Path]) -> None:
    """Copies of the 24-megapixel JPEG: decoding each takes long enough to stop a batch midway."""
    folder.mkdir()
    data = pictures["large"].read_bytes()
    for i in range(count):
        (folder / f"p{i}.jpg").write_bytes(data)


def test_killed_batch_resumes_without_duplicates(vlm: Path, pictures: dict[str, Path],
                                                 tmp_path: Path) -> None:
    folder = tmp_path / "many"
    # Enough images, and long enough captions, that the kill lands mid-batch even with
    # --parallel's default decoding several captions at once.
    _camera_roll(folder, 40, pictures)
    out = tmp_path / "records.jsonl"
    args = ["caption", str(folder), "-m", str(vlm), "--out", str(out), "--skip-existing",
            "--max-tokens", "32", "-q"]
    proc = subprocess.Popen([sys.executable, "-m", "llmkit", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(_records(out.read_text()))
    assert 2 <= done_before < 40, "the batch was not caught midway"
    rerun = run_llmkit(args)
    assert rerun.returncode == 0, rerun.stderr
    records = _records(out.read_text())
    assert sorted(r["path"] for r in records) == sorted(str(p) for p in folder.glob("*.jpg"))
    assert all(r["caption"] for r in records)


def test_ctrl_c_keeps_finished_records(vlm: Path, pictures: dict[str, Path],
                                       tmp_path: Path) -> None:
    folder = tmp_path / "many"
    _camera_roll(folder, 8, pictures)
    out = tmp_path / "records.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "caption", str(folder), "-m", str(vlm), "--out",
         str(out), "--max-tokens", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out.exists() and out.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.decode().strip().endswith("llmkit: error: interrupted")
    assert 1 <= len(_records(out.read_text())) < 8


def test_run_with_an_image(vlm: Path, pictures: dict[str, Path]) -> None:
    proc = run_llmkit(["run", "--image", str(pictures["photo"]), "-m", str(vlm),
                       "How many people are in this picture?", "--max-tokens", "5",
                       "--temperature", "0", "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    # A random-weight model may pick its end token early; then it must say it stopped.
    done = data["usage"]["completion_tokens"]
    assert 1 <= done <= 5
    assert data["finish_reason"] == ("length" if done == 5 else "stop"), data
    assert data["usage"]["prompt_tokens"] > 20  # the image's tokens are in the prompt
    bad = run_llmkit(["run", "--image", str(pictures["truncated"]), "-m", str(vlm), "hi"])
    assert bad.returncode == 1
    assert "truncated" in bad.stderr and "Traceback" not in bad.stderr


def test_piped_chat_with_an_image(vlm: Path, pictures: dict[str, Path]) -> None:
    proc = run_llmkit(["chat", "-m", str(vlm), "--image", str(pictures["alpha"]), "-n", "4"],
                      input="What is this?\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_text_model_cannot_see(smollm2_path: Path, pictures: dict[str, Path]) -> None:
    proc = run_llmkit(["caption", str(pictures["photo"]), "-m", str(smollm2_path)])
    assert proc.returncode == 1
    assert proc.stderr == (
        f"llmkit: error: model '{smollm2_path.name}' is a text-only model and cannot see images "
        "(use a vision model, e.g. `-m gemma3:4b` (`llmkit pull gemma3:4b`))\n")
    catalog = run_llmkit(["caption", str(pictures["photo"]), "-m", "smollm2:135m"])
    assert "'smollm2:135m' is a text-only model and cannot see images" in catalog.stderr
    ran = run_llmkit(["run", "--image", str(pictures["photo"]), "-m", "smollm2:135m", "hi"])
    assert ran.returncode == 1 and "cannot see images" in ran.stderr


def test_vision_model_without_its_projector(vlm: Path, pictures: dict[str, Path],
                                            tmp_path: Path) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "vlm.gguf").symlink_to(vlm)
    proc = run_llmkit(["caption", str(pictures["photo"]), "-m", str(alone / "vlm.gguf")])
    assert proc.returncode == 1
    assert "cannot see images without its projector" in proc.stderr
    assert "--mmproj" in proc.stderr
    # Named explicitly, a projector anywhere works.
    ok = run_llmkit(["caption", str(pictures["photo"]), "-m", str(alone / "vlm.gguf"),
                     "--mmproj", str(vlm.parent / "mmproj-vlm.gguf"), "-n", "3"])
    assert ok.returncode == 0, ok.stderr
    # A projector given as the model is named for what it is.
    swapped = run_llmkit(["caption", str(pictures["photo"]), "-m",
                          str(vlm.parent / "mmproj-vlm.gguf")])
    assert "is a vision projector (mmproj), not a model" in swapped.stderr
    # A registered vision model whose projector vanished says which file is missing.
    imported = run_llmkit(["import", str(vlm), "--name", "tiny-vlm", "--mmproj",
                           str(tmp_path / "copy-mmproj.gguf")])
    assert imported.returncode == 1  # the projector must exist to be imported
    copy = tmp_path / "copy-mmproj.gguf"
    copy.write_bytes((vlm.parent / "mmproj-vlm.gguf").read_bytes())
    assert run_llmkit(["import", str(vlm), "--name", "tiny-vlm", "--mmproj",
                       str(copy)]).returncode == 0
    copy.unlink()
    gone = run_llmkit(["caption", str(pictures["photo"]), "-m", "tiny-vlm"])
    assert gone.returncode == 1
    assert gone.stderr == (
        f"llmkit: error: model 'tiny-vlm' cannot see images without its projector {copy} "
        "(import it again with --mmproj FILE --force, or pass --mmproj FILE)\n")


def test_llama_vision_not_built_says_how_to_build_it(pictures: dict[str, Path]) -> None:
    proc = run_llmkit(["caption", str(pictures["photo"]), "-m", "llama3.2-vision:11b"])
    assert proc.returncode == 1
    assert "run `llmkit pull llama3.2-vision:11b --from-source`" in proc.stderr


def test_default_vision_model_not_pulled(pictures: dict[str, Path]) -> None:
    proc = run_llmkit(["caption", str(pictures["photo"])])
    assert proc.returncode == 1
    assert proc.stderr == ("llmkit: error: model 'gemma3:4b' is in the catalog but not on this "
                           "machine (run `llmkit pull gemma3:4b`)\n")


def _comparable(records: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in r.items() if k != "timings"} for r in records]


def test_captions_in_parallel_are_the_one_at_a_time_records(
        vlm: Path, pictures: dict[str, Path], tmp_path: Path) -> None:
    order = GOOD + list(BAD)
    inputs = [str(pictures[k]) for k in order]
    runs = {}
    for n in ("1", "4"):
        out = tmp_path / f"captions{n}.jsonl"
        proc = run_llmkit(["caption", *inputs, "-m", str(vlm), "--format", "json", "--out",
                           str(out), "--max-tokens", "12", "--temperature", "0",
                           "--parallel", n, "-t", "2"])
        assert proc.returncode == 1, proc.stderr  # the bad files
        runs[n] = _comparable(json.loads(proc.stdout))
        assert [r["path"] for r in runs[n]] == inputs  # --format json: input order
        saved = _comparable(_records(out.read_text()))
        assert sorted(saved, key=lambda r: inputs.index(str(r["path"]))) == runs[n]
    assert runs["1"] == runs["4"]
    assert sum(1 for r in runs["4"] if r["caption"]) == len(GOOD)


def test_guarded_captions_in_parallel_are_the_one_at_a_time_records(
        vlm: Path, pictures: dict[str, Path], smollm2_path: Path) -> None:
    # --guard in a batch: the guard (loaded with --parallel too) checks several captions at
    # once, beside the captions still being written; the verdicts are the one-at-a-time ones.
    inputs = [str(pictures[k]) for k in GOOD]
    runs = {}
    for n in ("1", "4"):
        proc = run_llmkit(["caption", *inputs, "-m", str(vlm), "--format", "json",
                           "--max-tokens", "12", "--temperature", "0", "--parallel", n,
                           "-t", "2", "--guard-model", str(smollm2_path),
                           "--guard-threshold", "0.5"])
        assert proc.returncode in (0, 3), proc.stderr
        records = _comparable(json.loads(proc.stdout))
        for record in records:
            verdict = record["guard"]["output"]  # type: ignore[index]
            verdict.pop("timings")
            verdict["usage"].pop("prompt_tokens_evaluated")
        runs[n] = (proc.returncode, records)
    assert runs["1"] == runs["4"]
    assert [r["path"] for r in runs["4"][1]] == inputs
