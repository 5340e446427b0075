"""Shell completion, from the argument parser itself (one engine, no second list of commands to keep in step):

* ``rolloutctl completion bash|zsh`` prints a script whose function asks ``rolloutctl __complete WORD…`` for the
  candidates (Cobra's protocol: one candidate a line, then ``:<directive>``);
* ``kubectl_complete-modelrollout`` is the executable kubectl (1.26+) runs to complete ``kubectl modelrollout …``
  with the same protocol, so ``kubectl modelrollout st<TAB>`` completes in kubectl's own completion.

Candidates: commands, the options of the command typed, an option's choices (``-o`` json/yaml, ``--to`` stages,
``--backend``), and for NAME the rollouts the backend lists (kube: in the namespace given with ``-n``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import Final

#: Cobra's ShellCompDirectiveNoFileComp: the shell offers no file names when no candidate matches.
NO_FILE_COMPLETION: Final[int] = 4
COMPLETE_COMMAND: Final[str] = "__complete"

Names = Callable[[Mapping[str, str]], Sequence[str]]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {option: action for action in parser._actions for option in action.option_strings}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]


def complete_words(parser: argparse.ArgumentParser, words: Sequence[str], names: Names | None = None) -> list[str]:
    """The candidates for the last of ``words`` (the word being typed, possibly empty), ``words`` being what follows
    the program's name. ``names`` lists the rollouts for a NAME argument, given the option values typed so far."""
    *done, current = list(words) or [""]
    commands = _subcommands(parser)
    options = _options(parser)
    command: argparse.ArgumentParser | None = None
    pending: argparse.Action | None = None
    values: dict[str, str] = {}
    positional = 0
    for word in done:
        if pending is not None:
            values[pending.dest] = word
            pending = None
        elif word.startswith("-"):
            action = options.get(word.split("=", 1)[0])
            if action is not None and action.nargs != 0 and "=" not in word:
                pending = action
        elif command is None and word in commands:
            command = commands[word]
            options = {**options, **_options(command)}
        elif command is not None:
            positional += 1
    if pending is not None:
        return [str(c) for c in pending.choices or () if str(c).startswith(current)]
    if current.startswith("-"):
        return sorted(o for o in options if o.startswith(current))
    if command is None:
        return [c for c in commands if c.startswith(current)]
    slots = _positionals(command)
    if positional >= len(slots):
        return []
    slot = slots[positional]
    if slot.choices:
        return [str(c) for c in slot.choices if str(c).startswith(current)]
    if slot.dest == "name" and names is not None:
        return [n for n in names(values) if n.startswith(current)]
    return []


def cobra_lines(candidates: Sequence[str]) -> str:
    """Cobra's ``__complete`` answer: the candidates, then the directive line."""
    return "".join(f"{c}\n" for c in candidates) + f":{NO_FILE_COMPLETION}\n"


def completion_script(prog: str, shell: str) -> str:
    """The bash or zsh script for ``prog`` (``source <(prog completion bash)``)."""
    function = "_" + prog.replace("-", "_") + "_complete"
    body = f"""\
{function}() {{
    local IFS=$'\\n'
    COMPREPLY=($({prog} {COMPLETE_COMMAND} "${{COMP_WORDS[@]:1:$COMP_CWORD}}" 2>/dev/null | grep -v '^:'))
    return 0
}}
complete -F {function} {prog}
"""
    if shell == "bash":
        return f"# bash completion for {prog}: source <({prog} completion bash)\n{body}"
    if shell == "zsh":
        header = f"#compdef {prog}\n# zsh completion for {prog}: source <({prog} completion zsh)\n"
        return header + "autoload -U +X bashcompinit && bashcompinit\n" + body
    raise ValueError(f"unsupported shell {shell!r} (bash, zsh)")
