"""Hardening: GGUF headers llama.cpp aborts on, truncated projectors, FIFOs as model files."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llmkit.errors import ConvertError, InvalidModelFileError, UsageError
from llmkit.gguf_file import (
    check_file,
    check_model_file,
    check_output,
    check_projector_file,
    read_info,
)
from tests.checkpoints import build_tiny_llama3
from tests.conftest import run_llmkit
from tests.gguf_edit import BOOL, FLOAT32, INT32, STRING, UINT32, GGUFEdit
from tests.vision_checkpoints import build_tiny_smolvlm

HINT = "download or convert it again"
Edit = Callable[[GGUFEdit], Any]


@pytest.fixture(scope="module")
def model_bytes(smollm2_path: Path) -> bytes:
    return smollm2_path.read_bytes()


def _mutant(tmp_path: Path, data: bytes, edit: Edit, name: str = "mutant.gguf") -> Path:
    gguf = GGUFEdit(data)
    edit(gguf)
    return gguf.write(tmp_path / name)


def _refusal(path: Path, check: Callable[[Path], object] = check_model_file) -> str:
    with pytest.raises(InvalidModelFileError) as info:
        check(path)
    assert str(info.value).startswith(f"{path}: ")
    return info.value.problem


def _shrink_vocab(e: GGUFEdit, n: int) -> None:
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
        e.set_array(key, e.get(key)[:n])
    e.resize("token_embd.weight", [576, n])
    e.set("llama.vocab_size", n)


# Each of these made llama.cpp (the real SmolLM2 file, mutated) abort with exit 134 or die of
# SIGFPE, or end in llama.cpp's own "failed to load model" with no reason given.
MODEL_MUTATIONS: list[tuple[str, Edit, str]] = [
    ("block-count-0", lambda e: e.set("llama.block_count", 0),
     "llama.block_count is 0, but a model has 1 to 512 layers"),
    ("block-count-100000", lambda e: e.set("llama.block_count", 100000),
     "llama.block_count is 100000, but a model has 1 to 512 layers"),
    ("block-count-31", lambda e: e.set("llama.block_count", 31),
     "llama.block_count is 31, but the file holds tensors for 30 layers"),
    ("block-count-29", lambda e: e.set("llama.block_count", 29),
     "llama.block_count is 29, but the file holds tensors for 30 layers (up to layer 29)"),
    ("experts-used-above-count",
     lambda e: (e.set("llama.expert_count", 2, UINT32), e.set("llama.expert_used_count", 4,
                                                              UINT32)),
     "llama.expert_used_count is 4, more than llama.expert_count (2)"),
    ("experts-used-0",
     lambda e: (e.set("llama.expert_count", 2, UINT32), e.set("llama.expert_used_count", 0,
                                                              UINT32)),
     "llama.expert_used_count is 0, but the model has 2 experts"),
    ("experts-above-max",
     lambda e: (e.set("llama.expert_count", 1025, UINT32),
                e.set("llama.expert_used_count", 1, UINT32)),
     "llama.expert_count is 1025; llama.cpp runs at most 1024 experts"),
    ("epsilon-nan", lambda e: e.set("llama.attention.layer_norm_rms_epsilon", math.nan),
     "llama.attention.layer_norm_rms_epsilon is nan; it must be a finite number"),
    ("epsilon-0", lambda e: e.set("llama.attention.layer_norm_rms_epsilon", 0.0),
     "llama.attention.layer_norm_rms_epsilon is 0.0; a norm epsilon must be a positive number"),
    ("epsilon-negative", lambda e: e.set("llama.attention.layer_norm_rms_epsilon", -1.0),
     "llama.attention.layer_norm_rms_epsilon is -1.0; a norm epsilon must be a positive number"),
    ("rope-scaling-unknown", lambda e: e.set("llama.rope.scaling.type", "dynamic", STRING),
     "llama.rope.scaling.type is 'dynamic'; llama.cpp knows none, linear, yarn, longrope"),
    ("rope-base-nan", lambda e: e.set("llama.rope.freq_base", math.nan),
     "llama.rope.freq_base is nan; it must be a finite number"),
    ("duplicate-tokens", lambda e: e.set_array("tokenizer.ggml.tokens", ["a"] * 49152),
     "tokenizer.ggml.tokens lists 'a' twice (tokens 0 and 1)"),
    ("no-tokenizer", lambda e: e.set("tokenizer.ggml.model", "none"),
     "tokenizer.ggml.model is 'none': the file has no tokenizer"),
    ("unknown-tokenizer", lambda e: e.set("tokenizer.ggml.model", "nonsense"),
     "tokenizer.ggml.model is 'nonsense'; llama.cpp knows llama, bert, gpt2, t5, rwkv, plamo2"),
    ("sentencepiece-without-byte-tokens", lambda e: e.set("tokenizer.ggml.model", "llama"),
     "tokenizer.ggml.tokens lacks the byte token <0x00>"),
    ("heads-kv-0-in-one-layer",
     lambda e: e.set_array("llama.attention.head_count_kv", [3] * 29 + [0], UINT32),
     "llama.attention.head_count_kv is 0 in layer 29; every layer of a llama model has "
     "key/value heads"),
    ("heads-0", lambda e: e.set("llama.attention.head_count", 0),
     "llama.attention.head_count is 0; every layer of a llama model has attention heads"),
    ("heads-kv-not-dividing", lambda e: e.set("llama.attention.head_count_kv", 2),
     "llama.attention.head_count_kv is 2, which does not divide the 9 attention heads"),
    ("per-layer-array-short", lambda e: e.set_array("llama.feed_forward_length", [1536] * 3,
                                                    UINT32),
     "llama.feed_forward_length has 3 entries, one per layer was expected (30)"),
    ("value-head-size-differs", lambda e: e.set("llama.attention.value_length", 32, UINT32),
     "llama.rope.dimension_count (64), the key head size (64) and the value head size (32) "
     "differ"),
    ("rope-dims-above-head", lambda e: e.set("llama.rope.dimension_count", 128),
     "llama.rope.dimension_count is 128; it must be even and at most the head size (64)"),
    ("eos-beyond-a-vocab-shorter-than-the-default",
     lambda e: (_shrink_vocab(e, 8), e.set("tokenizer.ggml.eos_token_id", 500)),
     "tokenizer.ggml.eos_token_id is 500, and llama.cpp's default for it (11) is past the "
     "vocabulary of 8 tokens"),
    ("bos-unset-in-a-vocab-shorter-than-the-default",
     lambda e: (_shrink_vocab(e, 8), e.remove("tokenizer.ggml.bos_token_id")),
     "tokenizer.ggml.bos_token_id is not set, and llama.cpp's default for it (11) is past "
     "the vocabulary of 8 tokens"),
    ("token-list-shorter-than-types",
     lambda e: e.set_array("tokenizer.ggml.tokens", e.get("tokenizer.ggml.tokens")[:1000]),
     "tokenizer.ggml.token_type has 49152 entries for 1000 tokens"),
    ("token-types-as-uint8",
     lambda e: e.set_array("tokenizer.ggml.token_type", [1] * 49152, 0),
     "tokenizer.ggml.token_type is an array of uint8, but llama.cpp reads it as int32"),
    ("special-id-wrong-type", lambda e: e.set("tokenizer.ggml.unknown_token_id", -5, INT32),
     "tokenizer.ggml.unknown_token_id is int32, but llama.cpp reads it as uint32"),
    ("block-count-a-string", lambda e: e.set("llama.block_count", "30", STRING),
     "llama.block_count is string, but llama.cpp reads it as uint32"),
    ("tensor-dimension-0", lambda e: setattr(e.tensor("output_norm.weight"), "dims", [0]),
     "is corrupt (tensor output_norm.weight has a dimension of 0 [0])"),
    ("tensor-5-dimensions",
     lambda e: setattr(e.tensor("output_norm.weight"), "dims", [576, 1, 1, 1, 1]),
     "is corrupt (tensor output_norm.weight has 5 dimensions (GGUF allows 1 to 4))"),
    ("tensor-rows-not-whole-blocks",
     lambda e: setattr(e.tensor("blk.0.attn_q.weight"), "dims", [560, 576]),
     "is corrupt (tensor blk.0.attn_q.weight has rows of 560 values, not a multiple of its "
     "type's block of 32 (Q4_1))"),
    ("tensor-misplaced",
     lambda e: setattr(e.tensor("output_norm.weight"), "offset",
                       e.tensor("output_norm.weight").offset + 32),
     "is corrupt (tensor output_norm.weight starts at offset"),
    ("tensor-twice", lambda e: setattr(e.tensors[1], "name", e.tensors[0].name),
     "is corrupt (tensor token_embd.weight appears twice)"),
    ("alignment-3", lambda e: e.set("general.alignment", 3, UINT32),
     "is corrupt (general.alignment is 3; it must be a uint32 power of two)"),
    ("a-projector-as-model", lambda e: e.set("general.architecture", "clip"),
     "is a vision projector (mmproj), not a model"),
]


@pytest.mark.parametrize(("edit", "problem"), [(e, p) for _, e, p in MODEL_MUTATIONS],
                         ids=[n for n, _, _ in MODEL_MUTATIONS])
def test_header_values_llama_cpp_aborts_on_are_refused(tmp_path: Path, model_bytes: bytes,
                                                        edit: Edit, problem: str) -> None:
    path = _mutant(tmp_path, model_bytes, edit)
    assert _refusal(path).startswith(problem)
    # show, import, quantize and pull take files in through check_file: the same refusal.
    assert _refusal(path, lambda p: check_file(p, "model")).startswith(problem)


def test_the_real_model_passes_and_is_unchanged_by_a_round_trip(
        tmp_path: Path, smollm2_path: Path, model_bytes: bytes) -> None:
    check_model_file(smollm2_path)
    assert check_file(smollm2_path).architecture == "llama"
    # The mutation helper itself changes nothing when asked to change nothing.
    assert GGUFEdit(model_bytes).to_bytes() == model_bytes
    same = GGUFEdit(model_bytes)
    same.resize("token_embd.weight", same.tensor("token_embd.weight").dims)
    assert same.to_bytes() == model_bytes


def test_values_llama_cpp_tolerates_still_load(tmp_path: Path, model_bytes: bytes) -> None:
    # Checked so as not to refuse what llama.cpp runs: a context length of 0 falls back, a
    # sliding window key is ignored by llama, a RoPE scaling factor of 0 means "none".
    for i, edit in enumerate([
        lambda e: e.set("llama.context_length", 0),
        lambda e: e.set("llama.rope.scaling.factor", 0.0, FLOAT32),
        lambda e: e.set("llama.rope.scaling.type", "linear", STRING),
        lambda e: e.set("tokenizer.ggml.add_bos_token", True, BOOL),
        # An id past the vocabulary is ignored with a warning (llama.cpp keeps its default):
        # published files carry such padding ids, and they run.
        lambda e: e.set("tokenizer.ggml.bos_token_id", 60000),
        lambda e: e.set("tokenizer.ggml.padding_token_id", 49152),
        lambda e: (_shrink_vocab(e, 300), e.set("tokenizer.ggml.eos_token_id", 500)),
    ]):
        check_model_file(_mutant(tmp_path, model_bytes, edit, f"ok{i}.gguf"))


@pytest.mark.slow
def test_a_padding_id_past_the_vocabulary_runs_as_in_llama_cpp(tmp_path: Path,
                                                               model_bytes: bytes) -> None:
    path = _mutant(tmp_path, model_bytes,
                   lambda e: e.set("tokenizer.ggml.padding_token_id", 49152 + 5))
    proc = run_llmkit(["run", "-q", "-m", str(path), "--max-tokens", "3", "--temperature", "0",
                       "Hi"])
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert proc.stdout.strip()


@pytest.mark.slow
def test_a_refusal_llmkit_does_not_foresee_names_llama_cpp_s_reason(tmp_path: Path,
                                                                   model_bytes: bytes) -> None:
    path = _mutant(tmp_path, model_bytes, lambda e: e.set("tokenizer.ggml.pre", "no-such-pre"))
    proc = run_llmkit(["run", "-m", str(path), "Hi"])
    assert proc.returncode == 1
    # llama.cpp's reason, not its closing "failed to load model".
    assert proc.stderr == (f"llmkit: error: {path}: cannot be loaded: error loading model "
                           "vocabulary: unknown pre-tokenizer type: 'no-such-pre' (run with -v "
                           "to see llama.cpp's log)\n")


# -- architectures the real model cannot stand in for: small files written with gguf-py -------


def _write(path: Path, arch: str, kv: dict[str, Any], *, layers: int = 2,
           tokens: list[str] | None = None, tokenizer: str = "gpt2",
           tensors: dict[str, np.ndarray] | None = None) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    for key, value in kv.items():
        full = f"{arch}.{key}"
        if isinstance(value, list):
            writer.add_array(full, value)
        elif isinstance(value, float):
            writer.add_float32(full, value)
        elif isinstance(value, str):
            writer.add_string(full, value)
        else:
            writer.add_uint32(full, value)
    words = tokens or [f"t{i}" for i in range(32)]
    writer.add_tokenizer_model(tokenizer)
    writer.add_token_list(words)
    writer.add_token_types([1] * len(words))
    if tokenizer == "gpt2":
        writer.add_token_merges(["t 1"])
    for name, array in (tensors or {f"blk.{i}.attn_norm.weight": np.ones(8, np.float32)
                                    for i in range(layers)}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GEMMA3 = {"embedding_length": 2560, "attention.head_count": 8, "attention.head_count_kv": 4,
          "attention.key_length": 256, "attention.value_length": 256,
          "attention.layer_norm_rms_epsilon": 1e-6, "feed_forward_length": 10240,
          "attention.sliding_window": 1024, "rope.freq_base": 1e6}
QWEN2VL = {"embedding_length": 2048, "attention.head_count": 16, "attention.head_count_kv": 2,
           "attention.layer_norm_rms_epsilon": 1e-6, "feed_forward_length": 11008,
           "rope.dimension_sections": [16, 24, 24, 0]}
LLAMA4 = {"embedding_length": 512, "attention.head_count": 8, "attention.head_count_kv": 2,
          "attention.layer_norm_rms_epsilon": 1e-5, "feed_forward_length": 1024,
          "expert_count": 16, "expert_used_count": 1, "expert_feed_forward_length": 512,
          "interleave_moe_layer_step": 1}


@pytest.mark.parametrize(("arch", "kv"), [("gemma3", GEMMA3), ("qwen2vl", QWEN2VL),
                                          ("llama4", LLAMA4)])
def test_catalog_architectures_pass(tmp_path: Path, arch: str, kv: dict[str, Any]) -> None:
    # Gemma 3's heads are not hidden_size / head_count wide; that is what key_length says.
    check_model_file(_write(tmp_path / f"{arch}.gguf", arch, kv))


@pytest.mark.parametrize(("arch", "kv", "problem"), [
    ("qwen2vl", {**QWEN2VL, "rope.dimension_sections": [0, 0, 0, 0]},
     "qwen2vl.rope.dimension_sections must be four non-negative counts, not all zero"),
    ("qwen2vl", {**QWEN2VL, "rope.dimension_sections": [16, 24, 24]},
     "qwen2vl.rope.dimension_sections must be four"),
    ("llama4", {**LLAMA4, "expert_count": 0, "expert_used_count": 0},
     "llama4.expert_count is 0; llama.cpp cannot load a llama4 model without experts"),
    ("llama4", {**LLAMA4, "attention.key_length": 32, "attention.value_length": 64},
     "llama4.rope.dimension_count (32), the key head size (32) and the value head size (64)"),
    ("llama4", {**LLAMA4, "expert_group_count": 3, "expert_group_used_count": 1},
     "llama4.expert_group_count (3) and expert_group_used_count (1) do not split the 16 "
     "experts"),
    ("gemma3", {**GEMMA3, "attention.layer_norm_rms_epsilon": -1e-6},
     "gemma3.attention.layer_norm_rms_epsilon is"),
    ("gemma3", {**GEMMA3, "attention.head_count_kv": 3},
     "gemma3.attention.head_count_kv is 3, which does not divide the 8 attention heads"),
    ("gemma3", {**GEMMA3, "nextn_predict_layers": 3},
     "gemma3.nextn_predict_layers is larger than gemma3.block_count (2)"),
])
def test_per_architecture_rules(tmp_path: Path, arch: str, kv: dict[str, Any],
                                problem: str) -> None:
    assert _refusal(_write(tmp_path / "m.gguf", arch, kv)).startswith(problem)


def test_a_layer_without_tensors_is_named(tmp_path: Path) -> None:
    tensors = {f"blk.{i}.attn_norm.weight": np.ones(8, np.float32) for i in (0, 2)}
    path = _write(tmp_path / "gap.gguf", "gemma3", GEMMA3, layers=3, tensors=tensors)
    assert _refusal(path) == "gemma3.block_count is 3, but the file holds no tensors for layer 1"


def test_sentencepiece_vocabulary_with_byte_tokens_passes(tmp_path: Path) -> None:
    words = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "▁hi"]
    check_model_file(_write(tmp_path / "spm.gguf", "gemma3", GEMMA3, tokens=words,
                            tokenizer="llama"))
    words.remove("<0x41>")
    words.append("A")  # the raw byte is what llama.cpp falls back to
    check_model_file(_write(tmp_path / "spm2.gguf", "gemma3", GEMMA3, tokens=words,
                            tokenizer="llama"))


def test_checking_a_large_vocabulary_is_fast(tmp_path: Path, model_bytes: bytes) -> None:
    # Llama 3's shape: 128256 tokens and 280147 merges. The reader walks them without numpy.
    def llama3_vocab(e: GGUFEdit) -> None:
        e.set_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(128256)])
        e.set_array("tokenizer.ggml.token_type", [1] * 128256)
        e.set_array("tokenizer.ggml.merges", [f"a{i} b{i}" for i in range(280147)])
        e.resize("token_embd.weight", [576, 128256])
        e.set("llama.vocab_size", 128256)

    path = _mutant(tmp_path, model_bytes, llama3_vocab)
    check_model_file(path)  # imports gguf's type tables once
    started = time.perf_counter()
    check_model_file(path)
    assert time.perf_counter() - started < 1.0


# -- through the real CLI: llama.cpp never sees these files -----------------------------------

ABORTS = ["block-count-0", "block-count-100000", "experts-used-above-count", "epsilon-nan",
          "epsilon-negative", "rope-scaling-unknown", "duplicate-tokens", "no-tokenizer",
          "sentencepiece-without-byte-tokens", "heads-kv-0-in-one-layer", "tensor-dimension-0"]


def _one_line_error(proc: Any, path: Path, problem: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"llmkit: error: {path}: {problem}"), proc.stderr
    assert proc.stderr.count("\n") == 1 and "unexpected" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", ABORTS)
def test_run_import_show_and_quantize_refuse_what_llama_cpp_aborts_on(
        tmp_path: Path, model_bytes: bytes, case: str) -> None:
    _, edit, problem = next(m for m in MODEL_MUTATIONS if m[0] == case)
    path = _mutant(tmp_path, model_bytes, edit)
    for args in (["run", "-m", str(path), "--max-tokens", "2", "--ctx", "64", "hi"],
                 ["import", str(path), "--name", "mutant"],
                 ["show", str(path)],
                 ["quantize", str(path), str(tmp_path / "q.gguf"), "--type", "Q8_0"]):
        _one_line_error(run_llmkit(args, timeout=120), path, problem)
    assert not (tmp_path / "q.gguf").exists()


# -- non-regular files ------------------------------------------------------------------------


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("args", [
    ["run", "-m", "{fifo}", "hi"],
    ["show", "{fifo}"],
    ["import", "{fifo}", "--name", "pipe"],
    ["quantize", "{fifo}", "{tmp}/q.gguf"],
    ["run", "-m", "/dev/zero", "hi"],
    ["show", "/dev/null"],
])
def test_fifos_and_devices_are_refused_without_opening(fifo: Path, tmp_path: Path,
                                                       args: list[str]) -> None:
    argv = [a.format(fifo=fifo, tmp=tmp_path) for a in args]
    proc = run_llmkit(argv, timeout=60)  # opening the FIFO would block until the timeout
    what = "a FIFO (named pipe)" if "{fifo}" in args else "a character device"
    target = fifo if "{fifo}" in args else Path(argv[2] if argv[0] == "run" else argv[1])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"llmkit: error: {target}: is {what}, not a .gguf file (give the "
                           "path of a model file)\n")


def test_fifo_as_projector_or_importance_matrix(fifo: Path, tmp_path: Path,
                                                smollm2_path: Path) -> None:
    proc = run_llmkit(["import", str(smollm2_path), "--name", "m", "--mmproj", str(fifo)],
                      timeout=60)
    assert proc.returncode == 1
    assert f"{fifo}: is a FIFO (named pipe)" in proc.stderr
    with pytest.raises(InvalidModelFileError, match="is a FIFO"):
        check_projector_file(fifo)
    from llmkit.quantize import quantize

    source = _write(tmp_path / "src.gguf", "gemma3", GEMMA3)
    with pytest.raises(InvalidModelFileError, match="is a FIFO"):
        quantize(source, "Q8_0", tmp_path / "out.gguf", imatrix=fifo)


def test_outputs_that_a_rename_would_destroy_are_refused(fifo: Path, tmp_path: Path) -> None:
    for force in (False, True):
        with pytest.raises(UsageError, match=r"is a FIFO \(named pipe\), not a file llmkit "
                                             "can replace"):
            check_output(fifo, force=force)
        with pytest.raises(UsageError, match="is a character device"):
            check_output(Path("/dev/null"), force=force)
        with pytest.raises(UsageError, match="is a directory"):
            check_output(tmp_path, force=force)
    with pytest.raises(UsageError, match="exists"):
        check_output(_write(tmp_path / "x.gguf", "gemma3", GEMMA3), force=False)


def test_convert_refuses_fifos_in_the_checkpoint_and_as_output(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    build_tiny_llama3(ckpt)
    pipe = tmp_path / "out.gguf"
    os.mkfifo(pipe)
    proc = run_llmkit(["convert", str(ckpt), "-o", str(pipe), "--force"], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "is a FIFO (named pipe), not a file llmkit can replace" in proc.stderr
    assert pipe.is_fifo()  # not replaced by the converted model
    config = ckpt / "config.json"
    config.unlink()
    os.mkfifo(config)
    proc = run_llmkit(["convert", str(ckpt), "-o", str(tmp_path / "o.gguf")], timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == (f"llmkit: error: {config} is a FIFO (named pipe), not a regular "
                           "file (a checkpoint directory holds the model's own files)\n")


# -- convert: config.json checked against the weights before anything is written --------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("hf") / "tiny-llama3"
    build_tiny_llama3(ckpt)
    return ckpt


def _with_config(src: Path, dst: Path, **changes: Any) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_convert_of_100000_claimed_layers_fails_at_once(tiny_llama: Path,
                                                        tmp_path: Path) -> None:
    from llmkit.convert import convert

    ckpt = _with_config(tiny_llama, tmp_path / "c", num_hidden_layers=100000)
    convert(tiny_llama, tmp_path / "warm.gguf")  # imports done, so only the check is timed
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(ConvertError) as err:
        convert(ckpt, tmp_path / "o.gguf")
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert str(err.value) == "config.json: num_hidden_layers is 100000; it can be at most 512"
    assert seconds < 0.5 and peak < 20 << 20, (seconds, peak)
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"num_attention_heads": 0}, "config.json: num_attention_heads is 0; it must be at least 1"),
    ({"num_attention_heads": 0, "head_dim": None},
     "config.json: num_attention_heads is 0; it must be at least 1"),
    ({"num_attention_heads": 3, "head_dim": None},
     "config.json: num_key_value_heads (2) does not divide num_attention_heads (3)"),
    ({"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": None},
     "config.json: hidden_size (64) does not divide into 6 attention heads"),
    ({"num_key_value_heads": 0}, "config.json: num_key_value_heads is 0; it must be at least 1"),
    ({"num_hidden_layers": 3},
     "config.json says num_hidden_layers is 3, but the weights hold 2 (model.layers.0 to "
     "model.layers.1)"),
    ({"num_hidden_layers": 0}, "config.json: num_hidden_layers is 0; it must be at least 1"),
    ({"num_hidden_layers": True}, "config.json: num_hidden_layers is True, not a whole number"),
    ({"hidden_size": 64.5}, "config.json: hidden_size is 64.5, not a whole number"),
    ({"hidden_size": 32},
     "tensor model.embed_tokens.weight has shape [322, 64], but config.json implies [322, 32]"),
    ({"head_dim": 7}, "config.json: head_dim is 7; RoPE needs an even head size"),
    ({"rms_norm_eps": float("nan")}, "config.json: rms_norm_eps is nan; it must be a positive"),
    ({"rms_norm_eps": 0}, "config.json: rms_norm_eps is 0; it must be a positive number"),
    ({"rope_theta": -1}, "config.json: rope_theta is -1; it must be a positive number"),
    ({"vocab_size": -3}, "config.json: vocab_size is -3; it must be at least 0"),
    ({"intermediate_size": 0}, "config.json: intermediate_size is 0; it must be at least 1"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("nan")}},
     "config.json: rope_scaling.factor is nan"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 4.0}},
     "config.json: rope_scaling's low_freq_factor must be below its high_freq_factor"),
])
def test_convert_checks_config_json(tiny_llama: Path, tmp_path: Path, changes: dict[str, Any],
                                    message: str) -> None:
    from llmkit.convert import convert

    ckpt = _with_config(tiny_llama, tmp_path / "c", **changes)
    with pytest.raises(ConvertError) as err:
        convert(ckpt, tmp_path / "o.gguf")
    assert str(err.value).startswith(message.replace("322", str(_vocab(tiny_llama))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing written


def _vocab(ckpt: Path) -> int:
    return int(json.loads((ckpt / "config.json").read_text())["vocab_size"])


def test_convert_of_zero_heads_is_a_sentence_on_the_cli(tiny_llama: Path,
                                                        tmp_path: Path) -> None:
    ckpt = _with_config(tiny_llama, tmp_path / "c", num_attention_heads=0)
    proc = run_llmkit(["convert", str(ckpt), "-o", str(tmp_path / "o.gguf")])
    assert proc.returncode == 1
    assert proc.stderr == ("llmkit: error: config.json: num_attention_heads is 0; it must be "
                           "at least 1\n")


def test_converted_output_is_checked_as_llama_cpp_will_load_it(tiny_llama: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "ok.gguf"
    from llmkit.convert import convert

    convert(tiny_llama, out)
    assert check_file(out).architecture == "llama"


# -- projectors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("hf") / "SmolVLM-tiny"
    build_tiny_smolvlm(ckpt)
    out = tmp_path_factory.mktemp("vlm")
    from llmkit.convert import convert

    convert(ckpt, out / "vlm.gguf")
    return out / "vlm.gguf"


V = "clip.vision."
PROJECTOR_MUTATIONS: list[tuple[str, Edit, str]] = [
    ("heads-0", lambda e: e.set(V + "attention.head_count", 0),
     "clip.vision.embedding_length (32) does not divide into 0 attention heads"),
    ("heads-not-dividing", lambda e: e.set(V + "attention.head_count", 3),
     "clip.vision.embedding_length (32) does not divide into 3 attention heads"),
    ("patch-not-dividing", lambda e: e.set(V + "patch_size", 5),
     "clip.vision.image_size (64) is not a whole number of clip.vision.patch_size (5) patches"),
    ("image-size-0", lambda e: e.set(V + "image_size", 0),
     "clip.vision.image_size (0) is not a whole number of clip.vision.patch_size (16)"),
    ("epsilon-nan", lambda e: e.set(V + "attention.layer_norm_epsilon", math.nan),
     "clip.vision.attention.layer_norm_epsilon is nan; it must be a finite number"),
    ("epsilon-negative", lambda e: e.set(V + "attention.layer_norm_epsilon", -1.0),
     "clip.vision.attention.layer_norm_epsilon is -1.0; a norm epsilon must be a positive"),
    ("scale-factor-too-big", lambda e: e.set(V + "projector.scale_factor", 1000),
     "clip.vision.projector.scale_factor is 1000, which does not divide the 4 patches per side"),
    ("blocks-0", lambda e: e.set(V + "block_count", 0),
     "clip.vision.block_count is 0, but an image encoder has 1 to 512 layers"),
    ("blocks-more-than-tensors", lambda e: e.set(V + "block_count", 3),
     "clip.vision.block_count is 3, but the file holds tensors for 2 layers"),
    ("std-zero", lambda e: e.set_array(V + "image_std", [0.0, 0.0, 0.0]),
     "clip.vision.image_std has a value of 0.0; pixels are divided by it"),
    ("no-vision-encoder", lambda e: e.set("clip.has_vision_encoder", False),
     "has no vision encoder"),
    ("a-model-as-projector", lambda e: e.set("general.architecture", "llama"),
     "is a llama model, not a vision projector (mmproj)"),
]


@pytest.mark.parametrize(("edit", "problem"), [(e, p) for _, e, p in PROJECTOR_MUTATIONS],
                         ids=[n for n, _, _ in PROJECTOR_MUTATIONS])
def test_projector_values_mtmd_aborts_on_are_refused(vlm: Path, tmp_path: Path, edit: Edit,
                                                     problem: str) -> None:
    data = (vlm.parent / "mmproj-vlm.gguf").read_bytes()
    path = _mutant(tmp_path, data, edit)
    assert _refusal(path, check_projector_file).startswith(problem)
    assert _refusal(path, lambda p: check_file(p, "projector")).startswith(problem)


def test_a_projector_that_keeps_a_layer_its_model_skips_passes(vlm: Path,
                                                               tmp_path: Path) -> None:
    # LLaVA-style converters write block_count = layers - 1 and may keep the last layer's
    # tensors; mtmd loads tensors by name and runs such files (checked with the real mtmd).
    data = (vlm.parent / "mmproj-vlm.gguf").read_bytes()
    check_projector_file(_mutant(tmp_path, data, lambda e: e.set(V + "block_count", 1)))


def test_the_converted_projector_passes(vlm: Path) -> None:
    check_projector_file(vlm.parent / "mmproj-vlm.gguf")
    assert check_file(vlm.parent / "mmproj-vlm.gguf").architecture == "clip"
    check_model_file(vlm)


@pytest.mark.parametrize("keep", [159000, 80000, 3000])
def test_truncated_projectors_are_named_as_truncated(vlm: Path, tmp_path: Path,
                                                     keep: int) -> None:
    data = (vlm.parent / "mmproj-vlm.gguf").read_bytes()
    assert len(data) > keep
    cut = tmp_path / "mmproj-vlm.gguf"
    cut.write_bytes(data[:keep])
    problem = _refusal(cut, check_projector_file)
    assert problem.startswith("is truncated ("), problem


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.995, 0.5])
def test_truncated_projector_is_refused_end_to_end(vlm: Path, tmp_path: Path,
                                                   fraction: float) -> None:
    # Cut by 0.5 % mtmd used the projector silently (exit 0); by half it was reported as
    # "not a vision projector".
    from tests import images

    (tmp_path / "pics").mkdir()
    picture = images.write_all(tmp_path / "pics")["photo"]
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(vlm, folder / "vlm.gguf")
    data = (vlm.parent / "mmproj-vlm.gguf").read_bytes()
    cut = folder / "mmproj-vlm.gguf"
    cut.write_bytes(data[:int(len(data) * fraction)])
    proc = run_llmkit(["run", "--image", str(picture), "-m", str(folder / "vlm.gguf"),
                       "--max-tokens", "2", "what is it?"], timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert f"llmkit: error: {cut}: is truncated (" in proc.stderr
    proc = run_llmkit(["import", str(folder / "vlm.gguf"), "--name", "v", "--mmproj",
                       str(cut)], timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"llmkit: error: {cut}: is truncated (")


def test_read_info_still_describes_a_file_that_would_be_refused(tmp_path: Path,
                                                               model_bytes: bytes) -> None:
    # The engine's failure explanation reads facts without judging them.
    path = _mutant(tmp_path, model_bytes, lambda e: e.set("llama.block_count", 0))
    assert read_info(path).metadata["llama.block_count"] == 0


# -- pull: files from the Hub are checked as the engine will check them -----------------------


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Any:
    from tests.hub_server import FakeHub, serve

    fake = FakeHub()
    with serve(fake):
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
            monkeypatch.setenv(var, "http://127.0.0.1:9")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setenv("no_proxy", "127.0.0.1")
        yield fake


def test_pull_refuses_a_bad_header_and_a_truncated_projector(hub: Any, tmp_path: Path,
                                                             isolated_home: Path) -> None:
    from tests.gguf_edit import tiny_header_gguf

    model = tiny_header_gguf(tmp_path / "Tiny-Q8_0.gguf", 1)
    projector = tiny_header_gguf(tmp_path / "mmproj-Tiny-f16.gguf", 2, projector=True)
    bad_model = GGUFEdit(model).set("llama.block_count", 0).to_bytes()
    hub.add("acme/Bad-GGUF", {"Tiny-Q8_0.gguf": bad_model})
    proc = run_llmkit(["pull", "acme/Bad-GGUF:Q8_0"])
    assert proc.returncode == 1
    assert proc.stderr == (
        "llmkit: error: Tiny-Q8_0.gguf from acme/Bad-GGUF: llama.block_count is 0, but a model "
        "has 1 to 512 layers (the file on the Hub is not a usable GGUF; nothing was "
        "registered)\n")
    hub.add("acme/Eyes-GGUF", {"Tiny-Q8_0.gguf": model,
                               "mmproj-Tiny-f16.gguf": projector[:-10]})
    proc = run_llmkit(["pull", "acme/Eyes-GGUF:Q8_0"])
    assert proc.returncode == 1
    assert proc.stderr.startswith("llmkit: error: mmproj-Tiny-f16.gguf from acme/Eyes-GGUF: "
                                  "is truncated ("), proc.stderr
    assert not (isolated_home / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["heads-0", "epsilon-nan", "scale-factor-too-big"])
def test_projectors_mtmd_aborted_on_are_refused_end_to_end(vlm: Path, tmp_path: Path,
                                                          case: str) -> None:
    from tests import images

    _, edit, problem = next(m for m in PROJECTOR_MUTATIONS if m[0] == case)
    (tmp_path / "pics").mkdir()
    picture = images.write_all(tmp_path / "pics")["photo"]
    path = _mutant(tmp_path, (vlm.parent / "mmproj-vlm.gguf").read_bytes(), edit)
    proc = run_llmkit(["run", "--image", str(picture), "-m", str(vlm), "--mmproj", str(path),
                       "--max-tokens", "2", "what is it?"], timeout=120)
    _one_line_error(proc, path, problem)
