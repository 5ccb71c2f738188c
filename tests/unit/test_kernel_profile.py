"""`paraplan profile kernels`: the sweep's shapes and checks, a real measurement on this CPU, the preset's
predictions of a kernel profile against hand-computed values, and the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from api.cli import app
from planner.cost import ops
from planner.cost.layers import LayerContext
from planner.cost.runtime import EAGER_HOST_S_PER_BACKWARD_KERNEL, EAGER_HOST_S_PER_KERNEL
from planner.kernel_check import check_profile, host_floor_request, implied_constants
from planner.presets import gpu_preset, model_preset
from planner.request import parse_estimate_request
from planner.specs import TimingStats
from planner.specs.kernels import AttentionMeasurement, GemmMeasurement, HostFloorMeasurement, KernelProfile
from profiler.kernels import KernelSweep, KernelSweepError, narrow_for_host_floor, profile_kernels

runner = CliRunner()
TINY_GRID = {"gemm_rows": (32,), "widths": (64,), "attention_heads": (2,), "attention_seq_lens": (64,)}


def timing(median_s: float) -> TimingStats:
    return TimingStats(median_s=median_s, spread=0.01, repeats=10)


def test_the_gemms_are_a_transformers_linear_layers_at_each_width():
    sweep = KernelSweep(model=model_preset("llama3.2-1b"), gemm_rows=(64, 256), widths=(128,))
    # (rows, cols, inner): attention output h -> h, MLP up h -> 4h, MLP down 4h -> h.
    assert sweep.gemm_shapes() == [(64, 128, 128), (64, 512, 128), (64, 128, 512),
                                   (256, 128, 128), (256, 512, 128), (256, 128, 512)]  # fmt: skip
    assert sweep.points == 6 + len(sweep.attention_shapes()) + 1


def test_a_gpu_sweep_defaults_to_the_shapes_of_billion_parameter_layers():
    sweep = KernelSweep.for_device(model_preset("llama3-8b"), "cuda", dtype="bf16", repeats=5)
    assert (max(sweep.gemm_rows), max(sweep.widths), sweep.repeats) == (32768, 8192, 5)
    assert (4, 16384) in sweep.attention_shapes()


@pytest.mark.parametrize(
    "settings, field",
    [
        ({"widths": ()}, "widths"),
        ({"gemm_rows": (0,)}, "gemm_rows"),
        ({"dtype": "bf16"}, "dtype"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"repeats": 0}, "repeats"),
        ({"head_dim": 0}, "head_dim"),
    ],
)
def test_an_unmeasurable_sweep_names_its_field(settings, field):
    sweep = KernelSweep(model=model_preset("llama3.2-1b"), **settings)
    assert field in [name for name, _ in sweep.violations()]
    with pytest.raises(KernelSweepError) as refused:
        profile_kernels(sweep)
    assert refused.value.field == field


@pytest.mark.parametrize("name", ["llama3.2-1b", "gpt3-1.7b", "qwen2.5-7b", "mixtral-8x7b"])
def test_the_narrowed_block_launches_the_kernels_of_the_models_own(name):
    """Narrowing changes widths, never the kernels a block launches: the cost model counts the same for both."""
    model = model_preset(name)
    narrowed = narrow_for_host_floor(model)
    assert (narrowed.mlp, narrowed.norm, narrowed.position_embedding, narrowed.num_experts) == (
        model.mlp, model.norm, model.position_embedding, model.num_experts,
    )  # fmt: skip
    assert (narrowed.kv_heads < narrowed.num_attention_heads) == (model.kv_heads < model.num_attention_heads)
    assert narrowed.hidden_size == 64

    def launches(spec):
        request = parse_estimate_request({
            "model": spec.model_dump(mode="json"), "cluster": {"gpu": "h100-sxm", "num_nodes": 1, "gpus_per_node": 1},
            "training": {"seq_len": 16, "global_batch_size": 1}, "plan": {"micro_batch_size": 1},
        })  # fmt: skip
        ctx = LayerContext.of(request.model, request.training, request.cluster, request.plan)
        block = ops.block_ops(request.model, request.training, ctx.shape)
        return sum(op.kernels for op in block), sum(op.backward_kernels for op in block)

    assert launches(narrowed) == launches(model)


def test_a_cpu_sweep_measures_every_shape_and_the_host_floor(tmp_path):
    sweep = KernelSweep(model=model_preset("llama3.2-1b"), head_dim=32, warmup=1, repeats=3, **TINY_GRID)
    progress = []
    profile = profile_kernels(sweep, lambda done, total, what: progress.append((done, total)))
    assert progress[-1] == (sweep.points, sweep.points)
    assert profile.device_kind == "cpu" and profile.dtype == "fp32"
    assert [(g.rows, g.cols, g.inner) for g in profile.gemms] == sweep.gemm_shapes()
    assert all(g.time.median_s > 0 and g.time.repeats == 3 for g in profile.gemms)
    (attention,) = profile.attention
    assert (attention.heads, attention.seq_len, attention.head_dim) == (2, 64, 32)
    assert attention.backward.median_s > 0 and attention.forward.median_s > 0
    assert profile.host_floor is not None and profile.host_floor.model == narrow_for_host_floor(sweep.model)
    assert profile.host_floor.forward.median_s > 0
    path = tmp_path / "kernels.json"
    path.write_text(profile.model_dump_json())
    assert KernelProfile.model_validate_json(path.read_text()) == profile


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_sweep_runs_in_bf16():
    sweep = KernelSweep.for_device(model_preset("llama3.2-1b"), "cuda", dtype="bf16", repeats=3, **TINY_GRID)
    profile = profile_kernels(sweep)
    assert profile.device_kind == "cuda" and profile.cuda_version and len(profile.gemms) == 3


# ------------------------------------------------------------------------------ predictions, by hand


def hand_profile(device_name: str = "NVIDIA H100 80GB HBM3") -> KernelProfile:
    host_floor_model = narrow_for_host_floor(model_preset("llama3.2-1b"))
    return KernelProfile(
        device_kind="cuda", device_name=device_name, torch_version="2.11.0", created="2026-12-08T00:00:00Z",
        dtype="bf16",
        gemms=[GemmMeasurement(rows=8192, cols=4096, inner=4096, time=timing(0.5e-3))],
        attention=[
            AttentionMeasurement(batch=1, heads=32, seq_len=4096, head_dim=128, forward=timing(1e-3),
                                 backward=timing(3e-3)),
            AttentionMeasurement(batch=1, heads=4, seq_len=1024, head_dim=128, forward=timing(0.1e-3),
                                 backward=timing(0.3e-3)),
        ],
        host_floor=HostFloorMeasurement(model=host_floor_model, seq_len=16, micro_batch_size=1,
                                        forward=timing(2e-3), backward=timing(2e-3)),
    )  # fmt: skip


def test_a_gemm_is_predicted_at_the_presets_rate_over_its_waves():
    h100 = gpu_preset("h100-sxm")
    gemm = next(c for c in check_profile(hand_profile(), h100) if c.kind == "gemm")
    # 32 x 32 tiles of 256 x 128 over 132 SMs: 8 waves, the last short; compute-bound (operands ~ 0.2 GB/s-ms).
    waves = 1024 / (8 * 132)
    expected = 2 * 8192 * 4096 * 4096 / (989.4e12 * h100.matmul_efficiency * waves)
    assert gemm.predicted_s == pytest.approx(expected, rel=1e-9)
    assert gemm.ratio == pytest.approx(0.5e-3 / expected)
    assert gemm.efficiency(989.4e12, gemm.measured_s) == pytest.approx(2 * 8192 * 4096 * 4096 / 0.5e-3 / 989.4e12)


def test_fused_attention_is_predicted_at_the_attention_rate_and_its_occupancy():
    h100 = gpu_preset("h100-sxm")
    checks = [c for c in check_profile(hand_profile(), h100) if c.kind.startswith("attention")]
    rate = 989.4e12 * h100.attention_efficiency
    long_forward = 0.5 * 4 * 4096**2 * 32 * 128 / rate  # 32 x 32 blocks of 128 rows: every SM busy
    occupancy = 0.5 * (4 * 1024 / 128) / 132  # 32 blocks on 132 SMs
    short_forward = 0.5 * 4 * 1024**2 * 4 * 128 / (rate * occupancy)
    assert [c.predicted_s for c in checks] == pytest.approx(
        [long_forward, 2.5 * long_forward, short_forward, 2.5 * short_forward], rel=1e-9
    )
    assert checks[1].flops == pytest.approx(2.5 * 0.5 * 4 * 4096**2 * 32 * 128)


def test_the_host_floor_is_predicted_at_the_executors_time_per_kernel():
    profile = hand_profile()
    forward, backward = (c for c in check_profile(profile, gpu_preset("h100-sxm")) if c.kind.startswith("host"))
    assert forward.predicted_s == pytest.approx(forward.kernels * EAGER_HOST_S_PER_KERNEL)
    assert backward.predicted_s == pytest.approx(backward.kernels * EAGER_HOST_S_PER_BACKWARD_KERNEL)
    assert forward.measured_s_per_kernel == pytest.approx(2e-3 / forward.kernels)
    request = parse_estimate_request(host_floor_request(profile.host_floor, gpu_preset("h100-sxm"), "bf16"))
    assert (request.plan.recompute, request.training.precision, request.cluster.gpu.name) == ("none", "bf16",
                                                                                              "h100-sxm")  # fmt: skip


def test_the_measurements_imply_the_presets_constants():
    """Compute-bound kernels' times scale as 1 / efficiency: the implied efficiency is the preset's x predicted /
    measured (one GEMM: exactly that; four attention passes: their median); the host floor's per kernel."""
    h100 = gpu_preset("h100-sxm")
    checks = check_profile(hand_profile(), h100)
    gemm = next(c for c in checks if c.kind == "gemm")
    attention = [c.predicted_s / c.measured_s for c in checks if c.kind.startswith("attention")]
    floor = [c for c in checks if c.kind.startswith("host floor")]
    constants = {c.name: c for c in implied_constants(checks, h100)}
    assert gemm.compute_bound
    assert constants["matmul efficiency"].preset == h100.matmul_efficiency
    assert constants["matmul efficiency"].measured == pytest.approx(h100.matmul_efficiency * gemm.predicted_s / 0.5e-3)
    assert constants["fused attention efficiency"].measured == pytest.approx(
        h100.attention_efficiency * float(np.median(attention))
    )
    forward = constants["host time per kernel, forward"]
    assert (forward.preset, forward.measured) == pytest.approx((EAGER_HOST_S_PER_KERNEL, 2e-3 / floor[0].kernels))


