"""Packing token shards into training batches: a weighted mixture, deterministic, resumable and rank-sliced.

Every source's token stream is cut into windows of seq_len + 1 tokens (inputs and their shifted targets); windows
step by seq_len, so every token is a target exactly once per epoch. The last `val_fraction` of each source's windows
is held out for validation. Training rows form one global sequence: row n comes from the source that is furthest
behind its weighted share after n rows, and a source's k-th row is window perm_e(k mod W) of its W windows, where
perm_e is a pseudo-random permutation for the source's epoch e = k // W (a fresh order each epoch, none repeated
within one). Everything is a function of the seed and the row index, so a micro-step of world_size * batch_size
rows is the same whatever the number of ranks, and the position is just the rows taken per source.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..tokenizer import Tokenizer
from .shards import TokenizedSource, tokenize_source
from .sources import DataError, SourceConfig

_FEISTEL_ROUNDS = 6


@dataclass
class DataConfig:
    """The training data: a weighted mixture of sources, packed into windows of seq_len + 1 tokens."""

    sources: list[SourceConfig]
    seq_len: int = 256
    val_fraction: float = 0.01  # the last fraction of every source's windows, held out for validation
    seed: int = 0  # the order of the windows
    cache_dir: str | None = None  # token shards; default $ORIONLM_CACHE/tokens or ~/.cache/orionlm/tokens
    # "text": documents, cut into windows; "chat": conversations for fine-tuning (see data/sft.py).
    # None: chat for the fine-tuning modes (sft, lora), text for pretraining.
    format: str | None = None
    train_on_all: bool = False  # chat: take the loss on every token, not only on the assistant's
    packing: bool | None = None  # chat: several conversations per row; None: when the model allows it

    def __post_init__(self) -> None:
        # Recipes give sources as mappings (or bare paths): make them SourceConfigs, checking their keys.
        self.sources = [_as_source(s) for s in self.sources]
        if not self.sources:
            raise DataError("data needs at least one source")
        names = [s.name for s in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise DataError(f"several data sources are named {duplicates}; give each a distinct `name`")
        if self.seq_len < 1:
            raise DataError(f"seq_len must be at least 1, got {self.seq_len}")
        if self.format not in (None, "text", "chat"):
            raise DataError(f"data.format must be 'text' or 'chat', got {self.format!r}")
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


def _as_source(source: SourceConfig | dict[str, Any] | str) -> SourceConfig:
    if isinstance(source, SourceConfig):
        return source
    if isinstance(source, str):
        return SourceConfig(path=source)
    if isinstance(source, dict):
        return SourceConfig.from_dict(source)
    raise DataError(f"a data source is a mapping with a `path`, got {source!r}")


def build_dataset(config: DataConfig, tokenizer: Tokenizer, progress: bool = True) -> MixtureDataset:
    """Tokenize every source (or take it from the cache) and lay out its training and validation windows."""
    shards = [tokenize_source(s, tokenizer, config.cache_dir, progress) for s in config.sources]
    return MixtureDataset(shards, config)


@dataclass
class _Layout:
    """Where a source's windows lie in its token stream."""

    train_windows: int  # windows [i*T, i*T + T + 1) for i < train_windows
    val_windows: int
    val_start: int  # validation windows [val_start + j*T, val_start + j*T + T + 1); no token shared with training


