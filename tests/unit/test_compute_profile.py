"""profiler.compute: sweeps are checked before anything runs, shards are what one TP rank holds, and a small
model's compute profile completes in seconds with every layer, shape and mode it asked for."""

from __future__ import annotations

import pytest
import torch

from planner.cost.params import block_params, model_params
from planner.specs import HardwareProfile, ModelSpec
from profiler.compute import (
    ComputeSweep,
    ComputeSweepError,
    LayerPoint,
    build_layer,
    profile_compute,
    shard_spec,
)

TINY = ModelSpec(
    num_layers=3, hidden_size=64, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=128, vocab_size=256,
    mlp="swiglu", norm="rmsnorm", position_embedding="rope",
)  # fmt: skip


def sweep(**overrides: object) -> ComputeSweep:
    settings: dict = {"model": TINY, "seq_lens": (16, 32), "micro_batch_sizes": (1, 2), "warmup": 1, "repeats": 2}
    return ComputeSweep(**(settings | overrides))


def test_shard_spec_divides_what_tensor_parallelism_splits():
    shard = shard_spec(TINY, 2)
    assert (shard.num_attention_heads, shard.num_kv_heads, shard.ffn_size, shard.vocab_size) == (2, 1, 64, 128)
    assert (shard.hidden_size, shard.head_size, shard.num_layers) == (64, 16, 1)
    # The shard's block holds 1/tp of the block's sharded parameters and all of its replicated ones (norms).
    whole, part = block_params(TINY), block_params(shard)
    assert part.sharded == whole.sharded / 2
    assert part.replicated == whole.replicated


def test_shard_spec_refuses_what_does_not_divide():
    with pytest.raises(ComputeSweepError, match="tp=4 does not divide num_kv_heads") as error:
        shard_spec(TINY, 4)
    assert error.value.field == "tps"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"seq_lens": ()}, "seq_lens"),
        ({"micro_batch_sizes": (0, 2)}, "micro_batch_sizes"),
        ({"tps": (3,)}, "tps"),
        ({"recompute_modes": ("some",)}, "recompute_modes"),
        ({"device": "tpu"}, "device"),
        ({"dtype": "bf16"}, "dtype"),
        ({"repeats": 0}, "repeats"),
        ({"threads": 0}, "threads"),
    ],
)
def test_sweep_violations_name_the_setting(overrides: dict, field: str):
    problems = sweep(**overrides).violations()
    assert problems and {name for name, _ in problems} == {field}
    with pytest.raises(ComputeSweepError) as error:
        profile_compute(sweep(**overrides))
    assert error.value.field == field


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal of --device cuda needs a machine without a GPU")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(ComputeSweepError, match="no CUDA GPU") as error:
        profile_compute(sweep(device="cuda", dtype="bf16"))
    assert error.value.field == "device"


def test_runs_cover_every_shape_and_mode_once():
    runs = sweep(recompute_modes=("full", "none"), tps=(1, 2)).runs()
    assert len(runs) == 2 * 2 * 2 * 2  # tp x seq x mbs x mode
    edges = [run for run in runs if run.with_edges]
    assert len(edges) == 8 and all(run.recompute == "full" for run in edges)  # the first mode's run
    points = [point for run in runs for point in run.points()]
    assert len(points) == len(set(points)) == 16 + 2 * 8


@pytest.fixture(scope="module")
def profile() -> HardwareProfile:
    progress: list[tuple[int, int, str]] = []
    result = profile_compute(sweep(), on_progress=lambda *tick: progress.append(tick))
    assert progress[-1][:2] == (len(sweep().runs()) + 1,) * 2
    return result


