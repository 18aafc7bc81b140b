"""The Llama 3.2 Vision text decoder as ggml graphs: self layers, cross layers and their caches."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmkit.engines.mllama._backend import Expected
from llmkit.engines.mllama._ggml import ROPE_TYPE_NEOX, Ctx, GgmlType, T

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from llmkit.engines.mllama.hparams import TextParams

# The self-attention window grows in steps of this many positions, so that consecutive decode
# steps share one graph shape (llama.cpp pads its KV window the same way, to 256): the rows past
# the ones written are masked out.
KV_PAD = 256
# Steps of at most this many tokens (every decode step) cross-attend with two matrix products
# over the image's K/V, longer ones (prompts) with the fused kernel: measured on the 11B's
# widths, the products decode faster (each key is read once for its 4 query heads) and the
# fused kernel prompts faster (and never holds the [image tokens, 4·rows, KV heads] scores).
CROSS_MATMUL_ROWS = 32

# Types a text weight matrix may have: what ggml's CPU matrix product and row lookup take.
MATRIX_TYPES = frozenset({
    GgmlType.F32, GgmlType.F16, GgmlType.BF16, GgmlType.Q4_0, GgmlType.Q4_1, GgmlType.Q5_0,
    GgmlType.Q5_1, GgmlType.Q8_0, GgmlType.Q2_K, GgmlType.Q3_K, GgmlType.Q4_K, GgmlType.Q5_K,
    GgmlType.Q6_K,
})
F32_ONLY = frozenset({GgmlType.F32})

# Names of the graph inputs of one decoder step (Graph.set finds them by these names).
IN_TOKENS, IN_POS, IN_ROWS, IN_MASK, IN_CROSS_ROWS = "tokens", "pos", "kv_rows", "kq_mask", \
    "cross_rows"


def self_layers(tp: TextParams) -> list[int]:
    """The decoder layers with self-attention (every layer not in ``cross_layers``)."""
    cross = set(tp.cross_layers)
    return [i for i in range(tp.n_layer) if i not in cross]


def expected_tensors(tp: TextParams, embedding_rows: int) -> dict[str, Expected]:
    """Every text tensor the graphs read, with its numpy-order shape and the types it may have.

    Args:
        tp: the text hyperparameters.
        embedding_rows: rows of ``token_embd.weight`` as the file has them (the published
            models have 8 more than there are logits; at least ``n_vocab`` and past the image
            token are required).

    Returns:
        name → :class:`Expected` (the shapes of docs/MLLAMA_GGUF.md).
    """
    d, hd, ff = tp.n_embd, tp.head_dim, tp.n_ff
    q, kv = tp.n_head * hd, tp.n_head_kv * hd

    def matrix(*shape: int) -> Expected:
        return Expected(shape, MATRIX_TYPES)

    def vector(n: int) -> Expected:
        return Expected((n,), F32_ONLY)

    want: dict[str, Expected] = {
        "token_embd.weight": matrix(embedding_rows, d),
        "output_norm.weight": vector(d),
        "output.weight": matrix(tp.n_vocab, d),
        "rope_freqs.weight": vector(hd // 2),
    }
    cross = set(tp.cross_layers)
    for i in range(tp.n_layer):
        b = f"blk.{i}."
        want |= {b + "attn_norm.weight": vector(d), b + "ffn_norm.weight": vector(d),
                 b + "ffn_gate.weight": matrix(ff, d), b + "ffn_up.weight": matrix(ff, d),
                 b + "ffn_down.weight": matrix(d, ff)}
        if i in cross:
            want |= {b + "cross_attn_q.weight": matrix(q, d),
                     b + "cross_attn_k.weight": matrix(kv, d),
                     b + "cross_attn_v.weight": matrix(kv, d),
                     b + "cross_attn_output.weight": matrix(d, q),
                     b + "cross_attn_q_norm.weight": vector(hd),
                     b + "cross_attn_k_norm.weight": vector(hd),
                     b + "cross_attn_attn_gate": vector(1), b + "cross_attn_mlp_gate": vector(1)}
        else:
            want |= {b + "attn_q.weight": matrix(q, d), b + "attn_k.weight": matrix(kv, d),
                     b + "attn_v.weight": matrix(kv, d), b + "attn_output.weight": matrix(d, q)}
    return want


def cache_specs(tp: TextParams, n_ctx: int, n_image_max: int, kv_type: int
                ) -> dict[str, tuple[int, tuple[int, ...]]]:
    """The persistent tensors of the caches, for :class:`~._backend.State`.

    Each self layer keeps ``k.L``/``v.L``, ne [head_dim·n_head_kv, n_ctx]: one row per
    position holding every KV head (the layout llama.cpp's KV cache has), written with
    ``set_rows``. Each cross layer keeps ``xk.L``, ne [head_dim·n_head_kv, n_image_max], the
    keys (after k_norm) of one image's tokens, and ``xv.L``, ne [n_image_max,
    head_dim·n_head_kv], their values transposed, as the second of the two matrix products
    of a decode step's cross-attention reads them (written once per image).

    Args:
        tp: the text hyperparameters.
        n_ctx: positions of the self-attention cache.
        n_image_max: vision tokens an image can have (max_tiles · tokens per tile).
        kv_type: GgmlType.F32 or GgmlType.F16.

    Returns:
        name → (ggml type, ne).
    """
    width = tp.head_dim * tp.n_head_kv
    specs: dict[str, tuple[int, tuple[int, ...]]] = {}
    for i in self_layers(tp):
        specs[f"k.{i}"] = (kv_type, (width, n_ctx))
        specs[f"v.{i}"] = (kv_type, (width, n_ctx))
    for i in tp.cross_layers:
        specs[f"xk.{i}"] = (kv_type, (width, n_image_max))
        specs[f"xv.{i}"] = (kv_type, (n_image_max, width))
    return specs


def kv_window(n_past: int, n_tokens: int, n_ctx: int) -> int:
    """Cache positions one step attends over: its last position rounded up to :data:`KV_PAD`
    (at most ``n_ctx``)."""
    end = n_past + n_tokens
    return min(n_ctx, -(-end // KV_PAD) * KV_PAD)


@dataclass(frozen=True)
class StepInputs:
    """The numpy inputs of one decoder step (a prompt batch or one decoded token)."""

    tokens: npt.NDArray[np.int32]
    """[n] token ids."""
    positions: npt.NDArray[np.int32]
    """[n] their positions, n_past…"""
    rows: npt.NDArray[np.int64]
    """[n] the cache rows they are written to (their positions)."""
    mask: npt.NDArray[np.float16]
    """[n, n_kv] 0 where a token may attend to a cache position, -inf where not (causal)."""
    cross_rows: npt.NDArray[np.float32] | None
    """[n, 1] 1 for rows that see the image, 0 for rows before it; None: no row sees one."""

    @property
    def n_tokens(self) -> int:
        """Tokens in the step."""
        return int(self.tokens.shape[0])

    @property
    def n_kv(self) -> int:
        """Cache positions the step attends over."""
        return int(self.mask.shape[1])


def step_inputs(tokens: npt.NDArray[np.int32], n_past: int, n_ctx: int,
                image_from: int | None) -> StepInputs:
    """The inputs of a step that appends ``tokens`` at positions ``n_past``….

    The causal mask is built here, in numpy: token i (position n_past + i) sees the positions
    up to its own. Rows at positions ≥ ``image_from`` attend to the image.

    Args:
        tokens: int32 token ids (at least one).
        n_past: cached positions kept before them.
        n_ctx: the cache's size (n_past + len(tokens) must fit).
        image_from: the position of ``<|image|>``, or None (no row sees an image).

    Returns:
        The step's inputs.
    """
    import numpy as np

    n = int(tokens.shape[0])
    positions = np.arange(n_past, n_past + n, dtype=np.int32)
    n_kv = kv_window(n_past, n, n_ctx)
    allowed = np.arange(n_kv)[None, :] <= positions[:, None]
    mask = np.where(allowed, np.float16(0), np.float16(-np.inf)).astype(np.float16)
    cross: npt.NDArray[np.float32] | None = None
    if image_from is not None and positions[-1] >= image_from:
        cross = (positions >= image_from).astype(np.float32).reshape(n, 1)
    return StepInputs(tokens=tokens, positions=positions, rows=positions.astype(np.int64),
                      mask=mask, cross_rows=cross)


def _rms(c: Ctx, x: T, weight: T, eps: float) -> T:
    # RMSNorm over ne[0], then the learned scale (transformers 5.24 MllamaTextRMSNorm).
    return c.mul(c.rms_norm(x, eps), weight)


def _mlp(c: Ctx, w: Mapping[str, T], b: str, x: T) -> T:
    # down(silu(gate(x)) * up(x)): MllamaTextMLP (transformers 5.24 modeling_mllama.py).
    gate = c.mul_mat(w[b + "ffn_gate.weight"], x)
    up = c.mul_mat(w[b + "ffn_up.weight"], x)
    return c.mul_mat(w[b + "ffn_down.weight"], c.swiglu(gate, up))


def _heads_view(c: Ctx, cache: T, head_dim: int, n_head_kv: int, n: int) -> T:
    """The first ``n`` rows of a cache (ne [hd·kv, rows]) as ne [hd, n, kv] for attention."""
    es = cache.nb[0]
    rows = c.view(cache, (head_dim, n_head_kv, n), (head_dim * es, head_dim * n_head_kv * es))
    return c.permute(rows, 0, 2, 1, 3)


def _self_attention(c: Ctx, w: Mapping[str, T], tp: TextParams, b: str, x: T, layer: int,
                    cache: Mapping[str, T], pos: T, rows: T, mask: T, n: int, n_kv: int) -> T:
    """Llama 3.1 self-attention of ``x`` (normed, ne [D, n]); writes this step's K/V rows."""
    hd, heads, kv = tp.head_dim, tp.n_head, tp.n_head_kv
    freqs = w["rope_freqs.weight"]

    def rope(t: T, n_heads: int) -> T:
        # NEOX-style rotation (halves, Hugging Face's rotate_half) with the llama3 frequency
        # factors: the GGUF keeps the checkpoint's unpermuted rows (docs/MLLAMA_GGUF.md).
        return c.rope_ext(c.reshape(t, hd, n_heads, n), pos, freqs, hd, ROPE_TYPE_NEOX,
                          tp.rope_base)

    q = rope(c.mul_mat(w[b + "attn_q.weight"], x), heads)
    k = rope(c.mul_mat(w[b + "attn_k.weight"], x), kv)
    v = c.mul_mat(w[b + "attn_v.weight"], x)
    k_cache, v_cache = cache[f"k.{layer}"], cache[f"v.{layer}"]
    c.expand(c.set_rows(k_cache, c.reshape(k, hd * kv, n), rows))
    c.expand(c.set_rows(v_cache, v, rows))
    keys = _heads_view(c, k_cache, hd, kv, n_kv)
    values = _heads_view(c, v_cache, hd, kv, n_kv)
    # Query head h reads KV head h // (heads / kv), as transformers' repeat_kv arranges them.
    out = c.flash_attn_ext(c.permute(q, 0, 2, 1, 3), keys, values, mask, hd ** -0.5)
    return c.mul_mat(w[b + "attn_output.weight"], c.reshape(out, hd * heads, n))


