"""Collective sweeps under torchrun: the time and bus bandwidth of each collective at each message size, per link tier.

Run on every rank (``executor.launch.LaunchSpec(module="profiler.collectives", args=sweep_command_args(...))``)::

    python -m profiler.collectives --out FILE.json [--min-bytes 1024 --max-bytes 268435456]
        [--ops all_reduce,all_gather,reduce_scatter,all_to_all,send_recv] [--warmup 5 --repeats 20]
        [--backend gloo|nccl]

Rank 0 writes ``{"meta": {...}, "measurements": [CollectiveMeasurement, ...]}`` (:func:`read_result` reads it) and
prints one :data:`PROGRESS_MARKER` line per finished (tier, op, size) (:func:`parse_progress_line` reads it).

Message sizes follow nccl-tests (doc/PERFORMANCE.md), the convention the cost model (planner/cost/comm.py) uses:
``size_bytes`` is S in ``algbw = S / t`` and ``busbw = algbw x factor``:

    all_reduce      the per-rank buffer (input = output = S)              factor 2(n-1)/n
    all_gather      the gathered *output* (each rank contributes S/n)     factor (n-1)/n
    reduce_scatter  the *input* on each rank (each rank keeps S/n)        factor (n-1)/n
    all_to_all      the per-rank send buffer (= receive buffer; S/n/peer) factor (n-1)/n
    send_recv       one message, group rank 0 -> group rank 1 (one way,   factor 1
                    as a pipeline stage hands on activations; group_size 2)
    fsdp_all_gather      one FSDP2 unit of S parameter bytes, gathered     factor (n-1)/n
                         for a forward and freed after it
    fsdp_reduce_scatter  the same unit's S gradient bytes reduce-scattered  factor (n-1)/n
                         by a backward, its parameters held gathered (ZeRO-2)

The fsdp_* ops time what training pays per unit and collective under FSDP2 (``fully_shard`` on the tier's group,
a unit whose forward barely computes): the collective plus the framework's own work around it (hooks, copying
parameters into and gradients out of the flat buffer, DTensor bookkeeping). On GPUs that work is small beside
NCCL; on a CPU under gloo it is many times the bare collective, which is why it is measured rather than assumed.

Elements are float32. Sizes double from ``--min-bytes`` while they stay <= ``--max-bytes`` (powers of two with
the default bounds, as nccl-tests' ``-f 2``); where S does not split into n whole float32 chunks it is rounded down
to the nearest size that does and ``size_bytes`` records the bytes really moved; a size that rounds to nothing is
skipped.

Tiers. On one node the whole world is one ``intra_node`` group. On several nodes (LOCAL_WORLD_SIZE < WORLD_SIZE)
each node's ranks form an ``intra_node`` group and the ranks with the same local rank on every node an
``inter_node`` group; all groups of a tier run at once, as data-parallel traffic does in training, so NICs or
links shared between GPUs are measured shared. Rank 0's groups are the ones reported; their times are the max over
every rank of the tier.

This module imports torch only inside the functions the workers run, so the CLI and the service can build a sweep's
arguments and read its result without it.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from executor.config import parse_marked_line
from planner.cost.measured import busbw_factor
from planner.specs import PROFILE_SCHEMA_VERSION, CollectiveMeasurement, CollectiveOp, LinkTier
from profiler.environment import device_name, software_versions, utc_now
from profiler.timing import TimingStats, stats, time_repeats
from profiler.worker import leave, run_recorded, write_json_atomically

if TYPE_CHECKING:
    import torch
    from torch.distributed import ProcessGroup

OPS: tuple[str, ...] = get_args(CollectiveOp)
BACKENDS = ("gloo", "nccl")
ELEMENT_BYTES = 4  # float32
PROGRESS_MARKER = "paraplan.profile "
DEFAULT_MIN_BYTES = 1024
DEFAULT_MAX_BYTES = 256 * 1024**2


# ------------------------------------------------------------------------------------------- settings (no torch)


@dataclass(frozen=True)
class SweepSettings:
    """What one sweep measures; built from the command line (or by :func:`sweep_command_args`) and validated."""

    min_bytes: int = DEFAULT_MIN_BYTES
    max_bytes: int = DEFAULT_MAX_BYTES
    ops: tuple[str, ...] = OPS
    warmup: int = 5
    repeats: int = 20
    backend: str | None = None  # None: nccl where CUDA is available, else gloo

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", _parse_ops(self.ops))
        _validate(self)

    @property
    def sizes_bytes(self) -> list[int]:
        """The requested message sizes: min_bytes, doubled while <= max_bytes."""
        sizes = [self.min_bytes]
        while sizes[-1] * 2 <= self.max_bytes:
            sizes.append(sizes[-1] * 2)
        return sizes


def _parse_ops(ops: str | Iterable[str]) -> tuple[str, ...]:
    """Op names from a comma-separated string or an iterable, stripped, duplicates dropped (order kept)."""
    names = ops.split(",") if isinstance(ops, str) else list(ops)
    return tuple(dict.fromkeys(str(name).strip() for name in names if str(name).strip()))


def _require_int(flag: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{flag} must be an integer >= {minimum}, got {value!r}")


def _validate(settings: SweepSettings) -> None:
    """Reject settings the sweep cannot run, naming the command-line flag."""
    _require_int("--min-bytes", settings.min_bytes, ELEMENT_BYTES)
    _require_int("--max-bytes", settings.max_bytes, ELEMENT_BYTES)
    if settings.min_bytes > settings.max_bytes:
        raise ValueError(f"--min-bytes ({settings.min_bytes}) must not exceed --max-bytes ({settings.max_bytes})")
    _require_int("--warmup", settings.warmup, 0)
    _require_int("--repeats", settings.repeats, 1)
    if not settings.ops:
        raise ValueError(f"--ops must name at least one of {', '.join(OPS)}")
    unknown = [op for op in settings.ops if op not in OPS]
    if unknown:
        raise ValueError(f"--ops: unknown op(s) {', '.join(map(repr, unknown))}; choose from {', '.join(OPS)}")
    if settings.backend is not None and settings.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {settings.backend!r}")


def sweep_command_args(
    out: str | Path,
    min_bytes: int = DEFAULT_MIN_BYTES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    ops: str | Iterable[str] = OPS,
    warmup: int = 5,
    repeats: int = 20,
    backend: str | None = None,
) -> tuple[str, ...]:
    """The worker arguments of a sweep, validated here (no torch) so bad input fails before anything is launched.

    Use as ``LaunchSpec(module="profiler.collectives", args=sweep_command_args(...))``.
    """
    settings = SweepSettings(min_bytes, max_bytes, _parse_ops(ops), warmup, repeats, backend)
    args = [
        "--out", str(out),
        "--min-bytes", str(settings.min_bytes),
        "--max-bytes", str(settings.max_bytes),
        "--ops", ",".join(settings.ops),
        "--warmup", str(settings.warmup),
        "--repeats", str(settings.repeats),
    ]  # fmt: skip
    if settings.backend is not None:
        args += ["--backend", settings.backend]
    return tuple(args)


def message_elements(op: str, size_bytes: int, group_size: int) -> int:
    """float32 elements of S for ``op``: a multiple of the group size where S is split into one chunk per rank."""
    elements = size_bytes // ELEMENT_BYTES
    if op != "all_reduce" and op != "send_recv":
        elements -= elements % group_size
    return elements


def progress_line(record: dict[str, Any]) -> str:
    return PROGRESS_MARKER + json.dumps(record)


def parse_progress_line(line: str) -> dict[str, Any] | None:
    """The progress record in a worker's output line, else None."""
    return parse_marked_line(line, PROGRESS_MARKER)


