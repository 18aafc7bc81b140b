"""Exceptions llmkit raises; each carries the exit code the CLI maps it to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

EXIT_FLAGGED = 3
"""The exit code of a safety refusal (`check`, `--guard`): an answer, not a failure."""


class LlmkitError(Exception):
    """Base of every error llmkit reports to a user.

    The message is one sentence saying what went wrong; ``hint`` is the next step.
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(LlmkitError):
    """The command line asked for something contradictory or out of range."""

    exit_code = 2


class ModelNotFoundError(LlmkitError):
    """No model answers to the given name or path."""

    def __init__(self, name: str, *, hint: str | None = None) -> None:
        super().__init__(f"model '{name}' not found", hint=hint)
        self.name = name


class ModelNotPulledError(LlmkitError):
    """A catalog model that is known but not on this machine yet."""

    def __init__(self, name: str, *, from_source: bool = False) -> None:
        # A model with no published GGUF is built from its checkpoint on this machine.
        command = f"llmkit pull {name} --from-source" if from_source else f"llmkit pull {name}"
        super().__init__(
            f"model '{name}' is in the catalog but not on this machine",
            hint=f"run `{command}`",
        )
        self.name = name


class UnsupportedModelError(LlmkitError):
    """A model llama.cpp cannot run, with the reason and what to use instead."""

    def __init__(self, name: str, reason: str, alternatives: tuple[str, ...] = ()) -> None:
        hint = f"try {', '.join(alternatives)}" if alternatives else None
        super().__init__(f"model '{name}' is not supported: {reason}", hint=hint)
        self.name = name
        self.reason = reason
        self.alternatives = alternatives


class InvalidModelFileError(LlmkitError):
    """A file that is not a GGUF, or a GGUF that is truncated or corrupt."""

    def __init__(self, path: str, problem: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path}: {problem}", hint=hint)
        self.path = path
        self.problem = problem


class CatalogError(LlmkitError):
    """models.toml (or a user catalog) does not describe models correctly."""


class StoreError(LlmkitError):
    """The local model store could not be read or changed."""


class InputError(LlmkitError):
    """Input text is missing, empty, or not decodable."""


class InputFileError(InputError):
    """A named input (a file, a pipe, stdin) that cannot be read, or is larger than llmkit reads.

    ``reason`` ends a sentence that starts with ``path``: "is a character device, not a file".
    """

    def __init__(self, path: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path} {reason}", hint=hint)
        self.path = path
        self.reason = reason


class ContextOverflowError(LlmkitError):
    """A prompt does not fit in the model's context window."""

    def __init__(self, n_tokens: int, n_ctx: int, *, reserve: int = 0) -> None:
        room = n_ctx - reserve
        if reserve and room <= 0:
            # Nothing of the prompt can fit: the input is not what is too long.
            super().__init__(
                f"the {n_ctx}-token context is no larger than the {reserve} tokens reserved "
                f"for the answer, so it has no room for the {n_tokens}-token prompt",
                hint=f"raise --ctx to at least {n_tokens + reserve}, or lower --max-tokens",
            )
        else:
            super().__init__(
                f"prompt is {n_tokens} tokens but the context holds {room}"
                + (f" ({n_ctx} minus {reserve} reserved for the answer)" if reserve else ""),
                hint="raise --ctx, lower --max-tokens, or shorten the input",
            )
        self.n_tokens = n_tokens
        self.n_ctx = n_ctx


class QueueFullError(LlmkitError):
    """More requests wait for a served model than the server queues (HTTP 429)."""


class ShuttingDownError(LlmkitError):
    """The server is stopping and takes no new work (HTTP 503)."""


class DeviceError(LlmkitError):
    """The requested device cannot be used with this llama.cpp build."""


class SchemaError(LlmkitError):
    """A JSON schema that cannot be turned into a grammar."""


class ConvertError(LlmkitError):
    """A checkpoint that cannot be converted to GGUF, with the reason."""


class QuantizeError(LlmkitError):
    """llama.cpp's quantizer refused or failed."""


class Interrupted(LlmkitError):
    """The user pressed Ctrl-C."""

    exit_code = 130

    def __init__(self) -> None:
        super().__init__("interrupted")


class HubError(LlmkitError):
    """The Hugging Face Hub could not give us a model file."""


class HubAccessError(HubError):
    """The Hub refused access: a gated or private repository, or a refused token."""


class NotAvailableOfflineError(HubError):
    """Offline (HF_HUB_OFFLINE=1 or no network) and the file is not in the local cache."""


