"""read_document: encodings, binary refusals, HTML extraction, PDFs, Markdown titles, errors."""

from __future__ import annotations

import importlib.util
import io
import os
import re
import sys
from pathlib import Path

import pytest

from llmkit.documents import (
    DOCUMENT_FORMATS,
    DOCUMENT_SUFFIXES,
    Document,
    decode_text,
    html_to_text,
    markdown_title,
    read_document,
    tidy_text,
)
from llmkit.errors import DocumentError, LlmkitError, UsageError

# --- helpers -----------------------------------------------------------------------------------


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def make_pdf(pages: list[str | None], *, title: str | None = None) -> bytes:
    """A valid PDF built by hand: one Helvetica text line per line of each page's text.

    A page given as None has a drawing and no text, as a scanned page has an image.
    """
    count = len(pages)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        (f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(count))}] "
         f"/Count {count} >>").encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, text in enumerate(pages):
        if text is None:
            content = b"0.5 g 72 72 468 648 re f"
        else:
            ops = " 0 -16 Td ".join(f"{_pdf_string(line)} Tj" for line in text.split("\n"))
            content = f"BT /F1 12 Tf 72 720 Td {ops} ET".encode("latin-1")
        objects.append((f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                        f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>"
                        ).encode())
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    info = ""
    if title is not None:
        objects.append(f"<< /Title {_pdf_string(title)} >>".encode("latin-1"))
        info = f" /Info {len(objects)} 0 R"
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += (f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{info} >>\n"
            f"startxref\n{xref}\n%%EOF\n").encode()
    return bytes(out)


