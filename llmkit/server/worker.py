"""One engine served to many requests: a thread decoding their jobs together, a bounded queue."""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace

from llmkit.engines.base import Engine, Generation
from llmkit.engines.parallel import IDLE, Job, JobQueue, Result
from llmkit.errors import LlmkitError, QueueFullError, ShuttingDownError

# How long an idle decoder waits for requests still being prepared (parsed, rendered,
# tokenized on the event loop and the prep thread, a few ms each) before it starts on the
# ones queued: requests that arrive together then evaluate their prompts in one call, as
# llama-server's (whose C++ front end queues them within a millisecond) do, instead of the
# first alone and the rest a whole prompt evaluation later.
GATHER_S = 0.05


class Arrival:
    """A request being prepared for a worker: counted until its job is queued or it fails
    (:meth:`done`, idempotent)."""

    def __init__(self, queue: _LiveQueue) -> None:
        self._queue: _LiveQueue | None = queue
        queue.arrive(+1)

    def done(self) -> None:
        if self._queue is not None:
            self._queue.arrive(-1)
            self._queue = None

    def take(self) -> bool:
        """End the count without telling the queue (the job's submission does, at once)."""
        counted, self._queue = self._queue is not None, None
        return counted


class _LiveQueue(JobQueue):
    """A :class:`JobQueue` that other threads add to, and that the decoding thread can wait on
    when it has nothing to do."""

    def __init__(self) -> None:
        super().__init__()
        self._ready = threading.Condition()
        self.arriving = 0  # requests being prepared (Arrival)
        # Work that needs the whole engine (one conversation with images on an engine whose
        # pictures cannot share the sequences): jobs wait while one is pending.
        self.calls: deque[tuple[Job, Callable[[Job], Generation]]] = deque()

    def put(self, job: Job, arrived: bool = False) -> None:
        """Add ``job``; ``arrived``: it ends an :class:`Arrival`'s count, in the same step
        (so the decoder never sees the job and still counts it as coming)."""
        with self._ready:
            super().put(job)
            self.arriving -= arrived
            self._ready.notify_all()

    def put_call(self, job: Job, call: Callable[[Job], Generation], arrived: bool = False
                 ) -> None:
        with self._ready:
            self.calls.append((job, call))
            self.arriving -= arrived
            self._ready.notify_all()

    def get(self, block: bool) -> Job | None:
        with self._ready:
            return None if self.calls else super().get(block)

    def arrive(self, change: int) -> None:
        with self._ready:
            self.arriving += change
            self._ready.notify_all()

    def gather(self) -> None:
        """Wait (up to :data:`GATHER_S`) while requests are still being prepared."""
        deadline = time.monotonic() + GATHER_S
        with self._ready:
            while self.arriving > 0 and not self.closed and not self.calls:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._ready.wait(left)

    def close(self) -> None:
        with self._ready:
            super().close()
            self._ready.notify_all()

    def wait(self) -> None:
        """Until a job or a call is added or the queue is closed."""
        with self._ready:
            while not len(self) and not self.calls and not self.closed:
                self._ready.wait()


class _Run(JobQueue):
    """One ``generate_many`` run over the live queue: it ends once the sequences are free and
    a call waits for the engine, and ending it leaves the queue open."""

    def __init__(self, live: _LiveQueue) -> None:
        super().__init__()
        self._live = live

    def __len__(self) -> int:
        return len(self._live)

    @property
    def done(self) -> bool:
        return self._live.done or bool(self._live.calls)

    def get(self, block: bool) -> Job | None:
        return self._live.get(block)

    def gather(self) -> None:
        self._live.gather()

    def close(self) -> None:
        pass


