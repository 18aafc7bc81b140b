"""Llama Guard's verdicts: reading its answer, scoring it, and a Guard that checks messages."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmkit.engines.base import Engine, Message, RGBImage, SamplingParams
from llmkit.engines.parallel import Job, Result
from llmkit.errors import (
    EXIT_FLAGGED,
    ContextOverflowError,
    ImagesNotCheckableError,
    InputError,
    LlmkitError,
    VerdictError,
)
from llmkit.tasks.guard_prompt import (
    IMAGE_TOKEN,
    check_conversation,
    conversation_role,
    guard_prompt_pieces,
    guard_task,
    vision_guard_prompt_pieces,
)
from llmkit.tasks.policy import CATEGORY_CODE, Category, name_categories

# -- the answer ---------------------------------------------------------------------------

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
            if not CATEGORY_CODE.match(token):
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
    image: dict[str, Any] | None = None  # the picture checked with the text (its size), if any

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
            # Only a check that saw a picture says so: text verdicts keep their shape.
            **({"image": self.image} if self.image is not None else {}),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


# -- running the model --------------------------------------------------------------------

# The answer is greedy and short ("unsafe\nS1,S10"); the score is read at its first word, at
# most this many steps in (past the blank line Llama Guard writes first).
ANSWER_PARAMS = SamplingParams(temperature=0.0, max_tokens=20)
ANSWER_RESERVE = 24
SCORE_STEPS = 4


@dataclass(frozen=True)
class CheckPlan:
    """One check's prompt: its tokens, the role assessed and the picture's size."""

    tokens: list[int]
    role: str
    image: dict[str, int] | None = None


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
        # Llama Guard 3 Vision (a Llama 3.2 Vision model): its own prompt, which can show a
        # picture at its <|image|> token.
        self.vision = self.llama3 and engine.vision and len(engine.tokenize(
            IMAGE_TOKEN, add_special=False, parse_special=True)) == 1
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

    def prompt_tokens(self, messages: Sequence[Message], *, image: bool = False) -> list[int]:
        """The tokens of the guard prompt for a conversation (last message assessed); with
        ``image`` (a vision guard only), its ``<|image|>`` token where the picture goes."""
        if self.vision:
            return self.engine.tokenize_pieces(
                vision_guard_prompt_pieces(messages, self.categories, image=image))
        if self.llama3:
            return self.engine.tokenize_pieces(guard_prompt_pieces(messages, self.categories))
        return self.engine.chat_tokens(
            [{"role": "user", "content": guard_task(messages, self.categories)}])

    def check(self, messages: Sequence[Message], image: RGBImage | None = None) -> Verdict:
        """Assess the last message of a conversation, with the picture it shows (if any).

        Args:
            messages: the conversation; with ``image`` its first message may be empty.
            image: a picture the conversation shows, which is judged with it (a vision guard
                only). A second check of the same picture does not encode it again.

        Raises:
            ImagesNotCheckableError: a picture for a guard that reads text only.
            InputError: a malformed conversation.
            ContextOverflowError: the conversation does not fit the guard's context.
            VerdictError: the model's answer is not a verdict (and no threshold decides).
        """
        return self._run(self.plan(messages, image), image)

    def _run(self, plan: CheckPlan, image: RGBImage | None) -> Verdict:
        """One planned check, on the engine directly (score, then the greedy answer)."""
        import numpy as np

        images = () if image is None else (image,)
        t0 = time.perf_counter()
        tokens = plan.tokens
        # The answer's first word decides: step over the blank line the model writes after
        # its header, then compare the two words' probabilities there.
        probe = list(tokens)
        kept = min(self.engine.cached_prefix_length(tokens, images=images), len(tokens) - 1)
        logits = self.engine.next_token_logits(probe, images=images)
        for _ in range(SCORE_STEPS - 1):
            best = int(np.argmax(logits))
            if self._answer_starts(best):
                break
            probe.append(best)
            logits = self.engine.next_token_logits(probe, images=images)
        t_scored = time.perf_counter()
        generation = self.engine.generate(tokens, ANSWER_PARAMS, images=images)
        t_end = time.perf_counter()
        return self.verdict(plan, logits, generation.text, len(tokens) - kept,
                            {"score_ms": round((t_scored - t0) * 1000, 2),
                             "answer_ms": round((t_end - t_scored) * 1000, 2),
                             "total_ms": round((t_end - t0) * 1000, 2)})

    def plan(self, messages: Sequence[Message], image: RGBImage | None = None) -> CheckPlan:
        """The prompt of one check, checked to fit (the first half of :meth:`check`).

        Raises:
            As :meth:`check`, but for the verdict.
        """
        if image is not None and not self.vision:
            raise ImagesNotCheckableError(self.engine.model_name)
        turns = check_conversation(messages, image=image is not None)
        tokens = self.prompt_tokens(turns, image=image is not None)
        if len(tokens) + ANSWER_RESERVE > self.engine.n_ctx:
            raise ContextOverflowError(len(tokens), self.engine.n_ctx, reserve=ANSWER_RESERVE)
        return CheckPlan(tokens, conversation_role(turns),
                         None if image is None else {"width": image.width,
                                                     "height": image.height})

    def _answer_starts(self, token: int) -> bool:
        """Whether the answer's first word is at ``token``: only a token that is whitespace is
        stepped over (an end-of-turn token also reads as "" but ends the answer, so the score
        is taken where it stands)."""
        piece = self.engine.detokenize([token])
        return not piece or bool(piece.strip())

    def scored_logits(self, rows: Sequence[Any]) -> Any:
        """Of a greedy answer's first logits rows (one per step, the prompt's first), the
        row :meth:`check` scores at: where the first word starts."""
        import numpy as np

        for row in rows[:SCORE_STEPS - 1]:
            if self._answer_starts(int(np.argmax(row))):
                return row
        return rows[min(len(rows), SCORE_STEPS) - 1]

    def verdict(self, plan: CheckPlan, logits: Any, raw: str, evaluated: int,
                timings: dict[str, float]) -> Verdict:
        """The verdict of a check from the logits it scores at and the model's answer (the
        second half of :meth:`check`).

        Raises:
            VerdictError: the answer is not a verdict (and no threshold decides).
        """
        import numpy as np

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
        verdict = Verdict(flagged=False, categories=[], score=score, p_safe=p_safe,
                          p_unsafe=p_unsafe, role=plan.role, model=self.engine.model_name,
                          raw=raw, decided_by="answer", threshold=self.threshold,
                          prompt_tokens=len(plan.tokens), prompt_tokens_evaluated=evaluated,
                          image=plan.image)
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
        verdict.timings = timings
        return verdict

    def check_text(self, text: str, image: RGBImage | None = None) -> Verdict:
        """Assess a user prompt on its own (with the picture it shows, for a vision guard)."""
        return self.check([{"role": "user", "content": text}], image)

    def check_long_text(self, text: str, image: RGBImage | None = None) -> Verdict:
        """Assess a text of any length as user input: in pieces that fit the guard's context.

        Flagged when any piece is; the categories of all flagged pieces are merged. With
        ``image`` every piece is checked together with the picture (encoded once).
        """
        return self._judge(self.long_text_plans(text, image), image)

    def check_response(self, prompt: str, response: str, image: RGBImage | None = None
                       ) -> Verdict:
        """Assess an assistant response in the context of the prompt it answers (and of the
        picture that prompt showed, for a vision guard).

        A prompt and response too long for the guard's context together are checked with the
        prompt shortened to its beginning (the context of the answer, not what is judged) and
        the response in pieces; no part of the response goes unchecked.
        """
        return self._judge(self.response_plans(prompt, response, image), image)

    def long_text_plans(self, text: str, image: RGBImage | None = None) -> list[CheckPlan]:
        """The checks :meth:`check_long_text` makes (one per piece), planned.

        Raises:
            As :meth:`plan`.
        """
        return self._plans_in_pieces(
            text, lambda piece: [{"role": "user", "content": piece}], image=image)

    def response_plans(self, prompt: str, response: str, image: RGBImage | None = None
                       ) -> list[CheckPlan]:
        """The checks :meth:`check_response` makes (the whole exchange, or the response in
        pieces), planned.

        Raises:
            As :meth:`plan`.
        """
        try:
            return [self.plan([{"role": "user", "content": prompt},
                               {"role": "assistant", "content": response}], image)]
        except ContextOverflowError:
            pass
        context = prompt if len(prompt) <= 1000 else prompt[:1000] + " [...]"
        return self._plans_in_pieces(
            response, lambda piece: [{"role": "user", "content": context},
                                     {"role": "assistant", "content": piece}],
            min_budget=16, image=image)

    def _judge(self, plans: Sequence[CheckPlan], image: RGBImage | None) -> Verdict:
        return _one_verdict([self._run(plan, image) for plan in plans])

    def _plans_in_pieces(self, text: str, messages_for: Callable[[str], list[Message]], *,
                         min_budget: int = 1, image: RGBImage | None = None
                         ) -> list[CheckPlan]:
        """Plan checks of ``text`` as the last message of ``messages_for(text)``: whole when it
        fits the guard's context, else in chunks that do (each in the same surroundings).

        Raises:
            ContextOverflowError: the surroundings leave less than ``min_budget`` tokens.
        """
        from llmkit.chunking import EngineTokenizer, plan_chunks

        if image is not None and not self.vision:
            raise ImagesNotCheckableError(self.engine.model_name)
        overhead = len(self.prompt_tokens(messages_for("x"), image=image is not None))
        budget = self.engine.n_ctx - overhead - 32
        tokenizer = EngineTokenizer(self.engine)
        if budget < min_budget:
            if min_budget > 1:
                raise ContextOverflowError(overhead, self.engine.n_ctx, reserve=32)
            return [self.plan(messages_for(text), image)]  # the overflow for the whole text
        if tokenizer.count(text) <= budget:
            return [self.plan(messages_for(text), image)]
        pieces = plan_chunks(text, tokenizer, budget, overlap=min(64, budget // 4))
        return [self.plan(messages_for(p.text_in(text)), image) for p in pieces]

    def jobs(self, plans: Sequence[CheckPlan], key: Any = None) -> list[Job]:
        """The checks ``plans`` as jobs for the engine's parallel sequences (text only): the
        job keys are ``(key, i)``; :meth:`result_verdict` reads each result."""
        return [Job((key, i), plan.tokens, ANSWER_PARAMS, logits_steps=SCORE_STEPS)
                for i, plan in enumerate(plans)]

    def result_verdict(self, plan: CheckPlan, result: Result) -> Verdict:
        """The verdict of a check that ran as a job (of :meth:`jobs`).

        Raises:
            LlmkitError: the job failed, or gave no answer.
            VerdictError: the answer is not a verdict (and no threshold decides).
        """
        generation = result.generation
        if result.error is not None or generation is None or not result.logits:
            raise result.error or LlmkitError("the guard gave no answer")
        total = generation.prompt_ms + generation.generation_ms
        timings = {"score_ms": round(generation.first_token_ms, 2),
                   "answer_ms": round(total - generation.first_token_ms, 2),
                   "total_ms": round(total, 2)}
        return self.verdict(plan, self.scored_logits(result.logits), generation.text,
                            generation.prompt_tokens_evaluated, timings)

    def judged_steps(self, plans: Sequence[CheckPlan], key: Any = None
                     ) -> Generator[list[tuple[Any, Job]], list[Result], Verdict]:
        """``plans`` judged as one verdict (as :meth:`check_long_text` judges its pieces), as
        a task's step for :func:`llmkit.engines.parallel.run_tasks`: it yields the checks'
        jobs for the guard's engine and is sent their results.

        Raises:
            As :meth:`result_verdict`.
        """
        results = yield [(self.engine, job) for job in self.jobs(plans, key)]
        return _one_verdict([self.result_verdict(plan, result)
                             for plan, result in zip(plans, results, strict=True)])


def _one_verdict(verdicts: Sequence[Verdict]) -> Verdict:
    """A text's checks as one verdict: a whole text's own, or its pieces' combined."""
    return verdicts[0] if len(verdicts) == 1 else verdict_for_parts(verdicts)


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


