"""One parallel layout (the contract's `plan`), the rules it breaks, and what a search may vary (`search`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, NamedTuple

from pydantic import Field, field_validator, model_validator

from planner.specs.base import (
    Degree,
    Frozen,
    Int,
    Layers,
    Offload,
    Real,
    Recompute,
    Schedule,
    Tokens,
    ZeroStage,
)
from planner.specs.training import TrainingSpec


@dataclass(frozen=True)
class Violation:
    """One broken rule: which request field, a stable machine-readable code, and a sentence for people."""

    field: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


MeshAxis = Literal["pp", "dp", "cp", "tp"]
MESH_AXES: tuple[MeshAxis, ...] = ("pp", "dp", "cp", "tp")
"""The parallel axes in rank order, outermost first: rank = ((pp_i * dp + dp_i) * cp + cp_i) * tp + tp_i (DESIGN.md),
TP innermost so its groups stay inside a node. The rank layout, the search's layouts and the executor's
DeviceMesh all read the axes from here; an axis is added here, in `Degrees` and as a plan field."""


class Degrees(NamedTuple):
    """One degree per mesh axis, in MESH_AXES order: the tuple is the DeviceMesh's shape."""

    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1

    @classmethod
    def of(cls, holder: object) -> Degrees:
        """The degrees of anything with one attribute per axis (a plan, a search layout)."""
        return cls(*(int(getattr(holder, axis)) for axis in MESH_AXES))

    @property
    def world(self) -> int:
        """Ranks in the mesh: the product of the degrees."""
        return self.pp * self.dp * self.cp * self.tp


class ParallelPlan(Frozen):
    """One parallel layout. Rank order is fixed by DESIGN.md: rank = ((pp_i*dp + dp_i)*cp + cp_i)*tp + tp_i.

    The plan checks the rules it can check alone when it is built; planner.rules checks the rules that need
    the model, training setup and cluster (`plan_violations`). Both name every broken rule, not only the first.
    """

    dp: Degree = 1
    tp: Degree = 1
    pp: Degree = 1
    cp: Degree = 1
    zero_stage: ZeroStage = 0
    micro_batch_size: Tokens = 1
    sequence_parallel: bool = False
    recompute: Recompute = "none"
    schedule: Schedule = "1f1b"
    virtual_stages: Layers = 1
    layers_per_stage: tuple[Layers, ...] | None = None
    # Reduce gradients while backward still runs (PyTorch DDP / FSDP do; Megatron-LM before 2023 did not).
    overlap_grad_reduce: bool = True
    # CPU offload (ZeRO-Offload / ZeRO-Infinity): "optimizer" keeps the optimizer's states, its step and the
    # gradients in host memory; "optimizer_and_params" the weights as well (ZeRO-3 only). DeepSpeed's
    # offload_optimizer / offload_param (device: cpu); FSDP2's CPUOffloadPolicy is "optimizer_and_params".
    offload: Offload = "none"
    # Expert parallelism: the experts of each MoE layer split over `ep` ranks of the dp x cp group (Megatron-Core's
    # layout, DESIGN.md): an expert group is ep consecutive ranks of that group; ep = 1 replicates every expert.
    ep: Degree = 1

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
        return self.degrees.world

    @property
    def degrees(self) -> Degrees:
        return Degrees.of(self)

    @property
    def expert_data_parallel(self) -> int:
        """Replicas of each expert: the dp x cp group's ranks that hold the same experts (ep does not divide dp x cp
        in a plan that breaks `planner.rules`; the floor keeps this total)."""
        return max(1, self.dp * self.cp // self.ep)

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
    zero_stage: ZeroStage | None = None
    micro_batch_size: Tokens | None = None
    sequence_parallel: bool | None = None
    recompute: Recompute | None = None
    schedule: Schedule | None = None
    virtual_stages: Layers | None = None
    offload: Offload | None = None
    ep: Degree | None = None


class SearchOptions(Frozen):
    """What `paraplan plan` searches over and how it ranks (the contract's `search`)."""

    top_k: Annotated[Int, Field(ge=1, le=100)] = 5
    # A plan fits when every stage's peak stays under this fraction of GPU memory (headroom for spikes the
    # model does not see: allocator growth, NCCL lazy buffers, evaluation batches).
    max_memory_fraction: Annotated[Real, Field(gt=0, le=1)] = 0.9
    # A plan fits only if its peak at the upper memory band (the 95th percentile of measured / predicted peak over
    # the regime's measured runs, planner/uncertainty.py) stays under that fraction too. A switch, not a fraction:
    # the bands are fitted at one coverage (90%), and a level the runs were not fitted at would be made up.
    memory_safety: bool = False
    fixed: FixedPlanFields = FixedPlanFields()
    schedules: tuple[Schedule, ...] = ("gpipe", "1f1b", "interleaved_1f1b")
    recompute: tuple[Recompute, ...] = ("none", "selective", "full")
    zero_stages: tuple[ZeroStage, ...] = (0, 1, 2, 3)
    # CPU offload is searched like the ZeRO stage: a plan that offloads is never faster than its twin that does
    # not (planner/cost/offload.py), so it ranks only where the twin does not fit.
    offloads: tuple[Offload, ...] = ("none", "optimizer", "optimizer_and_params")
    # None: every divisor of the per-replica batch
    micro_batch_sizes: Annotated[tuple[Tokens, ...], Field(max_length=64)] | None = None
    max_tp: Degree | None = None  # None: the GPUs of one node
    tp_within_node: bool = True  # TP groups never cross nodes (their all-reduces are on the critical path)
    max_cp: Degree | None = None
    max_virtual_stages: Layers | None = None
    overlap_grad_reduce: bool = True
    partition: bool = True  # balance layers over stages with the ILP for the leading candidates

    @field_validator("schedules", "recompute", "zero_stages", "offloads")
    @classmethod
    def _not_empty(cls, value: tuple) -> tuple:
        if not value:
            raise ValueError("must allow at least one value")
        return value
