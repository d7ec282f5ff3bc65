"""Where configs live and how Hydra finds them: the conf/ tree, shipped recipes and team recipes.

Nothing here runs at import time; :func:`register` is called once by the CLI before composing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from fttool.config import recipes
from fttool.config.methods import SCHEMAS as METHOD_SCHEMAS
from fttool.config.spec import GROUPS, RunSpec

RECIPE_PATH_ENV = "FTTOOL_RECIPE_PATH"
_PKG_DIR = (
    Path(__file__).resolve().parent.parent
)  # fttool/ (conf/ and recipes/ sit beside it in a checkout, inside it in a wheel)


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


RESOLVER = re.compile(r"\$\{\s*[\w.-]+\s*:")  # ${oc.env:X}, ${now:...}: a resolver call, not a reference to a key


def check_recipe(path: Path, node) -> None:
    """A recipe may set fttool keys and choose group options, nothing else: Hydra's own settings (hydra.callbacks,
    hydra.launcher, logging handlers), `_target_` (which Hydra instantiates) and resolver interpolations would let a
    recipe shared by another team run code or read the environment. Its `meta:` header, schema version and old keys
    are checked too (config/recipes.py)."""
    from fttool.errors import UserError

    tree = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    if tree is not None and not isinstance(tree, dict):
        raise UserError(f"recipe {path}: expected a mapping of keys (meta, defaults, model, train, ...), not a list.")

    def refuse(key: str, why: str):
        raise UserError(
            f"recipe {path}: {key}: {why}. Recipes may set fttool keys and group options only "
            "(Hydra settings belong on the command line); remove it from the recipe."
        )

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                key = f"{where}.{k}" if where else str(k)
                if str(k) == "_target_":
                    refuse(key, "a recipe cannot name a Python object to call")
                if not where and str(k) == "hydra":
                    refuse(key, "a recipe cannot change Hydra's settings (callbacks, launcher, logging)")
                walk(v, key)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, str) and RESOLVER.search(value):
            refuse(where, f"the value {value!r} calls an interpolation resolver")

    for i, entry in enumerate((tree or {}).get("defaults") or [] if isinstance(tree, dict) else []):
        text = entry if isinstance(entry, str) else " ".join(map(str, entry)) if isinstance(entry, dict) else ""
        if "hydra" in text.replace("hydra_", ""):
            refuse(f"defaults[{i}]", f"'{text}' chooses one of Hydra's own groups")
    walk({k: v for k, v in tree.items() if k != "defaults"} if isinstance(tree, dict) else tree, "")
    if isinstance(tree, dict):
        recipes.check_file(path, tree)


def load_recipe(path: Path):
    """A recipe file as an OmegaConf node (UserError naming the file when it is not YAML)."""
    from fttool.errors import UserError

    try:
        return OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - any parse error: the file and the parser's words
        raise UserError(f"could not read a recipe file {path}: {' '.join(str(e).split())}")


def recipe_problem(name: str) -> Optional[str]:
    """Why the recipe NAME may not be used (see check_recipe), or None."""
    from fttool.errors import UserError

    path = recipe_files().get(name)
    if path is None:
        return None
    try:
        check_recipe(path, load_recipe(path))
    except UserError as e:
        return str(e)
    return None


def group_options(group: str) -> List[str]:
    """The options of a config group, or the recipe names for group `recipe`."""
    if group == "recipe":
        return sorted(recipe_files())
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def bad_recipe_path_entries() -> List[str]:
    return [p for p in os.environ.get(RECIPE_PATH_ENV, "").split(os.pathsep) if p and not Path(p).expanduser().is_dir()]


# free-form mappings whose keys are the user's own: `data.columns={a: b}`, `data.template_kwargs.enable_thinking=false`
OPEN_DICTS = ("data.columns", "data.roles", "data.template_kwargs", "eval.gate")


def schema_node():
    """The RunSpec schema, with the free-form mappings left open to new keys (Hydra closes everything else)."""
    node = OmegaConf.structured(RunSpec)
    for key in OPEN_DICTS:
        OmegaConf.set_struct(OmegaConf.select(node, key), False)
    return node


def register() -> None:
    """Store the typed schemas and every recipe in Hydra's ConfigStore (idempotent), each without its `meta:` header
    (not a run key)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="fttool_schema", node=schema_node())
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(group="schema/method", name=name, node=schema)
    for name, path in recipe_files().items():
        if recipe_problem(name) is not None:
            continue  # never composable (unreadable, unsafe, old keys, bad meta): choosing it names the problem
        node = load_recipe(path)
        node.pop(recipes.META, None)
        cs.store(group="recipe", name=name, node=node, package="_global_", provider=str(path))


__all__ = ["GROUPS", "conf_dir", "recipe_dirs", "recipe_files", "group_options", "register"]
