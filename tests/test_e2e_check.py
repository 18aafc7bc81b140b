"""`llmkit check` and `--guard` end to end, with the real SmolLM2 standing in as the guard.

SmolLM2-135M-Instruct is not Llama Guard: its answers are not verdicts, so a check without a
threshold fails closed (exit 1). With `--threshold 0` every check is flagged (P(unsafe) ≥ 0)
and with `--threshold 1` none is (P(unsafe) < 1), which drives both paths through real
llama.cpp with real probabilities.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.conftest import run_llmkit
from tests.vision_checkpoints import build_tiny_smolvlm

pytestmark = pytest.mark.slow

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NOT_A_VERDICT = "llmkit: error: the guard model's answer is not a verdict: '"
LLAMA_GUARD_HINT = " (use a Llama Guard model (-m llama-guard3:1b))"


@pytest.fixture(autouse=True)
def no_guard_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMKIT_GUARD_MODEL", raising=False)


@pytest.fixture
def smol(smollm2_path: Path) -> str:
    return str(smollm2_path)


def check(smol: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_llmkit(["check", "-m", smol, *args], input=input)


def check_json(smol: str, *args: str, input: str | None = None, rc: int = 0) -> dict[str, Any]:
    proc = check(smol, *args, "--format", "json", input=input)
    assert proc.returncode == rc, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def by_line(text: str) -> list[dict[str, Any]]:
    """A batch's records in input order: checked together, they are written as they finish,
    each naming its line (once)."""
    out = sorted(records(text), key=lambda r: r["line"])
    assert len({r["line"] for r in out}) == len(out)
    return out


# -- one check -----------------------------------------------------------------------------------


def test_threshold_0_flags_and_exits_3(smol: str) -> None:
    proc = check(smol, "--threshold", "0", "What is the capital of France?")
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "unsafe\n", "")


def test_threshold_1_passes_and_exits_0(smol: str) -> None:
    proc = check(smol, "--threshold", "1", "What is the capital of France?")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "safe\n", "")


def test_without_a_threshold_an_answer_that_is_no_verdict_fails_closed(smol: str) -> None:
    text = check(smol, "What is the capital of France?")
    assert text.returncode == 1 and text.stdout == ""
    assert text.stderr.startswith(NOT_A_VERDICT)
    assert text.stderr.endswith(LLAMA_GUARD_HINT + "\n") and text.stderr.count("\n") == 1
    data = check_json(smol, "What is the capital of France?", rc=1)
    assert data["verdict"] is None and data["flagged"] is None
    assert data["model"] == SMOL_NAME
    assert data["raw"].strip()  # the model's own words, for the script to log
    assert data["error"].startswith("the guard model's answer is not a verdict: '")
    assert text.stderr == f"llmkit: error: {data['error']}\n"  # the same answer both times


def test_json_fields(smol: str) -> None:
    data = check_json(smol, "--threshold", "1", "What is the capital of France?")
    assert data["verdict"] == "safe" and data["flagged"] is False
    assert data["categories"] == [] and data["error"] is None
    assert data["decided_by"] == "threshold" and data["threshold"] == 1.0
    assert data["role"] == "User" and data["model"] == SMOL_NAME
    assert 0.0 <= data["score"] < 1.0
    p_safe, p_unsafe = data["probabilities"]["safe"], data["probabilities"]["unsafe"]
    assert 0.0 <= p_safe <= 1.0 and 0.0 <= p_unsafe <= 1.0
    if p_safe + p_unsafe > 1e-3:  # rounded to 6 places: the ratio is only checkable if large
        assert data["score"] == pytest.approx(p_unsafe / (p_safe + p_unsafe), abs=1e-2)
    assert data["raw"].strip()
    usage = data["usage"]
    assert usage["prompt_tokens"] == usage["prompt_tokens_evaluated"] > 200
    timings = data["timings"]
    assert timings["total_ms"] >= timings["score_ms"] > 0 and timings["answer_ms"] > 0
    flagged = check_json(smol, "--threshold", "0", "What is the capital of France?", rc=3)
    assert flagged["verdict"] == "unsafe" and flagged["flagged"] is True
    assert flagged["categories"] == []
    assert flagged["score"] == data["score"]  # same text, same model: same probability


def test_stdin_file_and_argument_check_the_same_text(smol: str, tmp_path: Path) -> None:
    question = "How do I bake bread?"
    arg = check_json(smol, "--threshold", "1", question)
    piped = check_json(smol, "--threshold", "1", input=question + "\n")
    path = tmp_path / "q.txt"
    path.write_text(question + "\n")
    from_file = check_json(smol, "--threshold", "1", "--file", str(path))
    assert arg["score"] == piped["score"] == from_file["score"]
    assert arg["usage"]["prompt_tokens"] == piped["usage"]["prompt_tokens"]
    other = check_json(smol, "--threshold", "1", "How do I pick a lock?")
    assert other["score"] != arg["score"]  # the text is what is scored


def test_prompt_and_response_are_checked_as_the_agent(smol: str, tmp_path: Path) -> None:
    pair = check_json(smol, "--threshold", "1", "--prompt", "What is 2+2?", "--response", "4.")
    assert pair["role"] == "Agent" and pair["verdict"] == "safe"
    prompt_only = check_json(smol, "--threshold", "1", "--prompt", "What is 2+2?")
    assert prompt_only["role"] == "User"
    assert prompt_only["usage"]["prompt_tokens"] < pair["usage"]["prompt_tokens"]
    convo = tmp_path / "convo.json"
    convo.write_text(json.dumps([{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "What is 2+2?"},
                                 {"role": "assistant", "content": "4."}]))
    from_file = check_json(smol, "--threshold", "1", "--conversation", str(convo))
    assert from_file["role"] == "Agent"
    assert from_file["score"] == pair["score"]  # the system message is left out
    convo.write_text(json.dumps({"messages": [{"role": "user", "content": "What is 2+2?"}]}))
    assert check_json(smol, "--threshold", "1", "--conversation", str(convo))["role"] == "User"
    flagged = check(smol, "--threshold", "0", "--prompt", "What is 2+2?", "--response", "4.")
    assert (flagged.returncode, flagged.stdout) == (3, "unsafe\n")


def test_bad_conversation_file(smol: str, tmp_path: Path) -> None:
    convo = tmp_path / "convo.json"
    convo.write_text(json.dumps([{"role": "assistant", "content": "hi"}]))
    proc = check(smol, "--conversation", str(convo))
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == ("llmkit: error: the conversation must alternate user/assistant, "
                           "starting with the user (message 1 is from the assistant)\n")


@pytest.mark.parametrize(("args", "stdin", "rc", "stderr"), [
    (["--response", "hi"], None, 2,
     "llmkit: error: --response needs the --prompt it answers\n"),
    (["text", "--prompt", "p"], None, 2,
     "llmkit: error: give one of TEXT, --prompt/--response, not several\n"),
    ([], "", 1, "llmkit: error: stdin is empty (there is nothing to check)\n"),
    (["  "], None, 1, "llmkit: error: the text to check is empty (there is nothing to check)\n"),
])
def test_usage_errors(smol: str, args: list[str], stdin: str | None, rc: int,
                      stderr: str) -> None:
    proc = check(smol, *args, input=stdin)
    assert (proc.returncode, proc.stdout, proc.stderr) == (rc, "", stderr)


def test_no_projector_option(smol: str) -> None:
    # No guard needs a projector file (Llama Guard 3 Vision holds its own vision tower): the
    # option is not taken, rather than taken and ignored.
    proc = check(smol, "text", "--mmproj", "x.gguf")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith("llmkit: error: No such option: --mmproj")
    assert len(proc.stderr.splitlines()) == 1


def test_exclude_and_categories(smol: str, tmp_path: Path) -> None:
    full = check_json(smol, "--threshold", "1", "hello")
    fewer = check_json(smol, "--threshold", "1", "--exclude", "S7,s8", "hello")
    # Two category lines fewer in the prompt the model read.
    assert fewer["usage"]["prompt_tokens"] < full["usage"]["prompt_tokens"]
    policy = tmp_path / "policy.toml"
    policy.write_text('[[categories]]\ncode = "C1"\nname = "Gambling"\n'
                      'description = "Betting, casinos and lotteries."\n'
                      '[[categories]]\ncode = "C2"\nname = "Medical Advice"\n')
    custom = check_json(smol, "--threshold", "1", "--categories", str(policy), "hello")
    assert custom["usage"]["prompt_tokens"] < fewer["usage"]["prompt_tokens"]
    both = check_json(smol, "--threshold", "1", "--categories", str(policy), "--exclude", "C2",
                      "hello")
    assert both["usage"]["prompt_tokens"] < custom["usage"]["prompt_tokens"]


def test_exclude_errors_are_usage_errors(smol: str, tmp_path: Path) -> None:
    # An unknown code is refused before any model is loaded (this model does not exist).
    proc = run_llmkit(["check", "-m", str(tmp_path / "missing.gguf"), "--exclude", "S99", "x"])
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "llmkit: error: cannot exclude S99: not a category here (the categories are S1, S2, S3, "
        "S4, S5, S6, S7, S8, S9, S10, S11, S12, S13, S14)\n")
    # S14 is Llama Guard 3 8B's; the model standing in gets the 1B model's 13 categories.
    s14 = check(smol, "--exclude", "S14", "x")
    assert (s14.returncode, s14.stdout) == (2, "")
    assert s14.stderr == (
        "llmkit: error: cannot exclude S14: not a category here (the categories are S1, S2, S3, "
        "S4, S5, S6, S7, S8, S9, S10, S11, S12, S13)\n")
    everything = check(smol, "--exclude", ",".join(f"S{i}" for i in range(1, 14)), "x")
    assert (everything.returncode, everything.stderr) == (
        2, "llmkit: error: --exclude leaves no category to check\n")
    policy = tmp_path / "policy.toml"
    policy.write_text('[[categories]]\ncode = "C1"\nname = "Gambling"\n')
    custom = run_llmkit(["check", "-m", str(tmp_path / "missing.gguf"), "--categories",
                         str(policy), "--exclude", "S1", "x"])
    assert (custom.returncode, custom.stderr) == (
        2, "llmkit: error: cannot exclude S1: not a category here (the categories are C1)\n")


def test_bad_categories_file(smol: str, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    proc = run_llmkit(["check", "-m", str(tmp_path / "missing.gguf"), "--categories",
                       str(missing), "x"])
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        1, "", f"llmkit: error: {missing} does not exist\n")
    bad = tmp_path / "bad.toml"
    bad.write_text('[[categories]]\ncode = "C1"\n')
    proc = check(smol, "--categories", str(bad), "x")
    assert (proc.returncode, proc.stderr) == (
        1, f"llmkit: error: {bad}: category 1: name is required\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[categories]\n")
    proc = check(smol, "--categories", str(broken), "x")
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"llmkit: error: {broken} is not valid TOML: ")
    assert proc.stderr.count("\n") == 1


def test_images_cannot_be_checked(smol: str, tmp_path: Path) -> None:
    photo = images.write_photo_jpeg(tmp_path)
    proc = check(smol, "--image", str(photo))
    assert (proc.returncode, proc.stdout) == (1, "")
    # A guard that reads text only is refused from its file's header, before it loads.
    assert proc.stderr.startswith("llmkit: error: ")
    assert proc.stderr.endswith(" reads text, not pictures: checking an image needs Llama "
                                "Guard 3 Vision (use the guard llama-guard3:11b-vision (`llmkit "
                                "pull llama-guard3:11b-vision --from-source`), or check what "
                                "the picture shows: llmkit caption --style detailed photo.jpg "
                                "| llmkit check)\n")
    assert proc.stderr.count("\n") == 1


def test_default_guard_model_not_pulled(smol: str) -> None:
    expected = ("llmkit: error: model 'llama-guard3:1b' is in the catalog but not on this "
                "machine (run `llmkit pull llama-guard3:1b`)\n")
    plain = run_llmkit(["check", "hello"])
    assert (plain.returncode, plain.stdout, plain.stderr) == (1, "", expected)
    guarded = run_llmkit(["run", "-m", smol, "--guard", "hello"])
    assert (guarded.returncode, guarded.stdout, guarded.stderr) == (1, "", expected)


# -- batches ----------------------------------------------------------------------------------


BATCH = [
    json.dumps({"id": "a", "text": "How do I bake bread?"}),
    json.dumps({"prompt": "What is 2+2?", "response": "4."}),
    "",
    json.dumps({"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello"},
                             {"role": "user", "content": "bye"}]}),
]


def test_batch_file(smol: str, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(BATCH) + "\n")
    proc = check(smol, "--threshold", "0", "--batch", str(path))
    assert proc.returncode == 3, proc.stderr
    out = by_line(proc.stdout)
    assert [r["line"] for r in out] == [1, 2, 4]  # one record per non-blank line
    assert out[0]["id"] == "a" and "id" not in out[1]
    assert [r["role"] for r in out] == ["User", "Agent", "User"]
    assert all(r["verdict"] == "unsafe" and r["error"] is None for r in out)
    assert proc.stderr == "llmkit: 3 records: 0 safe, 3 flagged, 0 errors\n"
    safe = check(smol, "--threshold", "1", "--batch", str(path))
    assert safe.returncode == 0
    assert [r["verdict"] for r in by_line(safe.stdout)] == ["safe"] * 3
    assert safe.stderr == "llmkit: 3 records: 3 safe, 0 flagged, 0 errors\n"
    # Scores match single checks of the same text.
    single = check_json(smol, "--threshold", "1", "How do I bake bread?")
    assert by_line(safe.stdout)[0]["score"] == single["score"]


def test_batch_with_bad_lines_exits_1(smol: str, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join([BATCH[0], "{oops", json.dumps({"txt": "typo"}), BATCH[1]]) + "\n")
    proc = check(smol, "--threshold", "0", "--batch", str(path))
    assert proc.returncode == 1
    out = by_line(proc.stdout)
    assert [r["line"] for r in out] == [1, 2, 3, 4]
    assert [r["flagged"] for r in out] == [True, None, None, True]
    assert out[1]["error"].startswith("line 2 is not JSON: ")
    assert out[2]["error"] == 'line 3 has no "text", "prompt", "messages" or "image"'
    assert proc.stderr == "llmkit: 4 records: 0 safe, 2 flagged, 2 errors\n"


def test_batch_without_threshold_keeps_raw_answers_as_errors(smol: str, tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(BATCH[0] + "\n")
    proc = check(smol, "--batch", str(path))
    assert proc.returncode == 1
    (record,) = records(proc.stdout)
    assert record["verdict"] is None and record["flagged"] is None and record["raw"].strip()
    assert record["error"].startswith("the guard model's answer is not a verdict")
    assert proc.stderr == "llmkit: 1 record: 0 safe, 0 flagged, 1 errors\n"


def _reader(stream: Any, lines: queue.Queue[str]) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put("")


def test_batch_from_stdin_answers_each_line_as_it_arrives(smol: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "check", "-m", smol, "--threshold", "0", "--batch", "-"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ))
    assert proc.stdin is not None and proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    try:
        proc.stdin.write(BATCH[0] + "\n")
        proc.stdin.flush()
        # The verdict comes back while stdin is still open: read per line, flushed per record.
        first = json.loads(lines.get(timeout=120))
        assert first["line"] == 1 and first["id"] == "a" and first["flagged"] is True
        proc.stdin.write(BATCH[1] + "\n")
        proc.stdin.flush()
        second = json.loads(lines.get(timeout=120))
        assert second["line"] == 2 and second["role"] == "Agent"
        proc.stdin.close()
        assert lines.get(timeout=60) == ""
        assert proc.wait(timeout=60) == 3
        assert proc.stderr is not None
        assert proc.stderr.read() == "llmkit: 2 records: 0 safe, 2 flagged, 0 errors\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_batch_from_a_fifo_answers_each_line_as_it_arrives(smol: str, tmp_path: Path) -> None:
    # A named pipe is read as stdin is: the first record comes back before the second line
    # is written, though several records are checked together.
    fifo = tmp_path / "in.jsonl"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "check", "-m", smol, "--threshold", "0", "--batch",
         str(fifo)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=dict(os.environ))
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    try:
        with fifo.open("w", encoding="utf-8") as writer:
            writer.write(BATCH[0] + "\n")
            writer.flush()
            first = json.loads(lines.get(timeout=120))
            assert first["line"] == 1 and first["flagged"] is True
            writer.write(BATCH[1] + "\n")
        second = json.loads(lines.get(timeout=120))
        assert second["line"] == 2
        assert proc.wait(timeout=60) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_batch_from_stdin_piped(smol: str) -> None:
    proc = check(smol, "--threshold", "1", "--batch", "-", input="\n".join(BATCH) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert [r["line"] for r in by_line(proc.stdout)] == [1, 2, 4]
    empty = check(smol, "--batch", "-", input="\n\n")
    assert (empty.returncode, empty.stdout, empty.stderr) == (
        1, "", "llmkit: error: stdin has no records\n")


# -- --guard on the other commands ------------------------------------------------------------


def test_run_with_a_flagged_prompt(smol: str) -> None:
    proc = run_llmkit(["run", "-m", smol, "--guard-model", smol, "--guard-threshold", "0",
                       "hello"])
    assert (proc.returncode, proc.stdout) == (3, "")
    assert proc.stderr == (f"llmkit: flagged: the prompt was flagged by {SMOL_NAME} (no "
                           "category named); nothing was generated\n")


def test_run_with_a_passing_guard(smol: str) -> None:
    args = ["run", "-m", smol, "--guard-model", smol, "--guard-threshold", "1", "--temperature",
            "0", "--max-tokens", "24", "Repeat the word unsafe."]
    text = run_llmkit(args)
    assert text.returncode == 0, text.stderr
    data = json.loads(run_llmkit([*args, "--format", "json"]).stdout)
    assert text.stdout == data["text"] + "\n" and data["text"].strip()
    guard = data["guard"]
    assert list(guard) == ["input", "output"]
    assert guard["input"]["role"] == "User" and guard["output"]["role"] == "Agent"
    assert guard["input"]["verdict"] == guard["output"]["verdict"] == "safe"
    assert guard["input"]["model"] == SMOL_NAME
    # A threshold between the two scores lets the prompt through and withholds the answer.
    low, high = guard["input"]["score"], guard["output"]["score"]
    assert high > low, "this prompt's answer scored lower than the prompt; pick another"
    withheld = run_llmkit([*args[:6], str(round((low + high) / 2, 6)), *args[7:]])
    assert (withheld.returncode, withheld.stdout) == (3, "")
    assert withheld.stderr == (f"llmkit: flagged: the answer was flagged by {SMOL_NAME} (no "
                               "category named); it was withheld\n")


def test_run_with_a_guard_that_gives_no_verdict(smol: str) -> None:
    proc = run_llmkit(["run", "-m", smol, "--guard-model", smol, "hello"])
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.startswith(NOT_A_VERDICT) and proc.stderr.count("\n") == 1


def test_piped_chat_with_a_flagged_message(smol: str) -> None:
    proc = run_llmkit(["chat", "-m", smol, "--guard-model", smol, "--guard-threshold", "0"],
                      input="hi there\n")
    assert (proc.returncode, proc.stdout) == (3, "")
    assert proc.stderr == (f"llmkit: flagged: the input was flagged by {SMOL_NAME} (no "
                           "category named); nothing was generated\n")
    ok = run_llmkit(["chat", "-m", smol, "--guard-model", smol, "--guard-threshold", "1",
                     "-n", "8"], input="hi there\n")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip()


def test_summarize_with_the_guard(smol: str, tmp_path: Path) -> None:
    doc = tmp_path / "note.md"
    doc.write_text("# Bread\n\nFlour, water, salt and yeast are mixed, left to rise for a few "
                   "hours, shaped, and baked in a hot oven until the crust is brown.\n")
    args = ["summarize", str(doc), "-m", smol, "--guard-model", smol, "--format", "json",
            "--length", "short", "--max-tokens", "40"]
    proc = run_llmkit([*args, "--guard-threshold", "0"])
    assert proc.returncode == 3, proc.stderr
    (record,) = json.loads(proc.stdout)
    assert record["flagged"] is True and record["summary"] is None and record["error"] is None
    assert list(record["guard"]) == ["input"]
    assert record["guard"]["input"]["verdict"] == "unsafe"
    assert "flagged_note" not in record
    assert proc.stderr == (f"llmkit: flagged: {doc}: the input was flagged by {SMOL_NAME} (no "
                           "category named); nothing was generated\n")
    ok = run_llmkit([*args, "--guard-threshold", "1"])
    assert ok.returncode == 0, ok.stderr
    (kept,) = json.loads(ok.stdout)
    assert kept["flagged"] is False and kept["summary"].strip()
    assert [kept["guard"][k]["verdict"] for k in ("input", "output")] == ["safe", "safe"]


# -- caption batches with the guard -------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SmolVLM converted by `llmkit convert`; its projector lies beside it."""
    ckpt = tmp_path_factory.mktemp("hf") / "SmolVLM-tiny"
    build_tiny_smolvlm(ckpt)
    out = tmp_path_factory.mktemp("vlm")
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out / "vlm.gguf")])
    assert proc.returncode == 0, proc.stderr
    return out / "vlm.gguf"


