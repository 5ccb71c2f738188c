"""A GPU preset's predictions of a kernel profile's measurements (`paraplan profile kernels`): each GEMM and fused
attention of the sweep through the cost model's own terms (planner/cost/compute.py: the roofline, wave
quantization, fused attention's rate and occupancy), and the executor's narrowed block through the host floor
(the regime's host time per kernel x the kernels planner/cost/ops.py counts), each beside what was measured.

A ratio measured / predicted above 1 means the preset is too fast for that shape; the efficiencies say how far
each kernel got of the preset's dense peak, measured and predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from planner.cost import ops
from planner.cost.compute import (
    BACKWARD_FLASH_FACTOR,
    CAUSAL_FLASH_WORK,
    Speeds,
    backward_s,
    forward_s,
    wave_efficiencies,
)
from planner.cost.layers import LayerContext, block_cost
from planner.request import parse_estimate_request
from planner.specs import GpuSpec
from planner.specs.kernels import AttentionMeasurement, GemmMeasurement, HostFloorMeasurement, KernelProfile

CheckKind = Literal["gemm", "attention forward", "attention backward", "host floor forward", "host floor backward"]


@dataclass(frozen=True)
class KernelCheck:
    """One measurement and the preset's prediction of it. `flops`: the work the kernel does (a causal attention's
    half of the full product, as FlashAttention counts it); 0 for the host floor, where `kernels` counts the
    launches the cost model charges instead."""

    kind: CheckKind
    shape: str
    measured_s: float
    predicted_s: float
    spread: float  # the measurement's (p90 - p10) / median
    flops: float = 0.0
    kernels: int = 0
    compute_bound: bool = False  # predicted at the FLOP rate (not at the HBM bandwidth its operands need)

    @property
    def ratio(self) -> float:
        """Measured / predicted time: above 1, the preset is too fast."""
        return self.measured_s / self.predicted_s

    def efficiency(self, peak_flops_per_s: float, seconds: float) -> float:
        """The share of `peak_flops_per_s` the kernel's work reaches in `seconds`."""
        return self.flops / seconds / peak_flops_per_s

    @property
    def measured_s_per_kernel(self) -> float:
        """The host floor's time per launch, measured (the pass over the kernels the cost model counts)."""
        return self.measured_s / self.kernels

    @property
    def predicted_s_per_kernel(self) -> float:
        return self.predicted_s / self.kernels


@dataclass(frozen=True)
class ImpliedConstant:
    """One of the preset's constants beside the value the measurements imply for it."""

    name: str
    preset: float
    measured: float
    basis: str  # which measurements, and how they were combined


def implied_constants(checks: list[KernelCheck], gpu: GpuSpec) -> list[ImpliedConstant]:
    """What the measurements say the preset's constants should be. A kernel predicted at the FLOP rate takes
    time inversely proportional to its efficiency, so the efficiency that would predict a measurement is the
    preset's x predicted / measured: the median of that over the compute-bound GEMMs (the matmul efficiency in
    full waves, waves being the model's own) and over the attention passes (fused attention's efficiency,
    occupancy the model's own); and the host floor's time per kernel, measured, against the regime's."""
    found = []
    gemms = [c for c in checks if c.kind == "gemm" and c.compute_bound]
    if gemms:
        found.append(_implied("matmul efficiency", gpu.matmul_efficiency, gemms, "compute-bound GEMMs"))
    attention = [c for c in checks if c.kind.startswith("attention")]
    if attention:
        preset = gpu.attention_efficiency if gpu.attention_efficiency is not None else gpu.matmul_efficiency
        found.append(_implied("fused attention efficiency", preset, attention, "attention passes"))
    for check in checks:
        if check.kind.startswith("host floor"):
            found.append(ImpliedConstant(
                name=f"host time per kernel, {check.kind.removeprefix('host floor ')}",
                preset=float(check.predicted_s_per_kernel), measured=float(check.measured_s_per_kernel),
                basis=f"the narrowed block's pass over its {check.kernels} kernels",
            ))  # fmt: skip
    return found


def _implied(name: str, preset: float, checks: list[KernelCheck], what: str) -> ImpliedConstant:
    ratios = [check.predicted_s / check.measured_s for check in checks if check.measured_s > 0]
    implied = preset * float(np.median(ratios)) if ratios else float("nan")
    return ImpliedConstant(name=name, preset=preset, measured=implied, basis=f"median over {len(ratios)} {what}")


def check_profile(profile: KernelProfile, gpu: GpuSpec) -> list[KernelCheck]:
    """Every measurement of `profile` with `gpu`'s prediction of it, in the profile's dtype."""
    speeds = Speeds.of(gpu, profile.dtype)
    elem = ops.ACTIVATION_BYTES[profile.dtype]
    checks = [_gemm_check(gemm, speeds, elem) for gemm in profile.gemms]
    checks += [check for attention in profile.attention for check in _attention_checks(attention, speeds)]
    if profile.host_floor is not None:
        checks += _host_floor_checks(profile.host_floor, gpu, profile.dtype)
    return checks


