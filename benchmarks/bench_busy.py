"""Generation beside busy processes: llmkit's thread choice against fixed counts and OpenMP waits.

llama.cpp's CPU threads meet at a barrier after every operation (OpenMP barriers in the wheel's
build), so one thread that another process preempts holds the others up until the scheduler
runs it again. This measures how much that costs and what avoids it, in scenarios:

- quiet: nothing else started (other processes on the machine are measured as noise);
- one-busy: one process spinning (`python -c 'while 1: pass'`);
- half-busy: one process busy half the time (20 ms spinning, 20 ms asleep);
- quarter-busy: one process busy a quarter of the time (10 ms spinning, 30 ms asleep); these
  two bracket llmkit's rule of counting a CPU as taken when others keep it busy over half
  the time;
- all-busy: one spinning process per CPU;
- llmkit-beside: a second llmkit process generating all the time with its default threads.

Variants, each in a fresh process (OpenMP reads its settings at start-up), interleaved in a
rotating order over --rounds rounds:

- auto: llmkit's default, load_engine(threads=None): the physical cores other processes leave idle,
  measured over the model load and every 0.25 s while it works (llmkit.hardware);
- auto-at-start: the same choice made once at load and never revisited;
- auto-passive: auto with OMP_WAIT_POLICY=passive (the combination);
- all-cores: --threads = physical cores (llmkit's default before, and llama.cpp's);
- one: --threads 1;
- passive: all cores with OMP_WAIT_POLICY=passive (waiting threads sleep at once);
- spin-10k: all cores with GOMP_SPINCOUNT=10000 (spin briefly, then sleep);
- llama-bench-all / llama-bench-one: llama.cpp's own llama-bench with the same thread counts,
  when benchmarks/build_llama_bench.sh has built it (the collapse is llama.cpp's, not ours).

Each sample decodes --gen-tokens tokens after a --prompt-tokens prompt, --reps times in its
process (median kept), and records how many CPUs the busy processes got and how busy the
rest of the machine was meanwhile (noise). Figures: decode tokens/s against the quiet
machine with all cores, and against the fair share: on C CPUs beside B busy processes a fair
scheduler gives this process C/(B+1) CPUs, so the fair-share speed is the quiet one-thread
speed times min(1, C/(B+1)) (all cores when the machine is quiet). JSON goes to
benchmarks/results/.

    .venv/bin/python benchmarks/bench_busy.py [--model M] [--rounds 3] [--scenarios quiet,one-busy]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, built_tool, counting_text, default_model, environment, median, save

SCENARIOS = ("quiet", "one-busy", "half-busy", "quarter-busy", "all-busy", "llmkit-beside")
VARIANTS = ("auto", "auto-at-start", "auto-passive", "all-cores", "one", "passive", "spin-10k",
            "llama-bench-all", "llama-bench-one")
QUIET_TARGET = 0.97
FAIR_TARGET = 0.9  # "about its fair share": within 10 %
SPIN = "while True: pass"
DUTY = ("import time\nwhile True:\n    end = time.monotonic() + {on}\n"
        "    while time.monotonic() < end: pass\n    time.sleep({off})")
Sample = dict[str, Any]


# -- the measured process -------------------------------------------------------------------


def worker(args: argparse.Namespace) -> Sample:
    """One variant in this (fresh) process: load, warm up, then --reps timed generations."""
    from llmkit import hardware
    from llmkit.engines import SamplingParams, load_engine
    from llmkit.hardware import physical_cores

    variant = args.worker
    if variant == "auto-at-start":
        # Keep the choice made over the load: the first check passes any window, later ones
        # never come due.
        update = hardware.ThreadGovernor.update

        def once(self: hardware.ThreadGovernor, *, min_window: float = 0.0) -> bool:
            if getattr(self, "_checked", False):
                return False
            self._checked = True  # type: ignore[attr-defined]
            return update(self, min_window=min_window)

        hardware.ThreadGovernor.update = once  # type: ignore[method-assign]
    threads = {"one": 1}.get(variant, physical_cores())
    engine = load_engine(args.model, n_ctx=1024, n_batch=512, device="cpu",
                    threads=None if variant.startswith("auto") else threads)
    tokens = engine.tokenize(counting_text(400))[:args.prompt_tokens]
    other = next(t for t in range(1, 100) if t != tokens[0])
    engine.generate(tokens, SamplingParams(temperature=0, max_tokens=4))  # warm-up
    runs = []
    for _ in range(args.reps):
        engine.generate([other], SamplingParams(temperature=0, max_tokens=1))  # no reuse
        g = engine.generate(tokens, SamplingParams(temperature=0, max_tokens=args.gen_tokens))
        assert g.completion_tokens == args.gen_tokens, g.completion_tokens
        runs.append({"pp_tps": g.prompt_tokens_per_s, "tg_tps": g.tokens_per_s,
                     "threads": engine.threads})
    result = {"pp_tps": median([r["pp_tps"] for r in runs]),
              "tg_tps": median([r["tg_tps"] for r in runs]),
              "threads": [r["threads"] for r in runs], "reason": engine.threads_reason}
    engine.close()
    return result


def competitor(model: str) -> None:
    """A second llmkit process that generates all the time with its default threads."""
    from llmkit.engines import SamplingParams, load_engine

    engine = load_engine(model, n_ctx=1024, device="cpu")
    tokens = engine.tokenize(counting_text(200))[:64]
    while True:
        engine.forget()
        engine.generate(tokens, SamplingParams(temperature=0, max_tokens=64))


# -- busy neighbours -----------------------------------------------------------------------------


def start_busy(scenario: str, model: str) -> list[subprocess.Popen[bytes]]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    commands = {
        "quiet": [],
        "one-busy": [[sys.executable, "-c", SPIN]],
        "half-busy": [[sys.executable, "-c", DUTY.format(on=0.02, off=0.02)]],
        "quarter-busy": [[sys.executable, "-c", DUTY.format(on=0.01, off=0.03)]],
        "all-busy": [[sys.executable, "-c", SPIN]] * cpus,
        "llmkit-beside": [[sys.executable, __file__, "--competitor", "--model", model]],
    }[scenario]
    procs = [subprocess.Popen(c, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for c in commands]
    time.sleep(1.5 if scenario == "llmkit-beside" else 0.3)  # loaded and running
    return procs


def stop_busy(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait()


def cpu_seconds(procs: list[subprocess.Popen[bytes]]) -> float:
    """CPU time the busy processes have used so far (Linux /proc)."""
    total = 0.0
    for p in procs:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_variant(variant: str, args: argparse.Namespace, procs: list[subprocess.Popen[bytes]],
                bench: str | None) -> Sample:
    """One sample: the variant in a fresh process beside ``procs``."""
    from llmkit.hardware import physical_cores

    env = dict(os.environ)
    env.pop("LLMKIT_THREADS", None)
    if variant in ("passive", "auto-passive"):
        env["OMP_WAIT_POLICY"] = "passive"
    elif variant == "spin-10k":
        env["GOMP_SPINCOUNT"] = "10000"
    if variant.startswith("llama-bench"):
        assert bench is not None
        threads = 1 if variant.endswith("one") else physical_cores()
        command = [bench, "-m", args.model, "-t", str(threads), "-p", str(args.prompt_tokens),
                   "-n", str(args.gen_tokens), "-r", str(args.reps), "-o", "json"]
    else:
        command = [sys.executable, __file__, "--worker", variant, "--model", args.model,
                   "--reps", str(args.reps), "--gen-tokens", str(args.gen_tokens),
                   "--prompt-tokens", str(args.prompt_tokens)]
    busy0, t0 = cpu_seconds(procs), time.perf_counter()
    with ForeignLoad() as load:
        try:
            proc = subprocess.run(command, capture_output=True, text=True, env=env,
                                  stdin=subprocess.DEVNULL, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc = None
    wall = time.perf_counter() - t0
    busy_cores = (cpu_seconds(procs) - busy0) / wall
    sample: Sample = {"wall_s": round(wall, 2), "busy_cores": round(busy_cores, 3),
                      "noise_cores": None if load.cores is None else
                      round(max(0.0, load.cores - busy_cores), 3)}
    if proc is None:
        # A lower bound: not even the whole budget was enough.
        tokens = args.reps * args.gen_tokens
        return {**sample, "timed_out": True, "tg_tps": tokens / args.timeout, "pp_tps": None}
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    if variant.startswith("llama-bench"):
        rows = json.loads(proc.stdout)
        pp = next(r for r in rows if r["n_prompt"] > 0 and r["n_gen"] == 0)
        tg = next(r for r in rows if r["n_gen"] > 0 and r["n_prompt"] == 0)
        return {**sample, "pp_tps": pp["avg_ts"], "tg_tps": tg["avg_ts"],
                "threads": [pp["n_threads"]]}
    return {**sample, **json.loads(proc.stdout.strip().splitlines()[-1])}


def summarize(samples: dict[str, dict[str, list[Sample]]], cpus: int) -> dict[str, Any]:
    """Medians per scenario and variant, against the quiet machine and the fair share."""
    def med(scenario: str, variant: str, key: str = "tg_tps") -> float | None:
        values = [s[key] for s in samples.get(scenario, {}).get(variant, [])
                  if s.get(key) is not None]
        return median(values) if values else None

    quiet_all, quiet_one = med("quiet", "all-cores"), med("quiet", "one")
    busy_count = {"quiet": 0, "one-busy": 1, "half-busy": 0.5, "quarter-busy": 0.25,
                  "all-busy": cpus, "llmkit-beside": 1}
    table: dict[str, Any] = {}
    for scenario, variants in samples.items():
        share = cpus / (busy_count[scenario] + 1)
        fair = quiet_all if share >= cpus or quiet_one is None else quiet_one * min(1.0, share)
        rows = {}
        for variant, runs in variants.items():
            tg = med(scenario, variant)
            rows[variant] = {
                "tg_tps": None if tg is None else round(tg, 1),
                "pp_tps": None if med(scenario, variant, "pp_tps") is None else round(
                    med(scenario, variant, "pp_tps") or 0.0, 1),
                "threads": sorted({t for r in runs for t in r.get("threads", [])}),
                "x_quiet_all_cores": None if tg is None or not quiet_all else round(
                    tg / quiet_all, 3),
                "x_fair_share": None if tg is None or not fair else round(tg / fair, 3),
                "busy_cores": median([r["busy_cores"] for r in runs]),
                "noise_cores": median([r["noise_cores"] for r in runs
                                       if r["noise_cores"] is not None]),
                "timed_out": sum(1 for r in runs if r.get("timed_out")),
                "reason": runs[-1].get("reason"),
            }
        table[scenario] = {"fair_share_tg_tps": None if fair is None else round(fair, 1),
                           "variants": rows}
    return table


def print_table(table: dict[str, Any]) -> None:
    for scenario, block in table.items():
        print(f"\n{scenario} (fair share {block['fair_share_tg_tps']} tok/s)")
        print(f"  {'variant':<16} {'threads':>8} {'decode t/s':>11} {'× quiet':>8} "
              f"{'× fair':>7} {'prompt t/s':>11} {'busy':>5} {'noise':>6}")
        for variant, row in block["variants"].items():
            def f(v: Any, spec: str) -> str:
                return "-" if v is None else format(v, spec)
            print(f"  {variant:<16} {','.join(map(str, row['threads'])):>8} "
                  f"{f(row['tg_tps'], '.1f'):>11} {f(row['x_quiet_all_cores'], '.3f'):>8} "
                  f"{f(row['x_fair_share'], '.3f'):>7} {f(row['pp_tps'], '.1f'):>11} "
                  f"{f(row['busy_cores'], '.2f'):>5} {f(row['noise_cores'], '.2f'):>6}"
                  + (f"  ({row['timed_out']} timed out)" if row["timed_out"] else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2, help="generations per sample (median)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--timeout", type=float, default=90,
                        help="seconds one sample may take; a slower one counts as that slow")
    parser.add_argument("--llama-bench", default=None, help="llama-bench binary to use")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--competitor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = str(args.model or default_model())
    if args.competitor:
        competitor(args.model)
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return
    scenarios = [s for s in args.scenarios.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(scenarios) - set(SCENARIOS)) + sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown scenario or variant: {', '.join(unknown)}")
    bench = built_tool("llama-bench", args.llama_bench)
    if bench is None:
        variants = [v for v in variants if not v.startswith("llama-bench")]
        print("note: no llama-bench built (benchmarks/build_llama_bench.sh); raw llama.cpp "
              "variants skipped", file=sys.stderr)
    from llmkit.hardware import allowed_cpus, physical_cores

    cpus = len(allowed_cpus())
    print(f"{physical_cores()} physical cores, {cpus} CPUs; model {Path(args.model).name}; "
          f"{args.prompt_tokens}-token prompt, {args.gen_tokens} tokens × {args.reps} reps, "
          f"{args.rounds} rounds", file=sys.stderr)
    samples: dict[str, dict[str, list[Sample]]] = {s: {v: [] for v in variants}
                                                   for s in scenarios}
    for round_no in range(args.rounds):
        for scenario in scenarios:
            procs = start_busy(scenario, args.model)
            try:
                shift = round_no % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    sample = run_variant(variant, args, procs, bench)
                    samples[scenario][variant].append(sample)
                    print(f"round {round_no + 1} {scenario:<13} {variant:<16} "
                          f"{sample['tg_tps']:7.1f} t/s  threads {sample.get('threads')}  "
                          f"noise {sample['noise_cores']}", file=sys.stderr)
            finally:
                stop_busy(procs)
    table = summarize(samples, cpus)
    print_table(table)
    noisy = [f"{s}/{v}" for s, b in table.items() for v, r in b["variants"].items()
             if (r["noise_cores"] or 0) > 0.25]
    if noisy:
        print(f"\nwarning: other processes used more than 0.25 CPUs during {', '.join(noisy)}; "
              "rerun on a quiet machine for figures to quote", file=sys.stderr)
    quiet = table.get("quiet", {}).get("variants", {})
    verdict = {
        "quiet_cost_ok": None if "auto" not in quiet or quiet["auto"]["x_quiet_all_cores"] is None
        else quiet["auto"]["x_quiet_all_cores"] >= QUIET_TARGET,
        "fair_share_ok": {s: b["variants"]["auto"]["x_fair_share"] >= FAIR_TARGET
                          for s, b in table.items() if s != "quiet" and "auto" in b["variants"]
                          and b["variants"]["auto"]["x_fair_share"] is not None},
    }
    print(f"\nauto on a quiet machine ≥ {QUIET_TARGET}× all cores: {verdict['quiet_cost_ok']}; "
          f"auto busy ≥ {FAIR_TARGET}× fair share: {verdict['fair_share_ok']}")
    path = save("busy", {"environment": environment(args.model), "args": vars(args),
                         "cpus": cpus, "physical_cores": physical_cores(), "table": table,
                         "verdict": verdict, "samples": samples})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
