"""How many collectives FSDP2 issues per step under pipeline parallelism, counted on the executor's real code path.

tests/distributed/pipeline_fsdp_worker.py runs pp=2 x dp=2 plans on 4 gloo ranks (executor/apply.py `apply_plan`,
4 micro-batches a step) and counts, in the second step's schedule step, FSDP2's all-gathers, reduce-scatters and
all-reduces by group. All of them are on the dp group; per FSDP2 unit (parameter group: one per block, plus the
chunk's root where it kept parameters: embeddings on the first stage, norm and head on the last) and per step:

| ZeRO                                           | all-gathers | reduce-scatters | all-reduces |
|------------------------------------------------|-------------|-----------------|-------------|
| 0 (FSDP2 `replicate`)                          | 0           | 0               | 1           |
| 2 (`fully_shard`, reshard_after_forward=False) | 1           | 1               | 0           |
| 3 (`fully_shard`, reshard_after_forward=True)  | m + 1       | 1               | 0           |

on every stage and under 1F1B, GPipe and interleaved 1F1B with at most 3 model chunks per rank. Why (torch 2.13):

- torch/distributed/pipelining/stage.py `backward_maybe_with_nosync`: before every micro-batch's backward of an
  FSDPModule it calls `set_is_last_backward(False)`, `set_reshard_after_backward(False)` and
  `set_requires_gradient_sync(False)` (recursive: every unit of the chunk; fsdp/_fully_shard/_fully_shard.py sets
  `reduce_grads` and `all_reduce_grads`). So `FSDPParamGroup.post_backward` (_fsdp_param_group.py) reduces nothing
  and leaves the parameters unsharded; the gradients accumulate whole in `_unsharded_param.grad` (measured here:
  after every micro-batch each stage holds as many unsharded gradient elements as its parameters have, and no
  sharded ones).
- stage.py `perform_reduce_grad`, once per step after the stage's last backward (schedules.py: ScheduleGPipe and
  Schedule1F1B `_step_microbatches`; the REDUCE_GRAD action of `_add_reduce_grad` for the multi-stage schedules),
  turns both back on and calls `post_backward` for every parameter group, then `_root_post_backward_final_callback`:
  one reduction per unit and step. `foreach_reduce` (_fsdp_collectives.py) reduce-scatters over the shard group
  when it has more than one rank, and all-reduces over the replicate group of `replicate`'s DDPMeshInfo.
- `FSDPParamGroup.unshard` is a no-op when the group is already unsharded (or has an all-gather pending), and issues
  no collective when its shard group has one rank (`replicate`); `pre_forward` and `pre_backward` call it.
  `post_forward` reshards only with reshard_after_forward, and the executor passes it explicitly (executor/parallel/
  data.py), so `_lazy_init` (_fsdp_state.py) leaves the roots resharding too (it exempts them only under the
  default None).
- Hence ZeRO-2: the step's first forward gathers and nothing reshards before `perform_reduce_grad`. ZeRO-3: of a
  stage's 2m actions (m forwards, m backwards, the last a backward), one gathers iff the group is sharded then, that
  is iff it is the first or follows a forward (a forward reshards after itself, a backward does not): 1 + m,
  whatever the order of forwards and backwards (1F1B and GPipe alike). Backward prefetching only moves gathers
  earlier within a backward, in which every unit of the chunk takes part.

Interleaved 1F1B (`ScheduleInterleaved1F1B`, a `_PipelineScheduleRuntime`) also gets UNSHARD / RESHARD actions
from schedules.py `_add_unshard_reshard` (max_active_stages=3): before each action it keeps unsharded the next 3
distinct chunks this rank will run and reshards the others (`FSDPModule.reshard`, a full reshard even under
reshard_after_forward=False). With at most 3 chunks on a rank nothing is evicted: each chunk gets one UNSHARD at the
start and one RESHARD at the end, and the table holds. With more, evicted chunks are gathered again: the counts then
follow the lowered program (`gathers_on_program` replays FSDP2's rules over it), e.g. pp=2, 4 chunks per rank, 4
micro-batches: 1 to 4 gathers per unit at ZeRO-2, 5 or 6 at ZeRO-3; no closed form in (m, pp, v).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from executor import launch  # noqa: E402
from planner.cost.batch import PlanBatch  # noqa: E402
from planner.cost.data import ShardedPasses, sharded_passes  # noqa: E402
from planner.presets import gpu_preset  # noqa: E402
from planner.specs import ClusterSpec, ParallelPlan  # noqa: E402
from tests.distributed.parity_worker import LLAMA, TRAINING  # noqa: E402

LAUNCH_TIMEOUT_S = 240
CLUSTER = ClusterSpec(gpu=gpu_preset("cpu"), gpus_per_node=4)
WORKER = "tests.distributed.pipeline_fsdp_worker"


def _plan(schedule: str, zero_stage: int, virtual_stages: int = 1) -> ParallelPlan:
    # 8 rows a step (parity_worker.TRAINING) over dp=2, micro-batches of 1 row: 4 micro-batches
    return ParallelPlan(pp=2, dp=2, schedule=schedule, zero_stage=zero_stage, virtual_stages=virtual_stages)


# name: (layers, plan). The table's cases: 4 layers, so 2 blocks per stage, or 1 per chunk at 2 chunks per rank.
TABLE_CASES = {
    f"zero{zero}-{schedule}": (4, _plan(schedule, zero, virtual_stages=2 if schedule == "interleaved_1f1b" else 1))
    for zero in (0, 2, 3)
    for schedule in ("1f1b", "gpipe", "interleaved_1f1b")
}
# 4 chunks per rank (8 layers, one per chunk): more than `_add_unshard_reshard` keeps unsharded.
EVICTING_CASES = {f"zero{zero}-interleaved_1f1b-v4": (8, _plan("interleaved_1f1b", zero, 4)) for zero in (0, 2, 3)}
CASES = {**TABLE_CASES, **EVICTING_CASES}


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """Every case's per-rank record (pipeline_fsdp_worker.count_case), from one 4-process launch."""
    root = tmp_path_factory.mktemp("pipeline_fsdp")
    out = root / "counts.json"
    cases = {
        name: {"num_layers": layers, "plan": plan.model_dump(mode="json")} for name, (layers, plan) in CASES.items()
    }
    args = ("--cases", json.dumps(cases), "--out", str(out))
    spec = launch.LaunchSpec(nproc_per_node=4, module=WORKER, args=args, log_dir=root / "logs")
    result = launch.run(spec, timeout_s=LAUNCH_TIMEOUT_S)
    log = result.log_dir / launch.LAUNCHER_LOG
    assert result.ok, log.read_text()[-6000:] if log.is_file() else "(no launcher log)"
    return json.loads(Path(out).read_text())


