import pytest
import torch

from orionlm.config import preset
from orionlm.model import OrionLM
from orionlm.nn.linear import linear, to_column_major, use_decode_layout


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (3, 64), (2, 5, 64), (20, 64)])  # the last: over SMALL_BATCH
@pytest.mark.parametrize("layout", ["column-major", "row-major, fewer outputs"])
def test_threaded_matvec_equals_f_linear(threads, shape, layout):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if layout == "column-major":
            weight = to_column_major(torch.randn(96, 64))
            assert weight.stride() == (1, 96)
        else:  # a down projection's decode layout
            weight = torch.randn(48, 64)
        bias = torch.randn(weight.shape[0])
        x = torch.randn(*shape)
        with torch.no_grad():
            out = linear(x, weight, bias)
        assert out.shape == (*shape[:-1], weight.shape[0])
        expected = x.double() @ weight.double().t() + bias.double()  # an independent reference in float64
        torch.testing.assert_close(out, expected.float(), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-qwen-moe", "tiny-alibi"])
def test_decode_layout_keeps_outputs_state_dict_and_ties(name):
    torch.manual_seed(0)
    model = OrionLM(preset(name, initializer_range=0.1)).eval()
    ids = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    use_decode_layout(model)
    use_decode_layout(model)  # idempotent
    assert model.model.layers[1].self_attn.o_proj.weight.stride() == (1, 64)
    if not model.config.num_experts:  # a down projection stays row-major when it has fewer outputs than inputs
        down = model.model.layers[-1].mlp.down_proj
        assert down.weight.is_contiguous() == (down.out_features < down.in_features)
    assert model.lm_head.weight.stride() == (1, 512)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if model.config.num_experts:
        experts = model.model.layers[0].mlp.experts
        assert experts.gate_up_proj.stride()[1:] == (1, experts.gate_up_proj.shape[1])
        out_features, in_features = experts.down_proj.shape[1:]
        assert experts.down_proj.is_contiguous() == (out_features < in_features)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)
        # a single-token decode step takes the threaded matrix-vector path and agrees too
        torch.testing.assert_close(model(ids[:, :1]).logits, before[:, :1], atol=1e-5, rtol=0)


def test_packed_layers_follow_training_and_fall_back_after_to():
    torch.manual_seed(0)
    model = OrionLM(preset("tiny-dense", initializer_range=0.1))
    use_decode_layout(model)
    attn = model.model.layers[0].self_attn
    assert attn.packed is not None and attn.packed.valid()
    ids = torch.randint(0, 512, (1, 6))
    # an in-place optimizer step on the parameters is seen by the packed matrix
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(ids).logits.square().mean().backward()
    optimizer.step()
    assert torch.equal(attn.packed.weight[: attn.q_proj.out_features], attn.q_proj.weight)
    with torch.no_grad():
        packed = model(ids).logits
        model.to(torch.float64)  # new storage: the packed matrix is stale and must not be used
        assert not attn.packed.valid()
        torch.testing.assert_close(model(ids).logits.float(), packed, atol=1e-5, rtol=0)
