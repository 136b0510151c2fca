"""The GPTQ checkpoint format of AutoGPTQ / GPTQModel (what transformers, vLLM and the GPTQ kernels load), and
QuantLinear, the layer that holds it.

A quantized linear layer with K inputs, N outputs, b bits and G groups is stored as

    qweight  int32 (K*b/32, N)   the integer weights q, packed along the input dim
    qzeros   int32 (G, N*b/32)   the zero points, packed along the output dim
    scales   fp16  (G, N)
    g_idx    int32 (K,)          the group of each input column: k // group_size, or any order with act-order
    bias     fp16  (N,)          optional

and weight[n, k] = scales[g, n] * (q[n, k] - zero[g, n]) with g = g_idx[k]. Packing turns each column of
integers into one little-endian bit stream cut into 32-bit words: value i occupies bits b*i .. b*i+b-1. For
b = 2, 4, 8 that puts 32/b values in each word, lowest bits first; for b = 3 it puts 32 values in 3 words with
values 10 and 21 straddling a word boundary, which is AutoGPTQ's 3-bit layout.

checkpoint_format "gptq" (v1: AutoGPTQ's, and most released checkpoints') stores zero - 1 and readers add the 1
back; GPTQModel's "gptq_v2" stores the zero itself. v1 cannot hold a zero point of 0: the stored -1 reads back
as 2**b in AutoGPTQ and carries into the neighbouring field in GPTQModel's v1 -> v2 conversion, so pack_gptq
refuses it rather than write a corrupt file.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OrionError
from .gptq import BITS

FORMATS = ("gptq", "gptq_v2")
WORD = 32
# On CPU, QuantLinear dequantizes a weight larger than this many elements one block of input rows at a time:
# a block stays in cache and in memory the allocator reuses, where a whole fresh float weight costs page faults.
DEQUANT_BLOCK = 2**20
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise OrionError(f"GPTQ bits must be one of {BITS}; got {bits!r}")


def _check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in FORMATS:
        raise OrionError(f"GPTQ checkpoint_format must be one of {FORMATS}; got {checkpoint_format!r}")


def _run(bits: int) -> tuple[int, list[tuple[int, int]]]:
    """The shortest run of values that fills whole words (32/b values, or 32 for b = 3), and each value's
    (word in the run, bit shift in that word)."""
    length = WORD // math.gcd(bits, WORD)
    return length, [divmod(i * bits, WORD) for i in range(length)]


def _check_group_size(group_size: int) -> None:
    if group_size != -1 and group_size < 1:
        raise OrionError(f"GPTQ group_size must be -1 (one group per row) or >= 1; got {group_size}")


def n_groups(in_features: int, group_size: int) -> int:
    """ceil(in_features / group_size), or 1 when group_size is -1 (one group per output row)."""
    _check_group_size(group_size)
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def default_g_idx(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The group of each input column without act-order: k // group_size (all 0 when group_size is -1)."""
    g_idx = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(g_idx) if group_size == -1 else g_idx // group_size


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(L, M) integers in [0, 2**bits) -> (L*bits/32, M) int32, packing each column (module docstring)."""
    _check_bits(bits)
    L, M = values.shape
    if L * bits % WORD:
        raise OrionError(
            f"cannot pack {L} values of {bits} bits into 32-bit words: {L} * {bits} is not a multiple of 32"
        )
    length, slots = _run(bits)
    values = values.to(torch.int64).reshape(L // length, length, M)
    words = torch.zeros(L // length, length * bits // WORD, M, dtype=torch.int64, device=values.device)
    for i, (word, shift) in enumerate(slots):
        words[:, word] |= (values[:, i] << shift) & (2**WORD - 1)
        if shift + bits > WORD:  # the high bits continue at the bottom of the next word
            words[:, word + 1] |= values[:, i] >> (WORD - shift)
    words = words.reshape(-1, M)
    return (words - ((words >> (WORD - 1)) << WORD)).to(torch.int32)  # the same 32 bits as a signed int32


def unpack_rows(packed: torch.Tensor, bits: int, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The inverse of pack_rows: (R, M) int32 -> (R*32/bits, M) values in [0, 2**bits), as `dtype`."""
    _check_bits(bits)
    R, M = packed.shape
    length, slots = _run(bits)
    words_per_run = length * bits // WORD
    if R % words_per_run:
        raise OrionError(f"{bits}-bit values are packed in runs of {words_per_run} words; got {R} rows")
    packed = packed.reshape(R // words_per_run, words_per_run, M)
    out = torch.empty(R // words_per_run, length, M, dtype=dtype, device=packed.device)
    for i, (word, shift) in enumerate(slots):
        low_bits = min(bits, WORD - shift)
        # int32 >> is arithmetic, so the mask also drops the copies of the sign bit
        value = (packed[:, word] >> shift) & (2**low_bits - 1)
        if low_bits < bits:
            value |= (packed[:, word + 1] & (2 ** (bits - low_bits) - 1)) << low_bits
        out[:, i] = value
    return out.reshape(-1, M)


def pack_gptq(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    checkpoint_format: str = "gptq",
) -> dict[str, torch.Tensor]:
    """The GPTQ tensors {qweight, qzeros, scales, g_idx} of a quantized weight, on q's device.

    q (N, K) integers in [0, 2**bits) in the layer's own column order; scale (N, G) float, stored as float16;
    zero (N, G) integers in [0, 2**bits), >= 1 for checkpoint_format "gptq"; g_idx (K,) the group of each column."""
    _check_bits(bits)
    _check_format(checkpoint_format)
    maxq = 2**bits - 1
    if q.dim() != 2:
        raise OrionError(f"q must be (out_features, in_features); got shape {tuple(q.shape)}")
    N, K = q.shape
    if scale.dim() != 2 or scale.shape[0] != N or zero.shape != scale.shape:
        raise OrionError(
            f"scale and zero must be (out_features={N}, n_groups); got {tuple(scale.shape)} and {tuple(zero.shape)}"
        )
    if g_idx.shape != (K,):
        raise OrionError(f"g_idx must hold one group per input column ({K}); got shape {tuple(g_idx.shape)}")
    if K * bits % WORD:
        raise OrionError(f"in_features ({K}) * bits ({bits}) must be a multiple of 32 to pack qweight")
    if N * bits % WORD:
        raise OrionError(f"out_features ({N}) * bits ({bits}) must be a multiple of 32 to pack qzeros")
    for name, t, high in (("q", q, maxq), ("zero", zero, maxq), ("g_idx", g_idx, scale.shape[1] - 1)):
        if t.is_floating_point() or t.numel() and (t.min() < 0 or t.max() > high):
            raise OrionError(f"{name} must hold integers in [0, {high}]")
    if checkpoint_format == "gptq" and (zero == 0).any():
        raise OrionError(
            f"{int((zero == 0).sum())} zero point(s) are 0, which checkpoint_format 'gptq' (v1) cannot store: it "
            "keeps zero - 1 in a field of `bits` bits and readers add 1 to the field. Quantize with zero points >= 1 "
            "(symmetric quantization always has them) or write checkpoint_format 'gptq_v2'"
        )
    stored_zero = zero.to(torch.int64) - (1 if checkpoint_format == "gptq" else 0)
    return {
        "qweight": pack_rows(q.t(), bits),  # (K*b/32, N)
        "qzeros": pack_rows(stored_zero, bits).t().contiguous(),  # (G, N*b/32)
        "scales": scale.t().to(torch.float16).contiguous(),  # (G, N)
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def unpack_zeros(qzeros: torch.Tensor, bits: int, checkpoint_format: str = "gptq") -> torch.Tensor:
    """qzeros (G, N*b/32) -> the zero points (G, N) int32. v1 adds the 1 back without wrapping, as every reader
    does."""
    _check_format(checkpoint_format)
    return unpack_rows(qzeros.t(), bits).t() + (1 if checkpoint_format == "gptq" else 0)


def unpack_gptq(
    tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of pack_gptq: (q (N, K) int32, scale (N, G) as stored, zero (N, G) int32, g_idx (K,) int32)."""
    q = unpack_rows(tensors["qweight"], bits).t()
    zero = unpack_zeros(tensors["qzeros"], bits, checkpoint_format).t()
    return q, tensors["scales"].t(), zero, tensors["g_idx"].to(torch.int32)


def _dequantize_rows(
    qweight: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> torch.Tensor:
    """Weight rows (k, N) in float32 from the packed rows holding k inputs, zero and scale (G, N) in float32 and
    those inputs' g_idx. Exact: a float16 scale times an integer below 2**9 fits float32."""
    g = g_idx.long()
    return (unpack_rows(qweight, bits, torch.float32) - zero[g]) * scale[g]


def dequantize(
    tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight (N, K) the GPTQ tensors stand for, scale[g_idx] * (q - zero[g_idx]), computed in float32 and
    returned as `dtype`."""
    zero = unpack_zeros(tensors["qzeros"], bits, checkpoint_format).float()
    weight = _dequantize_rows(tensors["qweight"], zero, tensors["scales"].float(), tensors["g_idx"], bits)
    return weight.t().to(dtype)


def gptq_config(
    bits: int,
    group_size: int,
    desc_act: bool,
    sym: bool,
    damp_percent: float,
    static_groups: bool = False,
    true_sequential: bool = True,
    checkpoint_format: str = "gptq",
    model_name_or_path: str | None = None,
    model_file_base_name: str | None = None,
) -> dict[str, Any]:
    """The quantize_config.json of a GPTQ checkpoint, which config.json also carries as "quantization_config"
    (where transformers reads it). transformers 5 names the format "format"; both keys are written."""
    _check_bits(bits)
    _check_format(checkpoint_format)
    _check_group_size(group_size)
    config = {
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "damp_percent": damp_percent,
        "sym": sym,
        "static_groups": static_groups,
        "true_sequential": true_sequential,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format,
        "format": checkpoint_format,
    }
    if model_name_or_path is not None:
        config["model_name_or_path"] = model_name_or_path
    if model_file_base_name is not None:
        config["model_file_base_name"] = model_file_base_name
    return config


def checkpoint_format_of(config: dict[str, Any]) -> str:
    """The zero-point convention of a quantize_config.json / quantization_config: "checkpoint_format" (AutoGPTQ,
    GPTQModel) or "format" (transformers 5), "gptq" when neither is there (AutoGPTQ wrote none before v2 existed)."""
    if config.get("quant_method", "gptq") != "gptq":
        raise OrionError(f"not a GPTQ quantization config: quant_method is {config['quant_method']!r}")
    checkpoint_format = config.get("checkpoint_format", config.get("format", "gptq"))
    _check_format(checkpoint_format)
    return checkpoint_format


class QuantLinear(nn.Module):
    """A linear layer stored in the GPTQ format: its state dict is the checkpoint's tensors (qweight, qzeros,
    scales, g_idx and bias, shapes and dtypes as in the module docstring).

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
        _check_bits(bits)
        _check_format(checkpoint_format)
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
            return _dequantize_rows(qweight, zero, scale, self.g_idx[start:stop], self.bits)
        weight = unpack_rows(qweight, self.bits, torch.float32)
        first = 0 if self.group_size == -1 else start // self.group_size
        groups = weight.view(-1, stop - start if self.group_size == -1 else self.group_size, self.out_features)
        groups.sub_(zero[first : first + len(groups), None]).mul_(scale[first : first + len(groups), None])
        return weight

    def _blockwise(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear with W built and multiplied a block of input rows at a time, in float32."""
        zero, scale, in_order = self._group_params()
        unit, _ = _run(self.bits)  # blocks start on a word and, with in_order, on a group
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


STACKS = ("gate_up_proj", "down_proj")
