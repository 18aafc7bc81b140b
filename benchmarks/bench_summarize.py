"""`llmkit summarize` on long documents: throughput and memory against length, and prefix reuse.

1. Scaling: `llmkit summarize --format json` on documents of 2× and 8× the context (the
   SmolLM2 model, --ctx 1024 by default), each in a fresh process: wall time, input tokens per
   second, model calls, and peak RSS. Time should grow about linearly with length (the same
   work per chunk) and memory should stay flat (one context, chunk summaries only).
   For scale, llama-bench's prompt speed on the same model and threads is printed beside it
   (summarizing also generates every partial summary, so it is necessarily slower).
2. Prefix reuse: the instruction that starts every chunk prompt is evaluated once and kept in
   the KV cache. The same document is summarized in-process twice, alternating, with reuse on
   and with the cache emptied before every call; per chunk call: prompt tokens evaluated and
   prompt milliseconds.

    .venv/bin/python benchmarks/bench_summarize.py [--ctx 1024] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import PEAK_RSS, built_tool, default_model, environment, median, save  # noqa: E402


def make_document(path: Path, target_tokens: int, count: Any) -> int:
    """Write prose of about ``target_tokens`` tokens; returns the exact count."""
    from tests.test_e2e_summarize import long_text

    paragraphs = 4
    while True:
        text = long_text(paragraphs)
        n = count(text)
        if n >= target_tokens:
            path.write_text(text)
            return int(n)
        paragraphs = max(paragraphs + 1, int(paragraphs * target_tokens / max(1, n)) + 1)


def run_cli(doc: Path, model: Path, ctx: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "llmkit", "summarize", str(doc), "-m", str(model),
           "--ctx", str(ctx), "-t", str(threads), "--length", "short", "--format", "json",
           "--temperature", "0", "-q"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"summarize failed:\n{proc.stderr[-2000:]}")
    rss_kib = int(proc.stderr.strip().splitlines()[-1])
    (record,) = json.loads(proc.stdout)
    return {"wall_s": wall, "rss_mib": rss_kib >> 10, "record": record}


def llama_bench_pp(model: Path, threads: int, n: int) -> float | None:
    bench = built_tool("llama-bench")
    if bench is None:
        return None
    proc = subprocess.run([bench, "-m", str(model), "-t", str(threads), "-p", str(n),
                           "-n", "0", "-r", "3", "-o", "json"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return float(json.loads(proc.stdout)[0]["avg_ts"])


def prefix_reuse(doc: Path, model: Path, ctx: int, threads: int, rounds: int
                 ) -> dict[str, Any]:
    """Per chunk call, with the KV cache kept and with it emptied first."""
    from llmkit.engines import SamplingParams, load_engine
    from llmkit.tasks.summarize import Summarizer, SummaryOptions

    text = doc.read_text()
    results: dict[str, list[dict[str, float]]] = {"reuse": [], "no_reuse": []}
    with load_engine(model, n_ctx=ctx, threads=threads) as engine:
        original = engine.generate

        for r in range(rounds):
            for mode in (["reuse", "no_reuse"] if r % 2 == 0 else ["no_reuse", "reuse"]):
                calls: list[dict[str, float]] = []

                def timed_generate(prompt: Any, params: Any, on_text: Any = None,
                                   _calls: list[dict[str, float]] = calls) -> Any:
                    g = original(prompt, params, on_text)
                    _calls.append({"prompt_tokens": g.prompt_tokens,
                                   "evaluated": g.prompt_tokens_evaluated,
                                   "prompt_ms": g.prompt_ms})
                    return g

                engine.generate = timed_generate  # type: ignore[method-assign]
                options = SummaryOptions(length="short", reuse_prefix=mode == "reuse",
                                         params=SamplingParams(temperature=0.0))
                summary = Summarizer(engine, options).summarize(text)
                results[mode].extend(calls[: summary.chunks][1:])  # chunk calls after the 1st
        engine.generate = original  # type: ignore[method-assign]
    out: dict[str, Any] = {}
    for mode, calls in results.items():
        out[mode] = {
            "chunk_calls": len(calls),
            "prompt_tokens_median": median([c["prompt_tokens"] for c in calls]),
            "evaluated_median": median([c["evaluated"] for c in calls]),
            "prompt_ms_median": round(median([c["prompt_ms"] for c in calls]), 1),
        }
    # The same chunk's prompt, with and without the prefix kept: paired by position.
    pairs = [a["prompt_ms"] / b["prompt_ms"] for a, b in
             zip(results["reuse"], results["no_reuse"], strict=False) if b["prompt_ms"] > 0]
    out["paired_time_ratio_median"] = round(median(pairs), 4) if pairs else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=default_model())
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reuse-rounds", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=HERE / ".build" / "summarize")
    args = parser.parse_args()
    from llmkit.engines import load_engine

    args.workdir.mkdir(parents=True, exist_ok=True)
    with load_engine(args.model, n_ctx=args.ctx, threads=1) as engine:
        def count(text: str) -> int:
            return len(engine.tokenize(text, add_special=False))

        docs = {}
        for factor in (2, 8):
            path = args.workdir / f"doc-{factor}x.md"
            docs[factor] = (path, make_document(path, factor * args.ctx, count))
    print(f"model {args.model.name}, --ctx {args.ctx}, {args.threads} threads; documents of "
          + ", ".join(f"{f}× = {n} tokens" for f, (_, n) in docs.items()), flush=True)

    scaling: dict[int, list[dict[str, Any]]] = {2: [], 8: []}
    for r in range(args.rounds):
        for factor in ((2, 8) if r % 2 == 0 else (8, 2)):
            scaling[factor].append(run_cli(docs[factor][0], args.model, args.ctx, args.threads))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{f}×: {scaling[f][-1]['wall_s']:.1f} s" for f in (2, 8)), flush=True)
    rows = {}
    for factor, runs in scaling.items():
        record = runs[-1]["record"]
        n = record["usage"]["input_tokens"]
        wall = median([x["wall_s"] for x in runs])
        rows[factor] = {
            "input_tokens": n, "wall_s": round(wall, 2),
            "input_tokens_per_s": round(n / wall, 1),
            "peak_rss_mib": median([x["rss_mib"] for x in runs]),
            "chunks": record["chunks"], "merges": record["merges"], "calls": record["calls"],
            "levels": record["levels"],
        }
    pp = llama_bench_pp(args.model, args.threads, min(512, args.ctx))
    reuse = prefix_reuse(docs[2][0], args.model, args.ctx, args.threads, args.reuse_rounds)

    print()
    print("length  tokens  wall s  in-tok/s  chunks merges calls  peak RSS")
    for factor, row in rows.items():
        print(f"{factor:>4}×  {row['input_tokens']:>6}  {row['wall_s']:>6.1f}  "
              f"{row['input_tokens_per_s']:>8.1f}  {row['chunks']:>6} {row['merges']:>6} "
              f"{row['calls']:>5}  {row['peak_rss_mib']} MiB")
    time_ratio = rows[8]["wall_s"] / rows[2]["wall_s"]
    token_ratio = rows[8]["input_tokens"] / rows[2]["input_tokens"]
    print(f"8× vs 2×: {token_ratio:.2f}× the tokens took {time_ratio:.2f}× the time "
          f"(linear would be {token_ratio:.2f}×); peak RSS {rows[2]['peak_rss_mib']} → "
          f"{rows[8]['peak_rss_mib']} MiB")
    if pp:
        print(f"llama-bench prompt speed on this model: {pp:.0f} tokens/s (summarizing reads "
              f"{rows[8]['input_tokens_per_s'] / pp:.2f}× as fast, since it also writes every "
              "partial summary)")
    r, n = reuse["reuse"], reuse["no_reuse"]
    saved = 100 * (1 - (reuse["paired_time_ratio_median"] or 1.0))
    print(f"chunk calls with the shared prefix kept: {r['evaluated_median']:.0f} of "
          f"{r['prompt_tokens_median']:.0f} prompt tokens evaluated, {r['prompt_ms_median']} ms;"
          f" with the cache emptied: {n['evaluated_median']:.0f} tokens, "
          f"{n['prompt_ms_median']} ms → {saved:.1f}% less prompt time per chunk (median of "
          "paired calls)")
    path = save("summarize", {"environment": environment(str(args.model)),
                              "args": {"ctx": args.ctx, "threads": args.threads,
                                       "rounds": args.rounds},
                              "scaling": rows, "time_ratio_8x_over_2x": round(time_ratio, 3),
                              "token_ratio_8x_over_2x": round(token_ratio, 3),
                              "llama_bench_prompt_tokens_per_s": pp, "prefix_reuse": reuse})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
