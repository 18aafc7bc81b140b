"""Images in chat requests: data: URLs on a tiny SmolVLM (published template), as `llmkit run`."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import images
from tests.conftest import run_llmkit
from tests.hardening_models import SMOLVLM_TEMPLATE, convert_tiny_smolvlm
from tests.test_serve import Server

pytestmark = pytest.mark.slow
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_tiny_smolvlm(tmp_path_factory.mktemp("vlm"), template=SMOLVLM_TEMPLATE)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("serve-pictures")
    return {"photo": images.write_photo_jpeg(directory, "photo.jpg", (96, 64)),
            "other": images.write_photo_jpeg(directory, "other.jpg", (64, 96), quality=70)}


def _data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _ask(url: str, question: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def _run_answer(vlm: Path, picture: Path, home: Path) -> str:
    proc = run_llmkit(["run", QUESTION, "-m", str(vlm), "--image", str(picture),
                       "--temperature", "0", "-n", "24", "-t", "2", "-f", "json", "-q"],
                      env={"LLMKIT_HOME": str(home / "llmkit")})
    assert proc.returncode == 0, proc.stderr
    return str(json.loads(proc.stdout)["text"])


@pytest.fixture(scope="module", params=[2, 1], ids=["parallel", "alone"])
def vlm_server(request: pytest.FixtureRequest, vlm: Path, pictures: dict[str, Path],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # -P 2 puts pictures in the parallel sequences; -P 1 runs each conversation with the
    # engine to itself (the path of engines whose pictures cannot share the sequences).
    home = tmp_path_factory.mktemp("vlm-home")
    srv = Server(["-m", str(vlm), "-P", str(request.param), "-t", "2",
                  "--allow-files", str(pictures["photo"].parent),
                  "--max-image-pixels", "20000"], home)
    yield srv
    assert srv.stop() == 0, "".join(srv.lines)


def test_an_image_request_answers_as_llmkit_run(vlm_server: Server, vlm: Path,
                                                pictures: dict[str, Path],
                                                tmp_path: Path) -> None:
    client = vlm_server.client()
    for name in ("photo", "other"):
        expected = _run_answer(vlm, pictures[name], tmp_path)
        answer = client.chat.completions.create(
            model=vlm.name, messages=_ask(_data_url(pictures[name])), temperature=0,
            max_tokens=24)
        assert answer.choices[0].message.content == expected, name
        assert answer.usage.prompt_tokens > 20  # the picture's tokens are counted
        streamed = client.chat.completions.create(
            model=vlm.name, messages=_ask(_data_url(pictures[name])), temperature=0,
            max_tokens=24, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            expected


def test_files_only_inside_the_allowed_folder(vlm_server: Server, vlm: Path,
                                              pictures: dict[str, Path],
                                              tmp_path: Path) -> None:
    client = vlm_server.client()
    inside = client.chat.completions.create(
        model=vlm.name, messages=_ask("file://" + str(pictures["photo"])), temperature=0,
        max_tokens=24)
    assert inside.choices[0].message.content == _run_answer(vlm, pictures["photo"], tmp_path)
    outside = images.write_photo_jpeg(tmp_path, "outside.jpg", (32, 32))
    for url in ("file://" + str(outside), str(pictures["photo"].parent / ".." / "x.jpg"),
                "https://example.com/cat.jpg"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=vlm.name, messages=_ask(url), max_tokens=4)
        assert caught.value.code == "invalid_image_url", url


def test_allowed_files_are_read_as_file_urls_and_only_when_regular(
        vlm_server: Server, vlm: Path, pictures: dict[str, Path], tmp_path: Path) -> None:
    import os
    from urllib.parse import quote

    folder = pictures["photo"].parent
    spaced = folder / "a photo #1.jpg"
    spaced.write_bytes(pictures["photo"].read_bytes())
    client = vlm_server.client()
    answer = client.chat.completions.create(
        model=vlm.name, messages=_ask("file://" + quote(str(spaced))), temperature=0,
        max_tokens=24)
    assert answer.choices[0].message.content == _run_answer(vlm, pictures["photo"], tmp_path)
    # A FIFO would block a plain open() until a writer came; a folder, a loop and a missing
    # name cannot be read. Each is a 400 at once, and the server keeps serving.
    fifo, loop = folder / "pipe.jpg", folder / "loop.jpg"
    if not fifo.exists():
        os.mkfifo(fifo)
    if not loop.is_symlink():
        loop.symlink_to(loop)
    for url in (str(fifo), "file://" + str(folder), str(loop), str(folder / "missing.jpg")):
        with pytest.raises(openai.BadRequestError) as caught:
            client.with_options(timeout=30).chat.completions.create(
                model=vlm.name, messages=_ask(url), max_tokens=4)
        assert caught.value.code == "invalid_image_url", url
    assert client.models.list().data


@pytest.mark.parametrize("url, code", [
    ("data:image/png;base64,@@@@", "invalid_image_url"),
    ("data:image/png,rawbytes", "invalid_image_url"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), None),
])
def test_bad_images_are_400(vlm_server: Server, vlm: Path, url: str, code: str | None) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        vlm_server.client().chat.completions.create(model=vlm.name, messages=_ask(url),
                                                    max_tokens=4)
    if code is not None:
        assert caught.value.code == code


def test_a_picture_past_the_pixel_limit_is_400(vlm_server: Server, vlm: Path,
                                               tmp_path: Path) -> None:
    big = images.write_photo_jpeg(tmp_path, "big.jpg", (200, 150))  # 30000 > 20000 pixels
    with pytest.raises(openai.BadRequestError) as caught:
        vlm_server.client().chat.completions.create(model=vlm.name,
                                                    messages=_ask(_data_url(big)),
                                                    max_tokens=4)
    assert "pixels" in str(caught.value)
    assert vlm_server.client().models.list().data  # still serving


def test_a_text_model_refuses_images(smollm2_path: Path, pictures: dict[str, Path],
                                     tmp_path: Path) -> None:
    srv = Server(["-m", str(smollm2_path), "-P", "1", "--ctx", "512"], tmp_path)
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            srv.client().chat.completions.create(
                model=smollm2_path.name, messages=_ask(_data_url(pictures["photo"])),
                max_tokens=4)
        assert caught.value.code == "unsupported_content"
    finally:
        assert srv.stop() == 0


@pytest.fixture(scope="module")
def vgguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama 3.2 Vision (published layout) through `llmkit convert`."""
    from tests.mllama_model import build_model, require_oracle, save_checkpoint

    require_oracle()
    ckpt = save_checkpoint(build_model(seed=0), tmp_path_factory.mktemp("hf") / "tiny-vision")
    out = tmp_path_factory.mktemp("mllama") / "tiny-vision.gguf"
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out), "--outtype", "f16"])
    assert proc.returncode == 0, proc.stderr
    return out


def test_llama_3_2_vision_answers_an_image_request_as_llmkit_run(
        vgguf: Path, pictures: dict[str, Path], tmp_path: Path) -> None:
    """The Llama 3.2 Vision engine (one conversation at a time, the engine to itself)."""
    srv = Server(["-m", str(vgguf), "-t", "2"], tmp_path)
    try:
        answer = srv.client().chat.completions.create(
            model=vgguf.name, messages=_ask(_data_url(pictures["photo"])), temperature=0,
            max_tokens=24)
        assert answer.choices[0].message.content == _run_answer(vgguf, pictures["photo"],
                                                                tmp_path)
        # Its published template refuses a system prompt beside a picture: a 400 that says so.
        with pytest.raises(openai.BadRequestError):
            srv.client().chat.completions.create(
                model=vgguf.name, max_tokens=4,
                messages=[{"role": "system", "content": "Be brief."},
                          *_ask(_data_url(pictures["photo"]))])
    finally:
        assert srv.stop() == 0, "".join(srv.lines)
