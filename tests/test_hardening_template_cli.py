"""Chat templates from model files, end to end through the CLI: hostile templates fail in seconds
with bounded memory and one line naming the model; templates that read message content only as
typed parts (SmolVLM's, as published) get typed parts."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests import images
from tests.conftest import run_llmkit
from tests.hardening_models import (
    SMOLVLM_TEMPLATE,
    convert_tiny_llama3,
    convert_tiny_smolvlm,
    with_chat_template,
)
from tests.measure import measured, peak_kib
from tests.test_hardening_special_tokens import run_recorded

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_tiny_llama3(tmp_path_factory.mktemp("tiny3"))


def run_measured(args: list[str]) -> tuple[int, str, float, int]:
    """Run the CLI; its exit status, stderr, wall seconds and peak RSS in bytes (its own)."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "peak"
        proc = subprocess.Popen(measured([sys.executable, "-m", "llmkit", *args], report),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        assert proc.stderr is not None
        err = proc.stderr.read().decode("utf-8", "replace")
        proc.wait()
        return proc.returncode, err, time.monotonic() - started, peak_kib(report) * 1024


LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}"
HOSTILE = {
    # The case: a nested 10⁵×10⁵ loop that writes.
    "nested-writing": LOOP + "{{ messages[0]['content'] }}{% endfor %}{% endfor %}",
    "nested-silent": LOOP + "{% endfor %}{% endfor %}",
    "doubling": ("{% set ns = namespace(s=messages[0]['content']) %}{% for i in range(100) %}"
                 "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"),
    "sharing": ("{% set ns = namespace(x=[1]) %}{% for i in range(100) %}"
                "{% set ns.x = [ns.x, ns.x] %}{% endfor %}{{ ns.x | tojson }}"),
    "repetition": "{{ messages[0]['content'] * 10 ** 12 }}",
    "recursion": "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f(messages[0]['content']) }}",
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_templates_fail_in_seconds_with_bounded_memory(tiny3: Path, tmp_path: Path,
                                                               name: str) -> None:
    good = with_chat_template(tiny3, tmp_path / "good.gguf", "{{ messages[0]['content'] }}")
    rc, err, _, baseline = run_measured(["run", "-m", str(good), "-t", "1", "-n", "1", "hi"])
    assert rc == 0, err
    bad = with_chat_template(tiny3, tmp_path / f"{name}.gguf", HOSTILE[name])
    rc, err, seconds, peak = run_measured(["run", "-m", str(bad), "-t", "1", "hi"])
    assert rc == 1
    assert err.startswith(f"llmkit: error: the chat template of {name}.gguf exceeded "), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert peak < baseline + 128 * 2**20, f"{(peak - baseline) / 2**20:.0f} MiB over {name}"
    assert seconds < 60  # five CPU seconds at most for the template, on a busy machine


def test_template_errors_are_one_line_naming_the_problem(tiny3: Path, tmp_path: Path) -> None:
    invalid = with_chat_template(tiny3, tmp_path / "invalid.gguf", "{% for m in messages %}")
    proc = run_llmkit(["run", "-m", str(invalid), "-t", "1", "hi"])
    assert proc.returncode == 1
    assert proc.stderr.startswith("llmkit: error: the chat template of invalid.gguf is not a "
                                  "valid Jinja template: "), proc.stderr
    assert proc.stderr.count("\n") == 1
    refusing = with_chat_template(
        tiny3, tmp_path / "refusing.gguf",
        "{{ raise_exception('Only user and assistant roles are supported!') }}")
    proc = run_llmkit(["run", "-m", str(refusing), "-t", "1", "hi"])
    assert (proc.returncode, proc.stderr) == (1, (
        "llmkit: error: the model's chat template rejected the conversation: Only user and "
        "assistant roles are supported! (some templates need alternating user/assistant "
        "turns)\n"))
    escaping = with_chat_template(tiny3, tmp_path / "escaping.gguf",
                                  "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    proc = run_llmkit(["run", "-m", str(escaping), "-t", "1", "hi"])
    assert proc.returncode == 1
    assert proc.stderr.startswith("llmkit: error: the chat template of escaping.gguf was "
                                  "stopped by the sandbox: "), proc.stderr


def test_hostile_template_in_a_summary_batch_is_one_failed_record(tiny3: Path,
                                                                  tmp_path: Path) -> None:
    bad = with_chat_template(tiny3, tmp_path / "bad.gguf", HOSTILE["nested-silent"])
    docs = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for doc in docs:
        doc.write_text("The river rose by a metre, and the bridge stayed open.\n")
    proc = run_llmkit(["summarize", *map(str, docs), "-m", str(bad), "-t", "1", "--format",
                       "jsonl"])
    assert proc.returncode == 1
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 2, proc.stderr
    assert all("the chat template of bad.gguf exceeded" in r["error"] for r in records)


# -- typed content ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published_vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SmolVLM-shaped model with SmolVLM's chat template exactly as published."""
    return convert_tiny_smolvlm(tmp_path_factory.mktemp("vlm"), template=SMOLVLM_TEMPLATE)


def test_the_published_template_is_in_the_model(published_vlm: Path) -> None:
    from llmkit.gguf_file import read_info

    assert read_info(published_vlm).chat_template == SMOLVLM_TEMPLATE


def test_caption_with_smolvlms_published_template(published_vlm: Path, tmp_path: Path) -> None:
    from llmkit.engines import load_engine

    picture = images.write_photo_jpeg(tmp_path)
    got = run_recorded(["caption", str(picture), "-m", str(published_vlm), "--max-tokens", "4",
                        "--temperature", "0", "-t", "1", "--format", "json"], tmp_path)
    (record,) = json.loads(got.proc.stdout)
    assert record["error"] is None
    assert record["usage"]["image_tokens"] > 0
    with load_engine(published_vlm, n_ctx=256, threads=1) as engine:
        text = engine.detokenize(got.prompt_ids(), special=True)
    # The image (between mtmd's wrapper tokens) sits where the typed text part put it: after
    # "User: ", before the instruction.
    assert text.startswith("<|im_start|>User: <fake_token_around_image>"), text
    assert text.endswith("<fake_token_around_image>\nDescribe this image in one sentence."
                         "<end_of_utterance>\nAssistant:"), text


def test_run_with_an_image_and_a_system_prompt(published_vlm: Path, tmp_path: Path) -> None:
    picture = images.write_photo_jpeg(tmp_path)
    proc = run_llmkit(["run", "-m", str(published_vlm), "--image", str(picture), "--system",
                       "Be brief.", "-n", "3", "-t", "1", "--format", "json", "What is it?"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["usage"]["prompt_tokens"] > 20


TYPED_TEXT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_text_models_with_typed_templates(tiny3: Path, tmp_path: Path) -> None:
    from llmkit.engines import load_engine

    typed = with_chat_template(tiny3, tmp_path / "typed.gguf", TYPED_TEXT)
    question = "What is the capital of France?"
    got = run_recorded(["run", "-m", str(typed), "-n", "2", "-t", "1", "--system",
                        "Be brief.", question], tmp_path)
    piped = run_recorded(["chat", "-m", str(typed), "-n", "2", "-t", "1"], tmp_path,
                         input=question + "\n")
    turn = (f"<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    system = "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
    with load_engine(typed, n_ctx=256, threads=1) as engine:
        assert engine.detokenize(got.prompt_batches()[0], special=True) == (
            "<|begin_of_text|>" + system + turn)
        assert engine.detokenize(piped.prompt_batches()[0], special=True) == (
            "<|begin_of_text|>" + turn)
