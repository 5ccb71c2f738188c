"""Split a sequence of transformer blocks into contiguous pipeline chunks: an ILP (OR-Tools CP-SAT) and an exact DP.

`pp` devices run `pp * virtual_stages` chunks; chunk c runs on device c % pp, the interleaved assignment of
Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters", sec. 2.2 (with one
virtual stage, chunk = device). The objective is the slowest device's time per micro-batch, under a per-device
memory cap. The ILP uses the standard cumulative-boolean formulation of contiguous partitioning; the DP
(virtual_stages == 1 only) is exact on the same integer data, so the two agree to the unit.

When every block costs the same (the cost model's case: equal block times, equal memory rows), a contiguous split
is fully determined by the number of blocks per chunk, and a much smaller ILP over those counts (pp * v integers
instead of ~n * pp * v booleans) solves in milliseconds; `solve_partition` picks it by itself.

Both solve on integers (`_scale`). Times round to the nearest unit (a power of two of seconds, ~2**-30 of the
largest device total), so "optimal" holds to within n units. Memory rounds conservatively: bytes up, capacity down,
in power-of-two units (exact divisions); a returned partition truly fits, also in `evaluate_partition`'s fsums.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from planner.specs import even_layer_split

_TIME_STEPS_LOG2 = 30  # the largest possible device time spans ~2**30 units
_MEMORY_STEPS_LOG2 = 20  # the capacity spans ~2**20 units
_FLOAT_VECTORS = ("block_time_s", "device_base_time_s", "device_base_memory_bytes")


@dataclass(frozen=True)
class PartitionProblem:
    block_time_s: tuple[float, ...]  # [block]: seconds per micro-batch
    block_memory_bytes: tuple[tuple[float, ...], ...]  # [block][device]: bytes the block adds on that device
    device_base_time_s: tuple[float, ...]  # [device]: time independent of the split (embedding, head)
    device_base_memory_bytes: tuple[float, ...]  # [device]: bytes independent of the split
    capacity_bytes: float  # per-device limit; math.inf for none
    pp: int
    virtual_stages: int = 1

    def __post_init__(self) -> None:
        for name in _FLOAT_VECTORS:
            object.__setattr__(self, name, tuple(map(float, getattr(self, name))))
        # The search's problems repeat one row for every block: each distinct row object is converted once.
        converted: dict[int, tuple[float, ...]] = {}
        for row in self.block_memory_bytes:
            if id(row) not in converted:
                converted[id(row)] = tuple(map(float, row))
        rows = tuple(converted[id(row)] for row in self.block_memory_bytes)
        object.__setattr__(self, "block_memory_bytes", rows)
        for name in ("pp", "virtual_stages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        n, pp = self.num_blocks, self.pp
        if n < self.num_chunks:
            raise ValueError(f"block_time_s: {n} blocks cannot fill pp * virtual_stages = {self.num_chunks} chunks")
        if len(self.block_memory_bytes) != n or any(len(row) != pp for row in self.block_memory_bytes):
            raise ValueError(f"block_memory_bytes: must be {n} rows (one per block) of pp={pp} values")
        for name in ("device_base_time_s", "device_base_memory_bytes"):
            if len(getattr(self, name)) != pp:
                raise ValueError(f"{name}: must have pp={pp} values, got {len(getattr(self, name))}")
        memory = [v for row in {id(r): r for r in self.block_memory_bytes}.values() for v in row]
        for name, values in [("block_memory_bytes", memory)] + [(f, getattr(self, f)) for f in _FLOAT_VECTORS]:
            if not all(math.isfinite(v) and v >= 0 for v in values):
                raise ValueError(f"{name}: every value must be finite and >= 0")
        if not self.capacity_bytes >= 0:
            raise ValueError(f"capacity_bytes: must be >= 0 (math.inf for no limit), got {self.capacity_bytes}")

    @property
    def num_blocks(self) -> int:
        return len(self.block_time_s)

    @property
    def num_chunks(self) -> int:
        return self.pp * self.virtual_stages


@dataclass(frozen=True)
class Partition:
    layers_per_stage: tuple[int, ...]  # blocks per chunk, in chunk order
    max_device_time_s: float
    device_memory_bytes: tuple[float, ...]
    optimal: bool  # the solver proved it optimal (on the integer-scaled data)


@dataclass(frozen=True)
class _Scaled:
    """The problem on integer units (see `_scale`); capacity_units is None when unlimited."""

    time_units: list[int]
    base_time_units: list[int]
    memory_units: list[list[int]]  # [block][device]
    base_memory_units: list[int]
    capacity_units: int | None


def _power_of_two_unit(largest: float, steps_log2: int) -> float:
    """A power of two u with largest / u in [2**steps_log2, 2**(steps_log2 + 1)); dividing by it is exact."""
    return math.ldexp(1.0, math.frexp(largest)[1] - 1 - steps_log2) if largest > 0 else 1.0


def _scale(problem: PartitionProblem) -> _Scaled:
    """Integer data shared by the ILP and the DP: times rounded, memory rounded up, capacity rounded down. Memory
    above the capacity is clipped to capacity + 1 unit (still never fits) to keep CP-SAT's sums inside int64."""
    t_unit_s = _power_of_two_unit(sum(problem.block_time_s) + max(problem.device_base_time_s), _TIME_STEPS_LOG2)
    limited = math.isfinite(problem.capacity_bytes)
    m_unit_bytes = _power_of_two_unit(problem.capacity_bytes if limited else 0.0, _MEMORY_STEPS_LOG2)
    capacity_units = math.floor(problem.capacity_bytes / m_unit_bytes) if limited else None

    def memory_units(m_bytes: float) -> int:
        units = math.ceil(m_bytes / m_unit_bytes)
        return units if capacity_units is None else min(units, capacity_units + 1)

    return _Scaled(
        time_units=[round(t / t_unit_s) for t in problem.block_time_s],
        base_time_units=[round(t / t_unit_s) for t in problem.device_base_time_s],
        memory_units=[[memory_units(m) for m in row] for row in problem.block_memory_bytes],
        base_memory_units=[memory_units(m) for m in problem.device_base_memory_bytes],
        capacity_units=capacity_units,
    )


