"""Calibrating the cost model's free factors: on published layer timings, and on runs measured here.

1. Published: the A100 preset's `matmul_efficiency` is not a guess: it is the least-squares fit of the block time
   model (planner/cost/compute.py: matmul work / efficiency + element-wise traffic + TP collectives) to the five
   single-layer measurements of Korthikanti et al. 2022, table 4 (22B-model layer, tp=8, micro-batch 4, with and
   without sequence parallelism and recomputation). tests/validation checks that the preset matches the fit.
   The Hopper presets' is the same fit to the executor's own block timings on an H200 (tests/data;
   `calibrate_hopper_matmul_efficiency`).
   Likewise the DEEPSPEED regime's `zero3_bandwidth_efficiency` (planner/cost/runtime.py) is the one-parameter fit
   of the step-time model to the six DeepSpeed ZeRO-3 runs of Narayanan et al. 2021, table 2
   (`calibrate_deepspeed_zero3_bandwidth`), and the eager stacks' host time per kernel
   (runtime.EAGER_HOST_S_PER_KERNEL, forward, and EAGER_HOST_S_PER_BACKWARD_KERNEL) the fit of the step-time
   model to one fixed half of the dev vTrain runs,
   reported on the other half (`fit_host_floor`, `python -m planner.calibration host-floor`).
2. Measured (`paraplan validate`): a HardwareProfile times layers and collectives one at a time; a training step
   runs them together, with its framework around them. `fit_calibration` fits the factors of
   `planner.specs.Calibration` (compute efficiency per operation class, collective bandwidth and latency
   efficiency per link tier, the gradient-reduction overlap and the overheads per micro-batch and per step) so
   that the cost model, reading the profile, predicts the measured step times. It is a bounded nonlinear
   least-squares fit (Levenberg 1944; Marquardt 1963) of the log step-time ratio under Huber's robust loss
   (Huber 1964), through the cost model itself, with a weak prior at the uncalibrated values so that a factor no
   measured run depends on (say, the inter-node tier on one machine) stays where it was.
3. Error bands (`python -m planner.calibration bands`): every validation run with a measured step time (the dev
   set's published Megatron-LM and DeepSpeed runs, vTrain's, the executor's GPU runs) is estimated again, and the
   spread of measured / predicted per regime and scale is stored as planner/data/uncertainty.json, which every
   estimate reads its band from (planner/uncertainty.py). Rerun it whenever the cost model changes; a test says when.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from planner.cost import ops
from planner.cost.compute import fit_matmul_efficiency, matmul_work_s, traffic_s
from planner.cost.layers import LayerContext, block_tp_allreduces
from planner.cost.runtime import DEEPSPEED, MEGATRON, Runtime
from planner.cost.step import estimate_step
from planner.devset import DEFAULT_PATH as DEVSET_PATH
from planner.devset import VTRAIN_PATH, PublishedLayerTiming, PublishedRun, layer_timings, training_runs
from planner.estimates import estimate_request
from planner.profiles import load_profile_json
from planner.request import EstimateRequest, parse_estimate_request, profile_costs
from planner.specs import Calibration, HardwareProfile
from planner.specs.estimate import Scale
from planner.uncertainty import BANDS_PATH, COVERAGE, MIN_RUNS, Band, BandTable, RegimeBands, scale_of


@dataclass(frozen=True)
class BlockTimeTerms:
    matmul_at_peak_s: float  # matmul seconds if matmuls ran at 100% of peak
    other_s: float  # element-wise traffic + tensor-parallel collectives


def block_time_terms(request: dict) -> BlockTimeTerms:
    """Split one block's forward + backward (+ recompute) time into its matmul part and everything else (fused
    attention, where the GPU has an efficiency of its own for it, is everything else)."""
    req = parse_estimate_request(request)
    ctx = LayerContext.of(req.model, req.training, req.cluster, req.plan, measured=req.measured)
    block = ops.block_ops(req.model, req.training, ctx.shape)
    recompute, gpu = req.plan.recompute, req.cluster.gpu
    peak = gpu.peak_tflops[req.training.precision] * 1e12
    own_rate = gpu.attention_efficiency is not None
    gemms = [op for op in block if not (op.flash and own_rate)]
    attention = [op for op in block if op.flash and own_rate]
    return BlockTimeTerms(
        matmul_at_peak_s=matmul_work_s(gemms, recompute, peak, gpu.sm_count),
        other_s=traffic_s(block, recompute, ctx.speeds.memory_bytes_per_s)
        + matmul_work_s(attention, recompute, ctx.speeds.flash_flops_per_s, gpu.sm_count)
        + ctx.tp_allreduces_s(block_tp_allreduces(recompute), req.plan),
    )


@dataclass(frozen=True)
class MatmulCalibration:
    matmul_efficiency: float
    # (measurement, predicted seconds at the fitted efficiency); a measurement has `request` and `measured_s`
    samples: list[tuple[Any, float]]


def calibrate_matmul_efficiency(timings: list[PublishedLayerTiming] | None = None) -> MatmulCalibration:
    return fit_block_timings(layer_timings() if timings is None else timings)


def fit_block_timings(timings: list[Any]) -> MatmulCalibration:
    """The least-squares matmul efficiency of measured block times (each a `request` and its `measured_s`)."""
    terms = [block_time_terms(t.request) for t in timings]
    efficiency = fit_matmul_efficiency(
        [(x.matmul_at_peak_s, x.other_s, t.measured_s) for x, t in zip(terms, timings, strict=True)]
    )
    predicted = [x.matmul_at_peak_s / efficiency + x.other_s for x in terms]
    return MatmulCalibration(efficiency, list(zip(timings, predicted, strict=True)))


# ------------------------------------------------------------------- Hopper's matmuls, measured on an H200

# The executor's block timings on an H200 (`paraplan profile`, kept in the repo with their runs:
# benchmarks/results/2026-12-04-h200-llama3.2-1b.md), Llama-3.2 1B blocks of 1,024-2,048 tokens a sequence.
H200_PROFILES = ("seq1024", "seq1024-20steps", "seq2048")
H200_PROFILE_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "h200-llama3.2-1b"
# Blocks of at least this many tokens a micro-batch are timed device-bound: their forward runs over 2 ms, where
# the host's launches of a block measured 1.0-1.5 ms (micro-batch 1); smaller ones time the host, not the GEMMs.
DEVICE_BOUND_TOKENS = 8192


@dataclass(frozen=True)
class MeasuredBlock:
    """One block timing of a profile as a contract request: forward + backward (+ recompute) seconds."""

    request: dict
    measured_s: float


def h200_block_timings(folder: Path = H200_PROFILE_DIR) -> list[MeasuredBlock]:
    """The device-bound block timings of the executor's H200 profiles, every recompute mode, on one GPU (tp 1)."""
    blocks = []
    for name in H200_PROFILES:
        profile = json.loads((folder / name / "profile.json").read_text())
        for layer in profile["layers"]:
            tokens = layer["seq_len"] * layer["micro_batch_size"]
            if layer["layer"] != "block" or layer["tp"] != 1 or tokens < DEVICE_BOUND_TOKENS:
                continue
            blocks.append(MeasuredBlock(h200_block_request(profile, layer), _median_s(layer, "forward", "backward")))
    return blocks


