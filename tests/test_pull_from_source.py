"""`llmkit pull --from-source`: checkpoint from the (fake) Hub → convert → quantize → register."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.checkpoints import build_tiny_llama3
from tests.conftest import run_llmkit
from tests.hub_server import FakeHub
from tests.test_pull import hub  # noqa: F401  (the fake Hub fixture)

SOURCE = "acme/tiny-llama3"


def _serve_checkpoint(fake: FakeHub, directory: Path) -> None:
    fake.add(SOURCE, {p.name: p for p in directory.iterdir() if p.is_file()})


def _catalog(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(f'''
[models."tiny3:1m"]
kind = "text"
description = "test entry"
hf_repo = "acme/unused-GGUF"
file = "tiny-{{quant}}.gguf"
quants = ["Q8_0", "Q4_K_M"]
default_quant = "Q4_K_M"
source_repo = "{SOURCE}"
''')


def test_from_source_converts_quantizes_and_registers(
        hub: FakeHub, isolated_home: Path, tmp_path: Path) -> None:  # noqa: F811
    ckpt = tmp_path / "ckpt"
    build_tiny_llama3(ckpt, bf16=True)
    _serve_checkpoint(hub, ckpt)
    _catalog(isolated_home)
    proc = run_llmkit(["pull", "tiny3:1m", "--from-source", "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["source_repo"] == SOURCE and data["kept"] == []
    model = data["model"]
    assert model["name"] == "tiny3:1m" and model["quant"] == "Q4_K_M"
    path = Path(model["path"])
    assert path.parent == isolated_home / "models" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # f16 removed
    shown = json.loads(run_llmkit(["show", "tiny3:1m", "-f", "json"]).stdout)
    assert shown["quantization"] == "Q4_K_M" and shown["architecture"] == "llama"
    ran = run_llmkit(["run", "-m", "tiny3:1m", "--max-tokens", "3", "hello"])
    assert ran.returncode == 0, ran.stderr
    # Only the files a conversion needs were requested.
    names = {r["path"].rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r["path"]}
    assert names <= {"config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"}


def test_from_source_keep_leaves_the_f16(hub: FakeHub, isolated_home: Path,  # noqa: F811
                                         tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    build_tiny_llama3(ckpt)
    _serve_checkpoint(hub, ckpt)
    proc = run_llmkit(["pull", SOURCE, "--from-source", "--quant", "Q8_0", "--keep"])
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in (isolated_home / "models").iterdir())
    assert files == ["acme--tiny-llama3-q8_0.gguf"]  # Q8_0 is written directly: no f16
    proc = run_llmkit(["pull", SOURCE, "--from-source", "--quant", "Q4_K_M", "--keep"])
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in (isolated_home / "models").iterdir())
    assert "acme--tiny-llama3-q4_k_m.f16.gguf" in files
    assert "acme--tiny-llama3-q4_k_m.gguf" in files


def test_keep_without_from_source_is_a_usage_error(hub: FakeHub) -> None:  # noqa: F811
    proc = run_llmkit(["pull", "llama3.2:1b", "--keep"])
    assert proc.returncode == 2 and "--keep only applies with --from-source" in proc.stderr
    assert hub.requests == []


def test_from_source_refuses_an_unknown_architecture_before_downloading_weights(
        hub: FakeHub, isolated_home: Path, tmp_path: Path) -> None:  # noqa: F811
    ckpt = tmp_path / "gemma"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(
        {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"}))
    (ckpt / "model.safetensors").write_bytes(b"\0" * 1024)
    hub.add("google/gemma-3-4b-it", {p.name: p for p in ckpt.iterdir()})
    proc = run_llmkit(["pull", "gemma3:4b", "--from-source"])
    assert proc.returncode == 1
    assert ("gemma3:4b (google/gemma-3-4b-it) is a Gemma3ForConditionalGeneration checkpoint, "
            "which llmkit's converter does not support") in proc.stderr
    assert "llmkit pull gemma3:4b" in proc.stderr
    fetched = {r["path"].rsplit("/", 1)[-1] for r in hub.requests if "/resolve/" in r["path"]}
    assert fetched == {"config.json"}


def test_from_source_of_smolvlm_registers_the_projector(
        hub: FakeHub, isolated_home: Path, tmp_path: Path) -> None:  # noqa: F811
    from tests.images import write_photo_jpeg
    from tests.vision_checkpoints import build_tiny_smolvlm

    ckpt = tmp_path / "smolvlm"
    build_tiny_smolvlm(ckpt)
    hub.add("acme/tiny-smolvlm", {p.name: p for p in ckpt.iterdir() if p.is_file()})
    proc = run_llmkit(["pull", "acme/tiny-smolvlm", "--from-source", "--quant", "Q8_0",
                       "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)["model"]
    assert model["kind"] == "vision"
    assert Path(model["mmproj"]) == isolated_home / "models" / "mmproj-acme--tiny-smolvlm-q8_0.gguf"
    assert Path(model["mmproj"]).is_file()
    photo = write_photo_jpeg(tmp_path)
    captioned = run_llmkit(["caption", str(photo), "-m", "acme/tiny-smolvlm:q8_0", "-n", "3"])
    assert captioned.returncode == 0, captioned.stderr
    removed = run_llmkit(["rm", "acme/tiny-smolvlm:q8_0"])
    assert removed.returncode == 0, removed.stderr
    assert sorted((isolated_home / "models").iterdir()) == []


# -- Llama 3.2 Vision: a source-only catalog entry, built by llmkit's own mllama engine -------

VISION_SOURCE = "acme/tiny-llama-vision"


def _vision_catalog(home: Path) -> None:
    # As llama3.2-vision:11b in models.toml: no hf_repo/file (no GGUF is published), only the
    # checkpoint to build from.
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text(f'''
[models."tiny-vision:1m"]
kind = "vision"
description = "test entry"
source_repo = "{VISION_SOURCE}"
default_quant = "Q4_K_M"
''')


@pytest.mark.slow  # converts, quantizes and captions with the real engine (~17 s)
def test_from_source_of_llama_vision_builds_one_file(
        hub: FakeHub, isolated_home: Path, tmp_path: Path) -> None:  # noqa: F811
    from tests.images import write_photo_jpeg
    from tests.mllama_model import build_model, require_oracle, save_checkpoint

    require_oracle()
    # Shaped like meta-llama/Llama-3.2-11B-Vision-Instruct: bf16 shards with an index, the
    # published (4.45) names and config, chat_template.json, and Meta's own files under
    # original/ (not needed for a conversion), with the repository's documents.
    ckpt = save_checkpoint(build_model(seed=0), tmp_path / "ckpt", dtype="bfloat16", shards=2)
    (ckpt / "original" / "params.json").write_text('{"dim": 64, "n_layers": 5}\n')
    (ckpt / "original" / "consolidated.pth").write_bytes(b"\0" * 4096)
    for doc in ("README.md", "LICENSE.txt", "USE_POLICY.md"):
        (ckpt / doc).write_text("not a checkpoint file\n")
    hub.add(VISION_SOURCE, {str(p.relative_to(ckpt)): p for p in ckpt.rglob("*") if p.is_file()})
    _vision_catalog(isolated_home)
    proc = run_llmkit(["pull", "tiny-vision:1m", "--from-source", "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["source_repo"] == VISION_SOURCE and data["kept"] == []
    model = data["model"]
    assert model["name"] == "tiny-vision:1m"
    assert model["kind"] == "vision"
    assert model["quant"] == "Q4_K_M"
    assert model["mmproj"] == ""  # the one file holds the vision tower too
    path = Path(model["path"])
    assert path.parent == isolated_home / "models" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # f16 removed
    shown = json.loads(run_llmkit(["show", "tiny-vision:1m", "-f", "json"]).stdout)
    assert shown["architecture"] == "mllama" and shown["quantization"] == "Q4_K_M"
    listed = {e["name"]: e for e in json.loads(run_llmkit(["list", "-f", "json"]).stdout)}
    assert listed["tiny-vision:1m"]["present"] is True
    photo = write_photo_jpeg(tmp_path)
    captioned = run_llmkit(["caption", str(photo), "-m", "tiny-vision:1m", "-n", "3",
                            "-f", "jsonl"])
    assert captioned.returncode == 0, captioned.stderr
    record = json.loads(captioned.stdout)
    assert record["error"] is None and record["caption"]
    assert record["model"] == "tiny-vision:1m"
    assert record["usage"]["image_tokens"] == 4 * 5  # 2x2 tiles of 4 patches + class token
    removed = run_llmkit(["rm", "tiny-vision:1m"])
    assert removed.returncode == 0, removed.stderr
    assert sorted((isolated_home / "models").iterdir()) == []
    # Only the files a conversion needs were requested.
    fetched = {r["path"].split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests
               if "/resolve/" in r["path"]}
    needed = {"config.json", "preprocessor_config.json", "chat_template.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "model.safetensors.index.json",
              "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert fetched <= needed | {"chat_template.jinja"}, sorted(fetched - needed)
    assert {"config.json", "preprocessor_config.json", "chat_template.json", "tokenizer.json",
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= fetched
