"""Llama 3.2 Vision at Q4_K_M, Q5_K_M, Q6_K and Q8_0: quantized, loaded, answering, and how far
each moves the next-token distributions from the F16 file's (KL divergence)."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import run_llmkit
from tests.test_pull import hub  # noqa: F401  (the fake Hub fixture)

pytestmark = pytest.mark.slow

TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
# The types the text matrices take in each file (token embedding and output included). At a
# width of 256 the K-quant kernels run; at the tiny model's 64 every K-quant takes llama.cpp's
# fallback (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0), as llama-quantize does.
TEXT_TYPES = {
    256: {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q5_K_M": {"Q5_K", "Q6_K"}, "Q6_K": {"Q6_K"},
          "Q8_0": {"Q8_0"}},
    64: {"Q4_K_M": {"Q5_0", "Q8_0"}, "Q5_K_M": {"Q5_1", "Q8_0"}, "Q6_K": {"Q8_0"},
         "Q8_0": {"Q8_0"}},
}
# ggml's CPU repacks these (repack.cpp on an AVX2 machine: Q4_0, Q4_K, IQ4_NL); every other
# weight must stay in the file's map.
REPACKABLE = {"Q4_0", "Q4_K", "IQ4_NL"}


def _build(width: int, root: Path) -> dict[str, Path]:
    from llmkit.quantize import quantize
    from tests.mllama_model import build_model, convert_tiny, require_oracle, tiny_config

    require_oracle()
    config = tiny_config() if width == 64 else tiny_config(
        text_hidden_size=256, text_intermediate_size=512)
    files = {"F16": convert_tiny(build_model(seed=7, config=config), root)["f16"]}
    for qtype in TYPES:
        files[qtype] = root / f"tiny-{qtype}.gguf"
        # verify=True (the default): the file is published only once it loads in the engine
        # and answers a prompt.
        result = quantize(files["F16"], qtype, files[qtype], threads=2)
        assert result.type == qtype
    return files


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model (text width 64) as F16 and each type."""
    return _build(64, tmp_path_factory.mktemp("w64"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model at text width 256 (FFN 512), so the K-quant kernels run."""
    return _build(256, tmp_path_factory.mktemp("w256"))


def _files(request: pytest.FixtureRequest, width: int) -> dict[str, Path]:
    return dict(request.getfixturevalue("wide" if width == 256 else "narrow"))


@functools.cache
def _tensors(path: Path) -> dict[str, tuple[str, int, str]]:
    """name → (type, bytes, sha256 of the data), read once per file (gguf's reader parses the
    128k-token vocabulary in Python: seconds a file)."""
    import gguf

    return {t.name: (t.tensor_type.name, int(t.n_bytes),
                     hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest())
            for t in gguf.GGUFReader(path).tensors}


# -- quantized, loaded zero-copy, answering -------------------------------------------------


@pytest.mark.parametrize("width", [256, 64])
@pytest.mark.parametrize("qtype", TYPES)
def test_text_weights_take_the_type_and_the_vision_tower_stays_f16(
        request: pytest.FixtureRequest, width: int, qtype: str) -> None:
    files = _files(request, width)
    before, after = _tensors(files["F16"]), _tensors(files[qtype])
    assert list(after) == list(before)
    text_matrices = {name for name, (t, _, _) in before.items()
                     if not name.startswith(("v.", "mm.")) and t == "F16"}
    assert {"token_embd.weight", "output.weight", "blk.1.cross_attn_k.weight",
            "blk.0.ffn_down.weight"} <= text_matrices
    assert {after[name][0] for name in text_matrices} == TEXT_TYPES[width][qtype]
    # llama.cpp's output matrix: Q6_K unless the type is Q8_0 (Q8_0 at width 64: Q6_K's
    # fallback).
    assert after["output.weight"][0] == ("Q6_K" if qtype != "Q8_0" and width == 256
                                         else "Q8_0")
    vision = [name for name in before if name.startswith(("v.", "mm."))]
    for name in vision + [n for n, (t, _, _) in before.items() if t == "F32"]:
        assert after[name] == before[name], name  # the same bytes
    assert {before[n][0] for n in vision} == {"F16", "F32"}  # matrices F16, the rest F32
    size = {k: p.stat().st_size for k, p in files.items()}
    assert size["Q8_0"] < size["F16"] and size["Q4_K_M"] < size["Q8_0"]
    if width == 256:
        assert size["Q4_K_M"] < size["Q5_K_M"] < size["Q6_K"] < size["Q8_0"]


@pytest.mark.parametrize("width", [256, 64])
@pytest.mark.parametrize("qtype", TYPES)
def test_weights_are_mapped_or_repacked_never_copied(
        request: pytest.FixtureRequest, width: int, qtype: str) -> None:
    from llmkit.engines.mllama._backend import Backend, Weights

    path = _files(request, width)[qtype]
    table = _tensors(path)
    types = {name: t for name, (t, _, _) in table.items()}
    total = sum(size for _, size, _ in table.values())
    with Backend("cpu", threads=1) as backend, Weights(path, backend) as weights:
        assert {types[n] for n in weights.repacked} <= REPACKABLE
        assert weights.mapped_bytes + weights.repacked_bytes == total
        assert weights.offloaded_bytes == 0
        if not REPACKABLE & set(types.values()):
            assert weights.repacked == {} and weights.mapped_bytes == total


@pytest.mark.parametrize("width", [256, 64])
@pytest.mark.parametrize("qtype", TYPES)
def test_each_type_captions_a_picture(request: pytest.FixtureRequest, width: int,
                                      qtype: str) -> None:
    from llmkit.engines import SamplingParams, load_engine
    from llmkit.engines.mllama.kl import fixed_pictures
    from llmkit.tasks.chat import run_prompt_with_images

    path = _files(request, width)[qtype]
    picture = fixed_pictures(28)["bands"]  # two tiles
    with load_engine(path, n_ctx=256, threads=1, device="cpu") as engine:
        assert engine.vision
        reply = run_prompt_with_images(engine, "Describe this image in one sentence.",
                                       [picture], params=SamplingParams(temperature=0,
                                                                        max_tokens=6))
    generation = reply.generation
    assert generation.image_tokens == 2 * 5  # two tiles of 2×2 patches + the class token
    assert generation.finish_reason in ("length", "stop")
    if generation.finish_reason == "length":
        assert generation.completion_tokens == 6 and reply.text


def test_the_cli_captions_with_each_type(narrow: dict[str, Path], tmp_path: Path) -> None:
    from tests.images import write_photo_jpeg

    photo = write_photo_jpeg(tmp_path)
    for qtype in TYPES:
        shown = json.loads(run_llmkit(["show", str(narrow[qtype]), "-f", "json"]).stdout)
        assert shown["architecture"] == "mllama" and shown["quantization"] == qtype
        proc = run_llmkit(["caption", str(photo), "-m", str(narrow[qtype]), "-n", "4",
                           "-f", "jsonl", "--temperature", "0", "--threads", "1"])
        assert proc.returncode == 0, proc.stderr
        record = json.loads(proc.stdout)
        assert record["error"] is None and record["caption"], record
        assert record["usage"]["image_tokens"] == 20  # 640×480: 2×2 tiles


# -- pull --from-source --quant -------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q5_K_M", "Q6_K", "Q8_0"])
def test_pull_from_source_builds_each_type(
        hub: Any, isolated_home: Path, tmp_path: Path, qtype: str) -> None:  # noqa: F811
    # Q4_K_M, the default, is built in tests/test_pull_from_source.py; Q8_0 is the converter's
    # own output type (no quantizer pass), the others go through the mllama quantizer.
    from tests.mllama_model import build_model, require_oracle, save_checkpoint
    from tests.test_pull_from_source import VISION_SOURCE, _vision_catalog

    require_oracle()
    ckpt = save_checkpoint(build_model(seed=0), tmp_path / "ckpt", dtype="bfloat16")
    hub.add(VISION_SOURCE, {p.name: p for p in ckpt.iterdir() if p.is_file()})
    _vision_catalog(isolated_home)
    proc = run_llmkit(["pull", "tiny-vision:1m", "--from-source", "--quant", qtype,
                       "--format", "json"])
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)["model"]
    assert model["quant"] == qtype and model["kind"] == "vision"
    path = Path(model["path"])
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # f16 removed
    types = {name: t for name, (t, _, _) in _tensors(path).items()}
    # The tiny model's 64-wide rows take the K-quants' fallbacks.
    assert types["blk.0.attn_q.weight"] == {"Q5_K_M": "Q5_1", "Q6_K": "Q8_0", "Q8_0": "Q8_0"}[
        qtype]
    assert types["v.blk.0.attn_q.weight"] == "F16"
    shown = json.loads(run_llmkit(["show", "tiny-vision:1m", "-f", "json"]).stdout)
    assert shown["quantization"] == qtype


# -- the KL measure ---------------------------------------------------------------------------


def test_kl_arithmetic_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    from llmkit.engines.mllama.kl import kl_rows, log_softmax, statistics

    rng = np.random.default_rng(0)
    a = rng.normal(0, 3, (40, 1000)).astype(np.float32)
    b = a + rng.normal(0, 0.3, a.shape).astype(np.float32)
    la, lb = log_softmax(a), log_softmax(b)
    ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    np.testing.assert_allclose(la, torch.log_softmax(ta, -1).numpy(), rtol=0, atol=1e-12)
    want = torch.nn.functional.kl_div(torch.log_softmax(tb, -1), torch.log_softmax(ta, -1),
                                      reduction="none", log_target=True).sum(-1).numpy()
    got = kl_rows(la, lb)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    assert (got > 0).all()
    assert (kl_rows(la, la) == 0).all()
    top = la.argmax(1) == lb.argmax(1)
    dp = np.exp(lb[np.arange(39), np.arange(1, 40)]) - np.exp(la[np.arange(39), np.arange(1, 40)])
    stats = statistics(got, top, dp)
    assert stats.positions == 40
    assert stats.mean == pytest.approx(float(want.mean()), rel=1e-12)
    assert stats.median == pytest.approx(float(np.median(want)), rel=1e-12)
    assert stats.p99 == pytest.approx(float(np.quantile(want, 0.99)), rel=1e-12)
    assert stats.max == pytest.approx(float(want.max()), rel=1e-12)
    assert stats.mean_stderr == pytest.approx(float(want.std(ddof=1) / math.sqrt(40)))
    assert stats.same_top == pytest.approx(float(top.mean()))
    assert stats.rms_dp == pytest.approx(float(np.sqrt((dp ** 2).mean())))
    assert 0 < stats.same_top < 1  # the noise is large enough to move some tops
    from llmkit.errors import InputError

    with pytest.raises(InputError, match="NaN"):
        log_softmax(np.array([[0.0, np.nan]]))
    with pytest.raises(InputError, match="no positions"):
        statistics(np.array([]), np.array([]), np.array([]))


def _transformers_tokens(content: Any, answer: str) -> list[int]:
    """The published template's rendering of one user message (with the template's fallback
    date), then the answer as plain text: transformers' tokenizer as the oracle."""
    from transformers import PreTrainedTokenizerFast

    from tests.mllama_model import CHAT_TEMPLATE, tokenizer_dir

    tokenizer: Any = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_dir() / "tokenizer.json"), bos_token="<|begin_of_text|>")
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], chat_template=CHAT_TEMPLATE,
        add_generation_prompt=True, tokenize=True, return_dict=False,
        date_string="26 Jul 2024")
    return [int(t) for t in ids] + [int(t) for t in tokenizer.encode(
        answer, add_special_tokens=False)]


