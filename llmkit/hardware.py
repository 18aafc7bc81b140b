"""Device and thread choices: pure functions, no llama.cpp import."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass

from llmkit.errors import DeviceError, UsageError

DEVICES = ("auto", "cpu", "gpu")
# llama.cpp treats any layer count above the model's own as "all layers".
ALL_LAYERS = -1


@dataclass(frozen=True)
class DeviceChoice:
    """How many layers go to the GPU, and a word for the user."""

    n_gpu_layers: int
    label: str


INT32_MAX = 2**31 - 1
"""The largest count llama.cpp's int32 parameters (context, layers) hold."""


def resolve_device(device: str, gpu_layers: int | None, gpu_available: bool) -> DeviceChoice:
    """Decide GPU offload from the user's request and what the llama.cpp build can do.

    Args:
        device: "auto", "cpu" or "gpu".
        gpu_layers: explicit number of layers to offload, or None for the device's default.
        gpu_available: whether the llama.cpp build supports GPU offload.

    Returns:
        The layer count for llama.cpp (-1 = all) and "cpu", "gpu" or "gpu (N layers)".

    Raises:
        UsageError: unknown device, negative layers, or layers asked with device cpu.
        DeviceError: a GPU asked for on a build without GPU offload.
    """
    if device not in DEVICES:
        raise UsageError(f"unknown device '{device}'", hint="use auto, cpu or gpu")
    if gpu_layers is not None and gpu_layers < 0:
        raise UsageError("--gpu-layers must be 0 or more")
    if gpu_layers is not None and gpu_layers > INT32_MAX:
        # llama.cpp keeps the count in an int32: a larger one would wrap around silently.
        raise UsageError(f"--gpu-layers must be at most {INT32_MAX}")
    if device == "cpu":
        if gpu_layers:
            raise UsageError("--gpu-layers needs --device gpu or auto, not cpu")
        return DeviceChoice(0, "cpu")
    if not gpu_available:
        if device == "gpu" or gpu_layers:
            raise DeviceError(
                "this llama.cpp build has no GPU offload",
                hint="reinstall llama-cpp-python with CMAKE_ARGS=-DGGML_CUDA=on "
                     "(or -DGGML_METAL=on, -DGGML_VULKAN=on); see the README",
            )
        return DeviceChoice(0, "cpu")
    if gpu_layers is None:
        return DeviceChoice(ALL_LAYERS, "gpu")
    if gpu_layers == 0:
        return DeviceChoice(0, "cpu")
    return DeviceChoice(gpu_layers, f"gpu ({gpu_layers} layers)")


def parse_cpuinfo(text: str) -> int:
    """Count distinct (physical id, core id) pairs in Linux /proc/cpuinfo text; 0 if none."""
    cores: set[tuple[str, str]] = set()
    physical = core = ""
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if core:
                cores.add((physical, core))
            physical = core = ""
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
    return len(cores)


def physical_cores() -> int:
    """Physical cores this process may use: hyper-threads slow llama.cpp down, so count cores."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    count = 0
    system = platform.system()
    if system == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                count = parse_cpuinfo(fh.read())
        except OSError:
            count = 0
    elif system == "Darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.perflevel0.physicalcpu"], capture_output=True,
                text=True, timeout=2, check=True,
            ).stdout
            count = int(out.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            count = 0
    if count <= 0:
        count = available
    return max(1, min(count, available))


# GGML_MAX_N_THREADS (ggml.h): the most threads ggml's CPU backend is built for. Past it the
# count would only be a typo, and values past 2**31 would wrap in llama.cpp's int32 fields.
MAX_THREADS = 512
MAX_PARALLEL = 64  # sequences decoded together (llama.cpp allows 256)
THREADS_ENV = "LLMKIT_THREADS"


@dataclass(frozen=True)
class ThreadChoice:
    """How many threads llama.cpp runs, and why (shown by doctor and ``run --format json``)."""

    threads: int
    reason: str
    adaptive: bool = False  # chosen by llmkit from the machine's load, and re-checked


def requested_threads(threads: int | None) -> ThreadChoice | None:
    """The count the user fixed: ``threads`` (``--threads``), else ``LLMKIT_THREADS``.

    Returns:
        That exact count, or None when neither is given (llmkit chooses).

    Raises:
        UsageError: a count outside 1..MAX_THREADS, or LLMKIT_THREADS that is not a count.
    """
    if threads is not None:
        if not 1 <= threads <= MAX_THREADS:
            raise UsageError(f"--threads must be from 1 to {MAX_THREADS}, not {threads}")
        return ThreadChoice(threads, "set by --threads")
    raw = os.environ.get(THREADS_ENV)
    if raw is None or not raw.strip():  # `LLMKIT_THREADS= llmkit …` unsets it
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_THREADS:
        raise UsageError(f"{THREADS_ENV}={raw!r} is not a thread count from 1 to {MAX_THREADS}",
                         hint=f"set a whole number, or unset {THREADS_ENV} to let llmkit "
                              "choose")
    return ThreadChoice(int(text), f"set by {THREADS_ENV}")


# /proc/stat, per CPU: user nice system idle iowait irq softirq steal … in clock ticks. Steal is
# busy too: the hypervisor ran someone else on that CPU.
_IDLE_FIELDS = (3, 4)
_STAT_FIELDS = 8


def parse_proc_stat(text: str, cpus: Collection[int]) -> int | None:
    """Busy clock ticks since boot summed over ``cpus``, from Linux /proc/stat text.

    Returns:
        The sum, or None when a CPU of ``cpus`` has no line (the text is not /proc/stat).
    """
    busy: dict[int, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu"):
            break  # the CPU lines come first; the rest (interrupt counts) is long
        if not name[3:].isdigit():
            continue
        cpu = int(name[3:])
        if cpu in cpus:
            try:
                fields = [int(v) for v in rest.split()[:_STAT_FIELDS]]
            except ValueError:
                return None
            busy[cpu] = sum(v for i, v in enumerate(fields) if i not in _IDLE_FIELDS)
    if not cpus or any(cpu not in busy for cpu in cpus):
        return None
    return sum(busy.values())


def allowed_cpus() -> frozenset[int]:
    """The logical CPUs this process may run on."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return frozenset(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class CpuReading:
    """Busy seconds of some CPUs (every process) and of this process, at a moment."""

    busy: float
    own: float
    at: float


