"""Layer-to-stage partition: the CP-SAT model against an exact DP and brute force, on the real solver."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import operator

import numpy as np
import pytest

from planner.search.partition import (
    Partition,
    PartitionProblem,
    _solve_block_counts,
    _solve_per_block,
    _uniform_blocks,
    evaluate_partition,
    exact_partition,
    solve_partition,
)
from planner.specs import even_layer_split

GIB = 2.0**30
# Both solvers optimise times rounded to ~2**-30 of the largest device total; two optimal splits can differ by a
# few such units in float, far below this tolerance.
SAME_TIME = {"rel": 1e-7}
RANDOM_SEEDS = range(40)
# Caps as a multiple of an even split's memory: below ~1 nothing fits; up to ~2 the cap moves the optimum.
CAP_FACTOR_LO, CAP_FACTOR_HI = 0.85, 2.0


def random_problem(rng: np.random.Generator, n: int, pp: int, virtual_stages: int = 1) -> PartitionProblem:
    """Heterogeneous block times; memory uncorrelated with time and heavier on early devices (more micro-batches in
    flight under 1F1B), so memory-balanced and time-balanced splits differ; a cap from infeasible to loose."""
    block_time_s = rng.uniform(0.1, 3.0, n)
    in_flight = np.linspace(2.0, 1.0, pp) * rng.uniform(0.8, 1.2, pp)
    block_memory = rng.uniform(0.2, 2.0, (n, 1)) * in_flight[None, :] * GIB
    base_memory = rng.uniform(0.0, 0.5, pp) * GIB
    even_load = base_memory.max() + block_memory.mean(axis=1).sum() / pp
    return PartitionProblem(
        block_time_s=tuple(block_time_s),
        block_memory_bytes=tuple(map(tuple, block_memory)),
        device_base_time_s=tuple(rng.uniform(0.0, 2.0, pp)),
        device_base_memory_bytes=tuple(base_memory),
        capacity_bytes=rng.uniform(CAP_FACTOR_LO, CAP_FACTOR_HI) * even_load,
        pp=pp,
        virtual_stages=virtual_stages,
    )


def small_random_problem(seed: int) -> PartitionProblem:
    rng = np.random.default_rng(seed)
    pp = int(rng.integers(1, 6))
    return random_problem(rng, int(rng.integers(max(4, pp), 21)), pp)


def assert_valid(problem: PartitionProblem, partition: Partition) -> None:
    """Contiguous chunks in order (sizes), all blocks, none empty, every device within capacity in float."""
    sizes = partition.layers_per_stage
    assert len(sizes) == problem.num_chunks and sum(sizes) == problem.num_blocks and min(sizes) >= 1
    recomputed = evaluate_partition(problem, sizes)
    assert recomputed.max_device_time_s == partition.max_device_time_s
    assert recomputed.device_memory_bytes == partition.device_memory_bytes
    assert all(m <= problem.capacity_bytes for m in partition.device_memory_bytes)


def compositions(n: int, chunks: int) -> list[tuple[int, ...]]:
    """Every split of n blocks into `chunks` non-empty contiguous chunks, as chunk sizes."""
    bounds = ((0, *cuts, n) for cuts in itertools.combinations(range(1, n), chunks - 1))
    return [tuple(b - a for a, b in itertools.pairwise(bound)) for bound in bounds]


def fits(problem: PartitionProblem, sizes: tuple[int, ...]) -> bool:
    return all(m <= problem.capacity_bytes for m in evaluate_partition(problem, sizes).device_memory_bytes)


def brute_force(problem: PartitionProblem) -> Partition | None:
    """The best split over every composition of n into num_chunks positive parts, in float."""
    best = None
    for sizes in compositions(problem.num_blocks, problem.num_chunks):
        candidate = evaluate_partition(problem, sizes)
        if fits(problem, sizes) and (best is None or candidate.max_device_time_s < best.max_device_time_s):
            best = candidate
    return best


@pytest.mark.parametrize("seed", RANDOM_SEEDS)
def test_ilp_matches_exact_dp_on_random_cases(seed):
    problem = small_random_problem(seed)
    ilp, dp = solve_partition(problem, time_limit_s=10.0), exact_partition(problem)
    assert (ilp is None) == (dp is None)
    if dp is not None:
        assert ilp.optimal and dp.optimal
        assert ilp.max_device_time_s == pytest.approx(dp.max_device_time_s, **SAME_TIME)
        assert_valid(problem, ilp)
        assert_valid(problem, dp)


def cap_regime(problem: PartitionProblem) -> str:
    """Whether the memory cap makes the problem infeasible, changes the optimum (binding) or not (loose)."""
    capped = exact_partition(problem)
    if capped is None:
        return "infeasible"
    free = exact_partition(dataclasses.replace(problem, capacity_bytes=math.inf))
    return "binding" if capped.max_device_time_s > free.max_device_time_s * (1 + 1e-6) else "loose"


def test_random_cases_cover_infeasible_binding_and_loose_caps():
    counts = collections.Counter(cap_regime(small_random_problem(seed)) for seed in RANDOM_SEEDS)
    assert min(counts["infeasible"], counts["binding"], counts["loose"]) >= 4, counts


@pytest.mark.parametrize("virtual_stages", [2, 3])
@pytest.mark.parametrize("seed", range(8))
def test_interleaved_ilp_matches_brute_force(virtual_stages, seed):
    rng = np.random.default_rng(1000 + seed)
    pp = int(rng.integers(2, 4))
    problem = random_problem(rng, pp * virtual_stages + int(rng.integers(1, 7)), pp, virtual_stages)
    ilp, expected = solve_partition(problem, time_limit_s=10.0), brute_force(problem)
    assert (ilp is None) == (expected is None)
    if expected is not None:
        assert ilp.optimal
        assert ilp.max_device_time_s == pytest.approx(expected.max_device_time_s, **SAME_TIME)
        assert_valid(problem, ilp)


def test_interleaved_chunks_land_on_devices_round_robin():
    # Chunk c runs on device c % pp: sizes (1, 2, 3, 4) on pp=2 put blocks 0 and 3..5 on device 0.
    problem = PartitionProblem(
        block_time_s=tuple(float(2**b) for b in range(10)),
        block_memory_bytes=((1.0, 1.0),) * 10,
        device_base_time_s=(0.0, 0.0),
        device_base_memory_bytes=(0.0, 0.0),
        capacity_bytes=math.inf,
        pp=2,
        virtual_stages=2,
    )
    result = evaluate_partition(problem, (1, 2, 3, 4))
    assert result.max_device_time_s == 2**1 + 2**2 + 2**6 + 2**7 + 2**8 + 2**9
    assert result.device_memory_bytes == (4.0, 6.0)


def uniform_problem(n: int, pp: int, base_time_s: tuple[float, ...], capacity_bytes: float = math.inf):
    return PartitionProblem(
        block_time_s=(1.0,) * n,
        block_memory_bytes=((1.0 * GIB,) * pp,) * n,
        device_base_time_s=base_time_s,
        device_base_memory_bytes=(0.0,) * pp,
        capacity_bytes=capacity_bytes,
        pp=pp,
    )


def test_embedding_and_head_time_push_blocks_to_the_middle():
    problem = uniform_problem(10, 4, base_time_s=(3.0, 0.0, 0.0, 3.0))
    for partition in (solve_partition(problem), exact_partition(problem)):
        assert partition.layers_per_stage == (1, 4, 4, 1)
        assert partition.max_device_time_s == 4.0
        assert partition.optimal


def test_memory_cap_moves_blocks_off_the_device_with_more_micro_batches_in_flight():
    # 1F1B: device 0 keeps twice the activations of device 1, so a block costs 2 GiB there and 1 GiB on device 1.
    def problem(capacity_bytes: float) -> PartitionProblem:
        return PartitionProblem(
            block_time_s=(1.0,) * 8,
            block_memory_bytes=((2 * GIB, 1 * GIB),) * 8,
            device_base_time_s=(0.0, 0.0),
            device_base_memory_bytes=(0.0, 0.0),
            capacity_bytes=capacity_bytes,
            pp=2,
        )

    assert solve_partition(problem(math.inf)).layers_per_stage == (4, 4)
    for partition in (solve_partition(problem(6 * GIB)), exact_partition(problem(6 * GIB))):
        assert partition.layers_per_stage == (3, 5)  # fits exactly: device 0 holds 6 GiB
        assert partition.device_memory_bytes == (6 * GIB, 5 * GIB)
        assert partition.max_device_time_s == 5.0
    assert solve_partition(problem(6 * GIB - 1)) is None
    assert exact_partition(problem(6 * GIB - 1)) is None


def test_memory_rounding_is_conservative():
    # A few hundred bytes over a 1 GiB cap is far below the solver's memory unit (~1 KiB here); still rejected.
    def problem(extra_bytes_per_block: float) -> PartitionProblem:
        return PartitionProblem(
            block_time_s=(1.0,) * 8,
            block_memory_bytes=((GIB / 4 + extra_bytes_per_block,) * 2,) * 8,
            device_base_time_s=(0.0, 0.0),
            device_base_memory_bytes=(0.0, 0.0),
            capacity_bytes=GIB,
            pp=2,
        )

    assert solve_partition(problem(0.0)).device_memory_bytes == (GIB, GIB)
    assert exact_partition(problem(0.0)).layers_per_stage == (4, 4)
    for extra_bytes_per_block in (100.0, 0.1, 1e30):  # 1e30: far past int64 in solver units, clipped
        assert solve_partition(problem(extra_bytes_per_block)) is None
        assert exact_partition(problem(extra_bytes_per_block)) is None


def test_96_blocks_on_8_stages_solves_to_optimality():
    # Every 4th block is heavy (3x time, more memory); the embedding and head add time and memory at the ends.
    n, pp = 96, 8
    heavy = np.arange(n) % 4 == 3
    block_time_s = np.where(heavy, 3.0e-3, 1.0e-3)
    block_memory = np.where(heavy, 1.5, 1.0)[:, None] * np.linspace(2.0, 1.0, pp)[None, :] * GIB
    base_time_s = np.zeros(pp)
    base_time_s[[0, -1]] = [4.0e-3, 6.0e-3]
    base_memory = np.full(pp, 4 * GIB)
    base_memory[[0, -1]] += 2 * GIB
    problem = PartitionProblem(
        block_time_s=tuple(block_time_s),
        block_memory_bytes=tuple(map(tuple, block_memory)),
        device_base_time_s=tuple(base_time_s),
        device_base_memory_bytes=tuple(base_memory),
        capacity_bytes=1.1 * (base_memory.max() + block_memory.sum() / pp),
        pp=pp,
    )
    ilp, dp = solve_partition(problem, time_limit_s=10.0), exact_partition(problem)
    assert ilp.optimal
    assert ilp.max_device_time_s == pytest.approx(dp.max_device_time_s, **SAME_TIME)
    assert_valid(problem, ilp)
    assert ilp.layers_per_stage[0] < n // pp and ilp.layers_per_stage[-1] < n // pp


def valid_kwargs() -> dict:
    return dict(
        block_time_s=(1.0,) * 4,
        block_memory_bytes=((1.0, 1.0),) * 4,
        device_base_time_s=(0.0, 0.0),
        device_base_memory_bytes=(0.0, 0.0),
        capacity_bytes=10.0,
        pp=2,
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_time_s", (1.0, -1.0, 1.0, 1.0)),
        ("block_time_s", (1.0, math.inf, 1.0, 1.0)),
        ("block_memory_bytes", ((1.0, 1.0),) * 3),
        ("block_memory_bytes", ((1.0,),) * 4),
        ("block_memory_bytes", ((1.0, math.nan),) * 4),
        ("device_base_time_s", (0.0,)),
        ("device_base_memory_bytes", (0.0, -1.0)),
        ("capacity_bytes", -1.0),
        ("capacity_bytes", math.nan),
        ("pp", 0),
        ("pp", 2.0),
        ("virtual_stages", 0),
    ],
)
def test_bad_input_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PartitionProblem(**{**valid_kwargs(), field: value})


def test_too_few_blocks_for_the_chunks_names_the_blocks():
    with pytest.raises(ValueError, match="block_time_s"):
        PartitionProblem(**valid_kwargs(), virtual_stages=3)


def test_bad_split_and_interleaved_dp_raise():
    problem = PartitionProblem(**valid_kwargs())
    for sizes in [(4,), (0, 4), (2, 3)]:
        with pytest.raises(ValueError, match="layers_per_stage"):
            evaluate_partition(problem, sizes)
    with pytest.raises(ValueError, match="virtual_stages"):
        exact_partition(dataclasses.replace(problem, virtual_stages=2))


def test_lists_are_stored_as_tuples_of_floats():
    problem = PartitionProblem(**{**valid_kwargs(), "block_time_s": [1, 2, 3, 4]})
    assert problem.block_time_s == (1.0, 2.0, 3.0, 4.0)
    assert hash(problem) == hash(dataclasses.replace(problem))


# ------------------------------------------------------------------ uniform blocks: the count model

UNIFORM_SEEDS = range(30)


def random_uniform_problem(rng: np.random.Generator, n: int, pp: int, virtual_stages: int = 1) -> PartitionProblem:
    """The cost model's case: every block has the same time and the same memory row (heavier on early devices);
    base time and memory per device; a cap from infeasible to loose."""
    block_memory = tuple(np.linspace(2.0, 1.0, pp) * rng.uniform(0.8, 1.2, pp) * rng.uniform(0.2, 2.0) * GIB)
    base_memory = rng.uniform(0.0, 0.5, pp) * GIB * n / pp
    even_load = base_memory.max() + np.mean(block_memory) * n / pp
    return PartitionProblem(
        block_time_s=(float(rng.uniform(0.1, 3.0)),) * n,
        block_memory_bytes=(block_memory,) * n,
        device_base_time_s=tuple(rng.uniform(0.0, 3.0, pp)),
        device_base_memory_bytes=tuple(base_memory),
        capacity_bytes=rng.uniform(CAP_FACTOR_LO, CAP_FACTOR_HI) * even_load,
        pp=pp,
        virtual_stages=virtual_stages,
    )


def small_uniform_problem(seed: int) -> PartitionProblem:
    rng = np.random.default_rng(2000 + seed)
    pp = int(rng.integers(1, 6))
    return random_uniform_problem(rng, int(rng.integers(max(4, pp), 21)), pp)


def uniform_optimum(problem: PartitionProblem) -> float | None:
    """Closed form for uniform blocks: device d takes at most K_d(Z) blocks at time Z within its capacity, and a
    split exists iff every K_d >= virtual_stages (one block per chunk) and sum K_d >= n. The least such Z is one
    of the values base_time[d] + k * t."""
    t, per_block = problem.block_time_s[0], problem.block_memory_bytes[0]
    n, pp, v = problem.num_blocks, problem.pp, problem.virtual_stages
    base_time, base_memory = problem.device_base_time_s, problem.device_base_memory_bytes

    def most_blocks(device: int, z: float) -> int:
        by_time = math.floor((z - base_time[device]) / t + 1e-9) if t > 0 else n
        spare = problem.capacity_bytes - base_memory[device]
        if spare < 0:
            return -1
        if per_block[device] == 0 or spare == math.inf:
            return min(by_time, n)
        return min(by_time, math.floor(spare / per_block[device] * (1 + 1e-12)), n)

    for z in sorted({base_time[d] + k * t for d in range(pp) for k in range(v, n + 1)}):
        room = [most_blocks(d, z) for d in range(pp)]
        if min(room) >= v and sum(room) >= n:
            return z
    return None


def test_uniform_cases_take_the_count_model():
    assert _uniform_blocks(small_uniform_problem(0))
    assert not _uniform_blocks(small_random_problem(0))
    # Equal times but one memory row off by one byte: not uniform.
    problem = uniform_problem(8, 2, base_time_s=(0.0, 0.0))
    rows = list(problem.block_memory_bytes)
    rows[3] = (GIB, GIB + 1)
    assert not _uniform_blocks(dataclasses.replace(problem, block_memory_bytes=tuple(rows)))


@pytest.mark.parametrize("seed", UNIFORM_SEEDS)
def test_count_model_matches_per_block_model_and_exact_dp(seed):
    problem = small_uniform_problem(seed)
    counts = _solve_block_counts(problem, time_limit_s=10.0, workers=2)
    per_block = _solve_per_block(problem, time_limit_s=10.0, workers=2)
    dp = exact_partition(problem)
    assert (counts is None) == (per_block is None) == (dp is None) == (uniform_optimum(problem) is None)
    if dp is not None:
        assert counts.optimal and per_block.optimal
        assert counts.max_device_time_s == pytest.approx(dp.max_device_time_s, **SAME_TIME)
        assert per_block.max_device_time_s == pytest.approx(dp.max_device_time_s, **SAME_TIME)
        assert dp.max_device_time_s == pytest.approx(uniform_optimum(problem), **SAME_TIME)
        assert_valid(problem, counts)
        assert solve_partition(problem) == counts


def test_uniform_random_cases_cover_infeasible_binding_and_loose_caps():
    counts = collections.Counter(cap_regime(small_uniform_problem(seed)) for seed in UNIFORM_SEEDS)
    assert min(counts["infeasible"], counts["binding"], counts["loose"]) >= 4, counts


@pytest.mark.parametrize("virtual_stages", [2, 3])
@pytest.mark.parametrize("seed", range(8))
def test_interleaved_count_model_matches_brute_force(virtual_stages, seed):
    rng = np.random.default_rng(3000 + seed)
    pp = int(rng.integers(2, 4))
    problem = random_uniform_problem(rng, pp * virtual_stages + int(rng.integers(1, 7)), pp, virtual_stages)
    counts, expected = solve_partition(problem, time_limit_s=10.0), brute_force(problem)
    assert (counts is None) == (expected is None) == (uniform_optimum(problem) is None)
    if expected is not None:
        assert counts.optimal
        assert counts.max_device_time_s == pytest.approx(expected.max_device_time_s, **SAME_TIME)
        assert counts.max_device_time_s == pytest.approx(uniform_optimum(problem), **SAME_TIME)
        assert_valid(problem, counts)


def transformer_like_problem(n: int, pp: int, virtual_stages: int, capacity_factor: float) -> PartitionProblem:
    """Uniform blocks at a real model's scale: 1F1B memory heavier on early devices, embedding and head time and
    memory on the end devices, a cap relative to the even split's fullest device."""
    per_block = tuple(float(b) for b in np.linspace(2.0, 1.0, pp) * 0.3 * GIB)
    base_time_s = np.zeros(pp)
    base_time_s[[0, -1]] += [2.5e-3, 4.0e-3]
    base_memory = np.full(pp, 4 * GIB)
    base_memory[[0, -1]] += [2 * GIB, 3 * GIB]
    even_load = max(base_memory[d] + per_block[d] * n / pp for d in range(pp))
    return PartitionProblem(
        block_time_s=(1.3e-3,) * n,
        block_memory_bytes=(per_block,) * n,
        device_base_time_s=tuple(base_time_s),
        device_base_memory_bytes=tuple(base_memory),
        capacity_bytes=capacity_factor * even_load,
        pp=pp,
        virtual_stages=virtual_stages,
    )


