"""What `llmkit serve` answers, without HTTP: served models, guard checks, generations."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmkit.chat_template import ChatTemplateRejected
from llmkit.engines.base import Engine, Generation, SamplingParams
from llmkit.engines.parallel import Job, Result
from llmkit.errors import (
    ContextOverflowError,
    ImageError,
    InputError,
    LlmkitError,
    QueueFullError,
    SchemaError,
    ShuttingDownError,
    UsageError,
    VerdictError,
)
from llmkit.server.moderation import moderation_result
from llmkit.server.protocol import (
    FINISH_REASONS,
    ApiError,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationRequest,
    ModerationRequest,
    StopMatcher,
    bad_request,
    chat_chunk,
    chat_completion,
    embedding_list,
    new_id,
    now,
    text_completion,
    tool_call_deltas,
    usage_chunk,
)
from llmkit.server.tools import CallHolder, arguments_key, call_schema, read_calls
from llmkit.server.worker import Arrival, EngineWorker
from llmkit.store import Resolution
from llmkit.tasks.safety import CheckPlan, Guard, Verdict

_REQUEST_ERRORS = (UsageError, InputError, ImageError, ChatTemplateRejected)

# Seconds a queued request may wait for a busy model before 429 (the client retries).
RETRY_AFTER_S = 1


@dataclass
class ServedModel:
    """A loaded model, the names it answers to and its decoding thread."""

    name: str
    engine: Engine
    resolution: Resolution
    worker: EngineWorker
    aliases: frozenset[str] = frozenset()
    # Rendering a chat template is not thread-safe, and it may take a while (a hostile
    # template, up to its CPU bound): one thread per model renders and tokenizes.
    prep: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, "llmkit-prep"))

    def close(self) -> None:
        self.worker.close()
        self.prep.shutdown(wait=True)
        self.engine.close()


@dataclass
class Limits:
    """What one request may ask for."""

    max_tokens: int | None = None  # the most tokens one answer may ask for (None: the context)
    timeout_s: float = 600.0  # a request's whole time, queued and generating
    max_image_pixels: int = 40_000_000  # a picture's pixels, as its header says (bombs)
    allow_files: Path | None = None  # image_url may name files in this folder (else data: only)


@dataclass
class _Outcome:
    text: str
    finish: str
    generation: Generation | None


@dataclass
class _Generating:
    """A job queued on a worker: its events (text pieces, then its future) and its cancel."""

    worker: EngineWorker
    events: asyncio.Queue[tuple[str, Any]]
    cancel: threading.Event
    deadline: float  # the event loop's time past which it is a 504


class Service:
    """The served models and guard, answering parsed requests with OpenAI-shaped values.

    Generation runs on each model's :class:`EngineWorker` (continuous batching); the coroutines
    here only wait, so one event loop serves every client.
    """

    def __init__(self, models: Sequence[ServedModel], *, guard: Guard | None = None,
                 guard_worker: EngineWorker | None = None, guard_chats: bool = True,
                 limits: Limits | None = None) -> None:
        self.models = list(models)
        self.guard = guard
        self.guard_worker = guard_worker
        self.guard_chats = guard_chats and guard is not None
        self.limits = limits or Limits()
        self.created = now()
        self._guard_prep = concurrent.futures.ThreadPoolExecutor(1, "llmkit-guard-prep")

    def close(self) -> None:
        """Finish what is in flight, then free every model."""
        for model in self.models:
            model.close()
        if self.guard_worker is not None:
            self.guard_worker.close()
        self._guard_prep.shutdown(wait=True)
        if self.guard is not None:
            self.guard.close()

    # -- names -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def health(self) -> list[dict[str, Any]]:
        """Each model's sequences and the requests it has in progress or waiting."""
        rows = [{"id": m.name, "parallel": m.worker.parallel, "busy": m.worker.busy,
                 "queue_limit": m.worker.max_waiting} for m in self.models]
        if self.guard is not None and self.guard_worker is not None:
            rows.append({"id": self.guard.engine.model_name, "role": "guard",
                         "parallel": self.guard_worker.parallel,
                         "busy": self.guard_worker.busy,
                         "queue_limit": self.guard_worker.max_waiting})
        return rows

    def model(self, name: str) -> ServedModel:
        for served in self.models:
            if name == served.name or name in served.aliases:
                return served
        raise ApiError(404, f"the model '{name}' is not served here (served: "
                       f"{', '.join(self.names())})", code="model_not_found", param="model")

    # -- generation ----------------------------------------------------------------------------

    async def _in_prep(self, served: ServedModel, function: Any, *args: Any,
                       param: str = "messages") -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(served.prep, function, *args)
        except ContextOverflowError as exc:
            raise _overflow(exc, served.engine.n_ctx, param) from None
        except LlmkitError as exc:
            raise bad_request(exc.message if not exc.hint else str(exc)) from None

    def _params(self, served: ServedModel, req: GenerationRequest, prompt_len: int,
                schema: str | None = None) -> SamplingParams:
        from llmkit.engines.llama_cpp import grammar_from_json_schema
        from llmkit.session import sampling_params

        room = served.engine.n_ctx - prompt_len
        if room <= 0:
            raise _overflow(ContextOverflowError(prompt_len, served.engine.n_ctx),
                            served.engine.n_ctx)
        cap = self.limits.max_tokens
        if req.max_tokens is not None and cap is not None and req.max_tokens > cap:
            raise bad_request(f"max_tokens {req.max_tokens} is more than this server allows "
                              f"({cap})", "max_tokens")
        grammar = None
        schema = schema if schema is not None else req.response_format.schema
        if schema is not None:
            try:
                grammar = grammar_from_json_schema(schema)
            except SchemaError as exc:
                raise bad_request(exc.message, "response_format" if schema is
                                  req.response_format.schema else "tools") from None
        wanted = req.max_tokens if req.max_tokens is not None else cap
        return sampling_params(served.resolution, temperature=req.temperature,
                               top_p=req.top_p, seed=req.seed, max_tokens=wanted,
                               grammar=grammar)

    def _submit(self, worker: EngineWorker, job: Job,
                call: Callable[[Job], Generation] | None = None,
                arrival: Arrival | None = None) -> _Generating:
        """Queue the job now (before the response starts: a full queue is an HTTP status,
        and the decoder can take the job while the response's headers are sent). ``call``:
        run it with the engine to itself instead of decoding ``job`` in the sequences.
        ``arrival``: the request's count as one being prepared, ended as the job is queued.

        Raises:
            ApiError: 429 when the model's queue is full, 503 when shutting down.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def on_text(text: str) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("text", text))

        job = replace(job, on_text=on_text, cancel=cancel)
        try:
            future = (worker.submit(job, arrival) if call is None
                      else worker.submit_call(job, call, arrival))
        except QueueFullError as exc:
            raise ApiError(429, f"{exc.message}; retry shortly", type="requests",
                           code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDownError:
            raise ApiError(503, "the server is shutting down", type="server_error",
                           code="shutting_down") from None
        finally:
            if arrival is not None:
                arrival.done()

        def done(f: concurrent.futures.Future[Result]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, ("done", f))

        future.add_done_callback(done)
        return _Generating(worker, events, cancel, loop.time() + self.limits.timeout_s)

    async def _events(self, generating: _Generating, stops: Sequence[str]
                      ) -> AsyncIterator[tuple[str, Any]]:
        """A queued job's events as it decodes: ("text", piece) as stop sequences allow, then
        ("done", _Outcome). Leaving early (a client gone) cancels the job.

        Raises:
            ApiError: 504 past the request timeout, 500 when the job failed, 503 when the
                server shut down first.
        """
        loop = asyncio.get_running_loop()
        worker, events, cancel = generating.worker, generating.events, generating.cancel
        matcher = StopMatcher(stops)
        deadline = generating.deadline
        pieces: list[str] = []
        try:
            while True:
                remaining = deadline - loop.time()
                try:
                    kind, value = await asyncio.wait_for(events.get(), max(remaining, 0.001))
                except asyncio.TimeoutError:
                    cancel.set()
                    raise ApiError(504, f"the request took longer than the server's "
                                   f"{self.limits.timeout_s:g} s timeout", type="server_error",
                                   code="timeout") from None
                if kind == "text":
                    shown = matcher.feed(value)
                    if matcher.stopped:
                        cancel.set()
                    if shown:
                        pieces.append(shown)
                        yield "text", shown
                    continue
                try:
                    result: Result = value.result()
                except ShuttingDownError:
                    raise ApiError(503, "the server is shutting down", type="server_error",
                                   code="shutting_down") from None
                except BaseException as exc:
                    raise ApiError(500, f"generation failed: {exc}", type="server_error"
                                   ) from None
                if result.error is not None:
                    if isinstance(result.error, ContextOverflowError):
                        raise _overflow(result.error, worker.engine.n_ctx)
                    if isinstance(result.error, _REQUEST_ERRORS):
                        # The request's own fault, found only as the engine took it (a
                        # template that refuses the conversation, an image it cannot read).
                        raise bad_request(str(result.error), "messages")
                    raise ApiError(500, result.error.message, type="server_error")
                rest = matcher.flush()
                if rest:
                    pieces.append(rest)
                    yield "text", rest
                generation = result.generation
                reason = generation.finish_reason if generation is not None else "cancelled"
                finish = "stop" if matcher.stopped else FINISH_REASONS.get(reason, "stop")
                yield "done", _Outcome("".join(pieces), finish, generation)
                return
        finally:
            cancel.set()  # a no-op once finished; frees the sequence when the client left

    # -- guard -------------------------------------------------------------------------------

    async def _judge(self, plan: Any, *args: Any) -> Verdict:
        """One text's verdict from the guard, its checks decoded on the guard's worker."""
        guard, worker = self.guard, self.guard_worker
        assert guard is not None and worker is not None
        loop = asyncio.get_running_loop()
        try:
            plans: list[CheckPlan] = await loop.run_in_executor(self._guard_prep, plan, *args)
        except LlmkitError as exc:
            raise bad_request(f"the guard cannot check this text: {exc}") from None
        steps = guard.judged_steps(plans)
        wanted = next(steps)
        futures = []
        for _, job in wanted:
            try:
                futures.append(asyncio.wrap_future(worker.submit(job)))
            except QueueFullError as exc:
                raise ApiError(429, f"{exc.message}; retry shortly", type="requests",
                               code="rate_limit_exceeded",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        results = list(await asyncio.gather(*futures))
        try:
            steps.send(results)
        except StopIteration as stop:
            verdict: Verdict = stop.value
            return verdict
        except VerdictError as exc:
            # Fail closed: an answer that is not a verdict never lets text through.
            raise ApiError(500, f"the guard's answer was not a verdict: {exc.message}",
                           type="server_error", code="guard_failed") from None
        except LlmkitError as exc:
            raise ApiError(500, f"the guard failed: {exc.message}", type="server_error",
                           code="guard_failed") from None
        raise ApiError(500, "the guard asked for more than one round of checks",
                       type="server_error")

    async def check_input(self, text: str) -> Verdict:
        assert self.guard is not None
        return await self._judge(self.guard.long_text_plans, text)

    async def check_output(self, prompt: str, answer: str) -> Verdict:
        assert self.guard is not None
        return await self._judge(self.guard.response_plans, prompt, answer)

    async def moderate(self, req: ModerationRequest) -> dict[str, Any]:
        """``POST /v1/moderations``: each input checked by the guard (together, on its
        sequences)."""
        if self.guard is None:
            raise ApiError(404, "no guard model is loaded: start `llmkit serve` with --guard "
                           "(or --guard-model NAME)", code="model_not_found", param="model")
        verdicts = await asyncio.gather(*(self.check_input(text) for text in req.inputs))
        return {"id": new_id("modr"), "model": self.guard.engine.model_name,
                "results": [moderation_result(v) for v in verdicts]}

    # -- embeddings ------------------------------------------------------------------------------

    async def embed(self, req: EmbeddingRequest) -> dict[str, Any]:
        """``POST /v1/embeddings``: each text's pooled, normalised vector (llama.cpp's engine
        only; in a context of the model's own, beside generation)."""
        from llmkit.engines.llama_cpp import LlamaCppEngine

        served = self.model(req.model)
        engine = served.engine
        if not isinstance(engine, LlamaCppEngine):
            raise bad_request(f"{served.name} gives no embeddings", "model")

        def run() -> tuple[list[list[float]], int]:
            try:
                vectors = engine.embed(req.inputs)
            except ContextOverflowError as exc:
                raise ApiError(400, f"an input is {exc.n_tokens} tokens, but {served.name} "
                               f"embeds at most {exc.n_ctx} tokens per text",
                               code="context_length_exceeded", param="input") from None
            return vectors, sum(len(engine.tokenize(t)) for t in req.inputs)

        vectors, tokens = await self._in_prep(served, run)
        return embedding_list(served.name, vectors, tokens, req.base64)

    # -- chat ----------------------------------------------------------------------------------

    def _chat_messages(self, served: ServedModel, req: ChatRequest) -> list[dict[str, Any]]:
        """The conversation with the catalog's system prompt where it has none, each image's
        place marked as the engine marks it."""
        from llmkit.session import default_system_prompt

        messages = list(req.messages)
        if not any(m["role"] == "system" for m in messages):
            system = default_system_prompt(served.resolution)
            if system:
                messages.insert(0, {"role": "system", "content": system})
        if req.images:
            marker = served.engine.media_marker
            messages = [{**m, "content": m["content"].replace(req.image_marker, marker)}
                        if isinstance(m.get("content"), str) else m for m in messages]
        return messages

    async def _chat_job(self, served: ServedModel, req: ChatRequest
                        ) -> tuple[Job, int, Callable[[Job], Generation] | None]:
        """What to generate for a chat: the job, its prompt's length (0 when only the engine
        knows it), and the call to make instead when the engine must be alone for it."""
        if not req.images:
            prompt = await self._chat_prompt(served, req)
            params = self._params(served, req, len(prompt), self._call_schema(served, req))
            return Job(None, prompt, params), len(prompt), None
        engine = served.engine
        if not engine.vision:
            raise bad_request(f"{served.name} does not read images (serve a vision model, "
                              "such as smolvlm or gemma3)", "messages",
                              code="unsupported_content")
        if engine.max_images is not None and len(req.images) > engine.max_images:
            raise bad_request(f"{served.name} reads at most {engine.max_images} image"
                              f"{'s' * (engine.max_images != 1)} per conversation, not "
                              f"{len(req.images)}", "messages")
        if req.tools is not None and req.tools.active:
            raise bad_request("tools cannot be combined with images yet", "tools")
        messages = self._chat_messages(served, req)
        images = await self._in_prep(served, self._load_images, req.images)
        params = self._params(served, req, 0)
        if getattr(engine, "parallel_images", False):
            job: Job = await self._in_prep(served, engine.media_job,  # type: ignore[attr-defined]
                                           None, messages, images, params)
            try:
                params = self._params(served, req, len(job.prompt or ()))
            except BaseException:
                job.media.close()
                raise
            return replace(job, params=params), len(job.prompt or ()), None

        def alone(job: Job) -> Generation:
            return engine.generate_with_images(messages, images, job.params, job.on_text)

        return Job(None, [], params), 0, alone

    def _load_images(self, urls: Sequence[str]) -> list[Any]:
        """Each image_url's picture, decoded within the limits (on the prep thread).

        Raises:
            ApiError: 400 for a URL this server does not read; ImageError for a bad image.
        """
        from llmkit.images import prepare_image

        images = []
        for i, url in enumerate(urls):
            source = _image_source(url, i, self.limits.allow_files)
            images.append(prepare_image(source, max_pixels=self.limits.max_image_pixels,
                                        name=f"image {i + 1}"))
        return images

    async def _chat_prompt(self, served: ServedModel, req: ChatRequest) -> list[int]:
        messages = self._chat_messages(served, req)
        use = req.tools
        tools = use.definitions() if use is not None and use.active else None
        if tools is not None and not served.engine.reads_tools:
            raise bad_request(f"the chat template of {served.name} has no place for tools, so "
                              "it cannot call them (send tool_choice \"none\", or serve a "
                              "model trained for tool use, such as llama3.2)", "tools",
                              code="unsupported_tools")
        engine = served.engine

        def tokens_of() -> list[int]:
            return engine.chat_tokens(messages, tools=tools)

        tokens: list[int] = await self._in_prep(served, tokens_of)
        return tokens

    def _call_schema(self, served: ServedModel, req: ChatRequest) -> str | None:
        """The grammar's schema when the answer must be a tool call."""
        use = req.tools
        if use is None or not use.constrained:
            return None
        return call_schema(use, arguments_key(served.engine.chat_template))

    @staticmethod
    def _last_user_text(req: ChatRequest) -> str:
        text = next((m["content"] for m in reversed(req.messages) if m["role"] == "user"), "")
        return str(text).replace(req.image_marker, "").strip() if req.images else str(text)

    async def chat(self, req: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        """A chat completion as chunks (``req.stream``) or as one completion object, the last
        value. With the guard, a flagged prompt or answer ends as ``content_filter``."""
        served = self.model(req.model)
        id, created = new_id("chatcmpl"), now()
        arrival = served.worker.arrival()
        try:
            job, prompt_len, call = await self._chat_job(served, req)
            try:
                async for value in self._chat(served, req, id, created, job, prompt_len, call,
                                              arrival):
                    yield value
            finally:
                if job.media is not None:
                    job.media.close()
        finally:
            arrival.done()

    async def _chat(self, served: ServedModel, req: ChatRequest, id: str, created: int,
                    job: Job, prompt_len: int, call: Callable[[Job], Generation] | None,
                    arrival: Arrival) -> AsyncIterator[dict[str, Any]]:
        use = req.tools if req.tools is not None and req.tools.active else None
        holder = CallHolder() if use is not None else None
        user_text = self._last_user_text(req)
        guarded = self.guard_chats
        if guarded:
            arrival.done()  # the guard's check takes longer than the decoder should wait
            verdict = await self.check_input(user_text)
            if verdict.flagged:
                async for value in self._filtered(req, served, id, created, prompt_len,
                                                  "input", verdict):
                    yield value
                return
        generating = self._submit(served.worker, job, call, arrival)
        outcome: _Outcome | None = None
        try:
            if req.stream:
                yield chat_chunk(id, served.name, created, {"role": "assistant",
                                                            "content": ""})
            async for kind, value in self._events(generating, req.stop):
                if kind == "text":
                    shown = holder.feed(value) if holder is not None else value
                    if req.stream and not guarded and shown:
                        yield chat_chunk(id, served.name, created, {"content": shown})
                else:
                    outcome = value
        finally:
            generating.cancel.set()  # a no-op once finished; frees the sequence if abandoned
        assert outcome is not None
        completion_tokens = outcome.generation.completion_tokens if outcome.generation else 0
        prompt_tokens = outcome.generation.prompt_tokens if outcome.generation else prompt_len
        calls = read_calls(outcome.text, use) if use is not None else None
        held = holder.held() if holder is not None else ""
        if guarded:
            verdict = await self.check_output(user_text, outcome.text)
            if verdict.flagged:
                async for value in self._filtered(req, served, id, created, prompt_tokens,
                                                  "output", verdict, completion_tokens,
                                                  started=True):
                    yield value
                return
            if req.stream and outcome.text and not calls:
                yield chat_chunk(id, served.name, created, {"content": outcome.text})
        finish = "tool_calls" if calls else outcome.finish
        if req.stream:
            if calls:
                yield chat_chunk(id, served.name, created, tool_call_deltas(calls))
            elif held and not guarded:
                yield chat_chunk(id, served.name, created, {"content": held})
            yield chat_chunk(id, served.name, created, {}, finish)
            if req.include_usage:
                yield usage_chunk(id, served.name, created, prompt_tokens, completion_tokens)
            return
        yield chat_completion(id, served.name, created, None if calls else outcome.text,
                              finish, prompt_tokens, completion_tokens, calls)

    async def _filtered(self, req: ChatRequest, served: ServedModel, id: str, created: int,
                        prompt_tokens: int, stage: str, verdict: Verdict,
                        completion_tokens: int = 0, *, started: bool = False
                        ) -> AsyncIterator[dict[str, Any]]:
        """A guarded chat whose prompt or answer was flagged, as OpenAI answers filtered
        output: no content, ``finish_reason`` ``content_filter``, the verdict beside it."""
        guard = {"stage": stage, **moderation_result(verdict)}
        if req.stream:
            if not started:
                yield chat_chunk(id, served.name, created, {"role": "assistant",
                                                            "content": ""})
            chunk = chat_chunk(id, served.name, created, {}, "content_filter")
            chunk["guard"] = guard
            yield chunk
            if req.include_usage:
                yield usage_chunk(id, served.name, created, prompt_tokens, completion_tokens)
            return
        body = chat_completion(id, served.name, created, None, "content_filter",
                               prompt_tokens, completion_tokens)
        body["guard"] = guard
        yield body

    # -- text completions ------------------------------------------------------------------------

    async def complete(self, req: CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        """A text completion as chunks (``req.stream``) or one object, the last value."""
        served = self.model(req.model)
        id, created = new_id("cmpl"), now()
        arrival = served.worker.arrival()
        try:
            async for value in self._complete(served, req, id, created, arrival):
                yield value
        finally:
            arrival.done()

    async def _complete(self, served: ServedModel, req: CompletionRequest, id: str,
                        created: int, arrival: Arrival) -> AsyncIterator[dict[str, Any]]:
        prompt: list[int] = await self._in_prep(served, _plain_tokens, served.engine,
                                                req.prompt, param="prompt")
        params = self._params(served, req, len(prompt))
        if self.guard_chats:
            arrival.done()
            verdict = await self.check_input(req.prompt)
            if verdict.flagged:
                body = text_completion(id, served.name, created, "", "content_filter",
                                       len(prompt), 0)
                body["guard"] = {"stage": "input", **moderation_result(verdict)}
                yield body
                return
        outcome: _Outcome | None = None
        echo = req.prompt if req.echo else ""
        generating = self._submit(served.worker, Job(None, prompt, params), arrival=arrival)
        try:
            if req.stream and echo and not self.guard_chats:
                yield text_completion(id, served.name, created, echo, None)
            async for kind, value in self._events(generating, req.stop):
                if kind == "text":
                    if req.stream and not self.guard_chats:
                        yield text_completion(id, served.name, created, value, None)
                else:
                    outcome = value
        finally:
            generating.cancel.set()
        assert outcome is not None
        completion_tokens = outcome.generation.completion_tokens if outcome.generation else 0
        text, finish = outcome.text, outcome.finish
        if self.guard_chats:
            verdict = await self.check_output(req.prompt, outcome.text)
            if verdict.flagged:
                text, finish = "", "content_filter"
            if req.stream:
                yield text_completion(id, served.name, created, echo + text, None)
        if req.stream:
            yield text_completion(id, served.name, created, "", finish)
            if req.include_usage:
                yield usage_chunk(id, served.name, created, len(prompt), completion_tokens,
                                  "text_completion")
            return
        yield text_completion(id, served.name, created, echo + text, finish, len(prompt),
                              completion_tokens)


def _plain_tokens(engine: Engine, text: str) -> list[int]:
    """A completion prompt's tokens: BOS, then the text as plain text (never special tokens)."""
    return engine.tokenize(text, add_special=True, parse_special=False)


def _overflow(exc: ContextOverflowError, n_ctx: int, param: str = "messages") -> ApiError:
    return ApiError(400, f"the prompt is {exc.n_tokens} tokens, but this model's context "
                    f"holds {n_ctx} tokens per request (prompt and answer together)",
                    code="context_length_exceeded", param=param)


def _read_regular_file(path: Path, label: str) -> bytes:
    """A regular file's bytes, at most the image file limit. Opened without blocking and
    checked after opening, so a FIFO or device put there (even after the name was checked)
    never stalls the thread that reads it.

    Raises:
        ApiError: 400 when it is missing, not a regular file, too large or unreadable.
    """
    import os
    import stat

    from llmkit.images import DEFAULT_MAX_BYTES

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise bad_request(f"{label}: the file cannot be opened ({exc.strerror or exc})",
                          "messages", code="invalid_image_url") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise bad_request(f"{label}: the file is not a regular file", "messages",
                              code="invalid_image_url")
        if info.st_size > DEFAULT_MAX_BYTES:
            raise bad_request(f"{label}: the file is larger than {DEFAULT_MAX_BYTES >> 20} MiB",
                              "messages", code="invalid_image_url")
        chunks: list[bytes] = []
        left = DEFAULT_MAX_BYTES + 1  # a file that grows past the limit is cut, then refused
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise bad_request(f"{label}: the file cannot be read ({exc.strerror or exc})",
                          "messages", code="invalid_image_url") from None
    finally:
        os.close(fd)


def _image_source(url: str, index: int, allow_files: Path | None) -> bytes:
    """An image_url's bytes: a base64 ``data:`` URL's, or with ``--allow-files`` those of a
    regular file in that folder (a path or a ``file://`` URL). Nothing is ever fetched from a
    network.

    Raises:
        ApiError: 400 for any other URL, bad base64, or a file outside the folder.
    """
    import base64
    import binascii

    label = f"image {index + 1}"
    if url.startswith("data:"):
        head, comma, data = url[5:].partition(",")
        if not comma or not head.lower().endswith(";base64"):
            raise bad_request(f"{label}: a data: URL must be base64 (data:image/png;base64,...)",
                              "messages", code="invalid_image_url")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{label}: the data: URL is not valid base64", "messages",
                              code="invalid_image_url") from None
    if allow_files is not None and "://" not in url.removeprefix("file://"):
        from urllib.parse import unquote

        path = Path(unquote(url[7:]) if url.startswith("file://") else url)
        try:
            real = (path if path.is_absolute() else allow_files / path).resolve()
            inside = real.is_relative_to(allow_files.resolve())
        except (OSError, RuntimeError, ValueError):  # a symlink loop, an unencodable name
            raise bad_request(f"{label}: the file name cannot be read", "messages",
                              code="invalid_image_url") from None
        if not inside:
            raise bad_request(f"{label}: the file is outside the folder this server may read",
                              "messages", code="invalid_image_url")
        return _read_regular_file(real, label)
    raise bad_request(f"{label}: image_url must be a data: URL (llmkit serve fetches nothing"
                      + ("" if allow_files else "; start it with --allow-files DIR to read "
                         "files from a folder") + ")", "messages", code="invalid_image_url")
