"""Per-layer compute profile: forward and backward time and saved-activation bytes of the executor's own layers,
at the shard sizes each tensor-parallel degree gives one device, plus the optimizer step per parameter.

What is measured is what the executor runs (executor/models, executor/parallel/checkpoint.py):

- ``block``: one TransformerBlock of the model sharded for ``tp`` (heads/tp, kv_heads/tp, ffn/tp; the collectives
  that tensor parallelism adds are the comm profile's business), under each recompute mode. Its backward
  includes the recomputation the mode implies.
- ``embedding``: the word (and learned position) lookup of a vocabulary shard, vocab/tp rows.
- ``head``: final norm, the LM head of a vocabulary shard and the training loss (``next_token_loss``).
- the optimizer: gradient clipping, ``step()`` and ``zero_grad()`` over the timed model's parameters, as the
  trainer runs them.

Layer times are taken inside a small running model of the executor's own Transformer, at the layer boundaries
(profiler/layer_timing.py says why): CUDA events on a GPU, ``perf_counter`` on the CPU with a fixed thread count,
after warm-ups, reporting the median and spread of the repeats (pooled over `passes`). On CUDA 16-bit precisions
run as the executor runs them, under autocast over fp32 weights; on the CPU the executor trains bf16 requests in fp32
and fp16 ones under autocast (executor/precision.py), so fp32 and fp16 are profiled there, bf16 is not.

Saved bytes. `saved_activation_bytes` counts the storages that a forward pass creates and that are still alive
once it returns, other than its output: exactly what the autograd graph (or a checkpoint) holds until backward.
That is what saved-tensor hooks would report for plain autograd, but hooks see neither what a non-reentrant
checkpoint keeps (its own hooks replace the outer ones) nor whether two saved tensors share a storage; tracking
storages sees both. On CUDA the allocator's peak over forward + backward is recorded as well.

torch is imported inside the functions, so the CLI can validate a sweep without it.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from planner.specs import (
    HardwareProfile,
    LayerKind,
    LayerMeasurement,
    ModelSpec,
    Optimizer,
    OptimizerMeasurement,
    Precision,
    Recompute,
)
from profiler.environment import device_name, software_versions, utc_now
from profiler.layer_timing import LayerSamples, time_layers
from profiler.timing import stats, time_repeats

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh

RECOMPUTE_MODES: tuple[Recompute, ...] = ("none", "selective", "full")
_MAX_GRAD_NORM = 1.0  # the trainer's default (executor/config.py); clipping costs the same whatever the bound


class ComputeSweepError(ValueError):
    """A sweep that cannot be measured; `field` names the setting at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ComputeSweep:
    """What to measure: every (tp, seq_len, micro_batch_size) for blocks under each recompute mode, the embedding
    and the head at each of them, and one optimizer step over the timed model's parameters."""

    model: ModelSpec
    seq_lens: tuple[int, ...]
    micro_batch_sizes: tuple[int, ...]
    tps: tuple[int, ...] = (1,)
    recompute_modes: tuple[Recompute, ...] = RECOMPUTE_MODES
    dtype: Precision = "fp32"
    device: str = "cpu"
    optimizer: Optimizer = "adamw"
    warmup: int = 3
    repeats: int = 10
    threads: int | None = None  # CPU: torch.set_num_threads; None keeps torch's default
    model_blocks: int = 4  # blocks of the model the layers are timed in (at most the model's own)
    # Times the whole sweep is run, `repeats` each time, its samples pooled: a machine whose speed drifts over
    # seconds (shared CPUs, clocks) then weighs on every measurement alike instead of on whichever ran then.
    passes: int = 1
    # Tensor-parallel degrees > 1 are also timed on that many ranks running the executor's tensor-parallel layers
    # (profiler/tp_layers.py), for each of these sequence-parallel settings.
    sequence_parallel: tuple[bool, ...] = (False,)

    def violations(self) -> list[tuple[str, str]]:
        """(field, reason) for everything that makes the sweep unmeasurable, without importing torch."""
        found = [(name, f"needs at least one value, got {value!r}") for name, value in self._lists() if not value]
        found += [(name, f"must be >= 1, got {v}") for name, value in self._lists() for v in value if v < 1]
        found += [("tps", reason) for tp in self.tps if tp >= 1 for reason in shard_violations(self.model, tp)]
        found += [("recompute_modes", f"unknown mode {m!r}") for m in self.recompute_modes if m not in RECOMPUTE_MODES]
        if self.device not in ("cpu", "cuda"):
            found.append(("device", f"must be cpu or cuda, got {self.device!r}"))
        if self.device == "cpu" and self.dtype == "bf16":
            found.append(("dtype", "the executor trains bf16 in fp32 on the CPU; bf16 is profiled on cuda only"))
        for name in ("warmup", "repeats", "threads", "model_blocks", "passes"):
            value = getattr(self, name)
            minimum = 0 if name == "warmup" else 1
            if value is not None and value < minimum:
                found.append((name, f"must be >= {minimum}, got {value}"))
        return found

    def _lists(self) -> list[tuple[str, Sequence[int]]]:
        return [("seq_lens", self.seq_lens), ("micro_batch_sizes", self.micro_batch_sizes), ("tps", self.tps)]

    def runs(self) -> list[ModelRun]:
        """One timed model per (tp, seq_len, micro_batch_size, recompute mode). The first mode's run of each shape
        also gives the embedding's and the head's times: they are never recomputed."""
        shapes = [(tp, s, b) for tp in self.tps for s in self.seq_lens for b in self.micro_batch_sizes]
        return [
            ModelRun(tp, b, s, mode, with_edges=mode == self.recompute_modes[0])
            for tp, s, b in shapes
            for mode in self.recompute_modes
        ]

    def tp_runs(self, tp: int) -> list[ModelRun]:
        """The runs that `tp` ranks time together (profiler/tp_layers.py): every shape and recompute mode of
        `runs()` at this tp, once per sequence-parallel setting."""
        return [
            replace(run, sequence_parallel=sequence_parallel)
            for sequence_parallel in self.sequence_parallel
            for run in self.runs()
            if run.tp == tp
        ]

    @property
    def timed_blocks(self) -> int:
        return min(self.model_blocks, self.model.num_layers)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "model": self.model.model_dump(mode="json")})

    @classmethod
    def from_json(cls, text: str) -> ComputeSweep:
        data = json.loads(text)
        lists = ("seq_lens", "micro_batch_sizes", "tps", "recompute_modes", "sequence_parallel")
        return cls(**{**data, "model": ModelSpec.model_validate(data["model"])} | {k: tuple(data[k]) for k in lists})


