"""Llama 3.2 Vision end to end through the CLI: a tiny converted mllama GGUF in llmkit's engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pexpect  # in the dev extra
import pytest

from tests import images
from tests.conftest import run_llmkit
from tests.mllama_model import build_model, image_inputs, require_oracle, save_checkpoint

pytestmark = pytest.mark.slow

NAME = "v-f16.gguf"
# A question the tiny random model answers with noise; -n keeps every reply short.
QUESTION = "What is in this picture?"
# Greedy on one thread: repeated runs must give the same tokens, and 4 workers share 2 cores.
GREEDY = ["--temperature", "0", "--threads", "1"]
PROMPT = ">>> "

# Counts the real MllamaModel.encode_image calls of a real `llmkit` process: the CLI has no
# observable of its own for "the follow-up did not encode the picture again" (the chat records
# carry no image counts, and prompt timings on a shared 2-core machine prove nothing).
COUNTING_CLI = """\
import runpy
import sys

from llmkit.engines.mllama.model import MllamaModel

_encode = MllamaModel.encode_image
_log = sys.argv.pop(1)


def counted(self, tiled):
    with open(_log, "a", encoding="utf-8") as f:
        f.write(f"{tiled.num_tiles}\\n")
    return _encode(self, tiled)


MllamaModel.encode_image = counted
sys.argv[0] = "llmkit"
runpy.run_module("llmkit", run_name="__main__")
"""


@pytest.fixture(scope="module")
def vgguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama 3.2 Vision checkpoint (published layout) through `llmkit convert`."""
    require_oracle()
    ckpt = save_checkpoint(build_model(seed=0), tmp_path_factory.mktemp("hf") / "tiny-vision")
    out = tmp_path_factory.mktemp("mllama") / NAME
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out), "--outtype", "f16"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"llmkit: wrote {out} (148 tensors, "), proc.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [NAME]  # no projector beside it
    return out


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return images.write_all(tmp_path_factory.mktemp("pictures"))


