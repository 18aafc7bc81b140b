"""The Python API: each model command as one call, on a model given by name or already open."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, overload

from llmkit.engines.base import Engine, Generation, Message

if TYPE_CHECKING:
    from PIL import Image

    from llmkit.documents import Document
    from llmkit.images import PreparedImage
    from llmkit.session import EngineOptions
    from llmkit.store import Resolution
    from llmkit.tasks.chat import Conversation, Reply
    from llmkit.tasks.safety import Guard, Verdict
    from llmkit.tasks.summarize import Summary

__all__ = ["GuardRef", "ImageSource", "ModelRef", "caption", "chat", "check", "load", "run",
           "summarize"]

ModelRef: TypeAlias = "str | os.PathLike[str] | Engine | None"
"""A catalog name, a local name or a path to a .gguf file (as `-m` takes it), None for the
default model, or an engine that is already open (from :func:`load`)."""

ImageSource: TypeAlias = "str | os.PathLike[str] | bytes | Image.Image"
"""An image file, the bytes of one, or a Pillow image."""

GuardRef: TypeAlias = "bool | str | os.PathLike[str] | Engine"
"""A safety check around a call (``--guard``): True for the default guard model, its name or
path, or a guard engine already open (``llmkit.load(kind="guard")``); False for none."""

# The library never writes to stdout or stderr: what the CLI says on stderr (a fallback to the
# embedded model, a document decoded as Windows-1252) goes to the "llmkit" logger, silent
# until the application configures logging.
_log = logging.getLogger("llmkit")
_log.addHandler(logging.NullHandler())

# `llmkit run` and `llmkit chat`'s --max-tokens default.
DEFAULT_MAX_TOKENS = 1024


def load(model: str | os.PathLike[str] | None = None, *, kind: str = "text",
         mmproj: str | os.PathLike[str] | None = None, ctx: int | None = None,
         threads: int | None = None, device: str = "auto", gpu_layers: int | None = None,
         verbose: bool = False) -> Engine:
    """Open a model once for many calls; pass the engine as ``model`` to the other functions.

    Args:
        model: a catalog name, a local name or a path to a .gguf file; None for the default
            model of ``kind``.
        kind: which default None means, and how the model is opened: "text" (``$LLMKIT_MODEL``
            or the catalog's default, the embedded model until that is pulled; a projector
            registered with the model is loaded too, so a vision model can also caption),
            "vision" (``$LLMKIT_VISION_MODEL`` or the catalog's; a projector is required,
            found as `caption` finds it) or "guard" (``$LLMKIT_GUARD_MODEL`` or the
            catalog's Llama Guard).
        mmproj: a vision projector GGUF for the model, overriding the one llmkit knows of.
        ctx: context size in tokens (default: the smaller of 4096 and the model's).
        threads: CPU threads, exactly (default: the physical cores other processes leave idle).
        device: "auto", "cpu" or "gpu".
        gpu_layers: layers to offload to the GPU (default: all when offloading).
        verbose: pass llama.cpp's log through to stderr.

    Returns:
        The open engine. Close it with ``close()``, or use it in a ``with`` block.

    Raises:
        UsageError: an unknown ``kind``, or impossible device settings.
        LlmkitError: the model cannot be resolved or loaded (each subclass names why).

    Example:
        >>> with llmkit.load() as model:
        ...     for question in ("What is 2 + 2?", "Name a colour."):
        ...         print(llmkit.run(question, model=model, max_tokens=32).text)
    """
    from llmkit.errors import UsageError
    from llmkit.session import open_chat_engine, open_guard, open_vision_engine

    options = _engine_options(ctx, threads, device, gpu_layers, verbose)
    name = _model_name(model)
    projector = Path(mmproj) if mmproj is not None else None
    if kind == "text":
        engine, _, note = open_chat_engine(name, options, mmproj=projector)
    elif kind == "vision":
        engine, _, note = open_vision_engine(name, options, mmproj=projector)
    elif kind == "guard":
        if projector is not None:
            raise UsageError("a guard model takes no projector (mmproj)")
        # The guard's default model and its env override are open_guard's to know; its
        # policy is built again by each check, from the arguments of that check.
        guard, note = open_guard(name, options)
        engine = guard.engine
    else:
        raise UsageError(f"unknown model kind '{kind}'", hint="use text, vision or guard")
    _note(note)
    return engine


def run(prompt: str, model: ModelRef = None, *, context: str | None = None,
        system: str | None = None, temperature: float | None = None,
        top_p: float | None = None, seed: int | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS, json_schema: str | Mapping[str, Any] | None = None,
        images: Sequence[ImageSource] = (), mmproj: str | os.PathLike[str] | None = None,
        guard: GuardRef = False, guard_threshold: float | None = None,
        on_text: Callable[[str], None] | None = None, ctx: int | None = None,
        threads: int | None = None, device: str = "auto", gpu_layers: int | None = None,
        verbose: bool = False) -> Reply:
    """Answer one prompt, as ``llmkit run`` does.

    Args:
        prompt: the instruction (``llmkit run``'s arguments).
        model: a model name or path (None: the default model, or with ``images`` the default
            vision model), or an open engine from :func:`load`.
        context: text the instruction is about, put before it (what ``run`` reads on stdin).
        system: a system prompt (default: the catalog's for the model, if any).
        temperature: sampling temperature, 0 for greedy (default: the model's, else 0.8).
        top_p: nucleus sampling (default: the model's, else 0.95).
        seed: random seed for repeatable output.
        max_tokens: most tokens to generate; 0 means until the context is full.
        json_schema: constrain the answer to JSON matching this schema (a dict or its text).
        images: pictures the prompt asks about (a vision model is needed).
        mmproj: a vision projector GGUF for ``images``, when opening the model by name.
        guard: check the input first and the answer before it is returned, with a Llama Guard
            model (True: the default one; or a name, a path or an open guard engine).
        guard_threshold: with ``guard``, flag when P(unsafe) reaches this (implies ``guard``).
        on_text: receives the answer as it is generated (with ``guard``: once checked).
        ctx, threads, device, gpu_layers, verbose: as for :func:`load`, when opening by name.

    Returns:
        The reply: ``text``, the ``generation`` with its counts and timings, and ``to_dict()``
        (``run --format json``'s shape). ``generation.finish_reason`` is "stop", "length" or
        "context" (the context filled up).

    Raises:
        InputError: the prompt (with the context) is empty or not Unicode text.
        ContextOverflowError: the prompt leaves no room for an answer.
        SchemaError: the schema is not JSON or cannot become a grammar.
        ImageError, NotAVisionModelError, ProjectorMissingError: with ``images``.
        FlaggedError: with ``guard``, the input or the answer was flagged (``.verdict`` says
            why); nothing is returned.
        VerdictError: with ``guard``, the guard's answer is not a verdict (fail closed).
        UsageError: hardware options given with an open engine.
        LlmkitError: the model cannot be resolved or loaded.
        KeyboardInterrupt: Ctrl-C, which stops the answer at the next token.

    Example:
        >>> reply = llmkit.run("What is the capital of France?", temperature=0, max_tokens=32)
        >>> print(reply.text, reply.generation.completion_tokens)
    """
    from llmkit.session import default_system_prompt, sampling_params
    from llmkit.tasks.chat import build_user_message, run_prompt, run_prompt_with_images
    from llmkit.tasks.guarding import check_input, check_output

    text = build_user_message(_text(prompt, "the prompt"), _text(context, "the context"))
    _text(system, "the system prompt")
    grammar = _grammar(json_schema)
    prepared = [_prepare_image(image) for image in images]  # before loading: fail fast
    options = _engine_options(ctx, threads, device, gpu_layers, verbose)
    with _guarding(guard, guard_threshold, options) as checker:
        # The prompt is checked before the model loads: a refused one costs no model at all.
        # A guard that reads images judges the pictures with the prompt.
        checked = check_input(checker, text, prepared) if checker is not None else None
        streamed = on_text if checker is None else None  # a guarded answer is held back
        with _opened(model, options, "vision" if images else "text", mmproj) as (
                engine, resolution):
            params = sampling_params(resolution, temperature=temperature, top_p=top_p,
                                     seed=seed, max_tokens=max_tokens, grammar=grammar)
            system_prompt = system if system is not None else default_system_prompt(resolution)
            if images:
                reply = run_prompt_with_images(engine, text, prepared, system=system_prompt,
                                               params=params, on_text=streamed)
            else:
                reply = run_prompt(engine, text, system=system_prompt, params=params,
                                   on_text=streamed)
        _raise_if_interrupted(reply.generation)
        if checker is not None and checked is not None:
            check_output(checker, text, reply.text, checked, prepared)
            if on_text is not None and reply.text:
                on_text(reply.text)
    return reply


def chat(message: str, model: ModelRef = None, *, conversation: Conversation | None = None,
         system: str | None = None, images: Sequence[str | os.PathLike[str]] = (),
         temperature: float | None = None, top_p: float | None = None, seed: int | None = None,
         max_tokens: int = DEFAULT_MAX_TOKENS, mmproj: str | os.PathLike[str] | None = None,
         guard: GuardRef = False, guard_threshold: float | None = None,
         on_text: Callable[[str], None] | None = None, ctx: int | None = None,
         threads: int | None = None, device: str = "auto", gpu_layers: int | None = None,
         verbose: bool = False) -> Reply:
    """Answer one message of a conversation, as one turn of ``llmkit chat``.

    The message and the answer are appended to ``conversation``; its oldest turns are dropped
    when it no longer fits the context (``reply.dropped_messages`` says how many). Keep the
    model open with :func:`load` for a conversation of many turns: the part already seen stays
    in its KV cache, so each turn costs only its new tokens.

    Args:
        message: the user's new message.
        model: a model name or path (None: the default model), or an open engine.
        conversation: the conversation so far (a new one when None); ``Conversation.load``
            reads one that `chat`'s /save wrote.
        system: a system prompt for the conversation (default: its own, else the catalog's).
        images: image files shown with this message (a vision model is needed).
        temperature, top_p, seed, max_tokens, on_text: as for :func:`run`.
        mmproj: a vision projector GGUF, when opening the model by name.
        guard, guard_threshold: as for :func:`run`; a flagged turn leaves the conversation as
            it was.
        ctx, threads, device, gpu_layers, verbose: as for :func:`load`, when opening by name.

    Returns:
        The reply, as :func:`run` returns it.

    Raises:
        InputError: an empty message, or text that is not Unicode.
        ContextOverflowError: the system prompt and the message alone do not fit.
        ImageError, NotAVisionModelError, ProjectorMissingError: with images.
        FlaggedError: with ``guard``, the input or the answer was flagged (``.verdict`` says
            why); nothing is returned.
        VerdictError: with ``guard``, the guard's answer is not a verdict (fail closed).
        UsageError: hardware options given with an open engine.
        LlmkitError: the model cannot be resolved or loaded.
        KeyboardInterrupt: Ctrl-C; the answer so far is kept in the conversation.

    Example:
        >>> convo = llmkit.Conversation(system="You are terse.")
        >>> with llmkit.load() as model:
        ...     llmkit.chat("Name a prime number.", model=model, conversation=convo)
        ...     print(llmkit.chat("And another?", model=model, conversation=convo).text)
    """
    from llmkit.session import default_system_prompt, sampling_params
    from llmkit.tasks.chat import Conversation
    from llmkit.tasks.guarding import guarded_chat_turn

    _text(message, "the message")
    _text(system, "the system prompt")
    convo = conversation if conversation is not None else Conversation()
    paths = [os.fspath(p) for p in images]
    options = _engine_options(ctx, threads, device, gpu_layers, verbose)
    with _guarding(guard, guard_threshold, options) as checker, _opened(
            model, options, "chat", mmproj, images=bool(paths) or convo.has_images) as (
            engine, resolution):
        params = sampling_params(resolution, temperature=temperature, top_p=top_p, seed=seed,
                                 max_tokens=max_tokens)
        if system is not None:
            convo.system = system
        elif convo.system is None:
            convo.system = default_system_prompt(resolution)
        reply = guarded_chat_turn(engine, convo, message, checker, params=params,
                                  on_text=on_text, images=paths)
    _raise_if_interrupted(reply.generation)
    return reply


def caption(image: ImageSource, model: ModelRef = None, *, style: str = "short",
            prompt: str | None = None, max_tokens: int | None = None,
            temperature: float | None = None, top_p: float | None = None,
            seed: int | None = None, max_side: int = 2048,
            mmproj: str | os.PathLike[str] | None = None, guard: GuardRef = False,
            guard_threshold: float | None = None, ctx: int | None = None,
            threads: int | None = None, device: str = "auto", gpu_layers: int | None = None,
            verbose: bool = False) -> dict[str, Any]:
    """Caption one image, as ``llmkit caption`` does.

    Args:
        image: an image file, its bytes, or a Pillow image; read with the same bounds as the
            CLI's (EXIF orientation applied, at most 256 MiB and about 179 megapixels).
        model: a vision model's name or path (None: the default vision model), or an engine
            opened with its projector (``llmkit.load(..., kind="vision")``).
        style: "short" (one sentence), "detailed", "alt-text" (under 125 characters) or "tags"
            (comma-separated keywords).
        prompt: your own instruction instead of a style (the record's style is "custom").
        max_tokens: most tokens of the caption (default: by style, 64–512).
        temperature, top_p, seed: as for :func:`run`.
        max_side: downscale images whose longest side is larger.
        mmproj: the model's vision projector GGUF, when opening the model by name.
        guard, guard_threshold: as for :func:`run` (``prompt`` is the input checked first;
            a style's own instruction needs no check).
        ctx, threads, device, gpu_layers, verbose: as for :func:`load`, when opening by name.

    Returns:
        The record ``caption --format json`` prints: ``caption``, ``path`` (the file, or None
        for bytes and Pillow images), ``model``, ``style``, ``finish_reason``, ``image``
        (sizes and format), ``usage``, ``timings``, and with ``guard`` the verdict
        (``guard``, ``flagged``: false); ``error`` is None.

    Raises:
        InputError: an unknown style or an empty prompt.
        ImageError: the image cannot be read (missing, not an image, truncated, too large).
        NotAVisionModelError, ProjectorMissingError: the model cannot see images.
        FlaggedError: with ``guard``, the input or the answer was flagged (``.verdict`` says
            why); nothing is returned.
        VerdictError: with ``guard``, the guard's answer is not a verdict (fail closed).
        LlmkitError: the model cannot be resolved or loaded, or gave no caption.
        KeyboardInterrupt: Ctrl-C.

    Example:
        >>> record = llmkit.caption("photo.jpg", style="alt-text")
        >>> print(record["caption"])
    """
    from llmkit.defaults import default_model_name
    from llmkit.errors import LlmkitError, NotAVisionModelError
    from llmkit.session import sampling_params
    from llmkit.tasks.caption import DEFAULT_MAX_TOKENS as CAPTION_MAX_TOKENS
    from llmkit.tasks.caption import CaptionJob, caption_file, instruction_for
    from llmkit.tasks.guarding import GuardResult, check_input, check_output

    _text(prompt, "the prompt")
    instruction, style_name = instruction_for(style, prompt)
    path = os.fspath(image) if isinstance(image, (str, os.PathLike)) else None
    prepared = _prepare_image(image, max_side=max_side)  # before loading: fail fast
    options = _engine_options(ctx, threads, device, gpu_layers, verbose)
    with _guarding(guard, guard_threshold, options) as checker:
        # Your own instruction is input too; a guard that reads images judges the picture.
        checked = GuardResult()
        if checker is not None and (prompt is not None or checker.vision):
            checked = check_input(checker, instruction, [prepared])
        with _opened(model, options, "vision", mmproj) as (engine, resolution):
            if not engine.vision:
                raise NotAVisionModelError(engine.model_name, default_model_name("vision"))
            params = sampling_params(
                resolution, temperature=temperature, top_p=top_p, seed=seed,
                max_tokens=max_tokens or CAPTION_MAX_TOKENS[style_name])
            job = CaptionJob(instruction=instruction, style=style_name, params=params,
                             max_side=max_side)
            record = caption_file(engine, path if path is not None else _image_label(image),
                                  job, image=prepared)
        if record["error"] is not None:  # the model failed, or gave an empty caption
            raise LlmkitError(record["error"])
        if checker is not None:
            # The verdict marks the record as `caption --guard` marks it; a flagged caption
            # is refused as a guarded command refuses its answer.
            check_output(checker, instruction, record["caption"], checked,
                         [prepared]).apply_to(record, "caption")
    record["path"] = path
    return record


def summarize(document: str | os.PathLike[str] | bytes, model: ModelRef = None, *,
              length: str = "medium", words: int | None = None, style: str = "paragraph",
              focus: str | None = None, language: str | None = None,
              format: str | None = None, max_bytes: int | None = None,
              system: str | None = None, temperature: float | None = None,
              top_p: float | None = None, seed: int | None = None,
              max_tokens: int | None = None, guard: GuardRef = False,
              guard_threshold: float | None = None, ctx: int | None = None,
              threads: int | None = None, device: str = "auto", gpu_layers: int | None = None,
              verbose: bool = False) -> Summary:
    """Summarize a document of any length, as ``llmkit summarize`` does.

    A document longer than the context is split at paragraph and sentence boundaries, each
    part summarized, and the parts merged; nothing is cut.

    Args:
        document: the text itself (a ``str``), a document file (a ``Path``: text, Markdown,
            HTML or PDF), or a file's bytes. A ``str`` is always the text, never a file name.
        model: a model name or path (None: the default model), or an open engine.
        length: "short" (about 50 words), "medium" (120) or "long" (300).
        words: about this many words, instead of ``length``.
        style: "paragraph", "bullets", "tldr" (one or two sentences) or "headline".
        focus: aim the summary at a question or topic.
        language: write the summary in this language.
        format: read the document as "text", "markdown", "html" or "pdf" (default: from the
            file's name or content; "text" for a ``str``).
        max_bytes: refuse documents larger than this (default 32 MiB, as the CLI's).
        system: a system prompt (default: the catalog's for the model, if any).
        temperature: default the model's, else 0.2 (summaries stick to the text).
        top_p, seed: as for :func:`run`.
        max_tokens: most tokens of the final summary (default: from the length).
        guard, guard_threshold: as for :func:`run` (the document is the input checked first,
            in pieces that fit the guard's context).
        ctx, threads, device, gpu_layers, verbose: as for :func:`load`, when opening by name.

    Returns:
        The summary: ``text``, and what it took (``chunks``, ``levels``, ``merges``, ``calls``,
        token counts, ``seconds``, the chunk ``plan``).

    Raises:
        InputError: an unknown length or style, a bad word count, or an empty document.
        DocumentError: the file cannot be read as text (missing, binary, too large, a PDF
            without text).
        ContextTooSmallError: the context cannot hold an instruction, an answer and a useful
            part of the document.
        FlaggedError: with ``guard``, the input or the answer was flagged (``.verdict`` says
            why); nothing is returned.
        VerdictError: with ``guard``, the guard's answer is not a verdict (fail closed).
        LlmkitError: the model cannot be resolved or loaded.
        KeyboardInterrupt: Ctrl-C.

    Example:
        >>> from pathlib import Path
        >>> summary = llmkit.summarize(Path("report.md"), length="short")
        >>> print(summary.text, f"({summary.chunks} chunks)")
    """
    from llmkit.documents import DEFAULT_MAX_BYTES
    from llmkit.session import default_system_prompt, sampling_params
    from llmkit.tasks.guarding import check_input, check_output
    from llmkit.tasks.summarize import (
        GUARD_PROMPT,
        SUMMARY_TEMPERATURE,
        Summarizer,
        SummaryOptions,
        check_options,
    )

    for value, what in ((focus, "the focus"), (language, "the language"),
                        (system, "the system prompt")):
        _text(value, what)
    check_options(SummaryOptions(length=length, words=words, style=style))  # before loading
    doc = _document(document, format, max_bytes or DEFAULT_MAX_BYTES)
    for warning in doc.warnings:
        _log.warning("%s", warning)
    options = _engine_options(ctx, threads, device, gpu_layers, verbose)
    with _guarding(guard, guard_threshold, options) as checker:
        checked = check_input(checker, doc.text) if checker is not None else None
        with _opened(model, options, "text") as (engine, resolution):
            spec = resolution.spec
            if temperature is None and (spec is None or spec.temperature is None):
                temperature = SUMMARY_TEMPERATURE
            job = SummaryOptions(
                length=length, words=words, style=style, focus=focus, language=language,
                system=system if system is not None else default_system_prompt(resolution),
                params=sampling_params(resolution, temperature=temperature, top_p=top_p,
                                       seed=seed, max_tokens=max_tokens))
            summary = Summarizer(engine, job).summarize(doc.text)
        if checker is not None and checked is not None:
            check_output(checker, GUARD_PROMPT, summary.text, checked)
    return summary


def check(text: str | Sequence[Message] | Conversation, model: ModelRef = None, *,
          response: str | None = None, exclude: str | Sequence[str] | None = None,
          categories: str | os.PathLike[str] | None = None, threshold: float | None = None,
          image: ImageSource | None = None, ctx: int | None = None,
          threads: int | None = None, device: str = "auto", gpu_layers: int | None = None,
          verbose: bool = False) -> Verdict:
    """Check a prompt, a response or a conversation against a safety policy (Llama Guard 3).

    Args:
        text: a user prompt; or a conversation (a list of ``{"role", "content"}`` messages
            or a ``Conversation``), whose last message is checked in the light of the others.
        model: a guard model's name or path (None: ``llama-guard3:1b`` or
            ``$LLMKIT_GUARD_MODEL``), or an open engine.
        response: an assistant response to ``text`` to check (in the context of the prompt).
        exclude: categories to leave out: codes, or one string such as "S7,S8".
        categories: your own policy, a TOML file of ``[[categories]]`` (code, name,
            description), instead of the model's own.
        threshold: flag when P(unsafe) reaches this, instead of taking the model's answer.
        image: a picture judged together with the text (``text`` may then be empty: the
            picture alone), by a guard that reads images (``llama-guard3:11b-vision``).
        ctx, threads, device, gpu_layers, verbose: as for :func:`load`, when opening by name.

    Returns:
        The verdict: ``flagged``, ``categories``, ``score``, ``label`` ("safe" or
        "unsafe: S1 Violent Crimes"), and ``to_dict()`` (``check --format json``'s shape).
        A flagged verdict is an answer, not an error: nothing is raised for it.

    Raises:
        InputError: nothing to check, an empty message, roles that do not alternate user and
            assistant, a malformed policy file.
        UsageError: ``response`` with a conversation; an excluded code the policy lacks, or
            nothing left after the exclusions; a threshold outside 0–1.
        VerdictError: the model's answer is not a verdict (never taken as safe).
        ContextOverflowError: the conversation does not fit the guard's context.
        ImagesNotCheckableError: ``image`` for a guard that reads text only.
        ImageError: ``image`` cannot be read.
        LlmkitError: the model cannot be resolved or loaded.

    Example:
        >>> verdict = llmkit.check("How do I bake bread?", threshold=0.5)
        >>> print(verdict.label, verdict.score)
    """
    from llmkit.errors import InputError, UsageError
    from llmkit.tasks.chat import Conversation
    from llmkit.tasks.guard_prompt import check_conversation

    if isinstance(text, str):
        if not _text(text, "the text to check").strip() and image is None:
            raise InputError("the text to check is empty", hint="there is nothing to check")
        messages: list[Message] = [{"role": "user", "content": text}]
        if response is not None:
            messages.append({"role": "assistant", "content": _text(response, "the response")})
    else:
        if response is not None:
            raise UsageError("a response is checked against a prompt given as text",
                             hint="add it to the conversation as its last, assistant message")
        turns = text.rendered() if isinstance(text, Conversation) else list(text)
        for i, m in enumerate(turns, 1):
            content = m.get("content")
            if isinstance(content, str):  # other shapes are check_conversation's to refuse
                _text(content, f"message {i}")
        messages = turns
    messages = check_conversation(messages, image=image is not None)
    picture = _prepare_image(image) if image is not None else None  # before loading
    codes = exclude.split(",") if isinstance(exclude, str) else list(exclude or ())
    policy_file = Path(categories) if categories is not None else None
    options = _engine_options(ctx, threads, device, gpu_layers, verbose)
    engine = _given_engine(model)
    if engine is not None:
        _no_options(options, None)
        return _guard_on(engine, policy_file, codes, threshold).check(messages, picture)
    from llmkit.session import open_guard

    guard, note = open_guard(_model_name(model), options, exclude=",".join(codes) or None,
                             categories_file=policy_file, threshold=threshold,
                             images=picture is not None)
    _note(note)
    with guard:
        return guard.check(messages, picture)


# -- helpers ------------------------------------------------------------------------------

def _given_engine(model: ModelRef) -> Engine | None:
    """The open engine ``model`` is, or None when it names a model to open."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return None
    return model


def _model_name(model: ModelRef) -> str | None:
    """The name to resolve: a path object as its string, None for the default."""
    if model is None or isinstance(model, str):
        return model
    if isinstance(model, os.PathLike):
        return os.fspath(model)
    raise AssertionError("an open engine has no name to resolve")  # callers check first


def _engine_options(ctx: int | None, threads: int | None, device: str,
                    gpu_layers: int | None, verbose: bool) -> EngineOptions:
    from llmkit.session import EngineOptions

    return EngineOptions(ctx=ctx, threads=threads, device=device, gpu_layers=gpu_layers,
                         verbose=verbose)


def _no_options(options: EngineOptions, mmproj: object) -> None:
    """Hardware settings cannot change an engine that is already open: say so, not ignore them.

    Raises:
        UsageError: any of them was given.
    """
    from llmkit.errors import UsageError
    from llmkit.session import EngineOptions

    if options != EngineOptions() or mmproj is not None:
        raise UsageError("ctx, threads, device, gpu_layers, verbose and mmproj apply when "
                         "llmkit opens the model, and this engine is already open",
                         hint="pass them to llmkit.load")


@contextmanager
def _opened(model: ModelRef, options: EngineOptions, kind: str,
            mmproj: str | os.PathLike[str] | None = None, *, images: bool = False
            ) -> Iterator[tuple[Engine, Resolution]]:
    """The engine to work with and what its name resolved to; closed after if opened here.

    ``kind`` is how a command opens its model: "text" (``run``), "vision" (with the projector
    it needs: ``caption``, ``run --image``) or "chat" (with a projector when ``images`` or
    when the model has one).
    """
    from llmkit.session import open_chat_engine, open_engine, open_vision_engine

    given = _given_engine(model)
    if given is not None:
        _no_options(options, mmproj)
        yield given, _resolution_of(given)
        return
    name = _model_name(model)
    projector = Path(mmproj) if mmproj is not None else None
    if kind == "vision":
        engine, resolution, note = open_vision_engine(name, options, mmproj=projector)
    elif kind == "chat":
        engine, resolution, note = open_chat_engine(name, options, mmproj=projector,
                                                    images=images)
    else:
        engine, resolution = open_engine(name, options)
        note = resolution.note
    _note(note)
    with engine:
        yield engine, resolution


@contextmanager
def _guarding(guard: GuardRef, threshold: float | None, options: EngineOptions
              ) -> Iterator[Guard | None]:
    """The guard that ``guard`` and ``guard_threshold`` ask for (None: no check), with its
    model's own policy; closed after if opened here (with ``options``, as the CLI opens it)."""
    if guard is False and threshold is None:
        yield None
        return
    if not isinstance(guard, bool):
        engine = _given_engine(guard)
        if engine is not None:
            yield _guard_on(engine, None, (), threshold)
            return
    from llmkit.session import open_guard

    checker, note = open_guard(None if isinstance(guard, bool) else _model_name(guard),
                               options, threshold=threshold)
    _note(note)
    with checker:
        yield checker


def _resolution_of(engine: Engine) -> Resolution:
    """What an open engine's name resolves to, for its catalog defaults (sampling, system).

    An engine's ``model_name`` is the name it was opened by: a catalog or local name carries
    the same catalog entry as when the CLI resolves it, a path's file name none.
    """
    from llmkit.catalog import get_spec
    from llmkit.store import LocalModel, Resolution

    # Only the catalog entry is read from it; the file is the engine's.
    return Resolution(LocalModel(name=engine.model_name, path="", source="engine"),
                      get_spec(engine.model_name))


def _guard_on(engine: Engine, policy_file: Path | None, codes: Sequence[str],
              threshold: float | None) -> Guard:
    """A Guard on an open engine, with the policy ``check`` would give it by name."""
    from llmkit.tasks.policy import default_categories, exclude, load_categories
    from llmkit.tasks.safety import Guard

    policy = (load_categories(policy_file) if policy_file is not None
              else default_categories(engine.chat_template, engine.model_name))
    if codes:
        policy = exclude(policy, codes)
    return Guard(engine, policy, threshold=threshold)


def _note(note: str | None) -> None:
    if note:
        _log.info("%s", note)


@overload
def _text(value: str, what: str) -> str: ...


@overload
def _text(value: str | None, what: str) -> str | None: ...


def _text(value: str | None, what: str) -> str | None:
    """``value``, which must be text a tokenizer can encode (no lone surrogates).

    Raises:
        InputError: it holds half of a surrogate pair (bytes decoded with surrogateescape).
    """
    from llmkit.errors import InputError
    from llmkit.io import surrogate_problem

    if value is not None:
        problem = surrogate_problem(value)
        if problem is not None:
            raise InputError(f"{what} {problem}")
    return value


def _grammar(schema: str | Mapping[str, Any] | None) -> str | None:
    """The grammar for a JSON schema given as text or as a dict.

    Raises:
        SchemaError: not JSON, or nothing a grammar can express.
    """
    if schema is None:
        return None
    from llmkit.engines.llama_cpp import grammar_from_json_schema
    from llmkit.errors import SchemaError

    if not isinstance(schema, str):
        try:
            schema = json.dumps(schema, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"the JSON schema is not JSON: {exc}") from None
    return grammar_from_json_schema(schema)


def _prepare_image(image: ImageSource, *, max_side: int = 2048) -> PreparedImage:
    """Pixels for a vision model from a file, its bytes or a Pillow image, within the bounds
    every image is read with.

    Raises:
        ImageError: it cannot be read or is too large.
    """
    from llmkit.images import prepare_image

    if isinstance(image, (str, os.PathLike)):
        return prepare_image(Path(image), max_side=max_side)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return prepare_image(bytes(image), max_side=max_side, name=_image_label(image))
    return prepare_image(_encoded(image), max_side=max_side, name=_image_label(image))


def _image_label(image: ImageSource) -> str:
    """What messages call an image that is not a file."""
    return ("image data" if isinstance(image, (bytes, bytearray, memoryview))
            else "the Pillow image")


def _encoded(image: Image.Image) -> bytes:
    """A Pillow image as file bytes, so that it is read as a file is: its pixel mode, its
    transparency and its EXIF orientation kept (PNG, lossless; TIFF for modes PNG lacks).

    Raises:
        ImageError: Pillow cannot write it.
    """
    import io

    from llmkit.errors import ImageError

    buffer = io.BytesIO()
    png = image.mode in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA")
    try:
        image.save(buffer, format="PNG" if png else "TIFF", exif=image.getexif())
    except (OSError, ValueError, TypeError) as exc:
        raise ImageError(_image_label(image), f"cannot be read ({exc})",
                         hint="convert it to RGB first: image.convert('RGB')") from None
    return buffer.getvalue()


def _document(document: str | os.PathLike[str] | bytes, format: str | None,
              max_bytes: int) -> Document:
    """The document to summarize, read as the CLI reads a file or stdin.

    Raises:
        InputError: text that is not Unicode.
        DocumentError, UsageError: as :func:`llmkit.documents.read_document`.
    """
    from llmkit.documents import read_document

    if isinstance(document, str):
        # Through the same reader as stdin, so the text is tidied the same way.
        data = _text(document, "the document")
        return read_document(data.encode("utf-8"), name="the document",
                             format=format or "text", max_bytes=max_bytes)
    if isinstance(document, (bytes, bytearray, memoryview)):
        return read_document(bytes(document), name="the document", format=format,
                             max_bytes=max_bytes)
    return read_document(Path(document), format=format, max_bytes=max_bytes)


def _raise_if_interrupted(generation: Generation) -> None:
    # The engine stops at Ctrl-C and returns what it has (the CLI prints it); a library call
    # gives Python's usual answer, as the caption and summary tasks do.
    if generation.finish_reason == "interrupted":
        raise KeyboardInterrupt
