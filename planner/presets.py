"""Named models and GPUs, and Hugging Face `config.json` -> ModelSpec.

Every preset cites where its numbers come from. Model presets copy the published configuration field by
field (tests/unit/test_presets.py checks each total against the published parameter count). GPU presets
hold datasheet peaks (dense, no sparsity) plus the achievable fractions the cost model applies to them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from planner.errors import UnknownPresetError
from planner.specs import GpuSpec, LinkSpec, ModelSpec

# ============================================================================ Hugging Face config.json


def _require(config: dict[str, Any], key: str, model_type: str) -> Any:
    value = config.get(key)
    if value is None:
        raise ValueError(f"{model_type} config.json lacks required field {key!r}")
    return value


def _optional(config: dict[str, Any], key: str, default: Any) -> Any:
    """A field's value, or the architecture's default when the field is absent or null."""
    value = config.get(key)
    return default if value is None else value


def _swiglu_fields(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Llama and its descendants (Mistral, Qwen2, Mixtral) share these field names (transformers LlamaConfig).

    `attention_bias` puts biases on q/k/v *and* o_proj in LlamaAttention; ModelSpec splits biases into
    qkv / everything-else, so an o_proj bias without `mlp_bias` is dropped (h parameters per layer).
    """
    fields = {
        "num_layers": _require(config, "num_hidden_layers", model_type),
        "hidden_size": _require(config, "hidden_size", model_type),
        "num_attention_heads": _require(config, "num_attention_heads", model_type),
        "num_kv_heads": config.get("num_key_value_heads"),  # absent or null: multi-head attention
        "head_dim": config.get("head_dim"),
        "ffn_hidden_size": _require(config, "intermediate_size", model_type),
        "vocab_size": _require(config, "vocab_size", model_type),
        "mlp": "swiglu",
        "norm": "rmsnorm",
        "position_embedding": "rope",
        # Every one of these configs defaults tie_word_embeddings to False (LlamaConfig, MistralConfig,
        # Qwen2Config, MixtralConfig); small Qwen2 models set it to true explicitly.
        "tie_embeddings": bool(_optional(config, "tie_word_embeddings", False)),
        "qkv_bias": bool(_optional(config, "attention_bias", False)),
        "linear_bias": bool(_optional(config, "mlp_bias", False)),
        "dropout": float(_optional(config, "attention_dropout", 0.0)),
    }
    # Left out when absent, not set to None: a field given explicitly counts as the preset's own and would
    # survive overrides of hidden_size or heads (planner.request.resolve_model), instead of following them.
    return {name: value for name, value in fields.items() if value is not None}


