"""MllamaForConditionalGeneration (Llama 3.2 Vision) → one GGUF: text, vision tower, projector."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.convert.llama import MAX_LAYERS, llama3_rope_factors
from llmkit.convert.safetensors import MappedFiles, TensorRef
from llmkit.convert.writer import PlannedTensor, file_type, tensor_type
from llmkit.errors import ConvertError
from llmkit.io import parse_json

ARCH = "mllama"
# Marks the layout docs/MLLAMA_GGUF.md describes (Hugging Face weights untouched: no RoPE row
# permutation, raw gates, 4-D patch convolution); Ollama's blobs lack it.
WEIGHT_LAYOUT = "hf"


@dataclass(frozen=True)
class KeyLayout:
    """Where a transformers version puts each part of the model in the checkpoint."""

    name: str
    text: str  # prefix of the text model's tensors (embed_tokens, layers.N., norm)
    lm_head: str  # the output projection's full name
    vision: str
    projector: str


# transformers 4.x (the published checkpoints) and what 5.x `save_pretrained` writes
# (transformers 5.24 modeling_mllama.py: MllamaForConditionalGeneration holds `model`, an
# MllamaModel with language_model / vision_model / multi_modal_projector, and `lm_head`).
LAYOUTS = (
    KeyLayout("transformers 4", "language_model.model.", "language_model.lm_head.weight",
              "vision_model.", "multi_modal_projector."),
    KeyLayout("transformers 5", "model.language_model.", "lm_head.weight",
              "model.vision_model.", "model.multi_modal_projector."),
)

# MllamaTextConfig / MllamaVisionConfig defaults (transformers 5.24 configuration_mllama.py),
# which transformers fills in for a field config.json leaves out.
TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 4096, "hidden_act": "silu", "num_hidden_layers": 40,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
    "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
    "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38],
}
DEFAULT_ROPE_THETA = 500000.0  # MllamaTextConfig.default_theta
DEFAULT_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1280, "hidden_act": "gelu", "num_hidden_layers": 32, "num_global_layers": 8,
    "attention_heads": 16, "num_channels": 3, "intermediate_size": 5120,
    "vision_output_dim": 7680, "image_size": 448, "patch_size": 14, "norm_eps": 1e-5,
    "max_num_tiles": 4, "intermediate_layers_indices": [3, 7, 15, 23, 30],
}
DEFAULT_IMAGE_TOKEN = 128256  # MllamaConfig.image_token_index
# transformers' MllamaTextModel has vocab_size + 8 embedding rows (modeling_mllama.py).
EXTRA_EMBEDDING_ROWS = 8
# MllamaImageProcessor's class defaults (transformers 5.24 image_processing_mllama.py).
PREPROCESSOR_DEFAULTS: dict[str, Any] = {
    "size": {"height": 224, "width": 224}, "max_image_tiles": 4, "image_mean": [0.5] * 3,
    "image_std": [0.5] * 3, "rescale_factor": 1 / 255, "do_rescale": True,
    "do_normalize": True, "do_resize": True, "do_pad": True,
}
# Bounds on the vision side, beyond which a config is surely not a real model (and a tile
# embedding table of T*(N+1)*C floats per row could not be allocated).
MAX_TILES = 64
MAX_IMAGE_SIZE = 1 << 14
_FLOAT_DTYPES = ("F32", "F16", "BF16")
# Per text layer: Hugging Face name (under the text prefix's layers.N.) → GGUF name suffix.
_TEXT_COMMON = (("input_layernorm.weight", "attn_norm.weight"),
                ("post_attention_layernorm.weight", "ffn_norm.weight"),
                ("mlp.gate_proj.weight", "ffn_gate.weight"),
                ("mlp.up_proj.weight", "ffn_up.weight"),
                ("mlp.down_proj.weight", "ffn_down.weight"))
_VISION_LAYER = (("self_attn.q_proj.weight", "attn_q.weight"),
                 ("self_attn.k_proj.weight", "attn_k.weight"),
                 ("self_attn.v_proj.weight", "attn_v.weight"),
                 ("self_attn.o_proj.weight", "attn_output.weight"),
                 ("input_layernorm.weight", "attn_norm.weight"),
                 ("input_layernorm.bias", "attn_norm.bias"),
                 ("post_attention_layernorm.weight", "ffn_norm.weight"),
                 ("post_attention_layernorm.bias", "ffn_norm.bias"),
                 ("mlp.fc1.weight", "ffn_up.weight"), ("mlp.fc1.bias", "ffn_up.bias"),
                 ("mlp.fc2.weight", "ffn_down.weight"), ("mlp.fc2.bias", "ffn_down.bias"))


def supported_aspect_ratios(max_tiles: int) -> list[list[int]]:
    """The (rows, cols) grids of at most ``max_tiles`` tiles in the image processor's order.

    transformers' ``get_all_supported_aspect_ratios`` (image_processing_mllama.py) makes this
    list, and the processor's aspect-ratio id of a grid is its 1-based position in it.
    """
    return [[rows, cols] for rows in range(1, max_tiles + 1)
            for cols in range(1, max_tiles + 1) if rows * cols <= max_tiles]


@dataclass(frozen=True)
class _Entry:
    """One output tensor: its GGUF name, source, shape and which type rule it follows."""

    name: str
    source: str  # Hugging Face name
    shape: tuple[int, ...]
    kind: str  # "text": --outtype; "vision": f32/f16 matrix; "f32": always float32


def _whole(where: str, key: str, value: Any, *, low: int = 1, high: int = 1 << 24) -> int:
    """A whole-number setting ``key`` of the file ``where``, within [low, high].

    Raises:
        ConvertError: missing (None), not a whole number, or out of range.
    """
    if value is None:
        raise ConvertError(f"{where} lacks {key}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConvertError(f"{where}: {key} is {value!r:.80}, not a whole number")
    if not low <= value <= high:
        raise ConvertError(f"{where}: {key} is {value}; it must lie in {low}..{high}")
    return value


def _real(where: str, key: str, value: Any, *, positive: bool = True) -> float:
    """A finite real-number setting (positive unless told otherwise).

    Raises:
        ConvertError: missing (None), not a number, NaN or infinite, or not positive.
    """
    if value is None:
        raise ConvertError(f"{where} lacks {key}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConvertError(f"{where}: {key} is {value!r:.80}, not a number")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ConvertError(f"{where}: {key} is {value}; it must be a "
                           f"{'positive' if positive else 'finite'} number")
    return float(value)


def _section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConvertError(f"config.json: {key} is {type(value).__name__}, not an object")
    return value


def _int_list(config: dict[str, Any], key: str, *, low: int, high: int, section: str
              ) -> list[int]:
    value = config[key]
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConvertError(f"config.json: {section}{key} is {value!r:.80}, not a list of "
                           "whole numbers")
    bad = [v for v in value if not low <= v <= high]
    if bad:
        raise ConvertError(f"config.json: {section}{key} holds {bad[0]}; its entries must lie "
                           f"in {low}..{high}")
    return list(value)


def _square(config: dict[str, Any], key: str) -> int:
    """image_size / patch_size given as transformers 5 also allows: a [height, width] pair.

    Raises:
        ConvertError: not a square pair of whole numbers.
    """
    value = list(config[key])
    if len(value) != 2 or value[0] != value[1]:
        raise ConvertError(f"config.json: vision_config.{key} is {value!r:.80}; only square "
                           "sizes are supported")
    return _whole("config.json", f"vision_config.{key}", value[0], high=MAX_IMAGE_SIZE)


def rope_settings(text: dict[str, Any]) -> dict[str, Any]:
    """The text model's RoPE as transformers standardizes it: rope_type, rope_theta, and for
    llama3 its factors.

    Published configs give ``rope_scaling`` and ``rope_theta``; transformers 5 writes
    ``rope_parameters`` with rope_theta inside. As in transformers 5.24
    (modeling_rope_utils.py convert_rope_params_to_dict / standardize_rope_params),
    rope_scaling wins over rope_parameters, rope_theta defaults to the model's 500000, and
    original_max_position_embeddings to max_position_embeddings.

    Raises:
        ConvertError: a RoPE type the engine cannot run, or a missing or bad factor.
    """
    scaling = text.get("rope_scaling") or text.get("rope_parameters") or {}
    if not isinstance(scaling, dict):
        raise ConvertError(f"config.json: text_config's RoPE settings are {scaling!r:.80}, not "
                           "an object")
    rope = dict(scaling)
    rope.setdefault("rope_theta", text.get("rope_theta", DEFAULT_ROPE_THETA))
    rope_type = str(rope.get("rope_type", rope.get("type", "default"))).lower()
    rope["rope_type"] = rope_type
    rope["rope_theta"] = _real("config.json", "text_config's rope_theta", rope["rope_theta"])
    if rope_type == "default":
        return rope
    if rope_type != "llama3":
        raise ConvertError(f"config.json: RoPE type {rope_type!r} is not supported",
                           hint="Llama 3.2 Vision uses 'llama3' scaling (or none)")
    rope.setdefault("original_max_position_embeddings", text["max_position_embeddings"])
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if rope.get(key) is None:
            raise ConvertError(f"config.json: llama3 RoPE scaling lacks {key}")
        rope[key] = _real("config.json", f"text_config's RoPE {key}", rope[key])
    rope["original_max_position_embeddings"] = _whole(
        "config.json", "text_config's RoPE original_max_position_embeddings",
        rope["original_max_position_embeddings"], high=(1 << 31) - 1)
    return rope


class MllamaConverter:
    """Plans the one GGUF of a Llama 3.2 Vision checkpoint: text model, vision tower, projector.

    Every setting the engine trusts is checked here, before anything is written, and every
    tensor's name and shape against them.
    """

    arch = ARCH

    def __init__(self, directory: Path, config: dict[str, Any], tensors: dict[str, TensorRef],
                 files: MappedFiles) -> None:
        """Read and check config.json, preprocessor_config.json and the tensor inventory.

        Args:
            directory: the checkpoint directory.
            config: its config.json.
            tensors: every tensor of its safetensors files.
            files: the shared memory maps the rows are read through.

        Raises:
            ConvertError: a setting out of range or inconsistent, a missing or broken
                preprocessor_config.json, a tokenizer without ``<|image|>`` at the image
                token id, or a tensor missing, unexpected or of the wrong shape.
        """
        self.directory = directory
        self.files = files
        self._text_settings(config)
        self._vision_settings(config)
        self._image_settings(read_preprocessor(directory))
        self._check_image_token(directory)
        self.layout = detect_layout(tensors)
        self.entries = self._expected()
        self.refs = self._match(tensors)
        self.chat_template = read_chat_template(directory)

    # --- config.json ---------------------------------------------------------------------

    def _text_settings(self, config: dict[str, Any]) -> None:
        text = {**TEXT_DEFAULTS, **_section(config, "text_config")}
        where = "config.json"

        def num(key: str, **kw: Any) -> int:
            return _whole(where, "text_config." + key, text[key], **kw)

        self.n_layer = num("num_hidden_layers", high=MAX_LAYERS)
        self.n_embd = num("hidden_size")
        self.n_head = num("num_attention_heads", high=1 << 16)
        self.n_head_kv = num("num_key_value_heads", high=self.n_head)
        self.n_ff = num("intermediate_size")
        self.n_vocab = num("vocab_size", high=(1 << 31) - 1 - EXTRA_EMBEDDING_ROWS)
        self.n_ctx = num("max_position_embeddings", high=(1 << 31) - 1)
        if self.n_head % self.n_head_kv:
            raise ConvertError(f"{where}: text_config.num_key_value_heads ({self.n_head_kv}) "
                               f"does not divide num_attention_heads ({self.n_head})")
        if self.n_embd % self.n_head:
            raise ConvertError(f"{where}: text_config.hidden_size ({self.n_embd}) does not "
                               f"divide into {self.n_head} attention heads")
        self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise ConvertError(f"{where}: the text model's head size is {self.head_dim}; "
                               "RoPE needs an even one")
        self.rms_eps = _real(where, "text_config.rms_norm_eps", text["rms_norm_eps"])
        if text["hidden_act"] != "silu":
            raise ConvertError(f"{where}: text_config.hidden_act is {text['hidden_act']!r}; "
                               "the Llama 3.2 Vision text model uses 'silu'")
        if text.get("tie_word_embeddings"):
            raise ConvertError(f"{where}: text_config.tie_word_embeddings is set, but a Llama "
                               "3.2 Vision model has its own output projection")
        if text["cross_attention_layers"] is None:
            text["cross_attention_layers"] = TEXT_DEFAULTS["cross_attention_layers"]
        cross = _int_list(text, "cross_attention_layers", low=0, high=self.n_layer - 1,
                          section="text_config.")
        if len(set(cross)) != len(cross):
            raise ConvertError(f"{where}: text_config.cross_attention_layers lists a layer "
                               "twice")
        self.cross_layers = sorted(cross)
        self.rope = rope_settings(text)
        self.rope_theta = float(self.rope["rope_theta"])
        factors = llama3_rope_factors({"rope_scaling": self.rope}, self.head_dim)
        # Without llama3 scaling the factors are all 1 (ggml's rope_ext then rotates as plain
        # RoPE), so the engine has one code path and the tensor is always there.
        self.rope_factors = factors or [1.0] * (self.head_dim // 2)
        token = config.get("image_token_index", config.get("image_token_id",
                                                            DEFAULT_IMAGE_TOKEN))
        # The image token has an embedding row (one of the 8 past the logits) but no logit.
        self.image_token = _whole(where, "image_token_index", token, low=0,
                                  high=self.n_vocab + EXTRA_EMBEDDING_ROWS - 1)

    def _vision_settings(self, config: dict[str, Any]) -> None:
        given = _section(config, "vision_config")
        vision = {**VISION_DEFAULTS, **given}
        if "attention_heads" not in given and "num_attention_heads" in given:
            # MllamaVisionConfig's attribute_map: num_attention_heads is attention_heads.
            vision["attention_heads"] = given["num_attention_heads"]
        where = "config.json"

        def num(key: str, **kw: Any) -> int:
            return _whole(where, "vision_config." + key, vision[key], **kw)

        self.v_embd = num("hidden_size")
        self.v_head = num("attention_heads", high=1 << 16)
        self.v_ff = num("intermediate_size")
        self.v_layer = num("num_hidden_layers", high=MAX_LAYERS)
        self.v_global = num("num_global_layers", high=MAX_LAYERS)
        self.v_channels = num("num_channels")
        self.max_tiles = num("max_num_tiles", high=MAX_TILES)
        self.v_output = num("vision_output_dim")
        self.image_size = num("image_size", high=MAX_IMAGE_SIZE) if not isinstance(
            vision["image_size"], (list, tuple)) else _square(vision, "image_size")
        self.patch_size = num("patch_size", high=MAX_IMAGE_SIZE) if not isinstance(
            vision["patch_size"], (list, tuple)) else _square(vision, "patch_size")
        self.v_eps = _real(where, "vision_config.norm_eps", vision["norm_eps"])
        if self.v_embd % self.v_head:
            raise ConvertError(f"{where}: vision_config.hidden_size ({self.v_embd}) does not "
                               f"divide into {self.v_head} attention heads")
        if self.image_size % self.patch_size:
            raise ConvertError(f"{where}: vision_config.image_size {self.image_size} is not a "
                               f"multiple of patch_size {self.patch_size}")
        if self.v_channels != 3:
            raise ConvertError(f"{where}: vision_config.num_channels is {self.v_channels}; "
                               "images are fed as RGB")
        if vision["hidden_act"] != "gelu":
            # The engine runs the exact (erf) GELU of Meta's and transformers' encoder.
            raise ConvertError(f"{where}: vision_config.hidden_act is "
                               f"{vision['hidden_act']!r}; the Llama 3.2 Vision encoder uses "
                               "'gelu'")
        if vision["intermediate_layers_indices"] is None:
            vision["intermediate_layers_indices"] = VISION_DEFAULTS["intermediate_layers_indices"]
        self.intermediate = _int_list(vision, "intermediate_layers_indices", low=0,
                                      high=self.v_layer - 1, section="vision_config.")
        # The encoder's output: the final state and one per intermediate layer, concatenated.
        expected_output = self.v_embd * (len(self.intermediate) + 1)
        if self.v_output != expected_output:
            raise ConvertError(f"{where}: vision_config.vision_output_dim is {self.v_output}, "
                               f"but hidden_size × (intermediate layers + 1) is "
                               f"{expected_output}")
        ratios = vision.get("supported_aspect_ratios")
        ratios = DEFAULT_ASPECT_RATIOS if ratios is None else ratios
        # The image processor numbers the grids itself from max_image_tiles (its
        # get_all_supported_aspect_ratios); a model trained on another list would get the
        # wrong tile embeddings. transformers' own config refuses the default list with
        # max_num_tiles other than 4 for the same reason.
        computed = supported_aspect_ratios(self.max_tiles)
        if not isinstance(ratios, list) or [
                list(r) if isinstance(r, (list, tuple)) else r for r in ratios] != computed:
            raise ConvertError(f"{where}: vision_config.supported_aspect_ratios "
                               f"{ratios!r:.120} are not the {len(computed)} grids the image "
                               f"processor numbers for max_num_tiles {self.max_tiles}")
        self.aspect_ratios = computed
        self.n_patches = (self.image_size // self.patch_size) ** 2

    # --- preprocessor_config.json, tokenizer --------------------------------------------

    def _image_settings(self, pre: dict[str, Any]) -> None:
        p = {**PREPROCESSOR_DEFAULTS, **pre}
        where = "preprocessor_config.json"
        size = p["size"]
        if not (isinstance(size, dict) and "height" in size and "width" in size):
            raise ConvertError(f"{where}: size is {size!r:.80}; it must give the tile's height "
                               "and width")
        tile = _whole(where, "size.height", size["height"], high=MAX_IMAGE_SIZE)
        if size["width"] != tile:
            raise ConvertError(f"{where}: the tile is {size['width']!r}×{tile}; Llama 3.2 "
                               "Vision tiles are square")
        if tile != self.image_size:
            raise ConvertError(f"{where}: the tile size {tile} is not the vision encoder's "
                               f"image_size {self.image_size}",
                               hint="the preprocessor settings belong to another model")
        tiles = _whole(where, "max_image_tiles", p["max_image_tiles"], high=MAX_TILES)
        if tiles != self.max_tiles:
            raise ConvertError(f"{where}: max_image_tiles is {tiles}, but the vision "
                               f"encoder's max_num_tiles is {self.max_tiles}")
        for flag in ("do_resize", "do_pad", "do_rescale"):
            if p[flag] is not True:
                # transformers refuses do_resize/do_pad false; pixels scaled otherwise than
                # by 1/255 are not what the engine's preprocessing gives.
                raise ConvertError(f"{where}: {flag} is {p[flag]!r}; llmkit prepares images "
                                   "only as the published Llama 3.2 Vision processor does")
        rescale = _real(where, "rescale_factor", p["rescale_factor"])
        if abs(rescale * 255 - 1) > 1e-6:
            raise ConvertError(f"{where}: rescale_factor is {rescale}; llmkit scales pixels "
                               "by 1/255 as the published processor does")
        self.rescale = rescale
        if p["do_normalize"] is False:
            # Normalization off is normalization by mean 0 and std 1.
            self.image_mean, self.image_std = [0.0] * 3, [1.0] * 3
        else:
            self.image_mean = _triple(p["image_mean"], "image_mean", positive=False)
            self.image_std = _triple(p["image_std"], "image_std", positive=True)

    def _check_image_token(self, directory: Path) -> None:
        """``<|image|>`` must be the image token id in tokenizer.json, where the engine's
        prompts put it (a missing tokenizer.json is the tokenizer step's to report)."""
        path = directory / "tokenizer.json"
        if not path.is_file():
            return
        try:
            tok = parse_json(path.read_text(encoding="utf-8"), strict=False)
        except (OSError, ValueError) as exc:
            raise ConvertError(f"cannot read {path}: {exc}") from None
        added = tok.get("added_tokens") if isinstance(tok, dict) else None
        ids = {t.get("content"): t.get("id") for t in added or [] if isinstance(t, dict)}
        if ids.get("<|image|>") != self.image_token:
            raise ConvertError(f"{path} does not have <|image|> as token {self.image_token}, "
                               "the model's image token",
                               hint="the tokenizer files belong to another model")

    # --- tensors -------------------------------------------------------------------------

    def _expected(self) -> list[_Entry]:
        """Every output tensor in file order, with its source name and shape."""
        lay = self.layout
        d, hd, ff = self.n_embd, self.head_dim, self.n_ff
        q, kv = self.n_head * hd, self.n_head_kv * hd
        t = lay.text
        out = [_Entry("token_embd.weight", t + "embed_tokens.weight",
                      (self.n_vocab + EXTRA_EMBEDDING_ROWS, d), "text")]
        shapes = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
                  "mlp.gate_proj.weight": (ff, d), "mlp.up_proj.weight": (ff, d),
                  "mlp.down_proj.weight": (d, ff)}
        cross = set(self.cross_layers)
        for il in range(self.n_layer):
            src, dst = f"{t}layers.{il}.", f"blk.{il}."
            attn = ("cross_attn", "cross_attn_") if il in cross else ("self_attn", "attn_")
            out.append(_Entry(dst + "attn_norm.weight", src + "input_layernorm.weight", (d,),
                              "text"))
            for hf, gg, shape in (("q_proj", "q", (q, d)), ("k_proj", "k", (kv, d)),
                                  ("v_proj", "v", (kv, d)), ("o_proj", "output", (d, q))):
                out.append(_Entry(f"{dst}{attn[1]}{gg}.weight",
                                  f"{src}{attn[0]}.{hf}.weight", shape, "text"))
            if il in cross:
                out += [_Entry(dst + "cross_attn_q_norm.weight",
                               src + "cross_attn.q_norm.weight", (hd,), "text"),
                        _Entry(dst + "cross_attn_k_norm.weight",
                               src + "cross_attn.k_norm.weight", (hd,), "text"),
                        _Entry(dst + "cross_attn_attn_gate", src + "cross_attn_attn_gate", (1,),
                               "text"),
                        _Entry(dst + "cross_attn_mlp_gate", src + "cross_attn_mlp_gate", (1,),
                               "text")]
            for hf, gg in _TEXT_COMMON[1:]:
                out.append(_Entry(dst + gg, src + hf, shapes[hf], "text"))
        out.append(_Entry("output_norm.weight", t + "norm.weight", (d,), "text"))
        out.append(_Entry("output.weight", lay.lm_head, (self.n_vocab, d), "text"))
        return out + self._expected_vision()

    def _expected_vision(self) -> list[_Entry]:
        v, c, f = self.layout.vision, self.v_embd, self.v_ff
        p, n1, tiles = self.patch_size, self.n_patches + 1, self.max_tiles
        rows = len(self.aspect_ratios) + 1  # id 0: no image
        out = [_Entry("v.patch_embd.weight", v + "patch_embedding.weight",
                      (c, self.v_channels, p, p), "vision"),
               _Entry("v.class_embd", v + "class_embedding", (c,), "f32"),
               _Entry("v.position_embd.weight", v + "gated_positional_embedding.embedding",
                      (n1, c), "f32"),
               _Entry("v.position_embd.gate", v + "gated_positional_embedding.gate", (1,),
                      "f32"),
               _Entry("v.tile_position_embd.weight",
                      v + "gated_positional_embedding.tile_embedding.weight",
                      (rows, tiles * n1 * c), "f32")]
        for side in ("pre", "post"):
            hf = f"{v}{side}_tile_positional_embedding."
            out += [_Entry(f"v.{side}_tile_position_embd.weight", hf + "embedding.weight",
                           (rows, tiles * c), "f32"),
                    _Entry(f"v.{side}_tile_position_embd.gate", hf + "gate", (1,), "f32")]
        for side in ("pre", "post"):
            for part in ("weight", "bias"):
                out.append(_Entry(f"v.{side}_ln.{part}", f"{v}layernorm_{side}.{part}", (c,),
                                  "f32"))
        shapes = {"mlp.fc1.weight": (f, c), "mlp.fc1.bias": (f,), "mlp.fc2.weight": (c, f)}
        for stack, prefix, count in (("transformer", "v.blk.", self.v_layer),
                                     ("global_transformer", "v.global.blk.", self.v_global)):
            for il in range(count):
                src, dst = f"{v}{stack}.layers.{il}.", f"{prefix}{il}."
                for hf, gg in _VISION_LAYER:
                    shape = shapes.get(hf, (c, c) if hf.endswith("proj.weight") else (c,))
                    out.append(_Entry(dst + gg, src + hf, shape,
                                      "vision" if len(shape) > 1 else "f32"))
                if stack == "global_transformer":
                    out += [_Entry(dst + "attn_gate", src + "gate_attn", (1,), "f32"),
                            _Entry(dst + "ffn_gate", src + "gate_ffn", (1,), "f32")]
        mm = self.layout.projector
        out += [_Entry("mm.0.weight", mm + "weight", (self.n_embd, self.v_output), "vision"),
                _Entry("mm.0.bias", mm + "bias", (self.n_embd,), "f32")]
        return out

    def _match(self, tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
        """The checkpoint's tensors by source name, checked against the expected inventory.

        Raises:
            ConvertError: a tensor missing, unexpected, not floating point, or misshapen.
        """
        # A non-persistent buffer some exports carry; the engine recomputes it.
        present = {n: r for n, r in tensors.items() if not n.endswith("rotary_emb.inv_freq")}
        expected = {e.source: e for e in self.entries}
        extra = [n for n in present if n not in expected]
        if extra:
            first = sorted(extra)[0]
            layer = _cross_or_self(first, self.layout, set(self.cross_layers))
            raise ConvertError(f"tensor {first} is not part of a Llama 3.2 Vision model as "
                               f"config.json describes it{layer}",
                               hint="the config and the weights are from different models")
        for entry in self.entries:
            ref = present.get(entry.source)
            if ref is None:
                raise ConvertError(f"the checkpoint lacks the tensor {entry.source}",
                                   hint="the download may be incomplete")
            if ref.dtype not in _FLOAT_DTYPES:
                raise ConvertError(f"tensor {entry.source} is {ref.dtype}; weights are F32, "
                                   "F16 or BF16")
            if tuple(ref.shape) != entry.shape:
                raise ConvertError(f"tensor {entry.source} has shape {list(ref.shape)}, but "
                                   f"config.json implies {list(entry.shape)}",
                                   hint="the config and the weights are from different models")
        return present

    # --- output --------------------------------------------------------------------------

    def metadata(self, writer: Any, outtype: str, name: str) -> None:
        """Add the general, text and vision key/values (docs/MLLAMA_GGUF.md lists them).

        Args:
            writer: the gguf.GGUFWriter of the output.
            outtype: the text weights' type (f32, f16, bf16, q8_0).
            name: the model's name for general.name.
        """
        import gguf

        a = ARCH + "."
        writer.add_type("model")
        writer.add_name(name)
        writer.add_file_type(file_type(outtype))
        if outtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(self.n_ctx)
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.n_layer)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_layer_norm_rms_eps(self.rms_eps)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_vocab_size(self.n_vocab)
        writer.add_array(a + "attention.cross_attention_layers", self.cross_layers)
        writer.add_uint32(a + "image_token_id", self.image_token)
        writer.add_string(a + "llmkit.weight_layout", WEIGHT_LAYOUT)
        v = a + "vision."
        for key, value in (("block_count", self.v_layer), ("global.block_count", self.v_global),
                           ("embedding_length", self.v_embd), ("feed_forward_length", self.v_ff),
                           ("attention.head_count", self.v_head),
                           ("image_size", self.image_size), ("patch_size", self.patch_size),
                           ("max_num_tiles", self.max_tiles),
                           ("num_channels", self.v_channels), ("output_dim", self.v_output)):
            writer.add_uint32(v + key, value)
        writer.add_float32(v + "attention.layer_norm_epsilon", self.v_eps)
        writer.add_array(v + "intermediate_layers_indices", self.intermediate)
        writer.add_array(v + "supported_aspect_ratios",
                         [n for pair in self.aspect_ratios for n in pair])
        writer.add_array(v + "image_mean", self.image_mean)
        writer.add_array(v + "image_std", self.image_std)
        writer.add_float32(v + "rescale_factor", self.rescale)

    def tensors(self, outtype: str) -> list[PlannedTensor]:
        """The output tensors in file order, each streamed from the checkpoint when written.

        Args:
            outtype: the text weights' type; vision matrices are f32 for f32, else f16.

        Returns:
            rope_freqs.weight, then every text, vision and projector tensor.
        """
        import numpy as np
        from gguf import GGMLQuantizationType as T

        factors = np.asarray(self.rope_factors, dtype=np.float32)

        def rope_rows(a: int, b: int) -> Any:
            return factors[a:b]

        planned = [PlannedTensor("rope_freqs.weight", factors.shape, T.F32, rope_rows)]
        for e in self.entries:
            if e.kind == "text":
                qtype = tensor_type(outtype, e.shape, e.name)
            elif e.kind == "vision":
                qtype = T.F32 if outtype == "f32" else T.F16
            else:
                qtype = T.F32
            planned.append(PlannedTensor(e.name, e.shape, qtype,
                                         self.files.reader(self.refs[e.source])))
        return planned


