"""The raw mtmd baseline for bench_caption.py: the bindings' C API, no llmkit code at all.

    python _raw_mtmd.py MODEL MMPROJ PROMPT_FILE THREADS MAX_TOKENS IMAGE...

Loads the model and projector once; per image: stb decodes the file
(mtmd_helper_bitmap_init_from_file), mtmd_tokenize on the same rendered prompt llmkit sends,
mtmd_helper_eval_chunks, then greedy sampling until end of generation or MAX_TOKENS. Prints one
JSON line per image with its time and the generated token ids.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time


def main() -> None:
    model_path, mmproj_path, prompt_file, threads_s, max_s, *images = sys.argv[1:]
    threads, max_tokens = int(threads_s), int(max_s)
    import llama_cpp as lc
    import llama_cpp.mtmd_cpp as mtmd

    quiet = lc.llama_log_callback(lambda level, text, user: None)
    lc.llama_log_set(quiet, ctypes.c_void_p(0))
    mtmd.mtmd_helper_log_set(quiet, ctypes.c_void_p(0))
    lc.llama_backend_init()
    with open(prompt_file, encoding="utf-8") as fh:
        prompt = fh.read().encode("utf-8")
    mparams = lc.llama_model_default_params()
    model = lc.llama_model_load_from_file(model_path.encode(), mparams)
    vocab = lc.llama_model_get_vocab(model)
    cparams = lc.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 4096, 512, 512
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = lc.llama_init_from_model(model, cparams)
    vparams = mtmd.mtmd_context_params_default()
    vparams.n_threads = threads
    vparams.print_timings = False
    vctx = mtmd.mtmd_init_from_file(mmproj_path.encode(), model, vparams)
    assert vctx, "mtmd could not load the projector"
    sampler = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
    lc.llama_sampler_chain_add(sampler, lc.llama_sampler_init_greedy())
    bos = lc.llama_vocab_bos(vocab)
    bos_text = lc.llama_vocab_get_text(vocab, bos) if bos >= 0 else None
    add_bos = bool(lc.llama_vocab_get_add_bos(vocab)) and not (
        bos_text and prompt.startswith(bos_text))
    one = (lc.llama_token * 1)()
    batch = lc.llama_batch_get_one(one, 1)
    for image in images:
        t0 = time.perf_counter()
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        bitmap = mtmd.mtmd_helper_bitmap_init_from_file(vctx, image.encode(), False)
        chunks = mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text()
        text.text, text.text_len = prompt, len(prompt)
        text.add_special, text.parse_special = add_bos, True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(vctx, chunks, ctypes.byref(text), bitmaps, 1) == 0
        n_past = lc.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(vctx, ctx, chunks, 0, 0, 512, True,
                                            ctypes.byref(n_past)) == 0
        t_prompt = time.perf_counter()
        tokens, pieces = [], b""
        buf = ctypes.create_string_buffer(256)
        for _ in range(max_tokens):
            token = lc.llama_sampler_sample(sampler, ctx, -1)
            if lc.llama_vocab_is_eog(vocab, token):
                break
            tokens.append(token)
            n = lc.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
            pieces += buf.raw[:max(0, n)]
            one[0] = token
            assert lc.llama_decode(ctx, batch) == 0
        t_end = time.perf_counter()
        mtmd.mtmd_input_chunks_free(chunks)
        mtmd.mtmd_bitmap_free(bitmap)
        print(json.dumps({"path": image, "total_ms": (t_end - t0) * 1000,
                          "prompt_ms": (t_prompt - t0) * 1000, "tokens": tokens,
                          "text": pieces.decode("utf-8", "replace")}), flush=True)
    lc.llama_sampler_free(sampler)
    mtmd.mtmd_free(vctx)
    lc.llama_free(ctx)
    lc.llama_model_free(model)


if __name__ == "__main__":
    main()