@pytest.mark.parametrize(
    ("n", "pp", "virtual_stages"),
    [(96, 8, 1), (96, 8, 3), (105, 35, 1)] + [(126, 16, v) for v in range(2, 8)],
)
@pytest.mark.parametrize("capacity_factor", [math.inf, 0.85, 0.75])  # loose, binding or infeasible
def test_real_scale_uniform_cases_solve_to_proven_optimality(n, pp, virtual_stages, capacity_factor):
    problem = transformer_like_problem(n, pp, virtual_stages, capacity_factor)
    partition = solve_partition(problem)
    expected = uniform_optimum(problem)
    assert (partition is None) == (expected is None)
    if partition is not None:
        assert partition.optimal
        assert partition.max_device_time_s == pytest.approx(expected, **SAME_TIME)
        assert_valid(problem, partition)
        even = even_layer_split(n, problem.num_chunks)
        if fits(problem, even):
            assert partition.max_device_time_s <= evaluate_partition(problem, even).max_device_time_s


@pytest.mark.parametrize(
    ("n", "pp", "virtual_stages"),
    [(10, 4, 1), (11, 4, 1), (96, 8, 1), (98, 8, 1), (13, 3, 2), (100, 8, 3), (126, 16, 7), (105, 35, 1)],
)
def test_uniform_blocks_without_pressure_give_the_even_split(n, pp, virtual_stages):
    problem = dataclasses.replace(uniform_problem(n, pp, base_time_s=(0.0,) * pp), virtual_stages=virtual_stages)
    for capacity_bytes in (math.inf, (n // problem.num_chunks + 1) * virtual_stages * 2 * GIB):
        partition = solve_partition(dataclasses.replace(problem, capacity_bytes=capacity_bytes))
        assert partition.layers_per_stage == even_layer_split(n, problem.num_chunks)
        assert partition.optimal


def extra_block_rank(chunks: int) -> list[int]:
    """The order in which even_layer_split gives chunks an extra block as the block count grows (0 first)."""
    return [next(k for k in range(chunks) if even_layer_split(chunks + k + 1, chunks)[c] == 2) for c in range(chunks)]


def test_ties_go_to_the_even_split_then_to_the_middle_chunks():
    # Device 0's base time is 2.5 blocks: Z* = 4 blocks' time with 1 block on device 0. (1, 4, 4, 2), (1, 4, 3, 3),
    # (1, 3, 4, 3) and (1, 3, 3, 4) are all 4 blocks off even_layer_split's (3, 3, 3, 2); even_layer_split gives
    # extras to chunk 1, then 2, then 0, then 3, so the tie goes to the most blocks on chunks 1 and 2.
    problem = uniform_problem(11, 4, base_time_s=(2.5, 0.0, 0.0, 0.0))
    assert even_layer_split(11, 4) == (3, 3, 3, 2)
    for workers in (1, 2, 8):
        assert solve_partition(problem, workers=workers).layers_per_stage == (1, 4, 4, 2)


def exact_uniform_problem(seed: int) -> PartitionProblem:
    """Small uniform cases on binary-exact data (integer times and GiB): float comparisons match the solver's
    integer units exactly, so ties in float are ties for the solver."""
    rng = np.random.default_rng(4000 + seed)
    pp, virtual_stages = int(rng.integers(1, 5)), int(rng.integers(1, 3))
    n = min(pp * virtual_stages + int(rng.integers(2, 9)), 15)
    return PartitionProblem(
        block_time_s=(1.0,) * n,
        block_memory_bytes=(tuple(float(m) * GIB for m in rng.integers(1, 4, pp)),) * n,
        device_base_time_s=tuple(float(t) / 2 for t in rng.integers(0, 7, pp)),
        device_base_memory_bytes=tuple(float(m) * GIB for m in rng.integers(0, 4, pp)),
        capacity_bytes=float(rng.integers(6, 24)) * GIB,
        pp=pp,
        virtual_stages=virtual_stages,
    )


def tie_break_key(problem: PartitionProblem, sizes: tuple[int, ...]) -> tuple[float, int, int]:
    """(slowest device, deviation from even_layer_split, sum rank_c * n_c): the count model's order."""
    even = even_layer_split(problem.num_blocks, problem.num_chunks)
    deviation = sum(abs(s - e) for s, e in zip(sizes, even, strict=True))
    placement = sum(map(operator.mul, extra_block_rank(problem.num_chunks), sizes))
    return evaluate_partition(problem, sizes).max_device_time_s, deviation, placement


def test_count_model_tie_break_matches_brute_force_and_is_unique():
    # Over every split that fits, the least tie_break_key is a single split, and it is the solver's.
    seen = collections.Counter()
    for seed in range(20):
        problem = exact_uniform_problem(seed)
        fitting = [s for s in compositions(problem.num_blocks, problem.num_chunks) if fits(problem, s)]
        partition = solve_partition(problem, time_limit_s=10.0)
        assert (partition is None) == (not fitting), seed
        if not fitting:
            seen["infeasible"] += 1
            continue
        keys = {sizes: tie_break_key(problem, sizes) for sizes in fitting}
        best = min(keys.values())
        assert [sizes for sizes, key in keys.items() if key == best] == [partition.layers_per_stage], seed
        seen["tied on time and deviation"] += sum(key[:2] == best[:2] for key in keys.values()) > 1
    assert min(seen["infeasible"], seen["tied on time and deviation"]) >= 4, seen


def test_no_split_found_within_the_time_limit_raises_timeout_error():
    # Far too little time for CP-SAT to find any split: not proven infeasible, so not None.
    problem = random_problem(np.random.default_rng(0), 96, 8)
    with pytest.raises(TimeoutError, match="infeasibility is not proven"):
        solve_partition(problem, time_limit_s=1e-6)