@dataclass(frozen=True)
class LayerPoint:
    """One layer kind at one shape and recompute mode (embedding and head: "none")."""

    layer: LayerKind
    tp: int
    micro_batch_size: int
    seq_len: int
    recompute: Recompute


@dataclass(frozen=True)
class ModelRun:
    """One timed model: its blocks at this shape and mode, and (`with_edges`) its embedding and head."""

    tp: int
    micro_batch_size: int
    seq_len: int
    recompute: Recompute
    with_edges: bool
    sequence_parallel: bool = False  # timed on tp ranks only

    def points(self) -> list[LayerPoint]:
        block = LayerPoint("block", self.tp, self.micro_batch_size, self.seq_len, self.recompute)
        if not self.with_edges:
            return [block]
        shape = (self.tp, self.micro_batch_size, self.seq_len)
        return [block, LayerPoint("embedding", *shape, "none"), LayerPoint("head", *shape, "none")]

    def describe(self) -> str:
        sp = " sp" if self.sequence_parallel else ""
        return f"{self.recompute} tp={self.tp}{sp} mbs={self.micro_batch_size} seq={self.seq_len}"


def shard_violations(model: ModelSpec, tp: int) -> list[str]:
    """Why `model` cannot be split `tp` ways as Megatron-style tensor parallelism splits it (planner.rules)."""
    sizes = {
        "num_attention_heads": model.num_attention_heads,
        "num_kv_heads": model.num_kv_heads,
        "ffn_hidden_size": model.ffn_size,
        "vocab_size": model.vocab_size,
    }
    return [f"tp={tp} does not divide {name} ({size})" for name, size in sizes.items() if size % tp]


