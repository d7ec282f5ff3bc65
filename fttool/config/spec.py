"""The typed run spec: every key a run can set, its type, its default and a one-line description.

Defaults live here and only here. Hydra composes YAML from ``conf/`` onto these dataclasses, so an
unknown key or a value of the wrong type is rejected at compose time. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from fttool.config import devices

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelSpec:
    """The base model: where it comes from and how it is loaded."""

    name_or_path: str = MISSING  # hub id, local folder, or fttool:NAME for a model bundled with the package
    revision: Optional[str] = None  # hub revision (branch, tag or commit) to pin
    # a .gguf file in model.name_or_path (folder or hub repo): read by transformers' GGUF loader, dequantized to
    # model.dtype
    gguf_file: Optional[str] = None
    dtype: str = "auto"  # weight dtype when loading: auto follows hardware precision (auto|float32|bfloat16|float16)
    attn_implementation: str = "sdpa"  # attention kernel: sdpa, eager, flash_attention_2
    trust_remote_code: bool = False  # run modelling code shipped with the model; only ever set by the user
    # multiplies the method's default learning rate when train.lr is unset (small models take more)
    lr_scale: float = 1.0
    # start from a finished run folder's result (or an export folder): e.g. DPO after SFT
    from_run: Optional[str] = None
    # a from_run that trained an adapter: merge (into its base; a new adapter on top) or continue (train that adapter
    # further)
    from_run_adapter: str = "merge"
    # set by fttool from model.from_run: the parent's adapter folder (merged or continued)
    parent_adapter: Optional[str] = None


PACKING = ("none", "padding_free", "bins")
# train.gradient_checkpointing=selective (worker/checkpointing.py) keeps the output of a matmul whose inner
# dimension is at least KEEP_INNER_DIM: recomputing it would cost as much as the layer's forward; below it (a
# LoRA's B, rank x out) the product is cheap to redo
SELECTIVE = "selective"
KEEP_INNER_DIM = 128


@dataclass
class SourceSpec:
    """One dataset of a mixture (data.mix); unset fields follow the data block."""

    path: str = MISSING  # local file, folder or glob, hub dataset id, or fttool:NAME
    format: Optional[str] = None  # row format of this source; unset = data.format
    split: Optional[str] = None  # hub split of this source; unset = data.split
    columns: Dict[str, str] = field(default_factory=dict)  # column mapping of this source; empty = data.columns
    weight: float = 1.0  # rows taken = weight x rows (0.5 = a seeded half, 2 = every row twice)


@dataclass
class DataSpec:
    """The dataset: where it is, what shape its rows have and how they become tokens."""

    path: Optional[str] = None  # local file (.jsonl/.json/.parquet/.csv), folder, glob, hub dataset id, or fttool:NAME
    format: str = "chat"  # row format: chat, sharegpt, alpaca, completion, segments or preference
    # format field -> column name in your rows, e.g. {messages: dialog}
    columns: Dict[str, str] = field(default_factory=dict)
    split: str = "train"  # split to read when the path is a hub dataset
    mix: List[SourceSpec] = field(default_factory=list)  # several datasets with weights (instead of path)
    # chat template: unset = the tokenizer's own; a name (chatml, llama-3, ...), a .jinja file or Jinja text
    template: Optional[str] = None
    # train with data.template although the tokenizer has a different one of its own
    allow_template_change: bool = False
    # variables for every render of the template, e.g. {enable_thinking: false}
    template_kwargs: Dict[str, Any] = field(default_factory=dict)
    system_prompt: Optional[str] = None  # system message prepended to every conversation that has none
    # extra role names -> user, assistant, system or tool (e.g. {bot: assistant})
    roles: Dict[str, str] = field(default_factory=dict)
    train_on_inputs: bool = False  # train on every token of the conversation (prompts too), not only on train_roles
    train_roles: List[str] = field(default_factory=lambda: ["assistant"])  # roles whose turns are trained
    train_turns: str = "all"  # which turns of train_roles are trained: all or last
    max_length: int = 1024  # longest tokenized sample; longer ones follow `truncation`
    truncation: str = "truncate"  # samples over max_length: truncate (keep the start) or drop
    # none (padded batches), padding_free (samples concatenated, no padding) or bins (fixed max_length rows)
    packing: str = "none"
    val_ratio: float = 0.0  # fraction of rows held out for validation (seeded)
    test_ratio: float = 0.0  # fraction of rows held out as the test split (seeded)
    val_path: Optional[str] = None  # validation rows from a file instead of val_ratio
    # test rows from a file instead of test_ratio (used by the base-vs-fine-tuned comparison)
    test_path: Optional[str] = None
    dedup: bool = False  # drop exact duplicate rows (the count is reported)
    skip_bad_rows: bool = False  # skip malformed rows (counted and reported) instead of stopping at the first
    max_samples: Optional[int] = None  # use at most this many training rows (for smoke runs)
    num_proc: int = 0  # processes that tokenize; 0 = as many as the data size and cores warrant
    cache_dir: Optional[str] = None  # tokenized-data cache; unset = $FTTOOL_CACHE or ~/.cache/fttool/data
    # test-split scores: exact_match, token_f1, rouge_l, json_valid, json_schema, perplexity
    metrics: List[str] = field(default_factory=lambda: ["exact_match", "token_f1", "rouge_l", "perplexity"])
    json_schema: Optional[str] = None  # JSON Schema file the replies must satisfy (adds the json_schema metric)


@dataclass
class FullSpec:
    """Full fine-tune: every weight is trained."""

    name: str = "full"  # method name (set by the group option)
    default_lr: float = 2e-5  # learning rate used when train.lr is unset


@dataclass
class LoraSpec:
    """LoRA: low-rank adapters on chosen projections, base weights frozen."""

    name: str = "lora"  # method name (set by the group option)
    default_lr: float = 2e-4  # learning rate used when train.lr is unset
    rank: int = 16  # adapter rank r
    alpha: float = 32.0  # adapter scaling numerator (scale = alpha / rank)
    dropout: float = 0.05  # dropout on the adapter input
    # module names that get adapters
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank)


@dataclass
class QloraSpec(LoraSpec):
    """QLoRA: LoRA on a base model quantized to 4 or 8 bits with bitsandbytes."""

    name: str = "qlora"  # method name (set by the group option)
    bits: int = 4  # quantization width: 4 (nf4/fp4) or 8 (LLM.int8)
    quant_type: str = "nf4"  # 4-bit data type: nf4 or fp4
    double_quant: bool = True  # quantize the quantization constants too (saves ~0.4 bit/param)
    compute_dtype: str = "auto"  # dtype of the 4-bit matmuls: auto follows precision (bfloat16|float16|float32)


@dataclass
class ObjectiveSpec:
    """What the training optimises: sft (next-token loss on the trained tokens) or a preference objective on pairs of
    replies (dpo, orpo). `method` stays how the weights are trained (full, LoRA, QLoRA). Each objective has its own
    keys (the dataclasses below): a key of another objective is refused with the objective that has it."""

    name: str = "sft"  # objective name (set by the group option)


@dataclass
class SftSpec(ObjectiveSpec):
    name: str = "sft"


@dataclass
class DpoSpec(ObjectiveSpec):
    name: str = "dpo"
    beta: float = 0.1  # strength of the pull towards the reference model (DPO's beta)
    loss_type: str = "sigmoid"  # sigmoid (the DPO paper), ipo, hinge or robust (TRL's loss types)
    label_smoothing: float = 0.0  # assumed fraction of flipped preference labels (conservative DPO, robust)
    # score every pair with the reference once before training, so no reference forward runs per step
    precompute_ref_log_probs: bool = False


@dataclass
class OrpoSpec(ObjectiveSpec):
    name: str = "orpo"
    beta: float = 0.1  # weight of the odds-ratio term (ORPO's lambda)


@dataclass
class KtoSpec(ObjectiveSpec):
    """KTO (Ethayarajh et al. 2024) through TRL's KTOTrainer: unpaired replies labelled desirable or not."""

    name: str = "kto"
    beta: float = 0.1  # strength of the pull towards the reference model
    desirable_weight: float = 1.0  # weight of the desirable replies' loss (raise it when they are the fewer)
    undesirable_weight: float = 1.0  # weight of the undesirable replies' loss
    loss_type: str = "kto"  # kto, or apo_zero_unpaired (no KL estimate)


