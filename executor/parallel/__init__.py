"""One parallelism concern per module, each an `apply_*` function that takes only the fields it needs.

executor/apply.py composes them in DESIGN.md's fixed order: pipeline split (pipeline.py) -> context parallel
(context.py: ring attention, which changes no parameter) -> expert parallel (expert.py: each rank keeps its experts,
tokens travel by all-to-all) -> tensor/sequence parallel (tensor.py) -> activation recompute (checkpoint.py) -> data
parallel (data.py, over dp x cp; experts over their edp ranks) -> pipeline stages and schedule (pipeline.py).
"""

from __future__ import annotations

from executor.parallel.checkpoint import apply_recompute
from executor.parallel.context import apply_context_parallel
from executor.parallel.data import apply_data_parallel, make_optimizer
from executor.parallel.pipeline import build_schedule, build_stages, split_model
from executor.parallel.tensor import apply_tensor_parallel

__all__ = [
    "apply_context_parallel",
    "apply_data_parallel",
    "apply_recompute",
    "apply_tensor_parallel",
    "build_schedule",
    "build_stages",
    "make_optimizer",
    "split_model",
]
