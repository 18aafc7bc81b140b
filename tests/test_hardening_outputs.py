"""Outputs end to end with SmolLM2: closed and full stdout, odd file names, one owner per --out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_llmkit
from tests.small_disk import fill, small_disk

pytestmark = pytest.mark.slow

# A user whose locale is en_US.UTF-8: Python's stdout refuses what is not UTF-8 (strict).
STRICT = {"PYTHONIOENCODING": "utf-8"}


def _llmkit(args: list[str], *, stdout: Any = subprocess.PIPE, input: bytes | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """The real CLI with bytes in and out (file names that are not UTF-8 stay bytes)."""
    return subprocess.run([sys.executable, "-m", "llmkit", *args], stdout=stdout,
                          stderr=subprocess.PIPE, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL,
                          env={**os.environ, **STRICT, **(env or {})}, timeout=300)


def _closed_stdout(args: list[str], *, input: bytes | None = None
                   ) -> subprocess.CompletedProcess[bytes]:
    """Run with a stdout whose reader has already gone (`| head` that exited)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return _llmkit(args, stdout=write_end, input=input)
    finally:
        os.close(write_end)


def _records(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.splitlines() if line.strip()]


@pytest.fixture
def smol(smollm2_path: Path) -> str:
    return str(smollm2_path)


# --- 141: the reader went away ----------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["--help"], [], ["run", "--help"], ["list", "--format", "json"], ["doctor"],
], ids=["help", "no-args", "run-help", "list", "doctor"])
def test_closed_stdout_is_141_without_a_model(args: list[str]) -> None:
    proc = _closed_stdout(args)
    assert (proc.returncode, proc.stderr) == (141, b"")


def test_closed_stdout_is_141_for_model_commands(smol: str, tmp_path: Path) -> None:
    doc = tmp_path / "a.txt"
    doc.write_text("The harbour opened in 1850 and employed forty people.\n")
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"prompt": "hello"}\n{"prompt": "hi"}\n')
    for args in (["run", "-m", smol, "Count to ten.", "-n", "8"],
                 ["run", "-m", smol, "Count to ten.", "-n", "8", "--format", "json"],
                 ["summarize", "-m", smol, str(doc), "-n", "8"],
                 ["summarize", "-m", smol, str(doc), str(doc), "-n", "8", "-f", "jsonl"],
                 ["check", "-m", smol, "--threshold", "1", "--batch", str(batch)]):
        proc = _closed_stdout(args)
        assert (proc.returncode, proc.stderr) == (141, b""), (args, proc.stderr)


def test_reader_leaving_midway_keeps_what_is_recorded(smol: str, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"Note {i}: the library opened in {1900 + i}.\n")
    out = tmp_path / "records.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "summarize", "-m", smol, str(docs), "-n", "6",
         "--format", "jsonl", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **STRICT})
    assert proc.stdout is not None and proc.stderr is not None
    first = json.loads(proc.stdout.readline())  # `| head -n1`
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141
    assert err == b""
    saved = _records(out.read_bytes())
    assert saved[0]["path"] == first["path"]
    assert 2 <= len(saved) < 6  # the record whose line could not be printed is saved too
    rerun = _llmkit(["summarize", "-m", smol, str(docs), "-n", "6", "--out", str(out),
                     "--skip-existing", "-f", "jsonl"])
    assert rerun.returncode == 0, rerun.stderr
    assert len(_records(rerun.stdout)) == 6 - len(saved)


# --- a full or failing stdout ------------------------------------------------------------------

FULL = (b"llmkit: error: cannot write the output: No space left on device (stdout goes to a "
        b"full or failing disk; free some space or send the output elsewhere, then run again)\n")


def test_stdout_on_a_full_disk_is_one_sentence(smol: str, tmp_path: Path) -> None:
    with open("/dev/full", "wb") as full:
        for args in (["run", "-m", smol, "Say hi.", "-n", "4"],
                     ["run", "-m", smol, "Say hi.", "-n", "4", "-f", "json"],
                     ["list", "--format", "json"],
                     ["list", "--format", "table"],  # Rich's printing
                     ["--help"], ["caption", "--help"]):  # Typer's printing
            proc = _llmkit(args, stdout=full)
            assert (proc.returncode, proc.stderr) == (1, FULL), args


def test_batch_stdout_on_a_full_disk_keeps_the_out_file(smol: str, tmp_path: Path) -> None:
    doc = tmp_path / "a.txt"
    doc.write_text("The orchard was planted in 1901.\n")
    out = tmp_path / "records.jsonl"
    with small_disk(tmp_path / "disk") as disk:
        fill(disk)
        with open(disk / "summaries.jsonl", "wb") as target:
            proc = _llmkit(["summarize", "-m", smol, str(doc), str(doc), "-n", "4",
                            "-f", "jsonl", "--out", str(out)], stdout=target)
    assert proc.returncode == 1
    assert proc.stderr.endswith(FULL) and proc.stderr.count(b"\n") == 1
    assert [r["path"] for r in _records(out.read_bytes())] == [str(doc)]


