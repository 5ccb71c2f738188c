"""Presets against their published numbers: parameter totals for models, internal consistency for GPUs."""

from __future__ import annotations

import pytest

from planner.cost.params import active_params_per_token, model_params
from planner.errors import UnknownPresetError
from planner.presets import GPU_PRESETS, MODEL_PRESETS, gpu_preset, model_preset
from planner.request import resolve_cluster
from planner.specs import ClusterSpec, GpuSpec, ModelSpec

TOLERANCE = 0.005  # 0.5 %

# Narayanan et al. 2021 (arXiv 2104.04473), Table 1: published size in billions for each preset. The paper
# computes them with its eq. 2 and rounds to one decimal (three digits for 1008).
NARAYANAN_TABLE_1_BILLIONS = {
    "gpt3-1.7b": 1.7,
    "gpt3-3.6b": 3.6,
    "gpt3-7.5b": 7.5,
    "gpt3-18.4b": 18.4,
    "gpt3-39.1b": 39.1,
    "gpt3-76.1b": 76.1,
    "gpt3-145.6b": 145.6,
    "gpt3-310.1b": 310.1,
    "gpt3-529.6b": 529.6,
    "gpt3-1t": 1008.0,
}

# Published totals of the other presets.
PUBLISHED_TOTALS = {
    # Narayanan et al. 2021, Table 2 (GPT-3 175B with vocabulary 51,200).
    "gpt3-175b": 174.6e9,
    # Hugging Face Hub, safetensors parameter count of meta-llama/Llama-2-{7b,13b,70b}-hf.
    "llama2-7b": 6.74e9,
    "llama2-13b": 13.02e9,
    "llama2-70b": 68.98e9,
    # Hugging Face Hub, safetensors parameter count of meta-llama/Meta-Llama-3-{8B,70B}, Llama-3.1-405B
    # (model cards: "8B", "70B", "405B").
    "llama3-8b": 8.03e9,
    "llama3-70b": 70.55e9,
    "llama3-405b": 405.85e9,
    # Hugging Face Hub, safetensors parameter count of meta-llama/Llama-3.2-1B (model card: "1.23B"), tied head.
    "llama3.2-1b": 1.24e9,
    # Hugging Face Hub, safetensors parameter count of mistralai/Mistral-7B-v0.1.
    "mistral-7b": 7.24e9,
    # Qwen2.5 model cards: "Number of Parameters: 7.61B" / "72.7B".
    "qwen2.5-7b": 7.61e9,
    "qwen2.5-72b": 72.7e9,
    # Mistral AI's announcements of Mixtral 8x7B ("46.7B total parameters but only uses 12.9B parameters per
    # token") and Mixtral 8x22B ("39B active parameters out of 141B").
    "mixtral-8x7b": 46.7e9,
    "mixtral-8x22b": 141e9,
}
# Parameters a token uses (the same announcements).
PUBLISHED_ACTIVE = {"mixtral-8x7b": 12.9e9, "mixtral-8x22b": 39e9}


def narayanan_eq2(layers: int, hidden: int, vocab: int = 51200, seq: int = 2048) -> float:
    """Narayanan et al. 2021, eq. 2: P = 12 l h^2 (1 + 13/(12h) + (V + s)/(12 l h))."""
    return 12 * layers * hidden**2 * (1 + 13 / (12 * hidden) + (vocab + seq) / (12 * layers * hidden))


def relative_error(value: float, reference: float) -> float:
    return abs(value - reference) / reference


def test_every_model_preset_has_a_published_total() -> None:
    assert set(MODEL_PRESETS) == set(NARAYANAN_TABLE_1_BILLIONS) | set(PUBLISHED_TOTALS)


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_preset_matches_published_total(name: str) -> None:
    total = model_params(model_preset(name))
    assert relative_error(total, PUBLISHED_TOTALS[name]) < TOLERANCE, f"{name}: {total:,}"


