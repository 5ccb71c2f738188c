"""The technique entries of `paraplan validate`'s grid (api/commands/loop/techniques.py): which plans they add,
the setup each trains, and why one is left out where this machine cannot run it. No torch: the choice is pure;
tests/distributed/test_validate.py runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.cli.validate import technique_names
from api.commands.defaults import VALIDATION_MODEL
from api.commands.loop.techniques import TECHNIQUES, entry_setup, grid, moe_model
from api.commands.validate import ValidateOptions, setup_of
from api.errors import InputError
from planner.specs import ModelSpec


def setup(nproc: int = 2, **options):
    return setup_of(ValidateOptions(nproc=nproc, out=Path("unused"), techniques=TECHNIQUES, **options))


def test_each_entry_adds_its_technique_to_the_data_parallel_plan():
    chosen = setup(mbs=(2, 4))
    entries, skipped = grid(chosen)
    assert skipped == []
    by_technique = {entry.technique: entry for entry in entries if entry.technique}
    assert list(by_technique) == list(TECHNIQUES)  # after the search space's plans, in their order
    assert all(entry.technique is None and entry.setup is chosen for entry in entries[: -len(TECHNIQUES)])
    cp, fp16, offload, ep = (by_technique[name] for name in TECHNIQUES)
    assert (cp.plan.dp, cp.plan.cp, cp.plan.micro_batch_size) == (1, 2, 4)  # the largest listed mbs that divides 8
    assert fp16.setup.request(fp16.plan)["training"]["precision"] == "fp16" and fp16.plan.dp == 2
    assert (offload.plan.zero_stage, offload.plan.offload) == (3, "optimizer_and_params")
    assert ep.plan.ep == 2 and ep.setup.model.num_experts == 4 and ep.setup.model.experts_per_token == 2
    # Only the entries of another precision or model need their own layers profiled.
    assert [e.technique for e in entries if e.own_layers] == ["fp16", "ep"]
    assert cp.setup.model == offload.setup.model == chosen.model


def test_an_entry_this_machine_cannot_run_is_left_out_with_the_reason():
    _, skipped = grid(setup(nproc=1))
    reasons = {left_out.technique: left_out.reason for left_out in skipped}
    assert set(reasons) == {"cp", "ep"}
    assert "even number of ranks" in reasons["cp"]
    assert "ep=2 does not divide the data-parallel group" in reasons["ep"]
    # The planner's and the executor's rules decide: ring attention's zigzag needs 2 x cp chunks of the sequence.
    _, skipped = grid(setup(seq_len=30))
    (left_out,) = skipped
    assert left_out.technique == "cp" and "plan.cp" in left_out.reason


def test_a_mixture_of_experts_is_its_own_ep_model():
    dense = ModelSpec.model_validate(json.loads(VALIDATION_MODEL))
    moe = moe_model(dense)
    assert moe.num_experts == 4 and moe_model(moe) == moe
    assert entry_setup(setup(), "ep").model == moe_model(setup().model)
    with pytest.raises(ValueError, match="unknown technique 'pp'"):
        entry_setup(setup(), "pp")


def test_techniques_flag_takes_names_all_or_none_and_refuses_others():
    assert technique_names("all") == TECHNIQUES and technique_names("none") == ()
    assert technique_names("cp, ep") == ("cp", "ep")
    with pytest.raises(InputError, match="--techniques: unknown 'tp'"):
        setup_of(ValidateOptions(nproc=2, out=Path("unused"), techniques=("tp",)))
    with pytest.raises(InputError, match="each at most once"):
        setup_of(ValidateOptions(nproc=2, out=Path("unused"), techniques=("cp", "cp")))
    assert setup_of(ValidateOptions(nproc=2, out=Path("unused"))).techniques == ()  # opt-in
