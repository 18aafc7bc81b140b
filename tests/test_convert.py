"""`llmkit convert` and `quantize`: round trip on the real model, reference logits, errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from llmkit.engines import SamplingParams, load_engine
from tests.checkpoints import build_tiny_llama3, gguf_to_hf
from tests.conftest import run_llmkit

CORPUS = [
    "Hello world, this is plain English.",
    "def f(x):\n    return x ** 2  # code\n",
    "emoji 🎉🚀 and 😶\u200d🌫️ together",
    "中文测试：你好，世界！",
    "   multiple   spaces\n\n\n\ttabs\t\t and trailing   ",
    "12345 3.14159 1,000,000 007",
    "<|im_start|>user\nhi<|im_end|>",
]
PROMPTS = ["What is the capital of France?", "List three colors."]
GREEDY = SamplingParams(temperature=0, max_tokens=48)
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


@pytest.fixture(scope="module")
def smol_checkpoint(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return_dir = tmp_path_factory.mktemp("smol-hf")
    gguf_to_hf(smollm2_path, return_dir)
    return return_dir


@pytest.fixture(scope="module")
def converted(smol_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[dict[str, Path]]:
    out = tmp_path_factory.mktemp("converted")
    paths = {}
    for outtype in ("f32", "f16"):
        path = out / f"smol-{outtype}.gguf"
        proc = run_llmkit(["convert", str(smol_checkpoint), "-o", str(path),
                           "--outtype", outtype])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == ""
        paths[outtype] = path
    yield paths


def test_tokenizer_round_trips_exactly(smollm2_path: Path, converted: dict[str, Path]) -> None:
    with load_engine(smollm2_path) as original, load_engine(converted["f32"]) as ours:
        for text in CORPUS:
            assert ours.tokenize(text, parse_special=True) == original.tokenize(
                text, parse_special=True), text
        assert ours.chat_template == original.chat_template
        for key in ("tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token",
                    "llama.context_length", "llama.rope.freq_base"):
            assert ours.metadata(key) == original.metadata(key), key


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_greedy_generation_matches_the_original(smollm2_path: Path, converted: dict[str, Path],
                                                outtype: str) -> None:
    with load_engine(smollm2_path) as original, load_engine(converted[outtype]) as ours:
        for prompt in PROMPTS:
            messages = [SYSTEM, {"role": "user", "content": prompt}]
            expected = original.generate(original.chat_tokens(messages), GREEDY).text
            assert ours.generate(ours.chat_tokens(messages), GREEDY).text == expected


def test_requantized_round_trip_is_byte_identical(smollm2_path: Path, converted: dict[str, Path],
                                                  tmp_path: Path) -> None:
    import gguf

    out = tmp_path / "again-Q4_1.gguf"
    proc = run_llmkit(["quantize", str(converted["f32"]), str(out), "--type", "Q4_1"])
    assert proc.returncode == 0, proc.stderr
    original = {t.name: t for t in gguf.GGUFReader(smollm2_path).tensors}
    ours = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert original.keys() == ours.keys()
    for name, t in original.items():
        assert ours[name].tensor_type == t.tensor_type, name
        assert np.array_equal(ours[name].data, t.data), name


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantized_models_answer(converted: dict[str, Path], tmp_path: Path, qtype: str) -> None:
    out = tmp_path / f"smol-{qtype}.gguf"
    proc = run_llmkit(["quantize", str(converted["f16"]), str(out), "--type", qtype.lower()])
    assert proc.returncode == 0, proc.stderr
    assert f"{qtype}: " in proc.stderr and "→" in proc.stderr
    assert out.stat().st_size < converted["f16"].stat().st_size
    # At 135M parameters, twice-quantized weights need the question spelled out.
    ran = run_llmkit(["run", "-m", str(out), "--temperature", "0",
                      "--system", "You are a helpful assistant.",
                      "What is the capital of France? Answer in one sentence."])
    assert ran.returncode == 0 and "Paris" in ran.stdout


def test_quantize_refuses_to_overwrite_and_reports_json(converted: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "q.gguf"
    out.write_bytes(b"keep me")
    proc = run_llmkit(["quantize", str(converted["f16"]), str(out), "--type", "Q8_0"])
    assert proc.returncode == 2 and "exists" in proc.stderr and "--force" in proc.stderr
    assert out.read_bytes() == b"keep me"
    proc = run_llmkit(["quantize", str(converted["f16"]), str(out), "--type", "Q8_0",
                       "--force", "--format", "json"])
    data = json.loads(proc.stdout)
    assert data["type"] == "Q8_0" and data["size_out"] == out.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["q.gguf"]  # no temporary files left


@pytest.mark.parametrize(("args", "message", "code"), [
    (["--type", "Q9_X"], "unknown quantization type 'Q9_X'", 2),
    (["--type", "IQ2_XXS"], "IQ2_XXS needs an importance matrix", 2),
])
def test_quantize_usage_errors(converted: dict[str, Path], tmp_path: Path, args: list[str],
                               message: str, code: int) -> None:
    proc = run_llmkit(["quantize", str(converted["f16"]), str(tmp_path / "o.gguf"), *args])
    assert proc.returncode == code and message in proc.stderr


def test_a_type_given_as_the_output_is_a_usage_error(converted: dict[str, Path],
                                                     tmp_path: Path) -> None:
    proc = run_llmkit(["quantize", str(converted["f16"]), "q8_0"])
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("llmkit: error: 'q8_0' is a quantization type, not an output file "
                           "(write --type Q8_0)\n")
    assert not (Path.cwd() / "q8_0").exists()


def test_quantize_of_a_non_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_text("nope")
    proc = run_llmkit(["quantize", str(bad), "--type", "Q8_0"])
    assert proc.returncode == 1 and "is not a GGUF model file" in proc.stderr


def test_logits_match_transformers(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ckpt = tmp_path / "tiny"
    build_tiny_llama3(ckpt)
    out = tmp_path / "tiny-f32.gguf"
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out), "--outtype", "f32"])
    assert proc.returncode == 0, proc.stderr
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 3
            + "Unseen words: zebra quartz jukebox 98765 ñandú Ελληνικά 🎉")
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"))
    with load_engine(out, n_ctx=512) as engine:
        ids = engine.tokenize(text, add_special=False)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert engine.metadata("tokenizer.ggml.pre") == "llama-bpe"
        ours = engine.next_token_logits(ids)
    model = transformers.LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0, -1].numpy()
    assert len(ids) > 64  # past the original context, where llama3 RoPE scaling matters
    rel = np.max(np.abs(ours - reference)) / np.max(np.abs(reference))
    assert rel < 1e-3, rel


def test_unsupported_architecture(smol_checkpoint: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "other"
    shutil.copytree(smol_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (ckpt / "config.json").write_text(json.dumps(config))
    proc = run_llmkit(["convert", str(ckpt), "-o", str(tmp_path / "o.gguf")])
    assert proc.returncode == 1
    assert ("architecture 'Qwen2VLForConditionalGeneration' is not supported "
            "(supported are Idefics3ForConditionalGeneration, LlamaForCausalLM, "
            "MllamaForConditionalGeneration, SmolVLMForConditionalGeneration)") in proc.stderr
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("damage", ["no-config", "no-weights", "truncated", "no-tokenizer"])
def test_damaged_checkpoints(smol_checkpoint: Path, tmp_path: Path, damage: str) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(smol_checkpoint, ckpt)
    weights = ckpt / "model.safetensors"
    if damage == "no-config":
        (ckpt / "config.json").unlink()
    elif damage == "no-weights":
        weights.unlink()
    elif damage == "truncated":
        with open(weights, "r+b") as fh:
            fh.truncate(weights.stat().st_size // 2)
    else:
        (ckpt / "tokenizer.json").unlink()
    out = tmp_path / "o.gguf"
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out)])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("llmkit: error: ") and "Traceback" not in proc.stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary output left


def test_bf16_source_converts_to_f16_exactly(tmp_path: Path) -> None:
    import gguf

    ckpt = tmp_path / "bf16"
    build_tiny_llama3(ckpt, bf16=True)
    out = tmp_path / "o.gguf"
    assert run_llmkit(["convert", str(ckpt), "-o", str(out)]).returncode == 0
    raw = np.fromfile(ckpt / "model.safetensors", dtype=np.uint8)
    header_len = int(raw[:8].view("<u8")[0])
    header = json.loads(raw[8:8 + header_len].tobytes())
    info = header["model.layers.0.mlp.up_proj.weight"]
    begin, end = info["data_offsets"]
    bits = raw[8 + header_len + begin:8 + header_len + end].view("<u2").astype(np.uint32) << 16
    expected = bits.view(np.float32).astype(np.float16).reshape(info["shape"])
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    written = tensors["blk.0.ffn_up.weight"]
    assert written.tensor_type == gguf.GGMLQuantizationType.F16
    assert np.array_equal(np.asarray(written.data).reshape(expected.shape), expected)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert "rope_freqs.weight" in tensors


def test_sentencepiece_tokenizer(tmp_path: Path) -> None:
    spm = pytest.importorskip("sentencepiece")
    from tests.checkpoints import build_tiny_llama2_spm

    ckpt = tmp_path / "spm"
    build_tiny_llama2_spm(ckpt)
    out = tmp_path / "spm.gguf"
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out), "--outtype", "f32"])
    assert proc.returncode == 0, proc.stderr
    processor = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    with load_engine(out, n_ctx=256) as engine:
        assert engine.metadata("tokenizer.ggml.model") == "llama"
        for text in ["The quick brown fox.", "Paris is the capital of France", "def add(a, b):"]:
            assert engine.tokenize(text) == [1, *processor.encode(text)], text
        reply = engine.generate(engine.tokenize("Hello"), SamplingParams(temperature=0,
                                                                         max_tokens=5))
        assert reply.completion_tokens > 0


def test_importance_matrix_enables_the_smallest_types(converted: dict[str, Path],
                                                      tmp_path: Path) -> None:
    import gguf

    # An imatrix in llama-imatrix's GGUF layout: per weight, squared-activation sums and counts.
    imatrix = tmp_path / "imatrix.gguf"
    writer = gguf.GGUFWriter(imatrix, "imatrix")
    writer.add_type("imatrix")
    for t in gguf.GGUFReader(converted["f16"]).tensors:
        if len(t.shape) == 2:
            ne0 = int(t.shape[0])
            writer.add_tensor(f"{t.name}.in_sum2", np.full((1, ne0), 4.0, np.float32))
            writer.add_tensor(f"{t.name}.counts", np.full((1, 1), 2.0, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = tmp_path / "iq2.gguf"
    proc = run_llmkit(["quantize", str(converted["f16"]), str(out), "--type", "IQ2_XXS",
                       "--imatrix", str(imatrix)])
    assert proc.returncode == 0, proc.stderr
    # SmolLM2's 576-wide rows are not multiples of IQ2's 256-blocks: llama.cpp falls back to
    # larger types for those, so the file shrinks by about 3×, not 8×.
    assert out.stat().st_size < converted["f16"].stat().st_size / 3
    bad = run_llmkit(["quantize", str(converted["f16"]), str(tmp_path / "x.gguf"),
                      "--type", "IQ2_XXS", "--imatrix", str(converted["f16"])])
    assert bad.returncode == 1 and "holds no importance data" in bad.stderr


def _dead_writers_temp(directory: Path, name: str) -> Path:
    """A temporary file as a SIGKILLed llmkit leaves it: named for a pid that has exited."""
    import socket
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    host = socket.gethostname()
    left = directory / f".{name}.llmkit-{host}-{child.pid}-0badc0de.tmp"
    left.write_bytes(b"half a model")
    return left


def test_convert_and_quantize_remove_what_killed_runs_left(smol_checkpoint: Path,
                                                           converted: dict[str, Path],
                                                           tmp_path: Path) -> None:
    # Before, a killed run left ".NAME.PID.tmp" (gigabytes for a real model) that nothing
    # ever removed; now the next write into the directory takes dead writers' files away.
    quantized = tmp_path / "q" / "model-Q8_0.gguf"
    quantized.parent.mkdir()
    stale = _dead_writers_temp(quantized.parent, quantized.name)
    proc = run_llmkit(["quantize", str(converted["f16"]), str(quantized), "--type", "Q8_0"])
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and [p.name for p in quantized.parent.iterdir()] == [
        quantized.name]
    out = tmp_path / "c" / "model-f16.gguf"
    out.parent.mkdir()
    stale = _dead_writers_temp(out.parent, out.name)
    proc = run_llmkit(["convert", str(smol_checkpoint), "-o", str(out), "--outtype", "f16"])
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists() and [p.name for p in out.parent.iterdir()] == [out.name]
