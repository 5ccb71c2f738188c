"""The pipeline schedule as a task graph: its longest path is the pipeline's time, its tasks are the timeline.

Nodes are tasks, (device, chunk, micro-batch, kind) with kind forward, recompute or backward, each carrying its
duration. Edges are what a task waits for: the previous task on its device, in the schedule's order (GPipe,
Huang et al. 2019; 1F1B and interleaved 1F1B, Narayanan et al. SC'21 sec. 2.2), and the hand-off of the
activation (forward) or its gradient (backward) from the neighbouring chunk, which lags by the transfer time.
Every edge weighs its source's duration plus that lag, and a sink `STEP_END` follows every device's last task,
so the graph's longest path is the step's pipeline time. Where stages are even it equals the closed form
m x t + bubble (planner/cost/pipeline.py); where they are not, it is the exact answer the closed form bounds.

Chunk c runs on device c % pp (Narayanan et al. sec. 2.2.2); with one chunk per device, chunk = device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import networkx as nx

from planner.cost import comm
from planner.cost.expert import plan_ep_layer_comm_s
from planner.cost.layers import LayerCost, layer_kinds
from planner.cost.measured import ProfileCosts
from planner.cost.pipeline import p2p_activation_bytes
from planner.layout import placement
from planner.rules import partial_interleaved_round
from planner.specs import ClusterSpec, ModelSpec, ParallelPlan, TrainingSpec

TaskKind = Literal["forward", "recompute", "backward"]
STEP_END = "step_end"  # the sink: every device's last task leads to it, weighted by that task's duration


@dataclass(frozen=True)
class ChunkTimes:
    """One model chunk's seconds for one micro-batch."""

    forward_s: float
    backward_s: float
    recompute_s: float = 0.0  # forward work repeated just before the backward (activation checkpointing)


@dataclass(frozen=True, order=True)
class Task:
    device: int
    chunk: int  # the model chunk, in pipeline order (0 .. pp * virtual_stages - 1)
    microbatch: int
    kind: TaskKind


@dataclass(frozen=True)
class TimelineTask:
    """One task as the timeline draws it: a bar on `device` from `start_s` to `end_s`."""

    device: int
    microbatch: int
    chunk: int
    kind: TaskKind
    start_s: float
    end_s: float


# ------------------------------------------------------------------------------------ device orders


def _forwards_then_backwards(forwards: list, backwards: list, warmup: int) -> list[tuple[str, tuple]]:
    """`warmup` forwards, then one forward and one backward in turn, then the backwards left: the 1F1B pattern
    (Narayanan et al. SC'21 sec. 2.2.1); with warmup = every forward it is GPipe's order (Huang et al. 2019)."""
    order = [("forward", f) for f in forwards[:warmup]]
    for forward, backward in zip(forwards[warmup:], backwards, strict=False):
        order += [("forward", forward), ("backward", backward)]
    return order + [("backward", b) for b in backwards[len(forwards) - warmup :]]


