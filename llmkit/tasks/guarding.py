"""`--guard` for other commands: a command's input checked before, its answer after."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from llmkit.engines.base import Engine, RGBImage, SamplingParams
from llmkit.engines.parallel import Job, Result, parallel_generate
from llmkit.errors import FlaggedError, LlmkitError
from llmkit.tasks.chat import Conversation, Reply, chat_turn
from llmkit.tasks.safety import Guard, Verdict, verdict_for_parts


@dataclass(frozen=True)
class GuardResult:
    """The guard's part of a guarded result: the verdicts taken, or why none could be.

    ``input`` and ``output`` are None for a side that was not checked (an empty answer is
    not). ``failure`` is the message of a guard that could not decide (no verdict, a text it
    cannot hold); it fails closed: the item's text is withheld as an error.
    """

    input: Verdict | None = None
    output: Verdict | None = None
    failure: str | None = None

    @property
    def flagged_stage(self) -> str | None:
        """The side that was flagged ("input" or "output"), or None."""
        if self.input is not None and self.input.flagged:
            return "input"
        if self.output is not None and self.output.flagged:
            return "output"
        return None

    @property
    def withheld(self) -> bool:
        """Whether the item's text must not be used: flagged, or not checkable."""
        return self.failure is not None or self.flagged_stage is not None

    def to_record(self) -> dict[str, Any]:
        """The ``guard`` field of a JSON result: each verdict that was taken."""
        record: dict[str, Any] = {}
        if self.input is not None:
            record["input"] = self.input.to_dict()
        if self.output is not None:
            record["output"] = self.output.to_dict()
        return record

    def apply_to(self, record: dict[str, Any], text_field: str) -> dict[str, Any]:
        """Mark a batch record with this result, as ``--format json`` and ``--out`` show it.

        A failure sets ``error`` (naming the record's ``path``); otherwise ``guard`` and
        ``flagged`` are set, and a flagged item has its text (``text_field``) set to null and
        a ``flagged_note``, the sentence a single command would refuse with.

        Args:
            record: the item's record; changed in place.
            text_field: the field holding the generated text ("caption", "summary").

        Returns:
            ``record``.
        """
        if self.failure is not None:
            record[text_field] = None
            record["error"] = f"{record.get('path')}: the safety check failed: {self.failure}"
            return record
        stage = self.flagged_stage
        # The keys keep the order the records have always had: a refused input names the
        # refusal first, a checked answer its verdicts first.
        if stage == "input" and self.input is not None:
            record[text_field] = None
            record["flagged"] = True
            record["guard"] = self.to_record()
            record["flagged_note"] = str(FlaggedError(stage, self.input))
            return record
        record["guard"] = self.to_record()
        record["flagged"] = stage is not None
        if stage == "output" and self.output is not None:
            record[text_field] = None
            record["flagged_note"] = str(FlaggedError(stage, self.output))
        return record


# -- pictures: a vision guard sees them, a text guard reads the text alone -------------------

def _with_pictures(guard: Guard, images: Sequence[RGBImage],
                   check: Callable[[RGBImage | None], Verdict]) -> Verdict:
    """``check`` once per picture for a guard that reads images (flagged if any is; one
    picture per check, as Llama Guard 3 Vision takes), else once on the text alone."""
    if not guard.vision or not images:
        return check(None)
    return verdict_for_parts([check(image) for image in images])


# -- a command with one input and one answer (run, caption's own instruction) --------------

def check_input(guard: Guard, text: str, images: Sequence[RGBImage] = ()) -> GuardResult:
    """Check a guarded command's input before anything is generated.

    Args:
        guard: the guard.
        text: the prompt.
        images: the pictures the prompt shows (``run --image``): a vision guard judges each
            with the text; a text guard reads the text alone, as it always has.

    Returns:
        The result so far (its ``input`` verdict, which passed).

    Raises:
        FlaggedError: the input is flagged (nothing should be generated).
        VerdictError: the guard did not answer with a verdict (fail closed).
    """
    verdict = _with_pictures(guard, images, lambda image: guard.check_long_text(text, image))
    if verdict.flagged:
        raise FlaggedError("prompt", verdict)
    return GuardResult(input=verdict)


def check_output(guard: Guard, prompt: str, answer: str, so_far: GuardResult,
                 images: Sequence[RGBImage] = ()) -> GuardResult:
    """Check a guarded command's answer in the context of its prompt (and its pictures, for
    a vision guard).

    Returns:
        ``so_far`` with the ``output`` verdict (unchanged for an empty answer).

    Raises:
        FlaggedError: the answer is flagged (it must be withheld).
        VerdictError: the guard did not answer with a verdict (fail closed).
    """
    if not answer.strip():
        return so_far
    verdict = _with_pictures(guard, images,
                             lambda image: guard.check_response(prompt, answer, image))
    if verdict.flagged:
        raise FlaggedError("output", verdict)
    return replace(so_far, output=verdict)


# -- a chat turn ---------------------------------------------------------------------------

