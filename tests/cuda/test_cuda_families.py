"""Every family on the GPU against float32 on the CPU, same weights: the bf16 forward (a bf16 model, as
load_model gives on CUDA and the server runs) and one training step (float32 weights under bf16 autocast and
the project's optimizer, as the trainer runs it).

Tolerances: bfloat16 keeps 8 significant bits, so one rounding is off by up to 2^-8 (0.4%) relative, and a value
that went through n roundings (matmul inputs, norms, activations, a few per layer) drifts by about
sqrt(n) 2^-8 as independent errors add. These models have 2-6 layers, a few dozen roundings on any path:
~2-3% relative. Logits and gradients must agree to 5e-2 in relative norm (above that estimate, far below the ~1
of a wrong path); a mean loss averages hundreds of token losses whose errors partly cancel: 1e-2. The
optimizer step is judged by how much it lowers the loss (both updated models evaluated in float32 on the
CPU): a step that goes a wrong way changes that by ~100%, bf16 gradients by a few percent. An MoE's gradients get
1e-1: a token whose top-k routing bf16 flips sends its whole gradient to another expert."""

import copy

import pytest
import torch

from orionlm.config import preset
from orionlm.model import OrionLM, add_router_losses
from orionlm.train.optim import OptimConfig, build_optimizer
from orionlm.train.quietstar import QuietStar, QuietStarConfig

pytestmark = pytest.mark.cuda

FAMILIES = ["tiny-dense", "tiny-moe", "tiny-alibi", "tiny-chimera", "thinking-dense", "thinking-chimera"]
# n_ahead 3: a thought is its start and end tokens, nothing sampled, so both devices compute the same loss
QUIETSTAR = QuietStarConfig(n_ahead=3, n_ahead_talk=2, n_passes=1)
BATCH, SEQ = 2, 128  # two of GDN's 64-token chunks


def build(name: str, thinking_model) -> OrionLM:
    if name.startswith("thinking-"):
        return thinking_model("tiny-" + name.removeprefix("thinking-"))
    torch.manual_seed(0)
    return OrionLM(preset(name)).eval()


def batch(model: OrionLM) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    if model.config.thinks:  # the thought tokens never appear in text
        vocab = min(model.config.thought_start_id, model.config.thought_end_id)
    tokens = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:].contiguous()


def loss_of(model: OrionLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What the trainer minimises: the LM loss (Quiet-STaR's for a thinking model) plus the router losses."""
    out = QuietStar(model, QUIETSTAR)(inputs, targets) if model.config.thinks else model(inputs, targets=targets)
    return add_router_losses(out.loss, out, model.config)


def train_step(model: OrionLM, inputs, targets, device: torch.device, bf16: bool) -> tuple[float, dict, OrionLM]:
    """One step on `device`, under bf16 autocast or in float32: the loss, the gradients and the updated model,
    back on the CPU in float32."""
    model = copy.deepcopy(model).to(device).train()
    # Chimera trains with Muon (Newton-Schulz in bf16) on its matrices, as recipe:tinystories-chimera does
    optimizer = build_optimizer(model, OptimConfig(name="muon" if model.config.architecture == "chimera" else "adamw",
                                                   lr=1e-2, weight_decay=0.0))  # fmt: skip
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = loss_of(model, inputs.to(device), targets.to(device))
    loss.backward()
    grads = {name: p.grad.float().cpu() for name, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return loss.item(), grads, model.cpu().float().eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_forward_matches_cpu_float32(name, thinking_model, device, relative_error):
    model = build(name, thinking_model)
    inputs, _ = batch(model)
    with torch.no_grad():
        expected = model(inputs).logits
        gpu = copy.deepcopy(model).to(device, torch.bfloat16)
        actual = gpu(inputs.to(device)).logits
    assert actual.dtype == torch.bfloat16 and actual.shape == expected.shape
    assert relative_error(actual, expected) < 5e-2


@pytest.mark.parametrize("name", FAMILIES)
def test_training_step_matches_cpu_float32(name, thinking_model, device, relative_error):
    model = build(name, thinking_model)
    inputs, targets = batch(model)
    cpu_loss, cpu_grads, cpu_after = train_step(model, inputs, targets, torch.device("cpu"), bf16=False)
    loss, grads, after = train_step(model, inputs, targets, device, bf16=True)
    assert abs(loss - cpu_loss) < 1e-2 * cpu_loss
    assert grads.keys() == cpu_grads.keys()
    flat = torch.cat([grads[n].flatten() for n in sorted(grads)])
    cpu_flat = torch.cat([cpu_grads[n].flatten() for n in sorted(cpu_grads)])
    assert relative_error(flat, cpu_flat) < (1e-1 if model.config.num_experts else 5e-2)
    with torch.no_grad():
        start = loss_of(model, inputs, targets).item()
        cpu_drop = start - loss_of(cpu_after, inputs, targets).item()
        drop = start - loss_of(after, inputs, targets).item()
    assert cpu_drop > 0 and abs(drop - cpu_drop) < 0.1 * cpu_drop, (drop, cpu_drop)
