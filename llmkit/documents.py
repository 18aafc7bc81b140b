"""Documents (plain text, Markdown, HTML, PDF; files or stdin) turned into the text to summarize."""

from __future__ import annotations

import codecs
import importlib
import io
import logging
import re
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import DocumentError, InputFileError, UsageError

if TYPE_CHECKING:
    from llmkit.io import ReadLimit

DOCUMENT_FORMATS: tuple[str, ...] = ("text", "markdown", "html", "pdf")

# The largest document read (file bytes, or a PDF's extracted text). Summaries handle any length
# by chunking, so this is not about the context: it bounds memory (tokenizing a document takes
# about 30 bytes per byte of text, so 32 MiB peaks near 1 GB) and time (8 million tokens, half a
# day of prompt evaluation for a 1B model on a laptop CPU). It is 6 times the complete works of
# Shakespeare, and holds all but image-heavy PDFs; `summarize --max-bytes` raises it.
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

# What each suffix means. Lightweight markup other than Markdown (reStructuredText, Org,
# AsciiDoc) is read as plain text: a model reads its markup as well as a person does, and
# every character of it is kept.
_SUFFIX_FORMATS: dict[str, str] = {
    ".txt": "text", ".text": "text",
    ".rst": "text", ".org": "text", ".adoc": "text", ".asciidoc": "text",
    ".md": "markdown", ".markdown": "markdown", ".mdown": "markdown", ".mkd": "markdown",
    ".mkdn": "markdown",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".pdf": "pdf",
}

# What a directory walk picks up: prose only. Data files (.csv, .tsv, .json, .log) are left
# out on purpose: a folder of documents often sits next to large exports and logs, which
# would swamp a batch with things nobody meant to summarize. Named explicitly, any file is
# still read (as text, or by what its content turns out to be).
DOCUMENT_SUFFIXES: frozenset[str] = frozenset(_SUFFIX_FORMATS)

# Enough of the file to recognise what it is. git calls a file binary when its first 8000
# bytes hold a NUL; the same rule here, rounded up.
_SNIFF_BYTES = 8192

# Random or compressed data has about 11 % C0 control bytes and text has next to none, so a
# few per cent cleanly separates the two. Tab, newline, vertical tab, form feed, carriage
# return, backspace (man-page overstrike), ESC (ANSI colours in logs) and SUB (the DOS
# end-of-file mark) occur in real text and are not counted.
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\x0b\x0c\r\x08\x1b\x1a") + b"\x7f"
_BINARY_CONTROL_SHARE = 0.02

# Byte-order marks, longest first: the UTF-32-LE mark begins with the UTF-16-LE one.
_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

# Signatures of files people mistake for documents, for the error message. A signature made
# only of printable ASCII (GGUF, GIF8…) decides nothing alone (a text may begin "GGUF is…");
# one with other bytes is never the start of a text.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"GGUF", "a GGUF model file"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"RIFF", "a RIFF media file"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"BZh", "a bzip2 archive"),
    (b"\xfd7zXZ\x00", "an xz archive"),
    (b"\x28\xb5\x2f\xfd", "a zstd archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x7fELF", "a program"),
    (b"MZ", "a Windows program"),
    (b"\xcf\xfa\xed\xfe", "a Mach-O program"),
    (b"\xca\xfe\xba\xbe", "a Mach-O program or Java class"),
    (b"\x00asm", "a WebAssembly module"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old-style Microsoft Office document"),
    (b"PAR1", "a Parquet file"),
    (b"\x93NUMPY", "a NumPy array"),
    (b"ID3", "an MP3 audio file"),
    (b"OggS", "an Ogg media file"),
    (b"fLaC", "a FLAC audio file"),
    (b"\x1aE\xdf\xa3", "a Matroska/WebM video"),
)

# ZIP containers, told apart by a member name or OOXML/ODF/EPUB mimetype they hold.
_ZIP_KINDS: tuple[tuple[bytes, str], ...] = (
    (b"word/", "a Word document"),
    (b"xl/", "an Excel workbook"),
    (b"ppt/", "a PowerPoint presentation"),
    (b"application/vnd.oasis.opendocument.text", "an OpenDocument text"),
    (b"application/vnd.oasis.opendocument.spreadsheet", "an OpenDocument spreadsheet"),
    (b"application/vnd.oasis.opendocument.presentation", "an OpenDocument presentation"),
    (b"application/epub+zip", "an EPUB book"),
    (b"data.pkl", "a PyTorch checkpoint"),
)

_OFFICE_HINT = "export it as PDF, HTML or plain text first"

# Windows-1252 leaves five bytes undefined; they keep their Latin-1 meaning (C1 controls),
# as browsers do. Every other byte 0x80–0x9F is a Windows-1252 character (€, smart quotes…).
_CP1252_UNDEFINED = frozenset(b"\x81\x8d\x8f\x90\x9d")
_CP1252_TABLE = "".join(
    chr(b) if b in _CP1252_UNDEFINED else bytes([b]).decode("cp1252") for b in range(256))


@dataclass(frozen=True)
class Document:
    """A document as text, with what was learnt reading it.

    ``text`` has "\\n" newlines, no trailing whitespace on any line, and no blank lines at
    either end; text and Markdown are otherwise exactly as written.
    """

    text: str
    source: str  # the path as given, or "stdin"
    format: str  # "text", "markdown", "html" or "pdf"
    encoding: str | None  # "utf-8", "utf-16-le", "windows-1252", …; None for a PDF
    title: str | None  # HTML <title>, PDF metadata title, or Markdown's first-level heading
    warnings: tuple[str, ...] = ()  # one line each, for stderr
    pages: int | None = None  # pages in a PDF


