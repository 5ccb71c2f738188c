"""A transformer block as a list of operations, each with its FLOPs, the bytes it saves for backward and the
bytes of memory traffic it causes, for one micro-batch on one GPU.

This is the per-op derivation of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", sec. 4.1 and table 2), generalised so that grouped-query attention (kv_size < q_size),
SwiGLU MLPs, fused (flash) attention and dropout-free models come out right instead of reusing the GPT
constant 34 + 5as/h. With GELU, MHA, dropout, 16-bit activations and 1-byte dropout masks the sums reproduce
the paper exactly: 34 sbh + 5 a s^2 b bytes per layer (tests/unit/test_ops.py).

Every saved tensor is tagged with how parallelism shrinks it:
- "tp": split by tensor parallelism always (inside the column/row-parallel region);
- "sp": the LayerNorm/dropout region that Megatron replicates on each TP rank unless sequence parallelism
  splits it too (Korthikanti sec. 4.2.2);
and every op with the recompute mode that drops its saved tensors ("core" ops = the attention core that
selective recompute discards, sec. 5).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from planner.cost import params
from planner.specs import ModelSpec, ParallelPlan, TrainingSpec

Region = Literal["tp", "sp"]

ACTIVATION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# (forward, backward) kernel launches per op, as Megatron-LM's fused implementation issues them: a linear layer
# is one GEMM forward and two backward (input and weight gradients; biases fused into the neighbouring element-
# wise kernels: megatron/core/fusions fused_bias_gelu, fused_bias_dropout); a fused LayerNorm / RMSNorm is one
# kernel forward and two backward (input gradient, then the weight and bias gradients, apex/TE); each fused
# element-wise op one each way; FlashAttention-2 one forward and three backward (dot(dO, O), the main kernel,
# dQ's conversion: Dao 2023, flash_attn_interface.py); eager attention's batched matmuls one forward and two
# backward, its fused scale-mask-softmax and dropout one each way, plus the copy that makes its output contiguous.
# RoPE's and cross entropy's launches depend on the stack's implementation (`Rotary`, `CrossEntropy`). Counts
# enter only through the host's time per launch, which planner/calibration.py fits with them.
KERNELS = {
    "linear": (1, 2),
    "norm": (1, 2),
    "eager_rms_norm": (7, 12),  # `_eager_rms_norm_traffic`'s ops, with the eps add and rsqrt
    "elementwise": (1, 1),
    "flash_attention": (1, 3),
    "batched_matmul": (1, 2),
}


@dataclass(frozen=True)
class Rotary:
    """How a stack's model code applies RoPE to q and k: `passes` reads and writes of q and k in the dtype it
    computes in, fp32 or the activations' (16-bit q and k are upcast first and cast back after: a read and a write
    each way more), and its kernel launches for q and k together, (forward, backward). Its backward mirrors its
    forward (the gradient passes through the same products)."""

    passes: int
    fp32: bool
    kernels: tuple[int, int]

    def bytes_per_element(self, elem: int) -> float:
        """Bytes moved per element of q and k by one pass (forward or backward) at `elem` bytes per activation."""
        if not self.fp32:
            return self.passes * elem
        casts = 2 * (elem + 4) if elem < 4 else 0
        return self.passes * 4 + casts


# Rotate-half, (x * cos + rotate_half(x) * sin): x * cos, the negated half, the concatenation, x * sin and the sum
# read and write 10 tensors of q's and k's size (the half-size negation counting as one). HF transformers' Llama
# (`apply_rotary_pos_emb`) and Megatron-DeepSpeed run it in the activation dtype; paraplan's executor in fp32
# (executor/models/layers.py `apply_rotary`: 52 bytes an element in bf16). Forward about 5 kernels a tensor
# (7 with the casts), backward about 7 (8).
ROTATE_HALF = Rotary(passes=10, fp32=False, kernels=(10, 14))
ROTATE_HALF_FP32 = Rotary(passes=10, fp32=True, kernels=(14, 16))
# torchtitan's `apply_rotary_emb`: view q and k as complex in fp32 and multiply by freqs_cis, one product (read
# and write), then `type_as` (20 bytes an element in bf16); 3 kernels a tensor each way.
COMPLEX_FP32 = Rotary(passes=2, fp32=True, kernels=(6, 6))
# Megatron-Core's fused RoPE (on by default: megatron/training/arguments.py `--no-rope-fusion` clears
# `apply_rope_fusion`; TransformerEngine's fused_apply_rotary_pos_emb): one read and one write, a kernel a tensor.
FUSED_ROTARY = Rotary(passes=2, fp32=False, kernels=(2, 2))


@dataclass(frozen=True)
class CrossEntropy:
    """How a stack's loss computes cross entropy over the logits: the bytes it moves per logit element over the fp32
    logits in forward and in backward, its kernel launches (forward, backward), and what it holds. In 16-bit
    training the logits are upcast first (`logits.float()`: read 2, write 4) and their gradient cast back (read 4,
    write 2). Every stack keeps one fp32 tensor of the logits' size for backward (log-probabilities or
    probabilities, `SAVED_LOGIT_BYTES`); at its peak it holds `peak_fp32_tensors` of them, the kept one included,
    and, where `peak_holds_16bit_logits`, the 16-bit logits beside them."""

    forward_bytes: int
    backward_bytes: int
    kernels: tuple[int, int]
    peak_fp32_tensors: int
    peak_holds_16bit_logits: bool

    def traffic(self, elem: int) -> tuple[int, int]:
        """Bytes per logit element, (forward, backward), with the casts, at `elem` bytes per activation."""
        casts = elem + 4 if elem < 4 else 0
        return casts + self.forward_bytes, casts + self.backward_bytes

    def working_bytes(self, elem: int) -> int:
        """Bytes per logit element the loss holds at its peak beyond what it keeps for backward."""
        sixteen_bit = elem if self.peak_holds_16bit_logits and elem < 4 else 0
        return 4 * self.peak_fp32_tensors + sixteen_bit - SAVED_LOGIT_BYTES


# The fp32 log-probabilities (F.cross_entropy's log_softmax output) or probabilities (Megatron's softmax) a loss
# keeps for backward, bytes per logit element. Measured on an H200 (tests/data/h200-llama3.2-1b, the profiler's
# head at 1-8 sequences of 1,024 and 2,048 tokens): 4.0 bytes a logit beside a constant 525 MB (the LM head
# weight's cast that autocast caches), and 8.0 more at the peak.
SAVED_LOGIT_BYTES = 4

# Megatron-LM's vocab-parallel cross entropy (megatron/core/tensor_parallel/cross_entropy.py), one whole-tensor pass
# per step over the fp32 logits: the max (read 4), the max subtracted (read and write), exp (read and write), the
# sum (read) and the division into the softmax it keeps (read and write): 32 bytes; backward scales the kept softmax
# in place (read and write): 8. With the casts, the target mask, the gather of the targets' logits and the log:
# about 8 kernels forward and 4 backward. Megatron-Core works in place on the fp32 copy ("In-place subtraction
# reduces memory pressure"), so its peak is that copy beside the 16-bit logits.
VOCAB_PARALLEL_CROSS_ENTROPY = CrossEntropy(
    forward_bytes=32, backward_bytes=8, kernels=(8, 4), peak_fp32_tensors=1, peak_holds_16bit_logits=True
)
# Megatron-DeepSpeed's copy of it (megatron/core/tensor_parallel/cross_entropy.py there) subtracts the max into a
# new tensor: two fp32 tensors and the 16-bit logits at its peak.
VOCAB_PARALLEL_CROSS_ENTROPY_COPY = replace(VOCAB_PARALLEL_CROSS_ENTROPY, peak_fp32_tensors=2)
# torch.nn.functional.cross_entropy over fp32 logits (paraplan's executor: executor/models/transformer.py; also
# torchtitan and HF transformers): log_softmax over a row longer than shared memory holds reads it three times (the
# max, the sum of exponentials, the output) and writes it once (aten/src/ATen/native/cuda/SoftMax.cu
# `cunn_SoftMaxForwardGmem`): 16 bytes; nll_loss reads one element a row. Backward: nll_loss's gradient is a
# zero-filled tensor (write 4) with each row's target set, and log_softmax's backward reads it for its sum, then
# reads it again with the kept output and writes the logits' gradient (`cunn_SoftMaxBackward`): 20 bytes. Kernels:
# the cast, log_softmax and nll_loss forward; the fill, nll_loss's, log_softmax's and the cast backward. Its peak is
# in log_softmax's backward: the kept log-probabilities, nll_loss's gradient and the logits' gradient, all fp32
# (the 16-bit logits are freed once the caller's loss returns: the executor's `loss_fn(model(x), y)`, torchtitan's
# `del pred`).
TORCH_CROSS_ENTROPY = CrossEntropy(
    forward_bytes=16, backward_bytes=20, kernels=(3, 4), peak_fp32_tensors=3, peak_holds_16bit_logits=False
)


@dataclass(frozen=True)
class Gemm:
    """The shape of an op's matrix products: `batch` products of a [rows, inner] by an [inner, cols] matrix
    (numbers, or arrays over micro-batch sizes). A linear layer's rows are its tokens; the attention core's
    batched products run one per sequence and head. planner/cost/compute.py tiles the outputs over the SMs."""

    rows: Any
    cols: Any
    inner: Any
    batch: Any = 1


@dataclass(frozen=True)
class OpCost:
    """One forward operation of a block, per micro-batch, per GPU (after tp / sp / cp splitting)."""

    name: str
    matmul_flops: float  # forward multiply-adds x 2
    saved_bytes: float  # tensors kept for backward
    traffic_bytes: float  # bytes moved through HBM by element-wise work (matmul I/O excluded)
    attention_core: bool = False  # discarded and recomputed by selective recompute
    flash: bool = False  # a fused attention kernel (its FLOPs run at flash-attention speed)
    # Kernels the op launches in forward and in backward (`KERNELS`): each costs the host a launch, which the GPU
    # waits for when the kernel itself is shorter (planner/cost/compute.py `pass_s`).
    kernels: int = 1
    backward_kernels: int = 1
    # Bytes a matmul reads and writes (its operands and result): the memory-bound side of its roofline.
    matmul_io_bytes: float = 0.0
    # Bytes of the op's result, where an op-level recompute policy may keep it (`op_level_saved_bytes`).
    output_bytes: float = 0.0
    # The shape of its matrix products (None: it has none, or the shape is not known): their wave quantization.
    gemm: Gemm | None = None
    # Bytes its backward moves through HBM, where that is not `BACKWARD_TRAFFIC_FACTOR` x the forward's
    # (planner/cost/compute.py): None for an element-wise op with one input and one output.
    backward_traffic_bytes: float | None = None
    # A linear op that stands for several matmuls of the model's code (torchtitan's wq, wk, wv; w1, w3): their
    # output widths, in the order the code calls them; empty for one. An op-level recompute policy counts them.
    mm_widths: tuple[float, ...] = ()

    @property
    def linear(self) -> bool:
        """A linear layer's plain matrix product (aten.mm / addmm), not a batched one."""
        return not self.flash and self.gemm is not None and self.gemm.batch == 1