@pytest.fixture(scope="module")
def prompts(wide: dict[str, Path]) -> list[Any]:
    from llmkit.engines import load_engine
    from llmkit.engines.mllama.kl import fixed_prompts
    from tests.mllama_model import IMAGE_TOKEN_ID

    with load_engine(wide["F16"], n_ctx=64, threads=1, device="cpu") as engine:
        return fixed_prompts(engine, 28, image_token=IMAGE_TOKEN_ID)


def test_fixed_prompts_are_the_published_format(prompts: list[Any]) -> None:
    from llmkit.engines.mllama.kl import FIXED_IMAGE_PROMPTS, FIXED_TEXT_PROMPTS
    from tests.mllama_model import IMAGE_TOKEN_ID

    by_name = {p.name: p for p in prompts}
    assert [p.kind for p in prompts] == ["text"] * 3 + ["image"] * 3
    for name, question, answer in FIXED_TEXT_PROMPTS:
        assert list(by_name[name].tokens) == _transformers_tokens(question, answer)
        assert by_name[name].image is None
    for name, _, question, answer in FIXED_IMAGE_PROMPTS:
        p = by_name[name]
        assert list(p.tokens) == _transformers_tokens(
            [{"type": "image"}, {"type": "text", "text": question}], answer)
        assert p.tokens[p.image_from] == IMAGE_TOKEN_ID and p.image_from == 5
    sizes = {p.name: (p.image.width, p.image.height) for p in prompts if p.image}
    assert sizes == {"caption": (28, 28), "colors": (56, 28), "details": (56, 56)}
    assert sum(len(p.tokens) for p in prompts) > 250  # a few hundred positions


