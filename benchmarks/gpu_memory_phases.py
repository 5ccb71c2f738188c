"""Where a single-GPU training step of the executor holds its memory: CUDA allocated bytes after building the
model, and the peak and the bytes still held after each phase of a step (each micro-batch's forward and backward,
the optimizer step), for a few (seq_len, micro-batch, recompute) shapes. The model, loss, autocast and AdamW are
the executor's (executor/train.py); this is what `paraplan validate --device cuda` measures as one peak, taken
apart so that the cost model's memory terms can be checked one by one.

    python benchmarks/gpu_memory_phases.py [--model llama3.2-1b] [--shapes 1024:1:none,2048:2:full]

Prints one JSON line per shape (bytes) and a table (GiB). Needs CUDA.
"""

from __future__ import annotations

import argparse
import json

import torch

from api.commands.inputs import model_from_flag
from executor.models import build_model, next_token_loss
from executor.parallel.checkpoint import apply_recompute
from planner.request import resolve_model
from planner.specs import ModelSpec

GiB = 2**30
GLOBAL_BATCH = 8


def phases(spec: ModelSpec, seq_len: int, mbs: int, recompute: str, device: torch.device) -> dict[str, int]:
    """Two optimizer steps of GLOBAL_BATCH sequences in micro-batches of `mbs`; the second step's figures."""
    torch.cuda.empty_cache()
    model = apply_recompute(build_model(spec, device=device, seed=0), recompute)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    figures: dict[str, int] = {"model": torch.cuda.memory_allocated(device)}
    tokens = torch.randint(0, spec.vocab_size, (GLOBAL_BATCH, seq_len + 1), device=device)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        figures["step_start"] = torch.cuda.memory_allocated(device)
        for index, rows in enumerate(tokens.chunk(GLOBAL_BATCH // mbs)):
            torch.cuda.reset_peak_memory_stats(device)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                loss = next_token_loss(model(rows[:, :-1]), rows[:, 1:])
            figures[f"mb{index}_forward_peak"] = torch.cuda.max_memory_allocated(device)
            figures[f"mb{index}_after_forward"] = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            (loss / (GLOBAL_BATCH // mbs)).backward()
            figures[f"mb{index}_backward_peak"] = torch.cuda.max_memory_allocated(device)
            figures[f"mb{index}_after_backward"] = torch.cuda.memory_allocated(device)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        torch.cuda.reset_peak_memory_stats(device)
        optimizer.step()
        figures["optimizer_peak"] = torch.cuda.max_memory_allocated(device)
        figures["after_optimizer"] = torch.cuda.memory_allocated(device)
    del model, optimizer
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama3.2-1b", help="preset name, ModelSpec JSON file or inline JSON")
    parser.add_argument("--shapes", default="1024:1:none,1024:2:none,1024:4:none,1024:4:full,2048:2:none")
    args = parser.parse_args()
    spec = ModelSpec.model_validate(resolve_model(model_from_flag(args.model)))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    for shape in args.shapes.split(","):
        seq, mbs, recompute = shape.split(":")
        figures = phases(spec, int(seq), int(mbs), recompute, device)
        print(json.dumps({"seq_len": int(seq), "mbs": int(mbs), "recompute": recompute, **figures}), flush=True)
        print("  " + "  ".join(f"{k} {v / GiB:.2f}" for k, v in figures.items() if k.startswith(("model", "mb0", "mb1_",
              "optimizer", "after_opt"))), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
