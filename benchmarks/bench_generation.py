"""Prompt and decode tokens/s of llmkit (library and CLI) against raw llama.cpp, same model.

Raw llama.cpp is `llama-bench` built from the same vendored source (build_llama_bench.sh) when
it is present, and always also a minimal loop on the bindings' low-level API (batch decode +
greedy sampler, no llmkit). Variants run interleaved, each round in a fresh process; medians
and ratios are printed and saved as JSON.

    .venv/bin/python benchmarks/bench_generation.py [--model M] [--threads 2] [--rounds 5]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import counting_text, default_model, median, save

PP, TG = 256, 128


def _prompt_tokens(lc: Any, vocab: Any, n: int) -> list[int]:
    data = counting_text().encode()
    buf = (lc.llama_token * (len(data) + 8))()
    count = lc.llama_tokenize(vocab, data, len(data), buf, len(buf), True, False)
    tokens = list(buf[:count])
    assert len(tokens) >= n, "counting text too short"
    return tokens[:n]


def worker_raw(model: str, threads: int) -> dict[str, float]:
    """The bindings' low-level API with nothing on top: what llama.cpp itself costs."""
    import ctypes

    import llama_cpp as lc

    silence = lc.llama_log_callback(lambda *a: None)  # keep a reference: C holds the pointer
    lc.llama_log_set(silence, ctypes.c_void_p(0))
    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    m = lc.llama_model_load_from_file(model.encode(), mparams)
    vocab = lc.llama_model_get_vocab(m)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 4096, 512, 512
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = lc.llama_init_from_model(m, cparams)
    tokens = _prompt_tokens(lc, vocab, PP)
    arr = (lc.llama_token * PP)(*tokens)
    t0 = time.perf_counter()
    assert lc.llama_decode(ctx, lc.llama_batch_get_one(arr, PP)) == 0
    t1 = time.perf_counter()
    sampler = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(sampler, lc.llama_sampler_init_greedy())
    one = (lc.llama_token * 1)()
    batch = lc.llama_batch_get_one(one, 1)
    t2 = time.perf_counter()
    for _ in range(TG):
        one[0] = lc.llama_sampler_sample(sampler, ctx, -1)
        assert lc.llama_decode(ctx, batch) == 0
    t3 = time.perf_counter()
    return {"pp_tps": PP / (t1 - t0), "tg_tps": TG / (t3 - t2)}


def worker_llmkit(model: str, threads: int) -> dict[str, float]:
    """llmkit's Engine.generate: our generation loop, streaming text to a callback."""
    from llmkit.engine import Engine, SamplingParams

    engine = Engine(model, n_ctx=4096, threads=threads)
    tokens = engine.tokenize(counting_text())[:PP]
    pieces: list[str] = []
    g = engine.generate(tokens, SamplingParams(temperature=0, max_tokens=TG), pieces.append)
    assert g.completion_tokens == TG, f"stopped after {g.completion_tokens} tokens"
    return {"pp_tps": g.prompt_tokens_per_s, "tg_tps": g.tokens_per_s}


def worker_highlevel(model: str, threads: int) -> dict[str, float]:
    """llama-cpp-python's high-level create_completion, for reference."""
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    tokens = llm.tokenize(counting_text().encode())[:PP]
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in llm.create_completion(tokens, max_tokens=TG, temperature=0, stream=True):
        count += 1
        if first is None:
            first = time.perf_counter()
    t1 = time.perf_counter()
    assert first is not None
    return {"pp_tps": PP / (first - t0), "tg_tps": (count - 1) / (t1 - first)}


def run_cli(model: str, threads: int) -> dict[str, float]:
    """The real `llmkit run --format json` command."""
    exe = [sys.executable, "-m", "llmkit"]
    proc = subprocess.run(
        [*exe, "run", "-m", model, "-t", str(threads), "--temperature", "0",
         "--max-tokens", str(TG), "--format", "json", "-q",
         "Continue this list: " + counting_text(120)],
        capture_output=True, text=True, check=True)
    data = json.loads(proc.stdout)
    return {"pp_tps": data["timings"]["prompt_tokens_per_s"],
            "tg_tps": data["timings"]["tokens_per_s"],
            "completion_tokens": data["usage"]["completion_tokens"]}