def _cross_attention(c: Ctx, w: Mapping[str, T], tp: TextParams, b: str, x: T, layer: int,
                     cache: Mapping[str, T], n: int, n_image: int) -> T:
    """Cross-attention of ``x`` (normed, ne [D, n]) to the kept image's keys and values.

    q = q_norm(Wq·x) per head, no RoPE (transformers 5.24 MllamaTextCrossAttention). Only
    the real tiles' tokens are in the cache view: padding tiles are never attended, which is
    what both references' masks give.
    """
    hd, heads, kv = tp.head_dim, tp.n_head, tp.n_head_kv
    q = c.reshape(c.mul_mat(w[b + "cross_attn_q.weight"], x), hd, heads, n)
    q = _rms(c, q, w[b + "cross_attn_q_norm.weight"], tp.rms_eps)
    keys = _heads_view(c, cache[f"xk.{layer}"], hd, kv, n_image)
    xv = cache[f"xv.{layer}"]
    # Per KV head, its values transposed: ne [n_image, hd, kv].
    values_t = c.view(xv, (n_image, hd, kv), (xv.nb[1], hd * xv.nb[1]))
    group = heads // kv

    def rows(q_rows: T, m: int) -> T:
        # The query heads sharing a KV head become the rows of one product with its keys, so
        # each key is read once per step, not once per query head as the fused kernel reads
        # it (4× fewer reads of the image's K/V with 32 heads over 8).
        qg = c.cont(c.permute(c.reshape(q_rows, hd, group, kv, m), 0, 1, 3, 2))
        scores = c.mul_mat(keys, c.reshape(qg, hd, group * m, kv))    # [n_image, g·m, kv]
        probs = c.soft_max_ext(scores, None, hd ** -0.5)
        out = c.mul_mat(values_t, probs)                                # [hd, g·m, kv]
        out = c.cont(c.permute(c.reshape(out, hd, group, m, kv), 0, 1, 3, 2))
        return c.reshape(out, hd * heads, m)

    if n <= CROSS_MATMUL_ROWS:
        return c.mul_mat(w[b + "cross_attn_output.weight"], rows(q, n))
    # A longer step (a prompt) with the fused kernel, which is faster there and never holds
    # the scores; it takes the values untransposed: one copy of them per step.
    values = c.cont(c.permute(values_t, 1, 0, 2, 3))                    # [hd, n_image, kv]
    out = c.flash_attn_ext(c.permute(q, 0, 2, 1, 3), keys, values, None, hd ** -0.5)
    return c.mul_mat(w[b + "cross_attn_output.weight"], c.reshape(out, hd * heads, n))


