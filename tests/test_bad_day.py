"""A bad day loses nothing: preemption, broken checkpoints, a full disk, two launches, changed data, Ctrl-C while
tokenizing, bad bytes, hostile recipes, and the small inconsistencies found beside them."""

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FAST, make_spec, run_cli, run_cli_here, train_run
from fttool.config import objectives
from fttool.data.tokenizer import load_tokenizer
from fttool.errors import UserError
from fttool.launch import rundir
from fttool.runfolder import folder

TINY = [
    "method=lora",
    "method.dropout=0",
    "train.logging_steps=1",
    "train.batch_size=4",
    "train.grad_accum=1",
    "data.max_samples=64",
    "eval.after_training=false",
]


def metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The runs an interrupted one must end equal to: 30 steps of TINY in one process, with grad_accum 1 (the
    1-process cases) and 2 (the same global batch as 2 processes x 1). Trained once, on demand, for the module."""
    made = {}

    def get(grad_accum):
        if grad_accum not in made:
            made[grad_accum], _ = train_run(
                [*TINY, "train.max_steps=30", "train.save_steps=1000", f"train.grad_accum={grad_accum}"],
                tmp_path_factory.mktemp(f"whole-{grad_accum}"),
                name="whole",
            )
        return made[grad_accum]

    return get


def _wait_for_step(run_dir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(r.get("step", 0) >= step and "loss" in r for r in metrics(run_dir)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
    raise AssertionError(f"the run never reached step {step}")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_equals_the_uninterrupted_one(tmp_path, uninterrupted):
    """SIGTERM (preemption) mid-run: the step in progress finishes, a checkpoint is saved, exit 143 with the resume
    command; resume=auto then ends exactly where an uninterrupted run ends."""
    args = [*TINY, "train.max_steps=30", "train.save_steps=1000", f"output_dir={tmp_path}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fttool", *args, "run_name=cut"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "cut"
    _wait_for_step(run_dir, 4, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-1500:] + err[-1500:]
    assert "stopped by SIGTERM at step" in err and "resume=auto run_name=cut" in err, err[-1500:]
    (ckpt,) = (run_dir / "checkpoints").glob("checkpoint-*")
    assert (ckpt / "fttool-manifest.json").is_file() and not (run_dir / "final").exists()
    step = int(ckpt.name.split("-")[1])
    assert 4 <= step < 30
    resumed = run_cli(*args, "run_name=cut", "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = adapter(uninterrupted(1)), adapter(run_dir)
    assert all((a[k] - b[k]).abs().max().item() < 1e-6 for k in a)
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, 31))


@pytest.mark.slow
def test_sigterm_to_a_two_process_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted):
    """2 processes (DDP): SIGTERM mid-run, resume=auto, and the adapter equals an uninterrupted run's with the same
    global batch (one process, grad_accum 2: test_distributed shows DDP equals it)."""
    from test_distributed import free_port

    args = [
        *TINY,
        "hardware=ddp",
        "hardware.device=cpu",
        "train.max_steps=30",
        "train.save_steps=1000",
        f"output_dir={tmp_path}",
    ]
    port = f"hardware.main_port={free_port()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fttool", *args, port, "run_name=cut"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = tmp_path / "cut"
    _wait_for_step(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher only: it tells the workers
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-1500:] + err[-1500:]
    assert "stopped by SIGTERM" in err and "resume=auto run_name=cut" in err, err[-1500:]
    (ckpt,) = (run_dir / "checkpoints").glob("checkpoint-*")
    assert (ckpt / "fttool-manifest.json").is_file() and int(ckpt.name.split("-")[1]) < 30
    resumed = run_cli(*args, port, "run_name=cut", "resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = adapter(uninterrupted(2)), adapter(run_dir)
    assert all((a[k] - b[k]).abs().max().item() < 1e-4 for k in a)
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, 31))


def _processes_of(run_dir) -> list:
    """Pids of live processes whose command line names the run folder (the launcher's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            state = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(run_dir) in cmd and state != "Z":
            found.append(int(entry))
    return found


@pytest.mark.slow
def test_kill_9_of_a_two_process_launcher_leaves_no_worker_and_the_next_launch_resumes(tmp_path):
    """Issue 24: kill -9 of the launcher once left its workers training beside the next launch. Now they stop
    with it (parent-death signal: they save a checkpoint at a clean point and end), its lock goes with them, and the
    next launch takes the run over from that checkpoint."""
    from test_distributed import free_port

    # 2000 steps would take minutes: the workers must be gone long before, in seconds
    args = [*TINY, "hardware=ddp", "hardware.device=cpu", "train.max_steps=2000", "train.save_steps=5000"]
    args += [f"output_dir={tmp_path}", "run_name=orphan"]

    def start(*extra):
        return subprocess.Popen(
            [sys.executable, "-m", "fttool", *args, f"hardware.main_port={free_port()}", *extra],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    run_dir = tmp_path / "orphan"
    proc = start()
    try:
        _wait_for_step(run_dir, 2, proc)
        assert len(_processes_of(run_dir)) >= 3  # accelerate's launcher and two workers
        proc.kill()  # SIGKILL: no handler of fttool's runs
        proc.wait()
        deadline = time.time() + 10
        while _processes_of(run_dir) and time.time() < deadline:
            time.sleep(0.3)
        left = _processes_of(run_dir)
        assert not left, f"still running 10 s after the launcher was killed: {left}"
    finally:
        for pid in _processes_of(run_dir):
            os.kill(pid, signal.SIGKILL)
    (ckpt,) = (run_dir / "checkpoints").glob("checkpoint-*")  # the workers stopped at a clean point and saved
    step = int(ckpt.name.split("-")[1])
    assert step < 2000
    again = start("resume=auto")
    try:
        _wait_for_step(run_dir, step + 2, again)
    finally:
        again.send_signal(signal.SIGTERM)
        _, err = again.communicate(timeout=120)
    assert f"{run_dir / rundir.LOCK} was left by process {proc.pid}" in err, err[-3000:]
    assert "is in use" not in err and again.returncode == 143, err[-3000:]
    steps = [r["step"] for r in metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > step + 1  # continued from the checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_preempted_slurm_job_requeues_itself_and_finishes_the_run(tmp_path, processes, uninterrupted):
    """hydra/launcher=slurm on the stand-in SLURM (tests/fake_slurm): submitit's preemption signal (SIGUSR2) to the
    job's tasks saves a checkpoint, the job requeues itself (scontrol requeue), and its second start continues the
    same run folder to the result of an uninterrupted run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from test_distributed import free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    state = tmp_path / "slurm"
    state.mkdir()
    env = dict(
        os.environ,
        FAKE_SLURM_DIR=str(state),
        PATH=os.pathsep.join(
            [os.path.join(root, "tests", "fake_slurm"), os.path.dirname(sys.executable), os.environ["PATH"]]
        ),
    )
    args = [*TINY, "train.max_steps=30", "train.save_steps=1000", f"output_dir={tmp_path}"]
    hardware = (
        ["hardware.strategy=none", "hardware.num_processes=1"]
        if processes == 1
        else ["hardware.strategy=ddp", "hardware.num_processes=2", f"hardware.main_port={free_port()}"]
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fttool",
            "-m",
            "hydra/launcher=slurm",
            "hardware=slurm",
            "hardware.device=cpu",
            "hardware.num_machines=1",
            *hardware,
            *args,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not list(tmp_path.glob("sweep-*/trial-00/metrics.jsonl")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.3)
    (run_dir,) = tmp_path.glob("sweep-*/trial-00")
    _wait_for_step(run_dir, 4, proc)
    for pid in (state / "job-1000.tasks").read_text().split():
        os.kill(int(pid), signal.SIGUSR2)  # SLURM's --signal goes to the job's tasks (submitit asks for USR2)
    out, err = proc.communicate(timeout=400)
    job_out = "".join(
        p.read_text(errors="replace") for p in sorted(tmp_path.rglob("*_log.*")) + sorted(state.glob("*.out"))
    )
    assert proc.returncode == 0, out[-2000:] + err[-2000:] + job_out[-4000:]
    assert (state / "requeued").read_text().split() == ["1000"], job_out[-3000:]
    assert "is requeued; it continues this run folder" in job_out and "was requeued (restart 1)" in job_out, job_out[
        -3000:
    ]
    assert [r["step"] for r in metrics(run_dir) if "loss" in r] == list(range(1, 31))
    a, b = adapter(uninterrupted(processes)), adapter(run_dir)
    assert all((a[k] - b[k]).abs().max().item() < (1e-6 if processes == 1 else 1e-4) for k in a)
    assert not (run_dir / rundir.LOCK).exists()


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_skipped_with_its_reason(tmp_path):
    from fttool.runfolder.checkpoint import newest_trusted

    run_dir, _ = train_run([*FAST, "train.max_steps=6", "train.save_steps=3", "train.save_total_limit=3"], tmp_path)
    newest = run_dir / "checkpoints" / "checkpoint-6"
    weights = newest / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a killed copy, a full disk
    found, skipped = newest_trusted(run_dir)
    assert found.name == "checkpoint-3" and skipped[0][0] == newest and "adapter_model.safetensors has" in skipped[0][1]
    assert [p.name for p in folder.checkpoints(run_dir)] == ["checkpoint-3"]
    shutil.rmtree(run_dir / "final")
    (run_dir / "result.json").unlink()
    spec = make_spec(
        [*FAST, "train.max_steps=6", "train.save_steps=3", "train.save_total_limit=3", "run_name=run", "resume=auto"],
        tmp_path,
    )
    rundir.prepare(spec, ["pytest"], {})
    from fttool.worker.train import train

    train(run_dir)
    log = (run_dir / "train.log").read_text()
    assert "skipping checkpoint-6: adapter_model.safetensors has" in log and "resuming from" in log
    assert "checkpoint-3 (step 3)" in log.split("resuming from")[-1]
    # a checkpoint whose file changed after it was written is caught by its hash
    ckpt = folder.checkpoints(run_dir)[-1]
    (ckpt / "trainer_state.json").write_text((ckpt / "trainer_state.json").read_text().replace("{", "{ ", 1)[:-1])
    from fttool.runfolder.checkpoint import problem

    assert "changed after it was written" in problem(ckpt)


def test_disk_full_while_saving_names_the_folder_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    from fttool.runfolder import checkpoint
    from fttool.worker import safe_trainer

    real, calls = checkpoint.write_manifest, []

    def failing(folder):
        calls.append(folder)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(folder)

    monkeypatch.setattr(safe_trainer, "write_manifest", failing)
    with pytest.raises(
        UserError,
        match=r"could not write checkpoint .*checkpoint-6: No space left on device\. .*GiB "
        r"free.*earlier checkpoints are intact.*resume=auto",
    ):
        train_run([*FAST, "train.max_steps=8", "train.save_steps=3"], tmp_path)
    run_dir = tmp_path / "run"
    assert [p.name for p in folder.checkpoints(run_dir)] == ["checkpoint-3"]
    assert not (run_dir / "checkpoints" / "checkpoint-6").exists()


@pytest.mark.parametrize("kib,writer", [(64, "safetensors"), (200, "torch")])
def test_a_real_full_disk_is_named_with_the_file_and_the_space(tmp_path, kib, writer, caplog):
    """Issue 24: the errors the writers really raise on ENOSPC (safetensors' SafetensorError for the adapter, torch's
    RuntimeError from its zip writer for optimizer.pt), met on a real small filesystem mounted where the second
    checkpoint goes; where no filesystem can be mounted, the same exception types are raised from the writers."""
    import torch
    from safetensors import SafetensorError

    from conftest import small_filesystem
    from fttool.worker.train import train

    spec = make_spec([*FAST, "train.max_steps=4", "train.save_steps=2", "run_name=run"], tmp_path)
    run_dir, _ = rundir.prepare(spec, ["pytest"], {})
    target = run_dir / "checkpoints" / "checkpoint-4"
    with small_filesystem(target, kib) as mounted, contextlib.ExitStack() as stack:
        if not mounted:  # the libraries' own exception types, raised from their own writers
            from unittest import mock

            err = (
                SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
                if writer == "safetensors"
                else RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            )
            real_save, real_st = torch.save, __import__("safetensors.torch").torch.save_file

            def fails(real):
                def call(obj, f, *a, **k):
                    if str(target) in str(f) and Path(f).name in ("adapter_model.safetensors", "optimizer.pt"):
                        Path(f).write_bytes(b"\0" * 4096)  # what a writer leaves when the disk fills
                        raise err
                    return real(obj, f, *a, **k)

                return call

            stack.enter_context(mock.patch("torch.save", fails(real_save)))
            stack.enter_context(mock.patch("safetensors.torch.save_file", fails(real_st)))
        with pytest.raises(UserError) as got:
            try:
                train(run_dir)
            finally:
                rundir.unlock(run_dir)
    message = str(got.value)
    file = "adapter_model.safetensors" if writer == "safetensors" else "optimizer.pt"
    assert f"could not write checkpoint {target} (at {file}): " in message, message
    assert re.search(r"No space left on device|unexpected pos", message) and "GiB free where about" in message
    if mounted:
        assert re.search(r"\): .*\. 0\.00 GiB free where about 0\.00 GiB", message), message  # the small disk's
    assert "earlier checkpoints are intact" in message and "resume=auto" in message
    assert [p.name for p in folder.checkpoints(run_dir)] == ["checkpoint-2"]
    from fttool.runfolder.checkpoint import problem

    assert problem(run_dir / "checkpoints" / "checkpoint-2") is None  # untouched, verifies in full


def test_a_manifest_is_written_after_every_file_is_fsyncd_and_hashed_off_the_critical_path(tmp_path, monkeypatch):
    """Issue 24: nothing was fsync'd before the manifest said a checkpoint was complete, and rank 0 hashed every
    file while the other ranks waited. Now: files and folders fsync'd first, the manifest (sizes) written durably at
    once, the hashes added by a thread; resume checks sizes meanwhile and hashes once they are there."""
    import threading

    from fttool.runfolder import checkpoint

    ckpt = tmp_path / "checkpoints" / "checkpoint-4"
    (ckpt / "sub").mkdir(parents=True)
    for name, size in (("optimizer.pt", 3 << 20), ("model.safetensors", 1 << 20), ("sub/extra.bin", 10)):
        (ckpt / name).write_bytes(os.urandom(size))
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        checkpoint.os, "fsync", lambda fd: (order.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))
    )
    monkeypatch.setattr(
        checkpoint.os, "replace", lambda a, b: (order.append(f"manifest {Path(b).name}"), real_replace(a, b))
    )
    hashing_may_start = threading.Event()
    real_sha = checkpoint._sha256
    monkeypatch.setattr(checkpoint, "_sha256", lambda p: (hashing_may_start.wait(30), real_sha(p))[1])

    checkpoint.write_manifest(ckpt)  # returns while the hashes are still to come
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())["files"]
    assert sorted(manifest) == ["model.safetensors", "optimizer.pt", "sub/extra.bin"]
    assert all("sha256" not in e for e in manifest.values()) and checkpoint.problem(ckpt) is None
    first = order.index(f"manifest {checkpoint.MANIFEST}")
    synced = set(order[:first])
    assert {str(ckpt / n) for n in manifest} | {str(ckpt), str(ckpt / "sub")} <= synced, order
    hashing_may_start.set()
    checkpoint.wait_for_hashes()
    manifest = json.loads((ckpt / checkpoint.MANIFEST).read_text())["files"]
    assert all(len(e["sha256"]) == 64 for e in manifest.values())
    (ckpt / "sub" / "extra.bin").write_bytes(os.urandom(10))  # same size, other bytes
    assert "changed after it was written" in checkpoint.problem(ckpt)


def test_low_free_space_is_said_before_a_save(tmp_path, monkeypatch):
    import shutil as sh

    from fttool.runfolder import checkpoint

    ckpt = tmp_path / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "optimizer.pt").write_bytes(b"x" * 10_000)
    checkpoint.write_manifest(ckpt)
    assert checkpoint.low_space(tmp_path) is None
    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: usage._replace(free=11_000))
    assert "the next save may not fit" in checkpoint.low_space(tmp_path)


HOLDER = """
import fcntl, json, os, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "started": "2026-11-26 10:00:00"}).encode(), 0)
print("holding", flush=True)
time.sleep(60)
"""


def test_one_owner_per_run_folder(tmp_path, capsys):
    """The lock is an flock held by a live process: refused while it lives, taken over (said) once it is gone."""
    spec = make_spec(["run_name=owned"], tmp_path)
    run_dir, _ = rundir.prepare(spec, ["pytest"], {})
    rundir.unlock(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir / rundir.LOCK)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"holding"
        again = make_spec(["run_name=owned", "resume=auto"], tmp_path)
        with pytest.raises(UserError, match=rf"is in use: process {holder.pid} on .* since 2026-11-26 10:00:00"):
            rundir.prepare(again, ["pytest"], {})
    finally:
        holder.kill()
        holder.wait()
    rundir.prepare(again, ["pytest"], {})  # the holder is gone (its lock went with it): taken over
    assert f"left by process {holder.pid} (which is gone)" in capsys.readouterr().err
    assert json.loads((run_dir / rundir.LOCK).read_text())["pid"] == os.getpid()
    rundir.unlock(run_dir)
    assert not (run_dir / rundir.LOCK).exists()
    for left in ("", "{not json"):  # a death between create and write: diagnosed, never a permanent block
        (run_dir / rundir.LOCK).write_text(left)
        rundir.prepare(again, ["pytest"], {})
        err = capsys.readouterr().err
        assert "taking the run over" in err and ("unreadable" if left else "record is empty") in err, err
        rundir.unlock(run_dir)


TAKER = """
import sys, time
from pathlib import Path
from fttool.errors import UserError
from fttool.launch import rundir
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both start together
try:
    rundir.lock(Path(sys.argv[1]))
