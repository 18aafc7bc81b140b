"""The store: registering, removing and resolving models; the manifest is written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmkit import store
from llmkit.errors import (
    InvalidModelFileError,
    ModelNotFoundError,
    ModelNotPulledError,
    StoreError,
    UnsupportedModelError,
    UsageError,
)
from llmkit.gguf_file import read_info


def test_import_registers_in_place(smollm2_path: Path, isolated_home: Path) -> None:
    model = store.import_gguf(smollm2_path, "mine:q4")
    assert model.path == str(smollm2_path.resolve())
    assert model.quant == "Q4_1" and model.size_bytes == smollm2_path.stat().st_size
    manifest = json.loads((isolated_home / "manifest.json").read_text())
    assert manifest["models"]["mine:q4"]["path"] == str(smollm2_path.resolve())
    assert [p.name for p in isolated_home.iterdir() if p.name.startswith(".manifest.json")] == []
    assert store.resolve("mine:q4").model.name == "mine:q4"


def test_duplicate_name_needs_replace(smollm2_path: Path) -> None:
    store.import_gguf(smollm2_path, "dup")
    with pytest.raises(StoreError, match="already exists"):
        store.import_gguf(smollm2_path, "dup")
    store.import_gguf(smollm2_path, "dup", replace=True)


@pytest.mark.parametrize("name", ["", "has space", "a/b"])
def test_bad_names(smollm2_path: Path, name: str) -> None:
    with pytest.raises(UsageError):
        store.import_gguf(smollm2_path, name)


def test_remove_keeps_files_it_does_not_own(smollm2_path: Path) -> None:
    store.import_gguf(smollm2_path, "keep")
    store.remove("keep")
    assert smollm2_path.is_file()
    assert store.get_local("keep") is None
    with pytest.raises(ModelNotFoundError):
        store.remove("keep")


def test_remove_deletes_files_in_its_own_models_dir(smollm2_path: Path,
                                                    isolated_home: Path) -> None:
    owned = isolated_home / "models" / "copy.gguf"
    owned.parent.mkdir(parents=True)
    shutil.copy(smollm2_path, owned)
    store.import_gguf(owned, "owned")
    store.remove("owned")
    assert not owned.exists()


def test_resolve_registered_model_whose_file_is_gone(smollm2_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "gone.gguf"
    shutil.copy(smollm2_path, copy)
    store.import_gguf(copy, "gone")
    copy.unlink()
    with pytest.raises(InvalidModelFileError, match="the file is gone"):
        store.resolve("gone")


def test_resolve_paths_catalog_names_and_defaults(smollm2_path: Path) -> None:
    assert store.resolve(str(smollm2_path)).model.source == "path"
    embedded = store.resolve("smollm2:135m")
    assert embedded.model.source == "embedded" and embedded.note is None
    assert Path(embedded.model.path).samefile(smollm2_path)
    default = store.resolve(None)
    assert default.model.name == "smollm2:135m"
    assert default.note is not None and "llama3.2:1b is not pulled yet" in default.note


def test_default_model_env(monkeypatch: pytest.MonkeyPatch, smollm2_path: Path) -> None:
    store.import_gguf(smollm2_path, "chosen")
    monkeypatch.setenv("LLMKIT_MODEL", "chosen")
    resolution = store.resolve(None)
    assert resolution.model.name == "chosen" and resolution.note is None


def test_resolve_errors() -> None:
    with pytest.raises(ModelNotPulledError):
        store.resolve("llama3.2:3b")
    with pytest.raises(UnsupportedModelError) as info:
        store.resolve("llama3.2-vision:90b")
    assert info.value.alternatives
    with pytest.raises(ModelNotFoundError, match=r"did you mean llama3\.2:1b"):
        store.resolve("llama3.2:1c")
    with pytest.raises(ModelNotFoundError, match="no such file"):
        store.resolve("./missing.gguf")


def test_list_models_marks_presence(smollm2_path: Path) -> None:
    store.import_gguf(smollm2_path, "extra")
    rows = {r.name: r for r in store.list_models()}
    assert rows["smollm2:135m"].present and rows["smollm2:135m"].source == "embedded"
    assert not rows["llama3.2:1b"].present and rows["llama3.2:1b"].source == "catalog"
    assert not rows["llama3.2-vision:11b"].supported
    assert rows["extra"].present and rows["extra"].source == "import"


def test_read_info_of_the_real_model(smollm2_path: Path) -> None:
    info = read_info(smollm2_path)
    assert (info.architecture, info.quantization, info.context_length) == ("llama", "Q4_1", 8192)
    assert info.parameters == 134_515_008
    assert "<|im_start|>" in info.chat_template
    assert info.metadata["tokenizer.ggml.tokens"] == "[49152 items]"
