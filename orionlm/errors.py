"""The base of every error caused by user input: the CLI prints its message on one line and exits 2."""

import difflib
import importlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any


class OrionError(ValueError):
    """A mistake the user can fix: a bad config, a missing or corrupt file, an invalid argument."""


class MissingExtra(OrionError):
    """An optional dependency is not installed; the message names the orionlm extra that brings it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """`module`, imported; MissingExtra when it (or a module it imports) is not installed, saying what needs it
    and which extra of pyproject.toml installs it. Every import of an optional dependency goes through here."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = e.name or module
        message = f"{purpose} needs {missing}, which is not installed: pip install 'orionlm[{extra}]'"
        raise MissingExtra(message) from None


def unknown_names(unknown: Iterable[str], known: Iterable[str]) -> str:
    """ "'hiden_size' (did you mean 'hidden_size'?), ..." for messages about misspelled keys."""
    known = list(known)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(hints)


def first_line(error: BaseException) -> str:
    """What an exception from a library says, cut to one line without its closing period (so that a message can go
    on after it), or its name when it says nothing."""
    return str(error).splitlines()[0].rstrip(". ") if str(error).strip() else type(error).__name__


def checker(error: type[OrionError]) -> Callable[[bool, str], None]:
    """need(ok, message), which raises error(message) unless ok: validate() methods state each rule in one line."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise error(message)

    return need


def read_json_object(path: Path, error: type[OrionError] = OrionError) -> dict[str, Any]:
    """A JSON file that must hold an object ({...}); invalid JSON or any other value is `error` naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object ({{...}}), not a {type(data).__name__}")
    return data
