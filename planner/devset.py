"""Published training runs (planner/data/dev-set.json, package data; a copy of ../shared/data/dev-set.json) as
contract requests, with the step time each one measured.

Megatron-LM runs of 2021-22 (Narayanan et al. 2021; Korthikanti et al. 2022) are GPT models in fp16 with
dropout 0.1, eager (non-fused) attention, tied embeddings and no overlap of the gradient all-reduce with
backward (Korthikanti et al. 2022, sec. 6.3). Fields a paper does not publish are filled as stated in
`UNPUBLISHED_DEFAULTS` and reported next to every result.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.cost.flops import hardware_flops_per_step, model_flops_per_step, narayanan_eq3_flops
from planner.cost.runtime import STACKS
from planner.presets import gpu_preset, gpu_preset_for_device
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
    # The peak GPU memory the run published (`measured.memory_gb`, in 10^9 bytes as the dev set's ZeRO example,
    # 7.5B x 16 bytes = 120 GB, counts it); None where it published none.
    peak_memory_bytes: float | None = None


class UnsupportedRecord(ValueError):
    """A published run this loader cannot turn into a request (a GPU with no preset, fp8, ...): the message names
    the record's field and why."""


def load_records(path: Path = DEFAULT_PATH) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())["records"]


def training_runs(path: Path = DEFAULT_PATH, sources: tuple[str, ...] = ()) -> list[PublishedRun]:
    """Every training_run record with a published time (optionally only ids starting with `sources`); records
    the loader cannot express are left out (`unsupported_runs` lists them with the reason)."""
    runs = []
    for record in _training_records(path, sources):
        try:
            run = published_run(record)
        except UnsupportedRecord:
            continue
        if run is not None:
            runs.append(run)
    return runs


def unsupported_runs(path: Path = DEFAULT_PATH, sources: tuple[str, ...] = ()) -> dict[str, str]:
    """id -> why, for the training_run records `training_runs` leaves out as unsupported."""
    reasons = {}
    for record in _training_records(path, sources):
        try:
            published_run(record)
        except UnsupportedRecord as error:
            reasons[record["id"]] = str(error)
    return reasons


def _training_records(path: Path, sources: tuple[str, ...]) -> list[dict[str, Any]]:
    records = load_records(path)
    return [r for r in records if r["record_type"] == "training_run" and (not sources or r["id"].startswith(sources))]


def published_run(record: dict[str, Any]) -> PublishedRun | None:
    """The contract request of one published run and its measured step time; None when it publishes no time.
    UnsupportedRecord when it cannot be expressed, or when a field holds what the schema does not (a number where a
    text belongs, say): one odd record is named and left out, never the end of a file's check."""
    try:
        return _published_run(record)
    except UnsupportedRecord:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as error:
        raise UnsupportedRecord(f"record {record.get('id')!r}: a field the schema does not allow: {error!r}") from error


def _published_run(record: dict[str, Any]) -> PublishedRun | None:
    _require_published(record)
    filled: list[str] = []
    framework, zero_stage = _stack(record)
    request = {
        "model": _model(record["model"], filled),
        "training": _training(record, framework, filled),
        "cluster": _cluster(record["cluster"]),
        "plan": _plan(record, framework, zero_stage, filled),
    }
    step_time = _published_step_time_s(record, request)
    if step_time is None:
        return None
    memory_gb = record["measured"].get("memory_gb")
    peak_memory = float(memory_gb) * 1e9 if memory_gb else None
    return PublishedRun(record["id"], record["source"]["location"], request, step_time, tuple(filled), peak_memory)


# Fields a request cannot do without: a record missing one is refused, naming it.
_REQUIRED = {"model": ("name", "layers", "hidden", "heads", "ffn_hidden", "vocab", "seq_len"), "cluster": ("num_gpus",)}


def _require_published(record: dict[str, Any]) -> None:
    for part, fields in _REQUIRED.items():
        for name in fields:
            if (record.get(part) or {}).get(name) is None:
                raise UnsupportedRecord(f"{part}.{name}: not published")


# ------------------------------------------------------------------------------------------- model


