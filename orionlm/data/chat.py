"""Chat data for supervised fine-tuning: conversations in the common formats, rendered with the model's chat
template, tokenized with a loss mask that keeps only the assistant's turns.

Formats (one JSON object per line):
- messages: {"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}
- ShareGPT: {"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]}
- Alpaca: {"instruction": ..., "input": ... (optional), "output": ..., "system": ... (optional)}

The mask does not depend on the template's wording: the conversation is rendered turn by turn, and the
text each assistant turn adds after the generation prompt (its content and end-of-turn marker) is what
the model learns to produce; everything else (system, user turns, role headers) has label -100.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ..errors import OrionError
from ..tokenizer import Tokenizer

IGNORE = -100
ROLES = ("system", "user", "assistant")
T = TypeVar("T")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class ChatDataError(OrionError):
    """A conversation that cannot be used; the message names the file and line."""


def to_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """A record in any supported format as a list of {"role", "content"} messages."""
    if "messages" in record:
        messages = [{"role": m.get("role"), "content": m.get("content")} for m in record["messages"]]
    elif "conversations" in record:
        messages = []
        for turn in record["conversations"]:
            role = SHAREGPT_ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise ChatDataError(
                    f"{where}: ShareGPT speaker {turn.get('from')!r} is not one of {sorted(SHAREGPT_ROLES)}"
                )
            messages.append({"role": role, "content": turn.get("value")})
    elif "instruction" in record and "output" in record:
        prompt = str(record["instruction"])
        if record.get("input"):
            prompt += f"\n\n{record['input']}"
        messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise ChatDataError(f"{where}: not a conversation: expected 'messages', 'conversations' (ShareGPT) or "
                            f"'instruction' + 'output' (Alpaca), got keys {sorted(record)}")  # fmt: skip
    for message in messages:
        if message["role"] not in ROLES or not isinstance(message["content"], str):
            raise ChatDataError(f"{where}: each message needs a role in {ROLES} and text content, got {message}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where}: the conversation has no assistant turn to learn from")
    return messages


def tokenize_chat(
    tokenizer: Tokenizer, messages: list[dict[str, str]], train_on_all: bool = False, train_from: int = 0
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a rendered conversation: labels are the ids on assistant turns from message
    `train_from` on (all of them with `train_on_all`) and -100 elsewhere."""
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            _extend(tokenizer, ids, labels, prompt[len(rendered) :], train=train_on_all)
            rendered = prompt
        text = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if not text.startswith(rendered):
            raise ChatDataError("the chat template renders a conversation differently from its beginning; "
                                "assistant-only loss needs a template that only appends turns")  # fmt: skip
        trained = train_on_all or (message["role"] == "assistant" and i >= train_from)
        _extend(tokenizer, ids, labels, text[len(rendered) :], train=trained)
        rendered = text
    return ids, labels


def _extend(tokenizer: Tokenizer, ids: list[int], labels: list[int], text: str, train: bool) -> None:
    new = tokenizer.encode(text, add_special_tokens=False) if text else []
    ids += new
    labels += new if train else [IGNORE] * len(new)


def read_conversations(path: Path, convert: Callable[[dict[str, Any], str], T] = to_messages) -> list[T]:
    """Every conversation of a JSONL file (gzipped if .gz), in any supported format: each record as `convert`
    (record, where) makes it (data.preference.to_pair reads preference pairs)."""
    import gzip

    from .sources import jsonl_records

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            return [convert(record, f"{path}:{number}") for number, record in jsonl_records(f, path, ChatDataError)]
    except OSError as e:
        raise ChatDataError(f"cannot read {path}: {e.strerror or e}") from None
