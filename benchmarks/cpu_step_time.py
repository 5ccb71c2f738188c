"""Predicted (from a CPU profile) vs measured step time of single-process training plans on this machine.

Run: python benchmarks/cpu_step_time.py [--threads 1] [--profile FILE] [--steps 30] [--out DIR]
     (prints a table; exits 0)

1. Profiles the model's layers on this CPU (`profiler.compute`, the same sweep as `paraplan profile compute`)
   with --threads torch threads, unless --profile gives one, and writes it to DIR/profile.json.
2. For every single-process plan of the grid (micro-batch size x recompute mode), estimates the step with
   `cluster.profile` set to that profile, then trains the plan with the executor (`executor.train` under torchrun,
   one process, OMP_NUM_THREADS=--threads) for --steps steps and takes the median step time of the steps after
   the first two. The thread count is fixed for both because a profile holds for one thread count only.
3. Prints predicted vs measured, the error of each plan and the mean absolute percentage error (target: each
   within 10%).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import planner  # noqa: E402
from api.training import local_spec  # noqa: E402
from executor import launch  # noqa: E402
from executor.config import RunDir, TrainConfig  # noqa: E402
from executor.prepare import prepare_run  # noqa: E402
from planner.profiles import load_profile_json, save_profile_json  # noqa: E402
from planner.request import resolve_model  # noqa: E402

# A small Llama (3.3M parameters): big enough that a block takes milliseconds, not microseconds, on one core.
MODEL = {"name": "llama3-8b", "num_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "num_kv_heads": 2,
         "ffn_hidden_size": 704, "vocab_size": 256}  # fmt: skip
SEQ_LEN, GLOBAL_BATCH = 128, 8
MICRO_BATCH_SIZES = (1, 2, 4, 8)
RECOMPUTE_MODES = ("none", "selective", "full")
WARM_STEPS = 2  # lazy initialisation (optimizer state, allocator) lands in the first steps
DATA = Path(__file__).resolve().parent.parent / "executor" / "texts" / "founding.txt"


def request(micro_batch_size: int, recompute: str, profile: Path) -> dict:
    return {
        "model": MODEL,
        "training": {"seq_len": SEQ_LEN, "global_batch_size": GLOBAL_BATCH, "precision": "fp32"},
        "cluster": {"gpu": "cpu", "num_nodes": 1, "gpus_per_node": 1, "profile": str(profile)},
        "plan": {"dp": 1, "tp": 1, "pp": 1, "micro_batch_size": micro_batch_size, "recompute": recompute},
    }


def measure_profile(out: Path, threads: int, repeats: int, passes: int, console: Console) -> Path:
    from api.profiling import run_compute
    from profiler.compute import ComputeSweep

    sweep = ComputeSweep(
        model=resolve_model(MODEL),
        seq_lens=(SEQ_LEN,),
        micro_batch_sizes=MICRO_BATCH_SIZES,
        threads=threads,
        repeats=repeats,
        passes=passes,
    )
    return save_profile_json(run_compute(sweep, console), out)


def measured_step_s(req: dict, steps: int, threads: int, out: Path) -> float:
    """Median step time of a real training run of `req` (steps after the warm ones)."""
    run_dir = RunDir(out)
    prepare_run(req, TrainConfig(steps=steps, data=DATA, lr=1e-3), out, nproc=1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = launch.run(local_spec(run_dir, 1, resume=False), env=env, timeout_s=600)
    if not result.ok:
        raise SystemExit(f"training {out.name} failed: {result.root_cause}")
    times = [record["step_time_s"] for record in run_dir.read_metrics()[WARM_STEPS:]]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=Path, help="an existing CPU profile of this model (default: measure one)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, profile and training alike")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per profiled layer and pass")
    parser.add_argument("--passes", type=int, default=3, help="passes over the profile's sweep, samples pooled")
    parser.add_argument("--out", type=Path, default=None, help="where the profile and runs go (default: a temp dir)")
    args = parser.parse_args()
    console = Console(width=160)
    out = args.out or Path(tempfile.mkdtemp(prefix="paraplan-cpu-steps-"))
    profile = args.profile or measure_profile(out / "profile.json", args.threads, args.repeats, args.passes, console)
    device = load_profile_json(profile).device_name

    table = Table(title=f"single-process step time on {device}: predicted from the profile vs measured")
    for column in ("mbs", "recompute", "microbatches", "predicted s", "measured s", "error"):
        table.add_column(column, justify="right")
    errors = []
    for mbs in MICRO_BATCH_SIZES:
        for mode in RECOMPUTE_MODES:
            req = request(mbs, mode, profile)
            predicted = planner.estimate(req).step_time_s
            measured = measured_step_s(req, args.steps, args.threads, out / f"mbs{mbs}-{mode}")
            errors.append(predicted / measured - 1)
            row = (str(mbs), mode, str(GLOBAL_BATCH // mbs), f"{predicted:.4f}", f"{measured:.4f}")
            table.add_row(*row, f"{errors[-1]:+.1%}")
    table.caption = (
        f"MAPE {statistics.mean(abs(e) for e in errors):.1%}, worst {max(errors, key=abs):+.1%}; profile {profile}"
    )
    console.print(table)


if __name__ == "__main__":
    main()
