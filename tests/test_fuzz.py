"""The fuzz harness (tests/fuzz): kept crashers and seeds replayed; each target fuzzed briefly."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="the fuzz harness needs atheris (pip install -e '.[dev]')")

from tests.fuzz.runner import CRASHERS, fuzz
from tests.fuzz.targets import TARGETS

# Seconds each target is fuzzed for in the slow suite (all four: under two minutes). Longer
# runs: benchmarks/fuzz.py.
FUZZ_SECONDS = float(os.environ.get("LLMKIT_FUZZ_SECONDS", "20"))


def kept_crashers() -> list[tuple[str, Path]]:
    return sorted((path.parent.name, path) for path in CRASHERS.glob("*/*") if path.is_file())


@pytest.mark.parametrize(("target", "path"), kept_crashers(),
                         ids=[f"{t}/{p.name}" for t, p in kept_crashers()])
def test_kept_crashers_stay_fixed(target: str, path: Path) -> None:
    fuzz_target = TARGETS[target]()
    try:
        started = time.perf_counter()
        fuzz_target(path.read_bytes())
        assert time.perf_counter() - started < fuzz_target.timeout
    finally:
        fuzz_target.close()


def test_every_target_has_its_crashers_directory_name() -> None:
    assert {path.name for path in CRASHERS.iterdir()} <= set(TARGETS)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_keep_the_contracts(target: str) -> None:
    fuzz_target = TARGETS[target]()
    try:
        seeds = fuzz_target.seeds()
        assert len(seeds) >= 5
        for data in seeds.values():
            fuzz_target(data)
    finally:
        fuzz_target.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz(target: str, tmp_path: Path) -> None:
    run = fuzz(target, FUZZ_SECONDS, tmp_path)
    print(f"{target}: {run.executions} executions in {run.seconds:.0f} s, "
          f"{len(run.findings)} crashes")
    assert not run.findings, (
        f"{run.findings[0].kind} on {run.findings[0].input}: {run.findings[0].error}\n"
        f"reproduce: python -m tests.fuzz {target} {run.findings[0].input}\n{run.output}")
    assert run.executions > 20, run.output
