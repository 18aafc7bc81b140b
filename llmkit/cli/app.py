"""The Typer app: assembles the commands and maps errors to messages and exit codes."""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence

import typer

from llmkit.cli import _output as out
from llmkit.cli.caption import caption
from llmkit.cli.chat import chat
from llmkit.cli.check import check
from llmkit.cli.completions import completions
from llmkit.cli.convert import convert, quantize
from llmkit.cli.doctor import doctor
from llmkit.cli.models import import_model, list_models, rm, show
from llmkit.cli.pull import pull
from llmkit.cli.run import run
from llmkit.cli.serve import serve
from llmkit.cli.summarize import summarize
from llmkit.errors import EXIT_FLAGGED, Interrupted, LlmkitError

EXIT_CODES = (f"Exit codes: 0 ok, 1 error, 2 usage error, {EXIT_FLAGGED} flagged by a safety "
              "check (check,\n--guard), 130 interrupted (Ctrl-C), 141 stdout closed early "
              "(| head).")

app = typer.Typer(
    name="llmkit",
    help="Run local language and vision models through llama.cpp.\n\n" + EXIT_CODES,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        out.write(f"llmkit {version('llmkit')}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Run local language and vision models through llama.cpp."""


app.command("run")(run)
app.command("chat")(chat)
app.command("caption")(caption)
app.command("summarize")(summarize)
app.command("check")(check)
app.command("serve")(serve)
app.command("list")(list_models)
app.command("show")(show)
app.command("import")(import_model)
app.command("rm")(rm)
app.command("pull")(pull)
app.command("convert")(convert)
app.command("quantize")(quantize)
app.command("doctor")(doctor)
app.command("completions")(completions)


def _click_exception(exc: BaseException) -> bool:
    # Typer bundles its own Click; its exceptions are recognised by shape, never imported.
    return type(exc).__module__.startswith("typer") and hasattr(exc, "show") and hasattr(
        exc, "exit_code")


def _stdout_closed_in_typer(exc: SystemExit) -> bool:
    # Typer answers EPIPE with sys.exit(1) inside its `except OSError`, before our handlers
    # could see it; the BrokenPipeError it handled is still there as the exit's context.
    context = exc.__context__
    return isinstance(context, OSError) and context.errno == errno.EPIPE


def _interrupted() -> int:
    """The one answer to Ctrl-C: one line, exit 130.

    Commands let KeyboardInterrupt rise (after saving what finished); it arrives here as
    Typer's silent exit code 130 when raised inside a command, as KeyboardInterrupt or Abort
    when raised around one.
    """
    out.error(Interrupted().message)
    return Interrupted.exit_code


def run_cli(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code instead of exiting (used by tests and main)."""
    debug = out.debugging()
    out.prepare_streams()
    try:
        result = app(args=list(argv) if argv is not None else None, prog_name="llmkit",
                     standalone_mode=False)
        if result == Interrupted.exit_code:
            return _interrupted()
        return result if isinstance(result, int) else 0
    except LlmkitError as exc:
        if debug:
            raise
        if exc.exit_code == EXIT_FLAGGED:  # a safety refusal is an answer, not a failure
            out.flagged(str(exc))
        else:
            out.error(str(exc))
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        return _interrupted()
    except (out.StdoutClosed, BrokenPipeError):
        # The reader went away (`| head`): stop quietly, as other Unix tools do, and keep
        # Python's flush at exit from failing on the closed pipe.
        out.silence_stdout()
        return 141
    except SystemExit as exc:
        if _stdout_closed_in_typer(exc):
            out.silence_stdout()
            return 141
        raise
    except Exception as exc:
        if type(exc).__name__ == "Abort":
            return _interrupted()
        if _click_exception(exc):
            # One line, like every other error, naming where the full usage is.
            message = exc.format_message()  # type: ignore[attr-defined]
            context = getattr(exc, "ctx", None)
            where = context.command_path if context is not None else "llmkit"
            if message.strip():  # empty when `llmkit` alone already printed the help
                out.error(f"{message} (see `{where} --help`)")
            return int(exc.exit_code)  # type: ignore[attr-defined]
        failed_output = out.stdout_error(exc) if isinstance(exc, OSError) else None
        if failed_output is not None:
            out.error(str(failed_output))
            return failed_output.exit_code
        if debug:
            raise
        out.error(f"unexpected {type(exc).__name__}: {exc} (LLMKIT_DEBUG=1 shows the traceback)")
        return 1


def main() -> None:
    """Console-script entry point."""
    sys.exit(run_cli())
