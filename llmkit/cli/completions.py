"""Static shell completion scripts for bash, zsh and fish, generated from the Typer app."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

SHELLS = ("bash", "zsh", "fish")
HEADER = "llmkit {shell} completion, generated from the app by `llmkit completions {shell}`"


@dataclass(frozen=True)
class _Opt:
    names: tuple[str, ...]
    help: str
    takes_value: bool
    choices: tuple[str, ...]  # fixed values, if any
    files: bool  # the value is a path
    models: bool  # the value is a model name


@dataclass(frozen=True)
class _Cmd:
    name: str
    help: str
    options: tuple[_Opt, ...]
    files: bool  # positional arguments are paths
    models: bool  # positional argument is a model name


def _first_line(text: str | None) -> str:
    return (text or "").strip().split("\n")[0].strip().rstrip(".")


def _annotation(param: Any) -> Any:
    descriptor = getattr(param, "type_descriptor", None)
    return getattr(descriptor, "annotation", None)


def _choices(param: Any) -> tuple[str, ...]:
    # Older Typer exposes Click's Choice type; newer ones the annotation. Handle both.
    choices = getattr(getattr(param, "type", None), "choices", None)
    if choices:
        return tuple(str(getattr(c, "value", c)) for c in choices)
    ann = _annotation(param)
    if isinstance(ann, type) and issubclass(ann, enum.Enum):
        return tuple(str(m.value) for m in ann)
    return ()


def _is_path(param: Any) -> bool:
    kind = type(getattr(param, "type", None)).__name__
    return kind in ("Path", "File", "TyperPath") or _annotation(param) is Path


def _describe(app: typer.Typer) -> tuple[list[_Opt], list[_Cmd]]:
    import typer.main

    group: Any = typer.main.get_command(app)

    def options(params: list[Any]) -> tuple[_Opt, ...]:
        out = []
        for p in params:
            if p.param_type_name != "option" or p.hidden:
                continue
            out.append(_Opt(
                names=tuple(sorted(p.opts + p.secondary_opts, key=lambda n: (len(n), n))),
                help=_first_line(p.help),
                takes_value=not p.is_flag,
                choices=_choices(p),
                files=_is_path(p),
                models=p.name == "model",
            ))
        out.append(_Opt(("-h", "--help"), "Show help and exit", False, (), False, False))
        return tuple(out)

    commands = []
    for name, cmd in group.commands.items():
        if cmd.hidden:
            continue
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        commands.append(_Cmd(
            name=name,
            help=_first_line(cmd.help),
            options=options(cmd.params),
            files=any(_is_path(p) for p in args),
            models=any(p.name == "model" for p in args),
        ))
    return list(options(group.params)), commands


def _model_names() -> list[str]:
    from llmkit.catalog import parse_catalog, shipped_catalog_text

    # The shipped catalog only: a user's own entries must not leak into checked-in scripts.
    return [name for name, spec in parse_catalog(shipped_catalog_text()).items()
            if spec.supported]


def _bash(root: list[_Opt], commands: list[_Cmd], models: list[str]) -> str:
    def words(opts: tuple[_Opt, ...] | list[_Opt]) -> str:
        return " ".join(n for o in opts for n in o.names)

    lines = [
        f"# {HEADER.format(shell='bash')}",
        "__llmkit_colon() {",
        "    if declare -F __ltrim_colon_completions >/dev/null 2>&1; then",
        '        __ltrim_colon_completions "$cur"',
        "    fi",
        "}",
        "_llmkit() {",
        "    local cur prev",
        "    # Model names contain ':', which bash splits words on; bash-completion can rejoin.",
        "    if declare -F _get_comp_words_by_ref >/dev/null 2>&1; then",
        "        _get_comp_words_by_ref -n : cur prev",
        "    else",
        '        cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
        "    fi",
        '    local cmd="" i',
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        case "${COMP_WORDS[i]}" in',
        "            -*) ;;",
        '            *) cmd="${COMP_WORDS[i]}"; break ;;',
        "        esac",
        "    done",
        f'    local models="{" ".join(models)}"',
        '    if [[ -z "$cmd" ]]; then',
        f'        COMPREPLY=($(compgen -W "{" ".join(c.name for c in commands)} '
        f'{words(root)}" -- "$cur"))',
        "        return",
        "    fi",
        '    case "$cmd" in',
    ]
    for c in commands:
        lines.append(f"        {c.name})")
        lines.append('            case "$prev" in')
        for o in c.options:
            if not o.takes_value:
                continue
            pattern = "|".join(o.names)
            if o.choices:
                action = f'COMPREPLY=($(compgen -W "{" ".join(o.choices)}" -- "$cur"))'
            elif o.models:
                action = ('COMPREPLY=($(compgen -W "$models" -- "$cur") '
                          '$(compgen -f -X "!*.gguf" -- "$cur")); __llmkit_colon')
            elif o.files:
                action = 'COMPREPLY=($(compgen -f -- "$cur"))'
            else:
                action = "COMPREPLY=()"
            lines.append(f"                {pattern}) {action}; return ;;")
        lines.append("            esac")
        lines.append('            if [[ "$cur" == -* ]]; then')
        lines.append(f'                COMPREPLY=($(compgen -W "{words(c.options)}" -- "$cur"))')
        if c.models:
            lines.append("            else")
            lines.append('                COMPREPLY=($(compgen -W "$models" -- "$cur") '
                         '$(compgen -f -X "!*.gguf" -- "$cur")); __llmkit_colon')
        elif c.files:
            lines.append("            else")
            lines.append('                COMPREPLY=($(compgen -f -- "$cur"))')
        lines.append("            fi")
        lines.append("            ;;")
    lines += ["    esac", "}", "complete -o filenames -F _llmkit llmkit", ""]
    return "\n".join(lines)


def _zsh_escape(text: str) -> str:
    # Inside single quotes: backslash-escape what _arguments/_describe treat specially, and
    # close-escape-reopen for an apostrophe.
    return re.sub(r"([\[\]:\\])", r"\\\1", text).replace("'", "'\\''")


def _zsh(root: list[_Opt], commands: list[_Cmd], models: list[str]) -> str:
    def spec(o: _Opt) -> str:
        help_text = _zsh_escape(o.help)
        if o.choices:
            action = f":value:({' '.join(o.choices)})"
        elif o.models:
            action = ":model:_llmkit_models"
        elif o.files:
            action = ":file:_files"
        elif o.takes_value:
            action = ":value: "
        else:
            action = ""
        if len(o.names) == 1:
            return f"'{o.names[0]}[{help_text}]{action}'"
        exclusive = " ".join(o.names)
        return f"'({exclusive})'{{{','.join(o.names)}}}'[{help_text}]{action}'"

    lines = [
        "#compdef llmkit",
        f"# {HEADER.format(shell='zsh')}",
        "_llmkit_models() {",
        f"    local -a names; names=({' '.join(models)})",
        "    _alternative 'models:model:compadd -a names' 'files:gguf file:_files -g \"*.gguf\"'",
        "}",
        "_llmkit() {",
        "    local -a commands",
        "    commands=(",
    ]
    lines += [f"        '{c.name}:{_zsh_escape(c.help)}'" for c in commands]
    lines += [
        "    )",
        "    if (( CURRENT == 2 )); then",
        "        _describe -t commands 'llmkit command' commands",
        "        _arguments " + " ".join(spec(o) for o in root),
        "        return",
        "    fi",
        "    local cmd=${words[2]}",
        "    shift words; (( CURRENT-- ))",
        "    case $cmd in",
    ]
    for c in commands:
        rest = " '*:model:_llmkit_models'" if c.models else (" '*:file:_files'" if c.files
                                                               else "")
        lines.append(f"        {c.name})")
        lines.append("            _arguments -s \\")
        for o in c.options:
            lines.append(f"                {spec(o)} \\")
        lines.append(f"               {rest or ' '}")
        lines.append("            ;;")
    lines += ["    esac", "}", '_llmkit "$@"', ""]
    return "\n".join(lines)


def _fish_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _fish(root: list[_Opt], commands: list[_Cmd], models: list[str]) -> str:
    def flags(o: _Opt) -> str:
        parts = []
        for n in o.names:
            parts.append(f"-l {n[2:]}" if n.startswith("--") else f"-s {n[1:]}")
        return " ".join(parts)

    names = " ".join(c.name for c in commands)
    lines = [f"# {HEADER.format(shell='fish')}", "complete -c llmkit -f"]
    for o in root:
        lines.append(f"complete -c llmkit -n '__fish_use_subcommand' {flags(o)} "
                     f"-d '{_fish_escape(o.help)}'")
    for c in commands:
        lines.append(f"complete -c llmkit -n 'not __fish_seen_subcommand_from {names}' "
                     f"-a {c.name} -d '{_fish_escape(c.help)}'")
    for c in commands:
        cond = f"-n '__fish_seen_subcommand_from {c.name}'"
        for o in c.options:
            extra = ""
            if o.choices:
                extra = f" -x -a '{' '.join(o.choices)}'"
            elif o.models:
                extra = f" -r -F -a '{' '.join(models)}'"
            elif o.files:
                extra = " -r -F"
            elif o.takes_value:
                extra = " -x"
            lines.append(f"complete -c llmkit {cond} {flags(o)}{extra} "
                         f"-d '{_fish_escape(o.help)}'")
        if c.models:
            lines.append(f"complete -c llmkit {cond} -F -a '{' '.join(models)}'")
        elif c.files:
            lines.append(f"complete -c llmkit {cond} -F")
    return "\n".join(lines) + "\n"


def completion_script(shell: str) -> str:
    """The completion script for ``shell`` ("bash", "zsh" or "fish").

    Raises:
        UsageError: an unknown shell.
    """
    from llmkit.cli.app import app
    from llmkit.errors import UsageError

    if shell not in SHELLS:
        raise UsageError(f"unknown shell '{shell}'", hint=f"use one of {', '.join(SHELLS)}")
    root, commands = _describe(app)
    render = {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell]
    return render(root, commands, _model_names())


class Shell(str, enum.Enum):
    """Shells with completion scripts."""

    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completions(
    shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")],
) -> None:
    """Print a static completion script for your shell.

    Example: llmkit completions bash > ~/.local/share/bash-completion/completions/llmkit
    """
    from llmkit.cli import _output as out

    out.write(completion_script(shell.value))