class EngineWorker:
    """Decodes the jobs of every request for one engine on a thread of its own, up to the
    engine's ``parallel`` sequences at a time (llama.cpp's continuous batching), with at most
    ``max_waiting`` more queued. Requests get a future for each job's :class:`Result`.

    An engine without ``generate_many`` (the Llama 3.2 Vision engine) runs its jobs one at a
    time; there a cancelled job stops only before it starts.
    """

    def __init__(self, engine: Engine, *, max_waiting: int) -> None:
        self.engine = engine
        self.parallel = int(getattr(engine, "parallel", 1))
        self.max_waiting = max_waiting
        self._queue = _LiveQueue()
        self._futures: dict[int, concurrent.futures.Future[Result]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._in_flight = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"llmkit-serve-{engine.model_name}")
        self._thread.start()

    def arrival(self) -> Arrival:
        """Count a request being prepared until its job is submitted (or it fails): an idle
        decoder waits briefly for it, to evaluate the prompts of requests that came together
        in one call."""
        return Arrival(self._queue)

    @property
    def arriving(self) -> int:
        """Requests being prepared (an :meth:`arrival` not yet submitted or failed)."""
        return self._queue.arriving

    @property
    def busy(self) -> int:
        """Jobs submitted and not finished (decoding or waiting)."""
        return self._in_flight

    def submit(self, job: Job, arrival: Arrival | None = None
               ) -> concurrent.futures.Future[Result]:
        """Queue ``job``; its future gets the result (``job.key`` is this worker's own).
        ``arrival``: the request's count as one being prepared, ended as the job is queued.

        Raises:
            QueueFullError: ``max_waiting`` jobs are waiting already.
            ShuttingDownError: the worker has stopped.
        """
        future, key = self._reserve()
        self._queue.put(replace(job, key=(key, job.key)),
                        arrival is not None and arrival.take())
        return future

    def submit_call(self, job: Job, call: Callable[[Job], Generation],
                    arrival: Arrival | None = None) -> concurrent.futures.Future[Result]:
        """Queue ``call(job)``, to run on the decoding thread with the engine to itself (the
        sequences finish first and new jobs wait); its future gets the generation as a
        :class:`Result`. Raises as :meth:`submit`."""
        future, key = self._reserve()
        self._queue.put_call(replace(job, key=(key, job.key)), call,
                             arrival is not None and arrival.take())
        return future

    def _reserve(self) -> tuple[concurrent.futures.Future[Result], int]:
        future: concurrent.futures.Future[Result] = concurrent.futures.Future()
        with self._lock:
            if self._queue.closed or self.error is not None:
                raise ShuttingDownError("the server is shutting down")
            if self._in_flight >= self.parallel + self.max_waiting:
                raise QueueFullError(f"{self.engine.model_name} has {self._in_flight} "
                                     "requests in progress and waiting")
            key = next(self._ids)
            self._futures[key] = future
            self._in_flight += 1
        return future, key

    def _run_calls(self) -> bool:
        """Run the calls waiting (True when there were any)."""
        ran = False
        while self._queue.calls:
            job, call = self._queue.calls.popleft()
            ran = True
            if job.cancel is not None and job.cancel.is_set():
                self._deliver(Result(job))
                continue
            try:
                self._deliver(Result(job, call(job)))
            except LlmkitError as exc:
                self._deliver(Result(job, error=exc))
        return ran

    def _deliver(self, result: Result) -> None:
        key, theirs = result.job.key
        with self._lock:
            future = self._futures.pop(key, None)
            self._in_flight -= 1
        if future is not None:
            future.set_result(replace(result, job=replace(result.job, key=theirs)))

    def _loop(self) -> None:
        try:
            generate_many: Callable[..., Iterator[Result]] | None = getattr(
                self.engine, "generate_many", None)
            if generate_many is None:
                self._one_at_a_time()
                return
            if "batch_prompts" in inspect.signature(generate_many).parameters:
                # Requests arrive together: their prompts are evaluated together (a client's
                # first token sooner), where a batch command keeps each prompt on its own.
                generate_many = functools.partial(generate_many, batch_prompts=True)
            while True:
                for result in generate_many(_Run(self._queue)):
                    if result is IDLE:
                        self._queue.wait()
                        continue
                    self._deliver(result)
                if not self._run_calls() and self._queue.done:
                    return
        except BaseException as exc:  # handed to every waiting request
            self.error = exc
        finally:
            self._fail_waiting()

    def _one_at_a_time(self) -> None:
        while True:
            self._queue.wait()
            if self._run_calls():
                continue
            job = self._queue.get(block=False)
            if job is None:
                if self._queue.closed:
                    return
                continue
            if job.prompt is None or (job.cancel is not None and job.cancel.is_set()):
                self._deliver(Result(job))
                continue
            try:
                generation = self.engine.generate(job.prompt, job.params, job.on_text)
            except LlmkitError as exc:
                self._deliver(Result(job, error=exc))
                continue
            self._deliver(Result(job, generation))

    def _fail_waiting(self) -> None:
        with self._lock:
            futures = list(self._futures.values())
            self._futures.clear()
            self._in_flight = 0
        error = self.error or ShuttingDownError("the server is shutting down")
        for future in futures:
            if not future.done():
                future.set_exception(error)

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs; let those submitted finish, then stop the thread."""
        self._queue.close()
        self._thread.join(timeout)

    def __enter__(self) -> EngineWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