@dataclass(frozen=True)
class Shape:
    """The sizes one GPU sees for one micro-batch: local tokens, full key length, and element sizes."""

    tokens: Any  # s/cp * b, tokens of this GPU's sequence shard (a float, or an array over micro-batch sizes)
    seq: float  # s/cp, positions of this GPU's sequence shard
    key_len: float  # keys each query attends to (the full sequence; ring attention visits all of it)
    heads: float  # attention heads on this GPU (a / tp)
    tp: int
    sp_div: int  # tp when sequence parallel, else 1
    elem: int  # bytes per activation element
    mask: int  # bytes per dropout-mask element
    eager_rms_norm: bool = False  # RMSNorm runs as separate kernels (no fused kernel on this device)
    ep: int = 1  # expert-parallel ranks a MoE layer's experts are split over (each rank holds num_experts / ep)
    rotary: Rotary = ROTATE_HALF_FP32  # how the stack's model code applies RoPE (Runtime.rotary)
    # Bytes per weight that autocast moves casting fp32 parameters to 16 bits in forward, and their 16-bit
    # gradients back to fp32 in backward (Runtime.weight_cast_bytes); 0 where weights are 16-bit already.
    weight_cast_bytes: float = 0.0
    cross_entropy: CrossEntropy = TORCH_CROSS_ENTROPY  # how the stack's loss runs (Runtime.cross_entropy)

    @classmethod
    def of(
        cls,
        model: ModelSpec,
        training: TrainingSpec,
        plan: ParallelPlan,
        micro_batch_sizes: Any = None,
        cpu: bool = False,
        rotary: Rotary = ROTATE_HALF_FP32,
        weight_cast_bytes: float = 0.0,
        fused_rms_norm: bool = True,
        cross_entropy: CrossEntropy = TORCH_CROSS_ENTROPY,
    ) -> Shape:
        """`micro_batch_sizes` (a numpy array) replaces the plan's: every size below then broadcasts over it.
        `rotary`, `weight_cast_bytes`, `fused_rms_norm` and `cross_entropy` are the stack's (Runtime)."""
        elem = ACTIVATION_BYTES[training.precision]
        micro_batch = plan.micro_batch_size if micro_batch_sizes is None else micro_batch_sizes
        return cls(
            tokens=training.seq_len / plan.cp * micro_batch,
            seq=training.seq_len / plan.cp,
            key_len=training.seq_len,
            heads=model.num_attention_heads / plan.tp,
            tp=plan.tp,
            sp_div=plan.tp if plan.sequence_parallel else 1,
            elem=elem,
            # CUDA's fused dropout keeps a 1-byte bool mask; CPU dropout is bernoulli * x and keeps the mask
            # in the activation dtype (measured: ../shared/notes/torch-distributed-on-cpu.md, 8b).
            mask=elem if cpu else 1,
            # torch has no fused RMSNorm kernel on CPU (aten::_fused_rms_norm is CompositeImplicitAutograd
            # there, torch 2.13); CUDA builds since torch 2.8 run the fused one, where the stack calls it.
            eager_rms_norm=cpu or not fused_rms_norm,
            ep=plan.ep,
            rotary=rotary,
            weight_cast_bytes=weight_cast_bytes,
            cross_entropy=cross_entropy,
        )

    def width(self, features: float, region: Region) -> float:
        """Elements of a [tokens, features] activation on this GPU."""
        return self.tokens * features / (self.tp if region == "tp" else self.sp_div)


