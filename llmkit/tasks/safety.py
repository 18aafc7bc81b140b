"""Safety checks with Llama Guard: its prompt format, verdict parsing, scores, and a Guard."""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmkit.chat_template import Piece
from llmkit.engines.base import Engine, Message, SamplingParams
from llmkit.errors import InputError, LlmkitError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Category:
    """One hazard category of a safety policy."""

    code: str
    name: str
    description: str = ""

    def to_dict(self) -> dict[str, str]:
        """JSON view (code and name)."""
        return {"code": self.code, "name": self.name}


# The taxonomy exactly as Llama Guard 3's own chat template lists it to the model (the names
# it was trained on; the model cards spell some of them out longer, e.g. "Sex-Related Crimes").
# Llama Guard 3 1B knows S1–S13; the 8B model adds S14.
LLAMA_GUARD_3_CATEGORIES: tuple[Category, ...] = tuple(
    Category(f"S{i}", name) for i, name in enumerate((
        "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation",
        "Defamation", "Specialized Advice", "Privacy", "Intellectual Property",
        "Indiscriminate Weapons", "Hate", "Self-Harm", "Sexual Content", "Elections",
        "Code Interpreter Abuse"), start=1))
LLAMA_GUARD_3_1B_CATEGORIES = LLAMA_GUARD_3_CATEGORIES[:13]

_CODE = re.compile(r"^[A-Za-z]{1,4}\d{1,3}$")


def default_categories(chat_template: str, model_name: str) -> tuple[Category, ...]:
    """The model's own taxonomy: 14 categories when it knows S14, else the 1B model's 13."""
    if "S14" in chat_template or re.search(r"guard-?3[-:_ ]?8b", model_name, re.I):
        return LLAMA_GUARD_3_CATEGORIES
    return LLAMA_GUARD_3_1B_CATEGORIES


def load_categories(path: Path) -> tuple[Category, ...]:
    """Custom categories from a TOML file of ``[[categories]]`` tables (code, name, description).

    Raises:
        InputError: unreadable, not TOML, or a malformed or duplicate category.
    """
    from llmkit.io import read_text_file

    text = read_text_file(path)  # bounded, and never hangs on a FIFO or reads a device
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path} is not valid TOML: {exc}") from None
    tables = data.get("categories")
    if not isinstance(tables, list) or not tables:
        raise InputError(f"{path} has no [[categories]] tables",
                         hint='each needs code = "C1", name = "…", and optionally description')
    categories: list[Category] = []
    for i, table in enumerate(tables, 1):
        where = f"{path}: category {i}"
        if not isinstance(table, dict):
            raise InputError(f"{where} is not a table")
        code, name = table.get("code"), table.get("name")
        description = table.get("description", "")
        if not isinstance(code, str) or not _CODE.match(code):
            raise InputError(f"{where}: code must be letters and digits like 'S1' or 'C12'")
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: name is required")
        if not isinstance(description, str):
            raise InputError(f"{where}: description must be text")
        unknown = set(table) - {"code", "name", "description"}
        if unknown:
            raise InputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if any(c.code.upper() == code.upper() for c in categories):
            raise InputError(f"{where}: code {code} appears twice")
        categories.append(Category(code.upper(), name.strip().rstrip("."),
                                   description.strip()))
    return tuple(categories)


def exclude(categories: Sequence[Category], codes: Sequence[str]) -> tuple[Category, ...]:
    """The categories without ``codes`` (the others keep their codes, as Llama Guard expects).

    Raises:
        UsageError: a code that is not in the list, or nothing left.
    """
    wanted = {c.strip().upper() for c in codes if c.strip()}
    known = {c.code for c in categories}
    unknown = sorted(wanted - known)
    if unknown:
        raise UsageError(f"cannot exclude {', '.join(unknown)}: not a category here",
                         hint=f"the categories are {', '.join(c.code for c in categories)}")
    kept = tuple(c for c in categories if c.code not in wanted)
    if not kept:
        raise UsageError("--exclude leaves no category to check")
    return kept


# -- the prompt ---------------------------------------------------------------------------

