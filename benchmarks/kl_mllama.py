"""KL divergence per quantization type: Llama 3.2 Vision files against their own F16 conversion.

For each model, the F16 file (`llmkit convert --outtype f16`) is the reference; each type is
made from it by `llmkit quantize` and compared on llmkit.engines.mllama.kl's fixed prompts
(three chat prompts without a picture, three with one of 1, 2 and 4 tiles; each a question and
a written answer): KL(F16 ‖ type) of the next-token distribution at every position of every
prompt, as `llama-perplexity --kl-divergence` reports it (mean ± standard error, median, p99,
max; "same top p": how often both files' most probable token agree; RMS Δp of the sequence's
own next token), over all positions and split into text-only and image prompts.

Models (--models):
- tiny64: tests/mllama_model.py's tiny random model (text width 64): every K-quant takes
  llama.cpp's fallback for rows not a multiple of 256 (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0);
- tiny256: the same at text width 256 (FFN 512), so the K-quant kernels run;
- reduced11b: the reduced-depth checkpoint with the 11B's real widths that
  benchmarks/bench_mllama.py builds under --cache (built here the same way if missing).

Every model has random weights: the figures say how far each type moves these models'
distributions, not how a trained 11B fares. Files made here are deleted after measuring unless
--keep (the reduced11b F16 file is 4.3 GiB, its quantizations 1.6–2.5 GiB).

    .venv/bin/python benchmarks/kl_mllama.py [--models tiny64,tiny256,reduced11b]
        [--types Q4_K_M,Q5_K_M,Q6_K,Q8_0] [--threads 2] [--keep]

Prints a table and writes benchmarks/results/kl-mllama-*.json.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import environment, save  # noqa: E402

TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
MODELS = ("tiny64", "tiny256", "reduced11b")


def _llmkit(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "llmkit", *args], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"llmkit {' '.join(args[:2])} failed:\n{proc.stderr[-3000:]}")


def tiny_checkpoint(width: int, work: Path) -> Path:
    """tests/mllama_model.py's tiny random model (seed 7) saved as a published checkpoint."""
    from tests.mllama_model import build_model, require_oracle, save_checkpoint, tiny_config

    require_oracle()
    config = tiny_config() if width == 64 else tiny_config(
        text_hidden_size=width, text_intermediate_size=2 * width)
    return save_checkpoint(build_model(seed=7, config=config), work / f"tiny{width}-checkpoint",
                           dtype="bfloat16")


def reduced_checkpoint(cache: Path, threads: int) -> Path:
    """bench_mllama.py's reduced-depth 11B-width checkpoint (its default shape), built there
    the same way when it is not there yet."""
    import bench_mllama as bm

    spec = bm.Spec(5, (3,), 4, 2, (0, 1, 2, 3), 0)
    folder = cache / spec.tag()
    checkpoint = folder / "mllama-checkpoint"
    if not (checkpoint / "model.safetensors").is_file():
        print(f"building {folder} with bench_mllama.build …", file=sys.stderr, flush=True)
        bm.build(spec, folder, threads, keep=False)
    return checkpoint


def text_bits_per_weight(path: Path) -> float:
    """Bits per element of the text weights (the vision tower and projector left out)."""
    import gguf

    bits = elements = 0
    for t in gguf.GGUFReader(path).tensors:
        if not t.name.startswith(("v.", "mm.")):
            bits += int(t.n_bytes) * 8
            elements += int(t.n_elements)
    return bits / elements