# Per-token statistics a norm keeps for backward, fp32: LayerNorm its mean and 1/std, RMSNorm 1/rms
# (torch's native_layer_norm and _fused_rms_norm outputs; Apex/Megatron's fused kernels keep the same).
NORM_STATS_BYTES = {"layernorm": 8, "rmsnorm": 4}


def _norm(name: str, model: ModelSpec, shape: Shape) -> OpCost:
    """LayerNorm / RMSNorm saves its input (Korthikanti: 2sbh each) and its per-token statistics; reads x,
    writes y. Without a fused kernel, RMSNorm runs as torch's decomposition, which upcasts x to fp32, and whose
    products keep the fp32 x and the fp32 normalised x (measured: tests/validation/test_saved_activations.py), and
    which passes over x many times (`_eager_rms_norm_traffic`)."""
    elems = shape.width(model.hidden_size, "sp")
    stats = NORM_STATS_BYTES[model.norm] * elems / model.hidden_size
    if model.norm == "rmsnorm" and shape.eager_rms_norm:
        forward, backward = _eager_rms_norm_traffic(shape.elem)
        return OpCost(name, 0.0, 2 * 4 * elems + stats, forward * elems, backward_traffic_bytes=backward * elems,
                      **_launches("eager_rms_norm"))  # fmt: skip
    return OpCost(name, 0.0, shape.elem * elems + stats, 2 * shape.elem * elems, **_launches("norm"))


