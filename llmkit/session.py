"""Opening a model for a command: resolve the reference, then load it with the user's settings."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.engine import Engine, SamplingParams
from llmkit.store import Resolution, resolve


@dataclass(frozen=True)
class EngineOptions:
    """Hardware and context settings shared by every model command."""

    ctx: int | None = None
    threads: int | None = None
    device: str = "auto"
    gpu_layers: int | None = None
    verbose: bool = False


def open_engine(model: str | None, options: EngineOptions) -> tuple[Engine, Resolution]:
    """Resolve ``model`` (None: the default) and load it.

    Returns:
        The loaded engine and how the name was resolved (its ``note`` is for stderr).

    Raises:
        LlmkitError: any resolution or loading failure.
    """
    resolution = resolve(model)
    engine = Engine(
        resolution.model.path,
        n_ctx=options.ctx,
        threads=options.threads,
        device=options.device,
        gpu_layers=options.gpu_layers,
        verbose=options.verbose,
        name=resolution.model.name,
    )
    return engine, resolution


DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95


def sampling_params(
    resolution: Resolution,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
    grammar: str | None = None,
) -> SamplingParams:
    """Sampling settings: what the user gave, else the catalog's for this model, else llmkit's."""
    spec = resolution.spec
    if temperature is None:
        temperature = spec.temperature if spec and spec.temperature is not None else (
            DEFAULT_TEMPERATURE)
    if top_p is None:
        top_p = spec.top_p if spec and spec.top_p is not None else DEFAULT_TOP_P
    return SamplingParams(temperature=temperature, top_p=top_p, seed=seed,
                          max_tokens=max_tokens or None, grammar=grammar)


def default_system_prompt(resolution: Resolution) -> str | None:
    """The catalog's suggested system prompt for the model, if it has one."""
    if resolution.spec is not None and resolution.spec.system:
        return resolution.spec.system
    return None