@pytest.fixture
def counter(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(the counting CLI script, its log of encoded pictures: one line of tiles per encoding)."""
    script = tmp_path / "counting_llmkit.py"
    script.write_text(COUNTING_CLI)
    yield script, tmp_path / "encodings.log"


def run_counted(counter: tuple[Path, Path], args: list[str]) -> subprocess.CompletedProcess[str]:
    """`llmkit ARGS` through the counting script (stdin /dev/null), as run_llmkit runs it."""
    script, log = counter
    return subprocess.run([sys.executable, str(script), str(log), *args],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=dict(os.environ), timeout=300)


def _encodings(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.exists() else []


def _records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _untimed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "timings"} for r in records]


# The album's pictures by file name: 4:3 (2x2 tiles), RGBA 4:3, 2:1 (1x2), 1:3 (3x1), and one
# smaller than a tile (1 tile); then a broken JPEG, last by name.
ALBUM = {"a-photo.jpg": (640, 480), "b-alpha.png": (64, 48), "c-wide.png": (100, 50),
         "d-tall.png": (30, 90), "e-small.png": (20, 20)}
BROKEN = "z-broken.jpg"
TOKENS_PER_TILE = (28 // 14) ** 2 + 1  # the tiny model: 2x2 patches of 14 pixels + class token


def _album(root: Path) -> Path:
    album = root / "album"
    album.mkdir()
    images.write_photo_jpeg(album, "a-photo.jpg")
    images.write_alpha_png(album, "b-alpha.png")
    for name, size in ALBUM.items():
        if name.endswith(".png") and name != "b-alpha.png":
            images.photo(size).save(album / name)
    images.write_truncated_jpeg(album, BROKEN)
    return album


def _prompt_tokens(content: str | list[dict[str, str]]) -> list[int]:
    """The tokens transformers renders one user message into with the published template."""
    from transformers import PreTrainedTokenizerFast

    from tests.mllama_model import CHAT_TEMPLATE, tokenizer_dir

    tokenizer: Any = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir() / "tokenizer.json"), bos_token="<|begin_of_text|>")
    ids: list[int] = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], chat_template=CHAT_TEMPLATE,
        add_generation_prompt=True, tokenize=True, return_dict=False)
    return [int(t) for t in ids]


def _tiles(size: tuple[int, int]) -> int:
    """The tiles transformers' MllamaImageProcessor cuts a picture of this size into."""
    return image_inputs(images.photo(size)).num_tiles


# -- caption ------------------------------------------------------------------------------------


def test_caption_of_a_folder_with_a_broken_image(vgguf: Path, tmp_path: Path,
                                                 counter: tuple[Path, Path]) -> None:
    album = _album(tmp_path)
    out = tmp_path / "captions.jsonl"
    args = ["caption", str(album), "-m", str(vgguf), "-f", "jsonl", "--out", str(out),
            "-n", "6", *GREEDY]
    proc = run_counted(counter, args)
    assert proc.returncode == 1, proc.stderr  # one image failed
    records = _records(proc.stdout)
    assert [r["path"] for r in records] == [str(album / n) for n in [*ALBUM, BROKEN]]
    assert out.read_text() == proc.stdout
    tiles = [_tiles(size) for size in ALBUM.values()]
    assert tiles == [4, 4, 2, 3, 1]  # the oracle's choice, for the reader
    for record, (name, (width, height)), n_tiles in zip(records, ALBUM.items(), tiles,
                                                        strict=False):
        assert record["error"] is None, record
        assert record["caption"], record
        assert record["model"] == NAME
        assert record["style"] == "short"
        assert record["finish_reason"] == "length"
        assert record["usage"]["completion_tokens"] == 6
        # Cross-attention reads every real tile's patches and class token; the picture takes
        # no prompt positions beyond its one <|image|>.
        assert record["usage"]["image_tokens"] == n_tiles * TOKENS_PER_TILE, name
        assert record["usage"]["prompt_tokens"] > 5
        assert (record["image"]["width"], record["image"]["height"]) == (width, height)
    broken = records[-1]
    assert broken["caption"] is None
    assert broken["error"] == f"{album / BROKEN} is truncated or corrupt"
    # The failure is in its record; stderr has the summary only.
    assert proc.stderr == "llmkit: 6 images: 5 done, 0 skipped, 1 failed\n"
    # Each good picture was encoded once, with its own tiles; the broken one never reached it.
    assert _encodings(counter[1]) == tiles
    # Different pictures, different greedy captions: the picture reaches the text.
    assert len({r["caption"] for r in records[:-1]}) == len(ALBUM)
    # Greedy runs repeat, byte for byte (without --out: the records go to stdout only).
    again = run_llmkit([*args[:6], "-n", "6", *GREEDY, "-q"])
    assert again.returncode == 1
    assert _untimed(_records(again.stdout)) == _untimed(records)
    assert again.stderr == ""


def test_sidecars_then_skip_existing(vgguf: Path, tmp_path: Path) -> None:
    album = _album(tmp_path)
    (album / BROKEN).unlink()
    (album / "notes.md").write_text("not a picture\n")
    args = ["caption", str(album), "-m", str(vgguf), "--sidecar", "-n", "5", *GREEDY]
    first = run_llmkit(args)
    assert first.returncode == 0, first.stderr
    sidecars = sorted(p.name for p in album.glob("*.txt"))
    assert sidecars == sorted(Path(n).stem + ".txt" for n in ALBUM)
    for sidecar in album.glob("*.txt"):
        assert sidecar.read_text().strip(), sidecar
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in album.iterdir()}
    rerun = run_llmkit([*args, "--skip-existing", "-f", "jsonl"])
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout == ""
    assert rerun.stderr == "llmkit: 5 images: 0 done, 5 skipped, 0 failed\n"
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in album.iterdir()} == before


def test_caption_of_one_picture(vgguf: Path, pictures: dict[str, Path]) -> None:
    proc = run_llmkit(["caption", str(pictures["photo"]), "-m", str(vgguf), "-n", "8", *GREEDY])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no projector note: this model reads images itself
    assert proc.stdout.strip() and proc.stdout.count("\n") == 1  # one caption, one line


# -- run ----------------------------------------------------------------------------------------


