"""What the fuzz harness found (tests/fuzz), each pinned down: documents, check --batch, JSON."""

from __future__ import annotations

import time

import pytest

from llmkit.documents import html_to_text, read_document, tidy_text

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
