"""Compute time of operations on one GPU: a roofline per op (Williams et al. 2009, "Roofline: an insightful
visual performance model") under a floor set by the host. Matmuls run at `matmul_efficiency` x the dense peak of
the training precision, times the share of the SMs their output's tiles keep busy (`wave_efficiency`: a GEMM
runs in whole waves of tiles over the GPU's SMs), or at the HBM bandwidth their operands need where that is slower
(small or thin GEMMs, and eager attention's products, which write and read the s x s scores);
fused (flash) attention at `attention_efficiency` x the peak (FlashAttention-2 reaches about half the A100's and a
third of the H100's: planner/presets.py), times the share of the SMs its blocks keep busy (`flash_occupancy`);
element-wise ops are memory-bound and run at `memory_efficiency` x the HBM bandwidth.

The host floor: the framework's Python, the dispatcher and autograd spend a roughly fixed time on the CPU per
kernel they launch, and the GPU cannot run a kernel before it is issued (the "CPU-bound" regime of PyTorch's
performance tuning guide, which CUDA graphs and torch.compile exist to remove). Kernels are issued
asynchronously, so the CPU runs ahead during a long GEMM and queues the short kernels after it: over a layer's
pass (forward, backward, recompute) the GPU waits only where launching the pass takes longer than running it.
So a pass takes the longer of its ops' roofline times and its kernel count x the stack's host time per kernel:
`Runtime.host_s_per_kernel` forward (and recompute), where the model's Python issues each op, and
`Runtime.host_s_per_backward_kernel` backward, where autograd's C++ engine does (planner/cost/runtime.py), which
planner/calibration.py fits on the dev half of vTrain's measured Megatron-LM runs, where widths of 1-2k make the
floor visible.

Where the efficiencies come from: the GPU presets (planner/presets.py). For the A100, matmul_efficiency is
calibrated on one published measurement, Korthikanti et al. 2022 table 4 (one 22B-model layer, tp=8,
micro-batch 4, five variants of parallelism and recomputation), as the efficiency of full waves; for Hopper, on
the executor's own block timings on an H200: `fit_matmul_efficiency` below is the fit, planner/calibration.py
applies it and tests/validation/test_devset.py checks the presets against it. A measured profile replaces these
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from planner.cost.ops import Gemm, OpCost, SelectivePolicy, recomputed_ops
from planner.specs import GpuSpec

# Backward of a matmul computes two products of the forward's size (input and weight gradients):
# 2x forward FLOPs (Narayanan et al. 2021, sec. 5.1 / eq. 3).
BACKWARD_MATMUL_FACTOR = 2.0
# FlashAttention's backward recomputes the scores and runs 5 matmuls to the forward's 2 (Dao 2023,
# FlashAttention-2, sec. 3.1-3.2): 2.5x forward FLOPs.
BACKWARD_FLASH_FACTOR = 2.5
# Fused attention kernels skip the blocks above the diagonal of a causal mask, about half the work
# (Dao 2023, sec. 3.1.1); eager attention computes the whole s x s product and masks it afterwards.
CAUSAL_FLASH_WORK = 0.5
# An element-wise forward reads its input and writes its output (2 passes); its backward reads the saved
# input and the incoming gradient and writes the outgoing gradient (3 passes): 1.5x the forward traffic.
BACKWARD_TRAFFIC_FACTOR = 1.5
# Output elements one thread block of a large 16-bit cuBLAS GEMM computes, rows x columns, one block per SM at a
# time: NVIDIA's Matrix Multiplication Background User's Guide ("Wave Quantization": on an A100, "256x128 thread
# block tiles ... one thread block per SM, leading to a wave size of 108 tiles"; docs.nvidia.com/deeplearning/
# performance/dl-performance-matrix-multiplication). Assumed for every GPU: cuBLAS's Hopper kernels use the same
# 256 x 128 and 128 x 256 tiles.
GEMM_TILE_ROWS = 256
GEMM_TILE_COLS = 128
# Query rows one thread block of fused attention takes (its forward grid: query blocks x sequences x heads), and
# key rows one block of its backward takes (key blocks x sequences x heads), for head dims up to 128:
# FlashAttention-2's kBlockM = 128 forward, kBlockN = 128 backward on the A100 (csrc/flash_attn/src/
# flash_fwd_launch_template.h, flash_bwd_launch_template.h `run_mha_*_hdim128`; Dao 2023 sec. 3.2), and
# FlashAttention-3's 2 x 64 rows on Hopper (hopper/flash_fwd_launch_template.h).
FLASH_BLOCK_ROWS = 128


@dataclass(frozen=True)
class Speeds:
    """What one GPU sustains for a precision: matmul FLOP/s and element-wise bytes/s."""

    matmul_flops_per_s: float
    memory_bytes_per_s: float
    host_s_per_kernel: float = 0.0  # the stack's host time per kernel launch in forward (Runtime.host_s_per_kernel)
    host_s_per_backward_kernel: float = 0.0  # ... and in backward, where autograd's engine launches them
    attention_flops_per_s: float | None = None  # fused attention's rate; None: the matmul rate
    sm_count: int | None = None  # the GPU's SMs, which a GEMM's tiles run over in waves; None: no quantization

    @classmethod
    def of(
        cls, gpu: GpuSpec, precision: str, host_s_per_kernel: float = 0.0, host_s_per_backward_kernel: float = 0.0
    ) -> Speeds:
        peak = gpu.peak_tflops[precision] * 1e12  # type: ignore[index]
        attention = None if gpu.attention_efficiency is None else peak * gpu.attention_efficiency
        return cls(
            matmul_flops_per_s=peak * gpu.matmul_efficiency,
            memory_bytes_per_s=gpu.hbm_GBps * 1e9 * gpu.memory_efficiency,
            host_s_per_kernel=host_s_per_kernel,
            host_s_per_backward_kernel=host_s_per_backward_kernel,
            attention_flops_per_s=attention,
            sm_count=gpu.sm_count,
        )

    @property
    def flash_flops_per_s(self) -> float:
        return self.attention_flops_per_s or self.matmul_flops_per_s


def forward_s(op: OpCost, speeds: Speeds) -> Any:
    """The op's forward time on the device (the host floor applies to a layer's passes: `pass_s`)."""
    if op.flash:
        return _flash_s(op, speeds)
    waves = wave_efficiencies(op.gemm, speeds.sm_count)
    return _matmul_s(op.matmul_flops / waves.forward, op.matmul_io_bytes, speeds) + (
        op.traffic_bytes / speeds.memory_bytes_per_s
    )


def backward_s(op: OpCost, speeds: Speeds) -> Any:
    """The op's backward time on the device: two GEMMs of the forward's FLOPs and about as many bytes each
    (`BACKWARD_MATMUL_FACTOR`), the input gradient's with its own output's waves (`WaveEfficiencies`)."""
    if op.flash:
        return _flash_s(op, speeds) * BACKWARD_FLASH_FACTOR
    waves = wave_efficiencies(op.gemm, speeds.sm_count)
    input_grad = _matmul_s(op.matmul_flops / waves.input_grad, op.matmul_io_bytes, speeds)
    weight_grad = _matmul_s(op.matmul_flops * (BACKWARD_MATMUL_FACTOR - 1), op.matmul_io_bytes, speeds)
    return input_grad + weight_grad + backward_traffic_bytes(op) / speeds.memory_bytes_per_s


def backward_traffic_bytes(op: OpCost) -> float:
    """Bytes the op's backward moves through HBM: its own count where it has one, else `BACKWARD_TRAFFIC_FACTOR` x
    the forward's."""
    if op.backward_traffic_bytes is not None:
        return op.backward_traffic_bytes
    return op.traffic_bytes * BACKWARD_TRAFFIC_FACTOR