def test_run_with_an_image(vgguf: Path, pictures: dict[str, Path]) -> None:
    args = ["run", "--image", str(pictures["photo"]), "-m", str(vgguf), QUESTION, "-n", "6",
            *GREEDY]
    text = run_llmkit(args)
    assert text.returncode == 0, text.stderr
    assert text.stderr == ""
    assert text.stdout.strip() and text.stdout.endswith("\n")
    as_json = run_llmkit([*args, "--format", "json"])
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["model"] == NAME
    assert data["text"] == text.stdout.rstrip("\n")
    assert data["finish_reason"] == "length"
    usage = data["usage"]
    assert usage["completion_tokens"] == 6
    # The picture is read through cross-attention: its tiles take no prompt positions, only
    # its one <|image|> does, and the template writes no system block beside an image.
    expected = _prompt_tokens([{"type": "image"}, {"type": "text", "text": QUESTION}])
    assert len(expected) == 17 and expected.count(128256) == 1
    assert usage["prompt_tokens"] == len(expected)
    assert usage["total_tokens"] == len(expected) + 6
    for key in ("prompt_ms", "generation_ms", "first_token_ms", "load_ms"):
        assert data["timings"][key] > 0, key
    assert data["device"] == "cpu"
    # Without the picture the same question is answered differently.
    blind = run_llmkit(["run", "-m", str(vgguf), QUESTION, "-n", "6", *GREEDY])
    assert blind.returncode == 0, blind.stderr
    assert blind.stdout != text.stdout


def test_run_refuses_what_the_model_cannot_take(vgguf: Path, pictures: dict[str, Path]) -> None:
    photo, alpha = str(pictures["photo"]), str(pictures["alpha"])
    two = run_llmkit(["run", "--image", photo, "--image", alpha, "-m", str(vgguf), "hi"])
    assert two.returncode == 2
    assert two.stdout == ""
    assert two.stderr == (f"llmkit: error: {NAME} takes one image per conversation, and this "
                          "one has 2 (ask about each picture in a conversation of its own)\n")
    system = run_llmkit(["run", "--image", photo, "--system", "Be brief.", "-m", str(vgguf),
                         "hi"])
    assert system.returncode == 2
    assert system.stdout == ""
    assert system.stderr == (
        f"llmkit: error: {NAME} cannot take a system prompt together with an image (its chat "
        "template refuses it) (leave out the system prompt and put its instruction in the "
        "prompt)\n")
    mmproj = run_llmkit(["run", "--image", photo, "--mmproj", str(vgguf), "-m", str(vgguf),
                         "hi"])
    assert mmproj.returncode == 2
    assert mmproj.stdout == ""
    assert mmproj.stderr == (f"llmkit: error: {NAME} is Llama 3.2 Vision, which reads images "
                             "itself: it has no projector (leave out --mmproj)\n")
    bad = run_llmkit(["run", "--image", str(pictures["truncated"]), "-m", str(vgguf), "hi"])
    assert bad.returncode == 1
    assert bad.stderr == f"llmkit: error: {pictures['truncated']} is truncated or corrupt\n"


def test_text_only_run_is_greedy_and_repeatable(vgguf: Path) -> None:
    args = ["run", "-m", str(vgguf), "Name a colour.", "-n", "8", "-f", "json", *GREEDY]
    first = run_llmkit(args)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    data = json.loads(first.stdout)
    assert data["text"].strip()
    assert data["usage"]["completion_tokens"] == 8
    # Without an image the published template writes its system block (knowledge and today's
    # date) before the user's turn.
    assert data["usage"]["prompt_tokens"] == len(_prompt_tokens("Name a colour."))
    second = run_llmkit(args)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["text"] == data["text"]


def test_json_schema_constrains_the_answer(vgguf: Path, tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]},
                       "bright": {"type": "boolean"}},
        "required": ["colour", "bright"],
        "additionalProperties": False,
    }
    schema_file = tmp_path / "colour.json"
    schema_file.write_text(json.dumps(schema))
    proc = run_llmkit(["run", "-m", str(vgguf), "--json-schema", str(schema_file), "-n", "60",
                       "--seed", "3", "Describe the colour as JSON."])
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), schema)


# -- chat ---------------------------------------------------------------------------------------


