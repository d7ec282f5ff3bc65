import contextlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# Under FTTOOL_TEST_STRICT=1 (set by .ci/run) nothing is skipped for want of something CI must have: a missing
# ../shared, a wheel that does not build or an extra that is not installed fails the run instead. The only skips
# left are those whose reason holds on CI, listed here.
STRICT = os.environ.get("FTTOOL_TEST_STRICT") == "1"
SKIPS_THAT_HOLD_ON_CI = ("this machine has a GPU",)

# Before torch loads OpenMP: threads that spin only briefly at a barrier (as the CLI sets for itself), and under
# pytest-xdist one thread per worker, so that two workers on two cores do not fight over them (a trained step was
# ~20x slower with both workers' threads spinning). Subprocesses inherit both.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one tokenized-data cache for the session, never the user's own
os.environ.setdefault("FTTOOL_CACHE", tempfile.mkdtemp(prefix="fttool-cache-"))


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run `python -m fttool ARGS` as a user would; returns CompletedProcess (text)."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "fttool", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def run_cli_here(*args, cwd=None, env=None):
    """`fttool ARGS` in this process: fttool.cli.main with captured output, the exit code from SystemExit; the
    same CompletedProcess shape as run_cli. For error paths and verbs that answer without training: no new
    interpreter, no torch import to wait for. An exception that escapes main() fails the test (a traceback)."""
    from fttool import cli

    out, err = io.StringIO(), io.StringIO()
    cwd_before, env_before, argv_before = os.getcwd(), dict(os.environ), list(sys.argv)
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        os.environ.update(env or {})
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main([str(a) for a in args])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(cwd_before)
        os.environ.clear()
        os.environ.update(env_before)
        sys.argv = argv_before
    return subprocess.CompletedProcess(["fttool", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(autouse=True)
def signal_handlers_kept(request):
    """A test that leaves SIGINT or SIGTERM handled differently changes every later test of its worker process (and
    the subprocesses those start inherit an ignored signal: Ctrl-C tests then fail). Put back, and named."""
    import signal
    import warnings

    watched = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in watched}
    yield
    for s, handler in before.items():
        if signal.getsignal(s) is not handler and handler is not None:
            warnings.warn(f"{request.node.nodeid} left {signal.Signals(s).name} set to {signal.getsignal(s)}; put back")
            signal.signal(s, handler)


def pytest_sessionstart(session):
    if STRICT and not SHARED_DATA.is_dir():
        pytest.exit(
            f"FTTOOL_TEST_STRICT=1 and {SHARED_DATA} is missing: the real tokenizers, templates and datasets the "
            "suite tests against live there. Put the shared/ folder beside the repository (../shared).",
            returncode=3,
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not any(ok in reason for ok in SKIPS_THAT_HOLD_ON_CI):
            report.outcome = "failed"
            report.longrepr = f"skipped under FTTOOL_TEST_STRICT=1, where nothing may be missing: {reason}"


def make_spec(overrides, tmp_path):
    """Compose + validate like the CLI does and return the RunSpec (no Hydra app run)."""
    from fttool.config import compose, registry, validation

    registry.register()
    ovs = [f"output_dir={tmp_path}"] + list(overrides)
    cfg = compose.compose(ovs)
    return validation.build_spec(cfg, compose.user_keys(ovs), compose.recipe_of(ovs))


def free_port():
    """A TCP port free on this machine now, for a multi-process run's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_run(overrides, tmp_path, name="run"):
    """Create a run folder from overrides and train it in this process; returns (run_dir, summary)."""
    from fttool.launch import rundir
    from fttool.worker.train import train

    spec = make_spec(list(overrides) + [f"run_name={name}"], tmp_path)
    run_dir, _ = rundir.prepare(spec, ["pytest"], {})
    try:
        return run_dir, train(run_dir)
    finally:
        rundir.unlock(run_dir)  # as the launcher does


@contextlib.contextmanager
def small_filesystem(path: Path, kib: int):
    """A real filesystem of `kib` KiB mounted at `path` (a tmpfs: root only), so that writers meet a real ENOSPC.
    Yields False where it cannot be mounted (the caller then raises the writers' own exceptions instead)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


FAST = [
    "train.max_steps=6",
    "train.logging_steps=1",
    "train.batch_size=4",
    "train.grad_accum=1",
    "data.max_samples=64",
    "eval.after_training=false",
    "train.save_steps=3",
]


# pytest-xdist (`-n 2`, the test command). Its own --dist loadgroup is not used: with pytest 9.2 its renaming of
# node ids no longer takes, and every group was split silently. The scheduler below groups by node id instead:
# - tests that start several training processes run one at a time, on one worker (free ports, no four processes on
#   two cores), and start first: together they are the longest unit of work;
# - a module whose tests share a finished run (a module-scoped fixture) goes to one worker, so it is made once;
# - the few long single tests start next; every other test goes wherever a worker is free.
PROCESSES = {
    "test_distributed.py": {
        "test_two_processes_match_one",
        "test_two_machines_over_loopback",
        "test_bad_data_in_a_worker_fails_the_launch_with_file_line",
        "test_a_killed_worker_ends_the_launch",
        "test_ctrl_c_stops_every_rank_and_leaves_a_checkpoint_to_resume",
        "test_slurm_through_hydras_submitit_launcher",
    },
    "test_bad_day.py": {
        "test_sigterm_to_a_two_process_run_resumes_to_the_uninterrupted_result",
        "test_a_preempted_slurm_job_requeues_itself_and_finishes_the_run",
        "test_kill_9_of_a_two_process_launcher_leaves_no_worker_and_the_next_launch_resumes",
    },
    "test_guard.py": {"test_a_diverging_two_process_run_stops_every_rank_and_exits_4"},
    "test_preference.py": {"test_dpo_on_two_processes_matches_one"},
    "test_sweep.py": {"test_wandb_offline_two_processes"},
}
SHARED_RUNS = {  # module -> its module-scoped fixture that trains or builds something
    "test_eval.py": "trained",
    "test_plan.py": "measured_runs",
    "test_packaging.py": "wheel_target",
    "test_cuda_like.py": "phi3_model",
    "test_bad_day.py": "uninterrupted",
    "test_real_model.py": "smol_run",
    "test_grpo.py": "grpo_run",
}
LONG = {"test_embedded_default_beats_the_base_model", "test_gpu_check_flow_runs_on_the_cpu",
        "test_the_dpo_demo_recipe_raises_held_out_preference_accuracy",
        "test_the_grpo_demo_raises_the_held_out_reward"}  # fmt: skip


def _where(nodeid):
    path, _, rest = nodeid.partition("::")
    return path.rsplit("/", 1)[-1], rest.split("[", 1)[0]


def work_unit(nodeid):
    """The unit of work a test belongs to: 'processes', its module, or itself."""
    module, name = _where(nodeid)
    if name in PROCESSES.get(module, ()):
        return "processes"
    return module if module in SHARED_RUNS else nodeid


def pytest_collection_modifyitems(config, items):
    """The order units start in (the same in every worker): processes, then the long single tests, then the rest as
    collected. A module's remaining tests stay together, so its fixtures are made once."""

    def rank(item):
        module, name = _where(item.nodeid)
        return 0 if work_unit(item.nodeid) == "processes" else 1 if name in LONG else 2

    items[:] = [item for _, _, item in sorted((rank(item), i, item) for i, item in enumerate(items))]


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class Grouped(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # units start in collection order (above), not by their test count
    return Grouped(config, log)
