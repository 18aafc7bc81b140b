"""Run the real llmkit CLI, recording every token batch it hands llama.cpp (a test helper).

``python -m tests.record_tokens ARGS…`` is ``llmkit ARGS…`` with ``llama_decode`` wrapped: each
call appends one JSON line to the file named by ``LLMKIT_RECORD_TOKENS``:
``{"ctx": <context address>, "ids": [...], "generated": <the batch is sampled tokens>}``.
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
    # Tokens sampled and not yet evaluated: a batch made of them (one sequence's next token,
    # or every parallel sequence's) is generated; a prompt chunk evaluated between a sample and
    # its token's evaluation is not.
    pending: list[int] = []
    real_decode, real_sample = llama_cpp.llama_decode, llama_cpp.llama_sampler_sample

    def decode(ctx: Any, batch: Any) -> Any:
        ids = [int(batch.token[i]) for i in range(batch.n_tokens)] if batch.token else []
        left = list(pending)
        generated = bool(ids)
        for token in ids:
            if token in left:
                left.remove(token)
            else:
                generated = False
                break
        if generated:
            pending[:] = left
        record = {"ctx": ctypes.cast(ctx, ctypes.c_void_p).value, "ids": ids,
                  "generated": generated}
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        return real_decode(ctx, batch)

    def sample(*args: Any) -> Any:
        token = real_sample(*args)
        pending.append(int(token))
        return token

    llama_cpp.llama_decode = decode
    llama_cpp.llama_sampler_sample = sample
    from llmkit.cli.app import main as cli

    sys.argv[0] = "llmkit"
    cli()


if __name__ == "__main__":
    main()
