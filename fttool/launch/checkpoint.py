"""Checkpoints a resume can trust (the Trainer side is in safe_trainer.py).

- Every checkpoint gets a manifest (`fttool-manifest.json`: each file's size and sha256), written last, after every
  process has finished writing. Old checkpoints are rotated out only after the new one's manifest is written, so a
  crash, a kill or a full disk mid-save leaves the previous checkpoints as they were.
- Resume takes the newest checkpoint whose manifest verifies and says which newer ones it skipped and why; a
  checkpoint without a manifest is never loaded (except in a run folder from before manifests, which has none).
- A disk-full (or other write) error while saving is one message naming the folder and the space needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

from fttool.launch.runfiles import CHECKPOINTS, write_json

log = logging.getLogger("fttool")
MANIFEST = "fttool-manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Each file's size and hash, written to a temporary name and renamed: the manifest exists only complete."""
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(folder)}
    write_json(folder / MANIFEST, {"files": entries}, indent=1)


def problem(folder: Path, hashes: bool = True) -> Optional[str]:
    """Why a checkpoint cannot be trusted, or None: no manifest, a file missing, cut short or changed."""
    path = folder / MANIFEST
    if not path.is_file():
        return "no manifest (the save did not finish)"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest ({e})"
    for name, want in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size:,} bytes, {want['size']:,} were written"
        if hashes and _sha256(f) != want["sha256"]:
            return f"{name} changed after it was written (hash differs)"
    return None


def _numbered(run_dir: Path) -> List[Path]:
    found = [p for p in (Path(run_dir) / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _legacy(run_dir: Path) -> bool:
    """A run folder written before manifests: none of its checkpoints has one."""
    return not any((p / MANIFEST).is_file() for p in _numbered(run_dir))


def complete(run_dir: Path) -> List[Path]:
    """Checkpoints whose save finished (manifest present, sizes right), oldest first."""
    if _legacy(run_dir):
        return [p for p in _numbered(run_dir) if (p / "trainer_state.json").is_file()]
    return [p for p in _numbered(run_dir) if problem(p, hashes=False) is None]


def newest_trusted(run_dir: Path) -> Tuple[Optional[Path], List[Tuple[Path, str]]]:
    """The newest checkpoint that verifies in full, and the newer ones skipped with why."""
    skipped: List[Tuple[Path, str]] = []
    legacy = _legacy(run_dir)
    for p in reversed(_numbered(run_dir)):
        why = (None if (p / "trainer_state.json").is_file() else "no trainer_state.json") if legacy else problem(p)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


def rotate(run_dir: Path, keep: int, best: Optional[str]) -> None:
    """Delete the oldest complete checkpoints beyond `keep` (never the best one); incomplete ones are left alone
    unless a newer complete checkpoint exists (they are then debris of an interrupted save)."""
    done = complete(run_dir)
    newest = done[-1] if done else None
    protect = {Path(best).name} if best else set()
    for p in _numbered(run_dir):
        if p not in done and newest is not None and int(p.name.split("-")[-1]) < int(newest.name.split("-")[-1]):
            shutil.rmtree(p, ignore_errors=True)
    excess = [p for p in done if p.name not in protect][: max(0, len(done) - keep)]
    for p in excess:
        shutil.rmtree(p, ignore_errors=True)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def disk_full_message(run_dir: Path, folder: Path, e: OSError) -> str:
    sizes = [_folder_size(p) for p in complete(run_dir)]
    need = f"about {max(sizes) / 2**30:.2f} GiB per checkpoint" if sizes else "room for one checkpoint"
    free = shutil.disk_usage(run_dir).free / 2**30
    return (
        f"could not write checkpoint {folder} ({e.strerror or e}): {free:.2f} GiB free where {need} is needed. "
        f"The earlier checkpoints are intact; free space (or lower train.save_total_limit) and continue with "
        f"resume=auto."
    )


def last_checkpoint(run_dir: Path, say: bool = False) -> Optional[Path]:
    """The newest checkpoint whose manifest verifies in full; with `say`, newer ones skipped are logged with why."""
    found, skipped = newest_trusted(run_dir)
    for path, why in skipped if say else ():
        log.warning(f"skipping {path.name}: {why}; it cannot be resumed from")
    return found