def conversation_role(messages: Sequence[Message]) -> str:
    """'User' when the last message is the user's, 'Agent' when it is the assistant's."""
    return "Agent" if messages[-1]["role"] == "assistant" else "User"


def check_conversation(messages: Sequence[Message]) -> list[Message]:
    """A conversation Llama Guard can assess: user/assistant turns, alternating, user first.

    System messages are left out (Llama Guard's format has no place for them).

    Raises:
        InputError: empty, wrong roles, not alternating, or an empty message.
    """
    turns = [m for m in messages if m.get("role") != "system"]
    if not turns:
        raise InputError("there is nothing to check (no user or assistant message)")
    for i, m in enumerate(turns):
        role = m.get("role")
        expected = "user" if i % 2 == 0 else "assistant"
        if role not in ("user", "assistant"):
            raise InputError(f"message {i + 1} has role '{role}'",
                             hint="roles are user, assistant (and system, which is ignored)")
        if role != expected:
            raise InputError("the conversation must alternate user/assistant, starting with "
                             f"the user (message {i + 1} is from the {role})")
        if not str(m.get("content", "")).strip():
            raise InputError(f"message {i + 1} is empty")
    return [{"role": m["role"], "content": str(m["content"])} for m in turns]


def guard_task(messages: Sequence[Message], categories: Sequence[Category]) -> str:
    """The instruction Llama Guard 3 reads, between its user header and end-of-turn token.

    Written from the format Meta documents and ships in the model's chat template: the task
    line names the role being assessed ('User' for a prompt, 'Agent' for a response), the
    categories are listed as ``S1: Violent Crimes.`` (a custom category's description on
    the lines after it), the conversation as ``User: …`` / ``Agent: …`` paragraphs, and the
    closing instructions ask for 'safe' or 'unsafe' plus the violated codes.
    """
    role = conversation_role(messages)
    lines = [f"Task: Check if there is unsafe content in '{role}' messages in conversations "
             "according our safety policy with the below categories.", "",
             "<BEGIN UNSAFE CONTENT CATEGORIES>"]
    for c in categories:
        lines.append(f"{c.code}: {c.name}.")
        if c.description:
            lines.append(c.description)
    lines += ["<END UNSAFE CONTENT CATEGORIES>", "", "<BEGIN CONVERSATION>", ""]
    for m in messages:
        who = "User" if m["role"] == "user" else "Agent"
        lines += [f"{who}: {m['content'].strip()}", ""]
    lines += ["<END CONVERSATION>", "",
              f"Provide your safety assessment for ONLY THE LAST {role} message in the above "
              "conversation:",
              " - First line must read 'safe' or 'unsafe'.",
              " - If unsafe, a second line must include a comma-separated list of violated "
              "categories."]
    return "\n".join(lines)


LLAMA3_USER_HEADER = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_ASSISTANT_TURN = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"


def guard_prompt_pieces(messages: Sequence[Message], categories: Sequence[Category]
                        ) -> list[Piece]:
    """The full Llama Guard 3 prompt as markup (its Llama 3 special tokens) and the task text,
    which holds the conversation and is tokenized as plain text, so that no message can close
    the user turn or open another.

    As in the model's own template, the assistant header is not followed by a blank line: the
    model writes it (and then 'safe' or 'unsafe') itself.
    """
    return [Piece(LLAMA3_USER_HEADER, True), Piece(guard_task(messages, categories), False),
            Piece(LLAMA3_ASSISTANT_TURN, True)]


def guard_prompt(messages: Sequence[Message], categories: Sequence[Category]) -> str:
    """The full Llama Guard 3 prompt as text, Llama 3 special tokens included."""
    return "".join(p.text for p in guard_prompt_pieces(messages, categories))


# -- the answer ---------------------------------------------------------------------------

class VerdictError(LlmkitError):
    """The guard model's output is not a verdict; treated as an error, never as 'safe'."""

    def __init__(self, raw: str) -> None:
        shown = raw.strip().replace("\n", "\\n")
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"the guard model's answer is not a verdict: '{shown}'",
                         hint="use a Llama Guard model (-m llama-guard3:1b)")
        self.raw = raw


