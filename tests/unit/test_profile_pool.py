"""profiler.pool: profiles of one machine measured at several times pool into one, each measurement's time the
median over the profiles and its spread wide enough to show the drift between them."""

from __future__ import annotations

import pytest

from planner.specs import (
    CollectiveFit,
    HardwareProfile,
    LayerMeasurement,
    MeetingWait,
    OptimizerMeasurement,
    TimingStats,
)
from profiler.pool import overlay_profile, pool_profiles, pool_timings


def timing(median_s: float, spread: float = 0.02) -> TimingStats:
    return TimingStats(median_s=median_s, spread=spread, repeats=10)


def block(forward_s: float, micro_batch_size: int = 4, saved_bytes: int = 4000) -> LayerMeasurement:
    return LayerMeasurement(layer="block", micro_batch_size=micro_batch_size, seq_len=128, dtype="fp32",
                            forward=timing(forward_s), backward=timing(2 * forward_s),
                            saved_bytes=saved_bytes)  # fmt: skip


def wait(wait_s: float) -> MeetingWait:
    return MeetingWait(micro_batch_size=4, seq_len=128, recompute="none", concurrent_ranks=2, meetings_per_pass=8,
                       free=timing(0.1), synced=timing(0.1 + 8 * wait_s), collective_s=1e-4,
                       wait_s=wait_s)  # fmt: skip


def profile(created: str, forward_s: float, optimizer_s: float, wait_s: float, **fields: object) -> HardwareProfile:
    base: dict = {
        "device_kind": "cpu", "device_name": "test box", "torch_version": "2.13.0", "created": created,
        "settings": {"threads": 1},
        "layers": [block(forward_s)],
        "optimizer": [OptimizerMeasurement(optimizer="adamw", num_params=1000, time=timing(optimizer_s))],
        "meeting_waits": [wait(wait_s)],
    }  # fmt: skip
    return HardwareProfile(**(base | fields))


def test_pooled_timing_is_the_median_of_the_medians_and_its_spread_shows_the_drift():
    pooled = pool_timings([timing(0.010), timing(0.011), timing(0.016)])
    assert pooled.median_s == 0.011
    assert pooled.repeats == 30
    assert pooled.spread == pytest.approx((0.016 - 0.010) / 0.011)  # wider than any pass's own 2%
    assert pooled.unstable  # the machine moved by more than half the median between the passes
    steady = pool_timings([timing(0.010), timing(0.0102)])
    assert steady.median_s == pytest.approx(0.0101) and not steady.unstable


def test_a_slow_spell_in_one_of_three_profiles_is_outvoted():
    fit = CollectiveFit(op="all_reduce", tier="intra_node", group_size=2, latency_s=1e-4, bandwidth_GBps=1.0,
                        r2=0.99, max_rel_error=0.05, num_samples=8)  # fmt: skip
    profiles = [
        profile("2026-12-03T10:00:00+00:00", 0.010, 0.002, 1e-3, collective_fits=[fit]),
        profile("2026-12-03T10:20:00+00:00", 0.016, 0.003, 3e-3),  # a slow spell
        profile("2026-12-03T10:40:00+00:00", 0.011, 0.002, 2e-3),
    ]
    pooled = pool_profiles(profiles)
    (layer,) = pooled.layers
    assert (layer.forward.median_s, layer.backward.median_s) == (0.011, 0.022)
    assert layer.saved_bytes == 4000 and layer.forward.repeats == 30
    assert pooled.optimizer[0].time.median_s == 0.002
    assert pooled.meeting_waits[0].wait_s == 2e-3
    assert pooled.collective_fits == [fit]  # collectives: measured once, with the first profile
    assert pooled.created == profiles[0].created
    assert pooled.settings == {"threads": 1, "pooled_from": [p.created for p in profiles]}


def test_measurements_only_some_profiles_hold_are_kept_as_measured():
    first = profile("2026-12-03T10:00:00+00:00", 0.010, 0.002, 1e-3)
    second = profile("2026-12-03T10:20:00+00:00", 0.012, 0.002, 1e-3, layers=[block(0.012), block(0.030, 8)])
    layers = pool_profiles([first, second]).layers
    assert [(m.micro_batch_size, m.forward.median_s) for m in layers] == [(4, pytest.approx(0.011)), (8, 0.030)]
    assert layers[1].forward.repeats == 10


def test_one_profile_is_itself_and_none_is_refused():
    only = profile("2026-12-03T10:00:00+00:00", 0.010, 0.002, 1e-3)
    assert pool_profiles([only]) is only
    with pytest.raises(ValueError, match="at least one profile"):
        pool_profiles([])


def test_an_overlay_takes_the_remeasured_shapes_from_the_newer_profile_and_the_rest_from_the_base():
    fit = CollectiveFit(op="all_reduce", tier="intra_node", group_size=2, latency_s=1e-4, bandwidth_GBps=1.0,
                        r2=0.99, max_rel_error=0.05, num_samples=8)  # fmt: skip
    base = profile("2026-12-03T10:00:00+00:00", 0.010, 0.002, 1e-3, layers=[block(0.010), block(0.030, 8)],
                   collective_fits=[fit])  # fmt: skip
    newer = profile("2026-12-03T10:20:00+00:00", 0.015, 0.003, 4e-3, layers=[block(0.015)], optimizer=[])
    overlaid = overlay_profile(base, newer)
    assert sorted((m.micro_batch_size, m.forward.median_s) for m in overlaid.layers) == [(4, 0.015), (8, 0.030)]
    assert overlaid.optimizer == base.optimizer  # not re-measured: the base's stands
    assert [w.wait_s for w in overlaid.meeting_waits] == [4e-3]
    assert overlaid.collective_fits == [fit] and overlaid.created == base.created
    assert overlaid.settings == {"threads": 1, "overlaid_with": newer.created}
