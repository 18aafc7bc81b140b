"""Function calling for `llmkit serve`: tools checked, a forced call's schema, calls read back."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llmkit.server.errors import ApiError, bad_request

# OpenAI's own bounds: 128 tools a request, names of 1–64 letters, digits, '_' and '-'.
MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TAG_OPEN, _TAG_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class Tool:
    """One function the model may call: its name, its arguments' JSON schema, and the
    definition as the chat template reads it (OpenAI's ``{"type": "function", …}``)."""

    name: str
    parameters: Mapping[str, Any]
    definition: Mapping[str, Any]


@dataclass(frozen=True)
class ToolUse:
    """A request's ``tools`` and ``tool_choice``: "auto" (the model decides), "required" (it
    must call one), "none" (it must not) or one tool by name (``forced``)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    forced: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether the template is given the tools and the answer read for calls."""
        return self.choice != "none"

    @property
    def constrained(self) -> bool:
        """Whether the answer must be a call (a grammar makes it one)."""
        return self.choice == "required" or self.forced is not None

    def definitions(self) -> list[Mapping[str, Any]]:
        return [t.definition for t in self.tools]

    def names(self) -> set[str]:
        return {t.name for t in self.tools}


def parse_tools(body: Mapping[str, Any]) -> ToolUse | None:
    """A chat request's ``tools``, ``tool_choice`` and ``parallel_tool_calls``, checked (None
    when it gives no tools).

    Raises:
        ApiError: 400 naming the field that is malformed.
    """
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise bad_request("'functions' and 'function_call' are OpenAI's retired names: send "
                          "'tools' and 'tool_choice'", "functions")
    value = body.get("tools")
    choice = body.get("tool_choice")
    if value is None or value == []:
        if choice not in (None, "none", "auto"):
            raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
        return None
    if not isinstance(value, list):
        raise bad_request("'tools' must be a list of function definitions", "tools")
    if len(value) > MAX_TOOLS:
        raise bad_request(f"'tools' holds at most {MAX_TOOLS} functions", "tools")
    tools: list[Tool] = []
    for i, item in enumerate(value):
        function = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(item, Mapping) or item.get("type") != "function" or not isinstance(
                function, Mapping):
            raise bad_request(f"tools[{i}] must be {{\"type\": \"function\", \"function\": "
                              "{...}}", "tools")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(f"tools[{i}].function.name must be 1 to 64 letters, digits, '_' "
                              "or '-'", "tools")
        if name in {t.name for t in tools}:
            raise bad_request(f"tools[{i}]: the function {name!r} is defined twice", "tools")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise bad_request(f"tools[{i}].function.description must be a string", "tools")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object",
                              "tools")
        definition = {"type": "function", "function": {
            "name": name, **({"description": description} if description else {}),
            "parameters": parameters}}
        tools.append(Tool(name, parameters, definition))
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be true or false", "parallel_tool_calls")
    if choice is None or choice in ("auto", "none", "required"):
        return ToolUse(tuple(tools), choice or "auto", None, parallel)
    function = choice.get("function") if isinstance(choice, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise bad_request("'tool_choice' must be none, auto, required or {\"type\": "
                          "\"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if name not in {t.name for t in tools}:
        raise bad_request(f"'tool_choice' names {name!r}, which is not in 'tools'",
                          "tool_choice")
    return ToolUse(tuple(tools), "function", name, parallel)


def arguments_key(template: str) -> str:
    """The key a model's calls put their arguments under: Llama 3.1/3.2 answer
    ``{"name": …, "parameters": …}``, Hermes-style templates (Qwen, SmolLM3 …) ask for
    ``"arguments"``."""
    if '"arguments"' in template:
        return "arguments"
    return "parameters" if "parameters" in template else "arguments"


def call_schema(use: ToolUse, key: str) -> str:
    """The JSON schema of the one call the model must write (tool_choice required or named),
    in the model's own call format, for the grammar."""
    chosen = [t for t in use.tools if use.forced is None or t.name == use.forced]
    variants = [{"type": "object",
                 "properties": {"name": {"const": t.name}, key: dict(t.parameters)},
                 "required": ["name", key]} for t in chosen]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    try:
        return json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError):
        raise bad_request("a tool's parameters are not a JSON schema", "tools") from None


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def read_calls(text: str, use: ToolUse) -> list[dict[str, Any]] | None:
    """The tool calls an answer makes, as OpenAI's ``tool_calls``, or None when it is plain
    text (anything but calls of the request's own tools, in full).

    Reads the formats models are trained on: a JSON object ``{"name": …, "parameters"|
    "arguments": {…}}`` (Llama 3.1/3.2; several joined by ';'), a JSON list of them, or each in
    ``<tool_call>…</tool_call>`` tags (Hermes, Qwen).
    """
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if body.startswith(_TAG_OPEN):
        chunks = []
        parts = body.split(_TAG_OPEN)[1:]
        for k, part in enumerate(parts):
            inner, closed, after = part.partition(_TAG_CLOSE)
            # Only the last call may lack its closing tag (the answer ended on a stop token).
            if after.strip() or (not closed and k != len(parts) - 1):
                return None
            chunks.append(inner)
        objects = []
        for chunk in chunks:
            found = _json_values(chunk)
            if found is None:
                return None
            objects.extend(found)
    else:
        found = _json_values(body)
        if found is None:
            return None
        objects = found
    calls = []
    names = use.names()
    for value in objects:
        call = _call(value, names)
        if call is None:
            return None
        calls.append(call)
    if not calls:
        return None
    return calls if use.parallel else calls[:1]


def _json_values(text: str) -> list[Any] | None:
    """The JSON values ``text`` is made of, one after another (joined by whitespace or ';'),
    a top-level list flattened; None when it is anything else."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    i, n = 0, len(text)
    while True:
        while i < n and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i >= n:
            return values
        if text[i] not in "{[":
            return None
        try:
            value, i = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            return None
        if isinstance(value, list):
            values.extend(value)
        else:
            values.append(value)


def _call(value: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        return None
    if value.get("type") == "function" and isinstance(value.get("function"), Mapping):
        value = value["function"]
    name = value.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args = value.get("parameters", value.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, Mapping):
        return None
    return {"id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


class CallHolder:
    """Streamed text with tools offered: text that may be the start of a call is held back
    until the answer ends (a call is sent whole, as ``tool_calls``); text that cannot be one
    passes at once."""

    def __init__(self) -> None:
        self._held = ""
        self.holding: bool | None = None  # None: not decided yet

    def feed(self, text: str) -> str:
        if self.holding is False:
            return text
        self._held += text
        start = self._held.lstrip()
        if not start:
            return ""
        if start[0] in "{[" or start.startswith(_TAG_OPEN):
            self.holding = True
            return ""
        if _TAG_OPEN.startswith(start) or "<|python_tag|>".startswith(start):
            return ""  # could still become a tag
        self.holding = False
        shown, self._held = self._held, ""
        return shown

    def held(self) -> str:
        """What was held back (the whole answer when it looked like a call)."""
        held, self._held = self._held, ""
        return held


def tool_messages_error(index: int, message: str) -> ApiError:
    return bad_request(f"messages[{index}]: {message}", "messages")


def assistant_calls(index: int, value: Any) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls`` as chat templates read them: arguments as a
    mapping (OpenAI sends them as JSON text).

    Raises:
        ApiError: 400 for a malformed call.
    """
    if not isinstance(value, list) or not value:
        raise tool_messages_error(index, "'tool_calls' must be a non-empty list")
    calls = []
    for call in value:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise tool_messages_error(index, "each tool call needs function.name")
        args = function.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise tool_messages_error(index, "a tool call's arguments are not JSON"
                                          ) from None
        if not isinstance(args, Mapping):
            raise tool_messages_error(index, "a tool call's arguments must be a JSON object")
        call_id = call.get("id")
        calls.append({"id": call_id if isinstance(call_id, str) else new_call_id(),
                      "type": "function",
                      "function": {"name": function["name"], "arguments": dict(args)}})
    return calls
