"""Idefics3 / SmolVLM → a "llama" GGUF for the text model and a "clip" projector GGUF for mtmd."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llmkit.convert.llama import MAX_LAYERS, LlamaConverter
from llmkit.convert.safetensors import MappedFiles, TensorRef
from llmkit.convert.writer import PlannedTensor
from llmkit.errors import ConvertError
from llmkit.io import parse_json

TEXT_PREFIX = "model.text_model."
VISION_PREFIXES = ("model.vision_model.", "model.connector.")

# transformers' Idefics3VisionConfig / SmolVLMVisionConfig defaults. SmolVLM2's config.json
# leaves some of them out, and transformers (which llama.cpp's converter reads configs
# through) fills them in; reading config.json directly must do the same.
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1152, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 32,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}
# The Idefics3 config's own default for the connector's pixel-shuffle factor.
DEFAULT_SCALE_FACTOR = 2

# Per encoder layer: the Hugging Face module and whether it has a weight matrix ("W"), or is a
# LayerNorm ("N"); every one of them has a bias.
_LAYER_PARTS = (
    ("layer_norm1", "N"), ("self_attn.q_proj", "W"), ("self_attn.k_proj", "W"),
    ("self_attn.v_proj", "W"), ("self_attn.out_proj", "W"), ("layer_norm2", "N"),
    ("mlp.fc1", "W"), ("mlp.fc2", "W"),
)


def text_tensors(tensors: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """The language model's tensors under plain Llama names (vision tensors left out).

    Tensors that are neither text nor vision pass through unchanged, so the Llama converter
    reports them as having no llama.cpp counterpart.
    """
    out: dict[str, TensorRef] = {}
    for name, ref in tensors.items():
        if name.startswith(VISION_PREFIXES):
            continue
        if name.startswith(TEXT_PREFIX):
            name = "model." + name[len(TEXT_PREFIX):]
        out[name] = ref
    return out


def text_config(config: dict[str, Any], tensors: dict[str, TensorRef]) -> dict[str, Any]:
    """The Llama config of the text model: text_config over the top level, defaults filled in.

    Args:
        config: the checkpoint's config.json.
        tensors: the text tensors under Llama names (for the vocabulary size when unstated).
    """
    merged = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    merged.update(config.get("text_config") or {})
    # transformers builds Idefics3's text config with rms_norm_eps 1e-5, not LlamaConfig's 1e-6.
    merged.setdefault("rms_norm_eps", 1e-5)
    if "num_attention_heads" not in merged and "hidden_size" in merged:
        # SmolVLM2 configs omit it; head_dim, when given, pins it down (else LlamaConfig's 32).
        hidden, head_dim = merged["hidden_size"], merged.get("head_dim")
        if isinstance(head_dim, int) and head_dim > 0 and isinstance(hidden, int):
            merged["num_attention_heads"] = hidden // head_dim
        elif head_dim is None:
            merged["num_attention_heads"] = 32
        # Otherwise the Llama converter names the bad head_dim when it reads the config.
    embed = tensors.get("model.embed_tokens.weight")
    if not merged.get("vocab_size") and embed is not None:
        merged["vocab_size"] = embed.shape[0]
    return merged


class Idefics3TextConverter(LlamaConverter):
    """The language model of an Idefics3 / SmolVLM checkpoint, converted as the Llama it is."""

    def __init__(self, directory: Path, config: dict[str, Any], tensors: dict[str, TensorRef],
                 files: MappedFiles) -> None:
        text = text_tensors(tensors)
        super().__init__(directory, text_config(config, text), text, files)


def read_preprocessor(directory: Path) -> dict[str, Any]:
    """preprocessor_config.json, with processor_config.json's image_processor merged over it.

    Raises:
        ConvertError: neither file has the image mean and standard deviation.
    """
    merged: dict[str, Any] = {}
    for file_name, section in (("preprocessor_config.json", None),
                               ("processor_config.json", "image_processor")):
        path = directory / file_name
        if not path.is_file():
            continue
        try:
            data = parse_json(path.read_text(encoding="utf-8"), strict=False)
        except (OSError, ValueError) as exc:
            raise ConvertError(f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConvertError(f"{path} is not a JSON object")
        merged |= data
        if section and isinstance(data.get(section), dict):
            merged |= data[section]
    for key in ("image_mean", "image_std"):
        values = merged.get(key)
        if not (isinstance(values, list) and len(values) == 3
                and all(isinstance(v, (int, float)) for v in values)):
            raise ConvertError(
                f"{directory} has no {key} for the image preprocessor",
                hint="a vision checkpoint needs its preprocessor_config.json")
    return merged


def byte_level(text: str) -> str:
    """``text`` as a byte-level BPE vocabulary spells it (GPT-2's byte-to-character table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return "".join(table[b] for b in text.encode("utf-8"))


def missing_image_tokens(directory: Path, grid: int) -> list[str]:
    """Tokens llama.cpp's Idefics3 image prompt needs that tokenizer.json lacks.

    mtmd looks up "\\n", "\\n\\n", "<fake_token_around_image>" and "<global-img>" as single
    tokens, and tokenizes "<fake_token_around_image><row_R_col_C>" for every tile of a
    ``grid`` × ``grid`` split; the row/column markers must be added (special) tokens to come
    out whole. Returns [] when there is no byte-level BPE tokenizer.json to check.
    """
    path = directory / "tokenizer.json"
    try:
        tok = parse_json(path.read_text(encoding="utf-8"), strict=False)
    except (OSError, ValueError):
        return []  # the tokenizer step reports an unreadable or missing file itself
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return []
    vocab = model.get("vocab") or {}
    added = {t.get("content") for t in tok.get("added_tokens", []) if isinstance(t, dict)}
    markers = ["<fake_token_around_image>", "<global-img>"]
    markers += [f"<row_{r}_col_{c}>" for r in range(1, grid + 1) for c in range(1, grid + 1)]
    missing = [m for m in markers if m not in added]
    missing += [repr(t)[1:-1] for t in ("\n", "\n\n")
                if byte_level(t) not in vocab and t not in added]
    return missing


class Idefics3ProjectorConverter:
    """Plans the mtmd projector ("clip" architecture, projector type "idefics3").

    The SigLIP encoder and the pixel-shuffle connector's linear layer, under mtmd's tensor
    names, with the hyperparameters and preprocessing facts mtmd reads at load time.
    """

    arch = "clip"

    def __init__(self, directory: Path, config: dict[str, Any], tensors: dict[str, TensorRef],
                 files: MappedFiles) -> None:
        import gguf

        self.directory = directory
        self.files = files
        vision = {**VISION_DEFAULTS, **(config.get("vision_config") or {})}
        text = text_config(config, text_tensors(tensors))
        try:
            self.n_embd = int(vision["hidden_size"])
            self.n_ff = int(vision["intermediate_size"])
            self.n_layer = int(vision["num_hidden_layers"])
            self.n_head = int(vision["num_attention_heads"])
            self.image_size = int(vision["image_size"])
            self.patch_size = int(vision["patch_size"])
            self.n_channels = int(vision["num_channels"])
            self.eps = float(vision["layer_norm_eps"])
            self.scale_factor = int(config.get("scale_factor") or DEFAULT_SCALE_FACTOR)
            self.n_embd_text = int(text["hidden_size"])
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ConvertError(f"config.json lacks a usable vision setting: {exc}") from None
        self._check_config(str(vision.get("hidden_act", "")))
        pre = read_preprocessor(directory)
        self.image_mean = [float(v) for v in pre["image_mean"]]
        self.image_std = [float(v) for v in pre["image_std"]]
        size = pre.get("size")
        longest = size.get("longest_edge") if isinstance(size, dict) else None
        self.longest_edge = int(longest or self.image_size)
        grid = math.ceil(self.longest_edge / self.image_size)
        missing = missing_image_tokens(directory, grid)
        if missing:
            raise ConvertError(
                f"the tokenizer lacks {', '.join(missing)}, which llama.cpp's Idefics3 "
                "image prompt needs",
                hint="the tokenizer files do not belong to an Idefics3/SmolVLM model")
        self.refs = {name: ref for name, ref in tensors.items()
                     if name.startswith(VISION_PREFIXES)
                     # a non-persistent buffer some exports still carry; recomputed by mtmd
                     and not name.endswith(".position_ids")}
        self.names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, self.n_layer)

    def _check_config(self, hidden_act: str) -> None:
        side = self.image_size // self.patch_size if self.patch_size > 0 else 0
        problems = []
        # Checked before a tensor-name map is built for that many layers (the tensors
        # themselves are checked against the count by expected_shapes).
        if not 1 <= self.n_layer <= MAX_LAYERS:
            problems.append(f"num_hidden_layers {self.n_layer} (1 to {MAX_LAYERS} are possible)")
        if self.n_embd <= 0 or self.n_ff <= 0:
            problems.append("a hidden_size or intermediate_size of 0")
        if not (math.isfinite(self.eps) and self.eps > 0):
            problems.append(f"layer_norm_eps {self.eps} (it must be a positive number)")
        if self.patch_size <= 0 or self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size "
                            f"{self.patch_size}")
        elif self.scale_factor <= 0 or side % self.scale_factor:
            problems.append(f"{side} patches per side do not divide by scale_factor "
                            f"{self.scale_factor}")
        if self.n_head <= 0 or self.n_embd % self.n_head:
            problems.append(f"hidden_size {self.n_embd} does not divide into "
                            f"{self.n_head} heads")
        if self.n_channels != 3:
            problems.append(f"{self.n_channels} image channels (mtmd feeds RGB)")
        if not hidden_act.startswith("gelu"):
            problems.append(f"activation {hidden_act!r} (mtmd's Idefics3 encoder uses GELU)")
        if self.n_ff == self.n_embd:
            # clip.cpp takes a square fc2 for the up/down-swapped layout of old conversions
            # and swaps the MLP back, which would scramble this model.
            problems.append("intermediate_size equals hidden_size, which llama.cpp's loader "
                            "mistakes for an old swapped layout")
        if problems:
            raise ConvertError(f"unsupported vision encoder: {'; '.join(problems)}")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every vision tensor the checkpoint must have (Hugging Face names), with its shape."""
        d, f, p = self.n_embd, self.n_ff, self.patch_size
        n_pos = (self.image_size // p) ** 2
        emb = "model.vision_model.embeddings."
        shapes: dict[str, tuple[int, ...]] = {
            emb + "patch_embedding.weight": (d, self.n_channels, p, p),
            emb + "patch_embedding.bias": (d,),
            emb + "position_embedding.weight": (n_pos, d),
        }
        for i in range(self.n_layer):
            prefix = f"model.vision_model.encoder.layers.{i}."
            for part, kind in _LAYER_PARTS:
                rows = f if part == "mlp.fc1" else d
                cols = f if part == "mlp.fc2" else d
                shapes[prefix + part + ".weight"] = (rows, cols) if kind == "W" else (d,)
                shapes[prefix + part + ".bias"] = (rows,)
        shapes["model.vision_model.post_layernorm.weight"] = (d,)
        shapes["model.vision_model.post_layernorm.bias"] = (d,)
        shapes["model.connector.modality_projection.proj.weight"] = (
            self.n_embd_text, d * self.scale_factor ** 2)
        return shapes

    def metadata(self, writer: Any, outtype: str, name: str) -> None:
        """Add the projector's key/values (those clip.cpp reads for projector type idefics3)."""
        import gguf

        writer.add_type(gguf.GGUFType.MMPROJ)
        writer.add_name(name)
        writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if outtype == "f32"
                                 else gguf.LlamaFileType.MOSTLY_F16))
        writer.add_clip_has_vision_encoder(True)
        writer.add_clip_projector_type(gguf.VisionProjectorType.IDEFICS3)
        writer.add_vision_projection_dim(self.n_embd_text)
        writer.add_vision_image_size(self.image_size)
        writer.add_vision_patch_size(self.patch_size)
        writer.add_vision_embedding_length(self.n_embd)
        writer.add_vision_feed_forward_length(self.n_ff)
        writer.add_vision_block_count(self.n_layer)
        writer.add_vision_head_count(self.n_head)
        writer.add_vision_attention_layernorm_eps(self.eps)
        writer.add_vision_image_mean(self.image_mean)
        writer.add_vision_image_std(self.image_std)
        writer.add_vision_projector_scale_factor(self.scale_factor)
        # SigLIP's gelu_pytorch_tanh is ggml's (tanh-approximated) GELU.
        writer.add_vision_use_gelu(True)
        # mtmd resizes an image so its longest edge is this, then cuts image_size tiles.
        writer.add_vision_preproc_image_size(self.longest_edge)

    def tensors(self, outtype: str) -> list[PlannedTensor]:
        """The projector's tensors in file order, each streamed from the checkpoint.

        Raises:
            ConvertError: a vision tensor is missing, unexpected, or of the wrong shape.
        """
        shapes = self.expected_shapes()
        unexpected = sorted(set(self.refs) - set(shapes))
        if unexpected:
            raise ConvertError(f"tensor {unexpected[0]} has no llama.cpp counterpart",
                               hint="the vision tower is not the SigLIP encoder Idefics3 uses")
        planned: list[PlannedTensor] = []
        for hf_name, shape in shapes.items():
            ref = self.refs.get(hf_name)
            if ref is None:
                raise ConvertError(f"the checkpoint lacks the vision tensor {hf_name}",
                                   hint="the download may be incomplete")
            if ref.shape != shape:
                raise ConvertError(f"tensor {hf_name} has shape {list(ref.shape)}, but "
                                   f"config.json implies {list(shape)}")
            name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:  # pragma: no cover - gguf-py maps every expected name
                raise ConvertError(f"tensor {hf_name} has no llama.cpp counterpart")
            planned.append(PlannedTensor(name, shape, projector_tensor_type(outtype, shape, name),
                                         self.files.reader(ref)))
        return planned


def projector_tensor_type(outtype: str, shape: tuple[int, ...], name: str) -> Any:
    """The GGUF type of a projector tensor.

    f16 for the weight matrices unless f32 is asked for (projectors are small, and mtmd's
    encoder gains little from quantization); biases, norms and both embeddings (patch
    convolution, positions) stay f32, as llama.cpp's own SmolVLM conversion writes them.
    """
    from gguf import GGMLQuantizationType as T

    if outtype == "f32" or len(shape) < 2 or name.startswith(("v.patch_embd.",
                                                               "v.position_embd.")):
        return T.F32
    return T.F16