def encrypt_pdf(data: bytes, user_password: str) -> bytes:
    pypdf = pytest.importorskip("pypdf")
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(data)))
    # RC4 needs no cryptography package; pypdf implements it itself.
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def error_of(source: Path | bytes, **kwargs: str) -> str:
    with pytest.raises(DocumentError) as caught:
        read_document(source, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, name: str, data: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# --- encodings ---------------------------------------------------------------------------------

SMART = "\u201cCaf\u00e9\u201d costs 5 \u20ac \u2014 na\u00efve"


@pytest.mark.parametrize(("data", "text", "encoding", "warnings"), [
    pytest.param("caf\u00e9 \u20ac".encode(), "caf\u00e9 \u20ac", "utf-8", (), id="utf-8"),
    pytest.param(b"\xef\xbb\xbfcaf\xc3\xa9", "caf\u00e9", "utf-8", (), id="utf-8-bom"),
    pytest.param("\ufeffcaf\u00e9 \u20ac".encode("utf-16-le"), "caf\u00e9 \u20ac", "utf-16-le",
                 (), id="utf-16-le-bom"),
    pytest.param("\ufeffcaf\u00e9 \u20ac".encode("utf-16-be"), "caf\u00e9 \u20ac", "utf-16-be",
                 (), id="utf-16-be-bom"),
    pytest.param("\ufeffcaf\u00e9 \U0001f600".encode("utf-32-le"), "caf\u00e9 \U0001f600",
                 "utf-32-le", (), id="utf-32-le-bom"),
    pytest.param("\ufeffcaf\u00e9".encode("utf-32-be"), "caf\u00e9", "utf-32-be", (),
                 id="utf-32-be-bom"),
    pytest.param("plain text, no mark".encode("utf-16-le"), "plain text, no mark", "utf-16-le",
                 (), id="utf-16-le-no-bom"),
    pytest.param("plain text, no mark".encode("utf-16-be"), "plain text, no mark", "utf-16-be",
                 (), id="utf-16-be-no-bom"),
    pytest.param(SMART.encode("cp1252"), SMART, "windows-1252",
                 ("doc is not UTF-8; read it as Windows-1252",), id="cp1252"),
    pytest.param("Gr\u00f6\u00dfe \u00bd \u00a9".encode("latin-1"), "Gr\u00f6\u00dfe \u00bd \u00a9",
                 "windows-1252", ("doc is not UTF-8; read it as Windows-1252",), id="latin-1"),
    # 0x81 is undefined in Windows-1252: it keeps its Latin-1 meaning; 0x80 is still €.
    pytest.param(b"a\x81b\x80", "a\x81b\u20ac", "windows-1252",
                 ("doc is not UTF-8; read it as Windows-1252",), id="cp1252-undefined-byte"),
    # An ASCII file with one stray Latin-1 byte is Windows-1252, not damaged UTF-8.
    pytest.param(b"ASCII and caf\xe9", "ASCII and caf\u00e9", "windows-1252",
                 ("doc is not UTF-8; read it as Windows-1252",), id="ascii-with-latin-1-byte"),
    pytest.param("na\u00efve caf\u00e9 r\u00e9sum\u00e9 ".encode() + b"\xff\xfe\xe9 end",
                 "na\u00efve caf\u00e9 r\u00e9sum\u00e9 \ufffd\ufffd\ufffd end", "utf-8",
                 ("doc is not valid UTF-8: replaced 3 bad bytes with U+FFFD",),
                 id="utf-8-with-bad-bytes"),
    pytest.param("\u00fcber \u20ac".encode()[:-1] + "\u00e4\u00f6".encode(),
                 "\u00fcber \ufffd\ufffd\u00e4\u00f6", "utf-8",
                 ("doc is not valid UTF-8: replaced 2 bad bytes with U+FFFD",),
                 id="utf-8-cut-character"),
    pytest.param("\ufeffab".encode("utf-16-le") + b"x", "ab\ufffd", "utf-16-le",
                 ("doc is not valid UTF-16-LE: replaced 1 bad character with U+FFFD",),
                 id="utf-16-odd-length"),
    # A genuine U+FFFD in the file is not counted as a replaced byte.
    pytest.param("\ufffd \u00e9\u00e9".encode() + b"\xff", "\ufffd \u00e9\u00e9\ufffd", "utf-8",
                 ("doc is not valid UTF-8: replaced 1 bad byte with U+FFFD",),
                 id="genuine-replacement-character"),
    pytest.param(b"GGUF is a file format", "GGUF is a file format", "utf-8", (),
                 id="text-starting-like-gguf"),
    pytest.param(b"\x1b[31mred\x1b[0m\tlog", "\x1b[31mred\x1b[0m\tlog", "utf-8", (),
                 id="ansi-colours"),
])
def test_decode_text(data: bytes, text: str, encoding: str, warnings: tuple[str, ...]) -> None:
    assert decode_text(data, "doc") == (text, encoding, warnings)


@pytest.mark.parametrize(("data", "message"), [
    (b"abc\x00def", "doc is a binary file, not text"),
    (bytes(range(1, 8)) * 10, "doc is a binary file, not text"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
     "doc is a binary file (looks like a PNG image), not text "
     "(describe an image with `llmkit caption`)"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF",
     "doc is a binary file (looks like a JPEG image), not text "
     "(describe an image with `llmkit caption`)"),
    (b"PK\x03\x04\x14\x00\x00\x00data",
     "doc is a binary file (looks like a ZIP archive), not text"),
    (b"PK\x03\x04\x14\x00\x00\x00[Content_Types].xml...word/document.xml",
     "doc is a binary file (looks like a Word document), not text "
     "(export it as PDF, HTML or plain text first)"),
    (b"PK\x03\x04\x14\x00\x00\x00mimetypeapplication/vnd.oasis.opendocument.text",
     "doc is a binary file (looks like an OpenDocument text), not text "
     "(export it as PDF, HTML or plain text first)"),
    (b"GGUF\x03\x00\x00\x00\x05\x00\x00\x00",
     "doc is a binary file (looks like a GGUF model file), not text"),
    (b"\x1f\x8b\x08\x00", "doc is a binary file (looks like a gzip archive), not text"),
    (b"\x7fELF\x02\x01\x01\x00", "doc is a binary file (looks like a program), not text"),
    (b"SQLite format 3\x00\x10\x00",
     "doc is a binary file (looks like an SQLite database), not text"),
    (b"\x40\x00\x00\x00\x00\x00\x00\x00{\"w\": {\"dtype\": \"F16\"}}",
     "doc is a binary file (looks like a safetensors file), not text"),
])
def test_binary_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(DocumentError) as caught:
        decode_text(data, "doc")
    assert str(caught.value) == message
    assert caught.value.path == "doc"


def test_nul_bytes_past_the_head_of_a_text_are_dropped_with_a_warning() -> None:
    # A log that a crash padded with zeros is still a log.
    data = b"line one\n" * 1000 + b"\x00" * 16 + b"line two\n"
    text, encoding, warnings = decode_text(data, "app.log")
    assert text == "line one\n" * 1000 + "line two\n"
    assert encoding == "utf-8"
    assert warnings == ("app.log contains 16 NUL bytes; left them out",)


def test_read_document_reports_encoding_and_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.txt", "\u201cQuoted\u201d\r\nsecond line\r\n".encode("cp1252"))
    document = read_document(path)
    assert document == Document(
        text="\u201cQuoted\u201d\nsecond line", source=str(path), format="text",
        encoding="windows-1252", title=None,
        warnings=(f"{path} is not UTF-8; read it as Windows-1252",), pages=None)


def test_utf16_file_with_crlf(tmp_path: Path) -> None:
    path = write(tmp_path, "w.txt", "\ufeffone\r\ntwo\r\n".encode("utf-16-le"))
    document = read_document(path)
    assert (document.text, document.encoding, document.warnings) == ("one\ntwo", "utf-16-le", ())


def test_binary_file_named_txt(tmp_path: Path) -> None:
    path = write(tmp_path, "model.txt", b"GGUF\x03\x00\x00\x00" + bytes(64))
    assert error_of(path) == f"{path} is a binary file (looks like a GGUF model file), not text"


# --- text, Markdown, tidying -------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "tidy"), [
    ("a\r\nb\rc\n", "a\nb\nc"),
    ("trailing   \nspaces\t\n", "trailing\nspaces"),
    ("\n\n  indented first line\n\n\nkept blank lines\n\n\n",
     "  indented first line\n\n\nkept blank lines"),
    ("page one\n\fpage two", "page one\n\npage two"),
    ("page one\f\f\n\fpage two\f", "page one\n\npage two"),
    ("tabs\tand  double  spaces kept", "tabs\tand  double  spaces kept"),
    ("N\bNA\bAM\bME\bE and _\bu_\bn_\bd_\be_\br", "NAME and under"),
    ("word\vbreak", "word\nbreak"),
    (" \n\t\n", ""),
])
def test_tidy_text(raw: str, tidy: str) -> None:
    assert tidy_text(raw) == tidy


