"""Context parallelism: ring attention over the mesh's cp axis, with Megatron's zigzag load balancing.

The sequence is cut into 2 x cp chunks and cp rank r holds chunks r and 2cp-1-r (`zigzag_positions`), as
Megatron-Core does (`get_batch_on_this_cp_rank`) and as planner/cost/context.py costs it. Every activation of a
rank covers only its s/cp tokens; only attention mixes tokens, so only attention communicates. Each rank's K and
V travel round the cp ring (Liu et al. 2023, "Ring Attention with Blockwise Transformers"), one hop per step, and
every step's partial attention is merged into the running output by the log-sum-exp rescaling that makes blockwise
softmax exact (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; Dao et al. 2022,
FlashAttention, sec. 3.1). Built on torch's point-to-point collectives only:

- A hop is differentiable, in two autograd halves (`_LaunchHop`, `_LandHop`): forward sends this rank's K/V to
  cp rank r+1 and receives rank r-1's; backward sends the gradient the other way, so the dK/dV of a visiting shard
  travel home along the hops it came by, accumulated at each rank on the way, as TransformerEngine's
  `AttnFuncWithCPAndKVP2P.backward` does. Each hop is started before a step's attention and waited for after it,
  forward and backward, so the messages travel while the attention computes.
- With the zigzag split, step 0 is causal attention over the rank's own two chunks, and every other step is
  either its whole Q against the first chunk of the visiting K/V or its second chunk of Q against all of it
  (`_visiting_step`): the same work on every rank and step, the load balance planner/cost/context.py assumes.

Why not torch's own `torch.distributed.tensor.experimental.context_parallel`: it swaps only the CUDA SDPA kernels
(flash, efficient, cuDNN) for ring versions, and CPU runs the separate `_scaled_dot_product_flash_attention_for_cpu`
op, so on CPU/gloo it cannot run (torch 2.13, 2 gloo ranks: "Operator
aten._scaled_dot_product_flash_attention_for_cpu.default does not have a sharding strategy registered"), and the
executor's parity tests run on CPU.

What differs from the costed implementation (planner/cost/context.py's docstring says so too): the block attention
is computed in fp32 by plain matmuls (no fused kernel returns the log-sum-exp through a public API), which keeps a
[s/cp, s/cp] probability matrix per head and step for backward: slower and larger than a fused kernel, not less
exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed import ProcessGroup
    from torch.distributed.device_mesh import DeviceMesh


def zigzag_positions(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """The sequence positions cp rank `cp_rank` holds, ascending: chunks r and 2cp-1-r of 2 x cp equal chunks."""
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len={seq_len} is not divisible by 2 x cp = {2 * cp}")
    chunk = seq_len // (2 * cp)
    first, second = cp_rank * chunk, (2 * cp - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


@dataclass(frozen=True)
class Ring:
    """This rank's place in the cp ring: the group, its size and this rank's index in it."""

    group: ProcessGroup
    size: int
    rank: int

    @classmethod
    def of(cls, cp_mesh: DeviceMesh) -> Ring:
        return cls(cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank())

    def _global(self, index: int) -> int:
        """The global rank of the ring's member `index` (modulo the ring), which P2POp addresses."""
        return dist.get_global_rank(self.group, index % self.size)

    def start_hop(self, tensor: torch.Tensor, forward: bool) -> Hop:
        """Start sending `tensor` one hop round the ring (to rank + 1 when `forward`, else to rank - 1) and
        receiving the tensor that comes from the other side; the caller computes while both travel."""
        step = 1 if forward else -1
        sent, received = tensor.contiguous(), torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, sent, self._global(self.rank + step), self.group),
            dist.P2POp(dist.irecv, received, self._global(self.rank - step), self.group),
        ]
        return Hop(sent, received, dist.batch_isend_irecv(ops))


