"""The tokenized-data cache: one folder per key, written once, memory-mapped by every later reader.

The key is a hash of everything that changes the tokens: the bytes of every source file (or a hub dataset's
fingerprint), the tokenizer (its full vocabulary and special tokens), the chat template, and every data.*
field except those that only change how batches are formed or where things live. A second run, another
rank or another sweep trial with the same key loads the folder instead of tokenizing again; a change in any
part of the key builds a new one. Folders are written under a temporary name and renamed when complete, so a
reader never sees half a cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

VERSION = 5  # bump when the encoding logic changes what a key produces
NOT_IN_KEY = {
    "packing",
    "num_proc",
    "cache_dir",
    "allow_template_change",
    "path",
    "mix",
    "val_path",
    "test_path",
    "metrics",
    "json_schema",
}  # these change no token (metrics score the test split later)


def cache_root(data_spec) -> Path:
    root = data_spec.cache_dir or os.environ.get("FTTOOL_CACHE") or Path.home() / ".cache" / "fttool" / "data"
    return Path(root).expanduser()


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        json.dumps(
            {
                "special": tokenizer.special_tokens_map,
                "bos": getattr(tokenizer, "add_bos_token", None),
                "cls": type(tokenizer).__name__,
            },
            sort_keys=True,
            default=str,
        ).encode()
    )
    return h.hexdigest()


def key(data_spec, seed: int, tokenizer, template: Optional[str], sources: list, tag: Dict[str, str]) -> Dict[str, Any]:
    """The key's parts (kept in meta.json so a person can see why two runs share a cache or not). `tag`: the
    features' own part (features.py cache_tag), so pairs or prompts are cached apart from sequences."""
    fields = {k: v for k, v in dataclasses.asdict(data_spec).items() if k not in NOT_IN_KEY}
    return {
        **tag,
        "version": VERSION,
        "sources": sources,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": hashlib.sha256((template or "").encode()).hexdigest(),
        "data": fields,
        "seed": seed,
    }


def digest(parts: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def folder(data_spec, parts: Dict[str, Any]) -> Path:
    return cache_root(data_spec) / digest(parts)


def is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file()


def write(path: Path, parts: Dict[str, Any], splits: Dict[str, Any], stats: dict, paths: Optional[list] = None) -> None:
    """Write a complete cache folder atomically (a temporary folder renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, ds in splits.items():
            if ds is not None:
                ds.save_to_disk(str(tmp / name))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        # the source paths are not part of the key (same content, same tokens) but name the samples' rows
        (tmp / "meta.json").write_text(
            json.dumps({**parts, "paths": paths or []}, indent=1, sort_keys=True, default=str)
        )
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished the same key first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def relabel(splits: Dict[str, Any], path: Path, paths: list) -> Dict[str, Any]:
    """A cache hit made from files at other paths (same content): the samples' `loc` names the files given now."""
    old = json.loads((path / "meta.json").read_text()).get("paths") or []
    moves = {a: b for a, b in zip(old, paths) if a != b}
    if not moves:
        return splits

    def fix(loc: str) -> str:
        for a, b in moves.items():
            if loc.startswith(a) and loc[len(a) : len(a) + 1] in (":", " "):
                return b + loc[len(a) :]
        return loc

    return {
        k: ds.map(lambda r: {"loc": fix(r["loc"])}, load_from_cache_file=False) if ds is not None else None
        for k, ds in splits.items()
    }


def read(path: Path):
    """(splits, stats dict) of a complete cache folder."""
    import datasets

    splits = {
        name: datasets.load_from_disk(str(path / name)) if (path / name).is_dir() else None
        for name in ("train", "validation")
    }
    return splits, json.loads((path / "stats.json").read_text())
