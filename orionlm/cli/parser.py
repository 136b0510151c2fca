"""Turns typed Python functions into argparse commands: positional-only parameters become
positional arguments, keyword parameters become --options, and the docstring is the --help."""

from __future__ import annotations

import argparse
import inspect
import sys
import types
import typing
from collections.abc import Callable
from typing import Any

Commands = dict[str, "Callable[..., Any] | Commands"]


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


def _add_command(subparsers: Any, name: str, fn: Callable[..., Any]) -> None:
    description, helps = _parse_docstring(fn)
    summary = description.split("\n\n")[0].replace("\n", " ")
    parser = subparsers.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(fn)
    aliases = getattr(fn, "aliases", {})  # other option names, e.g. {"adapter": ["--lora-model-dir"]}
    for param in inspect.signature(fn).parameters.values():
        _add_parameter(
            parser, param, hints.get(param.name, str), helps.get(param.name, ""), aliases.get(param.name, [])
        )
    rest = parser.get_default("_rest")
    if rest is not None:  # argparse does not list the words it leaves to the function
        parser.usage = f"{parser.format_usage().removeprefix('usage: ').strip()} [{rest.upper()} ...]"
    parser.set_defaults(_fn=fn)


def build_parser(prog: str, description: str, commands: Commands) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description)

    def fill(parser: argparse.ArgumentParser, commands: Commands) -> None:
        subparsers = parser.add_subparsers(metavar="COMMAND", required=True, parser_class=OneLineParser)
        for name, target in commands.items():
            if callable(target):
                _add_command(subparsers, name, target)
            else:
                group = subparsers.add_parser(name, help=f"{name} commands: {', '.join(target)}")
                fill(group, target)

    fill(parser, commands)
    return parser


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> Any:
    """Parse argv and call the chosen function with the parsed values."""
    namespace, rest = parser.parse_known_args(argv)
    args = vars(namespace)
    fn = args.pop("_fn")
    rest_name = args.pop("_rest", None)
    if rest_name is not None:
        args[rest_name] = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    params = inspect.signature(fn).parameters
    positional = []
    for name, param in params.items():
        if param.kind is inspect.Parameter.POSITIONAL_ONLY:
            positional.append(args.pop(name))
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            positional.extend(args.pop(name))
    return fn(*positional, **args)