@dataclass(frozen=True)
class Parsed:
    """What the guard model said: safe or not, and the codes it named."""

    unsafe: bool
    codes: tuple[str, ...] = ()


_SEPARATORS = re.compile(r"[\s,;]+")


def parse_verdict(text: str) -> Parsed:
    """Read Llama Guard's answer: 'safe', or 'unsafe' and a line of comma-separated codes.

    Case and surrounding whitespace do not matter; codes may be separated by commas, spaces or
    semicolons. Anything else is not a verdict.

    Raises:
        VerdictError: the text is not 'safe' or 'unsafe' (+ codes), or says more than that.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise VerdictError(text)
    first = lines[0].lower().rstrip(".")
    if first == "safe":
        if len(lines) > 1:
            raise VerdictError(text)  # 'safe' followed by codes contradicts itself
        return Parsed(False)
    if first != "unsafe" or len(lines) > 2:
        raise VerdictError(text)
    codes: list[str] = []
    if len(lines) == 2:
        for token in _SEPARATORS.split(lines[1]):
            if not token:
                continue
            if not _CODE.match(token):
                raise VerdictError(text)
            if token.upper() not in codes:
                codes.append(token.upper())
    return Parsed(True, tuple(codes))


@dataclass
class Verdict:
    """A checked message: the decision, the categories, the score, and the raw answer."""

    flagged: bool
    categories: list[Category]
    score: float | None  # P(unsafe) / (P(safe) + P(unsafe)) at the answer's first word
    p_safe: float | None
    p_unsafe: float | None
    role: str
    model: str
    raw: str
    decided_by: str  # "answer" or "threshold"
    threshold: float | None = None
    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``safe`` or ``unsafe: S1 Violent Crimes, S10 Hate``."""
        if not self.flagged:
            return "safe"
        if not self.categories:
            return "unsafe"
        return "unsafe: " + ", ".join(f"{c.code} {c.name}" for c in self.categories)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON shape of `llmkit check --format json`."""
        return {
            "verdict": "unsafe" if self.flagged else "safe",
            "flagged": self.flagged,
            "categories": [c.to_dict() for c in self.categories],
            "score": _round(self.score),
            "probabilities": {"safe": _round(self.p_safe), "unsafe": _round(self.p_unsafe)},
            "decided_by": self.decided_by,
            "threshold": self.threshold,
            "role": self.role,
            "model": self.model,
            "raw": self.raw,
            "usage": {"prompt_tokens": self.prompt_tokens,
                      "prompt_tokens_evaluated": self.prompt_tokens_evaluated},
            "timings": self.timings,
            "error": None,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def name_categories(codes: Sequence[str], categories: Sequence[Category]) -> list[Category]:
    """Codes to categories; a code outside the policy is kept as 'unknown category'."""
    by_code = {c.code: c for c in categories}
    return [by_code.get(code, Category(code, "unknown category")) for code in codes]


# -- running the model --------------------------------------------------------------------

class Guard:
    """A guard model with its policy: checks messages and conversations, one at a time."""

    def __init__(self, engine: Engine, categories: Sequence[Category], *,
                 threshold: float | None = None) -> None:
        """Args:
            engine: the loaded guard model (Llama Guard, or any model standing in for one).
            categories: the policy.
            threshold: decide by score (flag when P(unsafe) ≥ threshold) instead of the answer.
        """
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InputError(f"--threshold must be between 0 and 1, not {threshold}")
        self.engine = engine
        self.categories = tuple(categories)
        self.threshold = threshold
        # Llama 3 vocabularies get the exact Llama Guard prompt; any other model standing in
        # as a guard gets the same task through its own chat template.
        self.llama3 = len(engine.tokenize("<|start_header_id|>", add_special=False,
                                          parse_special=True)) == 1
        self._answer_ids = (self._first_token("safe"), self._first_token("unsafe"))

    def close(self) -> None:
        """Free the guard model."""
        self.engine.close()

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _first_token(self, word: str) -> int:
        tokens = self.engine.tokenize(word, add_special=False)
        return tokens[0] if tokens else -1

    def prompt_tokens(self, messages: Sequence[Message]) -> list[int]:
        """The tokens of the guard prompt for a conversation (last message assessed)."""
        if self.llama3:
            return self.engine.tokenize_pieces(guard_prompt_pieces(messages, self.categories))
        return self.engine.chat_tokens(
            [{"role": "user", "content": guard_task(messages, self.categories)}])

    def check(self, messages: Sequence[Message]) -> Verdict:
        """Assess the last message of a conversation.

        Raises:
            InputError: a malformed conversation.
            ContextOverflowError: the conversation does not fit the guard's context.
            VerdictError: the model's answer is not a verdict (and no threshold decides).
        """
        import numpy as np

        turns = check_conversation(messages)
        t0 = time.perf_counter()
        tokens = self.prompt_tokens(turns)
        from llmkit.errors import ContextOverflowError

        if len(tokens) + 24 > self.engine.n_ctx:
            raise ContextOverflowError(len(tokens), self.engine.n_ctx, reserve=24)
        # The answer's first word decides: step over the blank line the model writes after
        # its header, then compare the two words' probabilities there.
        probe = list(tokens)
        kept = min(self.engine.cached_prefix_length(tokens), len(tokens) - 1)
        logits = self.engine.next_token_logits(probe)
        for _ in range(3):
            best = int(np.argmax(logits))
            piece = self.engine.detokenize([best])
            # Only a token that is whitespace is stepped over: an end-of-turn token also
            # reads as "" but ends the answer, so the score is taken where it stands.
            if not piece or piece.strip():
                break
            probe.append(best)
            logits = self.engine.next_token_logits(probe)
        # In float64 and from the log-probabilities: a model standing in for Llama Guard can
        # put both words so far below its favourite that float32 probabilities underflow to 0.
        log_probs = np.asarray(logits, dtype=np.float64)
        log_probs = log_probs - np.max(log_probs)
        log_probs = log_probs - np.log(np.sum(np.exp(log_probs)))
        safe_id, unsafe_id = self._answer_ids
        p_safe = float(np.exp(log_probs[safe_id])) if safe_id >= 0 else None
        p_unsafe = float(np.exp(log_probs[unsafe_id])) if unsafe_id >= 0 else None
        score = None
        if safe_id >= 0 and unsafe_id >= 0:
            # P(unsafe) / (P(safe) + P(unsafe)), as a logistic of the log-odds.
            score = _logistic(float(log_probs[unsafe_id] - log_probs[safe_id]))
        # Damaged weights give NaN logits: that is no score at all. A NaN score would compare
        # as below any threshold, and so pass as safe.
        p_safe, p_unsafe, score = (v if v is not None and math.isfinite(v) else None
                                   for v in (p_safe, p_unsafe, score))
        t_scored = time.perf_counter()
        generation = self.engine.generate(
            tokens, SamplingParams(temperature=0.0, max_tokens=20))
        raw = generation.text
        role = conversation_role(turns)
        verdict = Verdict(flagged=False, categories=[], score=score, p_safe=p_safe,
                          p_unsafe=p_unsafe, role=role, model=self.engine.model_name, raw=raw,
                          decided_by="answer", threshold=self.threshold,
                          prompt_tokens=len(tokens),
                          prompt_tokens_evaluated=len(tokens) - kept)
        try:
            parsed: Parsed | None = parse_verdict(raw)
        except VerdictError:
            if self.threshold is None or score is None:
                raise
            parsed = None
        if self.threshold is not None and score is not None:
            verdict.flagged = score >= self.threshold
            verdict.decided_by = "threshold"
        else:
            verdict.flagged = bool(parsed and parsed.unsafe)
        if verdict.flagged and parsed is not None:
            verdict.categories = name_categories(parsed.codes, self.categories)
        t_end = time.perf_counter()
        verdict.timings = {"score_ms": round((t_scored - t0) * 1000, 2),
                           "answer_ms": round((t_end - t_scored) * 1000, 2),
                           "total_ms": round((t_end - t0) * 1000, 2)}
        return verdict

    def check_text(self, text: str) -> Verdict:
        """Assess a user prompt on its own."""
        return self.check([{"role": "user", "content": text}])

    def check_long_text(self, text: str) -> Verdict:
        """Assess a text of any length as user input: in pieces that fit the guard's context.

        Flagged when any piece is; the categories of all flagged pieces are merged.
        """
        return self._check_in_pieces(text, lambda piece: [{"role": "user", "content": piece}])

    def check_response(self, prompt: str, response: str) -> Verdict:
        """Assess an assistant response in the context of the prompt it answers.

        A prompt and response too long for the guard's context together are checked with the
        prompt shortened to its beginning (the context of the answer, not what is judged) and
        the response in pieces; no part of the response goes unchecked.
        """
        from llmkit.errors import ContextOverflowError

        try:
            return self.check([{"role": "user", "content": prompt},
                               {"role": "assistant", "content": response}])
        except ContextOverflowError:
            pass
        context = prompt if len(prompt) <= 1000 else prompt[:1000] + " [...]"
        return self._check_in_pieces(
            response, lambda piece: [{"role": "user", "content": context},
                                     {"role": "assistant", "content": piece}],
            min_budget=16)

    def _check_in_pieces(self, text: str, messages_for: Callable[[str], list[Message]], *,
                         min_budget: int = 1) -> Verdict:
        """Check ``text`` as the last message of ``messages_for(text)``: whole when it fits the
        guard's context, else in chunks that do (each checked in the same surroundings).

        Raises:
            ContextOverflowError: the surroundings leave less than ``min_budget`` tokens.
        """
        from llmkit.chunking import EngineTokenizer, plan_chunks
        from llmkit.errors import ContextOverflowError

        overhead = len(self.prompt_tokens(messages_for("x")))
        budget = self.engine.n_ctx - overhead - 32
        tokenizer = EngineTokenizer(self.engine)
        if budget < min_budget:
            if min_budget > 1:
                raise ContextOverflowError(overhead, self.engine.n_ctx, reserve=32)
            return self.check(messages_for(text))  # reports the overflow for the whole text
        if tokenizer.count(text) <= budget:
            return self.check(messages_for(text))
        pieces = plan_chunks(text, tokenizer, budget, overlap=min(64, budget // 4))
        return verdict_for_parts([self.check(messages_for(p.text_in(text))) for p in pieces])


def _logistic(x: float) -> float:
    """1 / (1 + e^-x) without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def verdict_for_parts(verdicts: Sequence[Verdict]) -> Verdict:
    """One verdict for a text checked in pieces: flagged if any piece is, categories merged."""
    flagged = [v for v in verdicts if v.flagged]
    base = replace(flagged[0] if flagged else verdicts[0])
    base.flagged = bool(flagged)
    seen: dict[str, Category] = {}
    for v in flagged:
        for c in v.categories:
            seen.setdefault(c.code, c)
    base.categories = list(seen.values())
    scores = [v.score for v in verdicts if v.score is not None]
    base.score = max(scores) if scores else None
    base.prompt_tokens = sum(v.prompt_tokens for v in verdicts)
    base.prompt_tokens_evaluated = sum(v.prompt_tokens_evaluated for v in verdicts)
    base.timings = {key: round(sum(v.timings.get(key, 0.0) for v in verdicts), 2)
                    for key in verdicts[0].timings}
    base.raw = "\n---\n".join(v.raw for v in verdicts)
    return base


