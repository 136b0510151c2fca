"""Optimizers for pretraining: AdamW with parameter groups, or Muon for the hidden matrices plus AdamW
for everything else.

Every parameter gets one role, which names its param group:

    role          what (Hugging Face names)                                  optimizer    weight decay  lr
    embed         model.embed_tokens.weight (and the LM head when tied)      AdamW        no            embed_lr
    head          lm_head.weight, untied                                     AdamW        yes           head_lr
    no_decay      1-D tensors: norm gains and biases, scalar gains, biases;  AdamW        no            scalar_lr
                  Chimera's x0 lambdas, U-Net skip weights and layer ids
    decay         other matrices; with Muon only the routers (mlp.gate,      AdamW        yes           lr
                  shared_expert_gate), whose few rows Muon would flatten,
                  and GDN's short-convolution filters
    muon          2-D hidden matrices: attention q/k/v/o, MLPs, shared       Muon         yes           muon_lr
                  experts (only with name="muon"; otherwise in "decay")
    muon_experts  3-D expert stacks mlp.experts.gate_up_proj / down_proj     BatchedMuon  yes           muon_lr
                  (E, out, in), each expert's matrix orthogonalised alone

Each param group carries "name" (the role), "base_lr" (its peak learning rate; the trainer sets
group["lr"] = group["base_lr"] * lr_factor(...) every step) and "param_names".

Muon uses torch.optim.Muon for the 2-D matrices when the installed torch has it, and BatchedMuon (the same
algorithm written here, batched over leading dimensions) for the expert stacks and on older torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..chimera import ChimeraDecoder
from ..errors import OrionError, checker, unknown_names
from ..nn.moe import Experts, MoE

OPTIMIZERS = ("adamw", "muon")
# "original" (Keller Jordan): lr * sqrt(max(1, out/in)), tuned around lr 0.02.
# "match_rms_adamw" (Moonshot, "Muon is Scalable for LLM Training"): lr * 0.2 * sqrt(max(out, in)), which gives
# the update the RMS of an AdamW update, so Muon reuses AdamW's learning rate and weight decay.
MUON_LR_ADJUSTMENTS = ("match_rms_adamw", "original")
# Quintic Newton-Schulz coefficients from Keller Jordan's Muon (also torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7


class OptimError(OrionError):
    """Optimizer settings that cannot be used; the message says what to change."""


@dataclass
class OptimConfig:
    """The optimizer of a training run.

    name="adamw": AdamW on every parameter, in the groups described in this module's docstring.
    name="muon": Muon on the hidden matrices (2-D, and each expert matrix of a 3-D stack), AdamW on the
    embedding, the LM head, the routers and the 1-D parameters.

    Muon's learning rate follows `muon_adjust_lr`. The default, "match_rms_adamw", scales each matrix's
    update to the RMS of an AdamW update (Moonlight's recipe), so Muon's lr and weight decay default to
    AdamW's (`lr`, `weight_decay`) and switching optimizers needs no retuning. "original" is Keller Jordan's
    scaling, meant for muon_lr around 0.02 and muon_weight_decay around 0.
    """

    name: str = "adamw"
    lr: float = 3e-4  # AdamW's peak lr; also every AdamW group's unless embed_lr/head_lr/scalar_lr are given
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    embed_lr: float | None = None  # None: lr
    head_lr: float | None = None  # None: lr
    scalar_lr: float | None = None  # lr of the 1-D parameters; None: lr
    muon_lr: float | None = None  # None: lr (right for "match_rms_adamw")
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_weight_decay: float | None = None  # None: weight_decay
    muon_adjust_lr: str = "match_rms_adamw"
    grad_clip: float = 1.0  # max global grad norm; 0: off (the trainer applies it)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        self.validate()

    def validate(self) -> None:
        need = checker(OptimError)

        need(
            self.name in OPTIMIZERS,
            f"unknown optimizer {unknown_names([self.name], OPTIMIZERS)}; use one of {OPTIMIZERS}",
        )
        need(
            self.muon_adjust_lr in MUON_LR_ADJUSTMENTS,
            f"unknown muon_adjust_lr {unknown_names([self.muon_adjust_lr], MUON_LR_ADJUSTMENTS)}; "
            f"use one of {MUON_LR_ADJUSTMENTS}",
        )
        for key in ("lr", "embed_lr", "head_lr", "scalar_lr", "muon_lr"):
            value = getattr(self, key)
            need(value is None or value >= 0, f"{key} ({value}) must be >= 0")
        need(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"betas {self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]",
        )
        need(self.eps > 0, f"eps ({self.eps}) must be > 0")
        for key in ("weight_decay", "muon_weight_decay", "grad_clip"):
            value = getattr(self, key)
            need(value is None or value >= 0, f"{key} ({value}) must be >= 0")
        need(0 <= self.muon_momentum < 1, f"muon_momentum ({self.muon_momentum}) must be in [0, 1)")
        need(self.muon_ns_steps >= 1, f"muon_ns_steps ({self.muon_ns_steps}) must be >= 1 (5 is standard)")


def zeropower_via_newtonschulz(
    grad: torch.Tensor, steps: int = 5, coefficients: tuple[float, float, float] = NS_COEFFICIENTS, eps: float = NS_EPS
) -> torch.Tensor:
    """The orthogonalised grad (..., A, B) (roughly U V^T of its SVD), every matrix on its own, in bfloat16.

    torch.optim.Muon's iteration, batched: normalise each matrix by its Frobenius norm (so its spectral
    norm is <= 1), then `steps` quintic iterations X <- a X + (b X X^T + c (X X^T)^2) X on the wide
    orientation (A <= B), where X X^T is the smaller Gram matrix.
    """
    a, b, c = coefficients
    x = grad.bfloat16().reshape(-1, *grad.shape[-2:])  # (N, A, B)
    tall = grad.size(-2) > grad.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT  # (N, A, A)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    if tall:
        x = x.mT
    return x.reshape(grad.shape)


def adjusted_muon_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """The lr applied to a Muon update of a matrix (or stack of matrices) of this shape, as torch.optim.Muon."""
    rows, cols = shape[-2:]
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))  # None or "original"


class BatchedMuon(torch.optim.Optimizer):
    """Muon for matrices (out, in) and stacks of matrices (..., out, in) such as MoE experts (E, out, in):
    torch.optim.Muon's algorithm (momentum, Nesterov, decoupled weight decay, lr adjustment by matrix shape),
    with every matrix of a stack orthogonalised and lr-adjusted as the matrix it is.

    Per step, with momentum mu:  B <- mu B + (1 - mu) g;  U <- (1 - mu) g + mu B if nesterov else B;
    p <- p (1 - lr wd) - adjusted_lr * NS(U).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
    ) -> None:
        if adjust_lr_fn not in (None, *MUON_LR_ADJUSTMENTS):
            raise ValueError(f"adjust_lr_fn must be None or one of {MUON_LR_ADJUSTMENTS}, not {adjust_lr_fn!r}")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"BatchedMuon needs matrices or stacks of matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = zeropower_via_newtonschulz(update, group["ns_steps"], group["ns_coefficients"], group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-adjusted_muon_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


