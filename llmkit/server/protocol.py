"""OpenAI's API as plain values: requests checked into dataclasses, responses and errors built."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmkit.chat_template import new_media_marker
from llmkit.server.errors import ApiError, bad_request
from llmkit.server.tools import ToolUse, assistant_calls, parse_tools

__all__ = ["ApiError", "bad_request"]

# OpenAI allows up to four stop sequences; llama-server more. Each is bounded so that the
# matcher's hold-back stays small.
MAX_STOPS = 8
MAX_STOP_CHARS = 256
MAX_MESSAGES = 4096
MAX_IMAGES = 16


@dataclass(frozen=True)
class ResponseFormat:
    """``response_format``: free text, any JSON object, or JSON matching a schema."""

    type: str = "text"
    schema: str | None = None  # the schema's JSON text, for json_schema


@dataclass
class GenerationRequest:
    """What chat and text completions share: the model, sampling, limits and streaming."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    response_format: ResponseFormat = field(default_factory=ResponseFormat)


@dataclass
class ChatRequest(GenerationRequest):
    """``POST /v1/chat/completions``: the conversation as role/content messages."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: ToolUse | None = None
    # image_url parts' URLs, in order; each one's place in a message's text is image_marker.
    images: list[str] = field(default_factory=list)
    image_marker: str = ""


@dataclass
class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: a plain prompt, continued."""

    prompt: str = ""
    echo: bool = False


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object")
    return body


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low:g} and {high:g}, not {value}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer", name)
    if not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low} and {high}, not {value}", name)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false", name)
    return value


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: one of the names GET /v1/models lists",
                          "model")
    return model


def _stops(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad_request(f"'stop' holds at most {MAX_STOPS} sequences", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"a stop sequence is at most {MAX_STOP_CHARS} characters", "stop")
    return [s for s in stops if s]


def _response_format(body: Mapping[str, Any]) -> ResponseFormat:
    import json

    value = body.get("response_format")
    if value is None:
        return ResponseFormat()
    if not isinstance(value, Mapping):
        raise bad_request("'response_format' must be an object", "response_format")
    kind = value.get("type")
    if kind in ("text", None):
        return ResponseFormat()
    if kind == "json_object":
        return ResponseFormat("json_object", '{"type": "object"}')
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise bad_request("'response_format.json_schema.schema' must be a JSON schema "
                              "object", "response_format")
        return ResponseFormat("json_schema", json.dumps(schema, allow_nan=False))
    raise bad_request(f"'response_format.type' must be text, json_object or json_schema, "
                      f"not {kind!r}", "response_format")


def _common(body: Mapping[str, Any], *, max_tokens_name: Sequence[str]) -> dict[str, Any]:
    n = _integer(body, "n", 1, 1_000_000)
    if n not in (None, 1):
        raise bad_request("'n' must be 1: llmkit answers each request with one choice", "n")
    for name in ("logprobs", "top_logprobs"):
        if body.get(name) not in (None, False, 0):
            raise bad_request(f"'{name}' is not supported by llmkit serve", name)
    max_tokens = None
    for name in max_tokens_name:
        value = _integer(body, name, 1, 2**31 - 1)
        if value is not None:
            max_tokens = value
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise bad_request("'stream_options' must be an object", "stream_options")
    include_usage = bool(options and options.get("include_usage") is True)
    return {
        "model": _model(body),
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0),
        "seed": _integer(body, "seed", -(2**63), 2**63 - 1),
        "max_tokens": max_tokens,
        "stop": _stops(body),
        "stream": _flag(body, "stream"),
        "include_usage": include_usage,
        "response_format": _response_format(body),
    }


def _content(value: Any, index: int, images: list[str] | None = None,
             marker: str = "") -> str:
    """A message's content as text: a string, or a list of text parts. ``images`` (a user
    message's): each ``image_url`` part's URL is added to it, and ``marker`` marks its place
    in the text."""
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, Mapping):
                raise bad_request(f"messages[{index}].content parts must be objects",
                                  "messages")
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and images is not None:
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, Mapping) else spec
                if not isinstance(url, str) or not url:
                    raise bad_request(f"messages[{index}]: an image_url part needs "
                                      "image_url.url", "messages")
                if len(images) >= MAX_IMAGES:
                    raise bad_request(f"a request shows at most {MAX_IMAGES} images",
                                      "messages")
                images.append(url)
                texts.append(marker)
            elif kind in ("image_url", "input_image", "input_audio", "file"):
                raise bad_request(f"messages[{index}] holds a {kind} part, which llmkit serve "
                                  "reads only in a user message (images)", "messages",
                                  code="unsupported_content")
            else:
                raise bad_request(f"messages[{index}].content holds a part of type {kind!r}",
                                  "messages")
        return "\n".join(texts)
    raise bad_request(f"messages[{index}].content must be a string or a list of parts",
                      "messages")


