"""Which type each tensor of a Llama 3.2 Vision GGUF gets when its text weights are quantized."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from llmkit.errors import UsageError

# The file types this quantizer writes, by the name users know from llama-quantize, with the
# type of an ordinary text matrix. Each follows llama.cpp's own choices for the tensors of a
# Llama (llama-quant.cpp, llama_tensor_get_type) as far as they concern the tensors an mllama
# file has; the vision tower and projector are never quantized (Ollama's quantizer keeps them
# too: they are 1.7 GB of 7.9 and their errors reach every text token through the cross
# attention).
BASE_TYPES: dict[str, str] = {
    "Q4_0": "Q4_0", "Q5_0": "Q5_0", "Q8_0": "Q8_0", "Q6_K": "Q6_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "Q3_K_M": "Q3_K",
}
DEFAULT_TYPE = "Q4_K_M"
# Tensors whose names start so are the vision tower and projector; they keep their type.
KEEP_PREFIXES = ("v.", "mm.")
# A K-quant block spans 256 elements of a row; rows of another width take llama.cpp's
# fallback for the type (llama_tensor_get_type, "convert_incompatible_tensor").
_FALLBACK = {"Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, and every
    third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass
class TypePlan:
    """Counts llama.cpp's rules need: how many self-attention V and FFN-down matrices there
    are, and which of them a name is."""

    ftype: str
    n_attn_v: int
    n_ffn_down: int
    _attn_v: dict[str, int] = field(default_factory=dict)
    _ffn_down: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_tensors(cls, ftype: str, names: list[str]) -> TypePlan:
        """The plan for a file holding tensors ``names`` (in file order).

        Raises:
            UsageError: ``ftype`` is not one this quantizer writes.
        """
        key = ftype.upper()
        if key not in BASE_TYPES:
            raise UsageError(f"{ftype} is not available for Llama 3.2 Vision models",
                             hint=f"choose one of {', '.join(BASE_TYPES)}")
        # Layer order, not file order, numbers them, as llama.cpp counts while it walks layers.
        attn_v = sorted((n for n in names if n.endswith(".attn_v.weight")), key=_layer_of)
        ffn_down = sorted((n for n in names if n.endswith(".ffn_down.weight")), key=_layer_of)
        return cls(key, len(attn_v), len(ffn_down),
                   {n: i for i, n in enumerate(attn_v)}, {n: i for i, n in enumerate(ffn_down)})

    def type_of(self, name: str, shape: tuple[int, ...], current: str) -> str:
        """The type tensor ``name`` (numpy-order ``shape``, now of type ``current``) gets.

        One-dimensional tensors (norms, gates, biases), ``rope_freqs``, the vision tower and the
        projector keep their type.
        """
        if (len(shape) < 2 or name.startswith(KEEP_PREFIXES) or name == "rope_freqs.weight"
                or name.endswith("_norm.weight")):
            return current
        chosen = self._rule(name)
        width = shape[-1]
        if chosen.endswith("_K") and width % 256 != 0:
            chosen = _FALLBACK[chosen]
        if width % _block_size(chosen) != 0:
            chosen = "F16"
        return chosen

    def _rule(self, name: str) -> str:
        ftype, base = self.ftype, BASE_TYPES[self.ftype]
        if name == "output.weight":
            # llama.cpp gives the output matrix Q6_K whatever the type, unless it is Q8_0.
            return "Q8_0" if base == "Q8_0" else "Q6_K"
        if name in self._attn_v:
            i, n = self._attn_v[name], self.n_attn_v
            if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                return "Q6_K"
            if ftype == "Q4_K_S" and i < 4:
                return "Q5_K"
            if ftype == "Q3_K_M":
                return "Q5_K" if i < 2 else "Q4_K"
        if name in self._ffn_down:
            i, n = self._ffn_down[name], self.n_ffn_down
            if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
                return "Q6_K"
            if ftype == "Q4_K_S" and i < n // 8:
                return "Q5_K"
            if ftype == "Q3_K_M":
                # llama.cpp keeps Q3_K here only for Falcon.
                return "Q5_K" if i < n // 16 else "Q4_K"
        if ftype == "Q3_K_M" and name.endswith(".attn_output.weight"):
            return "Q4_K"
        return base


def _layer_of(name: str) -> int:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else -1


def _block_size(type_name: str) -> int:
    import gguf

    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][0])


def describe(plan: TypePlan, tensors: list[tuple[str, tuple[int, ...], str]]) -> dict[str, Any]:
    """How many tensors get each type (for a report): {type: count}."""
    counts: dict[str, int] = {}
    for name, shape, current in tensors:
        chosen = plan.type_of(name, shape, current)
        counts[chosen] = counts.get(chosen, 0) + 1
    return dict(sorted(counts.items()))
