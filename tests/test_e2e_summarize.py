"""`llmkit summarize` end to end with the real SmolLM2 model through llama.cpp."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_llmkit

pytestmark = pytest.mark.slow

TOPICS = ["harbour", "library", "orchard", "railway", "observatory", "bakery", "bridge",
          "museum", "vineyard", "lighthouse", "market", "school"]


def long_text(paragraphs: int) -> str:
    """Varied, plausible prose: every paragraph names its own place, year and numbers."""
    out = []
    for p in range(paragraphs):
        topic = TOPICS[p % len(TOPICS)]
        year = 1850 + 7 * p
        out.append(
            f"## The {topic} of district {p + 1}\n\n"
            f"In {year} the town council voted to build a {topic} in district {p + 1}. "
            f"Construction took {p % 5 + 2} years and cost {120 + 13 * p} thousand crowns, "
            f"most of it raised by {p % 4 + 3} local families. The {topic} opened on "
            f"{p % 28 + 1} May {year + p % 5 + 2} and soon employed {15 + p} people. "
            f"Visitors praised its {['stone walls', 'tall windows', 'gardens', 'clock'][p % 4]},"
            f" and by {year + 20} it served more than {900 + 37 * p} residents every week. "
            f"A fire in {year + 31} damaged the east wing, which was rebuilt within a year.")
    return "\n\n".join(out) + "\n"


def _json(proc: Any) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_short_document_one_pass(tmp_path: Path) -> None:
    doc = tmp_path / "note.md"
    doc.write_text(long_text(2))
    (record,) = _json(run_llmkit(["summarize", str(doc), "--format", "json", "--length",
                                  "short"]))
    assert record["error"] is None
    assert record["path"] == str(doc) and record["format"] == "markdown"
    assert (record["chunks"], record["levels"], record["merges"], record["calls"]) == (1, 0, 0, 1)
    assert record["summary"].strip()
    assert len(record["summary"].split()) < len(doc.read_text().split())
    assert record["usage"]["input_tokens"] > 100
    assert record["usage"]["output_tokens"] > 0
    assert record["model"] == "smollm2:135m"


def test_document_five_times_the_context_is_mapped_and_merged(tmp_path: Path) -> None:
    doc = tmp_path / "history.md"
    doc.write_text(long_text(26))
    proc = run_llmkit(["summarize", str(doc), "--ctx", "512", "--length", "short",
                       "--format", "json", "-v"], timeout=600)
    (record,) = _json(proc)
    assert record["usage"]["input_tokens"] >= 5 * 512
    plan_lines = re.findall(r"^llmkit: .*history\.md: chunk (\d+): characters (\d+)–(\d+), "
                            r"(\d+) tokens", proc.stderr, re.M)
    assert len(plan_lines) == record["chunks"] >= 5
    # The plan's character spans tile the whole document (as read: newlines normalised).
    from llmkit.documents import read_document

    spans = [(int(a), int(b)) for _, a, b, _ in plan_lines]
    assert spans[0][0] == 0 and spans[-1][1] == len(read_document(doc).text)
    assert all(x[1] == y[0] for x, y in itertools.pairwise(spans))
    # One call per chunk, one per merge, one for the final summary.
    assert record["calls"] == record["chunks"] + record["merges"] + 1
    assert record["levels"] >= 1
    assert "longer than the context" in proc.stderr
    assert f"chunk {record['chunks']}/{record['chunks']}" in proc.stderr
    assert record["summary"].strip()
    # The instruction shared by every chunk prompt was evaluated once, not once per chunk.
    usage = record["usage"]
    assert usage["prompt_tokens_evaluated"] < usage["prompt_tokens"]


def test_stdin_and_text_output() -> None:
    proc = run_llmkit(["summarize", "--length", "short"], input=long_text(2))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and not proc.stdout.startswith("{")
    assert "==>" not in proc.stdout


def test_html_is_read_as_text(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text("<html><head><title>Town news</title><style>p{color:red}</style>"
                    "<script>var secret = 'zzzyyyxxx';</script></head><body>"
                    "<h1>The new harbour</h1><p>In 1901 the town opened a harbour that "
                    "cost 300 thousand crowns.</p><p>It employed 40 people.</p></body></html>")
    (record,) = _json(run_llmkit(["summarize", str(page), "-f", "json", "--length", "short"]))
    assert record["format"] == "html"
    assert record["error"] is None and record["summary"]


def test_batch_with_bad_files_finishes_the_others(tmp_path: Path) -> None:
    good = tmp_path / "a.md"
    good.write_text(long_text(1))
    empty = tmp_path / "b.txt"
    empty.write_text("  \n")
    binary = tmp_path / "c.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    missing = tmp_path / "d.md"
    proc = run_llmkit(["summarize", str(good), str(empty), str(binary), str(missing),
                       "-f", "jsonl", "--length", "short"])
    assert proc.returncode == 1
    # Documents are summarized --parallel at a time: each line names its document, and
    # those done first come first.
    records = sorted((json.loads(line) for line in proc.stdout.splitlines()),
                     key=lambda r: str(r["path"]))
    assert [r["path"] for r in records] == [str(p) for p in (good, empty, binary, missing)]
    assert records[0]["error"] is None and records[0]["summary"]
    assert "empty" in records[1]["error"]
    assert "binary" in records[2]["error"]
    assert records[3]["error"]
    assert "4 documents: 1 done, 0 skipped, 3 failed" in proc.stderr


def test_skip_existing_reruns_do_no_work(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(2):
        (docs / f"n{i}.md").write_text(long_text(1 + i))
    (docs / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # not a document: not picked up
    out = tmp_path / "summaries.jsonl"
    first = run_llmkit(["summarize", str(docs), "--out", str(out), "--length", "short", "-q"])
    assert first.returncode == 0, first.stderr
    assert len(out.read_text().splitlines()) == 2
    rerun = run_llmkit(["summarize", str(docs), "--out", str(out), "--skip-existing",
                        "-m", str(tmp_path / "no-such-model.gguf")])
    assert rerun.returncode == 0, rerun.stderr
    assert "2 documents: 0 done, 2 skipped, 0 failed" in rerun.stderr
    assert len(out.read_text().splitlines()) == 2


def test_context_too_small_is_one_line(tmp_path: Path) -> None:
    doc = tmp_path / "long.md"
    doc.write_text(long_text(10))
    proc = run_llmkit(["summarize", str(doc), "--ctx", "64", "-q"])
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("llmkit: error: ")
    assert "too small to summarize in" in proc.stderr
    assert "raise --ctx to at least" in proc.stderr


def test_empty_stdin_and_usage_errors(tmp_path: Path) -> None:
    empty = run_llmkit(["summarize"], input="   \n")
    assert empty.returncode == 1 and "empty" in empty.stderr
    assert "Traceback" not in empty.stderr
    no_out = run_llmkit(["summarize", str(tmp_path), "--skip-existing"])
    assert no_out.returncode == 2 and "--skip-existing needs --out" in no_out.stderr
    bad = run_llmkit(["summarize", "--length", "huge"], input="text")
    assert bad.returncode == 2


def test_ctrl_c_mid_document_keeps_finished_records(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    done = tmp_path / "done.md"
    done.write_text(long_text(1))
    slow = tmp_path / "slow.md"
    slow.write_text(long_text(20))
    out = tmp_path / "records.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "summarize", str(done), str(slow), "--ctx", "512",
         "--length", "short", "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        # The documents are summarized side by side: interrupt mid-way through the slow one
        # once the short one's record is saved.
        if "slow.md: chunk" in line and out.exists() and str(done) in out.read_text():
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest
    assert rest.strip().endswith("llmkit: error: interrupted")
    # The finished document's record is kept; the interrupted one is not half-written.
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [str(done)]
