"""The memory estimate from a GGUF header, the budgets from /proc and cgroups, the refusal."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from llmkit import memory
from llmkit.engines import check_memory
from llmkit.engines.mllama.quantize import TypePlan
from llmkit.errors import NotEnoughMemoryError, UsageError
from llmkit.gguf_file import read_header
from llmkit.memory import Available, GpuMemory, cgroup_headroom, cpu_available, footprint
from tests.conftest import run_llmkit

MIB = 1 << 20
GIB = 1 << 30


def _plan(ftype: str, names: list[str]) -> Callable[[str, tuple[int, ...], str], str]:
    return TypePlan.for_tensors(ftype, names).type_of


# -- the footprint ---------------------------------------------------------------------------


def test_footprint_of_smollm2(smollm2_path: Path) -> None:
    fp = footprint(smollm2_path)
    h = read_header(smollm2_path)
    tensors = h.tensors()
    assert fp.architecture == "llama" and fp.n_layer == 30 and fp.n_ctx_train == 8192
    assert fp.weight_bytes == sum(t.nbytes for t in tensors.values())
    # Every tensor byte is in the file after the header (padding between tensors aside).
    assert 0 <= smollm2_path.stat().st_size - h.data_start - fp.weight_bytes < 272 * 32
    # 3 KV heads of 64 values, K and V, in every layer.
    assert fp.kv_values == (3 * (64 + 64),) * 30
    assert fp.layer_bytes[0] == sum(t.nbytes for n, t in tensors.items() if
                                    n.startswith("blk.0."))
    assert fp.embedding_bytes == tensors["token_embd.weight"].nbytes
    assert fp.embedding_resident  # tied: the embedding is the output matrix
    assert fp.n_vocab == 49152 and fp.n_embd == 576 and fp.n_ff == 1536
    assert fp.default_ctx(4096) == 4096 and fp.default_ctx(16384) == 8192


def test_kv_cache_is_padded_as_llama_cpp_pads_it(smollm2_path: Path) -> None:
    fp = footprint(smollm2_path)
    per_cell = 30 * 384 * 2  # layers × K+V values × f16
    assert memory.estimate(fp, 1000).all.kv == per_cell * 1024
    assert memory.estimate(fp, 1024).all.kv == per_cell * 1024
    assert memory.estimate(fp, 1025).all.kv == per_cell * 1280
    e = memory.estimate(fp, 4096)
    assert e.gpu == memory.Parts() and e.all.weights == fp.weight_bytes


def test_an_untied_embedding_is_not_counted_on_the_cpu(smollm2_path: Path) -> None:
    fp = footprint(smollm2_path)
    untied = dataclasses.replace(fp, embedding_resident=False)
    assert memory.estimate(fp, 4096).all.weights - memory.estimate(untied, 4096).all.weights \
        == fp.embedding_bytes


def test_offloading_splits_layers_as_llama_cpp_does(smollm2_path: Path) -> None:
    fp = footprint(smollm2_path)
    whole = memory.estimate(fp, 4096, gpu_layers=0)
    every = memory.estimate(fp, 4096, gpu_layers=-1)
    assert every.gpu_layers == -1 and every.gpu.weights == fp.weight_bytes
    assert every.gpu.kv == whole.cpu.kv and every.cpu.kv == 0
    # 31 layers is all of them: 30 repeating and the output layer.
    assert memory.estimate(fp, 4096, gpu_layers=31).gpu == every.gpu
    # --gpu-layers 1 offloads the output layer only; 11 also the last 10 repeating layers.
    one = memory.estimate(fp, 4096, gpu_layers=1)
    assert one.gpu.weights == fp.output_bytes + fp.embedding_bytes and one.gpu.kv == 0
    eleven = memory.estimate(fp, 4096, gpu_layers=11)
    assert eleven.gpu.kv == every.gpu.kv // 3
    assert eleven.gpu.weights == one.gpu.weights + sum(fp.layer_bytes[20:])


# -- what the device has ---------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="ascii")
    return path


def test_meminfo_available(tmp_path: Path) -> None:
    meminfo = _write(tmp_path / "meminfo", "MemTotal:       24683568 kB\nMemFree:  1 kB\n"
                     "MemAvailable:    1048576 kB\nBuffers: 58192 kB\n")
    none = tmp_path / "no-cgroup"
    assert cpu_available(meminfo, none, tmp_path) == Available(GIB, "MemAvailable")
    assert cpu_available(tmp_path / "absent", none, tmp_path) is None
    old = _write(tmp_path / "old", "MemTotal: 1 kB\nMemFree: 1 kB\n")  # Linux before 3.14
    assert cpu_available(old, none, tmp_path) is None


def test_cgroup_v2_tightest_limit_up_the_tree(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    proc = _write(tmp_path / "cgroup", "0::/user.slice/job\n")
    job = root / "user.slice" / "job"
    _write(job / "memory.max", "2147483648\n")
    _write(job / "memory.current", str(3 * GIB // 2))
    # Page cache counts in memory.current but the kernel reclaims it before failing.
    _write(job / "memory.stat", f"anon 1\ninactive_file {GIB // 2}\nactive_file 0\n")
    _write(root / "user.slice" / "memory.max", "max\n")
    assert cgroup_headroom(proc, root) == GIB
    _write(root / "user.slice" / "memory.max", str(3 * GIB // 2))
    _write(root / "user.slice" / "memory.current", str(7 * GIB // 5))
    assert cgroup_headroom(proc, root) == 3 * GIB // 2 - 7 * GIB // 5
    meminfo = _write(tmp_path / "meminfo", "MemAvailable: 8388608 kB\n")
    assert cpu_available(meminfo, proc, root) == Available(3 * GIB // 2 - 7 * GIB // 5,
                                                            "the cgroup limit")


def test_cgroup_v1_in_a_container_namespace(tmp_path: Path) -> None:
    root = tmp_path / "sys"
    proc = _write(tmp_path / "cgroup", "9:name=systemd:/\n4:memory:/docker/abc\n1:cpu:/\n")
    # The group's path does not exist inside the container: the mount is the group itself.
    mount = root / "memory"
    _write(mount / "memory.limit_in_bytes", str(512 * MIB))
    _write(mount / "memory.usage_in_bytes", str(256 * MIB))
    _write(mount / "memory.stat", f"cache 1\ntotal_inactive_file {128 * MIB}\n"
                                  "total_active_file 0\n")
    assert cgroup_headroom(proc, root) == 384 * MIB
    meminfo = _write(tmp_path / "meminfo", "MemAvailable: 8388608 kB\n")
    assert cpu_available(meminfo, proc, root) == Available(384 * MIB, "the cgroup limit")
    # The kernel's "no limit" (PAGE_COUNTER_MAX pages) is no limit.
    _write(mount / "memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_headroom(proc, root) is None
    assert cpu_available(meminfo, proc, root) == Available(8 * GIB, "MemAvailable")


def test_this_machine_has_a_figure() -> None:
    have = cpu_available()
    assert have is not None and have.bytes > 0


@pytest.mark.parametrize(("value", "enabled"), [
    ("", True), ("1", True), ("yes", True), ("0", False), ("off", False), ("No", False),
    ("false", False),
])
def test_the_check_can_be_turned_off(value: str, enabled: bool) -> None:
    assert memory.check_enabled({memory.CHECK_ENV: value}) is enabled
    assert memory.check_enabled({}) is True


@pytest.mark.parametrize("value", ["2", "nope", "of", "0 1"])
def test_a_mistyped_switch_is_refused(value: str) -> None:
    with pytest.raises(UsageError, match=r"^LLMKIT_MEMORY_CHECK='.*' is neither on nor off "):
        memory.check_enabled({memory.CHECK_ENV: value})


# -- the refusal -----------------------------------------------------------------------------


def test_the_refusal_line(smollm2_path: Path) -> None:
    fp = footprint(smollm2_path)
    with pytest.raises(NotEnoughMemoryError) as caught:
        memory.check_fits(fp, "smollm2:135m", 8192, gpu_layers=0,
                          cpu=Available(250 * MIB, "MemAvailable"))
    assert str(caught.value) == (
        "model 'smollm2:135m' needs about 370 MiB of memory (weights 92 MiB, KV cache for --ctx "
        "8192 180 MiB, compute 98 MiB) but only 250 MiB is available (MemAvailable) (try --ctx "
        "2048 (needs 235 MiB); LLMKIT_MEMORY_CHECK=0 skips this check)")
    assert caught.value.exit_code == 1
    assert caught.value.needed == memory.estimate(fp, 8192).all.total
    # What it suggests fits, and the next size up does not.
    assert memory.estimate(fp, 2048).all.total <= 250 * MIB < memory.estimate(fp, 4096).all.total


def test_refused_only_past_the_margin(smollm2_path: Path) -> None:
    fp = footprint(smollm2_path)
    need = memory.estimate(fp, 4096).all.total
    edge = int(need / (1 + memory.MARGIN)) + 1
    memory.check_fits(fp, "m", 4096, gpu_layers=0, cpu=Available(edge, "MemAvailable"))
    with pytest.raises(NotEnoughMemoryError):
        memory.check_fits(fp, "m", 4096, gpu_layers=0,
                          cpu=Available(edge - 2 * MIB, "MemAvailable"))
    # An unknown figure (macOS) is never a refusal.
    assert memory.check_fits(fp, "m", 1 << 20, gpu_layers=0, cpu=None).n_ctx == 1 << 20


def test_nothing_to_suggest(smollm2_path: Path) -> None:
    with pytest.raises(NotEnoughMemoryError) as caught:
        memory.check_fits(footprint(smollm2_path), "m", 8192, gpu_layers=0,
                          cpu=Available(50 * MIB, "the cgroup limit"), plan=_plan)
    assert str(caught.value).endswith(
        "but only 50 MiB is available (the cgroup limit) (LLMKIT_MEMORY_CHECK=0 skips this "
        "check)")


def test_a_gpu_too_small_suggests_fewer_layers_and_the_cpu(smollm2_path: Path) -> None:
    fp = footprint(smollm2_path)
    gpu = Available(200 * MIB, "Fake GPU free")
    with pytest.raises(NotEnoughMemoryError) as caught:
        memory.check_fits(fp, "m", 8192, gpu_layers=-1, cpu=Available(8 * GIB, "MemAvailable"),
                          gpu=gpu)
    message = str(caught.value)
    assert message.startswith("model 'm' needs about 370 MiB on the GPU (weights 92 MiB, KV "
                              "cache for --ctx 8192 180 MiB, compute 98 MiB) but only 200 MiB "
                              "is available (Fake GPU free) (try --gpu-layers ")
    layers = int(message.split("--gpu-layers ")[1].split()[0])
    assert memory.estimate(fp, 8192, gpu_layers=layers).gpu.total <= gpu.bytes
    assert memory.estimate(fp, 8192, gpu_layers=layers + 1).gpu.total > gpu.bytes
    assert message.endswith(", or --device cpu (needs 370 MiB of RAM); LLMKIT_MEMORY_CHECK=0 "
                            "skips this check)")


def test_check_memory_asks_the_gpus_only_when_offloading(smollm2_path: Path) -> None:
    asked: list[int] = []

    def gpus() -> list[GpuMemory]:
        asked.append(1)
        return [GpuMemory("Fake GPU", 100 * MIB, GIB), GpuMemory("Fake GPU 2", 50 * MIB, GIB)]

    roomy = Available(8 * GIB, "MemAvailable")
    check_memory(smollm2_path, "llama", n_ctx=4096, device="cpu", gpu_layers=None, name="m",
                 cpu=roomy, gpus=gpus, gpu_offload=True)
    check_memory(smollm2_path, "llama", n_ctx=4096, device="auto", gpu_layers=None, name="m",
                 cpu=roomy, gpus=gpus, gpu_offload=False)
    assert asked == []
    with pytest.raises(NotEnoughMemoryError, match=r"but only 150 MiB is available \(Fake GPU, "
                       r"Fake GPU 2 free\)"):
        check_memory(smollm2_path, "llama", n_ctx=4096, device="auto", gpu_layers=None,
                     name="m", cpu=roomy, gpus=gpus, gpu_offload=True)
    assert asked == [1]
    # The device rules and their messages are the engine's own.
    with pytest.raises(UsageError, match="--gpu-layers needs --device gpu or auto"):
        check_memory(smollm2_path, "llama", n_ctx=4096, device="cpu", gpu_layers=3, name="m",
                     cpu=roomy, gpus=gpus, gpu_offload=True)


def test_check_memory_can_be_skipped(smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    tiny = Available(MIB, "MemAvailable")
    with pytest.raises(NotEnoughMemoryError):
        check_memory(smollm2_path, "llama", n_ctx=None, device="cpu", gpu_layers=None,
                     name="m", cpu=tiny)
    monkeypatch.setenv(memory.CHECK_ENV, "0")
    check_memory(smollm2_path, "llama", n_ctx=None, device="cpu", gpu_layers=None, name="m",
                 cpu=tiny)


# -- a smaller quantization, computed by llama.cpp's own rules -------------------------------


def _synthetic(n_layer: int = 8, n_embd: int = 1024, n_ff: int = 2816,
               n_vocab: int = 32000) -> memory.Footprint:
    """An F16 Llama as a header would describe it (widths multiples of 256)."""
    tensors = [memory.TensorSize("token_embd.weight", (n_vocab, n_embd), "F16",
                                 n_vocab * n_embd * 2),
               memory.TensorSize("output.weight", (n_vocab, n_embd), "F16", n_vocab * n_embd * 2),
               memory.TensorSize("output_norm.weight", (n_embd,), "F32", n_embd * 4)]
    for i in range(n_layer):
        for name, shape in (("attn_q", (n_embd, n_embd)), ("attn_k", (256, n_embd)),
                            ("attn_v", (256, n_embd)), ("attn_output", (n_embd, n_embd)),
                            ("ffn_gate", (n_ff, n_embd)), ("ffn_up", (n_ff, n_embd)),
                            ("ffn_down", (n_embd, n_ff))):
            tensors.append(memory.TensorSize(f"blk.{i}.{name}.weight", shape, "F16",
                                             shape[0] * shape[1] * 2))
        tensors.append(memory.TensorSize(f"blk.{i}.attn_norm.weight", (n_embd,), "F32",
                                         n_embd * 4))
    layers = tuple(sum(t.nbytes for t in tensors if t.name.startswith(f"blk.{i}."))
                   for i in range(n_layer))
    return memory.Footprint(
        architecture="llama", n_ctx_train=8192, layer_bytes=layers,
        embedding_bytes=tensors[0].nbytes, embedding_resident=False,
        output_bytes=tensors[1].nbytes + tensors[2].nbytes, vision_bytes=0,
        kv_values=(2 * 256,) * n_layer, cross_kv_values=0, n_vocab=n_vocab, n_embd=n_embd,
        n_ff=n_ff, vision=None, tensors=tuple(tensors))


def test_a_smaller_quantization_is_suggested_with_its_figure() -> None:
    fp = _synthetic()
    q8 = memory.estimate(memory.requantized(fp, lambda n: _plan("Q8_0", n)), 4096).all.total
    q4 = memory.estimate(memory.requantized(fp, lambda n: _plan("Q4_K_M", n)), 4096).all.total
    q5 = memory.estimate(memory.requantized(fp, lambda n: _plan("Q5_K_M", n)), 4096).all.total
    assert q4 < q5 < q8 < memory.estimate(fp, 4096).all.total
    budget = Available((q4 + q5) // 2, "MemAvailable")
    with pytest.raises(NotEnoughMemoryError) as caught:
        memory.check_fits(fp, "big", 4096, gpu_layers=0, cpu=budget, plan=_plan)
    assert f"a smaller quantization (Q4_K_M, needs {memory.human_gib(q4)})" in str(caught.value)
    # With room for Q8_0 the best that fits is named.
    with pytest.raises(NotEnoughMemoryError) as caught:
        memory.check_fits(fp, "big", 4096, gpu_layers=0, cpu=Available(q8, "MemAvailable"),
                          plan=_plan)
    assert "a smaller quantization (Q8_0, needs" in str(caught.value)


def test_show_prints_the_estimate(smollm2_path: Path) -> None:
    proc = run_llmkit(["show", "smollm2:135m"])
    assert proc.returncode == 0, proc.stderr
    assert ("memory          about 280 MiB at --ctx 4096 (weights 92 MiB, KV cache 90 MiB, "
            "compute 98 MiB)\n") in proc.stdout
    data = json.loads(run_llmkit(["show", "smollm2:135m", "-f", "json"]).stdout)
    expected = memory.estimate(footprint(smollm2_path), 4096)
    assert data["memory"] == expected.to_dict()
    assert data["memory"]["kv_cache"] == 30 * 384 * 2 * 4096


def test_a_long_context_on_a_big_model() -> None:
    # Llama 3.1 8B's shape at f16 (8 KV heads of 128), asked for its whole 128k context.
    fp = dataclasses.replace(_synthetic(n_layer=32, n_embd=4096, n_ff=14336, n_vocab=128256),
                             n_ctx_train=131072, kv_values=(2 * 8 * 128,) * 32)
    est = memory.estimate(fp, 131072).all
    assert est.kv == 32 * 2 * 8 * 128 * 2 * 131072  # 16 GiB
    with pytest.raises(NotEnoughMemoryError) as caught:
        memory.check_fits(fp, "llama3.1:8b", 131072, gpu_layers=0,
                          cpu=Available(12 * GIB, "MemAvailable"), plan=_plan)
    # Neither a shorter context (the weights alone are 13.6 GiB) nor a smaller quantization
    # at 128k fits: the two together do.
    q8 = memory.requantized(fp, lambda n: _plan("Q8_0", n))
    fitting = memory.estimate(q8, 32768).all.total
    assert fitting <= 12 * GIB < memory.estimate(q8, 65536).all.total
    assert str(caught.value) == (
        "model 'llama3.1:8b' needs about 29.9 GiB of memory (weights 13.6 GiB, KV cache for "
        "--ctx 131072 16.0 GiB, compute 266 MiB) but only 12.0 GiB is available (MemAvailable) "
        "(try a smaller quantization with a smaller context (Q8_0 and --ctx 32768, needs "
        f"{memory.human_gib(fitting)}); LLMKIT_MEMORY_CHECK=0 skips this check)")
    # With room for the f16 weights at a shorter context, both are offered.
    with pytest.raises(NotEnoughMemoryError) as caught:
        memory.check_fits(fp, "llama3.1:8b", 131072, gpu_layers=0,
                          cpu=Available(20 * GIB, "MemAvailable"), plan=_plan)
    assert "(try --ctx 32768 (needs 17.9 GiB), or a smaller quantization with a smaller " \
           "context (Q8_0 and --ctx 65536, needs 15.5 GiB);" in str(caught.value)
