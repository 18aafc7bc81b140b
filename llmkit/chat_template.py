"""Chat templates as untrusted code: a bounded Jinja sandbox, and special-token-safe prompt text."""

from __future__ import annotations

import json
import re
import secrets
import string
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from llmkit.errors import LlmkitError

# -- limits -------------------------------------------------------------------------------------

# A real chat template renders a conversation in milliseconds; these bounds only stop templates
# that loop, recurse or grow strings without end. Sizes scale with the conversation, so a long
# document still renders; the floor keeps short prompts (and the template's own text) free.
# Time is the rendering thread's CPU time: a busy machine slows a render, it does not fail it.
RENDER_SECONDS = 5.0
MIN_CHARS = 1 << 20  # characters of output, and of any one value, for a small conversation
CHARS_PER_INPUT_CHAR = 8
MIN_LOOP_STEPS = 1_000_000
MAX_CALL_DEPTH = 64
MAX_INT_BITS = 1 << 16
MAX_JSON_INDENT = 16


class ChatTemplateError(LlmkitError):
    """A model's chat template is not valid Jinja, or broke a rendering bound or the sandbox."""


class ChatTemplateRejected(LlmkitError):
    """The template refused the conversation (``raise_exception``, or an error in its logic)."""


class _Limit(Exception):
    """Raised inside a render when a bound is exceeded; carries what was exceeded."""


class _Raised(Exception):
    """The template called ``raise_exception``."""


@dataclass
class _Budget:
    """What one render may still spend."""

    deadline: float
    seconds: float
    max_chars: int
    steps: int
    steps_left: int = -1
    written: int = 0
    depth: int = 0
    ticks: int = 0

    @classmethod
    def unbounded_time(cls) -> _Budget:
        """Bounds for work done outside a render (Jinja folds constant filters when compiling)."""
        return cls(deadline=float("inf"), seconds=float("inf"), max_chars=MIN_CHARS,
                   steps=MIN_LOOP_STEPS)

    def __post_init__(self) -> None:
        if self.steps_left < 0:
            self.steps_left = self.steps

    def tick(self) -> None:
        # Every step between two ticks is bounded, so reading the clock every 32nd is enough.
        self.ticks += 1
        if self.ticks & 31 == 0 and time.thread_time() > self.deadline:
            raise _Limit(f"the rendering limit of {self.seconds:g} seconds of CPU time")

    def size(self, n: int) -> None:
        if n > self.max_chars:
            raise _Limit(f"the size limit of {self.max_chars} characters for one value")


def _measure(value: Any, budget: int) -> tuple[int, int]:
    """About how many characters ``value`` prints as, and how deeply it nests; stops counting
    once past ``budget`` (shared sub-structures are counted each time, as printing them is)."""
    from jinja2.utils import Namespace

    size = depth = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, str):
            size += len(item) + 2
        elif isinstance(item, (list, tuple, set, frozenset)):
            size += 2 + 2 * len(item)
            depth = max(depth, level)
            stack.extend((x, level + 1) for x in item)
        elif isinstance(item, dict):
            size += 2 + 4 * len(item)
            depth = max(depth, level)
            stack.extend((x, level + 1) for pair in item.items() for x in pair)
        elif isinstance(item, Namespace):
            stack.append((object.__getattribute__(item, "_Namespace__attrs"), level))
        elif isinstance(item, int) and not isinstance(item, bool):
            size += item.bit_length() // 3 + 1
        else:
            size += 1
        if size > budget:
            break
    return size, depth


def _number_too_big(text: str, limit: int) -> bool:
    return len(text) > 9 or int(text) > limit


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent_format(fmt: str, args: Any, limit: int) -> None:
    """Refuse ``fmt % args`` whose widths or precisions would build a huge string."""
    star = False
    for match in _PERCENT_SPEC.finditer(fmt):
        for group in match.groups():
            if group == "*":
                star = True
            elif group and _number_too_big(group, limit):
                raise _Limit(f"the size limit of {limit} characters for one value")
    if star:
        values = args if isinstance(args, tuple) else (args,)
        if any(isinstance(v, int) and abs(v) > limit for v in values):
            raise _Limit(f"the size limit of {limit} characters for one value")


