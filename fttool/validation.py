"""Rules on the composed config: allowed values, ranges, and combinations across groups.

Runs on the OmegaConf tree right after Hydra composes it, before anything heavy is imported, and
returns the typed :class:`RunSpec` with every derived value (learning rate, run name) filled in.
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from fttool.errors import UserError, suggestion
from fttool.spec import DTYPES, METHODS, PRECISIONS, RunSpec

CHOICES = {
    "model.dtype": DTYPES,
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
    "data.format": ("chat", "alpaca", "completion"),
    "data.truncation": ("truncate", "drop"),
    "method.name": METHODS,
    "method.quant_type": ("nf4", "fp4"),
    "method.compute_dtype": DTYPES,
    "hardware.device": ("cpu", "cuda"),
    "hardware.precision": PRECISIONS,
    "logging.backend": ("none", "wandb"),
    "logging.mode": ("online", "offline", "disabled"),
    "train.lr_scheduler": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay"),
    "resume": ("never", "auto"),
}

# key -> (predicate, what is expected)
RANGES: List[Tuple[str, Callable[[Any], bool], str]] = [
    ("method.rank", lambda v: v >= 1, "an integer >= 1 (common: 8, 16, 64)"),
    ("method.alpha", lambda v: v > 0, "a number > 0 (common: 2 x rank)"),
    ("method.dropout", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("method.target_modules", lambda v: len(v) > 0, "a non-empty list of module names, e.g. [q_proj,v_proj]"),
    ("method.bits", lambda v: v in (4, 8), "4 or 8"),
    ("method.default_lr", lambda v: v > 0, "a number > 0"),
    ("model.lr_scale", lambda v: v > 0, "a number > 0"),
    ("train.lr", lambda v: v is None or v > 0, "a number > 0, e.g. 2e-4"),
    ("train.warmup_ratio", lambda v: 0 <= v < 1, "a number in [0, 1)"),
    ("train.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("train.max_grad_norm", lambda v: v > 0, "a number > 0"),
    ("train.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.grad_accum", lambda v: v >= 1, "an integer >= 1"),
    ("train.epochs", lambda v: v > 0, "a number > 0"),
    ("train.max_steps", lambda v: v is None or v >= 1, "an integer >= 1, or null to use train.epochs"),
    ("train.logging_steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.save_steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.save_total_limit", lambda v: v >= 1, "an integer >= 1"),
    ("train.dataloader_workers", lambda v: v >= 0, "an integer >= 0"),
    ("data.max_length", lambda v: v >= 8, "an integer >= 8"),
    ("data.max_samples", lambda v: v is None or v >= 1, "an integer >= 1, or null for all rows"),
    ("eval.samples", lambda v: v >= 0, "an integer >= 0 (0 skips the comparison)"),
    ("eval.max_new_tokens", lambda v: v >= 1, "an integer >= 1"),
    ("hardware.num_processes", lambda v: v >= 1, "an integer >= 1"),
    ("seed", lambda v: v >= 0, "an integer >= 0"),
]

REQUIRED = {
    "model.name_or_path": "a hub id or local folder: model.name_or_path=PATH, or pick a model group option (model=...)",
    "data.path": "a data file or hub dataset id: data.path=FILE (e.g. data=chat data.path=my_chats.jsonl)",
}

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$")


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def check(cfg: DictConfig, user_keys: Optional[set] = None) -> None:
    """Raise UserError for the first rule the composed config breaks."""
    for key, fix in REQUIRED.items():
        if _missing(cfg, key) or _select(cfg, key) in (None, ""):
            raise UserError(f"{key} is not set; expected {fix}.")
    method_keys = set(cfg.method.keys())
    for key, allowed in CHOICES.items():
        if not _applies(key, method_keys):
            continue
        val = _select(cfg, key)
        if val not in allowed:
            raise UserError(f"{key}={val} is not allowed; expected one of: {', '.join(allowed)}.{suggestion(val, allowed, '{}')}")
    for key, ok, expected in RANGES:
        if not _applies(key, method_keys):
            continue
        val = _select(cfg, key)
        if not ok(val):
            raise UserError(f"{key}={val} is out of range; expected {expected}.")
    _check_combinations(cfg, user_keys or set())


def _applies(key: str, method_keys: set) -> bool:
    """A method.* rule applies only to the methods that have that key (bits for qlora, rank for lora/qlora)."""
    return not key.startswith("method.") or key.split(".", 1)[1] in method_keys


def _missing(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    return OmegaConf.is_missing(OmegaConf.select(cfg, parent), leaf)


def _check_combinations(cfg: DictConfig, user_keys: set) -> None:
    hw = cfg.hardware
    if hw.device == "cpu" and hw.precision == "fp16":
        raise UserError(
            "hardware.precision=fp16 needs a CUDA GPU, but hardware.device=cpu; "
            "on the CPU use hardware.precision=fp32 (or bf16), or pick hardware=single_gpu."
        )
    if cfg.method.name == "qlora" and cfg.method.bits == 8 and cfg.method.quant_type != "nf4":
        raise UserError("method.quant_type applies to 4-bit only; with method.bits=8 leave it at nf4.")
    if hw.num_processes > 1:
        raise UserError(
            f"hardware.num_processes={hw.num_processes}: multi-process launch is not available yet; "
            "use hardware=cpu or hardware=single_gpu (num_processes=1)."
        )
    if cfg.model.trust_remote_code and "model.trust_remote_code" not in user_keys:
        raise UserError(
            "model.trust_remote_code=true was set by a config file or recipe; running a model's own code "
            "must be asked for on the command line: add model.trust_remote_code=true yourself."
        )
    if cfg.resume == "auto" and not cfg.run_name:
        raise UserError("resume=auto needs the run to continue: add run_name=NAME (the run folder's name).")
    if cfg.run_name is not None and not _RUN_NAME.match(str(cfg.run_name)):
        raise UserError(f"run_name={cfg.run_name!r}: use letters, digits and . _ - + = , only (no slashes or spaces).")


def default_run_name(cfg: DictConfig, recipe: Optional[str], job_num: Optional[int] = None) -> str:
    stem = recipe or f"{_leaf(cfg.model.name_or_path)}-{cfg.method.name}"
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return name if job_num is None else f"{name}-{job_num}"


def _leaf(name_or_path: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name_or_path).rstrip("/").split("/")[-1].split(":")[-1]).strip("-") or "model"


def build(cfg: DictConfig, user_keys: Optional[set] = None, recipe: Optional[str] = None, job_num: Optional[int] = None) -> RunSpec:
    """Check the composed config and return the typed, fully resolved RunSpec."""
    check(cfg, user_keys)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # detach from Hydra, resolve interpolations
    if cfg.train.lr is None:
        cfg.train.lr = float(cfg.method.default_lr * cfg.model.lr_scale)
    if cfg.run_name is None:
        cfg.run_name = default_run_name(cfg, recipe, job_num)
    for key in LOCAL_PATH_KEYS:  # the run folder must not depend on the directory it was started from
        OmegaConf.update(cfg, key, _absolute(OmegaConf.select(cfg, key)))
    return to_spec(cfg)


LOCAL_PATH_KEYS = ("model.name_or_path", "data.path", "data.test_path")


def _absolute(path: Optional[str]) -> Optional[str]:
    """An existing local path made absolute; hub ids and fttool: assets unchanged."""
    from pathlib import Path

    if not path or str(path).startswith("fttool:"):
        return path
    local = Path(str(path)).expanduser()
    return str(local.resolve()) if local.exists() else path


def to_spec(cfg: Any) -> RunSpec:
    """A plain config tree (as read back from spec.yaml) -> typed RunSpec."""
    from fttool.spec import METHOD_SCHEMAS

    schema = OmegaConf.structured(RunSpec)
    tree = OmegaConf.create(OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else cfg)
    method_tree = tree.pop("method")
    merged = OmegaConf.merge(schema, tree)
    merged.method = OmegaConf.merge(OmegaConf.structured(METHOD_SCHEMAS[method_tree["name"]]), method_tree)
    return OmegaConf.to_object(merged)