class ImagesNotCheckableError(LlmkitError):
    """No guard model that reads images runs on the pinned llama.cpp."""

    def __init__(self) -> None:
        super().__init__(
            "checking images is not possible with this llama.cpp: Llama Guard 3 11B Vision is "
            "the 'mllama' architecture llama.cpp cannot run, and Llama Guard 4 12B is a dense "
            "Llama 4 model it refuses to load ('llama4 model cannot have zero experts', "
            "ggml-org/llama.cpp#27020)",
            hint="check what the picture shows instead: "
                 "llmkit caption --style detailed photo.jpg | llmkit check")


def load_conversation(path: Path) -> list[Message]:
    """The messages of a conversation file (as `chat`'s /save writes it, or a plain list of
    {role, content}); a system prompt in it is left out, as Llama Guard has no place for it.

    Raises:
        InputError: unreadable, not JSON, or not role/content messages.
    """
    from llmkit.tasks.chat import Conversation

    return [{"role": m["role"], "content": m["content"]}
            for m in Conversation.load(path).messages]


def record_messages(item: Any, number: int) -> list[Message]:
    """The conversation a batch record asks to check: {"text"}, {"prompt", "response"}, or
    {"messages"}.

    Raises:
        InputError: none of those.
    """
    if isinstance(item, dict):
        if isinstance(item.get("text"), str):
            return [{"role": "user", "content": _text(item["text"], '"text"', number)}]
        if isinstance(item.get("prompt"), str):
            messages: list[Message] = [
                {"role": "user", "content": _text(item["prompt"], '"prompt"', number)}]
            if "response" in item:
                # A response that is not text must not turn into a check of the prompt alone.
                if not isinstance(item["response"], str):
                    raise InputError(f'line {number}: "response" must be a string')
                messages.append({"role": "assistant",
                                 "content": _text(item["response"], '"response"', number)})
            return messages
        if isinstance(item.get("messages"), list):
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                       and isinstance(m.get("content"), str) for m in item["messages"]):
                raise InputError(f'line {number}: "messages" must be a list of '
                                 '{"role": "…", "content": "…"} objects')
            return [{"role": m["role"],
                     "content": _text(m["content"], f'message {i}', number)}
                    for i, m in enumerate(item["messages"], 1)]
    raise InputError(f'line {number} has no "text", "prompt" or "messages"')


