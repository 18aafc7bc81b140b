"""Device resolution and core counting: pure functions, table-tested."""

from __future__ import annotations

import pytest

from llmkit.errors import DeviceError, UsageError
from llmkit.hardware import default_threads, parse_cpuinfo, physical_cores, resolve_device


@pytest.mark.parametrize(
    ("device", "layers", "gpu", "expected_layers", "label"),
    [
        ("auto", None, False, 0, "cpu"),
        ("auto", None, True, -1, "gpu"),
        ("auto", 0, True, 0, "cpu"),
        ("auto", 10, True, 10, "gpu (10 layers)"),
        ("gpu", None, True, -1, "gpu"),
        ("gpu", 7, True, 7, "gpu (7 layers)"),
        ("cpu", None, True, 0, "cpu"),
        ("cpu", None, False, 0, "cpu"),
        ("cpu", 0, True, 0, "cpu"),
    ],
)
def test_resolve_device(device: str, layers: int | None, gpu: bool, expected_layers: int,
                        label: str) -> None:
    choice = resolve_device(device, layers, gpu)
    assert (choice.n_gpu_layers, choice.label) == (expected_layers, label)


@pytest.mark.parametrize(
    ("device", "layers", "gpu", "error", "message"),
    [
        ("gpu", None, False, DeviceError, "no GPU offload"),
        ("auto", 5, False, DeviceError, "no GPU offload"),
        ("cpu", 3, True, UsageError, "--gpu-layers needs"),
        ("tpu", None, True, UsageError, "unknown device 'tpu'"),
        ("auto", -2, True, UsageError, "must be 0 or more"),
    ],
)
def test_resolve_device_errors(device: str, layers: int | None, gpu: bool,
                               error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        resolve_device(device, layers, gpu)
    assert message in str(info.value)


def _cpuinfo(entries: list[tuple[int, int, int]]) -> str:
    return "\n".join(
        f"processor\t: {p}\nphysical id\t: {s}\ncore id\t\t: {c}\nmodel name\t: x\n"
        for p, s, c in entries
    )


@pytest.mark.parametrize(
    ("entries", "cores"),
    [
        ([(0, 0, 0), (1, 0, 1)], 2),
        ([(0, 0, 0), (1, 0, 1), (2, 0, 0), (3, 0, 1)], 2),  # 2 cores, hyper-threaded
        ([(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)], 4),  # 2 sockets × 2 cores
        ([], 0),
    ],
)
def test_parse_cpuinfo(entries: list[tuple[int, int, int]], cores: int) -> None:
    assert parse_cpuinfo(_cpuinfo(entries)) == cores


def test_cpuinfo_without_core_ids_counts_nothing() -> None:
    assert parse_cpuinfo("processor\t: 0\nmodel name\t: ARM\n\nprocessor\t: 1\n") == 0


def test_physical_cores_is_positive() -> None:
    assert physical_cores() >= 1


def test_threads_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMKIT_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("LLMKIT_THREADS", "zero")
    assert default_threads() == physical_cores()
