"""Start-up: `llmkit --help` and `llmkit list` wall time, and time to first token of `llmkit run`.

- `llmkit --help`, `llmkit list` (json, as when piped) and `llmkit list --format table`: wall
  time of the real console script in a subprocess, median of --runs (10); target ≤ 0.25 s.
  Each is also run once under `python -X importtime` to check that it never imports llama_cpp
  (nor the other heavy modules the architecture keeps lazy).
- Time to first token: from process start to the first byte on stdout (read from the pipe),
  for `llmkit run` against a fresh `python -c` process using the raw bindings the same way
  (import llama_cpp, load the model, tokenize the same rendered chat prompt, decode it, sample
  one token greedily, print it). Same model, threads and context size; median of --ttft-runs
  (5), the two alternating. The first bytes of both must agree (same prompt, greedy).

Every sample records the CPU other processes used meanwhile and is measured once more when it
exceeded --noise-limit cores. JSON goes to benchmarks/results/.

    .venv/bin/python benchmarks/bench_startup.py [--model M] [--threads 2] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ForeignLoad, default_model, environment, median, save

SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"
N_CTX = 4096
HEAVY = ("llama_cpp", "numpy", "gguf", "PIL", "huggingface_hub", "jinja2")
TARGET_S = 0.25

RAW_FIRST_TOKEN = r"""
import ctypes, sys
import llama_cpp as lc
silence = lc.llama_log_callback(lambda *a: None)
lc.llama_log_set(silence, ctypes.c_void_p(0))
lc.llama_backend_init()
model = lc.llama_model_load_from_file(sys.argv[1].encode(), lc.llama_model_default_params())
vocab = lc.llama_model_get_vocab(model)
cp = lc.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch = int(sys.argv[3]), 512, 512
cp.n_threads = cp.n_threads_batch = int(sys.argv[2])
ctx = lc.llama_init_from_model(model, cp)
text = sys.argv[4].encode()
buf = (lc.llama_token * (len(text) + 8))()
n = lc.llama_tokenize(vocab, text, len(text), buf, len(buf), False, True)
assert lc.llama_decode(ctx, lc.llama_batch_get_one(buf, n)) == 0
smpl = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
lc.llama_sampler_chain_add(smpl, lc.llama_sampler_init_greedy())
tok = lc.llama_sampler_sample(smpl, ctx, -1)
piece = ctypes.create_string_buffer(256)
k = lc.llama_token_to_piece(vocab, tok, piece, 256, 0, False)
sys.stdout.buffer.write(piece.raw[:k]); sys.stdout.flush()
print(n, file=sys.stderr)
"""


def llmkit_command() -> list[str]:
    script = Path(sys.executable).parent / "llmkit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "llmkit"]


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def first_bytes(cmd: list[str]) -> tuple[float, bytes]:
    """Seconds from launch to the first byte on stdout, and the first few bytes."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    proc.kill()
    proc.wait()
    if not first:
        raise SystemExit(f"no output from {' '.join(cmd[:3])} …")
    return elapsed, first