def read_cpu(cpus: Collection[int]) -> CpuReading | None:
    """Read /proc/stat and this process's CPU time; None where there is no /proc/stat."""
    try:
        with open("/proc/stat", "rb", buffering=0) as fh:
            ticks = parse_proc_stat(fh.read().decode("ascii", "replace"), cpus)
        hertz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    if ticks is None or hertz <= 0:
        return None
    own = os.times()
    return CpuReading(ticks / hertz, own.user + own.system, time.monotonic())


def other_load(before: CpuReading, after: CpuReading) -> float:
    """CPUs' worth of work other processes did between two readings (0 when none passed)."""
    wall = after.at - before.at
    if wall <= 0:
        return 0.0
    return max(0.0, (after.busy - before.busy) - (after.own - before.own)) / wall


def idle_threads(cores: int, cpus: int, load: float) -> int:
    """Threads for the cores other processes leave idle: one CPU fewer for each that they keep
    busy more than half the time, at least one, at most ``cores``."""
    return max(1, min(cores, cpus - math.floor(load + 0.5)))


class ThreadGovernor:
    """llama.cpp's thread count for a loaded model: exactly what the user asked for, else the
    physical cores that other processes leave idle, measured again as the work goes on.

    llama.cpp's threads meet at a barrier after every operation, so one thread that another
    process preempts holds the rest up until the scheduler runs it again: beside one busy
    process on 2 cores, 20 tokens took 64 s with 2 threads and 0.8 s with 1. Using only the
    idle cores costs a busy machine about this process's fair share (benchmarks/bench_busy.py).
    """

    # Readings closer together than this are too coarse: /proc/stat counts 10 ms ticks.
    MIN_WINDOW_S = 0.05
    INTERVAL_S = 0.25

    def __init__(self, threads: int | None) -> None:
        """Start from ``threads`` (or LLMKIT_THREADS), or take the first load reading now.

        Raises:
            UsageError: a thread count out of range (see :func:`requested_threads`).
        """
        fixed = requested_threads(threads)
        self.cores = physical_cores()
        self._cpus = allowed_cpus()
        self._last: CpuReading | None = None
        if fixed is not None:
            self.choice = fixed
            return
        self._last = read_cpu(self._cpus)
        if self._last is None:
            self.choice = ThreadChoice(self.cores, f"{self.cores} physical cores (the load of "
                                       "other processes cannot be read here)")
        else:
            self.choice = ThreadChoice(self.cores, f"{self.cores} physical cores (not measured "
                                       "yet)", adaptive=True)

    @property
    def threads(self) -> int:
        """The current thread count."""
        return self.choice.threads

    def update(self, *, min_window: float = INTERVAL_S) -> bool:
        """Measure other processes' load since the last reading, if ``min_window`` seconds have
        passed, and choose the count again; True when it changed."""
        if not self.choice.adaptive or self._last is None:
            return False
        if time.monotonic() - self._last.at < max(min_window, self.MIN_WINDOW_S):
            return False
        reading = read_cpu(self._cpus)
        if reading is None:
            return False
        load = other_load(self._last, reading)
        self._last = reading
        threads = idle_threads(self.cores, len(self._cpus), load)
        cpus = len(self._cpus)
        if threads == self.cores:
            why = f"{threads} physical cores; other processes use {load:.1f} of {cpus} CPUs"
        else:
            why = (f"{threads} of {self.cores} physical cores: other processes keep {load:.1f} "
                   f"of {cpus} CPUs busy")
        changed = threads != self.choice.threads
        self.choice = ThreadChoice(threads, why, adaptive=True)
        return changed


def measure_threads(threads: int | None = None, window: float = ThreadGovernor.INTERVAL_S
                    ) -> ThreadChoice:
    """``threads`` (or LLMKIT_THREADS) exactly, else the idle physical cores over the next
    ``window`` seconds: for work that is not re-checked as it goes (`llmkit doctor`, the
    quantizer), and waits that long when llmkit chooses.

    Raises:
        UsageError: --threads out of range or a bad LLMKIT_THREADS (see :func:`requested_threads`).
    """
    governor = ThreadGovernor(threads)
    if governor.choice.adaptive:
        time.sleep(window)
        governor.update(min_window=0.0)
    return governor.choice