def _flash_s(op: OpCost, speeds: Speeds) -> Any:
    """Fused attention's forward: its causal FLOPs at the attention rate, over the share of the SMs its blocks
    keep busy (`flash_occupancy`)."""
    occupancy = flash_occupancy(op.gemm, speeds.sm_count)
    return op.matmul_flops * CAUSAL_FLASH_WORK / (speeds.flash_flops_per_s * occupancy)


def flash_occupancy(gemm: Gemm | None, sm_count: int | None) -> Any:
    """The share of the SMs' time fused attention keeps busy. Its thread blocks each take `FLASH_BLOCK_ROWS`
    queries of one sequence and head against every key (forward; backward's take as many keys against every
    query), so no block finishes sooner than one SM takes for a full row of the causal mask's blocks, while the
    causal work spread evenly over all the SMs is `CAUSAL_FLASH_WORK` x blocks x that row. With fewer blocks than
    twice the SMs (few sequences x heads on a GPU: small micro-batches, tp, short or cp-split sequences), that
    longest block sets the time (FlashAttention-2 parallelizes over the sequence because batch x heads alone
    leaves SMs idle: Dao 2023, sec. 3.2). With more blocks, long and short rows are taken to pack evenly over the
    SMs (an assumption: the block scheduler's order is not modelled). 1 without the shape or the SM count."""
    if gemm is None or not sm_count:
        return 1.0
    blocks = gemm.batch * gemm.rows / np.minimum(gemm.rows, FLASH_BLOCK_ROWS)
    return np.minimum(1.0, CAUSAL_FLASH_WORK * blocks / sm_count)


