"""A checked spec -> `check` output, a data preview or a launched run; and the Hydra task that does the same for
each trial of a sweep (or a run given Hydra's own flags), with the spec the command line already checked."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import List, Optional

from fttool.errors import UserError, fail


def _hydra_context():
    """(recipe name, job number in a multirun or None, group choices, this job's overrides, sweep folder)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    choices = dict(hc.runtime.choices)
    if hc.mode != RunMode.MULTIRUN:
        return choices.get("recipe"), None, choices, [], None
    return choices.get("recipe"), hc.job.num, choices, list(hc.overrides.task), Path(hc.sweep.dir).resolve()


def run_task(
    verb: str,
    cfg,
    overrides: List[str],
    argv: List[str],
    samples: Optional[int] = None,
    output: Optional[str] = None,
    checked: Optional[list] = None,
    options: Optional[dict] = None,
) -> None:
    from fttool.config import compose, validation

    recipe, job_num, choices, job_overrides, sweep_dir = _hydra_context()
    if sweep_dir is not None and verb == "train":
        return _run_trial(cfg, overrides, argv, recipe, job_num, choices, job_overrides, sweep_dir, checked)
    try:
        one = checked[0] if checked and job_num is None else None
        spec = one.spec if one else validation.build_spec(cfg, compose.user_keys(overrides), recipe, job_num)
    except UserError as e:
        fail(str(e), e.exit_code)
    run_checked(verb, spec, choices, argv, samples, output, options)


def run_checked(
    verb: str,
    spec,
    choices,
    argv: List[str],
    samples: Optional[int] = None,
    output: Optional[str] = None,
    options: Optional[dict] = None,
) -> None:
    """What a verb does with a validated spec: its handler in the verb table (fttool/verbs.py)."""
    from fttool.verbs import VERBS, SpecCall

    try:
        VERBS[verb].call()(SpecCall(verb, spec, choices, argv, samples, output, dict(options or {})))
    except UserError as e:
        fail(str(e), e.exit_code)


def train(call) -> None:
    from fttool.launch import rundir
    from fttool.launch.launcher import launch

    launch(call.spec, call.argv, call.choices)
    verdict_exit(rundir.run_dir_of(call.spec))


def verdict_exit(run_dir: Path) -> None:
    """A run whose after-training verdict failed ends as `fttool eval` does: the reason on the last line, exit 3 (so
    `fttool ... && deploy` stops). The trained model stays saved."""
    from fttool.runfolder import runfiles

    result = runfiles.read_json(run_dir / runfiles.RESULT) or {}
    if (result.get("eval") or {}).get("verdict") == "fail":
        print(
            f"fttool: verdict FAIL: the fine-tuned model did not beat the base as eval.gate requires "
            f"({run_dir / 'eval.md'}); the model is saved in {run_dir / 'final'}",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(3)


def preview(call) -> None:
    """`preview` and `preprocess`."""
    from fttool.config import objectives
    from fttool.data import preview as data_preview
    from fttool.data.features import PROMPTS

    features = objectives.of(call.spec).features
    sampler = None
    if call.verb == "preview" and features is PROMPTS and call.samples:  # asked for: sampled completions, rewarded
        from fttool.after.generate import reward_samples

        sampler = partial(reward_samples, call.spec)
    data_preview.run(call.verb, call.spec, features, call.samples, output=call.output, sampler=sampler)


def _checked_trial(checked: Optional[list], job_num: int, job_overrides: List[str]):
    """The spec the command line checked for this trial, when it is the same trial (same overrides) and has nothing
    left for the job to fill in (SLURM placeholders); else None and the trial validates its own config."""
    from fttool.config.slurm import unresolved_slurm

    if not checked or job_num is None or job_num >= len(checked):
        return None
    mine = checked[job_num]

    def plain(overrides):
        return sorted(o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/")))

    if plain(mine.overrides) != plain(job_overrides) or unresolved_slurm(mine.spec.hardware):
        return None
    return mine.spec


def _run_trial(
    cfg, overrides, argv, recipe, job_num, choices, job_overrides, sweep_dir: Path, checked: Optional[list] = None
) -> None:
    """One trial of a sweep: an ordinary run whose folder is in the sweep folder. A failed trial is recorded and
    the sweep goes on; the summary shows it and the command exits non-zero at the end."""
    from dataclasses import replace

    from fttool.config import compose, validation
    from fttool.launch import rundir, sweep
    from fttool.launch.launcher import launch

    run_dir, spec = None, None
    varied = compose.swept_keys(overrides)
    shown = [o for o in job_overrides if o.split("=", 1)[0].lstrip("+~") in varied]  # what this trial varies
    try:
        spec = _checked_trial(checked, job_num, job_overrides) or validation.build_spec(
            cfg, compose.user_keys(overrides), recipe, job_num
        )
        name = spec.run_name if "run_name" in compose.user_keys(job_overrides) else sweep.trial_name(job_num, shown)
        spec = replace(
            spec,
            output_dir=str(sweep_dir),
            run_name=name,
            logging=replace(spec.logging, group=spec.logging.group or sweep_dir.name),
        )
        run_dir = rundir.run_dir_of(spec)
        print(f"fttool: sweep trial {job_num}: {' '.join(job_overrides)}", flush=True)
        launch(spec, argv, choices)
    except (UserError, Exception) as e:  # noqa: B014 - UserError first: its message is the whole story
        print(f"fttool: error: trial {job_num}: {e}", file=sys.stderr, flush=True)
        if spec is not None and spec.hardware.machine_rank not in (0, -1):
            raise  # a machine other than 0 failing ends its task; machine 0 records the trial
        sweep.record_trial(
            sweep_dir,
            job_num,
            shown,
            run_dir if run_dir and run_dir.exists() else None,
            "failed",
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        return
    if spec.hardware.machine_rank in (0, -1):  # one record per trial, not one per machine
        sweep.record_trial(sweep_dir, job_num, shown, run_dir, "ok")


def check(call) -> None:
    spec = call.spec
    from fttool.config import slurm
    from fttool.launch import rundir
    from fttool.plan import summary

    slurm.check_resolved(spec.hardware)  # as train would refuse it

    print("# resolved spec")
    print(rundir.spec_to_yaml(spec), end="")
    print("# plan")
    for line in summary.describe(spec):
        print(f"#   {line}")
    for line in where_from(call):
        print(f"#   {line}")
    print("# ok: the spec is valid", file=sys.stderr)


def where_from(call) -> List[str]:
    """The values users most often wonder about, each with where it came from."""
    from fttool.config import compose, validation

    spec = call.spec
    src = validation.sources(spec, call.choices, compose.user_keys(call.argv[1:]), call.choices.get("recipe"))
    template = spec.data.template if spec.data.template and "\n" not in spec.data.template else None
    values = {
        "train.lr": f"{spec.train.lr:g}",
        "model.lr_scale": f"{spec.model.lr_scale:g}",
        "model.dtype": spec.model.dtype,
        "data.template": template or ("Jinja text" if spec.data.template else "the tokenizer's own"),
    }
    return ["from        " + "; ".join(f"{k} {values[k]} ({src[k]})" for k in values)]


def plan(call) -> None:
    """`fttool plan`: memory per device, fit, fixes and time; exit 3 when the run does not fit."""
    from fttool.config import slurm
    from fttool.plan import budget

    slurm.check_resolved(call.spec.hardware)
    gpu_memory = call.options.get("gpu_memory")
    if gpu_memory is not None:
        try:
            gpu_memory = float(gpu_memory)
        except ValueError:
            raise UserError(f"gpu_memory={gpu_memory}: give the GPU's memory in GiB, e.g. gpu_memory=24.") from None
    p = budget.make_plan(call.spec, call.options.get("gpu"), gpu_memory)
    for line in budget.lines(p):
        print(line)
    if p["fits"] is False:
        raise SystemExit(3)
