"""Chat data for supervised fine-tuning, laid out as training rows.

Each conversation is tokenized with its loss mask (chat.tokenize_chat) and becomes one example of
len(ids) - 1 (input, target) pairs: targets never cross from one conversation into the next. Examples
are then laid out in rows of seq_len pairs, either

- packed: several conversations per row, each with its own document id (the model's attention stays
  inside a document) and positions that restart at 0, so a packed row computes exactly what each
  conversation alone would; or
- padded: one conversation per row. Models whose recurrent layers (Gated DeltaNet) carry a state along
  the whole row need this; the padding sits at the end, where causal layers never look back at it.

A conversation longer than seq_len + 1 tokens is cut at the end. Every source's conversations are
shuffled once (by the data seed) before the last val_fraction of them is held out, so validation
conversations are never trained on. Training rows are drawn by a TrainLoader, like pretraining windows:
a weighted mixture over sources, a fresh order every epoch, resumable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..tokenizer import Tokenizer
from .chat import IGNORE, T, read_conversations, to_messages, tokenize_chat
from .loader import DataConfig, TrainLoader, feistel_permute, stable_key
from .sources import DataError, SourceConfig, load_hf_dataset, source_files

PAD_DOCUMENT = -1  # the document id of padding: its own document, so padding never reaches a real token


@dataclass
class Rows:
    """Examples laid out in rows of seq_len (input, target) pairs, all (R, seq_len) int64."""

    input_ids: np.ndarray
    targets: np.ndarray  # IGNORE where no loss is taken (user turns, padding)
    position_ids: np.ndarray  # restart at 0 with each conversation
    document_ids: np.ndarray  # which conversation of the row; PAD_DOCUMENT on padding

    def __len__(self) -> int:
        return len(self.input_ids)


FIELDS = ("input_ids", "targets", "position_ids", "document_ids")


def layout_rows(
    examples: list[tuple[list[int], list[int]]], seq_len: int, packed: bool, pad_id: int, together: int = 1
) -> Rows:
    """Examples (ids, labels), each at most seq_len + 1 tokens, in order: packed greedily (a row is closed
    when the next example does not fit) or one per row. Packed, each run of `together` consecutive examples
    (a preference pair: 2) shares a row; their pairs must add up to at most seq_len."""
    placed: list[list[tuple[list[int], list[int]]]] = []
    free = 0
    for start in range(0, len(examples), together):
        group = examples[start : start + together]
        pairs = sum(len(ids) - 1 for ids, _ in group)
        if packed and pairs > free:
            placed.append([])
            free = seq_len
        for example in group:
            if not packed:
                placed.append([])
            placed[-1].append(example)
        free -= pairs
    shape = (len(placed), seq_len)
    rows = Rows(
        input_ids=np.full(shape, pad_id, dtype=np.int64),
        targets=np.full(shape, IGNORE, dtype=np.int64),
        position_ids=np.zeros(shape, dtype=np.int64),
        document_ids=np.full(shape, PAD_DOCUMENT, dtype=np.int64),
    )
    for r, row in enumerate(placed):
        start = 0
        for d, (ids, labels) in enumerate(row):
            n = len(ids) - 1
            rows.input_ids[r, start : start + n] = ids[:-1]
            rows.targets[r, start : start + n] = labels[1:]
            rows.position_ids[r, start : start + n] = np.arange(n)
            rows.document_ids[r, start : start + n] = d
            start += n
    return rows


@dataclass
class ChatSource:
    """One chat source's conversations as training and validation rows, with what happened to them."""

    name: str
    config: SourceConfig
    train: Rows
    val: Rows
    conversations: int
    truncated: int  # conversations cut at seq_len + 1 tokens
    dropped: int  # conversations left with no target to learn after the cut

    def stats(self, weight: float) -> dict[str, Any]:
        real = int((self.train.document_ids != PAD_DOCUMENT).sum())
        return {
            "name": self.name,
            "path": self.config.path,
            "weight": weight,
            "conversations": self.conversations,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "train_rows": len(self.train),
            "val_rows": len(self.val),
            "train_tokens": real,
            "trained_tokens": int((self.train.targets != IGNORE).sum()),
            "fill": real / max(self.train.document_ids.size, 1),  # the share of row slots holding a real token
        }


def read_chat_source(source: SourceConfig, convert: Callable[[dict[str, Any], str], T] = to_messages) -> list[T]:
    """Every conversation of a source: JSONL files (gzipped or not) or a Hugging Face dataset, each record as
    `convert` (record, where) makes it."""
    if source.is_hf:
        rows = enumerate(load_hf_dataset(source))
        return [convert(dict(row), f"dataset {source.hf_name!r} row {i}") for i, row in rows]
    conversations = []
    for path in source_files(source):
        conversations += read_conversations(Path(path), convert)
    return conversations