# Families the record's model name tells apart, and what their architectures are (each model card's config.json):
# GPT-style (GPT-2/3, Megatron's GPT, OPT, BLOOM) 4h GeLU MLP, LayerNorm, tied embeddings; Llama-style (Llama 2/3,
# Mistral, Mixtral, Qwen2) SwiGLU, RMSNorm, rotary positions, untied embeddings, no dropout.
_LLAMA_STYLE = re.compile(r"llama|mistral|mixtral|qwen|gemma|deepseek|yi\b|internlm", re.IGNORECASE)
# GPT-NeoX-style models (GPT-NeoX, Pythia, GPT-J, Falcon): rotary positions with a GELU MLP and LayerNorm,
# untied embeddings (their Hugging Face configs: rotary_pct / rotary, tie_word_embeddings false), no dropout.
_ROTARY_GELU = re.compile(r"neox|pythia|gpt-j|falcon", re.IGNORECASE)
# Megatron-LM's GPT runs of 2021-22 train with dropout 0.1 (Narayanan et al. 2021; Korthikanti et al. 2022);
# BLOOM and MPT with none (their config.json: hidden_dropout = attention_dropout = 0.0; resid_pdrop 0.0).
_NO_DROPOUT = re.compile(r"bloom|mpt", re.IGNORECASE)
# Models that are not decoder-only language models: encoder-decoder (T5, BART, UL2), encoder-only (BERT) and
# others that published FSDP runs train (the FSDP paper's DHEN recommendation model, ViT). The cost model's block
# is a causal decoder's.
_NOT_A_DECODER = re.compile(r"\bm?t5\b|t5-|bart|\bul2\b|bert|dhen|dlrm|\bvit\b|encoder", re.IGNORECASE)
# Mixture-of-experts names "<experts>x<size>B" (Mixtral 8x7B, 8x22B): top-2 routing (Jiang et al. 2024).
_EXPERTS_IN_NAME = re.compile(r"(\d+)\s*x\s*\d+(?:\.\d+)?\s*B", re.IGNORECASE)
MIXTRAL_EXPERTS_PER_TOKEN = 2
# Architecture fields a record may state outright; they win over what the name implies.
_STATED_MODEL_FIELDS = ("mlp", "norm", "position_embedding", "tie_embeddings", "qkv_bias", "linear_bias", "dropout")


def _model(m: dict[str, Any], filled: list[str]) -> dict[str, Any]:
    name = str(m["name"])
    if _NOT_A_DECODER.search(name):
        raise UnsupportedRecord(f"model.name: {name!r}: only decoder-only language models are modelled")
    spec = {
        "name": name,
        "num_layers": m["layers"],
        "hidden_size": m["hidden"],
        "num_attention_heads": m["heads"],
        "num_kv_heads": m.get("kv_heads") or m["heads"],
        "ffn_hidden_size": m["ffn_hidden"],
        "vocab_size": m["vocab"],
        "max_position_embeddings": m["seq_len"],
        **_architecture(name),
        **_experts(m, name, filled),
    }
    spec.update({field: m[field] for field in _STATED_MODEL_FIELDS if m.get(field) is not None})
    return spec


def _architecture(name: str) -> dict[str, Any]:
    if _LLAMA_STYLE.search(name):
        return {"mlp": "swiglu", "norm": "rmsnorm", "position_embedding": "rope", "tie_embeddings": False,
                "dropout": 0.0}  # fmt: skip
    if _ROTARY_GELU.search(name):
        return {"mlp": "gelu", "norm": "layernorm", "position_embedding": "rope", "tie_embeddings": False,
                "dropout": 0.0}  # fmt: skip
    dropout = 0.0 if _NO_DROPOUT.search(name) else 0.1
    return {"mlp": "gelu", "norm": "layernorm", "tie_embeddings": True, "dropout": dropout}


def _experts(m: dict[str, Any], name: str, filled: list[str]) -> dict[str, Any]:
    stated = m.get("num_experts") or m.get("experts")
    if stated:
        return {"num_experts": stated, "experts_per_token": m.get("experts_per_token") or m.get("top_k") or 1}
    in_name = _EXPERTS_IN_NAME.search(name)
    if not in_name:
        return {}
    filled.append(f"experts_per_token={MIXTRAL_EXPERTS_PER_TOKEN}")
    return {"num_experts": int(in_name.group(1)), "experts_per_token": MIXTRAL_EXPERTS_PER_TOKEN}


# ------------------------------------------------------------------------------------------- stack


