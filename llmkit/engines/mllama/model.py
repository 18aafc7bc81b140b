"""Llama 3.2 Vision's forward pass on ggml: weights, caches, image encoding and evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.defaults import DEFAULT_CTX
from llmkit.engines.mllama import text
from llmkit.engines.mllama._backend import Backend, Graph, Runner, State, Timings, Weights
from llmkit.engines.mllama._ggml import GgmlType
from llmkit.errors import InputError, InvalidModelFileError, LlmkitError, UsageError
from llmkit.hardware import INT32_MAX, ThreadGovernor

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from llmkit.engines.mllama.hparams import MllamaFile
    from llmkit.engines.mllama.preprocess import TiledImage

__all__ = ["KV_TYPES", "MllamaModel", "StepTimings"]

KV_TYPES = {"f16": GgmlType.F16, "f32": GgmlType.F32}
_HINT = "convert the model again with llmkit convert"


@dataclass(frozen=True)
class StepTimings:
    """Where the last evaluation's time went, in µs (build and alloc are 0 when the decode
    graph of the step before was computed again)."""

    n_tokens: int
    build_us: float
    alloc_us: float
    compute_us: float
    reused: bool


class MllamaModel:
    """Llama 3.2 Vision's forward pass, as :class:`~.engine.Forward` describes it.

    Weights stay in the file's memory map (on the CPU the matrices ggml repacks are copied
    into its repacking buffer instead); the self-attention K/V of every self layer and the
    cross-attention K/V of one image live in one persistent backend buffer. A decode step
    (one token) keeps its prepared graph and computes it again for the next token while the
    attention window (rounded up to :data:`~.text.KV_PAD` positions) stays the same.
    """

    def __init__(self, file: MllamaFile, *, n_ctx: int | None = None,
                 threads: int | None = None, device: str = "auto",
                 gpu_layers: int | None = None, kv_type: str = "f16",
                 vision_flash_attn: bool = True, repack: bool = True) -> None:
        """Bind the weights of a checked Llama 3.2 Vision GGUF and allocate the caches.

        Args:
            file: from :func:`~.hparams.read_mllama`.
            n_ctx: context length in tokens; default min(4096, the training context).
            threads: CPU threads, exactly; default the idle physical cores, measured again
                as the work goes on (as the llama.cpp engine chooses them).
            device: "auto", "cpu" or "gpu".
            gpu_layers: 0 for the CPU; anything else needs a GPU build, which offloads
                every layer.
            kv_type: "f16" (default: half the memory) or "f32" for both caches.
            vision_flash_attn: the vision tower's attention as ggml's fused flash attention
                (default), which never holds the heads × 6432² scores of a published model
                (2.6 GB a layer in F32); False for the plain product and softmax.
            repack: on the CPU, copy the matrices ggml has interleaved kernels for into its
                repacking buffer type (default, as llama.cpp's ``--repack``; Q4_K_M on a
                2-core AVX-512 EPYC: decode 1.10x, prompt 0.55x, as llama-bench's own); False
                keeps every weight in the file's map.

        Raises:
            InvalidModelFileError: a tensor missing, misshapen or of a type the graphs
                cannot take (named).
            InputError: a context below 16 tokens or past 32 bits.
            UsageError, DeviceError: impossible device settings.
        """
        self._closed = True
        self._weights: Weights | None = None
        self._state: State | None = None
        self._runner: Runner | None = None
        self._backend: Backend | None = None
        # The decode graph kept for the next token: (n_kv, image tokens), the graph, and the
        # runner generation it belongs to.
        self._decode: tuple[tuple[int, int], Graph, int] | None = None
        if n_ctx is not None and n_ctx < 16:
            raise InputError(f"--ctx {n_ctx} is too small", hint="use at least 16 tokens")
        if n_ctx is not None and n_ctx > INT32_MAX:
            raise InputError(f"--ctx {n_ctx} is larger than the engine can hold",
                             hint=f"use at most {INT32_MAX} tokens")
        if kv_type not in KV_TYPES:
            raise UsageError(f"unknown cache type {kv_type!r}", hint="use f16 or f32")
        self.file = file
        self.tp = file.text
        self.vp = file.vision
        self._governor = ThreadGovernor(threads)
        tp = self.tp
        if n_ctx is None:
            n_ctx = min(DEFAULT_CTX, tp.n_ctx_train)
        self.n_ctx: int = n_ctx
        self.n_vocab: int = tp.n_vocab
        self.n_image_max = self.vp.max_tiles * self.vp.n_patches
        self.kv_type = kv_type
        self.vision_flash_attn = vision_flash_attn
        try:
            # The llama.cpp engine's own rules and messages for --device/--gpu-layers.
            self._backend = Backend(device, threads=self._governor.threads,
                                    gpu_layers=gpu_layers)
            if self._backend.label.startswith("gpu ("):
                raise UsageError("the Llama 3.2 Vision engine offloads every layer or none",
                                 hint="leave out --gpu-layers, or use --device cpu")
            self.device: str = self._backend.kind
            self._weights = Weights(file.path, self._backend, self._expected(), repack=repack)
            self._state = State(self._backend, text.cache_specs(
                tp, n_ctx, self.n_image_max, KV_TYPES[kv_type]))
            self._runner = Runner(self._backend)
        except BaseException:
            self._free()
            raise
        self._embedding_rows = file.tensors["token_embd.weight"].shape[0]
        self._n_cached = 0
        self._n_image = 0
        self.last: StepTimings | None = None
        self._closed = False

    @classmethod
    def open(cls, path: str | Path, n_ctx: int | None = None, threads: int | None = None,
             device: str = "auto", gpu_layers: int | None = None, *, kv_type: str = "f16"
             ) -> MllamaModel:
        """Read and check a Llama 3.2 Vision GGUF, then load it (see :meth:`__init__`).

        Raises:
            InvalidModelFileError: not an mllama GGUF in llmkit's layout, or damaged.
            InputError, UsageError, DeviceError: as :meth:`__init__`.
        """
        from llmkit.engines.mllama.hparams import read_mllama

        return cls(read_mllama(Path(path)), n_ctx=n_ctx, threads=threads, device=device,
                   gpu_layers=gpu_layers, kv_type=kv_type)

    def _expected(self) -> dict[str, Any]:
        tensors = self.file.tensors
        entry = tensors.get("token_embd.weight")
        if entry is None:
            raise InvalidModelFileError(str(self.file.path), "has no tensor token_embd.weight",
                                        hint=_HINT)
        rows = entry.shape[0] if len(entry.shape) == 2 else -1
        tp = self.tp
        if rows < tp.n_vocab or rows <= tp.image_token:
            raise InvalidModelFileError(
                str(self.file.path), f"tensor token_embd.weight has shape {list(entry.shape)}, "
                f"expected at least {max(tp.n_vocab, tp.image_token + 1)} rows of {tp.n_embd}",
                hint=_HINT)
        from llmkit.engines.mllama import vision

        want: dict[str, Any] = dict(vision.expected_tensors(self.vp, tp.n_embd))
        want |= text.expected_tensors(tp, rows)
        return want

    # -- what the engine reads ------------------------------------------------------------

    @property
    def threads(self) -> int:
        """CPU threads it computes with now."""
        return self._governor.threads

    @property
    def threads_reason(self) -> str:
        """Why that many threads."""
        return self._governor.choice.reason

    @property
    def tile_size(self) -> int:
        """Tile side in pixels."""
        return self.vp.image_size

    @property
    def max_tiles(self) -> int:
        """Tiles per image."""
        return self.vp.max_tiles

    @property
    def image_mean(self) -> tuple[float, float, float]:
        """Per-channel mean the tiles are normalized with."""
        return self.vp.image_mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        """Per-channel standard deviation the tiles are normalized with."""
        return self.vp.image_std

    @property
    def n_cached(self) -> int:
        """Positions the self-attention cache holds."""
        return self._n_cached

    @property
    def image_tokens(self) -> int:
        """Vision tokens of the kept image (0: none)."""
        return self._n_image

    def memory(self) -> dict[str, int]:
        """Bytes of the weights (mapped, repacked or offloaded), the caches and the compute
        buffer."""
        w = self._live_weights()
        return {"weights": w.mapped_bytes + w.offloaded_bytes + w.repacked_bytes,
                "caches": self._live_state().nbytes,
                "compute": self._live_runner().compute_buffer_bytes()}

    # -- the image --------------------------------------------------------------------------

    def encode_image(self, tiled: TiledImage) -> None:
        """Run the vision tower on the tiles and keep every cross layer's K/V of the image.

        The tower, the projector and the K/V projections are one graph whose results are
        copied into the persistent cache (never left in the allocator's buffers); only the
        real tiles' tokens are projected and kept.

        Raises:
            UsageError: tiles of another size, count or aspect-ratio id than the model's.
            ComputeError: ggml could not allocate or compute the graph.
        """
        from llmkit.engines.mllama import vision

        vp, tp = self.vp, self.tp
        inputs = vision.vision_inputs(tiled, vp)
        n_image = tiled.num_tiles * vp.n_patches
        weights, state = self._live_weights(), self._live_state()
        flash = self.vision_flash_attn
        self._n_image = 0
        self._drop_decode()
        self._live_runner().run(lambda c: text.build_cross_kv(
            c, weights.tensors, tp, state.tensors,
            vision.build(c, weights.tensors, vp, inputs, flash_attn=flash), n_image))
        self._n_image = n_image

    def encode_states(self, states: npt.NDArray[np.float32]) -> None:
        """Keep the cross-attention K/V of image states the projector gave elsewhere.

        The text half of :meth:`encode_image`, for tests that feed a reference vision
        tower's output.

        Args:
            states: float32 [n_tokens, n_embd], the real tiles' tokens in order.

        Raises:
            InputError: states of the wrong width, or more tokens than an image has.
        """
        import numpy as np

        tp = self.tp
        data = np.ascontiguousarray(states, dtype=np.float32)
        if data.ndim != 2 or data.shape[1] != tp.n_embd or not 0 < data.shape[0] <= \
                self.n_image_max:
            raise InputError(f"image states of shape {data.shape} do not fit (at most "
                             f"{self.n_image_max} tokens of {tp.n_embd})")
        weights, state = self._live_weights(), self._live_state()
        self._n_image = 0
        self._drop_decode()
        self._live_runner().run(lambda c: text.build_cross_kv(
            c, weights.tensors, tp, state.tensors, c.input(data, name="image"), data.shape[0]))
        self._n_image = int(data.shape[0])

    def drop_image(self) -> None:
        """Forget the kept image (its K/V stay in the buffer, never read again)."""
        self._n_image = 0

    # -- evaluation ---------------------------------------------------------------------------

    def eval(self, tokens: Sequence[int], n_past: int, image_from: int | None
             ) -> npt.NDArray[np.float32]:
        """Keep the first ``n_past`` cached positions, append ``tokens`` after them, and
        return the last token's logits.

        Args:
            tokens: token ids (at least one).
            n_past: cached positions to keep (at most those the cache holds).
            image_from: the position of ``<|image|>``: rows at positions ≥ it attend to the
                kept image; None (or rows before it) see none.

        Returns:
            float32 [n_vocab].

        Raises:
            InputError: no tokens, a token id outside the vocabulary, or a step past the
                context.
            LlmkitError: ``image_from`` without a kept image, or ``n_past`` past the cache.
            ComputeError: ggml could not allocate or compute the graph.
        """
        logits = self._eval(tokens, n_past, image_from, all_logits=False)
        return logits.reshape(self.n_vocab)

    def eval_rows(self, tokens: Sequence[int], n_past: int, image_from: int | None
                  ) -> npt.NDArray[np.float32]:
        """As :meth:`eval`, but every row's logits (float32 [len(tokens), n_vocab]); for
        parity tests."""
        return self._eval(tokens, n_past, image_from, all_logits=True).reshape(
            len(tokens), self.n_vocab)

    def _eval(self, tokens: Sequence[int], n_past: int, image_from: int | None, *,
              all_logits: bool) -> npt.NDArray[np.float32]:
        import numpy as np

        self._check_open()
        ids = np.asarray(list(tokens), dtype=np.int64)
        if ids.ndim != 1 or ids.size == 0:
            raise InputError("the prompt is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= self._embedding_rows:
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise InputError(f"token id {bad} is outside the model's vocabulary "
                             f"({self._embedding_rows} tokens)")
        if not 0 <= n_past <= self._n_cached:
            raise LlmkitError(f"cannot keep {n_past} cached positions: the cache holds "
                              f"{self._n_cached}")
        if n_past + ids.size > self.n_ctx:
            raise InputError(f"{n_past + ids.size} tokens do not fit the {self.n_ctx}-token "
                             "context", hint="use a larger --ctx")
        if image_from is not None and not self._n_image:
            raise LlmkitError("rows are to attend to an image, but none is encoded")
        self._retune()
        # Truncate first: an interrupted step leaves the cache holding only what is valid.
        self._n_cached = n_past
        step = text.step_inputs(ids.astype(np.int32), n_past, self.n_ctx, image_from)
        n_image = self._n_image if step.cross_rows is not None else 0
        runner = self._live_runner()
        key = (step.n_kv, n_image)
        reused = False
        graph: Graph
        if ids.size == 1 and not all_logits and self._decode is not None \
                and self._decode[0] == key and self._decode[2] == runner.generation:
            graph = self._decode[1]
            graph.set(text.IN_TOKENS, step.tokens)
            graph.set(text.IN_POS, step.positions)
            graph.set(text.IN_ROWS, step.rows)
            graph.set(text.IN_MASK, step.mask)
            if step.cross_rows is not None and n_image:
                graph.set(text.IN_CROSS_ROWS, step.cross_rows)
            reused = True
        else:
            self._drop_decode()
            weights, state, tp = self._live_weights(), self._live_state(), self.tp
            graph = runner.prepare(lambda c: [text.build_step(
                c, weights.tensors, tp, state.tensors, step, n_image, all_logits=all_logits)])
        try:
            (logits,) = graph.compute()
        except BaseException:
            if not reused:
                graph.close()
            self._drop_decode()
            raise
        timings: Timings = graph.timings
        self.last = StepTimings(int(ids.size), 0.0 if reused else timings.build_us,
                                0.0 if reused else timings.alloc_us, timings.compute_us, reused)
        if ids.size == 1 and not all_logits:
            if not reused:
                self._decode = (key, graph, runner.generation)
        else:
            graph.close()
        self._n_cached = n_past + int(ids.size)
        out: npt.NDArray[np.float32] = np.asarray(logits, dtype=np.float32)
        return out

    def _drop_decode(self) -> None:
        if self._decode is not None:
            self._decode[1].close()
            self._decode = None

    def _retune(self) -> None:
        if self._governor.update() and self._backend is not None:
            self._backend.set_threads(self._governor.threads)

    # -- lifecycle ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the Llama 3.2 Vision model was used after close()")

    def _live_weights(self) -> Weights:
        self._check_open()
        assert self._weights is not None
        return self._weights

    def _live_state(self) -> State:
        self._check_open()
        assert self._state is not None
        return self._state

    def _live_runner(self) -> Runner:
        self._check_open()
        assert self._runner is not None
        return self._runner

    def _free(self) -> None:
        # Graphs, then the scheduler, the caches and the weights, then the backends they use.
        with contextlib.suppress(Exception):
            self._drop_decode()
        for name in ("_runner", "_state", "_weights", "_backend"):
            part = getattr(self, name, None)
            if part is not None:
                part.close()
                setattr(self, name, None)

    def close(self) -> None:
        """Free the caches, the weights' map and the backend; calling it again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._free()

    def __enter__(self) -> MllamaModel:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


if TYPE_CHECKING:
    from llmkit.engines.mllama.engine import Forward

    def _implements_forward(model: MllamaModel) -> Forward:
        # mypy proves here that MllamaModel satisfies the engine's Forward protocol.
        return model