def test_text_file_keeps_everything(tmp_path: Path) -> None:
    body = "# not a title in a .txt\n\n* bullet  \n<b>markup</b> kept\r\n"
    document = read_document(write(tmp_path, "a.txt", body))
    assert document.text == "# not a title in a .txt\n\n* bullet\n<b>markup</b> kept"
    assert (document.format, document.title, document.encoding) == ("text", None, "utf-8")


@pytest.mark.parametrize(("markdown", "title"), [
    ("# Report  \n\nbody", "Report"),
    ("intro\n\n## Second level\n\n# The Title #\n", "The Title"),
    ("Setext Title\n============\n\ntext", "Setext Title"),
    ("```bash\n# a shell comment\n```\n\n# Real", "Real"),
    ("~~~~\n# inside\n~~~\n# still inside\n~~~~\n#no-space\n    # indented code", None),
    ("---\ntitle: \"From Front Matter\"\nauthor: me\n---\n\n# Heading", "From Front Matter"),
    ("---\nauthor: me\n---\n# Heading after front matter", "Heading after front matter"),
    ("# C# in depth", "C# in depth"),
    ("no heading at all", None),
])
def test_markdown_title(markdown: str, title: str | None) -> None:
    assert markdown_title(markdown) == title


def test_markdown_file(tmp_path: Path) -> None:
    path = write(tmp_path, "README.markdown", "\ufeff# Title\r\n\r\nSome *text*.   \r\n")
    document = read_document(path)
    assert (document.text, document.format, document.title) == (
        "# Title\n\nSome *text*.", "markdown", "Title")


