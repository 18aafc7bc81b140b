"""The llama.cpp engine: the only module that drives llama.cpp at inference time."""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from llmkit.chat_template import new_media_marker
from llmkit.defaults import DEFAULT_CTX
from llmkit.engines._llama_vocab import (
    Sampled,
    TextStream,
    VocabText,
)
from llmkit.engines._llama_vocab import deferred_interrupt as _deferred_interrupt
from llmkit.engines._log import LogTail
from llmkit.engines.base import (
    Generation,
    Message,
    RGBImage,
    SamplingParams,
)
from llmkit.engines.ggml_cpu import hide_unsafe_buffer_types
from llmkit.engines.parallel import Job, ParallelDecoder, Result
from llmkit.errors import (
    ContextOverflowError,
    InputError,
    InvalidModelFileError,
    LlmkitError,
    SchemaError,
)
from llmkit.gguf_file import check_model_file, check_projector_file
from llmkit.hardware import INT32_MAX, MAX_PARALLEL, ThreadGovernor, resolve_device

DEFAULT_BATCH = 512

_log = LogTail()
_state: dict[str, Any] = {"verbose": False, "callback": None}


def _on_log(level: int, text: bytes, _user: Any) -> None:
    message = text.decode("utf-8", "replace")
    _log.append(level, message)
    if _state["verbose"]:
        sys.stderr.write(message)


def llama_module(verbose: bool = False) -> ModuleType:
    """Import llama_cpp once, routing its log to llmkit (shown on stderr only when verbose)."""
    import llama_cpp

    _state["verbose"] = verbose
    if _state["callback"] is None:
        callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        _state["callback"] = callback  # keep a reference: C holds only the pointer
        llama_cpp.llama_backend_init()
        # Before the first model load: llama.cpp reads the CPU's extra buffer types there.
        # The folder llama_cpp loaded its libraries from (LLAMA_CPP_LIB_PATH may move it).
        hide_unsafe_buffer_types(Path(getattr(llama_cpp.llama_cpp, "_base_path",
                                              Path(llama_cpp.__file__).parent / "lib")))
    return llama_cpp


def recent_log() -> list[str]:
    """The last lines llama.cpp logged (for error messages)."""
    return _log.lines()


def gpu_offload_supported() -> bool:
    """Whether the installed llama.cpp build can offload layers to a GPU."""
    return bool(llama_module().llama_supports_gpu_offload())


