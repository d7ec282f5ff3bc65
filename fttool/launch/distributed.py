"""Several processes and machines: the accelerate config and DeepSpeed JSON a run uses, generated from the
spec into the run folder, the `accelerate launch` command, and what the Trainer needs to match them.

On CPU-only machines (tests, laptops) several processes talk over gloo. Three traps of accelerate are handled
here: `accelerate launch --cpu` starts one process, so CPU runs are launched as MULTI_GPU and
the worker asks for the CPU itself (use_cpu); DeepSpeed on the CPU needs use_cpu too; and accelerate never
turns FSDP on for MULTI_CPU, which strategies.FSDP2 corrects (`enable_cpu_fsdp`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

from fttool.config import strategies
from fttool.config.spec import world_size

ACCELERATE_CONFIG = "accelerate_config.yaml"
DEEPSPEED_CONFIG = strategies.DEEPSPEED_CONFIG


def is_distributed(hw) -> bool:
    return strategies.of(hw).distributed


def accelerate_config(hw, run_dir: Path, precision: str = "fp32") -> Dict:
    """What `accelerate launch --config_file` reads. num_processes there is the total over all machines."""
    strategy = strategies.of(hw)
    cfg: Dict = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": strategy.accelerate_type,
        "num_processes": world_size(hw),
        "num_machines": hw.num_machines,
        "machine_rank": hw.machine_rank,
        "main_process_ip": hw.main_address,
        "main_process_port": hw.main_port,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,
        "mixed_precision": {"bf16": "bf16", "fp16": "fp16"}.get(precision, "no"),
        "main_training_function": "main",
        "debug": False,
    }
    cfg.update(strategy.accelerate_extra(hw, run_dir))
    return {k: v for k, v in cfg.items() if v is not None}


def accelerate_config_path(spec, run_dir: Path) -> Path:
    """One file per machine when there are several (each names its own machine_rank)."""
    hw = spec.hardware
    name = (
        ACCELERATE_CONFIG
        if hw.num_machines == 1
        else ACCELERATE_CONFIG.replace(".yaml", f".machine{hw.machine_rank}.yaml")
    )
    return run_dir / name


def write_configs(spec, run_dir: Path, precision: str) -> Path:
    """The engine configs this run uses, where a person can read exactly what ran. Returns the accelerate config."""
    from omegaconf import OmegaConf

    hw = spec.hardware
    path = accelerate_config_path(spec, run_dir)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(accelerate_config(hw, run_dir, precision))))
    strategies.of(hw).write_engine_config(hw, run_dir)
    return path


def launch_command(config_file: Path, run_dir: Path) -> List[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "-m",
        "fttool.worker.train",
        str(run_dir),
    ]
