"""The Vision quantizer's per-tensor types: llama.cpp's own choices, checked against llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmkit.engines.mllama.quantize import BASE_TYPES, TypePlan, use_more_bits
from llmkit.errors import UsageError
from tests.checkpoints import build_tiny_llama3


def _types(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: (tuple(int(d) for d in reversed(t.shape.tolist())), t.tensor_type.name)
            for t in reader.tensors}


@pytest.fixture(scope="module", params=[(256, 512), (160, 288)], ids=["k-blocks", "fallbacks"])
def f16_llama(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmkit.convert import convert

    hidden, ff = request.param
    root = tmp_path_factory.mktemp(f"llama{hidden}")
    # An untied output matrix, so every rule of llama.cpp's is reached.
    build_tiny_llama3(root / "ckpt", hidden=hidden, ff=ff, layers=17, tied=False)
    out = root / "f16.gguf"
    convert(root / "ckpt", out, outtype="f16")
    return out


@pytest.mark.parametrize("ftype", sorted(BASE_TYPES))
def test_types_equal_llama_cpp_for_every_llama_tensor(f16_llama: Path, ftype: str,
                                                       tmp_path: Path) -> None:
    # llama.cpp's quantizer runs on a plain Llama; the plan must choose what it chose for
    # every tensor (the mllama file's text tensors have the same names and roles).
    from llmkit.quantize import quantize

    out = tmp_path / f"{ftype}.gguf"
    quantize(f16_llama, ftype, out, threads=1, verify=False)
    theirs = _types(out)
    source = _types(f16_llama)
    plan = TypePlan.for_tensors(ftype, list(source))
    ours = {name: plan.type_of(name, shape, current) for name, (shape, current) in source.items()}
    assert ours == {name: t for name, (_, t) in theirs.items()}


def test_vision_projector_and_small_tensors_keep_their_type() -> None:
    names = ["v.blk.0.attn_q.weight", "mm.0.weight", "blk.0.attn_norm.weight",
             "blk.3.cross_attn_attn_gate", "rope_freqs.weight", "blk.3.cross_attn_q_norm.weight",
             "v.patch_embd.weight"]
    plan = TypePlan.for_tensors("Q4_K_M", names)
    assert plan.type_of("v.blk.0.attn_q.weight", (1280, 1280), "F16") == "F16"
    assert plan.type_of("mm.0.weight", (4096, 7680), "F32") == "F32"
    assert plan.type_of("v.patch_embd.weight", (1280, 3, 14, 14), "F16") == "F16"
    assert plan.type_of("blk.0.attn_norm.weight", (4096,), "F32") == "F32"
    assert plan.type_of("blk.3.cross_attn_attn_gate", (1,), "F32") == "F32"
    assert plan.type_of("rope_freqs.weight", (64,), "F32") == "F32"
    assert plan.type_of("blk.3.cross_attn_q_norm.weight", (128,), "F32") == "F32"


def test_cross_attention_matrices_take_the_base_type() -> None:
    # Cross-attention V is not llama.cpp's attn_v (it is computed once per image), and its
    # layers are not counted among the self-attention layers that get more bits.
    names = [f"blk.{i}.attn_v.weight" for i in (0, 1, 2, 4)] + ["blk.3.cross_attn_v.weight"]
    plan = TypePlan.for_tensors("Q4_K_M", names)
    assert plan.n_attn_v == 4
    assert plan.type_of("blk.3.cross_attn_v.weight", (1024, 4096), "F16") == "Q4_K"
    assert plan.type_of("blk.3.cross_attn_q.weight", (4096, 4096), "F16") == "Q4_K"


def test_the_vision_tower_s_layers_are_not_counted_among_the_text_layers() -> None:
    text = [f"blk.{i}.ffn_down.weight" for i in range(16)]
    vision = [f"v.blk.{i}.ffn_down.weight" for i in range(32)] + [
        f"v.global.blk.{i}.attn_v.weight" for i in range(8)]
    plan = TypePlan.for_tensors("Q4_K_M", vision + text)
    assert (plan.n_ffn_down, plan.n_attn_v) == (16, 0)
    got = [plan.type_of(f"blk.{i}.ffn_down.weight", (4096, 14336), "F16") for i in range(16)]
    assert got == ["Q6_K" if use_more_bits(i, 16) else "Q4_K" for i in range(16)]


def test_layers_are_counted_in_layer_order_not_file_order() -> None:
    names = [f"blk.{i}.ffn_down.weight" for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9, 11, 12,
                                                    13, 14, 15)]
    plan = TypePlan.for_tensors("Q4_K_M", names)
    got = [plan.type_of(f"blk.{i}.ffn_down.weight", (4096, 14336), "F16") for i in range(16)]
    assert got == ["Q6_K" if use_more_bits(i, 16) else "Q4_K" for i in range(16)]


def test_unknown_type_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"IQ2_XS is not available for Llama 3\.2 Vision"):
        TypePlan.for_tensors("IQ2_XS", [])


def test_use_more_bits_matches_llama_cpp_for_32_layers() -> None:
    # llama.cpp (llama-quant.cpp): i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2
    assert [i for i in range(32) if use_more_bits(i, 32)] == [
        0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


# --- quantizing through ggml ---------------------------------------------------------------


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).tobytes()))
            for t in reader.tensors}


def _metadata(path: Path) -> dict[str, object]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {name: (f.types, f.contents())
            for name, f in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.mark.parametrize("ftype", ["Q4_K_M", "Q3_K_M", "Q8_0"])
def test_ggml_path_writes_the_bytes_llama_cpp_writes(f16_llama: Path, ftype: str,
                                                      tmp_path: Path) -> None:
    # The quantizer is written for mllama files but nothing in it is mllama's own: on a plain
    # Llama, every tensor must come out byte for byte as llama-quantize writes it.
    from llmkit.engines.mllama.quantize import stage_quantized
    from llmkit.quantize import quantize

    theirs = tmp_path / "theirs.gguf"
    quantize(f16_llama, ftype, theirs, threads=1, verify=False)
    # Two threads, each quantizing a run of every block's rows: the same bytes.
    ours = stage_quantized(f16_llama, tmp_path / "ours.gguf", ftype, threads=2)
    a, b = _tensors(ours), _tensors(theirs)
    assert sorted(a) == sorted(b)  # llama.cpp writes them in its own order
    for name in a:
        assert a[name][0] == b[name][0], name
        assert a[name][1] == b[name][1], name
    key = "general.quantization_version"
    assert _metadata(ours)[key] == _metadata(theirs)[key]


@pytest.fixture(scope="module")
def mllama_f16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.mllama_model import build_model, convert_tiny, require_oracle

    require_oracle()
    return convert_tiny(build_model(seed=3), tmp_path_factory.mktemp("mllama"))["f16"]


def test_mllama_text_weights_are_quantized_and_the_rest_kept(mllama_f16: Path,
                                                              tmp_path: Path) -> None:
    from llmkit.engines.mllama.hparams import read_mllama
    from llmkit.quantize import quantize

    out = tmp_path / "q.gguf"
    result = quantize(mllama_f16, "q4_k_m", out, verify=False)
    assert result.type == "Q4_K_M" and out.exists() and result.size_out < result.size_in
    before, after = _tensors(mllama_f16), _tensors(out)
    assert list(before) == list(after)
    for name, (qtype, data) in after.items():
        if name.startswith(("v.", "mm.")) or qtype == "F32":
            assert (qtype, data) == before[name], name
    # The tiny model's rows (64 wide) take llama.cpp's fallbacks: Q5_0 for Q4_K, Q8_0 for Q6_K.
    assert after["blk.0.attn_q.weight"][0] == "Q5_0"
    assert after["blk.1.cross_attn_q.weight"][0] == "Q5_0"
    assert after["output.weight"][0] == "Q8_0"
    meta_before, meta_after = _metadata(mllama_f16), _metadata(out)
    changed = {k for k in meta_before.keys() | meta_after.keys()
               if meta_before.get(k) != meta_after.get(k)}
    # llama-quantize sets the quantization version on every file it writes; so does llmkit.
    assert changed == {"general.file_type", "general.quantization_version"}
    assert meta_after["general.quantization_version"][1] == 2
    read_mllama(out)  # the result is a complete, checked mllama file


def test_an_already_quantized_source_is_refused(tmp_path: Path, mllama_f16: Path) -> None:
    from llmkit.convert import convert
    from llmkit.errors import QuantizeError
    from llmkit.quantize import quantize

    ckpt = mllama_f16.parent / "tiny-checkpoint"
    q8 = tmp_path / "q8.gguf"
    convert(ckpt, q8, outtype="q8_0")
    with pytest.raises(QuantizeError, match="already"):
        quantize(q8, "Q4_K_M", tmp_path / "q4.gguf", verify=False)
    assert not (tmp_path / "q4.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name not in ("q8.gguf",)]


def test_imatrix_is_refused_for_mllama(tmp_path: Path, mllama_f16: Path) -> None:
    from llmkit.quantize import quantize

    imatrix = tmp_path / "imatrix.gguf"
    imatrix.write_bytes(mllama_f16.read_bytes()[:64])
    with pytest.raises(UsageError, match="imatrix is not supported"):
        quantize(mllama_f16, "Q4_K_M", tmp_path / "q.gguf", imatrix=imatrix, verify=False)