@pytest.mark.parametrize("content", [b"", b"   \n\t\r\n  ", b"\f\n",
                                     "\ufeff \n".encode("utf-16-le")])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path, "empty.md", content)
    assert error_of(path) == f"{path} is empty"


# --- files, stdin and formats ------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nope.txt") == f"{tmp_path / 'nope.txt'} does not exist"


def test_directory(tmp_path: Path) -> None:
    assert error_of(tmp_path) == f"{tmp_path} is a directory"


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0,
                    reason="root (and Windows) read files whatever their mode")
def test_permission_denied(tmp_path: Path) -> None:
    path = write(tmp_path, "secret.txt", "x")
    path.chmod(0)
    try:
        assert error_of(path) == f"{path} cannot be read (permission denied)"
    finally:
        path.chmod(0o600)


def test_name_replaces_the_path_in_messages(tmp_path: Path) -> None:
    assert error_of(tmp_path / "x.txt", name="report") == "report does not exist"


def test_errors_are_llmkit_errors_with_fields(tmp_path: Path) -> None:
    with pytest.raises(LlmkitError) as caught:
        read_document(b"", name="stdin")
    assert isinstance(caught.value, DocumentError)
    assert (caught.value.path, caught.value.reason) == ("stdin", "is empty")


def test_stdin_bytes() -> None:
    document = read_document(b"from a pipe\r\n")
    assert document == Document(text="from a pipe", source="stdin", format="text",
                                encoding="utf-8", title=None, warnings=(), pages=None)
    assert error_of(b"") == "stdin is empty"
    assert error_of(b" \n ") == "stdin is empty"
    assert error_of(b"\x00\x01\x02") == "stdin is a binary file, not text"
    assert read_document(b"\xe9t\xe9").warnings == ("stdin is not UTF-8; read it as Windows-1252",)


def test_stdin_html_and_markdown_name() -> None:
    html = read_document(b"  <!DOCTYPE html><title>T</title><p>Body</p>")
    assert (html.format, html.text, html.title) == ("html", "Body", "T")
    # A name with a suffix says what stdin holds.
    markdown = read_document(b"# Head\n\ntext", name="notes.md")
    assert (markdown.source, markdown.format, markdown.title) == ("notes.md", "markdown", "Head")


@pytest.mark.parametrize(("name", "data", "fmt"), [
    ("page.htm", b"<p>x</p>", "html"),
    ("page.xhtml", b"<p>x</p>", "html"),
    ("page", b"<?xml version='1.0'?>\n<!-- generated -->\n<html><p>x</p></html>", "html"),
    ("page.unknown", b"<HTML><BODY>x</BODY></HTML>", "html"),
    ("notes.rst", b"<html> is just text here", "text"),
    ("notes", b"plain", "text"),
    ("notes.org", b"* heading", "text"),
])
def test_format_from_suffix_or_content(tmp_path: Path, name: str, data: bytes, fmt: str) -> None:
    assert read_document(write(tmp_path, name, data)).format == fmt


def test_utf16_html_is_recognised_after_decoding() -> None:
    data = "\ufeff<!doctype html><title>Wide</title><h1>Hi</h1>".encode("utf-16-le")
    document = read_document(data)
    assert (document.format, document.encoding, document.text, document.title) == (
        "html", "utf-16-le", "# Hi", "Wide")


