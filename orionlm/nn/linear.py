"""Linear layers tuned for decoding on CPU: column-major weights, and small-batch products that use
every thread.

A decode step multiplies one row per running sequence by every weight matrix, so its speed is the speed
of streaming the weights. On CPU, MKL's matrix-vector kernel streams a column-major (in, out) matrix about
1.8x faster than the row-major (out, in) one nn.Linear stores when the matrix has at least as many outputs
as inputs; with fewer outputs (down projections: 512 outputs from 1408 inputs) the row-major one streams
about 1.2x faster (one thread, an AMD EPYC: 12.7 against 10.8 GB/s), so those stay row-major. MKL also
runs a product of a few rows on fewer threads than torch.get_num_threads() says; splitting the outputs
into one block per thread and multiplying them with one bmm spreads the work over all threads (1.2-1.5x
for 2-16 rows, more for one). Matrix-matrix products (prefill, training) run at the same speed in either
layout. benchmarks/generate_speed.py measures the gain, benchmarks/decode_profile.py the streaming speed
per shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SMALL_BATCH = 16  # up to this many rows, a product streams the weight: spread its outputs over the threads


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a few rows (decoding) times a weight in the decode layout (column-major, or on CPU outside
    autograd a row-major one with fewer outputs than inputs) run as one bmm over per-thread blocks of the
    outputs."""
    N, K = weight.shape
    threads = torch.get_num_threads()
    rows = x.numel() // K if K else 0
    if threads == 1 or not 0 < rows <= SMALL_BATCH or N % threads:
        return F.linear(x, weight, bias)
    if weight.stride() == (1, N):
        blocks = weight.t().view(K, threads, N // threads).transpose(0, 1)  # (P, K, N/P), views of the columns
    elif N < K and weight.stride() == (K, 1) and weight.device.type == "cpu" and not torch.is_grad_enabled():
        blocks = weight.view(threads, N // threads, K).transpose(1, 2)  # (P, K, N/P), views of the rows
    else:
        return F.linear(x, weight, bias)
    y = torch.bmm(x.reshape(1, rows, K).expand(threads, rows, K), blocks)  # (P, rows, N/P)
    y = y.transpose(0, 1).reshape(*x.shape[:-1], N)
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """nn.Linear whose forward takes the threaded matrix-vector path of `linear` when its weight is
    column-major (see use_decode_layout); otherwise exactly nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) weight, zero bias."""
        self.weight.copy_(torch.randn(self.weight.shape, generator=generator) * std)
        if self.bias is not None:
            self.bias.zero_()


def to_column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same values and shape, stored as the transpose of a contiguous (..., in, out) tensor."""
    return weight.transpose(-1, -2).contiguous().transpose(-1, -2)


class Packed:
    """Linear layers that read the same input, stored side by side in one column-major matrix: each
    layer's weight and bias become views of it, so one product computes every output and the
    parameters (their values, the state dict, in-place optimizer updates) stay as they were."""

    @torch.no_grad()
    def __init__(self, linears: list[Linear]) -> None:
        self.sizes = [layer.out_features for layer in linears]
        first = linears[0].weight
        storage = torch.empty(first.shape[1], sum(self.sizes), dtype=first.dtype, device=first.device)  # (in, out)
        has_bias = linears[0].bias is not None
        bias = torch.empty(sum(self.sizes), dtype=first.dtype, device=first.device) if has_bias else None
        start = 0
        for layer, size in zip(linears, self.sizes, strict=True):
            storage[:, start : start + size] = layer.weight.t()
            layer.weight.data = storage[:, start : start + size].t()
            if bias is not None:
                bias[start : start + size] = layer.bias
                layer.bias.data = bias[start : start + size]
            start += size
        self.weight, self.bias, self.first = storage.t(), bias, linears[0]

    def valid(self) -> bool:
        """False once the parameters were given new storage (model.to(...), assigned weights)."""
        return self.first.weight.data_ptr() == self.weight.data_ptr()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


@torch.no_grad()
def use_decode_layout(model: nn.Module) -> None:
    """Prepare a model for fast decoding on CPU, in place: linear layers that share an input (q/k/v,
    gate/up) are packed into one matrix (see Packed; fewer, larger products stream faster), and every
    other Linear weight (a tied LM head included: embedding lookups barely notice) and every 3-D
    parameter (stacked expert matrices) with at least as many outputs as inputs becomes column-major
    (down projections stay row-major: see the module docstring). Values, shapes, parameter objects and
    the state dict are unchanged, and checkpoints are written contiguous. Idempotent."""
    for module in model.modules():
        if not hasattr(module, "packable") or (module.packed is not None and module.packed.valid()):
            continue
        linears = module.packable()
        # a packed product would skip adapters, and quantized layers (QuantLinear) hold no float weight
        if linears and all(type(layer) is Linear for layer in linears):
            module.packed = Packed(linears)
    matrices = [m.weight for m in model.modules() if isinstance(m, Linear)]
    matrices += [p for p in model.parameters() if p.dim() == 3]
    for weight in matrices:
        if weight.is_contiguous() and weight.shape[-2] >= weight.shape[-1]:  # (..., out, in)
            weight.data = to_column_major(weight.data)
