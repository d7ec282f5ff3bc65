"""The read side of a run folder (see launch/rundir.py for what it holds and how it is made): its frozen spec,
read without resolving anything in it; the folder named on a command line; the weights to use; the lineage of the
model it trained."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from fttool.config import specfile
from fttool.config.spec import RunSpec
from fttool.errors import UserError
from fttool.runfolder import runfiles

SPEC_FILE, CHECKPOINTS, FINAL = runfiles.SPEC, runfiles.CHECKPOINTS, runfiles.FINAL


def spec_to_yaml(spec: RunSpec) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(asdict(spec)))


def load_spec(run_dir: Path) -> RunSpec:
    """The run's frozen spec, interpolations never resolved (read_spec_tree)."""
    from fttool.config.validation import to_spec

    path = Path(run_dir) / SPEC_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: {run_dir} is not an fttool run folder.")
    return to_spec(specfile.read_tree(path))


def load_spec_to_use(run_dir: Path, trust_remote_code: bool) -> RunSpec:
    """A run folder's spec for the run verbs (eval, export, generate, chat): model.trust_remote_code is what this
    command line says, never what the folder says (it may be someone else's)."""
    spec = load_spec(run_dir)
    if spec.model.trust_remote_code and not trust_remote_code:
        raise UserError(
            f"{run_dir} was trained with model.trust_remote_code=true ({spec.model.name_or_path} runs its own "
            "code); a run folder never turns that on by itself: add trust_remote_code=true to this command if you "
            "trust that model's code."
        )
    return replace(spec, model=replace(spec.model, trust_remote_code=trust_remote_code))


def run_dir_of(spec: RunSpec) -> Path:
    return Path(spec.output_dir).expanduser().resolve() / str(spec.run_name)


def open_run(path: str, key: str = "run") -> Path:
    """A run folder named on the command line (run=PATH), checked: it exists and holds spec.yaml."""
    run_dir = Path(path).expanduser().resolve()
    if not run_dir.is_dir():
        raise UserError(f"{key}={path}: no such folder; give a run folder (<output_dir>/<run_name>, e.g. runs/my-run).")
    if not (run_dir / SPEC_FILE).is_file():
        hint = " It looks like an exported model: use model=PATH." if (run_dir / "config.json").is_file() else ""
        raise UserError(f"{key}={path}: not an fttool run folder (no {SPEC_FILE}).{hint}")
    return run_dir


def checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints (their manifest is there and the sizes agree: see checkpoint.py), oldest first."""
    from fttool.runfolder.checkpoint import complete

    return complete(run_dir)


def weights_dir(run_dir: Path, spec: RunSpec, checkpoint: str = FINAL) -> Path:
    """The folder with the weights to use: final/ (default), best, last or a step number of checkpoints/, checked to
    hold an adapter (LoRA/QLoRA) or a model (full)."""
    done = checkpoints(run_dir)
    steps = ", ".join(c.name for c in done) or "none"
    if checkpoint == FINAL:
        path = run_dir / FINAL
        if not path.is_dir():
            resume = f"fttool resume=auto run_name={spec.run_name} output_dir={spec.output_dir}"
            raise UserError(
                f"run={run_dir} has no final/: the run did not finish (interrupted or failed). Use a checkpoint "
                f"with checkpoint=last ({steps}), or finish the run: {resume}"
            )
    elif checkpoint == "best":
        path = run_dir / CHECKPOINTS / "best"
        if not path.exists():
            raise UserError(
                f"run={run_dir} has no best checkpoint (it is kept when the run validates during training: "
                f"data.val_ratio > 0 and train.load_best=true); use checkpoint=final or one of: {steps}."
            )
    elif checkpoint == "last":
        if not done:
            raise UserError(f"run={run_dir} has no complete checkpoint in checkpoints/; use checkpoint=final.")
        path = done[-1]
    elif checkpoint.isdigit():
        path = run_dir / CHECKPOINTS / f"checkpoint-{checkpoint}"
        if path not in done:
            raise UserError(f"checkpoint={checkpoint}: {path} is not a complete checkpoint; available: {steps}.")
    else:
        raise UserError(f"checkpoint={checkpoint}: expected final, best, last or a step number.")
    path = path.resolve()
    from fttool.config import methods

    method = methods.of(spec)
    problem = method.weights_problem(path)
    if problem:
        raise UserError(
            f"{path} holds no {method.holds} ({problem}) although the run trained method={spec.method.name}; "
            "it may be incomplete or copied without its files: use another checkpoint=."
        )
    return path


def lineage(spec) -> List[Dict[str, Any]]:
    """Where this run's starting model comes from, oldest first: the base model, then each run it continues
    (model.from_run), each with its method, objective and data hash (the data cache key). This run's own entry is
    added by the worker (data.json, result.json, the model card and exports carry the whole list)."""
    if not spec.model.from_run:
        return [{"base": spec.model.name_or_path}]
    parent = Path(spec.model.from_run)
    record = runfiles.read_json(parent / runfiles.DATA) or runfiles.read_json(parent / "fttool" / runfiles.DATA)
    if record and record.get("lineage"):
        return list(record["lineage"])
    if not (parent / SPEC_FILE).is_file():  # an export folder made elsewhere
        return [{"base": str(parent)}]
    before = load_spec(parent)
    return [{"base": before.model.name_or_path}, lineage_entry(parent, before, record)]


def lineage_entry(run_dir: Path, spec, data_record: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {
        "run": str(run_dir),
        "method": spec.method.name,
        "objective": spec.objective.name,
        "data": Path(data_record["cache_dir"]).name if data_record and data_record.get("cache_dir") else None,
    }
