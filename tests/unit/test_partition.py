"""Layer-to-stage partition: the CP-SAT model against an exact DP and brute force, on the real solver."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math

import numpy as np
import pytest

from planner.search.partition import (
    Partition,
    PartitionProblem,
    evaluate_partition,
    exact_partition,
    solve_partition,
)

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


def brute_force(problem: PartitionProblem) -> Partition | None:
    """The best split over every composition of n into num_chunks positive parts, in float."""
    n, chunks = problem.num_blocks, problem.num_chunks
    best = None
    for cuts in itertools.combinations(range(1, n), chunks - 1):
        bounds = (0, *cuts, n)
        candidate = evaluate_partition(problem, tuple(b - a for a, b in itertools.pairwise(bounds)))
        fits = all(m <= problem.capacity_bytes for m in candidate.device_memory_bytes)
        if fits and (best is None or candidate.max_device_time_s < best.max_device_time_s):
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


def test_random_cases_cover_infeasible_binding_and_loose_caps():
    def regime(problem: PartitionProblem) -> str:
        capped = exact_partition(problem)
        if capped is None:
            return "infeasible"
        free = exact_partition(dataclasses.replace(problem, capacity_bytes=math.inf))
        return "binding" if capped.max_device_time_s > free.max_device_time_s * (1 + 1e-6) else "loose"

    counts = collections.Counter(regime(small_random_problem(seed)) for seed in RANDOM_SEEDS)
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
