"""Prompt and decode tokens/s of `llmkit run` against raw llama.cpp: same model, threads, prompt.

One prompt is used throughout: a chat message rendered through the model's template (as
`llmkit run` does), about 256 tokens long, that the model continues for 128 tokens. Variants:

- llama_bench: llama.cpp's own `llama-bench` built from the same vendored source
  (build_llama_bench.sh): `-p N` for the prompt, `-n 128 -d N` for decoding at that depth;
- raw_bindings: a minimal loop on the bindings' low-level API (batch decode, greedy sampler);
- llmkit_engine: llmkit's Engine.generate, streaming text to a callback;
- llmkit_cli: the real `llmkit run --format json` command (its own timings);
- highlevel_bindings: llama-cpp-python's create_completion, for reference.

Variants run interleaved, each in a fresh process, for several rounds; ratios to the raw
baseline are computed within each round (the machine's speed drifts between rounds) and their
medians reported. JSON goes to benchmarks/results/.

    .venv/bin/python benchmarks/bench_generation.py [--model M] [--threads 2] [--rounds 7]
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
from _common import default_model, median, save

TG = 128
SYSTEM = "You are a helpful assistant."


def message(n: int) -> str:
    """The user message: a list the model keeps continuing."""
    return "Continue this list: " + ", ".join(str(i) for i in range(1, n)) + ","


def prompt_tokens(model: str, target: int = 256) -> tuple[str, list[int]]:
    """The message whose rendered chat prompt is about ``target`` tokens, and those tokens."""
    from llmkit.engine import Engine

    with Engine(model, n_ctx=4096, threads=1) as engine:
        n = 10
        while True:
            text = message(n)
            tokens = engine.chat_tokens([{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": text}])
            if len(tokens) >= target:
                return text, tokens
            n += 5


def worker_raw(model: str, threads: int, tokens: list[int]) -> dict[str, float]:
    """The bindings' low-level API with nothing on top: what llama.cpp itself costs."""
    import ctypes

    import llama_cpp as lc

    silence = lc.llama_log_callback(lambda *a: None)  # keep a reference: C holds the pointer
    lc.llama_log_set(silence, ctypes.c_void_p(0))
    lc.llama_backend_init()
    m = lc.llama_model_load_from_file(model.encode(), lc.llama_model_default_params())
    cparams = lc.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 4096, 512, 512
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = lc.llama_init_from_model(m, cparams)
    arr = (lc.llama_token * len(tokens))(*tokens)
    t0 = time.perf_counter()
    assert lc.llama_decode(ctx, lc.llama_batch_get_one(arr, len(tokens))) == 0
    t1 = time.perf_counter()
    sampler = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(sampler, lc.llama_sampler_init_greedy())
    one = (lc.llama_token * 1)()
    batch = lc.llama_batch_get_one(one, 1)
    for _ in range(TG):
        one[0] = lc.llama_sampler_sample(sampler, ctx, -1)
        assert lc.llama_decode(ctx, batch) == 0
    t2 = time.perf_counter()
    return {"pp_tps": len(tokens) / (t1 - t0), "tg_tps": TG / (t2 - t1)}


def worker_llmkit(model: str, threads: int, tokens: list[int]) -> dict[str, float]:
    """llmkit's Engine.generate: our generation loop, streaming text to a callback."""
    from llmkit.engine import Engine, SamplingParams

    engine = Engine(model, n_ctx=4096, threads=threads)
    pieces: list[str] = []
    g = engine.generate(tokens, SamplingParams(temperature=0, max_tokens=TG), pieces.append)
    assert g.completion_tokens == TG, f"stopped after {g.completion_tokens} tokens"
    return {"pp_tps": g.prompt_tokens_per_s, "tg_tps": g.tokens_per_s}


def worker_highlevel(model: str, threads: int, tokens: list[int]) -> dict[str, float]:
    """llama-cpp-python's high-level create_completion, for reference."""
    import llama_cpp

    llm = llama_cpp.Llama(model, n_ctx=4096, n_threads=threads, n_threads_batch=threads,
                          verbose=False)
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in llm.create_completion(tokens, max_tokens=TG + 1, temperature=0, stream=True):
        count += 1
        if first is None:
            first = time.perf_counter()
    t1 = time.perf_counter()
    assert first is not None
    return {"pp_tps": len(tokens) / (first - t0), "tg_tps": (count - 1) / (t1 - first)}