def test_a_memory_bound_gemm_implies_no_efficiency():
    """A thin GEMM waits on its operands' traffic: its time says nothing of the FLOP rate."""
    thin = hand_profile().model_copy(update={"gemms": [GemmMeasurement(rows=16, cols=4096, inner=4096,
                                                                       time=timing(20e-6))]})  # fmt: skip
    checks = check_profile(thin, gpu_preset("h100-sxm"))
    assert not next(c for c in checks if c.kind == "gemm").compute_bound
    assert "matmul efficiency" not in {c.name for c in implied_constants(checks, gpu_preset("h100-sxm"))}


# ------------------------------------------------------------------------------------------ the command


def write(tmp_path: Path, profile: KernelProfile) -> Path:
    path = tmp_path / "kernels.json"
    path.write_text(profile.model_dump_json())
    return path


def test_the_command_compares_a_saved_profile_with_the_devices_own_preset(tmp_path):
    result = runner.invoke(app, ["profile", "kernels", "--from", str(write(tmp_path, hand_profile()))])
    assert result.exit_code == 0, result.output
    assert "against preset h100-sxm" in result.output
    assert "8192 x 4096 x 4096" in result.output and "host floor" in result.output
    assert "measured / predicted: median" in result.output
    assert "h100-sxm's constants against this device's" in result.output and "matmul efficiency" in result.output


