"""The HTTP face of `llmkit serve`: Starlette routes, API-key checks, body limits, SSE."""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmkit.server.protocol import (
    ApiError,
    bad_request,
    model_list,
    parse_chat,
    parse_completion,
    parse_embedding,
    parse_moderation,
)
from llmkit.server.service import Service

DEFAULT_MAX_BODY = 8 * 1024 * 1024
# How often a non-streamed request looks whether its client is still there.
DISCONNECT_POLL_S = 0.25


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, refused past ``limit`` bytes before it is read whole."""
    from llmkit.io import parse_json

    too_large = ApiError(413, f"the request body is larger than this server accepts "
                         f"({limit} bytes)", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return parse_json(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not JSON: {exc}") from None


def _sse(values: AsyncIterator[dict[str, Any]], first: dict[str, Any]) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        try:
            yield f"data: {_dumps(first)}\n\n"
            async for value in values:
                yield f"data: {_dumps(value)}\n\n"
        except ApiError as exc:  # after the first event, an error can only be an event
            yield f"data: {_dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _last(values: AsyncIterator[dict[str, Any]], request: Request) -> dict[str, Any]:
    """The last value of ``values`` (a whole completion), given up (and its generation
    cancelled) if the client disconnects first."""

    async def collect() -> dict[str, Any]:
        last: dict[str, Any] | None = None
        async for value in values:
            last = value
        assert last is not None
        return last

    task = asyncio.ensure_future(collect())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "the client closed the request", code="client_closed")
    finally:
        if not task.done():
            task.cancel()


def create_app(service: Service, *, api_key: str | None = None,
               max_body: int = DEFAULT_MAX_BODY) -> Starlette:
    """The ASGI application serving ``service``.

    Args:
        service: the models and guard.
        api_key: required as ``Authorization: Bearer KEY`` on every route but ``/health``
            (compared in constant time); None: no key.
        max_body: the largest request body, in bytes (413 past it).
    """
    expected = api_key.encode("utf-8") if api_key else None

    def authorize(request: Request) -> None:
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), expected):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def endpoint(handler: Callable[[Request], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                authorize(request)
                return await handler(request)
            except ApiError as exc:
                return _error(exc)

        return wrapped

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": service.health()})

    async def models(request: Request) -> Response:
        return JSONResponse(model_list(service.names(), service.created))

    async def answer(request: Request, values: AsyncIterator[dict[str, Any]], stream: bool
                     ) -> Response:
        if stream:
            # Everything that can fail as an HTTP status (unknown model, a prompt too long,
            # a full queue) fails before the first event.
            first = await values.__anext__()
            return _sse(values, first)
        return JSONResponse(await _last(values, request))

    async def chat(request: Request) -> Response:
        req = parse_chat(await _read_json(request, max_body))
        return await answer(request, service.chat(req), req.stream)

    async def completions(request: Request) -> Response:
        req = parse_completion(await _read_json(request, max_body))
        return await answer(request, service.complete(req), req.stream)

    async def moderations(request: Request) -> Response:
        req = parse_moderation(await _read_json(request, max_body))
        return JSONResponse(await service.moderate(req))

    async def embeddings(request: Request) -> Response:
        req = parse_embedding(await _read_json(request, max_body))
        return JSONResponse(await service.embed(req))

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = {404: f"no route {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
                       status, "internal server error")
        return _error(ApiError(status, message, code="not_found" if status == 404 else None))

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/moderations", endpoint(moderations), methods=["POST"]),
        Route("/v1/embeddings", endpoint(embeddings), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: not_found})