def test_piped_chat_with_an_image(vgguf: Path, pictures: dict[str, Path]) -> None:
    proc = run_llmkit(["chat", "-m", str(vgguf), "--image", str(pictures["photo"]), "-n", "6",
                       *GREEDY], input=QUESTION + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    # One message from stdin, one answer: the same as `run` gives for that question.
    ran = run_llmkit(["run", "--image", str(pictures["photo"]), "-m", str(vgguf), QUESTION,
                      "-n", "6", *GREEDY])
    assert proc.stdout == ran.stdout and proc.stdout.strip()


def _ask(child: pexpect.spawn, line: str) -> str:
    """Send one line; everything printed until the next prompt, without the echoed line."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    before = str(child.before)
    assert before.startswith(line), before
    return before[len(line):].strip("\r\n")


def test_repl_follow_up_keeps_the_encoding_and_refuses_a_second_image(
        vgguf: Path, pictures: dict[str, Path], counter: tuple[Path, Path]) -> None:
    script, log = counter
    env = dict(os.environ, NO_COLOR="1", TERM="dumb", INPUTRC=os.devnull)
    child = pexpect.spawn(
        sys.executable, [str(script), str(log), "chat", "-m", str(vgguf), "-n", "6", *GREEDY,
                         "--image", str(pictures["photo"])],
        env=env, encoding="utf-8", timeout=60, dimensions=(50, 200))
    try:
        child.expect_exact(PROMPT)
        assert f"chatting with {NAME}" in str(child.before)
        first = _ask(child, QUESTION)
        assert first
        assert _encodings(log) == [4]
        follow_up = _ask(child, "And what colour is it?")
        assert follow_up
        assert _encodings(log) == [4]  # the follow-up reused the picture's encoding
        refused = _ask(child, f"/image {pictures['alpha']}")
        assert refused == (f"llmkit: error: {NAME} takes one image per conversation, and this "
                           "one already shows one image (/clear starts a new conversation)")
        # The chat goes on, about the first picture, still without encoding anything.
        assert _ask(child, "Is it a photo?")
        assert _encodings(log) == [4]
        assert _ask(child, "/clear") == "llmkit: conversation cleared"
        attached = _ask(child, f"/image {pictures['alpha']}")
        assert attached == "llmkit: alpha.png (64x48) will be shown with your next message"
        assert _ask(child, QUESTION)
        assert _encodings(log) == [4, 4]
        child.sendeof()
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        if child.isalive():
            child.terminate(force=True)


# -- quantize, show, list -----------------------------------------------------------------------


def test_quantized_file_captions(vgguf: Path, pictures: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "v-q4_k_m.gguf"
    proc = run_llmkit(["quantize", str(vgguf), str(out), "--type", "Q4_K_M", "-f", "json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert Path(data["output"]) == out and out.is_file()
    assert 0 < out.stat().st_size < vgguf.stat().st_size * 0.7
    shown = json.loads(run_llmkit(["show", str(out), "-f", "json"]).stdout)
    assert shown["architecture"] == "mllama" and shown["quantization"] == "Q4_K_M"
    captioned = run_llmkit(["caption", str(pictures["photo"]), "-m", str(out), "-n", "5",
                            "-f", "jsonl", *GREEDY])
    assert captioned.returncode == 0, captioned.stderr
    record = _records(captioned.stdout)[0]
    assert record["error"] is None and record["caption"]
    assert record["model"] == out.name
    assert record["usage"]["image_tokens"] == 20


def test_show_reads_the_file(vgguf: Path) -> None:
    proc = run_llmkit(["show", str(vgguf), "-f", "json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["architecture"] == "mllama"
    assert data["quantization"] == "F16"
    assert data["context_length"] == 512
    assert data["tensor_count"] == 148
    assert data["metadata"]["mllama.llmkit.weight_layout"] == "hf"
    assert data["chat_template"].startswith("{{- bos_token }}\n")


def test_show_and_list_name_the_catalog_entries() -> None:
    listed = run_llmkit(["list", "-f", "json"])
    assert listed.returncode == 0, listed.stderr
    entries = {e["name"]: e for e in json.loads(listed.stdout)}
    for name in ("llama3.2-vision:11b", "llama3.2-vision:90b"):
        entry = entries[name]
        assert entry["kind"] == "vision"
        assert entry["supported"] is True
        assert entry["present"] is False
        assert entry["quant"] == "Q4_K_M"
    table = run_llmkit(["list", "-f", "table"])
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split()[1:5] for line in table.stdout.splitlines()[1:]}
    assert rows["llama3.2-vision:11b"] == ["vision", "-", "Q4_K_M", "no"]  # not "unsupported"
    assert rows["llama3.2-vision:90b"] == ["vision", "-", "Q4_K_M", "no"]
    assert rows["llama-guard4:12b"][3] == "unsupported"  # the column is read right
    assert rows["llama-guard3:11b-vision"] == ["guard", "-", "Q4_K_M", "no"]
    shown = run_llmkit(["show", "llama3.2-vision:11b"])
    assert shown.returncode == 1
    assert shown.stderr == ("llmkit: error: model 'llama3.2-vision:11b' is in the catalog but "
                            "not on this machine (run `llmkit pull llama3.2-vision:11b "
                            "--from-source`)\n")
