"""Routed mixture of experts: the permuted, per-expert computation equals running every expert on every token and
weighting by the gates, and the load-balancing loss equals a hand-computed Switch loss and trains through backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from executor.models import MoEFeedForward
from executor.models.routing import (
    ROUTER_AUX_LOSS_COEF,
    expert_fractions,
    inverse_permutation,
    load_balancing_loss,
    route,
)
from executor.parallel.expert import source_to_expert_order
from planner.specs import ModelSpec

MOE = ModelSpec(
    num_layers=1,
    hidden_size=32,
    num_attention_heads=4,
    ffn_hidden_size=48,
    vocab_size=64,
    mlp="swiglu",
    norm="rmsnorm",
    num_experts=4,
    experts_per_token=2,
)


def _moe(seed: int = 0) -> MoEFeedForward:
    torch.manual_seed(seed)
    return MoEFeedForward(MOE)


def _dense_reference(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the gates (zero for the experts a token did not choose)."""
    gates = moe.gates(x)
    return sum(gates[..., i : i + 1] * expert(x) for i, expert in enumerate(moe.experts.values()))


def _hand_aux(moe: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Fedus et al. 2021 eq. 4 per sequence, f normalised by k, written out loop by loop."""
    probs = F.softmax(moe.router(x).float(), dim=-1)  # [b, s, E]
    chosen = probs.topk(moe.top_k, dim=-1).indices
    losses = []
    for b in range(x.shape[0]):
        seq = x.shape[1]
        f = torch.tensor([float((chosen[b] == e).sum()) / (seq * moe.top_k) for e in range(moe.num_experts)])
        p = probs[b].mean(dim=0)
        losses.append(moe.num_experts * (f * p).sum())
    return torch.stack(losses).mean()


def test_routed_experts_equal_every_expert_weighted_by_gates() -> None:
    moe = _moe()
    x = torch.randn(3, 10, MOE.hidden_size)
    torch.testing.assert_close(moe(x), _dense_reference(moe, x), rtol=1e-5, atol=1e-6)


def test_each_expert_computes_only_its_routed_tokens() -> None:
    moe = _moe()
    seen: list[int] = []
    for expert in moe.experts.values():
        expert.register_forward_hook(lambda module, inputs, out: seen.append(inputs[0].shape[0]))
    x = torch.randn(2, 8, MOE.hidden_size)
    moe(x)
    routing = route(moe.router(x.reshape(-1, MOE.hidden_size)), MOE.experts_per_token)
    assert seen == routing.counts.tolist()
    assert sum(seen) == 2 * 8 * MOE.experts_per_token  # drop-less: k rows per token, none dropped


def test_permutation_groups_assignments_by_expert() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0], [5.0, 0.0, 4.0, 0.0], [1.0, 2.0, 0.0, 3.0]])
    routing = route(logits, top_k=2)
    assert routing.experts.tolist() == [[1, 2], [0, 2], [3, 1]]
    assert routing.counts.tolist() == [1, 2, 2, 1]
    slot_experts = routing.experts.flatten()[routing.order]
    assert slot_experts.tolist() == [0, 1, 1, 2, 2, 3]
    assert routing.order.tolist() == [2, 0, 5, 1, 3, 4]  # stable: token 0 before token 2 for expert 1
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(3))


def test_aux_loss_equals_the_hand_computed_switch_loss() -> None:
    moe = _moe()
    x = torch.randn(3, 10, MOE.hidden_size)
    routing = route(moe.router(x.reshape(-1, MOE.hidden_size)), MOE.experts_per_token)
    counts, prob_sums = expert_fractions(routing, sequences=3)
    value = load_balancing_loss(counts, prob_sums, tokens=10, top_k=MOE.experts_per_token)
    torch.testing.assert_close(value, _hand_aux(moe, x))


def test_aux_loss_is_one_when_routing_is_balanced() -> None:
    # 4 tokens, 4 experts, k = 2, uniform probabilities, each expert chosen twice: f_i = P_i = 1/4.
    counts = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    prob_sums = torch.full((1, 4), 1.0)
    assert load_balancing_loss(counts, prob_sums, tokens=4, top_k=2).item() == 1.0


def test_backward_trains_on_loss_plus_coef_times_aux() -> None:
    """A plain backward through the layer's output gives the router the gradient of out.sum() + coef x aux, and the
    aux value is recorded once per backward."""
    moe = _moe()
    x = torch.randn(2, 6, MOE.hidden_size)
    moe(x).sum().backward()
    routed_grad = moe.router.weight.grad.clone()
    assert len(moe.aux_losses) == 1
    torch.testing.assert_close(moe.aux_losses[0], _hand_aux(moe, x).detach())

    moe.zero_grad()
    (_dense_reference(moe, x).sum() + ROUTER_AUX_LOSS_COEF * _hand_aux(moe, x)).backward()
    torch.testing.assert_close(routed_grad, moe.router.weight.grad, rtol=1e-5, atol=1e-6)

    moe.zero_grad()
    _dense_reference(moe, x).sum().backward()  # without the aux loss the router's gradient is visibly different
    assert (routed_grad - moe.router.weight.grad).abs().max() > 1e-4


def test_unchosen_experts_still_get_a_gradient() -> None:
    """An expert no token chose runs on zero rows: its parameters get zero gradients, not None, so data-parallel
    wrappers see every parameter every step."""
    moe = _moe()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] += 1.0  # every token prefers experts 0 and then (ties) 1
    x = torch.ones(1, 4, MOE.hidden_size)
    moe(x).sum().backward()
    unchosen = moe.experts["3"].w1.weight.grad
    assert unchosen is not None and not unchosen.any()


def test_received_rows_are_regrouped_by_local_expert_and_back() -> None:
    """Under expert parallelism a rank receives rows grouped by (source rank, local expert); its experts need them
    grouped by (local expert, source rank), and the outputs go home in the first order."""
    arriving = torch.tensor([[1, 2], [3, 0], [0, 1]])  # 3 source ranks, 2 local experts
    rows = torch.tensor([0, 10, 11, 1, 2, 3, 12])  # expert a's rows are 0-9, expert b's 10-19
    by_expert = source_to_expert_order(arriving)
    # expert a's rows from sources 0, 1 (rows 0; 1, 2, 3), then expert b's from sources 0, 2 (rows 10, 11; 12)
    assert rows[by_expert].tolist() == [0, 1, 2, 3, 10, 11, 12]
    assert rows[by_expert][inverse_permutation(by_expert)].tolist() == rows.tolist()
