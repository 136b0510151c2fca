"""QuantLinear and QuantExperts: a linear layer and an MoE layer's expert stacks stored in the GPTQ format
(quant.pack describes its bit layout), computing with the weight they stand for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OrionError
from ..nn.moe import STACKS, Experts
from .pack import (
    WORD,
    bit_run,
    check_bits,
    check_format,
    checkpoint_format_of,
    default_g_idx,
    dequantize_rows,
    n_groups,
    pack_gptq,
    unpack_rows,
    unpack_zeros,
)

# On CPU, QuantLinear dequantizes a weight larger than this many elements one block of input rows at a time:
# a block stays in cache and in memory the allocator reuses, where a whole fresh float weight costs page faults.
DEQUANT_BLOCK = 2**20
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts


class QuantLinear(nn.Module):
    """A linear layer stored in the GPTQ format: its state dict is the checkpoint's tensors (qweight, qzeros,
    scales, g_idx and bias, shapes and dtypes as in quant.pack's docstring).

    forward(x) returns F.linear(x, W, bias) in x's dtype, W the dequantized weight, through the first of:
    - keep_dequantized=True: W is built once per dtype and device and kept (the speed and the memory of an
      unquantized layer);
    - on CPU, a bfloat16 x that needs no gradient and 2, 3 or 4 bits (group size 32-256, out_features a
      multiple of 16; act-order works by permuting x): torch's int4 matrix kernel on the codes repacked as 4-bit
      values (a 2- or 3-bit code is a 4-bit one that leaves the top values unused), with scales and zeros
      rounded to bfloat16;
    - otherwise W is rebuilt on every call; on CPU a large W is built and multiplied a block of input rows at a
      time, in float32.
    The int4 layout and the kept W are derived caches, not state: they are rebuilt when the buffers are replaced
    (load_state_dict, .to()).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = 128,
        bias: bool = False,
        checkpoint_format: str = "gptq",
        keep_dequantized: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        check_format(checkpoint_format)
        groups = n_groups(in_features, group_size)
        for name, features in (("in_features", in_features), ("out_features", out_features)):
            if features * bits % WORD:
                raise OrionError(
                    f"a {bits}-bit GPTQ layer needs {name} * {bits} to be a multiple of 32; got {features}"
                )
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.checkpoint_format, self.keep_dequantized = checkpoint_format, keep_dequantized
        self.register_buffer(
            "qweight", torch.zeros(in_features * bits // WORD, out_features, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "qzeros", torch.zeros(groups, out_features * bits // WORD, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", default_g_idx(in_features, group_size, device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)
        self._cache: tuple[tuple, Any] | None = None

    @classmethod
    def from_codes(
        cls,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        g_idx: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        checkpoint_format: str = "gptq",
    ) -> QuantLinear:
        """The quantized layer of GPTQ's integers q (out, in) and their group parameters, on q's device."""
        out_features, in_features = q.shape
        layer = cls(in_features, out_features, bits, group_size, bias is not None, checkpoint_format, device=q.device)
        if scale.shape[1] != layer.scales.shape[0]:
            raise OrionError(
                f"group_size {group_size} gives {layer.scales.shape[0]} groups for {in_features} inputs; "
                f"scale has {scale.shape[1]}"
            )
        tensors = pack_gptq(q, scale, zero, g_idx, bits, checkpoint_format)
        with torch.no_grad():
            for name, tensor in tensors.items():
                getattr(layer, name).copy_(tensor)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, checkpoint_format={self.checkpoint_format}"
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out_features, in_features) as `dtype` (computed in float32)."""
        return self._weight_rows(0, self.in_features, *self._group_params()).t().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.keep_dequantized:
            return F.linear(x, self._cached("dense", x.dtype, lambda: self.dequantize(x.dtype)), bias)
        # the int4 kernel has no backward: a bf16 input that needs a gradient (adapter training) takes the
        # dequantizing path
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not (x.requires_grad and torch.is_grad_enabled()):
            int4 = self._cached("int4", x.dtype, lambda: self._int4_layout(x.dtype))
            if int4 is not None:
                perm, group_size, weight, scales_and_zeros = int4
                rows = x.reshape(-1, self.in_features)
                rows = rows[:, perm] if perm is not None else rows.contiguous()
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, group_size, scales_and_zeros)
                y = y.reshape(*x.shape[:-1], self.out_features)
                return y if bias is None else y + bias
        if x.device.type != "cpu" or self.in_features * self.out_features <= DEQUANT_BLOCK:
            return F.linear(x, self.dequantize(x.dtype), bias)
        return self._blockwise(x, bias)

    def _in_order(self) -> bool:
        """Whether the groups are runs of group_size consecutive inputs that tile in_features exactly, so a
        block's scales and zeros broadcast over its rows instead of being gathered row by row."""
        K, group_size = self.in_features, self.group_size
        return (group_size == -1 or K % group_size == 0) and torch.equal(
            self.g_idx, default_g_idx(K, group_size, self.g_idx.device)
        )

    def _group_params(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """zero and scale (G, N) in float32, and _in_order()."""
        zero = unpack_zeros(self.qzeros, self.bits, self.checkpoint_format).float()
        return zero, self.scales.float(), self._in_order()

    def _weight_rows(
        self, start: int, stop: int, zero: torch.Tensor, scale: torch.Tensor, in_order: bool
    ) -> torch.Tensor:
        """Rows start:stop of the weight's transpose, (stop - start, N) in float32; with in_order the rows must
        cover whole groups."""
        qweight = self.qweight[start * self.bits // WORD : stop * self.bits // WORD]
        if not in_order:
            return dequantize_rows(qweight, zero, scale, self.g_idx[start:stop], self.bits)
        weight = unpack_rows(qweight, self.bits, torch.float32)
        first = 0 if self.group_size == -1 else start // self.group_size
        groups = weight.view(-1, stop - start if self.group_size == -1 else self.group_size, self.out_features)
        groups.sub_(zero[first : first + len(groups), None]).mul_(scale[first : first + len(groups), None])
        return weight

    def _blockwise(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear with W built and multiplied a block of input rows at a time, in float32."""
        zero, scale, in_order = self._group_params()
        unit, _ = bit_run(self.bits)  # blocks start on a word and, with in_order, on a group
        if in_order and self.group_size != -1:
            unit = math.lcm(unit, self.group_size)
        block = max(unit, DEQUANT_BLOCK // self.out_features // unit * unit)
        rows = x.reshape(-1, self.in_features).float()
        y = rows.new_zeros(rows.shape[0], self.out_features)
        for start in range(0, self.in_features, block):
            stop = min(start + block, self.in_features)
            y.addmm_(rows[:, start:stop], self._weight_rows(start, stop, zero, scale, in_order))
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if bias is None else y + bias

    def _int4_layout(self, dtype: torch.dtype) -> tuple | None:
        """What torch's CPU int4 kernel needs, or None where it cannot run this layer: (the permutation of the
        inputs that makes the groups contiguous, or None, the group size, the weight in the kernel's layout, the
        scales and zeros (G, N, 2) as `dtype`). The kernel computes (q - 8) * scale + offset, so the offset of
        scale * (q - zero) is scale * (8 - zero)."""
        K, N = self.in_features, self.out_features
        group_size = K if self.group_size == -1 else self.group_size
        if (
            self.bits > 4
            or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            or group_size not in INT4_GROUP_SIZES
            or K % group_size
            or N % 16
        ):
            return None
        perm = torch.argsort(self.g_idx, stable=True)
        if not torch.equal(self.g_idx[perm], default_g_idx(K, group_size)):
            return None
        if torch.equal(perm, torch.arange(K)):
            perm = None
        q = unpack_rows(self.qweight, self.bits)  # (K, N)
        q = (q if perm is None else q[perm]).t().contiguous()
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scale = self.scales.float()
        zero = unpack_zeros(self.qzeros, self.bits, self.checkpoint_format)
        scales_and_zeros = torch.stack([scale, scale * (8 - zero)], dim=-1).to(dtype).contiguous()
        return perm, group_size, weight, scales_and_zeros

    def _cached(self, kind: str, dtype: torch.dtype, build: Callable[[], Any]) -> Any:
        tensors = (self.qweight, self.qzeros, self.scales, self.g_idx)
        key = (kind, dtype, self.qweight.device, *(t.data_ptr() for t in tensors))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, build())
        return self._cache[1]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = None  # loading copies into the same storage, which the cache key would not notice
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> QuantLinear:
        # The format stores float16 scales and bias: a model-wide .to(dtype) may move them but must not round them
        # (float16 -> bfloat16 drops 3 bits of every scale).
        kept = {name: getattr(self, name) for name in ("scales", "bias") if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, tensor in kept.items():
            moved = getattr(self, name)
            if moved.dtype != tensor.dtype:
                setattr(self, name, tensor.to(moved.device))
        return self


class QuantExperts(nn.Module):
    """An MoE layer's expert stacks in GPTQ form: gate_up_proj and down_proj are lists of QuantLinear, one per
    expert (state dict names experts.gate_up_proj.{e}.qweight, ...). It answers the MoE paths as
    nn.moe.Experts does: grouped() runs each expert's rows through its own layer; weights() and expert()
    dequantize the experts they are asked for."""

    stacked = False  # single-token decoding runs expert() per chosen expert, not weights() (see nn.moe.MoE)

    def __init__(self, gate_up_proj: list[QuantLinear], down_proj: list[QuantLinear]) -> None:
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.ModuleList(gate_up_proj), nn.ModuleList(down_proj)

    def grouped(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        parts = zip(getattr(self, name), x.split(counts.tolist()), strict=True)
        return torch.cat([layer(part) if len(part) else part.new_zeros(0, layer.out_features) for layer, part in parts])

    def weights(self, experts: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = range(len(self.down_proj))[experts or slice(None)]
        return tuple(torch.stack([getattr(self, name)[e].dequantize() for e in chosen]) for name in STACKS)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj[e](x).chunk(2, dim=-1)
        return self.down_proj[e](F.silu(gate) * up)


def quantized_shells(model: nn.Module, quantization: dict[str, Any], tensors: Container[str]) -> None:
    """Make every linear layer (and MoE expert stack) the checkpoint stores in GPTQ form (a `.qweight`) a
    QuantLinear (a QuantExperts), on meta."""
    settings = (quantization["bits"], quantization["group_size"])
    checkpoint_format = checkpoint_format_of(quantization)

    def shell(in_features: int, out_features: int, bias: bool) -> QuantLinear:
        return QuantLinear(in_features, out_features, *settings, bias, checkpoint_format)

    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and f"{name}.qweight" in tensors:
            layer: nn.Module = shell(module.in_features, module.out_features, module.bias is not None)
        elif isinstance(module, Experts) and f"{name}.down_proj.0.qweight" in tensors:
            stacks = [[shell(p.shape[2], p.shape[1], False) for _ in range(p.shape[0])]
                      for p in (module.gate_up_proj, module.down_proj)]  # fmt: skip
            layer = QuantExperts(*stacks)
        else:
            continue
        model.set_submodule(name, layer)
