"""Continuous batching: many sequences decoded together in one llama.cpp context."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from llmkit.engines._llama_vocab import Sampled, TextStream, deferred_interrupt
from llmkit.engines.base import Generation, SamplingParams
from llmkit.errors import ContextOverflowError, InputError, LlmkitError


@dataclass
class Job:
    """One sequence to generate: its prompt tokens and sampling settings.

    ``key`` is the caller's handle (it comes back with the result). ``logits_steps`` asks for
    a copy of the next-token logits of the first that many steps (the first is the prompt's
    own), which a guard scores from. A job without a ``prompt`` (None) carries no work: it
    comes back at once, in its turn, so that a caller's bad input keeps its place.
    """

    key: Any
    prompt: Sequence[int] | None
    params: SamplingParams = field(default_factory=SamplingParams)
    logits_steps: int = 0
    # A prompt with images (the engine's media_job): ``prompt`` is then one key per
    # position, and the media evaluates it into a sequence: evaluate(seq, keep) and
    # keep(shared), the shared prefix cut back to a place it can start from.
    media: Any = None
    # Streaming: called with each complete piece of text as it is generated (on the
    # decoding thread).
    on_text: Callable[[str], None] | None = None
    # Set (from any thread, or by on_text) to end the job at its next step, finish_reason
    # "cancelled": its sequence is free for the next job at once.
    cancel: threading.Event | None = None


@dataclass
class Result:
    """What a job gave: its generation (None for a job without work or one that failed),
    the logits it asked for, and the error that made it fail."""

    job: Job
    generation: Generation | None = None
    logits: list[Any] = field(default_factory=list)
    error: LlmkitError | None = None


@dataclass
class _Slot:
    """A sequence id of the context and what its cells hold."""

    seq: int
    cells: list[int] = field(default_factory=list)  # the tokens in its KV cells, by position
    prompt: list[int] = field(default_factory=list)  # its (last) job's prompt
    job: Job | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not evaluated yet
    next_token: int | None = None  # sampled, not yet evaluated
    sampler: Any = None
    stream: TextStream | None = None
    generated: list[int] = field(default_factory=list)
    logits: list[Any] = field(default_factory=list)
    limit: int = 0
    room: int = 0
    evaluated: int = 0
    t0: float = 0.0
    t_prompt: float = 0.0
    t_first: float = 0.0


class _Feed:
    """The jobs, pulled by a thread so that a slow source (stdin) never stalls the sequences
    in flight: the scheduler waits for a job only when it has nothing else to do."""

    _END = object()

    def __init__(self, jobs: Iterable[Job], size: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self.done = False
        self._thread = threading.Thread(target=self._pull, args=(iter(jobs),), daemon=True,
                                        name="llmkit-jobs")
        self._thread.start()

    def _pull(self, jobs: Iterator[Job]) -> None:
        try:
            for job in jobs:
                if not self._put(job):
                    return
        except BaseException as exc:  # handed to the scheduler's thread, raised there
            self._put(exc)
            return
        self._put(self._END)

    def _put(self, item: Any) -> bool:
        """Queue ``item`` once there is room; False if the scheduler stopped first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, block: bool) -> Job | None:
        """The next job, or None (none ready without ``block``, or the source is done)."""
        if self.done:
            return None
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return None
        if item is self._END:
            self.done = True
            return None
        if isinstance(item, BaseException):
            self.done = True
            raise item
        job: Job = item
        return job

    def close(self) -> None:
        self._stop.set()


def parallel_generate(engine: object) -> Callable[..., Iterator[Result]] | None:
    """``engine.generate_many`` when the engine decodes several sequences at once (loaded
    with ``parallel`` > 1), else None: the caller goes one item at a time, as always."""
    many = getattr(engine, "generate_many", None)
    if getattr(engine, "parallel", 1) <= 1 or many is None:
        return None
    generate: Callable[..., Iterator[Result]] = many
    return generate


class _SyncFeed:
    """The jobs, pulled when needed: a source that never keeps the scheduler waiting (a
    list, a file) makes every run admit the same jobs at the same steps, so it is repeatable
    to the bit."""

    def __init__(self, jobs: Iterable[Job]) -> None:
        self._jobs = iter(jobs)
        self.done = False

    def get(self, block: bool) -> Job | None:
        """The next job, or None once the source is done."""
        if self.done:
            return None
        job = next(self._jobs, None)
        self.done = job is None
        return job

    def close(self) -> None:
        """Nothing to stop."""