@dataclass
class GrpoSpec(ObjectiveSpec):
    """GRPO (Shao et al. 2024) through TRL's GRPOTrainer: sample num_generations completions per prompt, score them
    with the rewards, and raise the likelihood of the ones above their group's mean."""

    name: str = "grpo"
    # built-in reward -> weight: numeric_answer, exact_match, token_f1, format, json_valid, json_schema, length;
    # unset (and no reward_code) = {numeric_answer: 1.0}
    rewards: Dict[str, float] = field(default_factory=dict)
    # your own reward: FILE.py:function or module:function (TRL's signature); a recipe that names one needs trust_code=true
    reward_code: Optional[str] = None
    reward_code_weight: float = 1.0  # its weight beside objective.rewards
    format_regex: Optional[str] = (
        None  # the format reward's pattern; unset = a <think>...</think> block, then an answer
    )
    length_target: int = 200  # the length reward's characters: 1 at none, 0 at this many, -1 at twice as many
    num_generations: int = 8  # completions sampled per prompt (the group); train.batch_size counts completions
    max_completion_length: int = 256  # new tokens per completion at most
    temperature: float = 1.0  # sampling temperature of the completions
    top_p: float = 1.0  # nucleus sampling of the completions
    beta: float = 0.0  # KL penalty towards the reference model; 0 loads no reference (the DAPO / Dr. GRPO setting)
    loss_type: str = "dapo"  # grpo, dapo (tokens of the whole batch), dr_grpo (a constant) or bnpo (the local batch)
    importance_sampling_level: str = "token"  # token, or sequence (GSPO: one ratio per completion)
    epsilon: float = 0.2  # clip range of the importance ratio (lower side, and upper unless epsilon_high is set)
    epsilon_high: Optional[float] = None  # upper clip range (DAPO's clip-higher: 0.28); unset = epsilon
    scale_rewards: str = "group"  # divide advantages by the reward std of the group, the batch, or none (Dr. GRPO)
    mask_truncated_completions: bool = False  # completions cut at max_completion_length get no loss (DAPO)
    use_vllm: bool = False  # generate with vLLM in the training processes (colocate; CUDA, vllm installed)


