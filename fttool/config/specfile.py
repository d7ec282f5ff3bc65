"""Reading a run folder's spec.yaml as data: never resolved, so a folder from someone else cannot make fttool read
the environment or another key through an interpolation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from fttool.errors import UserError


def read_tree(path: Path) -> Dict[str, Any]:
    """spec.yaml as plain data, every `${` kept as text: fttool writes it resolved, so an interpolation in it was put
    there by hand, and a run folder from someone else must not make fttool read the environment or other keys."""
    import yaml

    def literal(value):
        if isinstance(value, str):
            return value.replace("\\${", "${").replace("${", "\\${")
        if isinstance(value, dict):
            return {k: literal(v) for k, v in value.items()}
        if isinstance(value, list):
            return [literal(v) for v in value]
        return value

    try:
        tree = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"{path}: not readable as YAML ({' '.join(str(e).split())[:200]}).")
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a mapping of run settings.")
    return literal(tree)
