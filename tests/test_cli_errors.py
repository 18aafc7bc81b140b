"""Every bad input gives one `llmkit: error:` line on stderr, no traceback, and the right code."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest

from llmkit.catalog import load_catalog
from llmkit.errors import InputError
from llmkit.io import decode_text, read_stdin, read_text_file
from tests.conftest import run_llmkit

LONG_PROMPT = "word " * 200  # about 220 tokens with the chat template: over 64, under 256
LLAMA_LOG_MARKERS = ("llama_model_load", "llama_model_loader", "print_info", "load_tensors",
                     "llama_context")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One llama.cpp thread per run: spinning workers crawl on a busy two-core machine."""
    monkeypatch.setenv("LLMKIT_THREADS", "1")


@pytest.fixture(scope="module")
def model_bytes(smollm2_path: Path) -> bytes:
    return smollm2_path.read_bytes()


@pytest.fixture(scope="module")
def gpu_offload() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _error(args: list[str], *, code: int = 1, **kwargs: Any) -> str:
    """Run llmkit, expect one error line and nothing else; return that line."""
    proc = run_llmkit(args, **kwargs)
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("llmkit: error: "), proc.stderr
    return lines[0]


# -- models -----------------------------------------------------------------------------------


def test_unknown_model_name_suggests_close_names() -> None:
    msg = _error(["run", "-m", "smollm2:136m", "hi"])
    assert re.fullmatch(r"llmkit: error: model 'smollm2:136m' not found "
                        r"\(did you mean smollm2:135m(, [a-z0-9.:_-]+)*\?\)", msg), msg


def test_unknown_model_name_with_nothing_close() -> None:
    assert _error(["run", "-m", "qqqqqqqqqqqq", "hi"]) == (
        "llmkit: error: model 'qqqqqqqqqqqq' not found (`llmkit list` shows known models)")


def test_missing_gguf_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    assert _error(["run", "-m", str(missing), "hi"]) == (
        f"llmkit: error: model '{missing}' not found (no such file)")


def test_text_file_renamed_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("These are my notes, not a model.\n", encoding="utf-8")
    assert _error(["run", "-m", str(fake), "hi"]) == (
        f"llmkit: error: {fake}: is not a GGUF model file "
        "(llmkit runs .gguf files; convert Hugging Face checkpoints to GGUF first)")


def test_empty_gguf(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert _error(["run", "-m", str(empty), "hi"]) == f"llmkit: error: {empty}: is empty"


def test_truncated_gguf(tmp_path: Path, model_bytes: bytes) -> None:
    cut = tmp_path / "half.gguf"
    half = len(model_bytes) // 2
    cut.write_bytes(model_bytes[:half])
    assert _error(["run", "-m", str(cut), "hi"]) == (
        f"llmkit: error: {cut}: is truncated ({half} bytes; its tensors need "
        f"{len(model_bytes)}) (download or convert it again)")


def test_real_header_then_random_bytes(tmp_path: Path, model_bytes: bytes) -> None:
    bad = tmp_path / "noise.gguf"
    bad.write_bytes(model_bytes[:24] + random.Random(0).randbytes(1 << 20))
    msg = _error(["run", "-m", str(bad), "hi"])
    assert msg.startswith(f"llmkit: error: {bad}: is corrupt (a string of ")
    assert msg.endswith("(download or convert it again)")


def test_gguf_magic_then_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + random.Random(1).randbytes(8192))
    msg = _error(["run", "-m", str(bad), "hi"])
    assert msg.startswith(f"llmkit: error: {bad}: is corrupt (unsupported GGUF version ")


def test_catalog_model_not_pulled() -> None:
    assert _error(["run", "-m", "llama3.2:3b", "hi"]) == (
        "llmkit: error: model 'llama3.2:3b' is in the catalog but not on this machine "
        "(run `llmkit pull llama3.2:3b`)")


def test_unsupported_models_say_why_and_what_instead() -> None:
    unsupported = [spec for spec in load_catalog().values() if not spec.supported]
    assert unsupported
    for spec in unsupported:
        msg = _error(["run", "-m", spec.name, "hi"])
        assert msg == (f"llmkit: error: model '{spec.name}' is not supported: {spec.reason} "
                       f"(try {', '.join(spec.alternatives)})")


