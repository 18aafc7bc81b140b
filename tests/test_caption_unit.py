"""Caption instructions, tidying and records, with a scripted engine in place of llama.cpp."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from llmkit.engines import SamplingParams
from llmkit.errors import InputError
from llmkit.tasks.caption import (
    ALT_TEXT_LIMIT,
    STYLES,
    CaptionJob,
    caption_file,
    instruction_for,
    tidy_caption,
)
from tests.fake_engine import Call, FakeEngine


@pytest.mark.parametrize(("style", "raw", "expected"), [
    ("short", "  A cat on a sofa.\n", "A cat on a sofa."),
    ("short", "Caption: A cat\non a sofa.", "A cat on a sofa."),
    ("short", '"A cat on a sofa."', "A cat on a sofa."),
    ("alt-text", "Alt text: A red bicycle leaning on a wall.", "A red bicycle leaning on a wall."),
    ("tags", "Cat, sofa,  Red\n- indoor\n1. cat\n#pet", "cat, sofa, red, indoor, pet"),
    ("tags", "Keywords: beach; sunset; Sea.", "beach, sunset, sea"),
    ("detailed", "  Line one.\n\nLine two.  ", "Line one.\n\nLine two."),
    ("custom", "\nAnything goes\n", "Anything goes"),
    # A model can emit NUL and other control bytes: a sidecar holding NUL reads as binary.
    ("short", "A cat\x00 on\x1b[31m a sofa.\x07", "A cat on[31m a sofa."),
    ("detailed", "Line one.\r\n\tLine\x00 two.\x7f", "Line one.\n\tLine two."),
    ("tags", "cat,\x00dog", "cat, dog"),
])
def test_tidy_caption(style: str, raw: str, expected: str) -> None:
    assert tidy_caption(raw, style) == expected


def test_alt_text_is_cut_at_a_boundary() -> None:
    long = ("A very long description of a busy market street with many stalls selling fruit, "
            "vegetables, fish and flowers while people walk by under colourful umbrellas.")
    assert len(long) > ALT_TEXT_LIMIT
    tidy = tidy_caption(long, "alt-text")
    assert len(tidy) <= ALT_TEXT_LIMIT
    assert tidy.endswith(".")
    assert long.startswith(tidy[:-1])
    two = "A dog runs on the beach. " + "It is a sunny day with waves and people " * 4
    assert tidy_caption(two, "alt-text") == "A dog runs on the beach."


def test_instruction_for() -> None:
    assert instruction_for(None, None) == (STYLES["short"], "short")
    assert instruction_for("tags", None) == (STYLES["tags"], "tags")
    assert instruction_for("tags", " What colour is the car? ") == (
        "What colour is the car?", "custom")
    with pytest.raises(InputError, match="unknown style"):
        instruction_for("poem", None)
    with pytest.raises(InputError, match="empty"):
        instruction_for(None, "  ")


def scripted_vision(answer: str | Callable[[Call], str]) -> FakeEngine:
    """A vision model that answers every image with ``answer`` (images marked as mtmd does)."""
    return FakeEngine(answer, vision=True, media_marker="<__media__>", model_name="scripted")


def interrupted(call: Call) -> str:
    raise KeyboardInterrupt  # Ctrl-C while the caption is generated


def _png(path: Path, size: tuple[int, int] = (40, 30)) -> Path:
    from PIL import Image

    Image.new("RGB", size, (200, 10, 10)).save(path)
    return path


JOB = CaptionJob(instruction=STYLES["tags"], style="tags", params=SamplingParams(), max_side=32)


def test_caption_file_record(tmp_path: Path) -> None:
    engine = scripted_vision("Red, Square, red")
    record: dict[str, Any] = caption_file(engine, str(_png(tmp_path / "a.png")), JOB)
    assert record["caption"] == "red, square"
    assert record["error"] is None
    assert record["style"] == "tags"
    assert record["model"] == "scripted"
    assert record["image"] == {"width": 32, "height": 24, "original_width": 40,
                               "original_height": 30, "format": "PNG"}
    # The prompt is its text tokens and the image's 16 cells; one token per character.
    text_tokens = len(engine.chat_tokens([{"role": "user", "content": "\n" + STYLES["tags"]}]))
    assert record["usage"] == {"prompt_tokens": text_tokens + 16, "image_tokens": 16,
                               "completion_tokens": len("Red, Square, red")}
    assert set(record["timings"]) == {"prepare_ms", "prompt_ms", "generation_ms", "total_ms"}
    call, = engine.calls
    messages, images = call.messages, call.images
    assert messages == [{"role": "user", "content": "<__media__>\n" + STYLES["tags"]}]
    assert (images[0].width, images[0].height) == (32, 24)
    assert len(images[0].rgb) == 32 * 24 * 3


def test_caption_file_bad_image_is_a_record_not_an_exception(tmp_path: Path) -> None:
    engine = scripted_vision("unused")
    bad = tmp_path / "notes.jpg"
    bad.write_text("just text\n")
    record = caption_file(engine, str(bad), JOB)
    assert record["caption"] is None
    assert "not an image" in record["error"]
    assert engine.calls == []
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty" in caption_file(engine, str(empty), JOB)["error"]
    assert "does not exist" in caption_file(engine, str(tmp_path / "gone.png"), JOB)["error"]


def test_caption_file_empty_answer_is_an_error(tmp_path: Path) -> None:
    record = caption_file(scripted_vision("  \n"), str(_png(tmp_path / "a.png")), JOB)
    assert record["error"] == f"{tmp_path / 'a.png'}: the model gave an empty caption"


def test_caption_file_interrupted_stops_the_batch(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        caption_file(scripted_vision(interrupted),
                     str(_png(tmp_path / "a.png")), JOB)
