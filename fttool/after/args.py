"""key=value arguments of the verbs on a run (eval, export, generate, chat): numbers and flags, checked."""

from __future__ import annotations

from typing import Dict, Optional

from fttool.errors import UserError


def number(own: Dict[str, str], key: str, default, kind=float, low: Optional[float] = None):
    if key not in own:
        return default
    try:
        value = kind(own[key])
    except ValueError:
        raise UserError(f"{key}={own[key]}: expected {'a whole number' if kind is int else 'a number'}.")
    if low is not None and value < low:
        raise UserError(f"{key}={own[key]}: expected a value >= {low:g}.")
    return value


def flag(own: Dict[str, str], key: str) -> bool:
    value = own.get(key, "false").lower()
    if value not in ("true", "false"):
        raise UserError(f"{key}={own[key]}: expected true or false.")
    return value == "true"