def evaluate_partition(
    problem: PartitionProblem, layers_per_stage: tuple[int, ...], optimal: bool = False
) -> Partition:
    """Device times and memory in float (math.fsum, correctly rounded) for a given split; raises ValueError if the
    split is not num_chunks non-empty chunks covering every block. Does not check the capacity."""
    sizes = tuple(int(s) for s in layers_per_stage)
    if len(sizes) != problem.num_chunks or min(sizes) < 1 or sum(sizes) != problem.num_blocks:
        raise ValueError(
            f"layers_per_stage: need {problem.num_chunks} chunks >= 1 summing to {problem.num_blocks}, got {sizes}"
        )
    times = [[t] for t in problem.device_base_time_s]
    memory = [[m] for m in problem.device_base_memory_bytes]
    chunk_of_block = [c for c, size in enumerate(sizes) for _ in range(size)]
    for block, chunk in enumerate(chunk_of_block):
        times[chunk % problem.pp].append(problem.block_time_s[block])
        memory[chunk % problem.pp].append(problem.block_memory_bytes[block][chunk % problem.pp])
    return Partition(sizes, max(math.fsum(t) for t in times), tuple(math.fsum(m) for m in memory), optimal)


def solve_partition(problem: PartitionProblem, time_limit_s: float = 1.0, workers: int = 2) -> Partition | None:
    """Minimise the slowest device's time with CP-SAT, within each device's memory capacity.

    Uniform blocks (all block times equal and all memory rows equal, exactly) use the count model
    (`_solve_block_counts`, milliseconds); anything else the per-block model (`_solve_per_block`). Both optimise the
    same integer data (`_scale`), so they reach the same optimum.

    time_limit_s: CP-SAT's wall-clock limit for the whole call. workers: CP-SAT search threads.

    Returns the best split found: optimal=True when CP-SAT proved it optimal, optimal=False when the time limit
    stopped it with a feasible split in hand; None when CP-SAT proved that no split fits in memory.

    Raises TimeoutError when the time limit passes before CP-SAT finds any split (infeasibility is not proven
    either: a longer limit may find one), and RuntimeError if CP-SAT rejects the model (a bug).
    """
    if _uniform_blocks(problem):
        return _solve_block_counts(problem, time_limit_s, workers)
    return _solve_per_block(problem, time_limit_s, workers)


