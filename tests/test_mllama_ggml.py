"""The ctypes layer over llama-cpp-python's ggml: ABI self-test, every op against numpy, weights."""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import quants

from llmkit.engines.mllama import _backend, _ggml
from llmkit.engines.mllama._backend import Backend, Expected, Runner, State, Weights
from llmkit.engines.mllama._ggml import ROPE_TYPE_NEOX, Ctx, GgmlAbiError, GgmlType
from llmkit.errors import DeviceError, InvalidModelFileError, UsageError

RNG = np.random.default_rng(12)


@pytest.fixture(scope="module")
def backend():
    be = Backend("cpu", threads=2)
    yield be
    be.close()


@pytest.fixture(scope="module")
def runner(backend):
    r = Runner(backend)
    yield r
    r.close()


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The ABI self-test


def test_self_test_passes_on_the_pinned_library():
    loaded = _ggml.lib()
    assert loaded.ggml_version == "0.25.3"
    assert loaded.package_version == _ggml.PINNED_LLAMA_CPP
    # struct ggml_tensor is 336 bytes on 64-bit ggml 0.25.3; the context adds its object header.
    assert ctypes.sizeof(_ggml.Tensor) == 336
    assert loaded.f.ggml_tensor_overhead() == 368


class _MirrorShortOpParams(ctypes.Structure):
    """A release whose op_params are 4 bytes shorter: same size, flags 4 bytes earlier."""

    _fields_ = [(n, ctypes.c_int32 * 15) if n == "op_params" else (n, t)
                for n, t in _ggml.Tensor._fields_]


class _MirrorShortName(ctypes.Structure):
    """The right size, but the name 8 bytes shorter and padding 8 bytes longer."""

    _fields_ = [(n, ctypes.c_char * 56) if n == "name" else
                (n, ctypes.c_char * 16) if n == "padding" else (n, t)
                for n, t in _ggml.Tensor._fields_]


class _MirrorWithoutOp(ctypes.Structure):
    """A release that dropped a field llmkit reads."""

    _fields_ = [(n, t) for n, t in _ggml.Tensor._fields_ if n != "op"]


_REAL_TENSOR = _ggml.Tensor


def _fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ggml, "_state",
                        {"lib": None, "error": None, "log": None, "verbose": False})


@pytest.mark.parametrize("mirror", [_MirrorShortOpParams, _MirrorShortName, _MirrorWithoutOp])
def test_a_wrong_mirror_fails_closed(monkeypatch, mirror):
    _fresh_state(monkeypatch)
    monkeypatch.setattr(_ggml, "Tensor", mirror)
    with pytest.raises(GgmlAbiError) as caught:
        _ggml.lib()
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(
        "the ggml library shipped with llama-cpp-python 0.3.36 has a different ABI than "
        "llmkit's Vision engine was written for (")
    assert caught.value.hint == "reinstall the version llmkit pins: " \
        "pip install 'llama-cpp-python==0.3.36'"
    # Fail closed: the right mirror back in place does not revive the library, nothing runs.
    monkeypatch.setattr(_ggml, "Tensor", _REAL_TENSOR)
    with pytest.raises(GgmlAbiError):
        _ggml.lib()
    with pytest.raises(GgmlAbiError):
        Ctx()
    with pytest.raises(GgmlAbiError):
        Backend("cpu")


