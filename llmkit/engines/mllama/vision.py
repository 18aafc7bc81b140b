"""The Llama 3.2 Vision tower and projector as one ggml graph (Meta's intermediate states)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from llmkit.engines.mllama._ggml import GgmlType
from llmkit.errors import UsageError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from llmkit.engines.mllama._backend import Expected, Graph, Runner
    from llmkit.engines.mllama._ggml import Ctx, T
    from llmkit.engines.mllama.hparams import VisionParams
    from llmkit.engines.mllama.preprocess import TiledImage

__all__ = ["INPUT_ASPECT", "INPUT_MASK", "INPUT_PATCHES", "PRE_POST_LN_EPS", "TensorSource",
           "VisionInputs", "attention_mask", "build", "encode", "expected_tensors", "patches",
           "set_inputs", "tensor_shapes", "vision_inputs"]

# Names of the graph inputs ``build`` makes (``Graph.set`` refills a prepared graph by them).
INPUT_PATCHES = "v.in.patches"
INPUT_ASPECT = "v.in.aspect_id"
INPUT_MASK = "v.in.mask"

# layernorm_pre and layernorm_post are nn.LayerNorm(hidden_size) with torch's default eps, not
# config.norm_eps (transformers 5.24 modeling_mllama.py, MllamaVisionModel.__init__); only the
# layers' own norms use vision.attention.layer_norm_epsilon. (The published models have 1e-5
# for both, so the two cannot be told apart there.)
PRE_POST_LN_EPS = 1e-5


class TensorSource(Protocol):
    """Where ``build`` finds the model's tensors by GGUF name (``Weights``, or a dict)."""

    def __getitem__(self, name: str, /) -> T: ...


@dataclass(frozen=True)
class VisionInputs:
    """One tiled image as the graph's inputs, prepared in numpy."""

    patches: npt.NDArray[np.float32]
    """[max_tiles, n_patches - 1, 3·P·P]: each 14×14 patch flattened (channel, row, col)."""
    aspect_ratio_id: int
    """1-based id of the tile grid (row of the tile embedding tables)."""
    mask: npt.NDArray[np.float16]
    """[S, S], S = max_tiles·n_padded: -inf where query and key are both padding, else 0."""


def _check_tiles(tiled: TiledImage, vp: VisionParams) -> None:
    want = (vp.max_tiles, vp.channels, vp.image_size, vp.image_size)
    if tuple(tiled.pixels.shape) != want:
        raise UsageError(f"the image was tiled as {list(tiled.pixels.shape)}, but this model "
                         f"takes tiles {list(want)}",
                         hint="tile it with the model's tile size and tile count")
    if not 1 <= tiled.aspect_ratio_id <= len(vp.aspect_ratios):
        raise UsageError(f"aspect-ratio id {tiled.aspect_ratio_id} is not one of this model's "
                         f"1..{len(vp.aspect_ratios)}",
                         hint="tile it with the model's tile count")
    if len(tiled.tile_mask) != vp.max_tiles:
        raise UsageError(f"the tile mask has {len(tiled.tile_mask)} entries, not "
                         f"{vp.max_tiles}", hint="tile it with the model's tile count")


def patches(tiled: TiledImage, vp: VisionParams) -> npt.NDArray[np.float32]:
    """The patch convolution's input rows: every tile cut into P×P patches, each flattened.

    The 14×14, stride-14 convolution without bias (transformers 5.24 modeling_mllama.py,
    ``MllamaVisionModel.patch_embedding``) is then one matrix product with the weight seen as
    [C, 3·P·P]: each row here is in the weight's (channel, row, column) order and the patches
    follow row by row, as the convolution's output is flattened. Padding tiles (all zeros)
    are kept: the tower runs on all ``max_tiles`` tiles.

    Args:
        tiled: from :func:`llmkit.engines.mllama.preprocess.tile_image`.
        vp: the model's vision parameters.

    Returns:
        float32 [max_tiles, n_patches - 1, 3·P·P].

    Raises:
        UsageError: tiles of another size, count or aspect-ratio id than the model's.
    """
    import numpy as np

    _check_tiles(tiled, vp)
    p, side, ch = vp.patch_size, vp.image_size // vp.patch_size, vp.channels
    tiles = np.asarray(tiled.pixels, dtype=np.float32)
    # [T, ch, side·p, side·p] → [T, ch, row, ky, col, kx] → [T, row, col, ch, ky, kx]
    grid = tiles.reshape(vp.max_tiles, ch, side, p, side, p).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(grid.reshape(vp.max_tiles, side * side, ch * p * p))


