"""Gated DeltaNet: the chunked form equals the step-by-step loop and transformers' Qwen3-Next torch
implementation (functions and the whole layer with mapped weights); prefill + decode from a state
equals one full forward; gradients of both forms agree."""

import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen3NextConfig
from transformers.models.qwen3_next import modeling_qwen3_next as qwen3_next

from orionlm.errors import OrionError
from orionlm.nn.gdn import GatedDeltaNet, chunk_gated_delta_rule, recurrent_gated_delta_rule
from orionlm.nn.linear import use_decode_layout

TOL = 1e-5


def rule_inputs(B=2, T=37, H=3, d_k=16, d_v=32, decay_scale=1.0, seed=0):
    """q, k (unit norm, as the layer gives them), v, g (log decay <= 0), beta in (0, 1), a state."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, d_k, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, d_k, generator=gen), dim=-1)
    v = torch.randn(B, T, H, d_v, generator=gen)
    g = -decay_scale * F.softplus(torch.randn(B, T, H, generator=gen))
    beta = torch.rand(B, T, H, generator=gen)
    state = torch.randn(B, H, d_k, d_v, generator=gen)
    return q, k, v, g, beta, state


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "T, chunk_size, with_state",
    [(1, 64, False), (37, 16, True), (64, 64, False), (130, 64, True), (200, 32, False)],
)
def test_chunked_equals_recurrent_and_transformers(T: int, chunk_size: int, with_state: bool) -> None:
    q, k, v, g, beta, state = rule_inputs(T=T)
    state = state if with_state else None
    o_chunk, s_chunk = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size, state, output_final_state=True)
    o_rec, s_rec = recurrent_gated_delta_rule(q, k, v, g, beta, state, output_final_state=True)
    # transformers' functions take the same (B, T, H, D) layout and scale q by d_k^-1/2 themselves; q and k
    # are already unit vectors here, so their in-kernel L2 norm stays off.
    o_hf_chunk, s_hf_chunk = qwen3_next.torch_chunk_gated_delta_rule(
        q, k, v, g, beta, chunk_size=64, initial_state=state, output_final_state=True
    )
    o_hf_rec, s_hf_rec = qwen3_next.torch_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=state, output_final_state=True
    )
    assert o_chunk.shape == (2, T, 3, 32) and s_chunk.shape == (2, 3, 16, 32)
    for o, s in [(o_rec, s_rec), (o_hf_chunk, s_hf_chunk), (o_hf_rec, s_hf_rec)]:
        assert max_diff(o_chunk, o) < TOL and max_diff(s_chunk, s) < TOL
    assert max_diff(o_rec, o_hf_rec) < TOL


def test_strong_decay_stays_finite() -> None:
    """Log decays down to about -60 per step: the masked exp must not overflow above the diagonal."""
    q, k, v, g, beta, state = rule_inputs(T=128, decay_scale=20.0)
    o_chunk, s_chunk = chunk_gated_delta_rule(q, k, v, g, beta, 64, state, output_final_state=True)
    o_rec, s_rec = recurrent_gated_delta_rule(q, k, v, g, beta, state, output_final_state=True)
    assert torch.isfinite(o_chunk).all() and g.min() < -40
    assert max_diff(o_chunk, o_rec) < TOL and max_diff(s_chunk, s_rec) < TOL


def test_bfloat16_inputs_recur_in_float32() -> None:
    """The recurrence runs in float32: bf16 inputs give exactly the float32 result on the same values,
    rounded once at the end, and a float32 state."""
    q, k, v, g, beta, state = (x.bfloat16() for x in rule_inputs(T=70))
    for rule in (chunk_gated_delta_rule, recurrent_gated_delta_rule):
        o, s = rule(q, k, v, g, beta, initial_state=state, output_final_state=True)
        o32, s32 = rule(*(x.float() for x in (q, k, v, g, beta)), initial_state=state.float(), output_final_state=True)
        assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
        assert torch.equal(o, o32.bfloat16()) and torch.equal(s, s32)


def test_chunked_gradients_equal_recurrent() -> None:
    inputs = [x.requires_grad_() for x in rule_inputs(T=45)]
    weights = torch.randn(2, 45, 3, 32), torch.randn(2, 3, 16, 32)

    def grads(rule, **kwargs):
        o, s = rule(*inputs[:5], initial_state=inputs[5], output_final_state=True, **kwargs)
        return torch.autograd.grad((o * weights[0]).sum() + (s * weights[1]).sum(), inputs)

    for name, a, b in zip("q k v g beta state".split(), grads(chunk_gated_delta_rule, chunk_size=16),
                          grads(recurrent_gated_delta_rule), strict=True):  # fmt: skip
        assert a.abs().max() > 1e-2, name
        assert max_diff(a, b) < 1e-4 * max(1.0, b.abs().max().item()), name


def make_layer(use_gate=True, use_short_conv=True, chunk_size=16, seed=0) -> GatedDeltaNet:
    torch.manual_seed(seed)
    layer = GatedDeltaNet(48, num_heads=3, head_dim=16, expand_v=2, conv_kernel=4, use_gate=use_gate,
                          use_short_conv=use_short_conv, chunk_size=chunk_size)  # fmt: skip
    with torch.no_grad():
        layer.o_norm.weight.uniform_(0.5, 1.5)  # not the ones it starts at, so the mapping of it is tested
    return layer


def qwen3_next_layer(layer: GatedDeltaNet) -> torch.nn.Module:
    """transformers' Qwen3NextGatedDeltaNet holding our layer's weights. Its fused projections group the
    rows per head: in_proj_qkvz as (heads, [q, k, v, z]) with z our g_proj, in_proj_ba as (heads, [b, a]);
    its single conv1d runs over q|k|v concatenated (our three convs stacked)."""
    H, d_k, d_v, hidden = layer.num_heads, layer.head_k_dim, layer.head_v_dim, layer.o_proj.out_features
    config = Qwen3NextConfig(
        hidden_size=hidden, linear_num_key_heads=H, linear_num_value_heads=H, linear_key_head_dim=d_k,
        linear_value_head_dim=d_v, linear_conv_kernel_dim=layer.conv_kernel, rms_norm_eps=layer.o_norm.eps,
        hidden_act="silu", num_hidden_layers=1, layer_types=["linear_attention"],
    )  # fmt: skip
    ref = qwen3_next.Qwen3NextGatedDeltaNet(config, layer_idx=0)
    heads = lambda proj, d: proj.weight.view(H, d, hidden)
    with torch.no_grad():
        qkvz = [heads(layer.q_proj, d_k), heads(layer.k_proj, d_k), heads(layer.v_proj, d_v), heads(layer.g_proj, d_v)]
        ref.in_proj_qkvz.weight.copy_(torch.cat(qkvz, dim=1).reshape(-1, hidden))
        ref.in_proj_ba.weight.copy_(torch.stack([layer.b_proj.weight, layer.a_proj.weight], dim=1).reshape(-1, hidden))
        ref.conv1d.weight.copy_(torch.cat([layer.q_conv1d.weight, layer.k_conv1d.weight, layer.v_conv1d.weight]))
        ref.A_log.copy_(layer.A_log)
        ref.dt_bias.copy_(layer.dt_bias)
        ref.norm.weight.copy_(layer.o_norm.weight)
        ref.out_proj.weight.copy_(layer.o_proj.weight)
    return ref


@pytest.mark.parametrize("T, chunk_size", [(45, 16), (45, 64), (1, 64)])
def test_layer_matches_qwen3_next(T: int, chunk_size: int) -> None:
    layer = make_layer(chunk_size=chunk_size)
    ref = qwen3_next_layer(layer)
    x = torch.randn(2, T, 48)
    with torch.no_grad():
        ours, theirs = layer(x), ref(x)
    assert theirs.abs().max() > 1e-2
    assert max_diff(ours, theirs) < TOL


@pytest.mark.parametrize("use_gate, use_short_conv", [(True, True), (False, True), (True, False)])
def test_prefill_then_decode_equals_full_forward(use_gate: bool, use_short_conv: bool) -> None:
    layer = make_layer(use_gate, use_short_conv)
    x = torch.randn(2, 50, 48)
    with torch.no_grad():
        full = layer(x)
        whole = layer.new_state(2)
        layer(x, whole)
        state = layer.new_state(2)
        pieces = [layer(x[:, :2], state), layer(x[:, 2:21], state), layer(x[:, 21:40], state)]  # chunked prefill
        pieces += [layer(x[:, t : t + 1], state) for t in range(40, 50)]  # recurrent decode
    assert max_diff(torch.cat(pieces, dim=1), full) < TOL
    assert state.recurrent.dtype == torch.float32 and max_diff(state.recurrent, whole.recurrent) < TOL
    if use_short_conv:
        assert state.conv.shape == (2, 2 * 48 + 96, 3) and max_diff(state.conv, whole.conv) < TOL
        assert max_diff(state.conv[:, :48], layer.q_proj(x[:, -3:]).transpose(1, 2)) < TOL  # the last 3 q inputs
    else:
        assert state.conv is None


def test_zero_state_equals_no_state_and_modes_agree() -> None:
    layer = make_layer()
    x = torch.randn(2, 40, 48)
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(layer(x, layer.new_state(2)), out)
        assert max_diff(layer(x, mode="recurrent"), out) < TOL


def test_layer_gradients_chunked_equal_recurrent() -> None:
    layer = make_layer()
    x = torch.randn(2, 40, 48)
    grads = []
    for mode in ("chunk", "recurrent"):
        layer.zero_grad()
        layer(x, mode=mode).pow(2).sum().backward()
        grads.append({name: p.grad.clone() for name, p in layer.named_parameters()})
    assert grads[0].keys() == dict(layer.named_parameters()).keys()
    for name, g in grads[0].items():
        assert g.abs().max() > 1e-4, name  # every parameter learns, the decay ones included
        assert max_diff(g, grads[1][name]) < 1e-4 * max(1.0, g.abs().max().item()), name


def test_select_keeps_rows() -> None:
    layer = make_layer()
    x = torch.randn(3, 12, 48)
    with torch.no_grad():
        state, pair = layer.new_state(3), layer.new_state(2)
        layer(x[:, :11], state)
        layer(x[[0, 2], :11], pair)
        state.select(torch.tensor([0, 2]))
        assert max_diff(layer(x[[0, 2], 11:], state), layer(x[[0, 2], 11:], pair)) < TOL


def test_decode_layout_keeps_outputs() -> None:
    """use_decode_layout packs the six input projections into one column-major matrix."""
    layer = make_layer()
    x = torch.randn(1, 9, 48)
    with torch.no_grad():
        before = layer(x)
        use_decode_layout(layer)
        assert layer.packed is not None and layer.packed.sizes == [48, 48, 96, 3, 3, 96]
        state = layer.new_state(1)
        after = torch.cat([layer(x[:, :5], state)] + [layer(x[:, t : t + 1], state) for t in range(5, 9)], dim=1)
    assert max_diff(after, before) < TOL


def test_tensor_names_shapes_and_init() -> None:
    """fla's GatedDeltaNet names and shapes (Auron's checkpoints), and its decay initialisation."""
    layer = GatedDeltaNet(64, num_heads=4, head_dim=16)
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes == {
        "q_proj.weight": (64, 64), "k_proj.weight": (64, 64), "v_proj.weight": (128, 64),
        "a_proj.weight": (4, 64), "b_proj.weight": (4, 64), "g_proj.weight": (128, 64),
        "q_conv1d.weight": (64, 1, 4), "k_conv1d.weight": (64, 1, 4), "v_conv1d.weight": (128, 1, 4),
        "A_log": (4,), "dt_bias": (4,), "o_norm.weight": (32,), "o_proj.weight": (64, 128),
    }  # fmt: skip
    bare = GatedDeltaNet(64, num_heads=4, head_dim=16, use_gate=False, use_short_conv=False)
    assert set(bare.state_dict()) == set(shapes) - {"g_proj.weight", "q_conv1d.weight", "k_conv1d.weight",
                                                    "v_conv1d.weight"}  # fmt: skip
    torch.manual_seed(0)
    many = GatedDeltaNet(8, num_heads=512, head_dim=4)
    A, dt = many.A_log.exp(), F.softplus(many.dt_bias)  # dt_bias is the inverse softplus of dt
    assert 0 < A.min() < 0.5 and 15.5 < A.max() <= 16
    assert 0.001 - 1e-7 <= dt.min() < 0.0015 and 0.09 < dt.max() <= 0.1 + 1e-7


def test_cpu_never_imports_fla_or_triton() -> None:
    before = set(sys.modules)
    layer = make_layer()
    layer(torch.randn(1, 20, 48)).sum().backward()
    new = {name.split(".")[0] for name in set(sys.modules) - before}
    assert not new & {"fla", "triton"}


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("fla") is None, reason="needs CUDA and fla"
)
def test_fla_kernels_match_pytorch_path() -> None:
    """bf16 on CUDA: fla's kernels (chunked prefill, fused recurrent decode) against the PyTorch forms."""
    layer = make_layer(chunk_size=64).cuda().bfloat16()
    x = torch.randn(2, 150, 48, device="cuda", dtype=torch.bfloat16)
    outputs, states = [], []
    with torch.no_grad():
        for use_fla in (True, False):
            layer.use_fla = use_fla
            state = layer.new_state(2)
            outputs.append(
                torch.cat([layer(x[:, :140], state)] + [layer(x[:, t : t + 1], state) for t in range(140, 150)], 1)
            )
            states.append(state.recurrent)
    scale = outputs[1].float().abs().max().item()
    assert max_diff(outputs[0].float(), outputs[1].float()) < 2e-2 * scale
    assert max_diff(states[0], states[1]) < 2e-2 * states[1].abs().max().item()


def test_user_errors() -> None:
    layer = make_layer()
    with pytest.raises(OrionError, match="mode must be"):
        layer(torch.randn(1, 4, 48), mode="fast")
    with pytest.raises(OrionError, match="holds 2 sequences but the input has 1"):
        layer(torch.randn(1, 4, 48), layer.new_state(2))
    with pytest.raises(OrionError, match="whole number"):
        GatedDeltaNet(48, num_heads=3, head_dim=16, expand_v=1.7)
