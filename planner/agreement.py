"""How well predicted step times agree with measured ones: the figures `paraplan validate` reports.

- MAPE: mean absolute percentage error, mean(|predicted / measured - 1|).
- Kendall's tau-b (Kendall 1938; ties as in Kendall 1945): the rank correlation of predicted and measured
  order, 1 when the cost model orders every pair of plans as the runs do. It is what a planner is judged on:
  a ranking that is right picks the right plan even when every time is off by the same factor.
- Top-1 regret: measured time of the plan predicted
  best / measured time of the plan that truly was best - 1; 0 when the planner's choice was the fastest.
Pure numpy.
"""

from __future__ import annotations

import numpy as np


def _pair(predicted: object, measured: object) -> tuple[np.ndarray, np.ndarray]:
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if p.shape != m.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(f"predicted, measured: need two equally long, non-empty lists, got {p.shape}, {m.shape}")
    if not np.all(m > 0):
        raise ValueError("measured: every measured time must be > 0")
    return p, m


def mape(predicted: object, measured: object) -> float:
    p, m = _pair(predicted, measured)
    return float(np.mean(np.abs(p / m - 1)))


def kendall_tau(predicted: object, measured: object) -> float:
    """Kendall's tau-b over all pairs: (concordant - discordant) / sqrt((n0 - ties_p) (n0 - ties_m)). NaN when
    either side is constant (no order to agree with)."""
    p, m = _pair(predicted, measured)
    upper = np.triu_indices(len(p), k=1)
    dp = np.sign(p[:, None] - p[None, :])[upper]
    dm = np.sign(m[:, None] - m[None, :])[upper]
    untied_p, untied_m = np.count_nonzero(dp), np.count_nonzero(dm)
    if untied_p == 0 or untied_m == 0:
        return float("nan")
    return float(np.sum(dp * dm) / np.sqrt(untied_p * untied_m))


def top1_regret(predicted: object, measured: object) -> float:
    p, m = _pair(predicted, measured)
    return float(m[np.argmin(p)] / m.min() - 1)
