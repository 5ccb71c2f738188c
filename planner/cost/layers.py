"""ModelSpec -> LayerCost records: the three kinds of layer, and the layers in execution order.

LayerCost is declarative: what one layer costs one GPU for one micro-batch under a plan. The cost model
fills it from FLOPs and bytes (planner/cost/); the profiler fills the same fields with measurements, so a
prediction and a measurement compare field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from planner.cost import comm, ops, params
from planner.cost.compute import Speeds, host_slack_s, pass_device_and_host_s, recompute_s
from planner.cost.context import ring_attention_s
from planner.cost.measured import MeasuredLayer, ProfileCosts, hidden_share
from planner.cost.runtime import Runtime, runtime_for
from planner.layout import placement
from planner.specs import ClusterSpec, ModelSpec, ParallelPlan, Precision, TrainingSpec

LayerKind = Literal["embedding", "block", "head"]


@dataclass(frozen=True)
class LayerCost:
    """One layer, one GPU, one micro-batch. Times in seconds, memory in bytes."""

    name: str
    kind: LayerKind
    params: params.ParamCount  # whole-layer counts; per GPU = params.per_gpu(tp)
    forward_flops: float  # this GPU's share
    forward_s: float
    backward_s: float
    recompute_s: float  # forward work repeated during backward
    tp_comm_s: float  # tensor-parallel collectives, forward + backward (+ recompute), not overlapped
    # What context parallelism adds beyond the attention compute (planner/cost/context.py): ring hops not hidden
    # behind it and the merging of partial results, forward + backward (+ recompute).
    cp_comm_s: float
    saved_bytes: float  # kept from forward to backward under the plan's recompute mode
    working_bytes: float  # rematerialised for this layer's backward (recompute), alive one layer at a time
    # Held once per layer through the step, whatever the micro-batches in flight (autocast's cached weights).
    cached_bytes: float = 0.0
    time_source: str = "analytic"  # "profile" when forward/backward/recompute came from a HardwareProfile
    time_note: str | None = None  # why a profile could not supply the times, when one was attached
    # forward/backward/recompute are the times with every rank of the node busy; alone, the layer takes them
    # divided by this (the ratio a profile measured where it timed the layer both ways, else 1: none known).
    contention: float = 1.0
    # Parameters whose gradient each tp rank holds as a partial sum, reduced once per step (`sp_partial_params`).
    partial_grad_params: float = 0.0
    # Host time the forward and backward passes could take beyond their kernels' launches before the device
    # waits (compute.py `host_slack_s`): where the stack's per-layer host work hides. 0 for measured times.
    forward_slack_s: float = 0.0
    backward_slack_s: float = 0.0

    @property
    def busy_s(self) -> float:
        """Time this layer keeps its GPU busy per micro-batch."""
        return self.forward_s + self.backward_s + self.recompute_s + self.tp_comm_s + self.cp_comm_s


@dataclass(frozen=True)
class LayerKinds:
    """The three kinds of layer a decoder-only model has, costed once each: every block is identical."""

    embedding: LayerCost
    block: LayerCost
    head: LayerCost


def layer_kinds(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    plan: ParallelPlan,
    micro_batch_sizes: np.ndarray | None = None,
    measured: ProfileCosts | None = None,
    runtime: Runtime | None = None,
) -> LayerKinds:
    """Costs depend on the plan only through tp, cp, ep (a MoE rank casts only its own experts' weights),
    sequence_parallel, micro_batch_size and recompute (the tp and cp groups are the innermost axes of the rank
    layout, so their placement ignores dp and pp).

    `micro_batch_sizes` (an array) replaces the plan's micro-batch size: every cost field then holds one
    value per size, which is how the search costs all micro-batch sizes in one call. `measured`: the request's
    profile (planner/request.py), whose times replace the analytic ones where it has them; `runtime`: the training
    stack's regime (its host time per kernel, what its selective recompute keeps), by default the request's own
    (`runtime_for`)."""
    ctx = LayerContext.of(model, training, cluster, plan, micro_batch_sizes, measured, runtime)
    return LayerKinds(
        embedding=embedding_cost(model, plan, ctx),
        block=block_cost(model, training, plan, ctx),
        head=head_cost(model, plan, ctx),
    )


def layer_kinds_by_recompute(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    plan: ParallelPlan,
    recompute_modes: list[str],
    micro_batch_sizes: np.ndarray | None = None,
    measured: ProfileCosts | None = None,
    runtime: Runtime | None = None,
) -> dict[str, LayerKinds]:
    """`layer_kinds` of `plan` under each of `recompute_modes` (its own `recompute` ignored), as many calls to it
    would answer, at a fraction of their cost: the embedding and the head are never recomputed, so they are costed
    once, and the blocks of every mode share one context, one list of ops and its forward and backward passes (the
    mode changes only what is recomputed and kept). The search costs every layer group this way."""
    ctx = LayerContext.of(model, training, cluster, plan, micro_batch_sizes, measured, runtime)
    embedding, head = embedding_cost(model, plan, ctx), head_cost(model, plan, ctx)
    block = ops.block_ops(model, training, ctx.shape)
    return {
        mode: LayerKinds(
            embedding=embedding,
            block=block_cost(model, training, plan.model_copy(update={"recompute": mode}), ctx, block),
            head=head,
        )
        for mode in recompute_modes
    }


def layers_in_order(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    plan: ParallelPlan,
    measured: ProfileCosts | None = None,
    runtime: Runtime | None = None,
) -> list[LayerCost]:
    """embedding, block.0, ..., block.{L-1}, head: every block is the one costed block, named by its index."""
    kinds = layer_kinds(model, training, cluster, plan, measured=measured, runtime=runtime)
    blocks = [replace(kinds.block, name=f"block.{i}") for i in range(model.num_layers)]
    return [kinds.embedding, *blocks, kinds.head]


@dataclass(frozen=True)
class LayerTimes:
    """A layer's seconds (numbers, or arrays over micro-batch sizes) and where they came from."""

    forward_s: Any
    backward_s: Any
    recompute_s: Any
    source: str
    note: str | None
    includes_tp_comm: Any = False  # per micro-batch size: measured on tp ranks, TP's collectives included
    contention: Any = 1.0  # per micro-batch size: loaded / alone times (LayerCost.contention)
    # Per micro-batch size, from a profile that measured the allocator (CUDA); NaN where it did not.
    saved_bytes: Any = np.nan
    peak_bytes: Any = np.nan
    # Host slack of the forward and backward passes (LayerCost.forward_slack_s): analytic times only.
    forward_slack_s: Any = 0.0
    backward_slack_s: Any = 0.0

    def tp_comm_s(self, collectives_s: Any) -> Any:
        """The layer's TP collective seconds: `collectives_s` (from the fits or the preset's links), or none where
        the measured times already hold them."""
        included = np.asarray(self.includes_tp_comm)
        if not included.any():
            return collectives_s
        left = np.where(included, 0.0, collectives_s)
        return float(left) if left.ndim == 0 else left


@dataclass(frozen=True)
class LayerContext:
    """What every layer's cost needs from the request: local shapes, GPU speeds, TP and CP channels."""

    shape: ops.Shape
    speeds: Speeds
    tp_channel: comm.Channel
    cp_channel: comm.Channel
    activation_bytes: float  # one [tokens, hidden] activation in full (what a TP collective moves)
    measured: ProfileCosts | None  # the request's profile, if it names one
    micro_batch_sizes: Any  # the plan's micro-batch size, or the array the search costs at once
    seq_len: int
    dtype: Precision
    sequence_parallel: bool
    busy_ranks: int  # ranks of a node computing at once: every plan of a cluster keeps all its GPUs busy
    selective_recompute: ops.SelectivePolicy  # what the stack's "selective" recompute keeps (Runtime)
    overlap_hidden_share: float  # the share of an overlapped transfer that hides (planner/cost/measured.py)
    # Analytic forward and backward passes by (layer kind, backward): one kind's ops are the same under every
    # recompute mode, and a context serves one model, training setup and plan shape (`layer_kinds_by_recompute`).
    _passes: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(
        cls,
        model: ModelSpec,
        training: TrainingSpec,
        cluster: ClusterSpec,
        plan: ParallelPlan,
        micro_batch_sizes: np.ndarray | None = None,
        measured: ProfileCosts | None = None,
        runtime: Runtime | None = None,
    ) -> LayerContext:
        runtime = runtime or runtime_for(cluster, measured, training.framework)
        shape = ops.Shape.of(
            model, training, plan, micro_batch_sizes, cpu=cluster.gpu.kind == "cpu", rotary=runtime.rotary,
            weight_cast_bytes=runtime.weight_cast_bytes(training.precision), fused_rms_norm=runtime.fused_rms_norm,
            cross_entropy=runtime.cross_entropy,
        )  # fmt: skip
        return cls(
            shape=shape,
            speeds=Speeds.of(
                cluster.gpu, training.precision, runtime.host_s_per_kernel, runtime.host_s_per_backward_kernel
            ),
            selective_recompute=runtime.selective_recompute,
            overlap_hidden_share=hidden_share(measured, runtime),
            tp_channel=comm.group_channel(cluster, placement("tp", plan.degrees, cluster.gpus_per_node), measured),
            cp_channel=comm.p2p_channel(cluster, placement("cp", plan.degrees, cluster.gpus_per_node), measured),
            activation_bytes=shape.elem * shape.tokens * model.hidden_size,
            measured=measured,
            micro_batch_sizes=plan.micro_batch_size if micro_batch_sizes is None else micro_batch_sizes,
            seq_len=training.seq_len,
            dtype=training.precision,
            sequence_parallel=plan.sequence_parallel,
            busy_ranks=busy_ranks_per_node(cluster),
        )

    def layer_times(self, kind: LayerKind, layer_ops: list[ops.OpCost], tp: int, recompute: str) -> LayerTimes:
        """Forward, backward and recompute seconds of a layer: measured, when the cluster's profile has this
        layer at this shape (its backward then includes the recompute), else from the roofline over `layer_ops`."""
        analytic = LayerTimes(
            forward_s=self._pass_s(kind, layer_ops, backward=False),
            backward_s=self._pass_s(kind, layer_ops, backward=True),
            recompute_s=self._recompute_s(kind, layer_ops, recompute),
            source="analytic",
            note=None,
            forward_slack_s=host_slack_s(self._device_and_host_s(kind, layer_ops, backward=False)),
            backward_slack_s=host_slack_s(self._device_and_host_s(kind, layer_ops, backward=True)),
        )
        if self.measured is None:
            return analytic
        found = self.measured.layer(
            kind, tp, self.micro_batch_sizes, self.seq_len, self.dtype, recompute, self.sequence_parallel,
            self.busy_ranks,
        )  # fmt: skip
        if not isinstance(found, MeasuredLayer):
            return replace(analytic, note=f"{kind} times are analytic: {found}")
        if found.complete:
            return LayerTimes(
                found.forward_s, found.backward_s, 0.0, "profile", None, found.includes_tp_comm, found.contention,
                found.saved_bytes, found.peak_bytes,
            )  # fmt: skip
        # Some of the micro-batch sizes the search costs at once are beyond the profile: those sizes only are
        # costed analytically, the others as measured.
        missing = found.missing
        return LayerTimes(
            forward_s=np.where(missing, analytic.forward_s, found.forward_s),
            backward_s=np.where(missing, analytic.backward_s, found.backward_s),
            recompute_s=np.where(missing, analytic.recompute_s, 0.0),
            source="profile+analytic",
            note=f"{kind} times are analytic for some micro-batch sizes: {found.reason}",
            includes_tp_comm=found.includes_tp_comm,
            contention=np.where(missing, 1.0, found.contention),
            saved_bytes=found.saved_bytes,
            peak_bytes=found.peak_bytes,
            forward_slack_s=np.where(missing, analytic.forward_slack_s, 0.0),
            backward_slack_s=np.where(missing, analytic.backward_slack_s, 0.0),
        )

    def _pass_s(self, kind: LayerKind, layer_ops: list[ops.OpCost], backward: bool) -> Any:
        return np.maximum(*self._device_and_host_s(kind, layer_ops, backward))

    def _device_and_host_s(self, kind: LayerKind, layer_ops: list[ops.OpCost], backward: bool) -> tuple[Any, Any]:
        if (kind, backward) not in self._passes:
            self._passes[(kind, backward)] = pass_device_and_host_s(layer_ops, self.speeds, backward=backward)
        return self._passes[(kind, backward)]

    def _recompute_s(self, kind: LayerKind, layer_ops: list[ops.OpCost], recompute: str) -> Any:
        """`compute.recompute_s`; a mode that repeats the whole forward (full recompute: `ops.recomputed_ops`
        returns the layer's own ops) repeats the forward pass already costed."""
        if ops.recomputed_ops(layer_ops, recompute, self.selective_recompute) is layer_ops:
            return self._pass_s(kind, layer_ops, backward=False)
        return recompute_s(layer_ops, recompute, self.speeds, self.selective_recompute)

    def tp_allreduces_s(self, count: int, plan: ParallelPlan):
        """`count` all-reduces of one activation over the TP group. With sequence parallelism each becomes a
        reduce-scatter + all-gather pair of the same volume (Korthikanti et al. 2022, sec. 4.2.2)."""
        if plan.sequence_parallel:
            pair = comm.reduce_scatter_s(self.activation_bytes, plan.tp, self.tp_channel) + comm.all_gather_s(
                self.activation_bytes, plan.tp, self.tp_channel
            )
            return count * pair
        return count * comm.all_reduce_s(self.activation_bytes, plan.tp, self.tp_channel)


def busy_ranks_per_node(cluster: ClusterSpec) -> int:
    """Ranks of one node that compute at the same time: the node's GPUs, or all of the cluster's if fewer."""
    return min(cluster.gpus_per_node, cluster.num_gpus)


def block_cost(
    model: ModelSpec,
    training: TrainingSpec,
    plan: ParallelPlan,
    ctx: LayerContext,
    block: list[ops.OpCost] | None = None,
) -> LayerCost:
    """One transformer block (all blocks are identical). `block`: its ops at `ctx`'s shape, if already listed."""
    block = ops.block_ops(model, training, ctx.shape) if block is None else block
    everything = ops.saved_bytes(block, "none")
    kept = block_kept_bytes(model, block, plan.recompute, ctx)
    times = ctx.layer_times("block", block, plan.tp, plan.recompute)
    kept, working = layer_memory(times, kept, everything - kept)
    measured = _measured_memory(times).any()
    cached = autocast_cached_weight_bytes(model, plan, ctx.dtype) if measured and plan.recompute == "full" else 0.0
    return LayerCost(
        name="block",
        kind="block",
        params=params.block_params(model),
        forward_flops=sum(op.matmul_flops for op in block),
        forward_s=times.forward_s,
        backward_s=times.backward_s,
        recompute_s=times.recompute_s,
        tp_comm_s=times.tp_comm_s(ctx.tp_allreduces_s(block_tp_allreduces(plan.recompute), plan)),
        cp_comm_s=ring_attention_s(model, plan, ctx.shape, ctx.speeds, ctx.cp_channel, block, ctx.overlap_hidden_share),
        saved_bytes=kept,
        working_bytes=working,
        cached_bytes=cached,
        time_source=times.source,
        time_note=times.note,
        contention=times.contention,
        partial_grad_params=sp_partial_params(params.block_params(model), plan),
        forward_slack_s=times.forward_slack_s,
        backward_slack_s=times.backward_slack_s,
    )


def block_kept_bytes(model: ModelSpec, block: list[ops.OpCost], recompute: str, ctx: LayerContext) -> Any:
    """What a block keeps from its forward to its backward: its input under full recompute (Chen et al. 2016), its
    input and the op-level policy's results under that stack's selective recompute, else its ops' saved tensors
    (planner/cost/ops.py)."""
    block_input = ops.block_input_bytes(model, ctx.shape)
    if recompute == "full":
        return block_input
    if recompute == "selective" and ctx.selective_recompute == "op_level":
        return block_input + ops.op_level_saved_bytes(block)
    return ops.saved_bytes(block, recompute)


def block_tp_allreduces(recompute: str) -> int:
    """All-reduces of one activation over the TP group per block and micro-batch. Megatron-LM's TP block: 2
    forward, 2 backward (Shoeybi et al. 2019, fig. 3); full recompute repeats the forward ones (Korthikanti et
    al. 2022, sec. 5)."""
    return 4 + (2 if recompute == "full" else 0)


def layer_memory(times: LayerTimes, analytic_saved: Any, analytic_working: Any) -> tuple[Any, Any]:
    """A layer's saved and working bytes per micro-batch: measured where the profile timed it with the CUDA
    allocator's peak, else analytic. Measured, working = the peak over its forward + backward - what it saved:
    what its backward needs beyond what the forward kept (the loss's logits-sized gradients at the head)."""
    measured = _measured_memory(times)
    if not measured.any():
        return analytic_saved, analytic_working
    saved = np.where(measured, times.saved_bytes, analytic_saved)
    working = np.where(measured, np.maximum(np.asarray(times.peak_bytes) - times.saved_bytes, 0.0), analytic_working)
    return (float(saved), float(working)) if saved.ndim == 0 else (saved, working)


def _measured_memory(times: LayerTimes) -> np.ndarray:
    return ~np.isnan(np.asarray(times.peak_bytes, dtype=float))


def autocast_cached_weight_bytes(model: ModelSpec, plan: ParallelPlan, precision: Precision) -> float:
    """The 16-bit copies of a fully recomputed block's weights that torch.autocast keeps: autocast caches the cast
    of every fp32 weight it casts until the outermost autocast region exits (torch.autocast, `cache_enabled`),
    and the executor's region spans every micro-batch's forward and backward (executor/train.py `_step`), so the
    copies outlive the checkpoint that drops the block's other tensors. Measured on an H200: full-recompute
    Llama-3.2-1B plans peaked 16 x 2 x 60.8M bytes above the layers' own measured bytes
    (benchmarks/results/2026-12-04-h200-llama3.2-1b.md).
    Under fp32 nothing is cast."""
    if precision == "fp32":
        return 0.0
    return ops.ACTIVATION_BYTES[precision] * params.block_params(model).sharded / plan.tp


def sp_partial_params(count: params.ParamCount, plan: ParallelPlan) -> float:
    """Under sequence parallelism the parameters a layer replicates over tp (norms, row-parallel biases) see only
    this rank's shard of the sequence, so their gradients are partial sums until reduced over tp (Korthikanti et
    al. 2022, sec. 4.2.2; executor/apply.py `align_grads_with_params`). The embedding's replicated positions are
    added before the sequence is split (executor/parallel/tensor.py) and are not among them."""
    return float(count.replicated) if plan.sequence_parallel and plan.tp > 1 else 0.0


def embedding_cost(model: ModelSpec, plan: ParallelPlan, ctx: LayerContext) -> LayerCost:
    """Vocab-parallel embedding: one all-reduce (or reduce-scatter with SP) of its output in forward."""
    layer = ops.embedding_ops(model, ctx.shape)
    return _edge_layer("embedding", "embedding", params.embedding_params(model), layer, ctx, plan)


def head_cost(model: ModelSpec, plan: ParallelPlan, ctx: LayerContext) -> LayerCost:
    """Final norm, LM head and loss: the head's input gradient is all-reduced over TP in backward."""
    layer = ops.head_ops(model, ctx.shape)
    working = ops.head_working_bytes(model, ctx.shape)
    head = _edge_layer("head", "head", params.head_params(model), layer, ctx, plan, working)
    return replace(head, partial_grad_params=sp_partial_params(head.params, plan))


def _edge_layer(
    name: str,
    kind: LayerKind,
    count: params.ParamCount,
    layer: list[ops.OpCost],
    ctx: LayerContext,
    plan: ParallelPlan,
    analytic_working: Any = 0.0,
) -> LayerCost:
    """Embedding and head are never recomputed (Megatron-LM checkpoints transformer layers only). `analytic_working`:
    what the layer holds at its peak beyond what it keeps, where no profile measured it."""
    times = ctx.layer_times(kind, layer, plan.tp, "none")
    saved, working = layer_memory(times, ops.saved_bytes(layer, "none"), analytic_working)
    return LayerCost(
        name=name,
        kind=kind,
        params=count,
        forward_flops=sum(op.matmul_flops for op in layer),
        forward_s=times.forward_s,
        backward_s=times.backward_s,
        recompute_s=0.0,
        tp_comm_s=times.tp_comm_s(ctx.tp_allreduces_s(1, plan)),
        cp_comm_s=0.0,
        saved_bytes=saved,
        working_bytes=working,
        time_source=times.source,
        time_note=times.note,
        contention=times.contention,
        forward_slack_s=times.forward_slack_s,
        backward_slack_s=times.backward_slack_s,
    )
