import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from orionlm.config import preset
from orionlm.nn.linear import to_column_major, use_decode_layout
from orionlm.nn.moe import MoE, grouped_linear, load_balancing_loss, router_z_loss


def _moe(name="tiny-moe", **changes):
    torch.manual_seed(0)
    moe = MoE(preset(name, **changes)).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    return moe


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-qwen-moe"])
@pytest.mark.parametrize("tokens", [1, 3, 64])
@pytest.mark.parametrize("decoding", [False, True])  # inference in the decode layout: threaded per-expert products
def test_sorted_dispatch_equals_reference(name, tokens, decoding):
    moe = _moe(name)
    x = torch.randn(1, tokens, moe.gate.in_features)
    if decoding:
        use_decode_layout(moe)
    with torch.set_grad_enabled(not decoding):
        fast, logits, counts = moe(x)
    moe.use_reference = True
    with torch.no_grad():
        slow, logits_ref, _ = moe(x)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert torch.equal(logits, logits_ref)
    assert counts.sum().item() == tokens * moe.top_k


def test_topk_renormalisation():
    x = torch.randn(10, 64)
    _, w, _ = _moe(norm_topk_prob=True).route(x)
    torch.testing.assert_close(w.sum(-1), torch.ones(10))
    _, w, _ = _moe(norm_topk_prob=False).route(x)
    assert (w.sum(-1) < 1).all()


def test_router_jitter_only_in_training():
    moe = _moe(router_jitter=0.5)
    x = torch.randn(32, 64)
    assert torch.equal(moe.route(x)[0], moe.route(x)[0])
    moe.train()
    assert not torch.equal(moe.route(x)[0], moe.route(x)[0])


def test_load_balancing_loss_matches_transformers():
    torch.manual_seed(1)
    logits = [torch.randn(40, 8) for _ in range(3)]
    ours = load_balancing_loss(logits, top_k=2)
    theirs = load_balancing_loss_func(tuple(logits), num_experts=8, top_k=2)
    torch.testing.assert_close(ours, theirs)
    # A uniform router gives exactly top_k, the minimum of E * sum f_e P_e
    assert load_balancing_loss([torch.zeros(16, 4)], top_k=2).item() == pytest.approx(2.0, abs=0.6)


def test_load_balancing_loss_from_given_counts_and_per_layer():
    torch.manual_seed(2)
    logits = [torch.randn(40, 8) for _ in range(3)]
    chosen = torch.stack([torch.bincount(lg.topk(2, -1).indices.flatten(), minlength=8) for lg in logits])
    # the experts the routers chose are what the loss counts when none are given
    torch.testing.assert_close(load_balancing_loss(logits, 2, chosen), load_balancing_loss(logits, top_k=2))
    # per layer: E * sum_e f_e P_e of each layer, averaged; one layer alone is the same either way
    per_layer = [load_balancing_loss([lg], 2) for lg in logits]
    torch.testing.assert_close(load_balancing_loss(logits, 2, per_layer=True), torch.stack(per_layer).mean())
    # Two layers that collapse onto opposite experts (top-1 of 2): together they look balanced (f = P = 1/2,
    # the minimum top_k = 1), each alone is the worst case (f_0 = 1, P_0 ~ 1: a loss of ~E = 2).
    opposite = [torch.tensor([[20.0, 0.0]]).repeat(8, 1), torch.tensor([[0.0, 20.0]]).repeat(8, 1)]
    assert load_balancing_loss(opposite, 1).item() == pytest.approx(1.0, abs=1e-6)
    assert load_balancing_loss(opposite, 1, per_layer=True).item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("per_layer", [False, True])
def test_global_batch_loss_of_the_parts_is_the_loss_of_the_whole(per_layer):
    """Global-batch balancing: each part of a batch (a micro-batch, a process's share) scored with the counts of the
    whole batch; the mean of the parts' losses is the loss of the whole batch given at once."""
    torch.manual_seed(3)
    logits = [torch.randn(48, 8) for _ in range(2)]
    whole = load_balancing_loss(logits, 2, per_layer=per_layer)
    counts = torch.stack([torch.bincount(lg.topk(2, -1).indices.flatten(), minlength=8) for lg in logits])
    parts = [load_balancing_loss([lg[i : i + 16] for lg in logits], 2, counts, per_layer) for i in (0, 16, 32)]
    torch.testing.assert_close(torch.stack(parts).mean(), whole)
    alone = torch.stack([load_balancing_loss([lg[i : i + 16] for lg in logits], 2, per_layer=per_layer)
                         for i in (0, 16, 32)]).mean()  # fmt: skip
    assert not torch.allclose(alone, whole)  # each part's own counts: another loss


