"""`--model owner/name`: a Hugging Face Hub id, resolved by huggingface_hub from a cache this test lays out as the
Hub's own cache is (`models--owner--name/refs/main` naming a snapshot that holds config.json), in offline mode: the
machine never reaches the Hub, as on an air-gapped cluster. Each case runs `python -m api.cli` as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from api.commands.hub import looks_like_hub_id

REPO_ROOT = Path(__file__).resolve().parents[2]
LLAMA3_8B_CONFIG = REPO_ROOT / "tests/unit/fixtures/hf_configs/llama3-8b.json"  # as published on the Hub
SNAPSHOT = "8cde5ca8380496c9a6cc7ef3a8b46a0372a1d920"  # any commit hash: refs/main names the snapshot folder
CLUSTER_FLAGS = ["--gpu", "h100-sxm", "--gpus-per-node", "8", "--seq-len", "8192", "--global-batch", "64",
                 "--tp", "4"]  # fmt: skip


def lay_out_cache(cache: Path, repo_id: str, config: Path) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    snapshot = repo / "snapshots" / SNAPSHOT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(config.read_text())


def paraplan(cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_hub_id_reads_the_cached_config_and_estimates_as_the_file_does(tmp_path):
    lay_out_cache(tmp_path, "meta-llama/Meta-Llama-3-8B", LLAMA3_8B_CONFIG)
    by_id = paraplan(tmp_path, "estimate", "--model", "meta-llama/Meta-Llama-3-8B", *CLUSTER_FLAGS, "--json")
    by_file = paraplan(tmp_path, "estimate", "--model", str(LLAMA3_8B_CONFIG), *CLUSTER_FLAGS, "--json")
    assert by_id.returncode == 0, by_id.stderr
    assert by_file.returncode == 0, by_file.stderr
    from_hub, from_file = json.loads(by_id.stdout), json.loads(by_file.stdout)
    assert from_hub["step_time_s"] == from_file["step_time_s"]
    assert from_hub["memory"] == from_file["memory"]
    report = paraplan(tmp_path, "estimate", "--model", "meta-llama/Meta-Llama-3-8B", *CLUSTER_FLAGS)
    assert "meta-llama/Meta-Llama-3-8B" in report.stdout  # the model is named by its id


def test_an_id_neither_cached_nor_reachable_names_the_id_and_the_cache(tmp_path):
    lay_out_cache(tmp_path, "meta-llama/Meta-Llama-3-8B", LLAMA3_8B_CONFIG)
    done = paraplan(tmp_path, "estimate", "--model", "mistralai/Mistral-7B-v0.1", *CLUSTER_FLAGS, "--json")
    assert done.returncode == 1, done.stderr  # bad input
    error = json.loads(done.stdout or done.stderr)["error"]
    assert "mistralai/Mistral-7B-v0.1" in error["message"]
    assert str(tmp_path) in error["message"] and "cannot be reached" in error["message"]
    assert "Traceback" not in done.stderr


def test_which_values_are_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "mine").mkdir(parents=True)
    assert looks_like_hub_id("meta-llama/Llama-3.1-8B")
    assert looks_like_hub_id("Qwen/Qwen2.5-7B-Instruct")
    assert not looks_like_hub_id("llama3-8b")  # a preset
    assert not looks_like_hub_id("configs/mine")  # a folder here: read as a file
    assert not looks_like_hub_id("../x")
    assert not looks_like_hub_id("a/b/c")
    assert not looks_like_hub_id("a/b..c")
