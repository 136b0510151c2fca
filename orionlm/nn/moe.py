"""Mixture-of-experts feed-forward: a top-k router over SwiGLU experts, with an optional
shared expert (Qwen-MoE), the load-balancing loss (Mixtral), the router z-loss (ST-MoE) and the routing bias of
auxiliary-loss-free balancing (DeepSeek-V3).

Balancing the experts' load, three ways (ModelConfig's router_* options):
- the load-balancing loss E * sum_e f_e P_e (f_e: the share of routed slots expert e took, P_e: its mean router
  probability), over all MoE layers' tokens at once as Mixtral and transformers compute it, or per layer and
  averaged (router_aux_loss_per_layer: no layer can collapse while the others make up for it);
- global-batch balancing (router_aux_loss_global; Qiu et al. 2025, arXiv 2501.11873): f_e counted over the whole
  step (its micro-batches so far, on every process; the trainer passes those counts) rather than each micro-batch;
- auxiliary-loss-free balancing (router_bias_update_rate; DeepSeek-V3, arXiv 2412.19437 section 2.1.2): a
  per-expert bias added to the router probabilities to choose the top-k experts, never to their weights, moved
  after each optimizer step toward the mean load (MoE.update_score_bias). It is the gate's buffer
  `e_score_correction_bias`, as DeepSeek-V3's checkpoints name it, saved with the weights and used at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .linear import SMALL_BATCH, Linear, linear
from .mlp import MLP

STACKS = ("gate_up_proj", "down_proj")  # an MoE layer's expert stacks, in parameter order


class Experts(nn.Module):
    """All experts' weights stacked: gate_up_proj (E, 2I, C) holds [gate; up], down_proj (E, C, I)."""

    stacked = True  # weights(experts) is a view (quant.linear.QuantExperts: a dequantized copy)

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, device=device))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate, device=device))

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """Normal(0, std), every expert drawn as one stack."""
        for stack in (self.gate_up_proj, self.down_proj):
            stack.copy_(torch.randn(stack.shape, generator=generator) * std)

    def weights(self, experts: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (gate_up_proj, down_proj) stacks the single-token and reference paths multiply by, for the given
        experts (default all). Here the parameters themselves, or views of them; nn.lora.LoRAExperts adds its
        low-rank deltas."""
        if experts is None:
            return self.gate_up_proj, self.down_proj
        return self.gate_up_proj[experts], self.down_proj[experts]

    def grouped(self, name: str, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, in), its rows grouped by expert (counts[e] rows for expert e), times each expert's matrix of
        stack `name` ("gate_up_proj" or "down_proj") transposed. nn.lora.LoRAExperts adds its low-rank term."""
        return grouped_linear(x, getattr(self, name), counts)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e applied to x (N, C)."""
        gate_up_proj, down_proj = self.weights(slice(e, e + 1))
        return swiglu_expert(x, gate_up_proj[0], down_proj[0])


def swiglu_expert(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert, gate_up (2I, C) and down (C, I), applied to x (N, C)."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.experts_per_token
        self.norm_topk_prob = config.norm_topk_prob
        self.jitter = config.router_jitter
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        if config.router_score_bias:
            self.gate.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        self.experts = Experts(config.num_experts, config.hidden_size, config.expert_intermediate_size)
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size, "swiglu")
            if config.shared_expert_gate:
                self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)
        self.use_reference = False  # tests flip this to run the readable per-expert path

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (N, E) in float32, top-k weights (N, k) and expert ids (N, k)."""
        router_in = x
        if self.training and self.jitter:
            # Switch Transformer jitter: multiplicative noise on the router input only.
            router_in = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        router_in = router_in.float()
        logits = F.linear(router_in, self.gate.weight.float())
        if getattr(self.gate, "adapter_enabled", False):  # a LoRA adapter on the router (nn.lora.LoRALinear) too
            logits = logits + self.gate.adapter(router_in)
        probs = logits.softmax(dim=-1)
        bias = getattr(self.gate, "e_score_correction_bias", None)
        if bias is None:
            weights, ids = probs.topk(self.top_k, dim=-1)
        else:  # the bias picks the experts; their weights stay the router's probabilities
            ids = (probs + bias.float()).topk(self.top_k, dim=-1).indices
            weights = probs.gather(-1, ids)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, ids

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> output (B, T, C), router logits (B*T, E), tokens per expert (E,)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        logits, weights, ids = self.route(x)
        weights = weights.to(x.dtype)
        if self.use_reference:
            y = self._reference(x, weights, ids)
        elif x.shape[0] == 1:
            y = self._single_token(x, weights, ids)
        else:
            y = self._dispatch(x, weights, ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if hasattr(self, "shared_expert_gate"):
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts)
        return y.view(shape), logits, counts

    @torch.no_grad()
    def update_score_bias(self, load: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's update after an optimizer step, from load (E,), the slots each expert took during it: an
        expert that took fewer than the mean gets its bias raised by `rate`, one that took more lowered by it."""
        bias = self.gate.e_score_correction_bias
        load = load.to(bias.device, torch.float32)
        bias += rate * torch.sign(load.mean() - load).to(bias.dtype)

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sort the N*k (token, expert) slots by expert, run each projection as one grouped matmul over
        the contiguous per-expert slices, then scatter the weighted outputs back to their tokens."""
        flat_ids = ids.flatten()  # (N*k,)
        order = flat_ids.argsort(stable=True)
        token_of_slot = order // self.top_k  # (N*k,)
        counts = torch.bincount(flat_ids, minlength=self.num_experts)  # (E,) slots per expert
        xs = x.index_select(0, token_of_slot)  # (N*k, C), grouped by expert
        gate, up = self.experts.grouped("gate_up_proj", xs, counts).chunk(2, dim=-1)  # (N*k, I) each
        out = self.experts.grouped("down_proj", F.silu(gate) * up, counts)  # (N*k, C)
        out = out * weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of_slot, out)

    def _single_token(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """One token (batch-1 decoding), without the sort, bincount and scatter that group many tokens by
        expert. Its k experts, when evenly spaced (always so for k <= 2), are one strided view of the
        stacked weights, so each projection is a single bmm over them (which also spreads the experts
        over threads); otherwise, and for quantized experts (whose own layers multiply by the codes), they
        run one by one."""
        chosen, order = ids[0].sort()
        e = chosen.tolist()
        k = len(e)
        stride = (e[-1] - e[0]) // (k - 1) if k > 1 else 1
        if not self.experts.stacked or e != list(range(e[0], e[-1] + 1, stride)):
            return sum(w * self.experts.expert(i, x) for i, w in zip(ids[0].tolist(), weights[0], strict=True))
        # the k chosen experts: a strided view, no copy (with LoRA, their weights plus their deltas only)
        # (quantized experts dequantize to float32: .to is a no-op for float ones)
        gate_up_proj, down_proj = (w.to(x.dtype) for w in self.experts.weights(slice(e[0], e[-1] + 1, stride)))
        h = torch.bmm(x.expand(k, 1, -1), gate_up_proj.transpose(1, 2))  # (k, 1, 2I)
        gate, up = h.chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, down_proj.transpose(1, 2))  # (k, 1, C)
        return (weights[0, order].view(k, 1, 1) * y).sum(dim=0)  # (1, C)

    def _reference(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, then each token keeps its top-k outputs. Slow and obvious."""
        gate_up_proj, down_proj = (w.to(x.dtype) for w in self.experts.weights())
        outs = [swiglu_expert(x, gate_up_proj[e], down_proj[e]) for e in range(self.num_experts)]
        all_out = torch.stack(outs, dim=1)  # (N, E, C)
        chosen = all_out.gather(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (N, k, C)
        return (chosen * weights.unsqueeze(-1)).sum(dim=1)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (M, in) with its rows grouped by expert, counts[e] rows for expert e, times each group's
    weight[e] (E, out, in) transposed: (M, out).

    On CPU this is one F.grouped_mm (where torch has it), whose backward writes every expert's weight
    gradient into one (E, out, in) tensor. Elsewhere (CUDA's kernel wants bfloat16 on recent GPUs;
    autocast; torch.compile, whose inductor lowers it for bfloat16 only; operands the kernel rejects)
    the experts run one by one on matrices taken from a single unbind, whose backward stacks their
    gradients once: indexing weight[e] instead would allocate and zero-fill a full (E, out, in)
    gradient for every expert."""
    weight_t = weight.transpose(1, 2)  # (E, in, out)
    if x.shape[0] <= SMALL_BATCH * weight.shape[0] and not torch.is_grad_enabled():
        # decoding: each expert sees a few rows; threaded column blocks stream its weight faster
        parts = x.split(counts.tolist())
        return torch.cat([linear(part, w) for part, w in zip(parts, weight.unbind(0), strict=True)])
    if (
        hasattr(F, "grouped_mm")
        and x.device.type == "cpu"
        and x.dtype == weight.dtype
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and _grouped_mm_layout(x)
        and _grouped_mm_layout(weight_t)
        and weight.shape[1] * weight.element_size() % 16 == 0  # the backward's output rows, e.g. a LoRA rank of 2
    ):
        return F.grouped_mm(x, weight_t, offs=counts.cumsum(0, dtype=torch.int32))
    parts = x.split(counts.tolist())
    return torch.cat([F.linear(part, w) for part, w in zip(parts, weight.unbind(0), strict=True)])


def _grouped_mm_layout(t: torch.Tensor) -> bool:
    """The CPU grouped_mm kernel reads its operands 16 bytes at a time: the start and every stride
    but the unit one must be multiples of 16 bytes."""
    step = max(1, 16 // t.element_size())
    return t.data_ptr() % 16 == 0 and all(stride % step == 0 for stride in t.stride() if stride != 1)


def load_balancing_loss(
    router_logits: list[torch.Tensor], top_k: int, counts: torch.Tensor | None = None, per_layer: bool = False
) -> torch.Tensor:
    """The auxiliary load-balancing loss E * sum_e f_e P_e (top_k at perfect balance): f_e is the number of routed
    slots expert e took per token, P_e its mean router probability over these router_logits (per MoE layer, (N, E)).

    counts (layers, E) are the slots the f_e come from: the experts the routers chose for these tokens, or (global-
    batch balancing) for all the tokens of a step so far; None: each token's top-k by probability, what a router
    without a score bias picks. Over all layers' tokens at once (Mixtral; transformers' load_balancing_loss_func),
    or with per_layer each layer's loss and their mean."""
    layer_probs = [lg.float().softmax(dim=-1) for lg in router_logits]  # (N, E) each
    probs = torch.stack([p.mean(dim=0) for p in layer_probs])  # (layers, E): P_e
    num_experts = probs.shape[-1]
    if counts is None:
        chosen = [p.topk(top_k, dim=-1).indices.flatten() for p in layer_probs]
        counts = torch.stack([torch.bincount(ids, minlength=num_experts) for ids in chosen])
    counts = counts.float()
    f = top_k * counts / counts.sum(dim=-1, keepdim=True)  # (layers, E), slots per token
    if per_layer:
        return num_experts * (f * probs).sum(dim=-1).mean()
    # all layers' tokens as one batch: every layer routes as many tokens, so f and P are the layers' means
    return num_experts * (f.mean(dim=0) * probs.mean(dim=0)).sum()


def router_z_loss(router_logits: list[torch.Tensor]) -> torch.Tensor:
    """ST-MoE z-loss: the mean squared log-partition of the router logits, averaged over layers."""
    return torch.stack([torch.logsumexp(lg.float(), dim=-1).square().mean() for lg in router_logits]).mean()
