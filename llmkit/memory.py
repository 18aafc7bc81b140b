"""The memory a GGUF needs at a context size, from its header alone, against what a device has."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmkit.errors import NotEnoughMemoryError, UsageError
from llmkit.gguf_file import Header, read_header

__all__ = [
    "CHECK_ENV",
    "MARGIN",
    "Available",
    "Estimate",
    "Footprint",
    "GpuMemory",
    "Parts",
    "TensorSize",
    "VisionShape",
    "cgroup_headroom",
    "check_enabled",
    "check_fits",
    "cpu_available",
    "estimate",
    "footprint",
    "human_gib",
    "llama_compute",
    "mllama_compute",
    "requantized",
    "show_estimate",
]

GIB = 1 << 30
CHECK_ENV = "LLMKIT_MEMORY_CHECK"
"""``LLMKIT_MEMORY_CHECK=0`` skips the check (swap or zram makes more room than it counts)."""
MARGIN = 0.10
"""A model is refused only when it needs more than 1 + MARGIN times what is available: the
estimate is within a few per cent of what the engines allocate (tests/test_memory_real.py),
and MemAvailable is the kernel's own estimate, which it can often beat by reclaiming more."""
QUANT_CHOICES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
"""Smaller quantizations a refusal may suggest, best first (those both quantizers write)."""
CTX_FLOOR = 512
"""The smallest context a refusal suggests: below it a chat turn hardly fits."""
# llama.cpp's KV cache holds a multiple of 256 cells (llama_context pads n_ctx to it).
LLAMA_KV_PAD = 256
F16_BYTES = 2
F32_BYTES = 4
# Tokens per prompt batch when the caller names none: both engines' default (llama.cpp's
# DEFAULT_BATCH, the Vision engine's EVAL_BATCH); llama.cpp reserves its graph for that many.
DEFAULT_UBATCH = 512
_LAYER = re.compile(r"^blk\.(\d+)\.")
_MEMINFO = Path("/proc/meminfo")
_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")
# A cgroup v1 "no limit" is PAGE_COUNTER_MAX pages, about 2^63 bytes; anything past 2^60 is
# no limit that matters.
_NO_LIMIT = 1 << 60


def human_gib(n_bytes: int) -> str:
    """Bytes as GiB with one decimal ("7.4 GiB"), or MiB below a GiB ("312 MiB")."""
    if n_bytes >= GIB:
        return f"{n_bytes / GIB:.1f} GiB"
    return f"{max(0, n_bytes) / (1 << 20):.0f} MiB"


# -- what the file says ----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSize:
    """One tensor as the requantization estimate needs it."""

    name: str
    shape: tuple[int, ...]
    """numpy order (the outermost first)."""
    type_name: str
    nbytes: int


@dataclass(frozen=True)
class VisionShape:
    """The sizes of Llama 3.2 Vision's image graph (engines/mllama/vision.py)."""

    n_tokens: int
    """Tokens of one image as the tower holds them: tiles × patches padded to 8."""
    n_embd: int
    n_ff: int
    n_states: int
    """Intermediate states the tower keeps for the projector."""
    output_dim: int


@dataclass(frozen=True)
class Footprint:
    """What a GGUF's header says about the memory it takes, before any context is chosen.

    Weights are the tensors' bytes. On the CPU both engines map the file, so weights take page
    cache, not anonymous memory; they still have to be resident while tokens are computed
    (a model that is paged in from disk for every token does not run, it crawls), so they
    count in full against MemAvailable, which counts the reclaimable page cache too: a file
    already cached is counted once, on both sides. The one exception is an untied token
    embedding: a token reads only its own row of it, so it is left out (a tied one is the
    output matrix, read whole for every token).
    """

    architecture: str
    n_ctx_train: int
    layer_bytes: tuple[int, ...]
    """Weights of each repeating text layer ``blk.N``."""
    embedding_bytes: int
    embedding_resident: bool
    """The token embedding is also the output matrix (tied), so all of it is read per token."""
    output_bytes: int
    """The rest of the text model: output matrix, final norm, RoPE factors."""
    vision_bytes: int
    """Llama 3.2 Vision's tower and projector (``v.*``, ``mm.*``)."""
    kv_values: tuple[int, ...]
    """K and V values one cached position takes in each layer (0: the layer keeps no cache)."""
    cross_kv_values: int
    """Llama 3.2 Vision: K and V values of one image over all cross-attention layers."""
    n_vocab: int
    n_embd: int
    n_ff: int
    vision: VisionShape | None
    tensors: tuple[TensorSize, ...] = field(repr=False)

    @property
    def own_engine(self) -> bool:
        """Llama 3.2 Vision, which runs on llmkit's own engine (caches, graphs of its own)."""
        return self.architecture == "mllama"

    @property
    def n_layer(self) -> int:
        """Repeating text layers."""
        return len(self.layer_bytes)

    @property
    def weight_bytes(self) -> int:
        """Every tensor's bytes (the file's tensor data)."""
        return sum(t.nbytes for t in self.tensors)

    def default_ctx(self, default: int) -> int:
        """The context both engines open without ``--ctx``: min(default, training context)."""
        return min(default, self.n_ctx_train) if self.n_ctx_train > 0 else default


