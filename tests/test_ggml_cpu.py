"""The CPU's extra weight buffers both engines use: AMX, which crashes this ggml, is never one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmkit.engines.ggml_cpu import UNSAFE_EXTRA_BUFTS, hidden_buffer_types
from tests.checkpoints import build_tiny_llama3
from tests.conftest import run_llmkit


def test_no_unsafe_buffer_type_is_offered_after_either_engine_loads() -> None:
    from llmkit.engines.llama_cpp import llama_module
    from llmkit.engines.mllama import _backend, _ggml

    llama_module()
    f = _ggml.lib().f
    with _backend.Backend() as backend:
        names = {(f.ggml_backend_buft_name(b) or b"").decode()
                 for b in _backend.extra_buffer_types(backend)}
    assert not names & UNSAFE_EXTRA_BUFTS
    # Where the processor has AMX, it was there and was taken out.
    assert set(hidden_buffer_types()) <= UNSAFE_EXTRA_BUFTS


def test_k_quant_model_with_rows_of_256_answers(tmp_path: Path) -> None:
    # Hidden size 256: every matrix qualifies for ggml's AMX kernels, which crashed llama.cpp
    # on the first prompt on Sapphire Rapids machines (quantize's load check included).
    ckpt = tmp_path / "ck"
    build_tiny_llama3(ckpt, hidden=256, ff=512)
    f16 = tmp_path / "w256.gguf"
    proc = run_llmkit(["convert", str(ckpt), "-o", str(f16)])
    assert proc.returncode == 0, proc.stderr
    for qtype in ("Q4_K_M", "Q4_0", "Q8_0"):
        out = tmp_path / f"w256-{qtype}.gguf"
        proc = run_llmkit(["quantize", str(f16), str(out), "--type", qtype, "-t", "2"])
        assert proc.returncode == 0, proc.stderr
        proc = run_llmkit(["run", "--model", str(out), "--max-tokens", "4", "--format", "json",
                           "-t", "2", "hello there, several tokens of prompt"])
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["usage"]["completion_tokens"] == 4


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_the_converter_and_llama_cpp_share_one_ggml_cpu_library() -> None:
    # The converter's fast casts load libggml-cpu before llama.cpp does (`pull --from-source`):
    # a second copy of it would be a second CPU backend, with its own list of buffer types.
    import numpy as np

    from llmkit.convert._fastcast import f32_to_f16
    from llmkit.engines.llama_cpp import llama_module

    f32_to_f16(np.ones(4, dtype=np.float32))
    llama_module()
    maps = Path("/proc/self/maps").read_text().splitlines()
    files = {line.split()[-1] for line in maps if "libggml-cpu" in line}
    assert len(files) == 1, files