# PyTorch's own data parallelism named without "FSDP": torch.distributed.fsdp.ShardingStrategy's members,
# FSDP2's `fully_shard`, and DistributedDataParallel.
_PYTORCH_SHARDING = r"fsdp|torchtitan|llm-foundry|accelerate|full_shard|shard_grad_op|no_shard|fully_shard|\bddp\b"


def _stack(record: dict[str, Any]) -> tuple[str, int]:
    """(training.framework, plan.zero_stage) from the record's sharding field (or, where that names no stack, from
    the title of its source).

    PyTorch FSDP (torchtitan, llm-foundry, Accelerate): FULL_SHARD (its default) is ZeRO-3, SHARD_GRAD_OP ZeRO-2,
    NO_SHARD plain data parallelism (torch.distributed.fsdp.ShardingStrategy), as is PyTorch's DDP. DeepSpeed, and
    Megatron-DeepSpeed, state their ZeRO stage. Megatron-LM's distributed optimizer shards the optimizer's states:
    ZeRO-1. Hybrid sharding (FSDP's HYBRID_SHARD, HSDP: sharded inside a group, replicated across groups) has no
    plan field: UnsupportedRecord."""
    lowered = _sharding_text(record)
    if re.search(r"hybrid|hsdp", lowered):
        stated = record["parallel"].get("zero_or_fsdp")
        raise UnsupportedRecord(f"parallel.zero_or_fsdp: {stated!r}: hybrid sharding (HSDP) is not modelled")
    stage = re.search(r"zero[- ]?(\d)", lowered)
    if re.search(_PYTORCH_SHARDING, lowered):
        if re.search(r"no_shard|\bddp\b", lowered) or str(record["parallel"].get("zero_or_fsdp")).lower() == "none":
            return "fsdp", 0
        return "fsdp", 2 if "shard_grad_op" in lowered else int(stage.group(1)) if stage else 3
    megatron = "megatron" in lowered or "distributed optimizer" in lowered
    if "deepspeed" in lowered or (stage and not megatron):
        return "deepspeed", int(stage.group(1)) if stage else 0
    return "megatron", 1 if "distributed optimizer" in lowered or stage else 0


def _sharding_text(record: dict[str, Any]) -> str:
    """The record's stack and sharding fields, lower case; where they name no stack, its source's title (the stack
    the source is about)."""
    lowered = f"{record.get('framework') or ''} {record['parallel'].get('zero_or_fsdp') or ''}".lower()
    if not re.search(rf"{_PYTORCH_SHARDING}|hybrid|hsdp|zero|deepspeed|megatron|optimizer", lowered):
        return str(record["source"].get("title") or "").lower()
    return lowered


def _offload(record: dict[str, Any], framework: str) -> str:
    """plan.offload from the sharding field's mention of a CPU offload: FSDP's (CPUOffload / CPUOffloadPolicy) keeps
    the weights, gradients and optimizer step on the CPU together; DeepSpeed's offloads the optimizer (ZeRO-Offload)
    and, where the record names parameters, the weights too (ZeRO-Infinity's `offload_param`); Megatron-LM offloads
    only its optimizer (`--optimizer-cpu-offload`)."""
    lowered = _sharding_text(record)
    if "offload" not in lowered:
        return "none"
    if framework == "fsdp" or (framework == "deepspeed" and "param" in lowered):
        return "optimizer_and_params"
    return "optimizer"


# ---------------------------------------------------------------------------------------- training


def _training(record: dict[str, Any], framework: str, filled: list[str]) -> dict[str, Any]:
    gpu = _gpu(record["cluster"])
    return {
        "seq_len": record["model"]["seq_len"],
        "global_batch_size": _global_batch(record, filled),
        "precision": _precision(record.get("precision"), gpu),
        "optimizer": "adamw",
        "attention_kernel": _attention_kernel(record, framework, gpu),
        "framework": framework,
    }


def _precision(stated: str | None, gpu: str) -> str:
    """bf16 or fp16 as stated; Megatron's "mixed precision (16-bit)" of the A100 papers is fp16 (Narayanan et al.
    2021, sec. 5). Unstated: fp16 on GPUs without bf16 (V100), else bf16."""
    text = (stated or "").lower()
    if "fp8" in text or "float8" in text:
        raise UnsupportedRecord(f"precision: {stated!r}: fp8 GEMMs are not modelled")
    if "bf16" in text or "bfloat16" in text:
        return "bf16"
    if re.search(r"fp16|float16|16-bit|half|mixed", text):
        return "fp16"
    if "fp32" in text or "tf32" in text:
        return "fp32"
    return "fp16" if gpu.startswith("v100") else "bf16"