def h200_block_request(profile: dict, layer: dict) -> dict:
    """A profile's block timing as a contract request: its model, shape and recompute mode on one H200."""
    return {
        "model": profile["model"],
        "cluster": {"gpu": "h200", "num_nodes": 1, "gpus_per_node": 1},
        "training": {"seq_len": layer["seq_len"], "global_batch_size": layer["micro_batch_size"],
                     "precision": layer["dtype"]},
        "plan": {"micro_batch_size": layer["micro_batch_size"], "recompute": layer["recompute"]},
    }  # fmt: skip


def _median_s(layer: dict, *passes: str) -> float:
    return sum(layer[name]["median_s"] for name in passes)


def calibrate_hopper_matmul_efficiency(blocks: list[MeasuredBlock] | None = None) -> MatmulCalibration:
    """The matmul efficiency (in full waves) that makes the block time model, with everything else as it is
    (fused attention at the Hopper preset's own rate, element-wise traffic, the executor's casts), match the
    executor's device-bound block timings on an H200: least squares, as `calibrate_matmul_efficiency`."""
    return fit_block_timings(h200_block_timings() if blocks is None else blocks)


# ---------------------------------------------------------------------------------- the host's floor

# The search interval of the host time per kernel, seconds: from none to ten times what PyTorch's eager dispatch
# and a launch take (~20 us, PyTorch performance tuning guide); a fit at either end means the model is wrong.
HOST_FLOOR_BOUNDS_S = (0.0, 200e-6)


