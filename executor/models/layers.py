"""The pieces of a decoder-only transformer block: norms, rotary positions, attention, MLP and mixture of experts.

Every projection is its own `nn.Linear` (`wq`, `wk`, `wv`, `wo`; `w1`, `w3`, `w2`) so a tensor-parallel plan is a
flat dict of names: ColwiseParallel on wq/wk/wv and w1/w3, RowwiseParallel on wo/w2 (torchtitan's Llama plan).
Biases follow `ModelSpec.qkv_bias` (q, k, v) and `ModelSpec.linear_bias` (wo and every MLP matrix), exactly as
`planner.cost.params` counts them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from executor.models.routing import (
    ROUTER_AUX_LOSS_COEF,
    expert_fractions,
    load_balancing_loss,
    permute,
    route,
    unpermute_and_combine,
)
from planner.specs import ModelSpec

NORM_EPS = 1e-5  # Llama's and GPT-2's norm epsilon (Touvron et al. 2023 code; Radford et al. 2019 code)
ROPE_THETA = 10000.0  # the base of the rotary frequencies (Su et al. 2021, eq. 15; Llama 1/2)


def make_norm(spec: ModelSpec, **factory: Any) -> nn.Module:
    """LayerNorm with weight and bias (Ba et al. 2016; GPT-2) or RMSNorm with a weight only (Zhang & Sennrich 2019)."""
    if spec.norm == "layernorm":
        return nn.LayerNorm(spec.hidden_size, eps=NORM_EPS, **factory)
    return nn.RMSNorm(spec.hidden_size, eps=NORM_EPS, **factory)


def make_dropout(p: float) -> nn.Module:
    """nn.Dropout where the spec asks for it; Identity otherwise, so p = 0 adds no op and saves no mask."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


# ------------------------------------------------------------------------------------------------ rotary