def _attention_kernel(record: dict[str, Any], framework: str, gpu: str) -> str:
    """flash or eager where the record says; else what each stack ran by default on that GPU: PyTorch's SDPA
    (flash) under FSDP; Megatron-LM and Megatron-DeepSpeed on V100/A100 their eager softmax (flash attention was
    opt-in, `--use-flash-attn`, until Transformer Engine's fused attention, which their Hopper runs use)."""
    text = json.dumps([record["parallel"], record.get("notes"), record["measured"].get("notes")]).lower()
    if "flash" in text:
        return "flash"
    if "eager" in text or "softmax" in text:
        return "eager"
    if framework == "fsdp" or not gpu.startswith(("a100", "v100")):
        return "flash"
    return "eager"


def _global_batch(record: dict[str, Any], filled: list[str]) -> int:
    par = record["parallel"]
    if par.get("global_batch"):
        return int(par["global_batch"])
    if par.get("grad_accum") and par.get("micro_batch"):
        return int(par["grad_accum"] * par["micro_batch"] * _dp(record))
    filled.append("global_batch_size=1")
    return 1


# ----------------------------------------------------------------------------------------- cluster


def _gpu(cluster: dict[str, Any]) -> str:
    name = str(cluster.get("gpu_type") or "")
    preset = gpu_preset_for_device(name)
    if preset is not None:
        return preset
    raise UnsupportedRecord(f"cluster.gpu_type: {name!r} matches no GPU preset")


