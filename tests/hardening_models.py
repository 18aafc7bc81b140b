"""Small real GGUFs for the hardening tests: a Llama-3-vocabulary model, a SmolVLM, any template."""

from __future__ import annotations

import json
from pathlib import Path

from tests.checkpoints import build_tiny_llama3
from tests.conftest import run_llmkit
from tests.vision_checkpoints import build_tiny_smolvlm

# SmolVLM-256M-Instruct's chat template exactly as published on the Hub (tokenizer_config.json
# and chat_template.json of HuggingFaceTB/SmolVLM-256M-Instruct; SmolVLM-Instruct's is the
# same): message content is only read as a list of typed parts.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def convert_tiny_llama3(directory: Path, *, context: int = 4096) -> Path:
    """A random-weight model with a Llama 3 vocabulary (and Llama 3 special tokens), converted
    by `llmkit convert`; ``context`` leaves room for Llama Guard's prompt in its small vocab."""
    ckpt = directory / "hf-tiny-llama3"
    build_tiny_llama3(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config["max_position_embeddings"] = context
    (ckpt / "config.json").write_text(json.dumps(config))
    out = directory / "tiny3.gguf"
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    return out


def convert_tiny_smolvlm(directory: Path, *, template: str | None = None) -> Path:
    """A tiny random SmolVLM and its projector (``mmproj-vlm.gguf`` beside ``vlm.gguf``),
    with ``template`` as its chat template when given."""
    ckpt = directory / "hf-smolvlm"
    build_tiny_smolvlm(ckpt)
    if template is not None:
        config_path = ckpt / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, ensure_ascii=False))
    out = directory / "vlm.gguf"
    proc = run_llmkit(["convert", str(ckpt), "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    return out


def with_chat_template(source: Path, target: Path, template: str, *,
                       token_types: dict[int, int] | None = None) -> Path:
    """A copy of the GGUF ``source`` whose tokenizer.chat_template is ``template`` (and whose
    tokens in ``token_types`` get those GGUF token types, e.g. 4 for USER_DEFINED)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(str(source), "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    assert arch is not None
    writer = gguf.GGUFWriter(str(target), arch=arch.contents(), endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    changes = {
        gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, template),
    }
    if token_types:
        field = reader.get_field(gguf.Keys.Tokenizer.TOKEN_TYPE)
        assert field is not None
        types = [int(t) for t in field.contents()]
        for token, kind in token_types.items():
            types[token] = kind
        changes[gguf.Keys.Tokenizer.TOKEN_TYPE] = MetadataDetails(
            gguf.GGUFValueType.ARRAY, types, sub_type=gguf.GGUFValueType.INT32)
    copy_with_new_metadata(reader, writer, changes, [])
    return target
