"""Opening a model for a command: resolve the reference, then load it with the user's settings."""

from __future__ import annotations

from dataclasses import dataclass

from llmkit.engine import Engine
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


def default_system_prompt(resolution: Resolution) -> str | None:
    """The catalog's suggested system prompt for the model, if it has one."""
    if resolution.spec is not None and resolution.spec.system:
        return resolution.spec.system
    return None