@pytest.mark.parametrize("name", sorted(PUBLISHED_ACTIVE))
def test_mixtral_active_parameters_match_published(name: str) -> None:
    spec = model_preset(name)
    assert (spec.num_experts, spec.experts_per_token) == (8, 2)
    active = active_params_per_token(spec)
    assert relative_error(active, PUBLISHED_ACTIVE[name]) < TOLERANCE, f"{name}: {active:,}"


@pytest.mark.parametrize("name", sorted(NARAYANAN_TABLE_1_BILLIONS))
def test_gpt_preset_matches_narayanan_eq2(name: str) -> None:
    spec = model_preset(name)
    total = model_params(spec)
    assert relative_error(total, narayanan_eq2(spec.num_layers, spec.hidden_size)) < TOLERANCE


@pytest.mark.parametrize("name", sorted(NARAYANAN_TABLE_1_BILLIONS))
def test_gpt_preset_matches_table_1_size(name: str) -> None:
    """Within 0.5 %, or within the table's rounding: eq. 2 gives 1.652B and 3.562B for the two smallest
    rows, which the paper prints as 1.7 and 3.6 (2.8 % and 1.1 % away), so a rounded value is only good to
    half its last digit."""
    published = NARAYANAN_TABLE_1_BILLIONS[name] * 1e9
    half_last_digit = 0.05e9 if published < 1000e9 else 0.5e9
    error = abs(model_params(model_preset(name)) - published)
    assert error <= max(TOLERANCE * published, half_last_digit)


def test_gpt_presets_follow_megatron_gpt() -> None:
    for name in [*NARAYANAN_TABLE_1_BILLIONS, "gpt3-175b"]:
        spec = model_preset(name)
        assert spec.vocab_size == 51200 and spec.max_position_embeddings == 2048
        assert spec.ffn_hidden_size == 4 * spec.hidden_size
        assert (spec.mlp, spec.norm) == ("gelu", "layernorm")
        assert spec.tie_embeddings and spec.qkv_bias and spec.linear_bias and spec.dropout == 0.1
        assert spec.position_embedding == "learned"


def test_gpt3_175b_shape() -> None:
    spec = model_preset("gpt3-175b")
    assert (spec.num_layers, spec.hidden_size, spec.num_attention_heads) == (96, 12288, 96)


@pytest.mark.parametrize(
    ("name", "kv_heads", "ffn", "vocab"),
    [
        ("llama2-70b", 8, 28672, 32000),
        ("llama3-8b", 8, 14336, 128256),
        ("llama3-405b", 8, 53248, 128256),
        ("mistral-7b", 8, 14336, 32000),
        ("qwen2.5-7b", 4, 18944, 152064),
    ],
)
def test_swiglu_presets_copy_their_configs(name: str, kv_heads: int, ffn: int, vocab: int) -> None:
    spec = model_preset(name)
    assert (spec.num_kv_heads, spec.ffn_hidden_size, spec.vocab_size) == (kv_heads, ffn, vocab)
    assert spec.mlp == "swiglu" and spec.norm == "rmsnorm" and spec.position_embedding == "rope"
    assert not spec.tie_embeddings and not spec.linear_bias
    assert spec.qkv_bias == name.startswith("qwen")


def test_model_preset_is_case_insensitive_and_named() -> None:
    assert model_preset("LLaMA3-8B") is MODEL_PRESETS["llama3-8b"]
    assert all(name == name.lower() == spec.name for name, spec in MODEL_PRESETS.items())


def test_unknown_model_preset_names_the_closest() -> None:
    with pytest.raises(UnknownPresetError) as caught:
        model_preset("llama3-7b")
    assert caught.value.kind == "model" and "llama3-8b" in caught.value.closest


# ---------------------------------------------------------------------------------------------- GPUs


