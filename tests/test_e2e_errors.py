"""Every bad input of the foundation issue: one error line, the right exit code, no traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_llmkit

LONG_PROMPT = "Tell me about the history of bread. " * 40


def _error(proc_args: list[str], *, code: int = 1, input: bytes | str | None = None) -> str:
    proc = run_llmkit(proc_args, input=input)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    if code != 1:
        return proc.stderr.strip()
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("llmkit: error: ")]
    assert len(errors) == 1, proc.stderr
    # Anything else on stderr is an llmkit note (e.g. the default-model fallback).
    assert all(line.startswith("llmkit: ") for line in lines), proc.stderr
    return errors[0]


def test_unknown_model_name_suggests_close_names() -> None:
    msg = _error(["run", "-m", "smollm2:136m", "hi"])
    assert msg.startswith("llmkit: error: model 'smollm2:136m' not found "
                          "(did you mean smollm2:135m")


def test_missing_gguf_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    msg = _error(["run", "-m", str(missing), "hi"])
    assert msg == f"llmkit: error: model '{missing}' not found (no such file)"


def test_path_that_is_not_a_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("just some text, not a model\n")
    msg = _error(["run", "-m", str(fake), "hi"])
    assert f"{fake}: is not a GGUF model file" in msg


def test_directory_instead_of_file(tmp_path: Path) -> None:
    folder = tmp_path / "model.gguf"
    folder.mkdir()
    assert "is a directory" in _error(["run", "-m", str(folder), "hi"])


def test_empty_model_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert f"{empty}: is empty" in _error(["run", "-m", str(empty), "hi"])


def test_truncated_gguf(tmp_path: Path, smollm2_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = smollm2_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    msg = _error(["run", "-m", str(cut), "hi"])
    assert "is truncated" in msg and "download or convert it again" in msg


def test_truncated_inside_the_header(tmp_path: Path, smollm2_path: Path) -> None:
    cut = tmp_path / "head.gguf"
    cut.write_bytes(smollm2_path.read_bytes()[:5000])
    msg = _error(["run", "-m", str(cut), "hi"])
    assert "is truncated (the header runs past the end at 5000 bytes)" in msg


def test_corrupt_gguf_garbage_after_magic(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    msg = _error(["run", "-m", str(bad), "hi"])
    assert "is corrupt" in msg or "is truncated" in msg


def test_corrupt_tensor_table(tmp_path: Path, smollm2_path: Path) -> None:
    data = bytearray(smollm2_path.read_bytes())
    # Overwrite the tensor count with an absurd number: the header no longer adds up.
    data[8:16] = (2**40).to_bytes(8, "little")
    bad = tmp_path / "count.gguf"
    bad.write_bytes(bytes(data))
    assert "is corrupt (1099511627776 tensors" in _error(["run", "-m", str(bad), "hi"])


def test_unknown_option_value_is_a_usage_error() -> None:
    msg = _error(["run", "--device", "tpu", "hi"], code=2)
    assert "Invalid value for '--device'" in msg


def test_unknown_option_is_a_usage_error() -> None:
    msg = _error(["run", "--frobnicate", "hi"], code=2)
    assert "No such option: --frobnicate" in msg


def test_empty_prompt_argument() -> None:
    msg = _error(["run", "   "])
    assert msg == ("llmkit: error: the prompt is empty "
                   "(pass a prompt as an argument or on stdin)")


def test_empty_stdin() -> None:
    assert "the prompt is empty" in _error(["run"], input=b"")


def test_empty_piped_chat() -> None:
    assert "stdin is empty" in _error(["chat"], input=b"\n")


def test_non_utf8_stdin() -> None:
    msg = _error(["run"], input=b"caf\xe9 au lait\n")
    assert msg.startswith("llmkit: error: stdin is not UTF-8 text (byte 0xe9 at offset 3)")


def test_prompt_longer_than_the_context() -> None:
    msg = _error(["run", "--ctx", "64", LONG_PROMPT])
    assert "tokens but the context holds" in msg and "raise --ctx" in msg


def test_catalog_model_not_pulled() -> None:
    msg = _error(["run", "-m", "llama3.2:3b", "hi"])
    assert msg == ("llmkit: error: model 'llama3.2:3b' is in the catalog but not on this "
                   "machine (run `llmkit pull llama3.2:3b`)")


def test_unsupported_vision_model_says_why_and_what_instead() -> None:
    msg = _error(["run", "-m", "llama-guard4:12b", "hi"])
    assert "is not supported" in msg and "zero experts" in msg
    assert "try llama-guard3:1b" in msg


def test_gpu_on_a_cpu_only_build() -> None:
    msg = _error(["run", "--device", "gpu", "hi"])
    assert "no GPU offload" in msg and "CMAKE_ARGS" in msg


def test_gpu_layers_with_cpu_device_is_a_usage_error() -> None:
    proc = run_llmkit(["run", "--device", "cpu", "--gpu-layers", "4", "hi"])
    assert proc.returncode == 2
    assert "--gpu-layers needs --device gpu or auto" in proc.stderr


def test_json_schema_that_is_not_json(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text("{not json")
    assert "JSON schema is not valid JSON" in _error(["run", "--json-schema", str(schema), "hi"])


def test_json_schema_file_missing(tmp_path: Path) -> None:
    assert "x.json does not exist" in _error(["run", "--json-schema", str(tmp_path / "x.json"),
                                              "hi"])


def test_show_of_a_non_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"PK\x03\x04 zip file")
    assert "is not a GGUF model file" in _error(["show", str(fake)])


def test_damaged_manifest(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "manifest.json").write_text("{oops")
    msg = _error(["list", "--format", "json"])
    assert "manifest.json is damaged" in msg


def test_debug_env_shows_the_traceback() -> None:
    proc = run_llmkit(["run", "-m", "nope:1b", "hi"], env={"LLMKIT_DEBUG": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ModelNotFoundError" in proc.stderr


@pytest.mark.parametrize("args", [["list", "--format", "json"], ["doctor", "--format", "json"]])
def test_json_commands_write_only_json_to_stdout(args: list[str]) -> None:
    proc = run_llmkit(args)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
