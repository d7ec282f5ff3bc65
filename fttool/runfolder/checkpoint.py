"""Checkpoints a resume can trust (the Trainer side is in safe_trainer.py).

- Every checkpoint gets a manifest (`fttool-manifest.json`: each file's size and sha256), written last, after every
  process has finished writing and every file is fsync'd; the hashes are computed by a thread while training goes
  on, so rank 0 does not hold the others at the barrier for minutes on a large checkpoint. Old checkpoints are rotated out only after the new one's manifest is written, so a
  crash, a kill or a full disk mid-save leaves the previous checkpoints as they were.
- Resume takes the newest checkpoint whose manifest verifies and says which newer ones it skipped and why; a
  checkpoint without a manifest is never loaded (except in a run folder from before manifests, which has none).
- A disk-full (or other write) error while saving is one message naming the folder and the space needed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fttool.runfolder.runfiles import CHECKPOINTS

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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, background: bool = True) -> None:
    """The checkpoint's manifest, on the critical path only as long as durability needs: every file and the folder
    are fsync'd, then the manifest of sizes is written (a temporary name, fsync'd, renamed, the folder fsync'd
    again): it exists only once the checkpoint is on disk. Each file's sha256 is added by a thread while training
    goes on (hashlib works outside the GIL), the manifest rewritten the same way; `background=False` hashes now."""
    files = _files(folder)
    for p in files:
        _fsync(p)
    for d in sorted({p.parent for p in files} | {folder}, key=lambda d: len(d.parts), reverse=True):
        _fsync(d)
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size} for p in files}
    _write_durably(folder, {"files": entries})
    if not background:
        _add_hashes(folder, entries)
        return
    thread = threading.Thread(target=_add_hashes, args=(folder, entries), name=f"hash-{folder.name}", daemon=True)
    _HASHING.append(thread)
    thread.start()


_HASHING: List[threading.Thread] = []


def _write_durably(folder: Path, manifest: dict) -> None:
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    _fsync(tmp)
    os.replace(tmp, folder / MANIFEST)
    _fsync(folder)


def _add_hashes(folder: Path, entries: Dict[str, Dict]) -> None:
    """Hash every file of a written checkpoint and rewrite its manifest with the hashes; a checkpoint rotated out
    meanwhile is left alone."""
    try:
        hashed = {name: {**e, "sha256": _sha256(folder / name)} for name, e in entries.items()}
        if (folder / MANIFEST).is_file():
            _write_durably(folder, {"files": hashed})
    except FileNotFoundError:  # rotated out while it was hashed
        pass
    except OSError as e:  # the sizes stay the record; resume checks those
        log.warning(f"could not hash {folder.name} for its manifest ({e.strerror or e}); its sizes are recorded")


def wait_for_hashes(timeout: float = 600.0) -> None:
    """Let the manifests being hashed finish (the end of a run, before result.json)."""
    deadline = time.time() + timeout
    while _HASHING:
        _HASHING.pop(0).join(max(0.0, deadline - time.time()))


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
        if hashes and "sha256" in want and _sha256(f) != want["sha256"]:  # no hash yet: the sizes are the record
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


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG)
# how the writers say a write failed: torch's zip writer (a RuntimeError from inline_container.cc: "unexpected pos",
# "PytorchStreamWriter failed writing file", "file write failed"), safetensors' SafetensorError ("I/O error: No space
# left on device (os error 28)"), and the OS's own words
WRITE_FAILED = re.compile(
    r"No space left|os error (?:28|122|5|30|27)\b|Disk quota|Read-only file system|StorageFull|"
    r"PytorchStreamWriter failed writing|file write failed|inline_container\.cc.*unexpected pos|iostream error"
)


def write_failure(e: BaseException) -> Optional[str]:
    """What a failed write said, when `e` (or what it was raised from) is one: an OSError with a disk errno, torch's
    RuntimeError from its zip writer, safetensors' SafetensorError. None for any other error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            return e.strerror or str(e)
        text = str(e)
        if not isinstance(e, (KeyboardInterrupt, SystemExit)) and WRITE_FAILED.search(text):
            return " ".join(text.split())[:160]
        e = e.__cause__ or e.__context__
    return None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def checkpoint_size(run_dir: Path) -> int:
    """The size of the biggest complete checkpoint (0 when there is none yet)."""
    return max((_folder_size(p) for p in complete(run_dir)), default=0)


def low_space(run_dir: Path) -> Optional[str]:
    """A warning before a save when the free space is under 1.2x the last checkpoint's size, else None."""
    size = checkpoint_size(run_dir)
    free = shutil.disk_usage(run_dir).free
    if size and free < 1.2 * size:
        return (
            f"only {_gib(free)} free in {run_dir} and the last checkpoint took {_gib(size)}: the next save may not "
            "fit; free space now (older runs, exports, caches) or lower train.save_steps' frequency"
        )
    return None


def failed_file(e: BaseException, folder: Path) -> Optional[Path]:
    """The file in `folder` a failed write was writing: the path the writer was called with (torch.save's `f`,
    safetensors' `filename`), read off the traceback's frames, innermost first. None when no frame names one."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)) and str(value).startswith(str(folder) + os.sep):
                return Path(value)
    return None


def disk_full_message(run_dir: Path, folder: Path, why: str, file: Optional[Path] = None) -> str:
    size = checkpoint_size(run_dir)
    need = f"about {_gib(size)} per checkpoint" if size else "room for one checkpoint"
    free = shutil.disk_usage(folder if folder.is_dir() else run_dir).free  # where the write failed
    at = f" (at {file.relative_to(folder) if folder in file.parents else file})" if file else ""
    return (
        f"could not write checkpoint {folder}{at}: {why}. {_gib(free)} free where {need} is needed. The earlier "
        f"checkpoints are intact and the partial one was removed; free space in {run_dir.parent} (older runs, "
        f"exports, the data cache) and continue with resume=auto."
    )


def last_checkpoint(run_dir: Path, say: bool = False) -> Optional[Path]:
    """The newest checkpoint whose manifest verifies in full; with `say`, newer ones skipped are logged with why."""
    found, skipped = newest_trusted(run_dir)
    for path, why in skipped if say else ():
        log.warning(f"skipping {path.name}: {why}; it cannot be resumed from")
    return found


def best_checkpoint(run_dir: Path, state) -> Optional[Tuple[str, int]]:
    """(folder name, step) of the checkpoint with the lowest validation loss, when this run folder has it (the state
    may hold the path of a folder the run was copied from)."""
    if not state.best_model_checkpoint or state.best_metric is None:
        return None
    name = Path(state.best_model_checkpoint).name
    if not (run_dir / CHECKPOINTS / name).is_dir():
        return None
    return name, int(name.split("-")[-1])


def mark_best(run_dir: Path, state) -> Optional[dict]:
    """checkpoints/best -> the checkpoint with the lowest validation loss (kept from rotation by the Trainer)."""
    best = best_checkpoint(run_dir, state)
    if best is None:
        return None
    name, step = best
    link = run_dir / CHECKPOINTS / "best"
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():  # a copy of the run folder turned the link into a folder
        shutil.rmtree(link)
    link.symlink_to(name, target_is_directory=True)
    log.info(
        f"best checkpoint: {name} (validation loss {state.best_metric:.4f}), linked as {link}"
        + ("; final/ holds it" if state.global_step != step else "")
    )
    return {"best_checkpoint": str(link.resolve()), "best_step": step, "best_eval_loss": state.best_metric}
