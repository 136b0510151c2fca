"""Quiet-STaR training (Zelikman et al. 2024, arXiv 2403.09629): the model learns to think before every token.

At every position of a text window at once, the model writes a short thought: the start token, n_ahead - 3
tokens sampled from itself, the end token. Then, still in parallel and teacher-forced, it predicts the next
n_ahead_talk true tokens after its thought; the mixing head blends each of those predictions with the base
model's (the pass without a thought) at the same point of the text. The passes run as one batch:

    pass 0            the text x_0 .. x_{L-1}, causal (the base model)
    pass 1            <|startthought|> at every position
    pass 2 .. N-2     thought tokens, each sampled from the previous pass's logits
    pass N-1          <|endthought|>: its output at position t predicts x_{t+1}
    pass N-1+k        x_{t+k} (k = 1 .. n_ahead_talk - 1): predicts x_{t+1+k}

Pass j's token at position t sits at position t + j and sees the text up to t and its own position's
tokens of passes 1..j (ParallelThoughts); n_passes copies of each row think independently.

Loss = 0.5 x the base pass's next-token loss + 0.5 x the mean talk-ahead loss, plus REINFORCE on the
sampled thought tokens: a thought's reward is how much it raised the log-likelihood of the true future
tokens over the base model, minus the mean over the row's n_passes thoughts, negative rewards clipped to 0,
and the thought tokens' log-probabilities are taken at temperature `reinforce_temperature`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.chat import IGNORE
from ..errors import OrionError
from ..model import ModelOutput, OrionLM
from ..nn.cache import PositionStreams


@dataclass
class QuietStarConfig:
    n_ahead: int = 12  # passes of a thought: the text, start token, n_ahead - 3 sampled tokens, end token
    n_ahead_talk: int = 4  # true future tokens each thought is scored on
    n_passes: int = 2  # thoughts per position; their mean reward is each one's baseline
    policy_weight: float = 1.0  # weight of the REINFORCE term (the reference uses 1e6 at learning rate 1e-6)
    thought_temperature: float = 1.0  # sampling temperature of thought tokens
    reinforce_temperature: float = 3.0  # temperature of the thought log-probabilities in the policy term
    meta_init: str = "---"  # text whose first token's embedding starts both meta embeddings

    def __post_init__(self) -> None:
        if self.n_ahead < 3:
            raise OrionError(f"n_ahead counts the text pass and the start and end tokens: >= 3, got {self.n_ahead}")
        for key in ("n_ahead_talk", "n_passes"):
            if getattr(self, key) < 1:
                raise OrionError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("thought_temperature", "reinforce_temperature"):
            if getattr(self, key) <= 0:
                raise OrionError(f"{key} must be positive, got {getattr(self, key)}")


class _GrowingCache:
    """Keys and values kept by concatenation (a KVCache writes in place), so gradients reach every pass; a
    hybrid model's GDN layers keep every position's recurrent state and continue each on its own."""

    def __init__(self, gdn_slots: int) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.states = [PositionStreams() for _ in range(gdn_slots)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


class ParallelThoughts:
    """A thought at every position of a batch, all positions at once. The constructor runs the text; each
    `step` feeds one more token to every position's thought. Pass j's token at position t has position t + j
    and attends to the text tokens 0..t and to the tokens of passes 1..j at position t."""

    def __init__(self, model: OrionLM, input_ids: torch.Tensor) -> None:
        self.model, self.cache, self.passes = model, _GrowingCache(getattr(model.model, "gdn_slots", 0)), 0
        self.length = input_ids.shape[1]
        self.first = model(input_ids, cache=self.cache, output_hidden=True)

    def step(self, tokens: torch.Tensor) -> ModelOutput:
        """Feed tokens (B, L), one per position; returns the model output (logits, hidden states) of this pass."""
        self.passes += 1
        j, L = self.passes, self.length
        t = torch.arange(L, device=tokens.device)
        text = t.view(L, 1) >= t.view(1, L)
        own = torch.eye(L, dtype=torch.bool, device=tokens.device).repeat(1, j)
        mask = torch.cat([text, own], dim=1).view(1, 1, L, (j + 1) * L)
        key_positions = torch.cat([t + i for i in range(j + 1)]).view(1, -1)
        return self.model(
            tokens,
            position_ids=(t + j).expand_as(tokens),
            cache=self.cache,
            mask=mask,
            key_positions=key_positions,
            output_hidden=True,
        )


@dataclass
class QuietStarOutput:
    loss: torch.Tensor  # what the optimizer minimises: the LM loss plus the weighted policy loss
    aux_loss: torch.Tensor | None  # the text pass's MoE router losses
    z_loss: torch.Tensor | None
    expert_counts: torch.Tensor | None
    router_logits: list[torch.Tensor] | None  # the text pass's, per MoE layer (global-batch balancing reads them)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars for the log


def _shift(x: torch.Tensor, k: int, fill: float | int) -> torch.Tensor:
    """x[:, t + k] at t (the last k positions get `fill`)."""
    if k == 0:
        return x
    pad = x.new_full((x.shape[0], k, *x.shape[2:]), fill)
    return torch.cat([x[:, k:], pad], dim=1)


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B, L) negative log-likelihoods of the targets (0 where ignored)."""
    nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view(targets.shape)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def thought_rewards(gain: torch.Tensor, n_passes: int) -> torch.Tensor:
    """REINFORCE rewards (B, L) from each thought's log-likelihood gain (B, L), rows in groups of n_passes
    copies of one text: the gain minus the mean gain of the group's thoughts at the same position (with one
    thought, the gain itself), negative rewards clipped to 0."""
    if n_passes > 1:
        grouped = gain.view(-1, n_passes, gain.shape[1])
        gain = (grouped - grouped.mean(dim=1, keepdim=True)).view_as(gain)
    return gain.clamp(min=0)


