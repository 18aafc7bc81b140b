"""`llmkit caption` in one process against one process per image, and against raw mtmd per image.

No vision GGUF can be downloaded here, so the model is built: a random-weight checkpoint with
SmolVLM-256M-Instruct's exact shapes (SigLIP-base encoder at 512 px, SmolLM2-135M text model,
pixel-shuffle 4 → 64 image tokens per tile), its preprocessor set to one 512 px tile per image,
converted by `llmkit convert` (cached in --workdir). Compute per image is therefore realistic
for that model size; the captions are noise.

Measured, on --images PNG photos (PNG so that Pillow and mtmd's stb decoder see identical
pixels and greedy decoding must produce identical tokens):

1. batch: one `llmkit caption DIR --format jsonl` process; wall time and peak RSS.
2. separate: one `llmkit caption FILE` process per image (model loaded every time).
3. per image: llmkit's own per-image time (its records' ``total_ms``: preparing the image,
   encoding, decoding) against `_raw_mtmd.py`, which drives the same model through the
   bindings' mtmd C API with no llmkit code; medians over the images, and whether both
   produced the same tokens for every image.
4. memory: peak RSS of a batch of --images against a batch of a fifth as many.

    .venv/bin/python benchmarks/bench_caption.py [--images 50] [--threads 2] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import PEAK_RSS, environment, median, save  # noqa: E402


def build_model(workdir: Path) -> tuple[Path, Path]:
    """The SmolVLM-256M-shaped model and its projector (built and converted once)."""
    from tests.vision_checkpoints import SMOLVLM_256M, build_smolvlm

    model, mmproj = workdir / "smolvlm-256m-shape-f16.gguf", workdir / "mmproj-smolvlm.gguf"
    if model.is_file() and mmproj.is_file():
        return model, mmproj
    ckpt = workdir / "checkpoint"
    if not (ckpt / "model.safetensors").is_file():
        print("building a SmolVLM-256M-shaped checkpoint …", file=sys.stderr)
        build_smolvlm(ckpt, replace(SMOLVLM_256M, longest_edge=512))
    subprocess.run([sys.executable, "-m", "llmkit", "convert", str(ckpt), "-o", str(model),
                    "--mmproj", str(mmproj), "--force", "-q"], check=True)
    return model, mmproj


def make_images(directory: Path, count: int) -> list[Path]:
    """``count`` different photo-like 640×480 PNGs."""
    from tests.images import photo

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"img{i:03d}.png"
        if not path.is_file():
            picture = photo((640, 480))
            picture = picture.rotate(7 * i, fillcolor=(i * 5 % 255, 90, 160))
            picture.save(path)
        paths.append(path)
    return paths


def timed(cmd: list[str], **kwargs: Any) -> tuple[float, int, subprocess.CompletedProcess[str]]:
    """Wall seconds, peak RSS (KiB) and the finished process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd], capture_output=True,
                          text=True, **kwargs)
    wall = time.perf_counter() - t0
    # Exit code 1 is fine: random weights often answer with blank tokens, which llmkit reports
    # as a failed (empty) caption; the timing is what counts here.
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    *_, rss_line = proc.stderr.strip().splitlines()
    return wall, int(rss_line), proc