def _uniform_blocks(problem: PartitionProblem) -> bool:
    """Every block has the same time and the same memory row (exact float equality)."""
    return len(set(problem.block_time_s)) == 1 and len(set(problem.block_memory_bytes)) == 1


def _solve(model: cp_model.CpModel, time_limit_s: float, workers: int) -> tuple[cp_model.CpSolver, int] | None:
    """Run CP-SAT: (solver, status) with a solution in hand, None when proven infeasible; raises TimeoutError when
    the limit passes with neither, RuntimeError on an invalid model."""
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    solver.parameters.num_workers = workers
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE:
        return None
    if status == cp_model.UNKNOWN:
        raise TimeoutError(f"CP-SAT found no partition in {time_limit_s} s; infeasibility is not proven")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise RuntimeError(f"CP-SAT returned {solver.status_name(status)}: {model.validate()}")
    return solver, status


def _solve_block_counts(problem: PartitionProblem, time_limit_s: float, workers: int) -> Partition | None:
    """The count model, for uniform blocks: n_c in [1, n - (C - 1)] blocks in chunk c, sum n_c = n. Device d holds
    k_d = sum of n_c over c % pp == d; base_time[d] + t * k_d <= Z and base_memory[d] + m[d] * k_d <= capacity;
    minimise Z, hinted with the even split.

    Several count vectors usually tie on Z, so a proven optimum Z* is followed by a second solve with Z <= Z*
    fixed that picks, lexicographically, (1) the least sum |n_c - even_c| from `even_layer_split`, then (2) the
    least sum rank_c * n_c, rank_c being c's place in the order in which `even_layer_split` hands out extra blocks
    (middle chunks first, the two end chunks last). The optimum of (2) over the optimal set of (1) is unique (a
    linear objective with distinct weights over a polymatroid base), so the answer does not depend on the
    workers or the search's luck; with no memory pressure and no base time it is exactly `even_layer_split`.
    (Only if the time limit cuts the second solve short is the tie left to the first solve's pick.)
    """
    n, chunks, pp, data = problem.num_blocks, problem.num_chunks, problem.pp, _scale(problem)
    block_time, block_memory = data.time_units[0], data.memory_units[0]
    model = cp_model.CpModel()
    counts = [model.new_int_var(1, n - (chunks - 1), f"n_{chunk}") for chunk in range(chunks)]
    model.add(sum(counts) == n)
    lowest = max(data.base_time_units)
    slowest = model.new_int_var(lowest, lowest + block_time * n, "max_device_time")
    for device in range(pp):
        blocks = sum(counts[device::pp])
        model.add(data.base_time_units[device] + block_time * blocks <= slowest)
        if data.capacity_units is not None:
            model.add(data.base_memory_units[device] + block_memory[device] * blocks <= data.capacity_units)
    model.minimize(slowest)
    even = even_layer_split(n, chunks)
    for count, size in zip(counts, even, strict=True):
        model.add_hint(count, size)

    solved = _solve(model, time_limit_s, workers)
    if solved is None:
        return None
    solver, status = solved
    sizes = [solver.value(count) for count in counts]
    remaining_s = time_limit_s - solver.wall_time
    if status == cp_model.OPTIMAL and _even_split_is_optimal(data, even, pp, solver.value(slowest)):
        # The tie-break below would answer the even split itself: its deviation, 0, is the least there is.
        sizes = list(even)
    elif status == cp_model.OPTIMAL and remaining_s > 0:
        model.add(slowest <= solver.value(slowest))
        model.clear_objective()
        model.clear_hints()
        for count, size in zip(counts, sizes, strict=True):
            model.add_hint(count, size)
        deviation = [model.new_int_var(0, n, f"deviation_{chunk}") for chunk in range(chunks)]
        for dev, count, size in zip(deviation, counts, even, strict=True):
            model.add_abs_equality(dev, count - size)
        rank = _extra_block_rank(chunks)
        # sum rank_c * n_c lies in [0, (chunks - 1) * n]: a unit of deviation outweighs any change in it.
        model.minimize(
            ((chunks - 1) * n + 1) * sum(deviation) + sum(r * count for r, count in zip(rank, counts, strict=True))
        )
        tie_break = cp_model.CpSolver()
        tie_break.parameters.max_time_in_seconds = remaining_s
        tie_break.parameters.num_workers = workers
        # The first solution still fits, so only the time limit can leave this without one: keep that solution.
        if tie_break.solve(model) in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            sizes = [tie_break.value(count) for count in counts]
    return evaluate_partition(problem, tuple(sizes), optimal=status == cp_model.OPTIMAL)