def quietstar_loss(
    model: OrionLM, input_ids: torch.Tensor, targets: torch.Tensor, settings: QuietStarConfig
) -> QuietStarOutput:
    """The Quiet-STaR loss of a batch of text windows (input_ids, next-token targets; -100 ignored)."""
    config = model.config
    N, T, P = settings.n_ahead, settings.n_ahead_talk, settings.n_passes
    ids, targets = input_ids.repeat_interleave(P, dim=0), targets.repeat_interleave(P, dim=0)
    B, L = ids.shape
    thoughts = ParallelThoughts(model, ids)
    h0, logits0 = thoughts.first.hidden, thoughts.first.logits
    base_nll = _token_nll(logits0, targets)  # -log p_base(x_{t+1} | x_<=t)
    base_loss = _masked_mean(base_nll, targets != IGNORE)

    meta = torch.tensor([config.thought_start_id, config.thought_end_id], device=ids.device)
    out = thoughts.step(torch.full_like(ids, config.thought_start_id))
    log_probs = []  # per sampled thought token, (B, L)
    for _ in range(N - 3):
        logits = out.logits.float().index_fill(-1, meta, float("-inf"))  # a thought never nests or ends early
        probs = torch.softmax(logits.detach() / settings.thought_temperature, dim=-1)
        token = torch.multinomial(probs.flatten(0, 1), 1).view(B, L)
        log_probs.append(
            torch.log_softmax(logits / settings.reinforce_temperature, dim=-1).gather(-1, token[..., None])[..., 0]
        )
        out = thoughts.step(token)
    out = thoughts.step(torch.full_like(ids, config.thought_end_id))

    # Talk: after the thought at t, predict x_{t+1+k}, mixed with the base model's prediction of the same
    # token (its hidden state at t + k); positions whose n_ahead_talk targets all exist are scored.
    scored = torch.ones_like(targets, dtype=torch.bool)
    for k in range(T):
        scored &= _shift(targets, k, IGNORE) != IGNORE
    talk_nll, weights = [], []
    for k in range(T):
        if k > 0:
            out = thoughts.step(_shift(targets, k - 1, IGNORE).clamp(min=0))  # x_{t+k}
        mixed, w = model.thinking.mix(_shift(h0, k, 0.0), out.hidden)
        talk_nll.append(_token_nll(model.lm_head(mixed), _shift(targets, k, IGNORE)))
        weights.append(w)
    talk = torch.stack(talk_nll)  # (T, B, L)
    base_talk = torch.stack([_shift(base_nll, k, 0.0) for k in range(T)])  # the same targets, no thought
    talk_loss = _masked_mean(talk.mean(0), scored)
    lm_loss = 0.5 * base_loss + 0.5 * talk_loss

    # REINFORCE: a thought's reward is the log-likelihood it added to the true future tokens
    reward = thought_rewards((base_talk - talk).sum(0).detach() * scored, P)
    if log_probs:
        policy_loss = torch.stack([_masked_mean(-reward * lp, scored) for lp in log_probs]).mean()
    else:
        policy_loss = torch.zeros((), device=ids.device)
    loss = lm_loss + settings.policy_weight * policy_loss if model.training else lm_loss
    first = thoughts.first
    metrics = {
        "base_loss": base_loss,
        "talk_loss": talk_loss,
        "talk_base_loss": _masked_mean(base_talk.mean(0), scored),
        "policy_loss": policy_loss,
        "mix_weight": _masked_mean(torch.stack(weights).mean(0), scored),
    }
    return QuietStarOutput(loss, first.aux_loss, first.z_loss, first.expert_counts, first.router_logits,
                           {k: v.detach() for k, v in metrics.items()})  # fmt: skip


class QuietStar(nn.Module):
    """A thinking OrionLM whose forward is the Quiet-STaR loss, so the trainer (and DDP) can wrap it."""

    def __init__(self, model: OrionLM, settings: QuietStarConfig) -> None:
        super().__init__()
        if not model.config.thinks:
            raise OrionError("Quiet-STaR needs a thinking model: add the meta tokens first (add_thought_tokens)")
        self.model, self.settings = model, settings

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> QuietStarOutput:
        return quietstar_loss(self.model, input_ids, targets, self.settings)
