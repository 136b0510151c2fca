"""Turns typed Python functions into argparse commands: positional-only parameters become
positional arguments, keyword parameters become --options (and so do the keys of a `**options: Unpack[TD]`
TypedDict, which lets verbs share options), and the docstring is the --help. Options that every verb of a kind
takes and none handles itself (orionlm's --threads for the verbs that compute) are the parameters of one setup
function, which runs before such a verb."""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # typing has Unpack from 3.11; before, typing_extensions (a dependency of torch) has it
    from typing_extensions import Unpack


@dataclass(frozen=True)
class Verb:
    """A verb of the command table: where its function lives ("module:function", the module in this package)
    and the summary the top-level --help lists. Listing verbs thus imports none of their modules; a test
    checks that every function's docstring starts with its summary. A verb that `computes` also takes the
    options of the table's setup function (build_parser's `setup`), which runs first."""

    target: str
    summary: str
    computes: bool = False

    def load(self) -> Callable[..., Any]:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)


Commands = dict[str, "Verb | Commands"]


class OneLineParser(argparse.ArgumentParser):
    """Usage errors print one line (what is wrong, and where to look) and exit with status 2."""

    def error(self, message: str) -> typing.NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _parse_docstring(fn: Callable[..., Any]) -> tuple[str, dict[str, str]]:
    """The description (text before 'Args:') and one help line per argument."""
    doc = inspect.getdoc(fn) or ""
    description, _, args_block = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    current = None
    for line in args_block.splitlines():
        stripped = line.strip()
        name, sep, text = stripped.partition(":")
        if sep and line.startswith("    ") and not line.startswith("        ") and name.isidentifier():
            current = name
            helps[name] = text.strip()
        elif current and stripped:
            helps[current] += " " + stripped
    return description.strip(), helps


def _unwrap_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _add_parameter(
    parser: argparse.ArgumentParser, param: inspect.Parameter, hint: Any, help_text: str, aliases: list[str]
) -> None:
    hint = _unwrap_optional(hint)
    kwargs: dict[str, Any] = {"help": help_text}
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        kwargs["choices"] = list(typing.get_args(hint))
        kwargs["type"] = type(kwargs["choices"][0])
    elif origin is list:
        kwargs["type"] = typing.get_args(hint)[0]
        kwargs["nargs"] = "+"
    elif hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if param.default is True else "store_true"
    else:
        kwargs["type"] = hint
    has_default = param.default is not inspect.Parameter.empty
    if param.kind is inspect.Parameter.VAR_POSITIONAL:  # *rest: the words argparse does not know (see run)
        parser.set_defaults(_rest=param.name)
        parser.epilog = f"{param.name}: {help_text}"
        return
    if param.kind is inspect.Parameter.POSITIONAL_ONLY:
        if has_default:
            kwargs["nargs"] = "?"
            kwargs["default"] = param.default
        kwargs["metavar"] = param.name.upper()
        parser.add_argument(param.name, **kwargs)
        return
    flags = ["--" + param.name.replace("_", "-")]
    if "_" in param.name:  # --lora_model_dir as well as --lora-model-dir: both spellings are in use
        flags.append("--" + param.name)
    flags += aliases
    if has_default:
        kwargs["default"] = param.default
        if param.default not in (None, False) and hint is not bool:
            kwargs["help"] = f"{help_text} (default: {param.default})"
    else:
        kwargs["required"] = True
    parser.add_argument(*flags, dest=param.name, **kwargs)


def _parameters(fn: Callable[..., Any]) -> Iterator[tuple[inspect.Parameter, Any, str]]:
    """fn's parameters with their type hints and help lines; `**options: Unpack[TD]` stands for TD's keys (each
    an option defaulting to None, or False for a flag), documented in TD's docstring."""
    _, helps = _parse_docstring(fn)
    hints = typing.get_type_hints(fn)
    for param in inspect.signature(fn).parameters.values():
        hint = hints.get(param.name, str)
        if param.kind is not inspect.Parameter.VAR_KEYWORD or typing.get_origin(hint) is not Unpack:
            yield param, hint, helps.get(param.name, "")
            continue
        shared = typing.get_args(hint)[0]
        _, shared_helps = _parse_docstring(shared)
        for name, key_hint in typing.get_type_hints(shared).items():
            default = False if key_hint is bool else None
            yield inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default), key_hint, shared_helps[name]


def _add_arguments(
    parser: argparse.ArgumentParser, fn: Callable[..., Any], setup: Callable[..., None] | None = None
) -> None:
    """fn's docstring as the parser's description, its parameters (and setup's, for run to call setup with)
    as arguments."""
    parser.description = _parse_docstring(fn)[0]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    aliases = getattr(fn, "aliases", {})  # other option names, e.g. {"adapter": ["--lora-model-dir"]}
    for param, hint, help_text in _parameters(fn):
        _add_parameter(parser, param, hint, help_text, aliases.get(param.name, []))
    if setup is not None:
        for param, hint, help_text in _parameters(setup):
            _add_parameter(parser, param, hint, help_text, [])
        parser.set_defaults(_setup=setup)
    rest = parser.get_default("_rest")
    if rest is not None:  # argparse does not list the words it leaves to the function
        parser.usage = f"{parser.format_usage().removeprefix('usage: ').strip()} [{rest.upper()} ...]"
    parser.set_defaults(_fn=fn)


def build_parser(
    prog: str,
    description: str,
    commands: Commands,
    version: str,
    chosen: Sequence[str] | None = None,
    setup: Callable[..., None] | None = None,
) -> argparse.ArgumentParser:
    """The parser of a command table. Only the verb that `chosen` (the command line) names gets its arguments,
    so only its module is imported; chosen=None gives every verb its arguments (for completion scripts). The
    keyword parameters of `setup` are options of every verb that computes too; `run` calls setup with them
    before the verb."""
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"{prog} {version}")

    def fill(parser: argparse.ArgumentParser, commands: Commands, path: tuple[str, ...]) -> None:
        parser.set_defaults(_group=parser)  # the help to print when no verb of this group is named
        subparsers = parser.add_subparsers(metavar="COMMAND", parser_class=OneLineParser)
        for name, entry in commands.items():
            here = (*path, name)
            if isinstance(entry, Verb):
                verb_parser = subparsers.add_parser(name, help=entry.summary)
                if chosen is None or tuple(chosen[: len(here)]) == here:
                    _add_arguments(verb_parser, entry.load(), setup if entry.computes else None)
            else:
                fill(subparsers.add_parser(name, help=f"{name} commands: {', '.join(entry)}"), entry, here)

    fill(parser, commands, ())
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Any:
    """Parse argv and call the chosen function with the parsed values (after the setup function with its own,
    for a verb that computes); a group named without one of its verbs (or no verb at all) prints the group's help
    and exits with status 2."""
    namespace, rest = parser.parse_known_args(argv)
    args = vars(namespace)
    group = args.pop("_group")
    fn = args.pop("_fn", None)
    setup = args.pop("_setup", None)
    rest_name = args.pop("_rest", None)
    if rest_name is not None:
        args[rest_name] = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if fn is None:
        group.print_help()
        sys.exit(2)
    if setup is not None:
        setup(**{name: args.pop(name) for name in inspect.signature(setup).parameters})
    params = inspect.signature(fn).parameters
    positional = []
    for name, param in params.items():
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            positional.append(args.pop(name))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            positional.extend(args.pop(name))
    return fn(*positional, **args)
