"""Published training runs (planner/data/dev-set.json, package data; a copy of ../shared/data/dev-set.json) as
contract requests, with the step time each one measured.

Megatron-LM runs of 2021-22 (Narayanan et al. 2021; Korthikanti et al. 2022) are GPT models in fp16 with
dropout 0.1, eager (non-fused) attention, tied embeddings and no overlap of the gradient all-reduce with
backward (Korthikanti et al. 2022, sec. 6.3). Fields a paper does not publish are filled as stated in
`UNPUBLISHED_DEFAULTS` and reported next to every result.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.cost.flops import narayanan_eq3_flops
from planner.specs import ModelSpec, TrainingSpec

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_PATH = DATA / "dev-set.json"
# Half of vTrain's measured Megatron-LM runs on A100 (Bang et al., MICRO 2024): ../shared/data/dev-vtrain.json.
VTRAIN_PATH = DATA / "dev-vtrain.json"

# Table 1 of Narayanan et al. gives neither the micro-batch size nor the number of interleaved chunks.
# Micro-batch 1 is what the same authors use for the large models (Korthikanti et al. 2022, table 3);
# chunks: the largest count up to 3 that divides the layers per stage (Korthikanti's 175B and 530B runs use 3).
UNPUBLISHED_DEFAULTS = {"micro_batch_size": 1, "max_virtual_stages": 3}


@dataclass(frozen=True)
class PublishedRun:
    id: str
    source: str
    request: dict[str, Any]
    step_time_s: float  # measured, or derived from measured TFLOP/s through Narayanan eq. 3
    filled_in: tuple[str, ...]  # request fields the paper does not publish


def load_records(path: Path = DEFAULT_PATH) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())["records"]


def training_runs(path: Path = DEFAULT_PATH, sources: tuple[str, ...] = ()) -> list[PublishedRun]:
    """Every training_run record with a published time (optionally only ids starting with `sources`)."""
    runs = []
    for record in load_records(path):
        if record["record_type"] != "training_run" or (sources and not record["id"].startswith(sources)):
            continue
        run = published_run(record)
        if run is not None:
            runs.append(run)
    return runs


def published_run(record: dict[str, Any]) -> PublishedRun | None:
    filled: list[str] = []
    request = {
        "model": _model(record["model"]),
        "training": _training(record),
        "cluster": _cluster(record["cluster"]),
        "plan": _plan(record, filled),
    }
    step_time = _published_step_time_s(record, request)
    if step_time is None:
        return None
    return PublishedRun(record["id"], record["source"]["location"], request, step_time, tuple(filled))


def _cluster(cluster: dict[str, Any]) -> dict[str, Any]:
    """A100 nodes of 8 GPUs (fewer where the run used fewer). The network per GPU is the node's, where the record
    states it ("inter 800 Gb/s per node": vTrain's cluster has 4 HDR NICs per node of 8, not a DGX's 8)."""
    gpus = cluster["num_gpus"]
    per_node = min(8, gpus)
    spec: dict[str, Any] = {"gpu": "a100-80gb", "num_nodes": gpus // per_node, "gpus_per_node": per_node}
    node_network = re.search(r"inter (\d+) Gb/s per node", cluster.get("interconnect") or "")
    if node_network:
        spec["inter_node_GBps"] = int(node_network.group(1)) / 8 / 8
    return spec


def _model(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": m["name"],
        "num_layers": m["layers"],
        "hidden_size": m["hidden"],
        "num_attention_heads": m["heads"],
        "num_kv_heads": m["kv_heads"],
        "ffn_hidden_size": m["ffn_hidden"],
        "vocab_size": m["vocab"],
        "mlp": "gelu",
        "norm": "layernorm",
        "tie_embeddings": True,
        "max_position_embeddings": m["seq_len"],
        "dropout": 0.1,
    }


def _training(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq_len": record["model"]["seq_len"],
        "global_batch_size": record["parallel"]["global_batch"] or 1,
        "precision": "fp16",
        "optimizer": "adamw",
        "attention_kernel": "eager",
        # DeepSpeed ran the ZeRO-3 rows (Narayanan et al. 2021, table 2); Megatron-LM every other run.
        "framework": "deepspeed" if "ZeRO-3" in str(record["parallel"]["zero_or_fsdp"]) else "megatron",
    }


def _plan(record: dict[str, Any], filled: list[str]) -> dict[str, Any]:
    par = record["parallel"]
    layers, pp = record["model"]["layers"], par["pp"]
    micro = par["micro_batch"]
    if micro is None:
        micro = UNPUBLISHED_DEFAULTS["micro_batch_size"]
        filled.append(f"micro_batch_size={micro}")
    zero = 3 if "ZeRO-3" in str(par["zero_or_fsdp"]) else 0
    plan: dict[str, Any] = {
        "dp": par["dp"],
        "tp": par["tp"],
        "pp": pp,
        "zero_stage": zero,
        "micro_batch_size": micro,
        "sequence_parallel": bool(par["sequence_parallel"]),
        "recompute": "selective" if str(par["recompute"]).startswith("selective") else "full",
        # DeepSpeed ZeRO-3 overlaps its collectives; Megatron-LM of that time did not.
        "overlap_grad_reduce": zero == 3,
    }
    chunks = _virtual_stages(str(par["schedule"]), layers, pp, filled)
    if chunks > 1:
        plan.update(schedule="interleaved_1f1b", virtual_stages=chunks)
    return plan


def _virtual_stages(schedule: str, layers: int, pp: int, filled: list[str]) -> int:
    if pp == 1 or schedule == "1F1B":  # plain 1F1B, stated (vTrain's runs)
        return 1
    stated = re.search(r"(\d+) (?:model )?chunks", schedule)
    if stated:
        return int(stated.group(1))
    per_stage = layers // pp
    limit = UNPUBLISHED_DEFAULTS["max_virtual_stages"]
    chunks = max(v for v in range(1, limit + 1) if per_stage % v == 0)
    filled.append(f"virtual_stages={chunks}")
    return chunks


def _published_step_time_s(record: dict[str, Any], request: dict[str, Any]) -> float | None:
    measured = record["measured"]
    if measured.get("iteration_time_s"):
        return float(measured["iteration_time_s"])
    if measured.get("tflops_per_gpu"):
        # Narayanan et al. report eq. 3 TFLOP/s per GPU; the step time is F_eq3 / (n * X).
        model = ModelSpec.model_validate(request["model"])
        training = TrainingSpec.model_validate(request["training"])
        gpus = record["cluster"]["num_gpus"]
        return narayanan_eq3_flops(model, training) / (gpus * measured["tflops_per_gpu"] * 1e12)
    return None


@dataclass(frozen=True)
class PublishedLayerTiming:
    """One transformer layer's measured forward + backward (+ recompute) time (Korthikanti et al. 2022, table 4)."""

    id: str
    request: dict[str, Any]  # a one-layer model and the plan it ran under
    measured_s: float


def layer_timings(path: Path = DEFAULT_PATH) -> list[PublishedLayerTiming]:
    timings = []
    for record in load_records(path):
        if record["record_type"] != "layer_timing":
            continue
        par = record["parallel"]
        request = {
            "model": {**_model(record["model"]), "num_layers": 1},
            "training": {**_training(record), "global_batch_size": par["micro_batch"]},
            "cluster": {"gpu": "a100-80gb", "num_nodes": 1, "gpus_per_node": par["tp"]},
            "plan": {
                "tp": par["tp"],
                "micro_batch_size": par["micro_batch"],
                "sequence_parallel": bool(par["sequence_parallel"]),
                "recompute": par["recompute"],
            },
        }
        timings.append(PublishedLayerTiming(record["id"], request, record["measured"]["combined_ms"] / 1e3))
    return timings
