"""Rules on the composed config: allowed values, ranges, and combinations across groups.

Runs on the OmegaConf tree right after Hydra composes it, before anything heavy is imported, and
returns the typed :class:`RunSpec` with every derived value (learning rate, run name) filled in.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from fttool.config import devices, lineage, losspath, methods, objectives, recipes, registry, strategies
from fttool.config.spec import DTYPES, PACKING, PRECISIONS, SELECTIVE, RunSpec, world_size
from fttool.data.formats import FORMATS
from fttool.errors import UserError, suggestion

CHOICES = {
    "model.dtype": DTYPES,
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
    "data.format": FORMATS,
    "data.truncation": ("truncate", "drop"),
    "data.train_turns": ("all", "last"),
    "data.packing": PACKING,
    "method.name": methods.METHODS,  # the tables themselves: a row added is a choice
    "method.quant_type": ("nf4", "fp4"),
    "method.compute_dtype": DTYPES,
    "hardware.device": devices.DEVICES,
    "hardware.precision": PRECISIONS,
    "hardware.strategy": strategies.STRATEGIES,
    "logging.backend": ("none", "wandb"),
    "logging.mode": ("online", "offline", "disabled"),
    "train.lr_scheduler": (
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
        "constant",
        "constant_with_warmup",
        "inverse_sqrt",
        "cosine_with_min_lr",
        "warmup_stable_decay",
    ),
    "resume": ("never", "auto"),
    "resume_data": ("same", "changed"),
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
    (
        "train.gradient_checkpointing",
        lambda v: isinstance(v, bool) or v == SELECTIVE,
        "true (recompute each layer), false or selective (recompute the elementwise ops only)",
    ),
    ("train.grad_accum", lambda v: v >= 1, "an integer >= 1"),
    ("train.epochs", lambda v: v > 0, "a number > 0"),
    ("train.max_steps", lambda v: v is None or v >= 1, "an integer >= 1, or null to use train.epochs"),
    ("train.logging_steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.save_steps", lambda v: v >= 1, "an integer >= 1"),
    ("train.save_total_limit", lambda v: v >= 1, "an integer >= 1"),
    ("train.dataloader_workers", lambda v: v >= 0, "an integer >= 0"),
    ("data.max_length", lambda v: v >= 8, "an integer >= 8"),
    ("data.max_samples", lambda v: v is None or v >= 1, "an integer >= 1, or null for all rows"),
    ("data.val_ratio", lambda v: 0 <= v < 1, "a fraction in [0, 1), e.g. 0.05"),
    ("data.test_ratio", lambda v: 0 <= v < 1, "a fraction in [0, 1), e.g. 0.05"),
    ("data.num_proc", lambda v: v >= 0, "an integer >= 0 (0 = automatic)"),
    (
        "data.train_roles",
        lambda v: len(v) > 0 and all(r in ("system", "user", "assistant", "tool") for r in v),
        "a non-empty list of roles from system, user, assistant, tool, e.g. [assistant]",
    ),
    ("eval.samples", lambda v: v is None or v >= 1, "an integer >= 1, or null for the whole test split"),
    ("eval.max_new_tokens", lambda v: v >= 1, "an integer >= 1"),
    ("eval.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("eval.show", lambda v: v >= 0, "an integer >= 0"),
    ("train.eval_steps", lambda v: v is None or v >= 1, "an integer >= 1, or null to validate at every checkpoint"),
    ("train.early_stopping_patience", lambda v: v >= 0, "an integer >= 0 (0 = never stop early)"),
    ("train.early_stopping_threshold", lambda v: v >= 0, "a number >= 0"),
    ("train.nonfinite_tolerance", lambda v: v >= 0, "an integer >= 0 (0 = stop at the first non-finite step)"),
    ("hardware.num_processes", lambda v: v >= 1, "an integer >= 1 (processes on each machine, one per GPU)"),
    ("hardware.num_machines", lambda v: v >= 0, "an integer >= 1 (0 = from SLURM)"),
    ("hardware.machine_rank", lambda v: v is None or v >= -1, "an integer from 0 to num_machines-1 (-1 = from SLURM)"),
    ("hardware.main_port", lambda v: 1024 <= v <= 65535, "a free TCP port from 1024 to 65535"),
    ("hardware.join_timeout_s", lambda v: v >= 1, "a number of seconds >= 1"),
    ("seed", lambda v: v >= 0, "an integer >= 0"),
]

REQUIRED = {
    "model.name_or_path": "a hub id or local folder: model.name_or_path=PATH, or pick a model group option (model=...)",
}
DATA_PATH_FIX = "a data file, folder, glob or hub dataset id: data.path=FILE (e.g. data=chat data.path=my_chats.jsonl), or a mixture in data.mix"

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$")


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def check(cfg: DictConfig, user_keys: Optional[set] = None) -> None:
    """Raise UserError for the first rule the composed config breaks."""
    for key, fix in REQUIRED.items():
        if _missing(cfg, key) or _select(cfg, key) in (None, ""):
            raise UserError(f"{key} is not set; expected {fix}.")
    for key in _missing_keys(cfg):
        if key not in ("data.path",):
            raise UserError(f"{key} is not set (???); set it on the command line: {key}=VALUE.")
    if not cfg.data.mix and (_missing(cfg, "data.path") or _select(cfg, "data.path") in (None, "")):
        raise UserError(f"data.path is not set; expected {DATA_PATH_FIX}.")
    method_keys = set(cfg.method.keys())
    for key, allowed in CHOICES.items():
        if not _applies(key, method_keys):
            continue
        val = _select(cfg, key)
        if val not in allowed:
            raise UserError(
                f"{key}={val} is not allowed; expected one of: {', '.join(allowed)}.{suggestion(val, allowed, '{}')}"
            )
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


def _missing_keys(cfg: DictConfig, prefix: str = "") -> List[str]:
    out = []
    for k in cfg.keys():
        if OmegaConf.is_missing(cfg, k):
            out.append(f"{prefix}{k}")
        elif isinstance(cfg[k], DictConfig):
            out += _missing_keys(cfg[k], f"{prefix}{k}.")
    return out


def _missing(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    return OmegaConf.is_missing(OmegaConf.select(cfg, parent), leaf)


def _check_combinations(cfg: DictConfig, user_keys: set) -> None:
    hw = cfg.hardware
    if not devices.of(hw).gpu and hw.precision == "fp16":
        raise UserError(
            "hardware.precision=fp16 needs a CUDA GPU, but hardware.device=cpu; "
            "on the CPU use hardware.precision=fp32 (or bf16), or pick hardware=single_gpu."
        )
    methods.of(cfg).check(cfg.method)
    _check_data(cfg.data)
    objectives.of(cfg).check(cfg, data_formats(cfg.data))
    check_eval(cfg)
    losspath.check(cfg)
    _check_topology(cfg)
    if cfg.model.trust_remote_code and "model.trust_remote_code" not in user_keys:
        raise UserError(
            "model.trust_remote_code=true was set by a config file or recipe; running a model's own code "
            "must be asked for on the command line: add model.trust_remote_code=true yourself."
        )
    _check_trusted_code(cfg, user_keys)
    if cfg.resume == "auto" and not cfg.run_name:
        raise UserError("resume=auto needs the run to continue: add run_name=NAME (the run folder's name).")
    if cfg.run_name is not None and not _RUN_NAME.match(str(cfg.run_name)):
        raise UserError(f"run_name={cfg.run_name!r}: use letters, digits and . _ - + = , only (no slashes or spaces).")


def _check_trusted_code(cfg: DictConfig, user_keys: set) -> None:
    """Code runs only when the person at the command line asked for it: reward code named by a recipe or config file
    needs trust_code=true on the command line (as model.trust_remote_code does)."""
    ref = OmegaConf.select(cfg, "objective.reward_code")
    if not ref:
        return
    from fttool import rewards

    rewards.check_code_ref(str(ref))
    if "objective.reward_code" in user_keys:
        return
    if not (cfg.trust_code and "trust_code" in user_keys):
        raise UserError(
            f"objective.reward_code={ref} was set by a recipe or config file; running its code must be asked for on "
            "the command line: add trust_code=true (or name the reward yourself with objective.reward_code=...)."
        )


def looks_local(path: str) -> bool:
    """A model path that can only be a local folder (not a hub id, which is NAME or ORG/NAME)."""
    return str(path).startswith(("/", ".", "~", "fttool:", "package:")) or str(path).count("/") > 1


def _check_model(cfg: DictConfig) -> None:
    """A local model folder (and its GGUF file) exists: named here, before a run folder is made."""
    from pathlib import Path

    from fttool import assets

    m = cfg.model
    if m.from_run:
        return  # lineage checks the run folder
    local = Path(assets.resolve(str(m.name_or_path))).expanduser()
    if str(m.name_or_path).endswith(".gguf") and local.is_file():
        raise UserError(
            f"model.name_or_path={m.name_or_path} is a GGUF file: give its folder and the file's name, "
            f"model.name_or_path={local.parent} model.gguf_file={local.name}."
        )
    if looks_local(m.name_or_path) and not local.is_dir():
        raise UserError(
            f"model.name_or_path={m.name_or_path}: no such model folder ({local}). Give a folder with config.json "
            "and weights (or a .gguf file, with model.gguf_file=NAME), or a hub id like ORG/NAME."
        )
    if m.gguf_file:
        from fttool import gguf_read

        gguf_read.check_file(m)
        if methods.of(cfg).quantized:
            raise UserError(
                f"method={cfg.method.name} with model.gguf_file: a GGUF base is dequantized when it loads, and "
                "QLoRA quantizes a plain model with bitsandbytes; use method=lora on the GGUF, or export it to a "
                "plain folder first (fttool export ... format=safetensors) for QLoRA."
            )


def _check_topology(cfg: DictConfig) -> None:
    hw = cfg.hardware
    if hw.machine_rank is None:
        raise UserError(
            "hardware.machine_rank is not set; on each machine give its rank: hardware.machine_rank=0 on the "
            "main machine, 1, 2, ... on the others (-1 under SLURM)."
        )
    if not hw.main_address:
        raise UserError(
            "hardware.main_address is not set; give machine 0's address, reachable from every machine: "
            "hardware.main_address=10.0.0.1 (slurm under SLURM)."
        )
    total = world_size(hw)
    strategy = strategies.of(hw)
    if not strategy.distributed and total > 1:
        raise UserError(
            f"hardware.num_processes={hw.num_processes} x num_machines={hw.num_machines} needs a strategy that "
            "spreads the work: hardware=ddp (or fsdp2, zero2, zero3, multi_node)."
        )
    if strategy.distributed and total == 1 and hw.num_machines != 0:
        raise UserError(
            f"hardware.strategy={hw.strategy} with 1 process has nothing to spread over; set "
            "hardware.num_processes=N (N >= 2), or use hardware=single_gpu / hardware=cpu for one process."
        )
    if hw.machine_rank >= max(hw.num_machines, 1) and hw.num_machines != 0:
        raise UserError(
            f"hardware.machine_rank={hw.machine_rank} with num_machines={hw.num_machines}: ranks go from 0 "
            f"to {hw.num_machines - 1}."
        )
    if not methods.of(cfg).shardable_base and strategy.shards_parameters:
        unsharded = " or ".join(
            f"hardware={n}" for n, s in strategies.STRATEGIES.items() if s.distributed and not s.shards_parameters
        )
        raise UserError(
            f"method={cfg.method.name} with hardware.strategy={hw.strategy}: sharding 4-bit base weights is "
            f"not supported yet; use {unsharded} (each process holds the quantized base)."
        )
    strategy.check(cfg)


def check_eval(cfg: DictConfig) -> None:
    """Metrics, the verdict's gate, validation during training and early stopping fit together."""
    from fttool.metrics import METRICS

    d, t = cfg.data, cfg.train
    if not d.metrics:
        raise UserError(f"data.metrics is empty; name at least one of: {', '.join(METRICS)}.")
    for m in d.metrics:
        if m not in METRICS:
            raise UserError(
                f"data.metrics: unknown metric '{m}'.{suggestion(m, METRICS, '{}')} Metrics: {', '.join(METRICS)}."
            )
    for m in d.metrics:
        needs = METRICS[m].rows
        other = sorted({f for f in data_formats(d) if f != needs}) if needs else []
        if other:
            raise UserError(
                f"data.metrics has {m}, which scores {needs} rows, but the data is data.format={other[0]}; use "
                f"{needs} data (data={'preference' if needs == 'preference' else 'unpaired'}) or drop it from "
                "data.metrics."
            )
    if "reward" in d.metrics and OmegaConf.select(cfg, "objective.rewards") is None:
        raise UserError(
            f"data.metrics has reward, which scores an online objective's rewards, but objective={cfg.objective.name} "
            "has none; use objective=grpo or drop reward from data.metrics."
        )
    if "json_schema" in d.metrics and not d.json_schema:
        raise UserError(
            "data.metrics has json_schema but data.json_schema is not set; give the schema file: "
            "data.json_schema=schema.json (or drop json_schema from data.metrics)."
        )
    if d.json_schema:
        from fttool.metrics import load_schema

        load_schema(d.json_schema)
    for m, margin in cfg.eval.gate.items():
        if m not in d.metrics:
            raise UserError(
                f"eval.gate.{m}: the verdict can only use a metric the data group scores; data.metrics is "
                f"[{', '.join(d.metrics)}] (add {m} there, or gate on one of those)."
            )
        if not isinstance(margin, (int, float)) or margin < 0:
            raise UserError(
                f"eval.gate.{m}={margin}: expected a margin >= 0 in the metric's own units "
                "(0.05 = 5 points for a score; 0 = must simply beat the base)."
            )
    has_val = bool(d.val_ratio or d.val_path)  # on the config tree: spec.has_validation once it is a spec
    if t.early_stopping_patience and not has_val:
        raise UserError(
            f"train.early_stopping_patience={t.early_stopping_patience} watches the validation loss, but the "
            "data has no validation split; set data.val_ratio=0.05 (or data.val_path=FILE)."
        )
    if t.eval_steps and not has_val:
        raise UserError(
            f"train.eval_steps={t.eval_steps}: there is no validation split to evaluate; set "
            "data.val_ratio=0.05 (or data.val_path=FILE)."
        )
    if has_val and t.load_best and t.eval_steps and t.save_steps % t.eval_steps:
        raise UserError(
            f"train.save_steps={t.save_steps} is not a multiple of train.eval_steps={t.eval_steps}: the best "
            f"checkpoint can only be kept if it is saved when it is validated. Set train.save_steps="
            f"{t.eval_steps * max(1, round(t.save_steps / t.eval_steps))}, or train.load_best=false."
        )
    if t.early_stopping_patience and not t.load_best:
        raise UserError(
            "train.early_stopping_patience needs train.load_best=true: stopping early is only safe when the "
            "best checkpoint is kept."
        )