def backends() -> list[str]:
    """ggml backends shipped with the installed llama-cpp-python (cpu, cuda, metal, vulkan …)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    names: set[str] = set()
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            for lib in (Path(location) / "lib").glob("*ggml-*"):
                stem = lib.name.split(".")[0].removeprefix("lib").removeprefix("ggml-")
                if stem and stem != "base":
                    names.add(stem)
    return sorted(names) or ["cpu"]


# Special tokens that only the vocabularies of image-reading models carry: a GGUF that has one
# of them but no projector is a vision model missing its mmproj, not a text model.
IMAGE_TOKENS = ("<start_of_image>", "<|vision_start|>", "<fake_token_around_image>",
                "<|image_start|>", "<image_soft_token>", "<|image_pad|>")


def image_tokens_in_vocab(model_path: Path) -> list[str]:
    """Which :data:`IMAGE_TOKENS` the model's vocabulary holds as single tokens.

    Loads the vocabulary only (no weights), so it is quick even for large models.

    Raises:
        InvalidModelFileError: llama.cpp cannot read the file.
    """
    lc = llama_module()
    params = lc.llama_model_default_params()
    params.vocab_only = True
    params.n_gpu_layers = 0
    with _deferred_interrupt():
        model = lc.llama_model_load_from_file(str(model_path).encode("utf-8"), params)
    if not model:
        raise _load_failure(model_path)
    try:
        vocab = lc.llama_model_get_vocab(model)
        found = []
        for text in IMAGE_TOKENS:
            data = text.encode("utf-8")
            buf = (lc.llama_token * 16)()
            n = lc.llama_tokenize(vocab, data, len(data), buf, 16, False, True)
            if n == 1:
                found.append(text)
        return found
    finally:
        lc.llama_model_free(model)


# llama.cpp's pooling types (enum llama_pooling_type) that give one vector per text.
_POOLING_NAMES = {1: "mean", 2: "cls", 3: "last"}
# An embedding context outputs every token of a text, and llama.cpp then keeps (and computes)
# a logits row per token beside the pooled vector: n_tokens × n_vocab floats, 2 GiB for a
# 4096-token text on a 128k vocabulary. The texts one embeds are bounded to keep those rows
# under this many bytes.
EMBED_LOGITS_BYTES = 512 * 1024 * 1024


def grammar_from_json_schema(schema_text: str) -> str:
    """Turn a JSON schema into a GBNF grammar for constrained output.

    Raises:
        SchemaError: the text is not JSON or uses something the converter cannot express.
    """
    from llmkit.io import parse_json

    try:
        parse_json(schema_text)  # also a schema nested too deeply for the decoder
    except ValueError as exc:
        raise SchemaError(f"the JSON schema is not valid JSON: {exc}") from None
    llama_module()
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(schema_text))
    except Exception as exc:  # the converter raises bare exceptions for what it cannot express
        raise SchemaError(f"cannot build a grammar from the JSON schema: {exc}") from None


class LlamaCppEngine(VocabText):
    """A GGUF model loaded in llama.cpp with one context whose KV cache is reused across calls."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int | None = None,
        threads: int | None = None,
        device: str = "auto",
        gpu_layers: int | None = None,
        n_batch: int = DEFAULT_BATCH,
        verbose: bool = False,
        name: str | None = None,
        mmproj: str | Path | None = None,
        checked: bool = False,
        parallel: int = 1,
    ) -> None:
        """Load a model and create its context.

        Args:
            model_path: the .gguf file.
            n_ctx: context size in tokens; default min(4096, the model's training context).
            threads: CPU threads, exactly; default (None) the physical cores that other
                processes leave idle, measured during the load and again while generating.
            device: "auto", "cpu" or "gpu".
            gpu_layers: layers to offload (None: all when offloading).
            n_batch: tokens per prompt-evaluation batch.
            verbose: pass llama.cpp's log through to stderr.
            name: the model's name for reports (default: the file name).
            mmproj: the vision projector GGUF that lets the model see images.
            checked: the model file has just passed :func:`check_model_file` (engine
                selection reads it), so it is not parsed a second time.
            parallel: sequences :meth:`generate_many` decodes together; the KV cache then
                holds ``parallel × n_ctx`` cells, ``n_ctx`` for each sequence.

        Raises:
            InvalidModelFileError: not a GGUF, truncated, corrupt, or an unsupported architecture;
                or a projector that does not fit the model.
            DeviceError, UsageError: impossible device settings.
            LlmkitError: the context could not be created (usually not enough memory).
        """
        path = Path(model_path)
        if not checked:
            check_model_file(path)
        projector = Path(mmproj) if mmproj is not None else None
        if projector is not None:
            check_projector_file(projector)
        if n_ctx is not None and n_ctx < 16:
            raise InputError(f"--ctx {n_ctx} is too small", hint="use at least 16 tokens")
        if not 1 <= parallel <= MAX_PARALLEL:
            raise InputError(f"--parallel {parallel} is out of range",
                             hint=f"use 1 to {MAX_PARALLEL} sequences")
        if n_ctx is not None and n_ctx > INT32_MAX:
            # llama.cpp's context size is a uint32 that it adds to: larger would wrap around.
            raise InputError(f"--ctx {n_ctx} is larger than llama.cpp can hold",
                             hint=f"use at most {INT32_MAX} tokens")
        lc = llama_module(verbose)
        self._lc = lc
        self.path = path
        self.model_name = name or path.name
        choice = resolve_device(device, gpu_layers, bool(lc.llama_supports_gpu_offload()))
        self.device = choice.label
        # Its first reading of the machine's load is taken now, so the load is the sample.
        self._threads = ThreadGovernor(threads)
        t0 = time.perf_counter()
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0x7FFFFFFF if choice.n_gpu_layers < 0 else choice.n_gpu_layers
        _log.clear()
        self._model = None
        self._ctx = None
        self._embed_ctx: Any = None
        self._embed_lock = threading.Lock()
        self._mtmd: Any = None
        try:
            with _deferred_interrupt():
                self._model = lc.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
        except KeyboardInterrupt:
            self.close()
            raise
        if not self._model:
            raise _load_failure(path)
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_ctx_train = int(lc.llama_model_n_ctx_train(self._model))
        if n_ctx is None:
            n_ctx = min(DEFAULT_CTX, self.n_ctx_train) if self.n_ctx_train > 0 else DEFAULT_CTX
        if n_ctx * parallel > INT32_MAX:
            lc.llama_model_free(self._model)
            self._model = None
            raise InputError(f"--ctx {n_ctx} × --parallel {parallel} is more than llama.cpp "
                             "can hold", hint="lower --ctx or --parallel")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx * parallel
        cparams.n_batch = min(n_batch, n_ctx)
        cparams.n_ubatch = min(n_batch, n_ctx)
        if parallel > 1:
            # A cache of its own for each sequence (llama.cpp's "streams"): each attends
            # over its own cells only, as a lone sequence does, so it computes exactly what
            # the one-sequence path computes. (A unified cache measured different greedy
            # answers.) A shared prefix is copied between them instead of shared.
            cparams.n_seq_max = parallel
            cparams.kv_unified = False
        cparams.n_threads = self._threads.threads
        cparams.n_threads_batch = self._threads.threads
        try:
            with _deferred_interrupt():
                self._ctx = lc.llama_init_from_model(self._model, cparams)
        except KeyboardInterrupt:
            self.close()
            raise
        if not self._ctx:
            lc.llama_model_free(self._model)
            self._model = None
            raise LlmkitError(
                f"could not create a {n_ctx}-token context for {path.name}",
                hint="lower --ctx; the machine may be short of memory",
            )
        # llama.cpp rounds the context up (to a multiple of 256); keep to what was asked, so
        # --ctx 64 refuses a 200-token prompt instead of quietly using a bigger window.
        self.n_ctx = min(n_ctx, int(lc.llama_n_ctx(self._ctx)) // parallel)
        self.parallel = parallel
        self.n_batch = min(n_batch, n_ctx)
        self._retune_threads(min_window=0.0)
        self.load_ms = (time.perf_counter() - t0) * 1000
        self._cached: list[int] = []
        # len(_cached) when the context's last logits row is the one after _cached[-1] (from
        # the decode that wrote it), else -1: a prompt the cache holds whole is not
        # evaluated again, so a check's answer is sampled from the very row it was scored at.
        self._logits_at = -1
        self.last_decoder: ParallelDecoder | None = None
        self._marker = new_media_marker()
        self.mmproj = projector
        self._mrope = False
        if projector is not None:
            self._init_vision(projector, use_gpu=choice.n_gpu_layers != 0)
            self.load_ms = (time.perf_counter() - t0) * 1000

    @property
    def threads(self) -> int:
        """CPU threads llama.cpp runs now."""
        return self._threads.threads

    @property
    def threads_reason(self) -> str:
        """Why that many: "set by --threads", "set by LLMKIT_THREADS", or the load measured."""
        return self._threads.choice.reason

    def _retune_threads(self, *, min_window: float = ThreadGovernor.INTERVAL_S) -> None:
        """Follow the machine's load (when the count is llmkit's choice); cheap to call per
        token: it reads /proc/stat at most every ``min_window`` seconds."""
        if self._threads.update(min_window=min_window):
            n = self._threads.threads
            self._lc.llama_set_n_threads(self._ctx, n, n)

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Free the context and the model; the engine is unusable afterwards."""
        lc = self._lc
        with _deferred_interrupt():
            if getattr(self, "_mtmd", None):
                import llama_cpp.mtmd_cpp as mtmd

                mtmd.mtmd_free(self._mtmd)
                self._mtmd = None
            if getattr(self, "_embed_ctx", None):
                lc.llama_free(self._embed_ctx)
                self._embed_ctx = None
            if getattr(self, "_ctx", None):
                lc.llama_free(self._ctx)
                self._ctx = None
            if getattr(self, "_model", None):
                lc.llama_model_free(self._model)
                self._model = None

    def __enter__(self) -> LlamaCppEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter shutdown the modules close() needs may already be gone.
        with contextlib.suppress(Exception):
            self.close()

    # -- model facts ----------------------------------------------------------------------

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp reports it, or None."""
        buf = ctypes.create_string_buffer(4096)
        n = self._lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            self._lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    @property
    def n_params(self) -> int:
        """Number of parameters."""
        return int(self._lc.llama_model_n_params(self._model))

    # -- embeddings -------------------------------------------------------------------------

    @property
    def pooling(self) -> str:
        """How :meth:`embed` pools a text's token vectors: the model's own pooling (an
        embedding model's GGUF names it), else the mean, as llama-server's ``--pooling mean``."""
        return _POOLING_NAMES.get(self._pooling_type(), "mean")

    def _pooling_type(self) -> int:
        arch = self.metadata("general.architecture") or ""
        value = self.metadata(f"{arch}.pooling_type")
        lc = self._lc
        if value is not None and value.isdigit() and int(value) in (
                lc.LLAMA_POOLING_TYPE_MEAN, lc.LLAMA_POOLING_TYPE_CLS,
                lc.LLAMA_POOLING_TYPE_LAST):
            return int(value)
        return int(lc.LLAMA_POOLING_TYPE_MEAN)

    @property
    def embed_limit(self) -> int:
        """The most tokens :meth:`embed` takes in one text: :attr:`n_ctx`, or fewer where the
        per-token logits rows would pass :data:`EMBED_LOGITS_BYTES`."""
        n_vocab = max(1, int(self._lc.llama_vocab_n_tokens(self._vocab)))
        return min(self.n_ctx, max(64, EMBED_LOGITS_BYTES // (4 * n_vocab)))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One L2-normalised vector per text (as plain text, BOS first), pooled as
        :attr:`pooling` says, from a context of its own (created at the first call, with one
        sequence of :attr:`embed_limit` tokens) so that generation is not disturbed.

        Raises:
            InputError: an empty text.
            ContextOverflowError: a text longer than :attr:`embed_limit`.
            LlmkitError: llama.cpp failed.
        """
        import numpy as np

        limit = self.embed_limit
        tokenized = [self.tokenize(text, add_special=True) for text in texts]
        for tokens in tokenized:
            if len(tokens) > limit:
                raise ContextOverflowError(len(tokens), limit)
            if not tokens:
                raise InputError("a text to embed is empty")
        lc = self._lc
        with self._embed_lock:
            ctx = self._embedding_context()
            mem = lc.llama_get_memory(ctx)
            n_embd = int(lc.llama_model_n_embd(self._model))
            vectors = []
            for tokens in tokenized:
                lc.llama_memory_clear(mem, True)
                batch = lc.llama_batch_init(len(tokens), 0, 1)
                try:
                    for i, token in enumerate(tokens):
                        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = 1
                    batch.n_tokens = len(tokens)
                    with _deferred_interrupt():
                        rc = lc.llama_decode(ctx, batch)
                finally:
                    lc.llama_batch_free(batch)
                if rc != 0:
                    raise LlmkitError(f"llama.cpp failed to embed a text (code {rc})")
                row = lc.llama_get_embeddings_seq(ctx, 0)
                if not row:
                    raise LlmkitError("llama.cpp gave no pooled embedding")
                vector = np.ctypeslib.as_array(row, shape=(n_embd,)).astype(np.float64)
                norm = float(np.linalg.norm(vector))
                if not np.isfinite(norm):
                    raise LlmkitError("the model's embedding is not finite (damaged weights?)")
                vectors.append((vector / norm if norm > 0 else vector).tolist())
            return vectors

    def _embedding_context(self) -> Any:
        if self._embed_ctx is None:
            lc = self._lc
            cparams = lc.llama_context_default_params()
            cparams.n_ctx = self.embed_limit
            cparams.n_batch = cparams.n_ubatch = self.embed_limit  # a text is one batch
            cparams.embeddings = True
            cparams.pooling_type = self._pooling_type()
            cparams.n_threads = cparams.n_threads_batch = self._threads.threads
            with _deferred_interrupt():
                self._embed_ctx = lc.llama_init_from_model(self._model, cparams)
            if not self._embed_ctx:
                self._embed_ctx = None
                raise LlmkitError(f"could not create an embedding context for "
                                  f"{self.model_name}", hint="lower --ctx; the machine may "
                                  "be short of memory")
        return self._embed_ctx

    # -- the context ----------------------------------------------------------------------

    def cached_prefix_length(self, tokens: Sequence[int], *,
                             images: Sequence[RGBImage] = ()) -> int:
        """How many leading tokens of ``tokens`` the KV cache already holds.

        Raises:
            LlmkitError: ``images`` given (see :meth:`generate`).
        """
        self._refuse_token_images(images)
        keep = 0
        for a, b in zip(self._cached, tokens, strict=False):
            if a != b:
                break
            keep += 1
        return keep

    def forget(self) -> None:
        """Empty the KV cache, so the next prompt is evaluated from its first token."""
        lc = self._lc
        lc.llama_memory_clear(lc.llama_get_memory(self._ctx), True)
        self._cached.clear()
        self._logits_at = -1

    # -- images ---------------------------------------------------------------------------

    def _refuse_token_images(self, images: Sequence[RGBImage]) -> None:
        if images:
            raise LlmkitError(
                f"{self.model_name} cannot read pictures in a token prompt (llama.cpp's engine "
                "shows them only in a conversation)",
                hint="a safety check of a picture needs a guard that reads images, such as "
                     "llama-guard3:11b-vision")

    def _init_vision(self, projector: Path, *, use_gpu: bool) -> None:
        import llama_cpp.mtmd_cpp as mtmd

        mtmd.mtmd_helper_log_set(_state["callback"], ctypes.c_void_p(0))
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = self.threads
        params.print_timings = False
        _log.clear()
        try:
            with _deferred_interrupt():
                self._mtmd = mtmd.mtmd_init_from_file(
                    str(projector).encode("utf-8"), self._model, params)
        except KeyboardInterrupt:
            self.close()
            raise
        if not self._mtmd:
            detail = _last_error_line() or "llama.cpp could not load it"
            self.close()
            raise InvalidModelFileError(
                str(projector), f"is not a vision projector for {self.path.name}: {detail}",
                hint="use the mmproj file published with this model; -v shows llama.cpp's log",
            )
        if not mtmd.mtmd_support_vision(self._mtmd):
            self.close()
            raise InvalidModelFileError(str(projector), "is a projector without image input",
                                        hint="use the model's vision mmproj file")
        self._mrope = bool(mtmd.mtmd_decode_use_mrope(self._mtmd))

    @property
    def vision(self) -> bool:
        """Whether a projector is loaded, so the model can take images."""
        return self._mtmd is not None

    @property
    def max_images(self) -> int | None:
        """mtmd places every image in the context: as many as fit."""
        return None

    @property
    def media_marker(self) -> str:
        """The text that stands for an image inside a message's content.

        It is random per engine, so no text a user writes (mtmd's own ``<__media__>``
        included) can stand for an image.
        """
        return self._marker

    def _decode_at(self, tokens: Sequence[int], pos0: int, seq: int = 0,
                   track: bool = True) -> None:
        """Evaluate ``tokens`` at explicit positions from ``pos0`` into sequence ``seq``;
        logits for the last one. ``track``: they join the one-sequence cache's tokens."""
        lc = self._lc
        size = max(1, min(self.n_batch, len(tokens)))
        batch = lc.llama_batch_init(size, 0, 1)
        try:
            for start in range(0, len(tokens), size):
                self._retune_threads()
                part = tokens[start:start + size]
                for i, token in enumerate(part):
                    batch.token[i] = token
                    batch.pos[i] = pos0 + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = seq
                    batch.logits[i] = 0
                batch.logits[len(part) - 1] = 1
                batch.n_tokens = len(part)
                # Ctrl-C is held until the cells are recorded: llama.cpp logs while it builds
                # the graph, and an interrupt raised in the log callback would be lost.
                with _deferred_interrupt():
                    rc = lc.llama_decode(self._ctx, batch)
                    if rc == 0 and track:
                        self._cached.extend(part)
                if rc != 0:
                    raise LlmkitError(f"llama.cpp failed to evaluate the prompt (code {rc})")
        finally:
            lc.llama_batch_free(batch)

    def _eval_segments(self, segments: Sequence[_Segment], keep: int, seq: int = 0,
                       track: bool = True) -> int:
        """Evaluate the segments of an image prompt after the first ``keep`` positions into
        sequence ``seq`` (text in batches, images through the projector), logits for the last
        one; return how many cells were evaluated. ``track`` as :meth:`_decode_at`'s."""
        import llama_cpp.mtmd_cpp as mtmd

        evaluated = 0
        for seg in segments:
            if seg.end <= keep:
                continue
            if seg.chunk is None:
                skip = max(0, keep - seg.start)
                self._decode_at(seg.keys[skip:], seg.start + skip, seq, track)
                evaluated += len(seg.keys) - skip
                continue
            new_pos = self._lc.llama_pos(0)
            with _deferred_interrupt():
                rc = mtmd.mtmd_helper_eval_chunk_single(
                    self._mtmd, self._ctx, seg.chunk, seg.start, seq, self.n_batch, False,
                    ctypes.byref(new_pos))
            if rc != 0:
                raise LlmkitError(f"llama.cpp failed to encode an image (code {rc}; "
                                  f"{_last_error_line() or 'no detail'})")
            if track:
                self._cached.extend(seg.keys)
            evaluated += seg.n_tokens
        return evaluated

    def generate_with_images(
        self,
        messages: Sequence[Message],
        images: Sequence[RGBImage],
        params: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        *,
        reserve: int = 0,
    ) -> Generation:
        """Answer a conversation whose messages carry images at :attr:`media_marker`.

        The images are encoded by the projector and placed in the context; text before the
        first image that the context already holds, and images it already holds in the same
        place (a follow-up question about the same picture), are not evaluated again.

        Args:
            messages: role/content messages; each image's place is marked by ``media_marker``.
            images: one image per marker, in order, as RGB pixels.
            params: sampling settings.
            on_text: receives the reply as it is generated.
            reserve: context cells that must stay free for the answer.

        Returns:
            The generated text with counts (image tokens included) and timings.

        Raises:
            LlmkitError: no projector is loaded, or llama.cpp failed to encode an image.
            InputError: the markers and the images do not pair up.
            ContextOverflowError: the prompt with its images does not fit in the context.
        """
        self._logits_at = -1
        if self._mtmd is None:
            raise LlmkitError(f"{self.model_name} has no vision projector loaded")
        text, escapes = self._render_prompt(messages)
        t0 = time.perf_counter()
        t_prompt = t0
        prompt = self._media_prompt(text, escapes, images)
        try:
            n_cells = prompt.n_cells
            if n_cells >= self.n_ctx or n_cells + reserve > self.n_ctx:
                raise ContextOverflowError(n_cells, self.n_ctx, reserve=reserve)
            keep = self._keep(prompt.keep(self.cached_prefix_length(prompt.plan)),
                              len(prompt.plan))
            sampler = self._sampler(params)
            evaluated = 0
            try:
                evaluated = self._eval_segments(prompt.segments, keep)
                t_prompt = time.perf_counter()
                sampled = self._sample_loop(sampler, params, self.n_ctx - n_cells, on_text,
                                            explicit_pos=self._mrope)
            except KeyboardInterrupt:
                sampled = Sampled([], [], "interrupted", t_prompt)
            finally:
                self._lc.llama_sampler_free(sampler)
        finally:
            prompt.close()
        segments = prompt.segments
        result = sampled.generation(n_cells, evaluated if t_prompt > t0 else 0, t0, t_prompt)
        result.image_tokens = sum(seg.n_tokens for seg in segments if seg.chunk is not None)
        return result

    def _tokenize_image(self, mtmd: Any, chunks: Any, bitmap: Any) -> None:
        """Fill ``chunks`` with one image as mtmd lays it out: behind its default marker."""
        marker = mtmd.mtmd_default_marker()
        inp = mtmd.mtmd_input_text()
        inp.text = marker
        inp.text_len = len(marker)
        inp.add_special = False
        inp.parse_special = True  # the marker alone: only mtmd's own wrapper text is parsed
        array = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        rc = mtmd.mtmd_tokenize(self._mtmd, chunks, ctypes.byref(inp), array, 1)
        if rc != 0:
            raise LlmkitError(f"llama.cpp could not prepare the image prompt (code {rc}; "
                              f"{_last_error_line() or 'no detail'})")

    def _media_prompt(self, text: str, escapes: Any, images: Sequence[RGBImage]
                      ) -> _MediaPrompt:
        """The segments of a rendered prompt whose images sit at :attr:`media_marker`: its
        text tokenized here, never by mtmd (which would parse special tokens in all of it);
        mtmd sees each image alone, behind its own marker, and gives the image's chunks with
        the wrapper tokens its projector puts around them. The caller closes it."""
        import hashlib

        import llama_cpp.mtmd_cpp as mtmd

        marker = self.media_marker
        if text.count(marker) != len(images):
            raise InputError(f"the prompt marks {text.count(marker)} image(s) but "
                             f"{len(images)} were given")
        prompt = _MediaPrompt()
        try:
            keys: list[int] = []
            for image in images:
                data = ctypes.cast(ctypes.c_char_p(image.rgb), ctypes.POINTER(ctypes.c_uint8))
                bitmap = mtmd.mtmd_bitmap_init(image.width, image.height, data)
                if not bitmap:
                    raise LlmkitError("llama.cpp could not take an image "
                                      f"of {image.width}x{image.height} pixels")
                prompt.bitmaps.append(bitmap)
                digest = hashlib.blake2b(image.rgb, digest_size=8)
                digest.update(f"{image.width}x{image.height}".encode())
                image_id = digest.hexdigest()
                mtmd.mtmd_bitmap_set_id(bitmap, image_id.encode())
                # Images sit in the cached-token list as a run of one negative id per position,
                # which no real token matches, so prefix reuse stops at a changed image.
                keys.append(int(image_id[:7], 16))
            segments = prompt.segments
            for i, run in enumerate(text.split(marker)):
                tokens = self._text_tokens(run, escapes)
                if i == 0:
                    tokens = self._with_bos(tokens)
                if tokens:
                    start = segments[-1].end if segments else 0
                    segments.append(_Segment(start, tokens, len(tokens)))
                if i < len(images):
                    chunks = mtmd.mtmd_input_chunks_init()
                    prompt.collections.append(chunks)
                    self._tokenize_image(mtmd, chunks, prompt.bitmaps[i])
                    segments.extend(_image_segments(mtmd, chunks, keys[i],
                                                    segments[-1].end if segments else 0))
        except BaseException:
            prompt.close()
            raise
        return prompt

    @property
    def parallel_images(self) -> bool:
        """Whether :meth:`media_job` can put images in the parallel sequences (a projector
        loaded, and its positions one per cell)."""
        return self.parallel > 1 and self._mtmd is not None and not self._mrope

    def media_job(self, key: Any, messages: Sequence[Message], images: Sequence[RGBImage],
                  params: SamplingParams) -> Job | None:
        """A job of :meth:`generate_many` for a conversation with images (as
        :meth:`generate_with_images` takes it), or None where images cannot share the
        context's sequences (a projector whose positions run ahead of the cells: M-RoPE).
        The job's prompt is encoded when its sequence is admitted; ``job.media.close()``
        frees it once its result is in.
        """
        if self._mtmd is None:
            raise LlmkitError(f"{self.model_name} has no vision projector loaded")
        if self._mrope:
            return None
        text, escapes = self._render_prompt(messages)
        prompt = self._media_prompt(text, escapes, images)
        prompt.evaluate = lambda seq, keep: self._eval_segments(prompt.segments, keep, seq,
                                                                track=False)
        return Job(key, prompt.plan, params, media=prompt)

    # -- generation -----------------------------------------------------------------------

    def generate_many(self, jobs: Iterable[Job], *, live: bool = False,
                      batch_prompts: bool = False) -> Iterator[Result]:
        """Generate ``jobs`` up to :attr:`parallel` at a time in one batch per step, yielding
        each result as it finishes (see :class:`llmkit.engines.parallel.ParallelDecoder`).

        Each job starts from the cache the one before it left, as one :meth:`generate` after
        another would; the cache is then the last job's. ``live``: jobs from a source that
        may keep one waiting (stdin), each admitted as it arrives. ``batch_prompts``: the
        prompts of jobs admitted together are evaluated together (see ParallelDecoder).
        """
        self._logits_at = -1
        decoder = ParallelDecoder(self._lc, self._ctx, self._vocab, n_seq=self.parallel,
                                  n_ctx_seq=self.n_ctx, n_batch=self.n_batch,
                                  make_sampler=self._sampler, retune=self._retune_threads,
                                  batch_prompts=batch_prompts)
        self.last_decoder = decoder
        try:
            yield from decoder.run(jobs, held=list(self._cached), live=live)
        finally:
            # Sequence 0, the one the other calls use, holds what they would have left.
            self._cached[:] = decoder.held

    def _decode_prompt(self, tokens: Sequence[int]) -> None:
        lc = self._lc
        for start in range(0, len(tokens), self.n_batch):
            self._retune_threads()
            chunk = tokens[start:start + self.n_batch]
            arr = (lc.llama_token * len(chunk))(*chunk)
            with _deferred_interrupt():  # as in _decode_at
                rc = lc.llama_decode(self._ctx, lc.llama_batch_get_one(arr, len(chunk)))
                if rc == 0:
                    self._cached.extend(chunk)
                    self._logits_at = len(self._cached)
            if rc != 0:
                self._logits_at = -1
                raise LlmkitError(f"llama.cpp failed to evaluate the prompt (code {rc})")

    def _prepare(self, prompt: Sequence[int]) -> int:
        """Keep the cached prefix of ``prompt``; return how many tokens are kept (all of them
        when the cache holds exactly ``prompt`` and the logits after it)."""
        keep = self.cached_prefix_length(prompt)
        if keep == len(prompt) == len(self._cached) == self._logits_at:
            return keep
        return self._keep(keep, len(prompt))

    def _keep(self, keep: int, length: int) -> int:
        """Drop the KV cache after ``keep`` tokens of a ``length``-token prompt; return what
        was kept (the last prompt token is always decoded again, for fresh logits)."""
        keep = min(keep, length - 1)
        lc = self._lc
        mem = lc.llama_get_memory(self._ctx)
        if not lc.llama_memory_seq_rm(mem, -1, keep, -1):
            lc.llama_memory_clear(mem, True)
            keep = 0
        del self._cached[keep:]
        self._logits_at = -1
        return keep

    def next_token_logits(self, prompt: Sequence[int], *,
                          images: Sequence[RGBImage] = ()) -> Any:
        """Evaluate ``prompt`` and return the logits for the token that would follow it.

        Returns:
            A float32 numpy array of vocabulary size (a copy).

        Raises:
            InputError: empty prompt.
            ContextOverflowError: the prompt does not fit.
            LlmkitError: ``images`` given (see :meth:`generate`).
        """
        import numpy as np

        self._refuse_token_images(images)
        if not prompt:
            raise InputError("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(len(prompt), self.n_ctx)
        keep = self._prepare(prompt)
        self._decode_prompt(prompt[keep:])
        lc = self._lc
        n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        pointer = lc.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(n_vocab,)).copy()

    def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        *,
        images: Sequence[RGBImage] = (),
    ) -> Generation:
        """Evaluate ``prompt`` (reusing the cached prefix) and sample a continuation.

        Sampling stays inside llama.cpp's sampler chain; Python only moves one token id and
        its text per step. Ctrl-C ends the generation early with finish_reason "interrupted".

        Args:
            prompt: token ids, e.g. from :meth:`chat_tokens`.
            params: sampling settings, an optional max token count and grammar.
            on_text: called with each new piece of text as soon as it is complete UTF-8.

        Returns:
            The generated text, token counts and timings.

        Raises:
            InputError: empty prompt.
            ContextOverflowError: the prompt does not fit in the context.
            LlmkitError: ``images`` given: llama.cpp's multimodal library places a picture
                only where its own chunking of a rendered conversation puts it
                (:meth:`generate_with_images`), never at a token of a prompt.
        """
        self._refuse_token_images(images)
        lc = self._lc
        n_prompt = len(prompt)
        if n_prompt == 0:
            raise InputError("the prompt is empty")
        if n_prompt >= self.n_ctx:
            raise ContextOverflowError(n_prompt, self.n_ctx)
        keep = self._prepare(prompt)
        sampler = self._sampler(params)
        t0 = time.perf_counter()
        t_prompt = t0
        try:
            self._decode_prompt(prompt[keep:])
            t_prompt = time.perf_counter()
            sampled = self._sample_loop(sampler, params, self.n_ctx - len(self._cached), on_text)
        except KeyboardInterrupt:
            sampled = Sampled([], [], "interrupted", t_prompt)
        finally:
            lc.llama_sampler_free(sampler)
        return sampled.generation(n_prompt, n_prompt - keep if t_prompt > t0 else 0,
                                  t0, t_prompt)

    def _sample_loop(self, sampler: Any, params: SamplingParams, room: int,
                     on_text: Callable[[str], None] | None, *, explicit_pos: bool = False
                     ) -> Sampled:
        """Sample and decode tokens until end of generation, the token limit, or a full context.

        ``explicit_pos`` passes each token's position to llama.cpp (M-RoPE models after an
        image, whose positions run ahead of the number of cached tokens); otherwise llama.cpp
        numbers them itself, which is the cheapest call.
        """
        lc = self._lc
        stream = TextStream(lc, self._vocab, on_text)
        generated: list[int] = []
        out = Sampled(stream.pieces, generated, "length", time.perf_counter())
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        if explicit_pos:
            batch = lc.llama_batch_init(1, 0, 1)
            batch.n_tokens = 1
            batch.n_seq_id[0] = 1
            batch.seq_id[0][0] = 0
            batch.logits[0] = 1
            one, pos = batch.token, batch.pos
        else:
            one = (lc.llama_token * 1)()
            batch = lc.llama_batch_get_one(one, 1)
            pos = None
        sample, is_eog, decode, push, held = (
            lc.llama_sampler_sample, lc.llama_vocab_is_eog, lc.llama_decode, stream.push,
            _deferred_interrupt)
        ctx, vocab, cached, retune = self._ctx, self._vocab, self._cached, self._retune_threads
        self._logits_at = -1
        try:
            while len(generated) < limit:
                retune()
                token = sample(sampler, ctx, -1)
                if is_eog(vocab, token):
                    out.finish = "stop"
                    break
                if not generated:
                    out.t_first = time.perf_counter()
                generated.append(token)
                push(token)
                one[0] = token
                if pos is not None:
                    pos[0] = len(cached)
                with held():  # a Ctrl-C in llama.cpp's log callback is not lost (5.8 µs)
                    if decode(ctx, batch) != 0:
                        raise LlmkitError("llama.cpp failed to evaluate a generated token")
                    cached.append(token)
            else:
                if params.max_tokens is None or params.max_tokens > room:
                    out.finish = "context"
            stream.finish()
            if not explicit_pos:
                self._logits_at = len(cached)  # the row after the last token decoded
        except KeyboardInterrupt:
            out.finish = "interrupted"
        finally:
            if explicit_pos:
                lc.llama_batch_free(batch)
        return out


@dataclass
class _Segment:
    """One piece of a tokenized image prompt: text tokens, or an image chunk."""

    start: int  # first position
    keys: list[int]  # token ids, or one image id per position
    n_tokens: int  # context cells it takes
    chunk: Any = None  # the mtmd chunk of an image, None for text

    @property
    def end(self) -> int:
        return self.start + len(self.keys)


@dataclass
class _MediaPrompt:
    """A prompt with images, tokenized: its segments and the mtmd objects they point into."""

    segments: list[_Segment] = field(default_factory=list)
    bitmaps: list[Any] = field(default_factory=list)
    collections: list[Any] = field(default_factory=list)
    # evaluate(seq, keep): the segments after ``keep`` positions into sequence ``seq``
    evaluate: Callable[[int, int], int] = lambda seq, keep: 0

    @property
    def plan(self) -> list[int]:
        """One key per position: text tokens, and each image's negative ids."""
        return [key for seg in self.segments for key in seg.keys]

    @property
    def n_cells(self) -> int:
        return sum(seg.n_tokens for seg in self.segments)

    @property
    def image_tokens(self) -> int:
        return sum(seg.n_tokens for seg in self.segments if seg.chunk is not None)

    def keep(self, shared: int) -> int:
        """``shared`` cached positions cut back to a segment boundary or into text: half an
        image cannot be kept; the last position is always evaluated again."""
        keep = min(shared, len(self.plan) - 1)
        for seg in self.segments:
            if seg.chunk is not None and seg.start < keep < seg.end:
                keep = seg.start
        return keep

    def close(self) -> None:
        """Free the mtmd objects (once)."""
        import llama_cpp.mtmd_cpp as mtmd

        for chunks in self.collections:
            mtmd.mtmd_input_chunks_free(chunks)
        for bitmap in self.bitmaps:
            mtmd.mtmd_bitmap_free(bitmap)
        self.collections, self.bitmaps = [], []


def _image_segments(mtmd: Any, chunks: Any, key: int, pos: int) -> list[_Segment]:
    """The segments of one image's chunks from position ``pos``: mtmd's wrapper text tokens,
    and each image chunk as one negative id per position (from ``key``, the image's hash, and
    the chunk's place, for projectors that cut an image into slices)."""
    segments: list[_Segment] = []
    n_images = 0
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        kind = mtmd.mtmd_input_chunk_get_type(chunk)
        if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t(0)
            pointer = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            tokens = [pointer[j] for j in range(n.value)]
            if tokens:
                segments.append(_Segment(pos, tokens, len(tokens)))
        else:
            n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
            image_key = -1 - ((key + n_images) & 0x0FFFFFFF)
            n_images += 1
            segments.append(_Segment(pos, [image_key] * n_pos,
                                     int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)), chunk))
        if segments:
            pos = segments[-1].end
    return segments