def per_unit(zero_stage: int, microbatches: int) -> dict[str, int]:
    """The table of the module docstring: FSDP2's collectives per unit and step under a pipeline schedule."""
    if zero_stage == 0:
        return {"all_reduce": 1}
    return {"all_gather_single": 1 if zero_stage == 2 else microbatches + 1, "reduce_scatter_single": 1}


def model_passes(layers: int, plan: ParallelPlan) -> ShardedPasses:
    """The cost model's collectives per unit for a plan measured here (planner/cost/data.py `sharded_passes`)."""
    batch = PlanBatch.of_plan(LLAMA.model_copy(update={"num_layers": layers}), TRAINING, CLUSTER, plan)
    assert batch.fsdp2_pipelined[0, 0]
    return sharded_passes(batch)


def test_the_cost_model_counts_the_tables_collectives() -> None:
    """`sharded_passes` (ZeRO 2/3) and `dp_units` (`replicate`'s one all-reduce a unit) count what the table says,
    for the plans measured here."""
    for name, (layers, plan) in TABLE_CASES.items():
        table = per_unit(plan.zero_stage, plan.num_microbatches(TRAINING))
        if plan.zero_stage == 0:
            assert table == {"all_reduce": 1}
            continue
        passes = model_passes(layers, plan)
        counted = {"all_gather_single": passes.gathers[0, 0], "reduce_scatter_single": passes.scatters[0, 0]}
        assert counted == table, name