def test_work_between_passes_runs_after_each_pass_and_the_passes_pool():
    """`after_pass` runs other work between the passes (benchmarks/cpu_step_time.py trains there), each pass's
    samples already taken; the profile pools all passes."""
    events: list[tuple[str, int]] = []
    two_passes = sweep(seq_lens=(16,), micro_batch_sizes=(1,), passes=2)
    per_pass = len(two_passes.runs())
    result = profile_compute(
        two_passes,
        on_progress=lambda done, total, what: events.append(("layers", done)),
        after_pass=lambda index: events.append(("between", index)),
    )
    layers_then_between = [("layers", n) for n in range(1, per_pass + 1)] + [("between", 0)]
    layers_then_between += [("layers", n) for n in range(per_pass + 1, 2 * per_pass + 1)] + [("between", 1)]
    assert events[:-1] == layers_then_between  # then the optimizer's tick
    assert all(m.forward.repeats == 2 * 2 for m in result.layers)


def test_profile_has_every_layer_point(profile: HardwareProfile):
    keys = {(m.layer, m.micro_batch_size, m.seq_len, m.recompute) for m in profile.layers}
    blocks = {("block", b, s, mode) for b in (1, 2) for s in (16, 32) for mode in ("none", "selective", "full")}
    edges = {(kind, b, s, "none") for kind in ("embedding", "head") for b in (1, 2) for s in (16, 32)}
    assert keys == blocks | edges
    assert len(profile.layers) == len(keys)
    assert all(m.forward.median_s > 0 and m.backward.median_s > 0 for m in profile.layers)
    assert all(m.forward.repeats == 2 and m.dtype == "fp32" and m.tp == 1 for m in profile.layers)


def test_profile_records_where_and_how(profile: HardwareProfile):
    assert profile.device_kind == "cpu" and profile.device_count == 1
    assert profile.model == TINY
    assert profile.torch_version == torch.__version__
    assert profile.settings["kind"] == "compute" and profile.settings["threads"] == torch.get_num_threads()
    [optimizer] = profile.optimizer
    # The optimizer ran over the timed model's parameters: all of TINY's (3 blocks, below the 4 timed at most).
    assert optimizer.optimizer == "adamw" and optimizer.num_params == model_params(TINY)
    assert HardwareProfile.model_validate_json(profile.model_dump_json()) == profile


def test_saved_bytes_grow_with_the_batch_and_shrink_with_recompute(profile: HardwareProfile):
    saved = {(m.layer, m.micro_batch_size, m.seq_len, m.recompute): m.saved_bytes for m in profile.layers}
    rope_tables = 2 * 4 * 32 * TINY.head_size  # fp32 cos and sin per block, whatever the micro-batch size
    for mode in ("none", "selective"):
        assert saved[("block", 2, 32, mode)] == 2 * saved[("block", 1, 32, mode)] - rope_tables
    assert saved[("block", 2, 32, "full")] == 2 * 32 * TINY.hidden_size * 4  # the block input, fp32
    assert saved[("block", 2, 32, "none")] > saved[("block", 2, 32, "selective")] > saved[("block", 2, 32, "full")]


def test_built_layers_run_forward_and_backward():
    for kind in ("block", "embedding", "head"):
        layer = build_layer(TINY, LayerPoint(kind, 2, 2, 16, "none"), "fp32", torch.device("cpu"))  # type: ignore[arg-type]
        layer.backward(layer.forward())
        grads = [p.grad for p in layer.module.parameters()]
        assert grads and all(g is not None for g in grads), kind


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_profile_records_allocator_peaks():
    result = profile_compute(sweep(device="cuda", dtype="bf16", seq_lens=(64,), micro_batch_sizes=(2,)))
    assert result.device_kind == "cuda" and result.cuda_version
    assert all(m.peak_allocated_bytes and m.peak_allocated_bytes >= m.saved_bytes for m in result.layers)


def test_fp16_is_profiled_on_the_cpu_under_the_trainers_autocast():
    """The executor trains fp16 on the CPU under autocast (executor/precision.py), so the profiler times it so too:
    its layers' matmuls run in fp16 while the weights stay fp32."""
    import torch

    from profiler.compute import autocast_for

    assert sweep(dtype="fp16").violations() == []
    with autocast_for("fp16", torch.device("cpu"))():
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == torch.float16
    result = profile_compute(sweep(dtype="fp16", seq_lens=(16,), micro_batch_sizes=(1,)))
    assert {m.dtype for m in result.layers} == {"fp16"} and all(m.forward.median_s > 0 for m in result.layers)