def _cluster(cluster: dict[str, Any]) -> dict[str, Any]:
    """Nodes of the GPUs per node the record states (8 otherwise; fewer where the run used fewer, and where the
    GPUs do not fill whole nodes of 8, the largest count that divides both). The network per GPU is the node's over
    its GPUs, where the record states it ("inter 800 Gb/s per node": vTrain's cluster has 4 HDR NICs per node of 8,
    not a DGX's 8); else the GPU preset's reference system's."""
    gpus = cluster["num_gpus"]
    interconnect = cluster.get("interconnect") or ""
    stated_per_node = re.search(r"(\d+) GPUs ?(?:per|a|/) ?node", interconnect)
    node_gpus = int(stated_per_node.group(1)) if stated_per_node else 8
    per_node = min(node_gpus, gpus) if stated_per_node or gpus <= node_gpus else math.gcd(node_gpus, gpus)
    spec: dict[str, Any] = {"gpu": _gpu(cluster), "num_nodes": max(1, gpus // per_node), "gpus_per_node": per_node}
    node_gbit_per_s = _node_network_gbit_per_s(interconnect)
    if node_gbit_per_s:
        spec["inter_node_GBps"] = node_gbit_per_s / 8 / per_node
    return spec


# A line rate in bits, however a record writes it: Gb/s, Gbps, Gbit/s (and the same with T).
_GBIT = r"\s*G(?:b/s|bps|bit/s)"
_TBIT = r"\s*T(?:b/s|bps|bit/s)"
# AWS instances' EFA networking, per instance (AWS EC2 accelerated computing instance pages): p4d / p4de 400 Gb/s
# (4 x 100), p5 / p5e / p5en 3,200 Gb/s (32 x 100 on p5; 16 x 200 on p5en).
_AWS_INSTANCE_GBIT = {"p4d": 400.0, "p4de": 400.0, "p5": 3200.0, "p5e": 3200.0, "p5en": 3200.0}


def _node_network_gbit_per_s(interconnect: str) -> float | None:
    """A node's network line rate in Gb/s as the record writes it: "8x200 Gb/s HDR InfiniBand", "4x HDR 200Gbps",
    "8 x ConnectX-7 400 Gb/s" (NICs x rate), "inter 800 Gb/s per node", "3.2 Tb/s", an AWS instance's EFA
    ("p4d.24xlarge", "400 Gbps EFA": EFA is quoted per instance). Bits (Gb/s), not the bytes (GB/s) of NVLink
    figures."""
    nics = re.search(rf"(\d+)\s*[x×]\s*(?:[\w-]+\s+)*?(\d+){_GBIT}", interconnect)
    if nics:
        return float(nics.group(1)) * float(nics.group(2))
    terabits = re.search(rf"(\d+(?:\.\d+)?){_TBIT}", interconnect)
    if terabits:
        return float(terabits.group(1)) * 1000
    per_node = re.search(rf"(\d+(?:\.\d+)?){_GBIT}(?:\s*EFA|\s*per node)", interconnect, re.IGNORECASE)
    if per_node:
        return float(per_node.group(1))
    instance = re.search(r"\b(p4de|p4d|p5en|p5e|p5)\.", interconnect)
    return _AWS_INSTANCE_GBIT[instance.group(1)] if instance else None


# -------------------------------------------------------------------------------------------- plan


def _dp(record: dict[str, Any]) -> int:
    par = record["parallel"]
    if par.get("dp"):
        return int(par["dp"])
    return record["cluster"]["num_gpus"] // ((par.get("tp") or 1) * (par.get("pp") or 1) * (par.get("cp") or 1))


def _plan(record: dict[str, Any], framework: str, zero_stage: int, filled: list[str]) -> dict[str, Any]:
    par = record["parallel"]
    layers, pp = record["model"]["layers"], par.get("pp") or 1
    micro = par.get("micro_batch") or _unpublished_micro_batch(record, framework, pp)
    if not par.get("micro_batch"):
        filled.append(f"micro_batch_size={micro}")
    plan: dict[str, Any] = {
        "dp": _dp(record),
        "tp": par.get("tp") or 1,
        "pp": pp,
        "zero_stage": zero_stage,
        "micro_batch_size": micro,
        "sequence_parallel": bool(par.get("sequence_parallel")),
        "recompute": _recompute(par.get("recompute"), filled),
        # FSDP and DeepSpeed ZeRO-3 overlap their collectives with compute; Megatron-LM of 2021-22 did not.
        "overlap_grad_reduce": framework == "fsdp" or zero_stage == 3,
    }
    if (offload := _offload(record, framework)) != "none":
        plan["offload"] = offload
    plan.update({axis: par[axis] for axis in ("cp", "ep") if (par.get(axis) or 1) > 1})
    schedule = str(par.get("schedule"))
    if pp > 1 and "gpipe" in schedule.lower():
        plan["schedule"] = "gpipe"
        return plan
    chunks = par.get("vp") or _virtual_stages(schedule, layers, pp, framework, filled)
    if chunks > 1:
        plan.update(schedule="interleaved_1f1b", virtual_stages=chunks)
    return plan


def _unpublished_micro_batch(record: dict[str, Any], framework: str, pp: int) -> int:
    """The micro-batch of a run that does not state it: its global batch over dp x the accumulation steps it states;
    without those, one sequence for Megatron-LM and DeepSpeed (`UNPUBLISHED_DEFAULTS`, as their papers' large runs),
    and no accumulation for an FSDP stack without a pipeline (torchtitan's local batch, Accelerate's per-device
    batch and llm-foundry's micro-batch all default to the whole per-rank batch)."""
    par = record["parallel"]
    per_rank = (par.get("global_batch") or 0) // _dp(record)
    if par.get("grad_accum") and per_rank:
        return max(1, per_rank // int(par["grad_accum"]))
    if framework == "fsdp" and pp == 1 and per_rank:
        return per_rank
    return UNPUBLISHED_DEFAULTS["micro_batch_size"]


def _recompute(stated: str | bool | None, filled: list[str]) -> str:
    """selective (each stack's own: Megatron's attention core, torchtitan's per-op policy, "SAC"), none, or full
    (a stated true, "activation checkpointing"). Unstated: full, what Narayanan et al.'s eq. 3 assumes. Schemes that
    checkpoint only some micro-batches or only every n-th block have no plan field: UnsupportedRecord."""
    if isinstance(stated, bool):
        return "full" if stated else "none"
    text = (stated or "").lower()
    if "microbatch-level" in text:  # Korthikanti et al. 2022, appendix C: some micro-batches skip checkpointing
        raise UnsupportedRecord(f"parallel.recompute: {stated!r}: micro-batch-level recomputation is not modelled")
    if re.search(r"every\s+(\d+|other|second)|layer[- ]?(level|wise)|\bpartial\b", text):
        # torchtitan's `selective_ac_option = "2"` and the like: every n-th block checkpointed, the rest kept
        raise UnsupportedRecord(f"parallel.recompute: {stated!r}: checkpointing only some blocks is not modelled")
    if re.search(r"selective|per[- ]?op|op[- ]level|\bsac\b", text):
        return "selective"
    if re.match(r"(none|no\b|off|false|disabled|without)", text):
        return "none"
    if not text:
        filled.append("recompute=full")
    return "full"


def _virtual_stages(schedule: str, layers: int, pp: int, framework: str, filled: list[str]) -> int:
    """Model chunks per stage: as stated; 1 for plain 1F1B, and where the stack does not interleave unless told
    (DeepSpeed's pipeline engine never does; torchtitan's default schedule is 1F1B); for Megatron-LM's runs that
    do not say, the interleaving Narayanan et al. used (`UNPUBLISHED_DEFAULTS`)."""
    interleaved = "interleav" in schedule.lower()
    if pp == 1 or schedule == "1F1B" or (framework != "megatron" and not interleaved):
        return 1
    stated = re.search(r"(\d+) (?:model )?chunks", schedule)
    if stated:
        return int(stated.group(1))
    per_stage = layers // pp
    limit = UNPUBLISHED_DEFAULTS["max_virtual_stages"]
    chunks = max(v for v in range(1, limit + 1) if per_stage % v == 0)
    filled.append(f"virtual_stages={chunks}")
    return chunks


# --------------------------------------------------------------------------------------- step time


def _published_step_time_s(record: dict[str, Any], request: dict[str, Any]) -> float | None:
    """The measured step time, or what the record's measured throughput implies:
    - `iteration_time_s` as published;
    - `tflops_per_gpu` counted by Narayanan et al.'s eq. 3 (recomputation included, what Megatron-LM reports):
      F_eq3 / (n x X); counted as hardware FLOPs otherwise ("incl. recompute", "hardware", "HFU"): the model's
      FLOPs with what the run's recomputation repeats, as its stack's policy repeats it; else as model FLOPs (PaLM's
      convention): model FLOPs / (n x X);
    - `tokens_per_s` (or per GPU), `samples_per_s`: tokens (sequences) per step / throughput;
    - `mfu` alone: model FLOPs / (n x peak x MFU), the peak of the GPU's preset at the run's precision; `hfu` alone
      the same with hardware FLOPs."""
    measured, gpus = record["measured"], record["cluster"]["num_gpus"]
    model = ModelSpec.model_validate(request["model"])
    training = TrainingSpec.model_validate(request["training"])
    if measured.get("iteration_time_s"):
        return float(measured["iteration_time_s"])
    if measured.get("tflops_per_gpu"):
        flops = _counted_flops(str(measured.get("tflops_kind") or "").lower(), model, training, request)
        return flops / (gpus * measured["tflops_per_gpu"] * 1e12)
    tokens_per_s = measured.get("tokens_per_s") or (measured.get("tokens_per_s_per_gpu") or 0) * gpus
    if tokens_per_s:
        return training.tokens_per_step / tokens_per_s
    if measured.get("samples_per_s"):
        return training.global_batch_size / measured["samples_per_s"]
    if measured.get("mfu"):
        return model_flops_per_step(model, training) / (gpus * _peak_flops(request) * measured["mfu"])
    if measured.get("hfu"):
        return _counted_flops("hardware", model, training, request) / (gpus * _peak_flops(request) * measured["hfu"])
    return None


def _peak_flops(request: dict[str, Any]) -> float:
    """The dense peak FLOP/s of the run's GPU preset at its precision."""
    return gpu_preset(request["cluster"]["gpu"]).peak_tflops[request["training"]["precision"]] * 1e12


def _counted_flops(kind: str, model: ModelSpec, training: TrainingSpec, request: dict[str, Any]) -> float:
    """The FLOPs per step a published TFLOP/s figure counts (`_published_step_time_s`)."""
    if "eq" in kind and "3" in kind:
        return narayanan_eq3_flops(model, training)
    if re.search(r"recompute|hardware|hfu", kind):
        policy = STACKS[training.framework].selective_recompute if training.framework in STACKS else "attention_core"
        return hardware_flops_per_step(model, training, request["plan"]["recompute"], policy)
    return model_flops_per_step(model, training)


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
            "model": {**_model(record["model"], []), "num_layers": 1},
            "training": {**_training(record, "megatron", []), "global_batch_size": par["micro_batch"]},
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
