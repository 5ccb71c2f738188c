"""profiler.fit: nccl-tests bus-bandwidth factors, alpha-beta fits of collective sweeps, layer-time tables."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import numpy as np
import pytest

from planner.cost import measured
from planner.cost.measured import LayerTable, NotMeasured
from planner.specs import CollectiveMeasurement, CollectiveOp, LayerMeasurement, TimingStats
from profiler import fit

SIZES_BYTES = [2**k for k in range(10, 29)]  # 1 KiB .. 256 MiB, as a sweep would take them


def timing(median_s: float) -> TimingStats:
    return TimingStats(median_s=median_s, spread=0.01, repeats=20)


def sample(op: str, n: int, size_bytes: int, time_s: float, tier: str = "intra_node") -> CollectiveMeasurement:
    return CollectiveMeasurement(
        op=op,
        tier=tier,
        group_size=n,
        size_bytes=size_bytes,
        time=timing(time_s),
        algbw_GBps=fit.algbw_GBps(size_bytes, time_s),
        busbw_GBps=fit.busbw_GBps(op, n, size_bytes, time_s),
    )


def sweep(latency_s, bandwidth_GBps, op="all_reduce", n=8, noise=0.0, seed=0, tier="intra_node", sizes=SIZES_BYTES):
    """Samples of the alpha-beta model, each time multiplied by (1 + noise x a standard normal draw)."""
    rng = np.random.default_rng(seed)
    factor = measured.busbw_factor(op, n)
    samples = []
    for size in sizes:
        exact_s = latency_s + size * factor / (bandwidth_GBps * 1e9)
        samples.append(sample(op, n, size, exact_s * (1 + noise * rng.standard_normal()), tier))
    return samples


# ----------------------------------------------------------------------------------------- factors


@pytest.mark.parametrize("n", [2, 4, 8])
def test_busbw_factors_are_nccl_tests(n):
    assert measured.busbw_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    for op in ("all_gather", "reduce_scatter", "all_to_all"):
        assert measured.busbw_factor(op, n) == pytest.approx((n - 1) / n)
    assert measured.busbw_factor("send_recv", n) == 1.0


def test_factor_values_by_hand():
    assert measured.busbw_factor("all_reduce", 2) == 1.0
    assert measured.busbw_factor("all_reduce", 4) == 1.5
    assert measured.busbw_factor("all_reduce", 8) == 1.75
    assert measured.busbw_factor("all_gather", 2) == 0.5
    assert measured.busbw_factor("reduce_scatter", 4) == 0.75
    assert measured.busbw_factor("all_to_all", 8) == 0.875
    assert measured.busbw_factor("fsdp_all_gather", 4) == measured.busbw_factor("fsdp_reduce_scatter", 4) == 0.75
    assert set(measured.BUSBW_FACTORS) == set(get_args(CollectiveOp))


def test_bandwidths():
    assert fit.algbw_GBps(1e9, 0.5) == pytest.approx(2.0)
    assert fit.busbw_GBps("all_reduce", 8, 1e9, 0.5) == pytest.approx(3.5)
    assert fit.busbw_GBps("send_recv", 2, 1e9, 0.5) == pytest.approx(2.0)


def test_unknown_op_and_bad_inputs():
    with pytest.raises(ValueError, match="op"):
        measured.busbw_factor("broadcast", 8)
    with pytest.raises(ValueError, match="group_size"):
        measured.busbw_factor("all_reduce", 0)
    with pytest.raises(ValueError, match="time_s"):
        fit.algbw_GBps(1024, 0.0)


# ------------------------------------------------------------------------------------ collective fit


@pytest.mark.parametrize(
    ("latency_s", "bandwidth_GBps", "op", "n"),
    [(5e-6, 80.0, "all_reduce", 8), (30e-6, 2.0, "all_gather", 4), (30e-6, 2.0, "send_recv", 2)],
)
def test_fit_recovers_clean_alpha_beta(latency_s, bandwidth_GBps, op, n):
    result = fit.fit_collective(sweep(latency_s, bandwidth_GBps, op, n))
    assert (result.op, result.tier, result.group_size, result.num_samples) == (op, "intra_node", n, 19)
    assert result.latency_s == pytest.approx(latency_s, rel=0.01)
    assert result.bandwidth_GBps == pytest.approx(bandwidth_GBps, rel=0.01)
    assert result.r2 == pytest.approx(1.0, abs=1e-9)
    assert result.max_rel_error < 1e-6


@pytest.mark.parametrize(("latency_s", "bandwidth_GBps"), [(5e-6, 80.0), (30e-6, 2.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_noisy_alpha_beta(latency_s, bandwidth_GBps, seed):
    result = fit.fit_collective(sweep(latency_s, bandwidth_GBps, noise=0.03, seed=seed))
    assert result.latency_s == pytest.approx(latency_s, rel=0.10)
    assert result.bandwidth_GBps == pytest.approx(bandwidth_GBps, rel=0.10)
    assert result.r2 > 0.99
    assert result.max_rel_error < 0.15


def test_relative_weighting_keeps_small_messages_accurate():
    latency_s, bandwidth_GBps = 5e-6, 80.0
    samples = sweep(latency_s, bandwidth_GBps, noise=0.03, seed=3)
    sizes = np.array([s.size_bytes for s in samples], dtype=float)
    times = np.array([s.time.median_s for s in samples])
    exact = latency_s + sizes * 1.75 / (bandwidth_GBps * 1e9)
    small = sizes <= 16 * 1024

    result = fit.fit_collective(samples)
    weighted_error = np.abs(measured.predict_collective_s(result, sizes) - exact) / exact
    assert weighted_error[small].max() < 0.05

    # What an ordinary (unweighted) least-squares line does with the same samples: the 256 MiB point's 3% noise
    # (~170 us) swamps the 5 us latency, so small messages come out wrong by far more.
    slope, intercept = np.polyfit(sizes, times, 1)
    unweighted_error = np.abs(intercept + slope * sizes - exact) / exact
    assert unweighted_error[small].max() > 5 * weighted_error[small].max()
    assert unweighted_error[small].max() > 0.5


def test_predict_collective():
    result = fit.fit_collective(sweep(5e-6, 80.0))
    assert measured.predict_collective_s(result, 0) == pytest.approx(result.latency_s)
    assert measured.predict_collective_s(result, 1e9) == pytest.approx(5e-6 + 1e9 * 1.75 / 80e9, rel=1e-6)
    with pytest.raises(ValueError, match="size_bytes"):
        measured.predict_collective_s(result, -1)


def test_negative_latency_is_clamped_to_zero():
    sizes = [2**k for k in range(20, 29)]  # 1 MiB .. 256 MiB: every time stays positive
    result = fit.fit_collective(sweep(-2e-6, 80.0, sizes=sizes))
    assert result.latency_s == 0.0
    assert result.bandwidth_GBps == pytest.approx(80.0, rel=0.05)
    assert result.bandwidth_GBps > 0


def test_times_falling_with_size_are_refused():
    samples = [sample("all_reduce", 8, size, 1e-3 / (k + 1)) for k, size in enumerate(SIZES_BYTES)]
    with pytest.raises(ValueError, match="bandwidth"):
        fit.fit_collective(samples)


def test_non_decreasing_pools_violators_at_their_geometric_mean():
    # 4 then 2 violate the order: pooled at sqrt(4 x 2); the samples in order are kept exactly as measured.
    assert fit.non_decreasing(np.array([1.0, 4.0, 2.0, 8.0])) == pytest.approx([1.0, 8**0.5, 8**0.5, 8.0])
    # 9, 1, 1 pool to the cube root of 9; then 5 is above it and stays.
    assert fit.non_decreasing(np.array([9.0, 1.0, 1.0, 5.0])) == pytest.approx([9 ** (1 / 3)] * 3 + [5.0])
    growing = np.array([1e-5, 1.3e-5, 2e-5, 7e-4])
    assert np.array_equal(fit.non_decreasing(growing), growing)


def test_a_busy_hosts_sweep_is_fitted_through_its_delays():
    """A sweep of 1 KiB-4 MiB over gloo on a loaded 2-core box (the CI's): 1.5 ms of latency, 10 GB/s of bus
    bandwidth (4 MiB adds 0.21 ms), and scheduler delays of up to 2.3 ms on the medians, so the 256 KiB message took
    longer than every larger one. Least squares on the medians gives a negative slope; their non-decreasing
    projection gives a positive bandwidth of the right order and the latency of the undelayed small messages."""
    sizes = [1024 * 2**k for k in range(13)]
    delays_s = [0, 0, 5e-4, 8e-4, 2e-4, 4e-4, 4e-4, 8e-4, 2.3e-3, 1e-4, 1e-4, 0, 2e-4]
    samples = [
        sample("reduce_scatter", 2, size, 1.5e-3 + size * 0.5 / 10e9 + delay_s)
        for size, delay_s in zip(sizes, delays_s, strict=True)
    ]
    traffic = np.array([size * 0.5 for size in sizes], dtype=float)
    with pytest.raises(ValueError, match="bandwidth"):  # the fit of the medians themselves
        fit._relative_least_squares(traffic, np.array([s.time.median_s for s in samples]))
    result = fit.fit_collective(samples)
    assert 5.0 < result.bandwidth_GBps < 20.0
    assert 1.5e-3 < result.latency_s < 2.0e-3


def test_fit_all_names_the_series_it_cannot_fit():
    falling = [sample("all_gather", 4, size, 1e-3 / (k + 1)) for k, size in enumerate(SIZES_BYTES)]
    with pytest.raises(ValueError, match=r"^all_gather over 4 ranks \(intra_node\): bandwidth"):
        fit.fit_all(sweep(5e-6, 80.0) + falling)


def test_fit_refuses_mixed_series_naming_the_field():
    clean = sweep(5e-6, 80.0)
    with pytest.raises(ValueError, match="^op"):
        fit.fit_collective(clean + sweep(5e-6, 80.0, op="all_gather"))
    with pytest.raises(ValueError, match="^tier"):
        fit.fit_collective(clean + sweep(5e-6, 80.0, tier="inter_node"))
    with pytest.raises(ValueError, match="^group_size"):
        fit.fit_collective(clean + sweep(5e-6, 80.0, n=4))
    with pytest.raises(ValueError, match="^size_bytes"):
        fit.fit_collective([sample("all_reduce", 8, 4096, 1e-5), sample("all_reduce", 8, 4096, 1.1e-5)])
    with pytest.raises(ValueError, match="^measurements"):
        fit.fit_collective([])


def test_fit_all_groups_by_op_tier_and_group_size():
    samples = (
        sweep(30e-6, 20.0, tier="inter_node")
        + sweep(5e-6, 80.0, n=8)
        + sweep(4e-6, 70.0, n=4)
        + sweep(6e-6, 60.0, op="all_gather", n=8)
    )
    fits = fit.fit_all(reversed(samples))
    keys = [(f.op, f.tier, f.group_size) for f in fits]
    assert keys == [
        ("all_gather", "intra_node", 8),
        ("all_reduce", "inter_node", 8),
        ("all_reduce", "intra_node", 4),
        ("all_reduce", "intra_node", 8),
    ]
    expected = [(6e-6, 60.0), (30e-6, 20.0), (4e-6, 70.0), (5e-6, 80.0)]
    for result, (latency_s, bandwidth_GBps) in zip(fits, expected, strict=True):
        assert result.latency_s == pytest.approx(latency_s, rel=0.01)
        assert result.bandwidth_GBps == pytest.approx(bandwidth_GBps, rel=0.01)
        assert result.num_samples == len(SIZES_BYTES)
    assert fit.fit_all([]) == []


def test_import_is_light():
    """profiler.fit imports numpy and nothing heavy: no torch, no pydantic (planner.specs) at import."""
    code = "import sys, profiler.fit; print(any(m in sys.modules for m in ('torch', 'pydantic', 'scipy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------- layer table


def layer(mbs, seq, forward_s, backward_s, saved_bytes, tp=1, dtype="bf16", recompute="none", kind="block"):
    return LayerMeasurement(
        layer=kind,
        tp=tp,
        micro_batch_size=mbs,
        seq_len=seq,
        dtype=dtype,
        recompute=recompute,
        forward=timing(forward_s),
        backward=timing(backward_s),
        saved_bytes=saved_bytes,
    )


def linear_in_mbs(mbs):
    """Synthetic costs with a fixed part and a part linear in micro-batch size (seq_len 1024)."""
    return 1e-4 + 2e-3 * mbs, 3e-4 + 4e-3 * mbs, 1000 + 5_000_000 * mbs


def quadratic_in_seq(mbs, seq):
    """Synthetic costs a x tokens + b x tokens x seq_len per quantity."""
    tokens = mbs * seq
    return 1e-6 * tokens + 2e-10 * tokens * seq, 2e-6 * tokens + 5e-10 * tokens * seq, 100 * tokens + tokens * seq


def test_exact_lookup():
    table = LayerTable.from_measurements(
        [layer(1, 1024, 0.01, 0.02, 123), layer(4, 1024, 0.04, 0.08, 456), layer(1, 1024, 0.5, 0.6, 7, tp=2)]
    )
    got = table.lookup("block", 1, 4, 1024, "bf16", "none")
    assert (got.forward_s, got.backward_s, got.saved_bytes, got.exact, got.method) == (
        0.04,
        0.08,
        456,
        True,
        "measured",
    )
    assert table.lookup("block", 2, 1, 1024, "bf16", "none").forward_s == 0.5


def test_interpolation_in_micro_batch_is_exact_for_linear_costs():
    table = LayerTable.from_measurements([layer(m, 1024, *linear_in_mbs(m)) for m in (1, 4)])
    for mbs in (2, 3):
        got = table.lookup("block", 1, mbs, 1024, "bf16", "none")
        forward_s, backward_s, saved_bytes = linear_in_mbs(mbs)
        assert got.forward_s == pytest.approx(forward_s, rel=1e-12)
        assert got.backward_s == pytest.approx(backward_s, rel=1e-12)
        assert got.saved_bytes == saved_bytes
        assert not got.exact and got.method == "interpolated"


def test_piecewise_linear_between_several_points_and_extrapolation():
    table = LayerTable.from_measurements(
        [layer(1, 512, 1.0, 2.0, 10), layer(2, 512, 3.0, 4.0, 20), layer(4, 512, 4.0, 8.0, 40)]
    )
    mid = table.lookup("block", 1, 3, 512, "bf16", "none")
    assert (mid.forward_s, mid.backward_s, mid.saved_bytes, mid.method) == (3.5, 6.0, 30, "interpolated")
    beyond = table.lookup("block", 1, 6, 512, "bf16", "none")  # continues the last segment (2 -> 4)
    assert (beyond.forward_s, beyond.backward_s, beyond.saved_bytes, beyond.method) == (5.0, 12.0, 60, "extrapolated")


def test_single_point_scales_in_proportion():
    table = LayerTable.from_measurements([layer(2, 512, 1.0, 2.0, 100)])
    got = table.lookup("block", 1, 3, 512, "bf16", "none")
    assert (got.forward_s, got.backward_s, got.saved_bytes, got.method) == (1.5, 3.0, 150, "extrapolated")


def test_seq_len_fallback_recovers_linear_plus_quadratic_model():
    shapes = [(1, 512), (2, 512), (4, 512), (1, 2048), (2, 2048), (1, 4096)]
    table = LayerTable.from_measurements([layer(m, s, *quadratic_in_seq(m, s)) for m, s in shapes])
    for mbs, seq in [(1, 1024), (2, 1024), (2, 3072), (1, 6000)]:
        got = table.lookup("block", 1, mbs, seq, "bf16", "none")
        forward_s, backward_s, saved_bytes = quadratic_in_seq(mbs, seq)
        assert got.method == "seq_fit" and not got.exact
        assert got.forward_s == pytest.approx(forward_s, rel=1e-9)
        assert got.backward_s == pytest.approx(backward_s, rel=1e-9)
        assert got.saved_bytes == pytest.approx(saved_bytes, abs=1)


def test_seq_fit_needs_two_measured_seq_lens():
    table = LayerTable.from_measurements([layer(m, 512, *quadratic_in_seq(m, 512)) for m in (1, 4)])
    with pytest.raises(NotMeasured, match="seq_len") as caught:
        table.lookup("block", 1, 1, 1024, "bf16", "none")
    assert caught.value.field == "seq_len"


def test_beyond_twice_the_measured_range_is_not_measured():
    table = LayerTable.from_measurements([layer(m, 1024, *linear_in_mbs(m)) for m in (1, 4)])
    assert table.lookup("block", 1, 8, 1024, "bf16", "none").method == "extrapolated"  # exactly 2x: answered
    with pytest.raises(NotMeasured, match="tokens") as caught:
        table.lookup("block", 1, 9, 1024, "bf16", "none")
    assert caught.value.field == "tokens"
    with pytest.raises(NotMeasured, match="seq_len"):
        table.lookup("block", 1, 1, 4096, "bf16", "none")


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("layer", {"layer": "head"}),
        ("tp", {"tp": 4}),
        ("dtype", {"dtype": "fp32"}),
        ("recompute", {"recompute": "full"}),
    ],
)
def test_unmeasured_group_names_the_field(field, kwargs):
    table = LayerTable.from_measurements(
        [layer(1, 1024, 0.01, 0.02, 1), layer(1, 1024, 0.01, 0.02, 1, tp=2, recompute="selective")]
    )
    query = {"layer": "block", "tp": 1, "micro_batch_size": 1, "seq_len": 1024, "dtype": "bf16", "recompute": "none"}
    with pytest.raises(NotMeasured, match=f"{field}=") as caught:
        table.lookup(**{**query, **kwargs})
    assert caught.value.field == field
    assert isinstance(caught.value, LookupError)


def test_duplicate_shapes_and_bad_queries_are_refused():
    with pytest.raises(ValueError, match="twice"):
        LayerTable.from_measurements([layer(1, 1024, 0.01, 0.02, 1), layer(1, 1024, 0.02, 0.03, 1)])
    table = LayerTable.from_measurements([layer(1, 1024, 0.01, 0.02, 1)])
    with pytest.raises(ValueError, match="micro_batch_size"):
        table.lookup("block", 1, 0, 1024, "bf16", "none")
