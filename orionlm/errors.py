"""The base of every error caused by user input: the CLI prints its message on one line and exits 2; and the helpers
that word such messages, Hugging Face Hub names and failures among them.

`ID@REV` picks a revision (a branch, a tag or a commit hash) wherever a Hub id is accepted: models on the command
line, in recipes, merge configs and adapter configs, `hf:NAME@REV` data sources, eval datasets. Hub repository
names cannot hold '@', so in a name that is no local path everything after the first '@' is the revision.
Credentials are huggingface_hub's own: orionlm passes no token, so HF_TOKEN, else the token `hf auth login` saved,
reaches every download (of `datasets` too)."""

import difflib
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
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


LOGIN = "log in with `hf auth login` or set HF_TOKEN"


def split_revision(name: str) -> tuple[str, str | None]:
    """(id, revision) of `ID@REV`; (name, None) for a name without '@' and for an existing local path (whose name
    may hold an '@')."""
    if "@" not in name or Path(name).expanduser().exists():
        return name, None
    repo, _, revision = name.partition("@")
    if not repo or not revision:
        raise OrionError(f"{name}: a Hub id with a revision is ID@REV, REV a branch, tag or commit")
    return repo, revision


def with_revision(name: str | None, revision: str | None) -> str | None:
    """`name` at --revision REV, as ID@REV; a revision without a name, for a local path, or for a name that has one
    is an error."""
    if revision is None:
        return name
    if name is None:
        raise OrionError(f"--revision {revision}: give the Hub id it applies to")
    if Path(name).expanduser().exists():
        raise OrionError(f"--revision {revision}: {name} is a local path, and a revision applies to Hub ids only")
    if split_revision(name)[1] is not None:
        raise OrionError(f"{name} names its revision already; leave out --revision {revision}")
    return f"{name}@{revision}"


def not_here_nor_on_hub(name: str, kind: str, error: BaseException, otherwise: str = "") -> str:
    """The one line for a name that is no local path and that the Hugging Face Hub did not give either (offline,
    unknown, gated, no such revision): `runs/stories` may be a mistyped path as well as an id, so the line says
    both, and what to do where the Hub said why; `otherwise` follows a failure it did not explain."""
    offline = " (offline mode is on)" if _offline() else ""
    reason = hub_advice(error, split_revision(name)[1]) or first_line(error) + otherwise
    return f"{name}: not found locally, and as a Hub {kind} it could not be downloaded{offline}: {reason}"


def hub_advice(error: BaseException, revision: str | None) -> str | None:
    """What to do about a Hub failure whose cause is known: a revision that does not exist (or, offline, is not
    in the cache), a gated or private repository."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    http = next((e for e in _causes(error) if isinstance(e, HfHubHTTPError)), None)
    status = http.response.status_code if http is not None and http.response is not None else None
    if isinstance(http, RevisionNotFoundError):
        return f"it has no revision {revision or 'main'!r}; check the branch, tag or commit name"
    if isinstance(http, GatedRepoError):
        return f"it is gated: accept its terms on its Hub page, then {LOGIN}"
    if isinstance(http, RepositoryNotFoundError) or status in (401, 403):
        return f"no such repository, or a private one (HTTP {status}): check the id, or {LOGIN}"
    found = sys.modules.get("datasets.exceptions")  # `datasets` drops the Hub error it raises this one from
    if found is not None and isinstance(error, found.DatasetNotFoundError):
        return f"{first_line(error)}; check the name, or if it is gated or private, {LOGIN}"
    if revision is not None and _offline():
        return f"no snapshot of revision {revision!r} is in the Hub cache; check the id and revision, or go online"
    return None


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and those it was raised from: libraries wrap the Hub's HTTP errors in their own."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _offline() -> bool:
    """Whether HF_HUB_OFFLINE is on, read as huggingface_hub reads it."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