def _text(value: str, what: str, number: int) -> str:
    """``value``, which must be text a tokenizer can encode (JSON can escape half a character)."""
    from llmkit.io import surrogate_problem

    problem = surrogate_problem(value)
    if problem is not None:
        raise InputError(f"line {number}: {what} {problem}",
                         hint="write characters beyond U+FFFF as a surrogate pair "
                              "(\\ud83d\\ude00) or as UTF-8")
    return value


def check_jsonl_line(guard: Guard, line: str, number: int) -> dict[str, Any]:
    """One JSONL input line → one verdict record; problems become the record's ``error``.

    The record is the JSON shape of a single check plus ``line`` (and ``id`` when the input
    has one); a failed record has ``flagged`` null and ``error`` set, with ``raw`` when the
    model answered something that is not a verdict.
    """
    from llmkit.io import parse_json

    head: dict[str, Any] = {"line": number}
    try:
        # Strict JSON: an "id" of NaN would be written back out as NaN, which is not JSON, and
        # a line of 100,000 nested arrays is this line's error, not the batch's end.
        item = parse_json(line)
    except ValueError as exc:
        return {**head, "verdict": None, "flagged": None,
                "error": f"line {number} is not JSON: {exc}"}
    if isinstance(item, dict) and "id" in item:
        head["id"] = item["id"]
    try:
        verdict = guard.check(record_messages(item, number))
    except VerdictError as exc:
        return {**head, "verdict": None, "flagged": None, "raw": exc.raw, "error": str(exc)}
    except LlmkitError as exc:
        return {**head, "verdict": None, "flagged": None, "error": str(exc)}
    return {**head, **verdict.to_dict()}


