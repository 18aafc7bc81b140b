"""Llama 3.2 Vision hyperparameters from a GGUF's header, checked before any graph trusts them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmkit.gguf_file import Header, TensorEntry, read_header

ARCH = "mllama"
WEIGHT_LAYOUT = "hf"
# Bounds for values the graphs size buffers from: far above the published models (11B and 90B:
# width 4096/8192, 40/100 layers, 1280-wide vision tower, 4 tiles of 560 pixels), far below
# what would overflow ggml's int64 sizes or exhaust memory before a clear error.
MAX_WIDTH = 1 << 16
MAX_LAYERS = 512
MAX_HEADS = 1024
MAX_TILES = 16
MAX_IMAGE = 4096
MAX_CONTEXT = 1 << 24


@dataclass(frozen=True)
class TextParams:
    """The language model's shape (a Llama 3.1 with cross-attention layers)."""

    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_base: float
    n_rot: int
    n_ctx_train: int
    n_vocab: int
    cross_layers: tuple[int, ...]
    image_token: int


@dataclass(frozen=True)
class VisionParams:
    """The vision tower's shape and the image preparation it was trained with."""

    n_embd: int
    n_layer: int
    n_global: int
    n_ff: int
    n_head: int
    eps: float
    image_size: int
    patch_size: int
    max_tiles: int
    channels: int
    output_dim: int
    intermediate: tuple[int, ...]
    aspect_ratios: tuple[tuple[int, int], ...]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale: float

    @property
    def n_patches(self) -> int:
        """Patches per tile plus the class token (1601 for the published models)."""
        side = self.image_size // self.patch_size
        return side * side + 1

    @property
    def n_padded(self) -> int:
        """Tokens per tile once padded to a multiple of 8, as both references pad (1608)."""
        return -(-self.n_patches // 8) * 8


@dataclass(frozen=True)
class MllamaFile:
    """A checked Llama 3.2 Vision GGUF: its shape and its tensor table."""

    path: Path
    text: TextParams
    vision: VisionParams
    tensors: dict[str, TensorEntry]
    chat_template: str


def _bounded(h: Header, key: str, low: int, high: int) -> int:
    value = h.u32(key, required=True)
    if not low <= value <= high:
        raise h.fail(f"{key} is {value}; it must be between {low} and {high}")
    return value


def _positive(h: Header, key: str) -> float:
    value = h.require_f32(key)
    h.positive(key, value, key.rsplit(".", 1)[-1].replace("_", " "))
    return value


def read_text(h: Header) -> TextParams:
    """The text model's hyperparameters.

    Raises:
        InvalidModelFileError: a key is missing, of the wrong type, out of bounds or
            inconsistent with another.
    """
    a = f"{ARCH}."
    n_embd = _bounded(h, a + "embedding_length", 1, MAX_WIDTH)
    n_layer = _bounded(h, a + "block_count", 1, MAX_LAYERS)
    n_head = _bounded(h, a + "attention.head_count", 1, MAX_HEADS)
    n_head_kv = _bounded(h, a + "attention.head_count_kv", 1, n_head)
    if n_embd % n_head or n_head % n_head_kv:
        raise h.fail(f"{a}embedding_length {n_embd}, {a}attention.head_count {n_head} and "
                     f"{a}attention.head_count_kv {n_head_kv} do not divide evenly")
    head_dim = n_embd // n_head
    n_rot = h.u32(a + "rope.dimension_count", default=head_dim)
    if n_rot != head_dim:
        raise h.fail(f"{a}rope.dimension_count is {n_rot}; a Llama 3.2 Vision model rotates "
                     f"whole heads ({head_dim})")
    cross = h.ints(a + "attention.cross_attention_layers")
    if not cross or len(set(cross)) != len(cross) or not all(0 <= i < n_layer for i in cross):
        raise h.fail(f"{a}attention.cross_attention_layers is {cross}; it must name distinct "
                     f"layers below {a}block_count ({n_layer})")
    return TextParams(
        n_embd=n_embd, n_layer=n_layer, n_ff=_bounded(h, a + "feed_forward_length", 1,
                                                      MAX_WIDTH * 8),
        n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        rms_eps=_positive(h, a + "attention.layer_norm_rms_epsilon"),
        rope_base=_positive(h, a + "rope.freq_base"), n_rot=n_rot,
        n_ctx_train=_bounded(h, a + "context_length", 1, MAX_CONTEXT),
        n_vocab=_bounded(h, a + "vocab_size", 1, 1 << 22),
        cross_layers=tuple(sorted(cross)),
        image_token=_bounded(h, a + "image_token_id", 0, (1 << 22) - 1),
    )


def read_vision(h: Header) -> VisionParams:
    """The vision tower's hyperparameters and image preparation.

    Raises:
        InvalidModelFileError: as :func:`read_text`.
    """
    v = f"{ARCH}.vision."
    n_embd = _bounded(h, v + "embedding_length", 1, MAX_WIDTH)
    n_head = _bounded(h, v + "attention.head_count", 1, MAX_HEADS)
    if n_embd % n_head:
        raise h.fail(f"{v}embedding_length {n_embd} does not divide into {n_head} heads")
    n_layer = _bounded(h, v + "block_count", 1, MAX_LAYERS)
    image = _bounded(h, v + "image_size", 1, MAX_IMAGE)
    patch = _bounded(h, v + "patch_size", 1, image)
    if image % patch:
        raise h.fail(f"{v}image_size {image} is not a whole number of {v}patch_size "
                     f"({patch}-pixel patches)")
    max_tiles = _bounded(h, v + "max_num_tiles", 1, MAX_TILES)
    channels = _bounded(h, v + "num_channels", 3, 3)
    intermediate = h.ints(v + "intermediate_layers_indices")
    if not all(0 <= i < n_layer for i in intermediate) or len(set(intermediate)) != len(
            intermediate):
        raise h.fail(f"{v}intermediate_layers_indices is {intermediate}; it must name distinct "
                     f"layers below {v}block_count ({n_layer})")
    output_dim = _bounded(h, v + "output_dim", 1, MAX_WIDTH * 16)
    if output_dim != n_embd * (len(intermediate) + 1):
        raise h.fail(f"{v}output_dim is {output_dim}, not the {len(intermediate) + 1} states "
                     f"of {n_embd} values the tower hands the projector")
    flat = h.ints(v + "supported_aspect_ratios")
    pairs = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat) - 1, 2))
    if (not pairs or len(flat) % 2 or len(set(pairs)) != len(pairs)
            or not all(r >= 1 and c >= 1 and r * c <= max_tiles for r, c in pairs)):
        raise h.fail(f"{v}supported_aspect_ratios is {flat}; it must list distinct (rows, "
                     f"columns) pairs of at most {v}max_num_tiles ({max_tiles}) tiles")
    mean, std = h.floats(v + "image_mean"), h.floats(v + "image_std")
    if len(mean) != 3 or len(std) != 3 or not all(s > 0 for s in std):
        raise h.fail(f"{v}image_mean and {v}image_std must be 3 values each, the deviations "
                     "positive")
    return VisionParams(
        n_embd=n_embd, n_layer=n_layer,
        n_global=_bounded(h, v + "global.block_count", 0, MAX_LAYERS),
        n_ff=_bounded(h, v + "feed_forward_length", 1, MAX_WIDTH * 8), n_head=n_head,
        eps=_positive(h, v + "attention.layer_norm_epsilon"), image_size=image,
        patch_size=patch, max_tiles=max_tiles, channels=channels, output_dim=output_dim,
        intermediate=tuple(intermediate), aspect_ratios=pairs,
        image_mean=(mean[0], mean[1], mean[2]), image_std=(std[0], std[1], std[2]),
        rescale=_positive(h, v + "rescale_factor"),
    )


def read_mllama(path: Path) -> MllamaFile:
    """Read and check a Llama 3.2 Vision GGUF written in llmkit's layout.

    Raises:
        InvalidModelFileError: not a complete GGUF, not an mllama file, a file in another
            layout (Ollama's, with permuted rows and pre-applied gates), or hyperparameters
            the graphs cannot take.
    """
    h = read_header(path)
    arch = h.string("general.architecture")
    if arch != ARCH:
        raise h.fail(f"is a {arch} model, not Llama 3.2 Vision (mllama)")
    layout = h.string(f"{ARCH}.llmkit.weight_layout")
    if layout != WEIGHT_LAYOUT:
        raise h.fail("is a Llama 3.2 Vision GGUF from another converter (Ollama's, say), "
                     "whose weights are laid out differently",
                     hint="convert the Hugging Face checkpoint with `llmkit convert`")
    return MllamaFile(path=path, text=read_text(h), vision=read_vision(h), tensors=h.tensors(),
                      chat_template=h.string("tokenizer.chat_template") or "")
