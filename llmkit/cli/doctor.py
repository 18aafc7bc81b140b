"""`llmkit doctor`: what llmkit sees on this machine."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from llmkit.cli import _output as out
from llmkit.cli._options import TextFormat


def doctor(
    format: Annotated[TextFormat, typer.Option("--format", "-f")] = TextFormat.text,
) -> None:
    """Print versions, the llama.cpp backend, GPU offload, threads, paths and models present.

    Example: llmkit doctor
    """
    from llmkit.doctor import report

    data = report()
    if format == TextFormat.json:
        out.write_json(data)
        return

    def line(key: str, value: Any) -> str:
        return f"{key:<18} {value}\n"

    text = "".join([
        line("llmkit", data["llmkit"]),
        line("python", data["python"]),
        line("platform", data["platform"]),
        line("llama-cpp-python", data["llama_cpp_python"]),
        line("backends", ", ".join(data["backends"])),
        line("gpu offload", "yes" if data["gpu_offload"] else
             "no (CPU only; see the README to build with CUDA or Metal)"),
        line("cpu features", data["system_info"]),
        *([line("not used", ", ".join(data["cpu_buffers_not_used"])
                + " weight buffers (their kernels crash in this llama.cpp build)")]
          if data["cpu_buffers_not_used"] else []),
        line("vision engine", f"{data['vision_engine']} (Llama 3.2 Vision)"),
        line("physical cores", data["physical_cores"]),
        line("threads", f"{data['default_threads']} ({data['threads_reason']})"),
        *(line(k.replace("_", " "), v) for k, v in data["paths"].items()),
        line("hf offline", "yes" if data["hf_offline"] else "no"),
        line("store", data["store"]),
        line("models present", ", ".join(data["models_present"]) or
             ("unknown" if data["store"] != "ok" else "none")),
        line("memory", _memory_line(data["memory"])),
    ])
    out.write(text)


def _memory_line(memory: dict[str, Any]) -> str:
    from llmkit.memory import human_gib

    ram = (f"{human_gib(memory['available'])} available ({memory['source']})"
           if memory["available"] is not None else "unknown (no check before loading)")
    gpus = "".join(f"; {g['name']}: {human_gib(g['free'])} free of {human_gib(g['total'])}"
                   for g in memory["gpus"])
    return ram + gpus