# -- what to check: conversation files and batch lines -----------------------------------

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
    {"messages"}; a record with only an "image" checks that picture alone.

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
        if not any(key in item for key in ("text", "prompt", "messages")) and "image" in item:
            return [{"role": "user", "content": ""}]  # the picture is the user's whole message
    raise InputError(f'line {number} has no "text", "prompt", "messages" or "image"')


def record_image(guard: Guard, item: Any, number: int) -> tuple[str, RGBImage] | None:
    """The picture a batch record asks to check with its text: its ``"image"`` path (relative
    paths from the current directory, as on the command line), prepared as for ``--image``.

    Raises:
        InputError: "image" is not a path.
        ImagesNotCheckableError: the guard reads text only (before the file is read).
        ImageError: the file is not an image llmkit can read.
    """
    if not isinstance(item, dict) or "image" not in item:
        return None
    path = item["image"]
    if not isinstance(path, str) or not path:
        raise InputError(f'line {number}: "image" must be the path of an image file')
    _text(path, '"image"', number)
    if not guard.vision:
        raise ImagesNotCheckableError(guard.engine.model_name)
    from llmkit.images import prepare_image

    return path, prepare_image(Path(path))


def _text(value: str, what: str, number: int) -> str:
    """``value``, which must be text a tokenizer can encode (JSON can escape half a character)."""
    from llmkit.io import surrogate_problem

    problem = surrogate_problem(value)
    if problem is not None:
        raise InputError(f"line {number}: {what} {problem}",
                         hint="write characters beyond U+FFFF as a surrogate pair "
                              "(\\ud83d\\ude00) or as UTF-8")
    return value