@pytest.fixture(scope="module")
def reports(wide: dict[str, Path], prompts: list[Any]) -> dict[str, Any]:
    from llmkit.engines.mllama.kl import Reference

    reference = Reference.measure(wide["F16"], prompts, threads=2)
    return {qtype: reference.compare(wide[qtype], threads=2) for qtype in ("F16", *TYPES)}


def test_every_position_of_every_prompt_is_measured(reports: dict[str, Any],
                                                    prompts: list[Any]) -> None:
    n = {kind: sum(len(p.tokens) for p in prompts if p.kind == kind) for kind in
         ("text", "image")}
    for report in reports.values():
        assert report.overall.positions == n["text"] + n["image"]
        assert {k: s.positions for k, s in report.by_kind.items()} == n
        assert list(report.by_prompt) == [p.name for p in prompts]


def test_the_f16_file_against_itself_is_zero(reports: dict[str, Any]) -> None:
    same = reports["F16"].overall
    assert same.mean == 0 and same.max == 0 and same.same_top == 1 and same.rms_dp == 0
    assert 0 < reports["F16"].reference_entropy < math.log(128256)


# Bounds for the width-256 tiny model (random weights, 427 positions), about 2.5x either side
# of what was measured (mean KL in nats: Q8_0 1.95e-4, Q6_K 1.26e-3, Q5_K_M 4.03e-3, Q4_K_M
# 1.46e-2; same top 95 / 88 / 80 / 65 %): a type quantized with another type's precision falls
# outside them. The random model's distributions are nearly flat (entropy near ln 128256), so
# its top tokens are close calls and agree less often than a trained model's would.
MEAN_KL = {"Q8_0": (8e-5, 5e-4), "Q6_K": (5e-4, 3e-3), "Q5_K_M": (1.6e-3, 1e-2),
           "Q4_K_M": (6e-3, 3.5e-2)}
