"""The catalog: the shipped models.toml parses and hangs together; malformed entries are refused."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from llmkit import catalog
from llmkit.catalog import KINDS, ModelSpec, load_catalog, parse_catalog, shipped_catalog_text
from llmkit.errors import CatalogError

HEADER_RE = re.compile(r'^\s*\[\s*models\.(?:"([^"]+)"|([A-Za-z0-9_-]+))\s*\]', re.MULTILINE)

GOOD_TEXT = '''
[models."tiny:1m"]
kind = "text"
description = "A tiny text model"
hf_repo = "someone/tiny-GGUF"
file = "tiny-{quant}.gguf"
quants = ["Q4_0", "Q8_0"]
default_quant = "Q4_0"
'''


def _entry(name: str = "bad:1b", **fields: object) -> str:
    """A catalog text with one supported text entry, fields overridden (None drops a field)."""
    base: dict[str, object] = {
        "kind": "text",
        "description": "A model",
        "hf_repo": "someone/bad-GGUF",
        "file": "bad-{quant}.gguf",
        "quants": ["Q4_0", "Q8_0"],
        "default_quant": "Q4_0",
    }
    base.update(fields)
    lines = [f'[models."{name}"]']
    for key, value in base.items():
        if value is None:
            continue
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


# -- the shipped catalog ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> dict[str, ModelSpec]:
    return parse_catalog(shipped_catalog_text())


def test_shipped_catalog_parses_and_is_what_load_catalog_returns(
        shipped: dict[str, ModelSpec]) -> None:
    assert shipped
    assert load_catalog() == shipped  # no user catalog in the isolated home


def test_shipped_catalog_has_no_duplicate_headers() -> None:
    # TOML refuses a table defined twice, but a second spelling of the same key ("a" vs a)
    # or a header left in a comment-free copy-paste is worth catching on the raw text too.
    text = shipped_catalog_text()
    names = [quoted or bare for quoted, bare in HEADER_RE.findall(text)]
    assert names, "no [models.\"…\"] headers found"
    duplicates = [name for name, count in Counter(names).items() if count > 1]
    assert duplicates == []
    assert len(names) == len(parse_catalog(text))


def test_shipped_catalog_is_the_file_at_the_top_of_the_checkout() -> None:
    top = Path(__file__).resolve().parent.parent / "models.toml"
    if top.is_file():
        assert shipped_catalog_text() == top.read_text(encoding="utf-8")


def test_every_entry_is_well_formed(shipped: dict[str, ModelSpec]) -> None:
    for name, spec in shipped.items():
        assert spec.name == name
        assert spec.kind in KINDS, name
        assert spec.description.strip(), name
        if spec.source_only:
            # Built from the checkpoint (Llama 3.2 Vision): no published files to name.
            assert spec.source_repo.count("/") == 1 and spec.default_quant, name
            assert not (spec.file or spec.mmproj or spec.quants), name
        elif spec.supported:
            assert spec.hf_repo.count("/") == 1, name
            assert spec.filename().endswith(".gguf"), name
            assert "{quant}" not in spec.filename(), name
            if spec.quants:
                assert spec.default_quant in spec.quants, name
                assert len(set(spec.quants)) == len(spec.quants), name
            if spec.kind == "vision":
                assert spec.mmproj.endswith(".gguf"), name


def test_unsupported_entries_explain_and_point_to_supported_alternatives(
        shipped: dict[str, ModelSpec]) -> None:
    unsupported = [spec for spec in shipped.values() if not spec.supported]
    assert unsupported, "the catalog is expected to list models llama.cpp cannot run"
    for spec in unsupported:
        assert spec.reason.strip(), spec.name
        assert spec.alternatives, spec.name
        for alt in spec.alternatives:
            assert alt in shipped, (spec.name, alt)
            assert shipped[alt].supported, (spec.name, alt)
            assert alt != spec.name


def test_the_embedded_and_default_models_are_there(shipped: dict[str, ModelSpec]) -> None:
    smol = shipped["smollm2:135m"]
    assert smol.supported
    assert smol.embedded.endswith(".gguf")
    assert shipped["llama3.2:1b"].supported
    assert not shipped["llama3.2:1b"].embedded


def test_filename_substitutes_the_quant() -> None:
    spec = parse_catalog(GOOD_TEXT)["tiny:1m"]
    assert spec.filename() == "tiny-Q4_0.gguf"
    assert spec.filename("Q8_0") == "tiny-Q8_0.gguf"
    assert spec.quants == ("Q4_0", "Q8_0")
    assert spec.supported and spec.alternatives == ()


def test_specs_keep_file_order() -> None:
    text = _entry("b:1b") + _entry("a:1b")
    assert list(parse_catalog(text)) == ["b:1b", "a:1b"]


# -- malformed entries ------------------------------------------------------------------------

MALFORMED = [
    pytest.param(_entry(colour="blue"), "unknown field(s) colour", id="unknown-field"),
    pytest.param(_entry(kind="audio"), "kind must be one of text, vision, guard", id="bad-kind"),
    pytest.param(_entry(kind=None), "'kind' is required", id="no-kind"),
    pytest.param(_entry(description=None), "'description' is required", id="no-description"),
    pytest.param(_entry(default_quant="Q5_K_M"), "default_quant Q5_K_M is not in quants",
                 id="default-quant-not-in-quants"),
    pytest.param(_entry(kind="vision"), "a vision model needs its mmproj file",
                 id="vision-without-mmproj"),
    pytest.param(_entry(supported=False), "an unsupported model needs a reason",
                 id="unsupported-without-reason"),
    pytest.param(_entry(file="bad.bin", quants=["Q4_0"]), "file must name a .gguf file",
                 id="file-not-gguf"),
    pytest.param(_entry(file="bad.gguf"), "file must contain {quant} when there are several",
                 id="file-without-quant"),
    pytest.param(_entry(hf_repo=None), "'hf_repo' is required", id="no-hf-repo"),
    pytest.param(_entry(hf_repo=None, source_repo="org/model", quants=None, file=None,
                        default_quant=None), "'default_quant' is required",
                 id="source-only-without-default-quant"),
    pytest.param(_entry(hf_repo=None, source_repo="org/model", quants=None),
                 "'file' needs hf_repo", id="source-only-with-file"),
    pytest.param(_entry(hf_repo=None, source_repo="org/model", file=None, kind="vision",
                        quants=None, mmproj="mmproj.gguf"),
                 "'mmproj' needs hf_repo", id="source-only-with-mmproj"),
    pytest.param(_entry(quants="Q4_0"), "quants must be a list of strings", id="quants-not-list"),
    pytest.param(_entry(gated="yes"), "gated must be true or false", id="gated-not-bool"),
    pytest.param(_entry(temperature=-1), "temperature must be a number, 0 or more",
                 id="negative-temperature"),
    pytest.param(_entry(context_length="big"), "context_length must be a positive integer",
                 id="context-length-not-int"),
    pytest.param(_entry(context_length=True), "context_length must be a positive integer",
                 id="context-length-bool"),
    pytest.param(_entry(description=3), "description must be a string", id="description-number"),
    pytest.param(_entry("Llama3:8B"), "name must be lowercase", id="uppercase-name"),
    pytest.param(_entry(alternatives=["nope:1b"]),
                 "bad:1b suggests 'nope:1b', which is not a supported entry",
                 id="alternative-unknown"),
    pytest.param(
        _entry("old:1b", supported=False, reason="gone", hf_repo=None, file=None, quants=None,
               default_quant=None)
        + _entry(alternatives=["old:1b"]),
        "bad:1b suggests 'old:1b', which is not a supported entry",
        id="alternative-unsupported"),
    pytest.param('[models."x:1b"\nkind = "text"\n', "models.toml is not valid TOML",
                 id="bad-toml"),
    pytest.param(_entry("dup:1b") + _entry("dup:1b"), "models.toml is not valid TOML",
                 id="duplicate-table"),
    pytest.param('title = "no models here"\n', "models.toml has no [models] table",
                 id="no-models-table"),
    pytest.param('models = "text"\n', "models.toml has no [models] table",
                 id="models-not-a-table"),
    pytest.param('[models]\n"a:1b" = 3\n', "must be a table", id="entry-not-a-table"),
]


@pytest.mark.parametrize(("text", "message"), MALFORMED)
def test_malformed_entries_are_refused(text: str, message: str) -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog(text)
    assert message in str(info.value)


def test_errors_name_the_file_and_the_entry() -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog(_entry(kind="audio"), origin="/home/me/models.toml")
    assert str(info.value).startswith('/home/me/models.toml: [models."bad:1b"]')


def test_unsupported_entry_needs_no_download_fields() -> None:
    text = _entry("gone:1b", supported=False, reason="llama.cpp lacks it", hf_repo=None,
                  file=None, quants=None, default_quant=None, kind="vision",
                  alternatives=["ok:1b"]) + _entry("ok:1b")
    specs = parse_catalog(text)
    assert specs["gone:1b"].reason == "llama.cpp lacks it"
    assert specs["gone:1b"].alternatives == ("ok:1b",)


# -- the user catalog in LLMKIT_HOME ----------------------------------------------------------


def test_user_catalog_adds_and_overrides(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(
        GOOD_TEXT + _entry("smollm2:135m", description="mine now"), encoding="utf-8")
    specs = load_catalog()
    assert "tiny:1m" in specs
    assert specs["smollm2:135m"].description == "mine now"
    assert "llama3.2:1b" in specs


def test_broken_user_catalog_names_its_path(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    user = isolated_home / "models.toml"
    user.write_text(_entry(kind="audio"), encoding="utf-8")
    catalog._load.cache_clear()
    with pytest.raises(CatalogError) as info:
        load_catalog()
    assert str(info.value).startswith(f'{user}: [models."bad:1b"]: kind must be one of')


def test_a_model_built_from_source_only() -> None:
    spec = parse_catalog(_entry("vis:11b", kind="vision", hf_repo=None, file=None, quants=None,
                                source_repo="org/Vision", default_quant="Q4_K_M"))["vis:11b"]
    assert spec.supported and spec.source_only and not spec.mmproj
    assert not parse_catalog(_entry())["bad:1b"].source_only


def test_llama32_vision_is_built_from_source(shipped: dict[str, ModelSpec]) -> None:
    for name, repo in (("llama3.2-vision:11b", "meta-llama/Llama-3.2-11B-Vision-Instruct"),
                       ("llama3.2-vision:90b", "meta-llama/Llama-3.2-90B-Vision-Instruct")):
        spec = shipped[name]
        assert (spec.kind, spec.supported, spec.source_only) == ("vision", True, True)
        assert (spec.source_repo, spec.gated, spec.default_quant) == (repo, True, "Q4_K_M")