def check_jsonl_line(guard: Guard, line: str | LlmkitError, number: int) -> dict[str, Any]:
    """One JSONL input line → one verdict record; problems become the record's ``error``.

    The record is the JSON shape of a single check plus ``line`` (and ``id`` when the input
    has one); a line with an ``"image"`` path checks that picture with its text (a vision
    guard only), and its record's ``image`` names it with its size; a failed record has
    ``flagged`` null and ``error`` set, with ``raw`` when the model answered something that is
    not a verdict. ``line`` may be the error that reading
    it gave (not UTF-8, too long: see :func:`llmkit.io.numbered_lines`), which is that
    line's record too.
    """
    head, read = _read_line(guard, line, number)
    if isinstance(read, LlmkitError):
        return _failed(head, read)
    messages, picture = read
    try:
        verdict = guard.check(messages, None if picture is None else picture[1])
    except LlmkitError as exc:
        return _failed(head, exc)
    record = {**head, **verdict.to_dict()}
    if picture is not None and verdict.image is not None:
        record["image"] = {"path": picture[0], **verdict.image}
    return record


def _failed(head: dict[str, Any], exc: LlmkitError) -> dict[str, Any]:
    """The record of a line that failed: the raw answer too when it was no verdict."""
    if isinstance(exc, VerdictError):
        return {**head, "verdict": None, "flagged": None, "raw": exc.raw, "error": str(exc)}
    return {**head, "verdict": None, "flagged": None, "error": str(exc)}


