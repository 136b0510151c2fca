"""The inference caches: what a model keeps between forward passes to continue its sequences.

KVCache holds every attention layer's keys and values for a batch whose rows share one length (left-padded
prompts); HybridCache adds a GDNState per Gated DeltaNet layer (Chimera: one of each per virtual layer, so
a looped block keeps one per loop); RaggedCache holds a continuously batched set of sequences, each row at
its own length; PositionStreams keeps a GDN state per position for Quiet-STaR's parallel thoughts. KVCache,
HybridCache and RaggedCache can `mark` where they stand and `rewind` there (generation with thoughts).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..config import ModelConfig


class KVCache:
    """Keys and values for every layer, preallocated to `capacity` positions.

    All rows of a batch share one write position (batched prompts are left-padded), so the
    cache is a pair of (B, kv_heads, capacity, head_dim) tensors per layer and one length.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, capacity: int, device, dtype, num_layers: int | None = None
    ) -> None:
        """`num_layers` slots (default config.num_layers): one per attention layer that runs."""
        shape = (batch_size, config.num_kv_heads, capacity, config.head_dim)
        slots = config.num_layers if num_layers is None else num_layers
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(slots)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(slots)]
        self.capacity = capacity
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kv_heads, T, D) after the cached positions; return all keys and values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; {end} were asked for")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens

    def mark(self) -> Any:
        """Where the cache stands now; `rewind(mark)` forgets every token fed after it (a thought)."""
        return self.length

    def rewind(self, mark: Any) -> None:
        self.length = mark  # the slots after it are written over by the next tokens

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (used when finished sequences leave a batch)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]