class CombinedOptimizer:
    """Several optimizers (Muon for the matrices, AdamW for the rest) used as one.

    `param_groups` lists the inner optimizers' group dicts themselves, so setting group["lr"] on it sets
    the lr the inner optimizer uses. The state dict holds each inner optimizer's state dict, in order.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("optimizers")
        kinds = [type(optimizer).__name__ for optimizer in self.optimizers]
        if states is None or len(states) != len(self.optimizers):
            raise OptimError(
                f"the saved optimizer state does not match this optimizer ({' + '.join(kinds)}); "
                "resume with the optimizer settings the run was started with"
            )
        for optimizer, state in zip(self.optimizers, states, strict=True):
            optimizer.load_state_dict(state)


def _special_param_ids(model: nn.Module) -> tuple[set[int], set[int], set[int], set[int]]:
    """ids of the embedding, LM head, router and Chimera stack-level (gain-like) parameters, found by module
    (so wrappers such as DDP or torch.compile, which prefix the names, do not matter)."""
    embed, head, router, gains = set(), set(), set(), set()
    for name, module in model.named_modules():
        if isinstance(module, ChimeraDecoder):
            gains.update(id(p) for p in module.parameters(recurse=False))
        if isinstance(module, nn.Embedding):
            embed.add(id(module.weight))
        elif name.rsplit(".", 1)[-1] == "lm_head":
            head.update(id(p) for p in module.parameters())
        elif isinstance(module, MoE):
            for gate in (module.gate, getattr(module, "shared_expert_gate", None)):
                if gate is not None:
                    router.update(id(p) for p in gate.parameters())
    return embed, head - embed, router, gains  # a tied head is the embedding


def param_roles(model: nn.Module, muon: bool) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The trainable parameters of `model` by role (see the module docstring), each tensor once, in model order.
    Roles without parameters are left out."""
    embed, head, router, gains = _special_param_ids(model)
    experts = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    roles: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():  # shared (tied) tensors are listed once
        if not p.requires_grad:
            continue
        if id(p) in embed:
            role = "embed"
        elif id(p) in head:
            role = "head"
        elif p.ndim < 2 or id(p) in gains:
            role = "no_decay"
        elif muon and id(p) in experts:
            role = "muon_experts"
        elif muon and p.ndim == 2 and id(p) not in router:
            role = "muon"
        else:
            role = "decay"
        roles.setdefault(role, []).append((name, p))
    return roles


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer | CombinedOptimizer:
    """The optimizer `config` describes for `model`'s trainable parameters: a torch.optim.AdamW for "adamw",
    a CombinedOptimizer of Muon (+ BatchedMuon for expert stacks) and AdamW for "muon"."""
    roles = param_roles(model, muon=config.name == "muon")
    if not roles:
        raise OptimError("the model has no trainable parameters")
    lr = config.lr
    muon_lr = lr if config.muon_lr is None else config.muon_lr
    muon_wd = config.weight_decay if config.muon_weight_decay is None else config.muon_weight_decay
    settings = {  # role: (peak lr, weight decay)
        "embed": (lr if config.embed_lr is None else config.embed_lr, 0.0),
        "head": (lr if config.head_lr is None else config.head_lr, config.weight_decay),
        "no_decay": (lr if config.scalar_lr is None else config.scalar_lr, 0.0),
        "decay": (lr, config.weight_decay),
        "muon": (muon_lr, muon_wd),
        "muon_experts": (muon_lr, muon_wd),
    }

    def group(role: str) -> dict[str, Any]:
        named = roles[role]
        base_lr, weight_decay = settings[role]
        return {
            "params": [p for _, p in named],
            "param_names": [n for n, _ in named],
            "name": role,
            "base_lr": base_lr,
            "lr": base_lr,
            "weight_decay": weight_decay,
        }

    adamw_groups = [group(r) for r in ("decay", "no_decay", "embed", "head") if r in roles]
    adamw = None
    if adamw_groups:
        params = [p for g in adamw_groups for p in g["params"]]
        # One fused kernel per step instead of a dozen elementwise passes (8x faster on CPU); sharded
        # (DTensor) parameters and other devices take the default multi-tensor path.
        fused = all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
        adamw = torch.optim.AdamW(
            adamw_groups, lr=lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay, fused=fused
        )
    if config.name == "adamw":
        assert adamw is not None
        return adamw

    muon_settings = dict(
        momentum=config.muon_momentum,
        nesterov=config.muon_nesterov,
        ns_steps=config.muon_ns_steps,
        adjust_lr_fn=config.muon_adjust_lr,
    )
    optimizers: list[torch.optim.Optimizer] = []
    # torch.optim.Muon exists from torch 2.9; before that BatchedMuon (the same algorithm) takes the matrices too.
    torch_muon = getattr(torch.optim, "Muon", None)
    if torch_muon is not None and "muon" in roles:
        optimizers.append(torch_muon([group("muon")], **muon_settings))
    batched_roles = ("muon_experts",) if torch_muon is not None else ("muon", "muon_experts")
    if batched_groups := [group(r) for r in batched_roles if r in roles]:
        optimizers.append(BatchedMuon(batched_groups, **muon_settings))
    if adamw is not None:
        optimizers.append(adamw)
    return CombinedOptimizer(optimizers)


def param_counts_by_group(optimizer: torch.optim.Optimizer | CombinedOptimizer) -> dict[str, int]:
    """Number of parameter elements in each named param group, e.g. {"decay": 1_200_000, "no_decay": 640, ...}."""
    counts: dict[str, int] = {}
    for group in optimizer.param_groups:
        counts[group["name"]] = counts.get(group["name"], 0) + sum(p.numel() for p in group["params"])
    return counts