except UserError as e:
    print("refused", e, flush=True)
else:
    print("owner", flush=True)
    time.sleep(2)
"""


def test_two_takeovers_of_a_stale_lock_leave_exactly_one_owner(tmp_path):
    """Issue 24: two launches that both found the same dead holder once both trained (the second deleted the first's
    fresh lock). With the flock exactly one owns the run folder."""
    for attempt in range(3):
        run_dir = tmp_path / f"run{attempt}"
        run_dir.mkdir()
        (run_dir / rundir.LOCK).write_text(json.dumps({"pid": 999999, "host": os.uname().nodename, "started": "x"}))
        at = time.time() + 1.5
        procs = [
            subprocess.Popen([sys.executable, "-c", TAKER, str(run_dir), str(at)], stdout=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outs = sorted(p.communicate(timeout=60)[0].split()[0] for p in procs)
        assert outs == ["owner", "refused"], outs


def test_a_requeued_slurm_job_takes_its_run_folder_back(tmp_path, monkeypatch, capsys):
    """The second start of a SLURM job continues the folder its first start created (no resume=auto needed), even
    when that start was killed holding the lock on another node; another job with the same command is refused."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    spec = make_spec(["run_name=job"], tmp_path)
    run_dir, created = rundir.prepare(spec, ["pytest"], {})
    assert created and json.loads((run_dir / "env.json").read_text())["slurm_job"] == "77"
    rundir.unlock(run_dir)  # the first start was killed on another node, its record left behind
    (run_dir / rundir.LOCK).write_text(json.dumps({"pid": 1, "host": "node-a", "started": "x", "slurm_job": "77"}))
    with pytest.raises(UserError, match="already exists"):
        rundir.prepare(spec, ["pytest"], {})  # not a requeue: a second launch
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again, created = rundir.prepare(spec, ["pytest"], {})
    assert again == run_dir and not created
    err = capsys.readouterr()
    assert "was requeued (restart 1): continuing" in err.out and "earlier start of SLURM job 77" in err.err
    rundir.unlock(run_dir)
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(UserError, match="already exists"):
        rundir.prepare(spec, ["pytest"], {})


