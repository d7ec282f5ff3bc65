"""Which signals stop a run cleanly, and the SLURM job that requeues itself after such a stop.

SIGTERM (SLURM and Kubernetes preemption) and SIGUSR1 (`sbatch --signal=USR1@120`) always do. Inside a job submitted
through Hydra's submitit launcher (hydra/launcher=slurm) so does submitit's preemption and time-limit signal
(SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise): the run saves a checkpoint of its step, then hands over to
submitit, which requeues the job; the requeued job continues the same run folder (rundir.prepare, `requeued`).
Light on imports: the launcher uses it before torch is loaded.
"""

from __future__ import annotations

import os
import signal
from typing import Callable, Optional, Tuple


def submitit_signal() -> Optional[int]:
    """submitit's preemption signal when this process runs in a submitit SLURM job, else None."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def stop_signals() -> Tuple[int, ...]:
    extra = submitit_signal()
    return (signal.SIGTERM, signal.SIGUSR1) + (
        (extra,) if extra and extra not in (signal.SIGTERM, signal.SIGUSR1) else ()
    )


def requeue_handler() -> Optional[Callable]:
    """The handler submitit installed for its signal (it checkpoints the submission and runs `scontrol requeue`).
    Taken before fttool installs its own, and called once the run's checkpoint is saved."""
    sig = submitit_signal()
    if sig is None:
        return None
    handler = signal.getsignal(sig)
    return handler if callable(handler) else None


def slurm_job() -> Optional[str]:
    return os.environ.get("SLURM_JOB_ID") or None


def requeued() -> bool:
    """This process runs in a SLURM job that was requeued (preempted or timed out, then started again)."""
    try:
        return slurm_job() is not None and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False
