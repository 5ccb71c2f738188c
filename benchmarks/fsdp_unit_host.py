"""The host's time per FSDP2 unit: what `fully_shard`'s hooks add to a pass beyond the model's own ops and the
bare collective, measured on this machine's CPU.

A model of the executor's Llama blocks, too narrow for any op to take long (hidden 64, 16 tokens), runs forward
and backward on one gloo rank, plain and with every block and the root `fully_shard`-ed (as executor/parallel/
data.py shards ZeRO-3). The difference per unit and pass, less the bare collectives of one unit's parameters on the
same group (forward: the all-gather; backward: the all-gather again, since ZeRO-3 resharded after forward, and the
reduce-scatter), is the hooks' own host work: the copy-in and copy-out
around the all-gather, resharding, the post-backward reduction's preparation, and the Python around them.
Medians of `--repeats` timings, each of `--steps` steps, p10-p90 spread beside them.

Run: python benchmarks/fsdp_unit_host.py [--blocks 8] [--repeats 15] [--steps 20]   (prints a table; exits 0)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from executor.models import build_model  # noqa: E402
from planner.presets import model_preset  # noqa: E402
from profiler.kernels import narrow_for_host_floor  # noqa: E402

SEQ_LEN = 16


def model(blocks: int, sharded: bool) -> torch.nn.Module:
    spec = narrow_for_host_floor(model_preset("llama3.2-1b")).model_copy(update={"num_layers": blocks})
    built = build_model(spec, device="cpu", seed=0).train()
    if sharded:
        mesh = init_device_mesh("cpu", (1,))
        for block in built.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(built, mesh=mesh)
    return built


def pass_times(net: torch.nn.Module, steps: int) -> tuple[float, float]:
    """Seconds per step of forward, and of backward, over `steps` steps."""
    tokens = torch.randint(0, 128, (1, SEQ_LEN))
    forward_s = backward_s = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        loss = net(tokens).float().square().mean()
        middle = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        forward_s, backward_s = forward_s + middle - start, backward_s + end - middle
        net.zero_grad(set_to_none=True)
    return forward_s / steps, backward_s / steps


def collective_s(elements: int, steps: int) -> tuple[float, float]:
    """Seconds of one bare all-gather and one reduce-scatter of `elements` fp32 values on the one-rank group (the
    calls FSDP2 makes; torch 2.13 names them deprecated, torch 2.11 has no other)."""
    shard, whole = torch.zeros(elements), torch.zeros(elements)
    times = []
    for op in (lambda: dist.all_gather_into_tensor(whole, shard), lambda: dist.reduce_scatter_tensor(shard, whole)):
        op()  # warm-up: the first call of each sets up gloo's buffers
        start = time.perf_counter()
        for _ in range(steps):
            op()
        times.append((time.perf_counter() - start) / steps)
    return times[0], times[1]


def spread(samples: list[float]) -> float:
    p10, p50, p90 = np.percentile(samples, [10, 50, 90])
    return float((p90 - p10) / p50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*is deprecated.*")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    plain, sharded = model(args.blocks, False), model(args.blocks, True)
    units = args.blocks + 1
    unit_elements = sum(p.numel() for p in plain.layers["0"].parameters())
    for net in (plain, sharded):
        pass_times(net, args.steps)  # warm-up
    samples: dict[str, list[float]] = {"forward": [], "backward": [], "gather": [], "scatter": []}
    for _ in range(args.repeats):  # interleaved, so that a drift of the machine's speed falls on both alike
        plain_s, sharded_s = pass_times(plain, args.steps), pass_times(sharded, args.steps)
        gather_s, scatter_s = collective_s(unit_elements, 5 * args.steps)  # short calls: more of them
        samples["forward"].append((sharded_s[0] - plain_s[0]) / units - gather_s)
        samples["backward"].append((sharded_s[1] - plain_s[1]) / units - gather_s - scatter_s)
        samples["gather"].append(gather_s)
        samples["scatter"].append(scatter_s)
    dist.destroy_process_group()

    table = Table(title=f"FSDP2 host time per unit, {units} units of {unit_elements:,} parameters, torch "
                        f"{torch.__version__}, 1 gloo rank, 1 thread")  # fmt: skip
    for column in ("what", "median us", "p10-p90 spread"):
        table.add_column(column, justify="left" if column == "what" else "right")
    labels = {"forward": "hooks per unit, forward (less the all-gather)",
              "backward": "hooks per unit, backward (less all-gather + reduce-scatter)",
              "gather": "bare all-gather of a unit", "scatter": "bare reduce-scatter of a unit"}  # fmt: skip
    for name, values in samples.items():
        table.add_row(labels[name], f"{statistics.median(values) * 1e6:.0f}", f"{spread(values):.0%}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