class DownloadIntegrityError(HubError):
    """A downloaded file does not match the size or checksum the Hub gave for it."""


class DiskSpaceError(HubError):
    """Not enough free disk space for a download."""


class NotAVisionModelError(LlmkitError):
    """A text-only model was asked to look at images."""

    def __init__(self, name: str, suggestion: str) -> None:
        super().__init__(
            f"model '{name}' is a text-only model and cannot see images",
            hint=f"use a vision model, e.g. `-m {suggestion}` (`llmkit pull {suggestion}`)",
        )
        self.name = name


class ProjectorMissingError(LlmkitError):
    """A vision model whose projector (mmproj) file is not available."""

    def __init__(self, name: str, missing: str, hint: str) -> None:
        super().__init__(f"model '{name}' cannot see images without its projector {missing}",
                         hint=hint)
        self.name = name
        self.missing = missing


class ImageError(LlmkitError):
    """An image file (or image bytes) that cannot be turned into pixels, with the reason."""

    def __init__(self, path: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path} {reason}", hint=hint)
        self.path = path
        self.reason = reason


class ChunkingError(LlmkitError):
    """A document cannot be split into chunks that fit the token budget."""


class ContextTooSmallError(LlmkitError):
    """The context cannot hold an instruction, an answer and a useful piece of a document."""

    def __init__(self, n_ctx: int, needed: int) -> None:
        super().__init__(
            f"a {n_ctx}-token context is too small to summarize in: the instructions, the answer "
            f"and the smallest useful piece of text need about {needed}",
            hint=f"raise --ctx to at least {needed}, or ask for a shorter summary")
        self.n_ctx = n_ctx
        self.needed = needed


class DocumentError(LlmkitError):
    """A document (a file, or stdin) that cannot be turned into text, with the reason."""

    def __init__(self, path: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(f"{path} {reason}", hint=hint)
        self.path = path
        self.reason = reason


class VerdictError(LlmkitError):
    """The guard model's output is not a verdict; treated as an error, never as 'safe'."""

    def __init__(self, raw: str) -> None:
        shown = raw.strip().replace("\n", "\\n")
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"the guard model's answer is not a verdict: '{shown}'",
                         hint="use a Llama Guard model (-m llama-guard3:1b)")
        self.raw = raw


class ImagesNotCheckableError(LlmkitError):
    """A guard model that reads text only was asked to check a picture."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(
            f"{model} reads text, not pictures: checking an image needs Llama Guard 3 Vision",
            hint="use the guard llama-guard3:11b-vision (`llmkit pull llama-guard3:11b-vision "
                 "--from-source`), or check what the picture shows: "
                 "llmkit caption --style detailed photo.jpg | llmkit check")


class FlaggedCategory(Protocol):
    """What the refusal sentence names of a violated category (a policy ``Category``)."""

    @property
    def code(self) -> str: ...

    @property
    def name(self) -> str: ...


class FlaggedVerdict(Protocol):
    """What the refusal sentence needs of a verdict (a ``tasks.safety.Verdict``).

    Structural, so that this bottom module names no task: the verdict is defined above it.
    """

    @property
    def model(self) -> str: ...

    @property
    def categories(self) -> Sequence[FlaggedCategory]: ...


_FLAGGED_WHAT = {"input": "the input", "output": "the answer", "prompt": "the prompt"}


class FlaggedError(LlmkitError):
    """A guarded command's input or output was flagged; the output is withheld.

    ``stage`` is "prompt" (a command's input), "input" (a chat message or a batch item's
    input) or "output" (the answer); the message is the one sentence a user reads, in a
    command's refusal and as a batch record's ``flagged_note``.
    """

    exit_code = EXIT_FLAGGED

    def __init__(self, stage: str, verdict: FlaggedVerdict) -> None:
        cats = ", ".join(f"{c.code} {c.name}" for c in verdict.categories) or "no category named"
        action = "nothing was generated" if stage in ("input", "prompt") else "it was withheld"
        super().__init__(f"{_FLAGGED_WHAT[stage]} was flagged by {verdict.model} ({cats}); "
                         f"{action}")
        self.stage = stage
        self.verdict = verdict


class NotEnoughMemoryError(LlmkitError):
    """A model whose weights, caches and compute buffers need more memory than the device has.

    Raised before anything is loaded; the message gives the estimate's figures and the hint
    what would fit (a smaller context, a smaller quantization, fewer layers on the GPU).
    """

    def __init__(self, name: str, *, needed: int, available: int, message: str,
                 hint: str) -> None:
        super().__init__(message, hint=hint)
        self.name = name
        self.needed = needed
        self.available = available
