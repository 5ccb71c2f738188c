"""Model-state memory (ZeRO paper), micro-batches in flight per schedule, and whether gradients are held at the
activation peak."""

from __future__ import annotations

import pytest

from planner.cost.memory import gradients_at_activation_peak, inflight_microbatches, model_state_bytes

GB = 1e9


@pytest.mark.parametrize(
    ("zero_stage", "published_gb"),
    [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)],  # Rajbhandari et al. 2020, fig. 1: 7.5B params, N_d = 64
)
def test_zero_paper_example(zero_stage, published_gb):
    states = model_state_bytes(7.5e9, "fp16", "adamw", zero_stage, shard_degree=64)
    assert states.total / GB == pytest.approx(published_gb, abs=0.1)


def test_fp32_and_sgd_state_sizes():
    assert model_state_bytes(1.0, "fp32", "adamw", 0, 1).total == 4 + 4 + 8
    assert model_state_bytes(1.0, "bf16", "sgd", 0, 1).total == 2 + 2 + 4  # fp32 master copy only
    assert model_state_bytes(1.0, "fp32", "sgd", 0, 1).total == 8


def test_1f1b_holds_pp_minus_device():
    assert [inflight_microbatches("1f1b", d, 4, 1, 64) for d in range(4)] == [4, 3, 2, 1]
    assert inflight_microbatches("1f1b", 0, 8, 1, 3) == 3  # never more than there are micro-batches


def test_gpipe_holds_every_microbatch():
    assert inflight_microbatches("gpipe", 0, 4, 1, 32) == 32


@pytest.mark.parametrize(("pp", "v"), [(4, 2), (8, 3), (35, 3)])
def test_interleaved_first_device_matches_korthikanti(pp, v):
    # Korthikanti et al. 2022, sec. 4.2.3: first stage's activations scale by (1 + (p - 1) / (p v)).
    assert inflight_microbatches("interleaved_1f1b", 0, pp, v, 10_000) == pytest.approx(pp * (1 + (pp - 1) / (pp * v)))


def test_gradients_are_held_at_the_peak_only_when_a_forward_follows_a_backward():
    def held(schedule: str, device: int, pp: int, microbatches: int, persistent: bool = False) -> bool:
        return bool(gradients_at_activation_peak(schedule, device, pp, microbatches, persistent))

    assert not held("1f1b", 0, 1, 1) and held("1f1b", 0, 1, 2)  # accumulation: the 2nd forward sees them
    assert held("1f1b", 0, 1, 1, persistent=True)  # DDP's buckets outlive zero_grad
    assert not held("1f1b", 0, 4, 4) and held("1f1b", 0, 4, 5)  # device 0 holds 4 in flight
    assert held("1f1b", 3, 4, 2)  # the last device runs backward after each forward
    assert not held("gpipe", 3, 4, 32)  # every forward before any backward
    assert held("interleaved_1f1b", 0, 4, 4)  # counted held: an upper bound
