"""The memory estimate against what llama.cpp and the Vision engine allocate, and the refusal
through the real CLI, before either engine is called."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from llmkit import memory
from llmkit.engines import check_memory
from llmkit.engines._log import LogTail
from llmkit.memory import footprint
from tests import mllama_model as mm

pytestmark = pytest.mark.slow

MIB = 1 << 20

# Runs the real CLI in a fresh interpreter with /proc/meminfo and /proc/self/cgroup replaced by
# the test's files, and counts every call that would load a model: llama.cpp's model loader
# (the llama.cpp engine, and the Vision engine's tokenizer) and the Vision engine's forward
# pass. The verdict goes to stderr after a marker, below the command's own lines.
DRIVER = """
import json, sys
from pathlib import Path
import llama_cpp
import llmkit.memory as memory
from llmkit.engines.mllama import model as mllama_model
memory._MEMINFO = Path({meminfo!r})
memory._PROC_CGROUP = Path({cgroup!r})
calls = []
real_load = llama_cpp.llama_model_load_from_file
def load(*args):
    calls.append("llama_model_load_from_file")
    return real_load(*args)
llama_cpp.llama_model_load_from_file = load
real_init = mllama_model.MllamaModel.__init__
def init(self, *args, **kwargs):
    calls.append("MllamaModel")
    return real_init(self, *args, **kwargs)
mllama_model.MllamaModel.__init__ = init
from llmkit.cli.app import run_cli
code = run_cli({args!r})
sys.stdout.flush()
sys.stderr.write("\\n@@" + json.dumps({{"code": code, "calls": calls}}) + "\\n")
"""


@dataclass
class Driven:
    code: int
    calls: list[str]
    stdout: str
    stderr_lines: list[str]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread per run: spinning workers crawl on a busy two-core machine."""
    monkeypatch.setenv("LLMKIT_THREADS", "1")


def _drive(args: list[str], tmp_path: Path, available_kib: int) -> Driven:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 24683568 kB\nMemAvailable: {available_kib} kB\n")
    # No cgroup list: only the faked MemAvailable counts.
    code = DRIVER.format(meminfo=str(meminfo), cgroup=str(tmp_path / "no-cgroup"), args=args)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, stdin=subprocess.DEVNULL)
    assert "@@" in proc.stderr, proc.stderr
    before, _, verdict = proc.stderr.rpartition("\n@@")
    data = json.loads(verdict)
    return Driven(data["code"], data["calls"], proc.stdout, before.splitlines())


# -- llama.cpp -------------------------------------------------------------------------------


_BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")


def _buffers(log: list[str]) -> dict[str, float]:
    """MiB llama.cpp reported allocating, by kind, summed over its devices and buffer types."""
    found: dict[str, float] = {}
    for line in log:
        m = _BUFFER.search(line)
        if m:
            found[m.group(2)] = found.get(m.group(2), 0.0) + float(m.group(3))
    return found