@dataclass
class HardwareSpec:
    """Where the run executes: device, processes per machine, how the model is spread over them, machines."""

    name: str = "cpu"  # option name (set by the group option)
    device: str = "cpu"  # cpu or cuda
    num_processes: int = 1  # processes on each machine (one per GPU); 1 = train in the fttool process itself
    precision: str = "auto"  # mixed precision: auto (bf16 where supported, else fp32), fp32, bf16, fp16
    strategy: str = "none"  # none (one process), ddp, fsdp2 (full shard by decoder layer), zero2 or zero3 (DeepSpeed)
    offload: bool = False  # fsdp2: parameters on the CPU; zero3: parameters and optimizer state on the CPU
    activation_checkpointing: bool = False  # fsdp2: recompute each decoder layer in backward (FSDP's own checkpointing)
    num_machines: int = 1  # machines in the job; 0 = from SLURM (SLURM_NNODES)
    machine_rank: Optional[int] = 0  # this machine's rank, 0 .. num_machines-1; -1 = from SLURM (SLURM_NODEID)
    # address of machine 0, reachable from every machine; "slurm" = first node of the job
    main_address: Optional[str] = "127.0.0.1"
    main_port: int = 29500  # free TCP port on machine 0 for the rendezvous
    join_timeout_s: int = 600  # machines other than 0 wait this long for machine 0's run folder


@dataclass
class LoggingSpec:
    """Where metrics go besides the run folder's metrics.jsonl."""

    backend: str = "none"  # none or wandb
    project: Optional[str] = None  # W&B project (default: fttool)
    entity: Optional[str] = None  # W&B entity (team or user)
    mode: str = "online"  # W&B mode: online, offline or disabled
    group: Optional[str] = None  # W&B run group; sweeps set it to the sweep's name
    tags: List[str] = field(default_factory=list)  # W&B run tags