def data_formats(d) -> List[str]:
    """The format of each data source (data.format, or each data.mix entry's)."""
    return [m.format or d.format for m in d.mix] if d.mix else [d.format]


def _check_data(d: DictConfig) -> None:
    from fttool.data.formats import check_columns
    from fttool.data.templates import resolve

    check_columns(d.format, d.columns)
    if d.mix and not _missing(d, "path") and d.path:
        raise UserError(
            "data.path and data.mix are both set; a mixture lists its paths in data.mix, so set data.path=null."
        )
    for i, m in enumerate(d.mix):
        where = f"data.mix[{i}]"
        if OmegaConf.is_missing(m, "path") or not m.path:
            raise UserError(
                f"{where}.path is not set; each mixture entry needs a path, e.g. {{path: a.jsonl, weight: 1.0}}."
            )
        fmt = m.format or d.format
        if fmt not in FORMATS:
            raise UserError(
                f"{where}.format={fmt} is not allowed; expected one of: {', '.join(FORMATS)}.{suggestion(fmt, FORMATS, '{}')}"
            )
        check_columns(fmt, m.columns or d.columns, f"{where}.columns")
        if m.weight <= 0:
            raise UserError(f"{where}.weight={m.weight} is out of range; expected a number > 0 (1.0 = every row once).")
    if d.val_ratio + d.test_ratio >= 1:
        raise UserError(
            f"data.val_ratio + data.test_ratio = {d.val_ratio + d.test_ratio:g} leaves nothing to train on; keep the sum below 1."
        )
    for name in ("val", "test"):
        if d[f"{name}_path"] and d[f"{name}_ratio"]:
            raise UserError(
                f"data.{name}_path and data.{name}_ratio are both set; hold out by file or by ratio, not both."
            )
    from fttool.data.tokenize import RESERVED_KWARGS

    for name in d.template_kwargs:
        if name in RESERVED_KWARGS:
            raise UserError(
                f"data.template_kwargs.{name}: fttool sets '{name}' itself on every render; remove it "
                f"(data.template_kwargs holds the template's own variables, e.g. enable_thinking)."
            )
    for role, target in d.roles.items():
        if target not in ("system", "user", "assistant", "tool"):
            raise UserError(f"data.roles.{role}={target}: map a role name to system, user, assistant or tool.")
    resolve(d.template)


