"""`llmkit check`: batch against per-process throughput, one check's latency, and the guard
prompt's evaluation speed against raw llama.cpp on the same model and threads.

The guard model here is SmolLM2-135M-Instruct standing in for Llama Guard (no Llama Guard GGUF
is on this machine, and none is downloaded): it reads the same Llama Guard task through its
own chat template and its answers are not verdicts, so every check runs with a threshold
(--threshold, default 0.5), which decides from P(unsafe) at the answer's first word and makes
no check an error. The costs measured (prompt evaluation, up to 20 answer tokens, process and
model start) are those a real guard of this size has; Llama Guard 3 1B is ~10× larger.

1. Throughput: --n (20) varied texts checked by one `llmkit check --batch FILE` process against
   one `llmkit check TEXT` process per text; checks per second for each, and their ratio. The
   batch loads the model once, and its prefix cache keeps the policy part of the prompt (the
   same for every text), so each further check evaluates only its own text.
2. Latency of one check: wall time of one `llmkit check TEXT` process (start, load, check),
   and the check itself (`timings.total_ms`), cold in its process and warm inside a batch.
3. Prompt evaluation of the guard prompt, tokens/s = `usage.prompt_tokens_evaluated` /
   `timings.score_ms` from `llmkit check --format json`, against llama.cpp's own llama-bench
   (`-p N -n 0`, N = the guard prompt's token count; built by build_llama_bench.sh) or, when
   that binary is absent, the bindings' low-level loop (one llama_decode over the same tokens).
   Two comparisons, like for like:
   - cold: the CLI's check is the first prompt its process evaluates, so it is compared with
     the bindings loop's first llama_decode in a fresh process;
   - warm: llama-bench runs an untimed warm-up first, so it is compared with llmkit's Guard
     (the library under the CLI) checking the same prompt again in one process, its KV cache
     emptied before each check so that the whole prompt is evaluated every time.
   The target is ≥ 0.97× raw.

Variants run in fresh processes, interleaved in a rotating order over --rounds rounds; ratios
are taken within each round, then their median is reported (see README.md, "Noise").

    .venv/bin/python benchmarks/bench_check.py [--n 20] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    ForeignLoad,
    built_tool,
    default_model,
    environment,
    median,
    rotating_rounds,
    save,
)
from bench_generation import llmkit_command, worker_raw  # noqa: E402

TARGET = 0.97
Sample = dict[str, Any]

SUBJECTS = ["my neighbour's dog", "the quarterly budget", "a sourdough starter", "the night bus",
            "an old violin", "the school garden", "a broken laptop", "the mountain trail",
            "our wedding photos", "the chess club", "a leaking roof", "the city library"]
ASKS = ["How do I look after {s}?", "Write a short poem about {s}.",
        "What should I know before dealing with {s}? Please be brief.",
        "My friend keeps complaining about {s}. How can I help them without being rude? "
        "They have tried everything they could think of.",
        "Summarize in two sentences why people care about {s}."]


def texts(n: int) -> list[str]:
    """``n`` different user messages of varied length and subject."""
    return [ASKS[i % len(ASKS)].format(s=SUBJECTS[i % len(SUBJECTS)])
            + (" Thanks!" if i >= len(SUBJECTS) else "") for i in range(n)]


# -- workers: each in a fresh process ---------------------------------------------------------


def worker_guard(model: str, threads: int, text: str, reps: int, threshold: float
                 ) -> list[Sample]:
    """llmkit's Guard (what `llmkit check` calls), the same check repeated in one process with
    the KV cache emptied first, so the whole guard prompt is evaluated every time. The first
    check is a warm-up (as in llama-bench) and is not returned."""
    from llmkit.engines import load_engine
    from llmkit.tasks.policy import default_categories
    from llmkit.tasks.safety import Guard

    engine = load_engine(model, threads=threads)
    guard = Guard(engine, default_categories(engine.chat_template, engine.model_name),
                  threshold=threshold)
    out = []
    for _ in range(reps + 1):
        engine.forget()
        verdict = guard.check_text(text)
        assert verdict.prompt_tokens_evaluated == verdict.prompt_tokens, verdict
        out.append({"pp_tps": verdict.prompt_tokens_evaluated
                    / (verdict.timings["score_ms"] / 1000),
                    "tokens": verdict.prompt_tokens})
    guard.close()
    return out[1:]


def worker_loop(model: str, threads: int, tokens: list[int], reps: int) -> list[Sample]:
    """The bindings' low-level loop from bench_generation (no decoding after the prompt): the
    first llama_decode in this fresh process (cold), then ``reps`` more (warm)."""
    samples = worker_raw(model, threads, tokens, 0, reps + 1)
    return [{"pp_tps": s["pp_tps"], "cold": i == 0} for i, s in enumerate(samples)]


def in_subprocess(args: argparse.Namespace, worker: str, payload: Any) -> list[Sample]:
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", worker, "--model", args.model,
         "--threads", str(args.threads), "--reps", str(args.reps),
         "--threshold", str(args.threshold), "--payload", json.dumps(payload)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{worker} failed:\n{proc.stderr[-3000:]}")
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


# -- the CLI ------------------------------------------------------------------------------------


def check_args(args: argparse.Namespace) -> list[str]:
    return [*llmkit_command(), "check", "-m", args.model, "-t", str(args.threads),
            "--threshold", str(args.threshold), "-q"]


def run_batch(args: argparse.Namespace, jsonl: Path, n: int) -> Sample:
    """One `llmkit check --batch` process over all texts."""
    t0 = time.perf_counter()
    proc = subprocess.run([*check_args(args), "--batch", str(jsonl)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(f"llmkit check --batch failed ({proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == n and not any(r["error"] for r in records), records
    return {"wall_s": wall, "checks_per_s": n / wall,
            "first_check_ms": records[0]["timings"]["total_ms"],
            "warm_check_ms": median([r["timings"]["total_ms"] for r in records[1:]]),
            "evaluated_after_first": median([r["usage"]["prompt_tokens_evaluated"]
                                             for r in records[1:]]),
            "scores": [r["score"] for r in records]}


def run_per_process(args: argparse.Namespace, items: list[str]) -> Sample:
    """One `llmkit check --format json TEXT` process per text."""
    walls, checks, pps, tokens, scores = [], [], [], [], []
    t0 = time.perf_counter()
    for text in items:
        t = time.perf_counter()
        proc = subprocess.run([*check_args(args), "--format", "json", text],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t)
        if proc.returncode not in (0, 3):
            raise SystemExit(f"llmkit check failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        data = json.loads(proc.stdout)
        usage, timings = data["usage"], data["timings"]
        assert usage["prompt_tokens_evaluated"] == usage["prompt_tokens"], usage
        checks.append(timings["total_ms"])
        pps.append(usage["prompt_tokens_evaluated"] / (timings["score_ms"] / 1000))
        tokens.append(usage["prompt_tokens"])
        scores.append(data["score"])
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "checks_per_s": len(items) / wall,
            "process_s": median(walls), "check_ms": median(checks), "pp_tps": median(pps),
            "prompt_tokens": tokens, "scores": scores}


def run_llama_bench(binary: str, args: argparse.Namespace, n_prompt: int) -> Sample:
    proc = subprocess.run(
        [binary, "-m", args.model, "-t", str(args.threads), "-p", str(n_prompt), "-n", "0",
         "-r", str(args.reps), "-o", "json"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed:\n{proc.stderr[-3000:]}")
    test = json.loads(proc.stdout)[0]
    assert test["n_prompt"] == n_prompt and test["n_gen"] == 0, test
    return {"pp_tps": median(list(test["samples_ts"]))}


def measure(fn: Callable[[], Sample]) -> Sample:
    with ForeignLoad() as load:
        sample = fn()
    sample["foreign_cores"] = load.cores
    return sample


def ratios(num: list[Sample], den: list[Sample], key: str, den_key: str | None = None
           ) -> dict[str, Any]:
    values = [a[key] / b[den_key or key] for a, b in zip(num, den, strict=True)]
    return {"median": round(median(values), 3),
            "range": [round(min(values), 3), round(max(values), 3)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=20, help="texts to check (default 20)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3,
                        help="prompt-speed measurements per variant per round (median kept)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--budget", type=float, default=220,
                        help="seconds: no round starts that would likely overrun it "
                             "(at least one round always runs)")
    parser.add_argument("--llama-bench", default=None,
                        help="path to llama-bench (default: benchmarks/.build/…/llama-bench)")
    parser.add_argument("--no-llama-bench", action="store_true",
                        help="use the bindings loop as the warm baseline too")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--payload", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = str(Path(args.model or default_model()).resolve())
    if args.worker == "guard":
        print(json.dumps(worker_guard(args.model, args.threads, json.loads(args.payload),
                                      args.reps, args.threshold)))
        return
    if args.worker == "loop":
        print(json.dumps(worker_loop(args.model, args.threads, json.loads(args.payload),
                                     args.reps)))
        return

    started = time.perf_counter()
    items = texts(args.n)
    workdir = Path(tempfile.mkdtemp(prefix="bench-check-"))
    jsonl = workdir / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                             for i, t in enumerate(items)))

    # The guard prompt of the text of median length: its tokens feed the raw baselines.
    from llmkit.engines import load_engine
    from llmkit.tasks.policy import default_categories
    from llmkit.tasks.safety import Guard

    with load_engine(args.model, threads=1) as engine:
        guard = Guard(engine, default_categories(engine.chat_template, engine.model_name))
        lengths = sorted((len(guard.prompt_tokens([{"role": "user", "content": t}])), t)
                         for t in items)
        n_prompt, probe_text = lengths[len(lengths) // 2]
        probe_tokens = guard.prompt_tokens([{"role": "user", "content": probe_text}])
        through = "Llama 3 prompt" if guard.llama3 else "its own chat template"
    bench = built_tool("llama-bench", args.llama_bench, args.no_llama_bench)
    use_bench = bench is not None

    variants: dict[str, Callable[[], Sample]] = {
        "batch": lambda: run_batch(args, jsonl, len(items)),
        "per_process": lambda: run_per_process(args, items),
        "loop": lambda: {"reps": in_subprocess(args, "loop", probe_tokens)},
        "guard_warm": lambda: {"reps": in_subprocess(args, "guard", probe_text)},
    }
    if use_bench:
        assert bench is not None
        variants["llama_bench"] = lambda: run_llama_bench(bench, args, n_prompt)
    names = list(variants)
    print(f"model     {args.model} (standing in as the guard: SmolLM2 is not Llama Guard; "
          f"it reads the task through {through}, --threshold {args.threshold} decides)\n"
          f"threads   {args.threads}; {len(items)} texts; guard prompts "
          f"{lengths[0][0]}–{lengths[-1][0]} tokens (median {n_prompt})\n"
          f"rounds    {args.rounds}, variants interleaved; warm baseline "
          + (f"llama-bench ({bench})" if use_bench else
             "the bindings loop (no llama-bench: run benchmarks/build_llama_bench.sh)"),
          file=sys.stderr)

    samples: dict[str, list[Sample]] = {n: [] for n in names}
    for r, order in rotating_rounds(names, args.rounds, args.budget, started):
        for name in order:
            samples[name].append(measure(variants[name]))
        loads = [samples[n][-1]["foreign_cores"] for n in names]
        print(f"round {r + 1}/{args.rounds} done ({time.perf_counter() - started:.0f} s; "
              "foreign load per variant: "
              + (", ".join(f"{x:.2f}" for x in loads if x is not None) or "n/a") + " cores)",
              file=sys.stderr)

    # Prompt speeds per round: medians over each variant's reps.
    for s in samples["loop"]:
        s["cold_pp_tps"] = next(x["pp_tps"] for x in s["reps"] if x["cold"])
        s["pp_tps"] = median([x["pp_tps"] for x in s["reps"] if not x["cold"]])
    for s in samples["guard_warm"]:
        s["pp_tps"] = median([x["pp_tps"] for x in s["reps"]])
    warm_base = "llama_bench" if use_bench else "loop"

    batch, single = samples["batch"], samples["per_process"]
    speedup = ratios(batch, single, "checks_per_s")
    cold = ratios(single, samples["loop"], "pp_tps", "cold_pp_tps")
    warm = ratios(samples["guard_warm"], samples[warm_base], "pp_tps")
    loop_vs_bench = ratios(samples["loop"], samples["llama_bench"], "pp_tps") if use_bench \
        else None
    diffs = [abs(a - b) for s, p in zip(batch, single, strict=True)
             for a, b in zip(s["scores"], p["scores"], strict=True)]
    same_side = sum((a >= args.threshold) == (b >= args.threshold)
                    for s, p in zip(batch, single, strict=True)
                    for a, b in zip(s["scores"], p["scores"], strict=True))

    def m(rows: list[Sample], key: str) -> float:
        return median([x[key] for x in rows])

    print(f"\n1. throughput, {len(items)} texts")
    print(f"   one `check --batch` process   {m(batch, 'checks_per_s'):7.2f} checks/s "
          f"({m(batch, 'wall_s'):.1f} s)")
    print(f"   one process per text          {m(single, 'checks_per_s'):7.2f} checks/s "
          f"({m(single, 'wall_s'):.1f} s)")
    print(f"   batch / per-process           {speedup['median']:7.2f}× "
          f"[{speedup['range'][0]:.2f}–{speedup['range'][1]:.2f}]; after its first record the "
          f"batch evaluates {m(batch, 'evaluated_after_first'):.0f} prompt tokens per check "
          "(the policy prefix stays cached)")
    print(f"   batch and single checks agree on {same_side} of {len(diffs)} verdicts; "
          f"largest score difference {max(diffs):.2g}")
    print("2. latency of one check")
    print(f"   `llmkit check TEXT` process   {m(single, 'process_s') * 1000:7.0f} ms wall "
          "(start, load, check, exit)")
    print(f"   the check, cold in a process  {m(single, 'check_ms'):7.0f} ms (timings.total_ms:"
          " whole prompt + up to 20 answer tokens)")
    print(f"   the check, warm in a batch    {m(batch, 'warm_check_ms'):7.0f} ms "
          "(only the text's own tokens evaluated)")
    print(f"3. prompt evaluation, guard prompt of ~{n_prompt} tokens, {args.threads} threads")
    rows = [("llmkit check (CLI, cold)", m(single, "pp_tps")),
            ("bindings loop (cold)", m(samples["loop"], "cold_pp_tps")),
            ("llmkit Guard (warm)", m(samples["guard_warm"], "pp_tps")),
            ("bindings loop (warm)", m(samples["loop"], "pp_tps"))]
    if use_bench:
        rows.append((f"llama-bench -p {n_prompt} -n 0", m(samples["llama_bench"], "pp_tps")))
    for label, value in rows:
        print(f"   {label:<28}{value:8.1f} tokens/s")
    verdicts = {}
    for label, ratio in (("cold: CLI / bindings loop", cold),
                         ("warm: Guard / " + ("llama-bench" if use_bench else "bindings loop"),
                          warm)):
        verdict = "meets" if ratio["median"] >= TARGET else "MISSES"
        verdicts[label] = verdict
        print(f"   {label:<36}{ratio['median']:.3f}× [{ratio['range'][0]:.2f}–"
              f"{ratio['range'][1]:.2f}] ({verdict} the {TARGET} target)")
    if loop_vs_bench is not None:
        print(f"   (bindings loop / llama-bench, warm: {loop_vs_bench['median']:.3f}×: the "
              "noise between two raw measurements)")
    loads = [s["foreign_cores"] for rows_ in samples.values() for s in rows_
             if s["foreign_cores"] is not None]
    if loads and median(loads) > 0.25:
        print(f"warning: other processes kept {median(loads):.2f} cores busy (median) during "
              "the measurements; ratios are unreliable", file=sys.stderr)
    path = save("check", {
        "environment": environment(args.model), "guard_stand_in": True,
        "threads": args.threads, "threshold": args.threshold, "texts": items,
        "prompt_tokens_median": n_prompt, "rounds": len(batch), "rounds_asked": args.rounds,
        "reps": args.reps, "warm_baseline": warm_base,
        "llama_bench": bench if use_bench else None, "command": [sys.executable, *sys.argv],
        "elapsed_s": round(time.perf_counter() - started, 1), "target": TARGET,
        "ratios": {"batch_over_per_process_checks_per_s": speedup, "cold_pp": cold,
                   "warm_pp": warm, "loop_over_llama_bench_pp": loop_vs_bench},
        "verdicts": verdicts, "samples": samples,
    })
    print(f"elapsed {time.perf_counter() - started:.0f} s\nsaved {path}")


if __name__ == "__main__":
    main()
