"""The `paraplan` command, run for real: in-process through typer's CliRunner, and once as a subprocess.

Fixtures in fixtures/cli/:
  gpt3-175b.json  the DESIGN.md contract example (Narayanan et al. 2021's 1024-GPU GPT-3 run, interleaved)
  mixed.jsonl     two good requests around a bad one (tp=3 leaves 8 GPUs unfilled)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from api.cli import app

FIXTURES = Path(__file__).parent / "fixtures" / "cli"
REPO_ROOT = Path(__file__).resolve().parents[2]
CONTRACT_FIELDS = {
    "step_time_s", "tokens_per_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "mfu", "fits",
    "num_microbatches", "memory", "breakdown", "why_not_fits", "assumptions",
}  # fmt: skip
GPT3_FLAGS = [
    "--model", "gpt3-175b", "--gpu", "a100-80gb", "--nodes", "128", "--tp", "8", "--pp", "8",
    "--seq-len", "2048", "--global-batch", "1536",
]  # fmt: skip
TINY_LLAMA_HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
}

runner = CliRunner()


def run(*args: str) -> Any:
    return runner.invoke(app, list(args))


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = run(*args, "--json")
    return result.exit_code, json.loads(result.stdout)


def assert_breakdown_adds_up(answer: dict[str, Any]) -> None:
    assert answer["step_time_s"] > 0
    assert math.isclose(sum(answer["breakdown"].values()), answer["step_time_s"], rel_tol=1e-9)


# ------------------------------------------------------------------------------------- estimate: answers


def test_flags_only_json_is_the_contract_with_dp_inferred():
    code, answer = run_json("estimate", *GPT3_FLAGS)
    assert code == 0
    assert answer.keys() >= CONTRACT_FIELDS
    assert_breakdown_adds_up(answer)
    # dp = 1024 GPUs / (tp 8 x pp 8) = 16: 1536 sequences in micro-batches of 1 -> 96 per pipeline.
    assert answer["num_microbatches"] == 96
    assert len(answer["memory"]["by_stage"]) == 8


def test_readable_report_has_headline_breakdown_and_stage_table():
    result = run("estimate", *GPT3_FLAGS, "--zero", "1", "--sp", "--recompute", "selective",
                 "--schedule", "interleaved_1f1b", "--virtual-stages", "3")  # fmt: skip
    assert result.exit_code == 0, result.output
    out = result.output
    assert "gpt3-175b" in out and "174.6B params" in out
    assert "dp16 tp8 pp8 cp1 · ZeRO-1 · mbs 1 · sp · selective recompute · interleaved_1f1b v3" in out
    for label in ("Step time", "Tokens/s per GPU", "MFU", "HFU", "Micro-batches", "pipeline bubble", "% of step"):
        assert label in out
    assert "Memory per GPU, by pipeline stage" in out
    for column in ("params", "grads", "optimizer", "activations", "other", "total", "capacity"):
        assert column in out
    assert "FITS" in out and "DOES NOT FIT" not in out
    assert "Assumptions" in out


def test_json_request_file():
    code, answer = run_json("estimate", str(FIXTURES / "gpt3-175b.json"))
    assert code == 0
    assert_breakdown_adds_up(answer)
    assert answer["fits"] is True


def test_flags_override_the_request_file_and_dp_is_inferred_again():
    # The file says dp 16 for tp 8 x pp 8; with --pp 4 that dp no longer fills 1024 GPUs, so it is re-inferred.
    code, answer = run_json("estimate", str(FIXTURES / "gpt3-175b.json"), "--pp", "4", "--virtual-stages", "6")
    assert code == 0, answer
    assert answer["num_microbatches"] == 1536 // 32
    assert len(answer["memory"]["by_stage"]) == 4


def test_jsonl_answers_every_line_and_fails_for_the_bad_one():
    result = run("estimate", str(FIXTURES / "mixed.jsonl"))
    assert result.exit_code == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3
    assert_breakdown_adds_up(lines[0])
    assert_breakdown_adds_up(lines[2])
    assert lines[1]["line"] == 2
    assert lines[1]["error"]["kind"] == "invalid_plan"
    assert lines[1]["error"]["violations"][0]["code"] == "degrees_product"


def test_model_from_hugging_face_config_file(tmp_path):
    config = tmp_path / "tiny-llama" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(TINY_LLAMA_HF_CONFIG))
    flags = ["--model", str(config), "--gpu", "a100-80gb", "--gpus-per-node", "2", "--seq-len", "512",
             "--global-batch", "8"]  # fmt: skip
    code, answer = run_json("estimate", *flags)
    assert code == 0, answer
    assert_breakdown_adds_up(answer)
    report = run("estimate", *flags).output
    assert "tiny-llama" in report  # named after its folder, as Hub checkouts are


def test_inline_json_model():
    model = json.dumps({"num_layers": 2, "hidden_size": 128, "num_attention_heads": 4, "vocab_size": 1000})
    code, answer = run_json("estimate", "--model", model, "--gpu", "l4", "--gpus-per-node", "1",
                            "--seq-len", "256", "--global-batch", "4")  # fmt: skip
    assert code == 0, answer
    assert answer["num_microbatches"] == 4
    assert_breakdown_adds_up(answer)


def test_a_plan_that_does_not_fit_is_an_answer_that_exits_2():
    result = run("estimate", "--model", "llama3-70b", "--gpu", "h100-sxm", "--tp", "1", "--pp", "1", "--dp", "8",
                 "--zero", "0", "--seq-len", "4096", "--global-batch", "64")  # fmt: skip
    assert result.exit_code == 2  # as `plan` when nothing fits: a script tells it from bad input (1)
    assert "DOES NOT FIT" in result.output
    assert "stage 0 needs" in result.output and "over by" in result.output and "bytes" in result.output


# ---------------------------------------------------------------------------------------- estimate: errors


BROKEN_PLAN = ["--model", "llama3-8b", "--gpu", "h100-sxm", "--gpus-per-node", "14", "--tp", "7",
               "--seq-len", "2048", "--global-batch", "15"]  # fmt: skip


def test_every_broken_rule_is_listed_without_a_traceback():
    result = run("estimate", *BROKEN_PLAN)
    assert result.exit_code == 1
    assert "plan is invalid for this setup:" in result.output
    assert "plan.tp: tp=7 does not divide num_attention_heads=32" in result.output
    assert "training.global_batch_size: global_batch_size=15 is not divisible" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_broken_rules_as_json():
    code, answer = run_json("estimate", *BROKEN_PLAN)
    assert code == 1
    codes = {v["code"] for v in answer["error"]["violations"]}
    assert {"tp_divides_num_attention_heads", "batch_divisible"} <= codes
    assert answer["error"]["kind"] == "invalid_plan"


def test_unknown_model_suggests_the_closest_preset():
    result = run("estimate", "--model", "llama3-8", "--gpu", "h100-sxm", "--seq-len", "2048", "--global-batch", "8")
    assert result.exit_code == 1
    assert "unknown model preset 'llama3-8'" in result.output
    assert "Closest: llama3-8b" in result.output
    code, answer = run_json("estimate", "--model", "llama3-8", "--gpu", "h100-sxm", "--seq-len", "2048",
                            "--global-batch", "8")  # fmt: skip
    assert code == 1 and answer["error"]["kind"] == "unknown_preset" and "llama3-8b" in answer["error"]["closest"]


def test_invalid_fields_are_named_with_their_flags():
    result = run("estimate", "--model", "llama3-8b", "--gpu", "h100-sxm", "--seq-len", "0", "--global-batch", "8",
                 "--precision", "fp8")  # fmt: skip
    assert result.exit_code == 1
    assert "invalid request:" in result.output
    assert "training.seq_len (--seq-len): Input should be greater than or equal to 1" in result.output
    assert "training.precision (--precision)" in result.output


V100_FLAGS = ["--model", "llama3-8b", "--gpu", "v100-sxm2-32gb", "--seq-len", "2048", "--global-batch", "8"]


@pytest.mark.parametrize("command", ["estimate", "plan"])
def test_bf16_on_a_v100_is_refused_naming_the_flag(command: str) -> None:
    result = run(command, *V100_FLAGS, "--precision", "bf16")
    assert result.exit_code == 1
    assert "training.precision (--precision): bf16 is not supported by v100-sxm2-32gb" in result.output
    assert "Traceback" not in result.output
    code, answer = run_json(command, *V100_FLAGS, "--precision", "bf16")
    assert code == 1 and answer["error"]["fields"][0]["field"] == "training.precision"


def test_a_v100_estimate_trains_fp16_and_says_why():
    result = run("estimate", *V100_FLAGS, "--tp", "8")
    assert result.exit_code == 0, result.output
    assert "fp16 (no bf16 on this GPU)" in result.output and "no bf16 tensor cores" in result.output


def test_missing_required_flags_are_named():
    result = run("estimate", "--model", "llama3-8b", "--seq-len", "2048")
    assert result.exit_code == 1
    assert "--gpu" in result.output and "--global-batch" in result.output
    assert "--seq-len" not in result.output


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "no such file"), ('{"model": ', "not valid JSON"), ("[1, 2]", "expected a JSON object")],
)
def test_bad_request_files_are_named(tmp_path, content, problem):
    path = tmp_path / "request.json"
    if content is not None:
        path.write_text(content)
    result = run("estimate", str(path))
    assert result.exit_code == 1
    assert str(path) in result.output and problem in result.output
    code, answer = run_json("estimate", str(path))
    assert code == 1 and problem in answer["error"]["message"]


def test_command_line_syntax_errors_exit_1_not_2():
    assert run("estimate", "--tp", "two").exit_code == 1


# ------------------------------------------------------------------------------------------------ catalog


def test_catalog_models_table_and_json():
    result = run("catalog", "models")
    assert result.exit_code == 0
    assert "gpt3-175b" in result.output and "174.6B" in result.output and "kv heads" in result.output
    rows = json.loads(run("catalog", "models", "--json").stdout)
    llama = next(row for row in rows if row["name"] == "llama3-8b")
    assert llama["num_kv_heads"] == 8 and llama["params"] == 8_030_261_248


def test_catalog_gpus_table_and_json():
    result = run("catalog", "gpus")
    assert result.exit_code == 0
    assert "h100-sxm" in result.output and "989.4" in result.output
    assert "none (fp16 125)" in result.output  # the V100s: no bf16
    rows = json.loads(run("catalog", "gpus", "--json").stdout)
    assert {"a100-80gb", "h100-sxm", "v100-sxm2-32gb", "mi300x"} <= {row["name"] for row in rows}


# --------------------------------------------------------------------------------------------- subprocess


def test_runs_as_a_program_and_imports_neither_torch_nor_fastapi():
    # Runs api.cli as `python -m api.cli` would, then reports which heavy modules the run imported.
    probe = (
        "import runpy, sys\n"
        "try:\n    runpy.run_module('api.cli', run_name='__main__', alter_sys=True)\n"
        "finally:\n    print(sorted(m for m in ('torch', 'fastapi') if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "estimate", *GPT3_FLAGS, "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_breakdown_adds_up(json.loads(done.stdout))
    assert done.stderr.strip() == "[]"


def test_python_dash_m_api_cli():
    done = subprocess.run(
        [sys.executable, "-m", "api.cli", "estimate", *BROKEN_PLAN],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "plan is invalid for this setup:" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------- plan

LLAMA8B_PLAN_FLAGS = ["--model", "llama3-8b", "--gpu", "h100-sxm", "--seq-len", "8192", "--global-batch", "64"]


def test_plan_prints_a_ranked_table_and_the_explanation():
    result = run("plan", *LLAMA8B_PLAN_FLAGS, "--top", "3")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Fastest plans that fit" in out and "Why this plan" in out and "binding constraint" in out
    assert "candidates from" in out and "Left out" in out
    assert "Traceback" not in out


def test_plan_json_is_the_search_contract_with_fixed_flags_kept():
    code, answer = run_json("plan", *LLAMA8B_PLAN_FLAGS, "--top", "2", "--tp", "2")
    assert code == 0
    assert len(answer["plans"]) == 2
    for ranked in answer["plans"]:
        assert ranked["plan"]["tp"] == 2
        assert set(ranked["estimate"]) >= CONTRACT_FIELDS
    assert {"counts", "rejected", "explanation", "timing", "closest", "memory_limit_bytes"} <= set(answer)


def test_plan_takes_a_request_file_and_ignores_its_plan():
    result = run("plan", str(FIXTURES / "gpt3-175b.json"), "--top", "1", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["plans"]) == 1


def test_plan_where_nothing_fits_exits_2_with_the_closest_candidates():
    flags = ["--model", "llama3-405b", "--gpu", "a100-80gb", "--seq-len", "8192", "--global-batch", "16"]
    result = run("plan", *flags)
    assert result.exit_code == 2
    assert "NO PLAN FITS" in result.stdout and "over GiB" in result.stdout and "Traceback" not in result.output
    code, answer = run_json("plan", *flags)
    nearest = answer["closest"][0]  # over the GPU's memory or, offloading, over a node's RAM
    assert code == 2 and answer["plans"] == [] and (nearest["over_bytes"] > 0 or nearest["over_host_bytes"] > 0)


def test_plan_with_contradictory_options_exits_1_naming_the_option():
    result = run("plan", *LLAMA8B_PLAN_FLAGS, "--tp", "3")
    assert result.exit_code == 1
    assert "search.fixed.tp" in result.output and "Traceback" not in result.output


MIXTRAL_FLAGS = ["--model", "mixtral-8x7b", "--gpu", "h100-sxm", "--nodes", "1", "--seq-len", "4096",
                 "--global-batch", "64"]  # fmt: skip


def test_ep_flag_sets_the_plan_s_expert_parallelism_and_plan_keeps_it():
    code, answer = run_json("estimate", *MIXTRAL_FLAGS, "--ep", "8", "--zero", "3")
    assert code in (0, 2), answer
    assert answer["breakdown"]["ep_comm_s"] > 0
    assert_breakdown_adds_up(answer)
    result = run("estimate", *MIXTRAL_FLAGS, "--ep", "8", "--zero", "3")
    assert "ep8" in result.output
    code, answer = run_json("plan", *MIXTRAL_FLAGS, "--ep", "4", "--top", "2")
    assert code == 0 and {ranked["plan"]["ep"] for ranked in answer["plans"]} == {4}
    code, answer = run_json("estimate", *MIXTRAL_FLAGS, "--ep", "3")
    assert code == 1 and "plan.ep" in json.dumps(answer)