def attention_mask(tile_mask: tuple[int, ...] | list[int], vp: VisionParams,
                   ) -> npt.NDArray[np.float16]:
    """The vision layers' attention mask over all ``max_tiles·n_padded`` tokens.

    A token is padding when it is one of a tile's slots past ``n_patches`` or any token of a
    padding tile. Only (padding query, padding key) pairs are masked: real tokens see padded
    ones and padded ones see real ones (transformers 5.24 ``_prepare_aspect_ratio_attention_mask``,
    an outer product of the padding indicator; Meta's encoder_utils.py
    ``build_encoder_attention_mask`` likewise). No row is fully masked while tile 0 is real.
    F16 holds 0 and -inf exactly, at half the memory of F32 (flash attention needs F16).

    Args:
        tile_mask: 1 for each real tile, 0 for padding tiles (``TiledImage.tile_mask``).
        vp: the model's vision parameters.

    Returns:
        float16 [S, S], 0 or -inf; rows are queries, columns keys.
    """
    import numpy as np

    pad = np.ones((vp.max_tiles, vp.n_padded), dtype=bool)
    for tile, real in enumerate(tile_mask):
        if real:
            pad[tile, :vp.n_patches] = False
    flat = pad.reshape(-1)
    mask = np.zeros((flat.size, flat.size), dtype=np.float16)
    mask[np.ix_(flat, flat)] = -np.inf
    return mask


def vision_inputs(tiled: TiledImage, vp: VisionParams) -> VisionInputs:
    """Everything :func:`build` needs from one tiled image.

    Args:
        tiled: from ``tile_image``.
        vp: the model's vision parameters.

    Returns:
        The patch rows, the aspect-ratio id and the attention mask.

    Raises:
        UsageError: tiles of another size, count or aspect-ratio id than the model's.
    """
    return VisionInputs(patches=patches(tiled, vp), aspect_ratio_id=tiled.aspect_ratio_id,
                        mask=attention_mask(tiled.tile_mask, vp))


def tensor_shapes(vp: VisionParams, n_text_embd: int) -> dict[str, tuple[int, ...]]:
    """Every tensor the vision graph reads, with its numpy-order shape (the GGUF layout).

    Args:
        vp: the model's vision parameters.
        n_text_embd: the text model's width (the projector's output).

    Returns:
        GGUF name → shape, for ``Weights(expected=…)``.
    """
    c, f, p, t = vp.n_embd, vp.n_ff, vp.patch_size, vp.max_tiles
    rows, n1 = len(vp.aspect_ratios) + 1, vp.n_patches
    shapes: dict[str, tuple[int, ...]] = {
        "v.patch_embd.weight": (c, vp.channels, p, p),
        "v.class_embd": (c,),
        "v.position_embd.weight": (n1, c),
        "v.position_embd.gate": (1,),
        "v.tile_position_embd.weight": (rows, t * n1 * c),
        "v.pre_tile_position_embd.weight": (rows, t * c),
        "v.pre_tile_position_embd.gate": (1,),
        "v.post_tile_position_embd.weight": (rows, t * c),
        "v.post_tile_position_embd.gate": (1,),
        "v.pre_ln.weight": (c,), "v.pre_ln.bias": (c,),
        "v.post_ln.weight": (c,), "v.post_ln.bias": (c,),
        "mm.0.weight": (n_text_embd, vp.output_dim),
        "mm.0.bias": (n_text_embd,),
    }
    for prefix, count in (("v.blk.", vp.n_layer), ("v.global.blk.", vp.n_global)):
        for i in range(count):
            b = f"{prefix}{i}."
            for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
                shapes[b + name + ".weight"] = (c, c)
            for name in ("attn_norm", "ffn_norm"):
                shapes[b + name + ".weight"] = (c,)
                shapes[b + name + ".bias"] = (c,)
            shapes[b + "ffn_up.weight"], shapes[b + "ffn_up.bias"] = (f, c), (f,)
            shapes[b + "ffn_down.weight"], shapes[b + "ffn_down.bias"] = (c, f), (c,)
            if prefix == "v.global.blk.":
                shapes[b + "attn_gate"] = (1,)
                shapes[b + "ffn_gate"] = (1,)
    return shapes