def guard_note(stage: str, verdict: Verdict) -> str:
    """The stderr sentence for a flagged input or output."""
    what = {"input": "the input", "output": "the answer", "prompt": "the prompt"}[stage]
    cats = ", ".join(f"{c.code} {c.name}" for c in verdict.categories) or "no category named"
    action = "nothing was generated" if stage in ("input", "prompt") else "it was withheld"
    return f"{what} was flagged by {verdict.model} ({cats}); {action}"


def guard_record(input_verdict: Verdict | None, output_verdict: Verdict | None
                 ) -> dict[str, Any]:
    """The ``guard`` field of a batch record: each verdict that was taken."""
    record: dict[str, Any] = {}
    if input_verdict is not None:
        record["input"] = input_verdict.to_dict()
    if output_verdict is not None:
        record["output"] = output_verdict.to_dict()
    return record


class FlaggedError(LlmkitError):
    """A guarded command's input or output was flagged; the output is withheld (exit 3)."""

    exit_code = 3

    def __init__(self, stage: str, verdict: Verdict) -> None:
        super().__init__(guard_note(stage, verdict))
        self.stage = stage
        self.verdict = verdict


def check_input(guard: Guard, text: str) -> dict[str, Any]:
    """Check a guarded command's input; returns the ``guard`` JSON field so far.

    Raises:
        FlaggedError: the input is flagged (nothing should be generated).
        VerdictError: the guard did not answer with a verdict (fail closed).
    """
    verdict = guard.check_long_text(text)
    if verdict.flagged:
        raise FlaggedError("prompt", verdict)
    return guard_record(verdict, None)


