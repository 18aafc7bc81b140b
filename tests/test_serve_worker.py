"""The server's decoding thread: jobs in the parallel sequences, and calls that need the engine
alone in between, each giving what it gives one at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmkit.engines.base import SamplingParams
from llmkit.engines.parallel import Job
from llmkit.server.worker import EngineWorker

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Bees make", "Once upon a time",
           "Water freezes at", "The largest planet is", "My favourite colour is"]


def test_calls_between_jobs_see_the_engine_as_one_at_a_time_would(smollm2_path: Path) -> None:
    from llmkit.engines.llama_cpp import LlamaCppEngine

    params = SamplingParams(temperature=0, max_tokens=12)
    with LlamaCppEngine(smollm2_path, n_ctx=256, threads=2, parallel=2) as engine:
        prompts = [engine.tokenize(p) for p in PROMPTS]
        expected = []
        for prompt in prompts:
            engine.forget()
            expected.append(engine.generate(prompt, params).text)
        engine.forget()
        with EngineWorker(engine, max_waiting=16) as worker:
            futures = []
            for i, prompt in enumerate(prompts):
                if i % 2:
                    # The engine alone: its own generate, on the decoding thread.
                    futures.append(worker.submit_call(
                        Job(i, prompt, params),
                        lambda job: engine.generate(job.prompt or [], job.params)))
                else:
                    futures.append(worker.submit(Job(i, prompt, params)))
            results = [f.result(timeout=120) for f in futures]
        assert [r.job.key for r in results] == list(range(len(PROMPTS)))
        assert [r.error for r in results] == [None] * len(PROMPTS)
        assert [r.generation.text for r in results if r.generation] == expected
        assert worker.busy == 0


def test_a_cancelled_call_does_not_run(smollm2_path: Path) -> None:
    import threading

    from llmkit.engines.llama_cpp import LlamaCppEngine

    ran = []
    with LlamaCppEngine(smollm2_path, n_ctx=256, threads=2, parallel=2) as engine, \
            EngineWorker(engine, max_waiting=4) as worker:
        cancel = threading.Event()
        cancel.set()
        result = worker.submit_call(Job("x", [], SamplingParams(), cancel=cancel),
                                    lambda job: ran.append(job) or engine.generate([1], job.params)
                                    ).result(timeout=60)
        assert result.generation is None and result.job.key == "x" and not ran


def test_requests_that_arrive_together_are_evaluated_together(smollm2_path: Path) -> None:
    """An idle decoder waits for requests still being prepared: three announced together,
    submitted a few ms apart, have their prompts evaluated in one call (not the first alone);
    a request that fails before its job is queued stops counting at once."""
    import time

    from llmkit.engines.llama_cpp import LlamaCppEngine
    from llmkit.engines.parallel import ParallelDecoder

    calls: list[int] = []
    original = ParallelDecoder._decode

    def decode(self: ParallelDecoder, batch: object) -> float:
        calls.append(int(batch.n_tokens))  # type: ignore[attr-defined]
        return original(self, batch)

    params = SamplingParams(temperature=0, max_tokens=2)
    with LlamaCppEngine(smollm2_path, n_ctx=256, threads=2, parallel=4) as engine, \
            EngineWorker(engine, max_waiting=8) as worker:
        prompts = [engine.tokenize(p) for p in PROMPTS[:3]]
        ParallelDecoder._decode = decode  # type: ignore[method-assign]
        try:
            arrivals = [worker.arrival() for _ in prompts]
            failed = worker.arrival()
            futures = []
            for arrival, (i, prompt) in zip(arrivals, enumerate(prompts), strict=True):
                futures.append(worker.submit(Job(i, prompt, params), arrival))
                time.sleep(0.01)
            failed.done()
            results = [f.result(timeout=60) for f in futures]
            assert worker.arriving == 0
        finally:
            ParallelDecoder._decode = original  # type: ignore[method-assign]
    assert all(r.error is None and r.generation is not None for r in results)
    assert calls[0] == sum(len(p) for p in prompts), calls  # the three prompts, whole, at once
