"""Wall time of `planner.search` on the issue's reference cases (target: each under 1 second).

Run: python benchmarks/search_speed.py [--repeats 3]   (prints a table; exits 0)

Each case is searched once cold (the first search of that model and cluster in this process) and then
`--repeats` times; the table shows the cold time and the median of the repeats, the candidates enumerated,
costed and pruned, and the plan found. Imports (numpy, pydantic, OR-Tools) are loaded before timing starts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import planner  # noqa: E402
import planner.search.partition  # noqa: E402, F401  (OR-Tools loads here, not inside the first timing)
from planner.describe import describe_plan  # noqa: E402
from planner.presets import MODEL_PRESETS  # noqa: E402

# Mixtral 8x22B's published config (https://huggingface.co/mistralai/Mixtral-8x22B-v0.1/blob/main/config.json):
# the full form until the `mixtral-8x22b` preset exists, then the preset.
MIXTRAL_8X22B = "mixtral-8x22b" if "mixtral-8x22b" in MODEL_PRESETS else {
    "num_layers": 56, "hidden_size": 6144, "num_attention_heads": 48, "num_kv_heads": 8, "ffn_hidden_size": 16384,
    "vocab_size": 32768, "mlp": "swiglu", "norm": "rmsnorm", "num_experts": 8, "experts_per_token": 2,
}  # fmt: skip

CASES = {
    "GPT-3 175B, 1,024 A100-80GB": ("gpt3-175b", 2048, 1536, "a100-80gb", 128),
    "530B, 2,240 A100-80GB": ("gpt3-529.6b", 2048, 2520, "a100-80gb", 280),
    "530B, 5,120 A100-80GB": ("gpt3-529.6b", 2048, 2520, "a100-80gb", 640),
    "Llama-3 405B, 16,384 H100": ("llama3-405b", 8192, 2048, "h100-sxm", 2048),
    "Llama-3 8B, 8 H100": ("llama3-8b", 8192, 64, "h100-sxm", 1),
    # Model states alone (16 bytes a parameter) need 202 GB a GPU here: only CPU offload (ZeRO-3 + weights) fits.
    "Llama-3 405B, 32 H100 (offload)": ("llama3-405b", 8192, 64, "h100-sxm", 4),
    # seq 4096, global batch 1,024 sequences (4M tokens a step).
    "Mixtral-8x22B, 512 H100": (MIXTRAL_8X22B, 4096, 1024, "h100-sxm", 64),
}


def request(model: str | dict, seq_len: int, batch: int, gpu: str, nodes: int) -> dict:
    return {
        "model": model,
        "training": {"seq_len": seq_len, "global_batch_size": batch},
        "cluster": {"gpu": gpu, "num_nodes": nodes, "gpus_per_node": 8},
    }


def timed(req: dict) -> tuple[float, planner.search.result.SearchResult]:
    started = time.perf_counter()
    result = planner.search(req)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    table = Table(title="planner.search wall time (this machine)", title_justify="left")
    for column in ("case", "candidates", "costed", "pruned", "cold s", "median s", "candidates/s", "best plan",
                   "step s"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("case", "best plan") else "right")
    for name, case in CASES.items():
        req = request(*case)
        cold, result = timed(req)
        warm = statistics.median(timed(req)[0] for _ in range(args.repeats))
        best = result.plans[0] if result.plans else None
        counts = result.counts
        table.add_row(
            name,
            f"{counts.enumerated:,}",
            f"{counts.evaluated:,}",
            f"{counts.pruned_by_bound:,}",
            f"{cold:.3f}",
            f"{warm:.3f}",
            f"{counts.enumerated / warm:,.0f}",
            describe_plan(best.plan) if best else "nothing fits",
            f"{best.estimate.step_time_s:.3f}" if best else "-",
        )
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
