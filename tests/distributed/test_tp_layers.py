"""Layers timed on tensor-parallel ranks (profiler/tp_layers.py): two real gloo workers under torchrun time the
executor's tensor-parallel model of a tiny Llama, and an estimate planned from the result takes TP's collectives
from those layer times instead of adding the fitted ones."""

from __future__ import annotations

import io
import threading

import pytest

pytest.importorskip("torch")

from rich.console import Console  # noqa: E402

import planner  # noqa: E402
from api.profiling import run_tp_layers  # noqa: E402
from planner.profiles import save_profile_json  # noqa: E402
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


def quiet() -> Console:
    return Console(file=io.StringIO())


@pytest.fixture(scope="module")
def measured():
    return run_tp_layers(SWEEP, quiet(), threading.Event())


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
    assert estimate.breakdown.tp_comm_s == 0
    assert estimate.sources["tp_comm_s"] == estimate.sources["compute_s"] == "profile"
    block = next(m for m in measured if (m.layer, m.micro_batch_size, m.recompute, m.sequence_parallel)
                 == ("block", 2, "none", True))  # fmt: skip
    per_block = block.forward.median_s + block.backward.median_s
    assert estimate.breakdown.compute_s > 2 * TINY.num_layers * per_block  # 2 micro-batches, edges on top