def check_sources(cfg: DictConfig) -> None:
    """A new run's local model folder and data files exist (named before a run folder is made; a run verb on a
    finished run does not need its training data any more, so this is not part of `check`)."""
    from fttool.data import sources

    _check_model(cfg)
    d = cfg.data
    paths = [(f"data.{k}", _select(d, k)) for k in ("path", "val_path", "test_path")]
    paths += [(f"data.mix[{i}].path", m.path) for i, m in enumerate(d.mix)]
    for key, path in paths:
        if path and sources.is_local(str(path)):
            sources.local_files(str(path), key)


def derive_metrics(cfg: DictConfig) -> None:
    """A schema given in data.json_schema is scored: json_schema joins data.metrics when the user did not list it."""
    if cfg.data.json_schema and "json_schema" not in cfg.data.metrics:
        cfg.data.metrics = list(cfg.data.metrics) + ["json_schema"]


def default_run_name(cfg: DictConfig, recipe: Optional[str], job_num: Optional[int] = None) -> str:
    stem = recipe or f"{_leaf(cfg.model.name_or_path)}-{cfg.method.name}"
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return name if job_num is None else f"{name}-{job_num}"


def _leaf(name_or_path: str) -> str:
    return (
        re.sub(r"[^A-Za-z0-9._-]+", "-", str(name_or_path).rstrip("/").split("/")[-1].split(":")[-1]).strip("-")
        or "model"
    )


