"""Processes that end with the one that started them: a killed launcher (kill -9, an OOM kill) must not leave its
training processes running beside the next launch of the same run."""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(sig: int = signal.SIGTERM, parent: int = 0) -> None:
    """Ask the kernel to send `sig` to this process when its parent ends (Linux' PR_SET_PDEATHSIG; nothing
    elsewhere). `parent`: the pid the parent had, to catch one that ended before the request was made. SIGTERM lets a
    training process stop at a clean point (safe_trainer.Preemption saves a checkpoint first)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != parent:  # the parent is already gone
        os.kill(os.getpid(), sig)