@dataclass
class TrainSpec:
    """The optimisation schedule, shared by every method."""

    lr: Optional[float] = None  # peak learning rate; unset = method.default_lr * model.lr_scale
    lr_scheduler: str = "cosine"  # learning-rate schedule: cosine, linear, constant_with_warmup, ...
    warmup_ratio: float = 0.03  # fraction of the steps spent warming up
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    batch_size: int = 4  # micro-batch size per process
    grad_accum: int = 4  # micro-batches accumulated per optimizer step
    epochs: float = 3.0  # passes over the data (ignored when max_steps is set)
    max_steps: Optional[int] = None  # stop after this many optimizer steps (overrides epochs)
    optim: str = "adamw_torch"  # optimizer name as transformers knows it
    # recompute activations in backward to save memory: false, true (each decoder layer's forward again: its input
    # kept, ~20-30% slower) or selective (the matmuls' and attention's outputs kept, the elementwise ops recomputed:
    # about half the activations, ~5-10% slower)
    gradient_checkpointing: Any = False
    # the LM head and loss: chunked (trained positions only, in tiles, never the whole [tokens, vocab] logits),
    # full (the model's own logits and loss), or auto (chunked wherever it is exact)
    loss_impl: str = "auto"
    logging_steps: int = 10  # log metrics every N steps
    save_steps: int = 200  # write a checkpoint every N steps
    save_total_limit: int = 2  # keep at most this many checkpoints
    dataloader_workers: int = 0  # dataloader worker processes
    # validation loss every N steps (needs a validation split); unset = at every checkpoint
    eval_steps: Optional[int] = None
    early_stopping_patience: int = 0  # stop after this many validations without improvement (0 = never stop early)
    early_stopping_threshold: float = 0.0  # a validation loss must drop by more than this to count as an improvement
    # with validation during training: keep the best checkpoint (checkpoints/best) and save it as final/
    load_best: bool = True
    # optimizer steps with a NaN/inf loss or gradient norm to skip (update dropped, counted) before the run stops
    nonfinite_tolerance: int = 0


@dataclass
class EvalSpec:
    """Evaluation on the held-out test split (after training and by `fttool eval`), fine-tuned vs base model."""

    after_training: bool = True  # evaluate when training ends (when the data has a test split)
    samples: Optional[int] = None  # test examples to evaluate; unset = all
    max_new_tokens: int = 64  # generation budget per example (greedy decoding)
    batch_size: int = 16  # examples generated at once
    compare_base: bool = True  # evaluate the base model too, side by side, and give a verdict
    # metric -> margin the fine-tune must beat the base by; empty = {first of data.metrics: 0}
    gate: Dict[str, float] = field(default_factory=dict)
    show: int = 3  # examples printed side by side


@dataclass
class RunSpec:
    """One fine-tuning run."""

    model: ModelSpec = field(default_factory=ModelSpec)  # group `model`
    data: DataSpec = field(default_factory=DataSpec)  # group `data`
    method: Any = MISSING  # group `method`: full, lora or qlora
    objective: Any = MISSING  # group `objective`: sft, dpo or orpo
    hardware: HardwareSpec = field(default_factory=HardwareSpec)  # group `hardware`
    logging: LoggingSpec = field(default_factory=LoggingSpec)  # group `logging`
    train: TrainSpec = field(default_factory=TrainSpec)  # the schedule
    eval: EvalSpec = field(default_factory=EvalSpec)  # held-out evaluation against the base model
    output_dir: str = "runs"  # folder that holds run folders
    run_name: Optional[str] = None  # this run's folder name; unset = <model>-<method>-<timestamp>
    resume: str = "never"  # never (fail if the run folder exists) or auto (continue from its newest checkpoint)
    # on resume: same (refuse if the data changed since the run began) or changed (continue on the new data, recorded
    # in data.json)
    resume_data: str = "same"
    seed: int = 42  # seed for data order, initialisation, dropout and sampled completions
    # run code a recipe names (objective.reward_code): only when the command line itself says trust_code=true
    trust_code: bool = False


# -- derived properties: each decided here once ------------------------------------------------------------------
def has_validation(spec) -> bool:
    """The run holds out validation rows (data.val_ratio or data.val_path): validation loss, early stopping, best."""
    return bool(spec.data.val_ratio or spec.data.val_path)


def has_test(spec) -> bool:
    return bool(spec.data.test_ratio or spec.data.test_path)


def effective_gate(spec) -> Dict[str, float]:
    """metric -> margin the fine-tune must beat the base by; unset = the first of data.metrics, by any margin."""
    return dict(spec.eval.gate) if spec.eval.gate else {spec.data.metrics[0]: 0.0}


def resolved_precision(hw, bf16: Optional[bool] = None) -> str:
    """hardware.precision with "auto" decided, in this one place: fp32 on the CPU; on a GPU bf16, or fp16 on one
    without bf16 (`bf16`: whether the GPU has it; None = not known yet, as when planning for no GPU in particular)."""
    if hw.precision != "auto":
        return hw.precision
    if not devices.of(hw).gpu:
        return "fp32"
    return "fp16" if bf16 is False else "bf16"


def world_size(hw: HardwareSpec) -> int:
    """Processes over all machines (num_machines 0, from SLURM, counts as 1 until the job fills it in)."""
    return hw.num_processes * max(hw.num_machines, 1)


GROUPS = ("model", "data", "method", "objective", "hardware", "logging")
