"""What the fuzz harness found (tests/fuzz), each pinned down: documents, check --batch, JSON."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from llmkit._fs import json_dumps
from llmkit.batch import RecordLog
from llmkit.convert import read_config
from llmkit.documents import html_to_text, read_document, tidy_text
from llmkit.engines.llama_cpp import grammar_from_json_schema
from llmkit.errors import ConvertError, InputError, SchemaError, VerdictError
from llmkit.tasks.chat import Conversation
from llmkit.tasks.policy import LLAMA_GUARD_3_1B_CATEGORIES
from llmkit.tasks.safety import Guard, check_jsonl_line
from tests.conftest import run_llmkit
from tests.fuzz.fake_guard import FakeGuardEngine

# --- documents: time and size linear in the input ----------------------------------------------

# Each of these took minutes to hours at this size: CPython's html.parser rescans to the end of
# the page from every '<' after a construct that never ends (gh-135462), the element stack was
# searched from the top for every end tag, and the trailing-space regex retried from every space.
LINEAR_BYTES = 256 * 1024
PATHOLOGICAL_HTML = {
    "unclosed start tags": "<a ",
    "unclosed start tags with a name only": "ca<met",
    "unclosed comments": "<!--",
    "unclosed end tags": "</",
    "unclosed declarations": "<!x",
    "unclosed processing instructions": "<?",
    "quoted '>' in unclosed tags": "<a b='>' ",
    "broken quotes": "<a b='x>y ",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("unit", PATHOLOGICAL_HTML.values(), ids=PATHOLOGICAL_HTML.keys())
def test_html_time_is_linear_in_the_page(unit: str) -> None:
    page = unit * (LINEAR_BYTES // len(unit))
    started = time.perf_counter()
    html_to_text(page)
    assert time.perf_counter() - started < 5


@pytest.mark.timeout(120)
def test_many_open_elements_then_stray_end_tags_is_linear() -> None:
    n = LINEAR_BYTES // 9
    started = time.perf_counter()
    assert html_to_text("<div>" * n + "</x>" * n + "text")[0] == "text"
    assert time.perf_counter() - started < 5


@pytest.mark.timeout(120)
def test_implied_ends_below_many_open_elements_are_linear() -> None:
    n = LINEAR_BYTES // 14
    started = time.perf_counter()
    text, _ = html_to_text("<div>" * n + "<li>a</li>" * n)
    assert text.split("\n")[:2] == ["- a", "- a"]
    assert time.perf_counter() - started < 5


def test_deeply_nested_lists_are_indented_a_bounded_amount() -> None:
    depth = 3000
    text, _ = html_to_text("<ul>" * depth + "<li>x" * depth)
    # Each item once, indented at most 8 levels: not 3000 items of up to 6000 spaces.
    assert text.count("x") == depth
    assert max(len(line) for line in text.split("\n")) == len("  " * 8 + "- x")


@pytest.mark.timeout(120)
def test_tidy_text_is_linear_in_a_run_of_spaces() -> None:
    text = "a" + " " * LINEAR_BYTES + "b  \n  c \u3000\n"
    started = time.perf_counter()
    assert tidy_text(text) == "a" + " " * LINEAR_BYTES + "b\n  c"
    assert time.perf_counter() - started < 5


@pytest.mark.timeout(120)
def test_a_text_document_of_spaces_reads_quickly() -> None:
    data = b"x" + b" " * LINEAR_BYTES + b"y\n"
    started = time.perf_counter()
    assert read_document(data, name="spaces.txt").text == data.decode().rstrip()
    assert time.perf_counter() - started < 5


# --- documents: what a page may declare itself as ----------------------------------------------


@pytest.mark.parametrize("charset", ["unicode_escape", "raw_unicode_escape", "utf-7", "cp037",
                                     "punycode"])
def test_a_page_cannot_declare_a_codec_that_is_not_a_web_encoding(charset: str) -> None:
    # unicode_escape read "\ud800" as half a surrogate pair (no tokenizer encodes that: summarize
    # failed with an unexpected UnicodeEncodeError), and "\n" as a newline; cp037 is EBCDIC.
    page = (f'<html><head><meta charset="{charset}"></head><body><p>caf\xe9 \\ud800 \\n x</p>'
            "</body></html>").encode("latin-1")
    document = read_document(page, name="page.html")
    assert document.text == "caf\xe9 \\ud800 \\n x"
    assert document.encoding == "windows-1252"
    document.text.encode("utf-8")


@pytest.mark.parametrize(("charset", "codec"), [("windows-1251", "cp1251"), ("koi8-r", "koi8-r"),
                                                ("shift_jis", "shift_jis"), ("gbk", "gbk"),
                                                ("x-mac-cyrillic", "mac-cyrillic")])
def test_web_encodings_are_still_honoured(charset: str, codec: str) -> None:
    word = "\u041c\u0438\u0440" if codec != "shift_jis" and codec != "gbk" else "\u65e5\u672c"
    page = f'<meta charset="{charset}"><p>{word}</p>'.encode(codec)
    assert read_document(page, name="page.html").text == word


# --- documents: HTML read as a browser shows it ------------------------------------------------


def test_a_self_closed_br_is_one_line_break() -> None:
    # html.parser reported <br/> as <br> and </br>, each a break: a paragraph instead of a line.
    assert html_to_text("<p>line<br/>break<br />again</p>")[0] == "line\nbreak\nagain"


def test_an_unclosed_comment_hides_the_rest_as_in_a_browser() -> None:
    assert html_to_text("<p>shown</p><!-- never closed <p>hidden</p>")[0] == "shown"


# --- check --batch: every line is one record ---------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000


def guard(**engine: Any) -> Guard:
    return Guard(FakeGuardEngine(**engine), LLAMA_GUARD_3_1B_CATEGORIES)


@pytest.mark.parametrize(("line", "error"), [
    ('{"text": "hi \\ud800 there"}',
     'line 4: "text" holds \\ud800, half of a UTF-16 surrogate pair, which is not a character'),
    ('{"prompt": "a\\udfff", "response": "b"}', 'line 4: "prompt" holds \\udfff'),
    ('{"prompt": "a", "response": "\\udc80"}', 'line 4: "response" holds \\udc80'),
    ('{"messages": [{"role": "user", "content": "\\ud83d"}]}', "line 4: message 1 holds \\ud83d"),
])
def test_a_lone_surrogate_escape_is_that_lines_error(line: str, error: str) -> None:
    # The engine encodes text as UTF-8 for llama.cpp: this ended the whole batch with an
    # unexpected UnicodeEncodeError.
    record = check_jsonl_line(guard(), line, 4)
    assert record["flagged"] is None and record["error"].startswith(error)
    assert "surrogate pair (\\ud83d\\ude00) or as UTF-8" in record["error"]


def test_a_surrogate_pair_escape_is_text() -> None:
    record = check_jsonl_line(guard(), '{"text": "smile \\ud83d\\ude00"}', 1)
    assert record["error"] is None and record["verdict"] == "safe"


@pytest.mark.parametrize(("line", "why"), [
    ('{"text": ' + DEEP + "}", "it nests arrays or objects too deeply"),
    ('{"id": NaN, "text": "x"}', "NaN is not a JSON number"),
    ('{"id": -Infinity, "text": "x"}', "-Infinity is not a JSON number"),
    ('{"id": 1e999, "text": "x"}', "1e999 is too large a number"),
])
def test_lines_that_are_not_strict_json_are_their_own_errors(line: str, why: str) -> None:
    # Deep nesting raised RecursionError out of the batch; NaN and 1e999 were taken, and the
    # record echoed "id": NaN, which is not JSON.
    record = check_jsonl_line(guard(), line, 2)
    assert record == {"line": 2, "verdict": None, "flagged": None,
                      "error": f"line 2 is not JSON: {why}"}
    assert json.loads(json_dumps(record)) == record


def test_nan_logits_give_no_score_and_fail_closed_under_a_threshold() -> None:
    # A NaN score compared below any threshold, so a damaged guard passed everything as safe.
    damaged = Guard(FakeGuardEngine(logits="nan", answer="!!!!"), LLAMA_GUARD_3_1B_CATEGORIES,
                    threshold=0.5)
    with pytest.raises(VerdictError):
        damaged.check_text("anything")
    answered = Guard(FakeGuardEngine(logits="nan", answer="unsafe\nS1"),
                     LLAMA_GUARD_3_1B_CATEGORIES, threshold=0.5).check_text("anything")
    assert (answered.flagged, answered.decided_by, answered.score) == (True, "answer", None)
    assert answered.p_safe is None and answered.p_unsafe is None


# --- JSON written and read elsewhere -----------------------------------------------------------


def strict(text: str) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} in {text!r}")

    return json.loads(text, parse_constant=refuse)


def test_json_output_holds_no_nan() -> None:
    value = {"score": math.nan, "list": [math.inf, -math.inf, 1.5], "name": "\udcff.jpg"}
    assert strict(json_dumps(value)) == {"score": None, "list": [None, None, 1.5],
                                         "name": "\udcff.jpg"}
    assert strict(json_dumps(value, indent=2))["score"] is None


def test_show_json_of_a_gguf_with_nan_metadata_is_json(tmp_path: Path) -> None:
    from tests.gguf_edit import FLOAT32, GGUFEdit, tiny_header_gguf

    data = tiny_header_gguf(tmp_path / "tiny.gguf", 3)
    path = GGUFEdit(data).set("general.quality", math.nan, FLOAT32).set(
        "general.size_label", -math.inf, FLOAT32).write(tmp_path / "nan.gguf")
    result = run_llmkit(["show", str(path), "--format", "json"])
    assert result.returncode == 0, result.stderr
    metadata = strict(result.stdout)["metadata"]
    assert metadata["general.quality"] is None and metadata["general.size_label"] is None


def test_a_conversation_file_must_be_strict_json_and_text(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('[{"role": "user", "content": "a\\ud800"}]')
    with pytest.raises(InputError, match=r"in .*c.json, message 1 holds \\ud800, half of a"):
        Conversation.load(path)
    path.write_text('{"system": "\\udfff", "messages": []}')
    with pytest.raises(InputError, match=r"the system prompt holds \\udfff"):
        Conversation.load(path)
    path.write_text('{"messages": [], "x": NaN}')
    with pytest.raises(InputError, match=r"is not JSON \(NaN is not a JSON number"):
        Conversation.load(path)


def test_a_json_schema_nested_too_deeply_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="not valid JSON: it nests arrays or objects too deep"):
        grammar_from_json_schema(DEEP)


def test_an_out_file_with_a_line_nested_too_deeply_is_refused_as_not_jsonl(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(DEEP + "\n")
    with pytest.raises(InputError, match="line 1 is not JSON"):
        RecordLog(out)


def test_a_checkpoint_config_nested_too_deeply_is_a_convert_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"architectures": ' + DEEP + "}")
    with pytest.raises(ConvertError, match="it nests arrays or objects too deeply"):
        read_config(tmp_path)
    result = run_llmkit(["convert", str(tmp_path), "-o", str(tmp_path / "out.gguf")])
    assert result.returncode == 1
    assert result.stderr.startswith(f"llmkit: error: cannot read {tmp_path / 'config.json'}: "
                                    "it nests arrays or objects too deeply")


@pytest.mark.parametrize(("config", "message"), [
    ("not json", "cannot read"),
    ("[1, 2]", "is not a JSON object"),
    ('{"architectures": "LlamaForCausalLM"}', "a model of unknown architecture checkpoint"),
])
def test_a_hub_config_that_is_not_a_checkpoints_is_a_convert_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str, message: str) -> None:
    # pull --from-source read the Hub's config.json with json.loads alone: an unexpected
    # JSONDecodeError or AttributeError, or an architecture list of single letters.
    from llmkit import build, hub

    (tmp_path / "config.json").write_text(config)
    monkeypatch.setattr(hub, "fetch_file", lambda repo, name, quiet: tmp_path / name)
    with pytest.raises(ConvertError, match=message):
        build._check_convertible("org/repo", "model", quiet=True)


# --- end to end --------------------------------------------------------------------------------


@pytest.mark.slow
def test_check_batch_goes_on_past_lines_that_are_not_text_or_not_json(
        smollm2_path: Path, tmp_path: Path) -> None:
    batch = tmp_path / "batch.jsonl"
    batch.write_text("\n".join([
        '{"id": "a", "text": "hi \\ud800"}',
        '{"id": "b", "text": ' + "[" * 50_000 + "]" * 50_000 + "}",
        '{"id": NaN, "text": "hello"}',
        '{"id": "d", "text": "hello"}',
    ]) + "\n")
    result = run_llmkit(["check", "--batch", str(batch), "-m", str(smollm2_path)])
    records = [strict(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4]
    assert records[0]["error"].startswith('line 1: "text" holds \\ud800, half of a UTF-16')
    assert records[1]["error"] == "line 2 is not JSON: it nests arrays or objects too deeply"
    assert records[2]["error"] == "line 3 is not JSON: NaN is not a JSON number"
    # SmolLM2 is no Llama Guard: the last line reached the model, which did not answer a verdict.
    assert records[3]["id"] == "d" and "not a verdict" in records[3]["error"]
    assert "unexpected" not in result.stderr
    assert result.returncode == 1 and "4 records: 0 safe, 0 flagged, 4 errors" in result.stderr


@pytest.mark.slow
def test_run_with_a_json_schema_nested_too_deeply(smollm2_path: Path, tmp_path: Path) -> None:
    schema = tmp_path / "deep.json"
    schema.write_text(DEEP)
    result = run_llmkit(["run", "-m", str(smollm2_path), "--json-schema", str(schema), "hi"])
    assert result.returncode == 1
    assert result.stderr.startswith("llmkit: error: the JSON schema is not valid JSON: it nests "
                                    "arrays or objects too deeply")


# --- images: Pillow's warnings stay off stderr -------------------------------------------------


def jpeg_with_corrupt_exif(path: Path) -> Path:
    """A small JPEG whose EXIF block names a Make tag of 1000 bytes lying past its end, as a
    camera or an editor that mangled it would leave it."""
    import io
    import struct

    from PIL import Image

    tiff = (b"II*\x00" + struct.pack("<IH", 8, 1) + struct.pack("<HHII", 0x010F, 2, 1000, 100)
            + struct.pack("<I", 0))
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, "JPEG", exif=b"Exif\x00\x00" + tiff)
    path.write_bytes(buffer.getvalue())
    return path


def test_prepare_image_lets_no_pillow_warning_through(tmp_path: Path) -> None:
    import warnings

    from llmkit.images import prepare_image

    path = jpeg_with_corrupt_exif(tmp_path / "exif.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = prepare_image(path)
    assert (image.width, image.height) == (16, 16)
    assert [str(w.message) for w in caught] == []


@pytest.mark.slow
def test_caption_of_a_photo_with_corrupt_exif_keeps_stderr_clean(tmp_path: Path) -> None:
    from tests.hardening_models import convert_tiny_smolvlm

    vlm = convert_tiny_smolvlm(tmp_path)
    photo = jpeg_with_corrupt_exif(tmp_path / "exif.jpg")
    result = run_llmkit(["caption", str(photo), "-m", str(vlm), "--max-tokens", "4", "-q"])
    assert result.returncode == 0, result.stderr
    # Was "…/PIL/TiffImagePlugin.py:946: UserWarning: Tag data larger than file. Skipping
    # tag 271" and the source line after it.
    assert result.stderr == ""


# --- GGUF: the file's words in messages are escaped --------------------------------------------


def gguf_with_a_tensor_name(path: Path, name: bytes) -> Path:
    """The smallest GGUF that fails on its one tensor's name: five dimensions."""
    import struct

    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + struct.pack("<Q", len(name)) + name
                     + struct.pack("<I", 5))
    return path


