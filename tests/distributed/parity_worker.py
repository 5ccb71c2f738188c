"""Train a tiny Llama- or GPT-style model for a few steps under one parallel plan; rank 0 writes what it measured.

Under torchrun (`python -m torch.distributed.run --standalone --nproc-per-node=N parity_worker.py --plan JSON
--out FILE`) every rank builds the same model (seed 0) and the same batches, and the executor applies the plan.
With `--reference` it runs alone, in plain PyTorch, with no executor code at all: the numbers every plan must
reproduce. SGD with momentum is scale-sensitive, so a gradient that is summed instead of averaged, or scaled
twice, changes the losses (Adam would hide it); the clipping threshold sits inside the range the gradient norm
takes over the run, so some steps clip and some do not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F

from executor.models import build_model
from planner.specs import ModelSpec, ParallelPlan, TrainingSpec

LLAMA = ModelSpec(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_kv_heads=2,
    ffn_hidden_size=176,
    vocab_size=256,
    mlp="swiglu",
    norm="rmsnorm",
)
# GPT-2 style: GELU MLP (no w3), LayerNorm, learned positions, biases, tied head; no dropout, for exact parity.
# An odd vocabulary: tensor parallelism shards the embedding and the head unevenly.
GPT = ModelSpec(
    num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=255, tie_embeddings=True, max_position_embeddings=32
)
# Mixtral style (Jiang et al. 2024): the Llama blocks with 4 SwiGLU experts, 2 per token; 2 layers keep it quick.
MIXTRAL = LLAMA.model_copy(update={"num_layers": 2, "ffn_hidden_size": 96, "num_experts": 4, "experts_per_token": 2})
MODELS = {"llama": LLAMA, "gpt": GPT, "mixtral": MIXTRAL}
TRAINING = TrainingSpec(seq_len=32, global_batch_size=8, precision="fp32", optimizer="sgd")
STEPS = 4
LR, MOMENTUM = 0.5, 0.9
# Llama's reference norms are 1.19, 1.17, 1.22, 1.36 (steps 3 and 4 clip); GPT's 1.29, 0.59, 0.59, 0.54.
MAX_GRAD_NORM = 1.2


def batches(spec: ModelSpec) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Arithmetic sequences mod vocab (learnable, so the loss falls); inputs and next-token targets [B, s]."""
    generator = torch.Generator().manual_seed(0)
    positions = torch.arange(TRAINING.seq_len + 1)
    for _ in range(STEPS):
        start = torch.randint(0, spec.vocab_size, (TRAINING.global_batch_size, 1), generator=generator)
        stride = torch.randint(1, 8, (TRAINING.global_batch_size, 1), generator=generator)
        sequences = (start + stride * positions) % spec.vocab_size
        yield sequences[:, :-1], sequences[:, 1:]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def reference(spec: ModelSpec) -> dict:
    model = build_model(spec, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    losses, norms, aux_losses = [], [], []
    for tokens, targets in batches(spec):
        optimizer.zero_grad()
        loss = loss_fn(model(tokens), targets)
        loss.backward()  # a mixture of experts adds its load-balancing loss's gradient itself (MoEFeedForward)
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM).item())
        optimizer.step()
        losses.append(loss.item())
        aux_losses.append(_mean_aux_loss(model))
    return {"losses": losses, "grad_norms": norms, "local_params": [sum(p.numel() for p in model.parameters())],
            "aux_losses": aux_losses}  # fmt: skip


def _mean_aux_loss(model: torch.nn.Module) -> float | None:
    """The load-balancing loss of the last backward, averaged over the MoE layers; None for a dense model."""
    from executor.models import MoEFeedForward

    values = [m.aux_losses.pop() for m in model.modules() if isinstance(m, MoEFeedForward)]
    return torch.stack(values).mean().item() if values else None


def _applied(spec: ModelSpec, plan: ParallelPlan, mesh: Any, seed: int) -> tuple[Any, list[torch.optim.Optimizer]]:
    from executor.apply import apply_plan

    model = build_model(spec, seed=seed)
    applied = apply_plan(model, plan, mesh, training=TRAINING, loss_fn=loss_fn, device=torch.device("cpu"))
    return applied, applied.make_optimizers(torch.optim.SGD, lr=LR, momentum=MOMENTUM)