def read_document(
    source: Path | bytes,
    *,
    name: str | None = None,
    format: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Document:
    """Read a document file (or stdin's bytes) as text.

    The format comes from ``format``, else from the file's suffix, else from the content
    (``%PDF-`` is a PDF, ``<!doctype html``/``<html`` is HTML, anything else is text). Text is
    decoded by its byte-order mark, else as UTF-8, else (for HTML) by its declared charset,
    else as Windows-1252 with a warning.

    Args:
        source: the file, or its bytes (stdin).
        name: what to call the document in messages and ``Document.source``; defaults to the
            path as given, or "stdin" for bytes. For bytes, its suffix also names the format.
        format: "text", "markdown", "html" or "pdf", to override the suffix and the content.
        max_bytes: refuse a document larger than this (a file or a pipe is read no further),
            or a PDF holding more text than this.

    Returns:
        The text, and its format, encoding, title, page count and any warnings.

    Raises:
        DocumentError: the file is missing, a directory, a device or a socket, unreadable,
            empty, larger than ``max_bytes``, binary, a PDF that cannot be read (encrypted,
            corrupt, no text, pypdf not installed), or HTML with no visible text.
        UsageError: ``format`` is not one of the four, or ``max_bytes`` is below 1.
    """
    if format is not None and format not in DOCUMENT_FORMATS:
        raise UsageError(f"unknown document format '{format}' "
                         f"(choose {', '.join(DOCUMENT_FORMATS[:-1])} or {DOCUMENT_FORMATS[-1]})")
    if max_bytes < 1:
        raise UsageError(f"the document size limit must be at least 1 byte, not {max_bytes}")
    limit = document_limit(max_bytes)
    if isinstance(source, bytes):
        data = source
        label = name or "stdin"
        suffix = Path(name).suffix.lower() if name else ""
        if len(data) > max_bytes:
            raise _as_document_error(limit.exceeded(label))
    else:
        label = name or str(source)
        data = _read_file(Path(source), label, limit)
        suffix = Path(source).suffix.lower()
    if not data:
        raise DocumentError(label, "is empty")

    fmt = format or _detect_format(data, suffix)
    if fmt == "pdf":
        text, title, pages, notes = _read_pdf(data, label, max_bytes)
        return Document(text=text, source=label, format="pdf", encoding=None, title=title,
                        warnings=notes, pages=pages)

    declared = _declared_charset(data) if fmt == "html" else None
    raw, encoding, notes = _decode(data, label, declared)
    if format is None and fmt == "text" and suffix not in _SUFFIX_FORMATS and _is_html(raw):
        fmt = "html"  # HTML in UTF-16 or behind a byte-order mark, seen only once decoded
    if fmt == "html":
        text, title = html_to_text(raw)
        if not text:
            if raw.strip():
                raise DocumentError(label, "has no visible text (only markup)")
            raise DocumentError(label, "is empty")
    else:
        text = tidy_text(raw)
        title = markdown_title(text) if fmt == "markdown" else None
        if not text:
            raise DocumentError(label, "is empty")
    return Document(text=text, source=label, format=fmt, encoding=encoding, title=title,
                    warnings=notes)


def decode_text(data: bytes, name: str) -> tuple[str, str, tuple[str, ...]]:
    """Decode a text file's bytes, whatever encoding it is likely to be in.

    A byte-order mark (UTF-8, UTF-16, UTF-32) decides first; then UTF-16/32 without a mark,
    recognised by its NUL bytes; then UTF-8. Bytes that are not UTF-8 are Windows-1252 (with a
    warning, since that is a guess), unless they are mostly UTF-8 with a few bad bytes, which
    become U+FFFD (with a warning counting them). Binary files are refused.

    Args:
        data: the bytes.
        name: what to call them in messages.

    Returns:
        The text (byte-order mark removed, newlines untouched), the encoding's name, and
        one-line warnings.

    Raises:
        DocumentError: the bytes are a binary file, not text.
    """
    return _decode(data, name, None)


def tidy_text(text: str) -> str:
    """Newlines as "\\n", no trailing whitespace on a line, form feeds as blank lines.

    Everything else is kept. Backspace overstrike (``man`` output: "b\\bb" bold, "_\\bx"
    underlined) is resolved to the character shown, and NUL characters are dropped.

    Args:
        text: decoded text.

    Returns:
        The text, without blank lines at either end.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\v", "\n")
    if "\x00" in text:
        text = text.replace("\x00", "")
    if "\b" in text:
        text = re.sub(r"[^\n\x08]\x08", "", text)
    pages = (_tidy_lines(page) for page in text.split("\f"))
    return "\n\n".join(page for page in pages if page)


def _tidy_lines(text: str) -> str:
    # str.rstrip strips what the regex \s matches, in linear time: a regex anchored at the
    # line's end retries from every character of a long run of spaces (quadratic).
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def markdown_title(text: str) -> str | None:
    """The document's title: front matter's ``title:``, else the first first-level heading.

    Both ATX ("# Title") and setext ("Title" over "=====") headings count; lines in fenced
    code blocks do not (a shell comment is not a heading).

    Args:
        text: Markdown with "\\n" newlines.

    Returns:
        The title, or None when there is none.
    """
    lines = text.split("\n")
    start = 0
    if lines and lines[0].strip() == "---":
        # YAML front matter (Jekyll, Hugo, Pandoc) closes with "---" or "...".
        for end in range(1, len(lines)):
            if lines[end].strip() in ("---", "..."):
                for line in lines[1:end]:
                    match = re.match(r"title\s*:\s*(.+)$", line)
                    if match:
                        title = match.group(1).strip().strip("'\"").strip()
                        if title:
                            return title
                start = end + 1
                break
    fence: str | None = None
    previous = ""
    for line in lines[start:]:
        stripped = line.strip()
        opener = re.match(r" {0,3}(`{3,}|~{3,})", line)
        if fence is not None:
            closer = re.fullmatch(r" {0,3}(`{3,}|~{3,})[ \t]*", line)
            if closer and closer.group(1)[0] == fence[0] and len(closer.group(1)) >= len(fence):
                fence = None
            previous = ""
            continue
        if opener:
            fence = opener.group(1)
            previous = ""
            continue
        atx = re.match(r" {0,3}#(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$", line)
        if atx:
            title = (atx.group(1) or "").strip()
            if title:
                return title
        elif re.fullmatch(r" {0,3}=+[ \t]*", line) and previous and not line.startswith("    "):
            return previous
        previous = stripped if stripped and not line.startswith("    ") else ""
    return None


# --- reading and recognising ------------------------------------------------------------------


def document_limit(max_bytes: int = DEFAULT_MAX_BYTES) -> ReadLimit:
    """How much of one document is read, and the next step past it."""
    from llmkit.io import ReadLimit, size_argument

    return ReadLimit(max_bytes, "the most llmkit reads of one document",
                     f"raise --max-bytes, e.g. --max-bytes {size_argument(2 * max_bytes)}")


def _as_document_error(error: InputFileError) -> DocumentError:
    return DocumentError(error.path, error.reason, hint=error.hint)


def _read_file(path: Path, label: str, limit: ReadLimit) -> bytes:
    from llmkit.io import read_input

    try:
        return read_input(path, limit, name=label)
    except InputFileError as exc:
        raise _as_document_error(exc) from None
    except OSError as exc:
        raise DocumentError(label, f"cannot be read ({exc.strerror or exc})") from None


def _detect_format(data: bytes, suffix: str) -> str:
    # A PDF is never text, whatever it is called; anything else trusts a known suffix.
    if data[:1024].lstrip(b" \t\r\n\f\x00").startswith(b"%PDF-"):
        return "pdf"
    known = _SUFFIX_FORMATS.get(suffix)
    if known is not None:
        return known
    if _is_html(data[:_SNIFF_BYTES].decode("latin-1")):
        return "html"
    return "text"


def _is_html(text: str) -> bool:
    head = text[:_SNIFF_BYTES].lstrip("\ufeff \t\r\n\f").lower()
    # An XML declaration and comments may come before the doctype (XHTML, generated pages).
    while head.startswith(("<?", "<!--")):
        end = head.find("?>" if head.startswith("<?") else "-->")
        if end < 0:
            return False
        head = head[end + (2 if head.startswith("<?") else 3):].lstrip()
    return head.startswith(("<!doctype html", "<html"))


# The legacy encodings of the WHATWG Encoding Standard, by Python's names for them. UTF-8,
# UTF-16 and Windows-1252 are left out on purpose: see _declared_charset.
_WEB_ENCODINGS = frozenset({
    "cp866", "iso8859-2", "iso8859-3", "iso8859-4", "iso8859-5", "iso8859-6", "iso8859-7",
    "iso8859-8", "iso8859-9", "iso8859-10", "iso8859-11", "tis-620", "iso8859-13",
    "iso8859-14", "iso8859-15", "iso8859-16", "koi8-r", "koi8-u", "mac-roman", "mac-cyrillic",
    "cp874", "cp1250", "cp1251", "cp1253", "cp1254", "cp1255", "cp1256", "cp1257", "cp1258",
    "gbk", "gb2312", "gb18030", "big5", "big5hkscs", "euc_jp", "iso2022_jp", "shift_jis",
    "cp932", "euc_kr", "cp949"})
# Labels the standard has that Python's codec registry does not know.
_WEB_LABELS = {"windows-874": "cp874", "x-mac-cyrillic": "mac-cyrillic", "windows-31j": "cp932",
               "x-sjis": "cp932", "ms_kanji": "cp932", "iso-8859-8-i": "iso8859-8",
               "mac": "mac-roman", "x-mac-roman": "mac-roman", "csmacintosh": "mac-roman"}


def _declared_charset(data: bytes) -> str | None:
    """The charset an HTML page declares in a <meta> tag near its top, as a codec name."""
    match = re.search(rb"<meta[^>]*?charset\s*=\s*[\"']?\s*([A-Za-z0-9._:-]+)",
                      data[:_SNIFF_BYTES], re.IGNORECASE)
    if match is None:
        return None
    label = match.group(1).decode("ascii").lower()
    try:
        codec = _WEB_LABELS.get(label) or codecs.lookup(label).name
    except LookupError:
        return None
    # Only the web's own encodings: Python knows many more codecs by name, and some would
    # read the page as something else entirely (unicode_escape turns "\ud800" into half a
    # character no tokenizer can encode; EBCDIC cannot have declared itself in ASCII). A
    # UTF-16/32 declaration is always wrong (WHATWG: treat it as UTF-8); Latin-1 and ASCII
    # mean Windows-1252 on the web, which is what undecodable bytes become anyway.
    return codec if codec in _WEB_ENCODINGS else None


def _binary_kind(data: bytes) -> tuple[str | None, bool]:
    """What the bytes look like by their signature, and whether that alone proves them binary."""
    if data.startswith(b"PK\x03\x04") or data.startswith(b"PK\x05\x06"):
        for marker, kind in _ZIP_KINDS:
            if marker in data:
                return kind, True
        return "a ZIP archive", True
    if len(data) >= 10 and data[8:10] == b'{"' and b"\x00" in data[:8]:
        return "a safetensors file", True
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind, any(b < 0x20 or b >= 0x7F for b in magic)
    return None, False


def _binary_error(label: str, kind: str | None) -> DocumentError:
    if kind is None:
        return DocumentError(label, "is a binary file, not text")
    hint = None
    if "image" in kind:
        hint = "describe an image with `llmkit caption`"
    elif any(word in kind for word in ("Word", "Excel", "PowerPoint", "OpenDocument", "EPUB",
                                       "Office")):
        hint = _OFFICE_HINT
    return DocumentError(label, f"is a binary file (looks like {kind}), not text", hint=hint)


def _decode(data: bytes, label: str, declared: str | None) -> tuple[str, str, tuple[str, ...]]:
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return _decode_unicode(data[len(bom):], encoding, label)
    head = data[:_SNIFF_BYTES]
    kind, certain = _binary_kind(data)
    if certain:
        raise _binary_error(label, kind)
    if b"\x00" in head:
        wide = _bomless_wide(data)
        if wide is None:
            raise _binary_error(label, kind)
        return _decode_unicode(data, wide, label)
    controls = len(data) - len(data.translate(None, _CONTROL_BYTES))
    if controls > _BINARY_CONTROL_SHARE * len(data):
        raise _binary_error(label, kind)

    notes: list[str] = []
    nuls = data.count(b"\x00")
    if nuls:
        # NULs past the first 8 KiB of mostly text: a log that a crash padded with zeros.
        data = data.replace(b"\x00", b"")
        notes.append(f"{label} contains {_count(nuls, 'NUL byte')}; left them out")
    try:
        return data.decode("utf-8"), "utf-8", tuple(notes)
    except UnicodeDecodeError:
        pass
    if declared is not None:
        try:
            return data.decode(declared), _encoding_name(declared), tuple(notes)
        except (UnicodeError, LookupError, ValueError):
            pass  # the page's declaration is wrong too; guess as for any other text

    valid = data.decode("utf-8", errors="ignore")
    bad = len(data) - len(valid.encode("utf-8"))
    good = len(valid) - len(valid.encode("ascii", errors="ignore"))
    # Text in a legacy encoding almost never holds a valid multi-byte UTF-8 sequence ("é" is
    # the lone byte 0xE9), so real UTF-8 characters outnumbering the bad bytes means a UTF-8
    # file with a few damaged bytes (a cut, a stray Latin-1 byte in a log).
    if good > bad:
        notes.append(f"{label} is not valid UTF-8: replaced {_count(bad, 'bad byte')} "
                     "with U+FFFD")
        return data.decode("utf-8", errors=_REPLACE_EACH), "utf-8", tuple(notes)
    notes.append(f"{label} is not UTF-8; read it as Windows-1252")
    return _decode_windows_1252(data), "windows-1252", tuple(notes)


def _replace_each(exc: UnicodeError) -> tuple[str, int]:
    # One U+FFFD per bad byte (the built-in "replace" gives one per bad sequence), so the
    # warning can count bytes.
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "\ufffd" * (exc.end - exc.start), exc.end


_REPLACE_EACH = "llmkit.documents.replace-each"
codecs.register_error(_REPLACE_EACH, _replace_each)


def _decode_unicode(data: bytes, encoding: str, label: str) -> tuple[str, str, tuple[str, ...]]:
    try:
        return data.decode(encoding), encoding, ()
    except UnicodeDecodeError:
        pass
    text = data.decode(encoding, errors="replace")
    # An odd byte at the end of UTF-16 (a cut file) or a lone surrogate: a few U+FFFD.
    bad = text.count("\ufffd") - data.decode(encoding, errors="ignore").count("\ufffd")
    return text, encoding, (f"{label} is not valid {encoding.upper()}: replaced "
                            f"{_count(bad, 'bad character')} with U+FFFD",)


def _bomless_wide(data: bytes) -> str | None:
    """"utf-16-le" (or -be, or utf-32) for mostly-ASCII text without a byte-order mark."""
    head = data[:_SNIFF_BYTES]
    for width, encoding, zero_lanes in ((4, "utf-32-le", (1, 2, 3)), (4, "utf-32-be", (0, 1, 2)),
                                        (2, "utf-16-le", (1,)), (2, "utf-16-be", (0,))):
        cut = len(head) - len(head) % width
        if cut < width:
            continue
        lanes = [head[lane:cut:width] for lane in range(width)]
        zeros = [lane.count(0) / len(lane) for lane in lanes]
        # Latin-script text: the high byte(s) of nearly every code unit are zero, the low
        # byte nearly never is.
        if all(zeros[i] > 0.9 for i in zero_lanes) and all(
                zeros[i] < 0.1 for i in range(width) if i not in zero_lanes):
            try:
                text = data[:len(data) - len(data) % width].decode(encoding)
            except UnicodeDecodeError:
                return None
            printable = sum(ch.isprintable() or ch in "\t\n\r\f" for ch in text[:_SNIFF_BYTES])
            return encoding if printable >= 0.95 * min(len(text), _SNIFF_BYTES) else None
    return None


def _decode_windows_1252(data: bytes) -> str:
    return codecs.charmap_decode(data, "strict", _CP1252_TABLE)[0]


def _encoding_name(codec: str) -> str:
    # Python says "cp1251"; people (and HTML) say "windows-1251".
    return f"windows-{codec[2:]}" if re.fullmatch(r"cp125\d", codec) else codec


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# --- HTML -------------------------------------------------------------------------------------

# Never shown by a browser as text. <head> is not listed: everything it may hold besides
# <title> is either here or void, and skipping it would lose the whole page when a malformed
# page never closes it.
_SKIPPED = frozenset({"script", "style", "noscript", "template", "svg", "iframe", "canvas"})

_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "keygen",
                   "link", "meta", "param", "source", "track", "wbr"})

# Elements that start a paragraph (a blank line around them) or a line.
_PARAGRAPHS = frozenset({"p", "blockquote", "pre", "table", "dl", "figure", "hr", "section",
                         "article", "header", "footer", "main", "nav", "aside", "address",
                         "details", "fieldset", "form", "hgroup", "h1", "h2", "h3", "h4", "h5",
                         "h6", "ul", "ol", "menu"})
_LINES = frozenset({"div", "li", "tr", "dt", "dd", "figcaption", "caption", "summary",
                    "option", "legend", "center", "body", "html", "thead", "tbody", "tfoot",
                    "textarea"})

_HEADINGS = {f"h{n}": n for n in range(1, 7)}

# Inline (phrasing) elements: a block start closes an open <p> through these.
_PHRASING = frozenset({"a", "abbr", "b", "bdi", "bdo", "big", "cite", "code", "data", "dfn",
                       "em", "font", "i", "kbd", "label", "mark", "nobr", "q", "s", "samp",
                       "small", "span", "strike", "strong", "sub", "sup", "time", "tt", "u",
                       "var", "button"})

# Start tags that close an open element whose end tag is optional (HTML's "optional tags"):
# the element they close, and the elements at which the search for it stops.
_IMPLIED_END: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "li": (frozenset({"li"}), frozenset({"ul", "ol", "menu"})),
    "dt": (frozenset({"dt", "dd"}), frozenset({"dl"})),
    "dd": (frozenset({"dt", "dd"}), frozenset({"dl"})),
    "tr": (frozenset({"tr", "td", "th"}), frozenset({"table", "thead", "tbody", "tfoot"})),
    "td": (frozenset({"td", "th"}), frozenset({"tr", "table"})),
    "th": (frozenset({"td", "th"}), frozenset({"tr", "table"})),
    "thead": (frozenset({"thead", "tbody", "tfoot"}), frozenset({"table"})),
    "tbody": (frozenset({"thead", "tbody", "tfoot"}), frozenset({"table"})),
    "tfoot": (frozenset({"thead", "tbody", "tfoot"}), frozenset({"table"})),
    "option": (frozenset({"option"}), frozenset({"select", "datalist"})),
}

# Nested lists deeper than this are indented as deep as this.
_MAX_LIST_INDENT = 8

_HIDDEN_STYLE = re.compile(r"display\s*:\s*none|visibility\s*:\s*hidden", re.IGNORECASE)


def html_to_text(html: str) -> tuple[str, str | None]:
    """The text a reader of an HTML page sees, laid out as light Markdown.

    Scripts, styles, templates, SVG, iframes, comments and hidden elements (``hidden``,
    ``aria-hidden="true"``, ``display: none``) are dropped. Blocks become lines and paragraphs,
    headings "# Heading" lines, list items "- item" (numbered in ``<ol>``), table cells are
    separated by " | "; ``<pre>`` keeps its whitespace, and runs of whitespace elsewhere become
    one space. Malformed HTML is read as a browser would, roughly; it never raises, and the
    time it takes grows linearly with the page, whatever the page holds.

    Args:
        html: the page's source.

    Returns:
        The text (tidied as ``tidy_text`` does) and the ``<title>``, or None without one.
    """
    extractor = _HtmlText()
    _tokenize_html(html, extractor)
    return extractor.result()


# The tag grammar of CPython's html.parser (3.11), which reads malformed tags much as browsers
# do. Its tokenizer is not used itself: on a tag, comment or declaration that never ends it
# scans to the end of the page again from every '<' that follows (CPython gh-135462), so a page
# of 100,000 "<a " takes hours. The loop in _tokenize_html takes the same grammar in one pass.
_START_TAG = re.compile(r"""
  <[a-zA-Z][^\t\n\r\f />\x00]*       # tag name
  (?:[\s/]*                          # optional whitespace before attribute name
    (?:(?<=['"\s/])[^\s/>][^\s/=>]*  # attribute name
      (?:\s*=+\s*                    # value indicator
        (?:'[^']*'                   # LITA-enclosed value
          |"[^"]*"                   # LIT-enclosed value
          |(?!['"])[^>\s]*           # bare value
         )
        \s*                          # possibly followed by a space
       )?(?:\s|/(?!>))*
     )*
   )?
  \s*                                # trailing whitespace
""", re.VERBOSE)
_TAG_NAME = re.compile(r"([a-zA-Z][^\t\n\r\f />\x00]*)(?:\s|/(?!>))*")
_ATTRIBUTE = re.compile(r"""((?<=['"\s/])[^\s/>][^\s/=>]*)(\s*=+\s*"""
                        r"""('[^']*'|"[^"]*"|(?!['"])[^>\s]*))?(?:\s|/(?!>))*""")
_END_TAG_NAME = re.compile(r"\s*([a-zA-Z][^\t\n\r\f />\x00]*)")
_COMMENT_END = re.compile(r"--!?>")
# Elements whose content is raw text up to their own end tag (as html.parser has them).
_RAW_TEXT = ("script", "style")
_RAW_TEXT_END = {tag: re.compile(rf"</{tag}(?=[\s/>])", re.IGNORECASE) for tag in _RAW_TEXT}
_ASCII_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class _Ahead:
    """Searches forward through one text, remembering each pattern's last answer.

    Every construct the tokenizer meets asks where its end is; asking again from a later
    position reuses the answer while it still lies ahead, and a pattern that was not found
    from some position is not looked for again past it. So each pattern crosses the text
    about once in all, however many constructs never end.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.found: dict[object, tuple[int, int, int]] = {}  # pattern → (from, start, end)
        # Characters that broken-off start tags may scan again (see _start_tag).
        self.rescans = 4 * len(text) + (1 << 20)

    def search(self, pattern: str | re.Pattern[str], start: int) -> tuple[int, int]:
        """(start, end) of the first match at or after ``start``; (-1, -1) for none."""
        cached = self.found.get(pattern)
        if cached is not None:
            since, at, end = cached
            if since <= start and (at < 0 or start <= at):
                return at, end
        if isinstance(pattern, str):
            at = self.text.find(pattern, start)
            end = at + len(pattern) if at >= 0 else -1
        else:
            match = pattern.search(self.text, start)
            at, end = (match.start(), match.end()) if match else (-1, -1)
        self.found[pattern] = (start, at, end)
        return at, end


def _tokenize_html(html: str, out: _HtmlText) -> None:
    """Feed ``out`` the start tags, end tags and text of ``html``, in one pass.

    A start tag that does not end where its grammar does is text up to the next '>' (as
    html.parser has it); with no '>' left, nothing further can be a tag, so the rest is text.
    Comments, declarations (``<!…>``), processing instructions and end tags end at their
    closing mark; an unclosed comment hides the rest, as in a browser.
    """
    import html as html_module

    unescape = html_module.unescape
    ahead = _Ahead(html)
    n = len(html)
    i = 0
    while i < n:
        lt = html.find("<", i)
        if lt < 0:
            lt = n
        if lt > i:
            out.handle_data(unescape(html[i:lt]))
        i = lt
        if i >= n:
            return
        after = html[i + 1:i + 2]
        if after in _ASCII_LETTERS:
            going_on, raw = _start_tag(html, i, out, ahead)
            if going_on < 0:
                out.handle_data(unescape(html[i:]))  # no tag can end: text to the end
                return
            i = going_on
            if raw is not None:
                # A script or style: its content is not markup, up to its own end tag.
                at, end = ahead.search(_RAW_TEXT_END[raw], i)
                if at < 0:
                    out.handle_data(html[i:])
                    return
                out.handle_data(html[i:at])
                gt, _ = ahead.search(">", end)
                out.handle_endtag(raw)
                i = n if gt < 0 else gt + 1
        elif html.startswith("<!--", i):
            _, end = ahead.search(_COMMENT_END, i + 4)
            if end < 0:
                return  # an unclosed comment runs to the end of the page
            i = end
        elif after == "/":
            if html.startswith("</>", i):
                i += 3
                continue
            gt, _ = ahead.search(">", i + 2)
            if gt < 0:
                out.handle_data(unescape(html[i:]))
                return
            name = _END_TAG_NAME.match(html, i + 2, gt)
            if name is not None:
                out.handle_endtag(name.group(1).lower())
            i = gt + 1  # an end tag without a name is a bogus comment
        elif after in ("!", "?"):
            # A doctype, a CDATA section (a bogus comment in HTML) or a processing instruction.
            gt, _ = ahead.search(">", i + 2)
            if gt < 0:
                out.handle_data(unescape(html[i:]))
                return
            i = gt + 1
        else:
            out.handle_data("<")
            i += 1


def _start_tag(html: str, i: int, out: _HtmlText, ahead: _Ahead) -> tuple[int, str | None]:
    """Read the start tag at ``i``, or the text it turns out to be.

    Returns:
        Where to go on (-1: no tag can end, the rest is text) and, for a script or style,
        its name.
    """
    import html as html_module

    match = _START_TAG.match(html, i)
    assert match is not None  # it matches any "<" and a letter
    end = match.end()
    following = html[end:end + 1]
    if following == ">":
        end += 1
    elif html.startswith("/>", end):
        end += 2
    elif following == "" or following in _ASCII_LETTERS or following in "=/":
        # The tag breaks off (an unclosed quote, the end of the page): html.parser makes the
        # text up to the next '>' plain text, and reads on from there.
        gt, _ = ahead.search(">", i + 1)
        # The part scanned beyond that '>' is scanned again by the tags that follow; past a
        # budget of that (only a page built to do it gets there), the rest is text.
        ahead.rescans -= max(end - gt, 0)
        if gt < 0 or ahead.rescans < 0:
            return -1, None
        out.handle_data(html_module.unescape(html[i:gt + 1]))
        return gt + 1, None
    name = _TAG_NAME.match(html, i + 1, end)
    assert name is not None  # the tag grammar starts with the same name
    tag = name.group(1).lower()
    attrs: list[tuple[str, str | None]] = []
    k = name.end()
    while k < end:
        attribute = _ATTRIBUTE.match(html, k, end)
        if not attribute or attribute.end() == k:
            break
        key, rest, value = attribute.group(1, 2, 3)
        if not rest:
            value = None
        elif len(value) > 1 and value[:1] in ("'", '"') and value[:1] == value[-1:]:
            value = value[1:-1]
        attrs.append((key.lower(), html_module.unescape(value) if value else value))
        k = attribute.end()
    closing = html[k:end].strip()
    if closing not in (">", "/>"):
        out.handle_data(html[i:end])  # junk after the attributes: html.parser shows it
        return end, None
    out.handle_starttag(tag, attrs)
    if closing == "/>" and tag not in _VOID:
        out.handle_endtag(tag)  # <div/>; a void element (<br/>) has no end to make
    return end, tag if closing == ">" and tag in _RAW_TEXT else None


class _HtmlText:
    """What _tokenize_html reads, laid out as text."""

    def __init__(self) -> None:
        from array import array

        self.parts: list[str] = []
        self.trailing_newlines = 0  # newlines at the end of parts; starts as at a line start
        self.pending_breaks = 0  # newlines owed before the next text (1 line, 2 paragraph)
        self.pending_space = ""  # " " or a cell separator owed before the next word
        self.line_empty = True
        self.prefix = ""  # "# " or "- ", written before the next text on an empty line
        # The open elements, as parallel arrays (a page can open millions): the names, whether
        # each hides its content, and the depth of the innermost element at or below each
        # that is not phrasing content (-1 for none). ``depths`` has where each name is open,
        # so finding an element to close never walks the stack.
        self.names: list[str] = []
        self.hides = bytearray()
        self.blocks = array("q")
        self.depths: dict[str, Any] = {}  # name → array of depths
        self.hidden = 0  # open elements hiding their content
        self.pre = 0
        self.pre_fresh = False  # right after <pre>, whose first newline is not content
        self.heading = 0
        self.lists: list[list[int]] = []  # per open list: [is ordered, next number]
        self.cells = 0  # cells started in the current table row
        self.title_parts: list[str] | None = None
        self.title: str | None = None

    # parser callbacks

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._close_implied(tag)
        if tag in _VOID:
            if not self.hidden and tag == "br":
                self._line_break()
            elif not self.hidden and tag == "hr":
                self._block(2)
            return
        hides = tag in _SKIPPED or _is_hidden(attrs)
        self._push(tag, hides)
        if hides:
            self.hidden += 1
        if self.hidden:
            return
        if tag == "title":
            if self.title is None and self.title_parts is None:
                self.title_parts = []
            return
        self._open_block(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag == "br":
            # Browsers read </br> as <br>.
            if not self.hidden:
                self._line_break()
            return
        depth = self._innermost((tag,))
        if depth >= 0:
            self._close_to(depth)
            return
        # A stray end tag still ends a paragraph where a browser would (</p> makes one).
        if not self.hidden and (tag in _PARAGRAPHS or tag in _LINES):
            self._block(2 if tag in _PARAGRAPHS else 1)

    def handle_data(self, data: str) -> None:
        if self.hidden:
            return
        if self.title_parts is not None:
            self.title_parts.append(data)
            return
        if self.pre:
            if self.pre_fresh:
                data = data[1:] if data.startswith("\n") else data
                self.pre_fresh = False
            self._write_pre(data)
        else:
            self._write_inline(data)

    # structure

    def _close_implied(self, tag: str) -> None:
        implied = _IMPLIED_END.get(tag)
        if implied is not None:
            targets, boundaries = implied
            # The innermost open target closes, unless a boundary is open inside it.
            target, boundary = self._innermost(targets), self._innermost(boundaries)
            if target > boundary:
                self._close_to(target)
                return
            if boundary >= 0:
                return
        if tag in _PARAGRAPHS or tag in _LINES or tag in _HEADINGS:
            # A block inside an open <p> (or a heading inside a heading) ends it: the innermost
            # element that is not phrasing content, if it is one of those.
            block = self.blocks[-1] if self.blocks else -1
            if block >= 0 and (self.names[block] == "p" or (
                    tag in _HEADINGS and self.names[block] in _HEADINGS)):
                self._close_to(block)

    def _push(self, tag: str, hides: bool) -> None:
        from array import array

        depth = len(self.names)
        self.names.append(tag)
        self.hides.append(hides)
        below = self.blocks[-1] if self.blocks else -1
        self.blocks.append(below if tag in _PHRASING else depth)
        self.depths.setdefault(tag, array("q")).append(depth)

    def _innermost(self, tags: Collection[str]) -> int:
        """The depth of the innermost open element named in ``tags``, or -1."""
        best = -1
        for tag in tags:
            at = self.depths.get(tag)
            if at:
                best = max(best, at[-1])
        return best

    def _close_to(self, depth: int) -> None:
        while len(self.names) > depth:
            self._pop()

    def _open_block(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _HEADINGS:
            self._block(2)
            self.heading += 1
            self.prefix = "#" * _HEADINGS[tag] + " "
        elif tag in ("ul", "ol", "menu"):
            self._block(1 if self.lists else 2)
            start = _int_attr(attrs, "start")
            self.lists.append([tag == "ol", 1 if start is None else start])
        elif tag == "li":
            self._block(1)
            # Indented by nesting, up to a limit: a page of 20,000 nested lists would otherwise
            # give each item a 40,000-space indent, gigabytes of text out of kilobytes.
            indent = "  " * min(max(len(self.lists) - 1, 0), _MAX_LIST_INDENT)
            if self.lists and self.lists[-1][0]:
                value = _int_attr(attrs, "value")
                number = self.lists[-1][1] if value is None else value
                self.lists[-1][1] = number + 1
                self.prefix = f"{indent}{number}. "
            else:
                self.prefix = f"{indent}- "
        elif tag == "tr":
            self._block(1)
            self.cells = 0
        elif tag in ("td", "th"):
            if self.cells:
                self.pending_space = " | "
            self.cells += 1
        elif tag == "pre":
            self._block(2)
            self.pre += 1
            self.pre_fresh = True
        elif tag in _PARAGRAPHS:
            self._block(2)
        elif tag in _LINES:
            self._block(1)

    def _pop(self) -> None:
        tag = self.names.pop()
        hides = self.hides.pop()
        self.blocks.pop()
        self.depths[tag].pop()
        if hides:
            self.hidden -= 1
            return
        if self.hidden:
            return
        if tag == "title" and self.title_parts is not None:
            self.title = " ".join("".join(self.title_parts).split()) or None
            self.title_parts = None
        elif tag in _HEADINGS:
            self.heading = max(self.heading - 1, 0)
            self.prefix = ""
            self._block(2)
        elif tag in ("ul", "ol", "menu"):
            if self.lists:
                self.lists.pop()
            self._block(1 if self.lists else 2)
        elif tag == "pre":
            self.pre = max(self.pre - 1, 0)
            self.pre_fresh = False
            self._block(2)
        elif tag in _PARAGRAPHS:
            self._block(2)
        elif tag in _LINES:
            self._block(1)

    # output

    def _block(self, newlines: int) -> None:
        self.pending_breaks = max(self.pending_breaks, newlines)
        self.pending_space = ""

    def _line_break(self) -> None:
        if self.heading:
            self.pending_space = " "  # a heading stays on one line
        elif self.pre:
            self._write_pre("\n")
        else:
            self.pending_breaks = min(self.pending_breaks + 1, 2)
            self.pending_space = ""

    def _start_text(self) -> None:
        owed = self.pending_breaks - self.trailing_newlines
        if self.parts and owed > 0:
            self._append("\n" * owed)
        self.pending_breaks = 0
        if self.line_empty:
            self.pending_space = ""
            if self.prefix:
                self._append(self.prefix)
                self.prefix = ""
        elif self.pending_space:
            self._append(self.pending_space)
        self.pending_space = ""

    def _write_inline(self, data: str) -> None:
        words = data.split()
        if not words:
            if data and not self.line_empty and not self.pending_space:
                self.pending_space = " "
            return
        if data[0].isspace() and not self.line_empty and not self.pending_space:
            self.pending_space = " "
        self._start_text()
        self._append(" ".join(words))
        if data[-1].isspace():
            self.pending_space = " "

    def _write_pre(self, data: str) -> None:
        if not data:
            return
        self._start_text()
        self._append(data)

    def _append(self, text: str) -> None:
        self.parts.append(text)
        stripped = text.rstrip("\n")
        if stripped:
            self.trailing_newlines = len(text) - len(stripped)
        else:
            self.trailing_newlines += len(text)
        self.line_empty = text.endswith("\n")

    def result(self) -> tuple[str, str | None]:
        if self.title is None and self.title_parts is not None:
            # An unclosed <title>: what it held is still the title.
            self.title = " ".join("".join(self.title_parts).split()) or None
        return tidy_text("".join(self.parts)), self.title


def _is_hidden(attrs: list[tuple[str, str | None]]) -> bool:
    for key, value in attrs:
        # hidden="until-found" is collapsed content that find-in-page reveals: real text.
        if key == "hidden" and (value or "").lower() != "until-found":
            return True
        if key == "aria-hidden" and (value or "").strip().lower() == "true":
            return True
        if key == "style" and value and _HIDDEN_STYLE.search(value):
            return True
    return False


def _int_attr(attrs: list[tuple[str, str | None]], name: str) -> int | None:
    for key, value in attrs:
        if key == name and value is not None:
            try:
                return int(value.strip())
            except ValueError:
                return None
    return None


# --- PDF --------------------------------------------------------------------------------------


def _read_pdf(data: bytes, label: str, max_bytes: int
              ) -> tuple[str, str | None, int, tuple[str, ...]]:
    """Text of every page (blank lines between), title, page count and warnings."""
    start = data.find(b"%PDF-", 0, 1024)
    if start < 0:
        kind, _ = _binary_kind(data)
        if kind is None:
            kind = "an HTML page" if _is_html(data[:_SNIFF_BYTES].decode("latin-1")) else None
        what = f"it looks like {kind}" if kind else "it does not start with %PDF-"
        raise DocumentError(label, f"is not a readable PDF: {what}")
    try:
        # Imported by name: an optional extra, which mypy may not find installed.
        pypdf = importlib.import_module("pypdf")
        needs_dependency = importlib.import_module("pypdf.errors").DependencyError
    except ImportError:
        raise DocumentError(label, "is a PDF, and reading PDFs needs the optional pypdf "
                                   "package", hint="pip install 'llmkit[pdf]'") from None
    # pypdf reports what it repairs through logging and warnings; with no handler configured,
    # logging would print it to stderr, and a library prints nothing.
    logger = logging.getLogger("pypdf")
    propagate = logger.propagate
    quiet = logging.NullHandler()
    logger.addHandler(quiet)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _extract_pdf(pypdf, needs_dependency, data, label, max_bytes)
    finally:
        logger.removeHandler(quiet)
        logger.propagate = propagate


def _extract_pdf(pypdf: Any, needs_dependency: type[Exception], data: bytes,
                 label: str, max_bytes: int) -> tuple[str, str | None, int, tuple[str, ...]]:
    # pypdf decrypts RC4 itself but AES only through the cryptography package, and says so
    # when it first needs to: opening the file, or reading a page.
    aes_error = DocumentError(label, "is encrypted with AES, and decrypting it needs the "
                                     "cryptography package", hint="pip install cryptography")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted and not reader.decrypt(""):
            # An empty user password opens PDFs locked only against printing or copying.
            raise DocumentError(label, "is encrypted and needs a password",
                                hint="decrypt it first, e.g. `qpdf --decrypt "
                                     "--password=PASSWORD in.pdf out.pdf`")
        pages = list(reader.pages)
    except DocumentError:
        raise
    except needs_dependency:
        raise aes_error from None
    except Exception as exc:
        raise DocumentError(label, f"is not a readable PDF: {_one_line(exc)}") from None
    if not pages:
        raise DocumentError(label, "is not a readable PDF: it has no pages")

    notes: list[str] = []
    texts: list[str] = []
    problems: list[str] = []
    extracted = 0
    for number, page in enumerate(pages, 1):
        try:
            text = page.extract_text()
        except needs_dependency:
            raise aes_error from None
        except Exception as exc:
            # One damaged page costs that page; the warning says which.
            problems.append(_one_line(exc))
            notes.append(f"{label}: page {number} could not be read ({problems[-1]}); "
                         "left it out")
            continue
        text = tidy_text(text if isinstance(text, str) else "")
        if text:
            texts.append(text)
            # Compressed page streams can hold far more text than the file's size: stop
            # at the limit rather than gather it all.
            extracted += len(text.encode("utf-8"))
            if extracted > max_bytes:
                from llmkit.io import format_size

                limit = document_limit(max_bytes)
                raise DocumentError(label, f"holds more than {format_size(max_bytes)} of text, "
                                           f"{limit.why}", hint=limit.hint)
    if len(problems) == len(pages):
        raise DocumentError(label, f"is not a readable PDF: {problems[0]}")
    if not texts:
        raise DocumentError(label, "has no extractable text (scanned pages are images)",
                            hint="run OCR on it first, e.g. `ocrmypdf in.pdf out.pdf`")
    return "\n\n".join(texts), _pdf_title(reader), len(pages), tuple(notes)


def _pdf_title(reader: Any) -> str | None:
    try:
        metadata = reader.metadata
        title = metadata.title if metadata is not None else None
    except Exception:
        return None  # a damaged Info dictionary costs the title, not the text
    if not isinstance(title, str):
        return None
    return " ".join(title.split()) or None


def _one_line(exc: BaseException) -> str:
    from llmkit.io import printable

    # pypdf's messages can quote the file's bytes: control characters are shown escaped.
    text = printable(" ".join(str(exc).split())) or type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."