def _eager_rms_norm_traffic(elem: int) -> tuple[float, float]:
    """Bytes per element of x that ATen's composite `rms_norm` moves, forward and backward: x.float(), pow(2),
    mean, x * rsqrt(.), the weight's product (in fp32) and the cast back forward; backward their gradients, the
    weight's and rsqrt's reduced over the row, and x's two paths added. 40 and 88 bytes in bf16, where a fused
    kernel moves 4 and 6 (HF transformers' LlamaRMSNorm, weighting after the cast, moves a little less)."""
    casts = elem + 4 if elem < 4 else 0  # the upcast and the cast back (read one width, write the other)
    forward = casts + 8 + 4 + 8 + 8 + casts
    backward = casts + 24 + 24 + 4 + 12 + 12 + casts
    return forward, backward


def _rotary(model: ModelSpec, shape: Shape) -> list[OpCost]:
    """RoPE (Su et al. 2021) rotates q and k by cos/sin tables of [seq, head_dim] in fp32, which its products
    keep for backward; the reference model (executor/models/layers.py) computes them in every block, so every
    block keeps its own copy, whatever the micro-batch size. Its FLOPs are element-wise and negligible; its
    traffic is not: `shape.rotary`'s bytes per element of q and k each way (an unfused rotation passes over them
    several times: `Rotary`), its backward the mirror of its forward."""
    if model.position_embedding != "rope":
        return []
    rotated = shape.tokens * (model.q_size + model.kv_size) / shape.tp
    traffic = shape.rotary.bytes_per_element(shape.elem) * rotated
    saved = 2 * 4 * shape.seq * model.head_size
    forward, backward = shape.rotary.kernels
    kernels = {"kernels": forward, "backward_kernels": backward}
    return [OpCost("rotary", 0.0, saved, traffic, backward_traffic_bytes=traffic, **kernels)]


