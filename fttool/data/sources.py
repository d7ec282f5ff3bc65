"""Reading rows from where the data lives: local JSONL/JSON files, bundled demo files, hub datasets.

Every row keeps where it came from (file:line or dataset[split] #index) so any later error can name it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from fttool import assets
from fttool.errors import UserError

Row = Tuple[str, Dict[str, Any]]  # (location, record)


def read_rows(path: str, split: str = "train", key: str = "data.path") -> List[Row]:
    local = Path(assets.resolve(path)).expanduser()
    if local.exists() or path.startswith((".", "/", "~", assets.PREFIX)) or local.suffix in (".json", ".jsonl"):
        if not local.is_file():
            raise UserError(f"{key}={path}: no such file ({local}). Give a .jsonl or .json file.")
        return list(_read_file(local))
    return list(_read_hub(path, split, key))


def _read_file(path: Path) -> Iterator[Row]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object.")
                if not isinstance(rec, dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}.")
                yield f"{path}:{lineno}", rec
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); expected an array of objects.")
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of objects at the top level, got {type(data).__name__}.")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise UserError(f"{path} record #{i}: expected a JSON object, got {type(rec).__name__}.")
            yield f"{path} record #{i}", rec
    else:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use .jsonl or .json.")


def _read_hub(path: str, split: str, key: str) -> Iterator[Row]:
    try:
        import datasets

        ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # hub errors come in many classes
        raise UserError(f"{key}={path}: not a local file, and loading it as a hub dataset failed: {str(e).splitlines()[0]}")
    for i, rec in enumerate(ds):
        yield f"{path}[{split}] #{i}", dict(rec)
