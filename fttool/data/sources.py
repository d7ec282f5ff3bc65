"""Reading rows from where the data lives: local JSON/JSONL/Parquet/CSV files, folders, globs, hub datasets.

Every row keeps where it came from (file:line, file record #i, or dataset[split] #i) so any later error can
name it. `fingerprint` gives a content hash of a source for the tokenized-data cache.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from fttool import assets
from fttool.errors import UserError

Row = Tuple[str, Dict[str, Any]]  # (location, record)
SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
GLOB_CHARS = "*?["


def is_local(path: str) -> bool:
    """A local path (file, folder, glob or bundled asset), as opposed to a hub dataset id."""
    local = Path(assets.resolve(path)).expanduser()
    return (
        local.exists()
        or path.startswith((".", "/", "~", assets.PREFIX))
        or local.suffix in SUFFIXES
        or any(c in path for c in GLOB_CHARS)
    )


def local_files(path: str, key: str = "data.path") -> List[Path]:
    """The data files a local path names: itself, the data files in a folder, or a glob's matches (sorted)."""
    resolved = assets.resolve(path)
    local = Path(resolved).expanduser()
    if any(c in path for c in GLOB_CHARS):
        files = sorted(Path(p) for p in glob.glob(str(local), recursive=True) if Path(p).suffix in SUFFIXES)
        if not files:
            raise UserError(f"{key}={path}: the pattern matches no {'/'.join(SUFFIXES)} file.")
        return files
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"{key}={path}: the folder holds no {'/'.join(SUFFIXES)} file.")
        return files
    if not local.is_file():
        raise UserError(
            f"{key}={path}: no such file or folder ({local}). Give a {', '.join(SUFFIXES)} file, a folder or a glob."
        )
    if local.suffix not in SUFFIXES:
        raise UserError(f"{key}={path}: unsupported file type '{local.suffix}'; use one of {', '.join(SUFFIXES)}.")
    return [local]


def read_rows(path: str, split: str = "train", key: str = "data.path") -> List[Row]:
    if is_local(path):
        return [row for f in local_files(path, key) for row in _read_file(f)]
    return list(_read_hub(path, split, key))


def fingerprint(path: str, split: str, key: str = "data.path") -> str:
    """Content hash of a source: the bytes of every local file, or the hub dataset's own fingerprint."""
    h = hashlib.sha256()
    if is_local(path):
        for f in local_files(path, key):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    else:
        h.update(f"hub:{path}:{split}:{_hub_dataset(path, split, key)._fingerprint}".encode())
    return h.hexdigest()


def _read_file(path: Path) -> Iterator[Row]:
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif path.suffix == ".json":
        yield from _read_json(path)
    else:
        yield from _read_table(path)


def not_utf8(path: Path, data: bytes, e: UnicodeDecodeError, first_line: int = 1) -> UserError:
    """A decoding error named by file:line and column, with the bad byte and the fix."""
    line = first_line + data.count(b"\n", 0, e.start)
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    return UserError(
        f"{path}:{line}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8 ({e.reason}); data files "
        f"must be UTF-8: convert it, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}."
    )


def _text(path: Path, data: bytes, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, data, e, first_line) from None


def _read_jsonl(path: Path) -> Iterator[Row]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _text(path, raw, lineno)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object."
                )
            if not isinstance(rec, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}.")
            yield f"{path}:{lineno}", rec


def _read_json(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(_text(path, path.read_bytes()))
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); expected an array of objects "
            "(for one object per line, name the file .jsonl)."
        )
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects at the top level, got {type(data).__name__}.")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise UserError(f"{path} record #{i}: expected a JSON object, got {type(rec).__name__}.")
        yield f"{path} record #{i}", rec


def _read_table(path: Path) -> Iterator[Row]:
    """Parquet and CSV through pyarrow (a dependency of datasets): columns become fields."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pcsv

            # every CSV column is text: a number-looking reply must stay the string it was
            names = next(csv.reader(io.StringIO(_text(path, path.read_bytes()), newline="")), [])
            table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types={n: "string" for n in names}))
    except UserError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise UserError(f"{path}: could not read it as {path.suffix[1:]}: {str(e).splitlines()[0]}")
    for i, rec in enumerate(table.to_pylist()):
        yield f"{path} row #{i + 1}", rec  # data rows counted from 1 (a CSV cell may span lines)


def _hub_dataset(path: str, split: str, key: str):
    try:
        import datasets

        return datasets.load_dataset(path, split=split)
    except Exception as e:  # hub errors come in many classes
        raise UserError(
            f"{key}={path}: not a local file, and loading it as a hub dataset failed: {str(e).splitlines()[0]}"
        )


def _read_hub(path: str, split: str, key: str) -> Iterator[Row]:
    for i, rec in enumerate(_hub_dataset(path, split, key)):
        yield f"{path}[{split}] #{i}", dict(rec)
