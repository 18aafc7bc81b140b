"""`llmkit chat`: a REPL on a terminal, a one-message filter in a pipeline."""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from llmkit.cli import _output as out
from llmkit.cli._batch import open_cli_guard
from llmkit.cli._options import (
    CtxOpt,
    Device,
    DeviceOpt,
    GpuLayersOpt,
    GuardModelOpt,
    GuardOpt,
    GuardThresholdOpt,
    ImageOpt,
    MaxTokensOpt,
    MmprojOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    SystemOpt,
    TemperatureOpt,
    ThreadsOpt,
    TopPOpt,
    VerboseOpt,
    engine_options,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from llmkit.engines import Engine, SamplingParams
    from llmkit.session import EngineOptions
    from llmkit.store import Resolution
    from llmkit.tasks.chat import Conversation
    from llmkit.tasks.safety import Guard

HELP = """Commands:
  /help              this help
  /system [TEXT]     show or set the system prompt
  /clear             forget the conversation (keeps the system prompt)
  /save FILE         save the conversation as JSON
  /load FILE         load a conversation saved with /save
  /model [NAME]      show or switch the model (the conversation is kept)
  /image FILE        show an image with your next message (vision models)
  /exit, /bye        leave (Ctrl-D works too)
Multi-line input: end a line with \\ to continue, or wrap text in \"\"\" … \"\"\".
Ctrl-C stops a reply; the session goes on."""


def chat(
    model: ModelOpt = None,
    system: SystemOpt = None,
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = 1024,
    ctx: CtxOpt = None,
    load: Annotated[Path | None, typer.Option(
        "--load", help="Start from a conversation saved with /save.", show_default=False)] = None,
    image: ImageOpt = None,
    mmproj: MmprojOpt = None,
    guard: GuardOpt = False,
    guard_model: GuardModelOpt = None,
    guard_threshold: GuardThresholdOpt = None,
    device: DeviceOpt = Device.auto,
    gpu_layers: GpuLayersOpt = None,
    threads: ThreadsOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Chat with a model. Piped stdin is sent as one message and the answer printed.

    Example: llmkit chat -m llama3.2:1b

    With --image (or /image PATH in the chat) the next message is about that picture.
    With --guard every message and reply is checked; a flagged turn is refused and the chat
    goes on (piped: exit 3).
    """
    from llmkit.io import prompt_limit, read_stdin, stdin_is_tty
    from llmkit.session import default_system_prompt, open_chat_engine, sampling_params
    from llmkit.tasks.chat import Conversation, check_chat_template
    from llmkit.tasks.guarding import guarded_chat_turn

    out.set_quiet(quiet)
    options = engine_options(ctx, threads, device, gpu_layers, verbose)
    convo = Conversation.load(load) if load else Conversation()
    piped = None if stdin_is_tty() else read_stdin(limit=prompt_limit(ctx))
    if piped is not None and not piped.strip():
        from llmkit.errors import InputError

        raise InputError("stdin is empty", hint="pipe a message, or run chat in a terminal")
    pending = [str(p) for p in image or []]
    checker = open_cli_guard(guard, guard_model, guard_threshold, options)
    engine, resolution, note = open_chat_engine(model, options, mmproj=mmproj,
                                                images=bool(pending) or convo.has_images)
    if note:
        out.note(note)

    def params_for(res: Resolution) -> SamplingParams:
        return sampling_params(res, temperature=temperature, top_p=top_p, seed=seed,
                               max_tokens=max_tokens)

    params = params_for(resolution)
    if system is not None:
        convo.system = system
    elif convo.system is None:
        convo.system = default_system_prompt(resolution)
    if piped is not None:
        with engine:
            reply = guarded_chat_turn(engine, convo, piped, checker, params=params,
                                      on_text=out.write, images=pending)
        out.write("\n")
        if reply.dropped_messages:
            out.note(f"dropped {reply.dropped_messages} oldest message(s) to fit the context")
        if reply.generation.finish_reason == "interrupted":
            raise KeyboardInterrupt  # caught by the engine for the partial reply; app.py says it
        return
    try:
        check_chat_template(engine, convo)
    except BaseException:
        engine.close()
        raise
    repl = _Repl(engine, convo, params, options, params_for)
    repl.pending_images = pending
    repl.guard = checker
    repl.loop()


NOT_UTF8 = ("that line is not UTF-8 text and was not sent (the chat goes on; set the terminal "
            "to UTF-8)")

class _Repl:
    """The interactive loop; all model work goes through tasks.chat."""

    def __init__(self, engine: Engine, convo: Conversation, params: SamplingParams,
                 options: EngineOptions,
                 params_for: Callable[[Resolution], SamplingParams]) -> None:
        self.engine = engine
        self.convo = convo
        self.params = params
        self.params_for = params_for  # the user's sampling flags over a model's defaults
        self.options = options
        self._history_ok = _setup_history()
        self.pending_images: list[str] = []  # shown with the next message (/image, --image)
        self.guard: Guard | None = None

    def loop(self) -> None:
        out.note(f"chatting with {self.engine.model_name}; /help for commands, Ctrl-D to leave")
        try:
            while True:
                try:
                    text = self._read()
                except KeyboardInterrupt:
                    out.write("\n")
                    out.note("(Ctrl-D or /exit to leave)")
                    continue
                except EOFError:
                    out.write("\n")
                    return
                except UnicodeDecodeError:  # a terminal decoded strictly
                    out.error(NOT_UTF8)
                    continue
                if text is None:
                    continue
                if not _is_utf8(text):  # or leniently, bad bytes as lone surrogates
                    out.error(NOT_UTF8)
                    continue
                stripped = text.strip()
                if stripped.startswith("/"):
                    if not self._command(stripped):
                        return
                    continue
                if stripped:
                    self._answer(text)
        finally:
            self.engine.close()
            if self.guard is not None:
                self.guard.close()
            _save_history(self._history_ok)

    def _read(self) -> str | None:
        first = input(">>> ")
        if first.strip().startswith('"""'):
            body = first.strip()[3:]
            lines: list[str] = []
            if body.endswith('"""'):
                return body[:-3]
            if body:
                lines.append(body)
            while True:
                line = input("... ")
                if line.rstrip().endswith('"""'):
                    lines.append(line.rstrip()[:-3])
                    return "\n".join(lines)
                lines.append(line)
        lines = [first]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input("... "))
        return "\n".join(lines)

    def _answer(self, text: str) -> None:
        from llmkit.errors import FlaggedError, LlmkitError
        from llmkit.tasks.guarding import guarded_chat_turn

        before = list(self.convo.messages)
        try:
            reply = guarded_chat_turn(self.engine, self.convo, text, self.guard,
                                      params=self.params, on_text=out.write,
                                      images=self.pending_images)
        except FlaggedError as exc:
            out.flagged(f"{exc} (the chat goes on)")
            self.pending_images = []
            return
        except LlmkitError as exc:
            out.error(str(exc))
            return
        except KeyboardInterrupt:
            # Ctrl-C before the first token (while the prompt was evaluated).
            out.write("\n")
            out.note("reply stopped")
            return
        except Exception as exc:
            # A failure nobody foresaw must not end the session: the conversation goes back
            # to before this message, and the KV cache, which may hold half a turn, is dropped.
            self.convo.messages[:] = before
            with contextlib.suppress(Exception):
                self.engine.forget()
            _report_unexpected(exc)
            return
        self.pending_images = []
        out.write("\n")
        if reply.generation.finish_reason == "interrupted":
            out.note("reply stopped")
        elif reply.generation.finish_reason == "context":
            out.warn("the reply stopped because the context is full")
        if reply.dropped_messages:
            out.note(f"dropped {reply.dropped_messages} oldest message(s) to fit the context")

    def _command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        from llmkit.errors import LlmkitError
        from llmkit.tasks.chat import Conversation

        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name in ("/exit", "/bye", "/quit"):
                return False
            if name in ("/help", "/?"):
                out.info(HELP)
            elif name == "/system":
                if arg:
                    self.convo.system = arg
                    out.note("system prompt set")
                else:
                    out.info(self.convo.system or "(no system prompt)")
            elif name == "/clear":
                self.convo.messages.clear()
                out.note("conversation cleared")
            elif name == "/save":
                path = _path_arg(arg, "/save FILE")
                self.convo.save(path)
                out.note(f"saved {len(self.convo.messages)} message(s) to {path}")
            elif name == "/load":
                path = _path_arg(arg, "/load FILE")
                loaded = Conversation.load(path)
                self.convo.system, self.convo.messages = loaded.system, loaded.messages
                out.note(f"loaded {len(self.convo.messages)} message(s) from {path}")
            elif name == "/image":
                self._attach(_path_arg(arg, "/image FILE"))
            elif name == "/model":
                if not arg:
                    out.info(self.engine.model_name)
                else:
                    self._switch_model(arg)
            else:
                out.error(f"unknown command {name} (/help lists them)")
        except LlmkitError as exc:
            out.error(str(exc))
        except KeyboardInterrupt:
            out.note(f"{name} stopped (the chat goes on)")
        except Exception as exc:
            _report_unexpected(exc)
        return True

    def _attach(self, path: Path) -> None:
        from llmkit.defaults import default_model_name
        from llmkit.errors import NotAVisionModelError, UsageError
        from llmkit.images import prepare_image

        if not self.engine.vision:
            raise NotAVisionModelError(self.engine.model_name, default_model_name("vision"))
        limit = self.engine.max_images
        shown = sum(len(m.get("images") or []) for m in self.convo.messages)
        if limit is not None and shown + len(self.pending_images) >= limit:
            # Refused here, before the image joins the next message: a refused turn would
            # keep it pending, and every later message would be refused too.
            raise UsageError(
                f"{self.engine.model_name} takes {_images(limit)} per conversation, and this "
                f"one already shows {_images(shown + len(self.pending_images))}",
                hint="/clear starts a new conversation")
        image = prepare_image(path)  # read it now, so a bad file is reported at once
        self.pending_images.append(str(path))
        self.convo.image_cache[str(path)] = image
        out.note(f"{path.name} ({image.width}x{image.height}) will be shown with your next "
                 "message")

    def _switch_model(self, name: str) -> None:
        """Load ``name`` beside the current model and switch only once it can take this chat;
        until then (a failed load, a template that rejects the conversation, Ctrl-C) the
        current model stays."""
        from llmkit.errors import LlmkitError
        from llmkit.session import open_chat_engine
        from llmkit.tasks.chat import check_chat_template

        current = self.engine.model_name
        try:
            engine, resolution, note = open_chat_engine(name, self.options,
                                                        images=self.convo.has_images)
            try:
                check_chat_template(engine, self.convo)
            except BaseException:
                engine.close()
                raise
        except LlmkitError as exc:
            out.error(f"{exc}; still chatting with {current}")
            return
        except KeyboardInterrupt:
            out.note(f"/model stopped; still chatting with {current}")
            return
        self.engine.close()
        self.engine = engine
        self.params = self.params_for(resolution)
        if note:
            out.note(note)
        out.note(f"now chatting with {engine.model_name}")


def _path_arg(arg: str, usage: str) -> Path:
    from llmkit.errors import UsageError

    try:
        parts = shlex.split(arg) if arg else []
    except ValueError as exc:  # an unclosed quote
        raise UsageError(f"usage: {usage} ({exc})") from None
    if len(parts) != 1:
        raise UsageError(f"usage: {usage}")
    return Path(parts[0]).expanduser()


def _is_utf8(text: str) -> bool:
    """False for text holding lone surrogates: bytes that were not UTF-8, escaped by Python."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _report_unexpected(exc: Exception) -> None:
    if out.debugging():
        out.traceback(exc)
    out.error(f"unexpected {type(exc).__name__}: {exc} (the chat goes on; LLMKIT_DEBUG=1 shows "
              "the traceback)")


def _setup_history() -> bool:
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows without pyreadline
        return False
    from llmkit import paths

    history = paths.history_path()
    with contextlib.suppress(OSError):
        history.parent.mkdir(parents=True, exist_ok=True)
        if history.exists():
            readline.read_history_file(history)
    readline.set_history_length(1000)
    return True


def _save_history(enabled: bool) -> None:
    if not enabled:
        return
    import readline

    from llmkit import paths

    with contextlib.suppress(OSError):
        readline.write_history_file(paths.history_path())


def _images(n: int) -> str:
    return "one image" if n == 1 else f"{n} images"
