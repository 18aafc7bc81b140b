"""`llmkit convert` against llama.cpp's convert_hf_to_gguf.py on a Llama-3.2-1B-shaped checkpoint.

Builds (once, cached in --workdir) a random-weight bf16 checkpoint with Llama 3.2 1B's exact
tensor shapes and config (GQA, llama3 RoPE scaling, tied embeddings) and SmolLM2's tokenizer
(one the reference converter recognises offline; the vocabulary is padded to 128256 as Llama's
is). Then, interleaved over rounds, converts it bf16 → f16 with both converters, measuring wall
time and peak RSS of each process, and checks that the two outputs hold identical tensor data.
Every run starts after a sync (no run pays for another's write-back); llmkit's time includes
its fsync, so the reference is also timed with a sync after it ("both durable").
Also times `llmkit quantize` against llama.cpp's `llama-quantize` (same library function).
The reference converter is the one in the pinned llama-cpp-python sdist (build_llama_bench.sh
fetches it); it needs torch and transformers, which llmkit itself never imports.

    .venv/bin/python benchmarks/bench_convert.py [--rounds 3] [--workdir /tmp/llmkit-bench-1b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import built_tool, default_model, median, save  # noqa: E402

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "vocab_size": 128256, "tie_word_embeddings": True, "hidden_act": "silu",
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}


def build_checkpoint(out: Path) -> None:
    """Write the checkpoint tensor by tensor (bounded memory), then the tokenizer files."""
    import numpy as np

    from tests.checkpoints import gguf_to_hf

    if (out / "model.safetensors").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "_tok"
    gguf_to_hf(default_model(), tok_dir)  # for SmolLM2's tokenizer files only
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tok_dir / name).replace(out / name)
    for leftover in tok_dir.iterdir():
        leftover.unlink()
    tok_dir.rmdir()
    c = CONFIG
    h, ff, kv = c["hidden_size"], c["intermediate_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                   p + "mlp.down_proj.weight": (h, ff)}
    shapes["model.norm.weight"] = (h,)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(0)
    tmp = out / "model.safetensors.tmp"
    with open(tmp, "wb") as fh:
        fh.write(len(head).to_bytes(8, "little"))
        fh.write(head)
        for shape in shapes.values():
            rows = shape[0]
            step = max(1, (1 << 22) // max(1, int(np.prod(shape[1:]))))
            for a in range(0, rows, step):
                block = rng.standard_normal((min(step, rows - a), *shape[1:]), dtype=np.float32)
                block *= 0.02
                fh.write((block.view(np.uint32) >> 16).astype("<u2").tobytes())
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))


def timed(cmd: list[str], env: dict[str, str] | None = None, *, durable: bool = False
          ) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process.

    Dirty pages left by the previous run are flushed first, untimed, so no run pays for
    another's write-back. ``durable`` adds a sync after the process to the time: llmkit fsyncs
    its output before renaming it into place, the reference converter does not.
    """
    os.sync()
    time.sleep(2)  # a virtual disk keeps writing for a moment after sync returns
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    if durable:
        os.sync()
    elapsed = time.perf_counter() - t0
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{stderr[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


def compare(a: Path, b: Path) -> dict[str, Any]:
    """Whether two GGUFs hold the same tensors with byte-identical data."""
    import gguf
    import numpy as np

    ta = {t.name: t for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(b).tensors}
    differing = [n for n in ta if n in tb and (ta[n].tensor_type != tb[n].tensor_type
                                               or not np.array_equal(ta[n].data, tb[n].data))]
    return {"same_names": sorted(ta) == sorted(tb), "only_in_llmkit": sorted(set(ta) - set(tb)),
            "only_in_reference": sorted(set(tb) - set(ta)), "differing": differing,
            "identical": sorted(ta) == sorted(tb) and not differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", default="/tmp/llmkit-bench-1b")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.workdir)
    ckpt = work / "checkpoint"
    build_checkpoint(ckpt)
    src = sorted(HERE.glob(".build/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if not src:
        raise SystemExit("run benchmarks/build_llama_bench.sh first (it fetches the source)")
    reference = src[-1]
    ours_out, ref_out = work / "llmkit-f16.gguf", work / "reference-f16.gguf"
    python = sys.executable
    llmkit = [python, "-m", "llmkit", "convert", str(ckpt), "-o", str(ours_out), "--force", "-q"]
    ref = [python, str(reference), str(ckpt), "--outfile", str(ref_out), "--outtype", "f16"]
    for chunk in ckpt.glob("*.safetensors"):  # warm page cache, as the reference figure assumes
        with open(chunk, "rb") as fh:
            while fh.read(1 << 24):
                pass
    samples: dict[str, list[tuple[float, int]]] = {"llmkit": [], "reference": [],
                                                   "reference_synced": []}
    for r in range(args.rounds):
        order = [("llmkit", llmkit, False), ("reference", ref, False),
                 ("reference_synced", ref, True)]
        for name, cmd, durable in (order if r % 2 == 0 else order[::-1]):
            samples[name].append(timed(cmd, durable=durable))
        print(f"round {r + 1}/{args.rounds}: llmkit {samples['llmkit'][-1][0]:.1f} s, "
              f"reference {samples['reference'][-1][0]:.1f} s (+ sync "
              f"{samples['reference_synced'][-1][0]:.1f} s)", file=sys.stderr)
    result: dict[str, Any] = {
        "checkpoint": str(ckpt), "rounds": args.rounds, "reference": str(reference),
        "llmkit_s": round(median([s[0] for s in samples["llmkit"]]), 2),
        "reference_s": round(median([s[0] for s in samples["reference"]]), 2),
        "reference_synced_s": round(median([s[0] for s in samples["reference_synced"]]), 2),
        "llmkit_peak_rss_mb": round(median([s[1] for s in samples["llmkit"]]) / 2**20),
        "reference_peak_rss_mb": round(median([s[1] for s in samples["reference"]]) / 2**20),
    }
    result["time_ratio"] = round(result["llmkit_s"] / result["reference_s"], 3)
    result["time_ratio_both_durable"] = round(result["llmkit_s"] / result["reference_synced_s"], 3)
    result["memory_ratio"] = round(
        result["llmkit_peak_rss_mb"] / result["reference_peak_rss_mb"], 3)
    result["tensor_data"] = compare(ours_out, ref_out)
    quant = built_tool("llama-quantize")
    if quant:
        q_ours: list[float] = []
        q_ref: list[float] = []
        for _ in range(args.rounds):
            q_ours.append(timed([python, "-m", "llmkit", "quantize", str(ours_out),
                                 str(work / "q-llmkit.gguf"), "--type", "Q4_K_M", "--force",
                                 "--threads", str(args.threads), "-q"])[0])
            q_ref.append(timed([str(quant), str(ours_out), str(work / "q-ref.gguf"),
                                "Q4_K_M", str(args.threads)])[0])
        result["quantize_llmkit_s"] = round(median(q_ours), 2)
        result["quantize_reference_s"] = round(median(q_ref), 2)
        result["quantize_ratio"] = round(median(q_ours) / median(q_ref), 3)
    print(json.dumps(result, indent=2))
    print(f"saved {save('convert', result)}")


if __name__ == "__main__":
    main()