@pytest.mark.slow
def test_a_second_launch_of_a_running_run_is_refused(tmp_path):
    args = [*TINY, "train.max_steps=400", "train.save_steps=1000", f"output_dir={tmp_path}", "run_name=busy"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fttool", *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for_step(tmp_path / "busy", 1, proc)
        second = run_cli(*args, "resume=auto", cwd=tmp_path)
        assert second.returncode == 2 and f"is in use: process {proc.pid}" in second.stderr, second.stderr
    finally:
        proc.kill()
        proc.communicate()


def test_changed_data_on_resume_is_refused_unless_asked_for(tmp_path):
    from fttool.worker.train import train

    data = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} said"}]}
        for i in range(32)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = [*FAST, "train.max_steps=6", "train.save_steps=3", "data=chat", f"data.path={data}"]
    run_dir, _ = train_run(steps, tmp_path)
    shutil.rmtree(run_dir / "final")
    (run_dir / "result.json").unlink()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[::-1]))  # the same rows, another order
    rundir.prepare(make_spec(steps + ["run_name=run", "resume=auto"], tmp_path), ["pytest"], {})
    with pytest.raises(
        UserError,
        match=rf"the data differs from what .* trained on: data.path={data} \(its content "
        r"changed\).*resume_data=changed",
    ):
        train(run_dir)
    rundir.prepare(make_spec(steps + ["run_name=run", "resume=auto", "resume_data=changed"], tmp_path), ["pytest"], {})
    train(run_dir)
    record = json.loads((run_dir / "data.json").read_text())
    assert record["history"][0]["changed"] == [f"data.path={data} (its content changed)"]


