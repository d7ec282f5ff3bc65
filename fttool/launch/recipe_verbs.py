"""`fttool recipes`: recipes shared between teams. `list` reads every recipe file on the search path directly (no
Hydra: fast); `show` and `diff` compose and validate exactly as `fttool check +recipe=NAME` does; `save` writes the
smallest recipe that reproduces a finished run (its group choices, the keys that differ from what they compose to,
and a `meta:` header with the run's figures as expected results)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from fttool.config import devices, recipes, registry
from fttool.config.spec import GROUPS, world_size
from fttool.errors import UserError, suggestion
from fttool.launch import rundir
from fttool.runfolder import folder as run_folder
from fttool.runfolder import runfiles
from fttool.verbs import VERBS

# never compared nor saved: the run's own name and folder, and what may differ between launches or machines of one
# run (rundir.RESUMABLE_DIFFS: resume, resume_data, hardware.machine_rank / main_address / main_port /
# join_timeout_s)
NOT_COMPARED = frozenset({"run_name", "output_dir"}) | rundir.RESUMABLE_DIFFS
# set by fttool from other keys (validation.build_spec, lineage.resolve): saved only when re-composing does not give them
DERIVED = ("train.lr", "model.name_or_path", "model.revision", "model.parent_adapter", "data.metrics")
SAVE_KEYS = {
    "run": "the finished run folder to save",
    "name": "the recipe's name (its file is NAME.yaml)",
    "dir": "folder to write it in (default: the first FTTOOL_RECIPE_PATH folder, else ./recipes)",
    "overwrite": "true to replace an existing recipe file of that name",
}


def usage(verb: str) -> str:
    v = VERBS[verb]
    lines = [f"usage: fttool {verb} [SUBCOMMAND] ...", "", v.about, "", "subcommands:"]
    for name, (args, about, example) in v.subcommands.items():
        lines += [f"  {verb} {name} {args}".rstrip(), f"      {about}", f"      e.g. {example}"]
    lines += ["", "save's keys:"] + [f"  {k:<11}{d}" for k, d in SAVE_KEYS.items()]
    lines += [
        "",
        f"Recipes are looked up in the {registry.RECIPE_PATH_ENV} folders (colon-separated, first match wins), "
        "then in fttool's shipped recipes.",
    ]
    return "\n".join(lines)


def main(verb: str, argv: List[str]) -> None:
    if any(a in ("-h", "--help") for a in argv):
        print(usage(verb))
        return
    sub, args = (argv[0], argv[1:]) if argv else ("list", [])
    subs = VERBS[verb].subcommands
    if sub not in subs:
        hint = suggestion(sub, subs, f"fttool {verb} {{}}")
        if not hint and sub in registry.recipe_files():
            hint = f" To see that recipe: fttool {verb} show {sub}."
        raise UserError(
            f"{verb}: unknown subcommand '{sub}'.{hint} Subcommands: {', '.join(subs)} (fttool {verb} --help)."
        )
    {"list": list_recipes, "show": show, "diff": diff, "save": save}[sub](args)


# -- list --------------------------------------------------------------------------------------------------------
def default_choices() -> Dict[str, str]:
    """group -> option that conf/config.yaml's defaults pick."""
    tree = OmegaConf.to_container(OmegaConf.load(registry.conf_dir() / "config.yaml"))
    return {g: o for g, o in recipes.group_choices(tree).items() if g in GROUPS}


def origin(folder: Path) -> str:
    return "shipped" if folder == registry.shipped_recipes_dir() else str(folder)


