"""The run folder's file names, each defined once, and the small ways fttool reads and writes them: whole-or-nothing
writes (a temporary name, then a rename) and JSON-lines reading. See rundir.py for what each file holds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

SPEC = "spec.yaml"  # the resolved, frozen RunSpec every worker reads
COMMAND = "command.txt"  # the exact command lines (one per launch) and working directory
ENV = "env.json"  # python, platform, package versions, git revision, SLURM job
DATA = "data.json"  # the data fingerprint and statistics of what the run trained on
METRICS = "metrics.jsonl"  # one JSON object per logging step
RESULT = "result.json"  # the run's summary; its presence means the run finished
PLAN = "plan.json"  # `fttool plan`'s memory and time estimate, made at launch (result.json sets the measured beside it)
LOG = "train.log"
CHECKPOINTS = "checkpoints"  # checkpoint-N folders, and `best` linking to the one with the lowest validation loss
FINAL = "final"  # the trained adapter or model
ERRORS = "errors"  # errors/rank-N.txt (what a failed worker said) and rank-N.exit (the exit code it asked for)
LOCK = ".fttool.lock"  # who trains in this run folder now


def write_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or all of `text`, never part of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Any, indent: Optional[int] = 2) -> None:
    write_atomic(path, json.dumps(data, indent=indent, default=str) + "\n")


def read_json(path: Path) -> Optional[Any]:
    """The file's JSON, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """One object per non-empty line; [] when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
