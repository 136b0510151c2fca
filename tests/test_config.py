import json

import pytest

from orionlm.config import PRESETS, ConfigError, ModelConfig, preset
from orionlm.model import count_parameters


@pytest.mark.parametrize(
    "name, total, active",
    [
        # published figures: Mixtral 8x7B 46.7B / 12.9B active, Harmony-4x7B 24.2B, Poro-34B 34.2B
        ("mixtral-8x7b", 46.7e9, 12.9e9),
        ("harmony-4x7b", 24.2e9, None),
        ("poro-34b", 34.2e9, 34.2e9),
        ("mistral-7b", 7.24e9, 7.24e9),
    ],
)
def test_published_parameter_counts(name, total, active):
    got_total, got_active = count_parameters(preset(name))
    assert round(got_total / 1e9, 1) == round(total / 1e9, 1)
    if active is not None:
        assert round(got_active / 1e9, 1) == round(active / 1e9, 1)


def test_mixtral_exact_count():
    # 32 x (attention 41.9M + 8 experts x 3 x 4096 x 14336 + router + 2 norms) + embeddings + head + norm
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 8 * 3 * 4096 * 14336 + 8 * 4096 + 2 * 4096
    assert count_parameters(preset("mixtral-8x7b"))[0] == 32 * layer + 2 * 32000 * 4096 + 4096


def test_orion_moe_shape():
    c = preset("orion-moe-8x7b")
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == (4096, 32, 32, 8)
    assert (c.expert_intermediate_size, c.num_experts, c.experts_per_token) == (14592, 8, 2)
    assert (c.vocab_size, c.max_seq_len, c.tie_embeddings) == (113664, 8192, False)


def test_every_preset_round_trips(tmp_path):
    for name in PRESETS:
        config = preset(name)
        config.save(tmp_path / "config.json")
        assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "orionlm"
        assert ModelConfig.load(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_heads=12, num_kv_heads=5, hidden_size=96), "num_heads (12) must be divisible by num_kv_heads (5)"),
        (dict(hidden_size=100, num_heads=3), "hidden_size (100) must be divisible by num_heads (3)"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(num_experts=4, experts_per_token=5), "experts_per_token (5) must be between 1 and num_experts (4)"),
        (dict(num_experts=4, moe_layers=[0, 9]), "moe_layers [9] are outside"),
        (dict(partial_rotary_factor=0.1), "rotary dims"),
        (dict(fused_qkv=True), "fused_qkv"),
        (dict(num_heads=0), "num_heads must be a positive integer, got 0"),  # before hidden_size % num_heads
        (dict(num_kv_heads=0), "num_kv_heads must be a positive integer, got 0"),
        (dict(hidden_size=64.5), "hidden_size must be a positive integer, got 64.5"),
        (dict(head_dim=True), "head_dim must be a positive integer, got True"),
    ],
)
def test_validation_messages(changes, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        preset("tiny-dense", **changes)


def test_unknown_keys_suggest_the_closest():
    with pytest.raises(ConfigError, match="'hiden_size' \\(did you mean 'hidden_size'\\?\\)"):
        ModelConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ConfigError, match="did you mean tiny-moe"):
        preset("tiny-mo")
