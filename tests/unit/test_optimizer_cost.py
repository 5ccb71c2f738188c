"""The optimizer step's HBM traffic per parameter (planner/cost/optimizer.py), pass by pass by hand, and fp16's
extra loss-scaling pass (Micikevicius et al. 2018, sec. 3.2): unscale the fp32 gradients and check them for inf,
a read and a write of 4 bytes each. The fp32 master weights are memory, counted in planner/cost/memory.py
(tests/unit/test_memory.py: ZeRO's 16 bytes a parameter for fp16 Adam include them)."""

from __future__ import annotations

import pytest

from planner.cost.memory import model_state_bytes
from planner.cost.optimizer import optimizer_traffic_bytes_per_param

COPY_GRADS_TO_FP32 = 2 + 4  # read the 16-bit gradient, write the fp32 one
UNSCALE = 4 + 4  # fp16 only: read and write the fp32 gradient (scale it by 1/S, flag inf/nan)
GRAD_NORM = 4  # read the fp32 gradient
COPY_WEIGHTS_TO_16BIT = 4 + 2  # read the fp32 master weight, write the 16-bit one
ZERO_16BIT_GRADS = 2
MIXED_COPIES = COPY_GRADS_TO_FP32 + COPY_WEIGHTS_TO_16BIT + ZERO_16BIT_GRADS  # bf16 and fp16 alike


def update(states: int) -> int:
    """Read the gradient; read and write the fp32 weight and each fp32 optimizer state."""
    return 4 + 8 + 8 * states


@pytest.mark.parametrize(
    ("precision", "optimizer", "expected"),
    [
        ("fp16", "adamw", MIXED_COPIES + UNSCALE + GRAD_NORM + update(2)),
        ("bf16", "adamw", MIXED_COPIES + GRAD_NORM + update(2)),
        ("fp16", "sgd", MIXED_COPIES + UNSCALE + GRAD_NORM + update(0)),
        ("fp32", "adamw", GRAD_NORM + update(2) + 4),  # norm, update, zero the fp32 gradient
    ],
)
def test_traffic_per_parameter_by_hand(precision: str, optimizer: str, expected: int) -> None:
    assert optimizer_traffic_bytes_per_param(precision, optimizer) == expected


def test_fp16_moves_exactly_one_unscale_pass_more_than_bf16() -> None:
    assert optimizer_traffic_bytes_per_param("fp16", "adamw") == 54  # 6 + 8 + 4 + 28 + 6 + 2
    assert optimizer_traffic_bytes_per_param("fp16", "adamw") - optimizer_traffic_bytes_per_param("bf16", "adamw") == 8


def test_fp16_adam_holds_fp32_master_weights() -> None:
    """16-bit weight 2 + gradient 2 + Adam's fp32 momentum and variance 8 + fp32 master weight 4 (ZeRO sec. 3.1)."""
    assert model_state_bytes(1.0, "fp16", "adamw", 0, 1).total == 2 + 2 + 8 + 4
