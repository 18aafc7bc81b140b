"""Quantization through llama.cpp's own quantizer (llama_model_quantize), written atomically."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkit.errors import QuantizeError, UsageError

# llama_ftype values (llama.h) with approximate bits per weight, for the free-disk check.
TYPES: dict[str, tuple[int, float]] = {
    "F32": (0, 32.0), "F16": (1, 16.0), "BF16": (32, 16.0),
    "Q4_0": (2, 4.5), "Q4_1": (3, 5.0), "Q5_0": (8, 5.5), "Q5_1": (9, 6.0), "Q8_0": (7, 8.5),
    "Q2_K": (10, 2.96), "Q2_K_S": (21, 2.96), "Q3_K_S": (11, 3.5), "Q3_K_M": (12, 3.9),
    "Q3_K_L": (13, 4.3), "Q4_K_S": (14, 4.6), "Q4_K_M": (15, 4.9), "Q5_K_S": (16, 5.5),
    "Q5_K_M": (17, 5.7), "Q6_K": (18, 6.6),
    "IQ1_S": (24, 1.6), "IQ1_M": (31, 1.8), "IQ2_XXS": (19, 2.1), "IQ2_XS": (20, 2.3),
    "IQ2_S": (28, 2.5), "IQ2_M": (29, 2.7), "IQ3_XXS": (23, 3.1), "IQ3_XS": (22, 3.3),
    "IQ3_S": (26, 3.4), "IQ3_M": (27, 3.7), "IQ4_NL": (25, 4.5), "IQ4_XS": (30, 4.3),
    "TQ1_0": (36, 1.7), "TQ2_0": (37, 2.1),
}
# llama.cpp refuses these without an importance matrix (llama-quantize says the same).
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S"})
_QUANT_SUFFIX = re.compile(r"[-.](f32|f16|bf16|q\d_[a-z0-9_]+|iq\d_[a-z0-9_]+)$", re.IGNORECASE)


@dataclass(frozen=True)
class QuantizeResult:
    """What `quantize` wrote."""

    input: str
    output: str
    type: str
    size_in: int
    size_out: int
    seconds: float


def normalize_type(name: str) -> str:
    """'q4_k_m' → 'Q4_K_M'.

    Raises:
        UsageError: not a type llama.cpp quantizes to.
    """
    key = name.strip().upper()
    if key not in TYPES:
        raise UsageError(f"unknown quantization type '{name}'",
                         hint=f"choose one of {', '.join(TYPES)}")
    return key


def default_output(source: Path, qtype: str) -> Path:
    """model-f16.gguf → model-Q4_K_M.gguf (next to the input)."""
    stem = _QUANT_SUFFIX.sub("", source.stem)
    return source.with_name(f"{stem}-{qtype}.gguf")


def load_imatrix(path: Path) -> dict[str, Any]:
    """Per-tensor importance values from an imatrix GGUF written by llama-imatrix.

    Raises:
        QuantizeError: unreadable or not an imatrix file.
    """
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # gguf raises assorted errors on bad input
        raise QuantizeError(f"cannot read the importance matrix {path}: {exc}") from None
    tensors = {t.name: t for t in reader.tensors}
    values: dict[str, Any] = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = tensors.get(base + ".counts")
        if counts is None:
            continue
        sums = np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        n = np.asarray(counts.data, dtype=np.float32).reshape(-1, 1)
        values[base] = np.ascontiguousarray((sums / np.maximum(n, 1)).reshape(-1))
    if not values:
        raise QuantizeError(f"{path} holds no importance data (expected llama-imatrix output)")
    return values


def quantize(
    source: Path,
    qtype: str,
    output: Path | None = None,
    *,
    threads: int | None = None,
    force: bool = False,
    imatrix: Path | None = None,
    verify: bool = True,
) -> QuantizeResult:
    """Quantize a GGUF with llama.cpp's quantizer and check that the result loads.

    Args:
        source: the input GGUF (usually F32/F16/BF16).
        qtype: target type, e.g. "Q4_K_M" (case-insensitive).
        output: where to write; default next to the input, named after the type.
        threads: quantizer threads, exactly (default: the physical cores other processes
            leave idle, or LLMKIT_THREADS).
        force: replace an existing output file.
        imatrix: importance matrix GGUF (required for the smallest IQ types).
        verify: load the result in llama.cpp before declaring it done.

    Returns:
        Paths, sizes before and after, and the time taken.

    Raises:
        UsageError: unknown type, output exists without force, output equals input.
        InvalidModelFileError: the input is not a complete GGUF.
        QuantizeError: llama.cpp failed, not enough disk, or the result does not load.
    """
    from llmkit.engines.llama_cpp import llama_module, recent_log
    from llmkit.gguf_file import check_file, check_header, check_output
    from llmkit.hardware import measure_threads

    qtype = normalize_type(qtype)
    # llama.cpp's quantizer loads the header as a model load does, and aborts on the same values.
    info = check_file(source, "model")
    if imatrix is not None:
        check_header(imatrix)  # a FIFO would block the reader below
    output = output or default_output(source, qtype)
    if output.resolve() == source.resolve():
        raise UsageError("the output would overwrite the input", hint="give another OUT path")
    check_output(output, force=force)
    if qtype in NEEDS_IMATRIX and imatrix is None:
        raise UsageError(f"{qtype} needs an importance matrix",
                         hint="pass --imatrix FILE (from llama-imatrix) or choose another type")
    size_in = source.stat().st_size
    needed = int(size_in * min(1.0, TYPES[qtype][1] / 16.0)) + (16 << 20)
    free = shutil.disk_usage(output.parent if output.parent.exists() else Path.cwd()).free
    if free < needed:
        raise QuantizeError(f"not enough disk space in {output.parent}: about "
                            f"{needed >> 20} MB needed, {free >> 20} MB free")
    if info.architecture == "mllama":
        return _quantize_mllama(source, qtype, output, imatrix=imatrix, verify=verify,
                                size_in=size_in, threads=measure_threads(threads).threads)
    lc = llama_module()
    params = lc.llama_model_quantize_default_params()
    params.nthread = measure_threads(threads).threads
    params.ftype = TYPES[qtype][0]
    keep: list[Any] = []  # ctypes buffers that must outlive the call
    if imatrix is not None:
        entries = load_imatrix(imatrix)
        array = (lc.llama_model_imatrix_data * (len(entries) + 1))()
        for i, (name, values) in enumerate(entries.items()):
            encoded = name.encode()
            keep += [encoded, values]
            array[i].name = encoded
            array[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            array[i].size = values.size
        keep.append(array)
        params.imatrix = ctypes.cast(array, ctypes.POINTER(lc.llama_model_imatrix_data))
    from llmkit._fs import temp_path

    # Named as this process's, so a rerun after a SIGKILL removes the file left behind.
    tmp = temp_path(output)
    started = time.perf_counter()
    try:
        rc = lc.llama_model_quantize(str(source).encode(), str(tmp).encode(),
                                     ctypes.byref(params))
        if rc != 0 or not tmp.exists():
            lines = [ln.strip() for ln in recent_log() if ln.strip()]
            detail = lines[-1] if lines else f"code {rc}"
            hint = ("start from an F16, BF16 or F32 file" if "requantiz" in detail else
                    "run with -v or LLMKIT_DEBUG=1 for llama.cpp's log")
            raise QuantizeError(f"llama.cpp could not quantize {source.name} to {qtype}: "
                                f"{detail}", hint=hint)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    seconds = time.perf_counter() - started
    _publish(tmp, output, verify=verify)
    return QuantizeResult(str(source), str(output), qtype, size_in, output.stat().st_size,
                          seconds)


def _quantize_mllama(source: Path, qtype: str, output: Path, *, imatrix: Path | None,
                     verify: bool, size_in: int, threads: int) -> QuantizeResult:
    """Llama 3.2 Vision: llama.cpp's quantizer refuses the architecture, so its text weights
    go through ggml's own quantization kernels (the ones llama-quantize calls)."""
    from llmkit.engines.mllama.quantize import stage_quantized

    if imatrix is not None:
        raise UsageError("--imatrix is not supported for Llama 3.2 Vision models",
                         hint="leave out --imatrix")
    started = time.perf_counter()
    tmp = stage_quantized(source, output, qtype, threads=threads)
    seconds = time.perf_counter() - started
    _publish(tmp, output, verify=verify)
    return QuantizeResult(str(source), str(output), qtype, size_in, output.stat().st_size,
                          seconds)


def _publish(tmp: Path, output: Path, *, verify: bool) -> None:
    """Rename a quantized file into place once it loads (when ``verify``); it is removed on
    any failure.

    Raises:
        QuantizeError: the quantized model does not load.
    """
    from llmkit.engines import load_engine

    try:
        if verify:
            try:
                with load_engine(tmp, n_ctx=64, threads=1, device="cpu") as engine:
                    engine.generate(engine.tokenize("Hello"), _one_token())
            except Exception as exc:
                raise QuantizeError(f"the quantized model does not load: {exc}") from None
        os.replace(tmp, output)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _one_token() -> Any:
    from llmkit.engines import SamplingParams

    return SamplingParams(temperature=0, max_tokens=1)
