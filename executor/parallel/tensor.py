"""Tensor and sequence parallelism: torchtitan's Llama plan (Megatron-LM's layout) on the mesh's tp axis.

Megatron (Shoeybi et al. 2019, sec. 3): the first matrix of attention (wq, wk, wv) and of the MLP (w1, w3) is
split by columns, the second (wo, w2) by rows, so each block needs one all-reduce forward and one backward. The
token embedding is split over the vocabulary (RowwiseParallel on an Embedding) and the LM head by columns, with
its output gathered (Replicate) so the loss sees whole logits. Sequence parallelism (Korthikanti et al. 2022,
sec. 4.2.2) shards the norms' activations over the sequence (Shard(1)) and turns each all-reduce into a
reduce-scatter + all-gather pair.

Modules that are None are skipped: pruned pipeline chunks (no embedding, no head) and GELU MLPs (no w3).
`parallelize_module` scatters from tp rank 0, so TP keeps the single-device model's values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from executor.models import Transformer


def _present(module: nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    """The entries of a parallelize plan whose module exists (is not None) in `module`."""
    return {name: style for name, style in plan.items() if _get(module, name) is not None}


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    found: nn.Module | None = module
    for part in dotted.split("."):
        found = getattr(found, part, None)
    return found


def _outer_plan(model: Transformer, sequence_parallel: bool) -> dict[str, Any]:
    """Embedding, final norm and LM head. seq_layout is how activations travel between blocks."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    seq_layout = Shard(1) if sequence_parallel else Replicate()
    # Learned positions are added to the embedding's output and need the whole sequence there (see
    # Transformer.embed): keep it replicated and shard at the first block instead (_first_block_input).
    embed_out = Replicate() if getattr(model, "pos_embeddings", None) is not None else seq_layout
    plan: dict[str, Any] = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=embed_out),
        "output": ColwiseParallel(input_layouts=seq_layout, output_layouts=Replicate()),
    }
    if sequence_parallel:
        plan["norm"] = SequenceParallel()
    return plan


def _block_plan(sequence_parallel: bool) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    seq_layout = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, Any] = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=seq_layout),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=seq_layout),
    }
    if sequence_parallel:
        # Norms run on sequence shards; attention and MLP gather the whole sequence first.
        for name in ("attention", "feed_forward"):
            plan[name] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        plan |= {"attention_norm": SequenceParallel(), "ffn_norm": SequenceParallel()}
    return plan


def _first_block_input(model: Transformer) -> dict[str, Any]:
    """Under SP with learned positions: shard the replicated embedding output where the first block starts."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput

    if getattr(model, "pos_embeddings", None) is None or not len(model.layers):
        return {}
    first = next(iter(model.layers))
    # A local tensor, as the vocab-parallel embedding would hand over: the block adds it to its residual branch.
    shard = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True)
    return {f"layers.{first}": shard}


def apply_tensor_parallel(module: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> Transformer:
    """Shard `module` (a Transformer or a pruned pipeline chunk of one) over `tp_mesh`, in place; returns it."""
    from torch.distributed.tensor.parallel import parallelize_module

    if tp_mesh.size() == 1:
        return module
    outer = _outer_plan(module, sequence_parallel)
    if sequence_parallel:
        outer |= _first_block_input(module)
    parallelize_module(module, tp_mesh, _present(module, outer))
    for block in module.layers.values():
        parallelize_module(block, tp_mesh, _present(block, _block_plan(sequence_parallel)))
    if getattr(module.spec, "tie_embeddings", False):
        # Both sides shard the shared matrix the same way (Shard(0) over the vocabulary), but parallelize_module
        # made each its own DTensor Parameter: share one again so both uses add into one gradient.
        module.tie_weights()
    return module
