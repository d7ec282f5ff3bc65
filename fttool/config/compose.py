"""Compose the config from command-line overrides and turn Hydra's failures into actionable messages.

Hydra itself runs the program (so `--help`, `--cfg job` and `-m` behave as Hydra users expect); before
handing over, every override is checked here: group options and recipe names exist, keys exist (with a
did-you-mean), values have the right type, and the composed config passes :mod:`fttool.config.validation`.
"""

from __future__ import annotations

import itertools
import re
from typing import Dict, Iterator, List, Optional

from omegaconf import DictConfig

from fttool.config import recipes, registry
from fttool.config.spec import GROUPS
from fttool.errors import UserError, suggestion

GROUP_KEYS = set(GROUPS) | {"recipe"}
TYPE_WORDS = {"Float": "a number, e.g. 2e-4", "Integer": "an integer", "Boolean": "true or false", "String": "a string"}
MAX_CHECKED_TRIALS = 64


def parse(overrides: List[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise UserError(
            f"could not read an override: {str(e).splitlines()[0]}. Overrides look like key=value, e.g. train.lr=2e-4."
        )


def _values(ov) -> List[str]:
    if ov.is_sweep_override():
        return [str(v) for v in ov.sweep_string_iterator()]
    return [ov.get_value_element_as_str()] if ov.value() is not None else ["null"]


def _check_group(ov) -> None:
    key = ov.key_or_group
    if key == "recipe" and not ov.is_add() and not ov.is_force_add():
        raise UserError(
            f"a recipe is added on top of the defaults: write +recipe={ov.get_value_element_as_str()} (with a '+')."
        )
    options = registry.group_options(key)
    for val in _values(ov):
        if val not in options:
            where = "recipe" if key == "recipe" else f"option '{val}' in group '{key}'"
            head = f"no recipe '{val}'" if key == "recipe" else f"no {where}"
            extra = ""
            if key == "recipe":
                extra = f" Recipes are looked up in: {', '.join(str(d) for d in registry.recipe_dirs())} (add folders with {registry.RECIPE_PATH_ENV}=DIR1:DIR2)."
            raise UserError(
                f"{head}.{suggestion(val, options, key + '={}')} Available: {', '.join(options) or '(none)'}.{extra}"
            )
        if key == "recipe":
            _check_recipe_defaults(val)


def _check_recipe_defaults(name: str) -> None:
    """Each `override /group: option` in a recipe names an option that exists."""
    from omegaconf import OmegaConf

    path = registry.recipe_files()[name]
    for group, option in recipes.group_choices(OmegaConf.to_container(registry.load_recipe(path))).items():
        if group in GROUPS and option not in registry.group_options(group):
            options = registry.group_options(group)
            raise UserError(
                f"recipe {name} ({path}) picks {group}={option}, which does not exist."
                f"{suggestion(option, options, group + '={}')} Available: {', '.join(options)}."
            )


def _refuse_old_key(ov) -> None:
    """A key an older recipe schema had (config/recipes.py MIGRATIONS): its replacement, before any did-you-mean."""
    key = ov.key_or_group.lstrip("+~")
    for value in _values(ov):
        problem = recipes.migration(key, value)
        if problem:
            raise UserError(f"{problem}.")


def _owners(group: str, key: str) -> List[str]:
    """The options of a group with per-option schemas (method, objective) whose settings include `key`."""
    return [name for name, schema in registry.OPTION_SCHEMAS[group].items() if key in schema.__dataclass_fields__]


def _known_keys(node) -> List[str]:
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _check_key(cfg: DictConfig, key: str) -> None:
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if ".".join(parts[:i]) in registry.OPEN_DICTS:
            return
        if not isinstance(node, DictConfig):
            raise UserError(f"'{'.'.join(parts[:i])}' is a value, not a section; '{key}' does not exist.")
        if part not in _known_keys(node):  # (`in` is False for a key whose value is ??? )
            parent = ".".join(parts[:i])
            choices = _known_keys(node)
            full = [f"{parent}.{c}" if parent else c for c in choices]
            hint = suggestion(key, full)
            where = f"in '{parent}'" if parent else "at the top level"
            if parent in registry.OPTION_SCHEMAS:
                chosen = cfg[parent].name
                where += f" for {parent}={chosen}"
                owners = _owners(parent, part)
                if owners:
                    raise UserError(
                        f"'{key}' belongs to {parent}={f' / {parent}='.join(owners)}, not {parent}={chosen}; "
                        f"choose one of those or drop the key."
                    )
            raise UserError(f"unknown key '{key}'.{hint} Keys {where}: {', '.join(choices)}.")
        node = node._get_node(part)


def _describe_validation(e: BaseException, override_text: Dict[str, str]) -> Optional[str]:
    cause = e.__cause__ or e.__context__
    full_key = getattr(cause, "full_key", None)
    if cause is None or not full_key:
        return None
    msg = str(cause).split("\n")[0]
    kind = re.search(r"converted to (\w+)", msg)
    if kind:
        msg = f"expected {TYPE_WORDS.get(kind.group(1), kind.group(1))}"
    given = override_text.get(full_key, "")
    missing = re.search(r"Key '\w+' not in '(\w+)'", msg)
    if missing and not given:
        return _unknown_file_key(full_key)
    section, _, leaf = full_key.rpartition(".")
    if missing and section in registry.OPTION_SCHEMAS and _owners(section, leaf):
        chosen = [n for n, sch in registry.OPTION_SCHEMAS[section].items() if sch.__name__ == missing.group(1)]
        owners = _owners(section, leaf)
        return (
            f"'{full_key}' belongs to {section}={f' / {section}='.join(owners)}, not {section}={chosen[0] if chosen else '?'}; "
            "choose one of those or drop the key."
        )
    if missing and section in registry.OPTION_SCHEMAS:
        fields = [
            f"{section}.{f}" for sch in registry.OPTION_SCHEMAS[section].values() for f in sch.__dataclass_fields__
        ]
        return f"{given}: unknown key '{full_key}'.{suggestion(full_key, sorted(set(fields)))}"
    return f"{given or full_key}: {msg}."


def _unknown_file_key(full_key: str) -> str:
    """A key set by a recipe or config file that the chosen schema lacks."""
    from fttool.config import spec as spec_mod

    section, _, leaf = full_key.rpartition(".")
    where = "a recipe or config file"
    if section in registry.OPTION_SCHEMAS:
        owners = _owners(section, leaf)
        if owners:
            return (
                f"{where} sets {full_key}, which only {section}={f' / {section}='.join(owners)} has; choose that "
                f"{section}, or remove the key from the recipe."
            )
        schemas = registry.OPTION_SCHEMAS[section].values()
        fields = {f for schema in schemas for f in schema.__dataclass_fields__}
    else:
        node = spec_mod.RunSpec.__dataclass_fields__.get(section)
        schema = (
            getattr(spec_mod, type(node.default_factory()).__name__, None)
            if node and callable(node.default_factory)
            else None
        )
        fields = set(schema.__dataclass_fields__) if schema else set()
    full = [f"{section}.{f}" for f in fields]
    return f"{where} sets unknown key {full_key}.{suggestion(full_key, full)} Fix the recipe or config file."


def trials(parsed) -> Iterator[List[str]]:
    """Each combination of a multirun's sweep values as a plain override list (the first 64)."""
    pools = []
    for ov in parsed:
        prefix = "~" if ov.is_delete() else "++" if ov.is_force_add() else "+" if ov.is_add() else ""
        pools.append([f"{prefix}{ov.key_or_group}={v}" for v in _values(ov)])
    return itertools.islice(itertools.product(*pools), MAX_CHECKED_TRIALS)


def compose(overrides: List[str], choices: Optional[Dict] = None) -> DictConfig:
    """Compose with Hydra's compose API, mapping its exceptions to UserError. `choices`, when given, receives the
    group options the defaults list chose (what Hydra's runtime.choices holds)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException, HydraException
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(registry.conf_dir()), version_base=None):
            cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=choices is not None)
    except (ConfigCompositionException, HydraException) as e:
        text = {o.split("=", 1)[0].lstrip("+~"): o for o in overrides}
        described = _describe_validation(e, text)
        raise UserError(described or " ".join(str(e).split("\n")[:2]))
    finally:
        GlobalHydra.instance().clear()
    if choices is not None:
        choices.update({k: v for k, v in cfg.hydra.runtime.choices.items() if not str(k).startswith("hydra")})
        with open_dict(cfg):
            del cfg["hydra"]
    _replace_dicts(cfg, overrides)
    return cfg


def _replace_dicts(cfg: DictConfig, overrides: List[str]) -> None:
    """A mapping given on the command line (registry.OPEN_DICTS) replaces the recipe's or group's, as it replaces
    a run's in override_spec: Hydra would merge it (eval.gate={perplexity:0} keeping a recipe's token_f1 gate,
    eval.gate={} clearing nothing)."""
    from omegaconf import OmegaConf

    for o in overrides:
        key = o.split("=", 1)[0]
        if key in registry.OPEN_DICTS and "=" in o:
            (ov,) = parse([o])
            if not ov.is_sweep_override() and isinstance(ov.value(), dict):
                OmegaConf.update(cfg, key, ov.value(), merge=False)


def user_keys(overrides: List[str]) -> set:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if not o.startswith("hydra.")}


def swept_keys(overrides: List[str]) -> set:
    """Keys given several values on the command line (what a sweep varies)."""
    return {ov.key_or_group.lstrip("+~") for ov in parse(overrides) if ov.is_sweep_override()}


def recipe_of(overrides: List[str]) -> Optional[str]:
    for o in overrides:
        if o.lstrip("+").startswith("recipe="):
            return o.split("=", 1)[1]
    return None


class Checked:
    """One run (or sweep trial) composed and validated once: its overrides, group choices and RunSpec, handed on to
    the run so that nothing composes or validates it again."""

    def __init__(self, overrides: List[str], choices: Dict, spec):
        self.overrides, self.choices, self.spec = overrides, choices, spec


def precheck(overrides: List[str], multirun: bool = False) -> List[Checked]:
    """Check every override (and every sweep trial, the first 64); return each one checked."""
    from fttool.config import validation

    bad = registry.bad_recipe_path_entries()
    if bad:
        raise UserError(
            f"{registry.RECIPE_PATH_ENV} names a folder that does not exist: {bad[0]}. Fix the path or remove it."
        )
    # Hydra's own settings (hydra.*, hydra/launcher=...) are Hydra's to check
    overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    chosen = recipe_of(overrides)
    for name in re.split(r"[,\s]+", chosen or ""):
        problem = registry.recipe_problem(name) if name else None
        if problem:
            raise UserError(problem)
    parsed = parse(overrides)
    for ov in parsed:
        _refuse_old_key(ov)
        if ov.is_sweep_override() and not multirun:
            raise UserError(
                f"{ov.input_line} lists several values: add -m to run a sweep (one run per value), or give one value."
            )
        if ov.key_or_group.split("@")[0] in GROUP_KEYS:
            _check_group(ov)
    checked = []
    for combo in trials(parsed):
        combo = list(combo)
        added = [o for o in combo if o.startswith("+") and o.split("=", 1)[0].lstrip("+~") not in GROUP_KEYS]
        choices: Dict = {}
        try:
            cfg = compose(combo, choices)
        except UserError:
            _check_keys(combo)  # a clearer message for a key that does not exist, when that is the cause
            raise
        if added:  # Hydra adds a key given with '+'; fttool's schema has no room for it
            _check_keys(combo)
        spec = validation.build_spec(cfg, user_keys(combo), recipe_of(combo))
        validation.check_sources(cfg)  # a new run's local files exist (named before a run folder is made)
        checked.append(Checked(combo, choices, spec))
    return checked


def _check_keys(combo: List[str]) -> None:
    """Every key of these overrides exists in the config their group choices compose (else UserError naming it)."""
    base = compose([o for o in combo if o.split("=", 1)[0].lstrip("+~") in GROUP_KEYS])
    for o in combo:
        key = o.split("=", 1)[0]
        if key.lstrip("+~") in GROUP_KEYS or key.startswith(("hydra.", "+hydra.", "~hydra.")):
            continue
        _check_key(base, key.lstrip("+~"))


def override_spec(spec, overrides: List[str]):
    """A frozen spec (a run folder's) with key=value overrides applied: parsed by the same grammar and keys checked
    by the same code as a new run's overrides, then derived, typed and validated again. Returns the new RunSpec."""
    from dataclasses import asdict

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fttool.config import validation

    cfg = OmegaConf.create(asdict(spec))
    OmegaConf.set_struct(cfg, True)
    for key in registry.OPEN_DICTS:
        if OmegaConf.select(cfg, key) is not None:  # objective.rewards: grpo only
            OmegaConf.set_struct(OmegaConf.select(cfg, key), False)
    for ov in parse(overrides):
        key, value = ov.key_or_group.lstrip("+~"), ov.value()
        _refuse_old_key(ov)
        _check_key(cfg, key)
        if key in registry.OPEN_DICTS:
            OmegaConf.update(cfg, key, {}, merge=False)  # a mapping given on the command line replaces the run's one
            OmegaConf.set_struct(OmegaConf.select(cfg, key), False)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise UserError(f"{key}={ov.get_value_element_as_str()}: {str(e).splitlines()[0]}")
    for key in ("data.test_path", "data.json_schema"):
        OmegaConf.update(cfg, key, validation._absolute(OmegaConf.select(cfg, key)))
    validation.derive_metrics(cfg)
    try:
        typed = validation.to_spec(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "a value"
        raise UserError(f"{key}: {str(e).splitlines()[0]}")
    validation.check(OmegaConf.create(asdict(typed)))
    return typed


__all__ = ["compose", "precheck", "trials", "user_keys", "recipe_of", "override_spec"]
