"""Kernel sweep: what this device's matmuls and fused attention reach at the shapes training runs them, and the
host's time per kernel under the executor's own block, to set beside what the cost model's GPU presets predict
(planner/kernel_check.py).

- GEMMs: `torch.mm` of a rows x inner by an inner x cols matrix for every rows (tokens of a micro-batch) and every
  width h of the grid, as a transformer's linear layers have them: h -> h (attention output), h -> 4h (MLP up),
  4h -> h (MLP down).
- Attention: torch's `scaled_dot_product_attention(is_causal=True)`, the kernel the executor's attention calls
  (executor/models), forward and backward, for every (heads, seq_len) of the grid.
- The host floor: the executor's block of the profiled architecture narrowed until its kernels take a few
  microseconds each (`narrow_for_host_floor`), timed inside a small model as the compute profile times blocks
  (profiler/compute.py `time_in_model`). On a GPU the CUDA events then measure how long the host took to issue the
  pass; on a CPU, which runs its kernels itself, the time of the tiny kernels and their dispatch together.

Each measurement is the median of `repeats` timings after `warmup` untimed ones (profiler/timing.py).

torch is imported inside the functions, so the CLI can check a sweep without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from planner.specs import ModelSpec, Precision
from planner.specs.kernels import AttentionMeasurement, GemmMeasurement, HostFloorMeasurement, KernelProfile
from profiler.compute import ComputeSweep, ComputeSweepError, ModelRun, Progress, no_gc_pauses, time_in_model
from profiler.environment import device_name, software_versions, utc_now
from profiler.timing import stats, time_repeats

if TYPE_CHECKING:
    import torch

# The widths of a transformer's linear layers of hidden size h, as (inner, cols) multiples of h: attention output
# h -> h, MLP up h -> 4h, MLP down 4h -> h (a GELU MLP's 4h; Vaswani et al. 2017).
LINEAR_WIDTHS = ((1, 1), (1, 4), (4, 1))
# The host-floor block: two heads of 32 and an MLP of twice the width over 16 tokens, small enough that each of
# its kernels takes a few microseconds on any GPU, so the host's issue time is what the pass takes.
HOST_FLOOR_HEAD_DIM = 32
HOST_FLOOR_HEADS = 2
HOST_FLOOR_SEQ_LEN = 16
HOST_FLOOR_BLOCKS = 4  # blocks of the small model the host floor is timed in (the compute profile's default)

# Default grids per device: a GPU's spans the shapes of 1B-70B models' layers; a CPU's is a quick smoke test.
DEFAULT_GRIDS: dict[str, dict[str, tuple[int, ...]]] = {
    "cuda": {
        "gemm_rows": (512, 2048, 8192, 32768),
        "widths": (1024, 2048, 4096, 8192),
        "attention_heads": (4, 32),
        "attention_seq_lens": (1024, 2048, 4096, 8192, 16384),
    },
    "cpu": {"gemm_rows": (64, 256), "widths": (128, 256), "attention_heads": (2,), "attention_seq_lens": (128, 256)},
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class KernelSweepError(ComputeSweepError):
    """A kernel sweep that cannot be measured; `field` names the setting at fault."""


@dataclass(frozen=True)
class KernelSweep:
    """What to measure (module docstring). `model` is the architecture whose narrowed block sets the host floor."""

    model: ModelSpec
    device: str = "cpu"
    dtype: Precision = "fp32"
    gemm_rows: tuple[int, ...] = DEFAULT_GRIDS["cpu"]["gemm_rows"]
    widths: tuple[int, ...] = DEFAULT_GRIDS["cpu"]["widths"]
    attention_heads: tuple[int, ...] = DEFAULT_GRIDS["cpu"]["attention_heads"]
    attention_seq_lens: tuple[int, ...] = DEFAULT_GRIDS["cpu"]["attention_seq_lens"]
    head_dim: int = 128
    warmup: int = 3
    repeats: int = 10

    @classmethod
    def for_device(cls, model: ModelSpec, device: str, **settings: Any) -> KernelSweep:
        """The sweep with `device`'s default grids, any setting given (not None) replacing its default."""
        grid = DEFAULT_GRIDS.get(device, DEFAULT_GRIDS["cpu"])
        given = {name: value for name, value in settings.items() if value is not None}
        return cls(model=model, device=device, **(grid | given))

    def violations(self) -> list[tuple[str, str]]:
        """(field, reason) for everything that makes the sweep unmeasurable, without importing torch."""
        lists = {name: getattr(self, name) for name in ("gemm_rows", "widths", "attention_heads", "attention_seq_lens")}
        found = [(name, "needs at least one value") for name, values in lists.items() if not values]
        found += [(name, f"must be >= 1, got {v}") for name, values in lists.items() for v in values if v < 1]
        if self.device not in ("cpu", "cuda"):
            found.append(("device", f"must be cpu or cuda, got {self.device!r}"))
        if self.dtype not in DTYPES:
            found.append(("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}"))
        elif self.device == "cpu" and self.dtype != "fp32":
            found.append(("dtype", "the CPU sweep runs fp32: the executor trains in fp32 there"))
        for name, minimum in (("head_dim", 1), ("warmup", 0), ("repeats", 1)):
            if getattr(self, name) < minimum:
                found.append((name, f"must be >= {minimum}, got {getattr(self, name)}"))
        return found

    def gemm_shapes(self) -> list[tuple[int, int, int]]:
        """(rows, cols, inner) of every GEMM of the sweep."""
        return [
            (rows, width * out, width * into)
            for rows in self.gemm_rows
            for width in self.widths
            for into, out in LINEAR_WIDTHS
        ]

    def attention_shapes(self) -> list[tuple[int, int]]:
        """(heads, seq_len) of every attention of the sweep, one sequence each."""
        return [(heads, seq) for heads in self.attention_heads for seq in self.attention_seq_lens]

    @property
    def points(self) -> int:
        """Measurements in all: the GEMMs, the attentions and the host floor."""
        return len(self.gemm_shapes()) + len(self.attention_shapes()) + 1


