"""Test helpers that build random-weight SmolVLM (Idefics3) checkpoints with numpy alone."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from tests.checkpoints import TRAINING_TEXT, write_safetensors


@dataclass(frozen=True)
class SmolVLMShape:
    """Sizes of a SmolVLM checkpoint; the defaults make a tiny one that runs in milliseconds.

    With image 64 / patch 16 a tile is 4×4 patches, and scale factor 2 makes that 4 tokens;
    a longest edge of 128 splits an image into at most 2×2 tiles plus the global image.
    """

    vision_hidden: int = 32
    vision_ff: int = 80  # must differ from vision_hidden (llama.cpp's swapped-MLP heuristic)
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 64
    patch_size: int = 16
    scale_factor: int = 2
    longest_edge: int = 128  # preprocessor size.longest_edge
    text_hidden: int = 64
    text_ff: int = 160
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int | None = None  # None: exactly the tokenizer's tokens
    image_mean: tuple[float, float, float] = (0.48, 0.46, 0.41)
    image_std: tuple[float, float, float] = (0.27, 0.26, 0.28)
    architecture: str = "SmolVLMForConditionalGeneration"

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size // self.scale_factor) ** 2


TINY = SmolVLMShape()
# SmolVLM-256M-Instruct: SigLIP base patch16 at 512 px, the SmolLM2-135M text model.
SMOLVLM_256M = SmolVLMShape(
    vision_hidden=768, vision_ff=3072, vision_layers=12, vision_heads=12, image_size=512,
    patch_size=16, scale_factor=4, longest_edge=2048, text_hidden=576, text_ff=1536,
    text_layers=30, text_heads=9, text_kv_heads=3, vocab_size=49280,
    image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
    architecture="Idefics3ForConditionalGeneration",
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]]
# SmolVLM's template, also accepting plain-string contents.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")
_PROMPTS = ["User: Describe this image.\nAssistant: A red square on a blue background.\n\n",
            "User: What is in the picture?\nAssistant: A cat sitting on a chair.\n\n"]


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character table, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def train_byte_level_bpe(texts: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over byte-level words (ties broken by the pair's text, for stability).

    Starts with "Ċ Ċ": llama.cpp's SmolVLM prompt looks "\\n\\n" up as one token, and GPT-2's
    pre-tokenizer rarely lets two newlines meet in training text.
    """
    alphabet = byte_alphabet()
    words: Counter[tuple[str, ...]] = Counter()
    for text in texts:
        for word in _WORDS.findall(text):
            words[tuple(alphabet[b] for b in word.encode("utf-8"))] += 1
    merges: list[tuple[str, str]] = [("Ċ", "Ċ")]

    def apply(pair: tuple[str, str]) -> None:
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words.clear()
        words.update(merged)

    apply(merges[0])
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for a, b in pairwise(word):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda item: (item[1], item[0]))[0]
        merges.append(best)
        apply(best)
    return merges


def build_smolvlm_tokenizer(out: Path, n_merges: int = 150) -> dict[str, int]:
    """SmolVLM-style tokenizer files (SmolLM2's pre-tokenizer); returns the vocabulary."""
    merges = train_byte_level_bpe(TRAINING_TEXT * 3 + _PROMPTS * 5, n_merges)
    vocab: dict[str, int] = {}
    for token in [*SPECIAL, *byte_alphabet(), *(a + b for a, b in merges), *IMAGE_TOKENS]:
        vocab.setdefault(token, len(vocab))
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True}
             for t in [*SPECIAL, *IMAGE_TOKENS]]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": True}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [[a, b] for a, b in merges]},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>",
        "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE, "model_max_length": 8192,
        "processor_class": "SmolVLMProcessor", "tokenizer_class": "GPT2Tokenizer",
    }, ensure_ascii=False))
    return vocab