# --- file names that are not UTF-8 -----------------------------------------------------------

def test_non_utf8_names_are_recorded_faithfully(smol: str, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    docs.mkdir()
    odd = os.fsencode(docs) + b"/caf\xe9.txt"  # Latin-1 "café": not UTF-8
    with open(odd, "wb") as fh:
        fh.write(b"The bakery opened in 1888 and sold rye bread.\n")
    (docs / "plain.txt").write_text("The bridge was finished in 1902.\n")
    with open(os.fsencode(docs) + b"/empty\xff.txt", "wb"):
        pass
    out = tmp_path / "records.jsonl"
    args = ["summarize", "-m", smol, str(docs), "-n", "6", "--out", str(out)]
    first = _llmkit([*args, "-f", "jsonl"])
    assert first.returncode == 1  # the empty document failed; the batch went on
    printed = _records(first.stdout)  # valid UTF-8 JSON
    by_name = {os.fsencode(r["path"]): r for r in printed}
    assert set(by_name) == {odd, os.fsencode(docs / "plain.txt"), os.fsencode(docs) +
                            b"/empty\xff.txt"}
    assert by_name[odd]["summary"] and by_name[odd]["error"] is None
    assert b"\\u00e9" not in first.stdout and b"\\udce9" in first.stdout
    assert _records(out.read_bytes()) == printed
    # A rerun recognises the odd name as done (only the failed document is tried again).
    rerun = _llmkit([*args, "--skip-existing", "-f", "json"])
    assert rerun.returncode == 1
    assert [os.fsencode(r["path"]) for r in json.loads(rerun.stdout)] == [
        os.fsencode(docs) + b"/empty\xff.txt"]
    assert b"3 documents: 0 done, 2 skipped, 1 failed" in rerun.stderr
    # Text output names each document by its bytes, and so do messages on stderr.
    text = _llmkit(["summarize", "-m", smol, str(docs), "-n", "4"])
    assert text.returncode == 1
    assert b"==> " + odd + b" <==\n" in text.stdout
    assert b"llmkit: error: " + os.fsencode(docs) + b"/empty\xff.txt" in text.stderr
    assert b"Traceback" not in text.stderr and b"unexpected" not in text.stderr


# --- one owner per --out ------------------------------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from llmkit.batch import RecordLog
log = RecordLog(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(300)
"""


def test_a_second_run_on_the_same_out_is_refused(tmp_path: Path) -> None:
    doc = tmp_path / "a.txt"
    doc.write_text("The lighthouse was built in 1870.\n")
    out = tmp_path / "records.jsonl"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        # Refused before any model is looked for: this one does not even exist.
        proc = _llmkit(["summarize", "-m", str(tmp_path / "gone.gguf"), str(doc), "--out",
                        str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1
    assert proc.stderr == (
        f"llmkit: error: {out} is being written by another llmkit run (wait for it to "
        "finish, or give this run another --out; a later run with --skip-existing does only "
        "what is still missing)\n").encode()
    assert out.read_bytes() == b""


# --- Ctrl-C with --format json ------------------------------------------------------------------

def test_ctrl_c_prints_the_finished_records_as_json(smol: str, tmp_path: Path) -> None:
    from tests.test_e2e_summarize import long_text

    done = tmp_path / "done.md"
    done.write_text(long_text(1))
    slow = tmp_path / "slow.md"
    slow.write_text(long_text(20))
    saved = tmp_path / "records.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "summarize", "-m", smol, str(done), str(slow),
         "--ctx", "512", "--length", "short", "--format", "json", "--out", str(saved)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **STRICT})
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        # The documents are summarized side by side: interrupt mid-way through the slow one
        # once the short one is done (its record saved).
        if b"slow.md: chunk" in line and saved.exists() and str(done) in saved.read_text():
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    printed = proc.stdout.read()
    assert proc.wait(timeout=120) == 130
    assert rest.strip().endswith(b"llmkit: error: interrupted")
    assert [r["path"] for r in json.loads(printed)] == [str(done)]


def test_every_message_is_one_line_whatever_it_quotes(tmp_path: Path) -> None:
    # A file name (or model text, or a GGUF string) with a newline or an escape sequence must
    # neither forge a second "llmkit: error" line nor reach the terminal as a control sequence.
    name = tmp_path / "x\nllmkit: error: forged \x1b[2J.gguf"
    proc = run_llmkit(["run", "-m", str(name), "hi"])
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "\x1b" not in proc.stderr, proc.stderr
    assert "x\\nllmkit: error: forged \\x1b[2J.gguf" in proc.stderr
