"""From a validated spec to a running job: create the run folder, then train in this process (one process)
or start `accelerate launch` with the generated config (several processes or machines) and wait for it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

from fttool import lifeline, preemption
from fttool.config import devices, slurm
from fttool.config.spec import RunSpec, world_size
from fttool.errors import Preempted, UserError
from fttool.launch import distributed, rundir
from fttool.runfolder import runfiles

ERRORS = runfiles.ERRORS
STOP_GRACE_S = 60  # after Ctrl-C, how long workers get to stop on their own


def launch(spec: RunSpec, argv: List[str], choices: Dict) -> None:
    from fttool.models import check_device

    slurm.check_resolved(spec.hardware)
    check_device(spec)  # before anything is written
    requeue = preemption.requeue_handler()  # submitit's, before fttool's own handlers replace it
    run_dir, created = rundir.prepare(spec, argv, choices)
    print(f"fttool: run folder {run_dir}", flush=True)
    try:
        _run(spec, run_dir, created)
    except Preempted as e:
        if requeue is None or e.signum != preemption.submitit_signal():
            raise
        rundir.unlock(run_dir)
        print(
            f"fttool: {e}\nfttool: SLURM job {preemption.slurm_job()} is requeued; it continues this run folder "
            "from that checkpoint.",
            flush=True,
        )
        requeue(e.signum, None)  # submitit: `scontrol requeue`, then it ends this process
        raise
    finally:
        rundir.unlock(run_dir)


def _run(spec: RunSpec, run_dir: Path, created: bool) -> None:
    from fttool.models import resolve_precision

    try:
        if spec.hardware.machine_rank in (0, -1, None):
            record_plan(spec, run_dir)
        if distributed.is_distributed(spec.hardware):
            config = distributed.write_configs(spec, run_dir, resolve_precision(spec))
            run_workers(spec, run_dir, config)
        else:
            from fttool.worker.train import train

            train(run_dir)
    except BaseException:  # a UserError, a crash or Ctrl-C (say, while the data is tokenized) before the first step
        if created and not training_began(run_dir):
            rundir.discard(run_dir)  # failed before training began: leave nothing half-written
        raise


def record_plan(spec: RunSpec, run_dir: Path) -> None:
    """The run's plan into its folder (plan.json) and its log; a plan that cannot be made (a model plan does not
    model, a hub config not cached, a fault in the plan) is recorded as such and never stops the run."""
    from fttool.plan import budget

    try:
        p = budget.make_plan(spec)
    except Exception as e:  # noqa: BLE001 - the plan advises; nothing in it may cost the run
        why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        runfiles.write_json(run_dir / runfiles.PLAN, {"error": why})
        print(f"fttool: no plan for this run: {why}", flush=True)
        return
    runfiles.write_json(run_dir / runfiles.PLAN, p)
    for line in budget.summary(p):
        print(f"fttool: {line}", flush=True)


def training_began(run_dir: Path) -> bool:
    """A step was logged or a checkpoint written: the folder then holds a record worth keeping."""
    from fttool.runfolder.checkpoint import last_checkpoint

    metrics = run_dir / runfiles.METRICS
    return last_checkpoint(run_dir) is not None or (metrics.is_file() and metrics.stat().st_size > 0)


def run_workers(spec: RunSpec, run_dir: Path, config: Path) -> None:
    """Start the workers through accelerate and wait; a failure names the rank and shows what it said."""
    hw = spec.hardware
    shutil.rmtree(run_dir / ERRORS, ignore_errors=True)  # reports of an earlier attempt
    cmd = distributed.launch_command(config, run_dir)
    print(
        f"fttool: {world_size(hw)} processes ({hw.strategy}, {hw.num_processes} on this machine, "
        f"machine {hw.machine_rank} of {hw.num_machines}): {' '.join(cmd[1:])}",
        flush=True,
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not devices.of(hw).gpu:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // hw.num_processes)))
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would warn that it found no GPU
    # SIGUSR1 (SLURM's early warning) or submitit's SIGUSR2 would end torch's launcher by default: it and the workers
    # inherit "ignore", and the workers install their own handler (safe_trainer.Preemption)
    quiet = [s for s in preemption.stop_signals() if s != signal.SIGTERM]
    me = os.getpid()

    def child_setup():
        for s in quiet:
            signal.signal(s, signal.SIG_IGN)
        lifeline.die_with_parent(signal.SIGTERM, me)  # kill -9 of this launcher stops the workers too

    # the launcher's run-folder lock goes with it: held while any of them lives (rundir.lock)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=child_setup, pass_fds=rundir.held_descriptors())
    received: List[int] = []

    def forward(signum, _frame):
        received.append(signum)
        _forward_stop(proc)

    previous = {sig: signal.signal(sig, forward) for sig in preemption.stop_signals()}
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # the workers got the same Ctrl-C; give them time to stop at a clean point
        rc = _stop(proc)
        raise SystemExit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if rc != 0:
        first = hw.machine_rank * hw.num_processes
        ranks = list(range(first, first + hw.num_processes))
        code = reported_exit_code(run_dir, ranks)
        if code == Preempted.exit_code:  # every rank saved and stopped: say so as rank 0 did
            said = run_dir / ERRORS / f"rank-{first}.txt"
            err = Preempted(
                said.read_text().strip().replace("fttool: error: ", "", 1)
                if said.is_file()
                else f"stopped by a signal; continue with resume=auto run_name={spec.run_name}",
                received[0] if received else None,
            )
        else:
            err = UserError(failure_report(run_dir, rc, ranks))
        err.exit_code = code
        raise err


def _forward_stop(proc: subprocess.Popen) -> None:
    """A stop signal to this launcher: the workers are told (through torch's launcher, which gives them 30 s)
    to save a checkpoint at the end of their step and stop."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)


def _stop(proc: subprocess.Popen) -> int:
    deadline = time.time() + STOP_GRACE_S
    while proc.poll() is None and time.time() < deadline:
        try:
            proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:  # a second Ctrl-C: stop now
            break
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def _ranks(ranks: List[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


def reported_exit_code(run_dir: Path, ranks: List[int]) -> int:
    """The exit code the first failed rank's error asked for (4 when training diverged), else 2."""
    for r in ranks:
        path = run_dir / ERRORS / f"rank-{r}.exit"
        if path.is_file() and path.read_text().strip().isdigit():
            return int(path.read_text().strip())
    return UserError.exit_code


def failure_report(run_dir: Path, rc: int, ranks: List[int]) -> str:
    """Which rank failed first and what it said. A rank that died without a report (killed, out of memory) is the
    likelier cause of the others' errors (a peer gone mid-collective), so it is named first."""
    reports = {int(p.stem.split("-")[1]): p for p in (run_dir / ERRORS).glob("rank-*.txt")}
    silent = [r for r in ranks if r not in reports]
    head = ""
    if silent and reports:
        head = (
            f"{_ranks(silent)} died without an error report (killed, or out of memory: see the "
            "launcher's summary above), and then "
        )
    elif silent:
        return (
            f"the workers exited with code {rc}; {_ranks(silent)} died without an error report "
            f"(killed, or out of memory?): see the output above and {run_dir / 'train.log'}."
        )
    first = reports[min(reports)]
    body = "\n".join("  " + line for line in first.read_text().strip().splitlines()[-15:])
    others = (
        f" (also: rank {', '.join(str(r) for r in sorted(reports) if r != min(reports))})" if len(reports) > 1 else ""
    )
    return f"{head}worker rank {min(reports)} failed{others}; what it said ({first}):\n{body}"