def _check_str_format(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any],
                      limit: int) -> None:
    """Refuse ``fmt.format(...)`` whose field widths would build a huge string."""
    for _, _, spec, _ in string.Formatter().parse(fmt):
        if not spec:
            continue
        if any(_number_too_big(n, limit) for n in re.findall(r"\d+", spec)) or (
                "{" in spec and any(isinstance(v, int) and abs(v) > limit
                                    for v in [*args, *kwargs.values()])):
            raise _Limit(f"the size limit of {limit} characters for one value")


def _growth_check(name: str, value: Any, args: Sequence[Any], kwargs: Mapping[str, Any],
                  limit: int, *, method: bool = False) -> None:
    """Refuse a filter or string method call whose arguments would build a huge result."""
    def arg(i: int, key: str, default: Any) -> Any:
        return args[i] if len(args) > i else kwargs.get(key, default)

    too_big = False
    text = value if isinstance(value, str) else None
    if name in ("center", "ljust", "rjust", "zfill"):
        width = arg(0, "width", 80)
        too_big = isinstance(width, int) and width > limit
    elif name == "indent":
        width = arg(0, "width", 4)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        lines = text.count("\n") + 1 if text is not None else 1
        too_big = per_line * lines > limit
    elif name == "wordwrap" and text is not None:
        width, wrap = arg(0, "width", 79), arg(2, "wrapstring", None)
        if isinstance(width, int) and isinstance(wrap, str):
            too_big = (len(text) // max(width, 1) + 1) * len(wrap) > limit
    elif name == "expandtabs" and text is not None:
        size = arg(0, "tabsize", 8)
        too_big = isinstance(size, int) and text.count("\t") * size > limit
    elif name == "replace" and text is not None:
        old, new = arg(0, "old", None), arg(1, "new", None)
        if isinstance(old, str) and isinstance(new, str):
            hits = len(text) + 1 if not old else text.count(old)
            count = arg(2, "count", None)
            if isinstance(count, int) and count >= 0:
                hits = min(hits, count)
            too_big = hits * len(new) > limit
    elif name == "join":
        sep, items = (value, args[0] if args else ()) if method else (arg(0, "d", ""), value)
        if isinstance(sep, str) and hasattr(items, "__len__"):
            too_big = len(sep) * len(items) > limit
    elif name == "sum":
        start = arg(1, "start", 0)
        if not isinstance(start, (int, float)) and hasattr(value, "__len__"):
            # Adding lists or strings copies the running total each time: quadratic work in
            # one call, which no time check can interrupt.
            each = sum(len(x) for x in value if hasattr(x, "__len__"))
            too_big = len(value) * each > limit
    elif name in ("batch", "slice"):
        count = arg(0, "linecount" if name == "batch" else "slices", 0)
        too_big = isinstance(count, int) and count > limit
    elif name == "format":
        if text is not None:
            _check_percent_format(text, tuple(args) or dict(kwargs), limit)
    elif name == "translate" and text is not None:
        table = arg(0, "table", None)
        if isinstance(table, dict):
            longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
            too_big = longest * len(text) > limit
    elif name in ("tojson", "pprint"):
        indent = arg(1, "indent", None) if name == "tojson" else 1
        if isinstance(indent, str):
            indent = len(indent)
        if isinstance(indent, int) and indent > MAX_JSON_INDENT:
            too_big = True
        else:
            size, depth = _measure(value, limit)
            too_big = size * (1 + (indent or 0) * depth) > limit
    if too_big:
        raise _Limit(f"the size limit of {limit} characters for one value")


def _make_environment() -> Any:
    """A sandboxed Jinja environment with Hugging Face's chat-template semantics and bounds on
    time, output, loop steps, call depth and value sizes (see :class:`ChatTemplate`)."""
    import functools
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    class GenerationTag(jinja2.ext.Extension):
        """Hugging Face's ``{% generation %}`` tag (marks assistant text for training): its body
        renders as it is."""

        tags = {"generation"}  # noqa: RUF012 (Extension declares it as a plain attribute)

        def parse(self, parser: Any) -> Any:
            parser.stream.skip(1)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    class BoundedCodeGenerator(CodeGenerator):
        """Calls llmkit's own checks directly, not through the sandbox's call()."""

        def visit_Call(self, node: Any, frame: Any, forward_caller: bool = False) -> None:
            helper = node.node
            if isinstance(helper, nodes.EnvironmentAttribute) and helper.name in _HELPERS:
                self.write(f"environment.{helper.name}(")
                for i, arg in enumerate(node.args):
                    if i:
                        self.write(", ")
                    self.visit(arg, frame)
                self.write(")")
                return
            super().visit_Call(node, frame, forward_caller=forward_caller)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        # Arithmetic that can build huge strings, lists or integers in one step is checked
        # before it runs (the sandbox compiles these operators to call_binop).
        # ("+" chains become one llmkit_add call each, see Instrument.visit_Add.)
        intercepted_binops = frozenset({"*", "**", "%"})
        code_generator_class = BoundedCodeGenerator

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True,
                             extensions=[GenerationTag, jinja2.ext.loopcontrols])
            self.budget = _Budget.unbounded_time()
            self.llmkit_loop = self._loop
            self.llmkit_write = self._write
            self.llmkit_concat = self._concat
            self.llmkit_value = self._value
            self.llmkit_add = self._add
            for name, function in list(self.filters.items()):
                self.filters[name] = self._bounded_filter(name, function)
            self.filters["tojson"] = self._bounded_filter("tojson", _hf_tojson)
            self.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs in one call

            def raise_exception(message: str) -> None:
                raise _Raised(str(message))

            def strftime_now(fmt: str) -> str:
                return datetime.now().strftime(str(fmt))

            self.globals["raise_exception"] = raise_exception
            self.globals["strftime_now"] = strftime_now

        # -- helpers the instrumented template calls ------------------------------------------

        def _loop(self, iterable: Any) -> Any:
            budget = self.budget
            budget.tick()
            if isinstance(iterable, (list, tuple, range, str, dict)):
                # Charged before the loop runs (its body may break early: conservative), so
                # the loop itself costs nothing per step.
                budget.steps_left -= len(iterable)
                if budget.steps_left < 0:
                    raise _Limit(f"the limit of {budget.steps} loop steps")
                return iterable
            return _Steps(iterable, budget)

        def _write(self, value: Any) -> str:
            budget = self.budget
            if type(value) is not str:
                budget.size(_measure(value, budget.max_chars)[0])
                value = str(value)
            budget.written += len(value)
            if budget.written > budget.max_chars:
                raise _Limit(f"the output limit of {budget.max_chars} characters")
            return str(value)

        def _concat(self, *values: Any) -> str:
            budget = self.budget
            parts = []
            for value in values:
                if not isinstance(value, str):
                    budget.size(_measure(value, budget.max_chars)[0])
                    value = str(value)
                parts.append(value)
            budget.size(sum(len(p) for p in parts))
            return "".join(parts)

        def _add(self, *operands: Any) -> Any:
            budget = self.budget
            total = 0
            for x in operands:
                if type(x) is not str:
                    break
                total += len(x)
            else:
                # The common case by far ('<|im_start|>' + role + '\n' + …): one check, one join.
                budget.size(total)
                return "".join(operands)
            budget.tick()
            result = operands[0]
            for right in operands[1:]:
                if isinstance(result, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                    budget.size(len(result) + len(right))
                result = self._checked(result + right)
            return result

        def _value(self, value: Any) -> Any:
            if isinstance(value, str):
                self.budget.size(len(value))
            elif isinstance(value, (list, tuple, dict, set)):
                self.budget.size(_measure(value, self.budget.max_chars)[0])
            return value

        def _checked(self, value: Any) -> Any:
            if isinstance(value, str):
                self.budget.size(len(value))
            elif isinstance(value, (list, tuple, dict, set, frozenset)) or (
                    type(value).__name__ == "Namespace"):
                self.budget.size(_measure(value, self.budget.max_chars)[0])
            elif isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
                raise _Limit(f"the integer limit of {MAX_INT_BITS} bits")
            return value

        def _bounded_filter(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
            skip = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0

            @functools.wraps(function)
            def bounded(*args: Any, **kwargs: Any) -> Any:
                budget = self.budget
                budget.tick()
                if name in ("join", "sum") and len(args) > skip and not isinstance(
                        args[skip], (str, list, tuple, dict)):
                    # A generator (map, select …) has no length to check: take its items.
                    args = (*args[:skip], list(args[skip]), *args[skip + 1:])
                if len(args) > skip:
                    _growth_check(name, args[skip], args[skip + 1:], kwargs, budget.max_chars)
                return self._checked(function(*args, **kwargs))

            return bounded

        # -- the sandbox's hooks -----------------------------------------------------------

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = self.budget
            budget.tick()
            limit = budget.max_chars
            sized = (str, list, tuple)
            if operator == "*":
                if isinstance(left, int) and isinstance(right, int):
                    if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                        raise _Limit(f"the integer limit of {MAX_INT_BITS} bits")
                else:
                    seq, times = (left, right) if isinstance(left, sized) else (right, left)
                    if isinstance(seq, sized) and isinstance(times, int):
                        each = len(seq) if isinstance(seq, str) else _measure(seq, limit)[0]
                        budget.size(each * max(times, 0))
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and right > 0 and (
                        max(left.bit_length(), 1) * right > MAX_INT_BITS):
                    raise _Limit(f"the integer limit of {MAX_INT_BITS} bits")
            elif operator == "%" and isinstance(left, str):
                _check_percent_format(left, right, limit)
            result = super().call_binop(context, operator, left, right)
            if isinstance(result, str):
                return result  # its size was checked above
            return self._checked(result)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            budget = __self.budget
            budget.tick()
            owner = getattr(__obj, "__self__", None)
            wrapped = getattr(__obj, "__wrapped__", None)
            if isinstance(owner, str):
                name = getattr(__obj, "__name__", "")
                if name == "join" and args and not isinstance(args[0], (str, list, tuple)):
                    args = (list(args[0]), *args[1:])  # see the join filter
                _growth_check(name, owner, args, kwargs, budget.max_chars, method=True)
            elif wrapped is not None and isinstance(getattr(wrapped, "__self__", None), str):
                _check_str_format(wrapped.__self__, args, kwargs, budget.max_chars)
            budget.depth += 1
            if budget.depth > MAX_CALL_DEPTH:
                raise _Limit(f"the limit of {MAX_CALL_DEPTH} nested calls")
            try:
                result = super().call(__context, __obj, *args, **kwargs)
            finally:
                budget.depth -= 1
            return __self._checked(result)

    class Instrument(NodeTransformer):
        """Route every loop, output, concatenation and literal through the environment's checks."""

        def __init__(self, environment: Any) -> None:
            self.environment = environment

        def _call(self, helper: str, args: list[Any], like: Any) -> Any:
            node = nodes.Call(nodes.EnvironmentAttribute(helper), args, [], None, None)
            node.set_lineno(like.lineno)
            node.set_environment(self.environment)
            return node

        def visit_For(self, node: Any) -> Any:
            self.generic_visit(node)
            node.iter = self._call("llmkit_loop", [node.iter], node)
            return node

        def visit_Output(self, node: Any) -> Any:
            self.generic_visit(node)
            node.nodes = [self._call("llmkit_write", [child], child) for child in node.nodes]
            return node

        def visit_Add(self, node: Any) -> Any:
            operands = []
            while isinstance(node, nodes.Add):  # a + b + c parses as ((a + b) + c)
                operands.append(node.right)
                node = node.left
            operands.append(node)
            operands = [self.visit(x) for x in reversed(operands)]
            return self._call("llmkit_add", operands, operands[0])

        def visit_Concat(self, node: Any) -> Any:
            self.generic_visit(node)
            return self._call("llmkit_concat", list(node.nodes), node)

        def _literal(self, node: Any) -> Any:
            self.generic_visit(node)
            if getattr(node, "ctx", "load") != "load":
                return node
            return self._call("llmkit_value", [node], node)

        visit_List = visit_Tuple = visit_Dict = _literal

        def visit_Call(self, node: Any) -> Any:
            self.generic_visit(node)
            # A recursive loop's ``loop(children)`` starts another loop over a new iterable.
            if isinstance(node.node, nodes.Name) and node.node.name == "loop" and node.args:
                node.args[0] = self._call("llmkit_loop", [node.args[0]], node)
            return node

    environment: Any = BoundedEnvironment()
    environment.llmkit_instrument = Instrument(environment)
    return environment


_HELPERS = frozenset({"llmkit_loop", "llmkit_write", "llmkit_concat", "llmkit_value",
                      "llmkit_add"})


def _hf_tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Hugging Face's override: Jinja's own tojson HTML-escapes, which chat templates must not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


class _Steps:
    """An iterable a template loops over, counting each step against the render's budget."""

    def __init__(self, iterable: Any, budget: _Budget) -> None:
        self._iterable = iterable
        self._budget = budget

    def __len__(self) -> int:
        return len(self._iterable)

    def __iter__(self) -> Iterator[Any]:
        budget = self._budget
        for item in self._iterable:
            budget.steps_left -= 1
            if budget.steps_left < 0:
                raise _Limit(f"the limit of {budget.steps} loop steps")
            budget.tick()
            yield item


def _input_chars(value: Any) -> int:
    """Characters of text in a template's input (messages), for scaling its bounds."""
    kind = type(value)
    if kind is str:
        return len(value)
    if kind is dict or isinstance(value, Mapping):
        return sum((len(v) if type(v) is str else _input_chars(v))
                   + (len(k) if type(k) is str else 0) for k, v in value.items())
    if kind is list or kind is tuple:
        return sum(_input_chars(v) for v in value)
    return 0


class ChatTemplate:
    """A GGUF's chat template, compiled once and rendered in a bounded sandbox.

    Bounds per render: :data:`RENDER_SECONDS` of CPU time; output and any one value at most
    max(:data:`MIN_CHARS`, :data:`CHARS_PER_INPUT_CHAR` × the conversation's characters);
    loop steps likewise scaled; :data:`MAX_CALL_DEPTH` nested calls; no huge integers, string
    widths or repetitions. Semantics follow Hugging Face's renderer (trim_blocks, lstrip_blocks,
    loop controls, ``raise_exception``, ``strftime_now``, its ``tojson``, ``bos_token``,
    ``eos_token``, ``add_generation_prompt``).
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "",
                 owner: str = "the model") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.owner = owner
        self._compiled: Any = None
        self._environment: Any = None
        self._typed: bool | None = None
        self._tools: bool | None = None

    def _compile(self) -> Any:
        if self._compiled is None:
            import jinja2

            environment = _make_environment()
            try:
                tree = environment.parse(self.source)
                environment.llmkit_instrument.visit(tree)
                self._compiled = environment.from_string(tree)
            except Exception as exc:  # whatever the parser or compiler trips over
                reason = exc.message if isinstance(exc, jinja2.TemplateError) else str(exc)
                if isinstance(exc, RecursionError):
                    reason = "it nests too deeply"
                raise ChatTemplateError(
                    f"the chat template of {self.owner} is not a valid Jinja template: "
                    f"{reason or type(exc).__name__}",
                    hint="`llmkit show` prints it; use a GGUF with a working template") from None
            self._environment = environment
        return self._compiled

    @property
    def typed_content(self) -> bool:
        """Whether the template reads message content only as a list of typed parts
        (``[{"type": "text", "text": …}]``), as llama.cpp's chat code detects it: a string
        content does not come out, the same text as a typed part does."""
        if self._typed is None:
            needle = "<User Needle>"
            plain = self._probe([{"role": "user", "content": needle}])
            typed = self._probe([{"role": "user",
                                  "content": [{"type": "text", "text": needle}]}])
            self._typed = needle not in plain and needle in typed
        return self._typed

    def _probe(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self._render(messages, add_generation_prompt=False)
        except ChatTemplateRejected:
            return ""

    @property
    def reads_tools(self) -> bool:
        """Whether the template writes the ``tools`` it is given into the prompt (a template
        without tool support ignores them, and its model cannot be asked to call one)."""
        if self._tools is None:
            needle = "llmkit_tool_needle"
            tool = {"type": "function", "function": {
                "name": needle, "description": "", "parameters": {"type": "object",
                                                                  "properties": {}}}}
            messages = [{"role": "user", "content": "Hello"}]
            try:
                written = self._render(messages, add_generation_prompt=True, tools=[tool])
            except ChatTemplateRejected:
                written = ""
            self._tools = needle in written
        return self._tools

    def render(self, messages: Sequence[Mapping[str, Any]], *,
               add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The conversation as the template writes it.

        String contents are passed as one typed text part when the template only reads typed
        parts (:attr:`typed_content`), as llama.cpp does. ``tools``: OpenAI-style function
        definitions, for templates that read them (:attr:`reads_tools`).

        Raises:
            ChatTemplateError: the template is not valid Jinja, exceeded a bound, or tried
                something the sandbox forbids.
            ChatTemplateRejected: the template refused the conversation.
        """
        prepared = list(messages)
        if self.typed_content:
            prepared = [{**m, "content": [{"type": "text", "text": m["content"]}]}
                        if isinstance(m.get("content"), str) else m for m in prepared]
        return self._render(prepared, add_generation_prompt=add_generation_prompt,
                            tools=list(tools) if tools else None)

    def _render(self, messages: list[Any], *, add_generation_prompt: bool,
                tools: list[Any] | None = None) -> str:
        from jinja2.exceptions import SecurityError

        template = self._compile()
        seconds = RENDER_SECONDS
        environment = self._environment
        chars = (_input_chars(messages) + _input_chars(tools) + len(self.bos_token)
                 + len(self.eos_token))
        environment.budget = _Budget(
            deadline=time.thread_time() + seconds, seconds=seconds,
            max_chars=max(MIN_CHARS, CHARS_PER_INPUT_CHAR * chars),
            steps=max(MIN_LOOP_STEPS, CHARS_PER_INPUT_CHAR * chars))
        try:
            return str(template.render(
                messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt, functions=None,
                function_call=None, tools=tools, tool_choice=None))
        except _Limit as exc:
            raise ChatTemplateError(f"the chat template of {self.owner} exceeded {exc}",
                                    hint=_HOSTILE_HINT) from None
        except RecursionError:
            raise ChatTemplateError(f"the chat template of {self.owner} exceeded the nesting "
                                    "limit of Python's stack", hint=_HOSTILE_HINT) from None
        except MemoryError:
            raise ChatTemplateError(f"the chat template of {self.owner} exceeded the memory "
                                    "available", hint=_HOSTILE_HINT) from None
        except SecurityError as exc:
            raise ChatTemplateError(f"the chat template of {self.owner} was stopped by the "
                                    f"sandbox: {exc}", hint=_HOSTILE_HINT) from None
        except OverflowError as exc:  # the sandbox's range() refuses more than 100000 items
            raise ChatTemplateError(f"the chat template of {self.owner} exceeded a sandbox "
                                    f"limit: {exc}", hint=_HOSTILE_HINT) from None
        except Exception as exc:  # raise_exception, or the template's own logic failing
            raise ChatTemplateRejected(
                f"the model's chat template rejected the conversation: {exc}",
                hint="some templates need alternating user/assistant turns") from None
        finally:
            environment.budget = _Budget.unbounded_time()


_HOSTILE_HINT = "the model file's chat template is broken or hostile; use another GGUF of it"


# -- special tokens in prompt text -------------------------------------------------------------

_ASCII_SPACE = frozenset(" \t\n\v\f\r")  # C isspace() in llama.cpp's partition, byte by byte


@dataclass(frozen=True)
class SpecialToken:
    """A vocabulary token that llama.cpp matches as a whole in prompt text."""

    id: int
    text: str
    lstrip: bool = False  # whitespace before it is dropped (LLAMA_TOKEN_ATTR_LSTRIP)
    rstrip: bool = False  # whitespace after it is dropped (LLAMA_TOKEN_ATTR_RSTRIP)


class SpecialTokens:
    """The texts llama.cpp turns into special tokens when it tokenizes with parse_special, and
    which of them must never come from user text.

    ``tokens`` are all CONTROL, USER_DEFINED and UNKNOWN tokens (the ones llama.cpp matches);
    ``protected`` the texts user text must not produce: every CONTROL and UNKNOWN token, and
    the USER_DEFINED ones the chat markup uses (llama.cpp matches USER_DEFINED tokens even
    without parse_special; the others, such as Gemma's ``<table>``, are ordinary vocabulary).
    """

    def __init__(self, tokens: Sequence[SpecialToken], protected: Sequence[str],
                 user_defined: Sequence[str] = ()) -> None:
        # llama.cpp tries longer texts first (ties: by id, for a stable order).
        self.tokens = sorted((t for t in tokens if t.text), key=lambda t: (-len(t.text), t.id))
        self.protected = frozenset(t for t in protected if t)
        self.user_defined = tuple(sorted((t for t in user_defined if t in self.protected),
                                         key=len, reverse=True))
        lowered = sorted({t.lower() for t in self.protected}, key=len, reverse=True)
        # Most text holds none of the characters special texts start with ('<', '[' …).
        firsts = sorted({c for t in self.protected for c in (t[0].lower(), t[0].upper())})
        self._firsts = re.compile("[" + "".join(map(re.escape, firsts)) + "]") if firsts else None
        self._by_head: dict[str, list[str]] = {}
        for text in lowered:
            self._by_head.setdefault(text[:2], []).append(text)
        self._heads = tuple(self._by_head)
        self._pattern: re.Pattern[str] | None = None

    def occur_in(self, text: str) -> bool:
        """Whether ``text`` holds a protected text (in any letter case, as templates may
        change case)."""
        if self._firsts is None or not self._firsts.search(text):
            return False
        lowered = text.lower()
        return any(head in lowered and any(t in lowered for t in self._by_head[head])
                   for head in self._heads)

    def pattern(self) -> re.Pattern[str]:
        """A regex matching the protected texts in any case, longest first."""
        if self._pattern is None:
            alternatives = sorted(self.protected, key=len, reverse=True)
            self._pattern = re.compile("|".join(map(re.escape, alternatives)) or "(?!)", re.I)
        return self._pattern

    def partition(self, text: str) -> list[str | int]:
        """``text`` split as llama.cpp splits prompt text before tokenizing it with
        parse_special: special token ids, and the raw text runs between them (each of which it
        then tokenizes on its own).

        Follows llama_vocab's tokenizer_st_partition: each special text in turn, longest
        first, is cut out of every raw fragment, left to right; LSTRIP and RSTRIP drop the
        whitespace beside a match.
        """
        fragments: list[tuple[int, int] | int] = [(0, len(text))]
        for token in self.tokens:
            special = token.text
            if special not in text:
                continue
            split: list[tuple[int, int] | int] = []
            for fragment in fragments:
                if isinstance(fragment, int):
                    split.append(fragment)
                    continue
                start, end = fragment
                while True:
                    match = text.find(special, start, end)
                    if match < 0:
                        break
                    left = match
                    if token.lstrip:
                        while left > start and text[left - 1] in _ASCII_SPACE:
                            left -= 1
                    if left > start:
                        split.append((start, left))
                    split.append(token.id)
                    start = match + len(special)
                    if token.rstrip:
                        while start < end and text[start] in _ASCII_SPACE:
                            start += 1
                if start < end:
                    split.append((start, end))
            fragments = split
        return [f if isinstance(f, int) else text[f[0]:f[1]] for f in fragments
                if isinstance(f, int) or f[1] > f[0]]

    def plain_pieces(self, text: str) -> list[str]:
        """``text`` cut so that no piece holds a protected USER_DEFINED text whole (llama.cpp
        would match it even without parse_special): each occurrence is split after its first
        character."""
        if not self.user_defined or not any(t in text for t in self.user_defined):
            return [text]
        cuts: list[int] = []
        for special in self.user_defined:
            start = text.find(special)
            while start >= 0:
                cuts.append(start + 1)
                start = text.find(special, start + 1)
        pieces, last = [], 0
        for cut in sorted(set(cuts)):
            pieces.append(text[last:cut])
            last = cut
        pieces.append(text[last:])
        return [p for p in pieces if p]


# -- marking untrusted text --------------------------------------------------------------------

# Placeholders come from Unicode's supplementary private use planes: no tokenizer or template
# gives them meaning, case filters and | trim leave them alone. A random prefix per prompt
# means no input can forge one.
_PLANE_15 = 0xF0000
_PLANE_16 = 0x100000
_PLANE_SIZE = 0xFFFE


def _random_private(n: int) -> str:
    return "".join(chr(_PLANE_15 + secrets.randbelow(_PLANE_SIZE)) for _ in range(n))


class Piece(NamedTuple):
    """A piece of prompt text: ``trusted`` (markup that may hold special tokens) or not."""

    text: str
    trusted: bool


@dataclass
class Escapes:
    """Protected special-token texts taken out of untrusted text, each replaced by a
    placeholder, so that after rendering they are put back as plain text."""

    prefix: str = ""  # made when the first placeholder is needed
    table: list[str] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict)

    def escape(self, text: str, specials: SpecialTokens) -> str:
        """``text`` with every protected special text replaced by its placeholder (unchanged,
        and nothing recorded, when it holds none)."""
        if not specials.occur_in(text):
            return text

        def placeholder(match: re.Match[str]) -> str:
            found = match.group(0)
            if found not in self._index:
                if len(self.table) >= _PLANE_SIZE:  # out of placeholders: break it up instead
                    return found[0] + _WORD_JOINER + found[1:]
                if not self.prefix:
                    self.prefix = _random_private(2)
                self._index[found] = len(self.table)
                self.table.append(found)
            return self.prefix + chr(_PLANE_16 + self._index[found])

        return specials.pattern().sub(placeholder, text)

    def escape_value(self, value: Any, specials: SpecialTokens) -> Any:
        """Every string in a message (its role, content, typed parts) escaped; ``value``
        itself when nothing in it needed escaping."""
        if isinstance(value, str):
            return self.escape(value, specials)
        if isinstance(value, Mapping):
            # Keys too: a tool's JSON schema is user text that templates write out whole.
            if any(isinstance(k, str) and specials.occur_in(k) for k in value):
                return {self.escape_value(k, specials): self.escape_value(v, specials)
                        for k, v in value.items()}
            changed: dict[str, Any] | None = None
            for key, item in value.items():
                escaped = self.escape_value(item, specials)
                if escaped is not item:
                    changed = changed if changed is not None else dict(value)
                    changed[key] = escaped
            return value if changed is None else changed
        if isinstance(value, (list, tuple)):
            parts = [self.escape_value(v, specials) for v in value]
            return value if all(a is b for a, b in zip(parts, value, strict=True)) else parts
        return value

    def restore(self, text: str) -> str:
        """The placeholders in ``text`` put back as the texts they stand for."""
        if not self.table or not self.prefix or self.prefix[0] not in text:
            return text
        pattern = re.escape(self.prefix) + f"([{chr(_PLANE_16)}-{chr(_PLANE_16 + _PLANE_SIZE)}])"

        def original(match: re.Match[str]) -> str:
            i = ord(match.group(1)) - _PLANE_16
            return self.table[i] if i < len(self.table) else ""

        return re.sub(pattern, original, text)

    def intact(self, rendered: str) -> bool:
        """Whether every placeholder in ``rendered`` came out whole (a template that slices or
        reverses message text can cut one, and then it cannot be put back)."""
        if not self.table:
            return True
        rest = self.restore(rendered)
        return not any(c in rest for c in self.prefix)


_WORD_JOINER = "\u2060"


def defuse(text: str, specials: SpecialTokens) -> str:
    """``text`` with a word joiner after the first character of every protected special text,
    so that nothing in it matches one: the safe fallback when placeholders did not survive."""
    if not specials.occur_in(text):
        return text
    return specials.pattern().sub(lambda m: m.group(0)[0] + _WORD_JOINER + m.group(0)[1:], text)


def defuse_value(value: Any, specials: SpecialTokens) -> Any:
    """Every string in a message defused (see :func:`defuse`)."""
    if isinstance(value, str):
        return defuse(value, specials)
    if isinstance(value, Mapping):
        return {defuse_value(k, specials): defuse_value(v, specials) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [defuse_value(v, specials) for v in value]
    return value


def new_media_marker() -> str:
    """A marker for an image's place in a prompt that no input can forge (random, per engine)."""
    return _random_private(6)
