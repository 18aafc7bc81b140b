"""A guard model without a model, for the fuzz harness and the tests of what it found."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from llmkit.engines.base import Generation, RGBImage, SamplingParams
from tests.fake_engine import CHATML, LLAMA3, FakeEngine

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


def _scripted(text: str) -> Mapping[str, float]:
    # The answer's first word likely, after a blank line for some prompts.
    return {"\n": 5.0 if len(text) % 3 else 0.0, "s": 3.0, "u": 2.0}


_LOGITS: dict[str, tuple[Callable[[str], Mapping[str, float]] | None, float]] = {
    "scripted": (_scripted, 0.0),
    "flat": (None, 0.0),
    "nan": (None, float("nan")),  # what a model with damaged weights gives
}


class FakeGuardEngine(FakeEngine):
    """The shared scripted engine as a guard: one token per UTF-8 byte, a fixed answer.

    As strict as the real engine (text encoded as UTF-8 first, so a lone surrogate fails;
    chat markup special only where it is markup), and one check more: a prompt the Guard
    should have refused for its length fails the fuzz run instead of becoming a record error.
    """

    def __init__(self, *, answer: str = "safe", n_ctx: int = 8192, llama3: bool = True,
                 logits: str = "scripted") -> None:
        """``logits``: "scripted" (the answer's first word likely), "flat", or "nan"."""
        script, base = _LOGITS[logits]
        super().__init__(answer, logits=script, base_logit=base, tokens="bytes",
                         vocabulary=LLAMA3 if llama3 else CHATML, n_ctx=n_ctx,
                         model_name="fuzz-guard")

    def _fits(self, prompt: Sequence[int]) -> None:
        if len(prompt) >= self.n_ctx:
            raise AssertionError(f"a {len(prompt)}-token prompt in a {self.n_ctx}-token context")

    def next_token_logits(self, prompt: Sequence[int], *,
                          images: Sequence[RGBImage] = ()) -> npt.NDArray[np.float32]:
        self._fits(prompt)
        return super().next_token_logits(prompt, images=images)

    def generate(self, prompt: Sequence[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None, *,
                 images: Sequence[RGBImage] = ()) -> Generation:
        self._fits(prompt)
        return super().generate(prompt, params, on_text, images=images)
