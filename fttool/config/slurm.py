"""SLURM's part of a spec: hardware.machine_rank=-1, num_machines=0 and main_address=slurm are placeholders a SLURM
job fills in (SLURM_NODEID, SLURM_NNODES, the job's first node); outside a job they are refused."""

from __future__ import annotations

import os
import subprocess

from fttool.errors import UserError


def unresolved_slurm(hw) -> bool:
    return hw.machine_rank == -1 or hw.num_machines == 0 or hw.main_address == "slurm"


def check_resolved(hw) -> None:
    """`train` and `check` alike: the SLURM placeholders need a SLURM job to fill them in."""
    if unresolved_slurm(hw):
        raise UserError(
            "hardware.machine_rank=-1, num_machines=0 or main_address=slurm are filled in by a SLURM job, "
            "and this is not one: submit it with -m hydra/launcher=slurm (see README, Scaling out), or give "
            "hardware.machine_rank, hardware.num_machines and hardware.main_address yourself."
        )


def resolve_slurm(hw) -> None:
    """Fill machine rank, machine count and main address from the SLURM job this runs in (values -1, 0, "slurm")."""
    if not unresolved_slurm(hw):
        return
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        raise UserError(
            "hardware.machine_rank=-1, num_machines=0 or main_address=slurm take their values from a SLURM "
            "job, but SLURM_JOB_ID is not set; outside SLURM give them explicitly."
        )
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
