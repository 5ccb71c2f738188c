"""Gradient accumulation communicates as the cost model counts it (executor/apply.py `_accumulating`): DDP and
FSDP2's replicate reduce once per step, after the last micro-batch; and DDP holds the gradients once, as the memory
model counts them. Real torch wrappers on a one-rank gloo group, with a hook that counts what they would send."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from executor.apply import _accumulating
from executor.parallel.data import classic_ddp

MICROBATCHES = 4


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


INPUTS = [torch.randn(2, 8, generator=torch.Generator().manual_seed(i)) for i in range(MICROBATCHES)]


def accumulate(model: nn.Module, zero_stage: int) -> None:
    for index, x in enumerate(INPUTS):
        with _accumulating(model, zero_stage, last=index == MICROBATCHES - 1):
            model(x).sum().backward()


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_ddp_reduces_once_per_step(one_rank_group, zero_stage):
    torch.manual_seed(0)
    model = classic_ddp(nn.Linear(8, 8), one_rank_group)
    reductions = []

    def counting(state, bucket):
        reductions.append(bucket.index())
        future = torch.futures.Future()
        future.set_result(bucket.buffer())
        return future

    model.register_comm_hook(None, counting)
    accumulate(model, zero_stage)
    assert len(reductions) == 1
    # The gradients held back still add up over every micro-batch.
    reference = nn.Linear(8, 8)
    reference.load_state_dict(model.module.state_dict())
    accumulate(reference, zero_stage)
    assert torch.allclose(model.module.weight.grad, reference.weight.grad)


def test_ddp_gradients_live_in_its_buckets(one_rank_group):
    """No second copy: the weight's and the bias's gradients are views into the one bucket that holds them both, so
    they share its storage; without `gradient_as_bucket_view` each gradient has storage of its own."""
    model = classic_ddp(nn.Linear(8, 8), one_rank_group)
    accumulate(model, 0)
    weight, bias = model.module.weight.grad, model.module.bias.grad
    assert weight.untyped_storage().data_ptr() == bias.untyped_storage().data_ptr()


def test_a_module_without_a_wrapper_accumulates_plainly():
    model = nn.Linear(8, 8)
    accumulate(model, 0)
    assert model.weight.grad is not None
