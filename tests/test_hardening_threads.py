"""Thread choice on a busy machine: LLMKIT_THREADS and --threads exactly, else the idle cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmkit import hardware
from llmkit.errors import UsageError
from llmkit.hardware import (
    CpuReading,
    ThreadChoice,
    ThreadGovernor,
    idle_threads,
    other_load,
    parse_proc_stat,
    requested_threads,
)

# -- what the user fixed ------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "threads", "expected"), [
    (None, None, None),
    ("", None, None),
    ("3", None, ThreadChoice(3, "set by LLMKIT_THREADS")),
    (" 2\n", None, ThreadChoice(2, "set by LLMKIT_THREADS")),
    ("512", None, ThreadChoice(512, "set by LLMKIT_THREADS")),
    (None, 7, ThreadChoice(7, "set by --threads")),
    ("3", 1, ThreadChoice(1, "set by --threads")),  # the option wins over the environment
    ("nonsense", 4, ThreadChoice(4, "set by --threads")),
])
def test_requested_threads(monkeypatch: pytest.MonkeyPatch, env: str | None,
                           threads: int | None, expected: ThreadChoice | None) -> None:
    if env is None:
        monkeypatch.delenv("LLMKIT_THREADS", raising=False)
    else:
        monkeypatch.setenv("LLMKIT_THREADS", env)
    assert requested_threads(threads) == expected


@pytest.mark.parametrize("threads", [0, -1, 513, 2**32 + 1])
def test_thread_counts_out_of_range_are_usage_errors(threads: int) -> None:
    with pytest.raises(UsageError, match=f"^--threads must be from 1 to 512, not {threads}$"):
        requested_threads(threads)


# -- measuring other processes --------------------------------------------------------------------

STAT = """cpu  400 0 100 900 50 0 10 20 0 0
cpu0 200 0 50 450 25 0 5 10 0 0
cpu1 200 0 50 450 25 0 5 20 0 0
intr 1 2 3
ctxt 99
"""


@pytest.mark.parametrize(("cpus", "busy"), [
    ({0}, 200 + 50 + 5 + 10),  # user, system, softirq and steal; idle and iowait are not busy
    ({1}, 200 + 50 + 5 + 20),
    ({0, 1}, 265 + 275),
    ({2}, None),  # no such CPU: not /proc/stat as expected
    (set(), None),
])
def test_parse_proc_stat(cpus: set[int], busy: int | None) -> None:
    assert parse_proc_stat(STAT, cpus) == busy


def test_parse_proc_stat_refuses_garbage() -> None:
    assert parse_proc_stat("cpu0 a b c\n", {0}) is None
    assert parse_proc_stat("", {0}) is None


def test_other_load_subtracts_this_process() -> None:
    before = CpuReading(busy=10.0, own=1.0, at=100.0)
    after = CpuReading(busy=11.5, own=1.5, at=101.0)  # 1.5 CPU-s busy, 0.5 of them ours
    assert other_load(before, after) == pytest.approx(1.0)
    assert other_load(before, CpuReading(10.2, 1.5, 101.0)) == 0.0  # tick rounding: never < 0
    assert other_load(before, before) == 0.0


@pytest.mark.parametrize(("cores", "cpus", "load", "threads"), [
    (2, 2, 0.0, 2),
    (2, 2, 0.4, 2),  # a neighbour using less than half a CPU costs no thread
    (2, 2, 0.6, 1),
    (2, 2, 1.0, 1),
    (2, 2, 2.0, 1),  # never fewer than one
    (2, 2, 7.0, 1),
    (2, 4, 1.0, 2),  # hyper-threads: 3 idle CPUs, but only 2 physical cores
    (2, 4, 2.6, 1),
    (8, 8, 3.2, 5),
    (1, 1, 0.0, 1),
])
def test_idle_threads(cores: int, cpus: int, load: float, threads: int) -> None:
    assert idle_threads(cores, cpus, load) == threads


class FakeMachine:
    """Stands in for /proc/stat and the clock: other processes keep ``load`` CPUs busy."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.busy = 0.0
        self.load = 0.0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.busy += self.load * seconds

    def read(self, cpus: object) -> CpuReading:
        return CpuReading(self.busy, 0.0, self.now)


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeMachine]:
    fake = FakeMachine()
    monkeypatch.setattr(hardware, "read_cpu", fake.read)
    monkeypatch.setattr(hardware, "time", SimpleNamespace(monotonic=lambda: fake.now))
    monkeypatch.setattr(hardware, "physical_cores", lambda: 2)
    monkeypatch.setattr(hardware, "allowed_cpus", lambda: frozenset({0, 1}))
    monkeypatch.delenv("LLMKIT_THREADS", raising=False)
    yield fake


def test_governor_follows_the_load(machine: FakeMachine) -> None:
    governor = ThreadGovernor(None)
    assert governor.choice == ThreadChoice(2, "2 physical cores (not measured yet)", True)
    machine.load = 1.0
    machine.advance(0.03)
    assert not governor.update(min_window=0.0)  # under 50 ms: too few clock ticks to tell
    machine.advance(0.1)
    assert governor.update(min_window=0.0)
    assert governor.choice == ThreadChoice(
        1, "1 of 2 physical cores: other processes keep 1.0 of 2 CPUs busy", True)
    machine.advance(0.1)
    assert not governor.update()  # next reading after 0.25 s
    machine.load = 0.0
    machine.advance(0.2)
    assert governor.update()
    assert governor.choice == ThreadChoice(
        2, "2 physical cores; other processes use 0.3 of 2 CPUs", True)
    machine.advance(1.0)
    assert not governor.update()  # measured again, same count: no change to report
    assert governor.threads == 2


