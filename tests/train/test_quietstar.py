"""Quiet-STaR: the parallel thought passes against each position's thought run on its own, the loss at a zero
mixing weight against the base model's, gradients, rewards, the meta tokens, and a training run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from orionlm import load_model
from orionlm.config import preset
from orionlm.model import END_THOUGHT, START_THOUGHT, OrionLM, add_thought_tokens
from orionlm.tokenizer import Tokenizer
from orionlm.train.quietstar import ParallelThoughts, QuietStarConfig, quietstar_loss, thought_rewards
from orionlm.train.recipe import RecipeError, load_recipe
from orionlm.train.trainer import train

from .test_trainer import metrics, write_recipe

START, END = 60, 61  # conftest's thinking_model


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-moe", "tiny-alibi", "tiny-chimera"])
def test_parallel_passes_equal_each_position_thinking_alone(name, thinking_model):
    """Pass j's hidden state at position t equals the model run on x_0..x_t followed by that position's
    tokens of passes 1..j: the mask, the positions and the cache of the parallel passes are right."""
    model = thinking_model(name)
    ids = torch.randint(0, START, (2, 7))
    chain = [torch.full_like(ids, START), torch.randint(0, START, ids.shape), torch.randint(0, START, ids.shape),
             torch.full_like(ids, END), torch.randint(0, START, ids.shape)]  # fmt: skip
    with torch.no_grad():
        thoughts = ParallelThoughts(model, ids)
        passes = [thoughts.first.hidden] + [thoughts.step(tokens).hidden for tokens in chain]
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                sequence = torch.cat([ids[b, : t + 1], torch.stack([c[b, t] for c in chain])])
                alone = model(sequence[None], output_hidden=True).hidden[0, t:]  # x_t, then the chain
                got = torch.stack([h[b, t] for h in passes])
                torch.testing.assert_close(got, alone, atol=2e-5, rtol=0)


def test_zero_mixing_weight_gives_the_base_models_loss(thinking_model):
    model = thinking_model("tiny-dense").train()
    with torch.no_grad():
        model.thinking.mixing_head[-1].weight.zero_()
    ids = torch.randint(0, START, (2, 12))
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    settings = QuietStarConfig(n_ahead=5, n_ahead_talk=3, n_passes=2)
    out = quietstar_loss(model, ids, targets, settings)
    with torch.no_grad():
        nll = F.cross_entropy(model(ids).logits.transpose(1, 2), targets, reduction="none")  # (B, L), 0 at -100
    scored = 12 - 1 - (settings.n_ahead_talk - 1)  # positions with all talk targets
    talk = torch.stack([nll[:, k : k + scored] for k in range(settings.n_ahead_talk)]).mean()
    expected = 0.5 * nll[:, :-1].mean() + 0.5 * talk
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=0)
    assert out.metrics["policy_loss"] == 0 and out.metrics["mix_weight"] == 0
    torch.testing.assert_close(out.metrics["talk_loss"], out.metrics["talk_base_loss"], atol=1e-6, rtol=0)
    out.loss.backward()
    # w = 0 exactly: the thoughts cannot change the loss yet, only the mixing head's last layer learns
    assert model.thinking.meta_embeddings.grad.abs().max() == 0
    assert model.thinking.mixing_head[-1].weight.grad.abs().max() > 0


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-chimera"])
def test_gradients_reach_the_meta_embeddings_and_the_mixing_head(name, thinking_model):
    model = thinking_model(name).train()
    ids = torch.randint(0, START, (2, 12))
    targets = torch.roll(ids, -1, 1)
    out = quietstar_loss(model, ids, targets, QuietStarConfig(n_ahead=5, n_ahead_talk=2, n_passes=2))
    out.loss.backward()
    for parameter, p in model.thinking.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, parameter
    assert out.metrics["mix_weight"] != 0
    if name == "tiny-chimera":  # the thoughts' GDN steps backpropagate into the recurrent layers
        gdn = model.model.layers[0].linear_attn
        assert gdn.A_log.grad is not None and gdn.A_log.grad.abs().max() > 0
    else:
        assert out.aux_loss is not None


def test_rewards_subtract_the_mean_of_the_rows_thoughts_and_clip_negatives():
    gain = torch.tensor([[1.0, -2.0], [3.0, 0.0], [0.5, 0.5], [0.5, 0.5]])  # two texts, two thoughts each
    assert thought_rewards(gain, 2).tolist() == [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
    assert thought_rewards(gain, 1).tolist() == [[1.0, 0.0], [3.0, 0.0], [0.5, 0.5], [0.5, 0.5]]


def test_adding_thought_tokens_keeps_the_models_predictions():
    tokenizer = Tokenizer.byte_level()
    torch.manual_seed(0)
    base = OrionLM(dataclasses.replace(preset("tiny-dense"), vocab_size=tokenizer.vocab_size)).eval()
    model = add_thought_tokens(base, tokenizer, n_ahead=6).eval()
    start, end = tokenizer.token_to_id(START_THOUGHT), tokenizer.token_to_id(END_THOUGHT)
    assert (model.config.thought_start_id, model.config.thought_end_id) == (start, end)
    assert model.config.vocab_size == 320 and model.config.thought_length == 6  # grown to a multiple of 64
    assert tokenizer.encode(f"a{START_THOUGHT}b", add_special_tokens=False)[1] == start
    ids = torch.tensor([tokenizer.encode("The cat sat on the mat.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[..., : base.config.vocab_size], base(ids).logits)
        dash = base.model.embed_tokens.weight[tokenizer.encode("---", add_special_tokens=False)[0]]
        scale = model.config.meta_embedding_scale
        torch.testing.assert_close(model.thinking.meta_embeddings * scale, dash.expand(2, -1))


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-chimera"])
def test_a_quietstar_run_logs_the_talk_losses_and_saves_a_thinking_model(name, tmp_path):
    quietstar = {"n_ahead": 4, "n_ahead_talk": 2, "n_passes": 2}
    path = write_recipe(tmp_path, model={"preset": name}, run={"max_steps": 3, "save_every_steps": 3, "batch_size": 2})
    recipe = load_recipe(path, ["mode=quietstar", *(f"quietstar.{k}={v}" for k, v in quietstar.items())])
    run_dir = train(recipe)
    records = metrics(run_dir)
    assert records[0]["step"] == 0 and records[0]["val_talk_loss"] == records[0]["val_talk_base_loss"]
    for key in ("loss", "base_loss", "talk_loss", "talk_base_loss", "policy_loss", "mix_weight"):
        assert key in records[-1]
    assert "val_talk_loss" in records[-1] and records[-1]["mix_weight"] != 0
    model, tokenizer, _ = load_model(run_dir / "checkpoints" / "checkpoint-3", device="cpu")
    assert model.config.thinks and model.config.thought_length == 4
    assert tokenizer.token_to_id(START_THOUGHT) == model.config.thought_start_id
    assert json.loads((run_dir / "checkpoints" / "checkpoint-3" / "config.json").read_text())["thought_end_id"]
    final, _, _ = load_model(run_dir / "model", device="cpu")  # RUN/model: the same thinking model
    assert final.config == model.config


def test_quietstar_recipe_errors(tmp_path):
    path = write_recipe(tmp_path)
    with pytest.raises(RecipeError, match="quietstar thinks at every position of text windows: set data.format=text"):
        load_recipe(path, ["mode=quietstar", "data.format=chat"])
    with pytest.raises(RecipeError, match=r"recipe.quietstar: n_ahead counts .* >= 3, got 2"):
        load_recipe(path, ["mode=quietstar", "quietstar.n_ahead=2"])
    with pytest.raises(RecipeError, match="unknown key in recipe.quietstar: 'n_passs'"):
        load_recipe(path, ["mode=quietstar", "quietstar.n_passs=2"])