def test_format_override(tmp_path: Path) -> None:
    path = write(tmp_path, "page.html", "<p>kept <b>as</b> markup</p>")
    assert read_document(path, format="text").text == "<p>kept <b>as</b> markup</p>"
    assert read_document(b"no tags at all", format="html").text == "no tags at all"
    with pytest.raises(UsageError) as caught:
        read_document(path, format="docx")
    assert str(caught.value) == ("unknown document format 'docx' "
                                 "(choose text, markdown, html or pdf)")


def test_html_declared_charset_is_used_when_not_utf8() -> None:
    page = ("<html><head><meta charset=\"windows-1251\"><title>\u041f\u0440\u0438\u0432\u0435\u0442"
            "</title></head><p>\u041c\u0438\u0440</p></html>")
    document = read_document(page.encode("cp1251"), name="ru.html")
    assert (document.text, document.title, document.encoding, document.warnings) == (
        "\u041c\u0438\u0440", "\u041f\u0440\u0438\u0432\u0435\u0442", "windows-1251", ())
    shift_jis = ("<html><meta http-equiv=Content-Type content='text/html; charset=Shift_JIS'>"
                 "<p>\u65e5\u672c\u8a9e</p>").encode("shift_jis")
    document = read_document(shift_jis, name="ja.html")
    assert (document.text, document.encoding) == ("\u65e5\u672c\u8a9e", "shift_jis")


@pytest.mark.parametrize("charset", ["base64", "rot13", "no-such-charset", "utf-16"])
def test_html_declared_charset_that_is_no_text_encoding(charset: str) -> None:
    page = f"<meta charset={charset}><p>caf\u00e9</p>".encode("cp1252")
    document = read_document(page, name="p.html")
    assert (document.text, document.encoding, document.warnings) == (
        "caf\u00e9", "windows-1252", ("p.html is not UTF-8; read it as Windows-1252",))


def test_html_declared_charset_loses_to_valid_utf8() -> None:
    # Pages re-saved as UTF-8 often keep a stale declaration.
    page = "<meta charset=iso-8859-1><p>caf\u00e9</p>".encode()
    assert read_document(page, name="p.html").text == "caf\u00e9"


def test_html_without_visible_text(tmp_path: Path) -> None:
    path = write(tmp_path, "app.html", "<html><script>render()</script><div hidden>x</div></html>")
    assert error_of(path) == f"{path} has no visible text (only markup)"


def test_document_suffixes() -> None:
    assert {".txt", ".md", ".markdown", ".rst", ".html", ".htm", ".xhtml", ".pdf", ".text",
            ".org", ".adoc"} <= DOCUMENT_SUFFIXES
    assert not {".csv", ".json", ".log", ".docx", ".gguf"} & DOCUMENT_SUFFIXES
    assert all(suffix == suffix.lower() and suffix.startswith(".") for suffix in DOCUMENT_SUFFIXES)
    assert DOCUMENT_FORMATS == ("text", "markdown", "html", "pdf")


# --- HTML --------------------------------------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html lang="en"><head>
  <meta charset="utf-8"><title>  Quarterly
  report &amp; notes </title>
  <style>body { color: red }</style>
  <script>var s = "<p>not text</p>";</script>
</head>
<body>
<!-- a comment -->
<nav aria-hidden="true">Skip to content</nav>
<h1>Quarterly   report</h1>
<p>Revenue <b>rose</b> by 5&nbsp;%,
   as   expected.</p><p>Costs &lt;fell&gt; &mdash; slightly.</p>
<h2 id="x">Details <small>(draft)</small></h2>
<ul>
  <li>North</li>
  <li>South<ul><li>Coast</li></ul></li>