def _triple(value: Any, key: str, *, positive: bool) -> list[float]:
    where = "preprocessor_config.json"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * 3  # transformers broadcasts one number over the channels
    if not (isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value)):
        raise ConvertError(f"{where}: {key} is {value!r:.80}, not three numbers")
    if positive and min(value) <= 0:
        raise ConvertError(f"{where}: {key} is {value!r}; a standard deviation is positive")
    return [float(v) for v in value]


def _cross_or_self(name: str, layout: KeyLayout, cross: set[int]) -> str:
    """Why a text layer tensor is unexpected, when it is one of the other kind of layer."""
    prefix = layout.text + "layers."
    if not name.startswith(prefix):
        return ""
    number = name[len(prefix):].split(".", 1)[0]
    if not number.isdigit():
        return ""
    if ".cross_attn" in name and int(number) not in cross:
        return f" (layer {number} is not in cross_attention_layers)"
    if ".self_attn." in name and int(number) in cross:
        return f" (layer {number} is a cross-attention layer, without self-attention)"
    return ""


def detect_layout(tensors: dict[str, TensorRef]) -> KeyLayout:
    """Which transformers version's key names the checkpoint uses.

    Raises:
        ConvertError: a tensor of neither layout, a mix of both, or no tensors of either.
    """
    counts: dict[str, str] = {}
    for name in sorted(tensors):
        matched = [lay for lay in LAYOUTS
                   if name == lay.lm_head or name.startswith((lay.text, lay.vision,
                                                              lay.projector))]
        if not matched:
            raise ConvertError(f"tensor {name} is not part of a Llama 3.2 Vision checkpoint",
                               hint="its names start with language_model., vision_model. and "
                               "multi_modal_projector. (transformers 5: model.…)")
        counts.setdefault(matched[0].name, name)
    if len(counts) > 1:
        (a, first), (b, second) = sorted(counts.items())
        raise ConvertError(f"the checkpoint mixes key layouts: {first} ({a}) and {second} ({b})",
                           hint="its files come from different exports")
    if not counts:
        raise ConvertError("the checkpoint has no tensors")
    found = next(iter(counts))
    return next(lay for lay in LAYOUTS if lay.name == found)