def test_a_time_of_zero_is_shown_without_a_share_of_the_peak(tmp_path):
    """A median of 0 (below the clock's resolution) has no rate: the table shows "-" rather than dividing by it."""
    zero = hand_profile().model_copy(update={"gemms": [GemmMeasurement(rows=64, cols=64, inner=64, time=timing(0.0))]})
    result = runner.invoke(app, ["profile", "kernels", "--from", str(write(tmp_path, zero))])
    assert result.exit_code == 0, result.output
    assert "64 x 64 x 64" in result.output


def test_another_preset_can_be_named(tmp_path):
    result = runner.invoke(app, ["profile", "kernels", "--from", str(write(tmp_path, hand_profile())), "--gpu", "h200"])
    assert result.exit_code == 0 and "against preset h200" in result.output


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--from", "missing.json"], "--from"),
        (["--from", "{bad}"], "--from"),
        (["--device", "cpu"], "--out"),
        (["--out", "k.json", "--widths", "64,x"], "--widths"),
        (["--out", "k.json", "--dtype", "bf16"], "--dtype"),
        (["--out", "k.json", "--dtype", "int8"], "--dtype"),
        (["--out", "k.json", "--gemm-rows", "0"], "--gemm-rows"),
        (["--out", "."], "--out"),
        (["--out", "{bad}/k.json"], "--out"),
    ],
)
def test_bad_input_names_the_flag(tmp_path, monkeypatch, args, flag):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "{bad}").write_text("{not json")
    result = runner.invoke(app, ["profile", "kernels", *args])
    assert result.exit_code == 1
    assert flag in result.output and "Traceback" not in result.output


def test_a_device_no_preset_is_named_after_needs_gpu(tmp_path):
    path = write(tmp_path, hand_profile(device_name="Some Accelerator X"))
    result = runner.invoke(app, ["profile", "kernels", "--from", str(path)])
    assert result.exit_code == 1 and "--gpu" in result.output
    unknown = runner.invoke(app, ["profile", "kernels", "--from", str(path), "--gpu", "h1000"])
    assert unknown.exit_code == 1 and "h100" in unknown.output


def test_a_file_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"schema_version": 1, "device_kind": "cpu"}))
    result = runner.invoke(app, ["profile", "kernels", "--from", str(path)])
    assert result.exit_code == 1 and "--from" in result.output and "device_name" in result.output


def test_the_command_measures_this_cpu_and_writes_the_profile(tmp_path):
    out = tmp_path / "k" / "kernels.json"
    result = runner.invoke(app, ["profile", "kernels", "--out", str(out), "--gemm-rows", "32", "--widths", "64",
                                 "--attention-heads", "2", "--attention-seq-lens", "32", "--head-dim", "16",
                                 "--warmup", "1", "--repeats", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    profile = KernelProfile.model_validate_json(out.read_text())
    assert len(profile.gemms) == 3 and profile.attention[0].head_dim == 16
    assert "against preset cpu" in result.output
    assert math.isfinite(profile.host_floor.backward.median_s)
