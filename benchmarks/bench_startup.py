"""Start-up: `llmkit --help` and `llmkit list` wall time, and time to first token of `llmkit run`.

Time to first token is measured from process start to the first byte on stdout, against a
fresh process that does the same with the raw bindings (import, load, evaluate the chat
prompt, sample one token, print it). Medians of several runs; JSON saved.

    .venv/bin/python benchmarks/bench_startup.py [--model M] [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_model, median, save

QUESTION = "What is the capital of France?"
LLMKIT = [str(Path(sys.executable).parent / "llmkit")]

RAW_FIRST_TOKEN = r"""
import ctypes, sys
import llama_cpp as lc
silence = lc.llama_log_callback(lambda *a: None)
lc.llama_log_set(silence, ctypes.c_void_p(0))
lc.llama_backend_init()
model = lc.llama_model_load_from_file(sys.argv[1].encode(), lc.llama_model_default_params())
vocab = lc.llama_model_get_vocab(model)
cp = lc.llama_context_default_params()
cp.n_ctx = 4096
cp.n_threads = cp.n_threads_batch = int(sys.argv[2])
ctx = lc.llama_init_from_model(model, cp)
text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + sys.argv[3] + "<|im_end|>\n<|im_start|>assistant\n").encode()
buf = (lc.llama_token * 512)()
n = lc.llama_tokenize(vocab, text, len(text), buf, 512, False, True)
lc.llama_decode(ctx, lc.llama_batch_get_one(buf, n))
smpl = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
lc.llama_sampler_chain_add(smpl, lc.llama_sampler_init_greedy())
tok = lc.llama_sampler_sample(smpl, ctx, -1)
piece = ctypes.create_string_buffer(64)
k = lc.llama_token_to_piece(vocab, tok, piece, 64, 0, False)
sys.stdout.buffer.write(piece.raw[:k]); sys.stdout.flush()
"""


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def first_byte(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    proc.kill()
    proc.wait()
    return elapsed


def imports_llama(args: list[str]) -> bool:
    code = (f"import sys; from llmkit.cli.app import run_cli; run_cli({args!r}); "
            "print('LOADED' if 'llama_cpp' in sys.modules else 'CLEAN', file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return "LOADED" in proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    model = str(args.model or default_model())
    env_home = os.environ.setdefault("LLMKIT_HOME", str(Path("/tmp/llmkit-bench-home")))
    help_t, list_t, ttft_llmkit, ttft_raw = [], [], [], []
    run_cmd = [*LLMKIT, "run", "-q", "-m", model, "-t", str(args.threads), "--temperature", "0",
               "--system", "You are a helpful assistant.", QUESTION]
    raw_cmd = [sys.executable, "-c", RAW_FIRST_TOKEN, model, str(args.threads), QUESTION]
    for i in range(args.runs):
        help_t.append(wall([*LLMKIT, "--help"]))
        list_t.append(wall([*LLMKIT, "list", "--format", "json"]))
        pair = [(ttft_llmkit, run_cmd), (ttft_raw, raw_cmd)]
        for bucket, cmd in (pair if i % 2 == 0 else pair[::-1]):
            bucket.append(first_byte(cmd))
    result = {
        "model": model, "threads": args.threads, "runs": args.runs, "llmkit_home": env_home,
        "help_s": round(median(help_t), 3), "list_s": round(median(list_t), 3),
        "help_imports_llama_cpp": imports_llama(["--help"]),
        "list_imports_llama_cpp": imports_llama(["list", "--format", "json"]),
        "ttft_llmkit_run_s": round(median(ttft_llmkit), 3),
        "ttft_raw_bindings_s": round(median(ttft_raw), 3),
    }
    result["ttft_ratio"] = round(result["ttft_llmkit_run_s"] / result["ttft_raw_bindings_s"], 3)
    print(f"llmkit --help           {result['help_s']:.3f} s (target ≤ 0.25 s)")
    print(f"llmkit list             {result['list_s']:.3f} s (target ≤ 0.25 s)")
    print(f"imports llama_cpp       --help: {result['help_imports_llama_cpp']}, "
          f"list: {result['list_imports_llama_cpp']}")
    print(f"first token, llmkit run {result['ttft_llmkit_run_s']:.3f} s")
    print(f"first token, raw        {result['ttft_raw_bindings_s']:.3f} s")
    print(f"ratio llmkit/raw        {result['ttft_ratio']:.3f}")
    print(f"saved {save('startup', result)}")


if __name__ == "__main__":
    main()