def build_chat_source(
    source: SourceConfig, tokenizer: Tokenizer, config: DataConfig, packed: bool, progress: bool
) -> ChatSource:
    conversations = read_chat_source(source)
    if not conversations:
        raise DataError(f"source {source.name!r} ({source.path}) holds no conversations")
    n = len(conversations)
    order = feistel_permute(np.arange(n), n, stable_key(config.seed, source.name, "chat"))
    examples, truncated, dropped = [], 0, 0
    limit = config.seq_len + 1
    for k in tqdm(order.tolist(), desc=f"tokenizing {source.name}", unit="conv", disable=not progress):
        ids, labels = tokenize_chat(tokenizer, conversations[k], train_on_all=config.train_on_all)
        if len(ids) > limit:
            ids, labels = ids[:limit], labels[:limit]
            truncated += 1
        if all(label == IGNORE for label in labels[1:]):
            dropped += 1
            continue
        examples.append((ids, labels))
    train, val = split_rows(examples, source, config, tokenizer, packed, lambda held: (
        f"no conversation left to train on ({len(conversations)} read, {dropped} with no assistant token within "
        f"seq_len + 1 = {limit} tokens, {held} held out); raise seq_len or add data"))  # fmt: skip
    return ChatSource(source.name, source, train, val, len(conversations), truncated, dropped)


def split_rows(
    examples: list[tuple[list[int], list[int]]],
    source: SourceConfig,
    config: DataConfig,
    tokenizer: Tokenizer,
    packed: bool,
    nothing_left: Callable[[int], str],
    together: int = 1,
) -> tuple[Rows, Rows]:
    """Training and validation rows of a source's examples (shuffled already): the last val_fraction of them (of
    their groups of `together`, see layout_rows) held out. With nothing left to train on, a DataError says
    nothing_left(the number held out)."""
    groups = len(examples) // together
    held = math.ceil(config.val_fraction * groups) if config.val_fraction > 0 else 0
    if groups - held < 1:
        raise DataError(f"source {source.name!r}: {nothing_left(held)}")
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    cut = (groups - held) * together
    train = layout_rows(examples[:cut], config.seq_len, packed, pad, together)
    val = layout_rows(examples[cut:], config.seq_len, packed, pad, together)
    return train, val


class ChatDataset:
    """The chat sources of a DataConfig as rows; hands out training loaders and validation batches, like
    MixtureDataset, whose batches are dicts of the model's keyword arguments."""

    def __init__(self, sources: list[ChatSource], config: DataConfig, packed: bool) -> None:
        self.sources = sources
        self.config = config
        self.packed = packed
        self.seq_len = config.seq_len
        self.seed = config.seed
        total = sum(s.config.weight for s in sources)
        self.weights = [s.config.weight / total for s in sources]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def train_windows(self) -> list[int]:
        return [len(s.train) for s in self.sources]

    def stats(self) -> list[dict[str, Any]]:
        return [s.stats(w) for s, w in zip(self.sources, self.weights, strict=True)]

    def train_loader(self, batch_size: int, rank: int = 0, world_size: int = 1) -> TrainLoader:
        return TrainLoader(self, batch_size, rank, world_size)

    def train_batch(self, sources: list[int], rows: list[int]) -> dict[str, torch.Tensor]:
        return self._batch([(self.sources[i].train, r) for i, r in zip(sources, rows, strict=True)])

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Every source's validation rows in a fixed order; the last batch may be smaller."""
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        picks = [(s.val, r) for s in self.sources for r in range(len(s.val))]
        batches = math.ceil(len(picks) / batch_size)
        for b in range(batches if max_batches is None else min(batches, max_batches)):
            yield self._batch(picks[b * batch_size : (b + 1) * batch_size])

    def _arrays(self, picks: list[tuple[Rows, int]]) -> dict[str, np.ndarray]:
        """These rows' fields, cut after the last column that holds a real token (padding past it would only cost
        compute)."""
        arrays = {name: np.stack([getattr(rows, name)[r] for rows, r in picks]) for name in FIELDS}
        width = int((arrays["document_ids"] != PAD_DOCUMENT).any(axis=0).nonzero()[0].max()) + 1
        return {name: a[:, :width] for name, a in arrays.items()}

    def _batch(self, picks: list[tuple[Rows, int]]) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for these rows (document_ids when packed)."""
        arrays = self._arrays(picks)
        if not self.packed:
            del arrays["document_ids"]
        return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}

    def fingerprint(self) -> dict[str, Any]:
        return {
            "sources": self.names,
            "weights": self.weights,
            "train_rows": self.train_windows,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "packed": self.packed,
        }


def build_chat_dataset(config: DataConfig, tokenizer: Tokenizer, packed: bool, progress: bool = True) -> ChatDataset:
    """Read and tokenize every chat source and lay out its rows."""
    sources = [build_chat_source(s, tokenizer, config, packed, progress) for s in config.sources]
    return ChatDataset(sources, config, packed)
