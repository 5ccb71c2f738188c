"""Calibrating the analytic model's free factors on published or measured layer timings.

The A100 preset's `matmul_efficiency` is not a guess: it is the least-squares fit of the block time model
(planner/cost/compute.py: matmul work / efficiency + element-wise traffic + TP collectives) to the five
single-layer measurements of Korthikanti et al. 2022, table 4 (22B-model layer, tp=8, micro-batch 4, with and
without sequence parallelism and recomputation). tests/validation checks that the preset matches the fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost import ops
from planner.cost.compute import fit_matmul_efficiency, matmul_work_s, traffic_s
from planner.devset import PublishedLayerTiming, layer_timings
from planner.graph import LayerContext
from planner.request import parse_estimate_request


@dataclass(frozen=True)
class BlockTimeTerms:
    matmul_at_peak_s: float  # matmul seconds if matmuls ran at 100% of peak
    other_s: float  # element-wise traffic + tensor-parallel collectives


def block_time_terms(request: dict) -> BlockTimeTerms:
    """Split one block's forward + backward (+ recompute) time into its matmul part and everything else."""
    req = parse_estimate_request(request)
    ctx = LayerContext.of(req.model, req.training, req.cluster, req.plan)
    block = ops.block_ops(req.model, req.training, ctx.shape)
    recompute = req.plan.recompute
    peak = req.cluster.gpu.peak_tflops[req.training.precision] * 1e12
    tp_allreduces = 4 + (2 if recompute == "full" else 0)
    return BlockTimeTerms(
        matmul_at_peak_s=matmul_work_s(block, recompute, peak),
        other_s=traffic_s(block, recompute, ctx.speeds.memory_bytes_per_s)
        + ctx.tp_allreduces_s(tp_allreduces, req.plan),
    )


@dataclass(frozen=True)
class Calibration:
    matmul_efficiency: float
    samples: list[tuple[PublishedLayerTiming, float]]  # (measurement, predicted seconds at the fitted efficiency)


def calibrate_matmul_efficiency(timings: list[PublishedLayerTiming] | None = None) -> Calibration:
    timings = layer_timings() if timings is None else timings
    terms = [block_time_terms(t.request) for t in timings]
    efficiency = fit_matmul_efficiency(
        [(x.matmul_at_peak_s, x.other_s, t.measured_s) for x, t in zip(terms, timings, strict=True)]
    )
    predicted = [x.matmul_at_peak_s / efficiency + x.other_s for x in terms]
    return Calibration(efficiency, list(zip(timings, predicted, strict=True)))
