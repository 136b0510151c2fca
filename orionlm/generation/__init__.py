"""Text generation: sampling settings, logits processors and the batched decoding loop."""

from .engine import (
    Decoder,
    IncrementalDetokenizer,
    TextStream,
    generate,
    generate_ids,
    resolve_config,
    stream,
    use_decode_layout,
)
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

__all__ = [
    "Decoder",
    "GenerationConfig",
    "GenerationError",
    "IncrementalDetokenizer",
    "Sampler",
    "TextStream",
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
    "token_mask",
    "use_decode_layout",
]
