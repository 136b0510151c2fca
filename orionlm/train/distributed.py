"""Training across processes under torchrun: the process group, DDP or FSDP2 wrapping, and full state dicts
(gathered from FSDP2's shards) for checkpoints."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..checkpoint import check_device
from ..model import OrionLM
from .recipe import Recipe


@dataclass
class Dist:
    """Where this process stands: its rank among world_size processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """value summed over the processes (value itself when there is one)."""
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return self.sum(value) / self.world_size if self.world_size > 1 else value


def setup_distributed(device: str) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device != "auto":
        check_device(device, "run.device")
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if world_size == 1:
        return Dist(0, 1, torch.device(("cuda" if cuda else "cpu") if device == "auto" else device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world_size, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def wrap_model(model: torch.nn.Module, recipe: Recipe, d: Dist) -> torch.nn.Module:
    """Shard (FSDP2) or replicate (DDP) across processes; compile when asked."""
    if d.world_size > 1 and recipe.run.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        wrapped: torch.nn.Module = model
    elif d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    else:
        wrapped = model
    if recipe.run.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def full_state(model: OrionLM, optimizer: torch.optim.Optimizer, fsdp: bool) -> tuple[dict, dict]:
    """Model and optimizer state dicts with full (unsharded) tensors on CPU."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(
    model: OrionLM, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict, fsdp: bool
) -> None:
    if not fsdp:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        _shape_moments_as_params(optimizer)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # Each full tensor is sharded as its parameter is, which needs the parameter's shape: the files hold Chimera's
    # residual lambdas 0-dim, the parameters (1,) (see chimera.py).
    shapes = {name: p.shape for name, p in model.named_parameters()}
    model_state = {name: t.reshape(shapes[name]) if name in shapes else t for name, t in model_state.items()}
    options = StateDictOptions(full_state_dict=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state, options=options)


def _shape_moments_as_params(optimizer: torch.optim.Optimizer) -> None:
    """Runs saved while Chimera's residual lambdas were 0-dim parameters hold their optimizer moments 0-dim; shape
    them as the (1,) parameters, which an update needs. `step` is every parameter's scalar count, left as it is."""
    for inner in getattr(optimizer, "optimizers", [optimizer]):  # a CombinedOptimizer's, or the optimizer
        for p, state in inner.state.items():
            for key, value in state.items():
                if key != "step" and torch.is_tensor(value) and value.dim() == 0 and p.shape == (1,):
                    state[key] = value.reshape(1)
