"""End to end: `llmkit run` and piped `llmkit chat` on the real SmolLM2 GGUF."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.conftest import run_llmkit

pytestmark = pytest.mark.slow

FRANCE = "What is the capital of France?"
PARIS = "The capital of France is Paris.\n"
FALLBACK_NOTE = ("llmkit: llama3.2:1b is not pulled yet; using the embedded smollm2:135m "
                 "(run `llmkit pull llama3.2:1b` for the default)\n")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One llama.cpp thread per run: spinning workers crawl on a busy two-core machine."""
    monkeypatch.setenv("LLMKIT_THREADS", "1")


def _ok(args: list[str], **kwargs: Any) -> tuple[str, str]:
    proc = run_llmkit(args, **kwargs)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc.stdout, proc.stderr


def _json(args: list[str], **kwargs: Any) -> dict[str, Any]:
    stdout, _ = _ok([*args, "--format", "json"], **kwargs)
    data = json.loads(stdout)  # the whole of stdout is one JSON document
    assert isinstance(data, dict)
    return data


def test_run_answers_on_stdout_and_notes_the_fallback_on_stderr() -> None:
    stdout, stderr = _ok(["run", "--temperature", "0", FRANCE])
    assert stdout == PARIS
    assert stderr == FALLBACK_NOTE


def test_quiet_silences_the_fallback_note() -> None:
    stdout, stderr = _ok(["run", "-q", "--temperature", "0", FRANCE])
    assert stdout == PARIS
    assert stderr == ""


def test_greedy_is_the_catalog_default_for_smollm2() -> None:
    # The catalog sets temperature 0 for the tiny model; no flag needed for a stable answer.
    stdout, _ = _ok(["run", "-q", FRANCE])
    assert stdout == PARIS


def test_prompt_from_stdin() -> None:
    stdout, stderr = _ok(["run", "--temperature", "0"], input=FRANCE + "\n")
    assert stdout == PARIS
    assert stderr == FALLBACK_NOTE


def test_stdin_is_the_context_and_arguments_the_instruction() -> None:
    question = "What is the secret word? Answer with one word."
    stdout, _ = _ok(["run", "-q", "--temperature", "0", "--max-tokens", "16", question],
                    input="The secret word is banana.\n")
    assert "banana" in stdout.lower()
    alone = _json(["run", "-q", "--temperature", "0", "--max-tokens", "4", question])
    both = _json(["run", "-q", "--temperature", "0", "--max-tokens", "4", question],
                 input="The secret word is banana.\n")
    assert both["text"].strip()
    # "The secret word is banana." is 6 tokens, plus the blank line that joins the two parts.
    assert both["usage"]["prompt_tokens"] >= alone["usage"]["prompt_tokens"] + 6


def test_json_format() -> None:
    data = _json(["run", "-q", "--temperature", "0", FRANCE])
    assert data["model"] == "smollm2:135m"
    assert data["text"] == PARIS.rstrip("\n")
    assert data["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["prompt_tokens_evaluated"] <= usage["prompt_tokens"]
    timings = data["timings"]
    for key in ("prompt_ms", "generation_ms", "first_token_ms", "prompt_tokens_per_s",
                "tokens_per_s", "load_ms"):
        assert isinstance(timings[key], (int, float)) and timings[key] > 0, key
    assert data["device"] in ("cpu", "gpu")
    assert data["threads"] == 1


def test_json_format_without_quiet_keeps_stdout_clean() -> None:
    proc = run_llmkit(["run", "--format", "json", "--max-tokens", "3", FRANCE])
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    assert proc.stderr == FALLBACK_NOTE


def test_json_schema_output_validates(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    schema_file = tmp_path / "city.schema.json"
    schema_file.write_text(json.dumps(schema), encoding="utf-8")
    stdout, _ = _ok(["run", "-q", "--temperature", "0", "--max-tokens", "120",
                     "--json-schema", str(schema_file), "Describe Paris as JSON."])
    data = json.loads(stdout)
    jsonschema.validate(data, schema)
    as_json = _json(["run", "-q", "--temperature", "0", "--max-tokens", "120",
                     "--json-schema", str(schema_file), "Describe Paris as JSON."])
    jsonschema.validate(json.loads(as_json["text"]), schema)
    assert as_json["finish_reason"] == "stop"


def test_max_tokens_stops_with_length() -> None:
    data = _json(["run", "-q", "--max-tokens", "5", "--temperature", "0",
                  "Write a long story about a dragon."])
    assert 0 < data["usage"]["completion_tokens"] <= 5
    assert data["finish_reason"] == "length"


def test_seed_makes_sampling_repeatable() -> None:
    args = ["run", "-q", "--seed", "42", "--temperature", "0.8", "--max-tokens", "16",
            "Tell me a fact about cats."]
    first, _ = _ok(args)
    second, _ = _ok(args)
    assert first.strip()
    assert first == second


def test_system_prompt_option() -> None:
    stdout, _ = _ok(["run", "-q", "--temperature", "0", "--max-tokens", "24",
                     "--system", "You are a pirate. Always answer like a pirate.", "Hello!"])
    assert stdout.strip()
    assert stdout != PARIS


def test_model_by_name_and_by_path_agree(smollm2_path: Path) -> None:
    by_name, name_err = _ok(["run", "-m", "smollm2:135m", "--temperature", "0", FRANCE])
    # A bare path has no catalog entry, so no default system prompt: give the catalog's.
    by_path, path_err = _ok(["run", "-m", str(smollm2_path), "--temperature", "0",
                             "--system", "You are a helpful assistant.", FRANCE])
    assert by_name == by_path == PARIS
    assert name_err == path_err == ""  # asked for explicitly: no fallback note


def test_piped_chat_answers_and_exits() -> None:
    proc = run_llmkit(["chat", "--temperature", "0"], input=FRANCE + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PARIS
    assert proc.stderr == FALLBACK_NOTE


def test_piped_chat_quiet() -> None:
    proc = run_llmkit(["chat", "-q", "-m", "smollm2:135m", "--temperature", "0"],
                      input=FRANCE)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PARIS and proc.stderr == ""