def read_result(path: str | Path) -> tuple[dict[str, Any], list[CollectiveMeasurement]]:
    """(meta, measurements) from a file rank 0 wrote; ValueError naming the file if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
        meta, rows = data["meta"], data["measurements"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a collective sweep result: {error}") from error
    if meta.get("schema_version") != PROFILE_SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema version {meta.get('schema_version')!r}, not {PROFILE_SCHEMA_VERSION}; measure again"
        )
    return meta, [CollectiveMeasurement.model_validate(row) for row in rows]


def _parse_args(argv: Sequence[str] | None) -> tuple[Path, SweepSettings]:
    parser = argparse.ArgumentParser(prog="python -m profiler.collectives", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file rank 0 writes")
    parser.add_argument("--min-bytes", type=int, default=DEFAULT_MIN_BYTES)
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    parser.add_argument("--ops", default=",".join(OPS), help="comma-separated, from: " + ", ".join(OPS))
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs per (op, size)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per (op, size)")
    parser.add_argument("--backend", default=None, help="gloo or nccl (default: nccl with CUDA, else gloo)")
    args = parser.parse_args(argv)
    settings = SweepSettings(args.min_bytes, args.max_bytes, args.ops, args.warmup, args.repeats, args.backend)
    return args.out, settings


# --------------------------------------------------------------------------------------------- workers (torch)


@dataclass(frozen=True)
class World:
    """This rank's place in the launch (torchrun's environment)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def nnodes(self) -> int:
        return self.world_size // self.local_world_size

    @classmethod
    def from_env(cls) -> World:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size < 2:
            raise ValueError(
                f"collectives need at least 2 ranks, got WORLD_SIZE={world_size}: launch under torchrun with "
                "--nproc-per-node >= 2, or on several nodes"
            )
        world = cls(
            int(os.environ["RANK"]),
            world_size,
            int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
        )
        node = os.environ.get("GROUP_RANK")
        # Tier groups assume node k holds ranks [k L, (k+1) L), as torchrun numbers them; check rather than trust.
        my_node = world.rank // world.local_world_size
        if world_size % world.local_world_size or (node is not None and int(node) != my_node):
            raise RuntimeError(
                f"rank {world.rank} of {world_size} with LOCAL_WORLD_SIZE={world.local_world_size} and "
                f"GROUP_RANK={node}: nodes must hold equal, contiguous rank ranges"
            )
        return world