def guarded_chat_turn(engine: Engine, convo: Conversation, user_text: str, guard: Guard | None,
                      *, params: SamplingParams | None = None,
                      on_text: Callable[[str], None] | None = None,
                      images: Sequence[str] = ()) -> Reply:
    """A chat turn whose message is checked before and whose reply is checked after (with the
    conversation's pictures, for a guard that reads images).

    A flagged message is not added to the conversation; a flagged reply is withheld and the
    turn removed, so the session goes on as if it had not happened. Without a guard this is
    plain :func:`llmkit.tasks.chat.chat_turn`. The reply reaches ``on_text`` only once checked.

    Raises:
        FlaggedError: the message or the reply was flagged.
        VerdictError: the guard did not answer with a verdict (fail closed).
        As :func:`llmkit.tasks.chat.chat_turn` otherwise.
    """
    if guard is None:
        return chat_turn(engine, convo, user_text, params=params, on_text=on_text,
                         images=images)
    # A guard that reads images judges the message with every picture the conversation
    # shows once it is added (earlier turns' and this one's): what the model answers about.
    pictures = (convo.prepared([*convo.image_paths, *(str(p) for p in images)])
                if guard.vision else [])
    verdict = _with_pictures(guard, pictures,
                             lambda image: guard.check_long_text(user_text, image))
    if verdict.flagged:
        raise FlaggedError("input", verdict)
    before = list(convo.messages)
    reply = chat_turn(engine, convo, user_text, params=params, on_text=None, images=images)
    try:
        answer = (_with_pictures(guard, pictures, lambda image: guard.check_response(
            user_text, reply.text, image)) if reply.text.strip() else None)
    except BaseException:
        convo.messages[:] = before
        raise
    if answer is not None and answer.flagged:
        convo.messages[:] = before
        raise FlaggedError("output", answer)
    if on_text is not None and reply.text:
        on_text(reply.text)
    return reply


# -- one item of a batch (caption, summarize): problems are the record's, not the batch's --

def guard_batch_input(guard: Guard, text: str, image: RGBImage | None = None) -> GuardResult:
    """Check one batch item's input; never raises for the item.

    Args:
        guard: the guard.
        text: the item's input text (a document, a caption instruction).
        image: the item's picture, judged with the text (a vision guard only).

    Returns:
        The input verdict, or the failure; when ``withheld``, the caller marks the record
        with :meth:`GuardResult.apply_to` and skips the item.
    """
    try:
        return GuardResult(input=guard.check_long_text(text, image))
    except LlmkitError as exc:
        return GuardResult(failure=str(exc))


def guard_batch_output(guard: Guard, prompt: str, answer: str,
                       so_far: GuardResult | None = None, image: RGBImage | None = None
                       ) -> GuardResult:
    """Check one batch item's answer (an empty one needs no check); never raises for the item.

    Args:
        guard: the guard.
        prompt: what the answer answers (the context the guard judges it in).
        answer: the generated text.
        so_far: the item's input result, when its input was checked.
        image: the picture the prompt showed (a vision guard only).

    Returns:
        ``so_far`` with the output verdict, or the failure (which alone makes the record).
    """
    try:
        verdict = (guard.check_response(prompt, answer, image) if answer.strip() else None)
    except LlmkitError as exc:
        return GuardResult(failure=str(exc))
    return replace(so_far or GuardResult(), output=verdict)


# -- the same, as steps of a batch's task: checks decoded beside the other items' work -----

# The key of a guard job's results (``(GUARD_JOBS, i)``), which progress counters skip.
GUARD_JOBS = "guard"

GuardSteps = Generator[list[tuple[Any, Job]], list[Result], GuardResult]


def _batched(guard: Guard, batched: bool) -> bool:
    # Pictures need the Vision engine, which checks one at a time; so does a guard loaded
    # with one sequence.
    return batched and parallel_generate(guard.engine) is not None


def guard_input_steps(guard: Guard, text: str, *, batched: bool) -> GuardSteps:
    """:func:`guard_batch_input` (text only) as a task's steps for
    :func:`llmkit.engines.parallel.run_tasks`: with ``batched`` and a guard that decodes
    several sequences, its checks (a long text's pieces too) are yielded as jobs for the
    guard's engine, so they share its sequences with the other items' checks; otherwise the
    check runs at once and nothing is yielded."""
    if not _batched(guard, batched):
        return guard_batch_input(guard, text)
    try:
        verdict = yield from guard.judged_steps(guard.long_text_plans(text), GUARD_JOBS)
    except LlmkitError as exc:
        return GuardResult(failure=str(exc))
    return GuardResult(input=verdict)


def guard_output_steps(guard: Guard, prompt: str, answer: str,
                       so_far: GuardResult | None = None, *, batched: bool) -> GuardSteps:
    """:func:`guard_batch_output` (text only) as a task's steps (see
    :func:`guard_input_steps`)."""
    if not _batched(guard, batched):
        return guard_batch_output(guard, prompt, answer, so_far)
    verdict = None
    if answer.strip():
        try:
            verdict = yield from guard.judged_steps(guard.response_plans(prompt, answer),
                                                    GUARD_JOBS)
        except LlmkitError as exc:
            return GuardResult(failure=str(exc))
    return replace(so_far or GuardResult(), output=verdict)