def build_spec(
    cfg: DictConfig, user_keys: Optional[set] = None, recipe: Optional[str] = None, job_num: Optional[int] = None
) -> RunSpec:
    """Check the composed config and return the typed, fully resolved RunSpec."""
    from fttool.config.slurm import resolve_slurm

    if cfg.hardware.machine_rank is not None and cfg.hardware.main_address and "SLURM_JOB_ID" in os.environ:
        resolve_slurm(cfg.hardware)  # inside the job; where it is submitted from, the placeholders stay
    check(cfg, user_keys)
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # detach from Hydra, resolve interpolations
    lineage.resolve(cfg, user_keys or set())  # model.from_run -> the starting model
    generic_model(cfg, user_keys or set(), recipe)
    derive_metrics(cfg)
    objectives.of(cfg).derive(cfg)
    if cfg.train.lr is None:
        own = objectives.of(cfg).default_lr(methods.of(cfg).adapter)
        cfg.train.lr = float((own if own is not None else cfg.method.default_lr) * cfg.model.lr_scale)
    if cfg.run_name is None:
        cfg.run_name = default_run_name(cfg, recipe, job_num)
    for key in LOCAL_PATH_KEYS:  # the run folder must not depend on the directory it was started from
        OmegaConf.update(cfg, key, _absolute(OmegaConf.select(cfg, key)))
    for m in cfg.data.mix:
        m.path = _absolute(m.path)
    if cfg.data.cache_dir:
        cfg.data.cache_dir = os.path.abspath(os.path.expanduser(cfg.data.cache_dir))
    ref = OmegaConf.select(cfg, "objective.reward_code")
    if ref and str(ref).rpartition(":")[0].endswith(".py"):
        where, _, name = str(ref).rpartition(":")
        cfg.objective.reward_code = f"{os.path.abspath(os.path.expanduser(where))}:{name}"
    return to_spec(cfg)


