import json
import math

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_within_float32_noise, float64_twin

from orionlm.config import ConfigError, ModelConfig, preset
from orionlm.convert.auron import from_auron_config, to_auron_config
from orionlm.generation import generate_ids
from orionlm.model import OrionLM, count_parameters, virtual_parameters
from orionlm.nn.rope import RotaryEmbedding, apply_rotary


def _model(**changes):
    torch.manual_seed(0)
    model = OrionLM(preset("tiny-chimera", **changes))
    with torch.no_grad():  # perturb the zero/one initial extras so every path carries signal
        for name, p in model.named_parameters():
            if any(k in name for k in ("x0_lambdas", "layer_ids", "skip_weights", "_lambda")):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_auron_510m_counts_and_schedule():
    config = preset("auron-510m")
    assert count_parameters(config) == (510_217_280, 510_217_280)  # published: 510M
    assert virtual_parameters(config) == 787_030_128  # published: ~787M virtual
    assert config.intermediate_size == int(1536 * 2.67) == 4101
    assert config.rotary_dim == 32  # 2 * int(64 * 0.25)
    assert [config.is_attention_layer(i) for i in range(8)] == [False, False, False, True] * 2
    assert config.virtual_layers == 16
    assert count_parameters(preset("auron-279m"))[0] == 278_664_160
    assert count_parameters(preset("auron-1.1b"))[0] == 1_072_527_280


def test_auron_config_round_trip():
    original = to_auron_config(preset("auron-510m"))
    assert original["ffn_mult"] == 2.67 and original["partial_rotary_factor"] == 0.25
    assert original["n_bottom"] == 4 and original["n_physical_top"] == 4 and original["n_top_loops"] == 3
    config = ModelConfig.from_dict(from_auron_config(original))
    assert to_auron_config(config) == original
    with pytest.raises(ConfigError, match="use_diff_attn"):
        from_auron_config(original | {"use_diff_attn": True})
    with pytest.raises(ConfigError, match="n_botom"):
        from_auron_config(original | {"n_botom": 2})


def test_structure_and_initialisation():
    model = OrionLM(preset("tiny-chimera"))
    names = dict(model.named_parameters())
    assert not any("layernorm" in n or n == "model.norm.weight" for n in names)  # weightless RMSNorms
    assert names["model.x0_lambdas"].shape == (6,) and names["model.x0_lambdas"].abs().sum() == 0
    assert names["model.skip_weights"].shape == (3, 64) and (names["model.skip_weights"] == 1).all()
    assert names["model.layer_ids"].shape == (2, 2, 64)
    assert names["model.layers.0.attn_lambda"].item() == pytest.approx(math.sqrt(1.1))
    assert "model.layers.0.linear_attn.A_log" in names and "model.layers.1.self_attn.q_proj.weight" in names
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_partial_rope_against_independent_rotation():
    """Auron rotates the first 2*int(64*0.25) = 32 dims of each head, pairs (i, i+16), frequencies over 32."""
    rot, theta = 32, 10000.0
    x = torch.randn(1, 2, 5, 64)
    cos, sin = RotaryEmbedding(rot, 16, theta)(torch.arange(5).unsqueeze(0))
    got = apply_rotary(x, cos, sin)
    expected = x.clone()
    for pos in range(5):
        for i in range(rot // 2):
            angle = pos * theta ** (-2 * i / rot)
            a, b = x[..., pos, i], x[..., pos, i + rot // 2]
            expected[..., pos, i] = a * math.cos(angle) - b * math.sin(angle)
            expected[..., pos, i + rot // 2] = b * math.cos(angle) + a * math.sin(angle)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_full_recompute():
    model = _model()
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 24)
        steps = [model(ids[:, :10], cache=cache).logits]  # chunked prefill ...
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(10, 24)]  # ... then recurrent steps
        exact = float64_twin(model)(ids).logits
    assert_within_float32_noise(torch.cat(steps, dim=1), full, exact)


def test_left_padding_leaves_no_trace():
    model = _model()
    short = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        alone = model(short).logits[0, -1]
        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)
        mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 9)], dim=1).long()
        batched = model(padded, attention_mask=mask).logits[0, -1]
        exact = float64_twin(model)(short).logits[0, -1]
    assert_within_float32_noise(batched, alone, exact)


def test_batched_generation_equals_one_by_one():
    model = _model()
    prompts = [[5, 17, 99, 3], [42, 8], [7, 7, 7, 7, 7, 1]]
    batched = generate_ids(model, prompts, max_new_tokens=8, do_sample=False)
    single = [generate_ids(model, [p], max_new_tokens=8, do_sample=False)[0] for p in prompts]
    assert batched == single


def test_gradients_reach_every_parameter():
    model = _model().train()
    ids = torch.randint(0, 512, (2, 33))
    model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_activation_checkpointing_gives_the_same_gradients():
    model = _model().train()
    ids = torch.randint(0, 512, (2, 17))
    loss = F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
    plain = torch.autograd.grad(loss, list(model.parameters()))
    model.activation_checkpointing = True
    loss = F.cross_entropy(model(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
    for a, b in zip(plain, torch.autograd.grad(loss, list(model.parameters())), strict=True):
        torch.testing.assert_close(a, b)


def test_auron_directory_loads_and_saves_back(tmp_path):
    from orionlm.checkpoint import read_safetensors, save_checkpoint
    from orionlm.cli import main
    from orionlm.convert.auron import load_auron, save_auron
    from orionlm.loading import load_model

    model = _model()
    save_auron(model, tmp_path / "auron")
    names = set(read_safetensors(tmp_path / "auron"))
    assert {"embed.weight", "x0_lambdas", "bottom_blocks.0.gdn.q_conv1d.weight", "bottom_blocks.1.attn.q_proj.weight",
            "top_blocks.0.gdn.A_log", "top_blocks.1.ffn.w2.weight", "top_blocks.0.attn_lambda"} <= names  # fmt: skip
    loaded, _, _ = load_model(tmp_path / "auron")
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    again, _ = load_auron(tmp_path / "auron")
    save_auron(again, tmp_path / "again")
    first, second = read_safetensors(tmp_path / "auron"), read_safetensors(tmp_path / "again")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (tmp_path / "auron" / "config.json").read_text() == (tmp_path / "again" / "config.json").read_text()
    save_checkpoint(model, tmp_path / "ours")  # our format carries the preset's sampling defaults
    generation = json.loads((tmp_path / "ours" / "generation_config.json").read_text())
    assert generation["top_k"] == 20 and generation["presence_penalty"] == 1.5 and generation["temperature"] == 0.7
    # the Auron form carries them too: without its presence penalty the model loops ("time time time")
    defaults = load_model(tmp_path / "auron")[0].generation_defaults
    assert defaults["presence_penalty"] == 1.5 and defaults["top_k"] == 20
    main(["convert", "to-auron", str(tmp_path / "ours"), str(tmp_path / "exported")])
    assert json.loads((tmp_path / "exported" / "generation_config.json").read_text()) == json.loads(
        (tmp_path / "ours" / "generation_config.json").read_text()
    )


def test_auron_tensor_errors_are_clear(tmp_path):
    from safetensors.torch import save_file

    from orionlm.convert.auron import save_auron
    from orionlm.errors import OrionError
    from orionlm.loading import load_model

    save_auron(_model(), tmp_path)
    save_file({"mystery.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(OrionError, match="mystery.weight"):
        load_model(tmp_path)
