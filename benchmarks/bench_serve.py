"""`llmkit serve` against llama.cpp's llama-server: aggregate tokens/s and time to first token.

Both servers run the same GGUF (--model, default SmolLM2-135M-Instruct Q4_1) with the same
threads (--threads), sequences (--parallel, 8) and context per sequence (--ctx, 1024):

- llmkit: `llmkit serve -m GGUF -P N --ctx C -t T`
- llama-server (built by `CMAKE_ARGS=-DLLAMA_BUILD_SERVER=ON build_llama_bench.sh llama-server`
  from the same llama.cpp source as the bindings): `-np N -c N·C -no-kvu -b 512 -ub 512 -t T
  -tb T`, a KV stream of its own per slot as llmkit's sequences have.

One client script drives both (threads, each a plain HTTP client): at each level of
concurrency (--clients, 1,4,8) that many clients send --requests requests between them, each
client one after another, every request a streamed chat completion of a different prompt,
greedy, --max-tokens (128), with usage in the last chunk. Per level and server:

    tokens/s = completion tokens of every request / wall time from the first send to the last
               answer's end (the clients' aggregate throughput);
    TTFT     = time from sending a request to its first content chunk (p50, p95 over the
               requests of the level).

Both servers stay up for the whole run (an idle one takes no CPU); each round measures them in
turn, the order rotated per round, after a warm-up of each: one request, then one untimed
level at the most clients (so every slot of both has served a request before the first timed
one: without it llama-server's first timed level was up to 2.8x slower at p95). Ratios llmkit ÷
llama-server are taken per round; medians over --rounds are reported. Goal: tokens/s ≥ 0.95×
and p95 TTFT no worse.

On a processor with AMX, llama-server of this build crashes on Q4/Q8 models (see README.md,
"Processors with AMX"); run this on one without.

    .venv/bin/python benchmarks/bench_serve.py               # ~5 min: 3 rounds
    .venv/bin/python benchmarks/bench_serve.py --smoke       # 1 round, short answers
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _common import built_tool, default_model, environment, median, rotating_rounds, save  # noqa: E402

try:  # openai's HTTP client: httpx, or its successor httpx2 in openai 3
    import httpx
except ImportError:
    import httpx2 as httpx  # type: ignore[no-redef]

TOPICS = ["the sea", "a lighthouse", "winter", "a city at night", "bees", "a long train ride",
          "the moon", "an old library", "a storm", "a garden", "mountains", "a market",
          "rivers", "a quiet morning", "the desert", "a harbour", "forests", "a bakery",
          "the stars", "a bridge", "autumn", "a small island", "a museum", "the wind"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Served:
    """A server subprocess and its base URL."""

    def __init__(self, name: str, command: list[str], url: str | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.url = url or ""
        self._lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited at start:\n" + "".join(self._lines[-20:]))
            if self.url and self._healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{name} did not start in 180 s:\n" + "".join(self._lines[-20:]))

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.append(line)
            found = re.search(r"serving on (http://\S+)", line)
            if found and not self.url:
                self.url = found.group(1)

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _one_request(client: Any, url: str, model: str, prompt: str, max_tokens: int
                 ) -> tuple[float | None, int, str]:
    """Send one streamed chat; (seconds to the first content chunk, completion tokens, text)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first: float | None = None
    tokens = 0
    pieces: list[str] = []
    with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if first is None:
                        first = time.perf_counter() - sent
                    pieces.append(text)
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    return first, tokens, "".join(pieces)


def measure_level(server: _Served, model: str, clients: int, requests: int, max_tokens: int,
                  offset: int) -> dict[str, Any]:
    """``requests`` streamed chats from ``clients`` concurrent clients."""
    prompts = [f"Write a short story about {TOPICS[(offset + i) % len(TOPICS)]}."
               for i in range(requests)]
    ttfts: list[float] = []
    tokens: list[int] = []
    texts: dict[int, str] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def client_loop(k: int) -> None:
        for i in range(k, requests, clients):
            # A connection per request: llama-server closes kept-alive ones between
            # requests, which a reused client sees as a dropped response.
            with httpx.Client() as client:
                try:
                    first, n, text = _one_request(client, server.url, model, prompts[i],
                                                  max_tokens)
                except Exception as exc:  # reported, not raised: the other clients go on
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    if first is not None:
                        ttfts.append(first)
                    tokens.append(n)
                    texts[i] = text

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ttfts.sort()
    return {"clients": clients, "requests": requests, "wall_s": round(wall, 3),
            "completion_tokens": sum(tokens), "tokens_per_s": round(sum(tokens) / wall, 2),
            "ttft_p50_ms": round(1000 * _percentile(ttfts, 50), 1),
            "ttft_p95_ms": round(1000 * _percentile(ttfts, 95), 1),
            "errors": errors, "texts": [texts.get(i) for i in range(requests)]}


