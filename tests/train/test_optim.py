import io

import pytest
import torch
import torch.nn.functional as F

from orionlm.config import preset
from orionlm.errors import OrionError
from orionlm.model import OrionLM
from orionlm.train.optim import (
    BatchedMuon,
    CombinedOptimizer,
    OptimConfig,
    OptimError,
    adjusted_muon_lr,
    build_optimizer,
    param_counts_by_group,
    zeropower_via_newtonschulz,
)

SHAPES = [(48, 32), (32, 80), (40, 40)]  # tall, wide, square


def random_grads(params: list[torch.Tensor], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def test_newton_schulz_orthogonalises() -> None:
    g = torch.randn(48, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    ortho = zeropower_via_newtonschulz(g).double()
    # the quintic iteration maps every singular value into roughly [0.7, 1.2] and keeps the singular vectors
    singular = torch.linalg.svdvals(ortho)
    assert singular.min() > 0.6 and singular.max() < 1.25
    cosine = (ortho * (u @ vh)).sum() / (ortho.norm() * (u @ vh).norm())
    assert cosine > 0.97


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_batched_muon_equals_torch_muon(nesterov: bool, adjust_lr_fn: str) -> None:
    """Own Muon on 2-D matrices vs torch.optim.Muon: five steps with weight decay, equal updates."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    start = [p.detach().clone() for p in ours]
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours_opt = BatchedMuon(ours, **settings)
    theirs_opt = torch.optim.Muon(theirs, **settings)
    for step in range(5):
        random_grads(ours, step)
        random_grads(theirs, step)
        ours_opt.step()
        theirs_opt.step()
    for a, b, p0 in zip(ours, theirs, start, strict=True):
        assert (a - p0).abs().max() > 1e-2  # they moved
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # measured: bit-identical on CPU


def test_batched_muon_on_stack_equals_torch_muon_per_matrix() -> None:
    """A (E, out, in) stack: each expert's matrix gets exactly torch.optim.Muon's update for that matrix
    (its own momentum, normalisation and shape-adjusted lr)."""
    torch.manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(4, 96, 64))
    matrices = [torch.nn.Parameter(m.detach().clone()) for m in stack]
    settings = dict(lr=0.01, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")
    stack_opt = BatchedMuon([stack], **settings)
    matrices_opt = torch.optim.Muon(matrices, **settings)
    for step in range(4):
        random_grads([stack], step)
        for e, m in enumerate(matrices):
            m.grad = stack.grad[e].clone() * (e + 1)  # different scales per expert: normalised per matrix
        stack.grad = torch.stack([m.grad for m in matrices])
        stack_opt.step()
        matrices_opt.step()
    for e, m in enumerate(matrices):
        torch.testing.assert_close(stack[e], m, rtol=0, atol=1e-6)
    # the lr is adjusted by the matrix's shape (96, 64), not by the stack's leading dimensions
    assert adjusted_muon_lr(1.0, "match_rms_adamw", stack.shape) == pytest.approx(0.2 * 96**0.5)
    assert adjusted_muon_lr(1.0, "original", stack.shape) == pytest.approx(1.5**0.5)


def group_names(optimizer) -> dict[str, list[str]]:
    return {g["name"]: g["param_names"] for g in optimizer.param_groups}


def layer_names(template: str) -> list[str]:
    return [template.format(i) for i in range(2)]


def test_adamw_groups_tiny_moe() -> None:
    model = OrionLM(preset("tiny-moe"))
    optimizer = build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, weight_decay=0.1))
    assert isinstance(optimizer, torch.optim.AdamW)
    names = group_names(optimizer)
    assert list(names) == ["decay", "no_decay", "embed", "head"]
    assert len(names["decay"]) == 14  # per layer q, k, v, o, router, gate_up, down
    assert set(layer_names("model.layers.{}.mlp.gate.weight")) <= set(names["decay"])
    assert set(layer_names("model.layers.{}.mlp.experts.down_proj")) <= set(names["decay"])
    assert names["no_decay"] == [
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight",
    ]
    assert names["embed"] == ["model.embed_tokens.weight"] and names["head"] == ["lm_head.weight"]
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {"decay": 0.1, "no_decay": 0.0, "embed": 0.0, "head": 0.1}
    # 2 x (q 4096 + k 2048 + v 2048 + o 4096 + router 256 + gate_up 49152 + down 24576)
    assert param_counts_by_group(optimizer) == {"decay": 172544, "no_decay": 320, "embed": 32768, "head": 32768}
    assert sum(param_counts_by_group(optimizer).values()) == sum(p.numel() for p in model.parameters())


def test_adamw_groups_tiny_alibi_tied() -> None:
    model = OrionLM(preset("tiny-alibi"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    optimizer = build_optimizer(model, OptimConfig(name="adamw", embed_lr=5e-3))
    names = group_names(optimizer)
    assert list(names) == ["decay", "no_decay", "embed"]  # the tied head is the embedding, listed once
    assert names["embed"] == ["model.embed_tokens.weight"]
    assert optimizer.param_groups[2]["params"][0] is model.lm_head.weight
    assert len(names["decay"]) == 8  # per layer qkv, o, up, down
    # embedding LayerNorm (2) + per layer: 2 LayerNorms (4) and 4 biases + final LayerNorm (2)
    assert len(names["no_decay"]) == 20 and "model.embed_norm.bias" in names["no_decay"]
    assert {g["name"]: g["base_lr"] for g in optimizer.param_groups} == {"decay": 3e-4, "no_decay": 3e-4, "embed": 5e-3}
    assert param_counts_by_group(optimizer) == {"decay": 98304, "no_decay": 1920, "embed": 32768}


def test_muon_groups_tiny_moe() -> None:
    model = OrionLM(preset("tiny-moe"))
    config = OptimConfig(name="muon", lr=1e-3, embed_lr=2e-3, head_lr=3e-3, scalar_lr=4e-3, muon_lr=5e-3)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, CombinedOptimizer)
    assert [type(o) for o in optimizer.optimizers] == [torch.optim.Muon, BatchedMuon, torch.optim.AdamW]
    names = group_names(optimizer)
    assert list(names) == ["muon", "muon_experts", "decay", "no_decay", "embed", "head"]
    assert len(names["muon"]) == 8 and all(n.split(".")[-2][1:] == "_proj" for n in names["muon"])  # q/k/v/o
    assert names["muon_experts"] == [
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    ]
    assert names["decay"] == layer_names("model.layers.{}.mlp.gate.weight")  # routers stay with AdamW
    groups = {g["name"]: (g["base_lr"], g["weight_decay"]) for g in optimizer.param_groups}
    assert groups == {
        "muon": (5e-3, 0.1),
        "muon_experts": (5e-3, 0.1),
        "decay": (1e-3, 0.1),
        "no_decay": (4e-3, 0.0),
        "embed": (2e-3, 0.0),
        "head": (3e-3, 0.1),
    }
    assert param_counts_by_group(optimizer) == {
        "muon": 24576,
        "muon_experts": 147456,
        "decay": 512,
        "no_decay": 320,
        "embed": 32768,
        "head": 32768,
    }


def test_muon_groups_shared_expert_and_alibi() -> None:
    names = group_names(build_optimizer(OrionLM(preset("tiny-qwen-moe")), OptimConfig(name="muon")))
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in names["muon"]
    assert names["decay"] == [
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.shared_expert_gate.weight",
    ]
    assert "model.layers.0.self_attn.q_proj.bias" in names["no_decay"]
    alibi = build_optimizer(OrionLM(preset("tiny-alibi")), OptimConfig(name="muon", muon_weight_decay=0.0))
    assert param_counts_by_group(alibi) == {"muon": 98304, "no_decay": 1920, "embed": 32768}
    assert alibi.param_groups[0]["weight_decay"] == 0.0


def test_frozen_parameters_are_left_out() -> None:
    model = OrionLM(preset("tiny-dense"))
    model.model.embed_tokens.weight.requires_grad_(False)
    assert "embed" not in group_names(build_optimizer(model, OptimConfig()))


def test_adamw_step_equals_hand_computation() -> None:
    """Two AdamW steps on one matrix (decayed) and one norm gain (not decayed), against the formulas in float64."""
    model = OrionLM(preset("tiny-dense"))
    config = OptimConfig(lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, scalar_lr=2e-2)
    optimizer = build_optimizer(model, config)
    watched = {
        "model.layers.0.self_attn.q_proj.weight": (1e-2, 0.1),
        "model.layers.0.input_layernorm.weight": (2e-2, 0.0),
    }
    params = dict(model.named_parameters())
    expected = {name: params[name].detach().double().clone() for name in watched}
    m = {name: torch.zeros_like(p) for name, p in expected.items()}
    v = {name: torch.zeros_like(p) for name, p in expected.items()}
    (b1, b2) = config.betas
    for t in (1, 2):
        random_grads(list(model.parameters()), t)
        optimizer.step()
        for name, (lr, wd) in watched.items():
            g = params[name].grad.double()
            m[name] = b1 * m[name] + (1 - b1) * g
            v[name] = b2 * v[name] + (1 - b2) * g * g
            m_hat, v_hat = m[name] / (1 - b1**t), v[name] / (1 - b2**t)
            expected[name] = expected[name] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + config.eps)
    for name in watched:
        assert (expected[name] - params[name].detach().double()).abs().max() < 1e-6
    # the updates are ~lr per element, so a wrong lr, decay or bias correction would show
    assert (expected["model.layers.0.input_layernorm.weight"] - 1).abs().mean() > 1e-2


def lm_loss(model: OrionLM, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens[:, :-1])
    loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    return loss + 0.01 * out.aux_loss if out.aux_loss is not None else loss


def train(model: OrionLM, optimizer, steps: range, total: int = 6) -> list[float]:
    """A few steps the way the trainer runs them: lr = base_lr * factor, clipping, step, zero_grad."""
    losses = []
    for step in steps:
        tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(step))
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * (1 - step / total)
        loss = lm_loss(model, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_state_dict_round_trip_resumes_identically(name: str) -> None:
    torch.manual_seed(0)
    config = OptimConfig(name=name, lr=3e-3)
    model = OrionLM(preset("tiny-moe"))
    optimizer = build_optimizer(model, config)
    train(model, optimizer, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    uninterrupted = train(model, optimizer, range(3, 6))

    def resumed(load_optimizer: bool) -> tuple[list[float], OrionLM]:
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)  # the state holds no pickled objects
        fresh = OrionLM(preset("tiny-moe"))
        fresh.load_state_dict(saved["model"])
        fresh_optimizer = build_optimizer(fresh, config)
        if load_optimizer:
            fresh_optimizer.load_state_dict(saved["optimizer"])
        return train(fresh, fresh_optimizer, range(3, 6)), fresh

    losses, again = resumed(load_optimizer=True)
    assert losses == uninterrupted
    for (n, a), b in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b), n
    # without the optimizer state (momenta), the continuation differs: the check above can fail
    assert resumed(load_optimizer=False)[0][1:] != uninterrupted[1:]


def test_group_lr_controls_the_step() -> None:
    """The trainer's lr (set on the wrapper's param_groups) is what every inner optimizer uses: lr 0 is no step."""
    model = OrionLM(preset("tiny-moe"))
    optimizer = build_optimizer(model, OptimConfig(name="muon"))
    before = [p.detach().clone() for p in model.parameters()]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    random_grads(list(model.parameters()), 0)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_without_torch_muon_batched_muon_takes_the_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = OrionLM(preset("tiny-moe"))
    copy = OrionLM(preset("tiny-moe"))
    copy.load_state_dict(model.state_dict())
    with_torch = build_optimizer(model, OptimConfig(name="muon"))
    monkeypatch.delattr(torch.optim, "Muon")
    fallback = build_optimizer(copy, OptimConfig(name="muon"))
    assert [type(o) for o in fallback.optimizers] == [BatchedMuon, torch.optim.AdamW]
    assert group_names(fallback) == group_names(with_torch)
    for step in range(2):
        random_grads(list(model.parameters()), step)
        random_grads(list(copy.parameters()), step)
        with_torch.step()
        fallback.step()
    for a, b in zip(model.parameters(), copy.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_mismatched_state_is_a_clear_error() -> None:
    model = OrionLM(preset("tiny-moe"))
    adamw_state = build_optimizer(model, OptimConfig(name="adamw")).state_dict()
    with pytest.raises(OptimError, match="resume with the optimizer settings"):
        build_optimizer(model, OptimConfig(name="muon")).load_state_dict(adamw_state)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(name="adamww"), "did you mean 'adamw'"),
        (dict(muon_adjust_lr="orignal"), "did you mean 'original'"),
        (dict(lr=-1.0), r"lr \(-1.0\) must be >= 0"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(betas=(0.9,)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(muon_momentum=1.0), "muon_momentum"),
        (dict(muon_ns_steps=0), "muon_ns_steps"),
        (dict(grad_clip=-1.0), "grad_clip"),
    ],
)
def test_invalid_settings(settings: dict, message: str) -> None:
    with pytest.raises(OptimError, match=message):
        OptimConfig(**settings)
    assert issubclass(OptimError, OrionError)


def test_betas_from_yaml_list() -> None:
    assert OptimConfig(betas=[0.9, 0.99]).betas == (0.9, 0.99)