def _weight_casts(model: ModelSpec, shape: Shape, layer_ops: list[OpCost]) -> list[OpCost]:
    """torch.autocast over fp32 parameters: every forward (and recompute) casts each linear layer's weights to 16
    bits (aten::_to_copy: read 4, write 2 bytes a weight), and backward casts their 16-bit gradients back to fp32
    for the fp32 parameters (ToCopyBackward0: read 2, write 4); a kernel each way per linear layer of `layer_ops`.
    Norm weights are not cast (autocast runs norms in fp32); a mixture of experts casts the experts its rank holds
    (num_experts / ep)."""
    if not shape.weight_cast_bytes:
        return []
    remote_experts = params.experts_params(model).per_gpu(shape.tp) * (1 - 1 / shape.ep)
    weights = params.block_params(model).per_gpu(shape.tp) - 2 * params.norm_params(model) - remote_experts
    traffic = shape.weight_cast_bytes * weights
    linears = sum(1 for op in layer_ops if op.linear)
    return [OpCost("autocast_casts", 0.0, 0.0, traffic, kernels=linears, backward_kernels=linears,
                   backward_traffic_bytes=traffic)]  # fmt: skip


def _linear(
    name: str,
    shape: Shape,
    in_features: float,
    out_features: float,
    input_region: Region,
    mm_widths: tuple[float, ...] = (),
) -> OpCost:
    """A (column- or row-parallel) linear layer saves its input; 2 * in * out FLOPs per token over tp. Its GEMM
    reads the input and the weight shard and writes the output. `mm_widths`: the matmuls it stands for
    (OpCost.mm_widths)."""
    flops = 2 * shape.tokens * in_features * out_features / shape.tp
    local_in = in_features / shape.tp if input_region == "tp" else in_features
    local_out = out_features / shape.tp if input_region != "tp" else out_features
    io = shape.elem * (shape.tokens * (local_in + local_out) + local_in * local_out)
    saved = shape.elem * shape.width(in_features, input_region)
    output = shape.elem * shape.tokens * local_out
    gemm = Gemm(rows=shape.tokens, cols=local_out, inner=local_in)
    return OpCost(name, flops, saved, 0.0, matmul_io_bytes=io, output_bytes=output, gemm=gemm, mm_widths=mm_widths,
                  **_launches("linear"))  # fmt: skip


def _dropout_add(name: str, model: ModelSpec, shape: Shape) -> OpCost:
    """Bias-dropout-add (fused in Megatron): reads x and the residual, writes y (and the mask if p > 0)."""
    elems = shape.width(model.hidden_size, "sp")
    mask = shape.mask * elems if model.dropout > 0 else 0.0
    return OpCost(name, 0.0, mask, 3 * shape.elem * elems + mask)


def _launches(kind: str) -> dict[str, int]:
    forward, backward = KERNELS[kind]
    return {"kernels": forward, "backward_kernels": backward}


def attention_ops(model: ModelSpec, training: TrainingSpec, shape: Shape) -> list[OpCost]:
    """Norm, QKV projection, the attention core, output projection, dropout + residual."""
    q, kv = model.q_size, model.kv_size
    qkv = _linear("qkv_proj", shape, model.hidden_size, q + 2 * kv, "sp", mm_widths=(q, kv, kv))
    ops = [_norm("attn_norm", model, shape), qkv]
    ops += _rotary(model, shape)
    ops += _flash_core(model, shape) if training.attention_kernel == "flash" else _eager_core(model, shape)
    ops += [
        _linear("out_proj", shape, q, model.hidden_size, "tp"),
        _dropout_add("attn_dropout", model, shape),
    ]
    return ops


def _core_flops(model: ModelSpec, shape: Shape) -> float:
    """QK^T and softmax(.)V: 2 * 2 * tokens * key_len * q_size / tp (Narayanan et al. 2021, eq. 3's s/6h term).

    The full s x s product is counted, causal mask or not, as Megatron-LM's and the MFU convention do."""
    return 4 * shape.tokens * shape.key_len * model.q_size / shape.tp