def narrow_for_host_floor(model: ModelSpec) -> ModelSpec:
    """`model`'s architecture (MLP, norm, positions, biases, experts, grouped-query attention) at the host-floor
    width (`HOST_FLOOR_HEADS` heads of `HOST_FLOOR_HEAD_DIM`): the same kernels per block, each a few
    microseconds long."""
    grouped = model.kv_heads < model.num_attention_heads
    hidden = HOST_FLOOR_HEADS * HOST_FLOOR_HEAD_DIM
    narrowed = model.model_dump() | {
        "name": f"{model.name or 'model'} narrowed for the host floor",
        "num_layers": HOST_FLOOR_BLOCKS,
        "hidden_size": hidden,
        "num_attention_heads": HOST_FLOOR_HEADS,
        "num_kv_heads": 1 if grouped else HOST_FLOOR_HEADS,
        "head_dim": HOST_FLOOR_HEAD_DIM,
        "ffn_hidden_size": 2 * hidden,
        "vocab_size": 128,
        "max_position_embeddings": HOST_FLOOR_SEQ_LEN if model.position_embedding == "learned" else None,
    }
    return ModelSpec.model_validate(narrowed)


def profile_kernels(sweep: KernelSweep, on_progress: Progress | None = None) -> KernelProfile:
    """Measure every point of `sweep` on this machine."""
    import torch

    device = _open_device(sweep)
    dtype = getattr(torch, DTYPES[sweep.dtype])
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, sweep.points, what)

    gemms = []
    for rows, cols, inner in sweep.gemm_shapes():
        time = _time_gemm(rows, cols, inner, sweep, dtype, device)
        gemms.append(GemmMeasurement(rows=rows, cols=cols, inner=inner, time=time))
        tick(f"gemm {rows} x {inner} x {cols}")
    attention = []
    for heads, seq in sweep.attention_shapes():
        attention.append(_time_attention(heads, seq, sweep, dtype, device))
        tick(f"attention {heads} heads x {seq} tokens")
    host_floor = measure_host_floor(sweep, device)
    tick("host floor")
    versions = software_versions(nccl=False)
    return KernelProfile(
        device_kind="cuda" if device.type == "cuda" else "cpu",
        device_name=device_name(device),
        torch_version=versions["torch_version"],
        cuda_version=versions["cuda_version"],
        created=utc_now(),
        dtype=sweep.dtype,
        gemms=gemms,
        attention=attention,
        host_floor=host_floor,
    )


