"""Shell completion generated from the real argparse command tree (pure).

:func:`command_tree` walks the parser the CLI really parses with — its subcommands, options,
option choices and positionals — so the bash, zsh and fish scripts can never drift from the
commands. :func:`complete` answers kubectl's plugin-completion protocol (``kubectl runs <TAB>``
runs ``kubectl_complete-runs``, which calls ``kubectl-runs __complete ARGS…``) from the same tree.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import NamedTuple

PROG = "kubectl-runs"
SHELLS = ("bash", "zsh", "fish")
FILE_METAVAR = "FILE"
RUN_METAVAR = "RUN"
NAMESPACE_METAVAR = "NAMESPACE"
CONTEXT_METAVAR = "CONTEXT"
DYNAMIC = {RUN_METAVAR: "runs", NAMESPACE_METAVAR: "namespaces", CONTEXT_METAVAR: "contexts"}
"""What ``__complete`` asks the cluster for, by the metavar of the word being completed."""
CONNECTION_FLAGS = ("--kubeconfig", "--context", "-n", "--namespace")
RUN_NAMES_CMD = "kubectl get runs.rq.davidlangworthy.io -o 'jsonpath={.items[*].metadata.name}'"
"""How the scripts list Run names for a ``RUN`` argument (current kubeconfig and namespace)."""
DIRECTIVE_DEFAULT = 0
DIRECTIVE_NO_FILES = 4
"""Cobra's ShellCompDirective values, as kubectl expects them from a completion plugin."""


class Option(NamedTuple):
    flags: tuple[str, ...]
    takes_value: bool
    choices: tuple[str, ...]
    files: bool
    help: str
    metavar: str | None = None


class Command(NamedTuple):
    """One node of the command tree: ``path`` () is the root."""

    path: tuple[str, ...]
    help: str
    options: tuple[Option, ...]
    subcommands: tuple[tuple[str, str], ...]
    """(name, one-line help) of each child."""
    positional_choices: tuple[str, ...]
    runs: bool
    """Takes a Run name as its first positional."""
    many: bool = False
    """That positional takes several words (``cancel RUN…``)."""

    @property
    def key(self) -> str:
        return " ".join(self.path)


