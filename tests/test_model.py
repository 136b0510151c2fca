import math

import pytest
import torch
from numerics import assert_within_float32_noise, float64_twin
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from orionlm.config import preset
from orionlm.model import OrionLM
from orionlm.nn.alibi import alibi_slopes
from orionlm.nn.rope import RotaryEmbedding, apply_rotary

FAMILIES = ["tiny-dense", "tiny-moe", "tiny-qwen-moe", "tiny-alibi"]


def _model(name, **changes):
    torch.manual_seed(0)
    model = OrionLM(preset(name, **changes)).eval()
    model.reset_parameters(seed=0)
    return model


@pytest.mark.parametrize("heads", [1, 8, 12, 56])
def test_alibi_slopes_match_bloom(heads):
    mask = torch.ones(1, 5)
    theirs = build_alibi_tensor(mask, heads, torch.float32)  # (heads, 1, 5) = slope * position
    torch.testing.assert_close(alibi_slopes(heads), theirs[:, 0, 1])


def test_alibi_slopes_for_eight_heads_are_the_paper_sequence():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))


def test_rotary_matches_transformers():
    rope = RotaryEmbedding(16, 64, 10000.0)
    pos = torch.arange(10).unsqueeze(0)
    cos, sin = rope(pos)
    q, k = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos[:, 0], sin[:, 0])
    torch.testing.assert_close(apply_rotary(q, cos, sin), ref_q)
    torch.testing.assert_close(apply_rotary(k, cos, sin), ref_k)


def test_partial_rotary_rotates_only_the_first_dims():
    rope = RotaryEmbedding(8, 64, 10000.0)
    cos, sin = rope(torch.arange(6).unsqueeze(0))
    x = torch.randn(1, 2, 6, 32)
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 8:], x[..., 8:])
    torch.testing.assert_close(out[..., :8], apply_rotary(x[..., :8].contiguous(), cos, sin))
    # rotation preserves the norm of each rotated pair
    torch.testing.assert_close(out[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))


def test_rotary_tables_grow_past_max_seq_len():
    rope = RotaryEmbedding(8, 4, 10000.0)
    cos, _ = rope(torch.tensor([[9]]))
    assert rope.max_len >= 10
    torch.testing.assert_close(cos[0, 0, 0, 0], torch.tensor(math.cos(9.0)))


@pytest.mark.parametrize("name", FAMILIES)
def test_output_shapes_and_router_outputs(name):
    model = _model(name)
    out = model(torch.randint(0, 512, (2, 7)))
    assert out.logits.shape == (2, 7, 512)
    if model.config.num_experts:
        assert len(out.router_logits) == model.config.num_layers
        assert out.expert_counts.shape == (model.config.num_layers, model.config.num_experts)
        assert out.expert_counts.sum().item() == model.config.num_layers * 14 * model.config.experts_per_token
        assert out.aux_loss.item() > 0 and out.z_loss.item() > 0
    else:
        assert out.aux_loss is None


@pytest.mark.parametrize("name", FAMILIES)
def test_chunked_prefill_and_decode_equal_full_recompute(name):
    model = _model(name)
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 16)
        parts = [model(ids[:, :5], cache=cache).logits, model(ids[:, 5:9], cache=cache).logits]
        parts += [model(ids[:, i : i + 1], cache=cache).logits for i in range(9, 12)]
        exact = float64_twin(model)(ids).logits
    assert_within_float32_noise(torch.cat(parts, 1), full, exact)


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padding_does_not_change_logits(name):
    model = _model(name)
    ids = torch.randint(3, 512, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 6)], 1).long()
    with torch.no_grad():
        plain = model(ids).logits
        out = model(padded, attention_mask=mask).logits[:, 3:]
        exact = float64_twin(model)(ids).logits
    assert_within_float32_noise(out, plain, exact)


def test_sliding_window_limits_what_one_layer_sees():
    # With one layer, the last position sees only the last `window` tokens: dropping older tokens
    # (and keeping positions) must not change its logits; a full-attention model does change.
    model = _model("tiny-dense", num_layers=1, sliding_window=4)
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        tail = model(ids[:, -4:], position_ids=torch.arange(6, 10).unsqueeze(0)).logits[:, -1]
        torch.testing.assert_close(full, tail, atol=1e-5, rtol=1e-5)
        cache = model.new_cache(1, 10)
        model(ids[:, :9], cache=cache)
        torch.testing.assert_close(model(ids[:, 9:], cache=cache).logits[:, -1], full, atol=1e-5, rtol=1e-5)
    dense = _model("tiny-dense", num_layers=1)
    with torch.no_grad():
        a = dense(ids).logits[:, -1]
        b = dense(ids[:, -4:], position_ids=torch.arange(6, 10).unsqueeze(0)).logits[:, -1]
    assert (a - b).abs().max() > 1e-3


def test_tied_embeddings_share_storage():
    model = _model("tiny-alibi")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not _model("tiny-dense").config.tie_embeddings
