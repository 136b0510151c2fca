"""The base of every error caused by user input: the CLI prints its message on one line and exits 2."""

import difflib
from collections.abc import Callable, Iterable


class OrionError(ValueError):
    """A mistake the user can fix: a bad config, a missing or corrupt file, an invalid argument."""


def unknown_names(unknown: Iterable[str], known: Iterable[str]) -> str:
    """ "'hiden_size' (did you mean 'hidden_size'?), ..." for messages about misspelled keys."""
    known = list(known)
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ", ".join(hints)


def checker(error: type[OrionError]) -> Callable[[bool, str], None]:
    """need(ok, message), which raises error(message) unless ok: validate() methods state each rule in one line."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise error(message)

    return need
