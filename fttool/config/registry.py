"""Where configs live and how Hydra finds them: the conf/ tree, shipped recipes and team recipes.

Nothing here runs at import time; :func:`register` is called once by the CLI before composing.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf

from fttool.config import methods, objectives, recipes
from fttool.config.spec import GROUPS, RunSpec

# groups whose every option has a schema of its own (method=lora has rank, objective=dpo has beta)
OPTION_SCHEMAS: Dict[str, Dict[str, type]] = {"method": methods.SCHEMAS, "objective": objectives.SCHEMAS}

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


# the one interpolation a recipe may hold: a plain reference to another key (${data.max_length}, ${.sibling},
# ${data.mix[0].path}); every other form (a resolver, nested or not, an escaped one) is refused
REFERENCE = re.compile(r"\$\{\.*[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*|\[\d+\])*\}")
DEFAULTS_ENTRY = re.compile(r"^(?:override )?/?(?P<group>[a-z_]+)$")
OPTION = re.compile(r"^[\w.-]+$")
# keys a recipe may point at files with: data the run reads and copies into its cache and previews
PATH_KEYS = ("data.path", "data.val_path", "data.test_path", "data.json_schema", "data.template")


def interpolation_problem(value: str) -> Optional[str]:
    """Why a recipe string may not hold this interpolation, or None: anything but plain key references."""
    rest = REFERENCE.sub("", value)
    if "${" not in rest:
        return None
    return f"the value {value!r} holds an interpolation that is not a plain reference to a key (a resolver call)"


def _line_of(path: Path, needle: str) -> str:
    """'file:line' of the first line holding needle (the file alone when none does)."""
    try:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if needle and needle in line:
                return f"{path}:{n}"
    except OSError:
        pass
    return str(path)


def _inside(p: Path, roots) -> bool:
    return any(p == r or r in p.parents for r in roots)


def path_problem(path: Path, key: str, value: str) -> Optional[str]:
    """Why a recipe may not point `key` at `value`: a file outside the recipe's folder and the working directory
    (a shared recipe must not make a run read, copy and show a file of the user's such as ~/.ssh/id_rsa). Jinja text,
    template names, hub ids and fttool's bundled names are not files."""
    if not isinstance(value, str) or not value or value.startswith(("fttool:", "package:")) or "{" in value:
        return None
    if key == "data.template" and "/" not in value and not value.endswith(".jinja"):
        return None  # a template name (chatml, llama-3)
    target = Path(os.path.expanduser(value))
    target = (target if target.is_absolute() else Path.cwd() / target).resolve()
    roots = (path.resolve().parent, Path.cwd().resolve())
    if _inside(target, roots):
        return None
    return (
        f"{key}={value!r} is outside the recipe's folder and the working directory; a recipe may only name files "
        f"beside it or in the working tree: give this path on the command line ({key}=...) instead"
    )


def check_recipe(path: Path, node) -> None:
    """A recipe may set fttool keys and choose group options, nothing else: Hydra's own settings (hydra.callbacks,
    hydra.launcher, logging handlers), `_target_` (which Hydra instantiates) and resolver interpolations would let a
    recipe shared by another team run code or read the environment. Its `meta:` header, schema version and old keys
    are checked too (config/recipes.py)."""
    from fttool.errors import UserError

    tree = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node
    if tree is not None and not isinstance(tree, dict):
        raise UserError(f"recipe {path}: expected a mapping of keys (meta, defaults, model, train, ...), not a list.")

    def refuse(key: str, why: str, needle: str = ""):
        raise UserError(
            f"recipe {_line_of(path, needle or key.split('.')[-1].split('[')[0])}: {key}: {why}. Recipes may set "
            "fttool keys to values and choose group options, nothing else (Hydra settings, resolvers and files "
            "elsewhere belong on the command line); remove it from the recipe."
        )

    def walk(value, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                key = f"{where}.{k}" if where else str(k)
                if str(k) == "_target_":
                    refuse(key, "a recipe cannot name a Python object to call")
                if not where and str(k) == "hydra":
                    refuse(key, "a recipe cannot change Hydra's settings (callbacks, launcher, logging)")
                if "${" in str(k):
                    refuse(key, "a key cannot be an interpolation", str(k))
                walk(v, key)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, str):
            why = interpolation_problem(value)
            if why:
                refuse(where, why, value[value.index("${") :][:20] if "${" in value else value)
            plain = re.sub(r"\[\d+\]", "", where)
            why = path_problem(path, plain, value) if plain in PATH_KEYS or plain == "data.mix.path" else None
            if why:
                refuse(where, why, value)

    for i, entry in enumerate((tree or {}).get("defaults") or [] if isinstance(tree, dict) else []):
        why = defaults_problem(entry)
        if why:
            text = entry if isinstance(entry, str) else next(iter(entry), "") if isinstance(entry, dict) else ""
            refuse(f"defaults[{i}]", why, str(text))
    walk({k: v for k, v in tree.items() if k != "defaults"} if isinstance(tree, dict) else tree, "")
    if isinstance(tree, dict):
        recipes.check_file(path, tree)


def defaults_problem(entry) -> Optional[str]:
    """Why a recipe's `defaults:` entry is not allowed, or None: only `_self_` and `[override] /GROUP: OPTION` for
    fttool's own groups (model, data, method, objective, hardware, logging), the option a plain name."""
    if entry == "_self_":
        return None
    if not isinstance(entry, dict) or len(entry) != 1:
        return (
            f"'{entry}' is not a group choice; write `- override /GROUP: OPTION` with GROUP one of {', '.join(GROUPS)}"
        )
    ((key, option),) = entry.items()
    m = DEFAULTS_ENTRY.match(str(key))
    if not m or m.group("group") not in GROUPS:
        return f"'{key}' is not one of fttool's groups ({', '.join(GROUPS)}); Hydra's own groups cannot be chosen here"
    if not isinstance(option, str) or not OPTION.match(option):
        return f"the option {option!r} of {m.group('group')} must be a plain option name (a file in fttool's conf/{m.group('group')}/)"
    return None


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
OPEN_DICTS = ("data.columns", "data.roles", "data.template_kwargs", "eval.gate", "objective.rewards")


def schema_node(schema=RunSpec, prefix: str = ""):
    """A schema (the RunSpec, or one option's schema under `prefix`, e.g. "objective."), with the free-form mappings
    left open to new keys (Hydra closes everything else)."""
    node = OmegaConf.structured(schema)
    for key in OPEN_DICTS:
        sub = OmegaConf.select(node, key[len(prefix) :]) if key.startswith(prefix) else None
        if sub is not None:
            OmegaConf.set_struct(sub, False)
    return node


def register() -> None:
    """Store the typed schemas and every recipe in Hydra's ConfigStore (idempotent), each without its `meta:` header
    (not a run key)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="fttool_schema", node=schema_node())
    for group, schemas in OPTION_SCHEMAS.items():
        for name, schema in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=schema_node(schema, f"{group}."))
    for name, path in recipe_files().items():
        if recipe_problem(name) is not None:
            continue  # never composable (unreadable, unsafe, old keys, bad meta): choosing it names the problem
        node = load_recipe(path)
        node.pop(recipes.META, None)
        cs.store(group="recipe", name=name, node=node, package="_global_", provider=str(path))


__all__ = ["GROUPS", "conf_dir", "recipe_dirs", "recipe_files", "group_options", "register"]
