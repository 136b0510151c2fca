"""Gated DeltaNet (GDN): the linear-recurrent mixer of the Chimera (Auron) hybrid.

Per head, a d_k x d_v matrix state S is decayed and then corrected towards the new value, a step of
the delta rule with a learned forget gate (Yang et al., "Gated Delta Networks", arXiv:2412.06464):

    S <- alpha_t S;   delta_t = beta_t (v_t - S^T k_t);   S <- S + k_t delta_t^T;   o_t = S^T q_t

Two forms compute it from the same parameters: `recurrent_gated_delta_rule`, the step-by-step loop
(decoding one token, and the readable reference), and `chunk_gated_delta_rule`, the chunked form
(WY / UT transform) whose work is matrix products over chunks of tokens (training and prefill). Both
run in float32 whatever the input dtype. On CUDA, when flash-linear-attention is installed, the layer
runs its Triton kernels instead; on CPU neither fla nor triton is ever imported.

The layer is flash-linear-attention's `GatedDeltaNet` with its defaults (as Auron uses it), with its
tensor names, so checkpoints load unchanged: q/k/v projections each through a depthwise causal
convolution and SiLU, q and k L2-normalised, beta = sigmoid(b_proj x), log alpha = g =
-exp(A_log) softplus(a_proj x + dt_bias), then a per-head RMSNorm gated by SiLU(g_proj x), and o_proj.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import OrionError
from .cache import GDNState, PositionStreams
from .linear import Linear, Packed

Mode = Literal["auto", "chunk", "recurrent"]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, the normalisation (and eps) of fla's kernels."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(
    q: torch.Tensor,  # (B, T, H, d_k)
    k: torch.Tensor,  # (B, T, H, d_k)
    v: torch.Tensor,  # (B, T, H, d_v)
    g: torch.Tensor,  # (B, T, H) log of the decay alpha, <= 0
    beta: torch.Tensor,  # (B, T, H) write strength
    initial_state: torch.Tensor | None = None,  # (B, H, d_k, d_v)
    output_final_state: bool = False,
    scale: float | None = None,
    output_all_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule one step at a time. q and k come normalised (the layer L2-normalises them);
    q is multiplied by `scale` (default d_k^-1/2). Returns the output (B, T, H, d_v) in v's dtype and,
    if asked, the final state (B, H, d_k, d_v) in float32, or with `output_all_states` the state after
    every step (B, T, H, d_k, d_v)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))  # (B, H, T, D)
    alpha, beta = g.transpose(1, 2).float().exp(), beta.transpose(1, 2).float()  # (B, H, T)
    q = q * scale
    B, H, T, d_k = k.shape
    S = v.new_zeros(B, H, d_k, v.shape[-1]) if initial_state is None else initial_state.float()
    outputs, states = [], []
    for t in range(T):
        k_t = k[:, :, t]  # (B, H, d_k)
        S = S * alpha[:, :, t, None, None]
        delta = beta[:, :, t, None] * (v[:, :, t] - (k_t.unsqueeze(-2) @ S).squeeze(-2))  # (B, H, d_v)
        S = S + k_t.unsqueeze(-1) * delta.unsqueeze(-2)
        outputs.append((q[:, :, t].unsqueeze(-2) @ S).squeeze(-2))
        if output_all_states:
            states.append(S)
    if output_all_states:
        return torch.stack(outputs, dim=1).to(out_dtype), torch.stack(states, dim=1)
    return torch.stack(outputs, dim=1).to(out_dtype), S if output_final_state else None


def chunk_gated_delta_rule(
    q: torch.Tensor,  # (B, T, H, d_k)
    k: torch.Tensor,  # (B, T, H, d_k)
    v: torch.Tensor,  # (B, T, H, d_v)
    g: torch.Tensor,  # (B, T, H)
    beta: torch.Tensor,  # (B, T, H)
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,  # (B, H, d_k, d_v)
    output_final_state: bool = False,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same recurrence as `recurrent_gated_delta_rule` (same arguments and results), computed chunk
    by chunk: inside a chunk everything is a matrix product; only a (d_k x d_k) @ (d_k x d_v) product
    per chunk runs in sequence.

    Within a chunk starting from state S0, with c_i the cumulative log decay up to position i, the
    state after position t is e^{c_t} S0 + sum_{i<=t} e^{c_t - c_i} k_i u_i^T, where the "pseudo-values"
    u_i = beta_i (v_i - e^{c_i} S0^T k_i - sum_{j<i} e^{c_i - c_j} (k_i . k_j) u_j) solve a unit lower
    triangular system (I + A) u = beta v - beta e^{c} k S0 (the UT transform). Solving it for both
    right-hand sides gives u = W_v - W_k S0, after which outputs and the next chunk's state are linear
    in S0: o = O_intra + Q_state S0 and S1 = M S0 + R, all four computed for every chunk at once.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out_dtype, (B, T, H, d_k), d_v = v.dtype, k.shape, v.shape[-1]
    q, k, v = (x.transpose(1, 2).float() for x in (q, k, v))  # (B, H, T, D)
    g, beta = g.transpose(1, 2).float(), beta.transpose(1, 2).float()  # (B, H, T)
    q = q * scale
    C = min(chunk_size, T)  # a short prefill is one chunk of its own length, not padded to 64
    pad = -T % C
    if pad:
        # Padded steps have g = 0 (no decay) and beta = 0 (no write): they leave the state unchanged.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    N = (T + pad) // C
    q, k, v = (x.reshape(B, H, N, C, -1) for x in (q, k, v))  # (B, H, N, C, D)
    g, beta = g.reshape(B, H, N, C), beta.reshape(B, H, N, C)

    c = g.cumsum(-1)  # (B, H, N, C) log decay from the chunk's start to each position, inclusive
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = e^{c_i - c_j}: how much of what position j wrote is left at position i (j <= i).
    # Masked before exp: above the diagonal c_i - c_j >= 0 and could overflow.
    decay = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()  # (B, H, N, C, C)
    k_beta = k * beta.unsqueeze(-1)
    system = (k_beta @ k.transpose(-1, -2)) * decay  # (I + A); the solve reads only its strict lower triangle
    rhs = torch.cat([v * beta.unsqueeze(-1), k_beta * c.exp().unsqueeze(-1)], dim=-1)
    w = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # u = w_v - w_k S0, w = [w_v|w_k]

    attn = (q @ k.transpose(-1, -2)) * decay  # (B, H, N, C, C) causal, diagonal included
    o_intra, attn_w_k = (attn @ w).split([d_v, d_k], dim=-1)  # o_intra: the outputs from a zero starting state
    q_state = q * c.exp().unsqueeze(-1) - attn_w_k  # (B, H, N, C, d_k) how the starting state reaches them
    k_to_end = k * (c[..., -1:] - c).exp().unsqueeze(-1)  # what each position's write keeps at the chunk's end
    R, end_w_k = (k_to_end.transpose(-1, -2) @ w).split([d_v, d_k], dim=-1)  # (B, H, N, d_k, d_v | d_k)
    M = c[..., -1, None, None].exp() * torch.eye(d_k, device=q.device) - end_w_k  # (B, H, N, d_k, d_k)

    S = q.new_zeros(B, H, d_k, d_v) if initial_state is None else initial_state.float()
    starts = []  # the state at the start of each chunk
    for M_n, R_n in zip(M.unbind(2), R.unbind(2), strict=True):  # unbind: one backward for all chunks
        starts.append(S)
        S = M_n @ S + R_n
    o = o_intra + q_state @ torch.stack(starts, dim=2)  # (B, H, N, C, d_v)
    o = o.reshape(B, H, N * C, d_v)[:, :, :T].transpose(1, 2)  # (B, T, H, d_v)
    return o.to(out_dtype), S if output_final_state else None


@functools.cache
def _fla_kernels():
    """fla's (chunk, fused recurrent) gated delta rule kernels, or None when fla is not installed.
    Imported on first use on a CUDA tensor only: importing fla imports triton."""
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as chunk
        from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as recurrent
    except ImportError:
        return None
    return chunk, recurrent


class GatedRMSNorm(nn.Module):
    """Per-head RMSNorm with a weight, times SiLU(gate) when given (fla's FusedRMSNormGated, 'swish'),
    all in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return y if gate is None else y * F.silu(gate.float())

    @torch.no_grad()
    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        self.weight.fill_(1.0)


class GatedDeltaNet(nn.Module):
    """The GDN mixer: (B, T, hidden) -> (B, T, hidden), num_heads heads with keys of head_dim and values of
    head_dim x expand_v. Training and prefill run the chunked form; decoding continues from a GDNState."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        head_dim: int,
        expand_v: float = 2,
        conv_kernel: int = 4,
        use_gate: bool = True,
        use_short_conv: bool = True,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        use_fla: bool = True,
    ) -> None:
        """`use_fla`: run flash-linear-attention's kernels for half-precision CUDA inputs when installed."""
        super().__init__()
        head_v_dim = head_dim * expand_v
        if head_v_dim != int(head_v_dim) or head_v_dim < 1:
            raise OrionError(f"GDN head_dim ({head_dim}) x expand_v ({expand_v}) must be a positive whole number")
        if conv_kernel < 1 or chunk_size < 1:
            raise OrionError(f"GDN conv_kernel ({conv_kernel}) and chunk_size ({chunk_size}) must be at least 1")
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_dim, int(head_v_dim)
        self.key_dim, self.value_dim = num_heads * head_dim, num_heads * self.head_v_dim
        self.conv_kernel, self.use_gate, self.use_short_conv = conv_kernel, use_gate, use_short_conv
        self.chunk_size, self.use_fla = chunk_size, use_fla

        self.q_proj = Linear(hidden, self.key_dim, bias=False)
        self.k_proj = Linear(hidden, self.key_dim, bias=False)
        self.v_proj = Linear(hidden, self.value_dim, bias=False)
        self.a_proj = Linear(hidden, num_heads, bias=False)
        self.b_proj = Linear(hidden, num_heads, bias=False)
        if use_gate:
            self.g_proj = Linear(hidden, self.value_dim, bias=False)
        if use_short_conv:
            # nn.Conv1d for its parameter (weight (channels, 1, kernel), fla's ShortConvolution) and init;
            # forward runs the three as one depthwise convolution, with the cache as left context.
            conv = lambda dim: nn.Conv1d(dim, dim, conv_kernel, groups=dim, bias=False)
            self.q_conv1d, self.k_conv1d, self.v_conv1d = conv(self.key_dim), conv(self.key_dim), conv(self.value_dim)
        self.A_log = nn.Parameter(torch.empty(num_heads))
        self.dt_bias = nn.Parameter(torch.empty(num_heads))
        self.o_norm = GatedRMSNorm(self.head_v_dim, norm_eps)
        self.o_proj = Linear(self.value_dim, hidden, bias=False)
        self.packed: Packed | None = None  # every input projection in one matrix, set by use_decode_layout
        self.reset_gates()

    @torch.no_grad()
    def reset_gates(self, generator: torch.Generator | None = None) -> None:
        """fla's initialisation of the decay: A ~ U(0, 16) (floored so log A stays finite), and dt_bias the
        inverse softplus of dt ~ log-uniform in [0.001, 0.1] (floor 1e-4), as Mamba2 does."""
        if self.A_log.is_meta:
            return
        u = torch.rand(self.A_log.shape, generator=generator)
        self.A_log.copy_((16 * u).clamp_(min=1e-4).log())
        dt_min, dt_max = 0.001, 0.1
        u = torch.rand(self.dt_bias.shape, generator=generator)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def packable(self) -> list[Linear]:
        return [self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj] + (
            [self.g_proj] if self.use_gate else []
        )

    def new_state(
        self, batch: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> GDNState:
        """A zero state: continuing from it equals starting a sequence (conv inputs before it are zeros).
        `dtype` is the activations' dtype (the conv cache); the recurrent state is always float32."""
        device, dtype = device or self.A_log.device, dtype or self.q_proj.weight.dtype
        channels = 2 * self.key_dim + self.value_dim
        conv = torch.zeros(batch, channels, self.conv_kernel - 1, device=device, dtype=dtype)
        recurrent = torch.zeros(batch, self.num_heads, self.head_k_dim, self.head_v_dim, device=device)
        return GDNState(conv if self.use_short_conv else None, recurrent)

    def _short_conv(self, qkv: torch.Tensor, state: GDNState | None) -> torch.Tensor:
        """Depthwise causal convolution of (B, T, channels) then SiLU; with a state, its cached inputs are
        the left context and it receives the last kernel - 1 inputs."""
        weight = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])  # (ch, 1, K)
        x = qkv.transpose(1, 2)  # (B, ch, T)
        history = x.new_zeros(*x.shape[:2], self.conv_kernel - 1) if state is None else state.conv.to(x.dtype)
        x = torch.cat([history, x], dim=-1)  # (B, ch, K - 1 + T)
        if state is not None:
            state.conv = x[..., x.shape[-1] - (self.conv_kernel - 1) :].clone()
        if x.shape[-1] == self.conv_kernel:  # one new token: a dot product per channel, 10x cheaper than conv1d
            return F.silu((x * weight.squeeze(1).to(x.dtype)).sum(-1, keepdim=True)).transpose(1, 2)
        return F.silu(F.conv1d(x, weight.to(x.dtype), groups=x.shape[1])).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, state: GDNState | PositionStreams | None = None, mode: Mode = "auto"
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). Without a state, a sequence from its start (training, prefill). With one,
        the sequence continues from it and the state is updated in place; with PositionStreams, every position
        goes on on its own. `mode` picks the form: "auto" is the recurrent step for T == 1 and the chunked
        form otherwise."""
        if mode not in ("auto", "chunk", "recurrent"):
            raise OrionError(f"GDN mode must be 'auto', 'chunk' or 'recurrent', not {mode!r}")
        B, T, C = x.shape
        if isinstance(state, PositionStreams):
            if state.streams is None:
                return self._start_streams(x, state)
            return self.forward(x.reshape(B * T, 1, C), state.streams).view(B, T, C)
        if state is not None and state.recurrent.shape[0] != B:
            raise OrionError(
                f"the GDN state holds {state.recurrent.shape[0]} sequences but the input has {B}; "
                "make one with new_state(batch)"
            )
        qkv, a, b, gate = self._project(x)
        q, k, v, g, beta = self._inputs(qkv, a, b, state)
        recurrent = mode == "recurrent" or (mode == "auto" and T == 1)
        initial = None if state is None else state.recurrent

        # fla's chunk kernel refuses float32 inputs: it runs on bf16/fp16 activations (autocast included).
        kernels = _fla_kernels() if self.use_fla and q.is_cuda and q.dtype != torch.float32 else None
        if kernels is not None:
            o, final = kernels[1 if recurrent else 0](
                q, k, v, g, beta.to(q.dtype), initial_state=initial, output_final_state=state is not None,
                use_qk_l2norm_in_kernel=True,
            )  # fmt: skip
        else:
            q, k = l2norm(q.float()), l2norm(k.float())
            if recurrent:
                o, final = recurrent_gated_delta_rule(q, k, v.float(), g, beta, initial, state is not None)
            else:
                o, final = chunk_gated_delta_rule(q, k, v.float(), g, beta, self.chunk_size, initial, state is not None)
        if state is not None:
            state.recurrent = final
        return self._output(o, gate, x.dtype)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """q|k|v (B, T, 2 key_dim + value_dim) before the convolution, a, b, and [gate] or []."""
        if self.packed is not None and self.packed.valid():
            q, k, v, a, b, *gate = self.packed(x)
        else:
            q, k, v, a, b = (proj(x) for proj in (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj))
            gate = [self.g_proj(x)] if self.use_gate else []
        return torch.cat([q, k, v], dim=-1), a, b, gate

    def _inputs(self, qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor, state: GDNState | None):
        """The delta rule's q, k (B, T, H, d_k), v (B, T, H, d_v), g and beta (B, T, H) float32."""
        B, T, _ = qkv.shape
        qkv = self._short_conv(qkv, state) if self.use_short_conv else F.silu(qkv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = q.view(B, T, self.num_heads, self.head_k_dim), k.view(B, T, self.num_heads, self.head_k_dim)
        v = v.view(B, T, self.num_heads, self.head_v_dim)
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # (B, T, H)
        return q, k, v, g, b.float().sigmoid()

    def _output(self, o: torch.Tensor, gate: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        B, T = o.shape[:2]
        o = self.o_norm(o, gate[0].view(B, T, self.num_heads, self.head_v_dim) if gate else None)
        return self.o_proj(o.reshape(B, T, self.value_dim).to(dtype))

    def _start_streams(self, x: torch.Tensor, state: PositionStreams) -> torch.Tensor:
        """The sequence from its start, step by step, keeping every position's state in `state`."""
        B, T, _ = x.shape
        qkv, a, b, gate = self._project(x)
        conv = None
        if self.use_short_conv:  # position t's conv cache: the inputs t - kernel + 2 .. t (zeros before 0)
            keep, channels = self.conv_kernel - 1, qkv.shape[-1]
            conv = qkv.new_zeros(B * T, channels, 0)
            if keep:
                windows = F.pad(qkv.transpose(1, 2), (keep, 0)).unfold(-1, keep, 1)[:, :, 1:]  # (B, ch, T, keep)
                conv = windows.permute(0, 2, 1, 3).reshape(B * T, channels, keep)
        q, k, v, g, beta = self._inputs(qkv, a, b, None)
        o, states = recurrent_gated_delta_rule(
            l2norm(q.float()), l2norm(k.float()), v.float(), g, beta, output_all_states=True
        )
        state.streams = GDNState(conv, states.flatten(0, 1))
        return self._output(o, gate, x.dtype)
