"""Sampling settings, logits processors and the token sampler.

Every processor is a small pure function on float32 logits (B, V) with the semantics of the
transformers LogitsProcessor of the same name (filtered entries become -inf). `process_logits`
applies them in Hugging Face's and vLLM's order:

    repetition penalty -> presence/frequency penalties -> temperature -> top-k -> top-p -> min-p
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import OrionError, checker, unknown_names


class GenerationError(OrionError):
    """Generation settings or inputs that cannot be used; the message says what to change."""


@dataclass
class GenerationConfig:
    """How to pick tokens. temperature 0 or do_sample=False means greedy decoding.

    Penalties: `repetition_penalty` is Hugging Face's (multiplicative, over prompt and generated
    tokens); `presence_penalty` and `frequency_penalty` are OpenAI's (additive, generated tokens only).
    `seed` makes sampling reproducible: every row draws from its own generator seeded with it, so a
    prompt's output does not depend on the other prompts of its batch. A thinking model samples its
    thoughts with the same temperature, top-k/p and min-p (greedy settings think greedily), without the
    penalties and logit_bias, which are about the visible text.
    """

    max_new_tokens: int = 256
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI's)
    think: bool = True  # a thinking (Quiet-STaR) model thinks before each token; False: its base predictions

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.logit_bias, dict):  # JSON object keys are strings
            try:
                self.logit_bias = {int(token): value for token, value in self.logit_bias.items()}
            except ValueError:
                raise GenerationError(f"logit_bias keys must be token ids, got {list(self.logit_bias)[:5]}") from None
        self.validate()

    def validate(self) -> None:
        need = checker(GenerationError)

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        need(
            is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
            f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}",
        )
        for key in ("do_sample", "think"):
            need(isinstance(getattr(self, key), bool), f"{key} must be true or false, got {getattr(self, key)!r}")
        need(
            is_number(self.temperature) and self.temperature >= 0,
            f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}",
        )
        need(is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        need(is_number(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        need(is_number(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        need(
            is_number(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}",
        )
        for key in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, key)
            need(is_number(value) and -2 <= value <= 2, f"{key} must be in [-2, 2] (0 = off), got {value!r}")
        need(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop must be a list of non-empty strings, got {self.stop!r}",
        )
        need(
            all(is_int(i) and i >= 0 for i in self.stop_token_ids),
            f"stop_token_ids must be a list of token ids >= 0, got {self.stop_token_ids!r}",
        )
        need(
            self.seed is None or (is_int(self.seed) and -(2**63) <= self.seed < 2**64),
            f"seed must be an integer in [-2**63, 2**64 - 1] (what torch's generators take) or null, got {self.seed!r}",
        )
        need(
            isinstance(self.logit_bias, dict)
            and all(is_number(v) and -100 <= v <= 100 for v in self.logit_bias.values()),
            f"logit_bias must map token ids to numbers in [-100, 100], got {self.logit_bias!r}",
        )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def replace(self, **changes: Any) -> GenerationConfig:
        """A copy with some fields changed; unknown names raise GenerationError with a suggestion."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = [key for key in changes if key not in known]
        if unknown:
            raise GenerationError(
                f"unknown generation settings: {unknown_names(unknown, known)}; known: {', '.join(sorted(known))}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationConfig:
        """Read our own keys and Hugging Face generation_config.json keys: `eos_token_id` (int or list)
        becomes stop_token_ids; keys with no meaning here (transformers_version, bos_token_id,
        pad_token_id, num_beams, ...) are ignored, because HF files carry many of them."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known and value is not None}
        eos = data.get("eos_token_id")
        if eos is not None:
            eos = [eos] if isinstance(eos, int) else list(eos)
            values["stop_token_ids"] = list(dict.fromkeys([*values.get("stop_token_ids", []), *eos]))
        return cls(**values)


def token_mask(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens occur in each row of token_ids (B, L)."""
    mask = torch.zeros(token_ids.shape[0], vocab_size, dtype=torch.bool, device=token_ids.device)
    return mask.scatter_(1, token_ids, True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty, as transformers applies it: logits of tokens already seen (B, V bool) are divided
    by `penalty` when positive and multiplied when negative, so both move towards less likely."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties: logit -= presence * (count > 0) + frequency * count, counts (B, V) over generated tokens."""
    counts = counts.to(logits.dtype)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row; ties with the k-th value are kept too."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability sums to at least p,
    and always the most likely token. Done from the unlikely end (as transformers does): a token goes
    when the cumulative probability of it and everything less likely is <= 1 - p."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= 1 - p
    remove_sorted[..., -1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    # min_p <= 1 keeps the top token in exact arithmetic; keep it explicitly so rounding cannot empty a row.
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    config: GenerationConfig,
    seen: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """All configured processors in order on float32 logits (B, V). `seen` (B, V bool: prompt and generated
    tokens) feeds the repetition penalty, `counts` (B, V: generated tokens) the presence/frequency penalties.
    The sampling warpers (temperature, top-k/p, min-p) run only when sampling: they never change the argmax."""
    if config.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
    if (config.presence_penalty or config.frequency_penalty) and counts is not None:
        logits = apply_presence_frequency_penalty(logits, counts, config.presence_penalty, config.frequency_penalty)
    if config.greedy:
        return logits
    if config.temperature != 1.0:
        logits = apply_temperature(logits, config.temperature)
    if config.top_k:
        logits = apply_top_k(logits, config.top_k)
    if config.top_p < 1.0:
        logits = apply_top_p(logits, config.top_p)
    if config.min_p:
        logits = apply_min_p(logits, config.min_p)
    return logits


class Sampler:
    """Picks the next token of each row from processed logits: argmax when greedy, otherwise a draw
    from softmax(logits). With a seed every row owns a generator seeded with it, so a row's draws are
    the same whatever else is in the batch."""

    def __init__(self, config: GenerationConfig, batch_size: int, device: torch.device) -> None:
        self.greedy = config.greedy
        self.generators: list[torch.Generator] | None = None
        if not self.greedy and config.seed is not None:
            self.generators = [torch.Generator(device).manual_seed(config.seed) for _ in range(batch_size)]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Token ids (B,) for processed logits (B, V)."""
        if self.greedy:
            return logits.argmax(dim=-1)
        probs = logits.softmax(dim=-1)
        # The exponential race: argmax(p / q) with q ~ Exp(1) is a draw from p, and needs one noise
        # vector per row, which lets each row use its own generator.
        noise = torch.empty_like(probs)
        if self.generators is None:
            noise.exponential_()
        else:
            for row, generator in enumerate(self.generators):
                noise[row].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)

    def select(self, rows: list[int]) -> None:
        """Keep the generators of the given rows (when finished rows leave the batch)."""
        if self.generators is not None:
            self.generators = [self.generators[i] for i in rows]
