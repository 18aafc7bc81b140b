"""Device resolution and core counting: pure functions, table-driven."""

from __future__ import annotations

import pytest

from llmkit import hardware
from llmkit.errors import DeviceError, UsageError
from llmkit.hardware import ALL_LAYERS, DeviceChoice, parse_cpuinfo, resolve_device

# (device, gpu_layers, gpu_available) → (n_gpu_layers, label)
CHOICES = [
    ("auto", None, True, ALL_LAYERS, "gpu"),
    ("auto", 0, True, 0, "cpu"),
    ("auto", 12, True, 12, "gpu (12 layers)"),
    ("auto", None, False, 0, "cpu"),
    ("auto", 0, False, 0, "cpu"),
    ("cpu", None, True, 0, "cpu"),
    ("cpu", 0, True, 0, "cpu"),
    ("cpu", None, False, 0, "cpu"),
    ("cpu", 0, False, 0, "cpu"),
    ("gpu", None, True, ALL_LAYERS, "gpu"),
    ("gpu", 0, True, 0, "cpu"),
    ("gpu", 7, True, 7, "gpu (7 layers)"),
    ("gpu", 999, True, 999, "gpu (999 layers)"),
]


@pytest.mark.parametrize(("device", "layers", "available", "n_layers", "label"), CHOICES)
def test_resolve_device(device: str, layers: int | None, available: bool, n_layers: int,
                        label: str) -> None:
    assert resolve_device(device, layers, available) == DeviceChoice(n_layers, label)


# (device, gpu_layers, gpu_available) → error type and message start
ERRORS = [
    ("gpu", None, False, DeviceError, "this llama.cpp build has no GPU offload"),
    ("gpu", 0, False, DeviceError, "this llama.cpp build has no GPU offload"),
    ("gpu", 4, False, DeviceError, "this llama.cpp build has no GPU offload"),
    ("auto", 4, False, DeviceError, "this llama.cpp build has no GPU offload"),
    ("cpu", 4, True, UsageError, "--gpu-layers needs --device gpu or auto, not cpu"),
    ("cpu", 4, False, UsageError, "--gpu-layers needs --device gpu or auto, not cpu"),
    ("auto", -1, True, UsageError, "--gpu-layers must be 0 or more"),
    ("gpu", -3, True, UsageError, "--gpu-layers must be 0 or more"),
    ("tpu", None, True, UsageError, "unknown device 'tpu'"),
    ("GPU", None, True, UsageError, "unknown device 'GPU'"),
    ("", None, False, UsageError, "unknown device ''"),
]


@pytest.mark.parametrize(("device", "layers", "available", "error", "message"), ERRORS)
def test_resolve_device_errors(device: str, layers: int | None, available: bool,
                               error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        resolve_device(device, layers, available)
    assert type(info.value) is error
    assert info.value.message.startswith(message)  # type: ignore[attr-defined]


def test_no_gpu_error_says_how_to_get_one() -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device("gpu", None, False)
    assert info.value.exit_code == 1
    assert "CMAKE_ARGS=-DGGML_CUDA=on" in (info.value.hint or "")


def test_usage_errors_exit_with_2() -> None:
    with pytest.raises(UsageError) as info:
        resolve_device("cpu", 1, True)
    assert info.value.exit_code == 2


# -- /proc/cpuinfo ----------------------------------------------------------------------------


def _cpuinfo(*processors: tuple[int, int]) -> str:
    """cpuinfo text, one block per logical CPU given as (physical id, core id)."""
    blocks = []
    for n, (physical, core) in enumerate(processors):
        blocks.append(
            f"processor\t: {n}\n"
            "vendor_id\t: GenuineIntel\n"
            "model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n"
            f"physical id\t: {physical}\n"
            f"siblings\t: {len(processors)}\n"
            f"core id\t\t: {core}\n"
            "flags\t\t: fpu vme de pse tsc msr: not-a-key\n"
        )
    return "\n".join(blocks) + "\n"


CPUINFO = [
    pytest.param(_cpuinfo((0, 0)), 1, id="one-core"),
    pytest.param(_cpuinfo((0, 0), (0, 1), (0, 0), (0, 1)), 2, id="2-cores-4-threads"),
    pytest.param(_cpuinfo((0, 0), (0, 1), (1, 0), (1, 1)), 4, id="2-sockets-2-cores"),
    pytest.param(_cpuinfo((0, 0), (0, 1), (1, 0), (1, 1), (0, 0), (0, 1), (1, 0), (1, 1)), 4,
                 id="2-sockets-hyper-threaded"),
    pytest.param(_cpuinfo((0, 0), (0, 1)).replace("\n\n", "\n   \n"), 2,
                 id="blank-lines-with-spaces"),
    pytest.param(_cpuinfo((0, 0), (0, 1)).rstrip("\n"), 2, id="no-trailing-blank-line"),
    pytest.param("processor\t: 0\ncore id\t: 0\n\nprocessor\t: 1\ncore id\t: 1\n", 2,
                 id="no-physical-id"),
    # ARM kernels print neither physical nor core ids: 0 means "unknown, use the CPU count".
    pytest.param("processor\t: 0\nBogoMIPS\t: 48.00\n\nprocessor\t: 1\nBogoMIPS\t: 48.00\n", 0,
                 id="arm-without-core-ids"),
    pytest.param("", 0, id="empty"),
]


@pytest.mark.parametrize(("text", "cores"), CPUINFO)
def test_parse_cpuinfo(text: str, cores: int) -> None:
    assert parse_cpuinfo(text) == cores


def test_physical_cores_is_within_what_the_process_may_use() -> None:
    cores = hardware.physical_cores()
    assert 1 <= cores <= (hardware.os.cpu_count() or 1)


@pytest.mark.parametrize(("value", "expected"), [("3", 3), ("1", 1)])
def test_threads_env_overrides(monkeypatch: pytest.MonkeyPatch, value: str,
                               expected: int) -> None:
    monkeypatch.setenv("LLMKIT_THREADS", value)
    assert hardware.measure_threads(window=0.0).threads == expected


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_threads_env_means_unset(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LLMKIT_THREADS", value)
    assert hardware.requested_threads(None) is None


@pytest.mark.parametrize("value", ["0", "-2", "many", "513"])
def test_bad_threads_env_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LLMKIT_THREADS", value)
    with pytest.raises(UsageError, match=r"^LLMKIT_THREADS="):
        hardware.measure_threads(window=0.0)