@dataclass(frozen=True)
class Tier:
    name: LinkTier
    group: ProcessGroup  # this rank's group of the tier
    group_size: int


def _tier_groups(world: World) -> list[Tier]:
    """The tiers to measure and this rank's group in each. Every rank creates every group, in the same order,
    as ``new_group`` requires."""
    import torch.distributed as dist

    nodes, per_node = world.nnodes, world.local_world_size
    if nodes == 1:
        whole = dist.group.WORLD
        assert whole is not None  # set by init_process_group
        return [Tier("intra_node", whole, world.world_size)]
    tiers = []
    if per_node > 1:
        mine, _ = dist.new_subgroups_by_enumeration([[k * per_node + i for i in range(per_node)] for k in range(nodes)])
        tiers.append(Tier("intra_node", mine, per_node))
    mine, _ = dist.new_subgroups_by_enumeration([[k * per_node + i for k in range(nodes)] for i in range(per_node)])
    tiers.append(Tier("inter_node", mine, nodes))
    return tiers


def _op_call(op: str, group: ProcessGroup, elements: int, device: torch.device) -> Callable[[], object]:
    """One call of ``op`` on ``group`` moving ``elements`` float32 (S as the module docstring defines it)."""
    import torch
    import torch.distributed as dist

    if op.startswith("fsdp_"):
        return _fsdp_unit_call(op, group, elements, device)
    n, me = dist.get_world_size(group), dist.get_rank(group)
    full = torch.ones(elements, dtype=torch.float32, device=device)
    if op == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if op == "all_to_all":
        received = torch.empty_like(full)
        return lambda: dist.all_to_all_single(received, full, group=group)
    chunk = torch.ones(elements // n, dtype=torch.float32, device=device)
    # torch 2.13 deprecates the *_into_tensor / *_tensor names for *_single; older torch has only the former.
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if op == "all_gather":
        return lambda: all_gather(full, chunk, group=group)
    if op == "reduce_scatter":
        return lambda: reduce_scatter(chunk, full, group=group)
    assert op == "send_recv", op
    if me == 0:
        return lambda: dist.send(full, dist.get_global_rank(group, 1), group=group)
    if me == 1:
        return lambda: dist.recv(full, dist.get_global_rank(group, 0), group=group)
    return lambda: None  # the rest of the group waits at the barriers


def _fsdp_unit_call(op: str, group: ProcessGroup, elements: int, device: torch.device) -> Callable[[], object]:
    """One training pass over a single FSDP2 unit of ``elements`` float32 parameters sharded over ``group``.

    fsdp_all_gather: a forward that gathers the unit and frees it after (ZeRO-3). fsdp_reduce_scatter: a forward
    and backward with the parameters held gathered (``reshard_after_forward=False`` and no resharding after
    backward, ZeRO-2 between micro-batches), so the only collective is the gradients' reduce-scatter; the
    forward's hooks are in its time, as they are in every micro-batch's. The unit's forward reads one element,
    so its compute is negligible beside the collective and the framework's work."""
    import torch
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    class Unit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(elements, dtype=torch.float32, device=device))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.weight[:1]

    mesh = DeviceMesh.from_group(group, device.type)
    x = torch.zeros(1, device=device)
    if op == "fsdp_all_gather":
        gathering = fully_shard(Unit(), mesh=mesh, reshard_after_forward=True)

        def forward() -> object:
            with torch.no_grad():
                return gathering(x)

        return forward
    assert op == "fsdp_reduce_scatter", op
    held = fully_shard(Unit(), mesh=mesh, reshard_after_forward=False)
    held.set_reshard_after_backward(False)  # the first (warm-up) call gathers; later ones only reduce-scatter
    return lambda: held(x).sum().backward()