def run_llama_bench(binary: str, model: str, threads: int) -> dict[str, float]:
    """llama.cpp's own llama-bench, one repetition."""
    proc = subprocess.run([binary, "-m", model, "-t", str(threads), "-p", str(PP), "-n", str(TG),
                           "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(proc.stdout)
    out = {}
    for row in rows:
        key = "pp_tps" if row["n_prompt"] > 0 else "tg_tps"
        out[key] = float(row["avg_ts"])
    return out


WORKERS = {"raw_bindings": worker_raw, "llmkit_engine": worker_llmkit,
           "highlevel_bindings": worker_highlevel}


def in_subprocess(name: str, model: str, threads: int) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--model", model,
                           "--threads", str(threads)], capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--llama-bench", default=None, help="path to llama-bench")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = str(args.model or default_model())
    if args.worker:
        print(json.dumps(WORKERS[args.worker](model, args.threads)))
        return
    bench = args.llama_bench
    if bench is None:
        candidate = sorted(Path(__file__).parent.glob(".build/build-*/bin/llama-bench"))
        bench = str(candidate[-1]) if candidate else None
    variants: dict[str, Any] = {name: (lambda n=name: in_subprocess(n, model, args.threads))
                                for name in WORKERS}
    variants["llmkit_cli"] = lambda: run_cli(model, args.threads)
    if bench and os.access(bench, os.X_OK):
        variants["llama_bench"] = lambda: run_llama_bench(bench, model, args.threads)
    raw_name = "llama_bench" if "llama_bench" in variants else "raw_bindings"
    print(f"model {model}\nthreads {args.threads}, pp {PP}, tg {TG}, rounds {args.rounds}\n"
          f"raw = {'llama-bench at ' + bench if raw_name == 'llama_bench' else 'bindings loop'}",
          file=sys.stderr)
    samples: dict[str, dict[str, list[float]]] = {n: {"pp_tps": [], "tg_tps": []}
                                                  for n in variants}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate to spread drift
        for name in order:
            result = variants[name]()
            for key in ("pp_tps", "tg_tps"):
                samples[name][key].append(result[key])
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    medians = {n: {k: round(median(v), 2) for k, v in s.items()} for n, s in samples.items()}
    ratios = {}
    for name in names:
        if name == raw_name:
            continue
        ratios[name] = {k: round(medians[name][k] / medians[raw_name][k], 3)
                        for k in ("pp_tps", "tg_tps")}
    vs_bindings = {k: round(medians["llmkit_engine"][k] / medians["raw_bindings"][k], 3)
                   for k in ("pp_tps", "tg_tps")}
    print(f"\n{'variant':<20}{'prompt t/s':>12}{'decode t/s':>12}{'pp ×raw':>10}{'tg ×raw':>10}")
    for name in names:
        ratio = ratios.get(name, {"pp_tps": 1.0, "tg_tps": 1.0})
        print(f"{name:<20}{medians[name]['pp_tps']:>12.1f}{medians[name]['tg_tps']:>12.1f}"
              f"{ratio['pp_tps']:>10.3f}{ratio['tg_tps']:>10.3f}")
    print(f"\nllmkit engine vs raw bindings loop: pp {vs_bindings['pp_tps']:.3f}×, "
          f"tg {vs_bindings['tg_tps']:.3f}×")
    path = save("generation", {
        "model": model, "threads": args.threads, "pp": PP, "tg": TG, "rounds": args.rounds,
        "raw": raw_name, "llama_bench": bench if raw_name == "llama_bench" else None,
        "samples": samples, "medians": medians, "ratios_vs_raw": ratios,
        "llmkit_engine_vs_raw_bindings": vs_bindings,
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
