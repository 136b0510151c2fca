"""Preference pairs for DPO: a prompt with a chosen and a rejected response, rendered with the chat template.

Formats (one JSON object per line, or a Hugging Face dataset's rows):
- explicit prompt: {"prompt": ..., "chosen": ..., "rejected": ...}; each is text (the prompt a user turn, a
  response an assistant turn) or a list of messages (the responses assistant turns only);
- two conversations sharing a prefix: {"chosen": ..., "rejected": ...} without a prompt, each a list of messages
  or Anthropic HH text ("\\n\\nHuman: ... \\n\\nAssistant: ..."); each is split at its last assistant turn into
  the prompt (the turns before, which must be the same in both) and the response;
- messages plus a rejected reply: {"messages": [..., last assistant turn = chosen], "rejected": "..."}
  (../shared/data/sft/hh_rlhf_*_messages.jsonl.gz).

Each response is tokenized after its prompt as chat.tokenize_chat does (the template's text, piece by piece), with
labels on the response's tokens only: the prompt's turns, earlier assistant turns included, have none. A pair's
two sequences stay together: packed, they are two documents of one row (chosen, then rejected), and a longer
pair than seq_len is cut (its longer sequence first) to fit; padded, they are two consecutive rows, each cut at
seq_len + 1 tokens. A pair whose chosen or rejected sequence keeps no response token is dropped. Batches carry
`sequence_ids` (B, T): which sequence of the batch a token belongs to, 2k the chosen and 2k + 1 the rejected
response of the batch's pair k, -1 on padding.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..tokenizer import Tokenizer
from .chat import IGNORE, ChatDataError, to_messages, tokenize_chat
from .loader import DataConfig, feistel_permute, stable_key
from .sft import PAD_DOCUMENT, ChatDataset, ChatSource, read_chat_source, split_rows
from .sources import DataError, SourceConfig

Messages = list[dict[str, str]]
HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Pair:
    prompt: Messages
    chosen: Messages  # assistant turns
    rejected: Messages


def parse_hh(text: str, where: str) -> Messages:
    """An Anthropic HH dialogue ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages, text unchanged."""
    parts = HH_TURN.split(text)
    if parts[0] or len(parts) < 3:
        raise ChatDataError(f'{where}: HH text must start with "\\n\\nHuman: " or "\\n\\nAssistant: ", got '
                            f"{text[:40]!r}")  # fmt: skip
    turns = zip(parts[1::2], parts[2::2], strict=True)
    return [{"role": HH_ROLES[speaker], "content": content} for speaker, content in turns]


def _messages(value: Any, where: str) -> Messages:
    """A list of messages, checked as chat rows are (roles, text content)."""
    if not isinstance(value, list):
        raise ChatDataError(f"{where}: expected text or a list of messages, got {type(value).__name__}")
    for message in value:
        if (
            not isinstance(message, dict)
            or message.get("role") not in ("system", "user", "assistant")
            or not (isinstance(message.get("content"), str))
        ):
            raise ChatDataError(f"{where}: each message needs a role (system, user, assistant) and text content, "
                                f"got {message!r}")  # fmt: skip
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _response(value: Any, where: str) -> Messages:
    """A response: text (one assistant turn) or assistant messages."""
    messages = [{"role": "assistant", "content": value}] if isinstance(value, str) else _messages(value, where)
    if not messages or any(m["role"] != "assistant" for m in messages):
        raise ChatDataError(f"{where}: a response must be text or assistant messages, got {value!r:.80}")
    return messages


def _split_last_turn(conversation: Messages, where: str) -> tuple[Messages, Messages]:
    """(the turns before the last assistant turn, that turn): a conversation ending in its response."""
    if not conversation or conversation[-1]["role"] != "assistant":
        raise ChatDataError(f"{where}: the conversation must end with an assistant turn (the response)")
    return conversation[:-1], conversation[-1:]


def to_pair(record: dict[str, Any], where: str) -> Pair:
    """A record in any supported format (module docstring) as a Pair."""
    if "messages" in record and "rejected" in record:
        prompt, chosen = _split_last_turn(to_messages({"messages": record["messages"]}, where), where)
        return Pair(prompt, chosen, _response(record["rejected"], f"{where} rejected"))
    if "chosen" not in record or "rejected" not in record:
        raise ChatDataError(f"{where}: not a preference pair: expected 'chosen' and 'rejected' (with or without "
                            f"'prompt'), or 'messages' and 'rejected'; got keys {sorted(record)}")  # fmt: skip
    if "prompt" in record:
        value = record["prompt"]
        prompt = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, where)
        return Pair(prompt, _response(record["chosen"], f"{where} chosen"),
                    _response(record["rejected"], f"{where} rejected"))  # fmt: skip
    sides = []
    for side in ("chosen", "rejected"):
        value = record[side]
        conversation = parse_hh(value, f"{where} {side}") if isinstance(value, str) else _messages(value, where)
        sides.append(_split_last_turn(conversation, f"{where} {side}"))
    (prompt, chosen), (other, rejected) = sides
    if prompt != other:
        raise ChatDataError(f"{where}: 'chosen' and 'rejected' differ before their last assistant turn; give the "
                            "shared turns as 'prompt'")  # fmt: skip
    return Pair(prompt, chosen, rejected)


Example = tuple[list[int], list[int]]


def tokenize_pair(tokenizer: Tokenizer, pair: Pair) -> tuple[Example, Example]:
    """(ids, labels) of the chosen and of the rejected conversation: labels on the response only."""
    start = len(pair.prompt)
    chosen = tokenize_chat(tokenizer, pair.prompt + pair.chosen, train_from=start)
    rejected = tokenize_chat(tokenizer, pair.prompt + pair.rejected, train_from=start)
    return chosen, rejected


def fit_pair(pair: tuple[Example, Example], seq_len: int, packed: bool) -> tuple[tuple[Example, Example], bool]:
    """The pair cut to its rows (padded: each sequence to seq_len + 1 tokens; packed: both together to seq_len
    (input, target) pairs, the shorter keeping up to half and the longer the rest), and whether it was cut."""
    lengths = [len(ids) - 1 for ids, _ in pair]
    if not packed:
        keep = [min(n, seq_len) for n in lengths]
    elif sum(lengths) > seq_len:
        short = min(min(lengths), seq_len // 2)
        keep = [short, seq_len - short] if lengths[0] <= lengths[1] else [seq_len - short, short]
    else:
        keep = lengths
    cut = tuple((ids[: k + 1], labels[: k + 1]) for (ids, labels), k in zip(pair, keep, strict=True))
    return cut, keep != lengths


def build_preference_source(
    source: SourceConfig, tokenizer: Tokenizer, config: DataConfig, packed: bool, progress: bool
) -> ChatSource:
    """A source's pairs as rows, shuffled once by the data seed, the last val_fraction of them held out."""
    pairs = read_chat_source(source, to_pair)
    if not pairs:
        raise DataError(f"source {source.name!r} ({source.path}) holds no preference pairs")
    n = len(pairs)
    order = feistel_permute(np.arange(n), n, stable_key(config.seed, source.name, "preference"))
    examples: list[Example] = []
    truncated = dropped = 0
    for k in tqdm(order.tolist(), desc=f"tokenizing {source.name}", unit="pair", disable=not progress):
        pair, cut = fit_pair(tokenize_pair(tokenizer, pairs[k]), config.seq_len, packed)
        truncated += cut
        if any(all(label == IGNORE for label in labels[1:]) for _, labels in pair):
            dropped += 1
            continue
        examples += pair
    train, val = split_rows(examples, source, config, tokenizer, packed, lambda held: (
        f"no pair left to train on ({n} read, {dropped} with no response token within seq_len, {held} held out); "
        "raise seq_len or add data"), together=2)  # fmt: skip
    return ChatSource(source.name, source, train, val, n, truncated, dropped)


