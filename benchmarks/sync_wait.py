"""How long ranks wait for each other at a synchronisation point, by how much compute separates two of them.

Run: .venv/bin/torchrun --nproc-per-node 2 benchmarks/sync_wait.py [--segments-ms 0.5,2,8,32] [--threads 1]
     (rank 0 prints a table; exits 0)

Every rank runs the same matrix products for a segment of about T milliseconds, repeatedly, twice:
  free     segments back to back, the ranks never meeting (each rank times its own);
  synced   each segment followed by an all_reduce of one float, as a training step meets its peers at every
           gradient all-reduce, FSDP unit and pipeline hand-off.
wait = synced - free - the one-float all_reduce's own time (measured alone, ranks lined up by a barrier): what a
rank loses at each meeting because its peer arrived later. A rank's segment time varies (the OS takes its core
for a moment, caches are shared); a meeting costs the slower of the ranks' segments, so the wait grows with the
variance of a segment (the expected maximum of two draws exceeds their mean). This benchmark shows how the wait
grows with the segment, on synthetic segments; the profiler measures it with the executor's own layers as the
segments (profiler/meeting_wait.py), and the cost model charges that at every meeting of a step (see
docs/profiling.md and benchmarks/results/).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from profiler.timing import time_repeats  # noqa: E402

MATRIX_SIDE = 128  # small products, so that a segment's length can be set finely
MEASURE_S = 3.0  # seconds of segments timed per length and mode


def timed(call: Callable[[], object], repeats: int, before_each: Callable[[], object] | None = None) -> list[float]:
    """Seconds of each call on the CPU (profiler/timing.py, as every profile is timed)."""
    return time_repeats(call, warmup=0, repeats=repeats, device="cpu", before_each=before_each)


def mean_over_ranks(value: float) -> float:
    total = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def measure(segment_s: float, product_s: float, one_float: torch.Tensor, collective_s: float) -> dict[str, float]:
    matrix = torch.randn(MATRIX_SIDE, MATRIX_SIDE)
    products = max(1, round(segment_s / product_s))
    repeats = max(20, min(2000, int(MEASURE_S / segment_s)))

    def segment() -> None:
        for _ in range(products):
            matrix @ matrix

    def synced() -> None:
        segment()
        dist.all_reduce(one_float)

    dist.barrier()
    free_s = mean_over_ranks(statistics.mean(timed(segment, repeats)))
    dist.barrier()
    synced_s = mean_over_ranks(statistics.mean(timed(synced, repeats)))
    return {"free_s": free_s, "synced_s": synced_s, "wait_s": synced_s - free_s - collective_s, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments-ms", default="0.5,2,8,32", help="compute between meetings, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    matrix = torch.randn(MATRIX_SIDE, MATRIX_SIDE)
    timed(lambda: matrix @ matrix, 200)  # warm-up
    product_s = statistics.median(timed(lambda: matrix @ matrix, 500))
    one_float = torch.zeros(1)
    timed(lambda: dist.all_reduce(one_float), 50)
    collective_s = mean_over_ranks(statistics.median(timed(lambda: dist.all_reduce(one_float), 200, dist.barrier)))
    segments_ms = [float(ms) for ms in args.segments_ms.split(",")]
    rows = [(ms, measure(ms / 1e3, product_s, one_float, collective_s)) for ms in segments_ms]
    if dist.get_rank() == 0:
        print(f"{dist.get_world_size()} gloo ranks, {args.threads} thread(s) each; one-float all_reduce alone: "
              f"{collective_s * 1e3:.3f} ms (median, ranks lined up by a barrier)")  # fmt: skip
        print(f"{'segment ms':>10} {'repeats':>7} {'free ms':>9} {'synced ms':>9} {'wait ms':>8} {'wait / free':>11}")
        for ms, row in rows:
            print(f"{ms:>10.1f} {row['repeats']:>7d} {row['free_s'] * 1e3:>9.3f} {row['synced_s'] * 1e3:>9.3f} "
                  f"{row['wait_s'] * 1e3:>8.3f} {row['wait_s'] / row['free_s']:>11.1%}")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