def _kv_values(h: Header, arch: str, n_layer: int) -> tuple[int, ...]:
    """K and V values per cached position and layer, as llama.cpp's KV cache sizes them."""
    a = f"{arch}."
    n_embd = h.u32(a + "embedding_length")
    heads = h.per_layer(a + "attention.head_count", n_layer, default=0)
    kv_heads = h.per_layer(a + "attention.head_count_kv", n_layer, default=-1)
    n_head = max(heads, default=0)
    default_dim = n_embd // n_head if n_head else 0
    k_dim = h.u32(a + "attention.key_length", default=default_dim)
    v_dim = h.u32(a + "attention.value_length", default=default_dim)
    lora = h.u32(a + "attention.kv_lora_rank", default=0)
    if lora:
        # Multi-head latent attention (DeepSeek-V2/V3): one compressed row per position, the
        # latent plus the RoPE part; V is read from it, so no V cache.
        rope = h.u32(a + "rope.dimension_count", default=0)
        return tuple(lora + rope for _ in range(n_layer))
    values = []
    for i in range(n_layer):
        # llama.cpp: head_count_kv defaults to head_count; a layer with none (the recurrent
        # layers of hybrid models) keeps no K/V. Recurrent states are small and not counted.
        n_kv = heads[i] if kv_heads[i] < 0 else kv_heads[i]
        values.append(n_kv * (k_dim + v_dim))
    return tuple(values)


