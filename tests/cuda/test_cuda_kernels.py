"""The GPU kernels against the readable references: flash-linear-attention's gated delta rule (chunked and fused
recurrent, forward and gradients) against orionlm's PyTorch forms, and QuantLinear on CUDA against dequantize
then matmul.

fla's kernels take bf16 inputs and keep some intermediate products in bf16; the reference runs in float32 on the
same (bf16-rounded) inputs. Outputs and states agree to 2e-2 in relative norm (a few 2^-8 roundings per step of
the recurrence, which the decay keeps from accumulating); gradients, which go through the recurrence backwards
and through the chunk's triangular solve, to 5e-2. A wrong kernel is off by ~1."""

import pytest
import torch
import torch.nn.functional as F

from orionlm.nn.gdn import chunk_gated_delta_rule, l2norm, recurrent_gated_delta_rule
from orionlm.quant import QuantLinear

pytestmark = pytest.mark.cuda


@pytest.fixture
def fla():
    """fla's (chunk, fused recurrent) kernels; the test is skipped where fla is not installed."""
    ops = pytest.importorskip("fla.ops.gated_delta_rule", reason="flash-linear-attention (orionlm[fla]) is missing")
    return ops.chunk_gated_delta_rule, ops.fused_recurrent_gated_delta_rule


def rule_inputs(device: torch.device, B=2, T=200, H=4, d_k=64, d_v=128, seed=0):
    """q, k (not normalised: the kernels' in-kernel L2 norm is the layer's), v and beta in bf16, g (log decay <= 0)
    and a starting state in float32, as GatedDeltaNet passes them."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, d_k, generator=gen), torch.randn(B, T, H, d_k, generator=gen)
    v = torch.randn(B, T, H, d_v, generator=gen)
    g = -F.softplus(torch.randn(B, T, H, generator=gen) - 2)
    beta = torch.rand(B, T, H, generator=gen)
    state = torch.randn(B, H, d_k, d_v, generator=gen) * 0.1
    q, k, v, beta = (x.to(device, torch.bfloat16) for x in (q, k, v, beta))
    return q, k, v, g.to(device), beta, state.to(device)


def reference(q, k, v, g, beta, state, chunked: bool):
    """orionlm's float32 form of the same recurrence, from the same bf16 inputs."""
    q, k = l2norm(q.float()), l2norm(k.float())
    v, g, beta = v.float(), g.float(), beta.float()
    if chunked:
        return chunk_gated_delta_rule(q, k, v, g, beta, 64, state, output_final_state=True)
    return recurrent_gated_delta_rule(q, k, v, g, beta, state, output_final_state=True)


def test_fla_chunk_forward_matches_reference(fla, device, relative_error):
    q, k, v, g, beta, state = rule_inputs(device)
    o, final = fla[0](q, k, v, g, beta, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_ref, final_ref = reference(q, k, v, g, beta, state, chunked=True)
    assert o.shape == o_ref.shape and final.shape == final_ref.shape
    assert relative_error(o, o_ref) < 2e-2 and relative_error(final, final_ref) < 2e-2


def test_fla_recurrent_decode_matches_reference(fla, device, relative_error):
    """The fused recurrent kernel as decoding runs it: one token at a time from a state, 16 steps."""
    q, k, v, g, beta, state = rule_inputs(device, T=16)
    s, outputs = state, []
    for t in range(16):
        o, s = fla[1](q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], g[:, t : t + 1], beta[:, t : t + 1],
                      initial_state=s, output_final_state=True, use_qk_l2norm_in_kernel=True)  # fmt: skip
        outputs.append(o)
    o_ref, final_ref = reference(q, k, v, g, beta, state, chunked=False)
    assert relative_error(torch.cat(outputs, 1), o_ref) < 2e-2 and relative_error(s, final_ref) < 2e-2


def test_fla_chunk_gradients_match_reference(fla, device, relative_error):
    inputs = rule_inputs(device, T=130)
    leaves = [x.detach().requires_grad_() for x in inputs]
    gen = torch.Generator().manual_seed(1)
    o_grad, s_grad = (torch.randn(inputs[i].shape, generator=gen).to(device) for i in (2, 5))  # v's shape is o's
    o, final = fla[0](*leaves[:5], initial_state=leaves[5], output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.autograd.backward([o.float(), final.float()], [o_grad, s_grad])
    ref_leaves = [x.detach().float().requires_grad_() for x in inputs]
    o_ref, final_ref = reference(*ref_leaves, chunked=True)
    torch.autograd.backward([o_ref, final_ref], [o_grad, s_grad])
    for name, leaf, ref in zip(("q", "k", "v", "g", "beta", "state"), leaves, ref_leaves, strict=True):
        assert relative_error(leaf.grad, ref.grad) < 5e-2, name


@pytest.mark.parametrize("bits, act_order", [(2, False), (3, True), (4, False), (4, True), (8, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quant_linear_matches_dequantize_then_matmul(bits, act_order, dtype, device, float32_cuda, relative_error):
    """QuantLinear's forward on the GPU against the CPU's dequantized weight times x in float64: float32 to 1e-5;
    fp16 (11 significant bits) to 5e-3 and bf16 (8) to 2e-2, the rounding of x, W and a K=256 sum of products."""
    N, K, group_size = 96, 256, 64
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(0, 2**bits, (N, K), generator=gen, dtype=torch.int32)
    zero = torch.randint(1, 2**bits, (N, K // group_size), generator=gen, dtype=torch.int32)
    scale = torch.rand(N, K // group_size, generator=gen) * 0.02 + 0.005
    g_idx = torch.arange(K, dtype=torch.int32) // group_size
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    bias = torch.randn(N, generator=gen).half()
    layer = QuantLinear.from_codes(q, scale, zero, g_idx, bits, group_size, bias)
    weight = layer.dequantize(torch.float64)
    x = torch.randn(3, 5, K, generator=gen)
    gpu = layer.to(device).to(dtype)  # a model-wide .to(dtype): the format's fp16 scales must stay fp16
    assert gpu.scales.dtype == torch.float16 and gpu.qweight.device.type == device.type
    y = gpu(x.to(device, dtype))
    expected = x.to(dtype).double() @ weight.t() + bias.double()
    assert y.dtype == dtype and y.shape == (3, 5, N)
    tolerance = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}[dtype]
    assert relative_error(y, expected) < tolerance
    gpu.keep_dequantized = True
    assert relative_error(gpu(x.to(device, dtype)), expected) < tolerance
