"""Memory per device and training time of a run, worked out from its spec and its model's shapes (arithmetic only:
no torch, no weights). `fttool plan` prints it, `train` writes it into the run folder beside what was measured.

Every figure follows what the libraries fttool uses actually allocate (see each item's note): transformers loads a
full fine-tune's weights in fp32 and autocasts; peft keeps adapters in fp32; peft's k-bit preparation casts every
non-quantized weight of a QLoRA base (embeddings, output layer, norms) to fp32; the loss upcasts the logits to fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Union

from fttool.config import devices, losspath, methods, objectives, strategies
from fttool.config.spec import KEEP_INNER_DIM, SELECTIVE, resolved_precision, world_size
from fttool.plan.shapes import ModelShape

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# optimizer state per trained parameter, in bytes (transformers' `optim` names); "factored": Adafactor's row and
# column statistics (counted from the shapes)
OPTIMIZER_BYTES = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "adamw_hf": 8,
    "adamw_apex_fused": 8,
    "adamw_anyprecision": 8,
    "adamw_torch_xla": 8,
    "paged_adamw_32bit": 8,
    "adamw_bnb_8bit": 2,
    "adamw_8bit": 2,
    "paged_adamw_8bit": 2,
    "adamw_torch_8bit": 2,
    "adamw_torch_4bit": 1,
    "lion_32bit": 4,
    "paged_lion_32bit": 4,
    "lion_8bit": 1,
    "paged_lion_8bit": 1,
    "rmsprop": 4,
    "adagrad": 4,
    "sgd": 0,
    "adafactor": "factored",
}
PAGED = ("paged_adamw_32bit", "paged_adamw_8bit", "paged_lion_32bit", "paged_lion_8bit")

# Calibrations, each stated where it is used:
LOSS_BYTES_FP32 = 12  # per token x vocab entry: log-softmax output, its gradient and the logits' gradient (fp32)
CUDA_CONTEXT_GIB = 0.55  # CUDA context, cuBLAS workspace and kernels of torch on a recent GPU (nvidia-smi shows it)
CUDA_SLACK = 0.08  # torch's caching allocator: reserved beyond allocated (fragmentation), share of the total
CPU_RUNTIME_GIB = 0.55  # python, torch, transformers, peft, datasets and the tokenized data, measured on Linux x86-64
CPU_SLACK = 0.10  # glibc malloc keeps freed blocks; peak RSS runs above what tensors hold
# ... at least this many decoder layers' activations (one micro-batch's, without checkpointing), whatever is
# checkpointed: SmolLM2-135M LoRA, batch 8 of GSM8K, 9 settings (padded / padding-free, full / chunked loss, no /
# selective / full checkpointing) measured 5-10 layers' worth above the tensors alive (which the plan predicts
# within 8% when malloc's threshold is fixed); with 8 the plan is within 13% of each peak RSS
CPU_RETAINED_LAYERS = 8
# selective checkpointing recomputes a layer's elementwise ops: measured on the CPU (SmolLM2-135M, LoRA, batch 8 of
# GSM8K) as 0.4 of what recomputing the whole layer costs (+9% vs +22% a step), counted as that share of its FLOPs
SELECTIVE_RECOMPUTE = 0.4
ZERO_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce/allgather bucket (elements)


@dataclass(frozen=True)
class Setup:
    """What memory and time depend on; the fixes `plan` proposes are changes of these."""

    method: str
    mspec: object  # the method's keys (rank, targets, bits ...)
    objective: str
    reference: bool  # a frozen reference model scores every step (objectives.uses_reference)
    batch: int  # micro-batch per process
    grad_accum: int
    max_length: int
    ckpt: Union[bool, str]  # activation (gradient) checkpointing, either kind: True (full) or "selective"
    strategy: str
    offload: bool
    world: int  # processes over all machines
    processes: int  # processes on one machine
    optim: str
    precision: str  # fp32, bf16 or fp16 (resolved)
    device: str
    dtype: str  # model.dtype
    batch_tokens: Optional[int] = None  # expected tokens of the largest micro-batch (a data sample); None: the worst
    completion: int = 0  # tokens generated per row before training on them (GRPO: max_completion_length)
    vllm: bool = False  # sampled by vLLM (CUDA graphs) rather than transformers' generate
    loss_path: str = "full"  # chunked or full (config/losspath.py)
    trained_share: float = 1.0  # of a micro-batch's tokens, those trained (a data sample's; 1: unknown)
    device_gib: Optional[float] = None  # the device's memory (the chunk size follows it); None: unknown
    head_adapter: bool = False  # a LoRA on lm_head (the chunked path builds its merged weight)

    @classmethod
    def of(cls, spec, precision: Optional[str] = None) -> "Setup":
        hw, tr = spec.hardware, spec.train
        prec = precision or resolved_precision(hw)
        obj = objectives.of(spec)
        return cls(
            method=spec.method.name,
            mspec=spec.method,
            objective=spec.objective.name,
            reference=obj.uses_reference(spec.objective),
            completion=obj.completion_tokens(spec.objective),
            vllm=bool(getattr(spec.objective, "use_vllm", False)),
            loss_path=losspath.decide(spec)[0],
            head_adapter="lm_head" in list(getattr(spec.method, "target_modules", None) or []),
            batch=tr.batch_size,
            grad_accum=tr.grad_accum,
            max_length=spec.data.max_length,
            ckpt=tr.gradient_checkpointing or bool(hw.activation_checkpointing),
            strategy=hw.strategy,
            offload=bool(hw.offload),
            world=world_size(hw),
            processes=hw.num_processes,
            optim=tr.optim,
            precision=prec,
            device=hw.device,
            dtype=spec.model.dtype,
        )

    @property
    def method_obj(self) -> methods.Method:
        return methods.METHODS[self.method]

    @property
    def strategy_obj(self) -> strategies.Strategy:
        return strategies.STRATEGIES[self.strategy]

    @property
    def compute_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def sequences(self) -> int:
        """Sequences per sample: a preference pair is two."""
        return len(objectives.OBJECTIVES[self.objective].features.sides)

    @property
    def data_tokens(self) -> int:
        """The data's tokens in the largest micro-batch (a data sample's, else data.max_length for every row)."""
        worst = self.batch * self.sequences * self.max_length
        return min(self.batch_tokens, worst) if self.batch_tokens else worst

    @property
    def worst_tokens(self) -> int:
        """Tokens of one micro-batch at the longest (data.max_length, and every completion at its longest)."""
        return self.batch * self.sequences * (self.max_length + self.completion)

    @property
    def tokens(self) -> int:
        """Tokens of the largest micro-batch the memory is sized for: the data's (sampled), else the worst case;
        generated completions at their longest."""
        return self.data_tokens + self.batch * self.completion

    @property
    def logit_tokens(self) -> int:
        """Positions whose logits the loss computes: every token's, or only the completions' (TRL's GRPO keeps the
        logits of the completion positions alone)."""
        return self.batch * self.completion if self.completion else self.tokens

    @property
    def trained_tokens(self) -> int:
        """Positions whose next token is trained in the largest micro-batch (what a chunked loss computes on)."""
        return self.logit_tokens if self.completion else max(1, round(self.tokens * self.trained_share))

    @property
    def generated_rows(self) -> int:
        """Completions one process samples at once: its micro-batch for every accumulation step (TRL generates for
        steps_per_generation = grad_accum micro-batches in one call)."""
        return self.batch * self.grad_accum if self.completion else 0

    def shape_note(self) -> str:
        gen = f" + {self.batch} x {self.completion} generated" if self.completion else ""
        if self.batch_tokens and self.tokens < self.worst_tokens:
            return f"the largest micro-batch of a data sample{gen}; at most {self.worst_tokens:,}"
        seq = f"{self.sequences} x " if self.sequences > 1 else ""
        return f"{self.batch} x {seq}{self.max_length}{gen}"


@dataclass
class Item:
    name: str
    gib: float
    note: str
    on_host: bool = False  # offloaded: counts against CPU memory, not the device


@dataclass
class Memory:
    items: List[Item] = field(default_factory=list)
    device: str = "cuda"

    def add(self, name: str, nbytes: float, note: str, on_host: bool = False) -> None:
        if nbytes > 0:
            self.items.append(Item(name, nbytes / GIB, note, on_host))

    @property
    def total(self) -> float:
        """GiB per device: what nvidia-smi shows on a GPU, the peak RSS on a CPU."""
        return sum(i.gib for i in self.items if not i.on_host)

    @property
    def host(self) -> float:
        return sum(i.gib for i in self.items if i.on_host)

    @property
    def tensors(self) -> float:
        """GiB that torch's allocator holds at the peak (the total less the fixed runtime): what torch's
        max_memory_reserved reports on a GPU."""
        return sum(i.gib for i in self.items if not i.on_host and i.name not in (CONTEXT, RUNTIME))


CONTEXT, RUNTIME, SLACK = "CUDA context", "runtime", "allocator slack"


def trained_parameters(method: methods.Method, mspec, shape: ModelShape) -> int:
    """Parameters the method trains on a model of this shape."""
    return method.trainable(mspec, shape.total, shape.layers, shape.linears)


def _factored_state(s: Setup, shape: ModelShape) -> int:
    """Adafactor: a row and a column statistic per matrix (fp32), no momentum (transformers' default)."""
    if s.method_obj.adapter:
        r = s.mspec.rank
        per = sum((r + i) + (o + r) for n, (i, o) in shape.linears.items() if n in s.mspec.target_modules)
        return 4 * shape.layers * per
    per = sum(i + o for i, o in shape.linears.values())
    return 4 * (shape.layers * per + (shape.vocab + shape.hidden) * (1 if shape.tied else 2))


def _activations_per_token(s: Setup, shape: ModelShape) -> float:
    """Bytes one decoder layer keeps for backward, per token: the norms' inputs and outputs (and their fp32 upcast
    under mixed precision), q/k/v and their rotated copies, attention's output (memory-efficient attention keeps no
    seq x seq matrix), the MLP's gate, up, activation and product; with LoRA the dropout outputs and masks of each
    adapted layer."""
    h, q, k, i = shape.hidden, shape.attn_dim, shape.kv_dim, shape.intermediate
    b = s.compute_bytes
    elems = 4 * h + 4 * q + 3 * k + (4 * i if shape.gated_mlp else 2 * i)
    extra = 2 * h * 4 if b == 2 else 0  # RMSNorm computes in fp32
    if s.method_obj.adapter:
        ins = [shape.linears[t][0] for t in s.mspec.target_modules if t in shape.linears]
        extra += sum(ins) * ((b + 1) if s.mspec.dropout else 0)
    return elems * b + extra


def _selective_per_token(s: Setup, shape: ModelShape) -> float:
    """Bytes selective checkpointing keeps per token and layer beyond the layer's input (worker/checkpointing.py):
    the outputs of the q/k/v and output projections, of attention (and its log-sum-exp, a float per head), of the
    MLP's matmuls (gate and up, or fc1; down), and of each adapter's A (rank wide; B's too when the rank reaches
    the width at which a matmul's output is kept)."""
    h, q, k, i = shape.hidden, shape.attn_dim, shape.kv_dim, shape.intermediate
    elems = q + 2 * k + q + h + (2 * i if shape.gated_mlp else i) + h
    if s.method_obj.adapter:
        r = s.mspec.rank
        for t in s.mspec.target_modules:
            if t in shape.linears:
                elems += r + (shape.linears[t][1] if r >= KEEP_INNER_DIM else 0)
    return elems * s.compute_bytes + shape.heads * 4


def memory(s: Setup, shape: ModelShape) -> Memory:
    m, st = s.method_obj, s.strategy_obj
    mem = Memory(device=s.device)
    n = max(s.world, 1)
    total = shape.total
    trainable = trained_parameters(s.method_obj, s.mspec, shape)
    cb = s.compute_bytes
    shard_params = st.shards_parameters and m.shardable_base
    shard_states = st.shards != ""  # optimizer state (and gradients) divided over the processes
    offload = s.offload and st.offload
    deepspeed_mixed = st.fp32_masters and cb == 2  # DeepSpeed trains bf16 weights + fp32 masters

    # -- weights ------------------------------------------------------------------------------------------------
    if s.dtype != "auto":
        wb, wnote = DTYPE_BYTES[s.dtype], f"{s.dtype} (model.dtype)"
    else:
        wname = m.weight_dtype(s.precision)
        wb, wnote = DTYPE_BYTES[wname], wname
    if deepspeed_mixed and not m.adapter:
        wb, wnote = 2, "bf16 (DeepSpeed casts the model; fp32 masters below)"
    div = n if shard_params else 1
    share = f", 1/{n} per process" if div > 1 else ""
    if m.quantized:
        qb = m.bytes_per_weight(s.mspec, wb)
        other = total - shape.linear_params
        mem.add(
            "weights (quantized)",
            shape.linear_params * qb / div,
            f"{count(shape.linear_params)} linear weights at {qb:.3f} bytes ({m.describe(s.mspec).split(', base ')[-1]})",
        )
        mem.add(
            "weights (not quantized)",
            other * 4 / div,
            f"{count(other)} embedding/output/norm weights, fp32 (peft's k-bit preparation upcasts them)",
        )
    else:
        mem.add(
            "weights",
            total * wb / div,
            f"{count(total)} x {wb} bytes ({wnote}){share}",
            on_host=offload and shard_params,
        )
    if shard_params and not offload:
        layer = sum(i * o for i, o in shape.linears.values()) + shape.layer_extra
        mem.add(
            "gathered layers", 2 * layer * cb, "each process gathers a layer's full weights (and prefetches the next)"
        )
    elif offload and shard_params:
        layer = sum(i * o for i, o in shape.linears.values()) + shape.layer_extra
        mem.add("gathered layers", 2 * layer * cb, "layers fetched from the CPU as they run")
    if s.reference and not m.adapter:
        mem.add(
            "reference model",
            total * cb / div,
            f"{s.objective}'s frozen copy of the model, in the compute dtype" + share,
        )

    # -- what training adds --------------------------------------------------------------------------------------
    state_div = n if shard_states else 1
    sshare = f", 1/{n} per process" if state_div > 1 else ""
    grad_b = 4 if (m.adapter or not deepspeed_mixed) else 2
    if m.adapter:
        mem.add("adapter", trainable * 4 / (div if shard_params else 1), f"{count(trainable)} parameters, fp32")
    if deepspeed_mixed and not m.adapter:
        mem.add(
            "fp32 master weights", trainable * 4 / state_div, "DeepSpeed's fp32 copy for the update" + sshare, offload
        )
    grad_div = state_div if st.shards in ("optimizer+gradients", "all") else 1
    mem.add(
        "gradients",
        trainable * grad_b / grad_div,
        f"{grad_b} bytes per trained parameter" + (f", 1/{n} per process" if grad_div > 1 else ""),
    )
    if st.bucket_copy:
        mem.add("DDP buckets", trainable * grad_b, "DDP's all-reduce buckets: a second copy of the gradients")
    if st.fp32_masters and not shard_params:
        mem.add(
            "ZeRO buckets",
            2 * min(trainable, ZERO_BUCKET_ELEMENTS) * grad_b,
            "DeepSpeed's reduce and all-gather buckets (5e8 elements each by default)",
        )
    per = OPTIMIZER_BYTES.get(s.optim)
    if per == "factored":
        state, onote = _factored_state(s, shape), "Adafactor: a row and a column statistic per matrix"
    else:
        assumed = per is None
        per = 8 if assumed else per
        state = trainable * per
        onote = f"{per} bytes per trained parameter ({s.optim}{', assumed AdamW-like' if assumed else ''})"
    paged = s.optim in PAGED
    mem.add(
        "optimizer states",
        state / state_div,
        onote + sshare + ("; paged: may spill to CPU memory" if paged else ""),
        on_host=offload,
    )

    # -- per micro-batch -----------------------------------------------------------------------------------------
    tokens = s.tokens
    per_layer = _activations_per_token(s, shape) * tokens
    resid = shape.hidden * (4 if (m.quantized or cb == 4 or not m.adapter) else cb)  # the residual stream's dtype
    if s.ckpt == SELECTIVE:
        kept = _selective_per_token(s, shape)
        mem.add(
            "activations",
            shape.layers * tokens * (resid + kept) + per_layer,
            f"selective checkpointing: {shape.layers} layers x {(resid + kept) / 1024:.1f} KiB per token (the layer's "
            f"input, the matmuls' and attention's outputs) + one layer recomputed, {tokens:,} tokens "
            f"({s.shape_note()}); train.gradient_checkpointing=true keeps the layer inputs only",
        )
    elif s.ckpt:
        mem.add(
            "activations",
            shape.layers * tokens * resid + per_layer,
            f"checkpointed: {shape.layers} layer inputs + one layer recomputed, {tokens:,} tokens ({s.shape_note()})",
        )
    else:
        mem.add(
            "activations",
            shape.layers * per_layer,
            f"{shape.layers} layers x {per_layer / tokens / 1024:.1f} KiB per token, {tokens:,} tokens "
            f"({s.shape_note()}); train.gradient_checkpointing=true keeps one layer's",
        )
    if s.loss_path == "chunked":
        mem.add("logits and loss", *_chunked_loss_bytes(s, shape))
    else:
        loss_b = LOSS_BYTES_FP32 + (cb if cb != 4 else 0)
        which = " (the completions')" if s.completion else ""
        mem.add(
            "logits and loss",
            s.logit_tokens * shape.vocab * loss_b,
            f"vocab {shape.vocab:,} x {s.logit_tokens:,} tokens{which} x {loss_b} bytes (logits, fp32 log-softmax "
            "and gradients)",
        )
    if s.completion:  # sampling holds a KV cache instead of the micro-batch's activations and logits
        gen = generation_bytes(s, shape)
        during_training = sum(i.gib for i in mem.items if i.name in ("activations", "logits and loss")) * GIB
        mem.add(
            "sampling (beyond training)",
            gen - during_training,
            f"generating {s.generated_rows} completions at once holds a {gen / GIB:.2f} GiB KV cache and logits, "
            "more than a training micro-batch's activations and logits",
        )

    # -- the runtime ---------------------------------------------------------------------------------------------
    if devices.of(s).gpu:
        mem.add(SLACK, CUDA_SLACK * mem.tensors * GIB, f"{CUDA_SLACK:.0%}: torch's caching allocator, fragmentation")
        mem.add(CONTEXT, CUDA_CONTEXT_GIB * GIB, "CUDA context, cuBLAS workspace, kernels")
    else:
        share, layers = CPU_SLACK * mem.tensors * GIB, CPU_RETAINED_LAYERS * per_layer
        if layers > share:
            note = (
                f"freed memory malloc keeps: {CPU_RETAINED_LAYERS} x one layer's activations (each layer's "
                "forward, recomputation and backward allocate and free them; glibc holds the fragments; measured)"
            )
            mem.add(SLACK, layers, note)
        else:
            mem.add(SLACK, share, f"{CPU_SLACK:.0%}: freed memory malloc keeps")
        mem.add(RUNTIME, CPU_RUNTIME_GIB * GIB, "python, torch and libraries, tokenized data (measured)")
    return mem


TRL_TILE_TOKENS, TRL_TILE_VOCAB = 4096, 32768  # TRL's fused head: tiles of tokens x vocabulary (trl/kernels)
TRL_CPU_TEMPORARIES = 9  # tile-sized fp32 temporaries of TRL's torch fold where there is no Triton (measured peak)


def _chunked_loss_bytes(s: Setup, shape: ModelShape) -> tuple:
    """(bytes, note) of the chunked LM-head loss: fttool's chunks (one fp32 [chunk, vocab] buffer) or TRL's tiles
    (DPO, KTO, GRPO), plus the trained positions' hidden states gathered and their fp32 gradient; a LoRA on lm_head
    adds its merged weight and that weight's fp32 gradient."""
    n, v, h = s.trained_tokens, shape.vocab, shape.hidden
    rows = n * h * (s.compute_bytes + 4)
    head = 2 * v * h * 4 if s.head_adapter else 0
    if s.objective in losspath.FUSED_BY_TRL:
        tile = min(n, TRL_TILE_TOKENS) * min(v, TRL_TILE_VOCAB)
        temps = 2 if devices.of(s).gpu else TRL_CPU_TEMPORARIES
        return (
            tile * 4 * temps + rows + head,
            f"TRL's fused head over {n:,} trained tokens: tiles of {min(n, TRL_TILE_TOKENS):,} tokens x "
            f"{min(v, TRL_TILE_VOCAB):,} vocabulary ({temps} fp32 tile buffers{'' if temps == 2 else ' on the CPU'})",
        )
    device = (s.device_gib or 80) * GIB
    chunk = min(n, losspath.chunk_tokens(v, device))
    return (
        chunk * v * 4 + rows + head,
        f"chunked over the {n:,} trained tokens, {chunk:,} at a time: one fp32 [{chunk:,}, {v:,}] buffer "
        "(train.loss_impl; the full logits would be "
        f"{s.logit_tokens * v * (LOSS_BYTES_FP32 + (s.compute_bytes if s.compute_bytes != 4 else 0)) / GIB:.2f} GiB)",
    )


def generation_bytes(s: Setup, shape: ModelShape) -> float:
    """What sampling holds beyond the weights: the KV cache of every row at its longest (keys and values of each
    layer) and the last position's logits, scores and probabilities (fp32)."""
    rows = s.generated_rows
    length = s.data_tokens / max(s.batch, 1) + s.completion  # the longest prompt of a micro-batch, then the reply
    kv = 2 * shape.layers * shape.kv_dim * s.compute_bytes * rows * length
    return kv + rows * shape.vocab * 4 * 3


# -- time ----------------------------------------------------------------------------------------------------------
def flops_per_token(s: Setup, shape: ModelShape, context: float) -> float:
    """Training FLOPs per trained token: 6 x the parameters a token multiplies through for a full fine-tune (2
    forward, 4 backward), 4 x those for a frozen base (no weight gradients) plus 6 x the adapter's; recomputation
    adds a forward (2x) with checkpointing; attention adds 6 x layers x context x attention width (causal: half the
    context on average). A reference model adds one forward (DPO's unless precomputed, GRPO's with beta > 0)."""
    n = shape.matmul_params
    trainable = trained_parameters(s.method_obj, s.mspec, shape)
    if s.method_obj.adapter:
        f = 4 * n + 6 * trainable
    else:
        f = 6 * n
    f += 6 * shape.layers * (context / 2) * shape.attn_dim * 2
    if s.ckpt == SELECTIVE:
        f += 2 * shape.linear_params * SELECTIVE_RECOMPUTE
    elif s.ckpt:
        f += 2 * shape.linear_params  # the decoder layers' forward again (not the output layer)
    if s.reference:
        f += 2 * n
    return f


def utilisation(s: Setup) -> float:
    """The share of the card's bf16 peak a step reaches (the method's row: methods.py)."""
    return s.method_obj.utilisation


def fmt_duration(sec: float) -> str:
    if sec < 90:
        return f"{sec:.0f} s"
    if sec < 5400:
        return f"{sec / 60:.0f} min"
    if sec < 48 * 3600:
        return f"{sec / 3600:.1f} h"
    return f"{sec / 86400:.1f} days"


def count(n: float) -> str:
    """12.3B, 456M, 7.9K."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def gib(x: float) -> str:
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"