def rendered_prompt(model: Path, mmproj: Path) -> str:
    """The exact text llmkit sends for a short caption (image marker included)."""
    from llmkit.engines import load_engine
    from llmkit.tasks.caption import STYLES

    with load_engine(model, mmproj=mmproj, threads=1) as engine:
        text = engine.render_chat(
            [{"role": "user", "content": f"{engine.media_marker}\n{STYLES['short']}"}])
        # llmkit's own image marker is random per engine; raw mtmd looks for its default one.
        return text.replace(engine.media_marker, "<__media__>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--workdir", type=Path, default=HERE / ".build" / "caption")
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    model, mmproj = build_model(args.workdir)
    images = make_images(args.workdir / "images", args.images)
    small = images[: max(1, args.images // 5)]
    prompt_file = args.workdir / "prompt.txt"
    prompt_file.write_text(rendered_prompt(model, mmproj), encoding="utf-8")
    llmkit = [sys.executable, "-m", "llmkit"]
    common = ["-m", str(model), "--mmproj", str(mmproj), "-t", str(args.threads),
              "--max-tokens", str(args.max_tokens), "--temperature", "0", "-q"]

    print(f"model   {model.name} ({model.stat().st_size >> 20} MiB) + {mmproj.name} "
          f"({mmproj.stat().st_size >> 20} MiB); {args.images} PNGs 640×480; threads "
          f"{args.threads}; up to {args.max_tokens} tokens per caption", flush=True)

    raw_cmd = [sys.executable, str(HERE / "_raw_mtmd.py"), str(model), str(mmproj),
               str(prompt_file), str(args.threads), str(args.max_tokens),
               *[str(p) for p in images]]
    raw_wall, raw_rss, raw_proc = timed(raw_cmd)
    raw = [json.loads(line) for line in raw_proc.stdout.splitlines()]
    print(f"raw mtmd, one process      {raw_wall:7.1f} s  peak {raw_rss >> 10} MiB", flush=True)

    batch_wall, batch_rss, batch_proc = timed(
        [*llmkit, "caption", *[str(p) for p in images], *common, "--format", "jsonl"])
    records = [json.loads(line) for line in batch_proc.stdout.splitlines()]
    print(f"llmkit caption, one batch  {batch_wall:7.1f} s  peak {batch_rss >> 10} MiB",
          flush=True)

    _, small_rss, _ = timed(
        [*llmkit, "caption", *[str(p) for p in small], *common, "--format", "jsonl"])

    separate_wall = 0.0
    for path in images:
        wall, _, _ = timed([*llmkit, "caption", str(path), *common])
        separate_wall += wall
    print(f"llmkit caption, per image  {separate_wall:7.1f} s  ({args.images} processes)",
          flush=True)

    llmkit_ms = [r["timings"]["total_ms"] for r in records]
    raw_ms = [r["total_ms"] for r in raw]
    from llmkit.tasks.caption import tidy_caption

    same_tokens = sum(
        1 for r, w in zip(records, raw, strict=True)
        if r["usage"]["completion_tokens"] == len(w["tokens"])
        and (r["caption"] or "") == tidy_caption(w["text"], "short"))
    per_image_ratio = median(llmkit_ms) / median(raw_ms)
    # Each image's own ratio, then their median: robust to slow moments hitting one image.
    ratios = sorted(a / b for a, b in zip(llmkit_ms, raw_ms, strict=True))
    summary = {
        "batch_wall_s": round(batch_wall, 2),
        "separate_wall_s": round(separate_wall, 2),
        "separate_over_batch": round(separate_wall / batch_wall, 2),
        "raw_wall_s": round(raw_wall, 2),
        "per_image_ms": {"llmkit_median": round(median(llmkit_ms), 1),
                         "raw_mtmd_median": round(median(raw_ms), 1)},
        "per_image_overhead": round(per_image_ratio - 1, 4),
        "per_image_ratio_median_of_pairs": round(median(ratios), 4),
        "same_caption_as_raw": f"{same_tokens}/{len(records)}",
        "peak_rss_mib": {f"batch_{len(images)}": batch_rss >> 10,
                         f"batch_{len(small)}": small_rss >> 10, "raw_mtmd": raw_rss >> 10},
        "rss_growth_per_image_kib": round((batch_rss - small_rss) / max(1, len(images)
                                                                        - len(small)), 1),
    }
    print()
    print(f"batch of {len(images)} in one process: {batch_wall:.1f} s; {len(images)} separate "
          f"processes: {separate_wall:.1f} s → batch is {separate_wall / batch_wall:.2f}× faster")
    print(f"per image: llmkit {median(llmkit_ms):.0f} ms, raw mtmd {median(raw_ms):.0f} ms "
          f"(medians) → overhead {100 * (per_image_ratio - 1):+.1f}% (target ≤ +5%); median of "
          f"per-image ratios {median(ratios):.3f}")
    print(f"same caption as raw mtmd for {same_tokens}/{len(records)} images")
    print(f"peak RSS: batch of {len(images)} {batch_rss >> 10} MiB, batch of {len(small)} "
          f"{small_rss >> 10} MiB ({summary['rss_growth_per_image_kib']} KiB per extra image); "
          f"raw mtmd {raw_rss >> 10} MiB")
    path = save("caption", {"environment": environment(str(model)), "args": {
        "images": args.images, "threads": args.threads, "max_tokens": args.max_tokens},
        "summary": summary, "llmkit_per_image_ms": llmkit_ms, "raw_per_image_ms": raw_ms})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
