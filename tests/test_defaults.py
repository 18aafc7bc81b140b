"""The defaults: which catalog entries llmkit uses when no model is named, and the overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmkit import store
from llmkit.catalog import load_catalog, parse_catalog, shipped_catalog
from llmkit.defaults import (
    DEFAULT_CTX,
    VARIABLES,
    Choice,
    Defaults,
    Role,
    catalog_defaults,
    default_choice,
    default_model_name,
    find_defaults,
)
from llmkit.errors import CatalogError, ModelNotFoundError, ModelNotPulledError


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in VARIABLES.values():
        monkeypatch.delenv(variable, raising=False)


def _entry(name: str, kind: str = "text", **fields: str | bool) -> str:
    values: dict[str, str | bool] = {"kind": kind, "description": "A model",
                                     "hf_repo": "someone/m-GGUF", "file": "m.gguf",
                                     "default_quant": "Q4_0"}
    if kind == "vision":
        values["mmproj"] = "mmproj.gguf"
    values.update(fields)
    lines = [f'[models."{name}"]'] + [
        f"{key} = {str(value).lower() if isinstance(value, bool) else repr(value)}"
        for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _catalog(*entries: str) -> str:
    return "".join(entries) if entries else (
        _entry("t:1b", default=True) + _entry("e:1m", embedded="pkg/e.gguf")
        + _entry("v:1b", "vision", default=True) + _entry("g:1b", "guard", default=True))


# -- the shipped catalog's defaults are today's names -----------------------------------------


def test_the_shipped_defaults() -> None:
    assert catalog_defaults() == Defaults(text="llama3.2:1b", vision="gemma3:4b",
                                          guard="llama-guard3:1b", embedded="smollm2:135m")
    shipped = shipped_catalog()
    roles: tuple[Role, ...] = ("text", "vision", "guard")
    for role in roles:
        spec = shipped[catalog_defaults().of(role)]
        assert spec.default and spec.kind == role and spec.supported
    assert shipped["smollm2:135m"].embedded and not shipped["smollm2:135m"].default
    assert DEFAULT_CTX == 4096


def test_without_overrides_the_catalog_decides() -> None:
    assert default_choice() == Choice("llama3.2:1b", None)
    assert default_choice("vision") == Choice("gemma3:4b", None)
    assert default_model_name("guard") == "llama-guard3:1b"


@pytest.mark.parametrize(("role", "variable"), [
    ("text", "LLMKIT_MODEL"), ("vision", "LLMKIT_VISION_MODEL"), ("guard", "LLMKIT_GUARD_MODEL"),
])
def test_the_environment_overrides_each_default(role: Role, variable: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert VARIABLES[role] == variable
    monkeypatch.setenv(variable, "mine:1b")
    assert default_choice(role) == Choice("mine:1b", variable)
    monkeypatch.setenv(variable, "")  # set but empty: as if unset
    assert default_choice(role) == Choice(catalog_defaults().of(role), None)


# -- what a catalog must say about its defaults -------------------------------------------------


def test_find_defaults_of_a_well_formed_catalog() -> None:
    assert find_defaults(parse_catalog(_catalog())) == Defaults(
        text="t:1b", vision="v:1b", guard="g:1b", embedded="e:1m")


@pytest.mark.parametrize(("text", "message"), [
    (_entry("t:1b") + _entry("e:1m", embedded="pkg/e.gguf")
     + _entry("v:1b", "vision", default=True) + _entry("g:1b", "guard", default=True),
     "cat.toml: exactly one text model must have default = true (found: none)"),
    (_catalog() + _entry("g:8b", "guard", default=True),
     "cat.toml: exactly one guard model must have default = true (found: g:1b, g:8b)"),
    (_entry("t:1b", default=True) + _entry("v:1b", "vision", default=True)
     + _entry("g:1b", "guard", default=True),
     "cat.toml: exactly one supported text model must be embedded (found: none)"),
    (_catalog() + _entry("e:2m", embedded="pkg/e2.gguf"),
     "cat.toml: exactly one supported text model must be embedded (found: e:1m, e:2m)"),
    (_entry("t:1b", default=True) + _entry("v:1b", "vision", default=True, embedded="p/v.gguf")
     + _entry("g:1b", "guard", default=True),
     "cat.toml: exactly one supported text model must be embedded (found: v:1b)"),
])
def test_find_defaults_refuses(text: str, message: str) -> None:
    with pytest.raises(CatalogError) as info:
        find_defaults(parse_catalog(text), "cat.toml")
    assert str(info.value) == message


def test_an_unsupported_model_cannot_be_a_default() -> None:
    text = ('[models."old:1b"]\nkind = "text"\ndescription = "gone"\nsupported = false\n'
            'reason = "llama.cpp lacks it"\ndefault = true\n')
    with pytest.raises(CatalogError) as info:
        parse_catalog(text)
    assert str(info.value) == ('models.toml: [models."old:1b"]: a model llama.cpp cannot run '
                               "cannot be a default")


def test_default_must_be_true_or_false() -> None:
    with pytest.raises(CatalogError, match=r"default must be true or false$"):
        parse_catalog(_entry("t:1b", default="text"))


def test_a_user_catalog_cannot_mark_defaults(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    user = isolated_home / "models.toml"
    user.write_text(_entry("mine:1b", default=True), encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog()
    assert str(info.value) == (
        f'{user}: [models."mine:1b"]: only the shipped catalog marks defaults (choose yours '
        "with LLMKIT_MODEL, LLMKIT_VISION_MODEL or LLMKIT_GUARD_MODEL)")


def test_a_user_catalog_overriding_a_default_entry_keeps_it_the_default(
        isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(
        _entry("gemma3:4b", "vision", description="mine now"), encoding="utf-8")
    assert load_catalog()["gemma3:4b"].description == "mine now"
    assert default_model_name("vision") == "gemma3:4b"


# -- resolving a default ----------------------------------------------------------------------


def test_vision_and_guard_defaults_do_not_fall_back_to_the_embedded_model() -> None:
    with pytest.raises(ModelNotPulledError) as info:
        store.resolve_default("vision")
    assert info.value.name == "gemma3:4b"
    with pytest.raises(ModelNotPulledError) as info:
        store.resolve_default("guard")
    assert info.value.name == "llama-guard3:1b"


def test_the_text_default_falls_back_to_the_embedded_model() -> None:
    resolution = store.resolve_default()
    assert resolution.model.name == "smollm2:135m" and resolution.model.source == "embedded"
    assert resolution.note == ("llama3.2:1b is not pulled yet; using the embedded smollm2:135m "
                               "(run `llmkit pull llama3.2:1b` for the default)")
    assert store.resolve(None) == resolution


def test_a_name_from_the_environment_is_said_to_come_from_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMKIT_GUARD_MODEL", "nope:1b")
    with pytest.raises(ModelNotFoundError) as info:
        store.resolve_default("guard")
    assert str(info.value).startswith("model 'nope:1b' not found (LLMKIT_GUARD_MODEL names it; ")