def measure_model(name: str, checkpoint: Path, work: Path, types: list[str], threads: int,
                  keep: bool) -> dict[str, Any]:
    """Convert to F16, measure the reference, then quantize, compare and (unless ``keep``)
    delete each type; the record of this model."""
    from llmkit.engines import load_engine
    from llmkit.engines.mllama.hparams import read_mllama
    from llmkit.engines.mllama.kl import Reference, fixed_prompts

    work.mkdir(parents=True, exist_ok=True)
    f16 = work / f"{name}-F16.gguf"
    t0 = time.perf_counter()
    _llmkit("convert", str(checkpoint), "-o", str(f16), "--outtype", "f16", "--force", "-q")
    record: dict[str, Any] = {"checkpoint": str(checkpoint), "f16_bytes": f16.stat().st_size,
                              "convert_s": round(time.perf_counter() - t0, 1), "types": {}}
    try:
        file = read_mllama(f16)
        with load_engine(f16, n_ctx=64, threads=1, device="cpu") as engine:
            prompts = fixed_prompts(engine, file.vision.image_size,
                                    image_token=file.text.image_token)
        print(f"{name}: reference (F16, {sum(len(p.tokens) for p in prompts)} positions) …",
              file=sys.stderr, flush=True)
        reference = Reference.measure(f16, prompts, threads=threads)
        record |= {"prompts": reference.digest, "reference_s": round(reference.seconds, 1),
                   "positions": {p.name: len(p.tokens) for p in prompts},
                   "tiles": {p.name: _tiles(p, file) for p in prompts if p.image is not None},
                   "f16_text_bpw": round(text_bits_per_weight(f16), 3)}
        for qtype in types:
            out = work / f"{name}-{qtype}.gguf"
            t1 = time.perf_counter()
            _llmkit("quantize", str(f16), str(out), "--type", qtype, "-t", str(threads),
                    "--force", "-q")
            quantize_s = time.perf_counter() - t1
            try:
                print(f"{name}: {qtype} …", file=sys.stderr, flush=True)
                report = reference.compare(out, threads=threads)
                record["types"][qtype] = report.to_dict() | {
                    "bytes": out.stat().st_size, "text_bpw": round(text_bits_per_weight(out), 3),
                    "quantize_s": round(quantize_s, 1)}
            finally:
                if not keep:
                    out.unlink(missing_ok=True)
    finally:
        if not keep:
            f16.unlink(missing_ok=True)
    return record


def _tiles(prompt: Any, file: Any) -> int:
    from llmkit.engines.mllama.preprocess import tile_image

    v = file.vision
    return tile_image(prompt.image, mean=v.image_mean, std=v.image_std, max_tiles=v.max_tiles,
                      tile_size=v.image_size).num_tiles


def table(results: dict[str, Any]) -> str:
    """The figures as a Markdown table (benchmarks/README.md's)."""
    lines = ["| model | type | text bpw | GiB | mean KL ± se | median | p99 | max | same top "
             "| RMS Δp | mean KL text / image | F16 entropy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, record in results.items():
        for qtype, r in record["types"].items():
            o, kinds = r["overall"], r["by_kind"]
            lines.append(
                f"| {model} | {qtype} | {r['text_bpw']:.2f} | {r['bytes'] / 2**30:.3f} | "
                f"{o['mean']:.3g} ± {o['mean_stderr']:.1g} | {o['median']:.3g} | "
                f"{o['p99']:.3g} | {o['max']:.3g} | {100 * o['same_top']:.1f} % | "
                f"{o['rms_dp']:.2g} | {kinds['text']['mean']:.3g} / "
                f"{kinds['image']['mean']:.3g} | {r['reference_entropy']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=HERE / ".cache",
                        help="where bench_mllama.py keeps the reduced11b checkpoint")
    parser.add_argument("--keep", action="store_true",
                        help="keep the GGUF files made (under --cache/<tag>/kl, or a "
                             "temporary folder for the tiny models, printed)")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    types = [t.strip().upper() for t in args.types.split(",") if t.strip()]
    if unknown := set(models) - set(MODELS):
        raise SystemExit(f"unknown model(s): {', '.join(sorted(unknown))}")
    if unknown := set(types) - set(TYPES):
        raise SystemExit(f"unknown type(s): {', '.join(sorted(unknown))} (measured: "
                         f"{', '.join(TYPES)})")
    scratch = Path(tempfile.mkdtemp(prefix="kl-mllama-"))
    results: dict[str, Any] = {}
    try:
        for model in models:
            if model == "reduced11b":
                checkpoint = reduced_checkpoint(args.cache, args.threads)
                work = checkpoint.parent / "kl"
                free = shutil.disk_usage(checkpoint.parent).free
                if free < 8 << 30:
                    raise SystemExit(f"{free / 2**30:.1f} GiB free under {checkpoint.parent}: "
                                     "the F16 file and one quantization need about 7 GiB")
            else:
                checkpoint = tiny_checkpoint(int(model.removeprefix("tiny")), scratch)
                work = scratch / model
            results[model] = measure_model(model, checkpoint, work, types, args.threads,
                                           args.keep)
            if not args.keep and model != "reduced11b":
                shutil.rmtree(checkpoint, ignore_errors=True)
    finally:
        if args.keep:
            print(f"kept: {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(table(results))
    path = save("kl-mllama", {"environment": environment(), "threads": args.threads,
                              "results": results})
    print(f"saved {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
