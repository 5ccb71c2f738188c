"""Top-k token routing for a mixture of experts: the router's choice, the permutation that groups the routed
tokens by expert, and the auxiliary load-balancing loss.

Drop-less: every token reaches all of its k experts (no capacity factor, no token dropped), so an expert-parallel
run computes exactly what one process computes (MegaBlocks, Gale et al. 2023, makes the same choice for the same
reason; Megatron-Core's `moe_expert_capacity_factor=None`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The weight of the load-balancing loss in the training loss: Switch Transformer's alpha = 1e-2 (Fedus et al. 2021,
# sec. 2.2: "large enough to ensure load balancing while small enough to not overwhelm the primary cross-entropy
# objective"). Mixtral's released config.json sets router_aux_loss_coef 0.02 and Hugging Face's MixtralConfig
# defaults to 0.001; Switch's value is the one its paper justifies.
ROUTER_AUX_LOSS_COEF = 0.01


@dataclass(frozen=True)
class Routing:
    """Where each of the T tokens of a batch goes: its k experts and their gates, and the slot order that sorts the
    T x k (token, expert) assignments by expert (stable, so each expert's tokens keep their order)."""

    probs: torch.Tensor  # [T, E] fp32 softmax over all experts
    experts: torch.Tensor  # [T, k] the chosen experts
    gates: torch.Tensor  # [T, k] fp32, the chosen probabilities renormalised to sum to 1 (Mixtral)
    order: torch.Tensor  # [T * k] slot indices sorted by expert; slot j is token j // k's (j % k)-th choice
    counts: torch.Tensor  # [E] assignments per expert (int64)

    @property
    def top_k(self) -> int:
        return self.experts.shape[1]


def route(logits: torch.Tensor, top_k: int) -> Routing:
    """Route T tokens by their router logits [T, E]: softmax over all experts, keep the top k, renormalise the kept
    probabilities (Jiang et al. 2024, Mixtral, eq. 1-2: softmax over the top-k logits, the same numbers)."""
    probs = F.softmax(logits.float(), dim=-1)
    top_probs, experts = probs.topk(top_k, dim=-1)
    gates = top_probs / top_probs.sum(dim=-1, keepdim=True)
    slot_experts = experts.flatten()
    order = torch.argsort(slot_experts, stable=True)
    counts = torch.bincount(slot_experts, minlength=probs.shape[-1])
    return Routing(probs, experts, gates, order, counts)


def permute(tokens: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[T, h] tokens -> [T * k, h]: one row per assignment, grouped by expert in expert order."""
    return tokens.index_select(0, routing.order // routing.top_k)


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `order`: rows.index_select(0, order).index_select(0, inverse) == rows."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def unpermute_and_combine(expert_out: torch.Tensor, routing: Routing) -> torch.Tensor:
    """[T * k, h] expert outputs in `permute`'s order -> [T, h]: each token's k outputs weighted by its gates."""
    per_slot = expert_out.index_select(0, inverse_permutation(routing.order))
    per_slot = per_slot.view(-1, routing.top_k, expert_out.shape[-1])
    return (per_slot * routing.gates.unsqueeze(-1).type_as(per_slot)).sum(dim=1)


def expert_fractions(routing: Routing, sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence of the batch, the assignment counts per expert [b, E] (not differentiable) and the summed router
    probability per expert [b, E] (differentiable): the two statistics of the load-balancing loss, as sums so that
    ranks holding parts of a sequence (context parallelism) can add theirs before dividing."""
    num_experts = routing.probs.shape[-1]
    one_hot = F.one_hot(routing.experts, num_experts).sum(dim=1)  # [T, E]: 1 where the token chose the expert
    counts = one_hot.view(sequences, -1, num_experts).sum(dim=1).to(routing.probs.dtype)
    prob_sums = routing.probs.view(sequences, -1, num_experts).sum(dim=1)
    return counts, prob_sums


def load_balancing_loss(counts: torch.Tensor, prob_sums: torch.Tensor, tokens: int, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4) per sequence, averaged over the b sequences:
    E * sum_i f_i * P_i, with f_i the fraction of the sequence's `tokens` x k assignments that went to expert i and
    P_i the mean router probability of expert i over its tokens. Perfectly balanced routing gives 1 whatever k.

    f is normalised by k as Megatron-Core's `switch_load_balancing_loss_func` does (Hugging Face's Mixtral loss is k
    times this). Per sequence, like Megatron-Core's `seq_aux_loss` and DeepSeek-V2's expert-level balance loss
    (DeepSeek-AI 2024, sec. 2.2.3): its value does not depend on how the global batch is split over data-parallel
    ranks and micro-batches, so every plan trains on the same objective as one process does.
    """
    num_experts = counts.shape[-1]
    fractions = counts / (tokens * top_k)
    mean_probs = prob_sums / tokens
    return num_experts * (fractions * mean_probs).sum(dim=-1).mean()