def shard_spec(model: ModelSpec, tp: int) -> ModelSpec:
    """The one-block model that one of `tp` tensor-parallel ranks holds: heads, kv heads, MLP width and vocabulary
    divided by tp, head_dim and hidden size kept. Its layers compute exactly what a rank's shard computes."""
    reasons = shard_violations(model, tp)
    if reasons:
        raise ComputeSweepError("tps", "; ".join(reasons))
    assert model.num_kv_heads is not None  # ModelSpec fills it
    return model.model_copy(
        update={
            "num_layers": 1,
            "num_attention_heads": model.num_attention_heads // tp,
            "num_kv_heads": model.num_kv_heads // tp,
            "ffn_hidden_size": model.ffn_size // tp,
            "vocab_size": model.vocab_size // tp,
            "head_dim": model.head_size,
        }
    )


# ------------------------------------------------------------------------------------------- saved bytes


def saved_activation_bytes(forward: Callable[[], torch.Tensor], keep: Sequence[torch.Tensor] = ()) -> int:
    """Bytes of the storages `forward()` creates that are still alive after it returns, except its output's and
    those of `keep` (parameters, inputs the caller holds anyway): what it keeps for backward.

    Inputs should be created inside `forward` (e.g. `x * 1`) so that an input kept for backward counts and one
    not kept does not, as in a stack of layers where each layer's input is the previous layer's output."""
    tracker = _StorageTracker()
    with tracker:
        output = forward()
    gc.collect()
    excluded = {t.untyped_storage().data_ptr() for t in (output, *keep)}
    return sum(nbytes for ptr, nbytes in tracker.alive() if ptr not in excluded)


class _StorageTracker:
    """Records a weak reference to the storage of every tensor every op returns. torch keeps a storage's Python
    object alive exactly as long as the storage itself, so a live reference means a live allocation."""

    def __init__(self) -> None:
        self._storages: dict[int, weakref.ref[Any]] = {}
        self._mode = _dispatch_mode(self._record)

    def _record(self, output: Any) -> None:
        import torch
        from torch.utils._pytree import tree_leaves

        for tensor in tree_leaves(output):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                known = self._storages.get(storage.data_ptr())
                if known is None or known() is None:  # a new allocation (a freed address may be reused)
                    self._storages[storage.data_ptr()] = weakref.ref(storage)

    def alive(self) -> list[tuple[int, int]]:
        live = ((ptr, ref()) for ptr, ref in self._storages.items())
        return [(ptr, storage.nbytes()) for ptr, storage in live if storage is not None]

    def __enter__(self) -> _StorageTracker:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def _dispatch_mode(on_output: Callable[[Any], None]) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            output = func(*args, **(kwargs or {}))
            on_output(output)
            return output

    return _Recording()


# ------------------------------------------------------------------------------------------ the layers


@dataclass
class LayerUnderTest:
    """One layer on its own, for what does not depend on its neighbours (saved bytes, the CUDA allocator's peak):
    `forward()` builds a fresh input inside the call and returns the output (a loss for the head),
    `backward(output)` runs the backward pass from it."""

    module: nn.Module
    make_input: Callable[[], torch.Tensor]
    run: Callable[[torch.Tensor], torch.Tensor]
    output_grad: Callable[[torch.Tensor], torch.Tensor | None]
    autocast: Callable[[], AbstractContextManager[Any]] = field(default=nullcontext)

    def forward(self) -> torch.Tensor:
        with self.autocast():
            return self.run(self.make_input())

    def backward(self, output: torch.Tensor) -> None:
        output.backward(self.output_grad(output))

    def clear_grads(self) -> None:
        for param in self.module.parameters():
            param.grad = None


def build_layer(
    model: ModelSpec, point: LayerPoint, dtype: Precision, device: torch.device, params_dtype: Any = None
) -> LayerUnderTest:
    """The executor's layer for `point`, with random weights and inputs of `point`'s shape on `device`.

    Weights are fp32 unless `params_dtype` says otherwise; a 16-bit `dtype` then runs under autocast, as the
    trainer does on GPUs."""
    import torch

    spec = shard_spec(model, point.tp)
    generator = torch.Generator(device="cpu").manual_seed(0)
    params_dtype = params_dtype or torch.float32
    builder = {"block": _block, "embedding": _embedding, "head": _head}[point.layer]
    layer = builder(spec, point, device, params_dtype, generator)
    layer.autocast = autocast_for(dtype, device)
    return layer


