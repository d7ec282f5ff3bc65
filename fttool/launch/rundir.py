"""The run folder, the unit of record: resolved spec, command, environment, metrics, checkpoints, result.

Layout of <output_dir>/<run_name>/:
  spec.yaml      the resolved, frozen RunSpec every worker reads
  command.txt    the exact command line and working directory
  env.json       python, platform, package versions, git revision of the working directory
  train.log      the run's log; metrics.jsonl one JSON object per logging step
  checkpoints/   checkpoint-N folders (resume=auto continues from the newest)
  final/         the trained adapter (LoRA/QLoRA) or model (full), with its tokenizer
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Optional

from fttool import preemption
from fttool.config.recipes import flatten
from fttool.config.spec import RunSpec
from fttool.errors import UserError
from fttool.runfolder import runfiles
from fttool.runfolder.folder import load_spec, run_dir_of, spec_to_yaml

SPEC_FILE, LOCK = runfiles.SPEC, runfiles.LOCK
PACKAGES = (
    "fttool",
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "deepspeed",
    "hydra-core",
    "omegaconf",
    "wandb",
    "tokenizers",
    "safetensors",
)
# keys that may differ between a run and its resumption, or between the machines of one run
RESUMABLE_DIFFS = {
    "resume",
    "resume_data",
    "hardware.machine_rank",
    "hardware.main_address",
    "hardware.main_port",
    "hardware.join_timeout_s",
}


def spec_diff(old: RunSpec, new: RunSpec) -> List[str]:
    a, b = flatten(asdict(old)), flatten(asdict(new))
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in RESUMABLE_DIFFS
    ]


def package_versions() -> Dict[str, Optional[str]]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(cwd: Path) -> Optional[Dict[str, Any]]:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=10)
        return {"commit": rev.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> Dict[str, Any]:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "packages": package_versions(),
        "git": git_revision(Path.cwd()),
        "slurm_job": preemption.slurm_job(),
    }


def _requeued_here(run_dir: Path) -> bool:
    """This is a requeued SLURM job, and the job that created run_dir: it continues the run (as resume=auto)."""
    if not preemption.requeued():
        return False
    try:
        return json.loads((run_dir / runfiles.ENV).read_text()).get("slurm_job") == preemption.slurm_job()
    except (OSError, ValueError):
        return False


def prepare(spec: RunSpec, argv: List[str], choices: Dict[str, Any]) -> tuple:
    """Create (or, with resume=auto, reopen) the run folder and take its lock (see `lock`). Returns (run_dir,
    created_now). Two launches of one run at once: one gets the lock, the other is refused."""
    run_dir = run_dir_of(spec)
    if spec.hardware.num_machines > 1 and spec.hardware.machine_rank > 0:
        return join(spec, run_dir, argv), False
    had_spec = (run_dir / SPEC_FILE).is_file()
    if had_spec and spec.resume != "auto" and _requeued_here(run_dir):
        print(
            f"fttool: SLURM job {preemption.slurm_job()} was requeued (restart "
            f"{os.environ.get('SLURM_RESTART_COUNT')}): continuing {run_dir} from its newest checkpoint",
            flush=True,
        )
    elif had_spec and spec.resume != "auto":
        raise UserError(
            f"run folder {run_dir} already exists; continue that run with resume=auto run_name={spec.run_name}, "
            "or choose another run_name=NAME."
        )
    existed = run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock(run_dir)
    try:
        if had_spec:
            if (run_dir / runfiles.RESULT).is_file():
                raise RunFinished(
                    f"run {run_dir} has finished (result.json is there); there is nothing to resume. "
                    "Start a new run_name to train again."
                )
            diffs = spec_diff(load_spec(run_dir), spec)
            if diffs:
                raise UserError(
                    f"resume=auto: the spec differs from the one {run_dir} was started with ({'; '.join(diffs)}). "
                    "Resume with the same settings, or start a new run_name."
                )
            old = load_spec(run_dir)
            if old.resume_data != spec.resume_data:  # the workers read spec.yaml: this resume's choice goes there
                (run_dir / SPEC_FILE).write_text(spec_to_yaml(replace(old, resume_data=spec.resume_data)))
            _append(run_dir / runfiles.COMMAND, _command_line(argv))
            return run_dir, False
        if existed and any(p.name != LOCK for p in run_dir.iterdir()) and spec.resume != "auto":
            raise UserError(
                f"{run_dir} exists and is not an fttool run folder (no {SPEC_FILE}); choose another "
                "run_name=NAME or output_dir=DIR."
            )
        (run_dir / SPEC_FILE).write_text(spec_to_yaml(spec))
        (run_dir / runfiles.COMMAND).write_text(_command_line(argv))
        env = environment()
        env["choices"] = {k: v for k, v in choices.items() if not str(k).startswith("hydra")}
        (run_dir / runfiles.ENV).write_text(json.dumps(env, indent=2) + "\n")
    except BaseException:
        unlock(run_dir)
        if not existed:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir, not existed


class RunFinished(UserError):
    """resume=auto on a run that already finished: nothing to do, and not a failure."""

    exit_code = 0


# The lock: an advisory flock on .fttool.lock, held by the launcher (and inherited by the `accelerate launch` it
# starts), so it dies with its holder: no takeover race, no stale file to judge by a pid. The file also holds
# {"pid", "host", "started", "slurm_job"} for messages, and for a holder on another machine (where a filesystem may
# not share locks).
_HELD: Dict[str, int] = {}  # lock file -> the descriptor that holds it, in this process


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holder(fd: int) -> Optional[Dict[str, Any]]:
    """The record in the lock file: a dict, {} when empty, None when unreadable."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        value = json.loads(text) if text else {}
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _in_use(run_dir: Path, holder: Optional[Dict[str, Any]], path: Path) -> UserError:
    who = (
        f"process {holder.get('pid', '?')} on {holder.get('host', '?')} has trained in it since "
        f"{holder.get('started', '?')}"
        if holder
        else "a live process holds its lock (its record is empty or unreadable)"
    )
    return UserError(
        f"run folder {run_dir} is in use: {who} (a second launch of the same run?). Wait for it to finish; "
        f"`fuser {path}` shows the processes that hold it."
    )


