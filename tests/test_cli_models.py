"""End to end: `llmkit list`, `show`, `import` and `rm` through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from llmkit.catalog import load_catalog
from llmkit.gguf_file import read_info
from tests.conftest import run_llmkit

ROW_FIELDS = {"name", "kind", "present", "size_bytes", "quant", "source", "supported"}


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One llama.cpp thread per run: spinning workers crawl on a busy two-core machine."""
    monkeypatch.setenv("LLMKIT_THREADS", "1")


@pytest.fixture
def model_copy(smollm2_path: Path, tmp_path: Path) -> Path:
    target = tmp_path / "my model" / "mine.Q4_1.gguf"
    target.parent.mkdir()
    try:
        os.link(smollm2_path, target)
    except OSError:
        shutil.copy(smollm2_path, target)
    return target


def _ok(args: list[str], **kwargs: Any) -> tuple[str, str]:
    proc = run_llmkit(args, **kwargs)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc.stdout, proc.stderr


def _fails(args: list[str], **kwargs: Any) -> str:
    proc = run_llmkit(args, **kwargs)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmkit: error: "), proc.stderr
    return lines[0]


def _rows(*extra: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    stdout, _ = _ok(["list", "--format", "json", *extra], **kwargs)
    rows = json.loads(stdout)
    assert isinstance(rows, list)
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    return {r["name"]: r for r in rows}


# -- list -------------------------------------------------------------------------------------


def test_list_json_has_every_catalog_entry(smollm2_path: Path) -> None:
    rows = _rows()
    catalog = load_catalog()
    assert list(rows)[: len(catalog)] == list(catalog)
    for name, spec in catalog.items():
        row = rows[name]
        assert set(row) >= ROW_FIELDS, name
        assert row["kind"] == spec.kind
        assert row["supported"] is spec.supported
        assert isinstance(row["present"], bool) and isinstance(row["size_bytes"], int)
        if not row["present"]:
            assert row["size_bytes"] == 0
    smol = rows["smollm2:135m"]
    assert smol["present"] is True
    assert smol["source"] == "embedded"
    assert smol["quant"] == "Q4_1"
    assert smol["size_bytes"] == smollm2_path.stat().st_size
    default = rows["llama3.2:1b"]
    assert default["present"] is False and default["source"] == "catalog"
    for spec in catalog.values():
        if not spec.supported:
            assert rows[spec.name]["present"] is False


def test_list_to_a_pipe_defaults_to_json() -> None:
    stdout, stderr = _ok(["list"])
    assert json.loads(stdout) == json.loads(_ok(["list", "--format", "json"])[0])
    assert stderr == ""


def test_list_present_only() -> None:
    rows = _rows("--present")
    assert list(rows) == ["smollm2:135m"]


def test_list_table_on_request() -> None:
    stdout, _ = _ok(["list", "--format", "table", "--present"], env={"COLUMNS": "200"})
    lines = stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "QUANT", "PRESENT", "DESCRIPTION"]
    assert lines[1].split()[:7] == ["smollm2:135m", "text", "98.4", "MB", "Q4_1", "yes",
                                    "(embedded)"]
    assert len(lines) == 2


# -- show -------------------------------------------------------------------------------------


def test_show_text(smollm2_path: Path) -> None:
    stdout, stderr = _ok(["show", "smollm2:135m"])
    assert stderr == ""
    head, sep, template = stdout.partition("chat template:\n")
    assert sep
    lines = head.splitlines()
    assert "name            smollm2:135m" in lines
    assert "architecture    llama" in lines
    assert "context length  8192" in lines
    assert "quantization    Q4_1" in lines
    assert "parameters      135M (134,515,008)" in lines
    assert "tensors         272" in lines
    assert f"file size       98.4 MB ({smollm2_path.stat().st_size:,} bytes)" in lines
    assert template == read_info(smollm2_path).chat_template + "\n"
    assert template.startswith("{% for message in messages %}")


def test_show_json(smollm2_path: Path) -> None:
    stdout, _ = _ok(["show", "smollm2:135m", "--format", "json"])
    data = json.loads(stdout)
    assert data["name"] == "smollm2:135m"
    assert data["architecture"] == "llama"
    assert data["context_length"] == 8192
    assert data["quantization"] == "Q4_1"
    assert data["parameters"] == 134_515_008
    assert data["size_bytes"] == smollm2_path.stat().st_size
    assert data["chat_template"] == read_info(smollm2_path).chat_template
    assert data["metadata"]["general.architecture"] == "llama"
    assert data["gguf_name"]