def parse_chat(body: Any) -> ChatRequest:
    """A ``POST /v1/chat/completions`` body, checked.

    Raises:
        ApiError: 400 for anything malformed or unsupported, naming the field.
    """
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad_request(f"'messages' holds at most {MAX_MESSAGES} messages", "messages")
    tools = parse_tools(body)
    images: list[str] = []
    marker = new_media_marker()
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise bad_request(f"messages[{i}] must be an object", "messages")
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise bad_request(f"messages[{i}].role must be system, developer, user, "
                              f"assistant or tool, not {role!r}", "messages")
        content = _content(message.get("content"), i, images if role == "user" else None,
                           marker)
        turn: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant" and message.get("tool_calls"):
            turn["tool_calls"] = assistant_calls(i, message["tool_calls"])
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise bad_request(f"messages[{i}]: a tool message needs 'tool_call_id'",
                                  "messages")
            turn["tool_call_id"] = call_id
        turns.append(turn)
    if turns[-1]["role"] == "assistant":
        raise bad_request("the last message must not be the assistant's: there is nothing "
                          "to answer", "messages")
    common = _common(body, max_tokens_name=("max_tokens", "max_completion_tokens"))
    if tools is not None and tools.constrained and common["response_format"].schema:
        raise bad_request("'response_format' cannot be combined with a required tool call",
                          "response_format")
    return ChatRequest(**common, messages=turns, tools=tools, images=images,
                       image_marker=marker if images else "")


def parse_completion(body: Any) -> CompletionRequest:
    """A ``POST /v1/completions`` body, checked (one prompt string per request).

    Raises:
        ApiError: 400 for anything malformed or unsupported.
    """
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (one prompt per request)", "prompt")
    if body.get("suffix"):
        raise bad_request("'suffix' is not supported by llmkit serve", "suffix")
    common = _common(body, max_tokens_name=("max_tokens",))
    if common["max_tokens"] is None:
        common["max_tokens"] = 16  # OpenAI's default for this endpoint
    return CompletionRequest(**common, prompt=prompt, echo=_flag(body, "echo"))


@dataclass
class ModerationRequest:
    """``POST /v1/moderations``: texts to check."""

    model: str | None
    inputs: list[str]


MAX_MODERATION_INPUTS = 64


def parse_moderation(body: Any) -> ModerationRequest:
    """A ``POST /v1/moderations`` body: ``input`` a string, a list of strings, or a list of
    ``{"type": "text", "text": …}`` parts.

    Raises:
        ApiError: 400 for anything malformed; images are not read by the text guard.
    """
    body = _object(body)
    value = body.get("input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise bad_request("'input' must be a string or a non-empty list", "input")
    if len(items) > MAX_MODERATION_INPUTS:
        raise bad_request(f"'input' holds at most {MAX_MODERATION_INPUTS} items", "input")
    texts = []
    for item in items:
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, Mapping) and item.get("type") == "text" and isinstance(
                item.get("text"), str):
            texts.append(item["text"])
        elif isinstance(item, Mapping) and item.get("type") == "image_url":
            raise bad_request("image inputs are not supported by llmkit serve's moderations",
                              "input", code="unsupported_content")
        else:
            raise bad_request("each 'input' item must be a string or a text part", "input")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("'model' must be a string", "model")
    return ModerationRequest(model, texts)


@dataclass
class EmbeddingRequest:
    """``POST /v1/embeddings``: texts to embed, and how to write the vectors."""

    model: str
    inputs: list[str]
    base64: bool = False


MAX_EMBEDDING_INPUTS = 256


def parse_embedding(body: Any) -> EmbeddingRequest:
    """A ``POST /v1/embeddings`` body: ``input`` a string or a list of strings;
    ``encoding_format`` float or base64 (OpenAI's Python client asks for base64).

    Raises:
        ApiError: 400 for anything malformed or unsupported (token-id inputs, dimensions).
    """
    body = _object(body)
    value = body.get("input")
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise bad_request("'input' must be a string or a non-empty list of strings", "input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"'input' holds at most {MAX_EMBEDDING_INPUTS} texts", "input")
    if any(not item for item in items):
        raise bad_request("'input' holds an empty string", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64", None):
        raise bad_request("'encoding_format' must be float or base64", "encoding_format")
    if body.get("dimensions") is not None:
        raise bad_request("'dimensions' is not supported: vectors have the model's own size",
                          "dimensions")
    return EmbeddingRequest(_model(body), list(items), encoding == "base64")


def embedding_list(model: str, vectors: Sequence[Sequence[float]], prompt_tokens: int,
                   base64: bool) -> dict[str, Any]:
    import base64 as b64
    import struct

    def encoded(vector: Sequence[float]) -> Any:
        if not base64:
            return list(vector)
        return b64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


# -- responses ---------------------------------------------------------------------------------

FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length",
                  "cancelled": "stop", "interrupted": "stop"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id: str, model: str, created: int, text: str | None, finish: str,
                    prompt_tokens: int, completion_tokens: int,
                    tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def tool_call_deltas(calls: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A streamed chunk's delta holding whole tool calls (each with its index)."""
    return {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}


def chat_chunk(id: str, model: str, created: int, delta: dict[str, Any],
               finish: str | None = None) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish}]}


def usage_chunk(id: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int, object: str = "chat.completion.chunk"
                ) -> dict[str, Any]:
    return {"id": id, "object": object, "created": created, "model": model,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def text_completion(id: str, model: str, created: int, text: str, finish: str | None,
                    prompt_tokens: int | None = None, completion_tokens: int | None = None
                    ) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if prompt_tokens is not None and completion_tokens is not None:
        body["usage"] = usage(prompt_tokens, completion_tokens)
    return body


def model_list(names: Sequence[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "llmkit"} for name in names]}


def now() -> int:
    return int(time.time())


class StopMatcher:
    """Cuts generated text at the first of the ``stop`` sequences, holding back only what
    could still become one (so streamed text never shows part of a stop sequence)."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> str:
        """The part of ``text`` (after what was held) that can be shown now."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._held + text
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        # Hold back the longest tail that is the start of a stop sequence.
        keep = 0
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
                break
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """What is held at the end of the generation (it never became a stop sequence)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
