"""A guard model without a model, for the fuzz harness and the tests of what it found."""

from __future__ import annotations

import re
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

_SPECIALS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
             "<|im_start|>", "<|im_end|>")
_SPECIAL_IDS = {text: 256 + i for i, text in enumerate(_SPECIALS)}
_VOCAB = 256 + len(_SPECIALS)
_SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in _SPECIALS) + ")")


class FakeGuardEngine:
    """A guard model without a model, as strict as the real engine where it matters.

    Text is encoded as UTF-8 before it is tokenized, as ``Engine`` hands it to llama.cpp (a
    lone surrogate fails there, and so it fails here); tokens are the bytes, and the chat
    markup becomes special tokens only where it is parsed as markup; a prompt must fit the
    context. The answer and the logits are scripted.
    """

    model_name = "fuzz-guard"

    def __init__(self, *, answer: str = "safe", n_ctx: int = 8192, llama3: bool = True,
                 logits: str = "scripted") -> None:
        """``logits``: "scripted" (the answer's first word likely), "flat", or "nan" (what a
        model with damaged weights gives)."""
        self.answer = answer
        self.n_ctx = n_ctx
        self.llama3 = llama3
        self.logits = logits

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False
                 ) -> list[int]:
        data = text.encode("utf-8")  # as Engine._tokenize does: strict
        specials = _SPECIALS if self.llama3 else _SPECIALS[4:]
        if not parse_special:
            return list(data)
        out: list[int] = []
        for part in _SPECIAL_SPLIT.split(text):
            if part in specials:
                out.append(_SPECIAL_IDS[part])
            else:
                out.extend(part.encode("utf-8"))
        return out

    def tokenize_pieces(self, pieces: Sequence[Any]) -> list[int]:
        return [t for p in pieces
                for t in self.tokenize(p.text, add_special=False, parse_special=p.trusted)]

    def chat_tokens(self, messages: Sequence[Any]) -> list[int]:
        out: list[int] = []
        for m in messages:
            out += [_SPECIAL_IDS["<|im_start|>"], *f"{m['role']}\n".encode()]
            out += self.tokenize(m["content"], add_special=False)
            out += [_SPECIAL_IDS["<|im_end|>"], 10]
        return [*out, _SPECIAL_IDS["<|im_start|>"], *b"assistant\n"]

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        data = b"".join(bytes([t]) if t < 256 else
                        _SPECIALS[t - 256].encode() if special else b"" for t in tokens)
        return data.decode("utf-8", "replace")

    def next_token_logits(self, prompt: Sequence[int]) -> Any:
        import numpy as np

        if len(prompt) > self.n_ctx:
            raise AssertionError(f"a {len(prompt)}-token prompt in a {self.n_ctx}-token context")
        logits = np.zeros(_VOCAB, dtype=np.float32)
        if self.logits == "nan":  # a model with broken weights
            logits[:] = np.nan
        elif self.logits == "flat":
            pass
        else:
            logits[ord("\n")] = 5.0 if len(prompt) % 3 else 0.0  # a blank line first, sometimes
            logits[ord("s")], logits[ord("u")] = 3.0, 2.0
        return logits

    def generate(self, prompt: Sequence[int], params: Any, on_text: Any = None) -> Any:
        if len(prompt) >= self.n_ctx:
            raise AssertionError(f"a {len(prompt)}-token prompt in a {self.n_ctx}-token context")
        return SimpleNamespace(text=self.answer, tokens=[], finish_reason="stop")