def _matmul_s(flops: Any, io_bytes: Any, speeds: Speeds) -> Any:
    """The roofline of a matmul: its FLOPs at the achievable rate, or its operands' traffic, whichever is slower."""
    return np.maximum(flops / speeds.matmul_flops_per_s, io_bytes / speeds.memory_bytes_per_s)


@dataclass(frozen=True)
class WaveEfficiencies:
    """The share of the SMs' time a GEMM's tiles keep busy (`wave_efficiency`): the forward product C = A B
    (rows x cols tiles) and the input gradient dA = dC B^T (rows x inner). The weight gradient dB = A^T dC is not
    quantized: its output is the weight shard, its reduction runs over every token of the micro-batch, and a
    reduction that long is what cuBLAS splits over several thread blocks (split-K, cublasLt's
    CUBLASLT_ALGO_CONFIG_SPLITK_NUM) when the output's tiles would leave SMs idle, so it fills the SMs
    (an assumption: cuBLAS's heuristics are not published)."""

    forward: Any = 1.0
    input_grad: Any = 1.0


def wave_efficiencies(gemm: Gemm | None, sm_count: int | None) -> WaveEfficiencies:
    if gemm is None or not sm_count:
        return WaveEfficiencies()
    return WaveEfficiencies(
        forward=wave_efficiency(gemm.rows, gemm.cols, gemm.batch, sm_count),
        input_grad=wave_efficiency(gemm.rows, gemm.inner, gemm.batch, sm_count),
    )


def wave_efficiency(rows: Any, cols: Any, batch: Any, sm_count: int) -> Any:
    """Wave quantization (NVIDIA, Matrix Multiplication Background User's Guide): a GEMM's output splits into
    tiles of GEMM_TILE_ROWS x GEMM_TILE_COLS, which run one per SM in ceil(tiles / SMs) waves of equal length; the
    last wave's idle SMs are lost. The achievable rate scales by tiles / (waves x SMs): 1 for a full last wave,
    down to 1 / SMs for a single tile."""
    tiles = batch * np.ceil(rows / GEMM_TILE_ROWS) * np.ceil(cols / GEMM_TILE_COLS)
    waves = np.ceil(tiles / sm_count)
    return tiles / (waves * sm_count)