def heavy_imports(args: list[str]) -> tuple[list[str], float]:
    """Heavy modules a CLI invocation imports, and llmkit.cli.app's cumulative import ms."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmkit", *args],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"llmkit {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    found, app_ms = set(), 0.0
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split("|"))
        top = name.split(".")[0]
        if top in HEAVY:
            found.add(top)
        if name == "llmkit.cli.app" and cumulative.isdigit():
            app_ms = int(cumulative) / 1000
    return sorted(found), app_ms


def sampled(fn: Callable[[], Any], noise_limit: float) -> tuple[Any, float | None]:
    """Run ``fn``; once more if other processes were busy; keep the quieter result."""
    with ForeignLoad() as load:
        value = fn()
    if load.cores is not None and load.cores > noise_limit:
        with ForeignLoad() as again:
            second = fn()
        if again.cores is not None and again.cores < load.cores:
            return second, again.cores
    return value, load.cores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10, help="runs of --help and list")
    parser.add_argument("--ttft-runs", type=int, default=5, help="runs of each first-token test")
    parser.add_argument("--noise-limit", type=float, default=0.25)
    args = parser.parse_args()
    model = str(Path(args.model or default_model()).resolve())
    started = time.perf_counter()
    # An empty store and no network, so `list` times the same work everywhere.
    home = tempfile.mkdtemp(prefix="llmkit-bench-home-")
    os.environ.update(LLMKIT_HOME=home, HF_HUB_OFFLINE="1")

    from llmkit.engines import load_engine

    with load_engine(model, n_ctx=N_CTX, threads=1) as engine:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
        rendered = engine.render_chat(messages)
        n_prompt = len(engine.chat_tokens(messages))

    llmkit = llmkit_command()
    walls: dict[str, list[str]] = {
        "python_floor": [sys.executable, "-c", "pass"],
        "help": [*llmkit, "--help"],
        "list": [*llmkit, "list"],
        "list_table": [*llmkit, "list", "--format", "table"],
    }
    ttfts: dict[str, list[str]] = {
        "llmkit_run": [*llmkit, "run", "-q", "-m", model, "-t", str(args.threads),
                       "--ctx", str(N_CTX), "--temperature", "0", "--system", SYSTEM,
                       QUESTION],
        "raw_bindings": [sys.executable, "-c", RAW_FIRST_TOKEN, model, str(args.threads),
                         str(N_CTX), rendered],
    }
    times: dict[str, list[float]] = {k: [] for k in [*walls, *ttfts]}
    loads: list[float] = []
    firsts: dict[str, set[bytes]] = {k: set() for k in ttfts}
    for i in range(max(args.runs, args.ttft_runs)):
        if i < args.runs:
            for name, cmd in walls.items():
                value, load = sampled(lambda c=cmd: wall(c), args.noise_limit)
                times[name].append(value)
                loads.append(load or 0.0)
        if i < args.ttft_runs:
            order = list(ttfts) if i % 2 == 0 else list(ttfts)[::-1]
            for name in order:
                (value, first), load = sampled(lambda c=ttfts[name]: first_bytes(c),
                                               args.noise_limit)
                times[name].append(value)
                firsts[name].add(first)
                loads.append(load or 0.0)
    raw_n = subprocess.run(ttfts["raw_bindings"], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, check=True).stderr.split()[-1]
    assert int(raw_n) == n_prompt, f"raw prompt {raw_n} tokens, llmkit {n_prompt}"
    same_first = firsts["llmkit_run"] == firsts["raw_bindings"]

    help_heavy, help_app_ms = heavy_imports(["--help"])
    list_heavy, list_app_ms = heavy_imports(["list"])
    run_heavy, run_app_ms = heavy_imports(["run", "-q", "-m", model, "-t", str(args.threads),
                                           "--temperature", "0", "--max-tokens", "1", QUESTION])
    timing = json.loads(subprocess.run(
        [*llmkit, "run", "-q", "-m", model, "-t", str(args.threads), "--ctx", str(N_CTX),
         "--temperature", "0", "--system", SYSTEM, "--max-tokens", "1", "--format", "json",
         QUESTION], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=True
    ).stdout)["timings"]

    med = {k: round(median(v), 3) for k, v in times.items()}
    pairs = [a / b for a, b in zip(times["llmkit_run"], times["raw_bindings"], strict=True)]
    result: dict[str, Any] = {
        "environment": environment(model), "threads": args.threads, "runs": args.runs,
        "ttft_runs": args.ttft_runs, "llmkit_home": home, "prompt_tokens": n_prompt,
        "command": [sys.executable, *sys.argv],
        "median_s": med, "samples_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "target_s": TARGET_S,
        "heavy_imports": {"help": help_heavy, "list": list_heavy, "run": run_heavy},
        "llmkit_cli_app_import_ms": {"help": help_app_ms, "list": list_app_ms,
                                     "run": run_app_ms},
        "help_imports_llama_cpp": "llama_cpp" in help_heavy,
        "list_imports_llama_cpp": "llama_cpp" in list_heavy,
        "ttft_ratio_llmkit_over_raw": round(med["llmkit_run"] / med["raw_bindings"], 3),
        "ttft_ratio_median_of_pairs": round(median(pairs), 3),
        "first_bytes_agree": same_first,
        "llmkit_run_internal_ms": {k: timing.get(k) for k in ("load_ms", "prompt_ms",
                                                              "first_token_ms")},
        "foreign_load_cores_median": round(median(loads), 3),
        "elapsed_s": round(time.perf_counter() - started, 1),
    }

    def verdict(s: float) -> str:
        return "ok" if s <= TARGET_S else "OVER"

    print(f"python -c pass          {med['python_floor']:.3f} s (interpreter floor)")
    for key, label in (("help", "llmkit --help"), ("list", "llmkit list"),
                       ("list_table", "llmkit list -f table")):
        print(f"{label:<24}{med[key]:.3f} s (target ≤ {TARGET_S} s: {verdict(med[key])})")
    print(f"heavy imports           --help: {help_heavy or 'none'}; list: "
          f"{list_heavy or 'none'}; run: {run_heavy}")
    print(f"llmkit.cli.app import   {help_app_ms:.0f} ms (--help), {list_app_ms:.0f} ms (list)")
    print(f"first token, llmkit run {med['llmkit_run']:.3f} s  (inside: load "
          f"{timing['load_ms']:.0f} ms, prompt {timing['prompt_ms']:.0f} ms)")
    print(f"first token, raw        {med['raw_bindings']:.3f} s  ({n_prompt}-token prompt)")
    print(f"ratio llmkit/raw        {result['ttft_ratio_llmkit_over_raw']:.3f} (median of pairs "
          f"{result['ttft_ratio_median_of_pairs']:.3f}); "
          f"difference {1000 * (med['llmkit_run'] - med['raw_bindings']):.0f} ms")
    if not same_first:
        print(f"warning: first bytes differ: {firsts}", file=sys.stderr)
    if result["foreign_load_cores_median"] > args.noise_limit:
        print(f"warning: other processes kept {result['foreign_load_cores_median']:.2f} cores "
              "busy (median); timings are unreliable", file=sys.stderr)
    shutil.rmtree(home, ignore_errors=True)
    print(f"elapsed {result['elapsed_s']:.0f} s\nsaved {save('startup', result)}")


if __name__ == "__main__":
    main()
