"""Deterministic weight initialisation: the same seed gives the same weights whatever the parallelization.

Each parameter draws from its own generator, seeded by (seed, canonical FQN). So a pruned pipeline stage, a
model whose blocks are wrapped for activation checkpointing, or one whose parameters are already DTensors
(tensor parallel, FSDP2) gets exactly the values the whole single-device model gets, without every rank
drawing the whole model's random numbers in one shared order.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

WEIGHT_STD = 0.02  # GPT-2's initializer_range (Radford et al. 2019 code); Llama's too (Touvron et al. 2023 code)

# Names that wrappers insert into FQNs: checkpoint_wrapper, torch.compile, FSDP1, DDP (`module.` at the root).
_WRAPPER_NAMES = frozenset({"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module", "module"})


def canonical_fqn(name: str, tied_head: bool = False) -> str:
    """The parameter's name in the plain model: wrapper segments dropped; a tied head is the word embedding."""
    fqn = ".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES)
    return "tok_embeddings.weight" if tied_head and fqn == "output.weight" else fqn


def _generator(seed: int, fqn: str) -> torch.Generator:
    """A CPU generator for one parameter; sha256 rather than hash() because hash() changes between processes."""
    digest = hashlib.sha256(f"{seed}/{fqn}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _initial_value(owner: nn.Module, leaf: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Norm scales 1, biases 0, every matrix and embedding N(0, 0.02^2); drawn in fp32 so dtypes agree."""
    if leaf == "weight" and isinstance(owner, nn.LayerNorm | nn.RMSNorm):
        return torch.ones(shape)
    if leaf == "bias":
        return torch.zeros(shape)
    return torch.empty(shape).normal_(0.0, WEIGHT_STD, generator=generator)


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a full-size value into a parameter, keeping only this rank's shard when the parameter is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank holds the same full value, so slice locally instead of scattering.
        value = distribute_tensor(
            value.to(param.device_mesh.device_type), param.device_mesh, param.placements, src_data_rank=None
        )
    param.copy_(value)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Initialise every parameter of `model` from `seed` (GPT-2 / Llama scheme, without depth scaling).

    Parameters on the meta device are skipped: they have no storage until `to_empty`.
    """
    tied_head = bool(getattr(getattr(model, "spec", None), "tie_embeddings", False))
    for name, param in model.named_parameters():
        if param.is_meta:
            continue
        owner_name, _, leaf = name.rpartition(".")
        generator = _generator(seed, canonical_fqn(name, tied_head))
        _copy_into(param, _initial_value(model.get_submodule(owner_name), leaf, param.shape, generator))