def autocast_for(dtype: Precision, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """The trainer's mixed precision, its own function (executor/precision.py): autocast to a 16-bit dtype on CUDA,
    to fp16 on the CPU, nothing else."""
    from executor.precision import autocast_for as trainers_autocast

    return trainers_autocast(dtype, device)


def _block(spec: ModelSpec, point: LayerPoint, device: Any, dtype: Any, generator: Any) -> LayerUnderTest:
    import torch

    from executor.models import TransformerBlock
    from executor.parallel.checkpoint import recompute_block

    block = recompute_block(TransformerBlock(spec).to(device=device, dtype=dtype), point.recompute)
    block.train()
    x = _randn((point.micro_batch_size, point.seq_len, spec.hidden_size), generator, device, dtype)
    x.requires_grad_(True)
    return LayerUnderTest(block, lambda: x * 1, block, lambda out: torch.ones_like(out))


def _edge_model(spec: ModelSpec, device: Any, dtype: Any, keep: str) -> nn.Module:
    """The reference Transformer pruned to its embedding (`keep="embedding"`) or its final norm + LM head, as a
    first or last pipeline stage is (executor/models/transformer.py)."""
    from torch import nn

    from executor.models import Transformer

    model = Transformer(spec).to(device=device, dtype=dtype)
    model.layers = nn.ModuleDict()
    if keep == "embedding":
        model.norm, model.output = None, None
    else:
        model.tok_embeddings, model.pos_embeddings = None, None
    return model.train()


def _embedding(spec: ModelSpec, point: LayerPoint, device: Any, dtype: Any, generator: Any) -> LayerUnderTest:
    import torch

    model = _edge_model(spec, device, dtype, "embedding")
    tokens = _tokens(point, spec.vocab_size, generator, device)
    return LayerUnderTest(model, lambda: tokens, model, lambda out: torch.ones_like(out))


def _head(spec: ModelSpec, point: LayerPoint, device: Any, dtype: Any, generator: Any) -> LayerUnderTest:
    from executor.models import next_token_loss

    model = _edge_model(spec, device, dtype, "head")
    hidden = _randn((point.micro_batch_size, point.seq_len, spec.hidden_size), generator, device, dtype)
    hidden.requires_grad_(True)
    targets = _tokens(point, spec.vocab_size, generator, device)
    return LayerUnderTest(model, lambda: hidden * 1, lambda h: next_token_loss(model(h), targets), lambda _: None)


def _randn(shape: tuple[int, ...], generator: Any, device: Any, dtype: Any) -> torch.Tensor:
    import torch

    return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)


def _tokens(point: LayerPoint, vocab: int, generator: Any, device: Any) -> torch.Tensor:
    import torch

    shape = (point.micro_batch_size, point.seq_len)
    return torch.randint(0, vocab, shape, generator=generator).to(device)


# ------------------------------------------------------------------------------------------ measuring


@contextmanager
def no_gc_pauses() -> Iterator[None]:
    """Collect first, then keep Python's cyclic garbage collector out of the timed region: a collection landing
    in one repeat adds milliseconds to a millisecond-sized CPU layer. The trainer's own steps pay the pauses
    at about the same rate either way."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def measure_run(
    sweep: ComputeSweep, run: ModelRun, samples: LayerSamples, device: torch.device
) -> list[LayerMeasurement]:
    """The run's layer measurements: times from `samples` (taken inside a model, profiler/layer_timing.py); each
    layer's saved bytes and, on CUDA, its allocator peak from the layer alone (they do not depend on its
    neighbours)."""
    measurements = []
    for point in run.points():
        layer = build_layer(sweep.model, point, sweep.dtype, device)
        saved = saved_activation_bytes(layer.forward, keep=list(layer.module.parameters()))
        measurements.append(
            LayerMeasurement(
                layer=point.layer,
                tp=point.tp,
                micro_batch_size=point.micro_batch_size,
                seq_len=point.seq_len,
                dtype=sweep.dtype,
                recompute=point.recompute,
                forward=stats(samples.forward[point.layer]),
                backward=stats(samples.backward[point.layer]),
                saved_bytes=saved,
                peak_allocated_bytes=_peak_allocated_bytes(layer, device),
            )
        )
    return measurements


@dataclass(frozen=True)
class ModelUnderTest:
    """The executor's Transformer as a run times it, with one micro-batch of tokens and targets."""

    model: nn.Module
    tokens: torch.Tensor
    targets: torch.Tensor


