"""Run the real llmkit CLI, recording every token batch it hands llama.cpp (a test helper).

``python -m tests.record_tokens ARGS…`` is ``llmkit ARGS…`` with ``llama_decode`` wrapped: each
call appends one JSON line to the file named by ``LLMKIT_RECORD_TOKENS``:
``{"ctx": <context address>, "ids": [...], "generated": <the batch is a sampled token>}``.
Image embeddings that mtmd evaluates inside llama.cpp carry no ids and are not recorded.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from typing import Any


def main() -> None:
    import llama_cpp

    path = os.environ["LLMKIT_RECORD_TOKENS"]
    state = {"sampled": False}
    real_decode, real_sample = llama_cpp.llama_decode, llama_cpp.llama_sampler_sample

    def decode(ctx: Any, batch: Any) -> Any:
        ids = [int(batch.token[i]) for i in range(batch.n_tokens)] if batch.token else []
        record = {"ctx": ctypes.cast(ctx, ctypes.c_void_p).value, "ids": ids,
                  "generated": state["sampled"]}
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        state["sampled"] = False
        return real_decode(ctx, batch)

    def sample(*args: Any) -> Any:
        state["sampled"] = True
        return real_sample(*args)

    llama_cpp.llama_decode = decode
    llama_cpp.llama_sampler_sample = sample
    from llmkit.cli.app import main as cli

    sys.argv[0] = "llmkit"
    cli()


if __name__ == "__main__":
    main()
