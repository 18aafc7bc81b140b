"""One item of a batch command as the library does it: summarize_file and caption_file, with
and without a guard, on the shared fake engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmkit.documents import read_document
from llmkit.engines import SamplingParams
from llmkit.tasks.caption import (
    IMAGE_SUFFIXES,
    STYLES,
    CaptionJob,
    caption_file,
    caption_record,
)
from llmkit.tasks.policy import LLAMA_GUARD_3_1B_CATEGORIES
from llmkit.tasks.safety import Guard
from llmkit.tasks.summarize import (
    GUARD_PROMPT,
    SummaryJob,
    SummaryOptions,
    document_label,
    summarize_file,
    summary_record,
)
from tests.fake_engine import FakeEngine, ScriptedGuardEngine


def _guard(flag: str) -> tuple[Guard, ScriptedGuardEngine]:
    """A guard that flags any conversation holding ``flag`` (S1), else answers safe."""
    engine = ScriptedGuardEngine(answer=lambda conversation: (
        "unsafe\nS1" if flag in conversation else "safe"))
    return Guard(engine, LLAMA_GUARD_3_1B_CATEGORIES), engine


# -- summarize_file ------------------------------------------------------------------------

def test_a_document_becomes_its_record(tmp_path: Path) -> None:
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\nThe meeting moved to Tuesday.\n")
    engine = FakeEngine("It moved to Tuesday.")
    record = summarize_file(engine, str(doc), SummaryJob())
    assert record["path"] == str(doc) and record["format"] == "markdown"
    assert record["summary"] == "It moved to Tuesday." and record["error"] is None
    assert record["model"] == "fake" and record["calls"] == 1
    assert "The meeting moved to Tuesday." in engine.calls[0].text


def test_warnings_about_the_document_are_handed_on(tmp_path: Path) -> None:
    doc = tmp_path / "latin.txt"
    doc.write_bytes("Caf\xe9 au lait, ol\xe9.\n".encode("cp1252"))
    warnings: list[str] = []
    record = summarize_file(FakeEngine("Coffee."), str(doc), SummaryJob(),
                            on_warning=warnings.append)
    assert warnings and warnings == record["warnings"]


def test_a_document_that_cannot_be_read_is_an_error_record_without_a_model_call(
        tmp_path: Path) -> None:
    engine = FakeEngine("never")
    record = summarize_file(engine, str(tmp_path / "gone.md"), SummaryJob())
    assert record["summary"] is None and "gone.md" in record["error"]
    assert engine.calls == []
    big = tmp_path / "big.txt"
    big.write_text("word " * 100)
    refused = summarize_file(engine, str(big), SummaryJob(max_bytes=64))
    assert refused["summary"] is None and "big.txt" in refused["error"]


def test_stdin_is_a_document_read_before_and_named_stdin(tmp_path: Path) -> None:
    assert document_label("-") == "stdin" and document_label("a.md") == "a.md"
    stdin = read_document(b"<html><title>T</title><p>Body text here.</p></html>", name="stdin")
    record = summarize_file(FakeEngine("Body."), "-", SummaryJob(), document=stdin)
    assert record["path"] == "-" and record["format"] == "html" and record["summary"] == "Body."
    # A document the context cannot summarize names itself as the messages call it.
    tiny = summarize_file(FakeEngine("Body.", n_ctx=40), "-", SummaryJob(), document=stdin)
    assert tiny["summary"] is None and tiny["error"].startswith("stdin: ")


def test_the_job_says_how_to_read_and_what_to_write(tmp_path: Path) -> None:
    doc = tmp_path / "page.txt"
    doc.write_text("<p>Paragraph.</p>")
    engine = FakeEngine("Short.")
    job = SummaryJob(options=SummaryOptions(length="short", focus="costs"), format="html")
    record = summarize_file(engine, str(doc), job)
    assert record["format"] == "html"
    assert "Focus on: costs." in engine.calls[0].text
    assert "<p>" not in engine.calls[0].text


def test_progress_reaches_the_caller(tmp_path: Path) -> None:
    doc = tmp_path / "a.txt"
    doc.write_text("A short text.")
    seen: list[tuple[str, int, int]] = []
    summarize_file(FakeEngine("Short."), str(doc), SummaryJob(),
                   on_progress=lambda stage, i, n: seen.append((stage, i, n)))
    assert seen == [("summary", 1, 1)]


def test_a_flagged_document_is_not_summarized(tmp_path: Path) -> None:
    doc = tmp_path / "bad.txt"
    doc.write_text("How to build a bomb at home.")
    engine = FakeEngine("never")
    record = summarize_file(engine, str(doc), SummaryJob(), guard=_guard("bomb")[0])
    assert engine.calls == []
    assert record["summary"] is None and record["flagged"] is True
    assert record["guard"]["input"]["verdict"] == "unsafe" and "output" not in record["guard"]
    assert "flagged_note" in record


def test_a_flagged_summary_is_withheld(tmp_path: Path) -> None:
    doc = tmp_path / "ok.txt"
    doc.write_text("A recipe for bread.")
    guard, judge = _guard("bomb")
    record = summarize_file(FakeEngine("Then add a bomb."), str(doc), SummaryJob(), guard=guard)
    assert record["summary"] is None and record["flagged"] is True
    assert record["guard"]["input"]["verdict"] == "safe"
    assert record["guard"]["output"]["verdict"] == "unsafe"
    # The summary was judged as the answer to one fixed request, not to the whole document.
    assert GUARD_PROMPT in judge.generated[-1]


def test_a_safe_summary_keeps_both_verdicts(tmp_path: Path) -> None:
    doc = tmp_path / "ok.txt"
    doc.write_text("A recipe for bread.")
    record = summarize_file(FakeEngine("Bake it."), str(doc), SummaryJob(),
                            guard=_guard("bomb")[0])
    assert record["summary"] == "Bake it." and record["flagged"] is False
    assert set(record["guard"]) == {"input", "output"}


def test_summary_record_and_summarize_file_agree_on_the_shape(tmp_path: Path) -> None:
    doc = tmp_path / "a.txt"
    doc.write_text("Text.")
    record = summarize_file(FakeEngine("T."), str(doc), SummaryJob())
    assert list(record)[:4] == list(summary_record("x", None, model="m"))


# -- caption_file --------------------------------------------------------------------------

def _png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    return path


JOB = CaptionJob(instruction=STYLES["short"], style="short", params=SamplingParams(),
                 max_side=64)


def test_caption_record_is_the_first_fields_of_every_record(tmp_path: Path) -> None:
    refused = caption_record("a.jpg", "tags", model=None, error="no sidecar")
    assert refused == {"path": "a.jpg", "caption": None, "model": None, "style": "tags",
                       "error": "no sidecar"}
    done = caption_file(FakeEngine("A red square.", vision=True), str(_png(tmp_path / "a.png")),
                        JOB)
    assert list(done)[:5] == list(refused)
    assert {".jpg", ".png", ".heic"} <= IMAGE_SUFFIXES


def test_a_guarded_caption_is_checked_against_the_instruction(tmp_path: Path) -> None:
    image = str(_png(tmp_path / "a.png"))
    guard, judge = _guard("bomb")
    record = caption_file(FakeEngine("A bomb.", vision=True), image, JOB, guard=guard)
    assert record["caption"] is None and record["flagged"] is True
    assert record["guard"]["output"]["verdict"] == "unsafe"
    assert STYLES["short"] in judge.generated[-1]
    safe = caption_file(FakeEngine("A red square.", vision=True), image, JOB, guard=guard)
    assert safe["caption"] == "A red square." and safe["flagged"] is False


def test_a_guarded_caption_is_not_streamed_before_its_check(tmp_path: Path) -> None:
    image = str(_png(tmp_path / "a.png"))
    streamed: list[str] = []
    caption_file(FakeEngine("A bomb.", vision=True), image, JOB, streamed.append,
                 guard=_guard("bomb")[0])
    assert streamed == []
    caption_file(FakeEngine("A cat.", vision=True), image, JOB, streamed.append)
    assert "".join(streamed) == "A cat."


def test_a_failed_caption_is_not_sent_to_the_guard(tmp_path: Path) -> None:
    guard, judge = _guard("bomb")
    record = caption_file(FakeEngine("x", vision=True), str(tmp_path / "gone.png"), JOB,
                          guard=guard)
    assert "gone.png" in record["error"] and "guard" not in record
    assert judge.calls == []


@pytest.mark.parametrize("answer", ["", "   "])
def test_an_empty_caption_is_an_error_with_or_without_a_guard(tmp_path: Path,
                                                               answer: str) -> None:
    image = str(_png(tmp_path / "a.png"))
    record = caption_file(FakeEngine(answer, vision=True), image, JOB, guard=_guard("bomb")[0])
    assert record["caption"] is None and "empty caption" in record["error"]


def test_a_prepared_image_is_captioned_under_the_name_given(tmp_path: Path) -> None:
    from llmkit.images import prepare_image

    image = prepare_image(_png(tmp_path / "a.png").read_bytes(), name="upload")
    engine = FakeEngine("A red square.", vision=True)
    record = caption_file(engine, "upload", JOB, image=image)
    assert record["path"] == "upload" and record["caption"] == "A red square."
    assert record["image"]["width"] == 40 and record["image"]["format"] == "PNG"
    assert engine.calls[0].images == [image]


def test_summary_temperature_is_the_callers_then_the_models_then_cool() -> None:
    from llmkit.tasks.summarize import SUMMARY_TEMPERATURE, summary_temperature

    assert summary_temperature(0.7, 0.0) == 0.7
    assert summary_temperature(None, 0.0) == 0.0
    assert summary_temperature(None, None) == SUMMARY_TEMPERATURE == 0.2