def model_for_run(
    sweep: ComputeSweep, run: ModelRun, device: torch.device, tp_mesh: DeviceMesh | None = None
) -> ModelUnderTest:
    """The executor's Transformer with `sweep.timed_blocks` blocks, prepared for the run's recompute mode. Without
    `tp_mesh` the blocks are those one of `run.tp` ranks holds, on this device alone; with it (a mesh of `run.tp`
    ranks, every one calling this), the whole model tensor-parallelised by the executor
    (executor/parallel/tensor.py), collectives included. The same tokens on every rank."""
    import torch

    from executor.models import build_model
    from executor.parallel.checkpoint import apply_recompute
    from executor.parallel.tensor import apply_tensor_parallel

    whole = sweep.model if tp_mesh is not None else shard_spec(sweep.model, run.tp)
    spec = whole.model_copy(update={"num_layers": sweep.timed_blocks})
    model = build_model(spec, device=device, seed=0)
    if tp_mesh is not None:
        model = apply_tensor_parallel(model, tp_mesh, run.sequence_parallel)
    model = apply_recompute(model, run.recompute).train()
    generator = torch.Generator(device="cpu").manual_seed(0)
    point = LayerPoint("head", run.tp, run.micro_batch_size, run.seq_len, "none")
    tokens, targets = (_tokens(point, spec.vocab_size, generator, device) for _ in range(2))
    return ModelUnderTest(model, tokens, targets)


def time_in_model(
    sweep: ComputeSweep, run: ModelRun, device: torch.device, tp_mesh: DeviceMesh | None = None
) -> LayerSamples:
    """The run's model (`model_for_run`) timed layer by layer over `sweep.repeats` forward + backward passes."""
    from executor.models import next_token_loss

    under_test = model_for_run(sweep, run, device, tp_mesh)
    with no_gc_pauses():
        return time_layers(
            under_test.model, under_test.tokens, under_test.targets, next_token_loss, warmup=sweep.warmup,
            repeats=sweep.repeats, device=device, autocast=autocast_for(sweep.dtype, device),
        )  # fmt: skip


def _peak_allocated_bytes(layer: LayerUnderTest, device: torch.device) -> int | None:
    """CUDA only: the allocator's peak over one forward + backward, above what was allocated before it."""
    import torch

    if device.type != "cuda":
        return None
    layer.clear_grads()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    layer.backward(layer.forward())
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_optimizer(
    sweep: ComputeSweep, device: torch.device, shard_mesh: DeviceMesh | None = None
) -> OptimizerMeasurement:
    """Clip + step + zero_grad as the trainer runs them (executor/apply.py `clip_grad_norm`; AdamW, or SGD with
    momentum 0.9; weight decay 0.1) over the parameters of the model the layers are timed in: the real mix of
    tensor sizes, whose per-tensor overhead a synthetic set would miss. Warm-ups create the optimizer state.

    With `shard_mesh` (every rank of it calling this), the model is first sharded over it by FSDP2 as the executor
    shards it for ZeRO-3 (executor/parallel/data.py): the parameters are then DTensor shards, whose every optimizer
    op goes through DTensor's dispatch, and the clip reduces the norm over the mesh, as in a plan whose parameters
    are DTensors (FSDP2, tensor parallelism). `num_params` counts this rank's shard; the result is `sharded`."""
    import torch

    from executor.apply import clip_grad_norm
    from executor.models import build_model
    from executor.parallel.data import apply_data_parallel

    spec = shard_spec(sweep.model, sweep.tps[0]).model_copy(update={"num_layers": sweep.timed_blocks})
    model = build_model(spec, device=device, seed=0)
    if shard_mesh is not None:
        model = apply_data_parallel(model, shard_mesh, zero_stage=3, pure_dp=True)
    params = list(model.parameters())
    if sweep.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=0.1)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)

    def fill_grads() -> None:
        for param in params:
            param.grad = torch.ones_like(param)

    def step() -> None:
        clip_grad_norm(params, _MAX_GRAD_NORM, device)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with no_gc_pauses():
        samples = time_repeats(step, warmup=sweep.warmup, repeats=sweep.repeats, device=device, before_each=fill_grads)
    num_params = sum(_local(param).numel() for param in params)
    return OptimizerMeasurement(
        optimizer=sweep.optimizer, num_params=num_params, time=stats(samples), sharded=shard_mesh is not None
    )


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: a DTensor's local shard, a plain tensor itself."""
    to_local = getattr(param, "to_local", None)
    return to_local() if to_local is not None else param