# Backward's launches cost at most what forward's do (the same kernels, without the model's Python around them).
BACKWARD_HOST_SHARE_BOUNDS = (0.0, 1.0)


@dataclass(frozen=True)
class HostFloorFit:
    host_s_per_kernel: float
    host_s_per_backward_kernel: float
    fit_ids: list[str]  # the runs it was fitted on (one half of the dev vTrain rows)
    check_ids: list[str]  # the other half, reported, never fitted


def vtrain_halves(runs: list[PublishedRun]) -> tuple[list[PublishedRun], list[PublishedRun]]:
    """A fixed split of the dev vTrain rows: by a hash of the run id (crc32, stable across Pythons), so the same
    row is always on the same side whatever else is added."""
    fit = [run for run in runs if zlib.crc32(run.id.encode()) % 2 == 0]
    check = [run for run in runs if zlib.crc32(run.id.encode()) % 2 == 1]
    return fit, check


def step_time_ratios(runs: list[PublishedRun], runtime: Runtime) -> np.ndarray:
    """Predicted / measured step time of each run under `runtime` (its own stack's regime, modified)."""
    ratios = []
    for run in runs:
        req = parse_estimate_request(run.request)
        predicted = estimate_step(req.model, req.training, req.cluster, req.plan, req.measured, runtime)
        ratios.append(predicted.step_time_s / run.step_time_s)
    return np.asarray(ratios)


def host_floor_loss(runs: list[PublishedRun], host_s: float, backward_host_s: float, base: Runtime = MEGATRON) -> float:
    """The mean squared log error of the step time of `runs` with these host times per kernel."""
    regime = replace(base, host_s_per_kernel=host_s, host_s_per_backward_kernel=backward_host_s)
    return float(np.mean(np.log(step_time_ratios(runs, regime)) ** 2))


def fit_host_floor(runs: list[PublishedRun] | None = None, base: Runtime = MEGATRON) -> HostFloorFit:
    """The host times per kernel, forward and backward, that minimise the squared log error of the step time over
    the fitting half of the dev vTrain runs (Megatron-LM on A100, widths 1-4k, where the host bounds small layers).
    Two nested golden-section searches (Kiefer 1953): over backward's share of forward's time per kernel
    (BACKWARD_HOST_SHARE_BOUNDS), and for each share over forward's (HOST_FLOOR_BOUNDS_S); the loss is unimodal in
    each (more floor, slower steps). Minutes: the command runs it, the test checks the optimum around the preset."""
    fit, check = vtrain_halves(training_runs(VTRAIN_PATH) if runs is None else runs)

    def best_forward_s(share: float) -> float:
        return _golden_section(lambda host_s: host_floor_loss(fit, host_s, share * host_s, base),
                               *HOST_FLOOR_BOUNDS_S, tolerance=0.5e-6)  # fmt: skip

    def loss_at_share(share: float) -> float:
        host_s = best_forward_s(share)
        return host_floor_loss(fit, host_s, share * host_s, base)

    share = _golden_section(loss_at_share, *BACKWARD_HOST_SHARE_BOUNDS, tolerance=0.01)
    host_s = best_forward_s(share)
    return HostFloorFit(host_s, share * host_s, [run.id for run in fit], [run.id for run in check])


