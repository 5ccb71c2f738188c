"""The figures `paraplan validate` reports: MAPE, Kendall's tau-b and top-1 regret (planner/agreement.py)."""

from __future__ import annotations

import math

import pytest

from planner.agreement import kendall_tau, mape, top1_regret


def test_mape_is_the_mean_absolute_relative_error():
    assert mape([1.1, 0.8, 2.0], [1.0, 1.0, 2.0]) == pytest.approx((0.1 + 0.2 + 0.0) / 3)


def test_kendall_tau_counts_concordant_minus_discordant_pairs():
    # Same order: every pair concordant.
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([4, 3, 2, 1], [10, 20, 30, 40]) == pytest.approx(-1.0)
    # One swapped neighbour pair among 6 pairs: (5 - 1) / 6.
    assert kendall_tau([1, 3, 2, 4], [1, 2, 3, 4]) == pytest.approx(4 / 6)


def test_kendall_tau_b_discounts_ties():
    # predicted ties (1, 1): 5 untied predicted pairs, 6 measured; concordant 5, discordant 0.
    assert kendall_tau([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(5 * 6))
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_top1_regret_is_the_cost_of_trusting_the_prediction():
    # Predicted best is plan 0 (0.5), which measured 1.2; the truly best measured 1.0.
    assert top1_regret([0.5, 0.6, 0.9], [1.2, 1.0, 1.5]) == pytest.approx(0.2)
    assert top1_regret([0.6, 0.5, 0.9], [1.2, 1.0, 1.5]) == 0.0


@pytest.mark.parametrize(
    ("predicted", "measured", "why"),
    [([1.0], [1.0, 2.0], "equally long"), ([], [], "non-empty"), ([1.0, 2.0], [1.0, 0.0], "> 0")],
)
def test_bad_input_names_the_problem(predicted, measured, why):
    with pytest.raises(ValueError, match=why):
        mape(predicted, measured)