def _last_error_line(words: tuple[str, ...] = ("error", "failed")) -> str:
    """The last line llama.cpp logged that mentions one of ``words``, or ''."""
    lines = [line.strip() for line in recent_log() if any(w in line.lower() for w in words)]
    return lines[-1] if lines else ""


def _load_failure(path: Path) -> LlmkitError:
    """Explain why llama.cpp refused a file: our own GGUF check first, then llama.cpp's log."""
    from llmkit.gguf_file import read_info

    info = read_info(path)  # raises InvalidModelFileError for truncated or corrupt files
    # llama.cpp logs the reason as "llama_model_load: error loading model: …" and then a
    # generic "failed to load model": the reason is the line worth showing.
    reasons = [line.split("error loading model:", 1)[1].strip() for line in recent_log()
               if "error loading model:" in line]
    detail = (reasons[-1] if reasons and reasons[-1] else
              _last_error_line(("error", "failed", "unknown")) or "llama.cpp could not load it")
    if "unknown model architecture" in detail or "unknown architecture" in detail:
        return InvalidModelFileError(
            str(path), f"architecture '{info.architecture}' is not supported by this llama.cpp",
            hint="`llmkit doctor` shows the llama.cpp version",
        )
    return InvalidModelFileError(str(path), f"cannot be loaded: {detail}",
                                 hint="run with -v to see llama.cpp's log")