def test_ctrl_c_before_training_leaves_no_run_folder(tmp_path, monkeypatch):
    """Ctrl-C while the data is tokenized (or the model loads): no half-made run folder blocks the same command."""
    from fttool.launch import launcher as launch_mod
    from fttool.worker import train as train_mod

    def interrupted(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    spec = make_spec(["run_name=ctrlc"], tmp_path)
    with pytest.raises(KeyboardInterrupt):
        launch_mod.launch(spec, ["pytest"], {})
    assert not (tmp_path / "ctrlc").exists()


def test_tokenizing_workers_leave_ctrl_c_to_the_parent():
    """datasets' worker processes ignore SIGINT (the parent stops them): no traceback per worker."""
    import multiprocessing

    from fttool.data.features import SEQUENCES
    from fttool.data.pipeline import _encode_fn

    class Enc:
        def encode_batch(self, *a, **k):
            return {"handler": [str(signal.getsignal(signal.SIGINT))]}

    # the parent handles Ctrl-C, as from a terminal (a test run started with `&` from a script inherits an ignore)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ctx = multiprocessing.get_context("fork")
        fn, queue = _encode_fn(Enc(), SEQUENCES, False), ctx.Queue()
        child = ctx.Process(target=lambda: queue.put(fn({"loc": [], "example": []})["handler"]))
        child.start()
        got = queue.get(timeout=60)
        child.join()
        assert got == [str(signal.SIG_IGN)]
        assert fn({"loc": [], "example": []})["handler"] != [str(signal.SIG_IGN)]  # the parent keeps its handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    "suffix,content,where",
    [
        (".jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2: byte 0xe9 at column 14"),
        (".json", b'[\n{"text": "ok"},\n{"text": "caf\xe9"}]', ":3: byte 0xe9 at column 14"),
        (".csv", b"text\nok\ncaf\xe9\n", ":3: byte 0xe9 at column 4"),
    ],
)
def test_a_bad_byte_is_named_by_file_and_line(tmp_path, suffix, content, where):
    from fttool.data.sources import read_rows

    path = tmp_path / f"d{suffix}"
    path.write_bytes(content)
    with pytest.raises(UserError, match=rf"{path}{where} is not UTF-8.*iconv"):
        read_rows(str(path))