def gemm_op(rows: int, cols: int, inner: int, elem: int) -> ops.OpCost:
    """One rows x inner by inner x cols product as the cost model sees a linear layer's: 2 rows cols inner FLOPs,
    reading both operands and writing the result."""
    io = elem * (rows * inner + inner * cols + rows * cols)
    gemm = ops.Gemm(rows=rows, cols=cols, inner=inner)
    return ops.OpCost("gemm", 2.0 * rows * cols * inner, 0.0, 0.0, matmul_io_bytes=io, gemm=gemm)


def attention_op(heads: int, seq_len: int, head_dim: int, batch: int = 1) -> ops.OpCost:
    """Causal fused attention over `batch` sequences as the cost model sees it (planner/cost/ops.py `_flash_core`):
    the full QK^T and AV products' FLOPs, 4 s^2 heads head_dim a sequence, of which the kernel does the causal half;
    one product per sequence and head."""
    flops = 4.0 * batch * seq_len * seq_len * heads * head_dim
    gemm = ops.Gemm(rows=seq_len, cols=head_dim, inner=seq_len, batch=batch * heads)
    return ops.OpCost("flash_attention", flops, 0.0, 0.0, attention_core=True, flash=True, gemm=gemm)


def _gemm_check(gemm: GemmMeasurement, speeds: Speeds, elem: int) -> KernelCheck:
    op = gemm_op(gemm.rows, gemm.cols, gemm.inner, elem)
    waves = wave_efficiencies(op.gemm, speeds.sm_count).forward
    at_flop_rate = op.matmul_flops / waves / speeds.matmul_flops_per_s
    return KernelCheck(
        kind="gemm", shape=f"{gemm.rows} x {gemm.inner} x {gemm.cols}", measured_s=gemm.time.median_s,
        predicted_s=float(forward_s(op, speeds)), spread=gemm.time.spread, flops=op.matmul_flops,
        compute_bound=bool(at_flop_rate >= op.matmul_io_bytes / speeds.memory_bytes_per_s),
    )  # fmt: skip


def _attention_checks(attention: AttentionMeasurement, speeds: Speeds) -> list[KernelCheck]:
    op = attention_op(attention.heads, attention.seq_len, attention.head_dim, attention.batch)
    shape = f"{attention.batch} x {attention.seq_len} x {attention.heads} x {attention.head_dim}"
    causal = op.matmul_flops * CAUSAL_FLASH_WORK
    return [
        KernelCheck(kind="attention forward", shape=shape, measured_s=attention.forward.median_s,
                    predicted_s=float(forward_s(op, speeds)), spread=attention.forward.spread, flops=causal,
                    compute_bound=True),
        KernelCheck(kind="attention backward", shape=shape, measured_s=attention.backward.median_s,
                    predicted_s=float(backward_s(op, speeds)), spread=attention.backward.spread,
                    flops=causal * BACKWARD_FLASH_FACTOR, compute_bound=True),
    ]  # fmt: skip


def _host_floor_checks(host_floor: HostFloorMeasurement, gpu: GpuSpec, dtype: str) -> list[KernelCheck]:
    """The narrowed block as the estimate costs it for paraplan's executor on `gpu` (its regime's host time per
    kernel), with the kernels the pass launches by the cost model's count."""
    request = parse_estimate_request(host_floor_request(host_floor, gpu, dtype))
    ctx = LayerContext.of(request.model, request.training, request.cluster, request.plan)
    block = block_cost(request.model, request.training, request.plan, ctx)
    block_ops = ops.block_ops(request.model, request.training, ctx.shape)
    shape = f"{host_floor.model.num_attention_heads} x {host_floor.seq_len}"
    return [
        KernelCheck(kind="host floor forward", shape=shape, measured_s=host_floor.forward.median_s,
                    predicted_s=block.forward_s, spread=host_floor.forward.spread,
                    kernels=sum(op.kernels for op in block_ops)),
        KernelCheck(kind="host floor backward", shape=shape, measured_s=host_floor.backward.median_s,
                    predicted_s=block.backward_s, spread=host_floor.backward.spread,
                    kernels=sum(op.backward_kernels for op in block_ops)),
    ]  # fmt: skip


def host_floor_request(host_floor: HostFloorMeasurement, gpu: GpuSpec, dtype: str) -> dict:
    """The narrowed block's shape as a contract request on one `gpu` (paraplan's executor, no recompute)."""
    return {
        "model": host_floor.model.model_dump(mode="json"),
        "cluster": {"gpu": gpu.model_dump(mode="json"), "num_nodes": 1, "gpus_per_node": 1},
        "training": {"seq_len": host_floor.seq_len, "global_batch_size": host_floor.micro_batch_size,
                     "precision": dtype},
        "plan": {"micro_batch_size": host_floor.micro_batch_size, "recompute": "none"},
    }  # fmt: skip