class JobQueue:
    """Jobs a caller adds while the run goes on (an item's next jobs, made from the results
    of its last ones). With none waiting and the queue open, the run yields :data:`IDLE`
    instead of ending, so the caller can add more; it ends once the queue is closed."""

    def __init__(self) -> None:
        self._jobs: deque[Job] = deque()
        self.closed = False

    def put(self, job: Job) -> None:
        """Add ``job`` after those waiting."""
        self._jobs.append(job)

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def done(self) -> bool:
        """Closed, and every job taken."""
        return self.closed and not self._jobs

    def get(self, block: bool) -> Job | None:
        """The next job waiting, or None."""
        return self._jobs.popleft() if self._jobs else None

    def gather(self) -> None:
        """Called when no sequence is busy, before jobs are taken: a source whose jobs arrive
        together but one by one may wait here until they are in (a server's requests)."""

    def close(self) -> None:
        """No more jobs will come."""
        self.closed = True


# What a run fed by a JobQueue yields when it has nothing to do: not a job's result.
IDLE = Result(Job(None, None))

# Prompt tokens a server's job must gain to start from another sequence's cache rather than
# its own: a copy moves that sequence's whole cache (about what evaluating a token or two
# costs on a small model, measured on SmolLM2 with 1,024 cells).
COPY_GAIN = 8


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ParallelDecoder:
    """Decodes up to ``n_seq`` jobs at once in one llama.cpp context (``n_seq_max`` sequences
    over a unified KV cache): each step is one ``llama_batch`` holding the next token of every
    sequence that is generating and prompt chunks of those just admitted; a finished job's
    sequence takes the next job at once. Each sequence has its own sampler chain (grammar
    included), sampled inside llama.cpp from its row of the batch's logits.

    Each sequence has a KV cache of its own (``n_ctx_seq`` cells), so it computes what a
    sequence decoded alone computes. A new job's prompt starts from the prefix it shares with
    the job before it (a guard's policy, a shared instruction), as one at a time it would:
    that job's cache is copied with ``llama_memory_seq_cp`` (a few milliseconds) and cut
    back to the prefix, which is not evaluated again.

    Args:
        lc: the llama_cpp bindings.
        ctx: a context created with ``n_seq_max`` = ``n_seq`` and ``kv_unified`` off, whose
            KV cache holds ``n_seq × n_ctx_seq`` cells.
        vocab: the model's llama_vocab.
        n_seq: sequences decoded together.
        n_ctx_seq: the context each job may use (prompt and generation).
        n_batch: tokens per ``llama_decode`` call (the context's n_batch).
        make_sampler: a sampler chain for a job's params (freed here).
        retune: called before each step (the engine's thread governor).
        batch_prompts: evaluate the prompts of jobs admitted together in one call with the
            generating tokens, never hold a job back for a prefix still being evaluated,
            and start a job on a free sequence that holds its prefix itself (a server's
            first-token latency), instead of one sequence's chunk per step, in a call of its
            own, after the job before it, which keeps every prompt in the chunks and kernels
            it would have alone (batch commands: answers equal to the one-at-a-time path's,
            bit for bit).
    """

    def __init__(self, lc: Any, ctx: Any, vocab: Any, *, n_seq: int, n_ctx_seq: int,
                 n_batch: int, make_sampler: Callable[[SamplingParams], Any],
                 retune: Callable[[], None] = lambda: None,
                 batch_prompts: bool = False) -> None:
        if n_seq < 1:
            raise InputError(f"--parallel {n_seq} is too small", hint="use at least 1")
        self._lc, self._ctx, self._vocab = lc, ctx, vocab
        self.n_seq, self.n_ctx_seq, self.n_batch = n_seq, n_ctx_seq, max(n_batch, n_seq)
        self._make_sampler, self._retune = make_sampler, retune
        self.batch_prompts = batch_prompts
        self._interrupt_in_step = False  # a Ctrl-C during a step's decode, raised after it
        self._slots = [_Slot(seq) for seq in range(n_seq)]
        self._held: Job | None = None  # admitted next, once the prefix it shares is held
        self._last = self._slots[0]  # the slot of the job admitted last
        self.held: list[int] = []  # what sequence 0 holds after a run
        self.steps = 0
        self.shared_tokens = 0  # prompt tokens not evaluated: held already
        self.python_s = 0.0  # time in this loop outside llama_decode (per-token overhead)
        self.decode_s = 0.0

    # -- the loop ---------------------------------------------------------------------------

    def run(self, jobs: Iterable[Job], held: Sequence[int] = (), *, live: bool = False
            ) -> Iterator[Result]:
        """Decode ``jobs``, yielding each result as its job finishes (not in input order).

        ``live``: the jobs come from a source that may keep one waiting (stdin): a thread
        pulls them, and a job is admitted when it arrives, without stalling the others.

        ``held`` is what sequence 0 holds already (the one-sequence path's cache): the first
        job starts from it. Afterwards sequence 0 holds the last job's cells, :attr:`held`.

        A KeyboardInterrupt stops admitting jobs; the jobs in flight finish, are yielded, and
        then the interrupt is raised again. A second one ends those jobs too, with
        finish_reason "interrupted".
        """
        lc = self._lc
        mem = lc.llama_get_memory(self._ctx)
        for slot in self._slots[1:]:
            lc.llama_memory_seq_rm(mem, slot.seq, -1, -1)
            slot.cells = []
        self._slots[0].cells = list(held)
        self._last = self._slots[0]
        feed: _Feed | _SyncFeed | JobQueue = (
            jobs if isinstance(jobs, JobQueue)
            else _Feed(jobs, self.n_seq) if live else _SyncFeed(jobs))
        batch = lc.llama_batch_init(self.n_batch, 0, 1)
        interrupted = 0
        try:
            while True:
                try:
                    if not interrupted:
                        yield from self._admit(feed, mem)
                    active = [s for s in self._slots if s.job is not None]
                    if not active:
                        if interrupted or not isinstance(feed, JobQueue) or feed.done:
                            break
                        yield IDLE  # the caller adds jobs, or closes the queue
                        continue
                    yield from self._step(batch, active)
                    if self._interrupt_in_step:
                        self._interrupt_in_step = False
                        raise KeyboardInterrupt
                except KeyboardInterrupt:
                    interrupted += 1
                    # A Ctrl-C that landed between a sequence's decode and its sampling leaves
                    # it with nothing to do next: it ends here (else the loop would spin on it).
                    for slot in self._slots:
                        if (slot.job is not None and not slot.pending
                                and slot.next_token is None):
                            if not slot.t_prompt:
                                slot.t_prompt = time.perf_counter()
                            yield self._finish(slot, "interrupted")
                    if interrupted > 1:
                        yield from self._interrupt_all()
                        break
            if interrupted:
                raise KeyboardInterrupt
        finally:
            feed.close()
            lc.llama_batch_free(batch)
            for slot in self._slots:
                self._release(slot)
            self._settle(mem)

    def _settle(self, mem: Any) -> None:
        """Leave sequence 0 holding the last admitted job's cells (what the one-sequence
        path's cache would hold after it), and the other sequences empty."""
        lc = self._lc
        last = self._last
        if last is not self._slots[0] and last.cells:
            lc.llama_memory_seq_cp(mem, last.seq, 0, -1, -1)
        self.held = list(last.cells)
        for slot in self._slots[1:]:
            lc.llama_memory_seq_rm(mem, slot.seq, -1, -1)
            slot.cells = []
        self._slots[0].cells = list(self.held)

    def _admit(self, feed: _Feed | _SyncFeed | JobQueue, mem: Any) -> Iterator[Result]:
        """Give free sequences the next jobs, in order (waiting for one only when none is in
        flight).

        Each job starts from the prefix it shares with the job before it, as it would one at
        a time (so its prompt is evaluated from the same place, in the same chunks, and
        gives the same tokens): that job's cells are copied. A job whose shared prefix that
        job is still evaluating waits for it, and the jobs after it wait too.
        """
        if isinstance(feed, JobQueue) and all(s.job is None for s in self._slots):
            feed.gather()
        while True:
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            busy = len(free) < len(self._slots)
            job = self._held
            self._held = None
            if job is None:
                if feed.done:
                    return
                job = feed.get(block=not busy)
                if job is None:
                    return
            if job.prompt is None or (job.cancel is not None and job.cancel.is_set()):
                yield Result(job)  # no work, or cancelled before it started: no generation
                continue
            error = self._refusal(job)
            if error is not None:
                yield Result(job, error=error)
                continue
            # What the job before it leaves: its prompt (it may still be evaluating it), or,
            # once finished, its cells (its answer too, as a one-at-a-time cache holds it).
            if self.batch_prompts:
                source, shared = self._held_prefix(job.prompt, free)
            else:
                source = self._last
                before = source.prompt if source.job is not None else source.cells
                shared = min(_common_prefix(before, job.prompt), len(job.prompt) - 1)
            if len(source.cells) < shared:
                self._held = job  # the prefix is still being evaluated there
                return
            slot = source if source in free else free[0]
            # A Ctrl-C here is raised once the slot is whole: taken halfway (a job but no
            # text stream yet), the run would go on to evaluate it and fail on sampling it.
            with deferred_interrupt():
                self._start(slot, job, mem, source, shared)
                self._last = slot

    def _held_prefix(self, prompt: Sequence[int], free: list[_Slot]) -> tuple[_Slot, int]:
        """Where a server's job starts (never waiting for a prefix still being evaluated):
        the free sequence holding the longest prefix of ``prompt`` itself, as llama-server's
        slots reuse their own cache, unless another sequence holds more than
        :data:`COPY_GAIN` tokens longer, which are then copied from it. Copying between
        sequences copies the whole of their cache (llama.cpp keeps them in streams of
        their own), so it is not worth a few tokens."""
        def held(slot: _Slot) -> int:
            return min(_common_prefix(slot.cells, prompt), len(prompt) - 1)

        own = max(free, key=held)
        best = max(self._slots, key=held)
        if held(best) > held(own) + COPY_GAIN:
            return best, held(best)
        return own, held(own)

    def _refusal(self, job: Job) -> LlmkitError | None:
        assert job.prompt is not None
        if not job.prompt:
            return InputError("the prompt is empty")
        if len(job.prompt) >= self.n_ctx_seq:
            return ContextOverflowError(len(job.prompt), self.n_ctx_seq)
        return None

    def _start(self, slot: _Slot, job: Job, mem: Any, source: _Slot, shared: int) -> None:
        """Put ``job`` on ``slot``, its first ``shared`` tokens taken from ``source``'s
        cells: cut back in place, or copied (llama.cpp copies between sequences' caches
        only whole) and then cut."""
        lc = self._lc
        assert job.prompt is not None
        prompt = list(job.prompt)
        if source is not slot and shared:
            lc.llama_memory_seq_cp(mem, source.seq, slot.seq, -1, -1)
            slot.cells = source.cells[:shared]
        elif source is not slot:
            lc.llama_memory_seq_rm(mem, slot.seq, -1, -1)
            slot.cells = []
        if job.media is not None:
            shared = job.media.keep(shared)  # never half an image
        if not lc.llama_memory_seq_rm(mem, slot.seq, shared, -1):
            lc.llama_memory_seq_rm(mem, slot.seq, -1, -1)
            shared = 0
        del slot.cells[shared:]
        self.shared_tokens += shared
        slot.prompt = prompt
        slot.pending = prompt[shared:]
        slot.job = job
        slot.sampler = self._make_sampler(job.params)
        slot.stream = TextStream(lc, self._vocab, job.on_text)
        slot.generated, slot.logits, slot.next_token = [], [], None
        slot.room = self.n_ctx_seq - len(prompt)
        max_tokens = job.params.max_tokens
        slot.limit = slot.room if max_tokens is None else min(max_tokens, slot.room)
        slot.evaluated = len(slot.pending)
        slot.t0 = time.perf_counter()
        slot.t_prompt = slot.t_first = 0.0

    def _step(self, batch: Any, active: list[_Slot]) -> list[Result]:
        """One step: the next token of every generating sequence in one llama_decode, then
        one prompt chunk of the earliest admitted sequence still evaluating its prompt, in a
        call of its own (so a prompt is evaluated in the chunks, and with the kernels, a
        sequence alone would have: the answers are the same tokens). With ``batch_prompts``
        the chunks of every text prompt waiting join the generating tokens in the same call,
        as llama-server's slots do: a server's step then reads the weights once, not twice,
        while a prompt is coming in. Returns the jobs it finished."""
        t_start, decode_before = time.perf_counter(), self.decode_s
        self._retune()
        finished: list[Result] = []
        cancelled = [s for s in active if s.job is not None and s.job.cancel is not None
                     and s.job.cancel.is_set()]
        if cancelled:
            for slot in cancelled:
                finished.append(self._cancel(slot))
            active = [s for s in active if s.job is not None]
        decoding = [s for s in active if s.next_token is not None]
        prompting = next((s for s in active if s.pending), None)
        with_media = (prompting is not None and prompting.job is not None
                      and bool(prompting.job.media))
        group: list[_Slot] = []
        if prompting is not None and not with_media:
            # One sequence's chunk, or (batch_prompts) chunks of every text prompt waiting,
            # in admission order, up to n_batch tokens together.
            group = [prompting]
            if self.batch_prompts:
                group = [s for s in active if s.pending and s.job is not None
                         and not s.job.media]
        if decoding and group and not self.batch_prompts:
            finished += self._evaluate(batch, decoding, [])
            finished += self._evaluate(batch, [], group)
        elif decoding or group:
            finished += self._evaluate(batch, decoding, group)
        if with_media:
            assert prompting is not None and prompting.job is not None
            # A prompt with images is evaluated whole (the projector encodes each image in
            # one go), by the engine, into its sequence, from where its cells end.
            t0 = time.perf_counter()
            try:
                prompting.job.media.evaluate(prompting.seq, len(prompting.cells))
            except LlmkitError as exc:  # this image's error, not the run's
                job = prompting.job
                self._release(prompting)
                self._lc.llama_memory_seq_rm(self._lc.llama_get_memory(self._ctx),
                                             prompting.seq, -1, -1)
                prompting.cells = []
                finished.append(Result(job, error=exc))
                self.python_s += (time.perf_counter() - t_start) - (self.decode_s
                                                                    - decode_before)
                return finished
            t_done = time.perf_counter()
            self.decode_s += t_done - t0
            self.steps += 1
            prompting.cells.extend(prompting.pending)
            prompting.pending = []
            result = self._sample(prompting, -1, t_done)
            if result is not None:
                finished.append(result)
        self.python_s += (time.perf_counter() - t_start) - (self.decode_s - decode_before)
        return finished

    def _evaluate(self, batch: Any, decoding: list[_Slot], group: list[_Slot]
                  ) -> list[Result]:
        """One llama_decode of the next token of each of ``decoding``, then the next prompt
        chunks of ``group`` in order, up to n_batch tokens in all; samples what ends."""
        tokens, pos, n_seq_id, seq_id, logits = (batch.token, batch.pos, batch.n_seq_id,
                                                 batch.seq_id, batch.logits)
        ends: list[tuple[_Slot, int]] = []
        for n, slot in enumerate(decoding):
            token = slot.next_token
            assert token is not None
            tokens[n], pos[n], n_seq_id[n], logits[n] = token, len(slot.cells), 1, 1
            seq_id[n][0] = slot.seq
            slot.cells.append(token)
            slot.next_token = None
            ends.append((slot, n))
        n = len(decoding)
        for slot in group:
            take = slot.pending[:self.n_batch - n]
            if not take:
                break
            del slot.pending[:len(take)]
            base = len(slot.cells)
            for i, token in enumerate(take):
                tokens[n + i], pos[n + i], n_seq_id[n + i], logits[n + i] = (
                    token, base + i, 1, 0)
                seq_id[n + i][0] = slot.seq
            slot.cells.extend(take)
            n += len(take)
            logits[n - 1] = 1
            if not slot.pending:
                ends.append((slot, n - 1))
        batch.n_tokens = n
        t_done = self._decode(batch)
        finished = []
        for slot, row in ends:
            result = self._sample(slot, row, t_done)
            if result is not None:
                finished.append(result)
        return finished

    def _decode(self, batch: Any) -> float:
        """llama_decode of ``batch``; returns when it finished."""
        t0 = time.perf_counter()
        # llama.cpp logs while it builds the graph: a Ctrl-C raised inside that callback would
        # be lost, so it is held until the batch is done; then the step samples what it
        # decoded and the run takes the interrupt after it (raised here, it would leave the
        # sequences of this batch decoded but never sampled).
        rc: int | None = None
        try:
            with deferred_interrupt():
                rc = self._lc.llama_decode(self._ctx, batch)
        except KeyboardInterrupt:
            if rc is None:  # before the decode ran: nothing to sample
                raise
            self._interrupt_in_step = True
        t1 = time.perf_counter()
        self.decode_s += t1 - t0
        self.steps += 1
        if rc != 0:
            raise LlmkitError(f"llama.cpp failed to evaluate a batch of {batch.n_tokens} "
                              f"tokens (code {rc})")
        return t1

    def _sample(self, slot: _Slot, index: int, now: float) -> Result | None:
        lc = self._lc
        job = slot.job
        assert job is not None and slot.stream is not None
        if not slot.t_prompt:
            slot.t_prompt = now
        if len(slot.logits) < job.logits_steps:
            import numpy as np

            n_vocab = lc.llama_vocab_n_tokens(self._vocab)
            row = lc.llama_get_logits_ith(self._ctx, index)
            slot.logits.append(np.ctypeslib.as_array(row, shape=(n_vocab,)).copy())
        if len(slot.generated) >= slot.limit:
            return self._finish(slot, self._at_limit(slot))
        token = lc.llama_sampler_sample(slot.sampler, self._ctx, index)
        if lc.llama_vocab_is_eog(self._vocab, token):
            return self._finish(slot, "stop")
        if not slot.generated:
            slot.t_first = time.perf_counter()
        slot.generated.append(token)
        slot.stream.push(token)
        if job.cancel is not None and job.cancel.is_set():
            return self._finish(slot, "cancelled")
        if len(slot.generated) >= slot.limit:
            return self._finish(slot, self._at_limit(slot))
        slot.next_token = token
        return None

    @staticmethod
    def _at_limit(slot: _Slot) -> str:
        """Why a job that reached its limit ended: its max_tokens, or the full context."""
        assert slot.job is not None
        wanted = slot.job.params.max_tokens
        return "length" if wanted is not None and wanted <= slot.room else "context"

    def _finish(self, slot: _Slot, finish: str) -> Result:
        job = slot.job
        assert job is not None and slot.stream is not None
        slot.stream.finish()
        prompt_len = len(job.prompt or ())
        out = Sampled(slot.stream.pieces, slot.generated, finish, slot.t_first or slot.t_prompt)
        generation = out.generation(prompt_len, slot.evaluated, slot.t0, slot.t_prompt)
        result = Result(job, generation, slot.logits)
        self._release(slot)
        return result

    def _cancel(self, slot: _Slot) -> Result:
        """End a job whose caller cancelled it. A prompt not evaluated to its end leaves its
        sequence's cells as far as they were evaluated."""
        if not slot.t_prompt:
            slot.t_prompt = time.perf_counter()
        slot.pending = []
        return self._finish(slot, "cancelled")

    def _release(self, slot: _Slot) -> None:
        """Free the sequence for the next job; its cells stay (a later prompt may share
        them) until that job takes it."""
        if slot.sampler is not None:
            self._lc.llama_sampler_free(slot.sampler)
        slot.sampler = None
        slot.job = None
        slot.stream = None
        slot.pending = []
        slot.next_token = None

    def _interrupt_all(self) -> Iterator[Result]:
        for slot in self._slots:
            if slot.job is not None:
                if not slot.t_prompt:
                    slot.t_prompt = time.perf_counter()
                yield self._finish(slot, "interrupted")