SAME_TOP_ABOVE = {"Q8_0": 0.90, "Q6_K": 0.80, "Q5_K_M": 0.70, "Q4_K_M": 0.55}


def test_kl_is_finite_and_ordered_by_bits(reports: dict[str, Any]) -> None:
    means = {q: reports[q].overall.mean for q in TYPES}
    for qtype in TYPES:
        stats = reports[qtype].overall
        assert all(math.isfinite(v) for v in stats.to_dict().values()), qtype
        assert 0 < stats.median <= stats.p90 <= stats.p99 <= stats.max, qtype
        low, high = MEAN_KL[qtype]
        assert low < stats.mean < high, (qtype, stats)
        assert stats.same_top > SAME_TOP_ABOVE[qtype], (qtype, stats)
        for kind in ("text", "image"):
            assert reports[qtype].by_kind[kind].mean > 0, (qtype, kind)
    # More bits, closer to F16, by a clear margin each (each step at least halves it).
    assert 2 * means["Q8_0"] < means["Q6_K"] < means["Q5_K_M"] / 2 < means["Q4_K_M"] / 4
    tops = [reports[q].overall.same_top for q in ("Q8_0", "Q6_K", "Q4_K_M")]
    assert tops == sorted(tops, reverse=True)


def test_rows_after_the_image_read_it(wide: dict[str, Path], prompts: list[Any]) -> None:
    # The same image prompt with another picture: the rows before <|image|> are the same
    # (they see no picture), every row from it on moves. The measure's image positions do
    # go through the cross-attention layers.
    from dataclasses import replace

    from llmkit.engines.mllama.hparams import read_mllama
    from llmkit.engines.mllama.kl import fixed_pictures, kl_rows, prompt_log_probs
    from llmkit.engines.mllama.model import MllamaModel

    prompt = next(p for p in prompts if p.name == "caption")
    other = replace(prompt, image=fixed_pictures(28)["noise"])
    with MllamaModel(read_mllama(wide["F16"]), n_ctx=128, threads=1, device="cpu") as model:
        a, b = prompt_log_probs(model, prompt), prompt_log_probs(model, other)
        text_only = replace(prompt, image=None, image_from=None)
        c = prompt_log_probs(model, text_only)
    kl = kl_rows(a, b)
    at = prompt.image_from
    assert (kl[:at] == 0).all()
    assert (kl[at:] > 1e-4).all(), kl[at:].min()
    np.testing.assert_array_equal(a[:at], c[:at])
    assert (kl_rows(a, c)[at:] > 1e-4).all()
