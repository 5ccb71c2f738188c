"""The contract's data types (DESIGN.md "The contract"): what the user asks about and what the planner answers.

All models are frozen pydantic v2 models. Field names are public: add freely, rename never.
Units are in the names (`_s`, `_bytes`, `_GBps` = 10^9 B/s, `_tflops`); SI inside.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from planner.errors import Violation

Precision = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal["adamw", "sgd"]
Recompute = Literal["none", "selective", "full"]
Schedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]
PositiveInt = Annotated[int, Field(ge=1)]

# Upper bounds far above any model or cluster built so far (dense models have ~100-200 layers, clusters ~10^5
# GPUs). They keep what a request costs bounded: search time grows with the layer count and the degrees, and
# the executor's checks build per-stage lists.
Layers = Annotated[int, Field(ge=1, le=1024)]
Width = Annotated[int, Field(ge=1, le=2**20)]  # hidden, ffn, head sizes
Heads = Annotated[int, Field(ge=1, le=2**14)]
Vocab = Annotated[int, Field(ge=1, le=2**24)]
Experts = Annotated[int, Field(ge=1, le=2**14)]
Tokens = Annotated[int, Field(ge=1, le=2**24)]  # sequence lengths, batch sizes (sequences), positions
Degree = Annotated[int, Field(ge=1, le=2**17)]  # node counts and parallel degrees
MAX_GPUS = 2**17


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------------------------- model


class ModelSpec(Frozen):
    """A decoder-only transformer, described by the fields every planner and config format agree on.

    Defaults follow the two families: GELU models (GPT-2/3, Megatron GPT) default to learned positions and
    biases on every linear layer; SwiGLU models (Llama, Mistral) to RoPE and no biases. Hybrids (GPT-NeoX:
    GELU + RoPE; Qwen2: SwiGLU + QKV bias) set the fields explicitly.
    """

    name: str | None = None
    num_layers: Layers
    hidden_size: Width
    num_attention_heads: Heads
    num_kv_heads: Heads | None = None  # None: = num_attention_heads (multi-head attention)
    head_dim: Width | None = None  # None: hidden_size // num_attention_heads
    ffn_hidden_size: Width | None = None  # None: 4 * hidden_size (GELU) or Llama's 2/3 * 4h rounded
    vocab_size: Vocab
    mlp: Literal["gelu", "swiglu"] = "gelu"
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    tie_embeddings: bool = False
    num_experts: Experts = 1
    experts_per_token: Experts = 1
    position_embedding: Literal["learned", "rope"] | None = None
    max_position_embeddings: Tokens | None = None  # rows of a learned position table
    qkv_bias: bool | None = None
    linear_bias: bool | None = None  # attention output projection and MLP
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # hidden and attention dropout probability

    @model_validator(mode="after")
    def _fill_family_defaults(self) -> ModelSpec:
        gelu = self.mlp == "gelu"
        defaults: dict[str, Any] = {
            "num_kv_heads": self.num_attention_heads,
            "head_dim": self.hidden_size // self.num_attention_heads,
            "ffn_hidden_size": 4 * self.hidden_size if gelu else _llama_ffn(self.hidden_size),
            "position_embedding": "learned" if gelu else "rope",
            "qkv_bias": gelu,
            "linear_bias": gelu,
        }
        for field, value in defaults.items():
            if getattr(self, field) is None:
                object.__setattr__(self, field, value)
        if self.position_embedding == "learned" and self.max_position_embeddings is None:
            object.__setattr__(self, "max_position_embeddings", 2048)  # GPT-3's context (Brown et al. 2020)
        _check_model(self)
        return self

    @property
    def kv_heads(self) -> int:
        assert self.num_kv_heads is not None
        return self.num_kv_heads

    @property
    def head_size(self) -> int:
        assert self.head_dim is not None
        return self.head_dim

    @property
    def ffn_size(self) -> int:
        assert self.ffn_hidden_size is not None
        return self.ffn_hidden_size

    @property
    def q_size(self) -> int:
        """Width of the query projection (= hidden_size unless head_dim is set independently)."""
        return self.num_attention_heads * self.head_size

    @property
    def kv_size(self) -> int:
        """Width of one of the key / value projections (smaller than q_size under GQA/MQA)."""
        return self.kv_heads * self.head_size

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelSpec:
        """Read a Hugging Face `config.json` dict (Llama, Mistral, Qwen2, GPT-2, GPT-NeoX, Mixtral)."""
        from planner.presets import model_from_hf_config

        return model_from_hf_config(config)


def _llama_ffn(hidden: int, multiple_of: int = 256) -> int:
    """Llama's default SwiGLU width: 2/3 of 4h, rounded up to a multiple of 256 (Touvron et al. 2023, code)."""
    ffn = int(2 * 4 * hidden / 3)
    return multiple_of * ((ffn + multiple_of - 1) // multiple_of)


def _check_model(model: ModelSpec) -> None:
    problems = []
    if model.hidden_size % model.num_attention_heads and "head_dim" not in model.model_fields_set:
        problems.append(
            f"hidden_size ({model.hidden_size}) is not divisible by num_attention_heads "
            f"({model.num_attention_heads}); set head_dim explicitly"
        )
    if model.num_attention_heads % model.kv_heads:
        problems.append(
            f"num_kv_heads ({model.kv_heads}) must divide num_attention_heads ({model.num_attention_heads})"
        )
    if model.experts_per_token > model.num_experts:
        problems.append(f"experts_per_token ({model.experts_per_token}) exceeds num_experts ({model.num_experts})")
    if problems:
        raise ValueError("; ".join(problems))


# ------------------------------------------------------------------------------------------ training


class TrainingSpec(Frozen):
    """What one optimizer step processes. `global_batch_size` counts sequences."""

    seq_len: Tokens
    global_batch_size: Tokens
    precision: Precision = "bf16"
    optimizer: Optimizer = "adamw"
    # "flash": fused attention that never stores the s x s score matrix (FlashAttention / SDPA);
    # "eager": softmax(QK^T)V written out as separate ops (Megatron-LM before 2023, Korthikanti et al. 2022).
    attention_kernel: Literal["flash", "eager"] = "flash"

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch_size


# ------------------------------------------------------------------------------------------- cluster


class LinkSpec(Frozen):
    """One link tier, per GPU and per direction. `efficiency` = achievable nccl-tests bus bandwidth / line rate."""

    name: str
    bandwidth_GBps: Annotated[float, Field(gt=0)]
    efficiency: Annotated[float, Field(gt=0, le=1)] = 1.0
    latency_s: Annotated[float, Field(ge=0)] = 0.0
    source: str = ""

    @property
    def bus_bandwidth_Bps(self) -> float:
        return self.bandwidth_GBps * 1e9 * self.efficiency


class GpuSpec(Frozen):
    """One accelerator as the cost model needs it. Peak numbers are dense (no sparsity), from the datasheet."""

    name: str
    kind: Literal["gpu", "cpu"] = "gpu"
    memory_bytes: Annotated[int, Field(gt=0)]
    peak_tflops: dict[Precision, Annotated[float, Field(gt=0)]]
    hbm_GBps: Annotated[float, Field(gt=0)]
    intra_node: LinkSpec
    inter_node: LinkSpec
    # Achievable fraction of peak for the large GEMMs of a transformer; see planner/cost/compute.py.
    matmul_efficiency: Annotated[float, Field(gt=0, le=1)]
    memory_efficiency: Annotated[float, Field(gt=0, le=1)] = 0.8
    source: str = ""

    @field_validator("peak_tflops")
    @classmethod
    def _all_precisions(cls, value: dict[str, float]) -> dict[str, float]:
        missing = {"bf16", "fp16", "fp32"} - set(value)
        if missing:
            raise ValueError(f"peak_tflops lacks {sorted(missing)}")
        return value


class ClusterSpec(Frozen):
    """Identical nodes of `gpus_per_node` GPUs. `*_GBps` override the GPU preset's link line rates."""

    gpu: GpuSpec
    num_nodes: Degree = 1
    gpus_per_node: Annotated[int, Field(ge=1, le=1024)] = 8
    intra_node_GBps: Annotated[float, Field(gt=0)] | None = None
    inter_node_GBps: Annotated[float, Field(gt=0)] | None = None
    profile: str | None = None  # a HardwareProfile file or stored id; the edges resolve it (`with_profile`)
    # The resolved profile as the cost model reads it (planner.cost.measured.ProfileCosts); never serialised.
    _measured: Any = PrivateAttr(default=None)

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu_by_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            from planner.presets import gpu_preset

            return gpu_preset(value)
        return value

    @model_validator(mode="after")
    def _bounded_size(self) -> ClusterSpec:
        if self.num_gpus > MAX_GPUS:
            raise ValueError(
                f"cluster.num_nodes: {self.num_nodes} nodes x {self.gpus_per_node} GPUs = {self.num_gpus} GPUs, "
                f"over the {MAX_GPUS} this planner searches"
            )
        return self

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node

    @property
    def measured(self) -> Any:
        """The ProfileCosts of the attached profile (see `with_profile`), or None: the analytic model only."""
        return self._measured

    def with_profile(self, profile: HardwareProfile) -> ClusterSpec:
        """This cluster with `profile`'s measurements attached; ProfileError naming `cluster.profile` when the
        profile was measured on another kind of device than `gpu`."""
        from planner.cost.measured import ProfileCosts
        from planner.profiles import ProfileError

        costs = ProfileCosts(profile)
        mismatch = costs.device_mismatch(self.gpu.kind, self.gpu.name)
        if mismatch:
            raise ProfileError(f"cluster.profile: {mismatch}", field="cluster.profile")
        attached = self.model_copy()
        attached._measured = costs
        return attached

    @property
    def intra_link(self) -> LinkSpec:
        link = self.gpu.intra_node
        if self.intra_node_GBps is None:
            return link
        return link.model_copy(update={"bandwidth_GBps": self.intra_node_GBps, "source": "user override"})

    @property
    def inter_link(self) -> LinkSpec:
        link = self.gpu.inter_node
        if self.inter_node_GBps is None:
            return link
        return link.model_copy(update={"bandwidth_GBps": self.inter_node_GBps, "source": "user override"})


# ---------------------------------------------------------------------------------------------- plan


class ParallelPlan(Frozen):
    """One parallel layout. Rank order is fixed by DESIGN.md: rank = ((pp_i*dp + dp_i)*cp + cp_i)*tp + tp_i.

    The plan checks the rules it can check alone when it is built; `violations()` checks the rules that
    need the model, training setup and cluster. Both name every broken rule, not only the first.
    """

    dp: Degree = 1
    tp: Degree = 1
    pp: Degree = 1
    cp: Degree = 1
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 0
    micro_batch_size: Tokens = 1
    sequence_parallel: bool = False
    recompute: Recompute = "none"
    schedule: Schedule = "1f1b"
    virtual_stages: Layers = 1
    layers_per_stage: tuple[Layers, ...] | None = None
    # Reduce gradients while backward still runs (PyTorch DDP / FSDP do; Megatron-LM before 2023 did not).
    overlap_grad_reduce: bool = True

    @model_validator(mode="after")
    def _intrinsic_rules(self) -> ParallelPlan:
        problems = [str(v) for v in self._intrinsic_violations()]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _intrinsic_violations(self) -> list[Violation]:
        found = []
        if self.sequence_parallel and self.tp == 1:
            found.append(Violation("plan.sequence_parallel", "sp_without_tp", "sequence parallel needs tp > 1"))
        if self.schedule == "interleaved_1f1b":
            if self.pp < 2:
                found.append(Violation("plan.schedule", "interleaved_needs_pp", "interleaved_1f1b needs pp >= 2"))
            if self.virtual_stages < 2:
                found.append(
                    Violation(
                        "plan.virtual_stages",
                        "interleaved_needs_virtual_stages",
                        "interleaved_1f1b needs virtual_stages >= 2 (1 is plain 1f1b)",
                    )
                )
        elif self.virtual_stages != 1:
            found.append(
                Violation(
                    "plan.virtual_stages",
                    "virtual_stages_need_interleaving",
                    f"virtual_stages={self.virtual_stages} needs schedule interleaved_1f1b (got {self.schedule})",
                )
            )
        if self.layers_per_stage is not None and len(self.layers_per_stage) != self.num_model_chunks:
            found.append(
                Violation(
                    "plan.layers_per_stage",
                    "layers_per_stage_length",
                    f"has {len(self.layers_per_stage)} entries; pp x virtual_stages = {self.num_model_chunks}",
                )
            )
        return found

    @property
    def num_gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def num_model_chunks(self) -> int:
        """Pipeline stages in the model: pp devices x virtual_stages chunks each."""
        return self.pp * self.virtual_stages

    def num_microbatches(self, training: TrainingSpec) -> int:
        return training.global_batch_size // (self.dp * self.micro_batch_size)

    def stage_layer_counts(self, num_layers: int) -> tuple[int, ...]:
        """Layers in each model chunk, in pipeline order (chunk c runs on device c % pp).

        Without `layers_per_stage` the layers are spread as evenly as possible; the extra layers go to the
        middle chunks because the first and last chunks also hold the embedding and the LM head.
        """
        if self.layers_per_stage is not None:
            return self.layers_per_stage
        return even_layer_split(num_layers, self.num_model_chunks)

    def violations(self, model: ModelSpec, training: TrainingSpec, cluster: ClusterSpec) -> list[Violation]:
        """Every structural rule this plan breaks for this model, training setup and cluster."""
        from planner.rules import plan_violations

        return plan_violations(self, model, training, cluster)


def even_layer_split(num_layers: int, chunks: int) -> tuple[int, ...]:
    """`num_layers` blocks over `chunks` chunks as evenly as possible; the extra layers go to the middle chunks
    because the first and last chunks also hold the embedding and the LM head."""
    base, extra = divmod(num_layers, chunks)
    order = sorted(range(chunks), key=lambda c: (c in (0, chunks - 1), abs(c - (chunks - 1) / 2)))
    bumped = set(order[:extra])
    return tuple(base + (c in bumped) for c in range(chunks))


# -------------------------------------------------------------------------------------------- search


class FixedPlanFields(Frozen):
    """Plan fields a search must keep (`search.fixed`); the rest are searched."""

    dp: Degree | None = None
    tp: Degree | None = None
    pp: Degree | None = None
    cp: Degree | None = None
    zero_stage: Annotated[int, Field(ge=0, le=3)] | None = None
    micro_batch_size: Tokens | None = None
    sequence_parallel: bool | None = None
    recompute: Recompute | None = None
    schedule: Schedule | None = None
    virtual_stages: Layers | None = None


class SearchOptions(Frozen):
    """What `paraplan plan` searches over and how it ranks (the contract's `search`)."""

    top_k: Annotated[int, Field(ge=1, le=100)] = 5
    # A plan fits when every stage's peak stays under this fraction of GPU memory (headroom for spikes the
    # model does not see: allocator growth, NCCL lazy buffers, evaluation batches).
    max_memory_fraction: Annotated[float, Field(gt=0, le=1)] = 0.9
    fixed: FixedPlanFields = FixedPlanFields()
    schedules: tuple[Schedule, ...] = ("gpipe", "1f1b", "interleaved_1f1b")
    recompute: tuple[Recompute, ...] = ("none", "selective", "full")
    zero_stages: tuple[Annotated[int, Field(ge=0, le=3)], ...] = (0, 1, 2, 3)
    # None: every divisor of the per-replica batch
    micro_batch_sizes: Annotated[tuple[Tokens, ...], Field(max_length=64)] | None = None
    max_tp: Degree | None = None  # None: the GPUs of one node
    tp_within_node: bool = True  # TP groups never cross nodes (their all-reduces are on the critical path)
    max_cp: Degree | None = None
    max_virtual_stages: Layers | None = None
    overlap_grad_reduce: bool = True
    partition: bool = True  # balance layers over stages with the ILP for the leading candidates

    @field_validator("schedules", "recompute", "zero_stages")
    @classmethod
    def _not_empty(cls, value: tuple) -> tuple:
        if not value:
            raise ValueError("must allow at least one value")
        return value


# ------------------------------------------------------------------------------------------ estimate


class StageMemory(Frozen):
    """Peak bytes on one GPU of one pipeline stage (device), split by what holds them."""

    stage: int
    layers: int
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    other_bytes: float
    total_bytes: float
    capacity_bytes: float
    over_bytes: float  # > 0: does not fit, by this many bytes


class MemoryEstimate(Frozen):
    peak_bytes: float
    peak_stage: int
    capacity_bytes: float
    by_stage: list[StageMemory]


class TimeBreakdown(Frozen):
    """Seconds of one step on the critical path; the terms add up to `step_time_s`."""

    compute_s: float
    tp_comm_s: float
    cp_comm_s: float
    pp_comm_s: float
    dp_comm_s: float  # exposed part only (the rest overlaps with backward)
    bubble_s: float
    optimizer_s: float

    @property
    def total_s(self) -> float:
        return sum(self.model_dump().values())


class StepEstimate(Frozen):
    """The cost model's answer for one (model, training, cluster, plan)."""

    step_time_s: float
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float
    hfu: float
    fits: bool
    num_microbatches: int
    memory: MemoryEstimate
    breakdown: TimeBreakdown
    # Which model each term came from ("analytic" now; "profile" once a HardwareProfile supplies it).
    sources: dict[str, str]
    why_not_fits: list[str] = []
    assumptions: list[str] = []


# ------------------------------------------------------------------------------------- hardware profile

PROFILE_SCHEMA_VERSION = 1
"""Bumped whenever a HardwareProfile field changes meaning; a profile of another version is refused, not guessed."""

CollectiveOp = Literal[
    "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv", "fsdp_all_gather", "fsdp_reduce_scatter"
]
"""The fsdp_* ops are one FSDP2 unit's all-gather and reduce-scatter as training issues them, framework work
included (profiler/collectives.py); the cost model charges what they take beyond the bare collective as
dispatch that no compute hides (planner/cost/step.py `fsdp_dispatch_s`)."""
LinkTier = Literal["intra_node", "inter_node"]
LayerKind = Literal["block", "embedding", "head"]


class TimingStats(Frozen):
    """Repeated timings of one measurement: the median and how far the repeats spread around it."""

    median_s: Annotated[float, Field(ge=0)]
    spread: Annotated[float, Field(ge=0)]  # (p90 - p10) / median over the repeats
    repeats: PositiveInt
    unstable: bool = False  # spread above the profiler's threshold: the median is not to be trusted alone


class LayerMeasurement(Frozen):
    """One layer at one shape, dtype and recompute mode, as one device runs it under tensor parallelism `tp`
    (its weights sharded as tp would shard them). `backward` includes the recomputation the mode implies.

    `tp_collectives`: timed on `tp` ranks running the executor's tensor-parallel layer (profiler/tp_layers.py),
    so the times include its collectives and DTensor's dispatch, with or without `sequence_parallel`; otherwise
    timed on one device holding the shard, and the cost model adds the collectives from the fits.

    `concurrent_ranks`: how many ranks of the node ran the same work at the same time while it was timed: 1 when
    one device ran alone; N when every rank of an N-rank node timed its own copy at once (profiler/tp_layers.py
    `--loaded`), as a data-parallel or pipelined step keeps them all busy. Devices that share cores, caches or
    memory bandwidth (CPU ranks) are slower loaded than alone; the cost model uses the loaded times for plans
    that keep that many ranks busy."""

    layer: LayerKind
    tp: PositiveInt = 1
    tp_collectives: bool = False
    concurrent_ranks: PositiveInt = 1
    sequence_parallel: bool = False
    micro_batch_size: PositiveInt
    seq_len: PositiveInt
    dtype: Precision
    recompute: Recompute = "none"
    forward: TimingStats
    backward: TimingStats
    saved_bytes: Annotated[int, Field(ge=0)]  # what the forward keeps for backward (saved-tensor hooks)
    peak_allocated_bytes: int | None = None  # CUDA only: allocator peak over forward + backward


class OptimizerMeasurement(Frozen):
    """One optimizer step over `num_params` parameters (fp32 master weights and state); `concurrent_ranks` as in
    LayerMeasurement. `sharded`: the parameters were DTensor shards over the `concurrent_ranks` ranks (FSDP2), each
    op dispatched by DTensor, as in plans whose parameters are DTensors; `num_params` is then one rank's share."""

    optimizer: Optimizer
    num_params: PositiveInt
    time: TimingStats
    concurrent_ranks: PositiveInt = 1
    sharded: bool = False


class MeetingWait(Frozen):
    """How long each rank waited for its peers per meeting (a collective every rank must reach), with
    `concurrent_ranks` ranks running the executor's model at one layer shape (profiler/meeting_wait.py): `free`
    passes never meet, `synced` ones meet `meetings_per_pass` times; wait_s = (synced - free) / meetings_per_pass -
    collective_s, the one-element collective's own time, averaged over the ranks and never below 0."""

    micro_batch_size: PositiveInt
    seq_len: PositiveInt
    recompute: Recompute
    concurrent_ranks: Annotated[int, Field(ge=2)]
    meetings_per_pass: PositiveInt
    free: TimingStats
    synced: TimingStats
    collective_s: Annotated[float, Field(ge=0)]
    wait_s: Annotated[float, Field(ge=0)]


class CollectiveMeasurement(Frozen):
    """One collective at one message size on a group of `group_size` ranks over one link tier.
    algbw = size / time; busbw = algbw x the nccl-tests factor of the op (nccl-tests doc/PERFORMANCE.md)."""

    op: CollectiveOp
    tier: LinkTier
    group_size: Annotated[int, Field(ge=2)]
    # nccl-tests' convention (doc/PERFORMANCE.md), as planner/cost/comm.py's total_bytes: all_reduce the buffer,
    # all_gather the gathered output, reduce_scatter each rank's input, all_to_all the send buffer, send_recv
    # one message.
    size_bytes: PositiveInt
    time: TimingStats
    algbw_GBps: Annotated[float, Field(ge=0)]
    busbw_GBps: Annotated[float, Field(ge=0)]


class CollectiveFit(Frozen):
    """time(size) = latency_s + size x busbw_factor(op, n) / (bandwidth_GBps x 1e9): the alpha-beta model
    (Hockney 1994; Thakur et al. 2005) fitted to the measurements of one op, tier and group size."""

    op: CollectiveOp
    tier: LinkTier
    group_size: Annotated[int, Field(ge=2)]
    latency_s: Annotated[float, Field(ge=0)]
    bandwidth_GBps: Annotated[float, Field(gt=0)]  # bus bandwidth
    r2: float  # of log(fitted time) against log(measured time): small messages count as much as large ones
    max_rel_error: Annotated[float, Field(ge=0)]
    num_samples: PositiveInt


ComputeClass = Literal["forward", "backward", "optimizer"]
Efficiency = Annotated[float, Field(gt=0, le=1000)]


class Calibration(Frozen):
    """The cost model's free factors, fitted to runs measured on the profiled machine (`paraplan validate`,
    planner/calibration.py), so that estimates from this profile predict whole training steps, not isolated
    layers. An efficiency is (seconds the profile measured in isolation) / (seconds the same work takes inside
    a run); a class or tier left out keeps 1."""

    compute_efficiency: dict[ComputeClass, Efficiency] = {}
    # Bus bandwidth in a run / the profile's fitted bandwidth, per link tier.
    collective_efficiency: dict[LinkTier, Efficiency] = {}
    # The profile's fitted per-operation latency (alpha) / the latency in a run, per link tier: inside a step a
    # collective also pays its framework's dispatch (DTensor, FSDP hooks) and waits for a busy peer.
    collective_latency_efficiency: dict[LinkTier, Efficiency] = {}
    # The share of the gradient reduction that backward can hide which a run does hide (1: all of it, as the
    # uncalibrated model assumes; 0: none).
    overlap: Annotated[float, Field(ge=0, le=1)] = 1.0
    # Framework time per micro-batch on every device that the layers do not account for (hooks, the pipeline
    # schedule's bookkeeping, the host launching the micro-batch).
    microbatch_overhead_s: Annotated[float, Field(ge=0)] = 0.0
    # Framework time per step that neither layers nor collectives account for (the trainer's own bookkeeping,
    # the loss and norm reductions' waits, ranks lining up at the step's synchronisation points).
    step_overhead_s: Annotated[float, Field(ge=0)] = 0.0
    num_runs: PositiveInt  # measured runs the factors were fitted on
    fit_mape: Annotated[float, Field(ge=0)]  # step-time error on those runs after the fit
    created: str  # ISO 8601, UTC


class HardwareProfile(Frozen):
    """What the profiler measured on one machine type: versioned, with the software it was measured under."""

    schema_version: int = PROFILE_SCHEMA_VERSION
    device_kind: Literal["cpu", "cuda"]
    device_name: str
    device_count: PositiveInt = 1
    hosts: list[str] = []
    torch_version: str
    cuda_version: str | None = None
    nccl_version: str | None = None
    created: str  # ISO 8601, UTC
    settings: dict[str, Any] = {}
    model: ModelSpec | None = None  # the model whose layers were measured
    layers: list[LayerMeasurement] = []
    optimizer: list[OptimizerMeasurement] = []
    collectives: list[CollectiveMeasurement] = []
    collective_fits: list[CollectiveFit] = []
    # The share of a collective that hides behind compute running with it (profiler/collectives.py
    # measure_overlap); None: not measured, and the cost model hides all it can.
    comm_compute_overlap: Annotated[float, Field(ge=0, le=1)] | None = None
    meeting_waits: list[MeetingWait] = []  # by layer shape; none: not measured, and no meeting waits
    calibration: Calibration | None = None  # fitted to measured runs; None: the profile's times as measured

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, value: int) -> int:
        if value != PROFILE_SCHEMA_VERSION:
            raise ValueError(
                f"profile schema version {value} is not this paraplan's ({PROFILE_SCHEMA_VERSION}); measure again"
            )
        return value