def rotary_cos_sin(seq_len: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles m * theta_i for positions m = 0..seq_len-1, [seq_len, head_dim], fp32
    (Su et al. 2021, eq. 34).

    Computed on every call instead of cached in a buffer: a buffer would travel with state_dict and
    parallelization wrappers, and these few flops are nothing next to the attention they feed.
    """
    return rotary_cos_sin_at(torch.arange(seq_len, device=device), head_dim)


def rotary_cos_sin_at(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles at the given positions [n] -> [n, head_dim]: a context-parallel rank holds
    positions that are not 0..n-1 (executor/parallel/context.py)."""
    device = positions.device
    inv_freq = ROPE_THETA ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(positions.to(torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # the two halves of a head share frequencies (rotate_half)
    return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [b, s, heads, head_dim] by position (Su et al. 2021, eq. 34), in the GPT-NeoX "rotate half" layout.

    The pairs are (i, i + head_dim/2) rather than Meta Llama's adjacent (2i, 2i+1): the same rotation up to a
    fixed permutation of the q/k weight columns, and it needs no complex numbers. Math in fp32 as in Llama.
    """
    x32 = x.float()
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return (x32 * cos + _rotate_half(x32) * sin).type_as(x)


# --------------------------------------------------------------------------------------------- attention


def native_gqa(query: torch.Tensor) -> bool:
    """Whether SDPA's own grouped-query support (`enable_gqa`, torch >= 2.5) runs in a fused kernel here: the CPU
    flash kernel takes it in any dtype; on CUDA only the flash backend does, and only in 16-bit (pytorch#139586),
    so fp32 CUDA falls back to repeating K/V rather than to the slow math kernel."""
    return query.device.type == "cpu" or query.dtype in (torch.float16, torch.bfloat16)


class AttentionCore(nn.Module):
    """softmax(Q K^T / sqrt(d)) V with a causal mask, over [b, heads, s, head_dim] (SDPA picks the kernel).

    A module of its own, with no parameters, so that selective recompute can checkpoint exactly the attention
    core (Korthikanti et al. 2022 sec. 5) and keep everything else (executor/parallel/checkpoint.py).
    With grouped-query attention K and V keep their kv_heads (`enable_gqa`), so backward saves them at kv size,
    as the planner counts (planner/cost/ops.py); query head i reads kv head i // group on every TP rank as long
    as tp divides kv_heads (the planner's rule).

    Under context parallelism `context_attention` (set by executor/parallel/context.py) replaces SDPA: q, k and v
    then hold this rank's share of the sequence, and the ring brings the other ranks' keys.
    """

    def __init__(self, dropout_p: float) -> None:
        super().__init__()
        self.dropout_p = dropout_p  # on the attention probabilities (GPT-2's attn_pdrop)
        self.context_attention: Callable[..., torch.Tensor] | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dropout_p = self.dropout_p if self.training else 0.0
        if self.context_attention is not None:
            return self.context_attention(q, k, v, dropout_p=dropout_p)
        grouped = q.shape[1] != k.shape[1]
        if grouped and not native_gqa(q):
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=True, enable_gqa=grouped and native_gqa(q)
        )


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads (Ainslie et al. 2023) and optional RoPE.

    Head counts are read from the projections' outputs at run time (`view(b, s, -1, head_dim)`), never from
    the spec or the weight shapes: after tensor parallelism shards wq/wk/wv column-wise each rank holds
    heads/tp query and kv_heads/tp key/value heads, and under DTensor `weight.shape` is the global shape.
    """

    def __init__(self, spec: ModelSpec, **factory: Any) -> None:
        super().__init__()
        h = spec.hidden_size
        self.head_dim = spec.head_size
        self.use_rope = spec.position_embedding == "rope"
        self.wq = nn.Linear(h, spec.q_size, bias=bool(spec.qkv_bias), **factory)
        self.wk = nn.Linear(h, spec.kv_size, bias=bool(spec.qkv_bias), **factory)
        self.wv = nn.Linear(h, spec.kv_size, bias=bool(spec.qkv_bias), **factory)
        self.core = AttentionCore(spec.dropout)
        self.wo = nn.Linear(spec.q_size, h, bias=bool(spec.linear_bias), **factory)
        self.positions: torch.Tensor | None = None  # this rank's sequence positions under context parallelism

    def _heads(self, x: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        batch, seq, _ = x.shape
        return proj(x).view(batch, seq, -1, self.head_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x, self.wq), self._heads(x, self.wk), self._heads(x, self.wv)
        if self.use_rope:
            if self.positions is None:
                cos, sin = rotary_cos_sin(x.shape[1], self.head_dim, x.device)
            else:
                cos, sin = rotary_cos_sin_at(self.positions, self.head_dim)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, head_dim], as SDPA wants
        out = self.core(q, k, v)
        return self.wo(out.transpose(1, 2).flatten(2))


# ------------------------------------------------------------------------------------------------- MLPs


class FeedForward(nn.Module):
    """SwiGLU `w2(silu(w1 x) * w3 x)` (Shazeer 2020; Llama) or GELU `w2(gelu(w1 x))` (Radford et al. 2019).

    GELU uses the tanh approximation, as GPT-2 and Megatron-LM do. A GELU MLP has no w3.
    """

    def __init__(self, spec: ModelSpec, **factory: Any) -> None:
        super().__init__()
        h, f, bias = spec.hidden_size, spec.ffn_size, bool(spec.linear_bias)
        self.swiglu = spec.mlp == "swiglu"
        self.w1 = nn.Linear(h, f, bias=bias, **factory)
        self.w3 = nn.Linear(h, f, bias=bias, **factory) if self.swiglu else None
        self.w2 = nn.Linear(f, h, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class MoEFeedForward(nn.Module):
    """Mixture of experts: a bias-free router sends each token to its top-k of `num_experts` MLPs (Fedus et al.
    2021), and only those experts compute it (executor/models/routing.py: drop-less top-k routing, Mixtral's gates).

    The T x k (token, expert) assignments are sorted by expert, each expert runs once on its rows (also on none: an
    expert with no token this micro-batch still joins autograd, so it gets a zero gradient and every data-parallel
    wrapper sees every parameter), and the outputs are put back and summed with the gates. Under expert parallelism
    `expert_parallel` (set by executor/parallel/expert.py) carries the sorted rows to the ranks holding their experts
    and back; `experts` then holds this rank's experts only, keyed by their index in the whole model so that their
    parameter names (and checkpoint keys) do not depend on ep. Under context parallelism `sequence_shards` adds the
    other cp ranks' routing statistics to this rank's, since the load-balancing loss is per whole sequence.

    The load-balancing loss (routing.py) joins the training loss through the gradient, Megatron-Core's
    `MoEAuxLossAutoScaler` way (`_AttachAuxLoss`): whatever loss is backpropagated through this layer's output also
    gets the gradient of coef x aux, so a plain `loss.backward()` trains on loss + coef x aux, and so does a pipeline
    stage that never sees the loss. `aux_grad_scale` multiplies that gradient as the caller scales its loss (1 /
    micro-batches under gradient accumulation, the loss scale under fp16); `aux_losses` keeps each backward's value
    for the step's log.
    """

    def __init__(self, spec: ModelSpec, **factory: Any) -> None:
        super().__init__()
        self.top_k = spec.experts_per_token
        self.num_experts = spec.num_experts
        self.router = nn.Linear(spec.hidden_size, spec.num_experts, bias=False, **factory)
        self.experts = nn.ModuleDict({str(i): FeedForward(spec, **factory) for i in range(spec.num_experts)})
        self.aux_loss_coef = ROUTER_AUX_LOSS_COEF
        self.aux_grad_scale = 1.0
        self.aux_losses: list[torch.Tensor] = []
        self.expert_parallel: Callable[..., torch.Tensor] | None = None
        self.sequence_shards: Callable[..., tuple[torch.Tensor, torch.Tensor, int]] | None = None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """[..., num_experts] routing weights: the top-k softmax probabilities, renormalised; zeros elsewhere."""
        routing = route(self.router(x.reshape(-1, x.shape[-1])), self.top_k)
        dense = torch.zeros_like(routing.probs).scatter(-1, routing.experts, routing.gates)
        return dense.view(*x.shape[:-1], self.num_experts).type_as(x)

    def run_local_experts(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows grouped by this rank's experts, in their order, `counts` [local experts] rows each -> their outputs."""
        pieces = tokens.split(counts.tolist())
        return torch.cat([expert(piece) for expert, piece in zip(self.experts.values(), pieces, strict=True)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, hidden = x.shape
        flat = x.reshape(-1, hidden)
        routing = route(self.router(flat), self.top_k)
        routed = permute(flat, routing)
        if self.expert_parallel is None:
            expert_out = self.run_local_experts(routed, routing.counts)
        else:
            expert_out = self.expert_parallel(routed, routing.counts, self.run_local_experts)
        out = unpermute_and_combine(expert_out, routing).view_as(x)
        counts, prob_sums = expert_fractions(routing, batch)
        tokens = flat.shape[0] // batch
        if self.sequence_shards is not None:
            counts, prob_sums, tokens = self.sequence_shards(counts, prob_sums, tokens)
        aux = load_balancing_loss(counts, prob_sums, tokens, self.top_k)
        return _AttachAuxLoss.apply(out, aux, self)


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on the layer's output whose backward also gives the aux loss the gradient coef x scale, as if
    coef x aux had been added to the loss (Megatron-Core's `MoEAuxLossAutoScaler`), and records the aux value."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor, moe: MoEFeedForward) -> torch.Tensor:
        ctx.moe = moe
        ctx.aux = aux.detach()
        ctx.weight = moe.aux_loss_coef * moe.aux_grad_scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        # Recorded here rather than in forward: recompute (executor/parallel/checkpoint.py) runs a block's forward
        # twice, its backward once.
        ctx.moe.aux_losses.append(ctx.aux)
        return grad, torch.full_like(ctx.aux, ctx.weight), None


def make_mlp(spec: ModelSpec, **factory: Any) -> nn.Module:
    """One dense MLP, or a mixture of experts when the spec has more than one expert."""
    return MoEFeedForward(spec, **factory) if spec.num_experts > 1 else FeedForward(spec, **factory)
