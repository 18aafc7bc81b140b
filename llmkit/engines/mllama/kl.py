"""KL divergence of a Llama 3.2 Vision file's next-token distributions from a reference file's."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import InputError, UsageError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from llmkit.engines.base import Engine, RGBImage
    from llmkit.engines.mllama.model import MllamaModel

__all__ = ["FIXED_IMAGE_PROMPTS", "FIXED_TEXT_PROMPTS", "KLPrompt", "KLReport", "KLStats",
           "Picture", "Reference", "fixed_pictures", "fixed_prompts", "kl_rows",
           "log_softmax", "prompt_log_probs", "statistics"]

# Rows of logits computed per forward call: a row is 128256 floats (0.5 MB), so 64 rows keep
# the graph's output and the float64 arithmetic below near 100 MB whatever the prompt.
ROW_BATCH = 64

# The fixed prompts, in the `llama-perplexity --kl-divergence` spirit: the same token sequences
# go through both files and every position's next-token distribution is compared. Each is a
# user turn and a written answer (scored as the model would have continued it), so positions
# cover the chat markup, the question, and a reply; the image prompts' rows after <|image|>
# read the picture through the cross-attention layers.
FIXED_TEXT_PROMPTS: tuple[tuple[str, str, str], ...] = (
    ("history", "Write a short paragraph about the invention of the printing press.",
     "Around 1440, Johannes Gutenberg combined movable metal type, oil-based ink and a "
     "screw press adapted from wine making. Books that had taken scribes months could be "
     "printed in days, and within fifty years presses were running in more than two hundred "
     "European cities."),
    ("instructions", "How do I make a cup of green tea? Answer in numbered steps.",
     "1. Heat water to about 80 degrees Celsius; boiling water makes the tea bitter.\n"
     "2. Put one teaspoon of leaves in a cup or pot.\n"
     "3. Pour the water over the leaves and wait two to three minutes.\n"
     "4. Strain the leaves and drink it plain."),
    ("code", "Write a Python function that returns the n-th Fibonacci number.",
     "def fibonacci(n: int) -> int:\n    a, b = 0, 1\n    for _ in range(n):\n"
     "        a, b = b, a + b\n    return a"),
)
# (name, picture from fixed_pictures, question, answer)
FIXED_IMAGE_PROMPTS: tuple[tuple[str, str, str, str], ...] = (
    ("caption", "scene", "Describe this image in one sentence.",
     "A small red house with a dark roof stands on green grass under a blue sky, with a "
     "yellow sun in the upper right corner."),
    ("colors", "bands", "What colors do you see in this picture?",
     "The picture shows broad horizontal bands of orange, teal and purple that blend into "
     "each other, with a lighter stripe across the middle."),
    ("details", "noise", "Is there any text or a face in this image?",
     "No. The image is a blurry pattern of mixed colors without any text, faces or "
     "recognizable objects."),
)
# Llama 3.2's chat markup, as the published template writes it; the text prompts carry the
# template's system header with its own fallback date, so the tokens do not change with the
# day the measure runs (the template reads today's date when it can).
_BOS, _EOT = "<|begin_of_text|>", "<|eot_id|>"
_SYSTEM = ("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
           "2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>")
_USER, _ASSISTANT = ("<|start_header_id|>user<|end_header_id|>\n\n",
                     "<|start_header_id|>assistant<|end_header_id|>\n\n")
_IMAGE = "<|image|>"


@dataclass(frozen=True)
class Picture:
    """RGB pixels (an :class:`~llmkit.engines.base.RGBImage`)."""

    rgb: bytes = field(repr=False)
    width: int
    height: int


def fixed_pictures(tile_size: int) -> dict[str, Picture]:
    """The measure's pictures, the same on every run: "scene" (a drawn house, one tile),
    "bands" (smooth colour bands, two tiles side by side) and "noise" (blurred random colours,
    2×2 tiles), sized in tiles of ``tile_size`` pixels."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    t = tile_size
    scene = Image.new("RGB", (t, t), (90, 160, 230))
    draw = ImageDraw.Draw(scene)
    draw.rectangle((0, int(t * 0.7), t, t), fill=(60, 150, 60))
    draw.rectangle((int(t * 0.25), int(t * 0.45), int(t * 0.6), int(t * 0.75)),
                   fill=(200, 40, 40))
    draw.polygon([(int(t * 0.2), int(t * 0.45)), (int(t * 0.425), int(t * 0.25)),
                  (int(t * 0.65), int(t * 0.45))], fill=(60, 40, 40))
    draw.ellipse((int(t * 0.75), int(t * 0.08), int(t * 0.92), int(t * 0.25)),
                 fill=(250, 220, 40))
    y = np.linspace(0.0, 1.0, t)[:, None, None]
    x = np.linspace(0.0, 1.0, 2 * t)[None, :, None]
    colours = np.array([[240, 140, 40], [30, 170, 160], [120, 50, 160]], dtype=np.float64)
    weights = np.concatenate([np.clip(1 - abs(y * 2 - c) * 1.5, 0, 1) for c in (0, 1, 2)], 2)
    bands = (weights @ colours) / np.maximum(weights.sum(2, keepdims=True), 1e-9)
    bands = bands + 40 * np.exp(-((y - 0.5) * 12) ** 2) + 10 * np.sin(x * 9)
    small = np.random.default_rng(11).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    noise = Image.fromarray(small, "RGB").resize((2 * t, 2 * t), Image.Resampling.BILINEAR)
    pictures = {"scene": scene,
                "bands": Image.fromarray(np.clip(bands, 0, 255).astype(np.uint8), "RGB"),
                "noise": noise.filter(ImageFilter.GaussianBlur(max(1, t // 56)))}
    return {name: Picture(image.tobytes(), image.width, image.height)
            for name, image in pictures.items()}


@dataclass(frozen=True)
class KLPrompt:
    """One token sequence both files evaluate; with a picture, rows from ``image_from`` (the
    position of ``<|image|>``) attend to it."""

    name: str
    kind: str  # "text" or "image"
    tokens: tuple[int, ...]
    image: RGBImage | None = field(default=None, repr=False)
    image_from: int | None = None

    def __post_init__(self) -> None:
        if not self.tokens:
            raise InputError(f"prompt {self.name!r} has no tokens")
        if (self.image is None) != (self.image_from is None):
            raise InputError(f"prompt {self.name!r} needs both a picture and its position")
        if self.image_from is not None and not 0 <= self.image_from < len(self.tokens):
            raise InputError(f"prompt {self.name!r}: the picture's position "
                             f"{self.image_from} is outside its {len(self.tokens)} tokens")


def fixed_prompts(tokenizer: Engine, tile_size: int, *, image_token: int) -> list[KLPrompt]:
    """The fixed prompts as token sequences of ``tokenizer`` (a Llama 3.2 Vision engine):
    :data:`FIXED_TEXT_PROMPTS` then :data:`FIXED_IMAGE_PROMPTS` on :func:`fixed_pictures`.

    Markup is trusted (its special tokens are parsed), the questions and answers are plain
    text.

    Raises:
        InputError: the tokenizer did not give exactly one ``image_token`` in an image prompt.
    """
    from llmkit.chat_template import Piece

    prompts: list[KLPrompt] = []
    for name, question, answer in FIXED_TEXT_PROMPTS:
        tokens = tokenizer.tokenize_pieces([
            Piece(_BOS + _SYSTEM + _USER, True), Piece(question, False),
            Piece(_EOT + _ASSISTANT, True), Piece(answer, False)])
        prompts.append(KLPrompt(name, "text", tuple(tokens)))
    pictures = fixed_pictures(tile_size)
    for name, picture, question, answer in FIXED_IMAGE_PROMPTS:
        tokens = tokenizer.tokenize_pieces([
            Piece(_BOS + _USER + _IMAGE, True), Piece(question, False),
            Piece(_EOT + _ASSISTANT, True), Piece(answer, False)])
        places = [i for i, t in enumerate(tokens) if t == image_token]
        if len(places) != 1:
            raise InputError(f"the image prompt {name!r} has {len(places)} image tokens "
                             f"(id {image_token}), not one")
        prompts.append(KLPrompt(name, "image", tuple(tokens), pictures[picture], places[0]))
    return prompts


def prompts_digest(prompts: Sequence[KLPrompt]) -> str:
    """A hash of the prompts' tokens and pictures: equal digests, equal measures' inputs."""
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(repr((p.name, p.kind, p.tokens, p.image_from)).encode())
        if p.image is not None:
            digest.update(f"{p.image.width}x{p.image.height}".encode())
            digest.update(hashlib.sha256(p.image.rgb).digest())
    return digest.hexdigest()[:16]


# -- the arithmetic -------------------------------------------------------------------------


def log_softmax(logits: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """Row-wise log-softmax in float64 (rows: positions, columns: the vocabulary).

    Raises:
        InputError: a row holds NaN or infinity (a broken file's logits).
    """
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(x).all():
        raise InputError("the model gave NaN or infinite logits")
    shifted = x - x.max(axis=-1, keepdims=True)
    out: npt.NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def kl_rows(ref: npt.NDArray[Any], other: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    """KL(P_ref ‖ P_other) per row, from log-probabilities [rows, vocab]: Σ p·(log p − log q),
    the direction llama-perplexity measures (the reference's expectation)."""
    import numpy as np

    lp = np.asarray(ref, dtype=np.float64)
    lq = np.asarray(other, dtype=np.float64)
    kl: npt.NDArray[np.float64] = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    # Rounding can leave a hair below zero for identical rows; KL itself never is.
    return np.maximum(kl, 0.0)


def prompt_log_probs(model: MllamaModel, prompt: KLPrompt, *, batch: int = ROW_BATCH
                     ) -> npt.NDArray[np.float32]:
    """Every position's next-token log-probabilities of ``prompt`` under ``model``
    (float32 [len(tokens), n_vocab]); the prompt's picture is encoded first.

    The sequence is evaluated from an empty cache in runs of ``batch`` rows, each run after
    the cached ones, as a long prompt is evaluated by the engine.

    Raises:
        InputError: the prompt does not fit the model's context, or NaN logits.
        ComputeError: ggml could not compute a graph.
    """
    import numpy as np

    from llmkit.engines.mllama.preprocess import tile_image

    if prompt.image is not None:
        try:
            tiled = tile_image(prompt.image, mean=model.image_mean, std=model.image_std,
                               max_tiles=model.max_tiles, tile_size=model.tile_size)
        except ValueError as exc:
            raise InputError(f"the picture of prompt {prompt.name!r} cannot be prepared: "
                             f"{exc}") from None
        model.encode_image(tiled)
    else:
        model.drop_image()
    out = np.empty((len(prompt.tokens), model.n_vocab), dtype=np.float32)
    for start in range(0, len(prompt.tokens), max(1, batch)):
        part = prompt.tokens[start:start + max(1, batch)]
        logits = model.eval_rows(part, start, prompt.image_from)
        out[start:start + len(part)] = log_softmax(logits)
    return out


@dataclass(frozen=True)
class KLStats:
    """KL divergence and top-token statistics over a set of positions (llama-perplexity's
    "KL divergence statistics" and "Token probability statistics").

    ``same_top`` is the share of positions where both files' most probable token agree
    ("Same top p"); Δp is the change of the probability of the sequence's own next token
    (positions that have one), the other file's minus the reference's.
    """

    positions: int
    mean: float
    mean_stderr: float
    median: float
    p90: float
    p99: float
    max: float
    same_top: float
    same_top_stderr: float
    mean_dp: float
    rms_dp: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return asdict(self)


def statistics(kl: npt.NDArray[Any], same_top: npt.NDArray[Any], dp: npt.NDArray[Any]
               ) -> KLStats:
    """The statistics of per-position KL values, top-token agreements and Δp values.

    Raises:
        InputError: no positions.
    """
    import numpy as np

    kl = np.asarray(kl, dtype=np.float64)
    top = np.asarray(same_top, dtype=np.float64)
    d = np.asarray(dp, dtype=np.float64)
    n = int(kl.size)
    if n == 0 or top.size != n:
        raise InputError("no positions to compute KL statistics over")
    share = float(top.mean())
    return KLStats(
        positions=n, mean=float(kl.mean()),
        mean_stderr=float(kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        median=float(np.median(kl)), p90=float(np.quantile(kl, 0.90)),
        p99=float(np.quantile(kl, 0.99)), max=float(kl.max()),
        same_top=share, same_top_stderr=math.sqrt(share * (1 - share) / n),
        mean_dp=float(d.mean()) if d.size else 0.0,
        rms_dp=float(math.sqrt((d ** 2).mean())) if d.size else 0.0)


@dataclass(frozen=True)
class KLReport:
    """How far one file's next-token distributions are from the reference's on its prompts."""

    path: str
    reference: str
    prompts: str  # prompts_digest of the prompts measured
    overall: KLStats
    by_kind: dict[str, KLStats]
    by_prompt: dict[str, float]  # mean KL per prompt
    reference_entropy: float  # mean entropy of the reference's distributions, in nats
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return {"path": self.path, "reference": self.reference, "prompts": self.prompts,
                "overall": self.overall.to_dict(),
                "by_kind": {k: s.to_dict() for k, s in self.by_kind.items()},
                "by_prompt": self.by_prompt, "reference_entropy": self.reference_entropy,
                "seconds": round(self.seconds, 2)}


def _open(path: Path, n_ctx: int, threads: int | None) -> MllamaModel:
    from llmkit.engines.mllama.hparams import read_mllama
    from llmkit.engines.mllama.model import MllamaModel

    # The CPU, as users run it: matrices ggml repacks (Q4_K) are repacked.
    return MllamaModel(read_mllama(path), n_ctx=n_ctx, threads=threads, device="cpu")


class Reference:
    """The reference file's log-probabilities at every position of a set of prompts (kept in
    memory: 0.5 MB a position for the published vocabulary), to compare other files with.

    Building it evaluates the reference once; each :meth:`compare` evaluates the other file
    on the same token sequences and pictures.
    """

    def __init__(self, path: Path, prompts: Sequence[KLPrompt],
                 log_probs: list[npt.NDArray[np.float32]], n_ctx: int, seconds: float) -> None:
        self.path = path
        self.prompts = list(prompts)
        self.log_probs = log_probs
        self.n_ctx = n_ctx
        self.seconds = seconds
        self.digest = prompts_digest(prompts)
        import numpy as np

        # How peaked the reference is (ln 128256 ≈ 11.76 nats is uniform): KL and top-token
        # agreement mean little without it.
        self.entropy = float(np.mean(np.concatenate(
            [-(np.exp(lp.astype(np.float64)) * lp).sum(axis=1) for lp in log_probs])))

    @classmethod
    def measure(cls, path: str | Path, prompts: Sequence[KLPrompt], *,
                threads: int | None = None) -> Reference:
        """Evaluate ``prompts`` with the reference file (e.g. the F16 conversion).

        Raises:
            InputError: no prompts, or a prompt longer than the model's training context.
            InvalidModelFileError: not a Llama 3.2 Vision GGUF in llmkit's layout.
            ComputeError: ggml could not compute a graph.
        """
        if not prompts:
            raise InputError("no prompts to measure")
        names = [p.name for p in prompts]
        if len(set(names)) != len(names):
            raise InputError("two prompts share a name")
        t0 = time.perf_counter()
        n_ctx = max(16, max(len(p.tokens) for p in prompts))
        with _open(Path(path), n_ctx, threads) as model:
            if n_ctx > model.tp.n_ctx_train:
                raise InputError(f"a prompt of {n_ctx} tokens is longer than the model's "
                                 f"{model.tp.n_ctx_train}-token training context")
            rows = [prompt_log_probs(model, p) for p in prompts]
        return cls(Path(path), prompts, rows, n_ctx, time.perf_counter() - t0)

    @property
    def n_vocab(self) -> int:
        """Width of the distributions."""
        return int(self.log_probs[0].shape[1])

    def compare(self, path: str | Path, *, threads: int | None = None) -> KLReport:
        """KL(reference ‖ file) and top-token agreement at every position of every prompt.

        Raises:
            UsageError: the file's vocabulary is not the reference's (another model).
            InvalidModelFileError, ComputeError, InputError: as :meth:`measure`.
        """
        import numpy as np

        t0 = time.perf_counter()
        kl: dict[str, npt.NDArray[np.float64]] = {}
        top: dict[str, npt.NDArray[np.bool_]] = {}
        dp: dict[str, npt.NDArray[np.float64]] = {}
        with _open(Path(path), self.n_ctx, threads) as model:
            if model.n_vocab != self.n_vocab:
                raise UsageError(f"{Path(path).name} gives {model.n_vocab} logits, the "
                                 f"reference {self.n_vocab}: not the same model")
            for prompt, ref in zip(self.prompts, self.log_probs, strict=True):
                theirs = prompt_log_probs(model, prompt)
                kl[prompt.name] = kl_rows(ref, theirs)
                top[prompt.name] = ref.argmax(axis=1) == theirs.argmax(axis=1)
                # Δp where the sequence's next token has a logit: <|image|> (id 128256 in
                # the published models) is an embedding row past the logits, never predicted.
                nxt = np.asarray(prompt.tokens[1:], dtype=np.int64)
                rows = np.flatnonzero(nxt < self.n_vocab)
                dp[prompt.name] = (np.exp(theirs[rows, nxt[rows]].astype(np.float64))
                                   - np.exp(ref[rows, nxt[rows]].astype(np.float64)))

        def over(names: list[str]) -> KLStats:
            return statistics(np.concatenate([kl[n] for n in names]),
                              np.concatenate([top[n] for n in names]),
                              np.concatenate([dp[n] for n in names]))

        names = [p.name for p in self.prompts]
        kinds = dict.fromkeys(p.kind for p in self.prompts)
        return KLReport(
            path=str(path), reference=str(self.path), prompts=self.digest,
            overall=over(names),
            by_kind={k: over([p.name for p in self.prompts if p.kind == k]) for k in kinds},
            by_prompt={n: float(kl[n].mean()) for n in names},
            reference_entropy=self.entropy,
            seconds=time.perf_counter() - t0)
