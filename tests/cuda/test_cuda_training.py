"""Training on the GPU beyond one plain step: a torch.compile'd training step (the recipe's run.compile) gives the
eager step's losses, and FSDP2 (the trainer's fully_shard of every block, then the model) trains a Chimera whose
top blocks run several times per forward as the unsharded model does.

Compiled kernels fuse operations and so round under bf16 autocast at other points than eager ones: the losses of
3 steps agree to 1e-2 relative (a few 2^-8 roundings). FSDP2 in float32 on one process changes no arithmetic,
only where the parameters live: 1e-5."""

import contextlib
import copy
import socket

import pytest
import torch
import torch.distributed as dist

from orionlm.config import preset
from orionlm.model import OrionLM

pytestmark = pytest.mark.cuda

STEPS = 3


def batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (STEPS, 4, 65), generator=generator)
    return [(t[:, :-1], t[:, 1:].contiguous()) for t in tokens]


def train_losses(model: OrionLM, step_model, device: torch.device, bf16: bool) -> list[float]:
    """STEPS steps of AdamW through `step_model` (the model, compiled or sharded); the loss of each."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for inputs, targets in batches(model.config.vocab_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step_model(inputs.to(device), targets=targets.to(device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_compiled_training_step_gives_eager_losses(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = OrionLM(preset("tiny-dense")).to(device).train()
    compiled_model = copy.deepcopy(model)
    eager = train_losses(model, model, device, bf16=True)
    compiled = train_losses(compiled_model, torch.compile(compiled_model), device, bf16=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert eager[-1] < eager[0]
    for a, b in zip(compiled, eager, strict=True):
        assert abs(a - b) < 1e-2 * b, (compiled, eager)


@contextlib.contextmanager
def single_process_group(device: torch.device):
    """A one-process group on a loopback port: what torchrun sets up, for one GPU."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp2_trains_looped_chimera_as_unsharded(device, float32_cuda):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = OrionLM(preset("tiny-chimera")).to(device).train()
    assert model.config.loops > 1  # the shared top blocks run several times in one forward
    sharded = copy.deepcopy(model)
    expected = train_losses(model, model, device, bf16=False)
    with single_process_group(device):
        for layer in sharded.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        losses = train_losses(sharded, sharded, device, bf16=False)
        weights = {name: p.full_tensor() for name, p in sharded.named_parameters()}
    for a, b in zip(losses, expected, strict=True):
        assert abs(a - b) < 1e-5 * b, (losses, expected)
    for name, p in model.named_parameters():
        assert torch.allclose(weights[name], p, rtol=1e-4, atol=1e-6), name
