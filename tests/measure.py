"""Test helper: run a command and measure its own peak memory, not what it inherits from pytest.

Linux carries a process's peak resident size across fork and exec (``ru_maxrss`` of a child of
a 600 MB pytest reads 600 MB even for ``python -c pass``), so a bound asserted on a direct
child's ``wait4`` figure fails whenever the test process itself has grown. A small launcher in
between starts the command and reports that grandchild's figure, which only carries the
launcher's few megabytes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_LAUNCHER = """\
import os, signal, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
while True:
    try:
        _, status, usage = os.wait4(pid, 0)
        break
    except InterruptedError:
        continue
with open(report, "w") as fh:
    fh.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
if code < 0:  # died of a signal: die of the same one, so the caller sees what happened
    signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def measured(argv: list[str], report: Path) -> list[str]:
    """``argv`` run through the launcher, which writes the command's peak RSS (KiB) to
    ``report`` when it ends; start it in a new session to kill both with ``os.killpg``."""
    return [sys.executable, "-c", _LAUNCHER, str(report), *argv]


def peak_kib(report: Path) -> int:
    """The peak resident size the launcher wrote (0 when the command never ran)."""
    try:
        return int(report.read_text() or 0)
    except (OSError, ValueError):
        return 0


def own_peak_kib() -> int:
    """This process's own peak resident size since its exec (VmHWM), in KiB.

    Unlike ``getrusage(RUSAGE_SELF).ru_maxrss``, it does not include what the parent had.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def kill_group(pid: int) -> None:
    """Kill a command started with ``start_new_session`` and everything it started."""
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