def _qwen2_fields(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Qwen2 hard-codes bias=True on q/k/v_proj and bias=False on o_proj and the MLP (modeling_qwen2.py)."""
    return {**_swiglu_fields(config, model_type), "qkv_bias": True, "linear_bias": False}


def _mixtral_fields(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """Mixtral: `num_local_experts` SwiGLU experts per layer, `num_experts_per_tok` active per token."""
    return {
        **_swiglu_fields(config, model_type),
        "num_experts": _require(config, "num_local_experts", model_type),
        "experts_per_token": _require(config, "num_experts_per_tok", model_type),
    }


def _gpt2_fields(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """GPT-2 (transformers GPT2Config): learned positions, biases everywhere, LM head always tied."""
    hidden = _require(config, "n_embd", model_type)
    return {
        "num_layers": _require(config, "n_layer", model_type),
        "hidden_size": hidden,
        "num_attention_heads": _require(config, "n_head", model_type),
        "ffn_hidden_size": _optional(config, "n_inner", 4 * hidden),  # n_inner null means 4h (GPT2MLP)
        "vocab_size": _require(config, "vocab_size", model_type),
        "mlp": "gelu",
        "norm": "layernorm",
        "position_embedding": "learned",
        "max_position_embeddings": _require(config, "n_positions", model_type),
        "tie_embeddings": bool(_optional(config, "tie_word_embeddings", True)),
        "qkv_bias": True,
        "linear_bias": True,
        "dropout": float(_optional(config, "resid_pdrop", 0.1)),  # GPT2Config's default
    }


def _gpt_neox_fields(config: dict[str, Any], model_type: str) -> dict[str, Any]:
    """GPT-NeoX / Pythia: GELU MLP with biases, LayerNorm, rotary positions, untied `embed_out` by default.

    `rotary_pct` and `use_parallel_residual` change the computation, not the parameter count: the parallel
    block still has two LayerNorms (input_layernorm, post_attention_layernorm).
    """
    return {
        "num_layers": _require(config, "num_hidden_layers", model_type),
        "hidden_size": _require(config, "hidden_size", model_type),
        "num_attention_heads": _require(config, "num_attention_heads", model_type),
        "ffn_hidden_size": _require(config, "intermediate_size", model_type),
        "vocab_size": _require(config, "vocab_size", model_type),
        "mlp": "gelu",
        "norm": "layernorm",
        "position_embedding": "rope",
        "tie_embeddings": bool(_optional(config, "tie_word_embeddings", False)),
        "qkv_bias": bool(_optional(config, "attention_bias", True)),  # GPTNeoXConfig default: biases on
        "linear_bias": True,
        "dropout": float(_optional(config, "hidden_dropout", 0.0)),
    }


_HF_READERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "llama": _swiglu_fields,
    "mistral": _swiglu_fields,
    "qwen2": _qwen2_fields,
    "mixtral": _mixtral_fields,
    "gpt2": _gpt2_fields,
    "gpt_neox": _gpt_neox_fields,
}

# Older or hand-written configs may lack model_type; their architectures[0] names the model class.
_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
    "GPT2LMHeadModel": "gpt2",
    "GPTNeoXForCausalLM": "gpt_neox",
}


def _hf_model_type(config: dict[str, Any]) -> str:
    model_type = config.get("model_type")
    if model_type is None:
        architectures = config.get("architectures") or []
        if not architectures:
            raise ValueError("config.json names neither a model_type nor architectures")
        model_type = _HF_ARCHITECTURES.get(str(architectures[0]), str(architectures[0]))
    if model_type not in _HF_READERS:
        supported = ", ".join(sorted(_HF_READERS))
        raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: {supported}")
    return model_type


def model_from_hf_config(config: dict[str, Any]) -> ModelSpec:
    """A ModelSpec from a Hugging Face `config.json` dict (Llama, Mistral, Qwen2, Mixtral, GPT-2, GPT-NeoX).

    Dispatches on `model_type` (else `architectures[0]`); takes the name from `_name_or_path` when present.
    Raises ValueError naming the model_type when it is not supported, or the field when one is missing.
    """
    if not isinstance(config, dict):
        raise ValueError(f"a Hugging Face config must be a JSON object, got {type(config).__name__}")
    model_type = _hf_model_type(config)
    fields = _HF_READERS[model_type](config, model_type)
    return ModelSpec(name=config.get("_name_or_path"), **fields)


# ======================================================================================= model presets


def _megatron_gpt(name: str, num_layers: int, hidden_size: int, num_heads: int) -> ModelSpec:
    """A GPT of Narayanan et al. 2021 (arXiv 2104.04473): Megatron-LM's GPT with GPT-3's architecture.

    Vocabulary 51,200 (GPT-2's 50,257 BPE tokens padded to a multiple of 1024, the V of eq. 2), learned
    positions for s = 2048, FFN 4h, GELU, LayerNorm, biases on every linear layer, LM head tied to the word
    embedding, dropout 0.1 (Megatron-LM's hidden and attention dropout defaults).
    """
    return ModelSpec(
        name=name,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_heads,
        vocab_size=51200,
        mlp="gelu",
        norm="layernorm",
        position_embedding="learned",
        max_position_embeddings=2048,
        tie_embeddings=True,
        qkv_bias=True,
        linear_bias=True,
        dropout=0.1,
    )


def _from_hf(name: str, config: dict[str, Any]) -> ModelSpec:
    return model_from_hf_config(config).model_copy(update={"name": name})


# (layers, hidden, heads) of Narayanan et al. 2021, Table 1 (weak scaling); the published sizes are the
# names. Totals are checked against the paper's eq. 2 in tests/unit/test_presets.py.
_NARAYANAN_TABLE_1 = {
    "gpt3-1.7b": (24, 2304, 24),
    "gpt3-3.6b": (30, 3072, 32),
    "gpt3-7.5b": (36, 4096, 32),
    "gpt3-18.4b": (40, 6144, 48),
    "gpt3-39.1b": (48, 8192, 64),
    "gpt3-76.1b": (60, 10240, 80),
    "gpt3-145.6b": (80, 12288, 96),
    "gpt3-310.1b": (96, 16384, 128),
    "gpt3-529.6b": (105, 20480, 128),
    "gpt3-1t": (128, 25600, 160),
}

# Fields copied from each model's published config.json on the Hugging Face Hub (only the fields that
# shape the parameters; RoPE settings, norm eps and token ids do not).
# fmt: off
_HF_CONFIGS: dict[str, dict[str, Any]] = {
    # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json
    "llama2-7b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    # https://huggingface.co/meta-llama/Llama-2-13b-hf/blob/main/config.json
    "llama2-13b": {
        "model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
        "num_attention_heads": 40, "num_key_value_heads": 40, "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    # https://huggingface.co/meta-llama/Llama-2-70b-hf/blob/main/config.json
    "llama2-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json (LM head tied to the embedding)
    "llama3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json (Llama 3.1 8B: same shape)
    "llama3-8b": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    # https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json (Llama 3.1 70B: same shape)
    "llama3-70b": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    # https://huggingface.co/meta-llama/Llama-3.1-405B/blob/main/config.json; Dubey et al. 2024, Table 3
    "llama3-405b": {
        "model_type": "llama", "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
        "num_attention_heads": 128, "num_key_value_heads": 8, "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
    "mistral-7b": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "tie_word_embeddings": False,
    },
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json (8 SwiGLU experts, top-2; rope theta
    # 1e6 and 32768 positions do not shape the parameters)
    "mixtral-8x7b": {
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
        "tie_word_embeddings": False, "num_local_experts": 8, "num_experts_per_tok": 2,
    },
    # https://huggingface.co/mistralai/Mixtral-8x22B-v0.1/blob/main/config.json (vocabulary 32000; the v0.3 and
    # instruct checkpoints' 32768 adds 9.4M parameters)
    "mixtral-8x22b": {
        "model_type": "mixtral", "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 56,
        "num_attention_heads": 48, "num_key_value_heads": 8, "vocab_size": 32000,
        "tie_word_embeddings": False, "num_local_experts": 8, "num_experts_per_tok": 2,
    },
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json
    "qwen2.5-7b": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
    # https://huggingface.co/Qwen/Qwen2.5-72B/blob/main/config.json
    "qwen2.5-72b": {
        "model_type": "qwen2", "hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}
# fmt: on


def _build_model_presets() -> dict[str, ModelSpec]:
    presets = {name: _megatron_gpt(name, *shape) for name, shape in _NARAYANAN_TABLE_1.items()}
    # GPT-3 175B (Brown et al. 2020, Table 2.1: 96 layers, d_model 12288, 96 heads) with Megatron's padded
    # vocabulary; Narayanan et al. 2021, Table 2, lists it as 174.6B parameters.
    presets["gpt3-175b"] = _megatron_gpt("gpt3-175b", 96, 12288, 96)
    presets.update({name: _from_hf(name, config) for name, config in _HF_CONFIGS.items()})
    return presets


MODEL_PRESETS: dict[str, ModelSpec] = _build_model_presets()


def model_preset(name: str) -> ModelSpec:
    """The named model (case-insensitive); UnknownPresetError lists the closest names."""
    try:
        return MODEL_PRESETS[name.lower()]
    except KeyError:
        raise UnknownPresetError("model", name, list(MODEL_PRESETS)) from None


# ========================================================================================= GPU presets

# Achievable fraction of the dense peak for a transformer's GEMMs. For the A100 it is the least-squares fit
# of the block time model to the five single-layer timings of Korthikanti et al. 2022, table 4
# (planner/calibration.py; tests/validation/test_devset.py recomputes it and fails if this drifts).
A100_MATMUL_EFFICIENCY = 0.744
# Maximum achievable dense bf16 matmul throughput / peak, one benchmark for all GPUs (torch.mm on cuBLAS or
# hipBLASLt, stas00/ml-engineering, compute/accelerator "Maximum Achievable Matmul FLOPS" table; L4 and H100 PCIe
# from zzc0721/torch-performance-test-data issues 120 and 112, the H800 PCIe having the H100 PCIe's compute).
# B200: torch 2.7.1+cu128. MI300X: torch 2.5.1 on ROCm 6.3 with PYTORCH_TUNABLEOP_ENABLED=1, 668.4 of its 1300.
_MAX_ACHIEVABLE_MATMUL = {
    "a100": 271.2 / 312,
    "h100-sxm": 794.5 / 989.4,
    "h100-pcie": 503.8 / 756.5,
    "l4": 70.9 / 121,
    "b200": 1745.0 / 2250,
    "mi300x": 668.4 / 1300,
}


def _matmul_efficiency(gpu: str) -> float:
    """Other GPUs: the A100 calibration scaled by how much of its peak each GPU's cuBLAS reaches relative to the
    A100 in the same benchmark (an assumption until a profile of that GPU measures it)."""
    return round(A100_MATMUL_EFFICIENCY * _MAX_ACHIEVABLE_MATMUL[gpu] / _MAX_ACHIEVABLE_MATMUL["a100"], 3)


# GPUs that the benchmark above never measured (V100, A10, A10G, L40S) take the A100's calibrated fraction
# unchanged: an assumption, until a profile of that GPU (paraplan profile) measures its matmuls.
UNMEASURED_MATMUL_EFFICIENCY = A100_MATMUL_EFFICIENCY

# Hopper (the GH100 of the H100 SXM and the H200), measured: the least-squares fit of the same block time model to the
# executor's device-bound Llama-3.2 1B block timings on an H200 (8 timings of 8,192 tokens a micro-batch, all three
# recompute modes; planner/calibration.py `calibrate_hopper_matmul_efficiency`, within 4% of each;
# tests/validation/test_devset.py fails if this drifts). Well below what the benchmark above implies (0.687): that
# benchmark searches for the fastest square shapes, and these blocks' GEMMs have inner dimensions of 2,048-8,192.
# Wider models' GEMMs may run faster; no measurement of them here. The H100 PCIe scales it by its cuBLAS fraction
# relative to the SXM's; the H20, whose peak is capped far below its SMs', keeps the unmeasured default.
HOPPER_MATMUL_EFFICIENCY = 0.538


def _hopper_matmul_efficiency(gpu: str) -> float:
    return round(HOPPER_MATMUL_EFFICIENCY * _MAX_ACHIEVABLE_MATMUL[gpu] / _MAX_ACHIEVABLE_MATMUL["h100-sxm"], 3)


# Achievable fraction of the dense peak for fused attention (forward + backward) with FlashAttention-2, the
# kernel behind PyTorch's SDPA flash backend and Megatron-LM's / TransformerEngine's default before Hopper builds:
# "50-73% of the theoretical maximum FLOPs/s on A100" (Dao 2023, FlashAttention-2, abstract; the low end at short
# sequences and head size 64): the midpoint, 0.615, until a profile measures it. On Hopper FlashAttention-2
# "achieves only 35% utilization" (Shah et al. 2024, FlashAttention-3, abstract): it has no warp-specialised
# asynchronous pipeline there. GPUs without a published figure take their matmul efficiency.
A100_FLASH_ATTENTION_EFFICIENCY = 0.615
HOPPER_FLASH_ATTENTION_EFFICIENCY = 0.35

# Achievable fraction of the HBM line rate for streaming (element-wise) kernels: BabelStream 5.0 Triad
# 1377.5 GB/s of 1555 GB/s = 0.886 on an A100-SXM4-40GB (ALCF Polaris; argonne-lcf/ALCFBeginnersGuide,
# polaris/examples/BabelStream). Assumed to carry over to the other GPUs until a profile measures them.
DEFAULT_MEMORY_EFFICIENCY = 0.88

# Per-collective latency (the alpha of an alpha-beta model), from small-message nccl-tests all_reduce:
# 2 x A100-SXM4 over NVLink, 32 B: 10.1 us (NVIDIA/nccl#583); 2 nodes x 1 A100 over HDR InfiniBand, 8 B:
# 19.9 us (NVIDIA/nccl-tests#150). PCIe: assumed 20 us, between the NVLink pair and the 42 us that an
# 8-GPU PCIe ring (RTX 4090) shows at 8 B (NVIDIA/nccl#1530).
NVLINK_LATENCY_S = 10e-6
NETWORK_LATENCY_S = 20e-6
PCIE_LATENCY_S = 20e-6

# What each further step of a ring collective adds: NCCL's own model of a ring of n ranks over N nodes is
# baseLat + (steps - inter_steps) x intra-hop latency + inter_steps x network-hop latency, steps = n - 1 for
# all_gather / reduce_scatter (2(n - 1) for all_reduce), inter_steps = N - 1 (2(N - 1)); per hop, for the Simple
# protocol that carries large messages: NVLink 3.4 us, PCI 5.7 us, network 14 us (NVIDIA/nccl
# src/graph/tuning.cc, `hwLatencies` of ncclTunerConstantsDefaults, v2.29; NVLink and PCI unchanged since 2.9,
# whose network hop was 9.6 us). The ring algorithm behind it: Thakur, Rabenseifner & Gropp 2005, (p - 1) alpha.
NVLINK_RING_STEP_LATENCY_S = 3.4e-6
PCIE_RING_STEP_LATENCY_S = 5.7e-6
NETWORK_RING_STEP_LATENCY_S = 14e-6

# Network bus bandwidth / line rate: 86 of 100 GB/s all_reduce busbw between two 8 x A100 nodes with
# 4 x 200 Gb/s HDR (NVIDIA/nccl-tests#175, a user's measurement). Reused for NDR and for Ethernet NICs.
NETWORK_EFFICIENCY = 0.86

_NVLINK3 = LinkSpec(
    name="nvlink3",
    # 12 NVLink3 links x 25 GB/s per direction; all_reduce busbw ~230 GB/s per the NCCL maintainer
    # (NVIDIA/nccl-tests#149; 232.5 GB/s measured in nccl-tests#175): 230 / 300 = 0.77.
    bandwidth_GBps=300.0,
    efficiency=0.77,
    latency_s=NVLINK_LATENCY_S,
    ring_step_latency_s=NVLINK_RING_STEP_LATENCY_S,
    source="A100 datasheet (600 GB/s bidirectional NVLink); NVIDIA/nccl-tests#149",
)
_NVLINK4 = LinkSpec(
    name="nvlink4",
    # 18 NVLink4 links, 450 GB/s per direction; ring busbw ~370 GB/s "with the protocol overhead (~20%)"
    # per the NCCL maintainer (NVIDIA/nccl-tests#212; 365-370 GB/s measured in NVIDIA/nccl#1455):
    # 370 / 450 = 0.82. NVLink SHARP all_reduce reaches 475-480 GB/s busbw on 8 GPUs (nccl-tests#272), a
    # different algorithm that this per-link figure does not model.
    bandwidth_GBps=450.0,
    efficiency=0.82,
    latency_s=NVLINK_LATENCY_S,
    ring_step_latency_s=NVLINK_RING_STEP_LATENCY_S,
    source="H100/H200 datasheets (900 GB/s bidirectional NVLink); NVIDIA/nccl-tests#212",
)

# The export parts for the Chinese market keep their GPU and cut NVLink to 400 GB/s bidirectional, 200 per
# direction: A800 8 NVLink3 links where the A100 has 12, H800 8 NVLink4 links where the H100 has 18 (NVIDIA A800 and
# H800 product pages). Each keeps its generation's protocol efficiency (assumed: no nccl-tests figure at hand).
_NVLINK3_EXPORT = _NVLINK3.model_copy(
    update={"bandwidth_GBps": 200.0, "source": "NVIDIA A800 SXM4 (400 GB/s bidirectional NVLink); A100's efficiency"}
)
_NVLINK4_EXPORT = _NVLINK4.model_copy(
    update={"bandwidth_GBps": 200.0, "source": "NVIDIA H800 SXM5 (400 GB/s bidirectional NVLink); H100's efficiency"}
)

_NVLINK2 = LinkSpec(
    name="nvlink2",
    # V100 SXM2: 6 NVLink2 links x 25 GB/s per direction = 150 (datasheet: 300 GB/s, both directions). In a
    # DGX-1 (and HGX-1) the eight GPUs form a hybrid cube-mesh, not an all-to-all: each GPU's six links go to four
    # of its seven peers, one or two links each. NCCL lays its rings over all of them for a collective over the
    # eight GPUs, which sees this per-GPU rate; a smaller group has only the links among its members (a pair as
    # little as 25 GB/s), which one tier per node cannot express: it is optimistic there.
    # Efficiency: the A100's NVLink ratio (0.77), assumed.
    bandwidth_GBps=150.0,
    efficiency=_NVLINK3.efficiency,
    latency_s=NVLINK_LATENCY_S,
    source="Tesla V100 datasheet (300 GB/s bidirectional NVLink, SXM2); DGX-1 hybrid cube-mesh; efficiency assumed",
)
_NVLINK5 = LinkSpec(
    name="nvlink5",
    # 18 NVLink5 links x 50 GB/s = 900 per direction (1.8 TB/s bidirectional), through NVSwitch: all-to-all.
    # Efficiency: NVLink4's 0.82, assumed until an nccl-tests run on B200 is at hand.
    bandwidth_GBps=900.0,
    efficiency=_NVLINK4.efficiency,
    latency_s=NVLINK_LATENCY_S,
    source="HGX/DGX B200 datasheet (1.8 TB/s bidirectional NVLink per GPU); efficiency assumed as NVLink4's",
)
_INFINITY_FABRIC_MI300X = LinkSpec(
    name="infinity-fabric",
    # An 8-GPU MI300X platform is a full mesh: 7 xGMI links per GPU, one to each peer, 64 GB/s per direction
    # each (datasheet: 128 GB/s per link bidirectional), 448 GB/s per GPU in all. Only a collective over all eight
    # GPUs uses every link; a group of k GPUs reaches (k - 1) x 64 GB/s, which this one tier overstates for k < 8.
    # Efficiency 0.75: 48 of 64 GB/s usable per link after CRC and protocol overhead (AMD ROCm blog,
    # "Understanding RCCL Bandwidth and xGMI Performance on AMD Instinct MI300X", 2025-03-02). Latency: NVLink's,
    # assumed.
    bandwidth_GBps=448.0,
    efficiency=0.75,
    latency_s=NVLINK_LATENCY_S,
    source="AMD Instinct MI300X datasheet and platform (7 x 128 GB/s xGMI); rocm.blogs.amd.com mi300x-rccl-xgmi",
)


def _pcie(generation: int, bandwidth_GBps: float) -> LinkSpec:
    """GPUs without NVSwitch talk over PCIe x16 (per direction: Gen4 32 GB/s, Gen5 64 GB/s).

    Efficiency 0.5 is an assumption: "on PCI systems, the performance you get is usually determined by
    the bandwidth your CPU and memory can deliver" (NCCL maintainer, NVIDIA/nccl#1639, where 8 PCIe Gen5
    GPUs reach 28 GB/s all_reduce busbw = 0.44 of line rate, 4 GPUs 35 GB/s = 0.55).
    """
    return LinkSpec(
        name=f"pcie-gen{generation}-x16",
        bandwidth_GBps=bandwidth_GBps,
        efficiency=0.5,
        latency_s=PCIE_LATENCY_S,
        ring_step_latency_s=PCIE_RING_STEP_LATENCY_S,
        source=f"PCIe Gen{generation} x16 line rate per direction; efficiency per NVIDIA/nccl#1639",
    )


def _network(name: str, gbit_per_s: int, source: str, gpus_per_nic: int = 1) -> LinkSpec:
    """The network bandwidth each GPU sees per direction: its NIC's line rate, shared by `gpus_per_nic` GPUs."""
    return LinkSpec(
        name=name,
        bandwidth_GBps=gbit_per_s / 8 / gpus_per_nic,
        efficiency=NETWORK_EFFICIENCY,
        latency_s=NETWORK_LATENCY_S,
        ring_step_latency_s=NETWORK_RING_STEP_LATENCY_S,
        source=source,
    )


# DGX A100: eight 200 Gb/s HDR InfiniBand HCAs for the compute fabric, one per GPU.
_IB_HDR = _network("ib-hdr-200g", 200, "DGX A100 user guide: 8 x 200 Gb/s HDR InfiniBand, one per GPU")
# DGX H100 / H200: eight 400 Gb/s NDR ConnectX-7 ports for the compute fabric, one per GPU.
_IB_NDR = _network("ib-ndr-400g", 400, "DGX H100/H200 user guide: 8 x 400 Gb/s NDR (ConnectX-7), one per GPU")
# HGX H20 is the HGX H100 board with H20 GPUs; its servers are assumed to carry DGX H100's network.
_IB_NDR_HGX = _IB_NDR.model_copy(update={"source": "assumed: one 400 Gb/s NDR NIC per GPU, as in DGX H100"})
# DGX B200: eight 400 Gb/s ConnectX-7 ports (InfiniBand or Ethernet) for the compute fabric, one per GPU.
_IB_NDR_B200 = _network("ib-ndr-400g", 400, "DGX B200 datasheet: 8 x 400 Gb/s ConnectX-7, one per GPU")
# DGX-1 (V100): four 100 Gb/s EDR InfiniBand ports for eight GPUs, one per pair (as in NVIDIA/nccl-tests#29).
_IB_EDR_DGX1 = _network("ib-edr-100g", 100, "DGX-1 user guide: 4 x 100 Gb/s EDR InfiniBand for 8 GPUs", 2)
# AWS g5.48xlarge: 8 A10G sharing 100 Gb/s of networking (EFA); there is no NVLink in g5 instances.
_AWS_G5_100G = _network("aws-g5-100g", 100, "AWS EC2 G5: g5.48xlarge, 8 x A10G, 100 Gb/s networking", 8)
# MI300X servers: one 400 Gb/s NIC per GPU, as in Azure's ND MI300X v5 (8 x 400 Gb/s InfiniBand); assumed.
_NIC_400G = _network("nic-400g", 400, "assumed: one 400 Gb/s NIC per GPU (Azure ND MI300X v5: 8 x 400 Gb/s)")
# PCIe servers (H100 PCIe, L4, A10, L40S) have no reference design: assume one 200 Gb/s NIC per GPU.
_NIC_200G = _network("nic-200g", 200, "assumed: one 200 Gb/s NIC per GPU (no reference system)")


# gloo between processes on one machine: all_reduce sustains ~1.1 GB/s for large messages with a 0.3-0.5 ms
# floor per collective (shared/notes/torch-distributed-on-cpu.md, section 8c, 2 processes on 2 cores). Both
# tiers are the same shared memory; the rate is already an achieved one, hence efficiency 1.0. No figure for
# what a further ring step adds was measured: 0, the floor stands for any group size.
_GLOO_SHARED_MEMORY = LinkSpec(
    name="shared-memory",
    bandwidth_GBps=1.0,
    efficiency=1.0,
    latency_s=300e-6,
    source="gloo all_reduce, 2 processes on 2 cores: notes/torch-distributed-on-cpu.md section 8c",
)


def _mib(mib: int) -> int:
    """Bytes in `mib` MiB (torch and deviceQuery report device memory in MiB)."""
    return mib * 2**20


def _v100_sxm2(name: str, memory_bytes: int) -> GpuSpec:
    """A V100 SXM2 (16 or 32 GB HBM2; the same GPU otherwise) in a DGX-1. Volta has fp16 tensor cores and no
    bf16: peak_tflops leaves bf16 out, a bf16 request is refused and a request naming no precision is costed in
    fp16 (planner/request.py). Tensor 125 TFLOP/s is dense (Volta has no sparsity); fp32 15.7 on CUDA cores."""
    return GpuSpec(
        name=name,
        sm_count=80,  # Volta whitepaper (NVIDIA Tesla V100 GPU Architecture): 80 SMs on the V100
        memory_bytes=memory_bytes,
        peak_tflops={"fp16": 125.0, "fp32": 15.7},
        hbm_GBps=900.0,
        intra_node=_NVLINK2,
        inter_node=_IB_EDR_DGX1,
        matmul_efficiency=UNMEASURED_MATMUL_EFFICIENCY,
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA Tesla V100 datasheet (tesla-v100-datasheet-letter-fnl-web.pdf), SXM2; DGX-1 user guide",
    )


# memory_bytes is what torch.cuda.get_device_properties(i).total_memory reports (torch prints it in MiB as
# "total_memory=...MB"): the memory a training process can actually allocate from, after what the driver
# keeps for itself (ECC, page tables). The marketed "80 GB" is the physical capacity.
GPU_PRESETS: dict[str, GpuSpec] = {
    "a100-40gb": GpuSpec(
        name="a100-40gb",
        sm_count=108,  # A100 whitepaper (NVIDIA A100 Tensor Core GPU Architecture): 108 SMs
        # deviceQuery: "40339 MBytes (42298834944 bytes)" (bottlerocket-os/bottlerocket#3873).
        memory_bytes=42_298_834_944,
        # Dense tensor-core bf16/fp16 312 TFLOP/s; fp32 is the CUDA-core 19.5 because PyTorch leaves TF32
        # matmuls off by default (torch.backends.cuda.matmul.allow_tf32 = False since 1.12).
        peak_tflops={"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
        hbm_GBps=1555.0,
        intra_node=_NVLINK3,
        inter_node=_IB_HDR,
        matmul_efficiency=_matmul_efficiency("a100"),
        attention_efficiency=A100_FLASH_ATTENTION_EFFICIENCY,
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), SXM4 40GB",
    ),
    "a100-80gb": GpuSpec(
        name="a100-80gb",
        sm_count=108,  # A100 whitepaper (NVIDIA A100 Tensor Core GPU Architecture): 108 SMs
        # A100-SXM4-80GB totalGlobalMem 85,198,045,184 B (81251 MiB), as tabulated in public scheduler code
        # (e.g. a Kubernetes GPU-sharing simulator's per-model memory map) and in deviceQuery output.
        memory_bytes=85_198_045_184,
        peak_tflops={"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
        hbm_GBps=2039.0,  # HBM2e; the 40 GB part has 1555
        intra_node=_NVLINK3,
        inter_node=_IB_HDR,
        matmul_efficiency=_matmul_efficiency("a100"),
        attention_efficiency=A100_FLASH_ATTENTION_EFFICIENCY,
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), SXM4 80GB",
    ),
    "h100-sxm": GpuSpec(
        name="h100-sxm",
        sm_count=132,  # Hopper whitepaper: 132 SMs on H100 SXM5
        # torch 2.7: _CudaDeviceProperties(name='NVIDIA H100 80GB HBM3', total_memory=81089MB).
        memory_bytes=_mib(81089),
        # Hopper whitepaper dense peaks (the datasheet's bf16 1979 assumes 2:4 sparsity); fp32 CUDA cores.
        peak_tflops={"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
        hbm_GBps=3350.0,
        intra_node=_NVLINK4,
        inter_node=_IB_NDR,
        matmul_efficiency=HOPPER_MATMUL_EFFICIENCY,
        attention_efficiency=HOPPER_FLASH_ATTENTION_EFFICIENCY,
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA H100 datasheet (resources.nvidia.com/en-us-tensor-core/"
        "nvidia-tensor-core-gpu-datasheet) and Hopper whitepaper, SXM5 80GB",
    ),
    "h100-pcie": GpuSpec(
        name="h100-pcie",
        sm_count=114,  # H100 PCIe: 114 SMs (Hopper whitepaper)
        # torch: _CudaDeviceProperties(name='NVIDIA H100 PCIe', total_memory=81008MB).
        memory_bytes=_mib(81008),
        # 114 SMs at a lower clock: bf16 1513 with sparsity -> 756.5 dense; fp32 51.2.
        peak_tflops={"bf16": 756.5, "fp16": 756.5, "fp32": 51.2},
        hbm_GBps=2000.0,  # HBM2e, "greater than 2,000 GBps" (H100 PCIe product brief PB-11133-001)
        # NVLink bridges pair PCIe cards at most two by two; an 8-GPU server talks over PCIe Gen5.
        intra_node=_pcie(5, 64.0),
        inter_node=_NIC_200G,
        matmul_efficiency=_hopper_matmul_efficiency("h100-pcie"),
        attention_efficiency=HOPPER_FLASH_ATTENTION_EFFICIENCY,
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA H100 datasheet and H100 PCIe product brief PB-11133-001, PCIe 80GB",
    ),
    "h200": GpuSpec(
        name="h200",
        sm_count=132,  # the H100 SXM's GH100 with its 132 SMs
        # torch: _CudaDeviceProperties(name='NVIDIA H200', total_memory=143156MB) of the marketed 141 GB.
        memory_bytes=_mib(143156),
        # Same GH100 compute as H100 SXM; only the memory changed (141 GB HBM3e at 4.8 TB/s).
        peak_tflops={"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
        hbm_GBps=4800.0,
        intra_node=_NVLINK4,
        inter_node=_IB_NDR,
        matmul_efficiency=HOPPER_MATMUL_EFFICIENCY,
        attention_efficiency=HOPPER_FLASH_ATTENTION_EFFICIENCY,
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA H200 datasheet (nvdam.widen.net/s/nb5zzzsjdf/hpc-datasheet-sc23-h200-datasheet-3002446)",
    ),
    "l4": GpuSpec(
        name="l4",
        sm_count=58,  # Ada whitepaper: L4, 58 SMs (7,424 CUDA cores)
        # deviceQuery: "22518 MBytes (23612293120 bytes)" of the marketed 24 GB GDDR6.
        memory_bytes=23_612_293_120,
        # Datasheet bf16/fp16 tensor 242 with sparsity -> 121 dense; fp32 30.3.
        peak_tflops={"bf16": 121.0, "fp16": 121.0, "fp32": 30.3},
        hbm_GBps=300.0,  # GDDR6, not HBM; the field is the device-memory bandwidth
        intra_node=_pcie(4, 32.0),
        inter_node=_NIC_200G,
        matmul_efficiency=_matmul_efficiency("l4"),
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4), Ada GPU architecture whitepaper v2.1",
    ),
    "l40s": GpuSpec(
        name="l40s",
        sm_count=142,  # L40S: 142 SMs (18,176 CUDA cores, 128 a SM: Ada whitepaper)
        # torch: _CudaDeviceProperties(name='NVIDIA L40S', major=8, minor=9, total_memory=45589MB) of 48 GB GDDR6.
        memory_bytes=_mib(45589),
        # Datasheet bf16/fp16 tensor 733 with sparsity -> 362.05 dense; fp32 91.6.
        peak_tflops={"bf16": 362.05, "fp16": 362.05, "fp32": 91.6},
        hbm_GBps=864.0,  # GDDR6
        intra_node=_pcie(4, 32.0),  # no NVLink
        inter_node=_NIC_200G,
        matmul_efficiency=UNMEASURED_MATMUL_EFFICIENCY,
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s)",
    ),
    "a10": GpuSpec(
        name="a10",
        sm_count=72,  # A10: 72 SMs (9,216 CUDA cores, 128 a SM: GA102, Ampere GA102 whitepaper)
        # deviceQuery: "22599 MBytes (23696375808 bytes)" under driver 12.8 (22516 MiB under 12.2) of 24 GB GDDR6.
        memory_bytes=23_696_375_808,
        # Datasheet bf16/fp16 tensor 250 with sparsity -> 125 dense; fp32 31.2.
        peak_tflops={"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
        hbm_GBps=600.0,  # GDDR6
        intra_node=_pcie(4, 32.0),  # no NVLink
        inter_node=_NIC_200G,
        matmul_efficiency=UNMEASURED_MATMUL_EFFICIENCY,
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA A10 datasheet (nvidia.com/en-us/data-center/products/a10-gpu)",
    ),
    "a10g": GpuSpec(
        name="a10g",
        sm_count=80,  # torch's multi_processor_count=80, above
        # torch 2.15: _CudaDeviceProperties(name='NVIDIA A10G', major=8, minor=6, total_memory=22587MB,
        # multi_processor_count=80) of 24 GB GDDR6.
        memory_bytes=_mib(22587),
        # AWS's variant of the A10 has no public NVIDIA datasheet. Baseten's comparison (baseten.co, "NVIDIA A10
        # vs A10G for ML model inference") has it trading tensor throughput for CUDA-core throughput against the
        # A10; bf16/fp16 70 dense and fp32 35 are the figures quoted for it and agree with its 80 SMs at ~1.71 GHz
        # (assumed) with GA102's consumer tensor rate, 512 dense fp16 FLOP/clock/SM with fp32 accumulation (half
        # the A10's). Not checked against an NVIDIA document: assumed until a profile measures it.
        peak_tflops={"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
        hbm_GBps=600.0,  # GDDR6, as the A10
        intra_node=_pcie(4, 32.0),  # g5 instances have no NVLink
        inter_node=_AWS_G5_100G,
        matmul_efficiency=UNMEASURED_MATMUL_EFFICIENCY,
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="AWS EC2 G5 instances (aws.amazon.com/ec2/instance-types/g5); peaks assumed (no public datasheet)",
    ),
    # deviceQuery: "32510 MBytes (34089730048 bytes)", Tesla V100-SXM2-32GB, driver 11.4.
    "v100-sxm2-32gb": _v100_sxm2("v100-sxm2-32gb", 34_089_730_048),
    # torch: _CudaDeviceProperties(name='Tesla V100-SXM2-16GB', total_memory=16130MB).
    "v100-sxm2-16gb": _v100_sxm2("v100-sxm2-16gb", _mib(16130)),
    "h20": GpuSpec(
        name="h20",
        sm_count=78,  # torch's multi_processor_count=78, above
        # torch: _CudaDeviceProperties(name='NVIDIA H20', major=9, minor=0, total_memory=97285MB,
        # multi_processor_count=78) of 96 GB HBM3.
        memory_bytes=_mib(97285),
        # Hopper with 78 SMs for the Chinese market. NVIDIA publishes no datasheet on nvidia.com; the widely
        # reported specification gives bf16/fp16 148 dense (fp8 296), fp32 44, HBM3 4.0 TB/s, NVLink 900 GB/s.
        peak_tflops={"bf16": 148.0, "fp16": 148.0, "fp32": 44.0},
        hbm_GBps=4000.0,
        intra_node=_NVLINK4,
        inter_node=_IB_NDR_HGX,
        matmul_efficiency=UNMEASURED_MATMUL_EFFICIENCY,
        attention_efficiency=HOPPER_FLASH_ATTENTION_EFFICIENCY,
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA HGX H20 specification as reported (no public NVIDIA datasheet); HGX H100 board layout",
    ),
    "b200": GpuSpec(
        name="b200",
        sm_count=148,  # torch's multi_processor_count=148, above
        # torch: _CudaDeviceProperties(name='NVIDIA B200', major=10, minor=0, total_memory=182642MB,
        # multi_processor_count=148) of the 180 GB HBM3e per GPU of HGX B200 (1,440 GB for eight).
        memory_bytes=_mib(182642),
        # DGX/HGX B200 per GPU: bf16/fp16 4.5 PFLOP/s with sparsity -> 2250 dense; fp32 80 (the 1000 W part).
        peak_tflops={"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0},
        hbm_GBps=8000.0,
        intra_node=_NVLINK5,
        inter_node=_IB_NDR_B200,
        matmul_efficiency=_matmul_efficiency("b200"),
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="NVIDIA DGX B200 datasheet (resources.nvidia.com/en-us-dgx-systems/dgx-b200-datasheet), per GPU",
    ),
    "mi300x": GpuSpec(
        name="mi300x",
        sm_count=304,  # AMD datasheet: 304 compute units
        # torch 2.6 on ROCm: _CudaDeviceProperties(name='AMD Instinct MI300X', major=9, minor=4,
        # total_memory=196592MB) (ROCm/ROCm#4203) of 192 GB HBM3. torch drives it as a "cuda" device, over RCCL.
        memory_bytes=_mib(196592),
        # AMD datasheet: bf16/fp16 matrix 1307.4 dense (2614.9 with sparsity); fp32 163.4.
        peak_tflops={"bf16": 1307.4, "fp16": 1307.4, "fp32": 163.4},
        hbm_GBps=5300.0,
        intra_node=_INFINITY_FABRIC_MI300X,
        inter_node=_NIC_400G,
        matmul_efficiency=_matmul_efficiency("mi300x"),
        memory_efficiency=DEFAULT_MEMORY_EFFICIENCY,
        source="AMD Instinct MI300X datasheet (amd.com/en/products/accelerators/instinct/mi300/mi300x.html)",
    ),
    # A placeholder for the CPU box that CI and the gloo tests run on. Its real speeds come from a measured
    # HardwareProfile (profiler/); these nominal figures only keep the analytic model finite and modest.
    # They are meant as achieved rates already, hence both efficiencies 1.0.
    "cpu": GpuSpec(
        name="cpu",
        kind="cpu",
        memory_bytes=16 * 2**30,
        peak_tflops={"bf16": 0.2, "fp16": 0.2, "fp32": 0.2},
        hbm_GBps=20.0,
        intra_node=_GLOO_SHARED_MEMORY,
        inter_node=_GLOO_SHARED_MEMORY,
        matmul_efficiency=1.0,
        memory_efficiency=1.0,
        source="nominal placeholder; replace with a measured HardwareProfile",
    ),
}


def _export_part(original: str, name: str, nvlink: LinkSpec, source: str, **update: Any) -> GpuSpec:
    """A part for the Chinese market: `original`'s GPU, memory and network, with NVLink cut (`_NVLINK3_EXPORT`,
    `_NVLINK4_EXPORT`), and `update`'s other differences."""
    return GPU_PRESETS[original].model_copy(update={"name": name, "intra_node": nvlink, "source": source, **update})


GPU_PRESETS["a800-80gb"] = _export_part(
    "a100-80gb", "a800-80gb", _NVLINK3_EXPORT,
    "NVIDIA A800 SXM4 80GB (A100 SXM4 80GB compute and HBM2e, 400 GB/s NVLink); DGX A100 network assumed",
)  # fmt: skip
GPU_PRESETS["h800"] = _export_part(
    "h100-sxm", "h800", _NVLINK4_EXPORT,
    "NVIDIA H800 SXM5 (H100 SXM5 compute and HBM3, 400 GB/s NVLink); Hopper whitepaper",
    # DeepSeek-V3 technical report (2024), sec. 3.1-3.2.2: H800 nodes, IB at 50 GB/s a GPU (400 Gb/s NDR) and
    # NVLink at 160 GB/s achieved (0.8 of the 200 per direction: NVLink4's 0.82 above).
    inter_node=_network("ib-ndr-400g", 400, "DeepSeek-V3 technical report sec. 3.2.2: 50 GB/s IB a GPU"),
)  # fmt: skip


# ---------------------------------------------------------------------------------- the host side (CPU offload)

# Achievable host <-> device copy rate of one GPU's PCIe x16 link, per direction, in GB/s: measured peaks are
# 25 GB/s on an A100's Gen4 x16 (line rate 32) and 12 GB/s on a V100's Gen3 x16 (line rate 16), "measured peak" per
# the BaM authors (ZaidQureshi/bam#54). Gen5 doubles Gen4's line rate (64 GB/s); its achievable rate is taken at
# Gen4's ratio (25 / 32), 50 GB/s.
PCIE_GEN3_HOST_GBPS = 12.0
PCIE_GEN4_HOST_GBPS = 25.0
PCIE_GEN5_HOST_GBPS = 50.0
TB = 10**12
# Each GPU preset's host side: (PCIe rate per GPU, RAM per node, where the RAM figure comes from). A GPU sold in
# no reference system (the PCIe cards) has no RAM figure: an offloading plan on it must set
# cluster.host_memory_per_node_bytes.
_HOST_SIDES: dict[str, tuple[float, int | None, str]] = {
    "a100-40gb": (PCIE_GEN4_HOST_GBPS, 1 * TB, "DGX A100 320GB datasheet: 1 TB system memory"),
    "a100-80gb": (PCIE_GEN4_HOST_GBPS, 2 * TB, "DGX A100 640GB datasheet: 2 TB system memory"),
    "h100-sxm": (PCIE_GEN5_HOST_GBPS, 2 * TB, "DGX H100 datasheet: 2 TB system memory"),
    "h100-pcie": (PCIE_GEN5_HOST_GBPS, None, "no reference system"),
    "h200": (PCIE_GEN5_HOST_GBPS, 2 * TB, "DGX H200 datasheet: 2 TB system memory"),
    "a800-80gb": (PCIE_GEN4_HOST_GBPS, 2 * TB, "assumed: as DGX A100 640GB, 2 TB"),
    "h800": (PCIE_GEN5_HOST_GBPS, 2 * TB, "assumed: as DGX H100, 2 TB"),
    "l4": (PCIE_GEN4_HOST_GBPS, None, "no reference system"),
    "l40s": (PCIE_GEN4_HOST_GBPS, None, "no reference system"),
    "a10": (PCIE_GEN4_HOST_GBPS, None, "no reference system"),
    "a10g": (PCIE_GEN4_HOST_GBPS, 768 * 2**30, "AWS EC2 G5: g5.48xlarge, 768 GiB memory"),
    "v100-sxm2-32gb": (PCIE_GEN3_HOST_GBPS, 512 * 2**30, "DGX-1 user guide: 512 GB system memory"),
    "v100-sxm2-16gb": (PCIE_GEN3_HOST_GBPS, 512 * 2**30, "DGX-1 user guide: 512 GB system memory"),
    "h20": (PCIE_GEN5_HOST_GBPS, 2 * TB, "assumed: as DGX H100 (HGX H100 board), 2 TB"),
    "b200": (PCIE_GEN5_HOST_GBPS, 4 * TB, "DGX B200 datasheet: 2 TB system memory, configurable to 4 TB"),
    "mi300x": (PCIE_GEN5_HOST_GBPS, 2 * TB, "assumed: 2 TB (Azure ND MI300X v5: 1.85 TB)"),
}


def _with_host_side(gpu: GpuSpec) -> GpuSpec:
    """The preset with its host side (`_HOST_SIDES`); the CPU placeholder has none: there is nothing to offload to."""
    if gpu.name not in _HOST_SIDES:
        return gpu
    link_GBps, memory_bytes, memory_source = _HOST_SIDES[gpu.name]
    source = f"PCIe: ZaidQureshi/bam#54 measured peaks; RAM: {memory_source}"
    update = {"host_link_GBps": link_GBps, "host_memory_per_node_bytes": memory_bytes, "host_source": source}
    return gpu.model_copy(update=update)


GPU_PRESETS = {name: _with_host_side(gpu) for name, gpu in GPU_PRESETS.items()}


# GPU names as devices and papers write them (torch.cuda.get_device_name, a published run's `gpu_type`), most
# specific first, and their presets.
_DEVICE_NAMES = (
    (r"h200", "h200"),
    (r"h100.*pcie", "h100-pcie"),
    (r"h800.*pcie", "h100-pcie"),  # the H800 PCIe has the H100 PCIe's compute (above)
    (r"h800", "h800"),
    (r"h100", "h100-sxm"),
    (r"\bh20\b", "h20"),
    (r"b200", "b200"),
    (r"mi300x", "mi300x"),
    (r"a100.*40\s*gb", "a100-40gb"),
    (r"a100", "a100-80gb"),
    (r"a800", "a800-80gb"),
    (r"v100.*16\s*gb", "v100-sxm2-16gb"),
    (r"v100", "v100-sxm2-32gb"),
    (r"l40s", "l40s"),
    (r"a10g", "a10g"),
    (r"\ba10\b", "a10"),
    (r"\bl4\b", "l4"),
)


def gpu_preset_for_device(name: str) -> str | None:
    """The preset a device's name ("NVIDIA H100 80GB HBM3", "A100-SXM4-40GB") is, or None for none of them."""
    for pattern, preset in _DEVICE_NAMES:
        if re.search(pattern, name, re.IGNORECASE):
            return preset
    return None


def gpu_preset(name: str) -> GpuSpec:
    """The named GPU (case-insensitive); UnknownPresetError lists the closest names."""
    try:
        return GPU_PRESETS[name.lower()]
    except KeyError:
        raise UnknownPresetError("gpu", name, list(GPU_PRESETS)) from None
