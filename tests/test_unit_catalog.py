"""Catalog parsing and validation: the shipped models.toml, and malformed entries table-tested."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmkit.catalog import KINDS, load_catalog, parse_catalog
from llmkit.errors import CatalogError

ROOT = Path(__file__).resolve().parent.parent

GOOD = '''
[models."tiny:1m"]
kind = "text"
description = "tiny"
hf_repo = "o/r"
file = "tiny-{quant}.gguf"
quants = ["Q4_0", "Q8_0"]
default_quant = "Q4_0"
'''


def test_shipped_catalog_parses_with_unique_names() -> None:
    text = (ROOT / "models.toml").read_text(encoding="utf-8")
    headers = re.findall(r'^\[models\."([^"]+)"\]', text, flags=re.M)
    assert len(headers) == len(set(headers)), "duplicate catalog entries"
    specs = parse_catalog(text)
    assert list(specs) == headers
    assert {"llama3.2:1b", "llama3.2:3b", "llama-guard3:1b", "llama-guard3:8b",
            "smollm2:135m"} <= set(specs)


def test_shipped_catalog_entries_are_complete() -> None:
    specs = load_catalog()
    kinds = {s.kind for s in specs.values()}
    assert kinds <= set(KINDS) and {"text", "vision", "guard"} <= kinds
    for spec in specs.values():
        assert spec.description and spec.license, spec.name
        if spec.supported:
            assert spec.filename().endswith(".gguf")
            assert spec.default_quant in spec.quants, spec.name
            assert spec.source_repo and spec.context_length > 0, spec.name
        if spec.source_repo.startswith("meta-llama/"):
            assert spec.gated, f"{spec.name}: meta-llama repositories are gated"


def test_every_unsupported_entry_has_reason_and_working_alternatives() -> None:
    specs = load_catalog()
    unsupported = [s for s in specs.values() if not s.supported]
    assert {s.name for s in unsupported} >= {"llama3.2-vision:11b", "llama3.2-vision:90b"}
    for spec in unsupported:
        assert "mllama" in spec.reason
        assert spec.alternatives
        for alt in spec.alternatives:
            assert specs[alt].supported and specs[alt].kind == "vision"


def test_filename_fills_in_the_quantization() -> None:
    spec = parse_catalog(GOOD)["tiny:1m"]
    assert spec.filename() == "tiny-Q4_0.gguf"
    assert spec.filename("Q8_0") == "tiny-Q8_0.gguf"


def test_user_catalog_adds_entries(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True)
    (isolated_home / "models.toml").write_text(GOOD)
    specs = load_catalog()
    assert "tiny:1m" in specs and "llama3.2:1b" in specs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models = 3", "has no [models] table"),
        ("[models", "is not valid TOML"),
        (GOOD.replace('kind = "text"', 'kind = "audio"'), "kind must be one of"),
        (GOOD + 'colour = "red"\n', "unknown field(s) colour"),
        (GOOD.replace('default_quant = "Q4_0"', 'default_quant = "Q5_0"'), "not in quants"),
        (GOOD.replace('"tiny-{quant}.gguf"', '"tiny.gguf"'), "must contain {quant}"),
        (GOOD.replace('"tiny-{quant}.gguf"', '"tiny-{quant}.bin"'), "must name a .gguf"),
        (GOOD.replace('kind = "text"', 'kind = "vision"'), "needs its mmproj"),
        (GOOD.replace('hf_repo = "o/r"\n', ""), "'hf_repo' is required"),
        (GOOD.replace('"tiny:1m"', '"Tiny Model"'), "name must be lowercase"),
        (GOOD + "gated = 1\n", "gated must be true or false"),
        (GOOD + "context_length = -5\n", "context_length must be a positive integer"),
        (GOOD + 'quants = "Q4_0"\n'.replace("quants", "alternatives"), "must be a list"),
        ('[models."x:1"]\nkind = "vision"\ndescription = "d"\nsupported = false\n',
         "an unsupported model needs a reason"),
        (GOOD + 'alternatives = ["ghost:1b"]\n', "suggests 'ghost:1b'"),
    ],
)
def test_malformed_catalogs_are_rejected(text: str, message: str) -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog(text)
    assert message in str(info.value)
