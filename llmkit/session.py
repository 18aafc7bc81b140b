"""Opening a model for a command: resolve the reference, then load it with the user's settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmkit.defaults import default_choice, default_model_name
from llmkit.engines import Engine, SamplingParams, load_engine
from llmkit.store import Resolution, resolve, resolve_default

if TYPE_CHECKING:
    from llmkit.tasks.safety import Guard


@dataclass(frozen=True)
class EngineOptions:
    """Hardware and context settings shared by every model command."""

    ctx: int | None = None
    threads: int | None = None
    device: str = "auto"
    gpu_layers: int | None = None
    verbose: bool = False
    parallel: int = 1  # sequences a batch command decodes together
    parallel_chosen: bool = False  # parallel is llmkit's default, not the user's --parallel


def with_parallel(options: EngineOptions, parallel: int | None) -> EngineOptions:
    """``options`` for a batch command: ``parallel`` sequences (None: the measured default,
    :data:`~llmkit.defaults.DEFAULT_PARALLEL_GPU` when the model will be offloaded to a GPU,
    else :data:`~llmkit.defaults.DEFAULT_PARALLEL_CPU`)."""
    import dataclasses

    from llmkit.defaults import DEFAULT_PARALLEL_CPU, DEFAULT_PARALLEL_GPU

    if parallel is None:
        gpu = False
        if options.device != "cpu" and options.gpu_layers != 0:
            from llmkit.engines.llama_cpp import gpu_offload_supported

            gpu = gpu_offload_supported()
        return dataclasses.replace(options, parallel=DEFAULT_PARALLEL_GPU if gpu
                                   else DEFAULT_PARALLEL_CPU, parallel_chosen=True)
    return dataclasses.replace(options, parallel=parallel)


def load_with_options(path: str | Path, options: EngineOptions, name: str,
                      mmproj: Path | None = None) -> Engine:
    """Load a GGUF (and its projector) with the user's hardware and context settings.

    A default number of parallel sequences (not the user's ``--parallel``) that the memory
    cannot hold, each with its ``--ctx``, is lowered to what fits, down to one.
    """
    from llmkit.errors import NotEnoughMemoryError

    parallel = options.parallel
    while True:
        try:
            return load_engine(path, n_ctx=options.ctx, threads=options.threads,
                               device=options.device, gpu_layers=options.gpu_layers,
                               verbose=options.verbose, name=name, mmproj=mmproj,
                               parallel=parallel)
        except NotEnoughMemoryError:
            if not options.parallel_chosen or parallel <= 1:
                raise
            parallel //= 2


def open_engine(model: str | None, options: EngineOptions) -> tuple[Engine, Resolution]:
    """Resolve ``model`` (None: the default) and load it.

    Returns:
        The loaded engine and how the name was resolved (its ``note`` is for stderr).

    Raises:
        LlmkitError: any resolution or loading failure.
    """
    resolution = resolve(model)
    return load_with_options(resolution.model.path, options, resolution.model.name), resolution


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


def find_projector(model_path: Path) -> Path | None:
    """The one ``mmproj*.gguf`` beside a model file, as vision models are published, if any.

    Raises:
        InvalidModelFileError: more than one lies there, so which is the model's is unknown.
    """
    from llmkit.errors import InvalidModelFileError

    candidates = sorted(p for p in model_path.parent.glob("*.gguf")
                        if "mmproj" in p.name.lower() and p != model_path)
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates[:4]) + (", …" if len(candidates) > 4
                                                              else "")
        raise InvalidModelFileError(
            str(model_path), f"has {len(candidates)} projectors beside it ({names}), so which "
            "one is its own is unclear", hint="pass the right one with --mmproj FILE")
    return candidates[0] if candidates else None


def vision_files(resolution: Resolution, mmproj: Path | None
                 ) -> tuple[Path, Path | None, str | None]:
    """The model and projector files to see images with, or why there are none.

    Args:
        resolution: the resolved model.
        mmproj: a projector the user named (``--mmproj``), overriding what the store knows.

    Returns:
        (model file, projector file, a note for stderr when the projector was found by looking
        beside the model). The projector is None for a model whose own GGUF holds its vision
        tower (Llama 3.2 Vision).

    Raises:
        NotAVisionModelError: a text or guard model, or a GGUF whose vocabulary has no image
            tokens and no projector beside it.
        ProjectorMissingError: a vision model whose projector is not on this machine.
        InvalidModelFileError: the file given as the model is itself a projector.
    """
    from llmkit.engines.llama_cpp import image_tokens_in_vocab
    from llmkit.errors import (
        InvalidModelFileError,
        NotAVisionModelError,
        ProjectorMissingError,
    )
    from llmkit.gguf_file import read_info

    model = resolution.model
    spec = resolution.spec
    path = Path(model.path)
    suggestion = default_model_name("vision")
    if spec is not None and spec.kind in ("text", "guard") and mmproj is None:
        raise NotAVisionModelError(model.name, suggestion)
    info = read_info(path)
    if info.architecture == "clip":
        raise InvalidModelFileError(
            str(path), "is a vision projector (mmproj), not a model",
            hint="pass the language model with -m and this file with --mmproj")
    from llmkit.engines import reads_images_itself

    if reads_images_itself(info.architecture):
        # The engine refuses a --mmproj it was given, in one sentence.
        return path, mmproj, None
    if mmproj is not None:
        return path, mmproj, None
    if model.mmproj:
        projector = Path(model.mmproj)
        # Whatever is there is handed on: the engine's check names a FIFO or a damaged file.
        if projector.exists():
            return path, projector, None
        hint = (f"run `llmkit pull {model.name}` again to fetch it" if model.source == "pull"
                else "import it again with --mmproj FILE --force, or pass --mmproj FILE")
        raise ProjectorMissingError(model.name, str(projector), hint=hint)
    if spec is not None and spec.kind == "vision":
        raise ProjectorMissingError(
            model.name, spec.mmproj or "(mmproj)",
            hint=f"run `llmkit pull {model.name}` to fetch it, or pass --mmproj FILE")
    found = find_projector(path)
    if found is not None:
        return path, found, f"using the projector {found.name} found beside {path.name}"
    if image_tokens_in_vocab(path):
        raise ProjectorMissingError(
            model.name, f"(an mmproj-*.gguf beside {path.name})",
            hint="pass --mmproj FILE; vision GGUFs are published with an mmproj file next to "
                 "the model")
    raise NotAVisionModelError(model.name, suggestion)


def open_vision_engine(model: str | None, options: EngineOptions, *,
                       mmproj: Path | None = None) -> tuple[Engine, Resolution, str | None]:
    """Resolve ``model`` (None: the default vision model) and load it with its projector.

    Returns:
        The engine, the resolution, and a note for stderr (or None).

    Raises:
        LlmkitError: unknown, unsupported or unpulled model; a model that cannot see images;
            a missing or mismatched projector; loading failures.
    """
    resolution = resolve(model) if model is not None else resolve_default("vision")
    model_path, projector, note = vision_files(resolution, mmproj)
    engine = load_with_options(model_path, options, resolution.model.name, projector)
    return engine, resolution, note or resolution.note


def open_chat_engine(model: str | None, options: EngineOptions, *, mmproj: Path | None = None,
                     images: bool = False) -> tuple[Engine, Resolution, str | None]:
    """Load a model for chat: with its projector when images are asked for or it has one.

    Returns:
        The engine, the resolution, and a note for stderr (or None).

    Raises:
        LlmkitError: as :func:`open_engine`, and as :func:`open_vision_engine` with images.
    """
    if images or mmproj is not None:
        return open_vision_engine(model, options, mmproj=mmproj)
    resolution = resolve(model)
    projector = Path(resolution.model.mmproj) if resolution.model.mmproj else None
    engine = load_with_options(resolution.model.path, options, resolution.model.name,
                         projector if projector is not None and projector.is_file() else None)
    return engine, resolution, resolution.note


# The catalog's guard that reads images: the one a picture is checked with when no guard is
# named (the default guard reads text only).
VISION_GUARD = "llama-guard3:11b-vision"


def open_guard(model: str | None, options: EngineOptions, *, exclude: str | None = None,
               categories_file: Path | None = None, threshold: float | None = None,
               images: bool = False) -> tuple[Guard, str | None]:
    """Load a guard model with its policy: its own taxonomy, a custom one, minus exclusions.

    Args:
        model: the guard's name or path (None: the default guard).
        options: hardware and context settings.
        exclude: comma-separated codes to leave out.
        categories_file: a TOML policy instead of the model's own.
        threshold: decide by score.
        images: the guard must check pictures (Llama Guard 3 Vision): without ``model`` (and
            ``$LLMKIT_GUARD_MODEL``) that is :data:`VISION_GUARD`; a model that reads text only
            is refused from its file's header, before it loads.

    Returns:
        The guard (its ``engine`` must be closed by the caller) and a note for stderr.

    Raises:
        ImagesNotCheckableError: ``images`` for a guard that reads text only.
        LlmkitError: the model cannot be resolved or loaded, or the policy is malformed.
    """
    from llmkit.tasks.policy import LLAMA_GUARD_3_CATEGORIES, default_categories, load_categories
    from llmkit.tasks.policy import exclude as drop
    from llmkit.tasks.safety import Guard

    # The policy is read first: a typo in it should not cost a model load. Exclusions from the
    # model's own taxonomy are checked against the largest one now, and exactly after loading.
    custom = load_categories(categories_file) if categories_file is not None else None
    if exclude:
        drop(custom if custom is not None else LLAMA_GUARD_3_CATEGORIES, exclude.split(","))
    if model:
        resolution = resolve(model)
    elif images and default_choice("guard").variable is None:
        resolution = resolve(VISION_GUARD)
    else:
        resolution = resolve_default("guard")
    if images:
        from llmkit.engines import reads_images_itself
        from llmkit.errors import ImagesNotCheckableError
        from llmkit.gguf_file import read_info

        if not reads_images_itself(read_info(Path(resolution.model.path)).architecture):
            raise ImagesNotCheckableError(resolution.model.name)
    engine = load_with_options(resolution.model.path, options, resolution.model.name)
    try:
        policy = custom if custom is not None else default_categories(
            engine.chat_template, resolution.model.name)
        if exclude:
            policy = drop(policy, exclude.split(","))
        guard = Guard(engine, policy, threshold=threshold)
        if images and not guard.vision:
            raise ImagesNotCheckableError(resolution.model.name)
        return guard, resolution.note
    except BaseException:
        engine.close()
        raise