@pytest.mark.parametrize(
    "name,body,key",
    [
        (
            "callbacks",
            "hydra:\n  callbacks:\n    x:\n      _target_: shutil.copyfile\n      src: {src}\n      dst: {dst}\n",
            "hydra",
        ),
        ("launcher", "defaults:\n  - override /hydra/launcher: basic\n", "defaults\\[0\\]"),
        (
            "logging",
            "hydra:\n  job_logging:\n    handlers:\n      f:\n        class: logging.FileHandler\n"
            "        filename: {dst}\n",
            "hydra",
        ),
        (
            "target",
            "data:\n  template_kwargs:\n    x:\n      _target_: shutil.copyfile\n",
            "data.template_kwargs.x._target_",
        ),
        ("resolver", "run_name: ${{oc.env:HOME}}\n", "run_name"),
        # every interpolation but a plain key reference, however it is spelled (issue 24)
        (
            "nested",
            "data:\n  template_kwargs:\n    r: env\n    s: ${{oc.${{data.template_kwargs.r}}:FTTOOL_PLANTED}}\n",
            "s",
        ),
        (
            "keyed",
            "data:\n  template_kwargs:\n    k: oc.env\n    s: x${{${{data.template_kwargs.k}}:FTTOOL_PLANTED}}\n",
            "s",
        ),
        ("quoted", "data:\n  template_kwargs:\n    s: 'a ${{ oc.env : FTTOOL_PLANTED }} b'\n", "s"),
        ("string_default", "defaults:\n  - tiny_cpu\n", "defaults\\[0\\]"),
        ("option_path", "defaults:\n  - override /model: ../../etc/x\n", "defaults\\[0\\]"),
        ("outside_data", "defaults:\n  - override /data: chat\ndata:\n  path: {outside}/id_rsa.jsonl\n", "data.path"),
        ("home_template", "data:\n  template: ~/.ssh/id_rsa\n", "data.template"),
    ],
)
def test_recipes_run_no_code(tmp_path, name, body, key):
    team = tmp_path / "team"
    team.mkdir()
    dst = tmp_path / "pwned"
    outside = tmp_path.parent / f"{tmp_path.name}-elsewhere"  # neither the recipe's folder nor the cwd
    outside.mkdir(exist_ok=True)
    (outside / "id_rsa.jsonl").write_text("a file of the user's that a recipe must not make a run read\n")
    (team / f"{name}.yaml").write_text(
        "# @package _global_\n" + body.format(src=team / f"{name}.yaml", dst=dst, outside=outside)
    )
    (team / "fine.yaml").write_text("# @package _global_\nrun_name: fine-${seed}\n")
    dst.write_text("a file of the user's that a recipe must not make a run read")
    env = {"FTTOOL_RECIPE_PATH": str(team), "HOME": str(outside), "FTTOOL_PLANTED": "planted-secret-value"}
    for verb in ("check", "train"):
        r = run_cli_here(verb, f"+recipe={name}", cwd=tmp_path, env=env)
        # the file and line of the value, the key, and nothing of the environment's values
        assert r.returncode == 2 and re.search(rf"recipe {re.escape(str(team / name))}.yaml(:\d+)?: ", r.stderr), (
            r.stderr
        )
        assert re.search(rf"{key}: ", r.stderr) and "planted-secret-value" not in r.stdout + r.stderr, r.stderr
        assert dst.read_text().startswith("a file of the user's") and not (tmp_path / "runs").exists()
    ok = run_cli_here("check", "+recipe=fine", cwd=tmp_path, env={"FTTOOL_RECIPE_PATH": str(team)})
    assert ok.returncode == 0 and "fine-42" in ok.stdout, ok.stderr