def test_a_tensor_name_with_control_characters_is_shown_escaped(tmp_path: Path) -> None:
    from llmkit.errors import InvalidModelFileError
    from llmkit.gguf_file import check_complete

    path = gguf_with_a_tensor_name(tmp_path / "m.gguf", b"a\n\x1b[2J\xe2\x80\xae")
    with pytest.raises(InvalidModelFileError) as caught:
        check_complete(path)
    assert caught.value.problem == ("is corrupt (tensor a\\n\\x1b[2J\\u202e has 5 dimensions "
                                    "(GGUF allows 1 to 4))")


def test_show_and_run_print_one_line_for_a_gguf_naming_itself_with_escapes(
        tmp_path: Path) -> None:
    from tests.gguf_edit import STRING, GGUFEdit, tiny_header_gguf

    named = gguf_with_a_tensor_name(tmp_path / "named.gguf", b"evil\nllmkit: fake line\x1b[31m")
    shown = run_llmkit(["show", str(named)])
    # Was two lines, the second starting "llmkit: fake line" in red.
    assert shown.returncode == 1
    assert shown.stderr == (f"llmkit: error: {named}: is corrupt (tensor evil\\nllmkit: fake "
                            "line\\x1b[31m has 5 dimensions (GGUF allows 1 to 4)) (download or "
                            "convert it again)\n")
    arch = GGUFEdit(tiny_header_gguf(tmp_path / "tiny.gguf", 4))
    arch.kv["general.architecture"] = (STRING, "x\n\x1b[2J")  # the key names are built from it
    path = arch.write(tmp_path / "arch.gguf")
    ran = run_llmkit(["run", "-m", str(path), "hi"])
    assert ran.returncode == 1
    assert ran.stderr == (f"llmkit: error: {path}: x\\n\\x1b[2J.block_count is missing "
                          "(download or convert it again)\n")