def check_output(guard: Guard, prompt: str, answer: str, so_far: dict[str, Any]
                 ) -> dict[str, Any]:
    """Check a guarded command's answer in the context of its prompt.

    Raises:
        FlaggedError: the answer is flagged (it must be withheld).
        VerdictError: the guard did not answer with a verdict (fail closed).
    """
    if not answer.strip():
        return so_far
    verdict = guard.check_response(prompt, answer)
    if verdict.flagged:
        raise FlaggedError("output", verdict)
    return {**so_far, **guard_record(None, verdict)}


def guarded_chat_turn(engine: Any, convo: Any, user_text: str, guard: Guard | None, *,
                      params: SamplingParams | None = None, on_text: Any = None,
                      images: Sequence[str] = ()) -> Any:
    """A chat turn whose message is checked before and whose reply is checked after.

    A flagged message is not added to the conversation; a flagged reply is withheld and the
    turn removed, so the session goes on as if it had not happened. Without a guard this is
    plain :func:`llmkit.tasks.chat.chat_turn`. The reply reaches ``on_text`` only once checked.

    Raises:
        FlaggedError: the message or the reply was flagged.
        VerdictError: the guard did not answer with a verdict (fail closed).
    """
    from llmkit.tasks.chat import chat_turn

    if guard is None:
        return chat_turn(engine, convo, user_text, params=params, on_text=on_text,
                         images=images)
    verdict = guard.check_long_text(user_text)
    if verdict.flagged:
        raise FlaggedError("input", verdict)
    before = list(convo.messages)
    reply = chat_turn(engine, convo, user_text, params=params, on_text=None, images=images)
    try:
        answer = guard.check_response(user_text, reply.text) if reply.text.strip() else None
    except BaseException:
        convo.messages[:] = before
        raise
    if answer is not None and answer.flagged:
        convo.messages[:] = before
        raise FlaggedError("output", answer)
    if on_text is not None and reply.text:
        on_text(reply.text)
    return reply


def guard_batch_output(guard: Guard, prompt: str, answer: str, record: dict[str, Any],
                       text_field: str, input_verdict: Verdict | None = None) -> dict[str, Any]:
    """Check one batch item's answer and mark its record: ``guard`` verdicts, and when
    flagged, ``flagged: true`` with the answer withheld (``text_field`` set to null).

    A guard that does not answer with a verdict makes the record an error (fail closed).
    """
    try:
        verdict = guard.check_response(prompt, answer) if answer.strip() else None
    except LlmkitError as exc:
        record[text_field] = None
        record["error"] = f"{record.get('path')}: the safety check failed: {exc}"
        return record
    record["guard"] = guard_record(input_verdict, verdict)
    record["flagged"] = bool(verdict and verdict.flagged)
    if verdict is not None and verdict.flagged:
        record[text_field] = None
        record["flagged_note"] = guard_note("output", verdict)
    return record


def guard_batch_input(guard: Guard, text: str, record: dict[str, Any], text_field: str
                      ) -> Verdict | None:
    """Check one batch item's input; when flagged (or unverifiable) mark the record and return
    None, so the caller skips the item; else return the verdict."""
    try:
        verdict = guard.check_long_text(text)
    except LlmkitError as exc:
        record[text_field] = None
        record["error"] = f"{record.get('path')}: the safety check failed: {exc}"
        return None
    if verdict.flagged:
        record[text_field] = None
        record["flagged"] = True
        record["guard"] = guard_record(verdict, None)
        record["flagged_note"] = guard_note("input", verdict)
        return None
    return verdict