def test_show_a_path(smollm2_path: Path) -> None:
    stdout, _ = _ok(["show", str(smollm2_path), "-f", "json"])
    assert json.loads(stdout)["name"] == smollm2_path.name


def test_show_unknown_model() -> None:
    msg = _fails(["show", "smollm2:136m"])
    assert msg.startswith("llmkit: error: model 'smollm2:136m' not found (did you mean ")


def test_show_a_model_that_is_not_pulled() -> None:
    assert _fails(["show", "llama3.2:3b"]) == (
        "llmkit: error: model 'llama3.2:3b' is in the catalog but not on this machine "
        "(run `llmkit pull llama3.2:3b`)")


# -- import / run / rm ------------------------------------------------------------------------


def test_import_list_run_rm(model_copy: Path, isolated_home: Path) -> None:
    stdout, stderr = _ok(["import", str(model_copy), "--name", "foo"])
    assert stdout == ""
    assert stderr == f"llmkit: imported foo (Q4_1) → {model_copy.resolve()}\n"
    manifest = json.loads((isolated_home / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["models"]["foo"]["path"] == str(model_copy.resolve())

    foo = _rows()["foo"]
    assert foo["present"] is True and foo["source"] == "import"
    assert foo["quant"] == "Q4_1" and foo["kind"] == "text"
    assert foo["size_bytes"] == model_copy.stat().st_size
    assert "foo" in _rows("--present")

    ran, ran_err = _ok(["run", "-m", "foo", "--temperature", "0", "--max-tokens", "8",
                        "--system", "You are a helpful assistant.",
                        "What is the capital of France?"])
    assert "Paris" in ran and ran_err == ""
    shown = json.loads(_ok(["show", "foo", "-f", "json"])[0])
    assert shown["name"] == "foo" and shown["path"] == str(model_copy.resolve())

    assert _fails(["import", str(model_copy), "--name", "foo"]) == (
        "llmkit: error: a model named 'foo' already exists "
        "(choose another --name, or `llmkit rm` it first)")
    _ok(["import", str(model_copy), "--name", "foo", "--force"])

    stdout, stderr = _ok(["rm", "foo"])
    assert stdout == "" and stderr == "llmkit: removed foo\n"
    assert "foo" not in _rows()
    assert model_copy.is_file()  # an imported file belongs to the user
    assert _fails(["rm", "foo"]) == (
        "llmkit: error: model 'foo' not found (`llmkit list` shows local models)")
    assert _fails(["run", "-m", "foo", "hi"]).startswith("llmkit: error: model 'foo' not found")


def test_import_of_a_non_gguf_fails(tmp_path: Path) -> None:
    fake = tmp_path / "notes.gguf"
    fake.write_text("definitely not a model\n")
    assert _fails(["import", str(fake), "--name", "notes"]) == (
        f"llmkit: error: {fake}: is not a GGUF model file "
        "(llmkit runs .gguf files; convert Hugging Face checkpoints to GGUF first)")
    assert "notes" not in _rows()


def test_import_of_a_missing_file_fails(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    assert _fails(["import", str(missing), "--name", "m"]) == (
        f"llmkit: error: {missing}: no such file")


def test_import_with_a_bad_name_is_a_usage_error(model_copy: Path) -> None:
    proc = run_llmkit(["import", str(model_copy), "--name", "a/b"])
    assert proc.returncode == 2
    assert proc.stderr.startswith("llmkit: error: invalid model name 'a/b'")


def test_a_registered_model_whose_file_is_gone(model_copy: Path) -> None:
    _ok(["import", str(model_copy), "--name", "gone"])
    model_copy.unlink()
    msg = _fails(["run", "-m", "gone", "hi"])
    assert msg == (f"llmkit: error: {model_copy.resolve()}: registered as 'gone' but the file "
                   "is gone (`llmkit rm gone` and import or pull it again)")
    assert _rows()["gone"]["present"] is False
    _ok(["rm", "gone"])


def test_llmkit_home_override_is_respected(model_copy: Path, tmp_path: Path,
                                           isolated_home: Path) -> None:
    other = tmp_path / "elsewhere"
    env = {"LLMKIT_HOME": str(other)}
    _ok(["import", str(model_copy), "--name", "foo"], env=env)
    assert (other / "manifest.json").is_file()
    assert "foo" in json.loads((other / "manifest.json").read_text(encoding="utf-8"))["models"]
    assert not (isolated_home / "manifest.json").exists()
    assert "foo" in _rows(env=env)
    assert "foo" not in _rows()