</ul>
<ol start="3"><li>third<li value="7">seventh<li>eighth</ol>
<pre>
  def f():
      return 1
</pre>
<table><tr><th>Region</th><th>Sales</th></tr>
<tr><td>North</td><td> 10 </td></tr></table>
<p>line<br>break<br><br>gap</p>
<div hidden>hidden</div><p style="display: none">invisible</p>
<noscript>Enable JavaScript</noscript><template><p>template</p></template>
<svg viewBox="0 0 1 1"><title>icon</title><text>svg text</text></svg>
<iframe src="x">frame fallback</iframe>
<details><summary>More</summary><p hidden="until-found">Found by search</p></details>
</body></html>
"""

PAGE_TEXT = """# Quarterly report

Revenue rose by 5 %, as expected.

Costs <fell> \u2014 slightly.

## Details (draft)

- North
- South
  - Coast

3. third
7. seventh
8. eighth

  def f():
      return 1

Region | Sales
North | 10

line
break

gap

More

Found by search"""


def test_html_page() -> None:
    assert html_to_text(PAGE) == (PAGE_TEXT, "Quarterly report & notes")


@pytest.mark.parametrize(("html", "text"), [
    ("<p>a</p><p>b</p>", "a\n\nb"),
    ("<div>a</div><div>b</div>", "a\nb"),
    ("a<div>b</div>c", "a\nb\nc"),
    ("<p>Hello <em>big</em> <a href='#'>world</a>!</p>", "Hello big world!"),
    ("<span>a</span><span>b</span>", "ab"),
    ("<h3>  Spaced\n heading </h3>text", "### Spaced heading\n\ntext"),
    ("<h2>two<br>lines</h2>", "## two lines"),
    ("<h1></h1><p>no empty heading</p>", "no empty heading"),
    ("<pre>\n\nkeep   two\n\n\nblank  lines\n</pre>after",
     "keep   two\n\n\nblank  lines\n\nafter"),
    ("<pre><code>x = 1<br>y = 2</code></pre>", "x = 1\ny = 2"),
    ("&lt;&gt;&amp;&quot;&#39;&#x41;&eacute; &copy;", "<>&\"'A\u00e9 \u00a9"),
    ("<script>if (a < b) { x = '</div>'; }</script>visible", "visible"),
    ("<style>p::before { content: 'x' }</style><p>styled</p>", "styled"),
    ("<p>x<!-- <p>gone</p> -->y</p>", "xy"),
    ("<dl><dt>Term</dt><dd>Meaning</dd></dl>", "Term\nMeaning"),
    ("<p>one</p><hr><p>two</p>", "one\n\ntwo"),
    ("<blockquote>quoted</blockquote>said", "quoted\n\nsaid"),
    ("<span aria-hidden=true>\u2605</span>star<span aria-hidden='false'> shown</span>",
     "star shown"),
    ("<table><tr><td>a<td>b<tr><td>c<td>d</table>", "a | b\nc | d"),
])
def test_html_fragments(html: str, text: str) -> None:
    assert html_to_text(html)[0] == text


@pytest.mark.parametrize(("html", "text"), [
    ("<p>unclosed <b>bold", "unclosed bold"),
    ("<p>one<p>two<p hidden>three<p>four", "one\n\ntwo\n\nfour"),
    ("<ul><li>a<li>b</ul>after", "- a\n- b\n\nafter"),
    ("</p></div></span>stray end tags", "stray end tags"),
    ("<div><p>x</div>y", "x\n\ny"),
    ("<h1>one<h2>two", "# one\n\n## two"),
    ("<b><i>misnested</b></i> text", "misnested text"),
    ("<p>broken <a href='x>link</a> text", "broken <a href='x>link text"),
    ("<<>>< p>", "<<>>< p>"),
    ("<!doctype><![CDATA[x]]><?php echo 1 ?>text", "text"),
    ("<script>never closed", ""),
    ("<title>unclosed title", ""),
    ("text &zzz; &amp; &notin; &amp", "text &zzz; & \u2209 &"),
    ("<svg/><p>after a self-closed svg</p>", "after a self-closed svg"),
    ("<div hidden><p>nested<div>deeper</div></p></div>shown", "shown"),
])
def test_malformed_html_does_not_crash(html: str, text: str) -> None:
    assert html_to_text(html)[0] == text


def test_html_title() -> None:
    assert html_to_text("<title>unclosed title")[1] == "unclosed title"
    assert html_to_text("<p>no title</p>")[1] is None
    assert html_to_text("<title> </title><p>x</p>")[1] is None
    assert html_to_text("<title>First</title><title>Second</title>")[1] == "First"
    assert html_to_text("<svg><title>not the page's</title></svg>")[1] is None


def test_html_file(tmp_path: Path) -> None:
    document = read_document(write(tmp_path, "page.html", PAGE))
    assert (document.format, document.text, document.title, document.encoding) == (
        "html", PAGE_TEXT, "Quarterly report & notes", "utf-8")


# --- PDF ---------------------------------------------------------------------------------------


def test_pdf_without_pypdf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pypdf", None)  # import pypdf now raises ImportError
    path = write(tmp_path, "paper.pdf", make_pdf(["Hello"]))
    assert error_of(path) == (f"{path} is a PDF, and reading PDFs needs the optional pypdf "
                              "package (pip install 'llmkit[pdf]')")
    with pytest.raises(DocumentError) as caught:
        read_document(make_pdf(["Hello"]))
    assert caught.value.hint == "pip install 'llmkit[pdf]'"


def test_pdf(tmp_path: Path) -> None:
    pytest.importorskip("pypdf")
    path = write(tmp_path, "paper.pdf",
                 make_pdf(["First page (intro)\nsecond line", "Page two"], title="A  Paper"))
    document = read_document(path)
    assert document == Document(text="First page (intro)\nsecond line\n\nPage two",
                                source=str(path), format="pdf", encoding=None,
                                title="A Paper", warnings=(), pages=2)


def test_pdf_recognised_by_content() -> None:
    pytest.importorskip("pypdf")
    document = read_document(make_pdf(["piped"]))
    assert (document.format, document.text, document.title, document.pages) == (
        "pdf", "piped", None, 1)


def test_pdf_named_txt_is_still_a_pdf(tmp_path: Path) -> None:
    pytest.importorskip("pypdf")
    assert read_document(write(tmp_path, "x.txt", make_pdf(["inside"]))).text == "inside"


def test_pdf_blank_pages_are_skipped() -> None:
    pytest.importorskip("pypdf")
    document = read_document(make_pdf(["one", None, "three"]))
    assert (document.text, document.pages) == ("one\n\nthree", 3)


def test_pdf_without_text(tmp_path: Path) -> None:
    pytest.importorskip("pypdf")
    path = write(tmp_path, "scan.pdf", make_pdf([None, None]))
    assert error_of(path) == (f"{path} has no extractable text (scanned pages are images) "
                              "(run OCR on it first, e.g. `ocrmypdf in.pdf out.pdf`)")


def test_encrypted_pdf(tmp_path: Path) -> None:
    path = write(tmp_path, "locked.pdf", encrypt_pdf(make_pdf(["secret"]), "pw"))
    assert error_of(path) == (f"{path} is encrypted and needs a password (decrypt it first, "
                              "e.g. `qpdf --decrypt --password=PASSWORD in.pdf out.pdf`)")


def test_pdf_encrypted_only_against_copying_is_read() -> None:
    document = read_document(encrypt_pdf(make_pdf(["open to read"]), ""))
    assert document.text == "open to read"


def test_aes_pdf_without_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    pypdf = pytest.importorskip("pypdf")
    data = encrypt_pdf(make_pdf(["x"]), "")

    def needs_cryptography(self: object, password: str) -> None:
        raise pypdf.errors.DependencyError("cryptography>=3.1 is required for AES algorithm")

    monkeypatch.setattr(pypdf.PdfReader, "decrypt", needs_cryptography)
    assert error_of(data, name="aes.pdf") == (
        "aes.pdf is encrypted with AES, and decrypting it needs the cryptography package "
        "(pip install cryptography)")


def test_aes_pdf_without_cryptography_real_file() -> None:
    pytest.importorskip("pypdf")
    if importlib.util.find_spec("cryptography") is not None:
        pytest.skip("cryptography is installed, so AES is decrypted")
    # pypdf cannot write AES without cryptography, so an RC4 file's encryption dictionary is
    # rewritten to say AESV2 (same key and password check at revision 4): opening works,
    # reading a stream needs AES.
    data = encrypt_pdf(make_pdf(["x"]), "").replace(
        b"/V 2\n/R 3\n",
        b"/V 4\n/R 4\n/CF << /StdCF << /CFM /AESV2 /Length 16 >> >>\n/StmF /StdCF\n/StrF /StdCF\n")
    data = re.sub(rb"startxref\n\d+", b"startxref\n%d" % (data.rfind(b"\nxref\n") + 1), data)
    assert error_of(data, name="aes.pdf") == (
        "aes.pdf is encrypted with AES, and decrypting it needs the cryptography package "
        "(pip install cryptography)")


@pytest.mark.parametrize("cut", [10, 300, -40])
def test_truncated_pdf(tmp_path: Path, cut: int) -> None:
    pytest.importorskip("pypdf")
    path = write(tmp_path, "cut.pdf", make_pdf(["Hello", "World"])[:cut])
    message = error_of(path)
    # The reason after the colon is pypdf's own words ("startxref not found", "Stream has
    # ended unexpectedly"), which change between its versions.
    assert message.startswith(f"{path} is not a readable PDF: ")
    assert len(message) > len(f"{path} is not a readable PDF: ")


def test_pdf_suffix_on_something_else(tmp_path: Path) -> None:
    html = write(tmp_path, "download.pdf", "<!DOCTYPE html><p>Access denied</p>")
    assert error_of(html) == f"{html} is not a readable PDF: it looks like an HTML page"
    zipped = write(tmp_path, "z.pdf", b"PK\x03\x04\x14\x00\x00\x00")
    assert error_of(zipped) == f"{zipped} is not a readable PDF: it looks like a ZIP archive"
    text = write(tmp_path, "t.pdf", "just words")
    assert error_of(text) == f"{text} is not a readable PDF: it does not start with %PDF-"
    assert error_of(b"plain", format="pdf") == (
        "stdin is not a readable PDF: it does not start with %PDF-")


def test_pdf_page_that_fails_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    pypdf = pytest.importorskip("pypdf")
    original = pypdf.PageObject.extract_text

    def flaky(self: object, *args: object, **kwargs: object) -> str:
        text: str = original(self, *args, **kwargs)
        if text == "bad":
            raise KeyError("/Font")
        return text

    monkeypatch.setattr(pypdf.PageObject, "extract_text", flaky)
    document = read_document(make_pdf(["good", "bad"]), name="p.pdf")
    assert (document.text, document.pages, document.warnings) == (
        "good", 2, ("p.pdf: page 2 could not be read ('/Font'); left it out",))
    assert error_of(make_pdf(["bad"]), name="q.pdf") == "q.pdf is not a readable PDF: '/Font'"


def test_pypdf_chatter_stays_off_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pypdf")
    data = make_pdf(["Hello"])
    # A wrong startxref offset: pypdf repairs it, and logs that it did.
    broken = data.replace(b"startxref\n", b"startxref\n1").replace(b"%%EOF\n", b"%%EOF")
    document = read_document(broken)
    assert document.text == "Hello"
    assert capfd.readouterr().err == ""
