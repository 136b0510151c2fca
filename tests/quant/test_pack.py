"""The GPTQ checkpoint format: bit layouts checked against Python integers and hand-computed words, exact round
trips, the v1/v2 zero-point convention, QuantLinear's paths against F.linear on the dequantized weight, and
AutoGPTQ's own packing when it is installed."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from orionlm.errors import OrionError
from orionlm.quant.linear import CODES_ROWS, QuantLinear
from orionlm.quant.pack import (
    checkpoint_format_of,
    default_g_idx,
    dequantize,
    gptq_config,
    pack_gptq,
    pack_rows,
    unpack_gptq,
    unpack_rows,
)

BITS = [2, 3, 4, 8]
HAS_INT4_KERNEL = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int32(word: int) -> int:
    """An unsigned 32-bit word as the int32 that holds the same bits."""
    return word - 2**32 if word >= 2**31 else word


def quantized(N, K, bits, group_size, act_order=False, seed=0, min_zero=1):
    """A random quantized weight as GPTQ produces it: q (N, K), scale (N, G) float16-exact, zero (N, G), g_idx."""
    gen = torch.Generator().manual_seed(seed)
    G = 1 if group_size == -1 else -(-K // group_size)
    q = torch.randint(0, 2**bits, (N, K), generator=gen, dtype=torch.int32)
    scale = (torch.rand(N, G, generator=gen) * 0.02 + 1e-3).half().float()
    zero = torch.randint(min_zero, 2**bits, (N, G), generator=gen, dtype=torch.int32)
    g_idx = default_g_idx(K, group_size)
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    return q, scale, zero, g_idx


def reference_weight(q, scale, zero, g_idx):
    """scale[g] * (q - zero[g]) per column, straight from the unpacked values."""
    g = g_idx.long()
    return scale[:, g] * (q - zero[:, g]).float()


@pytest.mark.parametrize("bits", BITS)
def test_pack_rows_is_a_little_endian_bit_stream(bits):
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 3), generator=gen)
    packed = pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (64 * bits // 32, 3)
    for column in range(3):
        stream = sum(int(v) << (bits * i) for i, v in enumerate(values[:, column]))  # value i at bit bits*i
        words = [int32((stream >> (32 * w)) & (2**32 - 1)) for w in range(64 * bits // 32)]
        assert packed[:, column].tolist() == words
    assert torch.equal(unpack_rows(packed, bits), values.int())


def test_3bit_layout_by_hand():
    # AutoGPTQ's 3-bit scheme: 32 values fill 3 words; word 0 holds values 0-9 at bits 3j and the low 2 bits of
    # value 10 at bits 30-31; word 1 holds value 10's top bit at bit 0, values 11-20 at bits 3(j-11)+1 and the low
    # bit of value 21 at bit 31; word 2 holds value 21's top 2 bits at bits 0-1 and values 22-31 at 3(j-22)+2.
    # With value 0 = 1, value 10 = 0b101, value 11 = 0b011, value 21 = 0b101, value 31 = 0b111, all others 0:
    #   word 0 = 1 (value 0) + 1 << 30 (value 10's bits 0-1 = 0b01)        = 0x40000001
    #   word 1 = 1 (value 10's bit 2) + 3 << 1 (value 11) + 1 << 31 (value 21's bit 0) = 0x80000007
    #   word 2 = 0b10 (value 21's bits 1-2) + 7 << 29 (value 31)            = 0xE0000002
    values = torch.zeros(32, 1, dtype=torch.int32)
    values[[0, 10, 11, 21, 31], 0] = torch.tensor([1, 0b101, 0b011, 0b101, 0b111], dtype=torch.int32)
    packed = pack_rows(values, 3)
    assert packed[:, 0].tolist() == [int32(0x40000001), int32(0x80000007), int32(0xE0000002)]
    assert torch.equal(unpack_rows(packed, 3), values)


def test_4bit_layout_by_hand():
    # 8 values per word, value j in bits 4j..4j+3: [1..8] -> 0x87654321, eight 15s -> 0xFFFFFFFF (-1),
    # and [0, 1, 0, 0, 0, 0, 0, 0] -> 0x00000010.
    values = torch.zeros(16, 2, dtype=torch.int32)
    values[:8, 0] = torch.arange(1, 9)
    values[8, 0] = 0
    values[9, 0] = 1
    values[:8, 1] = 15
    packed = pack_rows(values, 4)
    assert packed.tolist() == [[int32(0x87654321), -1], [0x10, 0]]
    assert torch.equal(unpack_rows(packed, 4), values)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize(
    "N, K, group_size, act_order",
    [(64, 128, 32, False), (64, 128, -1, False), (32, 96, 64, False), (64, 128, 32, True), (32, 160, 48, True)],
)
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_round_trip_is_exact(bits, N, K, group_size, act_order, checkpoint_format):
    q, scale, zero, g_idx = quantized(N, K, bits, group_size, act_order)
    tensors = pack_gptq(q, scale, zero, g_idx, bits, checkpoint_format)
    G = scale.shape[1]
    expected = {
        "qweight": ((K * bits // 32, N), torch.int32),
        "qzeros": ((G, N * bits // 32), torch.int32),
        "scales": ((G, N), torch.float16),
        "g_idx": ((K,), torch.int32),
    }
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == expected
    q2, scale2, zero2, g_idx2 = unpack_gptq(tensors, bits, checkpoint_format)
    assert torch.equal(q2, q) and torch.equal(zero2, zero) and torch.equal(g_idx2, g_idx)
    assert torch.equal(scale2.float(), scale)
    weight = dequantize(tensors, bits, checkpoint_format)
    assert torch.equal(weight, reference_weight(q, scale, zero, g_idx))


@pytest.mark.parametrize("bits", BITS)
def test_v1_stores_zero_minus_one_and_v2_the_zero(bits):
    q, scale, zero, g_idx = quantized(32, 64, bits, 32)
    v1 = pack_gptq(q, scale, zero, g_idx, bits, "gptq")
    v2 = pack_gptq(q, scale, zero, g_idx, bits, "gptq_v2")
    assert torch.equal(unpack_rows(v1["qzeros"].t(), bits), zero - 1)  # (N, G) fields
    assert torch.equal(unpack_rows(v2["qzeros"].t(), bits), zero)
    assert torch.equal(v1["qweight"], v2["qweight"])
    assert torch.equal(unpack_gptq(v1, bits, "gptq_v2")[2], zero - 1)  # the format decides how fields read


def test_v1_zeros_by_hand():
    # 4-bit zero points 1..8 of eight outputs: v1 stores 0..7 -> 0x76543210, v2 stores 1..8 -> 0x87654321.
    q = torch.zeros(8, 8, dtype=torch.int32)
    zero = torch.arange(1, 9, dtype=torch.int32)[:, None]
    scale = torch.ones(8, 1)
    assert pack_gptq(q, scale, zero, default_g_idx(8, -1), 4, "gptq")["qzeros"].tolist() == [[0x76543210]]
    assert pack_gptq(q, scale, zero, default_g_idx(8, -1), 4, "gptq_v2")["qzeros"].tolist() == [[int32(0x87654321)]]


def test_zero_point_zero_needs_v2():
    q, scale, zero, g_idx = quantized(32, 64, 4, 32, min_zero=0)
    zero[3, 1] = 0
    with pytest.raises(OrionError, match="zero point"):
        pack_gptq(q, scale, zero, g_idx, 4, "gptq")
    q2, _, zero2, _ = unpack_gptq(pack_gptq(q, scale, zero, g_idx, 4, "gptq_v2"), 4, "gptq_v2")
    assert torch.equal(zero2, zero) and torch.equal(q2, q)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, s, z, g: (q[:, :60], s, z, g[:60]), "in_features"),  # 60 * 3 bits is not a multiple of 32
        (lambda q, s, z, g: (q[:20], s[:20], z[:20], g), "out_features"),  # 20 * 3 bits
        (lambda q, s, z, g: (q + 8, s, z, g), "q must hold"),
        (lambda q, s, z, g: (q, s, z + 8, g), "zero must hold"),
        (lambda q, s, z, g: (q, s, z, g + 2), "g_idx must hold"),
        (lambda q, s, z, g: (q, s[:, :1], z, g), "scale and zero"),
        (lambda q, s, z, g: (q.float(), s, z, g), "q must hold"),
    ],
)
def test_shapes_and_values_the_format_cannot_hold(change, message):
    q, scale, zero, g_idx = quantized(32, 64, 3, 32)
    with pytest.raises(OrionError, match=message):
        pack_gptq(*change(q, scale, zero, g_idx), 3)
    with pytest.raises(OrionError, match="bits"):
        pack_gptq(q, scale, zero, g_idx, 5)


def layer(N=64, K=128, bits=4, group_size=32, act_order=False, bias=True, seed=0, sym=False, **kwargs):
    q, scale, zero, g_idx = quantized(N, K, bits, group_size, act_order, seed)
    if sym:  # symmetric quantization's zero point
        zero.fill_(2 ** (bits - 1))
    linear = torch.nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        if bias:
            linear.bias.copy_(torch.randn(N).half())
    module = QuantLinear.from_codes(q, scale, zero, g_idx, bits, group_size, linear.bias, **kwargs)
    return module, reference_weight(q, scale, zero, g_idx), None if not bias else linear.bias.half().float()


def test_state_dict_is_the_checkpoint():
    module, _, _ = layer(N=64, K=96, bits=3, group_size=64)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
    assert shapes == {
        "qweight": ((96 * 3 // 32, 64), torch.int32),
        "qzeros": ((2, 64 * 3 // 32), torch.int32),
        "scales": ((2, 64), torch.float16),
        "g_idx": ((96,), torch.int32),
        "bias": ((64,), torch.float16),
    }
    assert (module.in_features, module.out_features, module.bits, module.group_size) == (96, 64, 3, 64)
    assert "bits=3, group_size=64, bias=True, checkpoint_format=gptq" in repr(module)
    no_bias = QuantLinear(128, 32, 2, -1)
    assert "bias" not in no_bias.state_dict() and no_bias.scales.shape == (1, 32)
    assert torch.equal(no_bias.g_idx, torch.zeros(128, dtype=torch.int32))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size, act_order", [(32, False), (-1, False), (32, True)])
def test_forward_equals_f_linear_on_the_dequantized_weight(bits, group_size, act_order):
    module, weight, bias = layer(bits=bits, group_size=group_size, act_order=act_order)
    x = torch.randn(3, CODES_ROWS, 128)  # more rows than decoding: F.linear on the dequantized weight
    dequantized = module.dequantize()
    assert torch.equal(dequantized, weight)
    assert torch.equal(module(x), F.linear(x, dequantized, bias)) and module._cache is None


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size, act_order, sym", [(32, False, False), (-1, False, True), (32, True, False),
                                                        (64, False, True)])  # fmt: skip
def test_float32_decoding_reads_the_codes_from_qweight(bits, group_size, act_order, sym):
    module, weight, bias = layer(N=96, bits=bits, group_size=group_size, act_order=act_order, sym=sym)
    from_bytes = bits != 3 and not act_order  # 3-bit codes straddle bytes; act-order groups are not runs
    for rows in (1, 4, CODES_ROWS):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows), requires_grad=True)
        y = module(x)
        assert (module._cache[1] is not None) == from_bytes
        exact = F.linear(x.detach().double(), weight.double(), bias.double())
        # uncentred codes: per-group sums of x * scale * q minus the zero term, so the rounding scales with
        # |x| times the largest |scale * q|; measured worst 0.5 float32 epsilon (2**-23) of that, F.linear's own
        # (the fallbacks) up to 1.3
        largest = 2**bits * module.scales.float().max().item()
        assert (y.double() - exact).abs().max() <= 2**-21 * largest * x.detach().abs().sum(-1).max()
        y.backward(torch.ones_like(y))  # the gradient of x is the weight's column sums (measured worst 1.5 eps)
        assert (x.grad.double() - weight.double().sum(0)).abs().max() <= 2**-22 * largest * module.out_features


@pytest.mark.parametrize("bits, group_size", [(8, 32), (4, 64), (2, -1)])
def test_float32_decoding_keeps_no_copy_of_the_codes(bits, group_size):
    module, _, _ = layer(N=96, K=256, bits=bits, group_size=group_size)
    module(torch.randn(2, 256))
    groups = module.scales.shape[0]
    cached = module._cache[1]  # the float32 scales and zero terms (G, N): 8 / group_size bytes per weight
    assert [tuple(t.shape) for t in cached] == [(groups, 96)] * 2
    assert sum(t.numel() * t.element_size() for t in cached) == 8 * groups * 96 < 256 * 96
    assert all(t.untyped_storage().data_ptr() != module.qweight.untyped_storage().data_ptr() for t in cached)


def test_float32_decoding_falls_back_where_the_groups_do_not_tile_the_inputs():
    module, _, bias = layer(N=64, K=128, bits=4, group_size=48)  # groups of 48, 48 and 32
    x = torch.randn(2, 128)
    assert torch.equal(module(x), F.linear(x, module.dequantize(), bias)) and module._cache[1] is None


def test_float32_decoding_falls_back_for_a_qweight_whose_words_are_not_contiguous():
    module, weight, bias = layer(bits=8)
    module.qweight = module.qweight.t().contiguous().t()  # the same words, column-major: no byte view
    x = torch.randn(2, 128)
    assert torch.equal(module.dequantize(), weight)
    assert torch.equal(module(x), F.linear(x, module.dequantize(), bias)) and module._cache[1] is None


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size, act_order", [(32, False), (-1, False), (64, True), (48, False), (80, False)])
@pytest.mark.parametrize("rows", [3, CODES_ROWS + 1])
def test_blockwise_cpu_paths_equal_f_linear(monkeypatch, bits, group_size, act_order, rows):
    # blocks of 64 inputs, several per layer: from qweight's bytes a block of groups at a time (decoding rows,
    # 2-, 4- and 8-bit, groups that tile 192 inputs in order), else by unpacking a block of rows at a time
    monkeypatch.setattr("orionlm.quant.linear.DEQUANT_BLOCK", 64 * 64)
    module, weight, bias = layer(N=64, K=192, bits=bits, group_size=group_size, act_order=act_order)
    x = torch.randn(rows, 192)
    # blocks of 64 inputs sum in another order than one matmul: float32 rounding of a 192-term sum apart
    torch.testing.assert_close(module(x), F.linear(x, weight, bias), atol=5e-5, rtol=1e-5)
    from_bytes = rows <= CODES_ROWS and bits != 3 and not act_order and group_size != 80
    assert (module._cache is not None and module._cache[1] is not None) == from_bytes
    assert torch.equal(module.dequantize(), weight)


def test_keep_dequantized_is_rebuilt_when_the_buffers_change():
    module, weight, bias = layer()
    module.keep_dequantized = True
    other, other_weight, other_bias = layer(seed=1)
    x = torch.randn(4, 128)
    assert torch.equal(module(x), F.linear(x, module.dequantize(), bias)) and module._cache[0][0] == "dense"
    module.load_state_dict(other.state_dict())
    assert torch.equal(module.dequantize(), other_weight)
    assert torch.equal(module(x), F.linear(x, module.dequantize(), other_bias))


@pytest.mark.skipif(not HAS_INT4_KERNEL, reason="this torch has no CPU int4 kernel")
@pytest.mark.parametrize("bits, group_size, act_order", [(4, 32, False), (4, 64, True), (4, -1, False), (3, 32, True),
                                                        (2, 128, False), (8, 32, False), (8, 64, True), (8, -1, False),
                                                        (4, 96, False)])  # fmt: skip
def test_bf16_cpu_int4_kernel_path(bits, group_size, act_order):
    K = 192 if group_size == 96 else 128  # groups of 96 run as the kernel's groups of 32 with repeated scales
    module, weight, bias = layer(N=64, K=K, bits=bits, group_size=group_size, act_order=act_order)
    x = torch.randn(3, K, generator=torch.Generator().manual_seed(0))
    y = module(x.bfloat16())
    assert y.dtype == torch.bfloat16 and module._cache[0][0] == "int4" and module._cache[1] is not None
    # bf16 activations, scales and offsets: a few bf16 roundings of outputs of size ~1 (over 50 inputs the
    # worst is 2.6 times the error of a bf16 product with the exact weight)
    exact = F.linear(x, weight, bias)
    size = exact.abs().max().item() / 4  # ~1 for 2-4 bits; 8-bit codes make weights and outputs 16 times larger
    torch.testing.assert_close(y.float(), exact, atol=2e-2 * size, rtol=2e-2)
    reference = F.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16()).float()
    assert (y.float() - F.linear(x, weight, bias)).abs().max() <= 3 * (
        reference - F.linear(x, weight, bias)
    ).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_reaches_the_input(dtype):
    module, weight, _ = layer()
    x = torch.randn(3, 128, dtype=dtype, requires_grad=True)
    module(x).sum().backward()
    torch.testing.assert_close(x.grad.float(), weight.sum(0).expand(3, -1), atol=2e-2, rtol=1e-2)


def test_bf16_falls_back_where_the_int4_kernel_cannot_run():
    module, weight, bias = layer(N=40, K=128, bits=4, group_size=16)  # N % 16 and the group size rule it out
    x = torch.randn(3, 128).bfloat16()
    assert torch.equal(module(x), F.linear(x, weight.bfloat16(), bias.bfloat16()))


def test_save_load_and_to_dtype(tmp_path):
    module, weight, bias = layer(bits=3, group_size=32, act_order=True)
    save_file(module.state_dict(), tmp_path / "layer.safetensors")
    loaded = QuantLinear(128, 64, 3, 32, bias=True)
    loaded.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(2, 128)
    assert torch.equal(loaded.dequantize(), weight)
    torch.testing.assert_close(loaded(x), F.linear(x, loaded.dequantize(), bias), atol=1e-5, rtol=1e-5)
    loaded.to(torch.bfloat16)  # a model-wide cast must leave the stored format alone
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == {
        "qweight": torch.int32,
        "qzeros": torch.int32,
        "scales": torch.float16,
        "g_idx": torch.int32,
        "bias": torch.float16,
    }
    assert torch.equal(loaded.dequantize(), weight)


def test_gptq_config_and_checkpoint_format():
    config = gptq_config(4, 128, desc_act=True, sym=True, damp_percent=0.01, model_name_or_path="out")
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == config["format"] == "gptq"
    assert {"bits", "group_size", "desc_act", "damp_percent", "sym", "static_groups", "true_sequential"} <= set(config)
    assert checkpoint_format_of(config) == "gptq"
    assert checkpoint_format_of({"bits": 4}) == "gptq"  # old AutoGPTQ configs name no format
    assert checkpoint_format_of({"quant_method": "gptq", "format": "gptq_v2"}) == "gptq_v2"
    with pytest.raises(OrionError, match="quant_method"):
        checkpoint_format_of({"quant_method": "awq"})
    with pytest.raises(OrionError, match="checkpoint_format"):
        checkpoint_format_of({"checkpoint_format": "marlin"})


def autogptq_quant_linear():
    """AutoGPTQ's QuantLinear (qlinear_cuda: pack and a torch fallback forward), loaded from its file: the
    package's __init__ imports transformers internals that transformers 5 no longer has."""
    spec = importlib.util.find_spec("auto_gptq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("auto_gptq is not installed")
    path = Path(spec.submodule_search_locations[0]) / "nn_modules" / "qlinear" / "qlinear_cuda.py"
    module_spec = importlib.util.spec_from_file_location("autogptq_qlinear_cuda", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.QuantLinear


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size, act_order", [(32, False), (-1, False), (32, True)])
def test_matches_autogptq(bits, group_size, act_order):
    AutoQuantLinear = autogptq_quant_linear()
    q, scale, zero, g_idx = quantized(64, 128, bits, group_size, act_order)
    weight = reference_weight(q, scale, zero, g_idx)
    linear = torch.nn.Linear(128, 64, bias=False)
    linear.weight.data = weight
    theirs = AutoQuantLinear(bits, group_size, 128, 64, False)
    theirs.pack(linear, scale.clone(), zero.clone(), g_idx.clone())  # recovers q by rounding the exact weight
    theirs.scales = theirs.scales.half()  # it keeps the linear's dtype; checkpoints come from float16 models
    ours = pack_gptq(q, scale, zero, g_idx, bits)
    for name in ("qweight", "qzeros", "scales"):
        assert getattr(theirs, name).dtype == ours[name].dtype and torch.equal(getattr(theirs, name), ours[name]), name
    theirs.g_idx = ours["g_idx"]
    assert torch.equal(theirs(torch.eye(128).half()), dequantize(ours, bits).t().half())  # their unpacking