def test_llama32_vision_not_built_says_how_to_build_it() -> None:
    msg = _error(["run", "-m", "llama3.2-vision:11b", "hi"])
    assert msg == ("llmkit: error: model 'llama3.2-vision:11b' is in the catalog but not on "
                   "this machine (run `llmkit pull llama3.2-vision:11b --from-source`)")


def test_unsupported_model_in_chat_too() -> None:
    name = next(s.name for s in load_catalog().values() if not s.supported)
    assert "is not supported" in _error(["chat", "-m", name], input="hi\n")


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--device", "tpu", "hi"],
     "Invalid value for '--device': 'tpu' is not one of 'auto', 'cpu', 'gpu'."),
    (["run", "--frobnicate", "hi"], "No such option: --frobnicate"),
    (["run", "--max-tokens", "many", "hi"], "Invalid value for '--max-tokens'"),
    (["run", "--temperature", "-1", "hi"], "Invalid value for '--temperature'"),
    (["chat", "--ctx", "8"], "Invalid value for '--ctx'"),
    (["list", "--format", "yaml"], "Invalid value for '--format'"),
    (["nonsense"], "No such command 'nonsense'"),
])
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    proc = run_llmkit(args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert message in proc.stderr


@pytest.mark.parametrize("args", [["run", "--device", "tpu", "hi"], ["run", "--frobnicate"]])
def test_usage_errors_are_one_error_line(args: list[str]) -> None:
    msg = _error(args, code=2)
    assert "--device" in msg or "--frobnicate" in msg


def test_llmkit_usage_error_is_one_line() -> None:
    assert _error(["run", "--device", "cpu", "--gpu-layers", "4", "hi"], code=2) == (
        "llmkit: error: --gpu-layers needs --device gpu or auto, not cpu")


def test_gpu_on_a_cpu_only_build(gpu_offload: bool) -> None:
    if gpu_offload:
        pytest.skip("this llama.cpp build can offload to a GPU")
    assert _error(["run", "--device", "gpu", "hi"]) == (
        "llmkit: error: this llama.cpp build has no GPU offload (reinstall llama-cpp-python "
        "with CMAKE_ARGS=-DGGML_CUDA=on (or -DGGML_METAL=on, -DGGML_VULKAN=on); see the README)")


def test_gpu_layers_on_a_cpu_only_build(gpu_offload: bool) -> None:
    if gpu_offload:
        pytest.skip("this llama.cpp build can offload to a GPU")
    msg = _error(["run", "--gpu-layers", "4", "hi"])
    assert msg.startswith("llmkit: error: this llama.cpp build has no GPU offload")


def test_json_schema_that_is_not_json(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object",', encoding="utf-8")
    msg = _error(["run", "--json-schema", str(schema), "hi"])
    assert msg.startswith("llmkit: error: the JSON schema is not valid JSON: ")


def test_json_schema_file_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    assert _error(["run", "--json-schema", str(missing), "hi"]) == (
        f"llmkit: error: {missing} does not exist")


# -- input ------------------------------------------------------------------------------------

EMPTY = "llmkit: error: the prompt is empty (pass a prompt as an argument or on stdin)"


def test_empty_prompt_argument() -> None:
    assert _error(["run", ""]) == EMPTY


def test_blank_prompt_argument() -> None:
    assert _error(["run", "  ", "\t"]) == EMPTY


def test_empty_stdin() -> None:
    assert _error(["run"], input=b"") == EMPTY


def test_no_prompt_and_stdin_at_dev_null() -> None:
    assert _error(["run"]) == EMPTY


def test_blank_stdin_and_blank_argument() -> None:
    assert _error(["run", " "], input=b"\n\n") == EMPTY


def test_empty_piped_chat() -> None:
    assert _error(["chat"], input=b"  \n") == (
        "llmkit: error: stdin is empty (pipe a message, or run chat in a terminal)")


def test_non_utf8_stdin() -> None:
    assert _error(["run"], input=b"\xff\xfe bad") == (
        "llmkit: error: stdin is not UTF-8 text (byte 0xff at offset 0) "
        "(convert it first, e.g. `iconv -f latin1 -t utf-8`)")


def test_non_utf8_stdin_with_an_argument() -> None:
    msg = _error(["run", "Summarize this."], input=b"caf\xe9\n")
    assert msg.startswith("llmkit: error: stdin is not UTF-8 text (byte 0xe9 at offset 3)")


def test_non_utf8_stdin_in_chat() -> None:
    msg = _error(["chat"], input=b"\xff\xfe bad")
    assert msg.startswith("llmkit: error: stdin is not UTF-8 text (byte 0xff at offset 0)")


def test_prompt_longer_than_the_context() -> None:
    msg = _error(["run", "-m", "smollm2:135m", "--ctx", "64", LONG_PROMPT])
    assert re.fullmatch(
        r"llmkit: error: prompt is \d+ tokens but the context holds 48 "
        r"\(64 minus 16 reserved for the answer\) "
        r"\(raise --ctx, lower --max-tokens, or shorten the input\)", msg), msg


def test_prompt_longer_than_the_context_in_chat() -> None:
    msg = _error(["chat", "-m", "smollm2:135m", "--ctx", "64"], input=LONG_PROMPT)
    assert "tokens but the context holds" in msg and "raise --ctx" in msg


def test_debug_shows_the_traceback() -> None:
    proc = run_llmkit(["run", "-m", "qqqqqqqqqqqq", "hi"], env={"LLMKIT_DEBUG": "1"})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ModelNotFoundError" in proc.stderr


# -- llama.cpp's own log ----------------------------------------------------------------------


def test_llama_cpp_log_is_hidden_without_verbose() -> None:
    proc = run_llmkit(["run", "-m", "smollm2:135m", "--temperature", "0", "--max-tokens", "3",
                       "hi"])
    assert proc.returncode == 0, proc.stderr
    for marker in LLAMA_LOG_MARKERS:
        assert marker not in proc.stdout
        assert marker not in proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.strip()


def test_llama_cpp_log_shows_on_stderr_with_verbose() -> None:
    quiet = run_llmkit(["run", "-m", "smollm2:135m", "--temperature", "0", "--max-tokens", "3",
                        "hi"])
    loud = run_llmkit(["run", "-v", "-m", "smollm2:135m", "--temperature", "0",
                       "--max-tokens", "3", "hi"])
    assert loud.returncode == 0, loud.stderr
    assert "llama_model_load" in loud.stderr and "print_info" in loud.stderr
    for marker in LLAMA_LOG_MARKERS:
        assert marker not in loud.stdout
    assert loud.stdout == quiet.stdout


def test_llama_cpp_log_of_a_failed_load_stays_hidden(tmp_path: Path,
                                                     model_bytes: bytes) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(model_bytes[: len(model_bytes) // 2])
    msg = _error(["run", "-m", str(cut), "hi"])  # exactly one line: no llama.cpp chatter
    assert "is truncated" in msg


# -- decoding input (llmkit.io) ---------------------------------------------------------------


@pytest.mark.parametrize(("data", "text"), [
    (b"", ""),
    (b"hello", "hello"),
    ("café 你好 🎉".encode(), "café 你好 🎉"),
    (b"\xef\xbb\xbfwith a BOM", "with a BOM"),
    (b"line\r\nline\n", "line\r\nline\n"),
])
def test_decode_text(data: bytes, text: str) -> None:
    assert decode_text(data, "stdin") == text


@pytest.mark.parametrize(("data", "message"), [
    (b"\xff\xfe bad", "stdin is not UTF-8 text (byte 0xff at offset 0)"),
    (b"caf\xe9", "stdin is not UTF-8 text (byte 0xe9 at offset 3)"),
    (b"ok \xc3", "stdin is not UTF-8 text (byte 0xc3 at offset 3)"),
    (b"\xfe\xff\x00h\x00i", "stdin is not UTF-8 text (byte 0xfe at offset 0)"),
])
def test_decode_text_refuses_other_encodings(data: bytes, message: str) -> None:
    with pytest.raises(InputError) as info:
        decode_text(data, "stdin")
    assert info.value.message == message
    assert info.value.hint == "convert it first, e.g. `iconv -f latin1 -t utf-8`"
    assert info.value.exit_code == 1


def test_read_stdin_from_a_stream() -> None:
    import io

    assert read_stdin(io.BytesIO(b"piped\n")) == "piped\n"
    with pytest.raises(InputError):
        read_stdin(io.BytesIO(b"\x80"))


def test_read_text_file(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_bytes("naïve\n".encode())
    assert read_text_file(good) == "naïve\n"
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"na\xefve")
    with pytest.raises(InputError, match=f"{re.escape(str(bad))} is not UTF-8 text"):
        read_text_file(bad)
    with pytest.raises(InputError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="is a directory"):
        read_text_file(tmp_path)
