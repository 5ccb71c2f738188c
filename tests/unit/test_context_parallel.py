"""executor.parallel.context on one process: the zigzag split and the ring's exact softmax merge.

`zigzag_attention` is the ring attention that every cp rank runs; here each rank's step is run in turn on one
process, the K/V shard "passed round the ring" being the one that rank r - i holds, and the outputs, put back in
sequence order, must equal plain causal SDPA over the whole sequence (and so must the gradients). The real ring, with
processes and point-to-point messages, is tests/distributed/test_parity.py's cp cases.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F

from executor.parallel.context import attend_with_lse, merge, zigzag_attention, zigzag_positions

BATCH, HEADS, KV_HEADS, SEQ, HEAD_DIM = 2, 4, 2, 24, 8
TOLERANCE = 1e-5


def test_zigzag_gives_rank_r_chunks_r_and_2cp_minus_1_minus_r() -> None:
    assert zigzag_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    every = torch.cat([zigzag_positions(24, 3, r) for r in range(3)]).sort().values
    assert every.tolist() == list(range(24))
    with pytest.raises(ValueError, match="2 x cp = 6"):
        zigzag_positions(16, 3, 0)


def test_merging_two_key_blocks_equals_attention_over_both() -> None:
    q, k, v = (torch.randn(BATCH, HEADS, 6, HEAD_DIM, dtype=torch.float64) for _ in range(3))
    whole, whole_lse = attend_with_lse(q, k, v, causal=False, dropout_p=0.0)
    first, first_lse = attend_with_lse(q, k[:, :, :2], v[:, :, :2], causal=False, dropout_p=0.0)
    rest, rest_lse = attend_with_lse(q, k[:, :, 2:], v[:, :, 2:], causal=False, dropout_p=0.0)
    merged, merged_lse = merge(first, first_lse, rest, rest_lse)
    torch.testing.assert_close(merged, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged_lse, whole_lse, rtol=0, atol=1e-12)


def _zigzag_on_one_process(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: int) -> torch.Tensor:
    """Every cp rank's ring attention in turn, each fed the K/V shards the ring would bring it; the outputs
    scattered back to their sequence positions."""
    positions = [zigzag_positions(SEQ, cp, r) for r in range(cp)]
    shards = [torch.stack([k[:, :, p], v[:, :, p]]) for p in positions]
    out = torch.empty_like(q)
    for rank in range(cp):
        arriving = iter([shards[(rank - step) % cp] for step in range(1, cp)])
        local = zigzag_attention(q[:, :, positions[rank]], shards[rank], rank, cp, _replay(arriving), 0.0)
        out[:, :, positions[rank]] = local
    return out


def _replay(arriving: Iterator[torch.Tensor]) -> Callable[[torch.Tensor], Callable[[], torch.Tensor]]:
    """The ring's hops as the rank would see them: each hop it starts lands the next shard in order."""
    return lambda _sent: lambda: next(arriving)


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_ring_attention_equals_causal_sdpa_with_its_gradients(cp: int) -> None:
    generator = torch.Generator().manual_seed(cp)
    q = torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=generator, requires_grad=True)
    k, v = (torch.randn(BATCH, KV_HEADS, SEQ, HEAD_DIM, generator=generator, requires_grad=True) for _ in range(2))
    upstream = torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=generator)

    ring = _zigzag_on_one_process(q, k, v, cp)
    ring_grads = torch.autograd.grad(ring, (q, k, v), upstream)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    sdpa_grads = torch.autograd.grad(sdpa, (q, k, v), upstream)

    torch.testing.assert_close(ring, sdpa, rtol=0, atol=TOLERANCE)
    for name, got, want in zip("qkv", ring_grads, sdpa_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE, msg=f"d{name}")


def test_a_causal_step_sees_no_future_key() -> None:
    # Changing the last key and value must leave every earlier query's output unchanged.
    q, k, v = (torch.randn(1, 2, 8, HEAD_DIM) for _ in range(3))
    before, _ = attend_with_lse(q, k, v, causal=True, dropout_p=0.0)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, -1], v2[:, :, -1] = 5.0, -5.0
    after, _ = attend_with_lse(q, k2, v2, causal=True, dropout_p=0.0)
    torch.testing.assert_close(after[:, :, :-1], before[:, :, :-1], rtol=0, atol=0)
    assert not torch.allclose(after[:, :, -1], before[:, :, -1])


def test_mixed_precision_attends_in_fp32() -> None:
    # Under autocast a 16-bit matmul would round the scores; the block keeps them in fp32 and returns fp32.
    q, k, v = (torch.randn(1, 2, 8, HEAD_DIM).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = attend_with_lse(q, k, v, causal=True, dropout_p=0.0)
    want, want_lse = attend_with_lse(q.float(), k.float(), v.float(), causal=True, dropout_p=0.0)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
