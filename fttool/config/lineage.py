"""`model.from_run`: start a run from a finished run's result (or an export folder), e.g. DPO after SFT.

Resolved once, when the spec is built (no torch): a full fine-tune's `final/` or an export folder becomes
`model.name_or_path`; an adapter run gives its base as `model.name_or_path` and its adapter as
`model.parent_adapter`, which the worker merges into the base (`model.from_run_adapter=merge`, a new adapter is
trained on top) or keeps training (`continue`)."""

from __future__ import annotations

from pathlib import Path

from fttool.config import methods, specfile
from fttool.errors import UserError

MODES = ("merge", "continue")
FIX = "give a finished run folder (model.from_run=runs/NAME) or an export folder (fttool export ... output=DIR)"


def resolve(cfg, user_keys: set) -> None:
    """Fill model.name_or_path / model.parent_adapter from model.from_run (in place); UserError when it cannot be."""
    m = cfg.model
    if "model.parent_adapter" in user_keys:
        raise UserError("model.parent_adapter is set by fttool from model.from_run; give model.from_run=RUN instead.")
    if not m.from_run:
        return
    if m.from_run_adapter not in MODES:
        raise UserError(
            f"model.from_run_adapter={m.from_run_adapter} is not allowed; expected one of: merge, continue."
        )
    if "model.name_or_path" in user_keys:
        raise UserError(
            "model.from_run and model.name_or_path are both given: the run's result is the starting model; drop "
            "model.name_or_path."
        )
    path = Path(str(m.from_run)).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"model.from_run={m.from_run}: no such folder; {FIX}.")
    m.from_run = str(path)
    if not (path / "spec.yaml").is_file():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model.from_run={m.from_run}: neither a run folder (no spec.yaml) nor a model folder (no "
                f"config.json); {FIX}."
            )
        _plain_model(cfg, path, user_keys)
        return
    final = path / "final"
    if not final.is_dir():
        raise UserError(
            f"model.from_run={m.from_run}: the run has no final/ (it did not finish); continue it with "
            f"`fttool resume=auto run_name={path.name} output_dir={path.parent}` first."
        )
    if not (final / methods.ADAPTER_FILE).is_file():
        _plain_model(cfg, final, user_keys)
        return
    parent = specfile.read_tree(path / "spec.yaml").get("model") or {}  # never resolved: maybe someone else's
    if not isinstance(parent.get("name_or_path"), str) or "${" in parent["name_or_path"]:
        raise UserError(f"model.from_run={m.from_run}: its spec.yaml names no plain base model; {FIX}.")
    m.name_or_path, m.revision = parent["name_or_path"], parent.get("revision")
    m.parent_adapter = str(final)
    child = methods.of(cfg)
    if m.from_run_adapter == "continue" and not child.adapter:
        raise UserError(
            f"model.from_run_adapter=continue keeps training {path.name}'s adapter, but method={cfg.method.name} "
            "trains the full model; use an adapter method (method=lora, qlora, dora) or model.from_run_adapter=merge."
        )
    if m.from_run_adapter == "merge" and child.quantized:
        raise UserError(
            f"model.from_run={m.from_run} with method={cfg.method.name}: merging the run's adapter into a quantized "
            f"base is not supported; export it first (fttool export run={m.from_run} output=DIR) and use "
            "model.from_run=DIR, or model.from_run_adapter=continue."
        )


def _plain_model(cfg, folder: Path, user_keys: set) -> None:
    if "model.from_run_adapter" in user_keys and cfg.model.from_run_adapter == "continue":
        raise UserError(
            f"model.from_run_adapter=continue: {cfg.model.from_run} holds a full model, not an adapter; drop "
            "model.from_run_adapter (a new adapter, or a full fine-tune, starts from that model)."
        )
    cfg.model.name_or_path, cfg.model.revision = str(folder), None