def read_preprocessor(directory: Path) -> dict[str, Any]:
    """The image processor's settings: preprocessor_config.json, or the image_processor
    section of a transformers 5 processor_config.json.

    Raises:
        ConvertError: neither file, or one that is not a JSON object.
    """
    for file_name, section in (("preprocessor_config.json", None),
                               ("processor_config.json", "image_processor")):
        path = directory / file_name
        if not path.is_file():
            continue
        try:
            data = parse_json(path.read_text(encoding="utf-8"), strict=False)
        except (OSError, ValueError) as exc:
            raise ConvertError(f"cannot read {path}: {exc}",
                               hint="download the file again from the model's repository"
                               ) from None
        if section is not None:
            data = data.get(section) if isinstance(data, dict) else None
            if data is None:
                continue
        if not isinstance(data, dict):
            raise ConvertError(f"{path} is not a JSON object",
                               hint="download the file again from the model's repository")
        kind = data.get("image_processor_type")
        if kind is not None and not str(kind).startswith("Mllama"):
            raise ConvertError(f"{path} describes a {kind}, not Llama 3.2 Vision's "
                               "MllamaImageProcessor")
        return data
    raise ConvertError(f"{directory} has no preprocessor_config.json, which holds the image "
                       "tile size, tile count, mean and standard deviation",
                       hint="download it from the model's repository into the checkpoint "
                       "directory")


def read_chat_template(directory: Path) -> str | None:
    """The chat template of chat_template.jinja or chat_template.json, where transformers
    keeps a processor's template; None leaves it to tokenizer_config.json.

    Raises:
        ConvertError: a template file that cannot be read or holds no template.
    """
    jinja = directory / "chat_template.jinja"
    path = directory / "chat_template.json"
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        if not path.is_file():
            return None
        data = parse_json(path.read_text(encoding="utf-8"), strict=False)
    except (OSError, ValueError) as exc:
        raise ConvertError(f"cannot read {path if path.is_file() else jinja}: {exc}") from None
    template = data.get("chat_template") if isinstance(data, dict) else None
    if not isinstance(template, str):
        raise ConvertError(f"{path} has no chat_template text")
    return template
