"""Device and thread choices: pure functions, no llama.cpp import."""

from __future__ import annotations

import os
import platform
import subprocess
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


def default_threads() -> int:
    """``LLMKIT_THREADS`` if set, else the number of physical cores."""
    env = os.environ.get("LLMKIT_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return physical_cores()