def pass_s(ops: list[OpCost], speeds: Speeds, backward: bool = False) -> Any:
    """A layer's forward (or backward) pass over `ops`: the device's time, or the host's time to launch the pass's
    kernels where that is longer (module docstring)."""
    return np.maximum(*pass_device_and_host_s(ops, speeds, backward))


def host_slack_s(device_and_host_s: tuple[Any, Any]) -> Any:
    """How much more host time a pass (its `pass_device_and_host_s`) could take before the device waits on the
    host: its device time beyond the host's launches, 0 for a pass the host already bounds. Host work beside the
    model's own ops, such as FSDP2's per-unit hooks (planner/cost/data.py `fsdp_hooks_s`), hides in it."""
    device, host = device_and_host_s
    return np.maximum(device - host, 0.0)


def pass_device_and_host_s(ops: list[OpCost], speeds: Speeds, backward: bool = False) -> tuple[Any, Any]:
    """A pass's seconds on the device (its ops' rooflines) and on the host (its kernels' launches)."""
    if backward:
        device = sum(backward_s(op, speeds) for op in ops)
        host = sum(op.backward_kernels for op in ops) * speeds.host_s_per_backward_kernel
    else:
        device = sum(forward_s(op, speeds) for op in ops)
        host = sum(op.kernels for op in ops) * speeds.host_s_per_kernel
    return device, host


def recompute_s(ops: list[OpCost], recompute: str, speeds: Speeds, policy: SelectivePolicy = "attention_core") -> Any:
    """Extra forward work in backward, as a forward pass of what the recompute mode repeats
    (planner/cost/ops.py `recomputed_ops`)."""
    repeated = recomputed_ops(ops, recompute, policy)
    return pass_s(repeated, speeds) if repeated else 0.0


def matmul_work_s(ops: list[OpCost], recompute: str, matmul_flops_per_s: float, sm_count: int | None = None) -> float:
    """Seconds of matmul work in forward + backward + recompute of `ops` at `matmul_flops_per_s`, each GEMM's
    slowed by its waves on `sm_count` SMs (`wave_efficiency`)."""

    def work(op: OpCost, recomputed: bool) -> float:
        if op.flash:
            causal = op.matmul_flops * CAUSAL_FLASH_WORK / flash_occupancy(op.gemm, sm_count)
            return causal * (1 + BACKWARD_FLASH_FACTOR + recomputed)
        waves = wave_efficiencies(op.gemm, sm_count)
        forward = op.matmul_flops / waves.forward
        input_grad = op.matmul_flops / waves.input_grad
        return forward * (1 + recomputed) + input_grad + op.matmul_flops * (BACKWARD_MATMUL_FACTOR - 1)

    return sum(work(op, _recomputed(op, recompute)) for op in ops) / matmul_flops_per_s


def traffic_s(ops: list[OpCost], recompute: str, memory_bytes_per_s: float) -> float:
    """Seconds of element-wise memory traffic in forward + backward + recompute of `ops`."""
    moved = sum(op.traffic_bytes * (1 + _recomputed(op, recompute)) + backward_traffic_bytes(op) for op in ops)
    return moved / memory_bytes_per_s


def _recomputed(op: OpCost, recompute: str) -> bool:
    return recompute == "full" or (recompute == "selective" and op.attention_core)


def fit_matmul_efficiency(samples: list[tuple[float, float, float]]) -> float:
    """Least-squares matmul efficiency from measured layer times.

    Each sample is (matmul seconds at 100% of peak, seconds of everything else, measured seconds); the model
    says measured = matmul / eff + other. With x = 1/eff the relative residuals (matmul * x + other - measured)
    / measured are linear in x, so the x minimising their squares has a closed form."""
    numerator = sum(m / t * (t - o) / t for m, o, t in samples)
    denominator = sum((m / t) ** 2 for m, o, t in samples)
    if numerator <= 0:
        raise ValueError("measured times are shorter than the memory traffic and communication alone")
    return denominator / numerator
