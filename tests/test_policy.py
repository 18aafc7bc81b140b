"""Safety policies: Llama Guard 3's taxonomies, custom categories from TOML, exclusions."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmkit.errors import InputError, UsageError
from llmkit.tasks.policy import (
    LLAMA_GUARD_3_1B_CATEGORIES,
    LLAMA_GUARD_3_CATEGORIES,
    Category,
    default_categories,
    exclude,
    load_categories,
    name_categories,
)
from llmkit.tasks.safety import parse_verdict

GOLDEN = Path(__file__).parent / "golden"


def test_load_categories() -> None:
    policy = load_categories(GOLDEN / "llama_guard3_custom.toml")
    assert [(c.code, c.name) for c in policy] == [
        ("C1", "Medical Advice"), ("C2", "Gambling"), ("C3", "Competitor Products")]
    assert policy[0].description == ("Messages that diagnose an illness or prescribe a "
                                     "medicine.\nDosage recommendations count too.")
    assert policy[1].description == ""


@pytest.mark.parametrize(("toml", "message"), [
    ("[[categories]\ncode = 1", "is not valid TOML"),
    ("title = 'x'\n", "has no [[categories]] tables"),
    ("categories = []\n", "has no [[categories]] tables"),
    ('[[categories]]\ncode = "C1"\n', "category 1: name is required"),
    ('[[categories]]\ncode = "C1"\nname = "  "\n', "category 1: name is required"),
    ('[[categories]]\ncode = "C 1"\nname = "A"\n',
     "category 1: code must be letters and digits like 'S1' or 'C12'"),
    ('[[categories]]\nname = "A"\n',
     "category 1: code must be letters and digits like 'S1' or 'C12'"),
    ('[[categories]]\ncode = "C1"\nname = "A"\n[[categories]]\ncode = "c1"\nname = "B"\n',
     "category 2: code c1 appears twice"),
    ('[[categories]]\ncode = "C1"\nname = "A"\nseverity = 3\n',
     "category 1: unknown field(s) severity"),
    ('[[categories]]\ncode = "C1"\nname = "A"\ndescription = 3\n',
     "category 1: description must be text"),
])
def test_load_categories_refuses_a_bad_policy(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(toml)
    with pytest.raises(InputError) as info:
        load_categories(path)
    assert info.value.message.startswith(str(path))
    assert message in info.value.message


def test_load_categories_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        load_categories(tmp_path / "nope.toml")
    assert str(info.value) == f"{tmp_path / 'nope.toml'} does not exist"


def test_load_categories_refuses_devices_and_pipes_without_waiting(tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "policy.toml"
    os.mkfifo(fifo)  # nothing writes to it: reading it used to wait for ever
    for path, problem in ((Path("/dev/zero"), "is a character device, not a file"),
                          (fifo, "is a pipe that nothing is writing to")):
        with pytest.raises(InputError) as info:
            load_categories(path)
        assert info.value.message == f"{path} {problem}"


def test_exclude_keeps_the_other_codes() -> None:
    kept = exclude(LLAMA_GUARD_3_1B_CATEGORIES, ["s7", "S8", ""])
    assert [c.code for c in kept] == ["S1", "S2", "S3", "S4", "S5", "S6", "S9", "S10", "S11",
                                      "S12", "S13"]
    assert kept[6] == Category("S9", "Indiscriminate Weapons")


def test_exclude_an_unknown_code_is_a_usage_error() -> None:
    with pytest.raises(UsageError) as info:
        exclude(LLAMA_GUARD_3_1B_CATEGORIES, ["S7", "S14", "X1"])
    assert str(info.value) == (
        "cannot exclude S14, X1: not a category here (the categories are S1, S2, S3, S4, S5, "
        "S6, S7, S8, S9, S10, S11, S12, S13)")
    assert info.value.exit_code == 2


def test_exclude_everything_is_a_usage_error() -> None:
    policy = (Category("C1", "A"), Category("C2", "B"))
    with pytest.raises(UsageError, match=r"^--exclude leaves no category to check$"):
        exclude(policy, ["C1", "c2"])


@pytest.mark.parametrize(("template", "name", "count"), [
    ("", "llama-guard3:1b", 13),
    ("", "SmolLM2-135M-Instruct.Q4_1.gguf", 13),
    ("", "llama-guard3:8b", 14),
    ("", "Llama-Guard-3-8B.Q4_K_M.gguf", 14),
    ("S13: Elections.\nS14: Code Interpreter Abuse.\n", "my-guard.gguf", 14),
    ("S13: Elections.\n", "Llama-Guard-3-1B.Q8_0.gguf", 13),
])
def test_default_categories(template: str, name: str, count: int) -> None:
    policy = default_categories(template, name)
    assert len(policy) == count
    assert policy == LLAMA_GUARD_3_CATEGORIES[:count]


def test_unknown_codes_are_named_as_unknown() -> None:
    parsed = parse_verdict("unsafe\nS99,S10")
    assert name_categories(parsed.codes, LLAMA_GUARD_3_1B_CATEGORIES) == [
        Category("S99", "unknown category"), Category("S10", "Hate")]
