"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) and round-to-nearest weight quantization of one linear layer, in
the integer convention of AutoGPTQ / GPTQModel checkpoints.

The input columns of a weight (out, in) fall into groups of `group_size` consecutive columns (the last group is
shorter when group_size does not divide in; -1 makes the whole row one group). Each row of each group gets a
scale and an integer zero point, and each weight becomes an integer q in [0, 2**bits - 1] standing for
scale * (q - zero). GPTQ quantizes the columns one at a time and moves each column's rounding error onto the
columns not yet quantized through the inverse of H = 2/n sum x x^T, the Hessian of the layer's squared output
error over its n calibration inputs, so the output moves as little as possible (the paper's Algorithm 1:
Cholesky form, blocks of `block_size` columns with a lazy update of the rest).

Choices that differ from AutoGPTQ, and why:
- sym puts the zero point at 2**(bits-1) and the range at +-max|w| always; AutoGPTQ keeps the range [0, max]
  for a group without negative weights, which with that zero point clips its upper half.
- Group parameters are found after every earlier column's update has reached the group; AutoGPTQ reads a group
  that starts inside a block before the block's pending updates, so its numbers depend on block_size.
- Dead columns (no input ever) are zeroed before any parameters are found, also for group_size -1.
- Act order breaks ties in the Hessian diagonal by column index (a stable sort), so g_idx is reproducible.
- Hessian counts input rows (tokens), where AutoGPTQ counts sequences: its H is seq_len times this one, which
  changes nothing but `QuantResult.loss` (GPTQ's result does not depend on H's scale; damp is relative).
- An all-zero Hessian (no calibration input reached the layer) is an error; AutoGPTQ zeroes the whole weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import OrionError

BITS = (2, 3, 4, 8)


class QuantError(OrionError):
    """An invalid quantization config, or calibration statistics GPTQ cannot use."""


@dataclass
class QuantConfig:
    """GPTQ's settings, named as AutoGPTQ's quantize_config.json names them."""

    bits: int = 4
    group_size: int = 128  # input columns per group; -1: one group per output row
    sym: bool = True  # zero point fixed at 2**(bits-1); else one per group, from the group's min and max
    desc_act: bool = False  # act order: quantize the columns by descending Hessian diagonal
    static_groups: bool = False  # find every group's parameters up front, from the weights before any update
    damp_percent: float = 0.01  # added to H's diagonal, as a fraction of the diagonal's mean
    true_sequential: bool = True  # for the model-level pipeline: calibrate a block's linears in forward order
    block_size: int = 128  # columns per block of the lazy batch update

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise QuantError(f"bits must be one of {BITS}, got {self.bits!r}")
        if type(self.group_size) is not int or self.group_size < 1 and self.group_size != -1:
            raise QuantError(f"group_size must be -1 (one group per row) or positive, got {self.group_size!r}")
        if not isinstance(self.damp_percent, (int, float)) or not 0 <= self.damp_percent < 1:
            raise QuantError(f"damp_percent must be in [0, 1), got {self.damp_percent!r}")
        if type(self.block_size) is not int or self.block_size < 1:
            raise QuantError(f"block_size must be a positive integer, got {self.block_size!r}")
        for name in ("sym", "desc_act", "static_groups", "true_sequential"):
            if not isinstance(getattr(self, name), bool):
                raise QuantError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


@dataclass
class QuantResult:
    """A quantized weight, in the layer's own column order, as pack_gptq takes it."""

    qweight: torch.Tensor  # (out, in) int32 codes in [0, 2**bits - 1]
    scale: torch.Tensor  # (out, n_groups) float
    zero: torch.Tensor  # (out, n_groups) int32 zero points
    g_idx: torch.Tensor  # (in,) int32: the group of each input column
    weight: torch.Tensor  # (out, in) float: scale[:, g_idx] * (qweight - zero[:, g_idx])
    # GPTQ's objective at the end: 1/2 tr((W - Q) H (W - Q)^T) with the damped H, i.e. the mean over calibration
    # tokens of ||(W - Q) x||^2 (plus the damping's share); None for rtn, which sees no inputs
    loss: float | None = None