def default_group(group: str) -> str:
    """The option conf/config.yaml's defaults list picks for a group (what runs when nobody chooses one)."""
    from fttool.config import registry

    for entry in OmegaConf.load(registry.conf_dir() / "config.yaml").defaults:
        if isinstance(entry, DictConfig) and group in entry:
            return str(entry[group])
    return ""


def group_file(group: str, option: str) -> dict:
    from fttool.config import registry

    f = registry.conf_dir() / group / f"{option}.yaml"
    return OmegaConf.to_container(OmegaConf.load(f)) if f.is_file() else {}


def recipe_tree(recipe: Optional[str]) -> dict:
    from fttool.config import registry

    path = registry.recipe_files().get(recipe) if recipe else None
    return OmegaConf.to_container(registry.load_recipe(path)) if path else {}


def generic_model(cfg: DictConfig, user_keys: set, recipe: Optional[str]) -> None:
    """A model of the user's own (model.name_or_path given, no model group chosen) takes a generic model's settings,
    not those of the default group's model: the tiny demo model's lr_scale 10 and float32 must not leak onto it.
    Keys the command line or the recipe set are kept (in place)."""
    if "model" in user_keys or cfg.model.from_run:
        return
    tree = recipe_tree(recipe)
    if "model" in recipes.group_choices(tree):
        return
    default = group_file("model", default_group("model"))
    if not default or cfg.model.name_or_path == default.get("name_or_path"):
        return
    own = set(recipes.flatten(tree.get("model") or {}))
    schema = RunSpec.__dataclass_fields__["model"].default_factory()
    for key in default:
        if key != "name_or_path" and f"model.{key}" not in user_keys and key not in own:
            cfg.model[key] = getattr(schema, key)


