"""Option and environment values llama.cpp cannot take are usage errors (exit 2, one line)."""

from __future__ import annotations

import pytest

from llmkit.catalog import parse_catalog
from llmkit.errors import CatalogError
from tests.conftest import run_llmkit

# Every float option of every command (`grep -n float llmkit/cli`), and where it lives.
FLOAT_OPTIONS = [
    (command, option)
    for command in ("run", "chat", "summarize", "caption")
    for option in ("--temperature", "--top-p", "--guard-threshold")
] + [("check", "--threshold")]


def _usage_error(args: list[str], env: dict[str, str] | None = None) -> str:
    proc = run_llmkit(args, env=env, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmkit: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize(("command", "option"), FLOAT_OPTIONS)
def test_nan_is_refused_by_every_float_option(command: str, option: str) -> None:
    line = _usage_error([command, option, "nan", "hello"])
    assert line == (f"llmkit: error: Invalid value for '{option}': nan is not a finite number "
                    f"(see `llmkit {command} --help`)")


@pytest.mark.parametrize("value", ["NaN", "-nan", "+NAN"])
def test_nan_is_refused_however_it_is_spelled(value: str) -> None:
    assert "nan is not a finite number" in _usage_error(["run", "--top-p", value, "hello"])


@pytest.mark.parametrize(("option", "value"), [
    ("--temperature", "inf"), ("--top-p", "-inf"), ("--guard-threshold", "infinity")])
def test_infinities_are_out_of_range(option: str, value: str) -> None:
    assert "is not in the range" in _usage_error(["run", option, value, "hello"])


@pytest.mark.parametrize(("option", "value"), [
    ("--threads", "0"), ("--threads", "513"), ("--threads", "4294967297"),
    ("--ctx", "4294967312"), ("--gpu-layers", "4294967296")])
def test_counts_that_would_wrap_or_are_absurd_are_refused(option: str, value: str) -> None:
    # 2**32 + 16 tokens of context would reach llama.cpp's uint32 field as 16.
    assert "is not in the range" in _usage_error(["run", option, value, "hello"])


@pytest.mark.parametrize("value", ["abc", "0", "-1", "1.5", "2 3", "513", "1000000000",
                                   "\u0663", "1_000"])
def test_a_bad_llmkit_threads_is_a_usage_error_naming_it(value: str) -> None:
    line = _usage_error(["run", "-q", "--max-tokens", "1", "hello"],
                        env={"LLMKIT_THREADS": value})
    assert line == (f"llmkit: error: LLMKIT_THREADS={value!r} is not a thread count from 1 to "
                    "512 (set a whole number, or unset LLMKIT_THREADS to let llmkit choose)")


def test_a_bad_llmkit_threads_stops_doctor_too() -> None:
    assert "LLMKIT_THREADS='many'" in _usage_error(["doctor"], env={"LLMKIT_THREADS": "many"})


def test_a_system_prompt_that_is_not_utf8_is_a_usage_error() -> None:
    # Python hands argument bytes that are not UTF-8 on as lone surrogates.
    line = _usage_error(["run", "--system", "caf\udce9", "hello"])
    assert line == ("llmkit: error: Invalid value for '--system' / '-s': it is not UTF-8 text "
                    "(byte 0xe9 at character 3) (see `llmkit run --help`)")


@pytest.mark.parametrize(("args", "name"), [
    (["run", "caf\udce9"], "'prompt'"),
    (["check", "caf\udce9"], "'text'"),
    (["check", "--prompt", "caf\udce9"], "'--prompt'"),
    (["check", "--prompt", "hi", "--response", "caf\udce9"], "'--response'"),
    (["caption", "--prompt", "caf\udce9", "x.jpg"], "'--prompt' / '-p'"),
    (["summarize", "--focus", "caf\udce9", "x.txt"], "'--focus'"),
    (["summarize", "--language", "caf\udce9", "x.txt"], "'--language'"),
])
def test_text_arguments_that_are_not_utf8_are_usage_errors(args: list[str], name: str) -> None:
    # Before, these reached the tokenizer and ended in "unexpected UnicodeEncodeError".
    line = _usage_error(args)
    assert line.startswith(f"llmkit: error: Invalid value for {name}: it is not UTF-8 text "
                           "(byte 0xe9 at character 3)"), line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", ["temperature", "top_p"])
def test_catalog_refuses_non_finite_sampling_values(key: str, value: str) -> None:
    text = (f'[models."x:1b"]\nkind = "text"\ndescription = "A model"\nhf_repo = "a/b"\n'
            f'file = "x.gguf"\ndefault_quant = "Q4_0"\n{key} = {value}\n')
    with pytest.raises(CatalogError, match=f"{key} must be a number, 0 or more"):
        parse_catalog(text)
