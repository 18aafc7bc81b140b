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
