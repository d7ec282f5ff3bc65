"""fttool's log: process 0 to stdout and the run's log file, the other processes warnings only (marked with their
rank); library chatter off. Used by the worker and by every verb that loads a model."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from fttool.runfolder import runfiles

log = logging.getLogger("fttool")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(run_dir: Path, main: bool = True, log_file: str = runfiles.LOG) -> None:
    """Process 0 logs to stdout and the run's log file; the other processes only warnings and errors, marked with
    their rank."""
    log.setLevel(logging.INFO if main else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    if main:
        fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
        handlers = [logging.StreamHandler(sys.stdout), logging.FileHandler(run_dir / log_file)]
    else:
        fmt = logging.Formatter(f"%(asctime)s [rank {rank()}] %(message)s", "%H:%M:%S")
        handlers = [logging.StreamHandler(sys.stderr)]
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    quiet_libraries()


def quiet_libraries() -> None:
    """Library chatter off: fttool prints its own progress."""
    logging.getLogger("bitsandbytes").setLevel(
        logging.ERROR
    )  # "Failed to load CPU gemm_4bit_forward" at import: harmless
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt: inputs will be cast.*")
    # DeepSpeed still calls the old collective names; torch warns on every call
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.\w+` is deprecated.*")
    # peft looks for the base model's config.json to see whether the vocabulary grew; a GGUF folder has none, and
    # fttool never resizes the vocabulary, so its assumption ("not modified") holds
    warnings.filterwarnings("ignore", message=r"Could not find a config file in .*vocabulary was not modified")
    import torch

    if not torch.cuda.is_available():  # what DeepSpeed would detect anyway, without its warning on every import
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