def gathers_on_program(program: list[str], zero_stage: int) -> int:
    """All-gathers of one unit of a chunk over its lowered program: UNSHARD, FORWARD and FULL_BACKWARD gather when
    the group is sharded (`FSDPParamGroup.unshard`); FORWARD reshards after itself at ZeRO-3 (`post_forward`);
    RESHARD (`FSDPModule.reshard`) and REDUCE_GRAD (`perform_reduce_grad`'s post_backward) reshard."""
    sharded, gathers = True, 0
    for action in program:
        if action in ("UNSHARD", "FORWARD", "FULL_BACKWARD") and sharded:
            gathers, sharded = gathers + 1, False
        if action in ("RESHARD", "REDUCE_GRAD") or (action == "FORWARD" and zero_stage == 3):
            sharded = True
    return gathers


def _dp_calls(record: dict) -> dict[str, int]:
    """A rank's counted calls on its dp group, by function; it must have made none on another group."""
    assert all(key.endswith("@dp") for key in record["calls"]), record["calls"]
    return {key.removesuffix("@dp"): n for key, n in record["calls"].items()}


def _expected_units(layers: int, plan: ParallelPlan, stage: int) -> int:
    """Blocks of the chunk, plus its root where that kept parameters (embeddings first, norm and head last)."""
    root = stage in (0, plan.num_model_chunks - 1)
    return plan.stage_layer_counts(layers)[stage] + root


@pytest.mark.parametrize("name", list(TABLE_CASES))
def test_collectives_per_unit_follow_the_table(name: str, counted: dict[str, list[dict]]) -> None:
    layers, plan = CASES[name]
    for record in counted[name]:
        stages = {int(index): stage for index, stage in record["stages"].items()}
        units = sum(stage["units"] for stage in stages.values())
        assert {index: stage["units"] for index, stage in stages.items()} == {
            index: _expected_units(layers, plan, index) for index in stages
        }
        assert record["microbatches"] == 4
        expected = {op: n * units for op, n in per_unit(plan.zero_stage, record["microbatches"]).items()}
        assert _dp_calls(record) == expected, (record["pp_rank"], record["calls"])
        for stage in stages.values():  # the lowered program, where there is one, agrees with the table
            if stage["program"] is not None and plan.zero_stage >= 2:
                assert gathers_on_program(stage["program"], plan.zero_stage) == expected["all_gather_single"] // units


@pytest.mark.parametrize("name", list(EVICTING_CASES))
def test_more_than_three_chunks_per_rank_gather_again(name: str, counted: dict[str, list[dict]]) -> None:
    _, plan = CASES[name]
    for record in counted[name]:
        stages = record["stages"].values()
        units = sum(stage["units"] for stage in stages)
        calls = _dp_calls(record)
        if plan.zero_stage == 0:  # nothing to gather: the evictions cost nothing
            assert calls == {"all_reduce": units}
            continue
        gathers = sum(stage["units"] * gathers_on_program(stage["program"], plan.zero_stage) for stage in stages)
        assert calls == {"all_gather_single": gathers, "reduce_scatter_single": units}, record["calls"]
        assert gathers > units * per_unit(plan.zero_stage, record["microbatches"])["all_gather_single"]
    if plan.zero_stage >= 2:  # the cost model's share of regathered chunks (data.py `pipelined_gathers`)
        measured = [_dp_calls(record)["all_gather_single"] / sum(s["units"] for s in record["stages"].values())
                    for record in counted[name]]  # fmt: skip
        mean = sum(measured) / len(measured)
        assert model_passes(8, plan).gathers[0, 0] == pytest.approx(mean, rel=0.1), measured


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_stay_whole_until_the_step_reduces_them(name: str, counted: dict[str, list[dict]]) -> None:
    """After every micro-batch's backward each stage holds its whole gradient, unsharded, at every ZeRO stage; the
    step's one reduction leaves each rank its shard (all of it under `replicate`)."""
    for record in counted[name]:
        for stage in record["stages"].values():
            whole = {"unsharded": stage["param_elements"], "sharded": 0}
            assert stage["grads_after_backward"] == [whole] * record["microbatches"]
            assert stage["grads_after_step"] == {"unsharded": 0, "sharded": stage["local_param_elements"]}
