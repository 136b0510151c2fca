"""QuantLinear and QuantExperts: a linear layer and an MoE layer's expert stacks stored in the GPTQ format
(quant.pack describes its bit layout), computing with the weight they stand for.
"""

from __future__ import annotations

import math
import sys
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
# Up to this many float32 input rows (decoding) multiply by the codes read from qweight's bytes group by group;
# that matmul does 4 times the multiply-adds (_codes_matmul), so from about 8 rows on (measured, one thread) the
# dequantizing path with plain matmuls is faster.
CODES_ROWS = 4


class QuantLinear(nn.Module):
    """A linear layer stored in the GPTQ format: its state dict is the checkpoint's tensors (qweight, qzeros,
    scales, g_idx and bias, shapes and dtypes as in quant.pack's docstring).

    forward(x) returns F.linear(x, W, bias) in x's dtype, W the dequantized weight, through the first of:
    - keep_dequantized=True: W is built once per dtype and device and kept (the speed and the memory of an
      unquantized layer);
    - on CPU, a bfloat16 x that needs no gradient (group size a multiple of 32, 64, 128 or 256, or -1 with
      in_features such a multiple; out_features a multiple of 16; act-order works by permuting x): torch's int4
      matrix kernel on the codes repacked as 4-bit values (a 2- or 3-bit code is a 4-bit one that leaves the top
      values unused; an 8-bit code is two 4-bit ones, its low and high halves), with scales and zeros rounded to
      bfloat16;
    - on CPU, a float32 x of up to CODES_ROWS rows (decoding), 2, 4 or 8 bits, groups in order (no act-order)
      that tile in_features: the codes are read from qweight's own bytes, a block of groups at a time made
      float (nothing of the weight's size is kept: the cache holds the float32 scales and zero terms, 8 /
      group_size bytes per weight), multiplied group by group with the scales applied to the per-group sums
      (float32 rounding apart from F.linear; keeps the input's gradient);
    - otherwise W is rebuilt on every call (unpacked from qweight); on CPU a large W is built and multiplied a block
      of input rows at a time, in float32.
    The int4 layout, the float32 group parameters and the kept W are derived caches, not state: they are rebuilt
    when the buffers are replaced (load_state_dict, .to()).
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
        rows = x.reshape(-1, self.in_features)
        y = None
        # the int4 kernel has no backward: a bf16 input that needs a gradient (adapter training) takes the
        # dequantizing path
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and not (x.requires_grad and torch.is_grad_enabled()):
            y = self._int4_matmul(rows)
        elif x.device.type == "cpu" and x.dtype == torch.float32:
            y = self._codes_matmul(rows)
        if y is not None:
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        if x.device.type != "cpu" or self.in_features * self.out_features <= DEQUANT_BLOCK:
            return F.linear(x, self.dequantize(x.dtype), bias)
        return self._blockwise(x, bias)

    def _int4_matmul(self, rows: torch.Tensor) -> torch.Tensor | None:
        """rows (M, K) bf16 times W through torch's int4 kernel, or None where it cannot run this layer."""
        int4 = self._cached("int4", rows.dtype, lambda: self._int4_layout(rows.dtype))
        if int4 is None:
            return None
        perm, group_size, weight, scales_and_zeros = int4
        rows = rows[:, perm] if perm is not None else rows.contiguous()
        if self.bits == 8:  # the low and the high 4 bits of each code are two inputs of the kernel (_int4_layout)
            rows = torch.cat([rows, rows], dim=1)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, group_size, scales_and_zeros)

    def _codes_matmul(self, rows: torch.Tensor) -> torch.Tensor | None:
        """rows (M, K) float32 times W read from qweight's bytes, or None for more than CODES_ROWS rows or where
        _codes_layout cannot run the layer. y = sum over groups g of scale_g * (x_g @ q_g) + (sum of x_g) *
        zero_term_g, q the codes 0..2**bits-1, so only a block of about DEQUANT_BLOCK codes is ever float.

        Byte j of word (r, n) holds the 8/bits codes of inputs (32/bits) * r + (8/bits) * j + i, i at bit shift
        bits * i: a block of groups as float is (g, 8/bits, R, 4N), i the plane, R = words per group, columns
        (n, j). x in the same order, (g, 4M, 8/bits * R) with rows (m, j), makes one matmul per group whose
        (m, j) x (n, j) diagonal is x_g @ q_g: 4 times the multiply-adds of a plain matmul, but no transposing
        copy of the bytes (in torch's elementwise kernels, a strided byte read is several times slower)."""
        if len(rows) > CODES_ROWS:
            return None
        layout = self._cached("codes", rows.dtype, self._codes_layout)
        if layout is None:
            return None
        scale, zero_term = layout
        (G, N), M = scale.shape, len(rows)
        group_size, per_byte = self.in_features // G, 8 // self.bits
        R = group_size * self.bits // WORD
        data = self.qweight.view(torch.uint8).view(G, R, 4 * N)  # no copy: qweight's own bytes
        x = rows.reshape(M, G, R, 4, per_byte).permute(1, 0, 3, 4, 2).reshape(G, 4 * M, per_byte * R)
        y = rows.reshape(M, G, group_size).sum(-1) @ zero_term  # (M, N)
        # blocks of about DEQUANT_BLOCK codes: whole groups, or a group's columns in slices where it is larger
        width = min(N, max(1, DEQUANT_BLOCK // group_size))
        step = max(1, DEQUANT_BLOCK // (group_size * width))
        # one float block reused, unless autograd keeps each block for the backward pass
        keep = rows.requires_grad and torch.is_grad_enabled()
        block = None if keep else rows.new_empty(min(step, G) * group_size * width)
        for first in range(0, N, width):
            columns = slice(first, min(N, first + width))
            n = columns.stop - first
            for start in range(0, G, step):
                data_block = data[start : start + step, :, 4 * first : 4 * columns.stop]
                shape = (len(data_block), per_byte, R, 4 * n)
                codes = rows.new_empty(shape) if keep else block[: math.prod(shape)].view(shape)
                for i in range(per_byte):
                    plane = data_block >> (self.bits * i) if i else data_block
                    codes[:, i] = plane & (2**self.bits - 1) if i < per_byte - 1 else plane
                sums = torch.bmm(x[start : start + step], codes.view(len(codes), per_byte * R, 4 * n))
                sums = sums.view(len(codes), M, 4, n, 4).diagonal(dim1=2, dim2=4).sum(-1)  # (g, M, n)
                y[:, columns] += (sums * scale[start : start + step, None, columns]).sum(0)
        return y

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

    def _group_order(self) -> tuple[torch.Tensor | None, int] | None:
        """(the permutation of the inputs that makes each group a run of group_size consecutive inputs, or None
        when they already are, group_size, K for -1), or None where the groups cannot be such runs (a last group
        shorter than the others)."""
        K = self.in_features
        group_size = K if self.group_size == -1 else self.group_size
        if K % group_size:
            return None
        perm = torch.argsort(self.g_idx, stable=True)
        if not torch.equal(self.g_idx[perm], default_g_idx(K, group_size, perm.device)):
            return None
        return (None if torch.equal(perm, torch.arange(K, device=perm.device)) else perm), group_size

    def _codes_layout(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What _codes_matmul needs beside qweight: the scales and the zero term -scale * zero (G, N) in float32
        (8 / group_size bytes per weight), or None where it cannot read the codes from qweight's bytes: 3 bits
        (codes straddle bytes), groups that are not runs of whole words in order (act-order, a last group
        shorter than the others), a qweight whose words are not contiguous (its bytes then have no view), or a
        big-endian host (byte j of a word would not be its bits 8j..8j+7)."""
        group_size = self.in_features if self.group_size == -1 else self.group_size
        zero, scale, in_order = self._group_params()
        if (
            self.bits == 3
            or group_size * self.bits % WORD
            or not in_order
            or not self.qweight.is_contiguous()
            or sys.byteorder != "little"
        ):
            return None
        return scale, -scale * zero

    def _int4_layout(self, dtype: torch.dtype) -> tuple | None:
        """What torch's CPU int4 kernel needs, or None where it cannot run this layer: (the input permutation or
        None, the kernel's group size, the weight in the kernel's layout, the scales and zeros (G, N, 2) as
        `dtype`). The kernel computes (c - 8) * scale + offset for 4-bit values c, so the offset of
        scale * (c - zero) is scale * (8 - zero). Its group size is the largest it accepts that divides the
        layer's (whose scales repeat). An 8-bit code q = 16 * h + l is two 4-bit ones: the kernel's inputs are x
        twice, the first K columns hold l (scale, zero l's part z % 16), the next K h (16 * scale, z // 16)."""
        order = self._group_order()
        N = self.out_features
        if order is None or N % 16 or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return None
        perm, group_size = order
        kernel_group = next((size for size in reversed(INT4_GROUP_SIZES) if group_size % size == 0), None)
        if kernel_group is None:
            return None
        q = unpack_rows(self.qweight, self.bits)
        q = (q if perm is None else q[perm]).t()  # (N, K)
        zero = unpack_zeros(self.qzeros, self.bits, self.checkpoint_format)
        scale = self.scales.float()
        halves = (
            [(q, zero, scale)] if self.bits <= 4 else [(q % 16, zero % 16, scale), (q // 16, zero // 16, 16 * scale)]
        )
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.cat([h[0] for h in halves], dim=1).contiguous(), 1
        )
        scales_and_zeros = torch.cat([torch.stack([s, s * (8 - z)], dim=-1) for _, z, s in halves])
        scales_and_zeros = scales_and_zeros.repeat_interleave(group_size // kernel_group, dim=0)
        return perm, kernel_group, weight, scales_and_zeros.to(dtype).contiguous()

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
