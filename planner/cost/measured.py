"""What a HardwareProfile tells the cost model: layer times looked up or interpolated from the measured shapes, and
collective times from alpha-beta fits. Pure numpy; the fits themselves are made by profiler/fit.py.

- Collectives: time(size) = latency_s + size x busbw_factor(op, n) / bus bandwidth (Hockney 1994; Thakur,
  Rabenseifner & Gropp 2005), with nccl-tests' bus-bandwidth factors (nccl-tests doc/PERFORMANCE.md).
- Layers: forward/backward time and saved-activation bytes at the shapes a plan asks for (`LayerTable`); what
  cannot be answered soundly raises `NotMeasured`, and the caller falls back to the analytic model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from planner.cost.runtime import Runtime
    from planner.specs import (
        CollectiveFit,
        CollectiveOp,
        HardwareProfile,
        LayerKind,
        LayerMeasurement,
        ModelSpec,
        OptimizerMeasurement,
        Precision,
        Recompute,
    )

GB = 1e9  # bytes in the GB of `_GBps` (DESIGN.md "Units": 10^9 B/s)

# ------------------------------------------------------------------------------------ bus bandwidth

BUSBW_FACTORS: dict[str, Callable[[int], float]] = {
    # nccl-tests doc/PERFORMANCE.md: the factor that turns algbw (size / time) into busbw, the speed each link
    # sees, comparable across group sizes n. all_to_all: src/alltoall.cu; send_recv: src/sendrecv.cu.
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "send_recv": lambda n: 1.0,
    # One FSDP2 unit's collectives, sized as the bare ones (gathered output, scattered input).
    "fsdp_all_gather": lambda n: (n - 1) / n,
    "fsdp_reduce_scatter": lambda n: (n - 1) / n,
}


def busbw_factor(op: CollectiveOp | str, n: int) -> float:
    """busbw / algbw for `op` on a group of `n` ranks (nccl-tests doc/PERFORMANCE.md); 0 for a lone rank's
    collectives, which move nothing."""
    if op not in BUSBW_FACTORS:
        raise ValueError(f"op: unknown collective {op!r}; known: {sorted(BUSBW_FACTORS)}")
    if n < 1:
        raise ValueError(f"group_size: a group has at least one rank, got {n}")
    return BUSBW_FACTORS[op](n)


def predict_collective_s(fit: CollectiveFit, size_bytes: float) -> float:
    """The fitted alpha-beta time of one `fit.op` of `size_bytes` (nccl-tests' size: what algbw divides)."""
    if np.any(np.asarray(size_bytes) < 0):
        raise ValueError(f"size_bytes: must be >= 0, got {size_bytes}")
    factor = busbw_factor(fit.op, fit.group_size)
    return fit.latency_s + size_bytes * factor / (fit.bandwidth_GBps * GB)


# ---------------------------------------------------------------------------------------- layers

LayerKey = tuple[str, int, str, str]  # (layer, tp, dtype, recompute)
LookupMethod = Literal["measured", "interpolated", "extrapolated", "seq_fit"]

EXTRAPOLATION_LIMIT = 2.0  # this module's rule, not a measured constant: answer up to 2x the largest measured


class NotMeasured(LookupError):
    """The profile cannot answer this layer shape soundly; `field` names what is missing. Fall back to the
    analytic model."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class LayerTime:
    """One layer's measured or interpolated cost. `method` says how it was obtained (see `LayerTable`);
    `exact` is true only for a measured shape."""

    forward_s: float
    backward_s: float
    saved_bytes: int
    exact: bool
    method: LookupMethod
    # The allocator's peak over the layer's forward + backward above what was allocated before it (CUDA
    # profiles only; NaN where the profile has none).
    peak_bytes: float = float("nan")
    includes_tp_comm: bool = False  # timed on tp ranks: tensor parallelism's collectives are in the times
    contention: float = 1.0  # timed loaded: these times / the same layer's times alone (see LayerTable)


@dataclass(frozen=True)
class _Points:
    """The measured shapes of one (layer, tp, dtype, recompute): values columns are forward_s, backward_s,
    saved_bytes, peak_bytes (NaN where not measured)."""

    micro_batch_size: np.ndarray
    seq_len: np.ndarray
    values: np.ndarray

    @property
    def tokens(self) -> np.ndarray:
        return self.micro_batch_size * self.seq_len


class LayerTable:
    """Layer costs by shape, from a profile's LayerMeasurements. `lookup` answers with these rules, in order:

    1. (layer, tp, dtype, recompute) must have been measured; the exact micro_batch_size and seq_len, if
       measured, are answered as measured (`method="measured"`, `exact=True`).
    2. tokens = micro_batch_size x seq_len may be at most 2x the largest measured tokens of the group, and
       seq_len at most 2x the largest measured seq_len; beyond that raises NotMeasured.
    3. seq_len measured: at fixed seq_len times and saved bytes are linear in micro_batch_size (every op of a
       block is batched over it), so the value is piecewise linear between the measured micro-batch sizes
       (`"interpolated"`); outside them it continues the nearest segment, or scales the single point in
       proportion (`"extrapolated"`), never below 0.
    4. seq_len not measured (two distinct measured seq_lens needed, else NotMeasured): value = a x tokens +
       b x tokens x seq_len, the per-token linear part plus attention's part quadratic in seq_len (Korthikanti
       et al. 2022 sec. 4.1: activations 34sbh + 5as^2b; FLOPs 96Bslh^2(1 + s/6h + ...), Narayanan et al.
       SC'21). Fitted by least squares on the per-token value, value / tokens = a + b x seq_len, over all
       the group's points, so that small shapes weigh as much as large ones (`"seq_fit"`).

    Layers timed on tp ranks (`LayerMeasurement.tp_collectives`, times that include TP's collectives) answer for
    their sequence-parallel setting in preference to the one-device shard; the same rules apply to them.

    Layers timed loaded (`LayerMeasurement.concurrent_ranks` > 1, every rank of the node computing at once) answer
    for a plan that keeps as many ranks busy (`busy_ranks`), in preference to the same layer timed alone; their
    `contention` is the loaded time over the alone time at the same shape, so the cost model can tell the
    steady state, where every rank works, from a pipeline's fill and drain, where some wait.
    """

    def __init__(
        self,
        groups: dict[LayerKey, _Points],
        tp_groups: dict[tuple[LayerKey, bool], _Points] | None = None,
        loaded_groups: dict[tuple[LayerKey, int], _Points] | None = None,
    ):
        self._groups = groups  # one-device shards, timed alone
        self._tp_groups = tp_groups or {}  # timed on tp ranks, by (key, sequence_parallel)
        self._loaded_groups = loaded_groups or {}  # one-device shards timed loaded, by (key, concurrent_ranks)

    @classmethod
    def from_measurements(cls, layers: Iterable[LayerMeasurement]) -> LayerTable:
        """Group measurements by (layer, tp, dtype, recompute) (and, timed on tp ranks, sequence parallelism); a
        shape measured twice in a group is refused."""
        shards: dict[Any, dict[tuple[int, int], tuple[float, ...]]] = {}
        on_ranks: dict[Any, dict[tuple[int, int], tuple[float, ...]]] = {}
        loaded: dict[Any, dict[tuple[int, int], tuple[float, ...]]] = {}
        for m in layers:
            key: Any = (m.layer, m.tp, m.dtype, m.recompute)
            rows = shards
            if m.tp_collectives:
                key, rows = (key, m.sequence_parallel), on_ranks
            elif m.concurrent_ranks > 1:
                key, rows = (key, m.concurrent_ranks), loaded
            shape = (m.micro_batch_size, m.seq_len)
            group = rows.setdefault(key, {})
            if shape in group:
                raise ValueError(f"layers: {key} measured twice at micro_batch_size, seq_len = {shape}")
            peak = float("nan") if m.peak_allocated_bytes is None else m.peak_allocated_bytes
            group[shape] = (m.forward.median_s, m.backward.median_s, m.saved_bytes, peak)
        return cls(*({key: _to_points(group) for key, group in rows.items()} for rows in (shards, on_ranks, loaded)))

    def lookup(
        self,
        layer: LayerKind,
        tp: int,
        micro_batch_size: int,
        seq_len: int,
        dtype: Precision,
        recompute: Recompute,
        sequence_parallel: bool = False,
        busy_ranks: int = 1,
    ) -> LayerTime:
        """Forward and backward seconds and saved bytes of one layer at this shape, by the class's rules, with
        `busy_ranks` ranks of the node computing at once."""
        if micro_batch_size < 1 or seq_len < 1:
            raise ValueError(f"micro_batch_size, seq_len: must be >= 1, got {micro_batch_size}, {seq_len}")
        key = (layer, tp, dtype, recompute)
        on_ranks = self._tp_groups.get((key, sequence_parallel)) if tp > 1 else None
        if on_ranks is not None:
            try:
                return replace(_answer(on_ranks, micro_batch_size, seq_len), includes_tp_comm=True)
            except NotMeasured:
                if key not in self._groups:
                    raise
        alone = _answer(self._group(key), micro_batch_size, seq_len)
        loaded = self._loaded_groups.get((key, busy_ranks)) if busy_ranks > 1 else None
        if loaded is None:
            return alone
        try:
            busy = _answer(loaded, micro_batch_size, seq_len)
        except NotMeasured:
            return alone
        return replace(busy, contention=_contention(busy, alone))

    def _group(self, key: LayerKey) -> _Points:
        """The group's points, or NotMeasured naming the first of layer, tp, dtype, recompute never measured
        with the ones before it."""
        if key in self._groups:
            return self._groups[key]
        names = ("layer", "tp", "dtype", "recompute")
        depth = next(d for d in range(len(names)) if not any(k[: d + 1] == key[: d + 1] for k in self._groups))
        options = sorted({k[depth] for k in self._groups if k[:depth] == key[:depth]}, key=str)
        given = "".join(f", {n}={v!r}" for n, v in zip(names[:depth], key[:depth], strict=True))
        message = f"no layer measurement with {names[depth]}={key[depth]!r}{given}; measured: {options}"
        raise NotMeasured(names[depth], message)


def _answer(points: _Points, micro_batch_size: int, seq_len: int) -> LayerTime:
    """LayerTable rules 1-4 over one group's points."""
    measured = (points.micro_batch_size == micro_batch_size) & (points.seq_len == seq_len)
    if measured.any():
        return _layer_time(points.values[np.argmax(measured)], "measured")
    _check_in_range(points, micro_batch_size, seq_len)
    at_seq_len = points.seq_len == seq_len
    if at_seq_len.any():
        values, extrapolated = _along_micro_batch(
            points.micro_batch_size[at_seq_len], points.values[at_seq_len], micro_batch_size
        )
        return _layer_time(values, "extrapolated" if extrapolated else "interpolated")
    return _layer_time(_seq_fit(points, micro_batch_size, seq_len), "seq_fit")


def _contention(loaded: LayerTime, alone: LayerTime) -> float:
    """How many times longer a layer's forward + backward takes loaded than alone; 1 where alone took no time."""
    alone_s = alone.forward_s + alone.backward_s
    return (loaded.forward_s + loaded.backward_s) / alone_s if alone_s > 0 else 1.0


def _to_points(group: dict[tuple[int, int], tuple[float, ...]]) -> _Points:
    shapes = np.array(list(group), dtype=float)
    return _Points(shapes[:, 0], shapes[:, 1], np.array(list(group.values()), dtype=float))


def _layer_time(values: np.ndarray, method: LookupMethod) -> LayerTime:
    forward_s, backward_s, saved_bytes, peak_bytes = (float(v) for v in values)
    return LayerTime(forward_s, backward_s, round(saved_bytes), method == "measured", method, peak_bytes=peak_bytes)


def _check_in_range(points: _Points, micro_batch_size: int, seq_len: int) -> None:
    """LayerTable rule 2: no more than EXTRAPOLATION_LIMIT x the largest measured tokens and seq_len."""
    tokens, largest_tokens = micro_batch_size * seq_len, float(points.tokens.max())
    if tokens > EXTRAPOLATION_LIMIT * largest_tokens:
        raise NotMeasured(
            "tokens",
            f"micro_batch_size x seq_len = {tokens} tokens is beyond {EXTRAPOLATION_LIMIT:g}x the largest "
            f"measured ({largest_tokens:.0f})",
        )
    largest_seq_len = float(points.seq_len.max())
    if seq_len > EXTRAPOLATION_LIMIT * largest_seq_len:
        raise NotMeasured(
            "seq_len",
            f"seq_len {seq_len} is beyond {EXTRAPOLATION_LIMIT:g}x the largest measured ({largest_seq_len:.0f})",
        )


def _along_micro_batch(
    micro_batch_sizes: np.ndarray, values: np.ndarray, micro_batch_size: int
) -> tuple[np.ndarray, bool]:
    """LayerTable rule 3: piecewise linear in micro_batch_size at one seq_len; (values, extrapolated)."""
    order = np.argsort(micro_batch_sizes)
    x, y = micro_batch_sizes[order], values[order]
    if len(x) == 1:
        return y[0] * (micro_batch_size / x[0]), True
    if x[0] <= micro_batch_size <= x[-1]:
        return np.array([np.interp(micro_batch_size, x, column) for column in y.T]), False
    near, far = (0, 1) if micro_batch_size < x[0] else (-1, -2)
    slope = (y[near] - y[far]) / (x[near] - x[far])
    return np.maximum(y[near] + slope * (micro_batch_size - x[near]), 0.0), True


def _seq_fit(points: _Points, micro_batch_size: int, seq_len: int) -> np.ndarray:
    """LayerTable rule 4: value / tokens = a + b x seq_len, least squares over the group, evaluated here."""
    if len(np.unique(points.seq_len)) < 2:
        raise NotMeasured(
            "seq_len",
            f"seq_len {seq_len} not measured, and one measured seq_len "
            f"({points.seq_len[0]:.0f}) cannot tell the linear from the quadratic part",
        )
    per_token = points.values / points.tokens[:, None]
    unmeasured = np.isnan(per_token).any(axis=0)  # peak_bytes of a profile that has none: stays NaN
    slope, intercept = np.polyfit(points.seq_len, np.nan_to_num(per_token), 1)
    fitted = np.maximum(micro_batch_size * seq_len * (intercept + slope * seq_len), 0.0)
    return np.where(unmeasured, np.nan, fitted)


# ------------------------------------------------------------------------------------ profile costs


@dataclass(frozen=True)
class MeasuredLayer:
    """A layer's forward and backward seconds from a profile (backward includes any recompute), and its saved and
    peak bytes: numbers, or arrays over the micro-batch sizes asked for, NaN where `missing` (the profile cannot
    answer that size); `peak_bytes` is NaN too where the profile measured no allocator peak (CPU)."""

    forward_s: np.ndarray | float
    backward_s: np.ndarray | float
    missing: np.ndarray | bool = False
    reason: NotMeasured | None = None  # why the first missing size is missing
    includes_tp_comm: np.ndarray | bool = False  # per size: timed on tp ranks, TP's collectives included
    contention: np.ndarray | float = 1.0  # per size: loaded time / alone time (LayerTable), 1 where not loaded
    saved_bytes: np.ndarray | float = np.nan
    peak_bytes: np.ndarray | float = np.nan

    @property
    def complete(self) -> bool:
        return not np.any(self.missing)


def layer_shape(model: ModelSpec) -> dict[str, Any]:
    """What a layer's time depends on: every width and kind of a layer, not how many layers there are."""
    return {
        "hidden_size": model.hidden_size, "num_attention_heads": model.num_attention_heads,
        "num_kv_heads": model.kv_heads, "head_dim": model.head_size, "ffn_hidden_size": model.ffn_size,
        "vocab_size": model.vocab_size, "mlp": model.mlp, "norm": model.norm, "num_experts": model.num_experts,
        "experts_per_token": model.experts_per_token, "qkv_bias": model.qkv_bias, "linear_bias": model.linear_bias,
        "tie_embeddings": model.tie_embeddings, "position_embedding": model.position_embedding,
        "dropout": model.dropout,
    }  # fmt: skip


def other_layer_shapes(measured: ModelSpec | None, model: ModelSpec | None) -> str | None:
    """Why a profile's layer times do not describe `model`'s layers, or None when they do (or either is unknown:
    profiles written before they named their model)."""
    if measured is None or model is None:
        return None
    mine, theirs = layer_shape(model), layer_shape(measured)
    differ = [field for field in mine if mine[field] != theirs[field]]
    if not differ:
        return None
    name = measured.name or "another model"
    shown = ", ".join(f"{field} {theirs[field]} (not {mine[field]})" for field in differ)
    return f"the profile's layers were measured on {name}, of other layer shapes: {shown}"


class ProfileCosts:
    """A HardwareProfile as the cost model reads it: layer times (`layer`), the optimizer's time per parameter
    and collective channels from the alpha-beta fits. Each answers None where the profile cannot, and the caller
    uses the analytic model for that term; `misses` keeps why, for the estimate's assumptions.

    A calibrated profile (`profile.calibration`, fitted by planner/calibration.py) answers with its factors
    applied: measured seconds / the class's efficiency, collective fits at the tier's efficiency."""

    def __init__(self, profile: HardwareProfile, model: ModelSpec | None = None):
        """`model`: the model the costs are for. A profile whose layers were measured on a model of other layer
        shapes answers no layer time (NotMeasured says whose they are); its device measurements still hold."""
        self.profile = profile
        self.other_model = other_layer_shapes(profile.model, model)
        layers = [] if self.other_model else profile.layers
        self.table = LayerTable.from_measurements(layers)
        # A CUDA profile holds each layer's allocator peak: the cost model then takes activation memory from the
        # profile, as the profiler's stack (the executor's) holds it (planner/cost/layers.py `layer_memory`).
        self.measures_memory = any(m.peak_allocated_bytes is not None for m in layers)
        self.fits: dict[tuple[str, str, int], CollectiveFit] = {
            (fit.op, fit.tier, fit.group_size): fit for fit in profile.collective_fits
        }
        # FSDP2 units' collectives timed as training issues them (profiler/collectives.py): their fits hold the hooks'
        # host work around the collectives, which the analytic model otherwise adds (planner/cost/data.py).
        self.times_fsdp_units = any(fit.op.startswith("fsdp_") for fit in profile.collective_fits)
        self.optimizers: dict[tuple[str, int, bool], OptimizerMeasurement] = {
            (m.optimizer, m.concurrent_ranks, m.sharded): m for m in profile.optimizer
        }
        calibration = profile.calibration
        self.compute_efficiency = dict(calibration.compute_efficiency) if calibration else {}
        self.collective_efficiency = dict(calibration.collective_efficiency) if calibration else {}
        self.collective_latency_efficiency = dict(calibration.collective_latency_efficiency) if calibration else {}
        # A calibration's fitted overlap, else the one measured; None: neither (`hidden_share`).
        self.overlap: float | None = calibration.overlap if calibration else profile.comm_compute_overlap
        self.microbatch_overhead_s = calibration.microbatch_overhead_s if calibration else 0.0
        waits: dict[int, list[float]] = {}
        for wait in profile.meeting_waits:
            waits.setdefault(wait.micro_batch_size, []).append(wait.wait_s)
        self.meeting_waits = {size: float(np.mean(values)) for size, values in sorted(waits.items())}
        self.step_overhead_s = calibration.step_overhead_s if calibration else 0.0

    def layer(
        self,
        kind: LayerKind,
        tp: int,
        micro_batch_sizes: Any,
        seq_len: int,
        dtype: Precision,
        recompute: Recompute,
        sequence_parallel: bool = False,
        busy_ranks: int = 1,
    ) -> MeasuredLayer | NotMeasured:
        """The layer's times at every micro-batch size of `micro_batch_sizes` (a number or an array, each size
        answered on its own) with `busy_ranks` ranks of the node computing at once, or, when the profile answers
        none of them, the NotMeasured that says why."""
        if self.other_model:
            return NotMeasured("cluster.profile", self.other_model)
        sizes = np.atleast_1d(np.asarray(micro_batch_sizes))
        times = np.full((len(sizes), 2), np.nan)
        memory = np.full((len(sizes), 2), np.nan)  # saved_bytes, peak_bytes
        with_tp_comm = np.zeros(len(sizes), dtype=bool)
        contention = np.ones(len(sizes))
        reasons: list[NotMeasured] = []
        for row, size in enumerate(sizes):
            try:
                found = self.table.lookup(kind, tp, int(size), seq_len, dtype, recompute, sequence_parallel, busy_ranks)
            except NotMeasured as missing:
                reasons.append(missing)
                continue
            times[row] = (
                found.forward_s / self.compute_efficiency.get("forward", 1.0),
                found.backward_s / self.compute_efficiency.get("backward", 1.0),
            )
            with_tp_comm[row], contention[row] = found.includes_tp_comm, found.contention
            memory[row] = found.saved_bytes, found.peak_bytes
        missing = np.isnan(times[:, 0])
        if missing.all():
            return reasons[0]
        reason = reasons[0] if reasons else None
        if np.ndim(micro_batch_sizes) == 0:
            return MeasuredLayer(
                float(times[0, 0]), float(times[0, 1]), includes_tp_comm=bool(with_tp_comm[0]),
                contention=float(contention[0]), saved_bytes=float(memory[0, 0]), peak_bytes=float(memory[0, 1]),
            )  # fmt: skip
        return MeasuredLayer(
            times[:, 0], times[:, 1], missing, reason, with_tp_comm, contention, memory[:, 0], memory[:, 1]
        )

    def optimizer_s_per_param(self, optimizer: str, busy_ranks: int = 1, sharded: bool = False) -> float | None:
        """Seconds per parameter of one optimizer step (clip + step + zero_grad) with `busy_ranks` ranks of the
        node stepping at once (timed so, else alone), on DTensor shards if `sharded` (timed so, else on plain
        tensors), or None if not measured."""
        tried = [(optimizer, busy_ranks, sharded), (optimizer, busy_ranks, False), (optimizer, 1, False)]
        measured = next((self.optimizers[key] for key in tried if key in self.optimizers), None)
        if measured is None:
            return None
        return measured.time.median_s / measured.num_params / self.compute_efficiency.get("optimizer", 1.0)

    def meeting_wait_s(self, micro_batch_sizes: Any) -> np.ndarray:
        """Seconds a rank waits for its peers per meeting (profiler/meeting_wait.py), for each micro-batch size of
        `micro_batch_sizes`: as measured at the nearest measured size (by ratio; a rank's compute between meetings,
        and so its variation, grows with the micro-batch), the mean over the shapes measured at it; 0 where the
        profile measured none."""
        sizes = np.asarray(micro_batch_sizes, dtype=float)
        if not self.meeting_waits:
            return np.zeros_like(sizes)
        measured = np.array(list(self.meeting_waits), dtype=float)
        waits = np.array(list(self.meeting_waits.values()))
        nearest = np.abs(np.log(sizes[..., None] / measured)).argmin(axis=-1)
        return waits[nearest]

    def channel_fit(self, op: CollectiveOp | str, tier: str, group_size: int) -> CollectiveFit | None:
        """The fit of `op` on `tier` at `group_size`, else at the nearest measured group size of that tier (bus
        bandwidth is defined to be comparable across group sizes, nccl-tests doc/PERFORMANCE.md); None if the
        profile has no fit of `op` on `tier`. A calibrated profile answers at its tier's bandwidth and latency
        efficiencies."""
        sizes = [n for (o, t, n) in self.fits if o == op and t == tier]
        if not sizes:
            return None
        nearest = min(sizes, key=lambda n: (abs(np.log(n / group_size)), n))
        fit = self.fits[(op, tier, nearest)]
        bandwidth = self.collective_efficiency.get(tier, 1.0)  # type: ignore[call-overload]
        latency = self.collective_latency_efficiency.get(tier, 1.0)  # type: ignore[call-overload]
        if bandwidth == 1.0 and latency == 1.0:
            return fit
        return fit.model_copy(
            update={"latency_s": fit.latency_s / latency, "bandwidth_GBps": fit.bandwidth_GBps * bandwidth}
        )

    def device_mismatch(self, gpu_kind: str, gpu_name: str) -> str | None:
        """Why this profile does not describe the request's GPU, or None when it does. A CPU profile serves the
        `cpu` device; a CUDA profile serves a GPU preset whose family (the name's first part, e.g. "h100") is a
        word of the measured device's name ("l4" is not "L40S"), PCIe parts only PCIe presets."""
        measured = self.profile.device_name
        if (gpu_kind == "cpu") != (self.profile.device_kind == "cpu"):
            kind = self.profile.device_kind
            return f"the profile was measured on {kind} ({measured}), the cluster's gpu is {gpu_name}"
        if gpu_kind == "cpu":
            return None
        family = gpu_name.split("-")[0].lower()
        words = set(re.split(r"[^a-z0-9]+", measured.lower()))  # "NVIDIA A100-SXM4-80GB" -> nvidia, a100, ...
        if family not in words or ("pcie" in words) != ("pcie" in gpu_name.lower()):
            return f"the profile was measured on {measured!r}, not on a {gpu_name}"
        return None


# ------------------------------------------------------------------------------- terms of a step from a profile


def meeting_wait_s(measured: ProfileCosts | None, micro_batch_size: np.ndarray) -> np.ndarray:
    """Seconds a rank waits for the latest of its peers each time they meet (profiler/meeting_wait.py), at each
    row's micro-batch size; 0 without a profile that measured it. (N, 1)."""
    if measured is None:
        return np.zeros_like(micro_batch_size, dtype=float)
    return measured.meeting_wait_s(micro_batch_size)


def hidden_share(measured: ProfileCosts | None, runtime: Runtime) -> float:
    """The share of an overlappable collective's time that runs hide behind compute: fitted by a calibration, else
    measured by the profile (profiler/collectives.py measure_overlap), else the stack's on its device
    (Runtime.overlap_hidden_share)."""
    if measured is not None and measured.overlap is not None:
        return measured.overlap
    return runtime.overlap_hidden_share


def step_overhead_s(measured: ProfileCosts | None) -> float:
    """Framework seconds per step beyond what its layers, collectives and optimizer account for, fitted by a
    calibrated profile (planner/calibration.py); 0 otherwise."""
    return 0.0 if measured is None else measured.step_overhead_s


def microbatch_overhead_s(measured: ProfileCosts | None) -> float:
    """Framework seconds per micro-batch on each device beyond its layers' time, fitted by a calibrated profile
    (planner/calibration.py); 0 otherwise. It lies on the micro-batch's critical path, so it adds to the busy
    time the pipeline bubble is made of."""
    return 0.0 if measured is None else measured.microbatch_overhead_s