def build_smolvlm(out: Path, shape: SmolVLMShape = TINY, *, seed: int = 0,
                  dtype: str = "float32", drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A random-weight SmolVLM checkpoint in ``out``: config, preprocessor, tokenizer, weights.

    Args:
        out: the directory to fill (created).
        shape: the sizes (TINY, SMOLVLM_256M, or your own).
        seed: for the random weights.
        dtype: float32, float16 or bfloat16 on disk.
        drop: tensor names to leave out (to make a damaged checkpoint).

    Returns:
        The config.json written.
    """
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_smolvlm_tokenizer(out)
    n_vocab = max(shape.vocab_size or 0, len(vocab))
    rng = np.random.default_rng(seed)
    store = np.float16 if dtype == "float16" else np.float32

    def w(*dims: int, scale: float = 0.08, base: float = 0.0) -> np.ndarray:
        values = rng.standard_normal(dims, dtype=np.float32) * np.float32(scale)
        return (values + np.float32(base)).astype(store)

    d, f, t = shape.vision_hidden, shape.vision_ff, shape.text_hidden
    p, side = shape.patch_size, shape.image_size // shape.patch_size
    tensors: dict[str, np.ndarray] = {}
    v = "model.vision_model."
    tensors[v + "embeddings.patch_embedding.weight"] = w(d, 3, p, p, scale=0.05)
    tensors[v + "embeddings.patch_embedding.bias"] = w(d, scale=0.02)
    tensors[v + "embeddings.position_embedding.weight"] = w(side * side, d, scale=0.1)
    for i in range(shape.vision_layers):
        q = f"{v}encoder.layers.{i}."
        tensors |= {
            q + "layer_norm1.weight": w(d, scale=0.1, base=1.0), q + "layer_norm1.bias": w(d),
            q + "self_attn.q_proj.weight": w(d, d), q + "self_attn.q_proj.bias": w(d),
            q + "self_attn.k_proj.weight": w(d, d), q + "self_attn.k_proj.bias": w(d),
            q + "self_attn.v_proj.weight": w(d, d), q + "self_attn.v_proj.bias": w(d),
            q + "self_attn.out_proj.weight": w(d, d), q + "self_attn.out_proj.bias": w(d),
            q + "layer_norm2.weight": w(d, scale=0.1, base=1.0), q + "layer_norm2.bias": w(d),
            q + "mlp.fc1.weight": w(f, d), q + "mlp.fc1.bias": w(f),
            q + "mlp.fc2.weight": w(d, f), q + "mlp.fc2.bias": w(d),
        }
    tensors[v + "post_layernorm.weight"] = w(d, scale=0.1, base=1.0)
    tensors[v + "post_layernorm.bias"] = w(d)
    tensors["model.connector.modality_projection.proj.weight"] = w(
        t, d * shape.scale_factor ** 2, scale=0.05)
    head_dim = t // shape.text_heads
    m = "model.text_model."
    tensors[m + "embed_tokens.weight"] = w(n_vocab, t, scale=0.5)
    for i in range(shape.text_layers):
        q = f"{m}layers.{i}."
        tensors |= {
            q + "input_layernorm.weight": w(t, scale=0.1, base=1.0),
            q + "post_attention_layernorm.weight": w(t, scale=0.1, base=1.0),
            q + "self_attn.q_proj.weight": w(shape.text_heads * head_dim, t),
            q + "self_attn.k_proj.weight": w(shape.text_kv_heads * head_dim, t),
            q + "self_attn.v_proj.weight": w(shape.text_kv_heads * head_dim, t),
            q + "self_attn.o_proj.weight": w(t, shape.text_heads * head_dim),
            q + "mlp.gate_proj.weight": w(shape.text_ff, t),
            q + "mlp.up_proj.weight": w(shape.text_ff, t),
            q + "mlp.down_proj.weight": w(t, shape.text_ff),
        }
    tensors[m + "norm.weight"] = w(t, scale=0.1, base=1.0)
    tensors["lm_head.weight"] = w(n_vocab, t)
    for name in drop:
        del tensors[name]
    write_safetensors(out / "model.safetensors", tensors, bf16=dtype == "bfloat16")

    smolvlm = shape.architecture.startswith("SmolVLM")
    config = {
        "architectures": [shape.architecture],
        "model_type": "smolvlm" if smolvlm else "idefics3",
        "image_token_id": vocab["<image>"],
        "scale_factor": shape.scale_factor,
        "pad_token_id": vocab["<|im_end|>"],
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": n_vocab,
        "text_config": {
            "architectures": ["VLlama3ForCausalLM"], "model_type": "llama",
            "hidden_size": t, "intermediate_size": shape.text_ff,
            "num_hidden_layers": shape.text_layers, "num_attention_heads": shape.text_heads,
            "num_key_value_heads": shape.text_kv_heads, "head_dim": head_dim,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
            "rope_scaling": None, "hidden_act": "silu", "vocab_size": n_vocab,
            "pad_token_id": vocab["<|im_end|>"], "bos_token_id": vocab["<|im_start|>"],
            "eos_token_id": vocab["<end_of_utterance>"], "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "smolvlm_vision" if smolvlm else "idefics3_vision",
            "hidden_size": d, "intermediate_size": f,
            "num_hidden_layers": shape.vision_layers,
            "num_attention_heads": shape.vision_heads, "num_channels": 3,
            "image_size": shape.image_size, "patch_size": p,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
            "max_image_size": {"longest_edge": shape.image_size},
            "size": {"longest_edge": shape.longest_edge},
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    processor = "SmolVLM" if smolvlm else "Idefics3"
    (out / "preprocessor_config.json").write_text(json.dumps({
        "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True,
        "do_pad": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(shape.image_mean), "image_std": list(shape.image_std),
        "image_processor_type": f"{processor}ImageProcessor",
        "max_image_size": {"longest_edge": shape.image_size},
        "processor_class": f"{processor}Processor", "resample": 1,
        "rescale_factor": 1 / 255, "size": {"longest_edge": shape.longest_edge},
    }, indent=2))
    return config


def build_tiny_smolvlm(out: Path, **changes: Any) -> dict[str, Any]:
    """`build_smolvlm` with the TINY shape, any of its fields changed (e.g. longest_edge=64)."""
    return build_smolvlm(out, replace(TINY, **changes))
