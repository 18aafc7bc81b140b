"""Tokenizers into GGUF: byte-level BPE from tokenizer.json, SentencePiece from tokenizer.model."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import ConvertError
from llmkit.io import parse_json

# Pre-tokenizer regexes as they appear in tokenizer.json files (the Split step).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.json pre-tokenizer pipelines → the pre-tokenizer name llama.cpp implements for
# them (llama-vocab.cpp). llama.cpp's own converter identifies these by hashing a tokenization
# done with transformers; reading the pipeline itself needs no tokenizer library.
PRE_TOKENIZERS: dict[tuple[tuple[Any, ...], ...], str] = {
    (("Split", LLAMA3_REGEX), ("ByteLevel", False)): "llama-bpe",
    (("Split", QWEN2_REGEX), ("ByteLevel", False)): "qwen2",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("ByteLevel", True),): "gpt-2",
}


def _signature(pre: dict[str, Any] | None) -> tuple[tuple[Any, ...], ...]:
    if not pre:
        return ()
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    out: list[tuple[Any, ...]] = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            out.append(("Split", pattern.get("Regex", pattern.get("String"))))
        elif kind == "ByteLevel":
            out.append(("ByteLevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            out.append(("Digits", bool(step.get("individual_digits", False))))
        else:
            out.append((kind,))
    return tuple(out)


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer name for a tokenizer.json.

    Raises:
        ConvertError: a pre-tokenizer pipeline llama.cpp has no implementation we recognise.
    """
    signature = _signature(tokenizer_json.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(signature)
    if name is None:
        known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        raise ConvertError(
            f"unrecognised pre-tokenizer {signature!r:.200}",
            hint=f"llmkit knows {known}",
        )
    return name


@contextlib.contextmanager
def _gguf_warnings_off() -> Iterator[None]:
    """Keep gguf-py's warnings off the terminal while it reads the special tokens.

    Its SpecialVocab logs, for instance, that Llama 3's tokenizer.json names
    <|begin_of_text|> as a separator of sentence pairs, which llama.cpp never tokenizes;
    library code does not print, and an unconfigured logger would write it to stderr.
    """
    log = logging.getLogger("gguf")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _looks_special(token: str) -> bool:
    # Added tokens such as <|eot_id|> are control tokens even when not flagged "special".
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def add_bpe(writer: Any, directory: Path, tok: dict[str, Any], n_vocab: int,
            chat_template: str | None = None) -> str:
    """Write a byte-level BPE vocabulary; returns the pre-tokenizer name.

    ``chat_template``, when given, replaces the one gguf's SpecialVocab finds.
    """
    import gguf

    model = tok.get("model", {})
    vocab: dict[str, int] = model.get("vocab", {})
    pre = detect_pre_tokenizer(tok)
    added = {int(t["id"]): t for t in tok.get("added_tokens", [])}
    size = max(n_vocab, len(vocab), max(added, default=-1) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(gguf.TokenType.NORMAL)
    for i, info in added.items():
        text = info["content"]
        tokens[i] = text
        special = bool(info.get("special")) or _looks_special(text)
        types[i] = int(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with _gguf_warnings_off():
        special_vocab = gguf.SpecialVocab(directory, load_merges=True, n_vocab=size)
    if not special_vocab.merges:
        raise ConvertError(f"{directory / 'tokenizer.json'} has no BPE merges")
    if chat_template is not None:
        special_vocab.chat_template = chat_template
    special_vocab.add_to_gguf(writer, quiet=True)
    return pre


def add_sentencepiece(writer: Any, directory: Path, n_vocab: int,
                      chat_template: str | None = None) -> str:
    """Write a SentencePiece vocabulary from tokenizer.model (needs the sentencepiece package).

    ``chat_template``, when given, replaces the one gguf's SpecialVocab finds.
    """
    import gguf

    try:
        from gguf.vocab import SentencePieceVocab

        spm = SentencePieceVocab(directory)
    except ImportError:
        raise ConvertError(
            "this checkpoint uses a SentencePiece tokenizer (tokenizer.model)",
            hint="install the optional extra: pip install 'llmkit[sentencepiece]'",
        ) from None
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for text, score, ttype in spm.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(ttype))
    while len(tokens) < n_vocab:
        tokens.append(f"[PAD{len(tokens)}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    with _gguf_warnings_off():
        special_vocab = gguf.SpecialVocab(directory, load_merges=False, n_vocab=len(tokens))
    if chat_template is not None:
        special_vocab.chat_template = chat_template
    special_vocab.add_to_gguf(writer, quiet=True)
    return "sentencepiece"


def add_tokenizer(writer: Any, directory: Path, n_vocab: int,
                  chat_template: str | None = None) -> str:
    """Write the checkpoint's tokenizer, special tokens and chat template into ``writer``.

    Args:
        writer: the gguf.GGUFWriter.
        directory: the checkpoint directory.
        n_vocab: the model's vocabulary size (tokens past the tokenizer's are padding).
        chat_template: the template to write; None takes the one gguf's SpecialVocab reads
            (tokenizer_config.json before chat_template.jinja / chat_template.json).

    Returns:
        A short description: the pre-tokenizer name, or "sentencepiece".

    Raises:
        ConvertError: no tokenizer, or one llmkit cannot carry over.
    """
    tok_file = directory / "tokenizer.json"
    if tok_file.is_file():
        try:
            tok = parse_json(tok_file.read_text(encoding="utf-8"), strict=False)
        except (OSError, ValueError) as exc:
            raise ConvertError(f"cannot read {tok_file}: {exc}") from None
        model = tok.get("model", {})
        if model.get("type") == "BPE" and not model.get("byte_fallback"):
            return add_bpe(writer, directory, tok, n_vocab, chat_template)
        if (directory / "tokenizer.model").is_file():
            return add_sentencepiece(writer, directory, n_vocab, chat_template)
        raise ConvertError(f"{tok_file}: tokenizer type {model.get('type')!r} is not supported",
                           hint="supported: byte-level BPE and SentencePiece (tokenizer.model)")
    if (directory / "tokenizer.model").is_file():
        return add_sentencepiece(writer, directory, n_vocab, chat_template)
    raise ConvertError(f"no tokenizer.json or tokenizer.model in {directory}")