Progress = Callable[[int, int, str], None]  # (done, total, what was just measured)


def profile_compute(
    sweep: ComputeSweep, on_progress: Progress | None = None, after_pass: Callable[[int], None] | None = None
) -> HardwareProfile:
    """Measure every point of `sweep` and the optimizer on this machine; a HardwareProfile of the results.
    `after_pass(i)` runs after pass i: other measurements interleaved with the passes see the machine at the
    same times as the profile does (a shared machine's speed drifts over minutes)."""
    import torch

    device = _open_device(sweep)
    runs = sweep.runs()
    total = sweep.passes * len(runs) + 1
    samples = {run: LayerSamples() for run in runs}
    for pass_index in range(sweep.passes):
        for done, run in enumerate(runs, start=pass_index * len(runs) + 1):
            samples[run].extend(time_in_model(sweep, run, device))
            if on_progress is not None:
                on_progress(done, total, run.describe())
        if after_pass is not None:
            after_pass(pass_index)
    measured = [measure_run(sweep, run, samples[run], device) for run in runs]
    layers = sorted((m for run in measured for m in run), key=_profile_order)
    optimizer = measure_optimizer(sweep, device)
    if on_progress is not None:
        on_progress(total, total, f"{sweep.optimizer} step")
    return HardwareProfile(
        device_kind="cuda" if device.type == "cuda" else "cpu",
        device_name=device_name(device),
        hosts=[socket.gethostname()],
        created=utc_now(),
        settings=_settings(sweep) | {"threads": torch.get_num_threads()},
        model=sweep.model,
        layers=layers,
        optimizer=[optimizer],
        **software_versions(nccl=False),
    )


def _profile_order(m: LayerMeasurement) -> tuple[int, int, int, int, int]:
    """Blocks first, then embedding, then head; within a kind by tp, seq_len, micro-batch, recompute mode."""
    kinds = ("block", "embedding", "head")
    mode = RECOMPUTE_MODES.index(m.recompute)
    return (kinds.index(m.layer), m.tp, m.seq_len, m.micro_batch_size, mode)


def _open_device(sweep: ComputeSweep) -> torch.device:
    """The device to measure on, after refusing a sweep that cannot run here (no GPU for cuda, bad settings)."""
    import torch

    problems = sweep.violations()
    if problems:
        name, reason = problems[0]
        raise ComputeSweepError(name, "; ".join(f"{n}: {r}" for n, r in problems))
    if sweep.device == "cuda" and not torch.cuda.is_available():
        raise ComputeSweepError("device", "--device cuda was asked, but torch sees no CUDA GPU on this machine")
    if sweep.threads is not None:
        torch.set_num_threads(sweep.threads)
    return torch.device(sweep.device)


def _settings(sweep: ComputeSweep) -> dict[str, Any]:
    """The sweep's settings as the profile records them (the model is recorded on its own)."""
    settings = asdict(sweep)
    settings.pop("model")
    settings |= {"kind": "compute", "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    return json.loads(json.dumps(settings))  # tuples as lists: as the profile reads back from JSON