def _measure(
    op: str, tier: Tier, elements: int, settings: SweepSettings, device: torch.device
) -> CollectiveMeasurement:

    timing = _time_on_all_ranks(_op_call(op, tier.group, elements, device), settings, device)
    size_bytes = elements * ELEMENT_BYTES
    algbw_GBps = size_bytes / timing.median_s / 1e9 if timing.median_s > 0 else 0.0
    group_size = 2 if op == "send_recv" else tier.group_size  # a pair, whatever the size of the tier's group
    return CollectiveMeasurement(
        op=op,  # type: ignore[arg-type]  # validated against OPS
        tier=tier.name,
        group_size=group_size,
        size_bytes=size_bytes,
        time=timing,
        algbw_GBps=algbw_GBps,
        busbw_GBps=algbw_GBps * busbw_factor(op, group_size),
    )


def _time_on_all_ranks(call: Callable[[], object], settings: SweepSettings, device: torch.device) -> TimingStats:
    """The repeats' times of `call`, run by every rank at once, each repeat's time the slowest rank's."""
    import torch
    import torch.distributed as dist

    # The barrier is on the world, not only the group: on several nodes every group of the tier runs at once, and
    # lining all of them up makes them really overlap (shared links measured shared). On one node they coincide.
    samples = time_repeats(
        call, warmup=settings.warmup, repeats=settings.repeats, device=device, before_each=dist.barrier
    )
    # A collective is done when its slowest rank is done: a rank can leave early (a gloo send returns once its
    # data is buffered, a reduce-scatter rank may finish its own chunk first) while peers still wait for data. So
    # each repeat's time is the max over ranks (over the world: on several nodes all the tier's groups ran at
    # once, and a stalled group is as real as a stalled rank). It includes the barrier's exit skew (the first rank
    # out waits inside the collective for the last), which adds a little to the smallest sizes' times; the min
    # would instead report a rank that finished before its peers had their data.
    per_rank = torch.tensor(samples, dtype=torch.float64, device=device)
    dist.all_reduce(per_rank, op=dist.ReduceOp.MAX)
    return stats(per_rank.tolist())


OVERLAP_MESSAGE_BYTES = 8 * 1024**2


