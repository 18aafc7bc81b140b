"""Image captions: one instruction per style, tidy output, and one record per image."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.engines.base import Engine, Generation, Message, RGBImage, SamplingParams
from llmkit.errors import InputError, LlmkitError

if TYPE_CHECKING:
    from llmkit.engines.parallel import Job, Result, Task
    from llmkit.images import PreparedImage
    from llmkit.tasks.safety import Guard

# What a directory or glob of images is searched for (the suffixes Pillow and its plugins
# read); also the siblings that make a sidecar name ambiguous (photo.jpg and photo.png).
IMAGE_SUFFIXES = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
    ".heic", ".heif", ".avif", ".ppm", ".pgm", ".pbm", ".tga", ".ico",
})

# What each --style asks the model. Kept short: small vision models follow short, concrete
# instructions better than long ones.
STYLES: dict[str, str] = {
    "short": "Describe this image in one sentence.",
    "detailed": ("Describe this image in detail: the main subject, the setting, colours, any "
                 "visible text, and anything unusual."),
    "alt-text": ("Write alt text for this image for someone using a screen reader: one plain "
                 "sentence under 125 characters. Do not start with 'Image of' or 'Picture of'."),
    "tags": ("List 5 to 15 keywords that describe this image, lowercase, separated by commas. "
             "Reply with the keywords only."),
}
DEFAULT_STYLE = "short"
# Enough room for what each style asks; a caption that hits the limit is reported as "length".
DEFAULT_MAX_TOKENS = {"short": 96, "detailed": 512, "alt-text": 64, "tags": 96, "custom": 512}
ALT_TEXT_LIMIT = 125


def instruction_for(style: str | None, prompt: str | None) -> tuple[str, str]:
    """The instruction to send and the style name to report (``custom`` for ``--prompt``).

    Raises:
        InputError: an unknown style or a blank prompt.
    """
    if prompt is not None:
        if not prompt.strip():
            raise InputError("the --prompt is empty")
        return prompt.strip(), "custom"
    style = style or DEFAULT_STYLE
    if style not in STYLES:
        raise InputError(f"unknown style '{style}'", hint=f"use one of {', '.join(STYLES)}")
    return STYLES[style], style


_PREAMBLE = re.compile(r"^(alt[- ]text|caption|description|keywords|tags)\s*:\s*", re.I)
_TAG_JUNK = re.compile(r"^[\s\-*•#\d.)]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _shorten(text: str, limit: int) -> str:
    """Cut at the last sentence end within ``limit``, else the last word, ending with a period."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    if end >= 15:  # a whole first sentence beats a sentence cut mid-way
        return head[:end + 1]
    cut = head[:limit - 1].rsplit(" ", 1)[0].rstrip(" ,;:-")
    return cut + "."


def tidy_caption(text: str, style: str) -> str:
    """Clean a raw answer into the shape the style promises.

    short/alt-text: one line, no "Caption:" preamble or wrapping quotes; alt-text at most
    125 characters (cut at a sentence or word boundary). tags: lowercase, comma-separated,
    each once. detailed/custom: only outer whitespace removed. Every style: control characters
    other than tab and newline are dropped (a model can emit a NUL byte token; a caption file
    holding one would read as binary, and terminals act on the others).
    """
    text = _CONTROL.sub("", text.replace("\r\n", "\n")).strip()
    if style in ("detailed", "custom"):
        return text
    if style == "tags":
        tags: list[str] = []
        for part in re.split(r"[,\n;]", text):
            tag = _TAG_JUNK.sub("", _PREAMBLE.sub("", part.strip())).strip(" .\"'").lower()
            if tag and tag not in tags:
                tags.append(tag)
        return ", ".join(tags)
    text = " ".join(_PREAMBLE.sub("", text).split())
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if style == "alt-text":
        text = _shorten(text, ALT_TEXT_LIMIT)
    return text


