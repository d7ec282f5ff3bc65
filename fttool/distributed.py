"""Several processes and machines: the accelerate config and DeepSpeed JSON a run uses, generated from the
spec into the run folder, the `accelerate launch` command, and what the Trainer needs to match them.

On CPU-only machines (tests, laptops) several processes talk over gloo. Three traps are handled here
(../CPU_STACK.md): `accelerate launch --cpu` starts one process, so CPU runs are launched as MULTI_GPU and
the worker asks for the CPU itself (use_cpu); DeepSpeed on the CPU needs use_cpu too; and accelerate never
turns FSDP on for MULTI_CPU, which `enable_cpu_fsdp` corrects.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from fttool.errors import UserError

ACCELERATE_CONFIG = "accelerate_config.yaml"
DEEPSPEED_CONFIG = "deepspeed.json"


def world_size(hw) -> int:
    return hw.num_processes * hw.num_machines


def is_distributed(hw) -> bool:
    return hw.strategy != "none"


def deepspeed_config(hw) -> Dict:
    """ZeRO-2/3 settings; "auto" values are filled by the Trainer from the spec's batch, lr and precision."""
    zero: Dict = {"stage": 2 if hw.strategy == "zero2" else 3, "overlap_comm": hw.device == "cuda",
                  "contiguous_gradients": True}
    if hw.strategy == "zero3":
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_prefetch_bucket_size="auto",
                    stage3_param_persistence_threshold="auto", reduce_bucket_size="auto")
        if hw.offload:
            zero.update(offload_param={"device": "cpu", "pin_memory": hw.device == "cuda"},
                        offload_optimizer={"device": "cpu", "pin_memory": hw.device == "cuda"})
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
    }


def fsdp_config(hw) -> Dict:
    """FSDP2: full shard, wrapped per decoder layer (the model's _no_split_modules), full state dict on save
    (a sharded one makes Trainer.save_model write nothing)."""
    return {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
            "cpu_offload": hw.offload, "activation_checkpointing": hw.activation_checkpointing,
            "cpu_ram_efficient_loading": False, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"}


def accelerate_config(hw, run_dir: Path, precision: str = "fp32") -> Dict:
    """What `accelerate launch --config_file` reads. num_processes there is the total over all machines."""
    kind = {"ddp": "MULTI_GPU", "fsdp2": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}[hw.strategy]
    if hw.device == "cpu" and kind == "FSDP":
        kind = "MULTI_GPU"  # accelerate would start FSDP on CPU as one process; the worker turns FSDP on itself
    cfg: Dict = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": kind, "num_processes": world_size(hw),
        "num_machines": hw.num_machines, "machine_rank": hw.machine_rank, "main_process_ip": hw.main_address,
        "main_process_port": hw.main_port, "rdzv_backend": "static", "same_network": True, "use_cpu": False,
        "mixed_precision": {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"), "main_training_function": "main",
        "debug": False,
    }
    if kind == "DEEPSPEED":
        del cfg["mixed_precision"]  # precision is in the DeepSpeed JSON ("auto" = the Trainer's); accelerate refuses both
        cfg["deepspeed_config"] = {"deepspeed_config_file": str(run_dir / DEEPSPEED_CONFIG), "zero3_init_flag": False,
                                   "deepspeed_multinode_launcher": "standard"}
    if hw.strategy == "fsdp2" and hw.device == "cuda":
        c = fsdp_config(hw)
        cfg["fsdp_config"] = {"fsdp_version": 2, "fsdp_auto_wrap_policy": c["auto_wrap_policy"],
                              "fsdp_offload_params": c["cpu_offload"], "fsdp_state_dict_type": c["state_dict_type"],
                              "fsdp_reshard_after_forward": True, "fsdp_activation_checkpointing": c["activation_checkpointing"],
                              "fsdp_cpu_ram_efficient_loading": False}
    return cfg


def accelerate_config_path(spec, run_dir: Path) -> Path:
    """One file per machine when there are several (each names its own machine_rank)."""
    hw = spec.hardware
    name = ACCELERATE_CONFIG if hw.num_machines == 1 else ACCELERATE_CONFIG.replace(".yaml", f".machine{hw.machine_rank}.yaml")
    return run_dir / name


def write_configs(spec, run_dir: Path, precision: str) -> Path:
    """The engine configs this run uses, where a person can read exactly what ran. Returns the accelerate config."""
    from omegaconf import OmegaConf

    hw = spec.hardware
    path = accelerate_config_path(spec, run_dir)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(accelerate_config(hw, run_dir, precision))))
    if hw.strategy in ("zero2", "zero3"):
        (run_dir / DEEPSPEED_CONFIG).write_text(json.dumps(deepspeed_config(hw), indent=2) + "\n")
    return path


def training_kwargs(spec, run_dir: Path) -> Dict:
    """The TrainingArguments that make the Trainer use the same strategy as the generated configs."""
    hw = spec.hardware
    if hw.strategy == "fsdp2":
        return {"fsdp": "full_shard auto_wrap" + (" offload" if hw.offload else ""), "fsdp_config": fsdp_config(hw)}
    if hw.strategy in ("zero2", "zero3"):
        return {"deepspeed": str(run_dir / DEEPSPEED_CONFIG)}
    if hw.strategy == "ddp":
        return {"ddp_find_unused_parameters": False, "ddp_backend": "gloo" if hw.device == "cpu" else None}
    return {}


def after_process_group(spec) -> None:
    """ZeRO-3 loads the model already partitioned (deepspeed.zero.Init), which needs DeepSpeed's own view of the
    process group; on CPU (use_cpu) the Trainer never starts it, so the worker does, over the existing group."""
    if spec.hardware.strategy == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if spec.hardware.device == "cpu" else "nccl")


def launch_command(config_file: Path, run_dir: Path) -> List[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "-m", "fttool.train", str(run_dir)]


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


# -- SLURM ------------------------------------------------------------------------------------------------
def unresolved_slurm(hw) -> bool:
    return hw.machine_rank == -1 or hw.num_machines == 0 or hw.main_address == "slurm"


def check_resolved(hw) -> None:
    """`train` and `check` alike: the SLURM placeholders need a SLURM job to fill them in."""
    if unresolved_slurm(hw):
        raise UserError("hardware.machine_rank=-1, num_machines=0 or main_address=slurm are filled in by a SLURM job, "
                        "and this is not one: submit it with -m hydra/launcher=slurm (see README, Scaling out), or give "
                        "hardware.machine_rank, hardware.num_machines and hardware.main_address yourself.")


def resolve_slurm(hw) -> None:
    """Fill machine rank, machine count and main address from the SLURM job this runs in (values -1, 0, "slurm")."""
    if not unresolved_slurm(hw):
        return
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        raise UserError("hardware.machine_rank=-1, num_machines=0 or main_address=slurm take their values from a SLURM "
                        "job, but SLURM_JOB_ID is not set; outside SLURM give them explicitly.")
    if hw.machine_rank == -1:
        hw.machine_rank = int(env["SLURM_NODEID"])
    if hw.num_machines == 0:
        hw.num_machines = int(env["SLURM_NNODES"])
    if hw.main_address == "slurm":
        hw.main_address = first_host(env["SLURM_JOB_NODELIST"])


def first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # no scontrol: "node[01-04],gpu7" -> "node01"
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rng = head.split("[", 1)
        return prefix + rng.split("-")[0].split(",")[0].rstrip("]")
    return head
