"""Where configs live and how Hydra finds them: the conf/ tree, shipped recipes and team recipes.

Nothing here runs at import time; :func:`register` is called once by the CLI before composing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

from omegaconf import OmegaConf

from fttool.spec import GROUPS, METHOD_SCHEMAS, RunSpec

RECIPE_PATH_ENV = "FTTOOL_RECIPE_PATH"
_PKG_DIR = Path(__file__).resolve().parent


def _find(name: str) -> Path:
    """A top-level folder shipped with fttool: inside the package in a wheel, beside it in a checkout."""
    for cand in (_PKG_DIR / name, _PKG_DIR.parent / name):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"fttool's {name}/ folder is missing beside {_PKG_DIR}; reinstall fttool")


def conf_dir() -> Path:
    return _find("conf")


def shipped_recipes_dir() -> Path:
    return _find("recipes")


def recipe_dirs() -> List[Path]:
    """Recipe folders in lookup order: FTTOOL_RECIPE_PATH entries first (a team's recipe wins), then shipped ones."""
    dirs = [Path(p).expanduser().resolve() for p in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep) if p]
    return dirs + [shipped_recipes_dir()]


def recipe_files() -> Dict[str, Path]:
    """Recipe name -> file, the first folder holding a name winning."""
    found: Dict[str, Path] = {}
    for d in recipe_dirs():
        if not d.is_dir():
            continue
        for f in sorted(d.glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


def group_options(group: str) -> List[str]:
    """The options of a config group, or the recipe names for group `recipe`."""
    if group == "recipe":
        return sorted(recipe_files())
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def bad_recipe_path_entries() -> List[str]:
    return [p for p in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep) if p and not Path(p).expanduser().is_dir()]


OPEN_DICTS = ("data.columns", "data.roles", "eval.gate")  # free-form mappings: `data.columns={a: b}` adds keys


def schema_node():
    """The RunSpec schema, with the free-form mappings left open to new keys (Hydra closes everything else)."""
    node = OmegaConf.structured(RunSpec)
    for key in OPEN_DICTS:
        OmegaConf.set_struct(OmegaConf.select(node, key), False)
    return node


def register() -> None:
    """Store the typed schemas and every recipe in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="fttool_schema", node=schema_node())
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(group="schema/method", name=name, node=schema)
    for name, path in recipe_files().items():
        node = OmegaConf.load(path)
        cs.store(group="recipe", name=name, node=node, package="_global_", provider=str(path))


__all__ = ["GROUPS", "conf_dir", "recipe_dirs", "recipe_files", "group_options", "register"]
