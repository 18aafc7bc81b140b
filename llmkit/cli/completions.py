"""Static shell completion scripts for bash, zsh and fish, generated from the running app.

Why not Typer's own completion (``--install-completion``)? Its scripts call back into the
program at every TAB, which for llmkit means starting Python and importing the app: about
0.2 s a keystroke here, where these scripts answer in milliseconds without Python. It also
leaves every Path value to the shell's default (files, even where only a directory fits), and
completes a free-text argument (a prompt) with file names.

Why not ``typer.main.get_command(app)``, as before? Since 0.26 Typer bundles its own Click
and says that reaching the Click command behind an app is no longer supported, and that its
``typer._click`` may change at any time. The one door it documents is ``typer.Context``,
which a command receives and which Typer describes as Click's Context: the ``completions``
command passes its own, and the generator walks the app from its root with members Click's
Context, Command, Group and Parameter document (``find_root``, ``command``, ``get_params``,
``list_commands``, ``get_command``, ``opts``, ``secondary_opts``, ``nargs``, ``is_flag``,
``hidden``, ``type.name``, ``choices``). It takes the app as what calls it hands over, so this
module does not import the app that imports it. The toy app in tests/test_completions.py
exercises these members, so a Typer release that changes one fails there first.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Annotated, Any

import typer

SHELLS = ("bash", "zsh", "fish")
HEADER = "llmkit {shell} completion, generated from the app by `llmkit completions {shell}`"


@dataclass(frozen=True)
class _Value:
    """What an option's or argument's value completes to."""

    kind: str = "none"  # "none", "choices", "files", "dirs" or "models"
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Opt:
    names: tuple[str, ...]
    help: str
    nargs: int  # values it consumes; 0 for a flag
    value: _Value


@dataclass(frozen=True)
class _Arg:
    name: str
    variadic: bool  # takes all remaining positional words
    value: _Value


@dataclass(frozen=True)
class _Node:
    """A command or group, by its path of subcommand names from the root ('' for the root)."""

    path: tuple[str, ...]
    help: str
    options: tuple[_Opt, ...]
    args: tuple[_Arg, ...]
    children: tuple[_Node, ...]

    @property
    def key(self) -> str:
        return " ".join(self.path)

    def walk(self) -> list[_Node]:
        return [self, *(n for c in self.children for n in c.walk())]


def _first_line(text: str | None) -> str:
    line = (text or "").strip().split("\n")[0].strip()
    return line[:-1] if line.endswith(".") and not line.endswith("..") else line


def _value_of(param: Any) -> _Value:
    # A parameter type's name says what it takes: "choice", "file", "directory", "path"
    # (either), "filename" (an open file), or a scalar such as "integer".
    ptype: Any = param.type
    kind = ptype.name
    if kind == "choice":
        return _Value("choices", tuple(str(c.value) if isinstance(c, enum.Enum) else str(c)
                                       for c in ptype.choices))
    if param.name == "model":
        return _Value("models")
    if kind == "directory":
        return _Value("dirs")
    if kind in ("file", "path", "filename"):
        return _Value("files")
    return _Value()


def _describe(ctx: Any, path: tuple[str, ...] = ()) -> _Node:
    """The completion-relevant shape of the command of ``ctx`` and of its subcommands."""
    command = ctx.command
    options: list[_Opt] = []
    args: list[_Arg] = []
    # With the help option, under the names this context gives it (as --help shows them).
    for p in command.get_params(ctx):
        if p.hidden:
            continue
        if p.param_type_name == "argument":
            args.append(_Arg(p.human_readable_name.lower(), p.nargs < 0, _value_of(p)))
        elif p.param_type_name == "option":
            flag = bool(p.is_flag or p.count)
            options.append(_Opt(
                names=tuple(sorted([*p.opts, *p.secondary_opts], key=lambda n: (len(n), n))),
                help=_first_line(p.help),
                nargs=0 if flag else max(p.nargs, 1),
                value=_Value() if flag else _value_of(p),
            ))
    children = []
    # A group lists its subcommands (list_commands, get_command); a plain command has none.
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            # Made as Click makes a subcommand's context, without parsing anything.
            sub_ctx = typer.Context(sub, parent=ctx, info_name=name, **sub.context_settings)
            children.append(_describe(sub_ctx, (*path, name)))
    return _Node(path, _first_line(command.help), tuple(options), tuple(args), tuple(children))


def _model_names() -> list[str]:
    from llmkit.catalog import parse_catalog, shipped_catalog_text

    # The shipped catalog only: a user's own entries must not leak into checked-in scripts.
    return [name for name, spec in parse_catalog(shipped_catalog_text()).items()
            if spec.supported]


# --- bash -------------------------------------------------------------------------------

_BASH_MAIN = r"""
# Puts the words that match $2 among the words $1 into COMPREPLY.
__llmkit_words() {
    local w
    for w in $(compgen -W "$1" -- "$2"); do COMPREPLY+=("$w"); done
}