def lock(run_dir: Path) -> None:
    """Take the run folder for this process: an exclusive flock on its lock file, kept until unlock() or this
    process (and every child it handed the descriptor to) ends. Held by a live process: refused, naming it. A file
    left by a process that died (pid gone, empty or unreadable record) is taken over, saying so; a record from
    another machine is refused unless this is a requeued start of the same SLURM job (that machine's lock may be
    invisible here)."""
    import fcntl

    path = Path(run_dir) / LOCK
    key = str(path.resolve())
    if key in _HELD:
        return  # this process holds it already
    for _ in range(10):
        existed = path.exists()  # unlock() removes it: one that is there was left, or is held
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _in_use(run_dir, holder, path) from None
        except OSError as e:
            os.close(fd)
            raise UserError(
                f"cannot lock {path} ({e.strerror}): the filesystem of {run_dir} does not support file locks; "
                "put output_dir on one that does (a local disk, NFSv4, Lustre)."
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder unlinked it as we opened it: lock the file that is there now
            os.close(fd)
            continue
        break
    else:
        raise UserError(f"could not take {path}: it keeps being replaced; is another fttool starting this run?")
    holder = _holder(fd)
    elsewhere = bool(holder) and holder.get("host") not in (None, platform.node())
    earlier_start = bool(holder) and preemption.requeued() and holder.get("slurm_job") == preemption.slurm_job()
    if elsewhere and not earlier_start:
        os.close(fd)
        raise UserError(
            f"run folder {run_dir} is in use by process {holder.get('pid', '?')} on {holder.get('host')} since "
            f"{holder.get('started', '?')}, as far as this machine can tell (a lock on another machine may not be "
            f"visible here). If that process is gone, delete {path}."
        )
    if holder != {} or existed:
        why = (
            "its record is unreadable"
            if holder is None
            else "its record is empty: a launch that died as it took the lock"
            if not holder
            else f"an earlier start of SLURM job {preemption.slurm_job()}"
            if earlier_start
            else "which is gone"
            if not (isinstance(holder.get("pid"), int) and holder["pid"] > 0 and _alive(holder["pid"]))
            else "which no longer holds it"
        )
        pid = holder.get("pid") if holder else "?"
        print(f"fttool: warning: {path} was left by process {pid} ({why}); taking the run over", file=sys.stderr)
    mine = {
        "pid": os.getpid(),
        "host": platform.node(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "slurm_job": preemption.slurm_job(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
    os.set_inheritable(fd, True)  # a launched `accelerate launch` keeps holding it (run_workers passes it on)
    _HELD[key] = fd


def held_descriptors() -> List[int]:
    """The lock descriptors this process holds (for a child process that must hold the run folder too)."""
    return list(_HELD.values())


def unlock(run_dir: Path) -> None:
    """Give the run folder up (only this process's own lock): the file is removed, then the lock released."""
    import fcntl

    path = Path(run_dir) / LOCK
    fd = _HELD.pop(str(path.resolve()), None)
    if fd is None:
        return
    try:
        path.unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass
    finally:
        os.close(fd)


def join(spec: RunSpec, run_dir: Path, argv: List[str]) -> Path:
    """Machines other than 0 use the run folder machine 0 creates (a shared filesystem), once it has the same spec."""
    path = run_dir / SPEC_FILE
    deadline = time.time() + spec.hardware.join_timeout_s
    while not path.is_file():
        if time.time() > deadline:
            raise UserError(
                f"machine {spec.hardware.machine_rank}: machine 0 did not create {run_dir} within "
                f"hardware.join_timeout_s={spec.hardware.join_timeout_s} s. Start machine 0 with the same "
                "run_name and output_dir, on a filesystem both machines share."
            )
        time.sleep(0.5)
    time.sleep(0.2)  # machine 0 writes spec.yaml in one call; let it land
    diffs = spec_diff(load_spec(run_dir), spec)
    if diffs:
        raise UserError(
            f"machine {spec.hardware.machine_rank}: the spec differs from machine 0's in {run_dir} "
            f"({'; '.join(diffs)}); run the same command on every machine except hardware.machine_rank."
        )
    _append(run_dir / runfiles.COMMAND, _command_line(argv))
    return run_dir


def _command_line(argv: List[str]) -> str:
    prog, *args = argv
    return f"cd {shlex.quote(os.getcwd())} && {' '.join([prog, shlex.join(args)]).strip()}\n"


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def discard(run_dir: Path) -> None:
    """Remove a run folder that failed before training started (nothing half-written stays)."""
    shutil.rmtree(run_dir, ignore_errors=True)