def _even_split_is_optimal(data: _Scaled, even: tuple[int, ...], pp: int, optimum: int) -> bool:
    """Whether the even split fits and its slowest device takes the optimum (in the count model's units)."""
    blocks = [sum(even[device::pp]) for device in range(pp)]
    slowest = max(base + data.time_units[0] * k for base, k in zip(data.base_time_units, blocks, strict=True))
    fits = data.capacity_units is None or all(
        base + per_block * k <= data.capacity_units
        for base, per_block, k in zip(data.base_memory_units, data.memory_units[0], blocks, strict=True)
    )
    return fits and slowest == optimum


def _extra_block_rank(chunks: int) -> list[int]:
    """rank_c: chunk c's place (0 first) in the order in which `even_layer_split` hands out extra blocks, read off
    that function: with chunks + k blocks the chunks ranked below k get 2 blocks, the others 1, so chunk c gets
    (2 * chunks - 1 - rank_c) blocks summed over k = 0 .. chunks - 1."""
    totals = [sum(sizes) for sizes in zip(*(even_layer_split(chunks + k, chunks) for k in range(chunks)), strict=True)]
    return [2 * chunks - 1 - total for total in totals]


def _solve_per_block(problem: PartitionProblem, time_limit_s: float, workers: int) -> Partition | None:
    """The per-block model, for any block costs.

    u[l][c] = "block l is in chunk >= c", monotone in l and c; block l - 1 is in chunk >= c whenever block l is in
    chunk >= c + 1, so chunks are contiguous, in order and non-empty. Block l is in chunk c iff
    x[l][c] = u[l][c] - u[l][c+1] = 1. Per device: base + sum of its chunks' block times <= Z, and the same for
    memory <= capacity; minimise Z. The even split (`even_layer_split`) is the solution hint.
    """
    n, chunks, pp, data = problem.num_blocks, problem.num_chunks, problem.pp, _scale(problem)
    model = cp_model.CpModel()
    u = _cumulative_booleans(model, n, chunks)

    def in_chunk(block: int, chunk: int) -> cp_model.LinearExprT:
        return u[block][chunk] - u[block][chunk + 1] if chunk + 1 < chunks else u[block][chunk]

    upper = sum(data.time_units) + max(data.base_time_units)
    slowest = model.new_int_var(max(data.base_time_units), upper, "max_device_time")
    for device in range(pp):
        pairs = [(block, chunk) for chunk in range(device, chunks, pp) for block in range(n)]
        time = sum(data.time_units[b] * in_chunk(b, c) for b, c in pairs)
        model.add(data.base_time_units[device] + time <= slowest)
        if data.capacity_units is not None:
            memory = sum(data.memory_units[b][device] * in_chunk(b, c) for b, c in pairs)
            model.add(data.base_memory_units[device] + memory <= data.capacity_units)
    model.minimize(slowest)
    even_chunk_of_block = [c for c, size in enumerate(even_layer_split(n, chunks)) for _ in range(size)]
    for block, chunk in itertools.product(range(n), range(chunks)):
        if not isinstance(literal := u[block][chunk], int):
            model.add_hint(literal, even_chunk_of_block[block] >= chunk)

    solved = _solve(model, time_limit_s, workers)
    if solved is None:
        return None
    solver, status = solved
    sizes = [sum(solver.value(in_chunk(b, c)) for b in range(n)) for c in range(chunks)]
    return evaluate_partition(problem, tuple(sizes), optimal=status == cp_model.OPTIMAL)