def _flash_core(model: ModelSpec, shape: Shape) -> list[OpCost]:
    """Fused attention (Dao et al. 2022) keeps Q, K, V, the output and a per-row logsumexp, never the s x s
    scores. Q/K/V are the saved inputs here; the output is saved as the out_proj input."""
    qkv_saved = shape.elem * shape.width(model.q_size + 2 * model.kv_size, "tp")
    logsumexp = 4 * shape.tokens * shape.heads  # fp32, one per query row and head
    return [
        OpCost("qkv_saved", 0.0, qkv_saved, 0.0, kernels=0, backward_kernels=0),
        OpCost(
            "flash_attention",
            _core_flops(model, shape),
            logsumexp,
            0.0,
            attention_core=True,
            flash=True,
            output_bytes=shape.elem * shape.width(model.q_size, "tp") + logsumexp,
            # One product per sequence and head, its queries against every key (compute.py `flash_occupancy`).
            gemm=Gemm(
                rows=shape.seq, cols=model.head_size, inner=shape.key_len, batch=shape.tokens / shape.seq * shape.heads
            ),
            **_launches("flash_attention"),
        ),
    ]


def _eager_core(model: ModelSpec, shape: Shape) -> list[OpCost]:
    """softmax(QK^T / sqrt(d)) V as separate kernels (Korthikanti sec. 4.1): QK^T saves Q and K (4sbh under
    MHA), the fused scale-mask-softmax saves its output (2as^2b), dropout its mask (as^2b) and output
    (2as^2b, the input of the AV product), and AV saves V (2sbh)."""
    scores = shape.heads * shape.tokens * shape.key_len
    has_dropout = model.dropout > 0
    # Q, K and V are the inputs the recomputed core starts from, so selective recompute keeps them.
    qkv_saved = shape.elem * shape.width(model.q_size + 2 * model.kv_size, "tp")
    softmax_out = shape.elem * scores
    dropout_saved = (shape.mask + shape.elem) * scores if has_dropout else 0.0
    dropout_traffic = (2 * shape.elem + shape.mask) * scores if has_dropout else 0.0
    # QK^T reads Q and K and writes the scores; softmax(.)V reads the probabilities and V and writes the context:
    # with a head size d the product does 2d FLOPs per score element it writes or reads, below the A100's ridge
    # point (~120 FLOP/byte at 2 bytes), so these matmuls are bound by the s x s traffic, not their FLOPs.
    scores_io = shape.elem * (shape.width(model.q_size + model.kv_size, "tp") + scores)
    values_io = shape.elem * (scores + shape.width(model.kv_size + model.q_size, "tp"))
    sequences = shape.tokens / shape.seq
    per_head = sequences * shape.heads
    head = model.head_size
    return [
        OpCost("qkv_saved", 0.0, qkv_saved, 0.0, kernels=0, backward_kernels=0),
        OpCost(
            "scores",
            _core_flops(model, shape) / 2,
            0.0,
            0.0,
            attention_core=True,
            matmul_io_bytes=scores_io,
            gemm=Gemm(rows=shape.seq, cols=shape.key_len, inner=head, batch=per_head),
            **_launches("batched_matmul"),
        ),
        OpCost("softmax", 0.0, softmax_out, 2 * shape.elem * scores, attention_core=True),
        OpCost("attn_prob_dropout", 0.0, dropout_saved, dropout_traffic, attention_core=True),
        # One kernel more each way: the copy that makes the context contiguous for out_proj.
        OpCost(
            "attn_values",
            _core_flops(model, shape) / 2,
            0.0,
            0.0,
            attention_core=True,
            matmul_io_bytes=values_io,
            gemm=Gemm(rows=shape.seq, cols=head, inner=shape.key_len, batch=per_head),
            kernels=KERNELS["batched_matmul"][0] + 1,
            backward_kernels=KERNELS["batched_matmul"][1] + 1,
        ),
    ]