def _golden_section(f: Callable[[float], float], low: float, high: float, tolerance: float) -> float:
    ratio = (5**0.5 - 1) / 2
    a, b = low + (1 - ratio) * (high - low), low + ratio * (high - low)
    fa, fb = f(a), f(b)
    while high - low > tolerance:
        if fa < fb:
            high, b, fb = b, a, fa
            a = low + (1 - ratio) * (high - low)
            fa = f(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = f(b)
    return (low + high) / 2


ZERO3_SOURCES = ("narayanan2021_t2_zero3",)  # DeepSpeed ZeRO-3 runs of Narayanan et al. 2021, table 2


@dataclass(frozen=True)
class Zero3Calibration:
    bandwidth_efficiency: float
    samples: list[tuple[PublishedRun, float]]  # (published run, predicted seconds at the fitted efficiency)


def calibrate_deepspeed_zero3_bandwidth(runs: list[PublishedRun] | None = None) -> Zero3Calibration:
    """The DEEPSPEED regime's `zero3_bandwidth_efficiency` (planner/cost/runtime.py): the one value in (0, 1] that
    minimises the squared log step-time ratio over DeepSpeed's published ZeRO-3 runs, everything else of the cost
    model as it is. Golden-section search on its logarithm (Kiefer 1953): the step time falls monotonically as the
    efficiency grows, so the error is unimodal in it."""
    runs = training_runs(sources=ZERO3_SOURCES) if runs is None else runs
    requests = [parse_estimate_request(run.request) for run in runs]

    def predicted(efficiency: float) -> list[float]:
        runtime = replace(DEEPSPEED, zero3_bandwidth_efficiency=efficiency)
        return [
            estimate_step(r.model, r.training, r.cluster, r.plan, r.measured, runtime).step_time_s for r in requests
        ]

    def loss(log_efficiency: float) -> float:
        times = predicted(float(np.exp(log_efficiency)))
        return sum(np.log(t / run.step_time_s) ** 2 for t, run in zip(times, runs, strict=True))

    efficiency = float(np.exp(_golden_section(loss, float(np.log(0.01)), 0.0, tolerance=1e-6)))
    return Zero3Calibration(efficiency, list(zip(runs, predicted(efficiency), strict=True)))


# ------------------------------------------------------------------------------------- measured runs


@dataclass(frozen=True)
class MeasuredStep:
    """One measured run: the request it trained (model, training, cluster, plan) and its steady step time.
    `profile`: a profile measured next to this run (`paraplan validate --paired`), which it is then predicted
    from instead of the validation's, under the same calibration."""

    request: EstimateRequest
    measured_s: float
    profile: HardwareProfile | None = None


@dataclass(frozen=True)
class Factor:
    """One free factor as the fit sees it: a coordinate with its uncalibrated value and its bounds."""

    name: str
    start: float
    low: float
    high: float
    prior_weight: float  # of the factor's distance from its start, against the runs' log-ratio residuals


# Efficiencies are fitted as log(1 / efficiency), the time multiplier's logarithm, so that 2x too slow and 2x
# too fast weigh alike; the bounds allow 20x faster and 100x slower (framework dispatch can dwarf a tiny
# collective). The overheads are in milliseconds.
PRIOR_WEIGHT = 0.1  # per unit of log slowdown (a factor e) or of overlap share: weak beside 10% step-time errors
# Per millisecond of overhead: a 10 ms overhead weighs as a 1% step-time error. Every run pays the overheads, so
# the runs pin them down; a prior as strong as the efficiencies' would instead push their share of the steps
# into whichever efficiency is charged once per step (the optimizer's).
OVERHEAD_PRIOR_WEIGHT = 0.001
LOG_SLOWDOWN = (0.0, -np.log(20.0), np.log(100.0), PRIOR_WEIGHT)
OVERHEAD_MS = (0.0, 0.0, 1000.0, OVERHEAD_PRIOR_WEIGHT)
COMPUTE_CLASSES = ("forward", "backward", "optimizer")
TIERS = ("intra_node", "inter_node")
FACTORS = (
    *(Factor(f"compute:{c}", *LOG_SLOWDOWN) for c in COMPUTE_CLASSES),
    *(Factor(f"bandwidth:{t}", *LOG_SLOWDOWN) for t in TIERS),
    *(Factor(f"latency:{t}", *LOG_SLOWDOWN) for t in TIERS),
    Factor("overlap", 1.0, 0.0, 1.0, PRIOR_WEIGHT),
    Factor("microbatch_overhead_ms", *OVERHEAD_MS),
    Factor("step_overhead_ms", *OVERHEAD_MS),
)
MAX_ITERATIONS = 30
# Runs are fitted under Huber's loss of the log ratio (Huber 1964): squared within HUBER_DELTA, linear beyond. The
# loss's slope is capped at the delta, so a run that a busy machine slowed by 30% pulls on the factors as hard as a
# run 5% off, not six times as hard as under least squares; and MAPE, what the fit is judged by, is itself linear.
# 0.05 was chosen on validation s13's runs (held-out MAPE 8.2% under least squares, 7.6% at 0.05, 7.6% at 0.03).
HUBER_DELTA = 0.05


def calibration_of(x: np.ndarray, num_runs: int, fit_mape: float, created: str) -> Calibration:
    """The factors at coordinates `x` (FACTORS' order) as the profile stores them."""
    value = dict(zip((f.name for f in FACTORS), x.tolist(), strict=True))

    def efficiencies(kind: str, names: tuple[str, ...]) -> dict[str, float]:
        return {name: float(np.exp(-value[f"{kind}:{name}"])) for name in names}

    return Calibration(
        compute_efficiency=efficiencies("compute", COMPUTE_CLASSES),  # type: ignore[arg-type]
        collective_efficiency=efficiencies("bandwidth", TIERS),  # type: ignore[arg-type]
        collective_latency_efficiency=efficiencies("latency", TIERS),  # type: ignore[arg-type]
        overlap=float(value["overlap"]),
        microbatch_overhead_s=float(value["microbatch_overhead_ms"]) / 1e3,
        step_overhead_s=float(value["step_overhead_ms"]) / 1e3,
        num_runs=num_runs,
        fit_mape=fit_mape,
        created=created,
    )


def predict_steps(profile: HardwareProfile, runs: list[MeasuredStep]) -> np.ndarray:
    """The step time the cost model predicts for each run's plan from `profile` (with its calibration, if any), or
    from the run's own profile under `profile`'s calibration."""
    predicted = []
    for run in runs:
        req = run.request
        own = profile if run.profile is None else run.profile.model_copy(update={"calibration": profile.calibration})
        measured = profile_costs(req.cluster, own, req.model)
        predicted.append(estimate_step(req.model, req.training, req.cluster, req.plan, measured=measured).step_time_s)
    return np.array(predicted)


def starting_point(profile: HardwareProfile) -> np.ndarray:
    """FACTORS' starts, the overlap at what the profile measured (where it did): the uncalibrated model's own
    values, which the prior then holds the fit near."""
    start = np.array([f.start for f in FACTORS])
    if profile.comm_compute_overlap is not None:
        start[[f.name for f in FACTORS].index("overlap")] = profile.comm_compute_overlap
    return start


def fit_calibration(profile: HardwareProfile, runs: list[MeasuredStep], created: str) -> HardwareProfile:
    """`profile` with the Calibration that best predicts `runs` (any calibration it had is replaced).

    Levenberg-Marquardt on r_i = log(predicted_i / measured_i) under Huber's loss (`huber_residuals`), plus
    prior_weight x (x - start) per factor, with a forward-difference Jacobian through the cost model and each step
    clipped to the factor's bounds.
    """
    if not runs:
        raise ValueError("runs: a calibration needs at least one measured run")
    measured = np.array([run.measured_s for run in runs])
    if not np.all(measured > 0):
        raise ValueError("runs: every measured step time must be > 0")
    base = profile.model_copy(update={"calibration": None})
    start = starting_point(profile)
    low, high = np.array([f.low for f in FACTORS]), np.array([f.high for f in FACTORS])
    prior_weight = np.array([f.prior_weight for f in FACTORS])

    def at(x: np.ndarray) -> HardwareProfile:
        return base.model_copy(update={"calibration": calibration_of(x, len(runs), 0.0, created)})

    def residuals(x: np.ndarray) -> np.ndarray:
        ratio = np.log(predict_steps(at(x), runs) / measured)
        return np.concatenate([huber_residuals(ratio, HUBER_DELTA), prior_weight * (x - start)])

    x = _levenberg_marquardt(residuals, start, low, high)
    fit_mape = float(np.mean(np.abs(predict_steps(at(x), runs) / measured - 1)))
    return base.model_copy(update={"calibration": calibration_of(x, len(runs), fit_mape, created)})


def huber_residuals(r: np.ndarray, delta: float) -> np.ndarray:
    """Residuals whose squares are Huber's loss of `r` (Huber 1964): r itself within `delta`, beyond it
    sign(r) sqrt(2 delta |r| - delta^2), which meets r with the same slope at |r| = delta, so a least-squares
    solver minimises the Huber loss unchanged."""
    size = np.abs(r)
    beyond = np.sign(r) * np.sqrt(np.maximum(2 * delta * size - delta**2, 0.0))
    return np.where(size <= delta, r, beyond)


def _levenberg_marquardt(
    residuals: Callable[[np.ndarray], np.ndarray], x: np.ndarray, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """Minimise |residuals(x)|^2 within [low, high] (Marquardt 1963, with the step projected onto the box)."""
    r = residuals(x)
    damping = 1e-2
    for _ in range(MAX_ITERATIONS):
        jacobian = _jacobian(residuals, x, r, low, high)
        gradient = jacobian.T @ r
        normal = jacobian.T @ jacobian
        improved = False
        while damping < 1e8:
            step = np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-9), -gradient)
            candidate = np.clip(x + step, low, high)
            r_candidate = residuals(candidate)
            if r_candidate @ r_candidate < r @ r:
                improved = (r @ r - r_candidate @ r_candidate) > 1e-10 * (r @ r)
                x, r, damping = candidate, r_candidate, max(damping / 10, 1e-7)
                break
            damping *= 10
        if not improved:
            break
    return x