def _open_device(sweep: KernelSweep) -> torch.device:
    import torch

    problems = sweep.violations()
    if problems:
        raise KernelSweepError(problems[0][0], "; ".join(f"{name}: {why}" for name, why in problems))
    if sweep.device == "cuda" and not torch.cuda.is_available():
        raise KernelSweepError("device", "--device cuda was asked, but torch sees no CUDA GPU on this machine")
    return torch.device(sweep.device)


def _time_gemm(rows: int, cols: int, inner: int, sweep: KernelSweep, dtype: Any, device: torch.device) -> Any:
    import torch

    a = torch.randn(rows, inner, dtype=dtype, device=device)
    b = torch.randn(inner, cols, dtype=dtype, device=device)
    with no_gc_pauses():
        samples = time_repeats(lambda: torch.mm(a, b), warmup=sweep.warmup, repeats=sweep.repeats, device=device)
    return stats(samples)


def _time_attention(heads: int, seq: int, sweep: KernelSweep, dtype: Any, device: torch.device) -> AttentionMeasurement:
    """Forward alone, then backward alone: each backward repeat runs from a forward done (untimed) just before."""
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, heads, seq, sweep.head_dim, dtype=dtype, device=device, requires_grad=True)
               for _ in range(3))  # fmt: skip
    grad = torch.randn(1, heads, seq, sweep.head_dim, dtype=dtype, device=device)
    graph: dict[str, torch.Tensor] = {}

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fresh_forward() -> None:
        graph["out"] = forward()

    with no_gc_pauses():
        forward_s = time_repeats(forward, warmup=sweep.warmup, repeats=sweep.repeats, device=device)
        backward_s = time_repeats(lambda: graph.pop("out").backward(grad), warmup=sweep.warmup,
                                  repeats=sweep.repeats, device=device, before_each=fresh_forward)  # fmt: skip
    return AttentionMeasurement(batch=1, heads=heads, seq_len=seq, head_dim=sweep.head_dim,
                                forward=stats(forward_s), backward=stats(backward_s))  # fmt: skip


def measure_host_floor(sweep: KernelSweep, device: torch.device) -> HostFloorMeasurement:
    """The narrowed block (`narrow_for_host_floor`) timed inside a small model of the executor, without recompute,
    in the sweep's dtype (autocast over fp32 weights on a GPU, as the trainer runs 16-bit precisions)."""
    model = narrow_for_host_floor(sweep.model)
    compute = ComputeSweep(model=model, seq_lens=(HOST_FLOOR_SEQ_LEN,), micro_batch_sizes=(1,),
                           recompute_modes=("none",), dtype=sweep.dtype, device=sweep.device, warmup=sweep.warmup,
                           repeats=sweep.repeats, model_blocks=HOST_FLOOR_BLOCKS)  # fmt: skip
    run = ModelRun(tp=1, micro_batch_size=1, seq_len=HOST_FLOOR_SEQ_LEN, recompute="none", with_edges=False)
    samples = time_in_model(compute, run, device)
    return HostFloorMeasurement(
        model=model,
        seq_len=HOST_FLOOR_SEQ_LEN,
        micro_batch_size=1,
        forward=stats(samples.forward["block"]),
        backward=stats(samples.backward["block"]),
    )
