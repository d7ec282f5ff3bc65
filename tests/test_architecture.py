"""The layout's rules (docs/ARCHITECTURE.md): every module imports; no import cycles between modules (imports inside
functions count); configuration and data never reach into the worker, launching or what runs after training; the
run folder's contracts (fttool.runfolder) and model loading (fttool.models) into no stage; the worker never into
launching, what runs after training never into the worker; and composing a config imports no torch."""

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import fttool

ROOT = Path(fttool.__file__).resolve().parent


def _modules():
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _graph():
    mods = _modules()

    def owner(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fttool"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else owner(node.module))
            elif isinstance(node, ast.Import):
                deps.update(owner(a.name) for a in node.names if a.name.startswith("fttool"))
        deps.discard(name)
        deps.discard("fttool")
        graph[name] = deps
    return graph


def test_every_module_imports():
    for m in pkgutil.walk_packages(fttool.__path__, "fttool."):
        importlib.import_module(m.name)


def test_no_import_cycles():
    graph = _graph()
    state, path, cycles = {}, [], []

    def visit(v):
        state[v] = "open"
        path.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == "open":
                cycles.append(path[path.index(w) :] + [w])
            elif w not in state:
                visit(w)
        path.pop()
        state[v] = "done"

    for v in sorted(graph):
        if v not in state:
            visit(v)
    assert not cycles, cycles


def test_layers_point_one_way():
    stages = ("fttool.worker", "fttool.after", "fttool.launch")
    below_stages = stages + ("fttool.runfolder", "fttool.models", "fttool.plan")
    forbidden = {
        # configuration composes and validates only (the planner, fttool.plan, is built on it, not in it); data
        # serves every stage and reaches into none
        "fttool.config": below_stages,
        "fttool.data": below_stages + ("fttool.config",),  # it builds the features it is handed
        # the run folder's contracts and model loading are shared by every stage, and own none of them
        "fttool.runfolder": stages + ("fttool.models",),
        "fttool.models": stages,
        # stages read in order: a worker never reaches back into launching, what runs after training never into
        # the worker (both go through fttool.runfolder and fttool.models)
        "fttool.worker": ("fttool.launch",),
        "fttool.after": ("fttool.worker", "fttool.launch"),
    }
    back = [
        f"{m} imports {d}"
        for m, deps in _graph().items()
        for layer, bad in forbidden.items()
        if m == layer or m.startswith(layer + ".")
        for d in deps
        if d.startswith(bad)
    ]
    assert not back, back


def test_no_two_folders_import_each_other():
    """Folders (subpackages) depend one way: no pair imports the other both ways (three pairs did before the run
    folder, model loading and the planner got their own rooms and data stopped asking which objective it serves)."""
    folders = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}

    def folder_of(module: str):
        parts = module.split(".")
        return parts[1] if len(parts) > 2 and parts[1] in folders else None

    edges = {
        (folder_of(m), folder_of(d))
        for m, deps in _graph().items()
        for d in deps
        if folder_of(m) and folder_of(d) and folder_of(m) != folder_of(d)
    }
    both = sorted({tuple(sorted(e)) for e in edges if (e[1], e[0]) in edges})
    assert not both, both


def test_composing_a_config_imports_no_torch():
    code = (
        "import sys; from fttool.config import compose, registry; registry.register(); "
        "compose.precheck(['method=qlora', 'hardware=zero2']); "
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_every_objective_has_its_trainer_in_the_worker():
    """config/objectives.py names no worker class as a string (an edge this test could not see); the worker's table
    has a Trainer and an arguments class for every objective."""
    from fttool.config.objectives import OBJECTIVES
    from fttool.worker.trainers import CLASSES

    assert set(CLASSES) == set(OBJECTIVES)
    assert "fttool.worker" not in (ROOT / "config" / "objectives.py").read_text()
    for name, classes in CLASSES.items():
        trainer, args = classes()
        assert trainer.__name__.endswith("Trainer") and args.__name__.endswith(("Arguments", "Config")), name
