"""Summaries of documents of any length: one pass when it fits, else map and merge, never cut."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.chunking import EngineTokenizer
from llmkit.documents import DEFAULT_MAX_BYTES
from llmkit.engines.base import Engine, Generation, Message, SamplingParams
from llmkit.engines.parallel import drive
from llmkit.errors import InputError, LlmkitError
from llmkit.tasks.guarding import GUARD_JOBS, guard_input_steps, guard_output_steps

if TYPE_CHECKING:
    from llmkit.documents import Document
    from llmkit.engines.parallel import Job, Result, Task
    from llmkit.tasks.safety import Guard

LENGTHS = {"short": 50, "medium": 120, "long": 300}  # target words of the final summary
STYLES = {
    "paragraph": "Write it as one or more plain paragraphs.",
    "bullets": "Write it as a bulleted list: one key point per line, each line starting "
               "with '- '.",
    "tldr": "Write a TL;DR: one or two sentences.",
    "headline": "Write only a headline of at most 12 words, without a final period.",
}
DEFAULT_LENGTH = "medium"
DEFAULT_STYLE = "paragraph"
# Summaries should stick to the text: sampled cooler than chat, unless the user or the
# model's catalog entry says otherwise.
SUMMARY_TEMPERATURE = 0.2
# What a guard judges a summary as the answer to.
GUARD_PROMPT = "Summarize this document."
# Tokens kept free beyond the prompt and the answer (chat-template rounding, BOS).
MARGIN = 8
# A chunk smaller than this is not worth a model call: the context is too small to summarize.
MIN_CHUNK_TOKENS = 48
MIN_PARTIAL_TOKENS = 32
MAX_PARTIAL_TOKENS = 256


@dataclass(frozen=True)
class SummaryOptions:
    """What kind of summary to write, and how to sample it."""

    length: str = DEFAULT_LENGTH
    words: int | None = None
    style: str = DEFAULT_STYLE
    focus: str | None = None
    language: str | None = None
    system: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    overlap: int = 64
    reuse_prefix: bool = True  # False: forget the KV cache before every call (benchmarks)

    def target_words(self) -> int:
        """About how many words the final summary should have."""
        if self.words:
            return self.words
        if self.style == "headline":
            return 12
        if self.style == "tldr":
            return 40
        return LENGTHS[self.length]

    def answer_tokens(self) -> int:
        """Room for the final answer: words to tokens with headroom (about 1.4 tokens/word)."""
        if self.params.max_tokens:
            return self.params.max_tokens
        return int(self.target_words() * 2) + 32


def summary_temperature(temperature: float | None, model_default: float | None) -> float:
    """The temperature a summary is sampled at.

    Args:
        temperature: the caller's (``--temperature``), if any.
        model_default: the model's own from its catalog entry, if any.

    Returns:
        The caller's, else the model's, else :data:`SUMMARY_TEMPERATURE` (cooler than chat's
        default: a summary should stick to the text).
    """
    if temperature is not None:
        return temperature
    return model_default if model_default is not None else SUMMARY_TEMPERATURE


def check_options(options: SummaryOptions) -> None:
    """Raises InputError for an unknown length or style, or a bad word count."""
    if options.length not in LENGTHS:
        raise InputError(f"unknown length '{options.length}'",
                         hint=f"use one of {', '.join(LENGTHS)}")
    if options.style not in STYLES:
        raise InputError(f"unknown style '{options.style}'", hint=f"use one of {', '.join(STYLES)}")
    if options.words is not None and options.words < 1:
        raise InputError("--words must be at least 1")


def _wishes(options: SummaryOptions) -> str:
    parts = []
    if options.focus:
        parts.append(f"Focus on: {options.focus.strip()}.")
    if options.language:
        parts.append(f"Write in {options.language.strip()}.")
    return (" " + " ".join(parts)) if parts else ""


def final_instruction(options: SummaryOptions, *, from_parts: bool) -> str:
    """The instruction for the summary the user reads."""
    source = ("the summaries below, which cover consecutive parts of one document in order"
              if from_parts else "the document below")
    words = "" if options.style == "headline" else f" in about {options.target_words()} words"
    return (f"Summarize {source}{words}. {STYLES[options.style]} Use only facts from the "
            f"text.{_wishes(options)}")


def part_instruction(options: SummaryOptions) -> str:
    """The instruction for one chunk; the same for every chunk, so its tokens are shared."""
    return ("The text below is one part of a longer document. Summarize this part in a short "
            "paragraph, keeping names, numbers, dates and conclusions. Use only facts from the "
            f"text.{_wishes(options)}")


def merge_instruction(options: SummaryOptions) -> str:
    """The instruction that condenses several partial summaries into one."""
    return ("The summaries below cover consecutive parts of one document, in order. Combine "
            "them into one shorter summary in a short paragraph, keeping the most important "
            f"names, numbers, dates and conclusions.{_wishes(options)}")


@dataclass
class Summary:
    """A summary with what it took: chunks, merge levels, tokens and timings."""

    text: str
    input_tokens: int
    chunks: int
    levels: int  # 0: one pass; 1: chunks summarized and their summaries summarized; 2+: merges
    merges: int  # model calls that combined partial summaries
    calls: int
    prompt_tokens: int  # summed over every model call
    prompt_tokens_evaluated: int  # of those, the ones not already in the KV cache
    output_tokens: int  # generated, summed over every call
    finish_reason: str
    seconds: float
    plan: list[dict[str, Any]] = field(default_factory=list)


ProgressFn = Callable[[str, int, int], None]


@dataclass
class Calls:
    """One step of a summary: model calls that do not depend on each other (a document's
    chunks, a merge level), each a prompt's tokens, all sampled with ``params``."""

    prompts: list[list[int]]
    params: SamplingParams
    stage: str  # what progress calls them: "chunk", "merge level 2", "summary"