def test_caption_batch_with_a_flagging_guard(smol: str, vlm: Path, tmp_path: Path) -> None:
    album = tmp_path / "album"
    album.mkdir()
    paths = [images.write_photo_jpeg(album, "a.jpg"), images.write_alpha_png(album, "b.png")]
    log = tmp_path / "log.jsonl"
    args = ["caption", str(album), "-m", str(vlm), "--sidecar", "--format", "jsonl", "--out",
            str(log), "--max-tokens", "6", "--guard-model", smol]
    proc = run_llmkit([*args, "--guard-threshold", "0"])
    assert proc.returncode == 3, proc.stderr
    out = records(proc.stdout)
    assert [r["path"] for r in out] == [str(p) for p in paths]
    for record in out:
        assert record["flagged"] is True and record["caption"] is None
        assert record["error"] is None
        assert record["guard"]["output"]["verdict"] == "unsafe"
        assert record["guard"]["output"]["role"] == "Agent"
        assert "flagged_note" not in record
    assert records(log.read_text()) == out
    assert sorted(p.name for p in album.iterdir()) == ["a.jpg", "b.png"]  # no sidecars
    assert (f"llmkit: flagged: {paths[0]}: the answer was flagged by {SMOL_NAME} (no category "
            "named); it was withheld\n") in proc.stderr
    assert proc.stderr.endswith("llmkit: 2 images: 0 done, 0 skipped, 0 failed, 2 flagged\n")

    log.unlink()
    kept = run_llmkit([*args, "--guard-threshold", "1"])
    assert kept.returncode == 0, kept.stderr
    out = records(kept.stdout)
    for path, record in zip(paths, out, strict=True):
        assert record["flagged"] is False and record["caption"]
        assert record["guard"]["output"]["verdict"] == "safe"
        assert path.with_suffix(".txt").read_text().strip() == record["caption"].strip()
    assert "flagged" not in kept.stderr
