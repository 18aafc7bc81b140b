"""End to end: list, show, import, rm and doctor through the real CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import run_llmkit


def test_list_json_has_catalog_and_presence() -> None:
    proc = run_llmkit(["list", "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    for row in rows.values():
        assert set(row) >= {"name", "kind", "present", "size_bytes", "quant", "source",
                            "supported", "description"}
    assert rows["smollm2:135m"]["present"] is True
    assert rows["smollm2:135m"]["size_bytes"] > 90_000_000
    assert rows["llama3.2:1b"]["present"] is False
    assert rows["llama3.2-vision:11b"]["supported"] is True
    assert rows["llama3.2-vision:11b"]["present"] is False
    assert rows["llama-guard4:12b"]["supported"] is False
    assert rows["llama-guard3:11b-vision"]["supported"] is True


def test_list_defaults_to_json_when_piped() -> None:
    assert isinstance(json.loads(run_llmkit(["list"]).stdout), list)


def test_list_table() -> None:
    proc = run_llmkit(["list", "--format", "table", "--present"], env={"COLUMNS": "120"})
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "QUANT", "PRESENT", "DESCRIPTION"]
    assert lines[1].split()[:7] == ["smollm2:135m", "text", "98.4", "MB", "Q4_1", "yes",
                                    "(embedded)"]
    assert len(lines) == 2


def test_show_text_and_json() -> None:
    proc = run_llmkit(["show", "smollm2:135m"])
    assert proc.returncode == 0, proc.stderr
    assert "architecture    llama\n" in proc.stdout
    assert "quantization    Q4_1\n" in proc.stdout
    assert "context length  8192\n" in proc.stdout
    assert "parameters      135M (134,515,008)\n" in proc.stdout
    assert "chat template:\n{% for message in messages %}" in proc.stdout
    data = json.loads(run_llmkit(["show", "smollm2:135m", "-f", "json"]).stdout)
    assert data["architecture"] == "llama" and data["context_length"] == 8192
    assert data["metadata"]["general.architecture"] == "llama"


def test_import_run_rm_cycle(smollm2_path: Path, tmp_path: Path, isolated_home: Path) -> None:
    copy = tmp_path / "mine.gguf"
    shutil.copy(smollm2_path, copy)
    proc = run_llmkit(["import", str(copy), "--name", "mine:q4"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert (isolated_home / "manifest.json").is_file()
    rows = {r["name"]: r for r in json.loads(run_llmkit(["list", "-f", "json"]).stdout)}
    assert rows["mine:q4"]["present"] and rows["mine:q4"]["source"] == "import"
    ran = run_llmkit(["run", "-m", "mine:q4", "--max-tokens", "4", "hello"])
    assert ran.returncode == 0 and ran.stdout.strip()
    again = run_llmkit(["import", str(copy), "--name", "mine:q4"])
    assert again.returncode == 1 and "already exists" in again.stderr
    assert run_llmkit(["import", str(copy), "--name", "mine:q4", "--force"]).returncode == 0
    assert run_llmkit(["rm", "mine:q4"]).returncode == 0
    assert copy.is_file()  # imported files are the user's; rm only unregisters them
    gone = run_llmkit(["rm", "mine:q4"])
    assert gone.returncode == 1 and "model 'mine:q4' not found" in gone.stderr


def test_import_rejects_non_gguf(tmp_path: Path) -> None:
    fake = tmp_path / "x.gguf"
    fake.write_text("hello")
    proc = run_llmkit(["import", str(fake), "--name", "x"])
    assert proc.returncode == 1 and "is not a GGUF model file" in proc.stderr


def test_doctor_reports_backend_and_models() -> None:
    proc = run_llmkit(["doctor", "-f", "json"])
    data = json.loads(proc.stdout)
    assert data["llama_cpp_python"] == "0.3.36"
    assert "cpu" in data["backends"] and data["gpu_offload"] in (True, False)
    assert data["default_threads"] >= 1
    assert "smollm2:135m" in data["models_present"]
    assert data["vision_engine"] == "ok (ggml ABI checked)"
    # AMX is listed (and so not used) exactly where llama.cpp's build reports it.
    amx = "AMX_INT8 = 1" in data["system_info"]
    assert data["cpu_buffers_not_used"] == (["AMX"] if amx else [])
    text = run_llmkit(["doctor"]).stdout
    assert "gpu offload" in text and "llama-cpp-python   0.3.36" in text
    assert "vision engine      ok (ggml ABI checked) (Llama 3.2 Vision)\n" in text


def test_version() -> None:
    proc = run_llmkit(["--version"])
    assert proc.returncode == 0 and proc.stdout.startswith("llmkit ")