def caption_image(
    engine: Engine,
    image: RGBImage,
    instruction: str,
    params: SamplingParams,
    *,
    system: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Generation:
    """Ask the model one question about one image (image first, then the instruction)."""
    return engine.generate_with_images(caption_messages(engine, instruction, system), [image],
                                       params, on_text)


def caption_messages(engine: Engine, instruction: str, system: str | None) -> list[Message]:
    """The conversation that asks for one image's caption (image first, then the
    instruction), the image at the engine's media marker."""
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": f"{engine.media_marker}\n{instruction}"})
    return messages


@dataclass(frozen=True)
class CaptionJob:
    """Everything that is the same for every image in a batch."""

    instruction: str
    style: str
    params: SamplingParams
    max_side: int
    system: str | None = None


def caption_record(path: str, style: str, *, model: str | None,
                   error: str | None = None) -> dict[str, Any]:
    """The first fields of an image's record, in their stable order; ``caption`` still null.

    Args:
        path: the image as given.
        style: the style name (``custom`` for an own instruction).
        model: the captioning model's name (None: refused before any model was asked).
        error: why the image has no caption, naming it.

    Returns:
        ``path``, ``caption``, ``model``, ``style`` and ``error``.
    """
    return {"path": path, "caption": None, "model": model, "style": style, "error": error}


def caption_file(engine: Engine, path: str, job: CaptionJob,
                 on_text: Callable[[str], None] | None = None, *,
                 image: PreparedImage | None = None, guard: Guard | None = None
                 ) -> dict[str, Any]:
    """Caption one file and return its record; a bad file gives a record with ``error`` set.

    The record shape is stable (JSON/JSONL output and ``--out``): ``path``, ``caption``,
    ``model``, ``style``, ``error``, ``finish_reason``, ``image`` (sizes), ``usage`` and
    ``timings``, then with a ``guard`` its verdicts (``guard``, ``flagged``; a flagged
    caption is withheld: null, with a ``flagged_note`` for the screen). ``error`` is one
    sentence that names the file. KeyboardInterrupt is not caught: the batch stops and the
    record is not written.

    Args:
        engine: a vision engine.
        path: the image file, or what to call ``image`` in the record and its messages.
        job: what is the same for every image.
        on_text: receives the raw caption as it is generated (not with a ``guard``).
        image: the image, already prepared (from bytes or a Pillow image); None: read
            ``path`` with ``job.max_side``.
        guard: checks the caption in the context of the instruction (``--guard``); a guard
            that reads images (Llama Guard 3 Vision) first checks the picture itself with the
            instruction (a flagged picture is not captioned), then the caption with both.

    Returns:
        The image's record.
    """
    if guard is not None and guard.vision:
        return _caption_seen_by_guard(engine, path, job, image, guard)
    record = _caption_file(engine, path, job, None if guard is not None else on_text, image)
    if guard is not None and record.get("caption"):
        from llmkit.tasks.guarding import guard_batch_output

        record = guard_batch_output(guard, job.instruction, record["caption"]).apply_to(
            record, "caption")
    return record


def _caption_seen_by_guard(engine: Engine, path: str, job: CaptionJob,
                           image: PreparedImage | None, guard: Guard) -> dict[str, Any]:
    """:func:`caption_file` with a guard that sees the picture: input, caption, output."""
    from llmkit.images import prepare_image
    from llmkit.tasks.guarding import guard_batch_input, guard_batch_output

    if image is None:
        try:
            image = prepare_image(Path(path), max_side=job.max_side)
        except LlmkitError:
            return _caption_file(engine, path, job, None, None)  # the file's error record
    checked = guard_batch_input(guard, job.instruction, image)
    if checked.withheld:
        record = caption_record(path, job.style, model=engine.model_name)
        record["image"] = _image_sizes(image)
        return checked.apply_to(record, "caption")
    record = _caption_file(engine, path, job, None, image)
    if record.get("caption"):
        return guard_batch_output(guard, job.instruction, record["caption"], checked,
                                  image).apply_to(record, "caption")
    return record


def _image_sizes(image: PreparedImage) -> dict[str, Any]:
    return {"width": image.width, "height": image.height,
            "original_width": image.original_width,
            "original_height": image.original_height, "format": image.format}


def _caption_file(engine: Engine, path: str, job: CaptionJob,
                  on_text: Callable[[str], None] | None,
                  image: PreparedImage | None) -> dict[str, Any]:
    from llmkit.engines.parallel import drive

    return drive(_caption_steps(engine, path, job, image),
                 lambda picture: caption_image(engine, picture, job.instruction, job.params,
                                               system=job.system, on_text=on_text))


def _caption_steps(engine: Engine, path: str, job: CaptionJob, image: PreparedImage | None
                   ) -> Generator[PreparedImage, Generation, dict[str, Any]]:
    """One image's record, step by step: yields the prepared image to caption, is sent its
    generation (or an LlmkitError thrown in), returns the record."""
    from llmkit.images import prepare_image

    t0 = time.perf_counter()
    record = caption_record(path, job.style, model=engine.model_name)
    try:
        if image is None:
            image = prepare_image(Path(path), max_side=job.max_side)
    except LlmkitError as exc:
        record["error"] = str(exc)  # with its hint: e.g. which extra reads HEIC
        record["timings"] = {"total_ms": round((time.perf_counter() - t0) * 1000, 2)}
        return record
    t_prepared = time.perf_counter()
    record["image"] = _image_sizes(image)
    try:
        generation = yield image
    except LlmkitError as exc:
        record["error"] = f"{path}: {exc}"
        return record
    if generation.finish_reason == "interrupted":
        raise KeyboardInterrupt
    t_end = time.perf_counter()
    caption = tidy_caption(generation.text, job.style)
    if not caption:
        record["error"] = f"{path}: the model gave an empty caption"
    else:
        record["caption"] = caption
    record["finish_reason"] = generation.finish_reason
    record["usage"] = {"prompt_tokens": generation.prompt_tokens,
                       "image_tokens": generation.image_tokens,
                       "completion_tokens": generation.completion_tokens}
    record["timings"] = {
        "prepare_ms": round((t_prepared - t0) * 1000, 2),
        "prompt_ms": round(generation.prompt_ms, 2),
        "generation_ms": round(generation.generation_ms, 2),
        "total_ms": round((t_end - t0) * 1000, 2),
    }
    return record


def caption_files(engine: Engine, paths: Sequence[str], job: CaptionJob, *,
                  guard: Guard | None = None, on_start: Callable[[str], None] | None = None
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
    """:func:`caption_file` for many images, yielding ``(path, record)`` as each is done
    (not in input order): with an engine that decodes several sequences at once, each image
    is encoded when a sequence is free for it and the captions of up to ``parallel`` images
    are decoded together. Otherwise (one sequence, a projector whose positions run ahead of
    the cells, a guard that reads images) one image after another.
    """
    from llmkit.engines.parallel import parallel_generate, run_tasks

    if (parallel_generate(engine) is None or not getattr(engine, "parallel_images", False)
            or (guard is not None and guard.vision)):
        for path in paths:
            if on_start is not None:
                on_start(path)
            yield path, caption_file(engine, path, job, guard=guard)
        return

    def tasks() -> Iterator[tuple[str, Task]]:
        for path in paths:
            if on_start is not None:
                on_start(path)
            yield path, _caption_task(engine, path, job, guard)

    yield from run_tasks(tasks(), window=getattr(engine, "parallel", 1))


def _caption_task(engine: Engine, path: str, job: CaptionJob, guard: Guard | None
                  ) -> Generator[list[tuple[Any, Job]], list[Result], dict[str, Any]]:
    """One image's record as a task of :func:`llmkit.engines.parallel.run_tasks`."""
    steps = _caption_steps(engine, path, job, None)
    try:
        image = next(steps)
        while True:  # one step: the caption
            media_job = None
            try:
                media_job = engine.media_job(  # type: ignore[attr-defined]
                    path, caption_messages(engine, job.instruction, job.system), [image],
                    job.params)
                assert media_job is not None  # parallel_images said so
                results = yield [(engine, media_job)]
            except LlmkitError as exc:
                image = steps.throw(exc)
                continue
            finally:
                if media_job is not None:
                    media_job.media.close()
            result = results[0]
            if result.error is not None or result.generation is None:
                image = steps.throw(result.error or LlmkitError("the model gave no answer"))
                continue
            result.generation.image_tokens = media_job.media.image_tokens
            image = steps.send(result.generation)
    except StopIteration as stop:
        record: dict[str, Any] = stop.value
    if guard is not None and record.get("caption"):
        from llmkit.tasks.guarding import guard_output_steps

        # The check's jobs share the guard's sequences with the other captions' checks.
        checked = yield from guard_output_steps(guard, job.instruction, record["caption"],
                                                batched=True)
        record = checked.apply_to(record, "caption")
    return record