def parallel(spec: ModelSpec, plan: ParallelPlan, resume_after: int | None, checkpoint: Path) -> dict:
    """The plan's run; with `resume_after`, its state is saved after that step and loaded into a freshly built model
    of other weights (seed 1) and fresh optimizers, which train on: the losses show whether the checkpoint held
    it all."""
    import torch.distributed as dist
    from torch.distributed.tensor.debug import CommDebugMode

    from executor import train_state
    from executor.mesh import build_mesh

    mesh = build_mesh(plan, "cpu")
    applied, optimizers = _applied(spec, plan, mesh, seed=0)
    losses, norms, aux_losses = [], [], []
    for step, (tokens, targets) in enumerate(batches(spec), start=1):
        for optimizer in optimizers:
            optimizer.zero_grad()
        losses.append(applied.step(tokens, targets))
        aux_losses.append(applied.aux_loss())
        misplaced_grads = [name for name, p in _named_parameters(applied) if _layout(p.grad) != _layout(p)]
        norms.append(applied.clip_grad_norm_(MAX_GRAD_NORM))
        with CommDebugMode() as optimizer_comms:
            for optimizer in optimizers:
                optimizer.step()
        if step == resume_after:
            train_state.save(checkpoint, step, applied.chunks, optimizers)
            applied, optimizers = _applied(spec, plan, mesh, seed=1)
            train_state.load(checkpoint, applied.chunks, optimizers)
    local_params = [None] * dist.get_world_size()
    dist.all_gather_object(local_params, sum(_local_numel(p) for p in applied.parameters()))
    # The collectives DTensor issued inside the last optimizer step (a Partial gradient left by backward costs
    # an all-reduce in each operation that reads it).
    optimizer_collectives = {str(op): count for op, count in optimizer_comms.get_comm_counts().items()}
    return {"losses": losses, "grad_norms": norms, "local_params": local_params, "aux_losses": aux_losses,
            "optimizer_collectives": optimizer_collectives, "misplaced_grads": misplaced_grads,
            "offload_policies": sorted(_offload_policies(applied))}  # fmt: skip


def _offload_policies(applied: Any) -> set[str]:
    """The class names of the offload policies FSDP2 runs this rank's parameter groups with (a private attribute:
    torch has no public getter; the offload test checks the policy really reached fully_shard)."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for chunk in applied.chunks for m in chunk.modules() if isinstance(m, FSDPModule)]
    groups = [group for m in modules for group in m._get_fsdp_state()._fsdp_param_groups]
    return {type(group.offload_policy).__name__ for group in groups}


def _named_parameters(applied: Any) -> Iterator[tuple[str, torch.Tensor]]:
    for chunk in applied.chunks:
        yield from chunk.named_parameters()


def _layout(tensor: torch.Tensor) -> tuple | None:
    """A DTensor's placements; None for a plain tensor."""
    from torch.distributed.tensor import DTensor

    return tuple(tensor.placements) if isinstance(tensor, DTensor) else None


def _local_numel(param: torch.Tensor) -> int:
    """Elements this rank stores: the local shard of a DTensor (TP, FSDP2), all of a plain tensor."""
    from torch.distributed.tensor import DTensor

    return (param.to_local() if isinstance(param, DTensor) else param).numel()


def parallel_cases(cases: list[dict], out: Path) -> dict[str, dict]:
    """Each case's run, by name, one after another in one process group (process start-up and torch's import are
    paid once per launch, not once per case)."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = {}
    for case in cases:
        started = time.perf_counter()
        plan = ParallelPlan.model_validate(case["plan"])
        checkpoint = out.with_name(f"{out.stem}-{case['name']}.checkpoint")
        results[case["name"]] = parallel(MODELS[case["model"]], plan, case.get("resume_after"), checkpoint)
        results[case["name"]]["worker_s"] = time.perf_counter() - started  # mesh, model, plan and steps
    dist.destroy_process_group()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", help='JSON list of {"name", "model", "plan": ParallelPlan fields, "resume_after"}')
    parser.add_argument("--model", choices=sorted(MODELS), default="llama", help="the --reference run's model")
    parser.add_argument("--reference", action="store_true", help="plain single-process PyTorch, no executor")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.reference:
        started = time.perf_counter()
        result = reference(MODELS[args.model])
        result["worker_s"] = time.perf_counter() - started
    else:
        result = parallel_cases(json.loads(args.cases), args.out)
    write_and_leave(args.out, result)


def write_and_leave(out: Path, result: Any) -> NoReturn:
    """Rank 0 writes `result` to `out`; then every rank leaves without interpreter finalization. With torch 2.13 +
    gloo, a gloo worker thread can still be dropping the last reference to a finished collective's tensors when
    Python finalizes; taking the GIL then kills that thread through a noexcept C++ frame and the rank aborts
    ("terminate called without an active exception", SIGABRT) after all its work is done: about 1 launch in 20
    here. Everything is written; nothing is lost."""
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