def measure_overlap(tier: Tier, settings: SweepSettings, device: torch.device) -> dict[str, Any]:
    """How much of a collective hides behind compute running at the same time on this machine.

    An all_reduce of 8 MiB (or the sweep's largest size, if smaller) alone, matrix products of about as long
    alone, and both together (the all_reduce issued asynchronously, the products run, then waited for):
    ``fraction = (compute + comm - both) / min(compute, comm)``, clipped to [0, 1]: 1 when the shorter one hides
    entirely, 0 when they serialise. On GPUs NCCL runs on its own stream and SMs, but steals memory bandwidth
    and SMs from the compute (Rashidi et al. 2021, "Enabling Compute-Communication Overlap in Distributed Deep
    Learning Training Platforms", ISCA); on a CPU whose cores all train, gloo's copies compete with the
    compute for the same cores. The cost model hides that share of the overlappable gradient traffic
    (planner/cost/step.py `dp_comm_exposed_s`)."""
    import torch
    import torch.distributed as dist

    elements = message_elements("all_reduce", min(OVERLAP_MESSAGE_BYTES, settings.max_bytes), tier.group_size)
    buffer = torch.ones(elements, dtype=torch.float32, device=device)
    side = 2048 if device.type == "cuda" else 256
    matrix = torch.randn(side, side, device=device)

    def comm() -> object:
        return dist.all_reduce(buffer, group=tier.group)

    comm_s = _time_on_all_ranks(comm, settings, device).median_s
    one_product_s = _time_on_all_ranks(lambda: matrix @ matrix, settings, device).median_s
    products = max(1, round(comm_s / max(one_product_s, 1e-9)))

    def compute() -> object:
        return [matrix @ matrix for _ in range(products)]

    def both() -> object:
        work = dist.all_reduce(buffer, group=tier.group, async_op=True)
        compute()
        return work.wait()

    compute_s = _time_on_all_ranks(compute, settings, device).median_s
    both_s = _time_on_all_ranks(both, settings, device).median_s
    hidden = (compute_s + comm_s - both_s) / max(min(compute_s, comm_s), 1e-12)
    fraction = float(min(1.0, max(0.0, hidden)))
    return {"tier": tier.name, "size_bytes": elements * ELEMENT_BYTES, "comm_s": comm_s,
            "compute_s": compute_s, "both_s": both_s, "fraction": fraction}  # fmt: skip


def _plan(tiers: list[Tier], settings: SweepSettings) -> list[tuple[Tier, str, int]]:
    """Every (tier, op, elements) to measure, in order; sizes that round to no element are left out."""
    planned = []
    for tier in tiers:
        for op in settings.ops:
            for size in settings.sizes_bytes:
                elements = message_elements(op, size, tier.group_size)
                if elements > 0:
                    planned.append((tier, op, elements))
    return planned


def _sweep(
    world: World, tiers: list[Tier], settings: SweepSettings, device: torch.device
) -> list[CollectiveMeasurement]:
    planned = _plan(tiers, settings)
    measurements = []
    for done, (tier, op, elements) in enumerate(planned, start=1):
        measurements.append(_measure(op, tier, elements, settings, device))
        if world.rank == 0:
            record = {"done": done, "total": len(planned), "tier": tier.name, "op": op}
            print(progress_line({**record, "size_bytes": elements * ELEMENT_BYTES}), flush=True)
    return measurements


def _meta(world: World, settings: SweepSettings, backend: str, device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, in HardwareProfile's field names where it has them."""
    import torch.distributed as dist

    hosts: list[Any] = [None] * world.world_size
    dist.all_gather_object(hosts, socket.gethostname())
    return {
        "schema_version": PROFILE_SCHEMA_VERSION,
        "created": utc_now(),
        "world_size": world.world_size,
        "nnodes": world.nnodes,
        "local_world_size": world.local_world_size,
        "backend": backend,
        "device_kind": device.type,
        "device_name": device_name(device),
        **software_versions(nccl=backend == "nccl"),
        "hosts": hosts,
        "settings": asdict(settings) | {"backend": backend},
        "size_convention": "nccl-tests: all_gather = output bytes, reduce_scatter = input bytes, float32",
    }


def _init(world: World, settings: SweepSettings) -> tuple[str, torch.device]:
    """Start the process group: nccl on this rank's GPU, or gloo on the CPU."""
    import torch
    import torch.distributed as dist

    backend = settings.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("--backend nccl needs CUDA, and this torch sees no GPU; use --backend gloo")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return backend, device


def _run(argv: Sequence[str] | None) -> None:
    out, settings = _parse_args(argv)
    world = World.from_env()
    backend, device = _init(world, settings)
    meta = _meta(world, settings, backend, device)
    tiers = _tier_groups(world)
    measurements = _sweep(world, tiers, settings, device)
    # On the first tier: a node's own links, or the network where each node has one rank.
    meta["overlap"] = measure_overlap(tiers[0], settings, device)
    if world.rank == 0:
        write_json_atomically(out, {"meta": meta, "measurements": [m.model_dump() for m in measurements]})
    leave()


def main(argv: Sequence[str] | None = None) -> None:
    """The worker entry point (profiler/worker.py `run_recorded`)."""
    run_recorded(_run, argv)


if __name__ == "__main__":
    main()