def _read_line(guard: Guard, line: str | LlmkitError, number: int
               ) -> tuple[dict[str, Any], tuple[list[Message], tuple[str, RGBImage] | None]
                          | LlmkitError]:
    """A JSONL line's record head (``line``, ``id``) and what it asks to check, or why it
    cannot be checked."""
    from llmkit.io import parse_json

    head: dict[str, Any] = {"line": number}
    if isinstance(line, LlmkitError):
        return head, line
    try:
        # Strict JSON: an "id" of NaN would be written back out as NaN, which is not JSON, and
        # a line of 100,000 nested arrays is this line's error, not the batch's end.
        item = parse_json(line)
    except ValueError as exc:
        return head, InputError(f"line {number} is not JSON: {exc}")
    if isinstance(item, dict) and "id" in item:
        head["id"] = item["id"]
    try:
        return head, (record_messages(item, number), record_image(guard, item, number))
    except LlmkitError as exc:
        return head, exc


def check_jsonl_lines(guard: Guard, lines: Iterable[tuple[int, str | LlmkitError]], *,
                      live: bool = False) -> Iterator[dict[str, Any]]:
    """The records of :func:`check_jsonl_line` for many lines, each as its check finishes:
    with an engine that decodes several sequences at once (``parallel`` > 1) up to that
    many checks run together, their common prompt (the policy) evaluated once; otherwise one
    line at a time, in order. Each record names its ``line``. ``live``: the lines come from
    stdin, each checked as it arrives.
    """
    from llmkit.engines.parallel import parallel_generate

    many = parallel_generate(guard.engine)
    if many is None:
        for number, line in lines:
            yield check_jsonl_line(guard, line, number)
        return

    def jobs() -> Iterator[Job]:
        for number, line in lines:
            head, read = _read_line(guard, line, number)
            if not isinstance(read, LlmkitError):
                messages, picture = read
                if picture is not None:
                    # Pictures need the Vision engine, which checks one at a time.
                    read = InputError(f'line {number}: a record with an "image" is checked '
                                      "with --parallel 1")
                else:
                    try:
                        plan = guard.plan(messages)
                    except LlmkitError as exc:
                        read = exc
            if isinstance(read, LlmkitError):
                yield Job((_failed(head, read), None), None)
            else:
                yield replace(guard.jobs([plan])[0], key=(head, plan))

    for result in many(jobs(), live=live):
        head, plan = result.job.key
        if plan is None:
            yield head
            continue
        try:
            verdict = guard.result_verdict(plan, result)
        except LlmkitError as exc:
            yield _failed(head, exc)
            continue
        yield {**head, **verdict.to_dict()}


@dataclass
class CheckTally:
    """What a ``check --batch`` run found so far: its summary line and exit code."""

    safe: int = 0
    flagged: int = 0
    errors: int = 0

    def add(self, record: Mapping[str, Any]) -> None:
        """Count one record of :func:`check_jsonl_line`."""
        if record["error"]:
            self.errors += 1
        elif record["flagged"]:
            self.flagged += 1
        else:
            self.safe += 1

    def summary(self) -> str:
        """The sentence ``check --batch`` ends with on stderr."""
        total = self.safe + self.flagged + self.errors
        return (f"{total} record{'s' * (total != 1)}: {self.safe} safe, {self.flagged} "
                f"flagged, {self.errors} errors")

    @property
    def exit_code(self) -> int:
        """1 when any record failed, else EXIT_FLAGGED when any was flagged, else 0."""
        return 1 if self.errors else EXIT_FLAGGED if self.flagged else 0