def entries() -> List[Dict[str, Any]]:
    """Every recipe file on the search path, in lookup order: its name, folder, what it picks, and its problem."""
    defaults, out, first = default_choices(), [], {}
    for folder in registry.recipe_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.yaml")):
            row = {"name": path.stem, "path": path, "origin": origin(folder), "problem": None, "shadows": []}
            if path.stem in first:
                first[path.stem]["shadows"].append(row["origin"])
                row["shadowed_by"] = first[path.stem]["origin"]
            else:
                first[path.stem] = row
            tree: Optional[Dict[str, Any]] = None  # None: the file could not be read
            try:
                node = registry.load_recipe(path)
                tree = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_dict(node) else {}
                registry.check_recipe(path, node)
            except UserError as e:
                row["problem"] = str(e)
            picks = {} if tree is None else {**defaults, **recipes.group_choices(tree)}
            tree = tree or {}
            meta = recipes.meta_of(tree)
            model = tree.get("model") if isinstance(tree.get("model"), dict) else {}
            objective = picks.get("objective", "sft")
            row.update(
                description=meta.get("description") if isinstance(meta, dict) else None,
                model=str(model.get("name_or_path") or picks.get("model", "?")),
                method=picks.get("method", "?") + ("" if objective == "sft" else f"+{objective}"),
                hardware=picks.get("hardware", "?"),
            )
            row["description"] = row["description"] or _first_comment(path)
            out.append(row)
    return out


