"""Generation with thoughts, for thinking (Quiet-STaR) models.

Before each visible token the model writes a thought after its text, on the same cache: <|startthought|>,
thought_length - 3 sampled tokens (never a meta token), <|endthought|>. The mixing head blends the end
token's hidden state with the base hidden state of the text's last token, and the next token comes from
that blend. Then the cache rewinds to the text, so every thought sees the text and nothing of the earlier
thoughts, as in training (orionlm.train.quietstar): thought token j after text position t sits at
position t + j.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model import OrionLM
from ..nn.cache import KVCache, RaggedCache
from .sampling import GenerationConfig


def thought_slots(model: OrionLM, config: GenerationConfig) -> int:
    """Cache positions a thought occupies for a moment beyond the text (0 when the request does not think)."""
    return model.config.thought_length - 1 if model.config.thinks and config.think else 0


def think(
    model: OrionLM,
    cache: KVCache | RaggedCache,
    base_hidden: torch.Tensor,
    pick: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A thought after every row of `cache`, whose last text token gave the final-norm hidden states
    base_hidden (rows, C). `pick` turns float32 logits (rows, V) into thought tokens (rows,). Returns the
    mixed next-token logits (rows, V) float32 and the thought tokens (rows, thought_length - 3); the cache
    is back where it was."""
    config = model.config
    rows, n = base_hidden.shape[0], config.thought_length
    device = base_hidden.device
    meta = torch.tensor([config.thought_start_id, config.thought_end_id], device=device)
    token = torch.full((rows,), config.thought_start_id, device=device)
    thought = []
    mark = cache.mark()
    for fed in range(n - 1):  # the start token, the thought, the end token
        if isinstance(cache, RaggedCache):
            cache.reserve_step()
        out = model(token.view(rows, 1), cache=cache, logits_to_keep=1, output_hidden=True)
        if fed < n - 3:
            token = pick(out.logits[:, -1].float().index_fill(-1, meta, float("-inf")))
            thought.append(token)
        else:
            token = torch.full((rows,), config.thought_end_id, device=device)
    cache.rewind(mark)
    mixed, _ = model.thinking.mix(base_hidden, out.hidden[:, -1])
    tokens = torch.stack(thought, dim=1) if thought else base_hidden.new_zeros(rows, 0, dtype=torch.long)
    return model.lm_head(mixed).float(), tokens
