"""LlamaForCausalLM (Llama 2/3.x, SmolLM2, Llama Guard 3) → GGUF "llama"."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmkit.convert.safetensors import MappedFiles, TensorRef
from llmkit.convert.writer import PlannedTensor, file_type, tensor_type
from llmkit.errors import ConvertError


def _get(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in config:
            return config[key]
    return default


def llama3_rope_factors(config: dict[str, Any], head_dim: int) -> list[float] | None:
    """Per-frequency scaling factors for "llama3" RoPE scaling, or None without it.

    llama.cpp applies them from a `rope_freqs.weight` tensor; the formula is the one in
    Meta's Llama 3.1 reference code (smooth interpolation between a low- and high-frequency
    band around the original context length). Every step is computed in float32, as Meta's
    code and the Hugging Face implementations do on torch float32 tensors, so the factors
    agree bit for bit with theirs (float64 arithmetic differs in the last bit for the
    frequencies inside the band).
    """
    import numpy as np

    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if str(scaling.get("rope_type", scaling.get("type", ""))).lower() != "llama3":
        return None
    f32 = np.float32
    base = f32(_get(scaling, "rope_theta", default=config.get("rope_theta", 10000.0)))
    factor = f32(scaling.get("factor", 8.0))
    low = f32(scaling.get("low_freq_factor", 1.0))
    high = f32(scaling.get("high_freq_factor", 4.0))
    old_ctx = f32(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / f32(head_dim)
    factors: list[float] = []
    for freq in f32(1.0) / (base ** exponents):
        wavelen = f32(2 * math.pi) / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(float(factor))
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(float(f32(1.0) / ((f32(1.0) - smooth) / factor + smooth)))
    return factors


def qk_row_order(rows: int, n_head: int) -> Any:
    """Row order that turns Hugging Face's q/k projection layout into llama.cpp's.

    HF stores each head's rotary halves as [first half, second half]; llama.cpp's RoPE wants
    them interleaved pairwise, so rows are regrouped per head.
    """
    import numpy as np

    head = rows // n_head
    return np.arange(rows).reshape(n_head, 2, head // 2).swapaxes(1, 2).reshape(rows)


class LlamaConverter:
    """Plans the metadata and tensors of a Llama-architecture checkpoint."""

    arch = "llama"

    def __init__(self, directory: Path, config: dict[str, Any], tensors: dict[str, TensorRef],
                 files: MappedFiles) -> None:
        import gguf

        self.directory = directory
        self.config = config
        self.refs = tensors
        self.files = files
        try:
            self.n_layer = int(config["num_hidden_layers"])
            self.n_embd = int(config["hidden_size"])
            self.n_head = int(config["num_attention_heads"])
            self.n_ff = int(config["intermediate_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConvertError(f"config.json lacks a required field: {exc}") from None
        self.n_head_kv = int(config.get("num_key_value_heads") or self.n_head)
        self.head_dim = int(config.get("head_dim") or self.n_embd // self.n_head)
        self.n_vocab = int(config.get("vocab_size") or 0)
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self.n_layer)

    def metadata(self, writer: Any, outtype: str, name: str) -> None:
        """Add the architecture's key/values."""
        c = self.config
        writer.add_type("model")
        writer.add_name(name)
        writer.add_file_type(file_type(outtype))
        if outtype == "q8_0":
            import gguf

            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(int(c.get("max_position_embeddings", 2048)))
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.n_layer)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-5)))
        theta = c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta"))
        if theta is not None:
            writer.add_rope_freq_base(float(theta))
        scaling = c.get("rope_scaling") or {}
        kind = str(scaling.get("rope_type", scaling.get("type", ""))).lower()
        if kind == "linear" and scaling.get("factor"):
            import gguf

            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(scaling["factor"]))
        if self.n_vocab:
            writer.add_vocab_size(self.n_vocab)

    def _source_rows(self, ref: TensorRef, order: Any | None) -> Any:
        def rows(a: int, b: int) -> Any:
            return self.files.rows(ref, a, b, order)
        return rows

    def tensors(self, outtype: str) -> list[PlannedTensor]:
        """The output tensors in file order, each streamed from the checkpoint when written."""
        import numpy as np

        planned: list[PlannedTensor] = []
        factors = llama3_rope_factors(self.config, self.head_dim)
        if factors is not None:
            values = np.asarray(factors, dtype=np.float32)

            def rope_rows(a: int, b: int) -> Any:
                return values[a:b]

            planned.append(PlannedTensor("rope_freqs.weight", values.shape,
                                         tensor_type(outtype, values.shape, "rope_freqs.weight"),
                                         rope_rows))
        for hf_name, ref in self.refs.items():
            if hf_name.endswith(("rotary_emb.inv_freq", ".attention.masked_bias")):
                continue  # recomputed by llama.cpp
            name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise ConvertError(f"tensor {hf_name} has no llama.cpp counterpart",
                                   hint="the checkpoint may not be a plain Llama model")
            order = None
            if hf_name.endswith("q_proj.weight"):
                order = qk_row_order(ref.shape[0], self.n_head)
            elif hf_name.endswith("k_proj.weight"):
                order = qk_row_order(ref.shape[0], self.n_head_kv)
            planned.append(PlannedTensor(name, ref.shape, tensor_type(outtype, ref.shape, name),
                                         self._source_rows(ref, order)))
        names = {t.name for t in planned}
        if "token_embd.weight" not in names:
            raise ConvertError("the checkpoint has no token embedding (model.embed_tokens)")
        # Tied embeddings: without lm_head.weight llama.cpp reuses token_embd for the output.
        return planned