@pytest.mark.parametrize("name", sorted(GPU_PRESETS))
def test_gpu_preset_is_consistent(name: str) -> None:
    gpu = gpu_preset(name)
    assert isinstance(gpu, GpuSpec) and gpu.name == name and gpu.source
    # bf16, where a GPU has it, runs on the same tensor cores as fp16; fp32 is never faster.
    assert gpu.peak_tflops.get("bf16", gpu.peak_tflops["fp16"]) == gpu.peak_tflops["fp16"] >= gpu.peak_tflops["fp32"]
    assert gpu.intra_node.latency_s > 0 and gpu.inter_node.latency_s > 0
    assert gpu.intra_node.source and gpu.inter_node.source
    assert 0 < gpu.matmul_efficiency <= 1 and 0 < gpu.memory_efficiency <= 1
    # The network never outruns the links inside a node.
    assert gpu.inter_node.bandwidth_GBps <= gpu.intra_node.bandwidth_GBps


def test_gpu_kinds() -> None:
    assert {name for name, gpu in GPU_PRESETS.items() if gpu.kind == "cpu"} == {"cpu"}


def test_only_volta_lacks_bf16() -> None:
    assert {name for name, gpu in GPU_PRESETS.items() if not gpu.supports("bf16")} == {
        "v100-sxm2-16gb",
        "v100-sxm2-32gb",
    }


@pytest.mark.parametrize(
    ("name", "fp16_tflops", "fp32_tflops", "hbm_GBps", "nominal_gb"),
    [
        ("a100-40gb", 312.0, 19.5, 1555.0, 40),
        ("a100-80gb", 312.0, 19.5, 2039.0, 80),
        ("h100-sxm", 989.4, 66.9, 3350.0, 80),
        ("h100-pcie", 756.5, 51.2, 2000.0, 80),
        ("h200", 989.4, 66.9, 4800.0, 141),
        ("l4", 121.0, 30.3, 300.0, 24),
        ("l40s", 362.05, 91.6, 864.0, 48),
        ("a10", 125.0, 31.2, 600.0, 24),
        ("a10g", 70.0, 35.0, 600.0, 24),
        ("v100-sxm2-32gb", 125.0, 15.7, 900.0, 32),
        ("v100-sxm2-16gb", 125.0, 15.7, 900.0, 16),
        ("h20", 148.0, 44.0, 4000.0, 96),
        ("a800-80gb", 312.0, 19.5, 2039.0, 80),
        ("h800", 989.4, 66.9, 3350.0, 80),
        ("b200", 2250.0, 80.0, 8000.0, 180),
        ("mi300x", 1307.4, 163.4, 5300.0, 192),
    ],
)
def test_gpu_datasheet_numbers(
    name: str, fp16_tflops: float, fp32_tflops: float, hbm_GBps: float, nominal_gb: int
) -> None:
    gpu = gpu_preset(name)
    assert gpu.peak_tflops["fp16"] == fp16_tflops and gpu.peak_tflops["fp32"] == fp32_tflops
    assert gpu.hbm_GBps == hbm_GBps
    # Usable memory: a little under the marketed capacity (decimal GB for H200/L4, GiB for A100/H100).
    assert 0.9 * nominal_gb * 1e9 < gpu.memory_bytes <= nominal_gb * 2**30


def test_link_tiers() -> None:
    # NVLink per GPU per direction; the network is one NIC per GPU.
    assert gpu_preset("a100-80gb").intra_node.bandwidth_GBps == 300.0
    assert gpu_preset("a100-80gb").inter_node.bandwidth_GBps == 25.0
    assert gpu_preset("h100-sxm").intra_node.bandwidth_GBps == 450.0
    assert gpu_preset("h200").inter_node.bandwidth_GBps == 50.0
    assert gpu_preset("h100-pcie").intra_node.bandwidth_GBps == 64.0
    assert gpu_preset("l4").intra_node.bandwidth_GBps == 32.0
    # nccl-tests busbw: ~230 of 300 GB/s on A100 NVLink, ~370 of 450 on H100.
    assert gpu_preset("a100-40gb").intra_node.bus_bandwidth_Bps == pytest.approx(231e9)
    assert gpu_preset("h100-sxm").intra_node.bus_bandwidth_Bps == pytest.approx(369e9)


