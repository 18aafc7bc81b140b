"""The tiny Llama 3.2 Vision oracle: Meta's semantics, a picture that matters, published files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import mllama_model as mm

pytestmark = pytest.mark.usefixtures("oracle")

# A user turn as the Instruct template renders it: <|image|> directly before the text.
PROMPT = [128000, 128006, 882, 128007, 271, 128256, 75885, 420, 6945, 13, 128009, 128006,
          78191, 128007, 271]
IMAGE_AT = PROMPT.index(mm.IMAGE_TOKEN_ID)
TEXT_ONLY = PROMPT[:IMAGE_AT] + PROMPT[IMAGE_AT + 1:]

# Names from the published meta-llama/Llama-3.2-11B-Vision-Instruct
# model.safetensors.index.json (transformers 4.45 layout). Layer 0 is a self-attention layer and
# layer 3 a cross-attention layer there and in the tiny model; the published cross layer has
# exactly these 13 tensors (no self_attn), a self layer these 9.
PUBLISHED_SELF_LAYER_0 = [
    "language_model.model.layers.0.input_layernorm.weight",
    "language_model.model.layers.0.mlp.down_proj.weight",
    "language_model.model.layers.0.mlp.gate_proj.weight",
    "language_model.model.layers.0.mlp.up_proj.weight",
    "language_model.model.layers.0.post_attention_layernorm.weight",
    "language_model.model.layers.0.self_attn.k_proj.weight",
    "language_model.model.layers.0.self_attn.o_proj.weight",
    "language_model.model.layers.0.self_attn.q_proj.weight",
    "language_model.model.layers.0.self_attn.v_proj.weight",
]
PUBLISHED_CROSS_LAYER_3 = [
    "language_model.model.layers.3.cross_attn.k_norm.weight",
    "language_model.model.layers.3.cross_attn.k_proj.weight",
    "language_model.model.layers.3.cross_attn.o_proj.weight",
    "language_model.model.layers.3.cross_attn.q_norm.weight",
    "language_model.model.layers.3.cross_attn.q_proj.weight",
    "language_model.model.layers.3.cross_attn.v_proj.weight",
    "language_model.model.layers.3.cross_attn_attn_gate",
    "language_model.model.layers.3.cross_attn_mlp_gate",
    "language_model.model.layers.3.input_layernorm.weight",
    "language_model.model.layers.3.mlp.down_proj.weight",
    "language_model.model.layers.3.mlp.gate_proj.weight",
    "language_model.model.layers.3.mlp.up_proj.weight",
    "language_model.model.layers.3.post_attention_layernorm.weight",
]
PUBLISHED_OTHERS = [
    "language_model.lm_head.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.model.norm.weight",
    "multi_modal_projector.bias",
    "multi_modal_projector.weight",
    "vision_model.class_embedding",
    "vision_model.patch_embedding.weight",
    "vision_model.gated_positional_embedding.embedding",
    "vision_model.gated_positional_embedding.gate",
    "vision_model.gated_positional_embedding.tile_embedding.weight",
    "vision_model.layernorm_post.bias",
    "vision_model.layernorm_post.weight",
    "vision_model.layernorm_pre.bias",
    "vision_model.layernorm_pre.weight",
    "vision_model.post_tile_positional_embedding.embedding.weight",
    "vision_model.post_tile_positional_embedding.gate",
    "vision_model.pre_tile_positional_embedding.embedding.weight",
    "vision_model.pre_tile_positional_embedding.gate",
    "vision_model.transformer.layers.0.input_layernorm.bias",
    "vision_model.global_transformer.layers.0.gate_attn",
    "vision_model.global_transformer.layers.0.gate_ffn",
]

# The smallest change of picture must move the logits from <|image|> on by at least this much.
PICTURE_EFFECT = 0.05


@pytest.fixture(scope="module")
def oracle() -> None:
    mm.require_oracle()


@pytest.fixture(scope="module")
def model() -> Any:
    mm.require_oracle()
    return mm.build_model(seed=0)


def _picture(width: int, height: int, seed: int) -> Any:
    return mm.random_picture(width, height, seed)


def _torch_logits(model: Any, ids: list[int], image: Any = None) -> np.ndarray:
    """transformers 5.24 as it is, no patch."""
    import torch

    kwargs = mm._image_kwargs(model, ids, image)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False, **kwargs)
    logits: np.ndarray = out.logits[0].numpy()
    return logits


def test_every_gate_norm_and_embedding_is_random(model: Any) -> None:
    from torch import nn

    state = model.state_dict()
    gates = [k for k in state if k.endswith(("gate", "gate_attn", "gate_ffn"))]
    # 2 cross layers × 2, 3 vision embedding gates, 2 global layers × 2.
    assert len(gates) == 11, gates
    for name in gates:
        assert 0.35 < abs(float(state[name])) < 1.2, name
    norms = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.LayerNorm) or type(m).__name__ == "MllamaTextRMSNorm"]
    assert len(norms) == 1 + 2 * 5 + 2 * 2 + 2 + 2 * 4 + 2 * 2, [n for n, _ in norms]
    for name, norm in norms:
        weight = norm.weight.detach().numpy()
        assert np.abs(weight - 1).max() > 0.1, name
        if getattr(norm, "bias", None) is not None:
            assert np.abs(norm.bias.detach().numpy()).max() > 0.05, name
    for name in ("model.vision_model.class_embedding",
                 "model.vision_model.gated_positional_embedding.embedding",
                 "model.vision_model.gated_positional_embedding.tile_embedding.weight",
                 "model.vision_model.pre_tile_positional_embedding.embedding.weight",
                 "model.vision_model.post_tile_positional_embedding.embedding.weight"):
        assert 0.4 < state[name].numpy().std() < 0.6, name
    tokens = state["model.language_model.embed_tokens.weight"].numpy()
    assert tokens.shape == (mm.VOCAB_SIZE + 8, 64)
    assert np.abs(tokens[mm.PAD_TOKEN_ID]).max() > 0  # nn.Embedding zeroes its padding row


def test_the_same_seed_gives_the_same_model(model: Any) -> None:
    again = mm.build_model(seed=0)
    other = mm.build_model(seed=1)
    for name, tensor in model.state_dict().items():
        assert np.array_equal(tensor.numpy(), again.state_dict()[name].numpy()), name
    assert not np.array_equal(model.lm_head.weight.detach().numpy(),
                              other.lm_head.weight.detach().numpy())


def _vision_capture(model: Any, inputs: mm.ImageInputs, *, meta: bool) -> dict[str, Any]:
    """Run the vision tower; capture layernorm_pre's output and the encoder's own record."""
    import torch

    seen: dict[str, Any] = {}
    encoder = model.model.vision_model.transformer
    hooks = [
        model.model.vision_model.layernorm_pre.register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("pre", out)),
        # Registered before meta_semantics' hook: sees transformers' own record (outputs).
        encoder.register_forward_hook(
            lambda _m, _a, out: seen.__setitem__("layers", out.hidden_states)),
    ]
    try:
        with torch.no_grad(), mm.meta_semantics(model, vision_inputs=meta, pre_image_rows=False):
            seen["out"] = model.model.vision_model(**inputs.torch_kwargs()).last_hidden_state
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_intermediate_vision_states_are_the_inputs_of_layers_0_and_2(model: Any) -> None:
    inputs = mm.image_inputs(_picture(50, 30, seed=3))
    tiles, tokens, hidden = 4, 5, 32  # 4 patches + class token, padded to 8 inside the tower
    patched = _vision_capture(model, inputs, meta=True)
    plain = _vision_capture(model, inputs, meta=False)
    for seen in (patched, plain):
        assert seen["out"].shape == (1, 1, tiles, tokens, hidden * 3)
    outputs = [h.reshape(1, tiles, 8, hidden)[:, :, :tokens].numpy() for h in plain["layers"]]
    assert len(outputs) == 4

    def intermediate(seen: dict[str, Any], k: int) -> np.ndarray:
        # Stacked on the last axis, then flattened: channel c of state k is at c * 2 + k.
        out = seen["out"][0, 0].numpy()[..., hidden:].reshape(tiles, tokens, hidden, 2)
        return out[..., k][None]

    final = patched["out"][0, 0, ..., :hidden].numpy()
    assert np.array_equal(final, plain["out"][0, 0, ..., :hidden].numpy())
    # Meta: the input of layer 0 (layernorm_pre's output) and of layer 2 (layer 1's output).
    np.testing.assert_allclose(intermediate(patched, 0), patched["pre"].numpy(), atol=1e-6)
    np.testing.assert_allclose(intermediate(patched, 1), outputs[1], atol=1e-6)
    # transformers 5.24 unpatched: the outputs of layers 0 and 2, one layer late.
    np.testing.assert_allclose(intermediate(plain, 0), outputs[0], atol=1e-6)
    np.testing.assert_allclose(intermediate(plain, 1), outputs[2], atol=1e-6)
    assert np.abs(intermediate(patched, 1) - intermediate(plain, 1)).max() > 0.1


def test_vision_attention_masks_only_pad_pairs_as_meta_does() -> None:
    import torch
    from transformers.models.mllama.modeling_mllama import _prepare_aspect_ratio_attention_mask

    tiles, tokens, padded = 4, 5, 8
    for real_tiles in range(1, tiles + 1):
        tile_mask = torch.tensor([[1] * real_tiles + [0] * (tiles - real_tiles)])
        hf = _prepare_aspect_ratio_attention_mask(tile_mask, tokens, padded, torch.float32)
        # Meta's encoder_utils.build_encoder_attention_mask: 1 marks padding, outer product.
        pad = np.ones((tiles, padded))
        pad[:real_tiles, :tokens] = 0
        pad = pad.reshape(-1, 1)
        blocked = (pad @ pad.T) > 0
        assert np.array_equal(hf[0, 0].numpy() < 0, blocked)
        assert not blocked[0, -1]  # a real token attends to a padded one


def test_each_aspect_ratio_id_has_its_picture_size() -> None:
    for aspect_id, (width, height) in mm.ASPECT_PICTURE_SIZES.items():
        inputs = mm.image_inputs(mm.random_picture(width, height, seed=aspect_id))
        rows, cols = mm.SUPPORTED_ASPECT_RATIOS[aspect_id - 1]
        assert int(inputs.aspect_ratio_ids[0, 0]) == aspect_id
        assert inputs.num_tiles == rows * cols
        assert inputs.pixel_values.shape == (1, 1, 4, 3, 28, 28)
        assert inputs.aspect_ratio_mask[0, 0].tolist() == [1] * (rows * cols) + [0] * (
            4 - rows * cols)


def test_a_different_picture_changes_the_logits_from_the_image_token_on(model: Any) -> None:
    first = mm.reference_logits(model, PROMPT, _picture(40, 30, seed=1))
    for other in (_picture(40, 30, seed=2), _picture(60, 20, seed=4), _picture(80, 90, seed=5)):
        logits = mm.reference_logits(model, PROMPT, other)
        delta = np.abs(logits - first).max(axis=1)
        assert delta[IMAGE_AT:].min() > PICTURE_EFFECT, delta
        # Meta: the rows before <|image|> see no picture at all.
        assert delta[:IMAGE_AT].max() == 0.0, delta


def test_rows_before_the_image_are_the_text_only_rows(model: Any) -> None:
    picture = _picture(40, 30, seed=1)
    with_image = mm.reference_logits(model, PROMPT, picture)
    text = mm.reference_logits(model, PROMPT[:IMAGE_AT])
    np.testing.assert_allclose(with_image[:IMAGE_AT], text, atol=1e-5)
    # transformers alone lets those rows attend to every vision token: the patch is needed.
    hf = mm.reference_logits(model, PROMPT, picture, meta=False)
    assert np.abs(hf[:IMAGE_AT] - text).max() > 0.1


def test_with_the_image_token_first_only_the_vision_patch_changes_anything(model: Any) -> None:
    import torch

    ids = [mm.IMAGE_TOKEN_ID, *TEXT_ONLY]  # the base model's "<|image|><|begin_of_text|>…"
    inputs = mm.image_inputs(_picture(40, 30, seed=1))
    plain = _torch_logits(model, ids, inputs)
    kwargs = mm._image_kwargs(model, ids, inputs)

    def patched(**flags: bool) -> np.ndarray:
        with torch.no_grad(), mm.meta_semantics(model, **flags):
            logits: np.ndarray = model(input_ids=torch.tensor([ids]), use_cache=False,
                                       **kwargs).logits[0].numpy()
        return logits

    np.testing.assert_array_equal(patched(vision_inputs=False, pre_image_rows=True), plain)
    assert np.abs(patched(vision_inputs=True, pre_image_rows=False) - plain).max() > 0.1
    # The hooks are gone after the block.
    np.testing.assert_array_equal(_torch_logits(model, ids, inputs), plain)


def test_text_only_is_a_plain_llama_of_the_self_attention_layers(model: Any) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    text = model.config.text_config
    self_layers = [i for i in range(text.num_hidden_layers)
                   if i not in text.cross_attention_layers]
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=mm.VOCAB_SIZE + 8, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=len(self_layers),
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings,
        rope_parameters=dict(text.rope_parameters), tie_word_embeddings=False,
        attn_implementation="eager")).eval()
    source = model.state_dict()
    mapped = {"model.embed_tokens.weight": source["model.language_model.embed_tokens.weight"],
              "model.norm.weight": source["model.language_model.norm.weight"],
              "lm_head.weight": torch.cat([source["lm_head.weight"],
                                           torch.zeros(8, text.hidden_size)])}
    for new, old in enumerate(self_layers):
        prefix = f"model.language_model.layers.{old}."
        mapped |= {f"model.layers.{new}.{k.removeprefix(prefix)}": v
                   for k, v in source.items() if k.startswith(prefix)}
    llama.load_state_dict(mapped, strict=True)
    with torch.no_grad():
        expected = llama(input_ids=torch.tensor([TEXT_ONLY])).logits[0, :, :mm.VOCAB_SIZE]
    ours = mm.reference_logits(model, TEXT_ONLY)
    np.testing.assert_allclose(ours, expected.numpy(), atol=2e-5)
    np.testing.assert_array_equal(ours, mm.reference_logits(model, TEXT_ONLY, meta=False))


@pytest.mark.parametrize("with_image", [True, False])
def test_cached_decode_equals_the_uncached_forward(model: Any, with_image: bool) -> None:
    picture = _picture(70, 40, seed=6) if with_image else None
    prompt = PROMPT if with_image else TEXT_ONLY
    fed, steps = mm.reference_decode(model, prompt, picture, steps=20)
    assert fed == mm.decode_tokens(20) and steps.shape == (21, mm.VOCAB_SIZE)
    full = mm.reference_logits(model, prompt + fed, picture)
    np.testing.assert_allclose(steps, full[len(prompt) - 1:], atol=1e-4)


def _load(directory: Path) -> Any:
    from transformers import MllamaForConditionalGeneration

    return MllamaForConditionalGeneration.from_pretrained(
        directory, attn_implementation="eager").eval()


@pytest.mark.parametrize(("layout", "config_style", "shards"), [
    ("v5", "rope_parameters", 1), ("v5", "rope_scaling", 2), ("v4", "rope_scaling", 1)])
def test_saved_checkpoint_reloads_with_the_same_logits(
    model: Any, tmp_path: Path, layout: str, config_style: str, shards: int,
) -> None:
    directory = mm.save_checkpoint(model, tmp_path / "ckpt", layout=layout,
                                   config_style=config_style, shards=shards)
    loaded = _load(directory)
    picture = _picture(40, 60, seed=7)
    np.testing.assert_array_equal(mm.reference_logits(loaded, PROMPT, picture),
                                  mm.reference_logits(model, PROMPT, picture))
    assert loaded.config.text_config.rope_parameters == model.config.text_config.rope_parameters


def test_a_bfloat16_checkpoint_holds_the_rounded_weights(model: Any, tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    directory = mm.save_checkpoint(model, tmp_path / "bf16", layout="v4", dtype="bfloat16")
    with safe_open(str(directory / "model.safetensors"), framework="pt") as fh:
        gate = fh.get_tensor("language_model.model.layers.1.cross_attn_attn_gate")
        assert gate.dtype == torch.bfloat16
        assert fh.metadata() == {"format": "pt"}
    expected = model.model.language_model.layers[1].cross_attn_attn_gate.detach()
    assert torch.equal(gate, expected.to(torch.bfloat16))
    config = json.loads((directory / "config.json").read_text())
    assert config["torch_dtype"] == config["text_config"]["torch_dtype"] == "bfloat16"


def test_v4_names_are_the_published_names(model: Any, tmp_path: Path) -> None:
    from safetensors import safe_open

    directory = mm.save_checkpoint(model, tmp_path / "v4", layout="v4", shards=2)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    names: dict[str, tuple[int, ...]] = {}
    size = 0
    for file in files:
        with safe_open(str(directory / file), framework="np") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open is no mapping)
                assert index["weight_map"][name] == file
                array = fh.get_tensor(name)
                names[name] = array.shape
                size += array.nbytes
    assert index["metadata"]["total_size"] == size
    assert set(index["weight_map"]) == set(names)
    for name in PUBLISHED_SELF_LAYER_0 + PUBLISHED_CROSS_LAYER_3 + PUBLISHED_OTHERS:
        assert name in names, name
    assert sorted(n for n in names if n.startswith("language_model.model.layers.0.")) == \
        PUBLISHED_SELF_LAYER_0
    assert sorted(n for n in names if n.startswith("language_model.model.layers.3.")) == \
        PUBLISHED_CROSS_LAYER_3
    assert not any(n.startswith(("model.", "lm_head")) for n in names)
    assert names["language_model.model.embed_tokens.weight"] == (128264, 64)
    assert names["language_model.lm_head.weight"] == (128256, 64)
    assert names["vision_model.gated_positional_embedding.tile_embedding.weight"] == (9, 4 * 5 * 32)
    assert names["multi_modal_projector.weight"] == (64, 96)
    assert len(names) == len(model.state_dict())


def test_transformers_save_pretrained_writes_our_v4_names_and_v5_config(
    model: Any, tmp_path: Path,
) -> None:
    from safetensors import safe_open

    # transformers 5.24 reverses its checkpoint conversion mapping on save: the published
    # (4.45) names go to disk; the v5 names are its in-memory state-dict keys.
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    v4 = mm.save_checkpoint(model, tmp_path / "v4", layout="v4", config_style="rope_parameters")
    v5 = mm.save_checkpoint(model, tmp_path / "v5", layout="v5")
    with safe_open(str(saved / "model.safetensors"), framework="np") as theirs, \
            safe_open(str(v4 / "model.safetensors"), framework="np") as mine:
        assert sorted(theirs.keys()) == sorted(mine.keys())
    with safe_open(str(v5 / "model.safetensors"), framework="np") as mine:
        assert sorted(mine.keys()) == sorted(model.state_dict())
    assert json.loads((v4 / "config.json").read_text()) == json.loads(
        (saved / "config.json").read_text())


def test_config_json_styles(model: Any, tmp_path: Path) -> None:
    published = json.loads((mm.save_checkpoint(model, tmp_path / "a", config_style="rope_scaling")
                            / "config.json").read_text())
    text = published["text_config"]
    assert text["rope_scaling"] == {"factor": 8.0, "high_freq_factor": 4.0,
                                    "low_freq_factor": 1.0,
                                    "original_max_position_embeddings": 64,
                                    "rope_type": "llama3"}
    assert text["rope_theta"] == 500000.0 and "rope_parameters" not in text
    assert published["transformers_version"] == "4.45.0.dev0"
    assert published["torch_dtype"] == "float32"
    assert text["cross_attention_layers"] == [1, 3] and text["vocab_size"] == 128256
    assert published["vision_config"]["intermediate_layers_indices"] == [0, 2]
    assert published["vision_config"]["vision_output_dim"] == 96
    v5 = json.loads((mm.save_checkpoint(model, tmp_path / "b", config_style="rope_parameters")
                     / "config.json").read_text())
    assert v5["text_config"]["rope_parameters"]["rope_theta"] == 500000.0
    assert "rope_scaling" not in v5["text_config"] and "rope_theta" not in v5["text_config"]
    assert v5["dtype"] == "float32" and "torch_dtype" not in v5


def test_preprocessor_config_is_read_by_transformers_as_ours(model: Any, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor

    directory = mm.save_checkpoint(model, tmp_path / "ckpt")
    processor = AutoImageProcessor.from_pretrained(directory)
    assert processor.size["height"] == processor.size["width"] == 28
    picture = _picture(90, 33, seed=8)
    theirs = processor(images=[[picture]], return_tensors="np")
    ours = mm.image_inputs(picture)
    np.testing.assert_array_equal(np.asarray(theirs["pixel_values"]), ours.pixel_values)
    assert int(theirs["aspect_ratio_ids"][0, 0]) == int(ours.aspect_ratio_ids[0, 0]) == 3
    assert ours.num_tiles == 3 and ours.aspect_ratio_mask.tolist() == [[[1, 1, 1, 0]]]
    assert not (tmp_path / "none").exists()
    bare = mm.save_checkpoint(model, tmp_path / "none", preprocessor=False)
    assert not (bare / "preprocessor_config.json").exists()


USER_TURN = [{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "Describe this picture."}]}]
RENDERED = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
            "<|image|>Describe this picture.<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_chat_template_is_the_published_text() -> None:
    assert hashlib.sha256(mm.CHAT_TEMPLATE.encode()).hexdigest() == mm.CHAT_TEMPLATE_SHA256
    assert len(mm.CHAT_TEMPLATE) == 4909


@pytest.mark.parametrize("where", ["json", "tokenizer_config"])
def test_the_chat_template_puts_the_image_right_before_the_text(
    model: Any, tmp_path: Path, where: str,
) -> None:
    from transformers import AutoTokenizer

    directory = mm.save_checkpoint(model, tmp_path / where, chat_template=where)
    if where == "json":
        assert json.loads((directory / "chat_template.json").read_text()) == {
            "chat_template": mm.CHAT_TEMPLATE}
        assert "chat_template" not in json.loads((directory / "tokenizer_config.json")
                                                 .read_text())
    else:
        assert not (directory / "chat_template.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert len(tokenizer) == 128257 and tokenizer.eos_token == "<|eot_id|>"
    template = mm.CHAT_TEMPLATE  # AutoTokenizer does not read chat_template.json
    rendered = tokenizer.apply_chat_template(USER_TURN, chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == RENDERED
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[:7] == [128000, 128006, 882, 128007, 271, 128256, 75885]
    if where == "json":
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(directory)
        assert processor.apply_chat_template(USER_TURN, tokenize=False,
                                             add_generation_prompt=True) == RENDERED
    else:
        assert tokenizer.apply_chat_template(USER_TURN, tokenize=False,
                                             add_generation_prompt=True) == RENDERED
    with pytest.raises(Exception, match="Prompting with images is incompatible with system"):
        tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."}, *USER_TURN],
                                      chat_template=template, tokenize=False)


def test_a_base_checkpoint_has_no_template(model: Any, tmp_path: Path) -> None:
    directory = mm.save_checkpoint(model, tmp_path / "base", chat_template=None)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert "chat_template" not in config and config["eos_token"] == "<|end_of_text|>"
    assert not (directory / "chat_template.json").exists()
    special = json.loads((directory / "special_tokens_map.json").read_text())
    assert special["eos_token"]["content"] == "<|end_of_text|>"
    assert (directory / "original" / "tokenizer.model").is_file()
    assert (directory / "tokenizer.json").read_bytes() == (
        mm.tokenizer_dir() / "tokenizer.json").read_bytes()
