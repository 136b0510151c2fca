"""ALiBi attention biases (Press et al. 2022) with BLOOM's slopes."""

import math

import torch


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes: a geometric sequence for the nearest power of two below num_heads,
    then every other slope of the next power of two for the remaining heads (BLOOM, ALiBi paper)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        extra = num_heads - closest
        slopes += [extra_base ** (2 * i + 1) for i in range(extra)]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Bias (B, H, 1, L) = slope * key position. Softmax is shift-invariant per query row, so
    slope * (key - query) and slope * key give the same attention (BLOOM uses the latter)."""
    return slopes.view(1, -1, 1, 1) * key_positions.to(slopes.dtype)[:, None, None, :]