@dataclass
class Hop:
    """A hop in flight: `received` holds nothing valid until `land` has waited for both messages."""

    sent: torch.Tensor  # kept alive until the send completes
    received: torch.Tensor
    requests: list[Any]

    def land(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        return self.received


@dataclass
class _HopLink:
    """What a hop's two autograd halves share: the forward hop, then the backward hop of its gradient."""

    ring: Ring
    forward: Hop | None = None
    backward: Hop | None = None


class _LaunchHop(torch.autograd.Function):
    """First half of a differentiable hop: forward starts sending the tensor to rank + 1 and returns the buffer that
    rank - 1's tensor is arriving in (only `_LandHop` reads it); backward waits for this tensor's gradient, which
    rank + 1 computed and sends back in its `_LandHop.backward`, and returns it."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, link: _HopLink) -> torch.Tensor:
        ctx.link = link
        link.forward = link.ring.start_hop(tensor, forward=True)
        return link.forward.received

    @staticmethod
    def backward(ctx: Any, grad_in_flight: torch.Tensor) -> tuple[torch.Tensor, None]:
        hop = ctx.link.backward
        assert hop is not None and hop.received is grad_in_flight  # _LandHop.backward started it
        return hop.land(), None


class _LandHop(torch.autograd.Function):
    """Second half: forward waits for the tensor to arrive; backward starts sending its gradient back to the rank it
    came from (rank - 1), which `_LaunchHop.backward` waits for. Between the two halves sits one step's attention;
    autograd's engine runs ready nodes latest-created first (its ready queue orders by sequence number), so that
    step's backward runs while the gradient travels, and each hop overlaps a step's attention both ways."""

    @staticmethod
    def forward(ctx: Any, in_flight: torch.Tensor, link: _HopLink) -> torch.Tensor:
        ctx.link = link
        assert link.forward is not None and link.forward.received is in_flight
        return link.forward.land().view_as(in_flight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        link = ctx.link
        link.backward = link.ring.start_hop(grad, forward=False)
        return link.backward.received, None


def start_ring_hop(kv: torch.Tensor, ring: Ring) -> Callable[[], torch.Tensor]:
    """Start passing `kv` to the next rank (differentiably); call the result for the previous rank's `kv`."""
    link = _HopLink(ring)
    in_flight = _LaunchHop.apply(kv, link)
    return lambda: _LandHop.apply(in_flight, link)


def attend_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [b, hq, m, d] over k, v [b, hk, n, d], in fp32 at least: the output and the
    log-sum-exp of each query row's scores [b, hq, m, 1], which is what merging it with other key blocks needs.
    `causal` masks key j for query i < j (square blocks only). Grouped K/V heads are repeated to hq."""
    if k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    dtype = torch.promote_types(q.dtype, torch.float32)  # 16-bit inputs are attended in fp32, as fused kernels do
    # Under mixed precision autocast would run these matmuls in 16 bits and round the scores the log-sum-exp merge
    # depends on; fused attention keeps them in fp32 too (Dao 2023, FlashAttention-2, sec. 3.1).
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if causal:
            future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        lse = scores.logsumexp(dim=-1, keepdim=True)
        # Dropout on each block's probabilities equals dropout on the whole row's: the merge only rescales them.
        probs = F.dropout((scores - lse).exp(), p=dropout_p) if dropout_p > 0 else (scores - lse).exp()
        return probs @ v.to(dtype), lse


def merge(
    out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor, part_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two attentions of the same queries over disjoint key sets -> the attention over their union (exact)."""
    total = torch.logaddexp(lse, part_lse)
    return out * (lse - total).exp() + part * (part_lse - total).exp(), total


def _visiting_step(
    q: torch.Tensor, kv: torch.Tensor, rank: int, source: int, dropout_p: float
) -> tuple[slice, torch.Tensor, torch.Tensor]:
    """The useful part of rank `source`'s K/V for rank `rank`'s queries: which query rows it touches and their
    partial output and log-sum-exp. Source chunks s and 2cp-1-s against our r and 2cp-1-r: for s < r chunk s
    precedes both of ours and chunk 2cp-1-s follows both; for s > r both of its chunks fall between ours."""
    half = q.shape[2] // 2
    k, v = kv.unbind(0)
    if source < rank:
        rows = slice(0, 2 * half)
        k, v = k[:, :, :half], v[:, :, :half]
    else:
        rows = slice(half, 2 * half)
    part, part_lse = attend_with_lse(q[:, :, rows], k, v, causal=False, dropout_p=dropout_p)
    return rows, part, part_lse


def zigzag_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    rank: int,
    size: int,
    pass_on: Callable[[torch.Tensor], Callable[[], torch.Tensor]],
    dropout_p: float,
) -> torch.Tensor:
    """Causal attention of rank `rank`'s zigzag queries [b, hq, s/cp, d] over the whole sequence, whose K/V shards
    [2, b, hk, s/cp, d] the `size` ranks hold: `kv` is this rank's; `pass_on(kv)` starts passing a shard on round
    the ring and returns what to call for the shard arriving from the rank behind (`ring_attention` sends it by
    point-to-point messages). Each hop is started before the current step computes, so the next step's K/V travel
    while this step's attention runs, as TransformerEngine does. Step 0 is the rank's own chunks, causal (its positions
    ascend, so the causal mask of its concatenated chunks is the global one); step i takes rank r - i's K/V."""
    arrival = pass_on(kv) if size > 1 else None
    out, lse = attend_with_lse(q, kv[0], kv[1], causal=True, dropout_p=dropout_p)
    for step in range(1, size):
        assert arrival is not None
        kv = arrival()
        if step + 1 < size:
            arrival = pass_on(kv)
        rows, part, part_lse = _visiting_step(q, kv, rank, (rank - step) % size, dropout_p)
        merged, merged_lse = merge(out[:, :, rows], lse[:, :, rows], part, part_lse)
        keep = slice(0, rows.start)
        out = torch.cat([out[:, :, keep], merged], dim=2)
        lse = torch.cat([lse[:, :, keep], merged_lse], dim=2)
    return out.type_as(q)


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring, dropout_p: float) -> torch.Tensor:
    """Causal attention of this rank's zigzag queries over the whole sequence, the other ranks' keys and values
    brought round the cp ring (one message of K and V per hop)."""
    return zigzag_attention(
        q, torch.stack([k, v]), ring.rank, ring.size, lambda kv: start_ring_hop(kv, ring), dropout_p
    )


def apply_context_parallel(
    chunk: nn.Module, cp_mesh: DeviceMesh, seq_len: int, device: torch.device
) -> torch.Tensor | None:
    """Give every attention core of `chunk` the cp ring, and the rotary and learned position embeddings this rank's
    zigzag positions; the positions (to cut the batch with), or None with one cp rank (`chunk` left unchanged)."""
    from executor.models.layers import Attention, AttentionCore
    from executor.models.transformer import Transformer

    if cp_mesh.size() == 1:
        return None
    ring = Ring.of(cp_mesh)
    positions = zigzag_positions(seq_len, ring.size, ring.rank).to(device)
    for module in chunk.modules():
        if isinstance(module, AttentionCore):
            module.context_attention = partial(ring_attention, ring=ring)
        elif isinstance(module, Attention | Transformer):
            module.positions = positions
    return positions