def _interleaved_unit(k: int, pp: int, virtual_stages: int, backward: bool) -> tuple[int, int]:
    """(local chunk, micro-batch) of a device's k-th forward or backward in Megatron-LM's interleaved schedule:
    rounds of pp micro-batches go through chunk 0, then chunk 1, ...; backwards visit the chunks in reverse
    (Narayanan et al. SC'21 sec. 2.2.2; megatron/core/pipeline_parallel/schedules.py `get_model_chunk_id`)."""
    in_round = k % (pp * virtual_stages)
    local = in_round // pp
    microbatch = (k // (pp * virtual_stages)) * pp + in_round % pp
    return (virtual_stages - 1 - local if backward else local), microbatch


def device_order(schedule: str, pp: int, virtual_stages: int, microbatches: int, device: int) -> list[tuple]:
    """The (kind, (chunk, micro-batch)) a device runs, in order. 1F1B warms up with the forwards the later
    stages need before the first backward reaches this one: pp - device - 1 (sec. 2.2.1); interleaved, two per
    later device plus a round of pp for each further chunk (Megatron-LM's `num_warmup_microbatches`)."""
    if schedule != "interleaved_1f1b":
        units = [(device, i) for i in range(microbatches)]
        warmup = microbatches if schedule == "gpipe" else min(pp - device - 1, microbatches)
        return _forwards_then_backwards(units, units, warmup)
    if partial_interleaved_round(microbatches, pp):
        raise ValueError(f"interleaved_1f1b runs micro-batches in rounds of pp={pp}; got {microbatches}")
    count = microbatches * virtual_stages

    def units(backward: bool) -> list[tuple[int, int]]:
        local = [_interleaved_unit(k, pp, virtual_stages, backward) for k in range(count)]
        return [(chunk * pp + device, i) for chunk, i in local]

    warmup = min((pp - device - 1) * 2 + (virtual_stages - 1) * pp, count)
    return _forwards_then_backwards(units(False), units(True), warmup)


# ------------------------------------------------------------------------------------------ the graph


def schedule_graph(chunks: list[ChunkTimes], pp: int, schedule: str, microbatches: int, p2p_s: float) -> nx.DiGraph:
    """The task graph of one step. `chunks`: each model chunk's times, in pipeline order (pp x virtual_stages of
    them); `p2p_s`: one activation's (or gradient's) transfer between neighbouring devices."""
    graph = nx.DiGraph()
    graph.add_node(STEP_END, duration_s=0.0)
    for device in range(pp):
        tasks = _device_tasks(chunks, device_order(schedule, pp, len(chunks) // pp, microbatches, device), device)
        for task, duration in tasks:
            graph.add_node(task, duration_s=duration)
        for (before, duration), (after, _) in zip(tasks, tasks[1:], strict=False):
            graph.add_edge(before, after, weight=duration)
        graph.add_edge(tasks[-1][0], STEP_END, weight=tasks[-1][1])
    _add_hand_offs(graph, chunks, pp, microbatches, p2p_s)
    return graph


def _device_tasks(chunks: list[ChunkTimes], order: list[tuple], device: int) -> list[tuple[Task, float]]:
    """A device's tasks with their durations; a backward is preceded by its recompute where there is one."""
    tasks = []
    for kind, (chunk, microbatch) in order:
        times = chunks[chunk]
        if kind == "backward" and times.recompute_s > 0:
            tasks.append((Task(device, chunk, microbatch, "recompute"), times.recompute_s))
        duration = times.forward_s if kind == "forward" else times.backward_s
        tasks.append((Task(device, chunk, microbatch, kind), duration))
    return tasks


def _add_hand_offs(graph: nx.DiGraph, chunks: list[ChunkTimes], pp: int, microbatches: int, p2p_s: float) -> None:
    """Chunk c's forward feeds chunk c + 1's; chunk c + 1's backward feeds chunk c's recompute (a checkpointed
    chunk re-runs its forward once the gradient arrives) or backward; the last chunk turns its forward around
    into its backward on the same device. A hand-off between devices lags by `p2p_s`."""
    last = len(chunks) - 1
    for i in range(microbatches):
        for c in range(last + 1):
            forward = Task(c % pp, c, i, "forward")
            if c < last:
                lag = p2p_s if pp > 1 else 0.0
                _wait(graph, forward, Task((c + 1) % pp, c + 1, i, "forward"), lag)
                _wait(graph, Task((c + 1) % pp, c + 1, i, "backward"), _backward_entry(graph, c, pp, i), lag)
            else:
                _wait(graph, forward, _backward_entry(graph, c, pp, i), 0.0)


def _backward_entry(graph: nx.DiGraph, chunk: int, pp: int, microbatch: int) -> Task:
    recompute = Task(chunk % pp, chunk, microbatch, "recompute")
    return recompute if recompute in graph else Task(chunk % pp, chunk, microbatch, "backward")


def _wait(graph: nx.DiGraph, before: Task, after: Task, lag_s: float) -> None:
    """`after` starts no earlier than `lag_s` after `before` ends (an edge already there keeps the larger)."""
    weight = graph.nodes[before]["duration_s"] + lag_s
    if graph.has_edge(before, after):
        weight = max(weight, graph.edges[before, after]["weight"])
    graph.add_edge(before, after, weight=weight)


# ----------------------------------------------------------------------------------------- answers


def pipeline_time_s(graph: nx.DiGraph) -> float:
    """The step's pipeline time: the longest path, every task's duration and every hand-off's lag on it."""
    return float(nx.dag_longest_path_length(graph, weight="weight", default_weight=0.0))


def critical_path(graph: nx.DiGraph) -> list[Task]:
    """The tasks on the longest path, in order: what to shorten to shorten the step."""
    return [task for task in nx.dag_longest_path(graph, weight="weight", default_weight=0.0) if task != STEP_END]


def timeline(graph: nx.DiGraph) -> list[TimelineTask]:
    """Every task with its start and end, each as early as what it waits for allows, by device then start."""
    end_s: dict = {}
    found = []
    for task in nx.topological_sort(graph):
        start = max((end_s[before] + lag_s(graph, before, task) for before in graph.predecessors(task)), default=0.0)
        end_s[task] = start + graph.nodes[task]["duration_s"]
        if task != STEP_END:
            found.append(TimelineTask(task.device, task.microbatch, task.chunk, task.kind, start, end_s[task]))
    return sorted(found, key=lambda t: (t.device, t.start_s, t.chunk))


def lag_s(graph: nx.DiGraph, before: Task, after: Task) -> float:
    """The wait an edge adds beyond its source's duration: the transfer of a hand-off, 0 on a device."""
    return graph.edges[before, after]["weight"] - graph.nodes[before]["duration_s"]


# --------------------------------------------------------------------------------------- from a plan


def plan_schedule_graph(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    plan: ParallelPlan,
    measured: ProfileCosts | None = None,
) -> nx.DiGraph:
    """The task graph of a plan's step, from the layer costs the estimate uses (planner/cost/layers.py; `measured`:
    the request's profile), a mixture of experts' all-to-alls (planner/cost/expert.py) and its pipeline neighbours'
    channel. Not modelled here: a calibrated profile's
    per-micro-batch overhead and the lighter times of a rank computing alone (cost/step.py's
    `microbatches_alone`)."""
    return schedule_graph(
        plan_chunk_times(model, training, cluster, plan, measured),
        plan.pp,
        plan.schedule,
        plan.num_microbatches(training),
        plan_p2p_s(model, training, cluster, plan, measured),
    )


def plan_chunk_times(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    plan: ParallelPlan,
    measured: ProfileCosts | None = None,
) -> list[ChunkTimes]:
    """Each chunk's times: its blocks', plus the embedding's on the first chunk and the head's on the last. A
    mixture of experts' block also runs its dispatch and combine all-to-alls (`plan_ep_layer_comm_s`), which the
    step's `ep_comm_s` charges per block and micro-batch too (planner/cost/step.py)."""
    kinds = layer_kinds(model, training, cluster, plan, measured=measured)
    counts = plan.stage_layer_counts(model.num_layers)
    block = layer_phases(kinds.block, plan_ep_layer_comm_s(model, training, cluster, plan, measured))
    times = [ChunkTimes(n * block.forward_s, n * block.backward_s, n * block.recompute_s) for n in counts]
    times[0] = _plus(times[0], layer_phases(kinds.embedding))
    times[-1] = _plus(times[-1], layer_phases(kinds.head))
    return times


def layer_phases(cost: LayerCost, all_to_alls_s: float = 0.0) -> ChunkTimes:
    """A layer's busy time split into forward, backward and recompute. Its TP and CP communication, and a MoE
    block's all-to-alls (`all_to_alls_s`, per micro-batch: planner/cost/expert.py), run inside those phases; they
    are shared among them in proportion to their compute, which keeps each chunk's total busy time the cost
    model's (the pipeline's time depends on the split only through the bubble's shape)."""
    work = cost.forward_s + cost.backward_s + cost.recompute_s
    scale = 1.0 + (cost.tp_comm_s + cost.cp_comm_s + all_to_alls_s) / work if work > 0 else 1.0
    return ChunkTimes(cost.forward_s * scale, cost.backward_s * scale, cost.recompute_s * scale)


def _plus(a: ChunkTimes, b: ChunkTimes) -> ChunkTimes:
    return ChunkTimes(a.forward_s + b.forward_s, a.backward_s + b.backward_s, a.recompute_s + b.recompute_s)


def plan_p2p_s(
    model: ModelSpec,
    training: TrainingSpec,
    cluster: ClusterSpec,
    plan: ParallelPlan,
    measured: ProfileCosts | None = None,
) -> float:
    """One activation hand-off between pipeline neighbours (the bytes and channel cost/step.py's `pp_comm_s`
    charges per transfer); 0 without a pipeline."""
    if plan.pp == 1:
        return 0.0
    channel = comm.p2p_channel(cluster, placement("pp", plan.degrees, cluster.gpus_per_node), measured)
    activation = p2p_activation_bytes(model, training, plan.micro_batch_size, plan.cp, plan.tp)
    return float(comm.p2p_s(activation, channel))
