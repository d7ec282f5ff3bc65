import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one tokenized-data cache for the session, never the user's own
os.environ.setdefault("FTTOOL_CACHE", tempfile.mkdtemp(prefix="fttool-cache-"))


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m fttool ARGS` as a user would; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "fttool", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def cli():
    return run_cli


def make_spec(overrides, tmp_path):
    """Compose + validate like the CLI does and return the RunSpec (no Hydra app run)."""
    from fttool.config import compose, registry, validation

    registry.register()
    ovs = [f"output_dir={tmp_path}"] + list(overrides)
    cfg = compose.compose(ovs)
    return validation.build(cfg, compose.user_keys(ovs), compose.recipe_of(ovs))


def train_run(overrides, tmp_path, name="run"):
    """Create a run folder from overrides and train it in this process; returns (run_dir, summary)."""
    from fttool.launch import rundir
    from fttool.worker.train import train

    spec = make_spec(list(overrides) + [f"run_name={name}"], tmp_path)
    run_dir, _ = rundir.prepare(spec, ["pytest"], {})
    try:
        return run_dir, train(run_dir)
    finally:
        rundir.unlock(run_dir)  # as the launcher does


FAST = [
    "train.max_steps=6",
    "train.logging_steps=1",
    "train.batch_size=4",
    "train.grad_accum=1",
    "data.max_samples=64",
    "eval.after_training=false",
    "train.save_steps=3",
]
