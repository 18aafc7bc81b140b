"""Run a fuzz target for a bounded time in a subprocess and read libFuzzer's report of it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Inputs that once broke a target, kept so they are replayed by tests/test_fuzz.py and start
# every fuzz run (libFuzzer reads them as corpus; it adds new inputs to the first directory
# only, which is never this one).
CRASHERS = Path(__file__).resolve().parent / "crashers"


@dataclass
class Finding:
    """One input that broke a target: what libFuzzer called it, and the error's last line."""

    kind: str  # "crash", "timeout" or "oom"
    input: Path
    error: str

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "input": str(self.input), "error": self.error}


@dataclass
class FuzzRun:
    """What one bounded run of a target did."""

    target: str
    seconds: float
    executions: int
    corpus: int  # inputs in the working corpus at the end
    findings: list[Finding] = field(default_factory=list)
    output: str = ""  # the tail of the last libFuzzer process's output

    def to_dict(self) -> dict[str, object]:
        return {"target": self.target, "seconds": round(self.seconds, 1),
                "executions": self.executions, "corpus": self.corpus,
                "crashes": len(self.findings),
                "findings": [f.to_dict() for f in self.findings]}


_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_PROGRESS = re.compile(r"^#(\d+)\s", re.MULTILINE)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_SPECIFICS = re.compile(r"'[^']*(?:'|$)|\"[^\"]*(?:\"|$)|\(.*\)|\d+")


def write_seeds(target: str, directory: Path) -> Path:
    """The target's seed corpus in ``directory``; returns its libFuzzer dictionary file."""
    subprocess.run([sys.executable, "-m", "tests.fuzz", target, "--write-seeds", str(directory)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    return Path(f"{directory}.dict")


def fuzz(target: str, seconds: float, workdir: Path, *, keep_going: bool = False,
         nice: int = 0, max_len: int | None = None) -> FuzzRun:
    """Fuzz ``target`` for about ``seconds`` from its seeds and the kept crashers.

    With ``keep_going``, fuzzing starts again (on the corpus grown so far) after each finding,
    until the time is up; else it stops at the first. Findings are copied to
    ``workdir/findings``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    seeds, corpus, artifacts = workdir / "seeds", workdir / "corpus", workdir / "findings"
    for directory in (corpus, artifacts):
        directory.mkdir(exist_ok=True)
    dictionary = write_seeds(target, seeds)
    inputs = [str(corpus), str(seeds)]
    if (CRASHERS / target).is_dir():
        inputs.append(str(CRASHERS / target))
    run = FuzzRun(target, 0.0, 0, 0)
    started = time.monotonic()
    errors: set[str] = set()
    while True:
        left = seconds - (time.monotonic() - started)
        if left < 1:
            break
        command = [sys.executable, "-m", "tests.fuzz", target, f"-max_total_time={int(left)}",
                   "-print_final_stats=1", f"-artifact_prefix={artifacts}/",
                   f"-dict={dictionary}"]
        if max_len is not None:
            command.append(f"-max_len={max_len}")
        proc = subprocess.run(
            command + inputs, cwd=ROOT, capture_output=True, timeout=left + 300,
            preexec_fn=(lambda: os.nice(nice)) if nice else None)
        output = proc.stderr.decode("utf-8", "replace") + proc.stdout.decode("utf-8", "replace")
        run.output = output[-6000:]
        run.executions += _executions(output)
        written = _ARTIFACT.findall(output)
        if not written:
            if proc.returncode != 0:
                raise RuntimeError(f"the {target} fuzzer failed (exit {proc.returncode}) without "
                                   f"naming an input:\n{run.output}")
            break
        for path in written:
            finding = Finding(_kind(Path(path).name), Path(path), _error(output))
            # One finding per distinct error: a run that keeps going rediscovers the same bug,
            # with other names and numbers in its message.
            key = _SPECIFICS.sub("…", finding.error)[:100]
            if key not in errors:
                errors.add(key)
                run.findings.append(finding)
        if not keep_going:
            break
    run.seconds = time.monotonic() - started
    run.corpus = sum(1 for _ in corpus.iterdir())
    return run


def _executions(output: str) -> int:
    final = _EXECUTED.findall(output)
    if final:
        return int(final[-1])
    progress = _PROGRESS.findall(output)
    return int(progress[-1]) if progress else 0


def _kind(name: str) -> str:
    for kind in ("timeout", "oom", "crash", "leak", "slow-unit"):
        if name.startswith(kind):
            return kind
    return "crash"


def _error(output: str) -> str:
    """The exception (or libFuzzer's verdict) that ended the run, on one line."""
    lines = output.splitlines()
    for number, line in enumerate(lines):
        if "=== Uncaught Python exception: ===" in line and number + 1 < len(lines):
            return lines[number + 1].strip()[:300]
    for line in lines:
        if line.startswith("SUMMARY: libFuzzer:") or "ERROR: libFuzzer:" in line:
            return line.split("libFuzzer:", 1)[1].strip()[:300]
    return "unknown"


def keep_crasher(finding: Finding, target: str, name: str) -> Path:
    """Copy a finding into tests/fuzz/crashers/TARGET/NAME, to be replayed from then on."""
    destination = CRASHERS / target / name
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(finding.input, destination)
    return destination
