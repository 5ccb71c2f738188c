"""Layers timed on several ranks (profiler/tp_layers.py): two real gloo workers under torchrun time the executor's
tensor-parallel model of a tiny Llama, and an estimate planned from the result takes TP's collectives from those
layer times instead of adding the fitted ones; loaded, both workers time the one-device layers and the optimizer
at once (and the optimizer on DTensor shards, and the wait per meeting of the ranks), and estimates of plans that
keep both ranks busy use those times."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("torch")


import planner  # noqa: E402
from api.commands.profile import run_loaded_layers, run_tp_layers, with_rank_measurements  # noqa: E402
from api.commands.progress import SILENT, Progress  # noqa: E402
from planner.cost.batch import PlanBatch  # noqa: E402
from planner.cost.tensor import tp_step_comm_s  # noqa: E402
from planner.profiles import save_profile_json  # noqa: E402
from planner.request import parse_estimate_request  # noqa: E402
from planner.specs import ModelSpec  # noqa: E402
from profiler.compute import ComputeSweep, profile_compute  # noqa: E402

TINY = ModelSpec(name="llama3-8b", num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
                 ffn_hidden_size=128, vocab_size=256)  # fmt: skip
SWEEP = ComputeSweep(
    model=TINY,
    seq_lens=(32,),
    micro_batch_sizes=(1, 2),
    tps=(1, 2),
    recompute_modes=("none", "full"),
    warmup=1,
    repeats=2,
    threads=1,
    sequence_parallel=(False, True),
)


def quiet() -> Progress:
    return SILENT


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return run_tp_layers(SWEEP, quiet(), threading.Event(), tmp_path_factory.mktemp("tp-layers")).layers


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return run_loaded_layers(SWEEP, 2, quiet(), threading.Event(), tmp_path_factory.mktemp("loaded-layers"))


def test_every_shape_mode_and_sequence_parallel_setting_is_timed_on_two_ranks(measured):
    blocks = {(m.micro_batch_size, m.recompute, m.sequence_parallel) for m in measured if m.layer == "block"}
    assert blocks == {(b, r, sp) for b in (1, 2) for r in ("none", "full") for sp in (False, True)}
    edges = [m for m in measured if m.layer != "block"]
    assert {(m.layer, m.micro_batch_size, m.sequence_parallel) for m in edges} == {
        (kind, b, sp) for kind in ("embedding", "head") for b in (1, 2) for sp in (False, True)
    }
    assert all(m.tp == 2 and m.tp_collectives and m.forward.median_s > 0 and m.backward.median_s > 0 for m in measured)
    assert all(m.saved_bytes > 0 for m in measured if m.layer == "block")


def test_an_estimate_takes_tp_collectives_from_the_layers(measured, tmp_path):
    profile = profile_compute(SWEEP)
    profile = profile.model_copy(update={"layers": [*profile.layers, *measured]})
    path = save_profile_json(profile, tmp_path / "profile.json")
    request = {
        "model": TINY.model_dump(exclude_none=True),
        "training": {"seq_len": 32, "global_batch_size": 4, "precision": "fp32"},
        "cluster": {"gpu": "cpu", "gpus_per_node": 2, "profile": str(path)},
        "plan": {"tp": 2, "micro_batch_size": 2, "sequence_parallel": True},
    }
    estimate = planner.estimate(request)
    # The layers' times hold their collectives: what tp_comm_s keeps is the once-a-step all-reduce of the
    # sequence-parallel norms' gradients, outside the layers.
    req = parse_estimate_request(request)
    batch = PlanBatch.of_plan(req.model, req.training, req.cluster, req.plan, measured=req.measured)
    once_a_step = tp_step_comm_s(batch)[0, 0]
    assert 0 < once_a_step == pytest.approx(estimate.breakdown.tp_comm_s)
    assert estimate.sources["tp_comm_s"] == estimate.sources["compute_s"] == "profile"
    block = next(m for m in measured if (m.layer, m.micro_batch_size, m.recompute, m.sequence_parallel)
                 == ("block", 2, "none", True))  # fmt: skip
    per_block = block.forward.median_s + block.backward.median_s
    assert estimate.breakdown.compute_s > 2 * TINY.num_layers * per_block  # 2 micro-batches, edges on top


def test_loaded_ranks_time_every_one_device_layer_and_the_optimizer(loaded):
    shapes = {(m.layer, m.micro_batch_size, m.recompute) for m in loaded.layers}
    blocks = {("block", b, r) for b in (1, 2) for r in ("none", "full")}
    assert shapes == blocks | {(kind, b, "none") for kind in ("embedding", "head") for b in (1, 2)}
    assert all(m.tp == 1 and not m.tp_collectives and m.concurrent_ranks == 2 for m in loaded.layers)
    assert all(m.forward.median_s > 0 and m.backward.median_s > 0 for m in loaded.layers)
    plain, sharded = loaded.optimizer
    for optimizer in (plain, sharded):
        assert (optimizer.optimizer, optimizer.concurrent_ranks) == ("adamw", 2) and optimizer.time.median_s > 0
    # The sharded step ran on DTensor shards over both ranks: each holds about half the parameters.
    assert (plain.sharded, sharded.sharded) == (False, True)
    assert sharded.num_params == pytest.approx(plain.num_params / 2, rel=0.01)


def test_loaded_ranks_measure_the_wait_per_meeting_at_each_micro_batch_size(loaded):
    waits = loaded.meeting_waits
    assert [(w.micro_batch_size, w.recompute) for w in waits] == [(1, "none"), (2, "none")]
    for wait in waits:
        # A meeting before each block's forward and after each block's backward.
        assert wait.meetings_per_pass == 2 * TINY.num_layers and wait.concurrent_ranks == 2
        assert wait.free.median_s > 0 and wait.synced.median_s > 0 and wait.collective_s > 0 and wait.wait_s >= 0
        assert wait.free.repeats == wait.synced.repeats == SWEEP.repeats * SWEEP.passes


def test_plans_that_keep_both_ranks_busy_are_estimated_from_the_loaded_times(loaded, tmp_path):
    alone = profile_compute(SWEEP)
    path = save_profile_json(with_rank_measurements(alone, loaded), tmp_path / "profile.json")

    def request(gpus_per_node: int, **plan) -> dict:
        return {
            "model": TINY.model_dump(exclude_none=True),
            "training": {"seq_len": 32, "global_batch_size": 4, "precision": "fp32"},
            "cluster": {"gpu": "cpu", "gpus_per_node": gpus_per_node, "profile": str(path)},
            "plan": {"micro_batch_size": 2, **plan},
        }

    def one_device_s(measurements) -> float:
        """Forward + backward of one micro-batch of 2 through the whole tp-1 model: blocks, embedding and head."""
        mine = [m for m in measurements if (m.tp, m.micro_batch_size, m.recompute) == (1, 2, "none")]
        seconds = {m.layer: m.forward.median_s + m.backward.median_s for m in mine}
        return TINY.num_layers * seconds["block"] + seconds["embedding"] + seconds["head"]

    one = planner.estimate(request(1))  # two micro-batches on one rank, alone
    two = planner.estimate(request(2, dp=2, zero_stage=0))  # one micro-batch on each of two busy ranks
    assert one.breakdown.compute_s == pytest.approx(2 * one_device_s(alone.layers))
    assert two.breakdown.compute_s == pytest.approx(one_device_s(loaded.layers))