def mlp_ops(model: ModelSpec, shape: Shape) -> list[OpCost]:
    """Norm, MLP, dropout + residual. A MoE token runs `experts_per_token` expert MLPs (Fedus et al. 2021),
    so its MLP FLOPs and saved activations scale by that factor, after the router (`_router`)."""
    h, f, k = model.hidden_size, model.ffn_size, model.experts_per_token
    ff = shape.width(f, "tp")
    if model.mlp == "swiglu":
        # silu(x W1) * (x W3) in eager PyTorch: silu saves its input, the product saves both operands
        # (Shazeer 2020 for the structure; saved set measured in ../shared/notes, 8b: 4 tensors of size f).
        up = _linear("fc1_fc3", shape, h, 2 * f, "sp", mm_widths=(f, f))
        act = OpCost("swiglu", 0.0, 3 * shape.elem * ff, 5 * shape.elem * ff, kernels=2, backward_kernels=3)
    else:
        # Megatron's fused bias-GELU saves its input (Korthikanti: 8sbh for f = 4h).
        up = _linear("fc1", shape, h, f, "sp")
        act = OpCost("gelu", 0.0, shape.elem * ff, 2 * shape.elem * ff)
    down = _linear("fc2", shape, f, h, "tp")
    expert_ops = [_scaled(op, k) for op in (up, act, down)]
    router = [_router(model, shape)] if model.num_experts > 1 else []
    return [_norm("mlp_norm", model, shape), *router, *expert_ops, _dropout_add("mlp_dropout", model, shape)]


def _router(model: ModelSpec, shape: Shape) -> OpCost:
    """The MoE router: an h x E linear layer over every token this rank routes, 2 h E FLOPs a token (Fedus et al.
    2021, sec. 2.1; Lepikhin et al. 2020, GShard, sec. 2.2), replicated on the tp ranks, each routing its own
    sequence-parallel shard (Megatron-Core's `TopKRouter`). It saves the gate probabilities ([tokens, E]) for
    its backward; its input is the norm's output, which the first expert matrix saves already."""
    rows, h, experts = shape.tokens / shape.sp_div, model.hidden_size, model.num_experts
    output = shape.elem * rows * experts
    io = shape.elem * (rows * (h + experts) + h * experts)
    gemm = Gemm(rows=rows, cols=experts, inner=h)
    forward, backward = KERNELS["linear"]
    return OpCost(
        "router", 2 * rows * h * experts, output, 0.0, matmul_io_bytes=io, output_bytes=output, gemm=gemm,
        kernels=forward, backward_kernels=backward,
    )  # fmt: skip


def _scaled(op: OpCost, factor: int) -> OpCost:
    if factor == 1:
        return op
    # The k experts' products run over k times the tokens in all (grouped: each expert takes its routed rows).
    gemm = None if op.gemm is None else replace(op.gemm, rows=op.gemm.rows * factor)
    return replace(
        op,
        gemm=gemm,
        matmul_flops=op.matmul_flops * factor,
        saved_bytes=op.saved_bytes * factor,
        traffic_bytes=op.traffic_bytes * factor,
        matmul_io_bytes=op.matmul_io_bytes * factor,
    )


def block_ops(model: ModelSpec, training: TrainingSpec, shape: Shape) -> list[OpCost]:
    layer_ops = attention_ops(model, training, shape) + mlp_ops(model, shape)
    return _weight_casts(model, shape, layer_ops) + layer_ops


def embedding_ops(model: ModelSpec, shape: Shape) -> list[OpCost]:
    """Token (+ position) lookup and embedding dropout; the lookup saves only token ids."""
    elems = shape.width(model.hidden_size, "sp")
    mask = shape.mask * elems if model.dropout > 0 else 0.0
    # Lookup, position add and dropout forward; the dense embedding backward's sort, scatter and sum.
    return [OpCost("embedding", 0.0, mask, 3 * shape.elem * elems + mask, kernels=3, backward_kernels=3)]


def head_ops(model: ModelSpec, shape: Shape) -> list[OpCost]:
    """Final norm, the vocab-parallel LM head and cross-entropy. The loss upcasts the logits to fp32 and keeps
    fp32 log-probabilities (or probabilities) for backward (`SAVED_LOGIT_BYTES`); its passes over the logits are the
    stack's (`shape.cross_entropy`), and what it holds beyond them at its peak is `head_working_bytes`."""
    logits = _logits(model, shape)
    forward, backward = shape.cross_entropy.traffic(shape.elem)
    forward_kernels, backward_kernels = shape.cross_entropy.kernels
    return [
        _norm("final_norm", model, shape),
        _linear("lm_head", shape, model.hidden_size, model.vocab_size, "sp"),
        OpCost(
            "cross_entropy",
            0.0,
            SAVED_LOGIT_BYTES * logits,
            forward * logits,
            kernels=forward_kernels,
            backward_kernels=backward_kernels,
            backward_traffic_bytes=backward * logits,
        ),
    ]


def head_working_bytes(model: ModelSpec, shape: Shape) -> float:
    """Bytes the loss holds at its peak beyond what the head keeps for backward (`CrossEntropy.working_bytes`)."""
    return shape.cross_entropy.working_bytes(shape.elem) * _logits(model, shape)


