"""`orionlm completion`: shell completion scripts, generated from the command line's own parser.

The bash script is one function holding the command tree as `case` tables: the verbs and sub-verbs, each verb's
options, and the values of options with fixed choices. zsh runs the same function through its bash completion
emulation (bashcompinit), so both shells complete the same words.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Literal


def completion(shell: Literal["bash", "zsh"], /) -> None:
    """Print a shell completion script (bash or zsh) for orionlm: its verbs, sub-verbs (`convert to-gguf`), each
    verb's options and the values of options with fixed choices; other words complete as file names.

    Install, for bash:
      orionlm completion bash > ~/.local/share/bash-completion/completions/orionlm
    or add `eval "$(orionlm completion bash)"` to ~/.bashrc; for zsh, add `eval "$(orionlm completion zsh)"` to
    ~/.zshrc (after compinit).

    Args:
        shell: the shell to complete in: bash or zsh
    """
    from . import make_parser

    script = bash_script(make_parser(), "orionlm")
    if shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    print(script, end="")


def _commands(parser: argparse.ArgumentParser, path: str = "") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(the words naming a command, joined by spaces, its parser) for the parser and each of its commands."""
    yield path, parser
    for action in parser._actions:  # argparse has no public way to walk a parser's arguments
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{path} {name}".strip())


def _words(parser: argparse.ArgumentParser) -> tuple[list[str], list[str], list[tuple[str, list[str]]]]:
    """A command's words: its sub-commands (or the values of a positional argument with fixed choices), its
    options (one spelling each: --top-k, not also --top_k), and (option, its values) for options with choices."""
    words, options, choices = [], [], []
    for action in parser._actions:
        values = [str(c) for c in action.choices or ()]
        if not action.option_strings:
            words += values
            continue
        options += [o for o in action.option_strings if "_" not in o]
        choices += [(option, values) for option in action.option_strings if values]
    return words, options, choices


def bash_script(parser: argparse.ArgumentParser, prog: str) -> str:
    """A bash completion function for `parser`, registered for `prog`."""
    name = "_" + prog.replace("-", "_")
    paths, words, values = [], [], []
    for path, sub in _commands(parser):
        fixed, options, choices = _words(sub)
        if path:
            paths.append(f'"{path}"')
        # without fixed words a command completes its options after a dash, else file names (bash's default)
        only_options = "" if fixed else "[[ $cur == -* ]] || return 0; "
        words.append(f'        "{path}") {only_options}words="{" ".join(fixed + options)}" ;;')
        values += [f'        "{path} {option}") words="{" ".join(items)}" ;;' for option, items in choices]
    return f"""# {prog} completion for bash (`{prog} completion bash`)
{name}() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} command="" next words i
    # the command so far: the words before the cursor that extend a known command (verb, then sub-verb)
    for ((i = 1; i < COMP_CWORD; i++)); do
        next="${{command:+$command }}${{COMP_WORDS[i]}}"
        case "$next" in
            {"|".join(paths)}) command=$next ;;
        esac
    done
    COMPREPLY=()
    case "$command $prev" in
{chr(10).join(values)}
        *)
            case "$command" in
{chr(10).join("    " + line for line in words)}
            esac ;;
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F {name} {prog}
"""