def expected_tensors(vp: VisionParams, n_text_embd: int) -> dict[str, Expected]:
    """:func:`tensor_shapes` with the types the graph takes, for ``Weights(expected=…)``.

    Matrices (the convolution, the layers' projections, the projector) are F32 or F16, as
    ``llmkit convert`` writes them and its quantizer keeps them; embedding tables, norms,
    biases and gates are F32.

    Args:
        vp: the model's vision parameters.
        n_text_embd: the text model's width.

    Returns:
        GGUF name → :class:`~llmkit.engines.mllama._backend.Expected`.
    """
    from llmkit.engines.mllama._backend import Expected

    matrices = frozenset({GgmlType.F32, GgmlType.F16})
    f32 = frozenset({GgmlType.F32})
    tables = ("v.position_embd.weight", "v.tile_position_embd.weight",
              "v.pre_tile_position_embd.weight", "v.post_tile_position_embd.weight")
    return {name: Expected(shape, matrices if len(shape) > 1 and name not in tables else f32)
            for name, shape in tensor_shapes(vp, n_text_embd).items()}


def set_inputs(graph: Graph, inputs: VisionInputs) -> None:
    """Give a prepared graph holding :func:`build` another image.

    Every image has the same shapes (all ``max_tiles`` tiles, any grid), so one prepared
    graph serves them all: only the patches, the aspect-ratio id and the mask change.

    Args:
        graph: from ``Runner.prepare`` with a build that called :func:`build` once.
        inputs: from :func:`vision_inputs` for the same model.

    Raises:
        ValueError: the graph is stale, or the inputs are another model's shapes.
    """
    import numpy as np

    graph.set(INPUT_PATCHES, inputs.patches)
    graph.set(INPUT_ASPECT, np.array([inputs.aspect_ratio_id], dtype=np.int32))
    graph.set(INPUT_MASK, inputs.mask)


# ---------------------------------------------------------------------------------------------
# The graph (ggml ne order throughout: ne[0] = channels, innermost)


def _layer_norm(c: Ctx, x: T, w: TensorSource, name: str, eps: float) -> T:
    return c.add(c.mul(c.norm(x, eps), w[name + ".weight"]), w[name + ".bias"])


def _attention(c: Ctx, x: T, w: TensorSource, b: str, vp: VisionParams, mask: T,
               flash_attn: bool) -> T:
    """Multi-head self-attention without biases (MllamaVisionAttention), x ne [C, S]."""
    n_tok = x.ne[1]
    heads = vp.n_head
    head_dim = vp.n_embd // heads
    scale = 1.0 / math.sqrt(head_dim)

    def heads_first(name: str) -> T:
        # [C, S] → [head_dim, heads, S] → view [head_dim, S, heads]
        return c.permute(c.reshape(c.mul_mat(w[name], x), head_dim, heads, n_tok), 0, 2, 1, 3)

    q, k = heads_first(b + "attn_q.weight"), heads_first(b + "attn_k.weight")
    if flash_attn:
        v = heads_first(b + "attn_v.weight")
        out = c.flash_attn_ext(q, k, v, mask, scale)  # ne [head_dim, heads, S]
        merged = c.reshape(out, vp.n_embd, n_tok)
    else:
        v_rows = c.reshape(c.mul_mat(w[b + "attn_v.weight"], x), head_dim, heads, n_tok)
        v_t = c.cont(c.permute(v_rows, 1, 2, 0, 3))  # ne [S, head_dim, heads]
        scores = c.mul_mat(k, q, prec_f32=True)  # ne [S_kv, S_q, heads]
        probs = c.soft_max_ext(scores, mask, scale)
        out = c.mul_mat(v_t, probs)  # ne [head_dim, S_q, heads]
        merged = c.cont(c.permute(out, 0, 2, 1, 3), vp.n_embd, n_tok)
    return c.mul_mat(w[b + "attn_output.weight"], merged)


