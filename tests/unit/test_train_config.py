"""A training run before any process starts: its hyperparameters (`executor/config.py`), the files it keeps in
its output folder, and the checks `executor/prepare.py` makes before writing run.json. No torch."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from executor.config import (
    COMPLETE_MARKER,
    STEP_MARKER,
    RunDir,
    TrainConfig,
    TrainRun,
    parse_step_line,
    step_line,
)
from executor.prepare import RunRefused, prepare_run
from planner.errors import Violation
from planner.request import parse_estimate_request
from tests.train_requests import TINY_REQUEST


def tiny_request(**sections: dict[str, Any]) -> dict[str, Any]:
    """TINY_REQUEST with some fields of its sections replaced (`plan` is replaced whole)."""
    request = copy.deepcopy(TINY_REQUEST)
    for section, fields in sections.items():
        request[section] = dict(fields) if section == "plan" else {**request[section], **fields}
    return request


def tiny_run(request: dict[str, Any] | None = None, **config: Any) -> TrainRun:
    return TrainRun(request=parse_estimate_request(request or TINY_REQUEST), config=TrainConfig(**config))


# ================================================================================= learning-rate schedule


@pytest.mark.parametrize(("steps", "warmup_steps"), [(100, 10), (10, None), (50, 0), (7, 3), (1000, 37), (95, None)])
def test_schedule_warms_up_to_the_peak_then_decays_to_the_floor(steps, warmup_steps):
    config = TrainConfig(steps=steps, warmup_steps=warmup_steps, lr=3e-4, min_lr_ratio=0.1)
    warmup = config.warmup
    rates = [config.learning_rate(step) for step in range(1, steps + 1)]
    floor = config.lr * config.min_lr_ratio

    for step in range(1, warmup + 1):
        assert rates[step - 1] == pytest.approx(config.lr * step / warmup, rel=1e-12)
    assert all(a < b for a, b in zip(rates[:warmup], rates[1:warmup], strict=False)), "warm-up rises linearly"
    if warmup:
        assert rates[warmup - 1] == config.lr, "the warm-up reaches the peak exactly at step `warmup`"
    after = rates[warmup:]
    assert all(b <= a for a, b in zip(after, after[1:], strict=False)), "the decay never rises again"
    assert all(0 < rate <= config.lr for rate in rates[:warmup])
    assert all(floor <= rate <= config.lr for rate in after)
    assert rates[-1] == floor, "the last step runs exactly at lr x min_lr_ratio"


@pytest.mark.parametrize(("lr", "warmup"), [(0.1, 3), (3e-4, 105), (7e-5, 121)])
def test_warmup_peak_is_exactly_lr_for_any_rate(lr, warmup):
    config = TrainConfig(steps=1000, warmup_steps=warmup, lr=lr)
    assert config.learning_rate(warmup) == lr
    assert max(config.learning_rate(step) for step in range(1, 1001)) <= lr


def test_default_warmup_is_a_tenth_of_the_steps():
    config = TrainConfig(steps=95, lr=1e-3)
    assert config.warmup_steps is None
    assert config.warmup == 9
    assert config.learning_rate(1) == pytest.approx(1e-3 / 9)
    assert config.learning_rate(9) == 1e-3
    assert config.learning_rate(10) < 1e-3
    assert TrainConfig(steps=5).warmup == 0  # 5 // 10: no warm-up at all for a very short run


def test_no_warmup_starts_on_the_cosine_without_dividing_by_zero():
    config = TrainConfig(steps=10, warmup_steps=0, lr=1e-3, min_lr_ratio=0.2)
    assert config.warmup == 0
    rates = [config.learning_rate(step) for step in range(1, 11)]
    assert 0.2e-3 < rates[0] < 1e-3
    assert all(b < a for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] == 1e-3 * 0.2
    # A one-step run with the default warm-up (1 // 10 = 0) also has a rate.
    assert TrainConfig(steps=1, lr=1e-3).learning_rate(1) == pytest.approx(1e-4)


def test_min_lr_ratio_one_is_a_constant_rate_after_warmup():
    config = TrainConfig(steps=20, warmup_steps=4, lr=2e-4, min_lr_ratio=1.0)
    assert [config.learning_rate(step) for step in range(4, 21)] == [2e-4] * 17


def test_warmup_as_long_as_the_run_is_allowed():
    config = TrainConfig(steps=10, warmup_steps=10)
    assert config.learning_rate(10) == config.lr


def test_warmup_longer_than_the_run_is_refused_naming_warmup_steps():
    with pytest.raises(ValidationError, match="warmup_steps") as caught:
        TrainConfig(steps=10, warmup_steps=11)
    assert "11" in str(caught.value) and "10" in str(caught.value)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"steps": 10, "lr": 0}, "lr"),
        ({"steps": 10, "lr": -1e-3}, "lr"),
        ({"steps": 10, "min_lr_ratio": 2}, "min_lr_ratio"),
        ({"steps": 10, "min_lr_ratio": -0.1}, "min_lr_ratio"),
        ({"steps": 10, "warmup_steps": -1}, "warmup_steps"),
        ({"steps": 10, "keep_checkpoints": 0}, "keep_checkpoints"),
        ({"steps": 10, "checkpoint_every": -1}, "checkpoint_every"),
        ({"steps": 10, "max_grad_norm": 0}, "max_grad_norm"),
        ({"steps": 10, "device": "tpu"}, "device"),
        ({"steps": 10, "learning_rate": 1e-3}, "learning_rate"),  # extra fields are refused, not ignored
        ({}, "steps"),
    ],
)
def test_bad_values_are_refused_naming_the_field(fields, field):
    with pytest.raises(ValidationError) as caught:
        TrainConfig(**fields)
    assert [error["loc"] for error in caught.value.errors()] == [(field,)]


# ============================================================================================ run folder


def make_checkpoint(run_dir: RunDir, step: int, complete: bool = True) -> Path:
    folder = run_dir.checkpoint_dir(step)
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"shard")
    if complete:
        (folder / COMPLETE_MARKER).write_text("{}")
    return folder


def remaining(run_dir: RunDir) -> list[str]:
    return sorted(path.name for path in run_dir.checkpoints.iterdir())


def test_checkpoint_folders_are_named_by_six_digit_step(tmp_path):
    assert RunDir(tmp_path).checkpoint_dir(42) == tmp_path / "checkpoints" / "step_000042"


def test_only_marked_checkpoints_count(tmp_path):
    run_dir = RunDir(tmp_path)
    assert run_dir.complete_checkpoints() == []
    assert run_dir.latest_checkpoint() is None

    make_checkpoint(run_dir, 5)
    make_checkpoint(run_dir, 10)
    make_checkpoint(run_dir, 20, complete=False)  # the run died while saving
    (run_dir.checkpoints / "step_latest").mkdir()
    (run_dir.checkpoints / "step_latest" / COMPLETE_MARKER).write_text("{}")
    (run_dir.checkpoints / "other").mkdir()
    (run_dir.checkpoints / "other" / COMPLETE_MARKER).write_text("{}")
    (run_dir.checkpoint_dir(30) / COMPLETE_MARKER).mkdir(parents=True)  # a folder, not the marker file

    assert run_dir.complete_checkpoints() == [(5, run_dir.checkpoint_dir(5)), (10, run_dir.checkpoint_dir(10))]
    assert run_dir.latest_checkpoint() == (10, run_dir.checkpoint_dir(10))


def test_complete_checkpoints_sort_by_step_not_by_name(tmp_path):
    run_dir = RunDir(tmp_path)
    for step in (100, 9, 1_000_000, 20):
        make_checkpoint(run_dir, step)
    assert [step for step, _ in run_dir.complete_checkpoints()] == [9, 20, 100, 1_000_000]
    assert run_dir.latest_checkpoint() == (1_000_000, run_dir.checkpoints / "step_1000000")


def test_prune_keeps_the_newest_complete_and_a_save_in_progress(tmp_path):
    run_dir = RunDir(tmp_path)
    for step in (10, 20, 30, 40):
        make_checkpoint(run_dir, step)
    for step in (5, 25, 50):
        make_checkpoint(run_dir, step, complete=False)

    run_dir.prune_checkpoints(keep=2)

    # 10 and 20 are old complete ones; 5 and 25 died while saving, before the oldest kept (30);
    # 50 is newer than every complete checkpoint: a save still in progress.
    assert remaining(run_dir) == ["step_000030", "step_000040", "step_000050"]
    assert run_dir.latest_checkpoint() == (40, run_dir.checkpoint_dir(40))
    assert (run_dir.checkpoint_dir(50) / "__0_0.distcp").is_file()


def test_prune_with_room_to_spare_deletes_nothing(tmp_path):
    run_dir = RunDir(tmp_path)
    make_checkpoint(run_dir, 10)
    make_checkpoint(run_dir, 20)
    make_checkpoint(run_dir, 30, complete=False)
    run_dir.prune_checkpoints(keep=5)
    assert remaining(run_dir) == ["step_000010", "step_000020", "step_000030"]


def test_prune_keep_one(tmp_path):
    run_dir = RunDir(tmp_path)
    for step in (1, 2, 3):
        make_checkpoint(run_dir, step)
    run_dir.prune_checkpoints(keep=1)
    assert remaining(run_dir) == ["step_000003"]


def test_prune_without_a_complete_checkpoint_leaves_incomplete_ones(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.prune_checkpoints(keep=2)  # no checkpoints folder yet
    make_checkpoint(run_dir, 10, complete=False)
    run_dir.prune_checkpoints(keep=2)
    assert remaining(run_dir) == ["step_000010"]


def write_metrics(run_dir: RunDir, steps: range, torn: str = "") -> list[dict[str, Any]]:
    records = [{"step": step, "loss": 5.0 - step / 10, "step_time_s": 0.1} for step in steps]
    run_dir.root.mkdir(parents=True, exist_ok=True)
    run_dir.metrics_file.write_text("".join(json.dumps(record) + "\n" for record in records) + torn)
    return records


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    run_dir = RunDir(tmp_path)
    assert run_dir.read_metrics() == []
    records = write_metrics(run_dir, range(1, 4), torn='{"step": 4, "loss": 4.')
    assert run_dir.read_metrics() == records


def test_truncate_metrics_keeps_the_steps_up_to_the_checkpoint(tmp_path):
    run_dir = RunDir(tmp_path)
    records = write_metrics(run_dir, range(1, 6), torn='{"step": 6, "lo')
    run_dir.truncate_metrics(3)
    assert run_dir.read_metrics() == records[:3]
    # The file stays one record per line, so the resumed run's lines append cleanly.
    with run_dir.metrics_file.open("a") as metrics:
        metrics.write(json.dumps({"step": 4, "loss": 1.0}) + "\n")
    assert [record["step"] for record in run_dir.read_metrics()] == [1, 2, 3, 4]

    run_dir.truncate_metrics(0)
    assert run_dir.read_metrics() == []


# ============================================================================================ step lines


RECORD = {"step": 7, "loss": 3.25, "tokens_per_s": 12345.5, "peak_memory_bytes": 2**31, "note": "a b"}


def test_step_line_round_trips():
    line = step_line(RECORD)
    assert line.startswith(STEP_MARKER) and "\n" not in line
    assert parse_step_line(line) == RECORD
    assert parse_step_line(line + "\n") == RECORD


def test_step_line_behind_a_torchrun_prefix():
    assert parse_step_line("[default0]:" + step_line(RECORD)) == RECORD


@pytest.mark.parametrize(
    "line",
    [
        "",
        "step 7 loss 3.25",
        "[default0]:paraplan: saved checkpoint at step 10",
        "paraplan.step",  # the marker is the word and its trailing space
        'paraplan.step {"step": 7, "loss"',
        "paraplan.step not json",
        "paraplan.step [1, 2]",
        "paraplan.step 7",
        'paraplan.step "text"',
        "paraplan.step null",
    ],
)
def test_other_lines_are_not_step_records(line):
    assert parse_step_line(line) is None


# ======================================================================================== resuming a run


def test_identical_runs_are_the_same_training():
    run = tiny_run(steps=100)
    assert run.same_training_as(tiny_run(steps=100)) == []
    assert run.same_training_as(run) == []


def test_steps_and_checkpointing_may_change_on_resume():
    run = tiny_run(steps=100, warmup_steps=10, checkpoint_every=5, keep_checkpoints=2)
    longer = tiny_run(steps=300, warmup_steps=10, checkpoint_every=50, keep_checkpoints=7)
    assert run.same_training_as(longer) == []
    assert longer.same_training_as(run) == []


def test_same_effective_warmup_is_the_same_training():
    assert tiny_run(steps=100).same_training_as(tiny_run(steps=200, warmup_steps=10)) == []
    assert tiny_run(steps=100, warmup_steps=10).same_training_as(tiny_run(steps=109)) == []


def test_a_different_plan_is_named():
    other = tiny_request(plan={"dp": 2, "zero_stage": 2})
    assert tiny_run(steps=100).same_training_as(tiny_run(other, steps=100)) == ["request.plan"]


def test_different_model_and_plan_are_both_named():
    other = tiny_request(model={"num_layers": 2}, plan={"dp": 2, "zero_stage": 2})
    assert sorted(tiny_run(steps=10).same_training_as(tiny_run(other, steps=10))) == ["request.model", "request.plan"]


def test_a_different_learning_rate_is_named():
    assert tiny_run(steps=100).same_training_as(tiny_run(steps=100, lr=1e-3)) == ["config.lr"]


@pytest.mark.parametrize(
    ("change", "field"), [({"seed": 1}, "config.seed"), ({"min_lr_ratio": 0.5}, "config.min_lr_ratio")]
)
def test_other_hyperparameters_are_named(change, field):
    assert tiny_run(steps=100).same_training_as(tiny_run(steps=100, **change)) == [field]


def test_a_different_effective_warmup_is_named():
    # warmup_steps left unset is 10% of steps, so a longer run would re-shape the schedule it resumes on.
    assert tiny_run(steps=100).same_training_as(tiny_run(steps=200)) == ["config.warmup_steps"]
    assert tiny_run(steps=100, warmup_steps=10).same_training_as(tiny_run(steps=100, warmup_steps=20)) == [
        "config.warmup_steps"
    ]


# ================================================================================================ prepare


def test_prepare_writes_the_run_it_returns(tmp_path):
    out = tmp_path / "out"
    config = TrainConfig(steps=5, seed=3)
    run = prepare_run(TINY_REQUEST, config, out, nproc=2)
    assert run.request == parse_estimate_request(TINY_REQUEST)
    assert run.config == config
    assert (out / "run.json").is_file()
    assert RunDir(out).read_run() == run


def test_prepare_without_nproc_takes_the_plan_at_its_word(tmp_path):
    run = prepare_run(TINY_REQUEST, TrainConfig(steps=5), tmp_path / "out")
    assert run.request.plan.num_gpus == 2


def test_prepare_resolves_the_data_path(tmp_path, monkeypatch):
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 3)
    monkeypatch.chdir(tmp_path)
    run = prepare_run(TINY_REQUEST, TrainConfig(steps=5, data=Path("corpus.txt")), tmp_path / "out", nproc=2)
    assert run.config.data is not None and run.config.data.is_absolute()
    assert run.config.data == (tmp_path / "corpus.txt").resolve()
    assert RunDir(tmp_path / "out").read_run() == run


def test_prepare_into_an_existing_empty_folder(tmp_path):
    prepare_run(TINY_REQUEST, TrainConfig(steps=5), tmp_path, nproc=2)
    assert RunDir(tmp_path).read_run().config.steps == 5


def refusal(request: dict[str, Any], config: TrainConfig, out: Path, **kwargs: Any) -> list[tuple[str, str]]:
    """(field, code) of each reason prepare_run gives; checks that run.json was left as it was."""
    before = out.joinpath("run.json").read_bytes() if out.joinpath("run.json").is_file() else None
    with pytest.raises(RunRefused) as caught:
        prepare_run(request, config, out, **kwargs)
    after = out.joinpath("run.json").read_bytes() if out.joinpath("run.json").is_file() else None
    assert after == before, "a refused run must not write run.json"
    violations = caught.value.violations
    assert violations and all(isinstance(v, Violation) and v.message for v in violations)
    text = str(caught.value)
    assert text.startswith("cannot start this training run")
    assert all(f"{v.field}: {v.message}" in text for v in violations)
    return [(v.field, v.code) for v in violations]


def test_nproc_must_match_the_plan(tmp_path):
    found = refusal(TINY_REQUEST, TrainConfig(steps=5), tmp_path / "out", nproc=3)
    assert found == [("nproc", "nproc_differs_from_plan")]
    assert not (tmp_path / "out").exists()


def test_missing_data_file(tmp_path):
    config = TrainConfig(steps=5, data=tmp_path / "missing.txt")
    assert refusal(TINY_REQUEST, config, tmp_path / "out", nproc=2) == [("data", "data_missing")]


def test_data_file_shorter_than_one_window(tmp_path):
    (tmp_path / "short.txt").write_bytes(b"hello")
    config = TrainConfig(steps=5, data=tmp_path / "short.txt")
    assert refusal(TINY_REQUEST, config, tmp_path / "out", nproc=2) == [("data", "data_too_short")]


def test_data_file_needs_a_byte_vocabulary(tmp_path):
    (tmp_path / "corpus.txt").write_bytes(bytes(range(100)))
    request = tiny_request(model={"vocab_size": 128})
    config = TrainConfig(steps=5, data=tmp_path / "corpus.txt")
    assert refusal(request, config, tmp_path / "out", nproc=2) == [("model.vocab_size", "vocab_too_small_for_bytes")]
    # The synthetic token stream needs no byte vocabulary.
    prepare_run(request, TrainConfig(steps=5), tmp_path / "synthetic", nproc=2)


@pytest.mark.parametrize("left_behind", ["run.json", "metrics.jsonl", "checkpoints"])
def test_an_existing_run_is_not_overwritten(tmp_path, left_behind):
    out = tmp_path / "out"
    prepare_run(TINY_REQUEST, TrainConfig(steps=5), out, nproc=2)
    if left_behind != "run.json":
        (out / "run.json").unlink()
        if left_behind == "checkpoints":
            (out / "checkpoints").mkdir()
        else:
            (out / "metrics.jsonl").write_text("")
    assert refusal(TINY_REQUEST, TrainConfig(steps=9), out, nproc=2) == [("out", "run_exists")]


@pytest.mark.parametrize("exists", [True, False])
def test_nothing_to_resume(tmp_path, exists):
    out = tmp_path / "out"
    if exists:
        out.mkdir()
    assert refusal(TINY_REQUEST, TrainConfig(steps=5), out, nproc=2, resume=True) == [("out", "nothing_to_resume")]


def test_resume_may_run_longer(tmp_path):
    out = tmp_path / "out"
    prepare_run(TINY_REQUEST, TrainConfig(steps=10, warmup_steps=2), out, nproc=2)
    run = prepare_run(TINY_REQUEST, TrainConfig(steps=30, warmup_steps=2), out, nproc=2, resume=True)
    assert RunDir(out).read_run() == run
    assert run.config.steps == 30


def test_resume_refuses_a_different_plan_or_rate(tmp_path):
    out = tmp_path / "out"
    prepare_run(TINY_REQUEST, TrainConfig(steps=10), out, nproc=2)
    other_plan = tiny_request(plan={"dp": 2, "zero_stage": 2})
    found = refusal(other_plan, TrainConfig(steps=10), out, nproc=2, resume=True)
    assert found == [("request.plan", "resume_changes_run")]
    found = refusal(TINY_REQUEST, TrainConfig(steps=10, lr=1e-2), out, nproc=2, resume=True)
    assert found == [("config.lr", "resume_changes_run")]
    assert RunDir(out).read_run().request.plan.zero_stage == 1


def test_executor_refusals(tmp_path):
    # One micro-batch of 8 for two 1F1B stages: torch's Schedule1F1B needs at least pp micro-batches.
    plan = {"dp": 1, "pp": 2, "schedule": "1f1b", "micro_batch_size": 8}
    request = tiny_request(model={"tie_embeddings": True}, plan=plan)
    found = refusal(request, TrainConfig(steps=5), tmp_path / "out", nproc=2)
    assert sorted(found) == [
        ("model.tie_embeddings", "executor_tied_embeddings_pp"),
        ("plan.micro_batch_size", "executor_1f1b_fill"),
    ]


def test_fp16_is_accepted_with_loss_scaling(tmp_path):
    request = tiny_request(training={"precision": "fp16"})
    run = prepare_run(request, TrainConfig(steps=5), tmp_path / "out", nproc=2)
    assert run.request.training.precision == "fp16"


def test_every_problem_is_reported_at_once(tmp_path):
    request = tiny_request(model={"tie_embeddings": True}, plan={"dp": 2, "pp": 2, "micro_batch_size": 4})
    config = TrainConfig(steps=5, data=tmp_path / "missing.txt")
    out = tmp_path / "out"
    found = refusal(request, config, out, nproc=3)
    assert sorted(found) == [
        ("data", "data_missing"),
        ("model.tie_embeddings", "executor_tied_embeddings_pp"),
        ("nproc", "nproc_differs_from_plan"),
        ("plan", "degrees_product"),  # 2 x 1 x 2 x 1 = 4 GPUs on a 2-GPU cluster
        ("plan.micro_batch_size", "executor_1f1b_fill"),  # one micro-batch of 4 per replica, two stages
    ]
    assert not out.exists()


def test_a_field_the_planner_faults_is_not_refused_twice(tmp_path):
    # tp=4 does not divide num_kv_heads=2: the planner's rule and the executor's name the same field.
    request = tiny_request(cluster={"gpus_per_node": 4}, plan={"dp": 1, "tp": 4})
    found = refusal(request, TrainConfig(steps=5), tmp_path / "out", nproc=4)
    assert found == [("plan.tp", "tp_divides_num_kv_heads")]


@pytest.mark.parametrize(
    "request_dict",
    [
        {key: value for key, value in TINY_REQUEST.items() if key != "training"},
        {key: value for key, value in TINY_REQUEST.items() if key != "plan"},
        tiny_request(training={"seq_len": 0}),
    ],
)
def test_a_malformed_request_is_a_validation_error(tmp_path, request_dict):
    with pytest.raises(ValidationError):
        prepare_run(request_dict, TrainConfig(steps=5), tmp_path / "out", nproc=2)
    assert not (tmp_path / "out").exists()
