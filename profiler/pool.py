"""Profiles of one machine measured at several times, pooled into one.

A shared machine's speed drifts over minutes (this project's 2-core VM: +-20-50% over tens of minutes, slow
spells of tens of seconds), and a profile measured in one block predicts only work done at the speed of that
block. `paraplan validate --passes N` therefore measures one profile before each pass of its runs and pools them
(api/commands/loop/profile.py), so that the profile and the runs sample the same stretch of time.

Each measurement's pooled time is the median of its times in the profiles (with three, one slow spell is
outvoted), its repeats are their sum, and its spread widens to cover the drift between the profiles, so a
measurement that moved with the machine is flagged unstable like one that was noisy within a pass. Pure: no
torch, no I/O.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from planner.specs import Frozen, HardwareProfile, TimingStats
from profiler.timing import UNSTABLE_SPREAD

# Per-profile lists whose entries are pooled; collectives and their fits are measured once (the first profile's
# stand: gloo's latency-bound collectives drift far less than compute, and their sweep is the slowest part).
POOLED_LISTS = ("layers", "optimizer", "meeting_waits")
# Integer fields that are results, not part of what was measured: the first profile's value stands.
RESULT_COUNTS = frozenset({"saved_bytes", "peak_allocated_bytes"})


def pool_profiles(profiles: Sequence[HardwareProfile]) -> HardwareProfile:
    """One profile of the measurements of `profiles` (the same machine and settings, measured at several
    times): every measurement any of them holds, its times pooled over the profiles that hold it."""
    if not profiles:
        raise ValueError("pool_profiles needs at least one profile")
    first = profiles[0]
    if len(profiles) == 1:
        return first
    pooled: dict[str, Any] = {name: _pool_list([getattr(p, name) for p in profiles]) for name in POOLED_LISTS}
    pooled["settings"] = {**first.settings, "pooled_from": [p.created for p in profiles]}
    return first.model_copy(update=pooled)


def overlay_profile(base: HardwareProfile, newer: HardwareProfile) -> HardwareProfile:
    """`base` with each measurement that `newer` holds in place of base's own: `newer` re-measured some shapes
    later (`paraplan validate --paired` profiles each plan's shapes just before its run). Collectives and their
    fits stay base's."""
    update: dict[str, Any] = {name: _overlay_list(getattr(base, name), getattr(newer, name)) for name in POOLED_LISTS}
    update["settings"] = {**base.settings, "overlaid_with": newer.created}
    return base.model_copy(update=update)


def _overlay_list(base: Sequence[Frozen], newer: Sequence[Frozen]) -> list[Frozen]:
    remeasured = {_identity(entry) for entry in newer}
    return [*newer, *(entry for entry in base if _identity(entry) not in remeasured)]


def pool_timings(timings: Sequence[TimingStats]) -> TimingStats:
    """The median of the medians; the widest of the spreads and the spread of the medians themselves."""
    medians = [t.median_s for t in timings]
    median = statistics.median(medians)
    drift = (max(medians) - min(medians)) / median if median > 0 else 0.0
    spread = max(drift, *(t.spread for t in timings))
    return TimingStats(
        median_s=median,
        spread=spread,
        repeats=sum(t.repeats for t in timings),
        unstable=spread > UNSTABLE_SPREAD or any(t.unstable for t in timings),
    )


def _pool_list(lists: Sequence[Sequence[Frozen]]) -> list[Frozen]:
    """Entries of the same measurement (`_identity`) pooled, in the order they first appear."""
    groups: dict[tuple, list[Frozen]] = {}
    for entries in lists:
        for entry in entries:
            groups.setdefault(_identity(entry), []).append(entry)
    return [_pool_entries(group) for group in groups.values()]


def _identity(entry: Frozen) -> tuple:
    """What was measured: every field that is not a time or a result count (layer, shape, ranks, ...)."""
    return tuple((name, value) for name, value in entry if not _is_result(name, value))


def _is_result(name: str, value: Any) -> bool:
    return isinstance(value, TimingStats | float) or name in RESULT_COUNTS


def _pool_entries(group: list[Frozen]) -> Frozen:
    """One measurement from its repeats in several profiles: times pooled (`pool_timings`), other measured
    seconds by their median, result counts as the first had them."""
    first = group[0]
    if len(group) == 1:
        return first
    update: dict[str, Any] = {}
    for name, value in first:
        values = [getattr(entry, name) for entry in group]
        if isinstance(value, TimingStats):
            update[name] = pool_timings(values)
        elif isinstance(value, float):
            update[name] = statistics.median(values)
    return first.model_copy(update=update)