def _mlp(c: Ctx, x: T, w: TensorSource, b: str) -> T:
    """fc1 (bias) → exact erf GELU → fc2 (bias) (MllamaVisionMLP, hidden_act "gelu")."""
    h = c.gelu_erf(c.add(c.mul_mat(w[b + "ffn_up.weight"], x), w[b + "ffn_up.bias"]))
    return c.add(c.mul_mat(w[b + "ffn_down.weight"], h), w[b + "ffn_down.bias"])


def _encoder_layer(c: Ctx, x: T, w: TensorSource, b: str, vp: VisionParams, mask: T,
                   gated: bool, flash_attn: bool) -> T:
    """MllamaVisionEncoderLayer: pre-norm attention and MLP, tanh-gated in the global layers."""
    attn = _attention(c, _layer_norm(c, x, w, b + "attn_norm", vp.eps), w, b, vp, mask,
                      flash_attn)
    if gated:
        attn = c.mul(attn, c.tanh(w[b + "attn_gate"]))
    x = c.add(x, attn)
    mlp = _mlp(c, _layer_norm(c, x, w, b + "ffn_norm", vp.eps), w, b)
    if gated:
        mlp = c.mul(mlp, c.tanh(w[b + "ffn_gate"]))
    return c.add(x, mlp)


def _tile_rows(c: Ctx, table: T, aspect: T, *ne: int) -> T:
    """The aspect-ratio id's row of an embedding table, reshaped to ``ne``."""
    return c.reshape(c.get_rows(table, aspect), *ne)