def build_step(c: Ctx, w: Mapping[str, T], tp: TextParams, cache: Mapping[str, T],
               step: StepInputs, n_image: int, *, all_logits: bool = False) -> T:
    """The decoder over one step's tokens: writes their K/V into the cache, returns logits.

    Self layers are Llama 3.1's. A cross layer, when some row of the step sees the image
    (``step.cross_rows``), computes h += tanh(attn_gate)·Wo·attention and then h +=
    tanh(mlp_gate)·MLP(rmsnorm(h)), each branch multiplied by the row mask: rows before
    ``<|image|>`` pass unchanged, as Meta's CrossAttentionTransformerBlock zeroes both branches
    for them (llama-models models/llama3/multimodal/model.py). When no row sees an image the
    cross layers are skipped, as both references do without an image.

    Args:
        c: the graph's context.
        w: the model's tensors by GGUF name.
        tp: the text hyperparameters.
        cache: the State tensors of :func:`cache_specs`.
        step: the step's inputs (made graph inputs here, under the IN_* names).
        n_image: vision tokens of the kept image (0: none kept).
        all_logits: return every row's logits instead of the last one's.

    Returns:
        F32 logits, ne [n_vocab, 1] (or [n_vocab, n]).
    """
    n, n_kv = step.n_tokens, step.n_kv
    tokens = c.input(step.tokens, name=IN_TOKENS)
    pos = c.input(step.positions, name=IN_POS)
    rows = c.input(step.rows, name=IN_ROWS)
    mask = c.input(step.mask, name=IN_MASK)
    use_image = n_image > 0 and step.cross_rows is not None
    row_mask = c.input(step.cross_rows, name=IN_CROSS_ROWS) \
        if use_image and step.cross_rows is not None else None
    cross = set(tp.cross_layers)
    h = c.get_rows(w["token_embd.weight"], tokens)
    for i in range(tp.n_layer):
        b = f"blk.{i}."
        if i in cross:
            if row_mask is None:
                continue
            # tanh of the raw gates at run time: the GGUF stores them as the checkpoint does.
            attn = _cross_attention(c, w, tp, b, _rms(c, h, w[b + "attn_norm.weight"],
                                                      tp.rms_eps), i, cache, n, n_image)
            attn = c.mul(c.mul(attn, c.tanh(w[b + "cross_attn_attn_gate"])), row_mask)
            h = c.add(h, attn)
            mlp = _mlp(c, w, b, _rms(c, h, w[b + "ffn_norm.weight"], tp.rms_eps))
            h = c.add(h, c.mul(c.mul(mlp, c.tanh(w[b + "cross_attn_mlp_gate"])), row_mask))
            continue
        attn = _self_attention(c, w, tp, b, _rms(c, h, w[b + "attn_norm.weight"], tp.rms_eps),
                               i, cache, pos, rows, mask, n, n_kv)
        h = c.add(h, attn)
        h = c.add(h, _mlp(c, w, b, _rms(c, h, w[b + "ffn_norm.weight"], tp.rms_eps)))
    if not all_logits and n > 1:
        # Only the last row's logits are read: the head runs on that row alone.
        h = c.view(h, (tp.n_embd, 1), (h.nb[1],), (n - 1) * h.nb[1])
    h = _rms(c, h, w["output_norm.weight"], tp.rms_eps)
    return c.mul_mat(w["output.weight"], h)