# A task: an item's work, as a generator that yields the jobs it needs next, each with the
# engine to run it on, receives their results in the same order, and returns the item's
# outcome.
Task = Generator[list[tuple[Any, Job]], list[Result], Any]


@dataclass
class _Running:
    id: int
    key: Any
    task: Task
    jobs: list[Job] = field(default_factory=list)
    results: list[Result | None] = field(default_factory=list)
    waiting: int = 0


class _Stream:
    """One engine's parallel run, fed from a queue."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.queue = JobQueue()
        self.run: Iterator[Result] = engine.generate_many(self.queue)
        self.outstanding = 0  # jobs put and not yet given back


def run_tasks(tasks: Iterable[tuple[Any, Task]], *, window: int,
              on_result: Callable[[Any, Result], None] | None = None
              ) -> Iterator[tuple[Any, Any]]:
    """Run many items' tasks together, yielding ``(key, outcome)`` as each task returns.

    The jobs of every task in progress share their engine's parallel run (one
    :class:`ParallelDecoder` per engine, fed from a :class:`JobQueue`): a long document's
    chunks and another document's single call decode side by side, and a task's next jobs
    (a merge level) join as soon as its last ones are done. New tasks start, in order, while
    fewer than ``window`` jobs wait to be admitted, so the sequences stay busy and what is in
    flight stays bounded. With two engines (a model and its guard), each runs until one of
    its jobs finishes, in turn.

    ``on_result`` is called with a task's key and each of its job's results as it comes
    (progress), before the task sees them.

    A task's exception ends the whole run (its own errors are its to turn into outcomes);
    a KeyboardInterrupt too, after the runs have stopped.
    """
    source = iter(tasks)
    streams: dict[int, _Stream] = {}
    running: dict[int, _Running] = {}
    order: list[_Stream] = []
    next_id = 0
    exhausted = False

    def advance(state: _Running, sent: list[Result] | None) -> tuple[Any, Any] | None:
        """Run ``state``'s task to its next jobs (queued), or to its outcome (returned)."""
        try:
            wanted = next(state.task) if sent is None else state.task.send(sent)
        except StopIteration as stop:
            return state.key, stop.value
        while not wanted:  # nothing asked: answered at once
            try:
                wanted = state.task.send([])
            except StopIteration as stop:
                return state.key, stop.value
        state.jobs = [job for _, job in wanted]
        state.results = [None] * len(wanted)
        state.waiting = len(wanted)
        for index, (engine, job) in enumerate(wanted):
            stream = streams.get(id(engine))
            if stream is None:
                stream = streams[id(engine)] = _Stream(engine)
                order.append(stream)
            stream.queue.put(replace(job, key=(state.id, index)))
            stream.outstanding += 1
        return None

    def waiting() -> int:
        return sum(len(s.queue) for s in order)

    turn = 0
    try:
        while True:
            while not exhausted and waiting() < window:
                item = next(source, None)
                if item is None:
                    exhausted = True
                    break
                state = running[next_id] = _Running(next_id, item[0], item[1])
                next_id += 1
                done = advance(state, None)
                if done is not None:
                    del running[state.id]
                    yield done
            if exhausted and not running:
                return
            busy = [s for s in order if s.outstanding]
            if not busy:
                raise LlmkitError("internal error: tasks wait for jobs that none runs")
            stream = busy[turn % len(busy)]
            turn += 1
            result = next(stream.run)
            if result is IDLE:
                continue
            tid, index = result.job.key
            stream.outstanding -= 1
            state = running[tid]
            state.results[index] = given_one = Result(state.jobs[index], result.generation,
                                                      result.logits, result.error)
            if on_result is not None:
                on_result(state.key, given_one)
            state.waiting -= 1
            if state.waiting:
                continue
            given = [r for r in state.results if r is not None]
            done = advance(state, given)
            if done is not None:
                del running[tid]
                yield done
    finally:
        for state in running.values():
            state.task.close()  # its own cleanup (an image prompt's native buffers)
        for stream in order:
            stream.queue.close()
            close = getattr(stream.run, "close", None)
            if close is not None:
                close()


A = TypeVar("A")
B = TypeVar("B")
T = TypeVar("T")


def drive(steps: Generator[A, B, T], run: Callable[[A], B]) -> T:
    """Run ``steps`` (a generator of requests) to its end one request at a time, ``run``
    answering each; an LlmkitError of ``run`` is raised inside ``steps``, which may turn it
    into its outcome. The one-at-a-time counterpart of :func:`run_tasks`."""
    try:
        request = next(steps)
        while True:
            try:
                answer = run(request)
            except LlmkitError as exc:
                request = steps.throw(exc)
                continue
            request = steps.send(answer)
    except StopIteration as stop:
        value: T = stop.value
        return value