def build(ctx: Ctx, w: TensorSource, vp: VisionParams, inputs: VisionInputs, *,
          flash_attn: bool = False) -> T:
    """Add the vision tower and the projector for one image to a graph being built.

    Follows transformers 5.24 ``MllamaVisionModel.forward`` and ``MllamaModel``'s projector,
    with Meta's intermediate states (the INPUTS of the layers ``intermediate_layers_indices``,
    llama-models ``ImageTransformer.forward``). Gates are read raw from the file and tanh is a
    graph op. The graph inputs are named :data:`INPUT_PATCHES`, :data:`INPUT_ASPECT` and
    :data:`INPUT_MASK`.

    Args:
        ctx: the graph's context (reusable inside a bigger graph: only inputs and ops are
            added, nothing is expanded).
        w: the model's tensors by GGUF name (``Weights``).
        vp: the model's vision parameters.
        inputs: from :func:`vision_inputs`.
        flash_attn: attention with ggml's fused ``flash_attn_ext`` instead of
            ``mul_mat`` + ``soft_max_ext``; it never holds the heads × S × S scores. Both
            equal transformers within 3e-6 on the tiny model (F32 K/V on the CPU). At the
            published size (S = 6432, 16 heads) the CPU compute buffer is 533 MiB with it
            and 2964 MiB without (the scores alone are 16·6432²·4 bytes), and one layer
            took 19 s with it against 35 s without on 2 shared cores.

    Returns:
        F32 ne [n_text_embd, max_tiles·n_patches] (numpy [tokens, n_text_embd]): tile-major,
        each tile's class token first then its patches row by row; padding tiles included.

    Raises:
        ValueError: tensors or inputs whose shapes do not fit ``vp`` (from the graph layer).
    """
    import numpy as np

    c, e = ctx, vp.n_embd
    tiles, n1, n_pad = vp.max_tiles, vp.n_patches, vp.n_padded
    n_tok = tiles * n_pad
    x = c.input(inputs.patches, name=INPUT_PATCHES)  # ne [3·P·P, N, T]
    aspect = c.input(np.array([inputs.aspect_ratio_id], dtype=np.int32), name=INPUT_ASPECT)
    mask = c.input(inputs.mask, name=INPUT_MASK)  # ne [S_kv, S_q] F16

    # Patch embedding: the conv weight [C, 3, P, P] seen as [C, 3·P·P] (ne [3·P·P, C]).
    conv = w["v.patch_embd.weight"]
    x = c.mul_mat(c.reshape(conv, conv.ne[0] * conv.ne[1] * conv.ne[2], e), x)  # [C, N, T]
    # Pre-tile embedding, patch tokens only: + tanh(g)·pre_tile[id] (one vector per tile).
    pre = _tile_rows(c, w["v.pre_tile_position_embd.weight"], aspect, e, 1, tiles)
    x = c.add(x, c.mul(pre, c.tanh(w["v.pre_tile_position_embd.gate"])))
    # The class token first in every tile.
    cls = c.repeat(c.reshape(w["v.class_embd"], e, 1, 1), c.new(GgmlType.F32, e, 1, tiles))
    x = c.concat(cls, x, 1)  # [C, N+1, T]
    # + (1 - tanh g)·pos + tanh(g)·tile_pos[id]
    gate = c.tanh(w["v.position_embd.gate"])
    pos = w["v.position_embd.weight"]  # [C, N+1]
    x = c.add(x, c.sub(pos, c.mul(pos, gate)))
    tile_pos = _tile_rows(c, w["v.tile_position_embd.weight"], aspect, e, n1, tiles)
    x = c.add(x, c.mul(tile_pos, gate))
    x = _layer_norm(c, x, w, "v.pre_ln", PRE_POST_LN_EPS)
    # Zero slots after each tile's tokens up to a multiple of 8; then all tiles as one sequence.
    x = c.reshape(c.pad(x, 0, n_pad - n1), e, n_tok)

    intermediates: dict[int, T] = {}
    for i in range(vp.n_layer):
        if i in vp.intermediate:
            intermediates[i] = x  # Meta: the layer's input, not its output
        x = _encoder_layer(c, x, w, f"v.blk.{i}.", vp, mask, False, flash_attn)
    x = _layer_norm(c, x, w, "v.post_ln", PRE_POST_LN_EPS)
    post = _tile_rows(c, w["v.post_tile_position_embd.weight"], aspect, e, 1, tiles)
    x = c.add(c.reshape(x, e, n_pad, tiles),
              c.mul(post, c.tanh(w["v.post_tile_position_embd.gate"])))
    x = c.reshape(x, e, n_tok)
    for i in range(vp.n_global):
        x = _encoder_layer(c, x, w, f"v.global.blk.{i}.", vp, mask, True, flash_attn)

    # [final | intermediates stacked on a last axis and flattened]: channel c of state k at
    # c·K + k (torch.stack(..., dim=-1) then reshape in MllamaVisionModel.forward).
    if vp.intermediate:
        stacked = c.reshape(intermediates[vp.intermediate[0]], e, n_tok, 1)
        for i in vp.intermediate[1:]:
            stacked = c.concat(stacked, c.reshape(intermediates[i], e, n_tok, 1), 2)
        k = len(vp.intermediate)
        interleaved = c.cont(c.permute(stacked, 1, 2, 0, 3), k * e, n_tok)  # ne [K, C, S]
        x = c.concat(x, interleaved, 0)
    # The projector on every slot, then the padded slots dropped (the same rows either way).
    proj = c.add(c.mul_mat(w["mm.0.weight"], x), w["mm.0.bias"])  # [D, S]
    d = proj.ne[0]
    row = d * 4
    kept = c.view(proj, (d, n1, tiles), (row, row * n_pad))
    return c.cont(kept, d, tiles * n1)


def encode(model_weights: TensorSource, vp: VisionParams, tiled: TiledImage, runner: Runner,
           *, flash_attn: bool = False) -> npt.NDArray[np.float32]:
    """Run the vision tower and the projector on one image.

    Args:
        model_weights: the model's tensors by GGUF name (``Weights``).
        vp: the model's vision parameters.
        tiled: from ``tile_image``.
        runner: computes the graph (its timings say where the time went).
        flash_attn: as for :func:`build`.

    Returns:
        float32 [max_tiles·n_patches, n_text_embd]: the cross-attention states the text model
        attends to (tile-major, class token first in each tile).

    Raises:
        UsageError: tiles that do not fit the model.
        ComputeError: ggml could not allocate or compute the graph.
    """
    inputs = vision_inputs(tiled, vp)

    def graph(ctx: Ctx) -> list[T]:
        return [build(ctx, model_weights, vp, inputs, flash_attn=flash_attn)]

    (out,) = runner.run(graph)
    result: npt.NDArray[np.float32] = out
    return result
