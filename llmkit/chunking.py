"""Plan how a long document splits into chunks that each fit a model's token budget."""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, Protocol

from llmkit.engines.base import Engine
from llmkit.errors import ChunkingError

Boundary = Literal["end", "section", "paragraph", "line", "sentence", "word", "token", "char"]

DEFAULT_OVERLAP = 64
# A coarser boundary wins over a finer one as long as the chunk it ends still holds at least
# this share of what the budget could have held.
MIN_FILL = 0.5

_SECTION, _PARAGRAPH, _LINE, _SENTENCE, _WORD = range(5)
_LEVEL_NAMES: tuple[Boundary, ...] = ("section", "paragraph", "line", "sentence", "word")

_SPACE_RUN = re.compile(r"\s+")
# CommonMark's ATX heading: up to three spaces of indent, one to six '#', then a space, a tab
# or the end of the line ("#include" or "#hashtag" lines are not headings).
_HEADING = re.compile(r"^ {0,3}#{1,6}(?=[ \t\r\n]|\Z)", re.MULTILINE)
# Chinese and Japanese put no space after a full stop, so the stop itself ends the sentence.
_CJK_STOP = re.compile(r"[。！？]+[」』”’）]*")
_STOPS = frozenset(".!?…。！？")
_CLOSERS = frozenset("\"')]}»”’」』）")
# How far a hard cut may move to avoid splitting a grapheme (an emoji sequence, a letter and
# its accents, CR LF) before it gives up and splits it anyway.
_GRAPHEME_SLACK = 16


class Tokenizer(Protocol):
    """What the planner needs from a model's tokenizer."""

    def count(self, text: str) -> int:
        """Number of tokens in ``text``, without BOS or other special tokens."""
        ...

    def pieces(self, text: str) -> list[bytes] | None:
        """Each token's bytes, in order (they join back to ``text`` in UTF-8); None if unknown."""
        ...


class EngineTokenizer:
    """A model's tokenizer as the planner sees it: token counts without BOS or specials, and
    each token's bytes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def count(self, text: str) -> int:
        return len(self.engine.tokenize(text, add_special=False)) if text else 0

    def pieces(self, text: str) -> list[bytes] | None:
        return list(self.engine.token_pieces(text))


@dataclass(frozen=True)
class Chunk:
    """One chunk of a document: its own span, after the overlap copied from the chunk before.

    ``start``/``end`` are character offsets of the chunk's own text (consecutive chunks' own
    spans partition the document); the model is given ``text[context_start:end]``, which is
    ``tokens`` tokens long. ``boundary`` says what the chunk ends on.
    """

    index: int
    start: int
    end: int
    context_start: int
    tokens: int
    boundary: Boundary

    def text_in(self, document: str) -> str:
        """The text to give the model: the overlap followed by this chunk's own text."""
        return document[self.context_start:self.end]