# A summary's work, step by step: yields Calls, is sent their generations, returns T.
Steps = Generator[Calls, list[Generation], "Summary"]


class Summarizer:
    """Summarizes texts with one engine; plans chunks with the engine's own tokenizer."""

    def __init__(self, engine: Engine, options: SummaryOptions,
                 on_progress: ProgressFn | None = None,
                 on_plan: Callable[[list[dict[str, Any]]], None] | None = None) -> None:
        check_options(options)
        self.engine = engine
        self.options = options
        self.tokenizer = EngineTokenizer(engine)
        self.on_progress = on_progress
        self.on_plan = on_plan
        self._stats: dict[str, int] = {}

    # -- prompt arithmetic ----------------------------------------------------------------

    def _messages(self, instruction: str, body: str) -> list[Message]:
        messages: list[Message] = []
        if self.options.system:
            messages.append({"role": "system", "content": self.options.system})
        messages.append({"role": "user", "content": f"{instruction}\n\n{body}"})
        return messages

    def _overhead(self, instruction: str) -> int:
        """Tokens the chat template and the instruction take around an empty body."""
        return len(self.engine.chat_tokens(self._messages(instruction, ""))) + MARGIN

    def budget(self, instruction: str, answer: int) -> int:
        """Tokens left for the body of a prompt with this instruction and answer room."""
        return self.engine.n_ctx - self._overhead(instruction) - answer

    # -- model calls ----------------------------------------------------------------------

    def _prompt(self, instruction: str, body: str, max_tokens: int) -> list[int]:
        tokens = self.engine.chat_tokens(self._messages(instruction, body))
        if len(tokens) + max_tokens > self.engine.n_ctx:
            # The plan keeps every prompt within budget; this guards the arithmetic.
            raise LlmkitError(f"internal error: a {len(tokens)}-token prompt was planned for a "
                              f"{self.engine.n_ctx}-token context")
        return tokens

    def _calls(self, instruction: str, bodies: Sequence[str], max_tokens: int,
               stage: str) -> Calls:
        """The model calls of one step: one per body, all with this instruction."""
        params = replace(self.options.params, max_tokens=max_tokens)
        return Calls([self._prompt(instruction, body, max_tokens) for body in bodies], params,
                     stage)

    def run_calls(self, calls: Calls) -> list[Generation]:
        """Run one step's calls on this summarizer's engine, in their order; with an engine
        that decodes several sequences at once (``parallel`` > 1), up to that many together,
        the instruction evaluated once (each call's progress is reported as it finishes)."""
        from llmkit.engines.parallel import Job, parallel_generate

        prompts, n = calls.prompts, len(calls.prompts)
        many = parallel_generate(self.engine)
        if many is None or n == 1 or not self.options.reuse_prefix:
            out = []
            for i, tokens in enumerate(prompts):
                self._progress(calls.stage, i + 1, n)
                if not self.options.reuse_prefix:
                    self.engine.forget()
                out.append(self.engine.generate(tokens, calls.params))
            return out
        found: dict[int, Generation] = {}
        for result in many([Job(i, tokens, calls.params) for i, tokens in enumerate(prompts)]):
            if result.error is not None:
                raise result.error
            assert result.generation is not None
            found[result.job.key] = result.generation
            self._progress(calls.stage, len(found), n)
        return [found[i] for i in range(n)]

    def jobs(self, engine_key: Any, calls: Calls) -> list[tuple[Any, Job]]:
        """One step's calls as jobs for :func:`llmkit.engines.parallel.run_tasks`."""
        from llmkit.engines.parallel import Job

        n = len(calls.prompts)
        return [(engine_key, Job((calls.stage, i, n), tokens, calls.params))
                for i, tokens in enumerate(calls.prompts)]

    def _counted(self, generations: list[Generation]) -> list[Generation]:
        for generation in generations:
            self._count(generation)
        return generations

    def _count(self, generation: Generation) -> None:
        if generation.finish_reason == "interrupted":
            raise KeyboardInterrupt
        stats = self._stats
        stats["calls"] += 1
        stats["prompt"] += generation.prompt_tokens
        stats["evaluated"] += generation.prompt_tokens_evaluated
        stats["output"] += generation.completion_tokens

    def _progress(self, stage: str, i: int, n: int) -> None:
        if self.on_progress is not None:
            self.on_progress(stage, i, n)

    # -- the algorithm --------------------------------------------------------------------

    def summarize(self, text: str) -> Summary:
        """Summarize ``text``, splitting and merging as its length requires (see
        :meth:`steps`), running its calls on the engine."""
        return drive(self.steps(text), self.run_calls)

    def steps(self, text: str) -> Steps:
        """Summarize ``text``, splitting and merging as its length requires: a generator
        that yields each step's model calls (:class:`Calls`; the calls of one step are
        independent) and is sent their generations, in order; it returns the Summary.

        Raises:
            InputError: the text is empty.
            ContextTooSmallError: the context cannot hold the instruction, an answer and a
                useful piece of text.
        """
        from llmkit.chunking import group_for_merge, plan_chunks
        from llmkit.errors import ContextTooSmallError

        if not text.strip():
            raise InputError("the document is empty")
        started = time.perf_counter()
        self._stats = {"calls": 0, "prompt": 0, "evaluated": 0, "output": 0, "merges": 0}
        options = self.options
        n_input = self.tokenizer.count(text)
        answer = options.answer_tokens()
        final_whole = final_instruction(options, from_parts=False)
        if n_input <= self.budget(final_whole, answer):
            generation, = self._counted((yield self._calls(final_whole, [text], answer,
                                                           "summary")))
            return self._result(generation, n_input, 1, 0, started, [])

        part = part_instruction(options)
        merge = merge_instruction(options)
        final_parts = final_instruction(options, from_parts=True)
        # Each partial summary gets a fifth of what a merge or final prompt can hold: every
        # merge then combines at least four of them, so the levels converge fast and the work
        # grows about linearly with the document (one merge per three or more chunks). A
        # fifth, not less, so a chunk is still summarized at about 4:1 or gentler.
        room = min(self.budget(merge, 0), self.budget(final_parts, answer))
        partial = min(MAX_PARTIAL_TOKENS, (room - MARGIN) // 5)
        chunk_budget = self.budget(part, partial)
        if partial < MIN_PARTIAL_TOKENS or chunk_budget < MIN_CHUNK_TOKENS:
            least = 5 * MIN_PARTIAL_TOKENS + MARGIN
            need = max(self._overhead(final_parts) + answer + least,
                       self._overhead(merge) + least,
                       self._overhead(part) + MIN_PARTIAL_TOKENS + MIN_CHUNK_TOKENS)
            raise ContextTooSmallError(self.engine.n_ctx, need)
        overlap = min(options.overlap, chunk_budget // 4)
        chunks = plan_chunks(text, self.tokenizer, chunk_budget, overlap=overlap)
        plan = [{"chunk": c.index + 1, "chars": [c.start, c.end], "tokens": c.tokens,
                 "overlap_chars": c.start - c.context_start, "ends_at": c.boundary}
                for c in chunks]
        if self.on_progress is not None:
            self.on_progress("plan", len(chunks), chunk_budget)
        if self.on_plan is not None:
            self.on_plan(plan)
        pieces = self._counted((yield self._calls(
            part, [text[c.context_start:c.end] for c in chunks], partial, "chunk")))
        partials = [_complete_sentences(g.text.strip()) or "(nothing)" for g in pieces]
        levels = 1
        while True:
            joined = "\n\n".join(partials)
            if self.tokenizer.count(joined) <= self.budget(final_parts, answer):
                break
            groups = group_for_merge(partials, self.tokenizer, self.budget(merge, partial))
            levels += 1
            # A level's merges run together; the next level waits for all of them.
            bodies = ["\n\n".join(partials[j] for j in group) for group in groups
                      if len(group) > 1]
            done = iter(self._counted((yield self._calls(merge, bodies, partial,
                                                         f"merge level {levels}"))))
            self._stats["merges"] += len(bodies)
            merged: list[str] = [
                partials[group[0]] if len(group) == 1
                else _complete_sentences(next(done).text.strip()) or "(nothing)"
                for group in groups]
            if len(merged) >= len(partials):  # cannot happen with thirds; never loop forever
                raise LlmkitError("the partial summaries do not get shorter when merged",
                                  hint="raise --ctx")
            partials = merged
        generation, = self._counted((yield self._calls(final_parts, ["\n\n".join(partials)],
                                                       answer, "summary")))
        return self._result(generation, n_input, len(chunks), levels, started, plan)

    def _result(self, generation: Generation, n_input: int, chunks: int, levels: int,
                started: float, plan: list[dict[str, Any]]) -> Summary:
        text = generation.text.strip()
        if generation.finish_reason in ("length", "context"):
            text = _complete_sentences(text, bullets=self.options.style == "bullets") or text
        stats = self._stats
        return Summary(text=text, input_tokens=n_input, chunks=chunks, levels=levels,
                       merges=stats["merges"], calls=stats["calls"], prompt_tokens=stats["prompt"],
                       prompt_tokens_evaluated=stats["evaluated"], output_tokens=stats["output"],
                       finish_reason=generation.finish_reason,
                       seconds=time.perf_counter() - started, plan=plan)


_SENTENCE_END = re.compile(r"[.!?。！？…][\"')\]]*(?=\s|$)")


def _complete_sentences(text: str, *, bullets: bool = False) -> str:
    """``text`` without a trailing fragment that an answer cut at the token limit leaves."""
    if bullets:
        lines = text.splitlines()
        return "\n".join(lines[:-1]).strip() if len(lines) > 1 else text
    ends = list(_SENTENCE_END.finditer(text))
    return text[:ends[-1].end()] if ends else text


def summary_record(path: str, summary: Summary | None, *, model: str, fmt: str | None = None,
                   error: str | None = None, warnings: Sequence[str] = ()) -> dict[str, Any]:
    """The stable JSON shape of one document's result (``--format json/jsonl``, ``--out``)."""
    record: dict[str, Any] = {"path": path, "summary": None, "model": model, "error": error}
    if fmt is not None:
        record["format"] = fmt
    if summary is not None:
        record.update({
            "summary": summary.text,
            "finish_reason": summary.finish_reason,
            "chunks": summary.chunks,
            "levels": summary.levels,
            "merges": summary.merges,
            "calls": summary.calls,
            "usage": {"input_tokens": summary.input_tokens,
                      "prompt_tokens": summary.prompt_tokens,
                      "prompt_tokens_evaluated": summary.prompt_tokens_evaluated,
                      "output_tokens": summary.output_tokens},
            "timings": {"total_ms": round(summary.seconds * 1000, 2),
                        "input_tokens_per_s": round(summary.input_tokens / summary.seconds, 2)
                        if summary.seconds > 0 else 0.0},
        })
    if warnings:
        record["warnings"] = list(warnings)
    return record


@dataclass(frozen=True)
class SummaryJob:
    """Everything that is the same for every document in a batch."""

    options: SummaryOptions = field(default_factory=SummaryOptions)
    format: str | None = None  # read every document as this format; None: by name or content
    max_bytes: int = DEFAULT_MAX_BYTES  # refuse documents larger than this


def document_label(path: str) -> str:
    """How messages name a document: its path as given, or "stdin" for "-"."""
    return "stdin" if path == "-" else path


def summarize_file(
    engine: Engine,
    path: str,
    job: SummaryJob,
    *,
    document: Document | None = None,
    guard: Guard | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_progress: ProgressFn | None = None,
    on_plan: Callable[[list[dict[str, Any]]], None] | None = None,
) -> dict[str, Any]:
    """Summarize one document and return its record; a bad document gives a record with
    ``error`` set, naming it.

    The record is :func:`summary_record`'s shape, then with a ``guard`` its verdicts
    (``guard``, ``flagged``); a flagged document is not summarized and a flagged summary is
    withheld (null, with a ``flagged_note`` for the screen). KeyboardInterrupt is not caught:
    the batch stops and the record is not written.

    Args:
        engine: the text engine.
        path: the document file, or "-" for ``document`` read from stdin.
        job: what is the same for every document.
        document: the document, already read (stdin is read before the model loads, so a bad
            pipe fails fast); None: read ``path`` with ``job.format`` and ``job.max_bytes``.
        guard: checks the document before and the summary after (``--guard``).
        on_warning: each warning about the document (a guessed encoding, …), once read.
        on_progress: as :class:`Summarizer`'s, for this document.
        on_plan: as :class:`Summarizer`'s, for this document.

    Returns:
        The document's record.
    """
    summarizer = Summarizer(engine, job.options, on_progress=on_progress, on_plan=on_plan)

    def run(step: Calls | list[tuple[Any, Job]]) -> list[Generation]:
        # Not batched: the guard checks at once, so every step is the summarizer's.
        if not isinstance(step, Calls):
            raise LlmkitError("internal error: a guard job outside a batch")
        return summarizer.run_calls(step)

    return drive(_file_steps(summarizer, path, job, document, guard, on_warning,
                             batched=False), run)


def summarize_files(
    engine: Engine,
    paths: Sequence[str],
    job: SummaryJob,
    *,
    documents: dict[str, Document] | None = None,
    guard: Guard | None = None,
    on_warning: Callable[[str], None] | None = None,
    on_progress: Callable[[str], ProgressFn] | None = None,
    on_plan: Callable[[str, list[dict[str, Any]]], None] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """:func:`summarize_file` for many documents at once, yielding ``(path, record)`` as
    each is done (not in input order): the calls of every document in progress (chunks,
    merge levels, final summaries) share the engine's parallel sequences, so documents
    shorter than the context run ``parallel`` at a time and a long one's pieces fill what
    the others leave. With an engine that decodes one sequence at a time, one after another.
    ``on_progress`` gives a document's progress function (:class:`Summarizer`'s), told of
    each call as it finishes.
    """
    from llmkit.engines.parallel import parallel_generate, run_tasks

    documents = documents or {}
    if parallel_generate(engine) is None or not job.options.reuse_prefix:
        for path in paths:
            yield path, summarize_file(
                engine, path, job, document=documents.get(path), guard=guard,
                on_warning=on_warning, on_progress=on_progress(path) if on_progress else None,
                on_plan=_for(on_plan, path))
        return
    shown: dict[str, ProgressFn] = {}
    counts: dict[tuple[str, str], int] = {}

    def tasks() -> Iterator[tuple[str, Task]]:
        for path in paths:
            progress = on_progress(path) if on_progress is not None else None
            if progress is not None:
                shown[path] = progress
            summarizer = Summarizer(engine, job.options, on_progress=progress,
                                    on_plan=_for(on_plan, path))
            yield path, _as_task(engine, summarizer, _file_steps(
                summarizer, path, job, documents.get(path), guard, on_warning, batched=True))

    def on_result(path: str, result: Result) -> None:
        progress = shown.get(path)
        if progress is not None and result.error is None and result.job.key[0] != GUARD_JOBS:
            stage, _, n = result.job.key
            count = counts[path, stage] = counts.get((path, stage), 0) + 1
            progress(stage, count, n)
            if count == n:
                del counts[path, stage]  # a later merge level counts afresh

    yield from run_tasks(tasks(), window=getattr(engine, "parallel", 1), on_result=on_result)


def _for(on_plan: Callable[[str, list[dict[str, Any]]], None] | None, path: str
         ) -> Callable[[list[dict[str, Any]]], None] | None:
    if on_plan is None:
        return None
    return lambda plan: on_plan(path, plan)


def _as_task(engine: Engine, summarizer: Summarizer, steps: _FileSteps
             ) -> Generator[list[tuple[Any, Job]], list[Any], dict[str, Any]]:
    """``steps`` as a task of :func:`llmkit.engines.parallel.run_tasks`: each step's calls
    become jobs on ``engine`` (a job's error is raised inside ``steps``); the guard's checks
    are jobs already, and get their results."""
    try:
        step = next(steps)
        while True:
            if not isinstance(step, Calls):
                step = steps.send((yield step))
                continue
            results = yield summarizer.jobs(engine, step)
            error = next((r.error for r in results if r.error is not None), None)
            if error is not None:
                step = steps.throw(error)
            else:
                step = steps.send([r.generation for r in results])
    except StopIteration as stop:
        record: dict[str, Any] = stop.value
        return record


# A document's steps: the summarizer's calls (sent their generations) and, with ``batched``,
# the guard's checks (sent their results).
_FileSteps = Generator["Calls | list[tuple[Any, Job]]", Any, dict[str, Any]]


def _file_steps(summarizer: Summarizer, path: str, job: SummaryJob,
                document: Document | None, guard: Guard | None,
                on_warning: Callable[[str], None] | None, *, batched: bool) -> _FileSteps:
    """:func:`summarize_file`'s work, step by step (see :meth:`Summarizer.steps`); with
    ``batched``, the guard's checks are steps too (:func:`guard_input_steps`)."""
    from llmkit.documents import read_document

    engine = summarizer.engine
    try:
        doc = document if document is not None else read_document(
            Path(path), format=job.format, max_bytes=job.max_bytes)
    except LlmkitError as exc:
        return summary_record(path, None, model=engine.model_name, error=str(exc))
    if on_warning is not None:
        for warning in doc.warnings:
            on_warning(warning)
    checked = None
    if guard is not None:
        checked = yield from guard_input_steps(guard, doc.text, batched=batched)
        if checked.withheld:
            return checked.apply_to(summary_record(path, None, model=engine.model_name,
                                                   fmt=doc.format, warnings=doc.warnings),
                                    "summary")
    try:
        result = yield from summarizer.steps(doc.text)
    except LlmkitError as exc:
        return summary_record(path, None, model=engine.model_name, fmt=doc.format,
                              error=f"{document_label(path)}: {exc}", warnings=doc.warnings)
    record = summary_record(path, result, model=engine.model_name, fmt=doc.format,
                            warnings=doc.warnings)
    if guard is not None:
        checked = yield from guard_output_steps(guard, GUARD_PROMPT, result.text, checked,
                                                batched=batched)
        record = checked.apply_to(record, "summary")
    return record