def test_check_refuses_slurm_placeholders_outside_slurm_as_train_does(tmp_path):
    for verb in ("check", "train"):
        r = run_cli_here(verb, "hardware.machine_rank=-1", cwd=tmp_path)
        assert r.returncode == 2 and "filled in by a SLURM job" in r.stderr, (verb, r.stderr)


@pytest.mark.slow
def test_resume_keeps_earlier_validation_rows_and_a_finished_run_is_not_trained_again(tmp_path):
    from fttool.worker.callbacks import truncate_metrics

    steps = [*FAST, "train.max_steps=6", "train.save_steps=2", "train.eval_steps=2", "data.val_ratio=0.2"]
    run_dir, _ = train_run(steps, tmp_path)
    before = [r for r in metrics(run_dir) if "eval_loss" in r]
    truncate_metrics(run_dir, 4)
    kept = metrics(run_dir)
    assert [r["step"] for r in kept if "eval_loss" in r] == [r["step"] for r in before if r["step"] <= 4] == [2, 4]
    r = run_cli_here(*steps, "run_name=run", f"output_dir={tmp_path}", "resume=auto", cwd=tmp_path)
    assert r.returncode == 0 and "has finished (result.json is there); there is nothing to resume" in r.stderr
    assert "error" not in r.stderr


def test_a_cache_hit_names_the_file_given(tmp_path):
    """Two files with the same content share a cache entry; the samples name the file of this run."""
    from fttool import data

    rows = "".join(
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]})
        + "\n"
        for i in range(8)
    )
    first, second = tmp_path / "a" / "train.jsonl", tmp_path / "b" / "train.jsonl"
    for p in (first, second):
        p.parent.mkdir()
    first.write_text(rows)
    second.write_text(rows)
    for path, hit in ((first, False), (second, True)):
        spec = make_spec(["data=chat", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}"], tmp_path)
        prepared = data.prepare_datasets(spec, load_tokenizer(spec), objectives.of(spec).features)
        assert prepared.from_cache == hit
        assert prepared.train[0]["loc"] == f"{path}:1"
