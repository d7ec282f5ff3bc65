"""How a run spreads over processes: one object per strategy, answering everything the rest of fttool asks of it.

Validation, plan, the launcher's engine configs (distributed.py) and the worker read these answers; none of them
switches on a strategy's name. A new strategy (ZeRO-1, HSDP) is one row of STRATEGIES and one file in
conf/hardware/ (README, "Adding a method / a strategy"). Light: no torch, accelerate or DeepSpeed imports here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from fttool.config import devices
from fttool.config.spec import SELECTIVE
from fttool.errors import UserError

DEEPSPEED_CONFIG = "deepspeed.json"


@dataclass(frozen=True)
class Strategy:
    """One process: training runs in the fttool process itself."""

    name: str
    about: str  # shown by `fttool check` and in the model card
    accelerate_type: Optional[str] = None  # accelerate's distributed_type; None = no `accelerate launch`
    shards: str = ""  # what it divides over the processes: "" (replicated), "optimizer+gradients", "all"
    offload: bool = False  # can move parameters (and optimizer state) to CPU memory: hardware.offload
    drops_steps: bool = True  # a non-finite step can be dropped before the update (train.nonfinite_tolerance)
    own_checkpointing: bool = False  # has its own activation checkpointing (hardware.activation_checkpointing)
    # for the plan's memory estimate (plan/estimate.py):
    bucket_copy: bool = False  # keeps a second copy of the gradients in its all-reduce buckets (DDP)
    fp32_masters: bool = (
        False  # under bf16/fp16 trains 16-bit weights with fp32 master copies, comm buckets (DeepSpeed)
    )

    @property
    def distributed(self) -> bool:
        return self.accelerate_type is not None

    @property
    def shards_parameters(self) -> bool:
        return self.shards == "all"

    def before_worker(self, hw) -> None:
        """Anything the worker must do before accelerate's state is created."""

    def accelerate_extra(self, hw, run_dir: Path) -> Dict:
        """Entries this strategy adds to (or, set to None, removes from) the generated accelerate config."""
        return {}

    def write_engine_config(self, hw, run_dir: Path) -> None:
        """Engine files beside accelerate's (DeepSpeed JSON)."""

    def training_kwargs(self, hw, run_dir: Path) -> Dict:
        """TrainingArguments that make the Trainer use the same strategy as the generated configs."""
        return {}

    def after_process_group(self, hw) -> None:
        """Anything the worker must start once torch.distributed is up."""

    def check(self, cfg) -> None:
        """Rules between this strategy and the rest of the spec (hardware, method, train)."""
        hw = cfg.hardware
        if hw.offload and not self.offload:
            offloading = ", ".join(n for n, s in STRATEGIES.items() if s.offload)
            raise UserError(f"hardware.offload=true applies to {offloading}, not strategy={hw.strategy}.")
        if hw.activation_checkpointing and not self.own_checkpointing:
            raise UserError(
                "hardware.activation_checkpointing applies to fsdp2; elsewhere use train.gradient_checkpointing=true."
            )
        if cfg.train.gradient_checkpointing == SELECTIVE and self.shards_parameters and not self.own_checkpointing:
            raise UserError(
                f"train.gradient_checkpointing=selective with hardware.strategy={hw.strategy}: ZeRO-3 gathers a "
                "layer's weights again while the layer is recomputed, which selective checkpointing cannot replay; "
                "use train.gradient_checkpointing=true, or hardware=zero2 / ddp."
            )
        if cfg.train.nonfinite_tolerance and not self.drops_steps:
            raise UserError(
                f"train.nonfinite_tolerance={cfg.train.nonfinite_tolerance} with hardware.strategy="
                f"{hw.strategy}: DeepSpeed applies each update inside its backward pass, so a bad step cannot "
                "be dropped; use train.nonfinite_tolerance=0 (the run stops at the first non-finite step), "
                "or hardware=ddp / fsdp2."
            )


@dataclass(frozen=True)
class DDP(Strategy):
    def training_kwargs(self, hw, run_dir: Path) -> Dict:
        return {
            "ddp_find_unused_parameters": False,
            "ddp_backend": None if devices.of(hw).gpu else devices.of(hw).backend,
        }