@pytest.mark.parametrize("n_ctx", [512, 2048, 8192])
def test_llama_cpp_allocates_what_the_estimate_says(smollm2_path: Path, n_ctx: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from llmkit.engines import llama_cpp

    # The engine keeps the last 200 lines of llama.cpp's log; a load writes more than that
    # (one per attention input), and the buffer sizes come early.
    monkeypatch.setattr(llama_cpp, "_log", LogTail(lines=100_000))
    with llama_cpp.LlamaCppEngine(smollm2_path, n_ctx=n_ctx, threads=1, device="cpu"):
        got = _buffers(llama_cpp.recent_log())
    fp = footprint(smollm2_path)
    est = memory.estimate(fp, n_ctx).all
    assert got["KV"] == pytest.approx(est.kv / MIB, abs=0.01)  # 11.25, 45 and 180 MiB
    # 98.25 MiB measured at 512 and 8192, 102.51 at 2048.
    assert got["compute"] == pytest.approx(est.compute / MIB, rel=0.05)
    assert got["model"] == pytest.approx(fp.weight_bytes / MIB, abs=0.01)
    assert est.weights == fp.weight_bytes  # tied: the embedding is read whole


def test_smollm2_is_not_refused_here(smollm2_path: Path) -> None:
    # The real figures of this machine (MemAvailable, its cgroups), at the training context.
    check_memory(smollm2_path, "llama", n_ctx=8192, device="auto", gpu_layers=None,
                 name="smollm2:135m")
    assert memory.cpu_available() is not None


def test_a_small_budget_refuses_before_llama_cpp_loads(tmp_path: Path) -> None:
    args = ["run", "-m", "smollm2:135m", "--ctx", "8192", "--max-tokens", "1", "hi"]
    refused = _drive(args, tmp_path, available_kib=250 * 1024)
    assert refused.code == 1
    assert refused.calls == []
    assert refused.stdout == ""
    assert refused.stderr_lines == [
        "llmkit: error: model 'smollm2:135m' needs about 370 MiB of memory (weights 92 MiB, "
        "KV cache for --ctx 8192 180 MiB, compute 98 MiB) but only 250 MiB is available "
        "(MemAvailable) (try --ctx 2048 (needs 235 MiB); LLMKIT_MEMORY_CHECK=0 skips this "
        "check)"]
    # The same command with that context answers, so the counter sees a load when there is one.
    fits = _drive(["run", "-m", "smollm2:135m", "--ctx", "2048", "--max-tokens", "1",
                   "--temperature", "0", "hi"], tmp_path, available_kib=250 * 1024)
    assert fits.code == 0, fits.stderr_lines
    assert fits.calls == ["llama_model_load_from_file"] and fits.stdout


def test_the_escape_hatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMKIT_MEMORY_CHECK", "0")
    done = _drive(["run", "-m", "smollm2:135m", "--max-tokens", "1", "--temperature", "0",
                   "hi"], tmp_path, available_kib=1024)
    assert done.code == 0, done.stderr_lines
    assert done.calls == ["llama_model_load_from_file"]


# -- the Vision engine -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mm.require_oracle()
    return mm.convert_tiny(mm.build_model(seed=0), tmp_path_factory.mktemp("memory"))["f16"]


@dataclass
class _Pixels:
    rgb: bytes
    width: int
    height: int


def test_the_vision_engine_allocates_what_the_estimate_says(tiny_vision: Path) -> None:
    from llmkit.engines.mllama.model import MllamaModel
    from llmkit.engines.mllama.preprocess import tile_image

    fp = footprint(tiny_vision)
    assert fp.own_engine and not fp.embedding_resident
    picture = mm.random_picture(56, 56)
    with MllamaModel.open(tiny_vision, n_ctx=512, threads=1, device="cpu") as model:
        model.encode_image(tile_image(_Pixels(picture.tobytes(), 56, 56),
                                      mean=model.image_mean, std=model.image_std,
                                      max_tiles=model.max_tiles, tile_size=model.tile_size))
        image = model.memory()["compute"]
        # A prompt batch as large as the context: the largest graph the engine prepares.
        model.eval([1, 2, 3, mm.IMAGE_TOKEN_ID] + [5] * 508, 0, 3)
        got: dict[str, Any] = model.memory()
        tp = model.tp
    est = memory.estimate(fp, 512).all
    # The caches exactly: 3 self layers × K and V × 512 positions, and the 2 cross layers'
    # K and V of one image's 4 tiles × 5 tokens, each row 2 KV heads × 16 values, F16.
    width = tp.n_head_kv * tp.head_dim
    assert est.kv == got["caches"] == 2 * (3 * 2 * width * 512 + 2 * 2 * width * 4 * 5)
    # Weights: every tensor but the token embedding (a token reads only its own row).
    assert got["weights"] == fp.weight_bytes
    assert est.weights == fp.weight_bytes - fp.embedding_bytes
    # Compute: the scheduler's buffer grows to the largest graph, here the prompt batch's
    # (measured 1.58 MB; the image graph's was 79 KB: 4 tiles of 8 tokens).
    assert image < got["compute"]
    assert est.compute == pytest.approx(got["compute"], rel=0.05)


def test_tiny_vision_is_not_refused_here_but_a_small_budget_refuses(
        tiny_vision: Path, tmp_path: Path) -> None:
    check_memory(tiny_vision, "mllama", n_ctx=None, device="auto", gpu_layers=None,
                 name="tiny")
    need = memory.estimate(footprint(tiny_vision), 512).all.total
    budget_kib = need // 1024 // 4
    refused = _drive(["run", "-m", str(tiny_vision), "--max-tokens", "1", "hi"], tmp_path,
                     available_kib=budget_kib)
    assert refused.code == 1
    assert refused.calls == []
    assert len(refused.stderr_lines) == 1
    line = refused.stderr_lines[0]
    assert line.startswith(f"llmkit: error: model '{tiny_vision.name}' needs about "
                           f"{memory.human_gib(need)} of memory (weights "), line
    assert "KV caches for --ctx 512 and one image" in line
    assert line.endswith(f"but only {memory.human_gib(budget_kib * 1024)} is available "
                         "(MemAvailable) (LLMKIT_MEMORY_CHECK=0 skips this check)"), line


def test_the_vision_engine_on_a_gpu_too_small(tiny_vision: Path) -> None:
    from llmkit.errors import NotEnoughMemoryError
    from llmkit.memory import Available, GpuMemory

    fp = footprint(tiny_vision)
    need = memory.estimate(fp, 512, gpu_layers=-1)
    assert need.cpu.total == 0 and need.gpu.weights == fp.weight_bytes  # the map is closed
    small = [GpuMemory("Fake GPU", need.gpu.total // 4, 1 << 30), GpuMemory("Other", 1 << 30,
                                                                             1 << 30)]
    with pytest.raises(NotEnoughMemoryError) as caught:
        check_memory(tiny_vision, "mllama", n_ctx=None, device="auto", gpu_layers=None,
                     name="tiny", cpu=Available(8 << 30, "MemAvailable"), gpus=lambda: small)
    message = str(caught.value)
    # It runs on the first GPU only, and offloads every layer or none: no --gpu-layers.
    assert f"on the GPU (weights {memory.human_gib(fp.weight_bytes)}" in message
    assert f"is available (Fake GPU free) (try --device cpu (needs " \
           f"{memory.human_gib(memory.estimate(fp, 512).cpu.total)} of RAM)" in message
    assert "--gpu-layers" not in message
    # Some layers only is the engine's own refusal, not the memory check's.
    check_memory(tiny_vision, "mllama", n_ctx=None, device="auto", gpu_layers=2, name="tiny",
                 cpu=Available(8 << 30, "MemAvailable"), gpus=lambda: small)


def test_the_gpus_ggml_reports() -> None:
    from llmkit.engines import gpu_memory
    from llmkit.engines.llama_cpp import gpu_offload_supported

    found = gpu_memory()
    if not gpu_offload_supported():
        assert found == []  # a CPU build: ggml's registry holds the CPU only
    assert all(g.name and 0 <= g.free <= g.total for g in found)


def test_doctor_reports_what_the_check_compares_with() -> None:
    from tests.conftest import run_llmkit

    data = json.loads(run_llmkit(["doctor", "--format", "json"]).stdout)["memory"]
    assert data["available"] > 0 and data["source"] in ("MemAvailable", "the cgroup limit")
    assert data["gpus"] == []
    text = run_llmkit(["doctor"]).stdout
    assert re.search(r"^memory +[\d.]+ (GiB|MiB) available \((MemAvailable|the cgroup "
                     r"limit)\)$", text, re.MULTILINE), text


def test_a_smaller_quantization_is_what_llama_cpp_writes(tmp_path: Path) -> None:
    # The refusal's figure for a smaller quantization against the file llama.cpp's quantizer
    # really writes (widths of 256, so the K-quants are used, and an untied output).
    from llmkit.convert import convert
    from llmkit.quantize import quantize
    from tests.checkpoints import build_tiny_llama3

    build_tiny_llama3(tmp_path / "ckpt", hidden=256, ff=512, layers=8, tied=False)
    f16 = tmp_path / "tiny-f16.gguf"
    convert(tmp_path / "ckpt", f16, outtype="f16")
    fp = footprint(f16)
    for qtype in ("Q8_0", "Q4_K_M"):
        written = footprint(Path(quantize(f16, qtype, tmp_path / f"tiny-{qtype}.gguf",
                                          threads=1).output))
        predicted = _predicted_as_written(fp, written, qtype)
        assert predicted.layer_bytes == written.layer_bytes



def test_a_smaller_quantization_is_what_the_vision_quantizer_writes(tiny_vision: Path,
                                                                     tmp_path: Path) -> None:
    from llmkit.quantize import quantize

    fp = footprint(tiny_vision)
    for qtype in ("Q8_0", "Q4_K_M"):
        written = footprint(Path(quantize(tiny_vision, qtype, tmp_path / f"v-{qtype}.gguf",
                                          threads=1).output))
        predicted = _predicted_as_written(fp, written, qtype)
        assert predicted.vision_bytes == written.vision_bytes == fp.vision_bytes


def _predicted_as_written(fp: memory.Footprint, written: memory.Footprint, qtype: str
                          ) -> memory.Footprint:
    # The estimate of fp requantized to qtype: every tensor's type and the weights' bytes are
    # those of the file the quantizer wrote.
    predicted = memory.requantized(fp, _plan_for(qtype))
    assert {t.name: t.type_name for t in predicted.tensors} == \
        {t.name: t.type_name for t in written.tensors}, qtype
    assert predicted.weight_bytes == written.weight_bytes, qtype
    return predicted


def _plan_for(qtype: str) -> Callable[[list[str]], Callable[[str, tuple[int, ...], str], str]]:
    from llmkit.engines.mllama.quantize import TypePlan

    def plan(names: list[str]) -> Callable[[str, tuple[int, ...], str], str]:
        return TypePlan.for_tensors(qtype, names).type_of

    return plan