def _subparsers(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def command_tree(parser: argparse.ArgumentParser) -> tuple[Command, ...]:
    """Every command of ``parser``, depth first, children in declaration order."""
    out: list[Command] = []

    def walk(p: argparse.ArgumentParser, path: tuple[str, ...], help_text: str) -> None:
        options: list[Option] = []
        choices: list[str] = []
        runs = many = False
        positionals = [a for a in p._actions if not a.option_strings]
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            options.append(
                Option(
                    flags=tuple(action.option_strings),
                    takes_value=action.nargs != 0,
                    choices=tuple(str(c) for c in action.choices or ()),
                    files=action.metavar == FILE_METAVAR,
                    help=(action.help or "").replace("%(default)s", str(action.default)),
                    metavar=action.metavar if isinstance(action.metavar, str) else None,
                )
            )
        sub = _subparsers(p)
        children: list[tuple[str, str, argparse.ArgumentParser]] = []
        if sub is not None:
            helps = {a.dest: a.help or "" for a in sub._choices_actions}
            children = [(name, helps.get(name, ""), child) for name, child in sub.choices.items()]
        first = next(
            (a for a in positionals if not isinstance(a, argparse._SubParsersAction)), None
        )
        if first is not None:
            choices = [str(c) for c in first.choices or ()]
            runs = first.metavar == RUN_METAVAR
            many = first.nargs in ("*", "+")
        out.append(
            Command(
                path=path,
                help=help_text,
                options=tuple(options),
                subcommands=tuple((name, text) for name, text, _ in children),
                positional_choices=tuple(choices),
                runs=runs,
                many=many,
            )
        )
        for name, text, child in children:
            walk(child, (*path, name), text)

    walk(parser, (), parser.description or "")
    return tuple(out)


def value_flags(tree: Sequence[Command]) -> tuple[str, ...]:
    """Every flag that consumes the next word (needed to find the command path in a line)."""
    return tuple(sorted({f for c in tree for o in c.options if o.takes_value for f in o.flags}))


def _path_of(tree: Sequence[Command], words: Sequence[str]) -> tuple[tuple[str, ...], bool]:
    """Command path named by ``words`` (the complete words before the cursor), and whether the
    command's first positional was already given."""
    by_key = {c.path: c for c in tree}
    takes = set(value_flags(tree))
    path: tuple[str, ...] = ()
    skip, positional = False, False
    for word in words:
        if skip:
            skip = False
            continue
        if word.startswith("-"):
            skip = word in takes and "=" not in word
            continue
        children = {name for name, _ in by_key[path].subcommands}
        if word in children:
            path = (*path, word)
        else:
            positional = True
    return path, positional


def dynamic(tree: Sequence[Command], args: Sequence[str]) -> str | None:
    """``runs``, ``namespaces`` or ``contexts`` when the word being typed (the last of
    ``args``) names one of them, else None: those candidates come from the cluster."""
    words, current = list(args[:-1]), args[-1] if args else ""
    if current.startswith("-"):
        return None
    command = {c.path: c for c in tree}[_path_of(tree, words)[0]]
    if words:
        for option in command.options:
            if words[-1] in option.flags and option.takes_value:
                return DYNAMIC.get(option.metavar or "")
    positional = _path_of(tree, words)[1]
    if command.runs and not command.subcommands and (command.many or not positional):
        return "runs"
    return None


def connection_flags(tree: Sequence[Command], words: Sequence[str]) -> list[str]:
    """The ``--kubeconfig``/``--context``/``-n`` flags (``--flag=value`` form) already typed,
    so names are looked up where the completed command will run."""
    out: list[str] = []
    for i, word in enumerate(words):
        name, eq, value = word.partition("=")
        if name in CONNECTION_FLAGS and eq:
            out.append(f"{name}={value}")
        elif word in CONNECTION_FLAGS and i + 1 < len(words):
            out.append(f"{word}={words[i + 1]}")
        elif word in ("-A", "--all-namespaces"):
            out.append("--all-namespaces")
    return out


def complete(tree: Sequence[Command], args: Sequence[str]) -> tuple[list[str], int]:
    """Candidates for the last of ``args`` (the word being typed) and a Cobra directive."""
    words, current = list(args[:-1]), args[-1] if args else ""
    by_key = {c.path: c for c in tree}
    path, positional = _path_of(tree, words)
    command = by_key[path]
    if words:
        for option in command.options:
            if words[-1] in option.flags and option.takes_value:
                if option.choices:
                    return [c for c in option.choices if c.startswith(current)], DIRECTIVE_NO_FILES
                return [], DIRECTIVE_DEFAULT if option.files else DIRECTIVE_NO_FILES
    if current.startswith("-"):
        flags = [f for o in command.options for f in o.flags if f.startswith(current)]
        return flags, DIRECTIVE_NO_FILES
    names = [name for name, _ in command.subcommands] or list(command.positional_choices)
    if positional and not command.subcommands:
        names = []
    return [n for n in names if n.startswith(current)], DIRECTIVE_NO_FILES


# ---------------------------------------------------------------------------- scripts


def _quote(text: str) -> str:
    """Single-quoted for sh/zsh/fish (no expansion inside)."""
    return "'" + text.replace("'", "'\\''") + "'"


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _describe(text: str) -> str:
    return " ".join(text.split()).replace(":", "\\:")


def _flags(command: Command) -> list[str]:
    return [flag for option in command.options for flag in option.flags]


def bash_script(tree: Sequence[Command], prog: str = PROG) -> str:
    """A bash completion script for ``prog`` (source it, or drop it in bash-completion.d)."""
    fn = "_" + prog.replace("-", "_")
    subs = "\n".join(
        f"        {_quote(c.key)}) echo {_quote(' '.join(n for n, _ in c.subcommands))} ;;"
        for c in tree
        if c.subcommands
    )
    choices = "\n".join(
        f"        {_quote(c.key)}) echo {_quote(' '.join(c.positional_choices))} ;;"
        for c in tree
        if c.positional_choices
    )
    opts = "\n".join(
        f"        {_quote(c.key)}) echo {_quote(' '.join(_flags(c)))} ;;" for c in tree
    )
    values: list[str] = []
    for c in tree:
        for o in c.options:
            if not o.takes_value:
                continue
            what = " ".join(o.choices) if o.choices else ("__files__" if o.files else "__any__")
            for flag in o.flags:
                values.append(f"        {_quote(c.key + '|' + flag)}) echo {_quote(what)} ;;")
    runs = "|".join(_quote(c.key) for c in tree if c.runs) or "''"
    return f"""# bash completion for {prog} (`kubectl runs`), generated from its command tree by
# `{prog} completions bash`. Load it with:  source <({prog} completions bash)
{fn}_subs() {{
    case "$1" in
{subs}
    esac
}}
{fn}_choices() {{
    case "$1" in
{choices or "        __none__) ;;"}
    esac
}}
{fn}_opts() {{
    case "$1" in
{opts}
    esac
}}
{fn}_values() {{
    case "$1|$2" in
{chr(10).join(values)}
    esac
}}
{fn}() {{
    local cur prev path="" skip=0 positional=0 i w v s found
    COMPREPLY=()
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    for (( i=1; i<COMP_CWORD; i++ )); do
        w="${{COMP_WORDS[i]}}"
        if [[ $skip == 1 ]]; then skip=0; continue; fi
        if [[ $w == -* ]]; then
            if [[ $w != *=* && -n "$({fn}_values "$path" "$w")" ]]; then skip=1; fi
            continue
        fi
        found=0
        for s in $({fn}_subs "$path"); do
            if [[ $s == "$w" ]]; then path="${{path:+$path }}$w"; found=1; break; fi
        done
        [[ $found == 0 ]] && positional=1
    done
    v="$({fn}_values "$path" "$prev")"
    if [[ -n $v ]]; then
        case "$v" in
            __files__) COMPREPLY=( $(compgen -f -- "$cur") ) ;;
            __any__) ;;
            *) COMPREPLY=( $(compgen -W "$v" -- "$cur") ) ;;
        esac
        return 0
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=( $(compgen -W "$({fn}_opts "$path")" -- "$cur") )
        return 0
    fi
    s="$({fn}_subs "$path")"
    if [[ -n $s ]]; then
        COMPREPLY=( $(compgen -W "$s" -- "$cur") )
        return 0
    fi
    s="$({fn}_choices "$path")"
    if [[ -n $s && $positional == 0 ]]; then
        COMPREPLY=( $(compgen -W "$s" -- "$cur") )
        return 0
    fi
    case "$path" in
        {runs})
            if [[ $positional == 0 ]]; then
                COMPREPLY=( $(compgen -W "$({RUN_NAMES_CMD} 2>/dev/null)" -- "$cur") )
            fi ;;
    esac
    return 0
}}
complete -F {fn} {prog}
"""


def zsh_script(tree: Sequence[Command], prog: str = PROG) -> str:
    """A zsh completion script for ``prog`` (``compdef``; descriptions included)."""
    fn = "_" + prog.replace("-", "_")
    subs = "\n".join(
        f"        {_quote(c.key)}) print -l -- "
        + " ".join(_quote(f"{n}:{_describe(h)}") for n, h in c.subcommands)
        + " ;;"
        for c in tree
        if c.subcommands
    )
    choices = "\n".join(
        f"        {_quote(c.key)}) print -l -- "
        + " ".join(_quote(x) for x in c.positional_choices)
        + " ;;"
        for c in tree
        if c.positional_choices
    )
    opts = "\n".join(
        f"        {_quote(c.key)}) print -l -- "
        + " ".join(_quote(f"{f}:{_describe(o.help)}") for o in c.options for f in o.flags)
        + " ;;"
        for c in tree
    )
    values: list[str] = []
    for c in tree:
        for o in c.options:
            if not o.takes_value:
                continue
            what = " ".join(o.choices) if o.choices else ("__files__" if o.files else "__any__")
            for flag in o.flags:
                values.append(f"        {_quote(c.key + '|' + flag)}) print -- {_quote(what)} ;;")
    runs = "|".join(_quote(c.key) for c in tree if c.runs) or "''"
    return f"""#compdef {prog}
# zsh completion for {prog} (`kubectl runs`), generated from its command tree by
# `{prog} completions zsh`. Load it with:  source <({prog} completions zsh)
{fn}_subs() {{
    case "$1" in
{subs or "        __none__) ;;"}
    esac
}}
{fn}_choices() {{
    case "$1" in
{choices or "        __none__) ;;"}
    esac
}}
{fn}_opts() {{
    case "$1" in
{opts}
    esac
}}
{fn}_values() {{
    case "$1|$2" in
{chr(10).join(values)}
    esac
}}
{fn}() {{
    local cmdpath="" skip=0 positional=0 i w v found
    local -a described names
    for (( i=2; i<CURRENT; i++ )); do
        w=${{words[i]}}
        if [[ $skip == 1 ]]; then skip=0; continue; fi
        if [[ $w == -* ]]; then
            if [[ $w != *=* && -n "$({fn}_values "$cmdpath" "$w")" ]]; then skip=1; fi
            continue
        fi
        found=0
        for v in ${{(f)"$({fn}_subs "$cmdpath")"}}; do
            if [[ ${{v%%:*}} == "$w" ]]; then
                cmdpath="${{cmdpath:+$cmdpath }}$w"; found=1; break
            fi
        done
        (( found == 0 )) && positional=1
    done
    v="$({fn}_values "$cmdpath" "${{words[CURRENT-1]}}")"
    if [[ -n $v ]]; then
        case "$v" in
            __files__) _files ;;
            __any__) ;;
            *) compadd -- ${{=v}} ;;
        esac
        return
    fi
    if [[ ${{words[CURRENT]}} == -* ]]; then
        described=(${{(f)"$({fn}_opts "$cmdpath")"}})
        _describe -t options 'option' described
        return
    fi
    described=(${{(f)"$({fn}_subs "$cmdpath")"}})
    if (( ${{#described}} )); then
        _describe -t commands 'command' described
        return
    fi
    names=(${{(f)"$({fn}_choices "$cmdpath")"}})
    if (( ${{#names}} && positional == 0 )); then
        compadd -- $names
        return
    fi
    case "$cmdpath" in
        {runs})
            if (( positional == 0 )); then
                names=(${{=$({RUN_NAMES_CMD} 2>/dev/null)}})
                compadd -- $names
            fi ;;
    esac
}}
compdef {fn} {prog}
"""


def fish_script(tree: Sequence[Command], prog: str = PROG) -> str:
    """A fish completion script for ``prog``."""
    fn = "__" + prog.replace("-", "_")
    subs = "\n".join(
        f"        case {_fish_quote(c.key)}\n            printf '%s\\n' "
        + " ".join(_fish_quote(n) for n, _ in c.subcommands)
        for c in tree
        if c.subcommands
    )
    takes = " ".join(_fish_quote(f) for f in value_flags(tree))
    lines = [
        f"# fish completion for {prog} (`kubectl runs`), generated from its command tree by",
        f"# `{prog} completions fish`. Load it with:  {prog} completions fish | source",
        f"function {fn}_subs",
        "    switch $argv[1]",
        subs,
        "    end",
        "end",
        f"function {fn}_path",
        "    set -l words (commandline -opc)",
        "    set -e words[1]",
        "    set -l path",
        "    set -l skip 0",
        "    for w in $words",
        "        if test $skip = 1",
        "            set skip 0",
        "            continue",
        "        end",
        "        if string match -q -- '-*' $w",
        f"            if not string match -q -- '*=*' $w; and contains -- $w {takes}",
        "                set skip 1",
        "            end",
        "            continue",
        "        end",
        f"        if contains -- $w ({fn}_subs (string join ' ' $path))",
        "            set path $path $w",
        "        end",
        "    end",
        "    string join ' ' $path",
        "end",
        f"function {fn}_at",
        f"    set -l path ({fn}_path)",
        '    test "$path" = "$argv[1]"',
        "end",
        f"function {fn}_runs",
        f"    {RUN_NAMES_CMD} 2>/dev/null | string split ' '",
        "end",
        f"complete -c {prog} -f",
    ]
    for c in tree:
        cond = f"{fn}_at {_fish_quote(c.key)}"
        for name, text in c.subcommands:
            lines.append(
                f"complete -c {prog} -n {_fish_quote(cond)} -a {_fish_quote(name)}"
                f" -d {_fish_quote(' '.join(text.split()))}"
            )
        if c.positional_choices:
            lines.append(
                f"complete -c {prog} -n {_fish_quote(cond)}"
                f" -a {_fish_quote(' '.join(c.positional_choices))}"
            )
        if c.runs:
            lines.append(f"complete -c {prog} -n {_fish_quote(cond)} -a '({fn}_runs)'")
        for o in c.options:
            parts = [f"complete -c {prog} -n {_fish_quote(cond)}"]
            for flag in o.flags:
                if flag.startswith("--"):
                    parts.append(f"-l {flag[2:]}")
                else:
                    parts.append(f"-s {flag[1:]}")
            if o.takes_value:
                if o.choices:
                    parts.append(f"-x -a {_fish_quote(' '.join(o.choices))}")
                elif o.files:
                    parts.append("-r -F")
                else:
                    parts.append("-x")
            parts.append(f"-d {_fish_quote(' '.join(o.help.split()))}")
            lines.append(" ".join(parts))
    return "\n".join(lines) + "\n"


def script(shell: str, tree: Sequence[Command], prog: str = PROG) -> str:
    """The completion script for ``shell`` (bash, zsh or fish)."""
    if shell == "bash":
        return bash_script(tree, prog)
    if shell == "zsh":
        return zsh_script(tree, prog)
    if shell == "fish":
        return fish_script(tree, prog)
    raise ValueError(f"unsupported shell {shell!r}: one of {', '.join(SHELLS)}")
