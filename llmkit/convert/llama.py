"""LlamaForCausalLM (Llama 2/3.x, SmolLM2, Llama Guard 3) → GGUF "llama"."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from llmkit.convert.safetensors import MappedFiles, TensorRef
from llmkit.convert.writer import PlannedTensor, file_type, tensor_type
from llmkit.errors import ConvertError

# llama.cpp loads at most this many layers (LLAMA_MAX_LAYERS); more would only be refused later.
MAX_LAYERS = 512
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def config_int(config: dict[str, Any], key: str, *, low: int = 1, high: int = 1 << 24,
               default: int | None = None) -> int:
    """A whole-number setting of config.json, within [low, high].

    Raises:
        ConvertError: missing (and no default), not a whole number, or out of range.
    """
    value = config.get(key)
    if value is None:
        if default is None:
            raise ConvertError(f"config.json lacks {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConvertError(f"config.json: {key} is {value!r}, not a whole number")
    if value < low:
        raise ConvertError(f"config.json: {key} is {value}; it must be at least {low}")
    if value > high:
        raise ConvertError(f"config.json: {key} is {value}; it can be at most {high}")
    return value


def config_float(config: dict[str, Any], key: str, *, default: float | None = None,
                 positive: bool = True, section: str = "") -> float | None:
    """A real-number setting of config.json: finite, and positive unless told otherwise.

    Raises:
        ConvertError: not a number, NaN or infinite, or not positive.
    """
    value = config.get(key)
    if value is None:
        return default
    key = section + key
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConvertError(f"config.json: {key} is {value!r}, not a number")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ConvertError(f"config.json: {key} is {value}; it must be a "
                           f"{'positive' if positive else 'finite'} number")
    return float(value)


def layers_present(tensors: dict[str, TensorRef]) -> set[int]:
    """The layer numbers N of the ``model.layers.N.`` tensors a checkpoint holds."""
    return {int(m.group(1)) for name in tensors if (m := _LAYER.match(name))}


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
    settings = {"rope_theta": _get(scaling, "rope_theta", default=config.get("rope_theta",
                                                                          10000.0)),
                "factor": scaling.get("factor", 8.0),
                "low_freq_factor": scaling.get("low_freq_factor", 1.0),
                "high_freq_factor": scaling.get("high_freq_factor", 4.0),
                "original_max_position_embeddings": scaling.get(
                    "original_max_position_embeddings", 8192)}
    for key in settings:
        config_float(settings, key, section="rope_scaling.")
    if settings["low_freq_factor"] >= settings["high_freq_factor"]:
        raise ConvertError("config.json: rope_scaling's low_freq_factor must be below its "
                           "high_freq_factor (llama3 RoPE interpolates between them)")
    base = f32(settings["rope_theta"])
    factor = f32(settings["factor"])
    low = f32(settings["low_freq_factor"])
    high = f32(settings["high_freq_factor"])
    old_ctx = f32(settings["original_max_position_embeddings"])
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
    # The chat template to write; None keeps the one the tokenizer files give.
    chat_template: str | None = None

    def __init__(self, directory: Path, config: dict[str, Any], tensors: dict[str, TensorRef],
                 files: MappedFiles) -> None:
        import gguf

        self.directory = directory
        self.config = config
        self.refs = tensors
        self.files = files
        self._check_config(config)
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, self.n_layer)

    def _check_config(self, config: dict[str, Any]) -> None:
        """Read the hyperparameters and check them against each other and the weights.

        Done before anything is planned: a config.json claiming 100000 layers must fail at
        once, not after building a tensor-name map for all of them.
        """
        self.n_layer = config_int(config, "num_hidden_layers", high=MAX_LAYERS)
        self.n_embd = config_int(config, "hidden_size")
        self.n_head = config_int(config, "num_attention_heads", high=1 << 16)
        self.n_ff = config_int(config, "intermediate_size")
        self.n_head_kv = config_int(config, "num_key_value_heads", high=self.n_head,
                                    default=self.n_head)
        if self.n_head % self.n_head_kv:
            raise ConvertError(f"config.json: num_key_value_heads ({self.n_head_kv}) does not "
                               f"divide num_attention_heads ({self.n_head})")
        if config.get("head_dim") is None and self.n_embd % self.n_head:
            raise ConvertError(f"config.json: hidden_size ({self.n_embd}) does not divide "
                               f"into {self.n_head} attention heads",
                               hint="a head_dim setting is needed for such a model")
        self.head_dim = config_int(config, "head_dim", default=self.n_embd // self.n_head)
        if self.head_dim % 2:
            raise ConvertError(f"config.json: head_dim is {self.head_dim}; RoPE needs an even "
                               "head size")
        self.n_vocab = config_int(config, "vocab_size", low=0, high=(1 << 31) - 1, default=0)
        config_int(config, "max_position_embeddings", default=2048)
        config_float(config, "rms_norm_eps")
        config_float(config, "rope_theta")
        present = layers_present(self.refs)
        if present != set(range(self.n_layer)):
            holds = (f"{len(present)} (model.layers.0 to model.layers.{max(present)})"
                     if present and len(present) == max(present) + 1 else
                     f"layers {sorted(present)[:8]}" if present else "none")
            raise ConvertError(f"config.json says num_hidden_layers is {self.n_layer}, but the "
                               f"weights hold {holds}",
                               hint="the config and the weights are from different models")
        q, kv = self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        expected = {"self_attn.q_proj.weight": (q, self.n_embd),
                    "self_attn.k_proj.weight": (kv, self.n_embd),
                    "self_attn.v_proj.weight": (kv, self.n_embd),
                    "self_attn.o_proj.weight": (self.n_embd, q),
                    "mlp.gate_proj.weight": (self.n_ff, self.n_embd),
                    "mlp.up_proj.weight": (self.n_ff, self.n_embd),
                    "mlp.down_proj.weight": (self.n_embd, self.n_ff)}
        for name, ref in self.refs.items():
            part = name.split(".", 3)[-1] if _LAYER.match(name) else None
            shape = expected.get(part) if part else (
                (ref.shape[0], self.n_embd) if name in ("model.embed_tokens.weight",
                                                        "lm_head.weight") else None)
            if shape is not None and tuple(ref.shape) != shape:
                raise ConvertError(f"tensor {name} has shape {list(ref.shape)}, but config.json "
                                   f"implies {list(shape)}",
                                   hint="the config and the weights are from different models")

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
            writer.add_rope_scaling_factor(config_float(scaling, "factor", section="rope_scaling.")
                                         or 1.0)
        if self.n_vocab:
            writer.add_vocab_size(self.n_vocab)

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
                                         self.files.reader(ref, order)))
        names = {t.name for t in planned}
        if "token_embd.weight" not in names:
            raise ConvertError("the checkpoint has no token embedding (model.embed_tokens)")
        # Tied embeddings: without lm_head.weight llama.cpp reuses token_embd for the output.
        return planned
