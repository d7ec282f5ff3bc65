"""Weights & Biases: one W&B run per fttool run, started by process 0 only.

The resolved spec is the W&B config, the run folder's path is in the summary, sweep trials share a group, and
W&B's files go into the run folder. The API key is read by wandb from WANDB_API_KEY or its own login file;
fttool never reads it, so it cannot land in spec.yaml, env.json or anything else fttool writes.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict
from pathlib import Path

WANDB_ID = "wandb_id.txt"  # the W&B run id, so a resumed fttool run continues the same W&B run


def start(spec, run_dir: Path) -> None:
    lg = spec.logging
    if lg.backend != "wandb":
        return
    import wandb

    id_file = run_dir / WANDB_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    wandb.init(
        project=lg.project or os.environ.get("WANDB_PROJECT") or "fttool",
        entity=lg.entity,
        name=spec.run_name,
        group=lg.group,
        tags=list(lg.tags) or None,
        dir=str(run_dir),
        id=run_id,
        resume="allow",
        config=json.loads(json.dumps(asdict(spec), default=str)),
        mode=lg.mode,
    )  # the spec's mode, not the environment's
    wandb.run.summary["run_dir"] = str(run_dir)


def log_eval(result) -> None:
    """The held-out evaluation into the W&B run's summary: eval/<side>/<metric>, eval/verdict."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None or not result or "finetuned" not in result:
        return
    for side in ("finetuned", "base"):
        for metric, value in (result.get(side) or {}).items():
            wandb.run.summary[f"eval/{side}/{metric}"] = value
    wandb.run.summary["eval/verdict"] = result.get("verdict")


def finish(run_dir: Path) -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.run.summary["run_dir"] = str(run_dir)
        wandb.finish()