def build_cross_kv(c: Ctx, w: Mapping[str, T], tp: TextParams, cache: Mapping[str, T],
                   image: T, n_image: int) -> list[T]:
    """Each cross layer's keys (after k_norm) and values of the image, copied into the cache.

    Computed once per image: k = k_norm(Wk·img) per head, v = Wv·img (transformers 5.24
    MllamaTextCrossAttention; no RoPE). Only the first ``n_image`` tokens (the real tiles)
    are projected and kept.

    Args:
        c: the graph's context.
        w: the model's tensors by GGUF name.
        tp: the text hyperparameters.
        cache: the State tensors of :func:`cache_specs`.
        image: the projector's output, ne [n_embd, ≥ n_image] (tiles in order, real first).
        n_image: tokens to keep (num_tiles · tokens per tile).

    Returns:
        No outputs: the copies are expanded into the graph, and reading 2·n_image·hd·kv
        values per cross layer back to the host would only cost time.

    Raises:
        ValueError: image states of another width, or fewer than ``n_image`` tokens.
    """
    hd, kv = tp.head_dim, tp.n_head_kv
    if image.ne[0] != tp.n_embd or image.ne[1] < n_image:
        raise ValueError(f"image states {image.ne} do not give {n_image} tokens of "
                         f"{tp.n_embd} values")
    states = c.view(image, (tp.n_embd, n_image), (image.nb[1],), 0)
    for i in tp.cross_layers:
        b = f"blk.{i}."
        k = c.reshape(c.mul_mat(w[b + "cross_attn_k.weight"], states), hd, kv, n_image)
        k = _rms(c, k, w[b + "cross_attn_k_norm.weight"], tp.rms_eps)
        v = c.transpose(c.mul_mat(w[b + "cross_attn_v.weight"], states))  # ne [n_image, hd·kv]
        xk, xv = cache[f"xk.{i}"], cache[f"xv.{i}"]
        c.expand(c.cpy(c.reshape(k, hd * kv, n_image),
                       c.view(xk, (hd * kv, n_image), (xk.nb[1],), 0)))
        c.expand(c.cpy(v, c.view(xv, (n_image, hd * kv), (xv.nb[1],), 0)))
    return []