def _first_comment(path: Path) -> str:
    """A recipe without meta.description: its first comment line after `# @package`."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ""
    return next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#") and "@package" not in ln), "")


def list_recipes(args: List[str]) -> None:
    if args:
        raise UserError(f"recipes list takes no arguments; got {' '.join(args)}. To see one: fttool recipes show NAME.")
    rows = sorted(entries(), key=lambda r: r["name"])  # stable: lookup order within a name
    if not rows:
        print(f"no recipes found in {', '.join(str(d) for d in registry.recipe_dirs())}")
        return
    cols = ("name", "model", "method", "hardware", "origin")
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols) + "  description")
    for r in rows:
        note = r["description"] or ""
        if r["problem"]:
            note = f"PROBLEM: {r['problem']}"
        if r.get("shadowed_by"):
            note += f"  [shadowed by the {r['name']} in {r['shadowed_by']}: not used]"
        elif r["shadows"]:
            note += f"  [shadows the {r['name']} in {', '.join(r['shadows'])}]"
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols) + "  " + note)
    bad = registry.bad_recipe_path_entries()
    path = ", ".join(origin(d) for d in registry.recipe_dirs() if d.is_dir())
    print(f"\nsearch path (first match wins): {path}" + (f"; missing folders: {', '.join(bad)}" if bad else ""))
    print("fttool recipes show NAME | fttool recipes diff A [B] | fttool recipes save run=RUN name=NAME")


# -- show and diff -------------------------------------------------------------------------------------------------
def _check(overrides: List[str]):
    """Compose and validate as `fttool check` does: (spec, group choices)."""
    from fttool.config.compose import precheck

    registry.register()
    checked = precheck(overrides)[0]
    return checked.spec, checked.choices


def _recipe_path(name: str) -> Path:
    files = registry.recipe_files()
    if name not in files:
        raise UserError(
            f"no recipe '{name}'.{suggestion(name, files)} Available: {', '.join(sorted(files)) or '(none)'} "
            f"(fttool recipes lists them; add folders with {registry.RECIPE_PATH_ENV}=DIR1:DIR2)."
        )
    return files[name]


def show(args: List[str]) -> None:
    if not args or "=" in args[0]:
        raise UserError("recipes show needs a recipe name: fttool recipes show NAME [key=value ...].")
    name, overrides = args[0], args[1:]
    path = _recipe_path(name)
    text = path.read_text()
    print(f"# recipe {name}: {path}")
    print(text, end="" if text.endswith("\n") else "\n")
    spec, _ = _check([f"+recipe={name}", *overrides])
    print(f"# resolved spec (as fttool check +recipe={name}{''.join(' ' + o for o in overrides)})")
    print(rundir.spec_to_yaml(spec), end="")


def run_choices(run_dir: Path) -> Dict[str, str]:
    """The group choices a run folder recorded (env.json), without the recipe."""
    env = runfiles.read_json(run_dir / runfiles.ENV) or {}
    return {str(k): str(v) for k, v in (env.get("choices") or {}).items() if k in GROUPS}


def side(arg: str) -> Tuple[str, Any, Dict[str, str]]:
    """(label, spec, group choices) of a recipe name or a run folder."""
    if (Path(arg).expanduser() / runfiles.SPEC).is_file() or (
        arg not in registry.recipe_files() and Path(arg).expanduser().is_dir()
    ):
        run_dir = run_folder.open_run(arg)
        return f"run {run_dir}", rundir.load_spec(run_dir), run_choices(run_dir)
    _recipe_path(arg)
    spec, choices = _check([f"+recipe={arg}"])
    return f"recipe {arg}", spec, {k: v for k, v in choices.items() if k in GROUPS}


def _shown(value: Any) -> str:
    return value if isinstance(value, str) and value else json.dumps(value)


def differences(a, b) -> List[str]:
    """`key: a-value -> b-value` of two specs, dotted keys, sorted (NOT_COMPARED left out)."""
    fa, fb = recipes.flatten(asdict(a)), recipes.flatten(asdict(b))
    return [
        f"{k}: {_shown(fa[k]) if k in fa else '(absent)'} -> {_shown(fb[k]) if k in fb else '(absent)'}"
        for k in sorted(set(fa) | set(fb))
        if k not in NOT_COMPARED and fa.get(k, ...) != fb.get(k, ...)
    ]


def diff(args: List[str]) -> None:
    if len(args) not in (1, 2):
        raise UserError(
            "recipes diff compares two recipes or run folders (fttool recipes diff A B), or one with the defaults "
            "(fttool recipes diff A)."
        )
    if len(args) == 1:
        spec, choices = _check([])
        left = ("defaults", spec, {k: v for k, v in choices.items() if k in GROUPS})
    else:
        left = side(args[0])
    right = side(args[-1])
    print(f"--- {left[0]}\n+++ {right[0]}")
    groups = [
        f"{g}: {left[2].get(g, '(not recorded)')} -> {right[2].get(g, '(not recorded)')}"
        for g in GROUPS
        if left[2].get(g) != right[2].get(g)
    ]
    keys = differences(left[1], right[1])
    if groups:
        print("group choices:\n" + "\n".join(f"  {line}" for line in groups))
    if keys:
        print("keys:\n" + "\n".join(f"  {line}" for line in keys))
    if not groups and not keys:
        print("no differences")
    print(f"(not compared: {', '.join(sorted(NOT_COMPARED))})")


# -- save ----------------------------------------------------------------------------------------------------------
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _own(args: List[str]) -> Dict[str, str]:
    own = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key not in SAVE_KEYS:
            raise UserError(
                f"recipes save: unknown argument '{arg}'.{suggestion(key, SAVE_KEYS)} Keys: {', '.join(SAVE_KEYS)}; "
                "e.g. fttool recipes save run=runs/my-run name=my_recipe."
            )
        own[key] = value
    for key in ("run", "name"):
        if not own.get(key):
            raise UserError(
                f"recipes save: missing {key}=VALUE; e.g. fttool recipes save run=runs/my-run name=my_recipe."
            )
    return own


def recipe_folder(given: Optional[str]) -> Path:
    """Where a saved recipe goes: dir= when given, else the first FTTOOL_RECIPE_PATH folder, else ./recipes."""
    if given:
        return Path(given).expanduser().resolve()
    team = registry.recipe_dirs()[:-1]
    return team[0] if team else Path("recipes").resolve()


def _reproduce(cfg, keys: Dict[str, Any], user_keys: set):
    """The spec that a composed config with these keys on top gives (as +recipe= lays a recipe over its choices)."""
    from fttool.config import validation

    return validation.build_spec(OmegaConf.merge(cfg, _nested(keys)), set(user_keys))


def _nested(flat: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _flat(tree) -> Dict[str, Any]:
    return recipes.flatten(tree, leaves=registry.OPEN_DICTS)


def minimal_keys(spec, choices: Dict[str, str]) -> Dict[str, Any]:
    """The keys (dotted) whose run value differs from what the group choices compose to, without the ones fttool
    derives itself; checked to compose back to the run's spec (NOT_COMPARED aside)."""
    from fttool.config import compose, validation

    cfg = compose.compose([f"{g}={o}" for g, o in choices.items()])
    base = _flat(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    for key in validation.LOCAL_PATH_KEYS:  # the run's paths are absolute, as building the spec made them
        base[key] = validation._absolute(base.get(key)) if base.get(key) != "???" else "???"
    run = _flat(asdict(spec))
    keys = {k: v for k, v in run.items() if k not in NOT_COMPARED and (k not in base or base[k] != v)}
    trusted = {"model.trust_remote_code"} if spec.model.trust_remote_code else set()
    for key in DERIVED:
        if key in keys:
            trial = {k: v for k, v in keys.items() if k != key}
            try:
                again = _flat(asdict(_reproduce(cfg, trial, trusted)))
            except UserError:
                continue
            if again.get(key) == run[key]:
                keys = trial
    again = _flat(asdict(_reproduce(cfg, keys, trusted)))
    off = [k for k in sorted(set(run) | set(again)) if k not in NOT_COMPARED and run.get(k) != again.get(k)]
    if off:
        raise UserError(
            f"could not write a recipe that reproduces the run: {off[0]} composes to {again.get(off[0])!r}, the run "
            f"had {run.get(off[0])!r}. Start from fttool recipes diff and write the recipe by hand."
        )
    return keys


def device_of(spec, env: Dict[str, Any]) -> str:
    """The run's hardware in words: processes x device, on which machine."""
    n = world_size(spec.hardware)
    where = f" on {env['hostname']}" if env.get("hostname") else ""
    what = "GPU" if devices.of(spec.hardware).gpu else "CPU"
    cpus = f", {env['cpus']} cores" if env.get("cpus") else ""
    return f"{n}x {what} (hardware={spec.hardware.name}{cpus}){where}"


def _user() -> str:
    import getpass

    try:
        return os.environ.get("USER") or getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        return "unknown"


def save(args: List[str]) -> None:
    own = _own(args)
    name = own["name"].removesuffix(".yaml")
    if not _NAME.match(name):
        raise UserError(f"name={own['name']}: use letters, digits and . _ - only (the file is NAME.yaml).")
    overwrite = own.get("overwrite", "false").lower()
    if overwrite not in ("true", "false"):
        raise UserError(f"overwrite={own['overwrite']}: expected true or false.")
    run_dir = run_folder.open_run(own["run"])
    folder = recipe_folder(own.get("dir"))
    target = folder / f"{name}.yaml"
    if target.exists() and overwrite != "true":
        raise UserError(f"{target} already exists; choose another name=NAME, or add overwrite=true to replace it.")
    spec = rundir.load_spec(run_dir)
    env = runfiles.read_json(run_dir / runfiles.ENV) or {}
    choices = run_choices(run_dir)
    if not choices:  # a run folder without its record: the groups a spec names itself
        choices = {"method": spec.method.name, "objective": spec.objective.name, "hardware": spec.hardware.name}
    registry.register()
    keys = minimal_keys(spec, choices)
    notes = []
    if keys.pop("model.trust_remote_code", None):
        notes.append(
            "the run used model.trust_remote_code=true, which a recipe may not set: add it on the command line"
        )
    meta: Dict[str, Any] = {
        "schema": recipes.SCHEMA,
        "description": f"saved from run {run_dir}",
        "owner": _user(),
        "hardware": device_of(spec, {k: v for k, v in env.items() if k != "hostname"}),
    }
    result = runfiles.read_json(run_dir / runfiles.RESULT)
    if result:
        figures = {k: v for k, v in recipes.measured(result).items() if v is not None}
        rounded = {k: round(v, 1 if k == "tokens_per_s" else 4) for k, v in figures.items()}
        meta["expected"] = [{"on": device_of(spec, env), **rounded, "tolerance": recipes.DEFAULT_TOLERANCE}]
    else:
        notes.append("the run has no result.json (not finished): no expected results recorded")
    doc = {
        recipes.META: meta,
        "defaults": [{f"override /{g}": choices[g]} for g in GROUPS if g in choices],
        **_nested(keys),
    }
    text = "# @package _global_\n" + OmegaConf.to_yaml(OmegaConf.create(doc))
    folder.mkdir(parents=True, exist_ok=True)
    runfiles.write_atomic(target, text)
    print(f"saved {target} ({len(keys)} key(s) besides the group choices)")
    for note in notes:
        print(f"note: {note}")
    if folder not in registry.recipe_dirs():
        print(f"use it: export {registry.RECIPE_PATH_ENV}={folder}; fttool +recipe={name}")
    else:
        print(f"use it: fttool +recipe={name}")
