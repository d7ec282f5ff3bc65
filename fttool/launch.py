"""From a validated spec to a running job: create the run folder, then train in this process or launch workers."""
from __future__ import annotations

from typing import Dict, List

from fttool import rundir
from fttool.spec import RunSpec


def launch(spec: RunSpec, argv: List[str], choices: Dict) -> None:
    from fttool.model import check_device

    check_device(spec)  # before anything is written
    run_dir, created = rundir.prepare(spec, argv, choices)
    print(f"fttool: run folder {run_dir}", flush=True)
    from fttool.train import CHECKPOINTS, train

    try:
        train(run_dir)
    except Exception:  # a UserError (bad data, bad model path) or a crash before the first step
        if created and not (run_dir / CHECKPOINTS).exists():
            rundir.discard(run_dir)  # failed before training began: leave nothing half-written
        raise