def test_a_wrong_object_size_or_type_table_fails(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setattr(_ggml, "GGML_OBJECT_SIZE", 40)
    with pytest.raises(GgmlAbiError, match=r"ggml_tensor_overhead\(\) is 368, the mirrored "
                                           r"struct ggml_tensor implies 376"):
        _ggml.lib()
    _fresh_state(monkeypatch)
    monkeypatch.setattr(_ggml, "GGML_OBJECT_SIZE", 32)
    monkeypatch.setattr(_ggml, "_TYPE_FACTS", ((GgmlType.Q4_K, 256, 144, "q4_K"),
                                               (GgmlType.Q5_K, 256, 144, "q5_K")))
    with pytest.raises(GgmlAbiError, match="type 13 is"):
        _ggml.lib()


def test_a_missing_symbol_fails(monkeypatch):
    _fresh_state(monkeypatch)
    monkeypatch.setitem(_ggml._SIGNATURES, "ggml_no_such_function", (None, []))
    with pytest.raises(GgmlAbiError, match="it does not export ggml_no_such_function"):
        _ggml.lib()


def test_the_library_is_the_one_llama_cpp_loads():
    # Same files, so dlopen hands back the handles libllama.so already pulled in.
    import llama_cpp  # loads libllama, which needs libggml*

    loaded = _ggml.lib()
    assert loaded.directory == Path(llama_cpp.__file__).parent / "lib"
    again = ctypes.CDLL(str(loaded.directory / "libggml-base.so.0"))
    assert again._handle == loaded.handles[0]._handle
    # One copy of ggml in the process: its file is mapped from offset 0 exactly once.
    starts = [line for line in Path("/proc/self/maps").read_text().splitlines()
              if "libggml-base.so" in line and line.split()[2] == "00000000"]
    assert len(starts) == 1, starts


# ---------------------------------------------------------------------------------------------
# Operations against numpy


def test_mul_mat_f32_with_broadcast(runner):
    a, b = randn(7, 32), randn(5, 32)
    a3, b3 = randn(2, 6, 16), randn(4, 3, 16)  # a's 2 matrices serve b's 4 (GQA-style)

    def build(c):
        x = c.mul_mat(c.input(a), c.input(b))
        y = c.mul_mat(c.input(a3), c.input(b3))
        return [x, y]

    x, y = runner.run(build)
    assert x.shape == (5, 7)
    np.testing.assert_allclose(x, b @ a.T, rtol=1e-5, atol=1e-5)
    want = np.stack([b3[i] @ a3[i // 2].T for i in range(4)])
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_mul_mat_f16_weight(runner):
    a, b = randn(9, 64), randn(4, 64)
    a16 = a.astype(np.float16)
    (got,) = runner.run(lambda c: [c.mul_mat(c.input(a16), c.input(b))])
    # The CPU rounds the activations to F16 too (F16's vec_dot type): about 1e-3 per product,
    # so 1e-2 over 64 terms of unit variance.
    want = b.astype(np.float16).astype(np.float32) @ a16.astype(np.float32).T
    np.testing.assert_allclose(got, want, atol=1e-2)
    assert np.abs(got - b @ a.T).max() < 3e-2


@pytest.mark.parametrize(("gtype", "qtype", "k", "tolerance"), [
    (GgmlType.Q8_0, gguf.GGMLQuantizationType.Q8_0, 64, 0.01),
    (GgmlType.Q4_K, gguf.GGMLQuantizationType.Q4_K, 256, 0.01),
    (GgmlType.Q6_K, gguf.GGMLQuantizationType.Q6_K, 256, 0.01),
])
def test_mul_mat_quantized_weight(runner, gtype, qtype, k, tolerance):
    a, b = randn(8, k), randn(3, k)
    raw = _ggml.quantize(gtype, a)
    (got,) = runner.run(lambda c: [c.mul_mat(c.input_bytes(gtype, (k, 8), raw), c.input(b))])
    # gguf-py's numpy dequantizer is the independent oracle for the weights; the CPU also
    # quantizes the activations (to Q8_0/Q8_K), so the product is within 1% of its scale.
    weights = quants.dequantize(raw, qtype)
    want = b @ weights.T
    scale = np.abs(want).max()
    assert np.abs(got - want).max() < tolerance * scale
    assert np.abs(got - b @ a.T).max() < 0.1 * scale


def test_quantize_matches_gguf_py_q8_0():
    a = randn(4, 96)
    assert (_ggml.quantize(GgmlType.Q8_0, a)
            == quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)).all()
    with pytest.raises(ValueError, match="does not split"):
        _ggml.quantize(GgmlType.Q4_K, randn(2, 64))


def _rope_neox(x: np.ndarray, pos: np.ndarray, base: float, factors: np.ndarray) -> np.ndarray:
    """Hugging Face's rotate_half RoPE (modeling_llama.apply_rotary_pos_emb) on (tokens, heads,
    head_dim), with llama3 frequency factors dividing the frequencies as llama.cpp applies them."""
    d = x.shape[-1]
    inv = base ** (-np.arange(0, d, 2, dtype=np.float64) / d) / factors
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos = np.concatenate([np.cos(ang), np.cos(ang)], -1)[:, None, :]
    sin = np.concatenate([np.sin(ang), np.sin(ang)], -1)[:, None, :]
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return (x * cos + rotated * sin).astype(np.float32)


def test_rope_ext_neox_with_freq_factors(runner):
    x = randn(5, 3, 16)  # tokens, heads, head_dim: ne [16, 3, 5]
    pos = np.array([0, 3, 7, 100, 2], dtype=np.int32)
    factors = RNG.uniform(1, 8, 8).astype(np.float32)

    def build(c):
        p = c.input(pos)
        with_factors = c.rope_ext(c.input(x), p, c.input(factors), 16, ROPE_TYPE_NEOX,
                                  500000.0)
        plain = c.rope_ext(c.input(x), p, None, 16, ROPE_TYPE_NEOX, 10000.0)
        return [with_factors, plain]

    got, plain = runner.run(build)
    np.testing.assert_allclose(got, _rope_neox(x, pos, 500000.0, factors), atol=2e-5)
    np.testing.assert_allclose(plain, _rope_neox(x, pos, 10000.0, np.ones(8)), atol=2e-5)
    assert np.abs(got - plain).max() > 0.1  # the factors matter


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_soft_max_ext_with_mask_and_scale(runner):
    a = randn(2, 4, 6)  # heads, rows, n_kv
    mask = randn(4, 6)
    mask[1, 2:] = -np.inf
    mask[3, 0] = -np.inf

    def build(c):
        return [c.soft_max_ext(c.input(a), c.input(mask), 0.3),
                c.soft_max_ext(c.input(a), c.input(mask.astype(np.float16)), 0.3),
                c.soft_max_ext(c.input(a), None, 1.0)]

    got, got16, plain = runner.run(build)
    np.testing.assert_allclose(got, _softmax(a * 0.3 + mask), atol=1e-6)
    np.testing.assert_allclose(got16, _softmax(a * 0.3 + mask.astype(np.float16)), atol=1e-6)
    np.testing.assert_allclose(plain, _softmax(a), atol=1e-6)
    assert (got[:, 1, 2:] == 0).all()
    # A row that sees nothing is NaN here (flash_attn_ext gives zeros): graph code relies on it.
    full = mask.copy()
    full[2] = -np.inf
    (nan_row,) = runner.run(lambda c: [c.soft_max_ext(c.input(a), c.input(full), 1.0)])
    assert np.isnan(nan_row[:, 2]).all() and not np.isnan(np.delete(nan_row, 2, 1)).any()


def _attention(q, k, v, mask, scale):
    """q (H, n_q, D), k/v (H_kv, n_kv, D), mask (n_q, n_kv) → (n_q, H, D)."""
    heads, group = q.shape[0], q.shape[0] // k.shape[0]
    out = []
    for h in range(heads):
        scores = q[h] @ k[h // group].T * scale + mask
        with np.errstate(invalid="ignore"):
            p = _softmax(scores)
        out.append(np.nan_to_num(p) @ v[h // group])
    return np.stack(out, 1)


@pytest.mark.parametrize("kv_type", [np.float16, np.float32])
def test_flash_attn_ext_with_mask_and_gqa(runner, kv_type):
    q, k, v = randn(4, 5, 16), randn(2, 7, 16), randn(2, 7, 16)
    mask = randn(5, 7)
    mask[0, 3:] = -np.inf  # a causal-looking row
    mask[2, :] = -np.inf  # a row that sees nothing (text before the image)
    mask16 = mask.astype(np.float16)

    def build(c):
        return [c.flash_attn_ext(c.input(q), c.input(k.astype(kv_type)),
                                 c.input(v.astype(kv_type)), c.input(mask16), 0.25)]

    (got,) = runner.run(build)
    assert got.shape == (5, 4, 16)  # queries, heads, head_dim: ggml permutes the result
    rounded = [t.astype(kv_type).astype(np.float32) for t in (k, v)]
    want = _attention(q, rounded[0], rounded[1], mask16.astype(np.float32), 0.25)
    # The CPU kernel rounds q to the K type and accumulates V in F16 for F16 caches.
    np.testing.assert_allclose(got, want, atol=3e-3 if kv_type is np.float16 else 1e-5)
    # A row that sees nothing gets zeros, not NaN (Meta zeroes those rows' output anyway).
    assert (got[2] == 0).all()


def test_flash_attn_ext_vision_shaped(runner):
    # The vision tower's shape: head_dim 80, all tokens attend to all, F32 throughout, and
    # Meta's outer-product mask (only pad×pad pairs masked) over an odd token count.
    tokens, heads, d = 131, 4, 80
    q, k, v = randn(heads, tokens, d), randn(heads, tokens, d), randn(heads, tokens, d)
    pad = np.zeros(tokens, dtype=bool)
    pad[100:] = True
    mask = np.where(pad[:, None] & pad[None, :], -np.inf, 0).astype(np.float32)

    def build(c):
        return [c.flash_attn_ext(c.input(q), c.input(k), c.input(v),
                                 c.input(mask.astype(np.float16)), d ** -0.5)]

    (got,) = runner.run(build)
    np.testing.assert_allclose(got, _attention(q, k, v, mask, d ** -0.5), atol=1e-5)


def test_flash_attn_ext_asks_for_f32_accumulation():
    get_prec = _ggml.lib().handles[0].ggml_flash_attn_ext_get_prec
    get_prec.restype, get_prec.argtypes = ctypes.c_int, [ctypes.c_void_p]
    with Ctx() as c:
        q, k = c.new(GgmlType.F32, 16, 5, 4), c.new(GgmlType.F16, 16, 7, 2)
        assert get_prec(c.flash_attn_ext(q, k, k, None, 1.0).ptr) == _ggml.PREC_F32
        assert get_prec(c.flash_attn_ext(q, k, k, None, 1.0, prec_f32=False).ptr) == 0
        w, x = c.new(GgmlType.F16, 16, 4), c.new(GgmlType.F32, 16, 3)
        assert c.mul_mat(w, x, prec_f32=True).struct.op_params[0] == _ggml.PREC_F32


def test_flash_attn_ext_refuses_an_f32_mask():
    with Ctx() as c:
        q, k = c.new(GgmlType.F32, 16, 5, 4), c.new(GgmlType.F16, 16, 7, 2)
        with pytest.raises(ValueError, match="mask"):
            c.flash_attn_ext(q, k, k, c.new(GgmlType.F32, 7, 5), 1.0)


def test_norms_and_activations(runner):
    x = randn(5, 32) * 3 + 1
    grid = np.linspace(-6, 6, 97, dtype=np.float32)
    gate, up = randn(3, 8), randn(3, 8)

    def build(c):
        t = c.input(x)
        g = c.input(grid)
        return [c.norm(t, 1e-5), c.rms_norm(t, 1e-6), c.gelu_erf(g), c.gelu(g), c.silu(g),
                c.tanh(g), c.swiglu(c.input(gate), c.input(up))]

    norm, rms, gelu, gelu_tanh, silu, tanh, swiglu = runner.run(build)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(norm, (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)
    np.testing.assert_allclose(rms, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6),
                               atol=1e-5)
    exact = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in grid])
    np.testing.assert_allclose(gelu, exact, atol=1e-6)
    assert np.abs(gelu_tanh - exact).max() > 1e-4  # the approximation is told apart
    np.testing.assert_allclose(silu, grid / (1 + np.exp(-grid)), atol=1e-6)
    np.testing.assert_allclose(tanh, np.tanh(grid), atol=1e-6)
    np.testing.assert_allclose(swiglu, gate / (1 + np.exp(-gate)) * up, atol=1e-6)


def test_linear_layer_norm_and_weighted_rms_norm(runner):
    x, w, b = randn(3, 2, 16), randn(8, 16), randn(8)  # HF Linear(16, 8) over (3, 2) rows
    gamma, beta = randn(16), randn(16)

    def build(c):
        t = c.input(x)
        return [c.linear(t, c.input(w), c.input(b)), c.linear(t, c.input(w)),
                c.layer_norm(t, c.input(gamma), c.input(beta), 1e-5),
                c.rms_norm(t, 1e-6, c.input(gamma))]

    lin, lin_nobias, ln, rms = runner.run(build)
    np.testing.assert_allclose(lin, x @ w.T + b, atol=1e-5)
    np.testing.assert_allclose(lin_nobias, x @ w.T, atol=1e-5)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(ln, (x - mean) / np.sqrt(var + 1e-5) * gamma + beta, atol=1e-5)
    np.testing.assert_allclose(rms, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * gamma,
                               atol=1e-5)


def test_element_wise_broadcast(runner):
    a, row, col = randn(3, 4, 5), randn(5), randn(4, 1)

    def build(c):
        t = c.input(a)
        return [c.add(t, c.input(row)), c.mul(t, c.input(col)), c.sub(t, c.input(row)),
                c.scale(t, -2.5)]

    added, multiplied, subtracted, scaled = runner.run(build)
    np.testing.assert_allclose(added, a + row, atol=1e-6)
    np.testing.assert_allclose(multiplied, a * col, atol=1e-6)
    np.testing.assert_allclose(subtracted, a - row, atol=1e-6)
    np.testing.assert_allclose(scaled, a * -2.5, atol=1e-6)
    with Ctx() as c, pytest.raises(ValueError, match="broadcast"):
        c.add(c.new(GgmlType.F32, 5, 4), c.new(GgmlType.F32, 3))


def test_get_rows_f32_f16_q8_0(runner):
    table = randn(10, 64)
    idx = np.array([3, 0, 9, 3], dtype=np.int32)
    raw = _ggml.quantize(GgmlType.Q8_0, table)

    def build(c):
        i = c.input(idx)
        return [c.get_rows(c.input(table), i), c.get_rows(c.input(table.astype(np.float16)), i),
                c.get_rows(c.input_bytes(GgmlType.Q8_0, (64, 10), raw), i)]

    f32, f16, q8 = runner.run(build)
    np.testing.assert_array_equal(f32, table[idx])
    np.testing.assert_array_equal(f16, table.astype(np.float16).astype(np.float32)[idx])
    np.testing.assert_allclose(q8, quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)[idx],
                               atol=1e-6)


def test_set_rows_into_a_persistent_cache(backend, runner):
    state = State(backend, {"k": (GgmlType.F16, (8, 10)), "v": (GgmlType.F32, (8, 10))})
    try:
        first = randn(3, 8)
        rows = np.array([2, 5, 7], dtype=np.int64)

        def write(c):
            src = c.input(first)
            c.expand(c.set_rows(state["k"], src, c.input(rows)))
            c.expand(c.cpy(c.scale(src, 2.0), c.view(state["v"], (8, 3), (32,), 32 * 4)))
            return []

        runner.run(write)

        # A bigger, unrelated graph in between reuses (and overwrites) the compute buffer.
        noise = randn(256, 256)
        runner.run(lambda c: [c.mul_mat(c.input(noise), c.input(noise))])

        def read(c):
            return [c.cast(state["k"], GgmlType.F32), c.cont(state["v"])]

        k, v = runner.run(read)
        want = np.zeros((10, 8), dtype=np.float32)
        want[rows] = first.astype(np.float16)
        np.testing.assert_array_equal(k, want)
        np.testing.assert_allclose(v[4:7], first * 2, atol=1e-6)
        assert (v[:4] == 0).all() and (v[7:] == 0).all()

        second = randn(1, 8)
        runner.run(lambda c: [c.expand(c.set_rows(state["k"], c.input(second),
                                                  c.input(np.array([0], dtype=np.int32))))])
        (k,) = runner.run(lambda c: [c.cast(state["k"], GgmlType.F32)])
        want[0] = second.astype(np.float16)
        np.testing.assert_array_equal(k, want)
    finally:
        state.close()


def test_cache_write_then_attention_in_one_graph(backend, runner):
    # The text decoder's step: new K/V rows go into F16 caches (ne [D, n_ctx, H_kv]), then
    # attention reads a view of the first n_kv positions, all in one graph; a later step
    # sees what the earlier wrote.
    d, n_ctx, h_kv, heads = 16, 12, 2, 4
    state = State(backend, {"k": (GgmlType.F16, (d, n_ctx, h_kv)),
                            "v": (GgmlType.F16, (d, n_ctx, h_kv))})
    keys, values = randn(h_kv, n_ctx, d), randn(h_kv, n_ctx, d)
    try:
        def step(start, n_new):
            q = randn(heads, n_new, d)
            n_kv = start + n_new
            mask = np.triu(np.full((n_new, n_kv), -np.inf, dtype=np.float32), start + 1)

            def build(c):
                rows = c.input(np.arange(start, n_kv, dtype=np.int64))
                for name, src in (("k", keys), ("v", values)):
                    new = c.input(np.ascontiguousarray(src[:, start:n_kv]))
                    c.expand(c.set_rows(state[name], new, rows))
                k, v = (c.view(state[n], (d, n_kv, h_kv), (d * 2, d * 2 * n_ctx))
                        for n in ("k", "v"))
                return [c.flash_attn_ext(c.input(q), k, v, c.input(mask.astype(np.float16)),
                                         d ** -0.5)]

            (got,) = runner.run(build)
            k16, v16 = (t[:, :n_kv].astype(np.float16).astype(np.float32)
                        for t in (keys, values))
            want = _attention(q, k16, v16, mask, d ** -0.5)
            np.testing.assert_allclose(got.reshape(want.shape), want, atol=3e-3)

        step(0, 5)  # the prompt
        step(5, 1)  # one decoded token, attending to the cached five
        step(6, 3)
    finally:
        state.close()


def test_concat_pad_views_permute(runner):
    a, b = randn(2, 3, 4), randn(2, 3, 5)
    x = randn(2, 3, 4, 5)

    def build(c):
        ta, tb, tx = c.input(a), c.input(b), c.input(x)
        return [
            c.concat(ta, tb, 0),  # ggml dim 0 = numpy's last axis
            c.concat(ta, ta, 2),
            c.pad(ta, 2, 1),
            c.pad_ext(ta, 1, 0, 0, 2),
            c.cont(c.permute(tx, 1, 0, 2, 3)),
            c.cont(c.permute(tx, 2, 0, 3, 1)),
            c.cont(c.transpose(ta)),
            # x is ne (5, 4, 3, 2) with strides nb (4, 20, 80, 240) bytes.
            c.cont(c.view(tx, (5, 2), (240,), 2 * 20)),  # x[:, 0, 2, :]
            c.cont(c.view(tx, (5, 4, 2), (20, 240), 80)),  # x[:, 1, :, :]
            c.reshape(tx, 20, 6),
            c.cont(c.view(tx, (7,), (), 13 * 4)),  # flat elements 13..19
            c.cont(c.view(tx, (5, 3))),  # dense default strides: x[0, 0, :3, :]
        ]

    cat0, cat2, pad, pad_ext, p1, p2, tr, v2, v3, rs, flat, dense = runner.run(build)
    np.testing.assert_array_equal(flat, x.reshape(-1)[13:20])
    np.testing.assert_array_equal(dense, x[0, 0, :3, :])
    np.testing.assert_array_equal(cat0, np.concatenate([a, b], -1))
    np.testing.assert_array_equal(cat2, np.concatenate([a, a], 0))
    np.testing.assert_array_equal(pad, np.pad(a, ((0, 0), (0, 1), (0, 2))))
    np.testing.assert_array_equal(pad_ext, np.pad(a, ((0, 0), (0, 2), (1, 0))))
    np.testing.assert_array_equal(p1, _ggml_permute(x, (1, 0, 2, 3)))
    np.testing.assert_array_equal(p2, _ggml_permute(x, (2, 0, 3, 1)))
    np.testing.assert_array_equal(tr, np.swapaxes(a, -1, -2))
    np.testing.assert_array_equal(v2, x[:, 0, 2, :])
    np.testing.assert_array_equal(v3, x[:, 1])
    np.testing.assert_array_equal(rs, x.reshape(6, 20))


def _ggml_permute(x: np.ndarray, axes: tuple[int, int, int, int]) -> np.ndarray:
    """numpy's view of ggml_permute on a 4-D array: ggml dim i (numpy axis 3-i) moves to
    position axes[i]."""
    perm = [0] * 4
    for i, target in enumerate(axes):
        perm[3 - target] = 3 - i
    return np.transpose(x, perm)


def test_shape_errors_raise_instead_of_aborting():
    with Ctx() as c:
        a, b = c.new(GgmlType.F32, 8, 3), c.new(GgmlType.F32, 9, 3)
        with pytest.raises(ValueError, match="mul_mat"):
            c.mul_mat(a, b)
        with pytest.raises(ValueError, match="reaches byte"):
            c.view(a, (8, 2), (32,), 64)
        with pytest.raises(ValueError, match="reshape"):
            c.reshape(a, 5, 5)
        with pytest.raises(ValueError, match="not contiguous"):
            c.reshape(c.transpose(a), 24)
        with pytest.raises(ValueError, match="permutation"):
            c.permute(a, 0, 0, 1, 2)
        with pytest.raises(ValueError, match="get_rows"):
            c.get_rows(a, c.new(GgmlType.F32, 2))
        with pytest.raises(ValueError, match="block"):
            c.new(GgmlType.Q8_0, 16)
        with pytest.raises(ValueError, match="at least 1"):
            c.input(np.zeros((0, 4), dtype=np.float32))
        # Layouts the CPU kernels assert on (each would abort the process).
        t = c.transpose(c.new(GgmlType.F32, 8, 16))
        p = c.permute(c.new(GgmlType.F32, 4, 4, 8), 0, 2, 1, 3)
        one = c.new(GgmlType.F32, 1)
        for call in (lambda: c.rms_norm(t, 1e-5), lambda: c.add(t, t), lambda: c.mul(t, one),
                     lambda: c.mul_mat(c.new(GgmlType.F32, 16, 2), t), lambda: c.gelu_erf(t),
                     lambda: c.tanh(t), lambda: c.scale(p, 2.0), lambda: c.swiglu(p, p),
                     lambda: c.soft_max_ext(p, None, 1.0)):
            with pytest.raises(ValueError, match="cont"):
                call()
        # Type pairs without a CPU kernel (each aborted: binary_op "unsupported types",
        # the scheduler's "cur_backend_id != -1", rms_norm's "fatal error").
        f16 = c.new(GgmlType.F16, 16, 8)
        f32 = c.new(GgmlType.F32, 16, 8)
        for call, what in ((lambda: c.add(f32, f16), "types"),
                           (lambda: c.mul_mat(f32, f16), "b must be F32"),
                           (lambda: c.rms_norm(f16, 1e-5), "must be F32"),
                           (lambda: c.soft_max_ext(f16, None, 1.0), "must be F32")):
            with pytest.raises(ValueError, match=what):
                call()
        c.add(f16, f32), c.mul(f16, f16), c.mul_mat(f16, f16)  # these have kernels
        # …and what they take: a permuted view whose rows are packed.
        c.rms_norm(p, 1e-5), c.add(p, p), c.gelu_erf(p)


def test_a_prepared_graph_computes_again_with_new_inputs(backend, runner):
    w = randn(6, 8)
    state = State(backend, {"acc": (GgmlType.F32, (6,))})
    try:
        def build(c):
            x = c.input(np.zeros(8, dtype=np.float32), name="x")
            y = c.mul_mat(c.input(w), x)
            # A cache write and a read of it in one graph: acc += y, in expand order.
            total = c.add(state["acc"], y)
            c.expand(c.cpy(total, state["acc"]))
            return [c.scale(y, 1.0)]

        graph = runner.prepare(build)
        seen = []
        for _ in range(3):
            x = randn(8)
            graph.set("x", x)
            (y,) = graph.compute()
            np.testing.assert_allclose(y, w @ x, atol=1e-5)
            seen.append(y)
        np.testing.assert_allclose(state.read("acc"), np.sum(seen, 0), atol=1e-5)
        assert graph.timings.n_nodes >= 3 and graph.timings.compute_us > 0
        with pytest.raises(ValueError, match=r"upload: float16 \(8,\)"):
            graph.set("x", np.zeros(8, dtype=np.float16))
        runner.run(lambda c: [c.scale(c.input(randn(4)), 2.0)])
        with pytest.raises(ValueError, match="later graph"):
            graph.compute()
        graph.close()
        state.write("acc", np.arange(6, dtype=np.float32))
        np.testing.assert_array_equal(state.read("acc"), np.arange(6))
        state.clear()
        assert (state.read("acc") == 0).all()
        with State(backend, {"c": (GgmlType.I32, (3,))}, on_primary=False) as cpu_state:
            cpu_state.write("c", np.array([1, 2, 3], dtype=np.int32))
            np.testing.assert_array_equal(cpu_state.read("c"), [1, 2, 3])
            assert cpu_state.nbytes >= 12
    finally:
        state.close()


def test_an_op_no_backend_runs_is_refused_before_allocation(runner):
    # mul_mat of an F32 weight with I32 "activations" slips past the Python checks only
    # through a raw call; the scheduler would abort on it.
    def build(c):
        a, b = c.input(randn(4, 8)), c.input(np.zeros((2, 8), dtype=np.int32))
        return [c._t(c._f.ggml_mul_mat(c.ptr, a.ptr, b.ptr))]

    with pytest.raises(ValueError, match=r"no backend of CPU runs MUL_MAT on F32, I32"):
        runner.prepare(build)
    (y,) = runner.run(lambda c: [c.scale(c.input(np.ones(2, dtype=np.float32)), 2.0)])
    np.testing.assert_array_equal(y, [2, 2])


def test_an_overfull_context_raises_instead_of_aborting(backend):
    with Runner(backend, max_tensors=50) as small:
        def build(c):
            x = c.input(randn(4))
            for _ in range(60):
                x = c.scale(x, 1.0)
            return [x]

        with pytest.raises(ValueError, match="more than 50 tensors"):
            small.prepare(build)
        (y,) = small.run(lambda c: [c.scale(c.input(np.ones(4, dtype=np.float32)), 3.0)])
        np.testing.assert_array_equal(y, [3, 3, 3, 3])


def test_ctrl_c_stops_a_long_compute_at_the_next_node(runner):
    big = randn(1024, 1024)

    def heavy(c):
        x = c.input(big)
        for _ in range(60):  # ~130 GFLOP: tens of seconds on two cores
            x = c.scale(c.mul_mat(x, x), 1e-3)
        return [x]

    graph = runner.prepare(heavy)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    start = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        graph.compute()
    assert time.perf_counter() - start < 5
    timer.join()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    graph.close()
    (y,) = runner.run(lambda c: [c.scale(c.input(np.ones(3, dtype=np.float32)), 2.0)])
    np.testing.assert_array_equal(y, [2, 2, 2])


def test_an_input_the_graph_does_not_use_is_skipped(runner):
    def build(c):
        c.input(randn(5), name="unused")
        return [c.scale(c.input(np.ones(2, dtype=np.float32), name="x"), 2.0)]

    with runner.prepare(build) as graph:
        graph.set("unused", randn(5))
        graph.set("x", np.full(2, 3, dtype=np.float32))
        np.testing.assert_array_equal(graph.compute()[0], [6, 6])


def test_threads_setting_is_honored(backend, runner):
    # A custom op reports how many threads ggml's CPU backend runs it on.
    f = _ggml.lib().f
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                     ctypes.c_int, ctypes.c_void_p)
    fn = _ggml.lib().handles[0].ggml_map_custom1
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, callback_type, ctypes.c_int,
                   ctypes.c_void_p]
    seen: list[tuple[int, int]] = []
    callback = callback_type(lambda _dst, _a, ith, nth, _user: seen.append((ith, nth)))
    data = randn(4, 4)

    def build(c):
        return [_ggml.T(fn(c.ptr, c.input(data).ptr, callback, -1, None))]

    try:
        for n in (1, 2):
            backend.set_threads(n)
            seen.clear()
            runner.run(build)
            assert sorted(seen) == [(i, n) for i in range(n)]
    finally:
        backend.set_threads(2)
    assert f.ggml_backend_is_cpu(backend.cpu)
    with pytest.raises(ValueError):
        backend.set_threads(0)


def test_devices_and_a_gpu_asked_of_a_cpu_build():
    found = _backend.devices()
    assert [d.kind for d in found if d.kind == "cpu"] == ["cpu"]
    if _backend.gpu_devices():
        pytest.skip("this build has a GPU backend")
    with pytest.raises(DeviceError, match="no GPU offload"):
        Backend("gpu")
    with pytest.raises(DeviceError, match="no GPU offload"):
        Backend("auto", gpu_layers=4)
    with pytest.raises(UsageError, match="--gpu-layers needs --device gpu or auto"):
        Backend("cpu", gpu_layers=4)
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        Backend("tpu")
    with Backend("auto") as be:
        assert be.kind == "cpu" and be.gpu is None and be.label == "cpu"
        assert not be.offloads_layer(39, 40)


# ---------------------------------------------------------------------------------------------
# Weights from a GGUF


def _write_gguf(path: Path, tensors: dict[str, np.ndarray],
                quantized: dict[str, tuple[np.ndarray, int]] | None = None
                ) -> None:
    writer = gguf.GGUFWriter(str(path), "mllama")
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    for name, (raw, qtype) in (quantized or {}).items():
        # raw is (rows, bytes per row); gguf-py derives the element shape from the type.
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(qtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "small.gguf"
    tensors = {"w.f32": randn(6, 32), "w.f16": randn(5, 32).astype(np.float16),
               "gate": np.array([0.7], dtype=np.float32), "conv": randn(4, 3, 2, 2)}
    q = randn(3, 64)
    _write_gguf(path, tensors, {"w.q8": (_ggml.quantize(GgmlType.Q8_0, q), 8)})
    return path, tensors, q


@pytest.mark.parametrize("copy", [False, True])
def test_weights_compute_from_the_file(backend, runner, small_gguf, copy):
    path, tensors, q = small_gguf
    expected = {"w.f32": (6, 32), "w.f16": Expected((5, 32), frozenset({GgmlType.F16})),
                "gate": (1,), "conv": (4, 3, 2, 2), "w.q8": (3, 64)}
    with Weights(path, backend, expected, offload=(lambda _n: True) if copy else None) as w:
        assert sorted(w) == sorted(expected)
        assert (w.mapped_bytes == 0) == copy and (w.offloaded_bytes == 0) != copy
        assert w["conv"].ne == (2, 2, 3, 4) and w["conv"].shape == (4, 3, 2, 2)
        x, y = randn(2, 32), randn(2, 64)
        got = runner.run(lambda c: [c.mul_mat(w["w.f32"], c.input(x)),
                                    c.mul_mat(w["w.f16"], c.input(x)),
                                    c.mul_mat(w["w.q8"], c.input(y)),
                                    c.scale(w["gate"], 1.0), c.cont(w["conv"])])
    np.testing.assert_allclose(got[0], x @ tensors["w.f32"].T, atol=1e-5)
    np.testing.assert_allclose(got[1], x @ tensors["w.f16"].astype(np.float32).T, atol=3e-2)
    assert np.abs(got[2] - y @ q.T).max() < 0.05 * np.abs(y @ q.T).max()
    np.testing.assert_array_equal(got[3], np.float32([0.7]))
    np.testing.assert_array_equal(got[4], tensors["conv"])


def test_graphs_never_write_into_mapped_weights(backend, small_gguf):
    with Weights(small_gguf[0], backend) as w, Ctx() as c:
        src = c.new(GgmlType.F32, 32, 6)
        with pytest.raises(ValueError, match="model weight"):
            c.cpy(src, w["w.f32"])
        with pytest.raises(ValueError, match="model weight"):
            c.cpy(c.view(src, (32,)), c.view(w["w.f32"], (32,), (), 128))
        with pytest.raises(ValueError, match="model weight"):
            c.set_rows(w["w.f32"], c.new(GgmlType.F32, 32, 1), c.new(GgmlType.I64, 1))


def test_weights_of_the_wrong_shape_or_type_are_refused(backend, small_gguf):
    path = small_gguf[0]
    with pytest.raises(InvalidModelFileError,
                       match=r"tensor w\.f32 has shape \[6, 32\], expected \[32, 6\]"):
        Weights(path, backend, {"w.f32": (32, 6)})
    with pytest.raises(InvalidModelFileError, match=r"tensor conv has shape \[4, 3, 2, 2\]"):
        Weights(path, backend, {"conv": (4, 3, 4)})
    with pytest.raises(InvalidModelFileError, match=r"tensor w\.q8 has ggml type Q8_0, expected "
                                                    r"F32 or F16"):
        Weights(path, backend, {"w.q8": Expected((3, 64), frozenset({0, 1}))})
    with pytest.raises(InvalidModelFileError, match=r"has no tensor v\.patch_embd\.weight"):
        Weights(path, backend, {"v.patch_embd.weight": (1,)})


def test_a_truncated_or_foreign_file_is_refused(backend, small_gguf, tmp_path):
    data = small_gguf[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])
    with pytest.raises(InvalidModelFileError,
                       match=r"cut\.gguf: tensor w\.q8 lies past the end of the file"):
        Weights(cut, backend)
    other = tmp_path / "text.gguf"
    other.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(InvalidModelFileError,
                       match=r"is not a GGUF file ggml can read \(invalid magic characters"):
        Weights(other, backend)


def test_weights_are_mapped_not_copied(backend, runner, tmp_path):
    path = tmp_path / "big.gguf"
    rows = 4096
    _write_gguf(path, {f"blk.{i}.w": np.full((rows, 1024), i + 1, dtype=np.float32)
                       for i in range(4)})  # 4 × 16 MiB
    gc.collect()
    assert path.stat().st_size > 64 << 20
    rss, anon = _rss_kib("VmRSS"), _rss_kib("RssAnon")
    with Weights(path, backend, {f"blk.{i}.w": (rows, 1024) for i in range(4)}) as w:
        assert _rss_kib("VmRSS") - rss < 10 << 10
        ones = np.ones((1, 1024), dtype=np.float32)
        got = runner.run(lambda c: [c.mul_mat(w[f"blk.{i}.w"], c.input(ones)) for i in range(4)])
        # Every weight page was read; none became process memory of its own.
        assert _rss_kib("RssAnon") - anon < 10 << 10
    for i, out in enumerate(got):
        assert out.shape == (rows,) and (out == 1024.0 * (i + 1)).all()


# ---------------------------------------------------------------------------------------------
# Repacked weights (the CPU's extra buffer type, as llama.cpp's default --repack)


def _x86_avx2() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return " avx2" in flags


# ggml-cpu's repack.cpp (ggml_repack_get_optimal_repack_type) gives AVX2 interleaved layouts
# to Q4_0 and Q4_K (and IQ4_NL, MXFP4) with rows a multiple of 8; Q8_0 has them on NEON and
# RISC-V only, Q6_K on NEON only. Other processors choose differently: these tests pin x86.
needs_avx2 = pytest.mark.skipif(not _x86_avx2(), reason="repack layouts asserted for x86 AVX2")


@pytest.fixture(scope="module")
def repack_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("rp") / "repack.gguf"
    a = {name: randn(rows, 512) for name, rows in
         (("blk.0.w_q4_k", 64), ("blk.0.w_q4_0", 64), ("blk.0.w_q8_0", 64),
          ("blk.0.w_q6_k", 64), ("token_embd.weight", 64), ("blk.0.odd_q4_k", 12))}
    types = {"blk.0.w_q4_k": GgmlType.Q4_K, "blk.0.w_q4_0": GgmlType.Q4_0,
             "blk.0.w_q8_0": GgmlType.Q8_0, "blk.0.w_q6_k": GgmlType.Q6_K,
             "token_embd.weight": GgmlType.Q4_K, "blk.0.odd_q4_k": GgmlType.Q4_K}
    raw = {n: (_ggml.quantize(types[n], a[n]), types[n]) for n in a}
    _write_gguf(path, {"blk.0.norm": randn(512), "blk.0.w_f32": randn(64, 512)}, raw)
    return path, raw


def _mul_all(runner, w, names, x):
    return dict(zip(names, runner.run(lambda c: [c.mul_mat(w[n], c.input(x)) for n in names]),
                    strict=True))


@needs_avx2
def test_repacked_weights_multiply_as_the_mapped_ones(backend, runner, repack_gguf):
    path, raw = repack_gguf
    x = randn(5, 512)  # 5 rows: repack.cpp's gemm for 4 of them, its gemv for the fifth
    names = [n for n in raw if n != "token_embd.weight"]
    with Weights(path, backend, repack=False) as w:
        assert w.repacked == {} and w.repacked_bytes == 0
        plain = _mul_all(runner, w, names, x)
        mapped_all = w.mapped_bytes
    with Weights(path, backend) as w:
        # Only matrices with an interleaved layout on this CPU; never the embedding table
        # (get_rows reads it), a 1-D tensor, an F32 matrix or a row count no layout takes.
        assert w.repacked == {"blk.0.w_q4_k": "CPU_REPACK", "blk.0.w_q4_0": "CPU_REPACK"}
        sizes = {n: raw[n][0].nbytes for n in w.repacked}
        assert w.repacked_bytes == sum(sizes.values())
        assert w.mapped_bytes == mapped_all - w.repacked_bytes
        packed = _mul_all(runner, w, names, x)
        (rows,) = runner.run(lambda c: [c.get_rows(w["token_embd.weight"],
                                                   c.input(np.int32([3, 0])))])
    for name in names:
        qtype = gguf.GGMLQuantizationType(int(raw[name][1]))
        want = x @ quants.dequantize(raw[name][0], qtype).T
        scale = np.abs(want).max()
        # Both kernels quantize the activations to Q8_K/Q8_0 the same way; they sum in
        # another order, so the products agree to float rounding, far inside 1e-3.
        assert np.abs(packed[name] - plain[name]).max() < 1e-3 * scale, name
        # gguf-py's dequantizer is the oracle for the weights themselves.
        assert np.abs(packed[name] - want).max() < 0.01 * scale, name
    table = quants.dequantize(raw["token_embd.weight"][0], gguf.GGMLQuantizationType.Q4_K)
    np.testing.assert_allclose(rows, table[[3, 0]], atol=1e-6)


@needs_avx2
def test_a_repacked_weight_is_only_multiplied_whole(backend, runner, repack_gguf):
    with Weights(repack_gguf[0], backend) as w:
        q = w["blk.0.w_q4_k"]
        top = lambda c: c.view(q, (512, 8), (q.nb[1],), 0)  # noqa: E731
        # A view has no buffer when ggml's supports_op looks, so it would run the repacked
        # kernel on interleaved bytes as if they were rows: the runner refuses it.
        with pytest.raises(ValueError, match=r"view of the repacked weight blk\.0\.w_q4_k"):
            runner.run(lambda c: [c.mul_mat(top(c), c.input(randn(2, 512)))])
        # Any other op on the weight itself: ggml's extra buffer type runs only mul_mat.
        with pytest.raises(ValueError, match=r"no backend of CPU runs GET_ROWS on Q4_K, I32"):
            runner.run(lambda c: [c.get_rows(q, c.input(np.int32([1])))])
    with Weights(repack_gguf[0], backend, repack=False) as w:
        q = w["blk.0.w_q4_k"]
        (got,) = runner.run(lambda c: [c.mul_mat(c.view(q, (512, 8), (q.nb[1],), 0),
                                                 c.input(np.ones((1, 512), np.float32)))])
        assert got.shape == (8,)


# Run in a fresh interpreter: in the test process, memory other tests freed can be handed back
# to the system while the weights load, and RssAnon then shrinks (it did on a busy CI run).
_REPACK_RSS_CHILD = """
import gc, json, sys
import numpy as np
from pathlib import Path
from llmkit.engines.mllama._backend import Backend, Runner, Weights

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(field)

backend = Backend("cpu", threads=2)
runner = Runner(backend)
k = int(sys.argv[2])
gc.collect()
anon, file_pages = rss("RssAnon"), rss("RssFile")
with Weights(Path(sys.argv[1]), backend) as w:
    out = {"repacked": len(w.repacked), "mapped_bytes": w.mapped_bytes,
           "repacked_kib": w.repacked_bytes >> 10,
           "grew_anon": rss("RssAnon") - anon, "grew_file": rss("RssFile") - file_pages}
    ones = np.ones((1, k), dtype=np.float32)
    (got,) = runner.run(lambda c: [c.mul_mat(w["blk.3.ffn_up.weight"], c.input(ones))])
np.save(sys.argv[3], got)
print(json.dumps(out))
"""


@needs_avx2
def test_repacking_holds_one_copy_of_the_weights(tmp_path):
    path = tmp_path / "q4k.gguf"
    rows, k = 4096, 4096
    block = _ggml.quantize(GgmlType.Q4_K, randn(8, k))
    # 8-row blocks tiled to 4096 rows: 9 MiB a matrix, 36 MiB in all (one allocation past
    # glibc's largest mmap threshold, so fresh pages, not a reused heap).
    # A norm stays mapped, so the map (and any page of it still resident) stays too.
    _write_gguf(path, {"blk.0.norm": randn(k)},
                {f"blk.{i}.ffn_up.weight": (np.tile(block, (rows // 8, 1)), GgmlType.Q4_K)
                 for i in range(4)})
    proc = subprocess.run([sys.executable, "-c", _REPACK_RSS_CHILD, str(path), str(k),
                           str(tmp_path / "got.npy")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["repacked"] == 4 and m["mapped_bytes"] == 4 * k
    repacked_kib = m["repacked_kib"]
    assert repacked_kib > 32 << 10
    # The repacked copy is process memory; the mapped pages it was read from are
    # released (without that, RssFile grows by as much again).
    assert 0.9 * repacked_kib < m["grew_anon"] < 1.1 * repacked_kib + (4 << 10), m
    assert m["grew_file"] < 0.1 * repacked_kib, m
    got = np.load(tmp_path / "got.npy")
    want = quants.dequantize(block, gguf.GGMLQuantizationType.Q4_K).sum(axis=1)
    assert got.shape == (rows,)
    assert np.abs(got - np.tile(want, rows // 8)).max() < 0.01 * np.abs(want).max()