def sources(spec: RunSpec, choices: Dict[str, str], user_keys: set, recipe: Optional[str]) -> Dict[str, str]:
    """Where the values a user most often wonders about came from (what `check` prints): the command line, the
    recipe, a group option's file, or the schema's default; the learning rate with its derivation."""
    tree = recipe_tree(recipe)
    in_recipe = set(recipes.flatten({k: v for k, v in tree.items() if k not in ("defaults", recipes.META)}))
    generic = "model" not in user_keys and spec.model.name_or_path != group_file("model", choices.get("model", "")).get(
        "name_or_path"
    )

    def origin(key: str) -> str:
        group, leaf = key.split(".", 1)
        if key in user_keys:
            return "command line"
        if key in in_recipe:
            return f"recipe {recipe}"
        option = choices.get(group, "")
        if leaf in group_file(group, option) and not (group == "model" and generic):
            return f"{group}={option}"
        return "schema default" + (
            ": a model of your own, not the default group's" if generic and group == "model" else ""
        )

    out = {key: origin(key) for key in ("model.lr_scale", "model.dtype", "data.template")}
    lr = origin("train.lr")
    if lr == "schema default":
        own = objectives.of(spec).default_lr(methods.of(spec).adapter)
        base = f"objective={spec.objective.name}'s" if own is not None else f"method={spec.method.name}'s default_lr"
        lr = f"{base} {own if own is not None else spec.method.default_lr:g} x model.lr_scale {spec.model.lr_scale:g}"
    out["train.lr"] = lr
    return out


LOCAL_PATH_KEYS = (
    "model.name_or_path",
    "data.path",
    "data.val_path",
    "data.test_path",
    "data.template",
    "data.json_schema",
)


def _absolute(path: Optional[str]) -> Optional[str]:
    """A local path (existing, or a glob) made absolute; hub ids, fttool: assets and Jinja text unchanged."""
    from pathlib import Path

    if not path or str(path).startswith(("fttool:", "package:")) or "{" in str(path) or "\n" in str(path):
        return path
    if any(c in str(path) for c in "*?["):
        return os.path.abspath(os.path.expanduser(str(path)))
    local = Path(str(path)).expanduser()
    try:
        return str(local.resolve()) if local.exists() else path
    except OSError:  # a name too long to be a path
        return path


def to_spec(cfg: Any) -> RunSpec:
    """A plain config tree (as read back from spec.yaml) -> typed RunSpec."""
    schema = OmegaConf.structured(RunSpec)
    tree = OmegaConf.create(OmegaConf.to_container(cfg) if OmegaConf.is_config(cfg) else cfg)
    trees = {"method": tree.pop("method"), "objective": tree.pop("objective", None) or {"name": "sft"}}
    # spec.yaml of runs before per-objective schemas carried every objective's keys: those of other objectives go
    trees["objective"] = {
        k: v
        for k, v in OmegaConf.to_container(OmegaConf.create(trees["objective"])).items()
        if k in objectives.SCHEMAS[trees["objective"]["name"]].__dataclass_fields__ or k not in FORMER_OBJECTIVE_KEYS
    }
    merged = OmegaConf.merge(schema, tree)
    for group, sub in trees.items():
        option = OmegaConf.structured(registry.OPTION_SCHEMAS[group][sub["name"]])
        merged[group] = OmegaConf.merge(option, sub)
    return OmegaConf.to_object(merged)


FORMER_OBJECTIVE_KEYS = ("beta", "loss_type", "label_smoothing", "precompute_ref_log_probs")