def _jacobian(
    residuals: Callable[[np.ndarray], np.ndarray], x: np.ndarray, r: np.ndarray, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """Forward differences, stepping inwards at an upper bound."""
    columns = []
    for i in range(len(x)):
        h = 1e-4 * max(1.0, abs(x[i]))
        h = -h if x[i] + h > high[i] else h
        moved = x.copy()
        moved[i] += h
        columns.append((residuals(moved) - r) / h)
    return np.stack(columns, axis=1)


def halves(runs: list[MeasuredStep]) -> tuple[list[int], list[int]]:
    """Two halves of the runs for fitting on one and testing on the other: within each layout (dp, tp, pp, cp),
    runs sorted by measured time are dealt alternately, so each half spans every layout and the fast and slow
    plans of each."""
    order = sorted(
        range(len(runs)),
        key=lambda i: (*_layout(runs[i].request), runs[i].measured_s),
    )
    first: list[int] = []
    second: list[int] = []
    previous = None
    for position, i in enumerate(order):
        layout = _layout(runs[i].request)
        if layout != previous:
            # Start each layout in the half that is smaller so far, so odd-sized layouts do not pile up.
            turn, previous = (0 if len(first) <= len(second) else 1), layout
            start = position
        (first if (position - start + turn) % 2 == 0 else second).append(i)
    return sorted(first), sorted(second)


def _layout(req: EstimateRequest) -> tuple[int, int, int, int]:
    plan = req.plan
    return plan.dp, plan.tp, plan.pp, plan.cp


def held_out_predictions(profile: HardwareProfile, runs: list[MeasuredStep], created: str) -> np.ndarray:
    """Each run's step time predicted by a calibration fitted on the other half of the runs only (`halves`):
    fit on one half, test on the other, and the reverse."""
    if len(runs) < 2:
        raise ValueError("runs: a held-out test needs at least two measured runs")
    predicted = np.empty(len(runs))
    first, second = halves(runs)
    for fit_on, test_on in ((first, second), (second, first)):
        calibrated = fit_calibration(profile, [runs[i] for i in fit_on], created)
        predicted[test_on] = predict_steps(calibrated, [runs[i] for i in test_on])
    return predicted


# -------------------------------------------------------------------------------------------- error bands
# Every estimate carries the spread of comparable validated runs around their estimates (planner/uncertainty.py).
# `fit_uncertainty` makes that spread from the runs: each is estimated again by the cost model as it is, and
# measured / predicted is grouped by regime and scale. The ratio, not predicted / measured - 1, so that a band is
# the estimate times its percentiles: 90% of the runs measured between estimate x low and estimate x high.

BANDS_COMMAND = "python -m planner.calibration bands"
# The executor's runs measured on a GPU: a folder per validation, each with its profile.json and runs.json. A path
# in the repository (run the command from its root); the bands it makes are the package data.
MEASURED_RUNS = (Path("tests/data/h200-llama3.2-1b"),)
PUBLISHED_SOURCES = {
    "narayanan2021": "Narayanan et al. 2021",
    "korthikanti2022": "Korthikanti et al. 2022",
    "vtrain": "vTrain (Bang et al. 2024)",
}
BAND_PERCENTILES = ((1 - COVERAGE) / 2, (1 + COVERAGE) / 2)  # 5th and 95th


@dataclass(frozen=True)
class ValidationRun:
    """A run with a measured step time (and, where measured, an allocated peak memory) as a contract request."""

    source: str  # the data set it comes from, as a band's basis names it
    request: dict[str, Any]
    step_time_s: float
    peak_bytes: float | None = None  # torch.cuda.max_memory_allocated, comparable with the allocated peak
    profile: HardwareProfile | None = None  # the measured profile it is estimated from


@dataclass(frozen=True)
class Residual:
    """One run against its estimate: which band it counts in, and measured / predicted."""

    regime: str
    scale: Scale
    source: str
    step_time_ratio: float
    peak_memory_ratio: float | None


def published_validation_runs() -> list[ValidationRun]:
    """The dev set's published runs (Megatron-LM and DeepSpeed) and vTrain's Megatron-LM runs."""
    return [
        ValidationRun(PUBLISHED_SOURCES.get(run.id.split("_")[0], run.id), run.request, run.step_time_s)
        for path in (DEVSET_PATH, VTRAIN_PATH)
        for run in training_runs(path)
    ]


def measured_validation_runs(folder: Path) -> list[ValidationRun]:
    """The executor's measured runs under `folder` (`paraplan validate` output: <validation>/profile.json and
    runs.json), each to be estimated from its validation's profile (or its own, in a paired validation)."""
    runs = []
    for validation in sorted(p for p in folder.iterdir() if (p / "runs.json").exists()):
        profile = load_profile_json(validation / "profile.json")
        for record in json.loads((validation / "runs.json").read_text()):
            if record["measured_s"] is None:
                continue  # the run failed
            own = record.get("profile_file")
            runs.append(ValidationRun(
                source=f"paraplan executor {folder.name}",
                request=record["request"],
                step_time_s=record["measured_s"],
                peak_bytes=record.get("measured_peak_bytes"),
                profile=load_profile_json(Path(own)) if own else profile,
            ))  # fmt: skip
    return runs


def validation_runs(measured: tuple[Path, ...] = MEASURED_RUNS) -> list[ValidationRun]:
    return published_validation_runs() + [run for folder in measured for run in measured_validation_runs(folder)]


def residual(run: ValidationRun) -> Residual:
    """The run estimated again (from its profile, where it has one), against what it measured."""
    req = _request_of(run)
    estimate = estimate_request(req)
    memory = None if run.peak_bytes is None else run.peak_bytes / estimate.memory.allocated_peak_bytes
    ratio = run.step_time_s / estimate.step_time_s
    return Residual(req.runtime.name, scale_of(req.cluster.num_nodes), run.source, ratio, memory)


def _request_of(run: ValidationRun) -> EstimateRequest:
    """The run's request with its measured profile attached, so that its regime is the one the profile implies
    (planner/cost/runtime.py `runtime_for`: a profile that measured memory is PARAPLAN_CUDA, not ANALYTIC)."""
    if run.profile is None:
        return parse_estimate_request(run.request)
    profile = run.profile
    named = {**run.request, "cluster": {**run.request["cluster"], "profile": run.source}}
    return parse_estimate_request(named, lambda _: profile)


def quantile_band(ratios: list[float], sources: list[str]) -> Band:
    """The 5th and 95th percentiles of `ratios` (numpy's linear interpolation between order statistics, Hyndman
    and Fan 1996 type 7), or no bounds below MIN_RUNS runs; `sources` counts where the runs came from."""
    counts = {source: sources.count(source) for source in sorted(set(sources))}
    if len(ratios) < MIN_RUNS:
        return Band(len(ratios), None, None, counts)
    low, high = np.quantile(np.array(ratios), BAND_PERCENTILES)
    return Band(len(ratios), float(low), float(high), counts)


def fit_uncertainty(runs: list[ValidationRun], created: str, command: str = BANDS_COMMAND) -> BandTable:
    """The bands of every (regime, scale) with validated runs; a memory band only where runs measured memory."""
    residuals = [residual(run) for run in runs]
    bands = []
    for regime, scale in sorted({(r.regime, r.scale) for r in residuals}):
        group = [r for r in residuals if (r.regime, r.scale) == (regime, scale)]
        step_time = _group_band(group, lambda r: r.step_time_ratio)
        peak_memory = _group_band(group, lambda r: r.peak_memory_ratio)
        bands.append(RegimeBands(regime, scale, step_time, peak_memory))
    return BandTable(created=created, command=command, coverage=COVERAGE, bands=tuple(bands))


def _group_band(group: list[Residual], ratio: Callable[[Residual], float | None]) -> Band | None:
    """The band of `ratio` over the runs of `group` that measured it (None: none did)."""
    measured = [(r.source, value) for r in group if (value := ratio(r)) is not None]
    if not measured:
        return None
    return quantile_band([value for _, value in measured], [source for source, _ in measured])


def main(argv: list[str] | None = None) -> None:
    """`python -m planner.calibration {bands,host-floor,matmul}`, from the repository's root. `bands` writes the
    error bands; the other two refit a constant and print it, which is then set by hand in the source
    (planner/cost/runtime.py, planner/presets.py) so that a change to it shows in review."""
    parser = argparse.ArgumentParser(prog="python -m planner.calibration", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bands = commands.add_parser("bands", help="fit the estimates' error bands (planner/data/uncertainty.json)")
    bands.add_argument("--measured", type=Path, nargs="*", default=list(MEASURED_RUNS),
                       help="folders of the executor's measured validations (default: %(default)s)")  # fmt: skip
    bands.add_argument("--out", type=Path, default=BANDS_PATH)
    commands.add_parser(
        "host-floor",
        help="refit EAGER_HOST_S_PER_KERNEL and EAGER_HOST_S_PER_BACKWARD_KERNEL on the dev vTrain runs "
        "(planner/cost/runtime.py)",
    )
    commands.add_parser(
        "matmul",
        help="refit A100_MATMUL_EFFICIENCY on Korthikanti table 4 and HOPPER_MATMUL_EFFICIENCY on the executor's H200 "
        "blocks (planner/presets.py)",
    )
    args = parser.parse_args(argv)
    if args.command == "host-floor":
        print_host_floor_fit()
        return
    if args.command == "matmul":
        print(f"A100_MATMUL_EFFICIENCY = {calibrate_matmul_efficiency().matmul_efficiency:.3f}")
        print(f"HOPPER_MATMUL_EFFICIENCY = {calibrate_hopper_matmul_efficiency().matmul_efficiency:.3f}")
        return
    command = " ".join(["python -m planner.calibration", *(sys.argv[1:] if argv is None else argv)])
    table = fit_uncertainty(validation_runs(tuple(args.measured)), date.today().isoformat(), command)
    args.out.write_text(json.dumps(table.to_json(), indent=1) + "\n")
    for band in table.bands:
        step, memory = describe_band(band.step_time), describe_band(band.peak_memory)
        print(f"{band.regime:>14} {band.scale:>13}: step time {step}; peak memory {memory}")
    print(f"written to {args.out}")


def describe_band(band: Band | None) -> str:
    if band is None or band.low_ratio is None or band.high_ratio is None:
        return "no band" if band is None else f"no band ({band.runs} runs)"
    return f"{band.low_ratio - 1:+.1%} / {band.high_ratio - 1:+.1%} over {band.runs} runs"


def print_host_floor_fit() -> None:
    fit = fit_host_floor()
    print(f"EAGER_HOST_S_PER_KERNEL = {fit.host_s_per_kernel * 1e6:.1f}e-6  # fitted on {len(fit.fit_ids)} runs")
    print(f"EAGER_HOST_S_PER_BACKWARD_KERNEL = {fit.host_s_per_backward_kernel * 1e6:.1f}e-6")
    runs = {run.id: run for run in training_runs(VTRAIN_PATH)}
    regime = replace(
        MEGATRON, host_s_per_kernel=fit.host_s_per_kernel, host_s_per_backward_kernel=fit.host_s_per_backward_kernel
    )
    for half, ids in (("fitted", fit.fit_ids), ("held out", fit.check_ids)):
        ratios = step_time_ratios([runs[i] for i in ids], regime)
        mape, median = np.mean(np.abs(ratios - 1)), np.median(ratios)
        print(f"  {half}: {len(ids)} runs, MAPE {mape:.1%}, median predicted/measured {median:.3f}")


if __name__ == "__main__":
    main()
