"""The order of the plans a search answers: fastest first, except that a near tie goes to the simpler layout.

Two plans whose predicted step times differ by less than LAYOUT_TIE_TOLERANCE are not told apart by the cost model:
its estimates carry an error band of several percent (each StepEstimate's `uncertainty`; the README's *Accuracy*),
so a gain smaller than that is noise, while every model-parallel axis a plan uses is certain to cost something the
model leaves out (another process group and its collectives to set up and debug, a layout a stack may not run or
may run with slower kernels: the executor's ring attention, executor/parallel/context.py). Within a tie the plan
with fewer model-parallel axes in use ranks first (expert parallelism counts: its groups and all-to-alls); then the
smaller cp, ep, tp and pp in that order (context parallelism changes the attention kernels themselves, expert
parallelism moves every routed token off the rank and back, tensor parallelism splits every matmul, a pipeline
cuts only between layers); then the faster; then the one that needs less memory.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# Step times within 1% of the fastest plan still unranked count as a tie. 1%: well below the cost model's validated
# error (README *Accuracy*: mean absolute step-time error 4.4% on the published Megatron runs, 4.0-6.5% on runs
# measured here), so the model cannot vouch for a smaller difference; and small, so a user gives up at most 1% of
# predicted throughput at each rank for the simpler layout.
LAYOUT_TIE_TOLERANCE = 0.01


def model_parallel_axes(cp: npt.ArrayLike, tp: npt.ArrayLike, pp: npt.ArrayLike, ep: npt.ArrayLike = 1) -> np.ndarray:
    """How many of context, tensor, pipeline and expert parallelism each plan uses (a degree above 1)."""
    return (np.asarray(cp) > 1).astype(int) + (np.asarray(tp) > 1) + (np.asarray(pp) > 1) + (np.asarray(ep) > 1)


def simplest_first(
    step_time_s: np.ndarray,
    peak_bytes: np.ndarray,
    cp: np.ndarray,
    tp: np.ndarray,
    pp: np.ndarray,
    count: int,
    ep: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the first `count` plans in rank order: each rank goes to the simplest plan (module docstring) among
    those within LAYOUT_TIE_TOLERANCE of the fastest plan not yet ranked. Every rank thus costs at most that fraction
    against the fastest that is left, and with no near ties the order is by step time, then memory. `ep`: each
    plan's expert-parallel degree (None: 1, a dense model's)."""
    ep = np.ones_like(cp) if ep is None else ep
    keys = (peak_bytes, step_time_s, pp, tp, ep, cp, model_parallel_axes(cp, tp, pp, ep))  # lexsort: last key first
    left = np.arange(len(step_time_s))
    ranked: list[int] = []
    while len(left) and len(ranked) < count:
        times = step_time_s[left]
        tied = left[times <= times.min() * (1 + LAYOUT_TIE_TOLERANCE)]
        chosen = int(tied[np.lexsort(tuple(np.asarray(key)[tied] for key in keys))[0]])
        ranked.append(chosen)
        left = left[left != chosen]
    return np.array(ranked, dtype=np.int64)
