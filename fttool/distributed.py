"""Several processes and machines: the accelerate config and DeepSpeed JSON a run uses, generated from the
spec into the run folder, the `accelerate launch` command, and what the Trainer needs to match them.

On CPU-only machines (tests, laptops) several processes talk over gloo. Three traps are handled here
(../CPU_STACK.md): `accelerate launch --cpu` starts one process, so CPU runs are launched as MULTI_GPU and
the worker asks for the CPU itself (use_cpu); DeepSpeed on the CPU needs use_cpu too; and accelerate never
turns FSDP on for MULTI_CPU, which strategies.FSDP2 corrects (`enable_cpu_fsdp`).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from fttool import strategies
from fttool.errors import UserError
from fttool.spec import world_size

ACCELERATE_CONFIG = "accelerate_config.yaml"
DEEPSPEED_CONFIG = strategies.DEEPSPEED_CONFIG


def is_distributed(hw) -> bool:
    return strategies.of(hw).distributed


def accelerate_config(hw, run_dir: Path, precision: str = "fp32") -> Dict:
    """What `accelerate launch --config_file` reads. num_processes there is the total over all machines."""
    strategy = strategies.of(hw)
    cfg: Dict = {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": strategy.accelerate_type,
        "num_processes": world_size(hw), "num_machines": hw.num_machines, "machine_rank": hw.machine_rank,
        "main_process_ip": hw.main_address, "main_process_port": hw.main_port, "rdzv_backend": "static",
        "same_network": True, "use_cpu": False, "mixed_precision": {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"),
        "main_training_function": "main", "debug": False,
    }
    cfg.update(strategy.accelerate_extra(hw, run_dir))
    return {k: v for k, v in cfg.items() if v is not None}


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
    strategies.of(hw).write_engine_config(hw, run_dir)
    return path


def training_kwargs(spec, run_dir: Path) -> Dict:
    """The TrainingArguments that make the Trainer use the same strategy as the generated configs."""
    return strategies.of(spec).training_kwargs(spec.hardware, run_dir)


def after_process_group(spec) -> None:
    strategies.of(spec).after_process_group(spec.hardware)


def launch_command(config_file: Path, run_dir: Path) -> List[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "-m", "fttool.train", str(run_dir)]


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
