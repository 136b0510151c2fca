"""The GPTQ checkpoint format of AutoGPTQ / GPTQModel (what transformers, vLLM and the GPTQ kernels load): packing
and unpacking its bits, dequantizing, and its quantize_config.json. The layers that hold it are in quant.linear.

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
from typing import Any

import torch

from ..errors import OrionError
from .gptq import BITS

FORMATS = ("gptq", "gptq_v2")
WORD = 32


def check_bits(bits: int) -> None:
    if bits not in BITS:
        raise OrionError(f"GPTQ bits must be one of {BITS}; got {bits!r}")


def check_format(checkpoint_format: str) -> None:
    if checkpoint_format not in FORMATS:
        raise OrionError(f"GPTQ checkpoint_format must be one of {FORMATS}; got {checkpoint_format!r}")


def bit_run(bits: int) -> tuple[int, list[tuple[int, int]]]:
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
    check_bits(bits)
    L, M = values.shape
    if L * bits % WORD:
        raise OrionError(
            f"cannot pack {L} values of {bits} bits into 32-bit words: {L} * {bits} is not a multiple of 32"
        )
    length, slots = bit_run(bits)
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
    check_bits(bits)
    R, M = packed.shape
    length, slots = bit_run(bits)
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
    check_bits(bits)
    check_format(checkpoint_format)
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
    check_format(checkpoint_format)
    return unpack_rows(qzeros.t(), bits).t() + (1 if checkpoint_format == "gptq" else 0)


def unpack_gptq(
    tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of pack_gptq: (q (N, K) int32, scale (N, G) as stored, zero (N, G) int32, g_idx (K,) int32)."""
    q = unpack_rows(tensors["qweight"], bits).t()
    zero = unpack_zeros(tensors["qzeros"], bits, checkpoint_format).t()
    return q, tensors["scales"].t(), zero, tensors["g_idx"].to(torch.int32)


def dequantize_rows(
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
    weight = dequantize_rows(tensors["qweight"], zero, tensors["scales"].float(), tensors["g_idx"], bits)
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
    check_bits(bits)
    check_format(checkpoint_format)
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
    GPTQModel) or "format" (transformers 5), "gptq" when neither is there (AutoGPTQ wrote none before v2 existed)
    but for AutoGPTQ's "is_marlin_format" (a layout this reader refuses)."""
    if config.get("quant_method", "gptq") != "gptq":
        raise OrionError(f"not a GPTQ quantization config: quant_method is {config['quant_method']!r}")
    unnamed = "marlin" if config.get("is_marlin_format") else "gptq"
    checkpoint_format = config.get("checkpoint_format", config.get("format", unnamed))
    check_format(checkpoint_format)
    return checkpoint_format
