"""End to end: `llmkit run` and piped `chat` on the real SmolLM2 GGUF through real llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import run_llmkit

pytestmark = pytest.mark.slow
FRANCE = "What is the capital of France?"


def test_run_answers_paris_on_stdout_and_notes_fallback_on_stderr() -> None:
    proc = run_llmkit(["run", "--temperature", "0", FRANCE])
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "llmkit" not in proc.stdout
    assert "llama3.2:1b is not pulled yet; using the embedded smollm2:135m" in proc.stderr


def test_quiet_silences_the_fallback_note() -> None:
    proc = run_llmkit(["run", "-q", "--temperature", "0", "--max-tokens", "4", FRANCE])
    assert proc.returncode == 0
    assert proc.stderr == ""


def test_prompt_from_stdin() -> None:
    proc = run_llmkit(["run", "--temperature", "0"], input=FRANCE + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_stdin_is_context_and_args_the_instruction() -> None:
    alone = json.loads(run_llmkit(
        ["run", "-f", "json", "--temperature", "0", "--max-tokens", "8", "Name the city."]).stdout)
    both = run_llmkit(["run", "-f", "json", "--temperature", "0", "--max-tokens", "8",
                       "Name the city."], input="The city is Paris, in France.\n")
    assert both.returncode == 0, both.stderr
    data = json.loads(both.stdout)
    assert data["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + 5
    assert data["text"].strip()


def test_json_format_has_counts_and_timings() -> None:
    proc = run_llmkit(["run", "--format", "json", "--temperature", "0", FRANCE])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["model"] == "smollm2:135m"
    assert "Paris" in data["text"]
    assert data["finish_reason"] == "stop"
    usage = data["usage"]
    assert usage["prompt_tokens"] > 10 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    for key in ("prompt_ms", "generation_ms", "first_token_ms", "prompt_tokens_per_s",
                "tokens_per_s", "load_ms"):
        assert data["timings"][key] > 0, key
    assert data["device"] == "cpu"


def test_json_schema_constrains_the_output(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    schema_file = tmp_path / "city.json"
    schema_file.write_text(json.dumps(schema))
    proc = run_llmkit(["run", "--json-schema", str(schema_file), "--temperature", "0",
                       "--max-tokens", "200", "Describe Paris as JSON."])
    assert proc.returncode == 0, proc.stderr
    jsonschema.validate(json.loads(proc.stdout), schema)


def test_max_tokens_stops_with_length() -> None:
    proc = run_llmkit(["run", "-f", "json", "--max-tokens", "5", "--seed", "3",
                       "Write a long story about a dragon."])
    data = json.loads(proc.stdout)
    assert data["usage"]["completion_tokens"] == 5
    assert data["finish_reason"] == "length"


def test_seed_makes_sampling_repeatable() -> None:
    args = ["run", "--seed", "42", "--temperature", "0.9", "--max-tokens", "24",
            "Tell me a fact about cats."]
    first, second = run_llmkit(args), run_llmkit(args)
    assert first.returncode == second.returncode == 0
    assert first.stdout == second.stdout and first.stdout.strip()


def test_explicit_model_by_name_and_by_path(smollm2_path: Path) -> None:
    by_name = run_llmkit(["run", "-m", "smollm2:135m", "--temperature", "0", FRANCE])
    by_path = run_llmkit(["run", "-m", str(smollm2_path), "--temperature", "0",
                          "--system", "You are a helpful assistant.", FRANCE])
    assert by_name.returncode == by_path.returncode == 0
    assert "Paris" in by_name.stdout and by_name.stdout == by_path.stdout
    assert by_name.stderr == ""  # asked for explicitly: no fallback note


def test_piped_chat_answers_and_exits() -> None:
    proc = run_llmkit(["chat", "--temperature", "0"], input=FRANCE + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


def test_llama_cpp_log_hidden_unless_verbose() -> None:
    quiet = run_llmkit(["run", "--max-tokens", "2", "hi"])
    assert "llama_model_loader" not in quiet.stderr + quiet.stdout
    assert "print_info" not in quiet.stderr + quiet.stdout
    loud = run_llmkit(["run", "-v", "--max-tokens", "2", "hi"])
    assert loud.returncode == 0
    assert "llama_model_loader" in loud.stderr
    assert "llama_model_loader" not in loud.stdout


@pytest.mark.parametrize("when", ["loading", "generating"])
def test_ctrl_c_exits_130_with_a_message(when: str) -> None:
    import signal
    import subprocess
    import sys

    # -v while loading, to see llama.cpp's log; -q while generating, so stderr cannot fill up.
    flag = "-v" if when == "loading" else "-q"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmkit", "run", flag, "--max-tokens", "0",
         "--temperature", "0.8", "--seed", "1", "Write a very long story about a dragon."],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    if when == "loading":
        # llama.cpp's own log (-v) shows the model is being read: interrupt the load.
        while b"llama_model_loader" not in (line := proc.stderr.readline()):
            assert line, "the process ended before loading the model"
    else:
        proc.stdout.read(20)  # the answer is streaming
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.decode().strip().splitlines()[-1] == "llmkit: error: interrupted"
    assert b"Traceback" not in err and b"Exception ignored" not in err