def _layout(shard: TokenizedSource, seq_len: int, val_fraction: float) -> _Layout:
    n, t = shard.num_tokens, seq_len
    # At least one validation window per source, so every source's validation loss can be measured.
    val_windows = max(1, math.ceil(val_fraction * ((n - 1) // t))) if val_fraction > 0 else 0
    val_start = n - (val_windows * t + 1) if val_windows else n
    train_windows = (val_start - 1) // t if val_start > 0 else 0
    if train_windows < 1:
        needed = t + 1 + (val_windows * t + 1 if val_windows else 0)
        raise DataError(
            f"source {shard.name!r} ({shard.config.path}) has {n} tokens, too few for one training window of "
            f"seq_len + 1 = {t + 1} tokens{' plus validation' if val_windows else ''} (needs {needed}); "
            "add data, lower seq_len or lower val_fraction"
        )
    return _Layout(train_windows, val_windows, val_start)


class MixtureDataset:
    """The tokenized sources of a DataConfig, with their windows; hands out training loaders and validation batches."""

    def __init__(self, shards: list[TokenizedSource], config: DataConfig) -> None:
        self.shards = shards
        self.config = config
        self.seq_len = config.seq_len
        self.seed = config.seed
        total = sum(s.config.weight for s in shards)
        self.weights = [s.config.weight / total for s in shards]
        self.layouts = [_layout(s, config.seq_len, config.val_fraction) for s in shards]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.shards]

    @property
    def train_windows(self) -> list[int]:
        """Training windows per source: the rows a TrainLoader draws from."""
        return [layout.train_windows for layout in self.layouts]

    def train_batch(self, sources: list[int], windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of training window windows[j] of source sources[j], one row each."""
        return self._batch([(i, w * self.seq_len) for i, w in zip(sources, windows, strict=True)])

    @property
    def num_train_tokens(self) -> int:
        """Target tokens in one pass over every source's training windows."""
        return sum(layout.train_windows for layout in self.layouts) * self.seq_len

    def unigram_entropy(self, vocab_size: int, max_tokens: int = 1 << 25) -> float:
        """The entropy (nats/token) of the mixture's token frequencies (each source's, from its first max_tokens,
        weighted by its share): the loss of the best model that ignores context. A model below it has learned
        from context."""
        mixed = np.zeros(vocab_size)
        for shard, weight in zip(self.shards, self.weights, strict=True):
            tokens = shard.tokens[:max_tokens]
            counts = np.zeros(vocab_size)
            for start in range(0, len(tokens), 1 << 22):  # in pieces: bincount copies its input to int64
                counts += np.bincount(tokens[start : start + (1 << 22)], minlength=vocab_size)
            mixed += weight * counts / max(len(tokens), 1)
        p = mixed[mixed > 0] / mixed.sum()
        return float(-(p * np.log(p)).sum())

    def stats(self) -> list[dict[str, Any]]:
        """Per source, for logging: weight, tokens and documents on disk, training and validation windows."""
        return [
            {
                "name": shard.name,
                "path": shard.config.path,
                "weight": weight,
                "tokens": shard.num_tokens,
                "documents": shard.num_documents,
                "train_windows": layout.train_windows,
                "val_windows": layout.val_windows,
                "dtype": shard.tokens.dtype.name,
                "cache": str(shard.directory),
            }
            for shard, weight, layout in zip(self.shards, self.weights, self.layouts, strict=True)
        ]

    def train_loader(self, batch_size: int, rank: int = 0, world_size: int = 1) -> TrainLoader:
        """Batches of batch_size rows for this rank; a micro-step takes world_size * batch_size rows in all."""
        return TrainLoader(self, batch_size, rank, world_size)

    def val_batches(
        self, batch_size: int, max_batches: int | None = None, source: str | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation windows of every source (or of one), always in the same order (shuffled once, so that
        the first max_batches are a fair sample); the last batch may be smaller."""
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        chosen = list(range(len(self.shards))) if source is None else [self._source_index(source)]
        counts = np.array([self.layouts[i].val_windows for i in chosen], dtype=np.int64)
        ends = np.cumsum(counts)  # validation window k is in chosen[searchsorted(ends, k, "right")]
        total = int(ends[-1])
        batches = math.ceil(total / batch_size)
        return self._val_batches(
            chosen, counts, ends, batch_size, batches if max_batches is None else min(batches, max_batches)
        )

    def _val_batches(
        self, chosen: list[int], counts: np.ndarray, ends: np.ndarray, batch_size: int, batches: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        total = int(ends[-1])
        for b in range(batches):
            k = feistel_permute(np.arange(b * batch_size, min((b + 1) * batch_size, total)), total, stable_key("val"))
            which = np.searchsorted(ends, k, side="right")
            j = k - (ends[which] - counts[which])
            sources = [chosen[w] for w in which]
            yield self._batch(
                [(i, self.layouts[i].val_start + int(jj) * self.seq_len) for i, jj in zip(sources, j, strict=True)]
            )

    def _source_index(self, name: str) -> int:
        if name not in self.names:
            raise DataError(f"no data source named {name!r}; the sources are {self.names}")
        return self.names.index(name)

    def _batch(self, rows: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each (B, T) int64, from (source, first token) pairs."""
        window = self.seq_len + 1
        out = np.empty((len(rows), window), dtype=np.int64)
        for row, (i, start) in enumerate(rows):
            out[row] = self.shards[i].tokens[start : start + window]
        x = torch.from_numpy(out)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def fingerprint(self) -> dict[str, Any]:
        """What a saved data position is only valid for."""
        return {
            "sources": self.names,
            "weights": self.weights,
            "train_windows": [layout.train_windows for layout in self.layouts],
            "seq_len": self.seq_len,
            "seed": self.seed,
        }


class TrainLoader:
    """An endless iterator of (inputs, targets), each (batch_size, seq_len) int64, for one rank (of any
    dataset with names, weights, seed, seq_len, train_windows, train_batch and fingerprint: also chat data).

    Concatenating the batches of ranks 0..world_size-1 gives exactly the batch of a world_size=1 loader with
    batch_size * world_size rows: the trainer's DDP run sees the same data as a single process."""

    def __init__(self, dataset: MixtureDataset, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.dataset = dataset
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.taken = [0] * len(dataset.names)  # training rows taken from each source by all ranks together

    @property
    def rows(self) -> int:
        """Global rows consumed so far (all ranks)."""
        return sum(self.taken)

    @property
    def tokens_per_step(self) -> int:
        """Target tokens in one global micro-step."""
        return self.batch_size * self.world_size * self.dataset.seq_len

    def epochs(self) -> dict[str, float]:
        """Passes made over each source's training windows."""
        windows = self.dataset.train_windows
        return {name: taken / w for name, taken, w in zip(self.dataset.names, self.taken, windows, strict=True)}

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Any:
        # Every rank walks the whole global micro-step, so that all keep the same position, and reads its slice.
        sources, indices = self._draw(self.batch_size * self.world_size)
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return self._rows(sources[mine], indices[mine])

    def _draw(self, rows: int) -> tuple[list[int], list[int]]:
        """The next `rows` global rows: each one's source and its index among that source's rows."""
        weights = self.dataset.weights
        taken = self.taken
        n = sum(taken)
        sources, indices = [], []
        for _ in range(rows):
            n += 1
            # The source furthest below its share of the first n rows: after any n rows, every source has within
            # about one row of weight * n, with no randomness to drift away from the weights.
            i = max(range(len(weights)), key=lambda j: n * weights[j] - taken[j])
            sources.append(i)
            indices.append(taken[i])
            taken[i] += 1
        return sources, indices

    def _rows(self, sources: list[int], indices: list[int]) -> Any:
        dataset = self.dataset
        windows_of = np.empty(len(sources), dtype=np.int64)
        source_array, index_array = np.asarray(sources), np.asarray(indices, dtype=np.int64)
        for i in set(sources):
            windows = dataset.train_windows[i]
            for epoch in set(index_array[source_array == i] // windows):
                mask = (source_array == i) & (index_array // windows == epoch)
                key = stable_key(dataset.seed, dataset.names[i], int(epoch))
                windows_of[mask] = feistel_permute(index_array[mask] % windows, windows, key)
        return dataset.train_batch(sources, windows_of.tolist())

    def state_dict(self) -> dict[str, Any]:
        """The data position (identical on every rank): rows taken per source, with what they refer to."""
        return {"taken": dict(zip(self.dataset.names, self.taken, strict=True)), "data": self.dataset.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self.dataset.fingerprint()
        saved = state.get("data", {})
        changed = [key for key in expected if saved.get(key) != expected[key]]
        if changed:
            raise DataError(
                f"the saved data position belongs to different data ({', '.join(changed)} changed); "
                "resume with the same data sources, weights, seq_len, val_fraction and seed"
            )
        self.taken = [int(state["taken"][name]) for name in self.dataset.names]


def stable_key(*parts: object) -> int:
    """A 64-bit key from values, stable across processes, platforms and Python versions (unlike hash())."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a fast, well-mixing bijection of uint64."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permute(index: np.ndarray, n: int, key: int) -> np.ndarray:
    """perm(index) for a pseudo-random permutation perm of [0, n) chosen by key, in O(1) memory per element.

    A balanced Feistel network is a bijection of [0, 2**bits) for any round function; "cycle walking"
    (re-encrypting values that land in [n, 2**bits)) turns it into a bijection of [0, n). So a source of 10**9
    windows needs no 8 GB permutation table, and any row's window is computed directly from its index."""
    bits = max(2, (n - 1).bit_length())
    bits += bits % 2
    half = np.uint64(bits // 2)
    mask = np.uint64((1 << (bits // 2)) - 1)
    round_keys = [np.uint64(stable_key(key, r)) for r in range(_FEISTEL_ROUNDS)]

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> half, x & mask
        for round_key in round_keys:
            left, right = right, left ^ (_mix64(right ^ round_key) & mask)
        return (left << half) | right

    with np.errstate(over="ignore"):  # the multiplications are meant to wrap around modulo 2**64
        out = encrypt(np.atleast_1d(np.asarray(index, dtype=np.uint64)))
        outside = out >= np.uint64(n)
        while outside.any():
            out[outside] = encrypt(out[outside])
            outside = out >= np.uint64(n)
    return out.astype(np.int64)