def find_params(w: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point of each row of w (rows, cols): (scale (rows,), zero (rows,)), both in w's
    dtype, zero holding integers. The range always includes 0; a row of zeros gets the range [-1, 1]."""
    origin = w.new_zeros(w.shape[0])
    xmin = torch.minimum(w.amin(1), origin)
    xmax = torch.maximum(w.amax(1), origin)
    if config.sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = xmax == xmin  # both 0, as xmin <= 0 <= xmax
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / config.maxq
    if config.sym:
        return scale, torch.full_like(scale, (config.maxq + 1) // 2)
    return scale, torch.round(-xmin / scale)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """The codes clamp(round(w / scale) + zero, 0, maxq) in w's dtype (scale and zero broadcast against w);
    scale * (codes - zero) is the quantized weight."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _solver_float(weight: torch.Tensor) -> torch.Tensor:
    """The weight, out of autograd, in the solver's dtype: float32, or float64 when given float64."""
    if weight.dim() != 2:
        raise QuantError(f"the weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    return weight.detach().to(torch.promote_types(weight.dtype, torch.float32))


def _group_size(config: QuantConfig, in_features: int) -> int:
    return in_features if config.group_size == -1 else config.group_size


def rtn(weight: torch.Tensor, config: QuantConfig) -> QuantResult:
    """Round-to-nearest with gptq's quantizer and groups. Without inputs there is no act order: desc_act and
    static_groups are ignored (every group is static and in order)."""
    W = _solver_float(weight)
    in_features = W.shape[1]
    group_size = _group_size(config, in_features)
    params = [find_params(W[:, i : i + group_size], config) for i in range(0, in_features, group_size)]
    scale = torch.stack([s for s, _ in params], 1)  # (out, n_groups)
    zero = torch.stack([z for _, z in params], 1)
    g_idx = torch.arange(in_features, device=W.device) // group_size
    s, z = scale[:, g_idx], zero[:, g_idx]
    q = quantize(W, s, z, config.maxq)
    return QuantResult(q.to(torch.int32), scale, zero.to(torch.int32), g_idx.to(torch.int32), s * (q - z))


class Hessian:
    """The running H = 2/n sum x x^T over the n input rows a linear layer has seen, kept as AutoGPTQ keeps it:
    H *= n / (n + m); H += 2 / (n + m) X^T X for each batch X of m rows."""

    def __init__(
        self, in_features: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        self.matrix = torch.zeros(in_features, in_features, device=device, dtype=dtype)  # (in, in)
        self.count = 0  # input rows (tokens) seen

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (..., in_features)."""
        in_features = self.matrix.shape[0]
        if x.shape[-1] != in_features:
            raise QuantError(f"inputs of {x.shape[-1]} features for a Hessian of {in_features}")
        x = x.detach().reshape(-1, in_features).to(self.matrix)
        m = x.shape[0]
        if m:
            self.matrix.addmm_(x.T, x, beta=self.count / (self.count + m), alpha=2 / (self.count + m))
            self.count += m

    def attach(self, module: nn.Module) -> RemovableHandle:
        """Add every input `module` receives (its forward's first argument) until the handle is removed."""
        return module.register_forward_hook(lambda _module, args, _output: self.add(args[0]))


def _upper_inverse_cholesky(H: torch.Tensor, config: QuantConfig, shape: tuple[int, int]) -> torch.Tensor:
    """U with H^-1 = U^T U: row i of U spreads column i's error over the columns after it."""
    L, info = torch.linalg.cholesky_ex(H)
    if info == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info != 0:
        raise QuantError(
            f"the damped Hessian of a linear with weight shape {shape} is not positive definite: raise damp_percent "
            f"(now {config.damp_percent}) or calibrate on more tokens"
        )
    return U


def _blocks(in_features: int, block_size: int, group_size: int, fresh_groups: bool) -> Iterator[tuple[int, int]]:
    """The lazy-update blocks [b1, b2). With groups found on the fly, a group that starts inside a block must
    end inside it, so that every earlier column's update has reached it when its parameters are found: a
    block is cut short at such a group's start."""
    b1 = 0
    while b1 < in_features:
        b2 = min(b1 + block_size, in_features)
        start = (b2 - 1) // group_size * group_size  # of the last group that starts before b2
        if fresh_groups and b1 < start and min(start + group_size, in_features) > b2:
            b2 = start
        yield b1, b2
        b1 = b2


def gptq(weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig) -> QuantResult:
    """Quantize `weight` (out, in) with GPTQ against `hessian` (in, in), e.g. Hessian.matrix. Solved in float32
    (float64 when the weight is float64) on the weight's device; see the module docstring."""
    W = _solver_float(weight)
    shape = tuple(W.shape)
    out_features, in_features = shape
    if hessian.shape != (in_features, in_features):
        expected = (in_features, in_features)
        raise QuantError(f"a weight of shape {shape} needs a Hessian of shape {expected}, got {tuple(hessian.shape)}")
    H = hessian.detach().to(W.device, W.dtype, copy=True)
    if not torch.isfinite(H).all():
        raise QuantError(f"the Hessian of a linear with weight shape {shape} has inf or nan entries")
    dead = H.diagonal() == 0  # inputs that were always 0: their weights cannot matter
    if dead.all():
        raise QuantError(
            f"the Hessian of a linear with weight shape {shape} is zero (no calibration input reached it); "
            "quantize it with rtn()"
        )
    H.diagonal()[dead] = 1
    # The solver works on W^T (in, out): a column of W, read and updated once per step, is then a contiguous row.
    Wt = W.T.clone(memory_format=torch.contiguous_format)
    Wt[dead] = 0

    group_size = _group_size(config, in_features)
    n_groups = math.ceil(in_features / group_size)
    fresh_groups = not config.static_groups and n_groups > 1
    scale = W.new_empty(out_features, n_groups)
    zero = W.new_empty(out_features, n_groups)
    if not fresh_groups:
        for g in range(n_groups):
            scale[:, g], zero[:, g] = find_params(Wt[g * group_size : (g + 1) * group_size].T, config)

    order = torch.arange(in_features, device=W.device)  # the original column at each step
    if config.desc_act:
        order = torch.argsort(H.diagonal(), descending=True, stable=True)
        Wt = Wt[order]
        H = H[order][:, order]
    # Static groups belong to the original columns; groups found on the fly are runs of consecutive steps.
    steps = torch.arange(in_features, device=W.device)
    group_at_step = (steps if fresh_groups else order) // group_size
    g_idx = torch.empty_like(order)
    g_idx[order] = group_at_step
    H.diagonal().add_(config.damp_percent * H.diagonal().mean())
    U = _upper_inverse_cholesky(H, config, shape)

    groups = group_at_step.tolist()
    codes = torch.empty_like(Wt)
    dequantized = torch.empty_like(Wt)
    loss = W.new_zeros(())
    for b1, b2 in _blocks(in_features, config.block_size, group_size, fresh_groups):
        W1 = Wt[b1:b2]  # a view: the updates land in Wt, where a group's parameters are read
        errors = torch.empty_like(W1)  # (b2 - b1, out)
        for i in range(b2 - b1):
            col, g = b1 + i, groups[b1 + i]
            if fresh_groups and col % group_size == 0:
                scale[:, g], zero[:, g] = find_params(Wt[col : col + group_size].T, config)
            s, z = scale[:, g], zero[:, g]
            w = W1[i]
            codes[col] = quantize(w, s, z, config.maxq)
            dequantized[col] = s * (codes[col] - z)
            errors[i] = (w - dequantized[col]) / U[col, col]
            W1[i + 1 :].addr_(U[col, col + 1 : b2], errors[i], alpha=-1)
        Wt[b2:].addmm_(U[b1:b2, b2:].T, errors, alpha=-1)
        loss += errors.square().sum() / 2

    inverse = torch.argsort(order)
    codes, dequantized = codes[inverse].T.contiguous(), dequantized[inverse].T.contiguous()
    return QuantResult(
        codes.to(torch.int32), scale, zero.to(torch.int32), g_idx.to(torch.int32), dequantized, loss.item()
    )