def _logits(model: ModelSpec, shape: Shape) -> float:
    """Logit elements of one micro-batch on one GPU: its tokens by its vocab-parallel share of the vocabulary."""
    return shape.tokens * model.vocab_size / shape.tp


# What "selective" recompute means in each stack (Runtime.selective_recompute):
# "attention_core": Megatron-LM's (Korthikanti et al. 2022, sec. 5): the attention core is dropped and recomputed,
#   everything else kept; what paraplan's executor and DeepSpeed (on Megatron's model code) run too.
# "op_level": torchtitan's op-level selective activation checkpointing (torchtitan/distributed/
#   activation_checkpoint.py, `selective_ac_option = "op"`, through torch.utils.checkpoint's
#   create_selective_checkpoint_contexts): the block's input and the results of the attention kernel and of
#   the odd-numbered matmuls (aten.mm, counted in forward order within each block: wq, wv, w1, w2 of a Llama
#   block) are kept; everything else (norms, activations, rotary, wk, wo, w3) is recomputed.
SelectivePolicy = Literal["attention_core", "op_level"]


def saved_bytes(ops: list[OpCost], recompute: str, policy: SelectivePolicy = "attention_core") -> float:
    """Bytes a block keeps between its forward and backward under a recompute mode (full: see
    `block_input_bytes`).

    selective: everything but the attention core (Korthikanti sec. 5), or the op-level policy's results
    (`op_level_saved_bytes`, which adds the block input); none: everything."""
    if recompute == "selective" and policy == "op_level":
        return op_level_saved_bytes(ops)  # the checkpoint keeps the block input besides (planner/cost/layers.py)
    if recompute == "selective":
        return sum(op.saved_bytes for op in ops if not op.attention_core)
    return sum(op.saved_bytes for op in ops)


def op_level_saved_bytes(ops: list[OpCost]) -> float:
    """What torchtitan's op-level policy keeps of a block, beyond its input (`block_input_bytes`, kept by the
    checkpoint itself): the attention kernel's output and logsumexp, and the odd-numbered matmuls' results
    (`op_level_kept_shares`)."""
    kept = op_level_kept_shares(ops)
    matmul_results = sum(op.output_bytes * kept[i] for i, op in enumerate(ops) if op.linear)
    attention = sum(op.output_bytes for op in ops if op.flash)
    return matmul_results + attention


def op_level_kept_shares(ops: list[OpCost]) -> dict[int, float]:
    """For each linear op (by its index in `ops`), the share of its result torchtitan's op-level policy keeps: the
    policy counts every aten.mm of a block in forward order and recomputes the even-numbered ones ("Saves output
    of all compute ops, except every second mm": torchtitan/distributed/activation_checkpoint.py). An op that
    stands for several matmuls (OpCost.mm_widths) keeps its odd-numbered ones' widths; the same tokens and input
    width run through each, so the share holds for its FLOPs as well as its bytes."""
    shares, count = {}, 0
    for index, op in enumerate(ops):
        if not op.linear:
            continue
        widths = op.mm_widths or (1.0,)
        kept = sum(width for ordinal, width in enumerate(widths, start=count + 1) if ordinal % 2 == 1)
        shares[index] = kept / sum(widths)
        count += len(widths)
    return shares


def recomputed_ops(ops: list[OpCost], recompute: str, policy: SelectivePolicy = "attention_core") -> list[OpCost]:
    """The forward work backward repeats: the whole block (full), the attention core (selective, Megatron), or
    everything but the attention kernel and the matmuls the op-level policy keeps (selective, op-level); none for
    none."""
    if recompute == "full":
        return ops
    if recompute != "selective":
        return []
    if policy == "attention_core":
        return [op for op in ops if op.attention_core]
    kept = op_level_kept_shares(ops)
    repeated = []
    for index, op in enumerate(ops):
        if op.flash or kept.get(index) == 1:
            continue
        repeated.append(_matmul_share(op, 1 - kept[index]) if op.linear else op)
    return repeated


def _matmul_share(op: OpCost, share: float) -> OpCost:
    return replace(op, matmul_flops=op.matmul_flops * share, matmul_io_bytes=op.matmul_io_bytes * share)


def block_input_bytes(model: ModelSpec, shape: Shape) -> float:
    """What full recompute keeps per block: its input activation."""
    return shape.elem * shape.width(model.hidden_size, "sp")