def footprint(source: Header | Path) -> Footprint:
    """Read what the memory estimate needs from a GGUF's header (no tensor data is read).

    Raises:
        InvalidModelFileError: not a complete GGUF, or a key of the wrong type.
    """
    import gguf

    h = source if isinstance(source, Header) else read_header(source)
    arch = h.string("general.architecture") or "unknown"
    a = f"{arch}."
    n_layer = h.u32(a + "block_count")
    tensors = [TensorSize(t.name, t.shape, gguf.GGMLQuantizationType(t.type_id).name, t.nbytes)
               for t in h.tensors().values()]
    layers, embedding, output, vision = _split(tensors, n_layer)
    names = {t.name for t in tensors}
    kv = _kv_values(h, arch, n_layer)
    cross_kv = 0
    shape: VisionShape | None = None
    if arch == "mllama":
        # engines/mllama/text.cache_specs: self layers keep k/v rows of head_dim·n_head_kv per
        # position; each cross layer keeps one image's K and V (max_tiles × patches + 1 rows).
        cross = set(h.ints(a + "attention.cross_attention_layers", required=False))
        kv = tuple(0 if i in cross else v for i, v in enumerate(kv))
        v = a + "vision."
        image, patch = h.u32(v + "image_size"), h.u32(v + "patch_size")
        tiles = h.u32(v + "max_num_tiles")
        n_patches = (image // patch) ** 2 + 1 if patch else 0
        width = max((kv[i] for i in range(n_layer) if i not in cross), default=0)
        cross_kv = len(cross) * width * tiles * n_patches
        shape = VisionShape(
            n_tokens=tiles * (-(-n_patches // 8) * 8), n_embd=h.u32(v + "embedding_length"),
            n_ff=h.u32(v + "feed_forward_length"),
            n_states=len(h.ints(v + "intermediate_layers_indices", required=False)),
            output_dim=h.u32(v + "output_dim"))
    return Footprint(
        architecture=arch, n_ctx_train=h.u32(a + "context_length"), layer_bytes=layers,
        embedding_bytes=embedding, embedding_resident="output.weight" not in names,
        output_bytes=output, vision_bytes=vision, kv_values=kv, cross_kv_values=cross_kv,
        n_vocab=_n_vocab(h, arch), n_embd=h.u32(a + "embedding_length"),
        n_ff=max(h.per_layer(a + "feed_forward_length", n_layer, default=0), default=0),
        vision=shape, tensors=tuple(tensors))


def _split(tensors: Sequence[TensorSize], n_layer: int) -> tuple[tuple[int, ...], int, int, int]:
    """Bytes of each text layer, the token embedding, the rest of the text model, the vision
    tower and projector."""
    layers = [0] * n_layer
    embedding = output = vision = 0
    for t in tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layers[int(m.group(1))] += t.nbytes
        elif t.name.startswith(("v.", "mm.")):
            vision += t.nbytes
        elif t.name == "token_embd.weight":
            embedding += t.nbytes
        else:
            output += t.nbytes
    return tuple(layers), embedding, output, vision


def _n_vocab(h: Header, arch: str) -> int:
    tokens = h.array("tokenizer.ggml.tokens")
    return tokens.count if tokens is not None and tokens.count else h.u32(f"{arch}.vocab_size")


# -- the estimate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """Bytes on one device, by what holds them."""

    weights: int = 0
    kv: int = 0
    compute: int = 0

    @property
    def total(self) -> int:
        """All of it."""
        return self.weights + self.kv + self.compute

    def __add__(self, other: Parts) -> Parts:
        return Parts(self.weights + other.weights, self.kv + other.kv,
                     self.compute + other.compute)


@dataclass(frozen=True)
class Estimate:
    """What a model needs at one context size, on the CPU (RAM) and on the GPU."""

    n_ctx: int
    cpu: Parts
    gpu: Parts
    gpu_layers: int
    """Layers offloaded (-1: all, 0: none), as the estimate assumed."""

    @property
    def all(self) -> Parts:
        """Both devices together."""
        return self.cpu + self.gpu

    def summary(self) -> str:
        """One line for ``show``: "about 280 MiB at --ctx 4096 (weights …, KV cache …, …)"."""
        p = self.all
        return (f"about {human_gib(p.total)} at --ctx {self.n_ctx} (weights "
                f"{human_gib(p.weights)}, KV cache {human_gib(p.kv)}, compute "
                f"{human_gib(p.compute)})")

    def to_dict(self) -> dict[str, int]:
        """A JSON-ready view (bytes)."""
        p = self.all
        return {"ctx": self.n_ctx, "bytes": p.total, "weights": p.weights, "kv_cache": p.kv,
                "compute": p.compute, "gpu_bytes": self.gpu.total}


def llama_compute(fp: Footprint, n_ctx: int, n_ubatch: int) -> int:
    """llama.cpp's compute buffer for a prompt batch of ``n_ubatch`` tokens (F32 activations).

    llama.cpp reserves its graph for the worst batch, and ggml's allocator reuses a tensor's
    memory once its last reader is done, so the buffer is the larger of two moments: the
    output, every row's logits beside the final norm; or a layer's FFN, its hidden states
    beside the residual stream and the F16 attention mask. Attention is flash attention
    (llama.cpp's default on the CPU and on GPUs that have it): no heads × context scores.
    Measured (llama.cpp 0.3.36, CPU, ubatch 512; tests/test_memory_real.py): SmolLM2-135M
    98.25 MiB at --ctx 512, 4096 and 8192 (102.51 at 2048), a 128k-vocabulary 4096-wide
    Llama 266.50 MiB at every context; this gives 98.25 and 266.50.
    """
    return max(_llama_moments(fp, n_ctx, n_ubatch))


def _llama_moments(fp: Footprint, n_ctx: int, n_ubatch: int) -> tuple[int, int]:
    """llama.cpp's compute buffer at its output and in a layer (see :func:`llama_compute`)."""
    ub = min(n_ubatch, n_ctx)
    output = F32_BYTES * ub * (fp.n_vocab + 2 * fp.n_embd)
    layer = F32_BYTES * ub * (2 * fp.n_ff + 4 * fp.n_embd) \
        + F16_BYTES * ub * _pad(n_ctx, LLAMA_KV_PAD)
    return output, layer


def mllama_compute(fp: Footprint, n_ctx: int, n_batch: int) -> int:
    """The Vision engine's compute buffer: the larger of its image graph and a prompt batch.

    The image graph (vision tower, projector and cross K/V in one graph, flash attention over
    every tile, padding tiles included) peaks in the attention of its last layers, where the
    kept intermediate states live beside a layer's residual stream, norm, Q, K, V (and their
    permuted copies) and output: (n_states + 9.5) · width F32 values a token, plus the F16
    tokens × tokens mask. Fitted to the two measured buffers (benchmarks/README.md, vision.py):
    501 MiB at the 11B's widths with 4 intermediate states (this gives 503), 533 MiB with the
    published 5 (this gives 534). A prompt batch holds the FFN's gate and up states, the F16
    mask over the context and one row's logits: measured 1.58 MB for 512 tokens of the tiny
    test model (this gives 1.56; tests/test_memory_real.py).
    """
    nb = min(n_batch, n_ctx)
    text = F32_BYTES * nb * 2 * fp.n_ff + F32_BYTES * fp.n_vocab + F16_BYTES * nb * n_ctx
    v = fp.vision
    if v is None:
        return text
    halves = max((2 * v.n_states + 19) * v.n_embd,  # the attention of the last layers
                 2 * (v.n_states * v.n_embd + v.n_ff + 3 * v.n_embd),  # an FFN beside them
                 4 * v.output_dim,  # the projector's input beside its interleaved copy
                 2 * (v.output_dim + 2 * fp.n_embd))  # the projector's input and output
    image = F32_BYTES * v.n_tokens * halves // 2 + F16_BYTES * v.n_tokens * v.n_tokens
    return max(text, image)


def _pad(n: int, to: int) -> int:
    return -(-n // to) * to


def estimate(fp: Footprint, n_ctx: int, *, gpu_layers: int = 0,
             n_ubatch: int = DEFAULT_UBATCH) -> Estimate:
    """What the model needs with ``n_ctx`` positions and ``gpu_layers`` offloaded.

    Args:
        fp: from :func:`footprint`.
        n_ctx: context size in tokens.
        gpu_layers: -1 all (as llama.cpp reads any count above the model's), 0 none, or the
            count ``--gpu-layers`` gives (llama.cpp offloads the last layers, and the output
            layer counts as one; the Vision engine offloads every layer or none).
        n_ubatch: tokens per prompt batch.

    Returns:
        The bytes on each device.
    """
    cached = fp.embedding_bytes if fp.embedding_resident else 0
    if fp.own_engine:
        kv = F16_BYTES * (sum(fp.kv_values) * n_ctx + fp.cross_kv_values)
        weights = sum(fp.layer_bytes) + fp.output_bytes + fp.vision_bytes
        parts = Parts(weights + cached, kv, mllama_compute(fp, n_ctx, n_ubatch))
        if gpu_layers:
            # Every tensor is copied to the GPU, the embedding included, and the map closed.
            return Estimate(n_ctx, Parts(), Parts(weights + fp.embedding_bytes, kv,
                                                  parts.compute), -1)
        return Estimate(n_ctx, parts, Parts(), 0)
    cells = _pad(n_ctx, LLAMA_KV_PAD)
    n = fp.n_layer
    offloaded = n + 1 if gpu_layers < 0 else min(gpu_layers, n + 1)
    first_gpu = n + 1 - offloaded  # llama.cpp's i_gpu_start: layers at or after it offload
    cpu, gpu = Parts(), Parts()
    for i in range(n):
        layer = Parts(fp.layer_bytes[i], F16_BYTES * fp.kv_values[i] * cells)
        if i >= first_gpu:
            gpu += layer
        else:
            cpu += layer
    # The token embedding stays on the CPU (llama.cpp's input layer); the output layer is
    # offloaded with the first offloaded layer.
    out = Parts(fp.output_bytes)
    compute = llama_compute(fp, n_ctx, n_ubatch)
    if offloaded:
        # A tied embedding is copied to the GPU as the output matrix: the CPU keeps its map
        # too, of which a token reads only its row.
        gpu += out + Parts(fp.embedding_bytes if fp.embedding_resident else 0, 0, compute)
        # The CPU computes the inputs' embeddings, and the layers that stay on it.
        cpu_compute = F32_BYTES * min(n_ubatch, n_ctx) * fp.n_embd
        if first_gpu > 0:
            cpu_compute = _llama_moments(fp, n_ctx, n_ubatch)[1]
        cpu += Parts(0, 0, cpu_compute)
    else:
        cpu += out + Parts(cached, 0, compute)
    return Estimate(n_ctx, cpu, gpu, -1 if offloaded == n + 1 else offloaded)


def requantized(fp: Footprint, plan: Callable[[list[str]], Callable[[str, tuple[int, ...], str],
                                                                         str]]) -> Footprint:
    """The footprint of the same model quantized as ``plan`` chooses per tensor.

    Args:
        fp: the model as it is.
        plan: given the file's tensor names, the function naming each tensor's new type from
            its name, shape and current type (``engines.mllama.quantize.TypePlan``: llama.cpp's
            own rules).
    """
    import gguf

    type_of = plan([t.name for t in fp.tensors])
    tensors = []
    for t in fp.tensors:
        chosen = type_of(t.name, t.shape, t.type_name)
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[chosen]]
        tensors.append(TensorSize(t.name, t.shape, chosen, math.prod(t.shape) // block * size))
    layers, embedding, output, vision = _split(tensors, fp.n_layer)
    return dataclasses.replace(fp, layer_bytes=layers, embedding_bytes=embedding,
                               output_bytes=output, vision_bytes=vision, tensors=tuple(tensors))


def show_estimate(path: Path, architecture: str) -> Estimate | None:
    """What ``llmkit show`` prints: the memory at the default context on the CPU (None for a
    projector, which is not a model of its own)."""
    from llmkit.defaults import DEFAULT_CTX

    if architecture == "clip":
        return None
    fp = footprint(path)
    return estimate(fp, fp.default_ctx(DEFAULT_CTX), n_ubatch=DEFAULT_UBATCH)


# -- what the device has ---------------------------------------------------------------------


@dataclass(frozen=True)
class Available:
    """Memory a device can still give this process, and where the figure comes from."""

    bytes: int
    source: str
    """"MemAvailable", "the cgroup limit" or the GPU's name."""


@dataclass(frozen=True)
class GpuMemory:
    """One GPU as ggml's backend registry reports it (``ggml_backend_dev_memory``)."""

    name: str
    free: int
    total: int


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _stat_file_bytes(path: Path, keys: Sequence[str]) -> int:
    """Page cache a cgroup's memory.stat counts (reclaimable: the kernel drops it first)."""
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    found: dict[str, int] = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if key in keys and value.strip().isdigit():
            found[key] = int(value)
    return sum(found.values())


def _meminfo_available(path: Path) -> int | None:
    try:
        lines = path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        key, _, rest = line.partition(":")
        if key == "MemAvailable":
            parts = rest.split()
            if parts and parts[0].isdigit():
                return int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return None


def cgroup_headroom(proc_cgroup: Path | None = None, root: Path | None = None) -> int | None:
    """Bytes this process's cgroups (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) still
    allow: the tightest limit, from the process's own group up to the hierarchy's root, minus
    what the group uses that is not reclaimable page cache. None when no limit applies.

    Args:
        proc_cgroup: the process's cgroup list (default ``/proc/self/cgroup``).
        root: where the hierarchies are mounted (default ``/sys/fs/cgroup``).
    """
    proc_cgroup = _PROC_CGROUP if proc_cgroup is None else proc_cgroup
    root = _CGROUP_ROOT if root is None else root
    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    groups: list[tuple[Path, str, str, str, tuple[str, ...]]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, where = parts
        if controllers == "":
            groups.append((root, where, "memory.max", "memory.current",
                           ("inactive_file", "active_file")))
        elif "memory" in controllers.split(","):
            groups.append((root / "memory", where, "memory.limit_in_bytes",
                           "memory.usage_in_bytes", ("total_inactive_file", "total_active_file")))
    tightest: int | None = None
    for mount, where, limit_name, usage_name, cache_keys in groups:
        # Inside a container (a cgroup namespace) the mount is the group itself and the path
        # may not exist under it: then the mount's own files are the group's.
        rel = Path(where.lstrip("/"))
        for d in dict.fromkeys([mount / rel, *[mount / p for p in rel.parents]]):
            limit = _read_int(d / limit_name)
            if limit is None or limit >= _NO_LIMIT:
                continue
            usage = _read_int(d / usage_name) or 0
            cache = _stat_file_bytes(d / "memory.stat", cache_keys)
            room = limit - max(0, usage - cache)
            tightest = room if tightest is None else min(tightest, room)
    return tightest


def cpu_available(meminfo: Path | None = None, proc_cgroup: Path | None = None,
                  cgroup_root: Path | None = None) -> Available | None:
    """What RAM this process can still take: the kernel's MemAvailable, or less where a
    cgroup (a container, a CI job, a systemd slice) limits it. None where neither is known
    (macOS, Windows): the check is skipped there.

    Args:
        meminfo: default ``/proc/meminfo``.
        proc_cgroup, cgroup_root: as :func:`cgroup_headroom`.
    """
    found = _meminfo_available(_MEMINFO if meminfo is None else meminfo)
    cgroup = cgroup_headroom(proc_cgroup, cgroup_root)
    if cgroup is not None and (found is None or cgroup < found):
        return Available(max(0, cgroup), "the cgroup limit")
    if found is None:
        return None
    return Available(found, "MemAvailable")


def check_enabled(environ: dict[str, str] | None = None) -> bool:
    """False when ``LLMKIT_MEMORY_CHECK`` is 0, no, off or false; True when it is unset,
    empty, 1, yes, on or true (any case).

    Raises:
        UsageError: any other value: a typo must not leave the check on (or off) unnoticed,
            as for llmkit's other variables.
    """
    raw = (os.environ if environ is None else environ).get(CHECK_ENV, "")
    value = raw.strip().lower()
    if value in ("0", "no", "off", "false"):
        return False
    if value in ("", "1", "yes", "on", "true"):
        return True
    raise UsageError(f"{CHECK_ENV}={raw!r} is neither on nor off",
                     hint=f"set {CHECK_ENV}=0 to skip the memory check, or unset it")


# -- the check -------------------------------------------------------------------------------


def _fits(need: int, have: Available | None) -> bool:
    return have is None or need <= have.bytes


def _refused(need: int, have: Available | None) -> bool:
    return have is not None and need > have.bytes * (1 + MARGIN)


def check_fits(fp: Footprint, name: str, n_ctx: int, *, gpu_layers: int,
               cpu: Available | None, gpu: Available | None = None,
               n_ubatch: int = DEFAULT_UBATCH,
               plan: Callable[[str, list[str]], Callable[[str, tuple[int, ...], str], str]]
               | None = None, parallel: int = 1) -> Estimate:
    """Refuse, before anything is loaded, a model that cannot fit the memory there is.

    Args:
        fp: from :func:`footprint`.
        name: the model's name for the message.
        n_ctx: the context the engine will open (each sequence's, with ``parallel``).
        gpu_layers: as :func:`estimate` (what the device choice resolved to).
        cpu: RAM available (None: unknown, not checked).
        gpu: GPU memory free (None: no GPU, or unknown).
        n_ubatch: tokens per prompt batch.
        plan: ``ftype → (tensor names → per-tensor type)`` for the smaller quantizations a
            refusal suggests (None: none suggested); one that does not make the weights
            smaller (the file's own) is never suggested.
        parallel: sequences decoded together, each with a KV cache of ``n_ctx`` cells; a
            refusal then also suggests the largest ``--parallel`` that fits.

    Returns:
        The estimate, when the model fits.

    Raises:
        NotEnoughMemoryError: the estimate exceeds what is available by more than
            :data:`MARGIN`; the message names the figures and what would fit.
    """
    est = estimate(fp, n_ctx * parallel, gpu_layers=gpu_layers, n_ubatch=n_ubatch)
    on_gpu = est.gpu.total > 0
    short_gpu = on_gpu and _refused(est.gpu.total, gpu)
    short_cpu = _refused(est.cpu.total, cpu)
    if not short_gpu and not short_cpu:
        return est
    where, parts, have = ("gpu", est.gpu, gpu) if short_gpu else ("cpu", est.cpu, cpu)
    assert have is not None

    def fits(e: Estimate) -> bool:
        return _fits(e.cpu.total, cpu) and _fits(e.gpu.total, gpu if e.gpu.total else None)

    def largest_ctx(model: Footprint, top: int) -> tuple[int, Estimate] | None:
        # The largest power of two from ``top`` down to CTX_FLOOR at which ``model`` fits.
        ctx = 1 << (top.bit_length() - 1)
        while ctx >= CTX_FLOOR:
            e = estimate(model, ctx * parallel, gpu_layers=gpu_layers, n_ubatch=n_ubatch)
            if fits(e):
                return ctx, e
            ctx //= 2
        return None

    tries: list[str] = []
    shorter = largest_ctx(fp, n_ctx - 1) if n_ctx > 1 else None
    if shorter is not None:
        tries.append(f"--ctx {shorter[0]} (needs {human_gib(_total(shorter[1], where))})")
    for fewer in range(parallel - 1, 0, -1):
        e = estimate(fp, n_ctx * fewer, gpu_layers=gpu_layers, n_ubatch=n_ubatch)
        if fits(e):
            tries.append(f"--parallel {fewer} (needs {human_gib(_total(e, where))})")
            break
    if on_gpu:
        # Fewer layers on the GPU, the rest in RAM; or the CPU alone.
        if not fp.own_engine:
            for layers in range(fp.n_layer, 0, -1):
                part = estimate(fp, n_ctx * parallel, gpu_layers=layers, n_ubatch=n_ubatch)
                if fits(part):
                    tries.append(f"--gpu-layers {layers} ({human_gib(part.gpu.total)} on the "
                                 f"GPU, {human_gib(part.cpu.total)} in RAM)")
                    break
        alone = estimate(fp, n_ctx * parallel, gpu_layers=0, n_ubatch=n_ubatch)
        if _fits(alone.cpu.total, cpu):
            tries.append(f"--device cpu (needs {human_gib(alone.cpu.total)} of RAM)")
    if plan is not None:
        # The best quantization that fits this context; failing that, the one that fits the
        # largest context (the better one of a tie), if larger than the file itself fits
        # (else --ctx alone is the better advice).
        best: tuple[int, str, Estimate] | None = None
        for quant in QUANT_CHOICES:
            small = requantized(fp, functools.partial(plan, quant))
            if small.weight_bytes >= fp.weight_bytes:
                continue
            found = largest_ctx(small, n_ctx)
            if found is not None and found[0] == n_ctx:
                tries.append(f"a smaller quantization ({quant}, needs "
                             f"{human_gib(_total(found[1], where))})")
                best = None
                break
            if found is not None and (best is None or found[0] > best[0]):
                best = (found[0], quant, found[1])
        if best is not None and (shorter is None or best[0] > shorter[0]):
            tries.append(f"a smaller quantization with a smaller context ({best[1]} and --ctx "
                         f"{best[0]}, needs {human_gib(_total(best[2], where))})")
    each = f"--ctx {n_ctx}" + (f" × --parallel {parallel}" if parallel > 1 else "")
    kv = (f"KV cache for {each} {human_gib(parts.kv)}" if not fp.own_engine else
          f"KV caches for --ctx {n_ctx} and one image {human_gib(parts.kv)}")
    figures = (f"weights {human_gib(parts.weights)}, {kv}, compute "
               f"{human_gib(parts.compute)}")
    place = "on the GPU" if where == "gpu" else "of memory"
    hint = ("try " + ", or ".join(tries) + "; " if tries else "") + \
        f"{CHECK_ENV}=0 skips this check"
    raise NotEnoughMemoryError(name, needed=parts.total, available=have.bytes,
                               message=f"model '{name}' needs about {human_gib(parts.total)} "
                                       f"{place} ({figures}) but only "
                                       f"{human_gib(have.bytes)} is available "
                                       f"({have.source})", hint=hint)


def _total(e: Estimate, where: str) -> int:
    return e.gpu.total if where == "gpu" and e.gpu.total else e.cpu.total
