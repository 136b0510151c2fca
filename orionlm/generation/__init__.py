"""Text generation: sampling settings, logits processors, the continuous-batching engine and the
generate/stream loops over it."""

from .engine import Engine, Event, Request, TokenLogprob
from .sampling import (
    GenerationConfig,
    GenerationError,
    Sampler,
    apply_min_p,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
    token_mask,
)
from .text import (
    IncrementalDetokenizer,
    TextStream,
    generate,
    generate_ids,
    resolve_config,
    stream,
    stream_thoughts,
)
from .thinking import think

__all__ = [
    "Engine",
    "Event",
    "GenerationConfig",
    "GenerationError",
    "IncrementalDetokenizer",
    "Request",
    "Sampler",
    "TextStream",
    "TokenLogprob",
    "apply_min_p",
    "apply_presence_frequency_penalty",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "generate",
    "generate_ids",
    "process_logits",
    "resolve_config",
    "stream",
    "stream_thoughts",
    "think",
    "token_mask",
]
