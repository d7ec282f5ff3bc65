"""Files bundled with fttool (the tiny demo model and demo data), addressed as `fttool:NAME`."""

from __future__ import annotations

from pathlib import Path

PREFIX = "fttool:"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def resolve(path: str) -> str:
    """`fttool:tiny-chat` -> the bundled folder; any other path or hub id is returned unchanged."""
    if isinstance(path, str) and path.startswith(PREFIX):
        return str(ASSETS_DIR / path[len(PREFIX) :])
    return path


def is_local(path: str) -> bool:
    return Path(resolve(path)).expanduser().exists()