__llmkit_files() {
    compopt -o filenames 2>/dev/null
    local f
    while IFS= read -r f; do COMPREPLY+=("$f"); done < <(compgen -f -- "$1")
}

__llmkit_dirs() {
    compopt -o filenames 2>/dev/null
    local f
    while IFS= read -r f; do COMPREPLY+=("$f"); done < <(compgen -d -- "$1")
}

# A model: a catalog name, or a path to a .gguf file.
__llmkit_models() {
    __llmkit_words "$__llmkit_model_names" "$1"
    compopt -o filenames 2>/dev/null
    local f
    while IFS= read -r f; do
        COMPREPLY+=("$f")
    done < <(compgen -d -- "$1"; compgen -f -X '!*.gguf' -- "$1")
}

_llmkit() {
    # bash splits words at ':' and '=' (COMP_WORDBREAKS); glue them back so that
    # `-m smollm2:135m` and `--device=cpu` are one word each. Works without bash-completion.
    local -a words=()
    local i j=-1 cword=0 glue=0 x
    for ((i = 0; i < ${#COMP_WORDS[@]} && i <= COMP_CWORD; i++)); do
        x=${COMP_WORDS[i]}
        if ((j >= 0)) && [[ -n $x ]] && { ((glue)) || [[ -z ${x//[:=]/} ]]; }; then
            words[j]+=$x
        else
            j=$((j + 1))
            words[j]=$x
        fi
        if [[ -n $x && -z ${x//[:=]/} ]]; then glue=1; else glue=0; fi
        cword=$j
    done
    local cur=${words[cword]}
    local path="" subs="" opts="" valued="" npos=0 variadic=0
    __llmkit_spec ""
    local pos=0 skip=0 dashdash=0 opt="" n
    for ((i = 1; i < cword; i++)); do
        x=${words[i]}
        if ((skip > 0)); then skip=$((skip - 1)); continue; fi
        if ((!dashdash)); then
            case $x in
                --) dashdash=1; continue ;;
                -*=*) continue ;;
                -*)
                    if [[ " $valued " == *" $x="* ]]; then
                        n=" $valued "
                        n=${n#*" $x="}
                        skip=${n%% *}
                        opt=$x
                    fi
                    continue ;;
            esac
        fi
        if ((!dashdash)) && [[ " $subs " == *" $x "* ]]; then
            path=${path:+$path }$x
            pos=0
            __llmkit_spec "$path"
        else
            pos=$((pos + 1))
        fi
    done
    local value=$cur prefix=""
    if ((skip == 0)); then
        opt=""
        if ((!dashdash)) && [[ $cur == -*=* && " $valued " == *" ${cur%%=*}="* ]]; then
            opt=${cur%%=*}
            value=${cur#*=}
            prefix=$opt=
        fi
    fi
    COMPREPLY=()
    if [[ -n $opt ]]; then
        __llmkit_value "$path" "$opt" "$value"
    elif ((!dashdash)) && [[ $cur == -* ]]; then
        __llmkit_words "$opts" "$cur"
    elif [[ -n $subs ]]; then
        __llmkit_words "$subs" "$cur"
    elif ((npos > 0)); then
        if ((pos >= npos && variadic)); then pos=$((npos - 1)); fi
        if ((pos < npos)); then __llmkit_value "$path" "#$pos" "$value"; fi
    fi
    # bash replaces only the text after the last word-break character: drop what precedes it.
    local breaks="" trim=""
    [[ $COMP_WORDBREAKS == *:* ]] && breaks+=":"
    [[ $COMP_WORDBREAKS == *=* ]] && breaks+="="
    if [[ -n $breaks && $cur == *[$breaks]* ]]; then
        trim=${cur%"${cur##*[$breaks]}"}
    fi
    if [[ -n $prefix || -n $trim ]]; then
        for i in "${!COMPREPLY[@]}"; do
            x=$prefix${COMPREPLY[i]}
            COMPREPLY[i]=${x#"$trim"}
        done
    fi
}

complete -F _llmkit llmkit
"""


def _bash_quote(words: list[str] | tuple[str, ...]) -> str:
    text = " ".join(words)
    return "'" + text.replace("'", "'\\''") + "'"


def _bash_value_action(value: _Value) -> str | None:
    if value.kind == "choices":
        return f'__llmkit_words {_bash_quote(value.choices)} "$3"'
    if value.kind == "models":
        return '__llmkit_models "$3"'
    if value.kind == "files":
        return '__llmkit_files "$3"'
    if value.kind == "dirs":
        return '__llmkit_dirs "$3"'
    return None


def _bash(root: _Node, models: list[str]) -> str:
    nodes = root.walk()
    lines = [
        f"# {HEADER.format(shell='bash')}",
        "# Static: completing a word never starts llmkit. Install it as",
        "# ~/.local/share/bash-completion/completions/llmkit, or source it from ~/.bashrc.",
        "",
        f"__llmkit_model_names={_bash_quote(models)}",
        "",
        "# The subcommands, options and value-taking options (as NAME=COUNT) of command path $1,",
        "# how many positional arguments it takes, and whether the last one repeats.",
        "__llmkit_spec() {",
        '    case "$1" in',
    ]
    for node in nodes:
        valued = [f"{n}={o.nargs}" for o in node.options if o.nargs for n in o.names]
        lines += [
            f"        {_bash_quote([node.key])})",
            f"            subs={_bash_quote([c.path[-1] for c in node.children])}",
            f"            opts={_bash_quote([n for o in node.options for n in o.names])}",
            f"            valued={_bash_quote(valued)}",
            f"            npos={len(node.args)} variadic="
            f"{int(bool(node.args) and node.args[-1].variadic)} ;;",
        ]
    lines += [
        "        *) subs='' opts='' valued='' npos=0 variadic=0 ;;",
        "    esac",
        "}",
        "",
        "# Completes $3 as the value of option $2 (or of positional argument #N) of path $1.",
        "__llmkit_value() {",
        '    case "$1 $2" in',
    ]
    for node in nodes:
        for o in node.options:
            action = _bash_value_action(o.value) if o.nargs else None
            if action:
                pattern = "|".join(_bash_quote([f"{node.key} {n}"]) for n in o.names)
                lines.append(f"        {pattern}) {action} ;;")
        for i, a in enumerate(node.args):
            action = _bash_value_action(a.value)
            if action:
                lines.append(f"        {_bash_quote([f'{node.key} #{i}'])}) {action} ;;")
    lines += ["    esac", "}"]
    return "\n".join(lines) + "\n" + _BASH_MAIN


# --- zsh --------------------------------------------------------------------------------

def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _zsh_escape(text: str) -> str:
    # What _arguments and _describe treat specially inside a spec.
    return re.sub(r"([\[\]:\\])", r"\\\1", text)


def _zsh_function(node: _Node) -> str:
    return "_llmkit" + "".join("_" + re.sub(r"\W", "_", p) for p in node.path)


def _zsh_action(value: _Value, message: str) -> str:
    message = _zsh_escape(message) or "value"
    if value.kind == "choices":
        words = " ".join(re.sub(r"([\s()\\:'\"])", r"\\\1", c) for c in value.choices)
        return f":{message}:({words})"
    if value.kind == "models":
        return f":{message}:_llmkit_models"
    if value.kind == "files":
        return f":{message}:_files"
    if value.kind == "dirs":
        return f":{message}:_files -/"
    return f":{message}: "


def _zsh_option_specs(node: _Node) -> list[str]:
    specs = []
    for o in node.options:
        help_text = _zsh_escape(o.help)
        action = "".join(_zsh_action(o.value, o.names[-1].lstrip("-"))
                         for _ in range(o.nargs))
        # --name= and -n+ let the value come in the same word (as Click allows) or the next.
        forms = [n + ("" if not o.nargs else "=" if n.startswith("--") else "+")
                 for n in o.names]
        if len(forms) == 1:
            specs.append(_zsh_quote(f"{forms[0]}[{help_text}]{action}"))
        else:
            specs.append(_zsh_quote(f"({' '.join(o.names)})") + "{" + ",".join(forms)
                         + "}" + _zsh_quote(f"[{help_text}]{action}"))
    return specs


def _zsh_node(node: _Node) -> list[str]:
    lines = [f"{_zsh_function(node)}() {{"]
    specs = _zsh_option_specs(node)
    if node.children:
        lines += [
            "    local curcontext=$curcontext state line ret=1",
            "    typeset -A opt_args",
            "    _arguments -C -s -S \\",
            *(f"        {s} \\" for s in specs),
            "        '1:command:->command' \\",
            "        '*::argument:->argument' && ret=0",
            "    case $state in",
            "        command)",
            "            local -a commands",
            "            commands=(",
            *(f"                {_zsh_quote(_zsh_escape(c.path[-1]) + ':' + c.help)}"
              for c in node.children),
            "            )",
            f"            _describe -t commands {_zsh_quote(' '.join(('llmkit', *node.path)))}"
            " commands && ret=0",
            "            ;;",
            "        argument)",
            "            curcontext=${curcontext%:*:*}:llmkit-$words[1]:",
            "            case $words[1] in",
            *(f"                {_zsh_quote(c.path[-1])}) {_zsh_function(c)} && ret=0 ;;"
              for c in node.children),
            "            esac",
            "            ;;",
            "    esac",
            "    return ret",
            "}",
        ]
        for c in node.children:
            lines += ["", *_zsh_node(c)]
        return lines
    positional = []
    for i, a in enumerate(node.args):
        position = "*" if a.variadic else str(i + 1)
        positional.append(_zsh_quote(position + _zsh_action(a.value, a.name)))
        if a.variadic:
            break
    body = specs + positional
    lines.append("    _arguments -s -S" + (" \\" if body else ""))
    lines += [f"        {s}" + (" \\" if i < len(body) - 1 else "") for i, s in enumerate(body)]
    lines.append("}")
    return lines


def _zsh(root: _Node, models: list[str]) -> str:
    lines = [
        "#compdef llmkit",
        f"# {HEADER.format(shell='zsh')}",
        "# Static: completing a word never starts llmkit. Put it on $fpath as _llmkit, or",
        "# source it after compinit.",
        "",
        "# A model: a catalog name, or a path to a .gguf file.",
        "_llmkit_models() {",
        "    local -a names",
        "    names=(" + " ".join(_zsh_quote(m) for m in models) + ")",
        "    _alternative 'models:model:compadd -a names' 'files:gguf file:_files -g \"*.gguf\"'",
        "}",
        "",
        *_zsh_node(root),
        "",
        "# Autoloaded from $fpath, this file is the body of _llmkit; sourced, it registers it.",
        'if [[ $funcstack[1] == _llmkit ]]; then',
        '    _llmkit "$@"',
        "else",
        "    compdef _llmkit llmkit",
        "fi",
        "",
    ]
    return "\n".join(lines)


# --- fish -------------------------------------------------------------------------------

def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


_FISH_STATE = r"""
# Prints how many positional words the command at the cursor has, then its path.
function __llmkit_state
    set -l tokens (commandline -opc)
    set -e tokens[1]
    set -l path ''
    set -l pos 0
    set -l skip 0
    set -l dashdash 0
    for t in $tokens
        if test $skip -gt 0
            set skip (math $skip - 1)
            continue
        end
        if test $dashdash -eq 0
            switch $t
                case --
                    set dashdash 1
                    continue
                case '-*=*'
                    continue
                case '-*'
                    set skip (__llmkit_nargs "$path" $t)
                    continue
            end
        end
        if test $dashdash -eq 0; and contains -- $t (__llmkit_subcommands "$path")
            set path (string trim -- "$path $t")
            set pos 0
        else
            set pos (math $pos + 1)
        end
    end
    echo $pos
    echo $path
end

# True when the cursor is in the command whose path is $argv.
function __llmkit_at
    set -l state (__llmkit_state)
    set -l want (string join ' ' -- $argv)
    test "$state[2]" = "$want"
end

# True when the cursor is at positional argument $argv[2] ("N+": N or later) of path $argv[1].
function __llmkit_arg --argument-names path index
    set -l state (__llmkit_state)
    test "$state[2]" = "$path"; or return 1
    switch $index
        case '*+'
            test $state[1] -ge (string replace '+' '' -- $index)
        case '*'
            test $state[1] -eq $index
    end
end
"""


def _fish(root: _Node, models: list[str]) -> str:
    nodes = root.walk()

    def flags(o: _Opt) -> str:
        parts = []
        for n in o.names:
            if n.startswith("--"):
                parts.append(f"-l {_fish_quote(n[2:])}")
            elif len(n) == 2:
                parts.append(f"-s {_fish_quote(n[1:])}")
            else:
                parts.append(f"-o {_fish_quote(n[1:])}")
        return " ".join(parts)

    def value_flags(value: _Value, requires: bool) -> str:
        r = " -r" if requires else ""
        if value.kind == "choices":
            return f" -x -a {_fish_quote(' '.join(value.choices))}"
        if value.kind == "models":
            return f" -x -a {_fish_quote(' '.join(models) + ' (__fish_complete_suffix .gguf)')}"
        if value.kind in ("files", "dirs"):
            return f"{r} -F"
        return " -x" if requires else ""

    lines = [
        f"# {HEADER.format(shell='fish')}",
        "# Static: completing a word never starts llmkit. Install it as",
        "# ~/.config/fish/completions/llmkit.fish.",
        "",
        "function __llmkit_subcommands --argument-names path",
        "    switch $path",
    ]
    for node in nodes:
        if node.children:
            lines += [f"        case {_fish_quote(node.key)}",
                      "            printf '%s\\n' "
                      + " ".join(_fish_quote(c.path[-1]) for c in node.children)]
    lines += ["    end", "end", "", "# How many values option $argv[2] of path $argv[1] takes.",
              "function __llmkit_nargs --argument-names path opt",
              '    switch "$path $opt"']
    by_count: dict[int, list[str]] = {}
    for node in nodes:
        for o in node.options:
            if o.nargs:
                by_count.setdefault(o.nargs, []).extend(f"{node.key} {n}" for n in o.names)
    for count, keys in sorted(by_count.items()):
        lines += ["        case " + " ".join(_fish_quote(k) for k in keys),
                  f"            echo {count}", "            return"]
    lines += ["    end", "    echo 0", "end", _FISH_STATE, "complete -c llmkit -f"]
    for node in nodes:
        cond = f"-n {_fish_quote(('__llmkit_at ' + node.key).strip())}"
        for c in node.children:
            lines.append(f"complete -c llmkit {cond} -a {_fish_quote(c.path[-1])} "
                         f"-d {_fish_quote(c.help)}")
        for o in node.options:
            lines.append(f"complete -c llmkit {cond} {flags(o)}"
                         f"{value_flags(o.value, bool(o.nargs))} -d {_fish_quote(o.help)}")
        for i, a in enumerate(node.args):
            extra = value_flags(a.value, False)
            if extra:
                index = f"{i}+" if a.variadic else str(i)
                arg_cond = f"-n {_fish_quote(f'__llmkit_arg {_fish_quote(node.key)} {index}')}"
                lines.append(f"complete -c llmkit {arg_cond}{extra}")
    return "\n".join(lines) + "\n"


def completion_script(shell: str, ctx: typer.Context) -> str:
    """The static completion script for ``shell``, from the commands and options of an app.

    Args:
        shell: "bash", "zsh" or "fish".
        ctx: a context of the running app to describe, any command's (its root is found).

    Returns:
        The script's text; it completes the command ``llmkit``.

    Raises:
        UsageError: an unknown shell.
    """
    from llmkit.errors import UsageError

    if shell not in SHELLS:
        raise UsageError(f"unknown shell '{shell}'", hint=f"use one of {', '.join(SHELLS)}")
    root = _describe(ctx.find_root())
    render = {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell]
    return render(root, _model_names())


class Shell(str, enum.Enum):
    """Shells with completion scripts."""

    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completions(
    ctx: typer.Context,
    shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.", show_default=False)],
) -> None:
    """Print a static completion script for your shell.

    Example: llmkit completions bash > ~/.local/share/bash-completion/completions/llmkit
    """
    from llmkit.cli import _output as out

    out.write(completion_script(shell.value, ctx))