def run_cli(model: str, threads: int, text: str, n_prompt: int) -> dict[str, float]:
    """The real `llmkit run --format json` command on the same message."""
    proc = subprocess.run(
        [sys.executable, "-m", "llmkit", "run", "-m", model, "-t", str(threads),
         "--temperature", "0", "--max-tokens", str(TG), "--system", SYSTEM, "--format", "json",
         "-q", text], capture_output=True, text=True, check=True)
    data = json.loads(proc.stdout)
    assert data["usage"]["prompt_tokens"] == n_prompt, data["usage"]
    assert data["usage"]["completion_tokens"] == TG, data["usage"]
    return {"pp_tps": data["timings"]["prompt_tokens_per_s"],
            "tg_tps": data["timings"]["tokens_per_s"]}


def run_llama_bench(binary: str, model: str, threads: int, n_prompt: int) -> dict[str, float]:
    """llama.cpp's llama-bench: prompt of n_prompt tokens, then 128 tokens at that depth."""
    def once(*extra: str) -> float:
        proc = subprocess.run([binary, "-m", model, "-t", str(threads), "-r", "1", "-o", "json",
                               *extra], capture_output=True, text=True, check=True)
        return float(json.loads(proc.stdout)[0]["avg_ts"])

    return {"pp_tps": once("-p", str(n_prompt), "-n", "0"),
            "tg_tps": once("-p", "0", "-n", str(TG), "-d", str(n_prompt))}


WORKERS = {"raw_bindings": worker_raw, "llmkit_engine": worker_llmkit,
           "highlevel_bindings": worker_highlevel}


def in_subprocess(name: str, model: str, threads: int, tokens: list[int]) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--model", model,
                           "--threads", str(threads), "--tokens", json.dumps(tokens)],
                          capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--llama-bench", default=None, help="path to llama-bench")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = str(args.model or default_model())
    if args.worker:
        print(json.dumps(WORKERS[args.worker](model, args.threads, json.loads(args.tokens))))
        return
    text, tokens = prompt_tokens(model)
    bench = args.llama_bench
    if bench is None:
        found = sorted(Path(__file__).parent.glob(".build/build-*/bin/llama-bench"))
        bench = str(found[-1]) if found else None
    variants: dict[str, Any] = {
        name: (lambda n=name: in_subprocess(n, model, args.threads, tokens)) for name in WORKERS}
    variants["llmkit_cli"] = lambda: run_cli(model, args.threads, text, len(tokens))
    if bench and os.access(bench, os.X_OK):
        variants["llama_bench"] = lambda: run_llama_bench(bench, model, args.threads,
                                                          len(tokens))
    raw = "llama_bench" if "llama_bench" in variants else "raw_bindings"
    print(f"model {model}\nthreads {args.threads}; prompt {len(tokens)} tokens; decode {TG} "
          f"tokens; {args.rounds} rounds\nraw = "
          f"{'llama-bench at ' + bench if raw == 'llama_bench' else 'the bindings loop'}",
          file=sys.stderr)
    names = list(variants)
    samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate to spread drift
        for name in order:
            samples[name].append(variants[name]())
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    keys = ("pp_tps", "tg_tps")
    medians = {n: {k: round(median([s[k] for s in samples[n]]), 1) for k in keys}
               for n in names}
    ratios = {n: {k: round(median([s[k] / b[k] for s, b in zip(samples[n], samples[raw],
                                                                 strict=True)]), 3)
                  for k in keys} for n in names}
    print(f"\n{'variant':<20}{'prompt t/s':>12}{'decode t/s':>12}{'prompt ×raw':>13}"
          f"{'decode ×raw':>13}")
    for n in names:
        print(f"{n:<20}{medians[n]['pp_tps']:>12.1f}{medians[n]['tg_tps']:>12.1f}"
              f"{ratios[n]['pp_tps']:>13.3f}{ratios[n]['tg_tps']:>13.3f}")
    print("(ratios are medians of per-round ratios)")
    path = save("generation", {
        "model": model, "threads": args.threads, "prompt_tokens": len(tokens), "decode_tokens": TG,
        "rounds": args.rounds, "raw": raw, "llama_bench": bench if raw == "llama_bench" else None,
        "samples": samples, "medians": medians, "ratios_vs_raw": ratios,
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