def test_score_bias_chooses_the_experts_and_leaves_their_weights():
    moe = _moe(router_score_bias=True, norm_topk_prob=False)
    plain = _moe(norm_topk_prob=False)
    x = torch.randn(32, 64)
    logits, weights, ids = moe.route(x)
    assert torch.equal(logits, plain.route(x)[0])
    assert torch.equal(weights, plain.route(x)[1]) and torch.equal(ids, plain.route(x)[2])  # a zero bias
    moe.gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))  # expert 3 always chosen
    logits, weights, ids = moe.route(x)
    assert (ids == 3).any(-1).all()
    probs = logits.softmax(-1)
    torch.testing.assert_close(weights, probs.gather(-1, ids))  # the router's probabilities, without the bias
    second = probs[:, :3].max(-1)  # beside expert 3: the best of the others
    torch.testing.assert_close(weights.sort(-1).values, torch.stack([probs[:, 3], second.values], -1).sort(-1).values)
    normed = _moe(router_score_bias=True)
    normed.gate.e_score_correction_bias.copy_(moe.gate.e_score_correction_bias)
    torch.testing.assert_close(normed.route(x)[1], weights / weights.sum(-1, keepdim=True))


def test_score_bias_update_moves_each_expert_toward_the_mean_load():
    moe = _moe(router_score_bias=True)
    moe.update_score_bias(torch.tensor([10.0, 0.0, 6.0, 4.0]), rate=0.1)  # mean 5
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([-0.1, 0.1, -0.1, 0.1]))
    moe.update_score_bias(torch.tensor([5.0, 3.0, 7.0, 5.0]), rate=0.25)  # at the mean: unchanged
    torch.testing.assert_close(moe.gate.e_score_correction_bias, torch.tensor([-0.1, 0.35, -0.35, 0.1]))


def test_z_loss_is_mean_squared_logsumexp():
    logits = [torch.tensor([[0.0, 0.0], [1.0, 3.0]]), torch.tensor([[2.0, 2.0]])]
    lse = torch.log(torch.tensor(2.0))
    first = (lse**2 + torch.logsumexp(torch.tensor([1.0, 3.0]), 0) ** 2) / 2
    second = (2 + lse) ** 2
    torch.testing.assert_close(router_z_loss(logits), (first + second) / 2)


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-qwen-moe"])
def test_single_token_path_equals_sorted_dispatch(name):
    moe = _moe(name)
    x = torch.randn(1, moe.gate.in_features)
    _, weights, ids = moe.route(x)
    single = moe._single_token(x, weights, ids)
    torch.testing.assert_close(single, moe._dispatch(x, weights, ids), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(single, moe._reference(x, weights, ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chosen", [[3], [2, 0], [0, 3], [3, 1, 2], [0, 2, 4], [1, 0, 3], [4, 0, 1, 3]])
def test_single_token_path_for_any_expert_choice(chosen):
    # evenly spaced ids run as one strided bmm, the others one by one: both must equal the reference
    moe = _moe("tiny-moe", num_experts=5, experts_per_token=len(chosen))
    x = torch.randn(1, moe.gate.in_features)
    ids = torch.tensor([chosen])
    weights = torch.rand(1, len(chosen))
    expected = moe._reference(x, weights, ids)
    torch.testing.assert_close(moe._single_token(x, weights, ids), expected, atol=1e-6, rtol=1e-6)


def _grads(moe, x, grad_out, path):
    """Gradients of (x, router, gate_up_proj, down_proj) through one expert path, for the given output gradient."""
    x = x.clone().requires_grad_(True)
    moe.zero_grad(set_to_none=True)
    _, weights, ids = moe.route(x)
    getattr(moe, path)(x, weights, ids).backward(grad_out)
    return [x.grad, moe.gate.weight.grad, moe.experts.gate_up_proj.grad, moe.experts.down_proj.grad]


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("tokens", [3, 64])
def test_sorted_dispatch_gradients_equal_reference(grouped_mm, tokens, monkeypatch):
    # the training path: every gradient (input, router through the top-k weights, both expert stacks)
    # equals the per-expert reference's, with F.grouped_mm and with the loop that replaces it
    if not grouped_mm:
        monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    elif not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    moe = _moe("tiny-moe", num_experts=8).train()
    x, grad_out = torch.randn(tokens, 64), torch.randn(tokens, 64)
    fast, slow = _grads(moe, x, grad_out, "_dispatch"), _grads(moe, x, grad_out, "_reference")
    for a, b in zip(fast, slow, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if tokens == 3:  # 6 slots over 8 experts: the weight gradient of an expert with no tokens is exactly zero
        unused = sorted(set(range(8)) - set(moe.route(x)[2].flatten().tolist()))
        assert unused
        assert fast[2][unused].abs().max() == 0 and fast[3][unused].abs().max() == 0


@pytest.mark.parametrize("column_major", [False, True])
@pytest.mark.parametrize("out_features", [7, 8])
@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "loop"])
def test_grouped_linear_equals_per_expert_products(grouped_mm, out_features, column_major, monkeypatch):
    # column-major stacks are what use_decode_layout makes; with 7 outputs their strides are not 16-byte
    # multiples, which the CPU grouped_mm kernel rejects, so the loop must take them
    if not grouped_mm:
        monkeypatch.delattr(torch.nn.functional, "grouped_mm", raising=False)
    elif not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no F.grouped_mm")
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])  # an empty group in the middle
    x, weight = torch.randn(9, 16), torch.randn(4, out_features, 16)
    expected = torch.cat([x[0:3] @ weight[0].T, x[3:8] @ weight[2].T, x[8:9] @ weight[3].T])
    if column_major:
        weight = to_column_major(weight)
    torch.testing.assert_close(grouped_linear(x, weight, counts), expected, atol=1e-5, rtol=1e-5)