@dataclass
class GDNState:
    """The decode cache of one GatedDeltaNet layer (one per loop of a looped block): enough to continue
    a sequence at O(1) cost per token. `forward` replaces the tensors with the updated ones."""

    conv: torch.Tensor | None  # (B, 2 key_dim + value_dim, kernel - 1) last q|k|v conv inputs; None without convs
    recurrent: torch.Tensor  # (B, heads, d_k, d_v) float32

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the given batch rows (finished sequences leaving a batch)."""
        self.conv = None if self.conv is None else self.conv[rows]
        self.recurrent = self.recurrent[rows]


class HybridCache(KVCache):
    """A KV cache slot per virtual attention layer and a GDNState per virtual GDN layer."""

    def __init__(self, attention_slots: int, states: list[GDNState], config: ModelConfig, batch_size: int,
                 capacity: int, device, dtype) -> None:  # fmt: skip
        super().__init__(config, batch_size, capacity, device, dtype, num_layers=attention_slots)
        self.states = states

    def select(self, rows: torch.Tensor) -> None:
        super().select(rows)
        for state in self.states:
            state.select(rows)

    def mark(self) -> Any:
        # A GDN layer replaces its state's tensors rather than writing into them, so keeping them is enough.
        return self.length, [replace(s) for s in self.states]

    def rewind(self, mark: Any) -> None:
        self.length, self.states = mark[0], [replace(s) for s in mark[1]]


class RaggedCache:
    """The caches of a continuously batched set of sequences, each at its own length.

    Row b holds one sequence: its keys and values at slots 0..lengths[b]-1 (its positions; no padding)
    in every attention layer, and for a hybrid model its GDN states. Sequences join as single-row caches
    prefilled elsewhere (`add`) and leave from any row (`remove`: the last row moves into the hole, so
    the running rows stay the first `rows` of the preallocated tensors). Steps feed one token per row.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []  # per attention slot: (row capacity, kv_heads, capacity, D)
        self.values: list[torch.Tensor] = []
        self.states: list[GDNState] = []  # per GDN slot, `rows` rows
        self.lengths = torch.zeros(0, dtype=torch.long)  # (rows,) on the model's device
        self.sizes: list[int] = []  # the same, on the host: no device sync to read them
        self.rows = 0

    @property
    def length(self) -> int:
        """The longest row: the model reads this as the number of cached positions."""
        return max(self.sizes, default=0)

    @property
    def uniform(self) -> bool:
        """Every row at the same length (always so for one row): plain causal decoding, no mask needed."""
        return min(self.sizes, default=0) == self.length

    def add(self, cache: KVCache) -> int:
        """Append a one-row cache (a prefilled sequence) as the last row; returns its row."""
        n, length = self.rows, cache.length
        if not self.keys and cache.keys:  # the first sequence sets the shapes
            self.keys = [t.new_zeros(1, t.shape[1], length + 1, t.shape[3]) for t in cache.keys]
            self.values = [t.new_zeros(1, t.shape[1], length + 1, t.shape[3]) for t in cache.values]
            self.lengths = self.lengths.to(cache.keys[0].device)
        elif not self.keys and cache.states:  # a model with no attention layer
            self.lengths = self.lengths.to(cache.states[0].recurrent.device)
        if self.keys:
            self._reserve(n + 1, length + 1)
            for mine, theirs in zip(self.keys + self.values, cache.keys + cache.values, strict=True):
                mine[n, :, :length] = theirs[0, :, :length]
        states = getattr(cache, "states", [])
        if n == 0:
            self.states = [GDNState(s.conv, s.recurrent) for s in states]
        else:
            for mine, theirs in zip(self.states, states, strict=True):
                mine.conv = None if mine.conv is None else torch.cat([mine.conv, theirs.conv])
                mine.recurrent = torch.cat([mine.recurrent, theirs.recurrent])
        self.lengths = torch.cat([self.lengths, self.lengths.new_tensor([length])])
        self.sizes.append(length)
        self.rows += 1
        return n

    def remove(self, row: int) -> None:
        """Drop a row; the last row takes its place (callers track rows by the same rule)."""
        last = self.rows - 1
        order = list(range(self.rows))
        order[row] = last
        order.pop()
        if row != last:
            for t in self.keys + self.values:
                t[row, :, : self.sizes[last]] = t[last, :, : self.sizes[last]]
        index = torch.tensor(order, dtype=torch.long, device=self.lengths.device)
        for state in self.states:
            state.select(index)
        self.lengths = self.lengths[index]
        self.sizes = [self.sizes[i] for i in order]
        self.rows = last

    def _reserve(self, rows: int, capacity: int) -> None:
        """Grow the preallocated tensors (doubling) to hold `rows` rows of `capacity` positions."""
        have_rows, have_capacity = self.keys[0].shape[0], self.keys[0].shape[2]
        if rows <= have_rows and capacity <= have_capacity:
            return
        new_rows, new_capacity = max(rows, have_rows), max(capacity, have_capacity)
        if rows > have_rows:
            new_rows = max(rows, 2 * have_rows)
        if capacity > have_capacity:
            new_capacity = max(capacity, 2 * have_capacity)
        for tensors in (self.keys, self.values):
            for i, t in enumerate(tensors):
                grown = t.new_zeros(new_rows, t.shape[1], new_capacity, t.shape[3])
                grown[:have_rows, :, :have_capacity] = t
                tensors[i] = grown

    def reserve_step(self) -> None:
        """Make room for one more position in every row (before a step)."""
        if self.keys:
            self._reserve(self.rows, self.length + 1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new k, v (rows, kv_heads, 1, D) at its own length; return the keys and values of
        slots 0..longest (the mask hides each row's slots past its own)."""
        if k.shape[2] != 1:
            raise ValueError("a ragged cache takes one token per row and step; prefill sequences on their own")
        end = self.length + 1
        if self.uniform:
            self.keys[layer][: self.rows, :, end - 1 : end] = k
            self.values[layer][: self.rows, :, end - 1 : end] = v
        else:
            rows = torch.arange(self.rows, device=k.device)
            self.keys[layer][rows, :, self.lengths] = k[:, :, 0]
            self.values[layer][rows, :, self.lengths] = v[:, :, 0]
        return self.keys[layer][: self.rows, :, :end], self.values[layer][: self.rows, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.lengths += num_tokens
        self.sizes = [n + num_tokens for n in self.sizes]

    def mark(self) -> Any:
        """Where every row stands now (see KVCache.mark); valid while no row joins or leaves."""
        return self.lengths.clone(), list(self.sizes), [replace(s) for s in self.states]

    def rewind(self, mark: Any) -> None:
        lengths, sizes, states = mark
        self.lengths, self.sizes, self.states = lengths.clone(), list(sizes), [replace(s) for s in states]


class PositionStreams:
    """A GDN state that lets every position of a (B, T) sequence go on as a sequence of its own (Quiet-STaR's
    parallel thoughts). The first forward runs the sequence from its start and keeps the state after each
    position; each later forward takes (B, T) tokens, one more per position, and continues each position's
    stream. Tensors are replaced, never written into, so gradients flow through every step."""

    def __init__(self) -> None:
        self.streams: GDNState | None = None  # B * T rows: row b * T + t continues position t of row b
