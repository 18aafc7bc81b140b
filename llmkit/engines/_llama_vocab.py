"""llama.cpp's tokenizer, chat prompts and sampler chain on a llama_vocab, for both engines."""

from __future__ import annotations

import codecs
import ctypes
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmkit.chat_template import (
    ChatTemplate,
    Escapes,
    Piece,
    SpecialToken,
    SpecialTokens,
    defuse_value,
)
from llmkit.engines.base import Generation, Message, SamplingParams
from llmkit.errors import SchemaError

# Used when a GGUF carries no chat template: ChatML is what most small instruct models speak.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# llama_token_attr bits (llama.h): what llama.cpp matches as a whole in prompt text.
_ATTR_UNKNOWN, _ATTR_CONTROL, _ATTR_USER_DEFINED = 1 << 0, 1 << 3, 1 << 4
_ATTR_LSTRIP, _ATTR_RSTRIP = 1 << 7, 1 << 8


class deferred_interrupt:
    """Hold Ctrl-C until a native call (load, free, a llama_decode) returns, then raise it.

    A KeyboardInterrupt raised inside llama.cpp's log callback cannot reach Python code: ctypes
    prints it as "Exception ignored" and the call carries on. llama.cpp logs while it builds a
    graph, so every llama_decode is such a call; SIGINT only sets a flag here. A class, not a
    generator: it wraps each decoded token (5.8 µs a use, measured with timeit).
    """

    __slots__ = ("_hits", "_previous")

    def __init__(self) -> None:
        self._hits: list[int] = []
        self._previous: Any = None

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._hold)

    def _hold(self, signum: int, _frame: Any) -> None:
        self._hits.append(signum)

    def __exit__(self, *_exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if self._hits:
            self._hits.clear()
            raise KeyboardInterrupt


class VocabText:
    """Text ↔ tokens, chat prompts and samplers through llama.cpp, for an engine holding a
    llama_model (``_model``), its llama_vocab (``_vocab``) and the bindings (``_lc``).

    A mixin: the llama.cpp engine holds a whole model, the Llama 3.2 Vision engine a
    vocabulary-only one; both tokenize, render and sample exactly alike through it.
    """

    _lc: Any
    _model: Any
    _vocab: Any
    model_name: str
    _template: ChatTemplate | None = None
    _specials: SpecialTokens | None = None

    @property
    def chat_template(self) -> str:
        """The model's own chat template, or '' when it has none."""
        raw = self._lc.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8", "replace") if raw else ""

    # -- text <-> tokens ------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False
                 ) -> list[int]:
        """Text to token ids (``add_special`` adds BOS where the model wants one).

        Without ``parse_special`` the text never becomes a chat-markup special token, not even
        a USER_DEFINED one (which llama.cpp would otherwise match in any text).
        """
        if not parse_special:
            pieces = self.special_tokens().plain_pieces(text)
            if len(pieces) > 1:
                tokens = self._tokenize(pieces[0], add_special, False)
                for piece in pieces[1:]:
                    tokens.extend(self._tokenize(piece, False, False))
                return tokens
        return self._tokenize(text, add_special, parse_special)

    def _tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        lc = self._lc
        data = text.encode("utf-8")
        size = len(data) + 8
        buf = (lc.llama_token * size)()
        n = lc.llama_tokenize(self._vocab, data, len(data), buf, size, add_special, parse_special)
        if n < 0:
            size = -n
            buf = (lc.llama_token * size)()
            n = lc.llama_tokenize(self._vocab, data, len(data), buf, size, add_special,
                                  parse_special)
        return list(buf[:n])

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        """Token ids back to text."""
        lc = self._lc
        arr = (lc.llama_token * max(1, len(tokens)))(*tokens)
        size = 8 * len(tokens) + 16
        buf = ctypes.create_string_buffer(size)
        n = lc.llama_detokenize(self._vocab, arr, len(tokens), buf, size, False, special)
        if n < 0:
            size = -n
            buf = ctypes.create_string_buffer(size)
            n = lc.llama_detokenize(self._vocab, arr, len(tokens), buf, size, False, special)
        return buf.raw[:n].decode("utf-8", "replace")

    def token_pieces(self, text: str) -> list[bytes]:
        """The bytes each token of ``text`` stands for (no special tokens), in order."""
        lc = self._lc
        buf = ctypes.create_string_buffer(256)
        pieces = []
        for token in self.tokenize(text, add_special=False):
            n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
            pieces.append(buf.raw[:n])
        return pieces

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        raw = self._lc.llama_vocab_get_text(self._vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def special_tokens(self) -> SpecialTokens:
        """The vocabulary's special tokens as llama.cpp matches them, and which of them user
        text must never produce (read from the vocabulary once)."""
        if self._specials is None:
            lc, vocab = self._lc, self._vocab
            get_attr = lc.llama_vocab_get_attr
            wanted = _ATTR_CONTROL | _ATTR_USER_DEFINED | _ATTR_UNKNOWN
            found = [(i, a) for i, a in ((i, get_attr(vocab, i))
                                         for i in range(lc.llama_vocab_n_tokens(vocab)))
                     if a & wanted]
            markup = self.chat_template or FALLBACK_TEMPLATE
            ends = {lc.llama_vocab_bos(vocab), lc.llama_vocab_eos(vocab),
                    lc.llama_vocab_eot(vocab)}
            tokens, protected, user_defined = [], [], []
            for token, attr in found:
                text = self._token_text(token)
                tokens.append(SpecialToken(token, text, bool(attr & _ATTR_LSTRIP),
                                           bool(attr & _ATTR_RSTRIP)))
                if attr & (_ATTR_CONTROL | _ATTR_UNKNOWN):
                    protected.append(text)
                elif text in markup or token in ends or lc.llama_vocab_is_eog(vocab, token):
                    protected.append(text)
                    user_defined.append(text)
            self._specials = SpecialTokens(tokens, protected, user_defined)
        return self._specials

    # -- chat prompts ---------------------------------------------------------------------

    def _chat_template(self) -> ChatTemplate:
        if self._template is None:
            lc = self._lc
            self._template = ChatTemplate(
                self.chat_template or FALLBACK_TEMPLATE,
                eos_token=self._token_text(lc.llama_vocab_eos(self._vocab)),
                bos_token=self._token_text(lc.llama_vocab_bos(self._vocab)),
                owner=self.model_name)
        return self._template

    @property
    def reads_tools(self) -> bool:
        """Whether the chat template writes function definitions (``tools``) into the prompt."""
        return self._chat_template().reads_tools

    def render_chat(self, messages: Sequence[Message], *,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """Messages rendered through the model's chat template, ready for the reply.

        Raises:
            ChatTemplateError: the template is not valid Jinja or exceeded a rendering bound.
            ChatTemplateRejected: the template refused the conversation.
        """
        return self._chat_template().render(messages, tools=tools)

    def _render_prompt(self, messages: Sequence[Any],
                       tools: Sequence[Mapping[str, Any]] | None = None
                       ) -> tuple[str, Escapes | None]:
        """The rendered conversation, and the escapes its untrusted text needed (None: none,
        so the text is tokenized whole, exactly as llama.cpp would).

        Every string in the messages (typed content parts included) is untrusted;
        special-token texts in them are replaced by placeholders before rendering and put back
        as plain text after it, so that only the template's own markup becomes special tokens.
        """
        template = self._chat_template()
        specials = self.special_tokens()
        escapes = Escapes()
        escaped = [escapes.escape_value(m, specials) for m in messages]
        escaped_tools = escapes.escape_value(list(tools), specials) if tools else None
        if not escapes.table:
            return template.render(messages, tools=tools), None
        text = template.render(escaped, tools=escaped_tools)
        if escapes.intact(text):
            return text, escapes
        # The template cut a placeholder (it slices or reverses message text): render the
        # special texts broken up instead, which no tokenizer matches.
        return template.render([defuse_value(m, specials) for m in messages],
                               tools=defuse_value(list(tools), specials) if tools else None
                               ), None

    def _text_tokens(self, text: str, escapes: Escapes | None) -> list[int]:
        """Tokens of rendered prompt text in which only ``escapes``' placeholders are user text."""
        if escapes is None:
            return self._tokenize(text, False, True)
        tokens: list[int] = []
        for part in self.special_tokens().partition(text):
            if isinstance(part, int):
                tokens.append(part)
            else:
                # One call per run between special tokens, as llama.cpp tokenizes them (a
                # SentencePiece space prefix goes on each run that follows a special token).
                tokens.extend(self.tokenize(escapes.restore(part), add_special=False))
        return tokens

    def _with_bos(self, tokens: list[int]) -> list[int]:
        lc = self._lc
        bos = lc.llama_vocab_bos(self._vocab)
        if lc.llama_vocab_get_add_bos(self._vocab) and bos >= 0 and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        return tokens

    def chat_tokens(self, messages: Sequence[Message], *,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Render and tokenize a conversation, with BOS exactly once when the model wants it.

        Message text (roles and contents) never becomes a special token: only the chat
        template's own markup does.

        Raises:
            ChatTemplateError, ChatTemplateRejected: see :meth:`render_chat`.
        """
        text, escapes = self._render_prompt(messages, tools)
        return self._with_bos(self._text_tokens(text, escapes))

    def tokenize_pieces(self, pieces: Sequence[Piece]) -> list[int]:
        """Tokenize a prompt written as pieces: trusted markup may hold special tokens, the
        other pieces are plain text (no BOS is added)."""
        specials = self.special_tokens()
        escapes = Escapes()
        text = "".join(p.text if p.trusted else escapes.escape(p.text, specials) for p in pieces)
        return self._text_tokens(text, escapes if escapes.table else None)

    # -- sampling -------------------------------------------------------------------------

    def _sampler(self, params: SamplingParams) -> Any:
        """llama.cpp's sampler chain for ``params``: grammar → penalties → top-k → top-p →
        min-p → temperature → dist, or grammar → greedy at temperature 0 (free it after use).

        Raises:
            SchemaError: llama.cpp cannot parse the grammar.
        """
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        if params.grammar:
            grammar = lc.llama_sampler_init_grammar(
                self._vocab, params.grammar.encode("utf-8"), b"root"
            )
            if not grammar:
                lc.llama_sampler_free(chain)
                raise SchemaError("llama.cpp could not parse the grammar built from the schema")
            lc.llama_sampler_chain_add(chain, grammar)
        if params.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            return chain
        if params.repeat_penalty != 1.0:
            lc.llama_sampler_chain_add(
                chain, lc.llama_sampler_init_penalties(64, params.repeat_penalty, 0.0, 0.0)
            )
        if params.top_k > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_min_p(params.min_p, 1))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(params.temperature))
        seed = lc.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
        return chain


class TextStream:
    """Generated tokens as text: each token's piece through an incremental UTF-8 decoder, so
    ``on_text`` only ever gets complete characters (a character split across tokens waits)."""

    def __init__(self, lc: Any, vocab: Any, on_text: Callable[[str], None] | None) -> None:
        self._to_piece = lc.llama_token_to_piece
        self._vocab = vocab
        self._buf = ctypes.create_string_buffer(256)
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._on_text = on_text
        self.pieces: list[str] = []

    def push(self, token: int) -> None:
        """Add one generated token's text."""
        buf = self._buf
        n = self._to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # a piece longer than the buffer: llama.cpp says how long
            buf = self._buf = ctypes.create_string_buffer(-n)
            n = self._to_piece(self._vocab, token, buf, len(buf), 0, False)
        self._emit(self._decoder.decode(buf.raw[:n]) if n > 0 else "")

    def finish(self) -> None:
        """Flush what the decoder still holds (an incomplete character becomes U+FFFD)."""
        self._emit(self._decoder.decode(b"", final=True))

    def _emit(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            if self._on_text is not None:
                self._on_text(text)


@dataclass
class Sampled:
    """What a sampling loop produced, before it is wrapped in a Generation."""

    pieces: list[str]
    tokens: list[int]
    finish: str
    t_first: float

    def generation(self, n_prompt: int, n_evaluated: int, t0: float, t_prompt: float
                   ) -> Generation:
        """The Generation, timed from ``t0`` (start) and ``t_prompt`` (prompt evaluated)."""
        t_first = max(self.t_first, t_prompt)
        return Generation(
            text="".join(self.pieces),
            prompt_tokens=n_prompt,
            prompt_tokens_evaluated=n_evaluated,
            completion_tokens=len(self.tokens),
            finish_reason=self.finish,
            prompt_ms=(t_prompt - t0) * 1000,
            generation_ms=(time.perf_counter() - t_prompt) * 1000,
            first_token_ms=(t_first - t0) * 1000,
            tokens=self.tokens,
        )