@pytest.mark.parametrize(("env", "threads", "count"), [(None, 2, 2), ("2", None, 2),
                                                       (None, 1, 1)])
def test_governor_never_changes_a_count_the_user_set(
        machine: FakeMachine, monkeypatch: pytest.MonkeyPatch, env: str | None,
        threads: int | None, count: int) -> None:
    if env is not None:
        monkeypatch.setenv("LLMKIT_THREADS", env)
    governor = ThreadGovernor(threads)
    machine.load = 2.0
    machine.advance(5.0)
    assert not governor.update(min_window=0.0)
    assert governor.threads == count and not governor.choice.adaptive


def test_governor_without_proc_stat_keeps_physical_cores(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(hardware, "read_cpu", lambda cpus: None)
    monkeypatch.delenv("LLMKIT_THREADS", raising=False)
    governor = ThreadGovernor(None)
    assert governor.threads == hardware.physical_cores()
    assert "cannot be read" in governor.choice.reason and not governor.choice.adaptive
    assert not governor.update(min_window=0.0)


def test_read_cpu_reads_this_machine() -> None:
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat")
    first = hardware.read_cpu(hardware.allowed_cpus())
    assert first is not None and first.busy > 0 and first.own > 0


# -- end to end -----------------------------------------------------------------------------------

TWO_CPUS = sorted(hardware.allowed_cpus())[:2]
needs_two_cpus = pytest.mark.skipif(
    len(TWO_CPUS) < 2 or not Path("/proc/stat").exists(),
    reason="needs two CPUs and Linux's /proc/stat")


@pytest.fixture
def spinner() -> Iterator[None]:
    """A process that keeps the first of two CPUs busy all the time."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {TWO_CPUS[0]}))
    yield
    proc.kill()
    proc.wait()


def run_on_two_cpus(args: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """`llmkit ARGS --format json` on the two CPUs only; its JSON."""
    proc = subprocess.run([sys.executable, "-m", "llmkit", *args, "--format", "json"],
                          capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                          preexec_fn=lambda: os.sched_setaffinity(0, set(TWO_CPUS)))
    assert proc.returncode == 0, proc.stderr
    data: dict[str, object] = json.loads(proc.stdout)
    return data


@pytest.mark.slow
@pytest.mark.timeout(300)
@needs_two_cpus
def test_beside_a_busy_process_run_uses_the_idle_core_and_says_why(
        smollm2_path: Path, spinner: None) -> None:
    data = run_on_two_cpus(["run", "-m", str(smollm2_path), "--max-tokens", "8",
                            "--temperature", "0", "Count: 1, 2, 3,"])
    assert data["threads"] == 1
    reason = str(data["threads_reason"])
    assert reason.startswith("1 of ") and "other processes keep" in reason, reason


@pytest.mark.slow
@pytest.mark.timeout(300)
@needs_two_cpus
@pytest.mark.parametrize(("args", "env", "reason"), [
    (["--threads", "2"], None, "set by --threads"),
    ([], {"LLMKIT_THREADS": "2"}, "set by LLMKIT_THREADS"),
])
def test_a_count_the_user_sets_means_exactly_that_even_when_busy(
        smollm2_path: Path, spinner: None, args: list[str], env: dict[str, str] | None,
        reason: str) -> None:
    data = run_on_two_cpus(["run", "-m", str(smollm2_path), "--max-tokens", "4", *args, "hi"],
                           env)
    assert (data["threads"], data["threads_reason"]) == (2, reason)


@pytest.mark.slow
@needs_two_cpus
def test_doctor_shows_the_thread_choice_and_why(spinner: None) -> None:
    data = run_on_two_cpus(["doctor"])
    assert data["default_threads"] == 1
    assert "other processes keep" in str(data["threads_reason"])


@pytest.mark.slow
def test_engine_hands_a_new_count_to_llama_cpp_while_generating(
        smollm2_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmkit.engines import SamplingParams, load_engine

    fake = FakeMachine()
    monkeypatch.setattr(hardware, "read_cpu", fake.read)
    monkeypatch.setattr(hardware, "time", SimpleNamespace(monotonic=lambda: fake.now))
    monkeypatch.setattr(hardware, "physical_cores", lambda: 2)
    monkeypatch.setattr(hardware, "allowed_cpus", lambda: frozenset({0, 1}))
    monkeypatch.delenv("LLMKIT_THREADS", raising=False)
    with load_engine(smollm2_path, n_ctx=256, device="cpu") as engine:
        lc = engine._lc
        assert engine.threads == 2 and lc.llama_n_threads(engine._ctx) == 2
        fake.load = 1.0
        fake.advance(1.0)
        engine.generate(engine.tokenize("1, 2, 3,"), SamplingParams(temperature=0,
                                                                    max_tokens=2))
        assert engine.threads == 1
        assert lc.llama_n_threads(engine._ctx) == lc.llama_n_threads_batch(engine._ctx) == 1
        assert "other processes keep 1.0" in engine.threads_reason