def test_link_tiers_of_the_newer_presets() -> None:
    # V100 SXM2: 6 NVLink2 links x 25 GB/s; a DGX-1 shares one 100 Gb/s EDR port between two GPUs.
    assert gpu_preset("v100-sxm2-32gb").intra_node.bandwidth_GBps == 150.0
    assert gpu_preset("v100-sxm2-32gb").inter_node.bandwidth_GBps == 100 / 8 / 2
    # A10G in a g5.48xlarge: PCIe Gen4 only, 100 Gb/s for eight GPUs.
    assert gpu_preset("a10g").intra_node.name == "pcie-gen4-x16"
    assert gpu_preset("a10g").inter_node.bandwidth_GBps == 100 / 8 / 8
    # B200: NVLink5 900 GB/s per direction; MI300X: 7 xGMI links x 64 GB/s, 48 usable each.
    assert gpu_preset("b200").intra_node.bandwidth_GBps == 900.0
    assert gpu_preset("mi300x").intra_node.bandwidth_GBps == 7 * 64
    assert gpu_preset("mi300x").intra_node.bus_bandwidth_Bps == pytest.approx(7 * 48e9)
    assert gpu_preset("h20").intra_node == gpu_preset("h100-sxm").intra_node
    # The export parts: the A100's and H100's compute, NVLink cut to 200 GB/s per direction at each one's protocol
    # efficiency; H800 nodes carry 400 Gb/s a GPU (DeepSeek-V3 sec. 3.2.2).
    for export, original in (("a800-80gb", "a100-80gb"), ("h800", "h100-sxm")):
        assert gpu_preset(export).peak_tflops == gpu_preset(original).peak_tflops
        assert gpu_preset(export).matmul_efficiency == gpu_preset(original).matmul_efficiency
        assert gpu_preset(export).intra_node.bandwidth_GBps == 200.0
        assert gpu_preset(export).intra_node.efficiency == gpu_preset(original).intra_node.efficiency
    assert gpu_preset("h800").inter_node.bandwidth_GBps == 50.0


def test_matmul_efficiency_of_unbenchmarked_gpus_is_the_a100_calibration() -> None:
    """GPUs that the matmul benchmark never measured reuse the A100's fraction (one named assumption); those it
    measured scale it by their own benchmark."""
    from planner.presets import A100_MATMUL_EFFICIENCY, UNMEASURED_MATMUL_EFFICIENCY

    assert UNMEASURED_MATMUL_EFFICIENCY == A100_MATMUL_EFFICIENCY
    for name in ("v100-sxm2-32gb", "a10", "a10g", "l40s", "h20"):
        assert gpu_preset(name).matmul_efficiency == UNMEASURED_MATMUL_EFFICIENCY
    assert gpu_preset("b200").matmul_efficiency < gpu_preset("a100-80gb").matmul_efficiency
    assert gpu_preset("mi300x").matmul_efficiency < gpu_preset("b200").matmul_efficiency


def test_gpu_preset_lookup_and_cluster_resolution() -> None:
    assert gpu_preset("H100-SXM") is GPU_PRESETS["h100-sxm"]
    assert ClusterSpec.model_validate(resolve_cluster({"gpu": "A100-80GB"})).gpu is GPU_PRESETS["a100-80gb"]


def test_unknown_gpu_preset_names_the_closest() -> None:
    with pytest.raises(UnknownPresetError) as caught:
        gpu_preset("h100")
    assert caught.value.kind == "gpu" and "h100-sxm" in caught.value.closest


def test_model_specs_are_frozen_presets() -> None:
    spec = model_preset("gpt3-175b")
    assert isinstance(spec, ModelSpec)
    with pytest.raises(ValueError):
        spec.num_layers = 1  # type: ignore[misc]


def test_the_contract_and_the_readme_list_every_gpu_preset() -> None:
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    for document in ("docs/contract.md", "README.md"):
        text = (root / document).read_text()
        assert all(f"`{name}`" in text for name in GPU_PRESETS), document
