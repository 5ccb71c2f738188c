"""Wall time of `planner.search` on the issue's reference cases (target, issue 29: each under 0.5 s cold).

Run: python benchmarks/search_speed.py [--runs 5] [--repeats 3]   (prints a table; exits 0)

Cold is the first search of a process: each case runs in `--runs` fresh processes (one after the other), each of
which loads the imports (numpy, pydantic, OR-Tools, the planner) before timing starts, searches once (cold), then
`--repeats` times more (warm). The table shows the median cold and warm wall times over the runs with their range
(min-max), the median CPU time of the cold search (less sensitive than wall time to other processes on a shared
machine), the candidates enumerated, costed and pruned, and the plan found.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import planner  # noqa: E402
import planner.search.partition  # noqa: E402, F401  (OR-Tools loads here, not inside the first timing)
from planner.describe import describe_plan  # noqa: E402

CASES = {
    "GPT-3 175B, 1,024 A100-80GB": ("gpt3-175b", 2048, 1536, "a100-80gb", 128),
    "530B, 2,240 A100-80GB": ("gpt3-529.6b", 2048, 2520, "a100-80gb", 280),
    "530B, 5,120 A100-80GB": ("gpt3-529.6b", 2048, 2520, "a100-80gb", 640),
    "Llama-3 405B, 16,384 H100": ("llama3-405b", 8192, 2048, "h100-sxm", 2048),
    "Llama-3 8B, 8 H100": ("llama3-8b", 8192, 64, "h100-sxm", 1),
    # Model states alone (16 bytes a parameter) need 202 GB a GPU here: only CPU offload (ZeRO-3 + weights) fits.
    "Llama-3 405B, 32 H100 (offload)": ("llama3-405b", 8192, 64, "h100-sxm", 4),
    # seq 4096, global batch 1,024 sequences (4M tokens a step).
    "Mixtral-8x22B, 512 H100": ("mixtral-8x22b", 4096, 1024, "h100-sxm", 64),  # ep in the space
}


def request(model: str, seq_len: int, batch: int, gpu: str, nodes: int) -> dict:
    return {
        "model": model,
        "training": {"seq_len": seq_len, "global_batch_size": batch},
        "cluster": {"gpu": gpu, "num_nodes": nodes, "gpus_per_node": 8},
    }


def timed(req: dict) -> tuple[float, float, planner.search.result.SearchResult]:
    """Wall and CPU seconds of one search, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = planner.search(req)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def one_process(name: str, repeats: int) -> dict:
    """This process's cold search of case `name`, then `repeats` warm ones."""
    req = request(*CASES[name])
    cold, cold_cpu, result = timed(req)
    warm = [timed(req)[0] for _ in range(repeats)]
    best = result.plans[0] if result.plans else None
    return {
        "cold_s": cold,
        "cold_cpu_s": cold_cpu,
        "warm_s": statistics.median(warm) if warm else None,
        "counts": result.counts.model_dump(),
        "best": describe_plan(best.plan) if best else "nothing fits",
        "step_s": best.estimate.step_time_s if best else None,
    }


def fresh_process(name: str, repeats: int) -> dict:
    command = [sys.executable, __file__, "--one", name, "--repeats", str(repeats)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per case")
    parser.add_argument("--repeats", type=int, default=3, help="warm searches per process")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a case, in this process: what each fresh process runs
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_process(args.one, args.repeats)))
        return

    table = Table(title="planner.search wall time (this machine)", title_justify="left")
    for column in ("case", "candidates", "costed", "pruned", "cold s", "cold CPU s", "warm s", "best plan",
                   "step s"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("case", "best plan") else "right")
    for name in CASES:
        runs = [fresh_process(name, args.repeats) for _ in range(args.runs)]
        counts, first = runs[0]["counts"], runs[0]
        table.add_row(
            name,
            f"{counts['enumerated']:,}",
            f"{counts['evaluated']:,}",
            f"{counts['pruned_by_bound']:,}",
            spread([r["cold_s"] for r in runs]),
            f"{statistics.median(r['cold_cpu_s'] for r in runs):.3f}",
            spread([r["warm_s"] for r in runs]) if args.repeats else "-",
            first["best"],
            f"{first['step_s']:.3f}" if first["step_s"] is not None else "-",
        )
    Console(width=260).print(table)


if __name__ == "__main__":
    main()