def _cumulative_booleans(model: cp_model.CpModel, n: int, chunks: int) -> list[list[cp_model.IntVar | int]]:
    """u[l][c] = "block l is in chunk >= c" with the contiguity constraints; entries that contiguity alone decides
    are the constants 0 / 1: every block is in chunk >= 0; block l can be in chunk >= c only if l >= c (the c
    earlier chunks need a block each); it must be once l > n - 1 - (chunks - c) (the later chunks need room)."""

    def var(block: int, chunk: int) -> cp_model.IntVar | int:
        if chunk == 0 or block > n - 1 - chunks + chunk:
            return 1
        return 0 if block < chunk else model.new_bool_var(f"u_{block}_{chunk}")

    def at_least(a: cp_model.IntVar | int, b: cp_model.IntVar | int) -> None:
        if not (isinstance(a, int) and isinstance(b, int)):  # two constants already agree
            model.add(a >= b)

    u = [[var(block, chunk) for chunk in range(chunks)] for block in range(n)]
    for block, chunk in itertools.product(range(n), range(chunks)):
        if block > 0:
            at_least(u[block][chunk], u[block - 1][chunk])  # blocks stay in order
        if chunk + 1 < chunks:
            at_least(u[block][chunk], u[block][chunk + 1])
            if block > 0:
                at_least(u[block - 1][chunk], u[block][chunk + 1])  # no chunk is skipped: none is empty
    return u


def exact_partition(problem: PartitionProblem) -> Partition | None:
    """Exact DP, O(pp * n^2), on the ILP's integer data; None when no split fits. virtual_stages == 1 only: with
    interleaving a device's load sums non-adjacent chunks, so the best prefix split no longer decomposes by device.

    best[d][i] = the least max time of devices 0..d holding blocks 0..i-1, each device's memory within capacity.
    """
    if problem.virtual_stages != 1:
        raise ValueError(
            "virtual_stages: exact_partition needs 1; with interleaving a device's load couples "
            "non-adjacent chunks, which a prefix DP over devices cannot express"
        )
    n, pp, data = problem.num_blocks, problem.pp, _scale(problem)
    time_prefix = list(itertools.accumulate(data.time_units, initial=0))
    memory_prefix = [list(itertools.accumulate((row[d] for row in data.memory_units), initial=0)) for d in range(pp)]
    best = [[math.inf] * (n + 1) for _ in range(pp)]
    cut = [[-1] * (n + 1) for _ in range(pp)]
    for device in range(pp):
        for end in range(device + 1, n - (pp - 1 - device) + 1):
            for start in range(device, end) if device > 0 else (0,):
                previous = best[device - 1][start] if device > 0 else 0
                memory = data.base_memory_units[device] + memory_prefix[device][end] - memory_prefix[device][start]
                if previous == math.inf or (data.capacity_units is not None and memory > data.capacity_units):
                    continue
                value = max(previous, data.base_time_units[device] + time_prefix[end] - time_prefix[start])
                if value < best[device][end]:
                    best[device][end], cut[device][end] = value, start
    if best[pp - 1][n] == math.inf:
        return None
    sizes, end = [], n
    for device in range(pp - 1, -1, -1):
        sizes.append(end - cut[device][end])
        end = cut[device][end]
    return evaluate_partition(problem, tuple(reversed(sizes)), optimal=True)
