import pytest
import torch

from orionlm.config import preset
from orionlm.model import OrionLM
from orionlm.nn.moe import load_balancing_loss
from orionlm.train.balance import ExpertLoad
from orionlm.train.distributed import Dist

CPU = Dist(0, 1, torch.device("cpu"))


def _model(**changes) -> OrionLM:
    model = OrionLM(preset("tiny-moe", **changes))
    model.reset_parameters(seed=0)
    return model.train()


def _batches(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (2, 16), generator=generator) for _ in range(n)]


def test_bias_moves_by_the_load_of_the_whole_step():
    model = _model(router_bias_update_rate=0.01)
    load = ExpertLoad(model.config, CPU)
    counts = []
    for ids in _batches(3):  # one step's micro-batches
        out = model(ids)
        load.add(out)
        counts.append(out.expert_counts)
    load.end_step(model)
    total = torch.stack(counts).sum(0).float()  # (layers, E)
    expected = 0.01 * torch.sign(total.mean(-1, keepdim=True) - total)
    biases = torch.stack([layer.mlp.gate.e_score_correction_bias for layer in model.model.layers])
    torch.testing.assert_close(biases, expected)
    assert load.counts is None  # the next step counts anew
    frozen = ExpertLoad(model.config, CPU, move_bias=False)  # a LoRA run: the base's bias stays
    frozen.add(model(_batches(1)[0]))
    frozen.end_step(model)
    assert torch.equal(torch.stack([layer.mlp.gate.e_score_correction_bias for layer in model.model.layers]), biases)


def test_global_batch_loss_reads_the_step_so_far_and_equals_the_batch_given_at_once():
    model = _model(router_aux_loss_global=True, router_aux_loss_per_layer=True)
    first, second = _batches(2)
    load = ExpertLoad(model.config, CPU)
    out_1 = model(first)
    own = out_1.aux_loss.clone()
    load.add(out_1)
    torch.testing.assert_close(out_1.aux_loss, own)  # the first micro-batch is the step so far
    out_2 = model(second)
    load.add(out_2)
    counts = out_1.expert_counts + out_2.expert_counts
    expected = load_balancing_loss(out_2.router_logits, 2, counts, per_layer=True)
    torch.testing.assert_close(out_2.aux_loss, expected)
    assert not torch.allclose(out_2.aux_loss, model(second).aux_loss)  # its own counts would give another
    load.end_step(model)  # no routing bias: nothing to move
    # the whole step's batch at once: the mean of the two micro-batches' P_e against the step's counts
    joined = [torch.cat(pair) for pair in zip(out_1.router_logits, out_2.router_logits, strict=True)]
    whole = load_balancing_loss(joined, 2, counts, per_layer=True)
    both = load_balancing_loss(out_1.router_logits, 2, counts, per_layer=True) + expected
    torch.testing.assert_close(both / 2, whole)


def test_balancing_options_are_checked():
    from orionlm.config import ConfigError

    assert preset("tiny-moe", router_bias_update_rate=1e-3).router_score_bias is True
    assert preset("tiny-moe").router_score_bias is False
    frozen = preset("tiny-moe", router_bias_update_rate=1e-3).replace(router_bias_update_rate=0.0)
    assert frozen.router_score_bias is True  # the bias stays, no longer moved
    with pytest.raises(ConfigError, match="router_bias_update_rate must be >= 0"):
        preset("tiny-moe", router_bias_update_rate=-1.0)
    with pytest.raises(ConfigError, match="balance experts: set num_experts > 0"):
        preset("tiny-dense", router_aux_loss_per_layer=True)
