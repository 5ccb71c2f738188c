"""Per-layer forward and backward times, taken inside a running model rather than one layer at a time.

Why inside a model: a layer timed alone reruns on inputs and weights that are hot in the caches, and each of its
backward calls pays the autograd engine's start-up; in training, every block has its own weights, activations
pile up between forward and backward, and one backward call walks the whole graph. On a CPU, and for small
layers anywhere, those differences are tens of percent. So the profiler runs the executor's own Transformer
(a few blocks, sharded as one tensor-parallel rank holds them, under the recompute mode) forward and backward,
and stamps the time at every layer boundary:

    forward:   start | embedding | block 0 | ... | block k-1 | head + loss | end
    backward:  start | head | block k-1 | ... | block 0 | embedding | end

Forward stamps come from module hooks; backward stamps from tensor hooks on the hidden states between layers,
which fire when the gradient of that tensor is complete, i.e. when the layer after it has finished its backward
(recompute included). On CUDA the stamps are events on the current stream, read after a synchronisation; on the
CPU `perf_counter`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from executor.models import Transformer


class _Stamps:
    """Named points in time on one device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.points: dict[str, Any] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points[name] = event
        else:
            self.points[name] = time.perf_counter()

    def seconds(self, start: str, end: str) -> float:
        """Seconds from `start` to `end` (synchronise first on CUDA)."""
        if self.cuda:
            return self.points[start].elapsed_time(self.points[end]) / 1e3
        return self.points[end] - self.points[start]


@dataclass
class LayerSamples:
    """One list of seconds per repeat, per layer kind; a block's sample is the mean over the model's blocks."""

    forward: dict[str, list[float]] = field(default_factory=lambda: {"embedding": [], "block": [], "head": []})
    backward: dict[str, list[float]] = field(default_factory=lambda: {"embedding": [], "block": [], "head": []})

    def extend(self, other: LayerSamples) -> None:
        """Pool `other`'s samples into these (another pass over the same layers)."""
        for mine, theirs in ((self.forward, other.forward), (self.backward, other.backward)):
            for kind, values in theirs.items():
                mine[kind].extend(values)


def time_layers(
    model: Transformer,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    autocast: Callable[[], Any],
) -> LayerSamples:
    """Run `model` forward (under `autocast`) and backward `warmup + repeats` times, gradients cleared before each
    run as `zero_grad(set_to_none=True)` leaves them, and return the per-layer times of the timed runs."""
    import torch

    blocks = list(model.layers.values())
    samples = LayerSamples()
    for run in range(warmup + repeats):
        stamps = _Stamps(device)
        handles = _install_hooks(blocks, stamps)
        try:
            model.zero_grad(set_to_none=True)
            stamps.mark("fwd.start")
            with autocast():
                loss = loss_fn(model(tokens), targets)
            stamps.mark("fwd.end")
            stamps.mark("bwd.start")
            loss.backward()
            stamps.mark("bwd.end")
        finally:
            for handle in handles:
                handle.remove()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if run >= warmup:
            _record(samples, stamps, len(blocks))
    return samples


def _install_hooks(blocks: list[torch.nn.Module], stamps: _Stamps) -> list[Any]:
    """Forward hooks that stamp each block's start and end, and that put a gradient hook on each block's input
    (hidden state i) and on the last block's output (hidden state k)."""
    handles = []
    last = len(blocks) - 1
    for i, block in enumerate(blocks):

        def before(module: Any, inputs: tuple[Any, ...], i: int = i) -> None:
            stamps.mark(f"fwd.block{i}.start")
            _stamp_on_grad(inputs[0], f"grad.h{i}", stamps)

        def after(module: Any, inputs: tuple[Any, ...], output: Any, i: int = i) -> None:
            stamps.mark(f"fwd.block{i}.end")
            if i == last:
                _stamp_on_grad(output, f"grad.h{i + 1}", stamps)

        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    return handles


def _stamp_on_grad(tensor: Any, name: str, stamps: _Stamps) -> None:
    if getattr(tensor, "requires_grad", False):
        tensor.register_hook(lambda grad: stamps.mark(name))


def _record(samples: LayerSamples, stamps: _Stamps, k: int) -> None:
    between = stamps.seconds
    samples.forward["embedding"].append(between("fwd.start", "fwd.block0.start"))
    samples.forward["block"].append(sum(between(f"fwd.block{i}.start", f"fwd.block{i}.end") for i in range(k)) / k)
    samples.forward["head"].append(between(f"fwd.block{k - 1}.end", "fwd.end"))
    samples.backward["head"].append(between("bwd.start", f"grad.h{k}"))
    samples.backward["block"].append(sum(between(f"grad.h{i + 1}", f"grad.h{i}") for i in range(k)) / k)
    samples.backward["embedding"].append(between("grad.h0", "bwd.end"))