def _percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2)")
    parser.add_argument("--llama-server", default=None, help="llama-server binary")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=1024, help="context per sequence")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=1800, help="seconds for all rounds")
    parser.add_argument("--smoke", action="store_true", help="1 round, 16-token answers")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.max_tokens, args.requests = 1, 16, 8
    model = args.model or default_model()
    levels = [int(c) for c in args.clients.split(",")]
    binary = built_tool("llama-server", args.llama_server)
    if binary is None:
        raise SystemExit("no llama-server: run `CMAKE_ARGS=-DLLAMA_BUILD_SERVER=ON "
                         "benchmarks/build_llama_bench.sh llama-server` first")
    port = _free_port()
    threads = str(args.threads)
    commands = {
        "llmkit": [str(HERE.parent / ".venv/bin/llmkit"), "serve", "-m", str(model), "-P",
                   str(args.parallel), "--ctx", str(args.ctx), "-t", threads, "--port", "0",
                   ],
        "llama-server": [binary, "-m", str(model), "-np", str(args.parallel), "-c",
                         str(args.parallel * args.ctx), "-no-kvu", "-b", "512", "-ub", "512",
                         "-t", threads, "-tb", threads, "--host", "127.0.0.1", "--port",
                         str(port), "--no-webui"],
    }
    urls = {"llmkit": None, "llama-server": f"http://127.0.0.1:{port}"}
    servers: dict[str, _Served] = {}
    started = time.perf_counter()
    rounds: list[dict[str, Any]] = []
    try:
        for name, command in commands.items():
            servers[name] = _Served(name, command, urls[name])
            print(f"{name}: up at {servers[name].url}", file=sys.stderr)
        names = {"llmkit": "", "llama-server": ""}
        with httpx.Client() as client:
            for name, server in servers.items():
                listed = client.get(server.url + "/v1/models", timeout=30).json()["data"]
                names[name] = str(listed[0]["id"])
                _one_request(client, server.url, names[name], "Hello.", 8)  # warm-up
        for name, server in servers.items():
            measure_level(server, names[name], max(levels), max(levels), 16, 0)
        for r, order in rotating_rounds(list(servers), args.rounds, args.budget, started):
            row: dict[str, Any] = {"round": r, "order": order, "levels": {}}
            for clients in levels:
                results = {}
                for name in order:
                    results[name] = measure_level(servers[name], names[name], clients,
                                                  args.requests, args.max_tokens, r)
                    res = results[name]
                    print(f"round {r + 1} {name:12s} {clients} clients: "
                          f"{res['tokens_per_s']:7.1f} tok/s  TTFT p50 "
                          f"{res['ttft_p50_ms']:7.1f} ms p95 {res['ttft_p95_ms']:7.1f} ms "
                          f"({res['completion_tokens']} tokens"
                          f"{', ' + str(len(res['errors'])) + ' errors' if res['errors'] else ''})",
                          file=sys.stderr)
                mine, theirs = results["llmkit"], results["llama-server"]
                results["ratio_tokens_per_s"] = round(
                    mine["tokens_per_s"] / theirs["tokens_per_s"], 3)
                results["ratio_ttft_p95"] = round(mine["ttft_p95_ms"] / theirs["ttft_p95_ms"], 3)
                results["same_texts"] = sum(a == b for a, b in zip(
                    mine["texts"], theirs["texts"], strict=True))
                row["levels"][str(clients)] = results
            rounds.append(row)
    finally:
        for server in servers.values():
            server.stop()

    summary = {}
    print(f"\nmedians over {len(rounds)} rounds ({model.name}, {args.threads} threads, "
          f"--parallel {args.parallel}, {args.max_tokens} tokens per answer):", file=sys.stderr)
    print(f"{'clients':>7} {'llmkit tok/s':>13} {'server tok/s':>13} {'ratio':>6} "
          f"{'p95 TTFT llmkit':>16} {'server':>8} {'ratio':>6}", file=sys.stderr)
    for clients in levels:
        rows = [r["levels"][str(clients)] for r in rounds]

        def m(name: str, key: str, rows: list[dict[str, Any]] = rows) -> float:
            return median([row[name][key] for row in rows])

        summary[str(clients)] = {
            "llmkit_tokens_per_s": m("llmkit", "tokens_per_s"),
            "server_tokens_per_s": m("llama-server", "tokens_per_s"),
            "ratio_tokens_per_s": median([row["ratio_tokens_per_s"] for row in rows]),
            "llmkit_ttft_p50_ms": m("llmkit", "ttft_p50_ms"),
            "server_ttft_p50_ms": m("llama-server", "ttft_p50_ms"),
            "llmkit_ttft_p95_ms": m("llmkit", "ttft_p95_ms"),
            "server_ttft_p95_ms": m("llama-server", "ttft_p95_ms"),
            "ratio_ttft_p95": median([row["ratio_ttft_p95"] for row in rows]),
            "same_texts_of": [min(row["same_texts"] for row in rows), args.requests],
        }
        s = summary[str(clients)]
        print(f"{clients:>7} {s['llmkit_tokens_per_s']:13.1f} {s['server_tokens_per_s']:13.1f} "
              f"{s['ratio_tokens_per_s']:6.3f} {s['llmkit_ttft_p95_ms']:13.1f} ms "
              f"{s['server_ttft_p95_ms']:5.1f} ms {s['ratio_ttft_p95']:6.3f}", file=sys.stderr)
    # uvicorn picks its parser and event loop by what is installed: say which ran.
    front_end = {name: importlib.util.find_spec(name) is not None
                 for name in ("httptools", "uvloop")}
    print(f"llmkit's front end: {front_end}", file=sys.stderr)
    path = save("serve", {"settings": vars(args) | {"model": str(model)},
                          "front_end": front_end,
                          "environment": environment(str(model)), "rounds": rounds,
                          "medians": summary})
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
