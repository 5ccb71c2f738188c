"""The contract's data types (DESIGN.md "The contract"): what the user asks about and what the planner answers.

All models are frozen pydantic v2 models. Field names are public: add freely, rename never.
Units are in the names (`_s`, `_bytes`, `_GBps` = 10^9 B/s, `_tflops`); SI inside.

A leaf: these modules import nothing else of the planner (tests/unit/test_imports.py checks it). Names (GPU and
model presets, Hugging Face configs, profile ids) are resolved at the edge, planner/request.py and
planner/presets.py; a measured profile reaches the cost model as an explicit argument.
"""

from __future__ import annotations

from planner.specs.base import (
    MAX_GPUS,
    Degree,
    Experts,
    Framework,
    Frozen,
    Heads,
    Int,
    Layers,
    Offload,
    Optimizer,
    PositiveInt,
    Precision,
    Real,
    Recompute,
    Schedule,
    Text,
    Tokens,
    Vocab,
    Width,
    ZeroStage,
)
from planner.specs.cluster import ClusterSpec, GpuSpec, LinkSpec
from planner.specs.estimate import (
    EstimateUncertainty,
    MemoryEstimate,
    OffloadTraffic,
    PipelineTimeline,
    ScheduledTask,
    StageMemory,
    StepEstimate,
    TimeBreakdown,
)
from planner.specs.model import ModelSpec
from planner.specs.plan import (
    MESH_AXES,
    Degrees,
    FixedPlanFields,
    MeshAxis,
    ParallelPlan,
    SearchOptions,
    Violation,
    even_layer_split,
)
from planner.specs.profile import (
    PROFILE_SCHEMA_VERSION,
    Calibration,
    CollectiveFit,
    CollectiveMeasurement,
    CollectiveOp,
    ComputeClass,
    Efficiency,
    HardwareProfile,
    LayerKind,
    LayerMeasurement,
    LinkTier,
    MeetingWait,
    OptimizerMeasurement,
    TimingStats,
)
from planner.specs.training import TrainingSpec

__all__ = [
    "MAX_GPUS",
    "MESH_AXES",
    "Degrees",
    "MeshAxis",
    "PROFILE_SCHEMA_VERSION",
    "Calibration",
    "ClusterSpec",
    "CollectiveFit",
    "CollectiveMeasurement",
    "CollectiveOp",
    "ComputeClass",
    "Degree",
    "Efficiency",
    "EstimateUncertainty",
    "Experts",
    "FixedPlanFields",
    "Frozen",
    "GpuSpec",
    "HardwareProfile",
    "Heads",
    "Int",
    "LayerKind",
    "LayerMeasurement",
    "Layers",
    "LinkSpec",
    "LinkTier",
    "MeetingWait",
    "MemoryEstimate",
    "Offload",
    "OffloadTraffic",
    "ModelSpec",
    "Framework",
    "Optimizer",
    "OptimizerMeasurement",
    "PipelineTimeline",
    "ParallelPlan",
    "PositiveInt",
    "Precision",
    "Real",
    "Recompute",
    "Schedule",
    "ScheduledTask",
    "Text",
    "SearchOptions",
    "StageMemory",
    "StepEstimate",
    "TimeBreakdown",
    "TimingStats",
    "Tokens",
    "TrainingSpec",
    "Violation",
    "Vocab",
    "Width",
    "ZeroStage",
    "even_layer_split",
]