@dataclass(frozen=True)
class FSDP2(Strategy):
    """FSDP2: full shard, wrapped per decoder layer (the model's _no_split_modules), full state dict on save (a
    sharded one makes Trainer.save_model write nothing)."""

    def fsdp_config(self, hw) -> Dict:
        return {
            "version": 2,
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
            "cpu_offload": hw.offload,
            "activation_checkpointing": hw.activation_checkpointing,
            "cpu_ram_efficient_loading": False,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        }

    def before_worker(self, hw) -> None:
        if not devices.of(hw).gpu:  # accelerate never turns FSDP on for CPU processes by itself
            enable_cpu_fsdp()

    def accelerate_extra(self, hw, run_dir: Path) -> Dict:
        if not devices.of(hw).gpu:  # accelerate would start FSDP on CPU as one process; the worker turns FSDP on itself
            return {"distributed_type": "MULTI_GPU"}
        c = self.fsdp_config(hw)
        return {
            "fsdp_config": {
                "fsdp_version": 2,
                "fsdp_auto_wrap_policy": c["auto_wrap_policy"],
                "fsdp_offload_params": c["cpu_offload"],
                "fsdp_state_dict_type": c["state_dict_type"],
                "fsdp_reshard_after_forward": True,
                "fsdp_activation_checkpointing": c["activation_checkpointing"],
                "fsdp_cpu_ram_efficient_loading": False,
            }
        }

    def training_kwargs(self, hw, run_dir: Path) -> Dict:
        return {
            "fsdp": "full_shard auto_wrap" + (" offload" if hw.offload else ""),
            "fsdp_config": self.fsdp_config(hw),
        }

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.hardware.offload and not devices.of(cfg.hardware).gpu:
            raise UserError(
                "hardware.offload=true moves FSDP2 parameters from the GPUs to CPU memory; with "
                "hardware.device=cpu they are there already: remove hardware.offload."
            )
        if cfg.train.gradient_checkpointing:
            raise UserError(
                "with hardware.strategy=fsdp2 use hardware.activation_checkpointing=true (FSDP's own) "
                "instead of train.gradient_checkpointing=true, which adds a redundant all-gather in backward."
            )


@dataclass(frozen=True)
class Zero(Strategy):
    """DeepSpeed ZeRO; "auto" values in its JSON are filled by the Trainer from the spec's batch, lr and precision."""

    stage: int = 2

    def deepspeed_config(self, hw) -> Dict:
        zero: Dict = {"stage": self.stage, "overlap_comm": devices.of(hw).gpu, "contiguous_gradients": True}
        if self.stage == 3:
            zero.update(
                stage3_gather_16bit_weights_on_model_save=True,
                stage3_prefetch_bucket_size="auto",
                stage3_param_persistence_threshold="auto",
                reduce_bucket_size="auto",
            )
        if hw.offload and self.offload:
            zero.update(
                offload_param={"device": "cpu", "pin_memory": devices.of(hw).gpu},
                offload_optimizer={"device": "cpu", "pin_memory": devices.of(hw).gpu},
            )
        return {
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto",
            "zero_optimization": zero,
            "bf16": {"enabled": "auto"},
            "fp16": {"enabled": "auto"},
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
        }

    def accelerate_extra(self, hw, run_dir: Path) -> Dict:
        # precision is in the DeepSpeed JSON ("auto" = the Trainer's); accelerate refuses both
        return {
            "mixed_precision": None,
            "deepspeed_config": {
                "deepspeed_config_file": str(run_dir / DEEPSPEED_CONFIG),
                "zero3_init_flag": False,
                "deepspeed_multinode_launcher": "standard",
            },
        }

    def write_engine_config(self, hw, run_dir: Path) -> None:
        (run_dir / DEEPSPEED_CONFIG).write_text(json.dumps(self.deepspeed_config(hw), indent=2) + "\n")

    def training_kwargs(self, hw, run_dir: Path) -> Dict:
        return {"deepspeed": str(run_dir / DEEPSPEED_CONFIG)}

    def after_process_group(self, hw) -> None:
        """ZeRO-3 loads the model already partitioned (deepspeed.zero.Init), which needs DeepSpeed's own view of the
        process group; on CPU (use_cpu) the Trainer never starts it, so the worker does, over the existing group."""
        if self.stage == 3:
            import deepspeed

            deepspeed.init_distributed(dist_backend=devices.of(hw).backend)


def enable_cpu_fsdp() -> None:
    """Make accelerate shard with FSDP on CPU processes (gloo) instead of silently running plain DDP.

    accelerate's AcceleratorState turns FSDP on only for GPU-like distributed types; on MULTI_CPU it drops the
    plugin. This wraps __init__ so that, on MULTI_CPU with an FSDP plugin, the state says FSDP, exactly as it
    would on GPUs. Only called by CPU workers with strategy fsdp2; tests assert the parameters are sharded.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(AcceleratorState.__init__, "_fttool_cpu_fsdp", False):
        return
    original = AcceleratorState.__init__

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._fttool_cpu_fsdp = True
    AcceleratorState.__init__ = __init__


STRATEGIES: Dict[str, Strategy] = {
    s.name: s
    for s in (
        Strategy("none", "in the fttool process"),
        DDP("ddp", "DDP (each process holds the whole model)", "MULTI_GPU", bucket_copy=True),
        FSDP2(
            "fsdp2",
            "FSDP2 full shard (parameters, gradients and optimizer state sharded)",
            "FSDP",
            shards="all",
            offload=True,
            own_checkpointing=True,
        ),
        Zero(
            "zero2",
            "DeepSpeed ZeRO-2 (optimizer state and gradients partitioned)",
            "DEEPSPEED",
            shards="optimizer+gradients",
            drops_steps=False,
            fp32_masters=True,
            stage=2,
        ),
        Zero(
            "zero3",
            "DeepSpeed ZeRO-3 (parameters, gradients and optimizer state partitioned)",
            "DEEPSPEED",
            shards="all",
            offload=True,
            drops_steps=False,
            fp32_masters=True,
            stage=3,
        ),
    )
}
NAMES = tuple(STRATEGIES)


def of(spec_or_hardware) -> Strategy:
    hw = getattr(spec_or_hardware, "hardware", spec_or_hardware)
    return STRATEGIES[hw.strategy]