class PreferenceDataset(ChatDataset):
    """The pairs of every source as rows (see ChatDataset); a loader's unit is a row of whole pairs (packed) or
    one pair's two rows (padded), so a batch of batch_size units always holds both sides of its pairs."""

    @property
    def rows_per_unit(self) -> int:
        return 1 if self.packed else 2

    @property
    def train_windows(self) -> list[int]:
        return [len(s.train) // self.rows_per_unit for s in self.sources]

    def stats(self) -> list[dict[str, Any]]:
        stats = super().stats()
        for entry in stats:
            entry["pairs"] = entry.pop("conversations")
        return stats

    def train_batch(self, sources: list[int], units: list[int]) -> dict[str, torch.Tensor]:
        return self._batch(self._unit_rows([(self.sources[i].train, u) for i, u in zip(sources, units, strict=True)]))

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Every source's validation pairs in a fixed order, batch_size units a batch; the last may be smaller."""
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        units = [(s.val, u) for s in self.sources for u in range(len(s.val) // self.rows_per_unit)]
        for b, start in enumerate(range(0, len(units), batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            yield self._batch(self._unit_rows(units[start : start + batch_size]))

    def _unit_rows(self, units: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
        return [(rows, unit * self.rows_per_unit + j) for rows, unit in units for j in range(self.rows_per_unit)]

    def _batch(self, picks: list[tuple[Any, int]]) -> dict[str, torch.Tensor]:
        """The model's keyword arguments plus sequence_ids: a row's documents numbered on from the rows before."""
        arrays = self._arrays(picks)
        documents = arrays["document_ids"]
        before = np.concatenate([[0], np.cumsum(documents.max(axis=1) + 1)[:-1]])
        arrays["sequence_ids"] = np.where(documents == PAD_DOCUMENT, -1, documents + before[:, None])
        if not self.packed:
            del arrays["document_ids"]
        return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}


def build_preference_dataset(
    config: DataConfig, tokenizer: Tokenizer, packed: bool, progress: bool = True
) -> PreferenceDataset:
    """Read and tokenize every source's preference pairs and lay out their rows."""
    sources = [build_preference_source(s, tokenizer, config, packed, progress) for s in config.sources]
    return PreferenceDataset(sources, config, packed)