def plan_chunks(text: str, tokenizer: Tokenizer, budget: int, *,
                overlap: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """Split ``text`` into chunks of at most ``budget`` tokens each, at natural boundaries.

    Chunks are filled greedily and end at the coarsest boundary that still leaves them at least
    half full: a Markdown heading or two blank lines, a blank line, a line break, a sentence end,
    a space, and, inside a run without spaces, a token boundary (or a character, when the
    tokenizer cannot give its pieces). Every chunk's token count is checked with
    ``tokenizer.count``; ``tokenizer.count`` and ``tokenizer.pieces`` are only ever given pieces
    of about one chunk, so planning stays linear in the document's length.

    Args:
        text: The document.
        tokenizer: The model's tokenizer.
        budget: Most tokens a chunk (overlap included) may have.
        overlap: Tokens from the end of each chunk repeated at the start of the next, for
            context; capped at a quarter of ``budget``; 0 for none.

    Returns:
        The chunks in document order; ``[]`` for an empty document.

    Raises:
        ChunkingError: ``budget`` is below 1, ``overlap`` is negative, or a single character
            needs more tokens than ``budget``.
    """
    if budget < 1:
        raise ChunkingError(f"a chunk budget of {budget} tokens cannot hold any text",
                            hint="give the model a larger context window")
    if overlap < 0:
        raise ChunkingError(f"a chunk overlap of {overlap} tokens is negative",
                            hint="use 0 for no overlap")
    if not text:
        return []
    planner = _Planner(text, tokenizer, budget, min(overlap, budget // 4))
    chunks: list[Chunk] = []
    start = context_start = 0
    while start < len(text):
        found = planner.chunk_at(context_start, start)
        if found is None and context_start < start:
            # The overlap left no room for the next character: this chunk goes without it.
            context_start = start
            found = planner.chunk_at(context_start, start)
        if found is None:
            raise planner.too_small(start)
        end, tokens, boundary = found
        chunks.append(Chunk(len(chunks), start, end, context_start, tokens, boundary))
        planner.learn(context_start, end, tokens)
        context_start = planner.overlap_start(start, end)
        start = end
    return chunks


def group_for_merge(texts: Sequence[str], tokenizer: Tokenizer, budget: int, *,
                    separator: str = "\n\n") -> list[list[int]]:
    """Group consecutive texts (partial summaries) so that each group, joined, fits ``budget``.

    Args:
        texts: The texts, in order.
        tokenizer: The model's tokenizer.
        budget: Most tokens ``separator.join(group)`` may have.
        separator: What the caller puts between the texts of a group.

    Returns:
        Lists of indices into ``texts``: consecutive, each index exactly once, in order. A text
        that alone exceeds ``budget`` is a group of its own (the caller chunks it).

    Raises:
        ChunkingError: ``budget`` is below 1.
    """
    if budget < 1:
        raise ChunkingError(f"a merge budget of {budget} tokens cannot hold any text",
                            hint="give the model a larger context window")
    join_cost = tokenizer.count(separator) if separator else 0
    sizes = [tokenizer.count(t) for t in texts]
    groups: list[list[int]] = []
    i = 0
    while i < len(texts):
        group, estimate = [i], sizes[i]
        for j in range(i + 1, len(texts)):
            if estimate + join_cost + sizes[j] > budget:
                break
            estimate += join_cost + sizes[j]
            group.append(j)
        # The sum of the parts is only an estimate: a join can tokenize to more.
        while len(group) > 1 and tokenizer.count(separator.join(texts[k] for k in group)) > budget:
            group.pop()
        groups.append(group)
        i = group[-1] + 1
    return groups


def _utf8_len(ch: str) -> int:
    code = ord(ch)
    return 1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4


def _clean_cut(text: str, pos: int) -> bool:
    """Whether cutting before ``text[pos]`` keeps every grapheme (roughly) whole."""
    if pos <= 0 or pos >= len(text):
        return True
    before, after = text[pos - 1], text[pos]
    if (before == "\r" and after == "\n") or "\u200d" in (before, after):
        return False
    code = ord(after)
    return not (unicodedata.category(after).startswith("M")  # accents, vowel signs
                or 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF  # variation selectors
                or 0x1F3FB <= code <= 0x1F3FF  # emoji skin tones
                or 0xE0020 <= code <= 0xE007F)  # emoji tag sequences (flags of regions)


def _ends_sentence(text: str, pos: int) -> bool:
    """Whether the text before ``pos`` ends with a sentence stop (closing quotes allowed)."""
    i = pos - 1
    while i >= 0 and text[i] in _CLOSERS:
        i -= 1
    return i >= 0 and text[i] in _STOPS


def _find_boundaries(text: str) -> tuple[list[int], list[int]]:
    """Every natural place to end a chunk, sorted, with the coarsest level that applies there.

    A boundary is the offset just after a run of whitespace (so the whitespace stays with the
    chunk before), the start of a heading line, or just after a CJK sentence stop.
    """
    n = len(text)
    levels: dict[int, int] = {}
    for match in _SPACE_RUN.finditer(text):
        begin, end = match.span()
        if end >= n:
            continue
        run = match.group()
        breaks = run.count("\n") + run.count("\r") - run.count("\r\n")
        if breaks >= 3:
            level = _SECTION
        elif breaks == 2:
            level = _PARAGRAPH
        elif breaks == 1:
            level = _LINE
        elif _ends_sentence(text, begin):
            level = _SENTENCE
        else:
            level = _WORD
        levels[end] = level
    for match in _HEADING.finditer(text):
        if match.start() > 0:
            levels[match.start()] = _SECTION
    for match in _CJK_STOP.finditer(text):
        end = match.end()
        if end < n and not text[end].isspace():
            levels[end] = min(levels.get(end, _SENTENCE), _SENTENCE)
    positions = sorted(levels)
    return positions, [levels[p] for p in positions]


@dataclass
class _Pieces:
    """One tokenization of ``text[begin:...]``: where each token ends, in bytes and characters."""

    begin: int
    ends: list[int]  # byte offset where each token ends, relative to begin
    char_bytes: list[int] | None  # byte offset of each character; None when the text is ASCII

    def byte_at(self, pos: int) -> int:
        i = pos - self.begin
        return i if self.char_bytes is None else self.char_bytes[i]

    def char_at(self, offset: int) -> int | None:
        """The character position at byte ``offset``, or None if that is inside a character."""
        if self.char_bytes is None:
            return self.begin + offset
        i = bisect_left(self.char_bytes, offset)
        if i < len(self.char_bytes) and self.char_bytes[i] == offset:
            return self.begin + i
        return None

    def char_at_or_before(self, offset: int) -> int:
        if self.char_bytes is None:
            return self.begin + offset
        return self.begin + bisect_right(self.char_bytes, offset) - 1

    def char_at_or_after(self, offset: int) -> int:
        if self.char_bytes is None:
            return self.begin + offset
        return self.begin + bisect_left(self.char_bytes, offset)

    def tokens_before(self, pos: int) -> int:
        """Tokens needed to cover ``[begin, pos)``: a token cut in two still costs one."""
        if pos <= self.begin:
            return 0
        return bisect_left(self.ends, self.byte_at(pos)) + 1

    def last_cut(self, start: int, limit: int, clean: Callable[[int], bool]) -> int | None:
        """The last character position in (start, limit] where a token ends.

        Token ends inside a UTF-8 character (byte-level tokens of an emoji or a CJK character)
        are skipped; one that splits no grapheme is preferred if there is one near ``limit``.
        """
        fallback: int | None = None
        passed = 0
        k = bisect_right(self.ends, self.byte_at(limit)) - 1
        while k >= 0 and passed <= _GRAPHEME_SLACK:
            pos = self.char_at(self.ends[k])
            k -= 1
            if pos is None:
                continue
            if pos <= start:
                break
            if clean(pos):
                return pos
            if fallback is None:
                fallback = pos
            passed += 1
        return fallback


class _Planner:
    """The state of one planning run: the text, its boundaries, and what was learnt so far."""

    def __init__(self, text: str, tokenizer: Tokenizer, budget: int, overlap: int) -> None:
        self.text = text
        self.tokenizer = tokenizer
        self.budget = budget
        self.overlap = overlap
        self.positions, self.levels = _find_boundaries(text)
        self.use_pieces = True
        # Sizes the first window only; each planned chunk replaces it with what it measured.
        self.chars_per_token = 4.0

    def count(self, begin: int, end: int) -> int:
        return self.tokenizer.count(self.text[begin:end])

    def learn(self, begin: int, end: int, tokens: int) -> None:
        self.chars_per_token = min(64.0, max(0.25, (end - begin) / max(1, tokens)))

    def pieces(self, begin: int, end: int) -> _Pieces | None:
        """Token ends of ``text[begin:end]``, or None (from then on) if the tokenizer can't say."""
        if not self.use_pieces:
            return None
        part = self.text[begin:end]
        found = self.tokenizer.pieces(part)
        try:
            data = part.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no byte offsets to speak of
            found = None
        # Pieces that don't join back (a SentencePiece leading space, a normalizing tokenizer)
        # cannot locate token ends in our text; binary search with count() is then exact.
        if found is None or b"".join(found) != data:
            self.use_pieces = False
            return None
        ends = list(accumulate(len(p) for p in found))
        char_bytes = (None if len(data) == len(part)
                      else list(accumulate((_utf8_len(c) for c in part), initial=0)))
        return _Pieces(begin, ends, char_bytes)

    def chunk_at(self, context_start: int, start: int) -> tuple[int, int, Boundary] | None:
        """(end, tokens, boundary) of the chunk whose own text begins at ``start``.

        None when not even one character after ``start`` fits.
        """
        n, budget = len(self.text), self.budget
        exact: dict[int, int] = {}

        def exact_count(pos: int) -> int:
            if pos not in exact:
                exact[pos] = self.count(context_start, pos)
            return exact[pos]

        def fitting_limit(low: int, high: int) -> int:
            # The last position in [low, high) that fits, given that low fits and high doesn't.
            while high - low > 1:
                mid = (low + high) // 2
                if exact_count(mid) <= budget:
                    low = mid
                else:
                    high = mid
            return low

        # A window of about 1.25 budgets; doubled until it holds more than the budget, so no
        # call ever sees much more than one chunk's worth of text.
        span = min(n - context_start, int(budget * self.chars_per_token * 1.25) + 32)
        while True:
            stop = context_start + span
            tokens = self.pieces(context_start, stop)
            total = len(tokens.ends) if tokens is not None else exact_count(stop)
            if total > budget or stop == n:
                break
            span = min(n - context_start, span * 2)

        estimate: Callable[[int], int] = exact_count
        if total <= budget:
            whole = exact_count(n)
            if whole <= budget:
                return n, whole, "end"
            limit = fitting_limit(start, n)
        elif tokens is not None:
            limit = tokens.char_at_or_before(tokens.ends[budget - 1])
            estimate = tokens.tokens_before
        else:
            limit = fitting_limit(start, stop)
        if limit <= start and estimate is not exact_count:
            # The window's tokenization may merge differently than the chunk's own would.
            estimate = exact_count
            limit = stop if exact_count(stop) <= budget else fitting_limit(start, stop)
            if limit == n:
                return n, exact_count(n), "end"
        if limit <= start:
            return None

        context = estimate(start) if start > context_start else 0
        room = max(1, estimate(limit) - context)
        while True:
            end, boundary = self.choose_end(start, limit, estimate, context, room, tokens)
            if end <= start:
                return None
            used = exact_count(end)
            if used <= budget:
                return end, used, boundary
            if estimate is not exact_count:
                # The pieces' estimate was optimistic here: go on with exact counts.
                estimate = exact_count
                limit = fitting_limit(start, end)
            else:
                # count() is not monotonic in the text's length for every tokenizer.
                limit = end - 1
            if limit <= start:
                return None

    def choose_end(self, start: int, limit: int, estimate: Callable[[int], int], context: int,
                   room: int, tokens: _Pieces | None) -> tuple[int, Boundary]:
        """Where a chunk reaching at most ``limit`` should end, and on what.

        ``estimate(pos)`` is the chunk's token count if it ended at ``pos``, ``context`` that of
        its overlap and ``room`` what its own text could hold.
        """
        positions, levels = self.positions, self.levels
        # best[level]: the last boundary in (start, limit] of that level or a coarser one.
        best: list[int | None] = [None] * len(_LEVEL_NAMES)
        best_level = [0] * len(_LEVEL_NAMES)
        i = bisect_right(positions, limit) - 1
        while i >= 0 and positions[i] > start and best[_SECTION] is None:
            level = levels[i]
            if best[level] is None:
                for finer in range(level, len(best)):
                    if best[finer] is None:
                        best[finer], best_level[finer] = positions[i], level
            i -= 1
        for level, end in enumerate(best):
            if end is not None and estimate(end) - context >= MIN_FILL * room:
                return end, _LEVEL_NAMES[best_level[level]]

        def clean(pos: int) -> bool:
            return _clean_cut(self.text, pos)

        if tokens is not None:
            cut = tokens.last_cut(start, min(limit, tokens.char_at_or_before(tokens.ends[-1])),
                                  clean)
            if cut is not None:
                return cut, "token"
        for pos in range(limit, max(start, limit - _GRAPHEME_SLACK), -1):
            if clean(pos):
                return pos, "char"
        return limit, "char"

    def overlap_start(self, start: int, end: int) -> int:
        """Where the next chunk's context begins: about ``overlap`` tokens before ``end``.

        It begins at a sentence (or else a word) boundary when one leaves at least half of
        the overlap, and never before ``start``, the previous chunk's own text.
        """
        wanted = self.overlap
        if wanted <= 0 or end >= len(self.text) or end <= start:
            return end
        span = min(end - start, int(wanted * self.chars_per_token * 1.5) + 16)
        while True:
            begin = end - span
            tokens = self.pieces(begin, end)
            total = len(tokens.ends) if tokens is not None else self.count(begin, end)
            if total > wanted or begin == start:
                break
            span = min(end - start, span * 2)
        if total <= wanted:
            return begin
        if tokens is not None:
            first = tokens.char_at_or_after(tokens.ends[total - wanted - 1])
        else:
            # The earliest position whose tail still fits: begin doesn't, end does.
            low, first = begin, end
            while first - low > 1:
                mid = (low + first) // 2
                if self.count(mid, end) <= wanted:
                    first = mid
                else:
                    low = mid
        half = first + (end - first) // 2
        i = bisect_left(self.positions, first)
        word: int | None = None
        while i < len(self.positions) and self.positions[i] <= half:
            if self.levels[i] <= _SENTENCE:
                return self.positions[i]
            if word is None:
                word = self.positions[i]
            i += 1
        if word is not None:
            return word
        for pos in range(first, min(end, first + _GRAPHEME_SLACK)):
            if _clean_cut(self.text, pos):
                return pos
        # Better no overlap at all than a short one that begins inside a grapheme.
        return end if end - first <= _GRAPHEME_SLACK else first

    def too_small(self, start: int) -> ChunkingError:
        char = self.text[start]
        need = self.count(start, start + 1)
        return ChunkingError(
            f"the character U+{ord(char):04X} at offset {start} needs {need} tokens, more than "
            f"the chunk budget of {self.budget}",
            hint="give the model a larger context window")
