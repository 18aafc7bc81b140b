"""The store: registering, removing and resolving model references."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from llmkit import paths, store
from llmkit.catalog import load_catalog
from llmkit.defaults import default_model_name
from llmkit.errors import (
    InvalidModelFileError,
    ModelNotFoundError,
    ModelNotPulledError,
    StoreError,
    UnsupportedModelError,
    UsageError,
)
from llmkit.store import LocalModel


@pytest.fixture
def copy(smollm2_path: Path, tmp_path: Path) -> Path:
    """A copy of the real model that a test may delete."""
    target = tmp_path / "copy.gguf"
    try:
        os.link(smollm2_path, target)  # a hard link: as good as a copy here, and instant
    except OSError:
        shutil.copy(smollm2_path, target)
    return target


def _manifest(home: Path) -> dict[str, dict[str, object]]:
    data = json.loads((home / "manifest.json").read_text(encoding="utf-8"))
    assert data["version"] == store.MANIFEST_VERSION
    return data["models"]  # type: ignore[no-any-return]


# -- register / remove ------------------------------------------------------------------------


def test_empty_store(isolated_home: Path) -> None:
    assert store.local_models() == []
    assert store.get_local("anything") is None
    assert not isolated_home.exists() or not (isolated_home / "manifest.json").exists()


def test_register_writes_the_manifest_under_llmkit_home(isolated_home: Path) -> None:
    model = LocalModel(name="a:1b", path="/models/a.gguf", source="pull", quant="Q4_0",
                       size_bytes=10)
    assert store.register(model) == model
    entry = _manifest(isolated_home)["a:1b"]
    assert entry["path"] == "/models/a.gguf" and entry["source"] == "pull"
    assert isinstance(entry["added"], float) and entry["added"] > 0
    assert "name" not in entry
    got = store.get_local("a:1b")
    assert got is not None and got.path == "/models/a.gguf" and got.quant == "Q4_0"
    # No temporary file is left beside the manifest and its last good copy.
    assert sorted(p.name for p in isolated_home.iterdir() if not p.name.startswith(".")) == [
        "manifest.json", "manifest.json.bak"]


def test_register_twice_needs_replace() -> None:
    store.register(LocalModel(name="a", path="/x/one.gguf", source="import"))
    with pytest.raises(StoreError) as info:
        store.register(LocalModel(name="a", path="/x/two.gguf", source="import"))
    assert str(info.value) == ("a model named 'a' already exists "
                               "(choose another --name, or `llmkit rm` it first)")
    assert store.get_local("a").path == "/x/one.gguf"  # type: ignore[union-attr]
    store.register(LocalModel(name="a", path="/x/two.gguf", source="import"), replace=True)
    assert store.get_local("a").path == "/x/two.gguf"  # type: ignore[union-attr]


def test_local_models_are_sorted() -> None:
    for name in ("zeta", "alpha", "mid:1b"):
        store.register(LocalModel(name=name, path=f"/m/{name}.gguf", source="import"))
    assert [m.name for m in store.local_models()] == ["alpha", "mid:1b", "zeta"]


def test_remove_unregisters_but_keeps_the_users_file(copy: Path) -> None:
    store.import_gguf(copy, "mine")
    removed = store.remove("mine")
    assert removed.name == "mine"
    assert store.get_local("mine") is None
    assert copy.is_file()
    with pytest.raises(ModelNotFoundError) as info:
        store.remove("mine")
    assert str(info.value) == "model 'mine' not found (`llmkit list` shows local models)"


def test_remove_deletes_a_file_llmkit_placed_itself(smollm2_path: Path) -> None:
    owned = paths.models_dir() / "x" / "owned.gguf"
    owned.parent.mkdir(parents=True)
    shutil.copy(smollm2_path, owned)
    store.import_gguf(owned, "owned")
    store.remove("owned")
    assert not owned.exists()


def test_remove_of_a_catalog_name_that_is_not_registered() -> None:
    with pytest.raises(ModelNotFoundError):
        store.remove("smollm2:135m")


def test_damaged_manifest_is_reported(isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    for text in ("{not json", "[]", '{"models": []}', '{"version": 1}'):
        (isolated_home / "manifest.json").write_text(text)
        with pytest.raises(StoreError, match=r"manifest\.json is damaged"):
            store.local_models()


# -- import -----------------------------------------------------------------------------------


def test_import_records_quant_size_and_absolute_path(
        copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(copy.parent)
    model = store.import_gguf(Path(copy.name), "mine:q4")
    assert model.path == str(copy.resolve())
    assert model.source == "import" and model.kind == "text"
    assert model.quant == "Q4_1"
    assert model.size_bytes == copy.stat().st_size


@pytest.mark.parametrize("name", ["", "two words", "a/b", "tab\there"])
def test_import_refuses_bad_names(copy: Path, name: str) -> None:
    with pytest.raises(UsageError, match="invalid model name"):
        store.import_gguf(copy, name)
    assert store.local_models() == []


def test_import_refuses_a_file_that_is_not_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(InvalidModelFileError, match="is not a GGUF model file"):
        store.import_gguf(fake, "fake")
    assert store.local_models() == []


def test_import_refuses_a_truncated_file(smollm2_path: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_path.read_bytes()[: 20_000_000])
    with pytest.raises(InvalidModelFileError, match="is truncated"):
        store.import_gguf(cut, "cut")
    assert store.get_local("cut") is None


# -- resolve ----------------------------------------------------------------------------------


def test_resolve_a_path(smollm2_path: Path) -> None:
    res = store.resolve(str(smollm2_path))
    assert res.model.source == "path" and res.model.path == str(smollm2_path)
    assert res.model.name == smollm2_path.name
    assert res.spec is None and res.note is None


def test_resolve_a_relative_path(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(copy.parent)
    assert store.resolve("./copy.gguf").model.source == "path"
    assert store.resolve("copy.gguf").model.source == "path"


def test_resolve_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelNotFoundError) as info:
        store.resolve(str(missing))
    assert str(info.value) == f"model '{missing}' not found (no such file)"


def test_resolve_a_local_name(copy: Path) -> None:
    store.import_gguf(copy, "mine")
    res = store.resolve("mine")
    assert res.model.name == "mine" and res.model.path == str(copy.resolve())
    assert res.spec is None and res.note is None


def test_a_local_model_under_a_catalog_name_wins_over_the_embedded_copy(copy: Path) -> None:
    store.import_gguf(copy, "smollm2:135m")
    res = store.resolve("smollm2:135m")
    assert res.model.source == "import" and res.model.path == str(copy.resolve())
    assert res.spec is not None and res.spec.name == "smollm2:135m"


def test_resolve_the_embedded_catalog_model(smollm2_path: Path) -> None:
    res = store.resolve("smollm2:135m")
    assert res.model.source == "embedded"
    assert Path(res.model.path).samefile(smollm2_path)
    assert res.model.quant == "Q4_1"
    assert res.model.size_bytes == smollm2_path.stat().st_size
    assert res.spec is not None and res.spec.system == "You are a helpful assistant."
    assert res.note is None


def test_resolve_a_catalog_model_that_is_not_pulled() -> None:
    with pytest.raises(ModelNotPulledError) as info:
        store.resolve("llama3.2:3b")
    assert str(info.value) == ("model 'llama3.2:3b' is in the catalog but not on this machine "
                               "(run `llmkit pull llama3.2:3b`)")


def test_resolve_every_unsupported_model_says_why_and_what_instead() -> None:
    unsupported = [s for s in load_catalog().values() if not s.supported]
    assert unsupported
    for spec in unsupported:
        with pytest.raises(UnsupportedModelError) as info:
            store.resolve(spec.name)
        assert info.value.reason == spec.reason
        assert info.value.alternatives == spec.alternatives
        assert str(info.value) == (f"model '{spec.name}' is not supported: {spec.reason} "
                                   f"(try {', '.join(spec.alternatives)})")


@pytest.mark.parametrize(("ref", "suggestion"), [
    ("smollm2:136m", "smollm2:135m"),
    ("smollm2", "smollm2:135m"),
    ("llama3.2:1c", "llama3.2:1b"),
])
def test_unknown_names_suggest_close_ones(ref: str, suggestion: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        store.resolve(ref)
    assert info.value.name == ref
    assert str(info.value).startswith(f"model '{ref}' not found (did you mean ")
    assert suggestion in (info.value.hint or "")


def test_unknown_names_suggest_local_models_too(copy: Path) -> None:
    store.import_gguf(copy, "my-private-model")
    with pytest.raises(ModelNotFoundError) as info:
        store.resolve("my-privat-model")
    assert info.value.hint == "did you mean my-private-model?"


def test_unknown_name_with_nothing_close() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        store.resolve("qqqqqqqqqqqq")
    assert str(info.value) == "model 'qqqqqqqqqqqq' not found (`llmkit list` shows known models)"


def test_a_registered_model_whose_file_is_gone(copy: Path) -> None:
    store.import_gguf(copy, "gone")
    os.unlink(copy)
    with pytest.raises(InvalidModelFileError) as info:
        store.resolve("gone")
    assert str(info.value) == (f"{copy.resolve()}: registered as 'gone' but the file is gone "
                               "(`llmkit rm gone` and import or pull it again)")
    rows = {r.name: r for r in store.list_models()}
    assert rows["gone"].present is False and rows["gone"].size_bytes == 0
    store.remove("gone")  # still removable


# -- the default model ------------------------------------------------------------------------


def test_default_falls_back_to_the_embedded_model_with_a_note(smollm2_path: Path) -> None:
    res = store.resolve(None)
    assert res.model.name == "smollm2:135m" and res.model.source == "embedded"
    assert res.spec is not None and res.spec.name == "smollm2:135m"
    assert res.note == ("llama3.2:1b is not pulled yet; using the embedded smollm2:135m "
                        "(run `llmkit pull llama3.2:1b` for the default)")


def test_default_is_the_pulled_default_when_present(copy: Path) -> None:
    store.register(LocalModel(name="llama3.2:1b", path=str(copy), source="pull"))
    res = store.resolve(None)
    assert res.model.name == "llama3.2:1b" and res.note is None


def test_llmkit_model_env_picks_the_default(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store.import_gguf(copy, "chosen")
    monkeypatch.setenv("LLMKIT_MODEL", "chosen")
    assert default_model_name() == "chosen"
    res = store.resolve(None)
    assert res.model.name == "chosen" and res.note is None


def test_llmkit_model_env_naming_nothing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMKIT_MODEL", "qqqqqqqqqqqq")
    with pytest.raises(ModelNotFoundError):
        store.resolve(None)


# -- list -------------------------------------------------------------------------------------


def test_list_models_covers_the_catalog_then_local_models(copy: Path) -> None:
    store.import_gguf(copy, "extra")
    rows = store.list_models()
    names = [r.name for r in rows]
    assert names[: len(load_catalog())] == list(load_catalog())
    assert names[-1] == "extra"
    by_name = {r.name: r for r in rows}
    smol = by_name["smollm2:135m"]
    assert smol.present and smol.source == "embedded" and smol.quant == "Q4_1"
    assert smol.size_bytes == copy.stat().st_size
    pulled = by_name["llama3.2:1b"]
    assert not pulled.present and pulled.source == "catalog" and pulled.size_bytes == 0
    assert pulled.path == ""
    for spec in load_catalog().values():
        assert by_name[spec.name].supported == spec.supported
        if not spec.supported:
            assert not by_name[spec.name].present
    assert by_name["extra"].present and by_name["extra"].source == "import"


def test_llmkit_home_is_read_at_call_time(tmp_path: Path, copy: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    store.import_gguf(copy, "first-home")
    other = tmp_path / "other-home"
    monkeypatch.setenv("LLMKIT_HOME", str(other))
    assert store.get_local("first-home") is None
    store.import_gguf(copy, "second-home")
    assert (other / "manifest.json").is_file()
    assert list(_manifest(other)) == ["second-home"]
