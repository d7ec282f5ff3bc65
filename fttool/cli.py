"""`fttool [VERB] [overrides...]`: the command line. Imports nothing heavy until a run trains."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fttool.errors import UserError, fail, suggestion
from fttool.verbs import VERBS, on

HYDRA_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--shell-completion", "-sc", "--version"}
HYDRA_PRINT_FLAGS = {"--cfg", "-c"}
MULTIRUN_FLAGS = {"-m", "--multirun"}

USAGE = """\
fttool: declarative fine-tuning of language models.

usage: fttool [VERB] [key=value ...] [+recipe=NAME] [-m]

verbs:
{verbs}

verbs on a finished run (fttool VERB --help for their keys):
{run_verbs}

verbs on fttool's files (fttool VERB --help for their subcommands):
{tool_verbs}

examples:
  fttool                                  the embedded demo: tiny model, demo data, CPU, a few minutes
  fttool check +recipe=qlora_7b           show the resolved spec and plan of a recipe
  fttool plan +recipe=qlora_7b gpu=L4     memory per GPU, fit, cheapest fixes, time (exit 3: does not fit)
  fttool preview data=alpaca data.path=my.json --samples 5   what exactly will be trained
  fttool +recipe=tiny_cpu train.lr=1e-3   a recipe with one key overridden
  fttool -m +recipe=tiny_cpu method.rank=8,16   a sweep: one run per value
  fttool eval run=runs/NAME               fine-tuned vs base on the test split, with a verdict
  fttool export run=runs/NAME output=DIR  a merged, standalone model folder with a model card
  fttool recipes                          every recipe on the search path, with its description and origin

Groups, their options and the composed config follow.
"""


def split_verb(argv: List[str]):
    if argv and argv[0] in VERBS:
        return argv[0], argv[1:]
    if argv and not argv[0].startswith("-") and "=" not in argv[0] and not argv[0].startswith(("+", "~")):
        raise UserError(
            f"unknown verb '{argv[0]}'.{suggestion(argv[0], VERBS)} Verbs: {', '.join(VERBS)}; overrides look "
            "like key=value."
        )
    return "train", argv


def pop_samples(argv: List[str]):
    """The preview verb's own options taken out of argv before Hydra sees them: `--samples N` and
    `output=FILE.jsonl` (also `--output FILE`). Returns (argv, samples or None, output or None)."""
    out, samples, output, i = [], None, None, 0
    while i < len(argv):
        a = argv[i]
        for flag in ("--samples", "--output"):
            if a == flag or a.startswith(flag + "="):
                value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
                i += 1 if "=" in a else 2
                break
        else:
            flag, value = (None, None)
            if a.startswith("output="):
                flag, value = "--output", a.split("=", 1)[1]
                i += 1
        if flag == "--samples":
            if not value.isdigit():
                raise UserError(f"--samples expects a whole number of samples, got '{value}'.")
            samples = int(value)
            continue
        if flag == "--output":
            if not value or not value.endswith(".jsonl"):
                raise UserError(
                    f"output={value}: the mask dump is JSON lines; name a file ending in .jsonl "
                    "(fttool preview ... output=masks.jsonl)."
                )
            output = value
            continue
        out.append(a)
        i += 1
    return out, samples, output


def pop_options(verb: str, argv: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """A spec verb's own key=value options (its row's `keys`, e.g. plan's gpu=) taken out before Hydra sees them."""
    own = VERBS[verb].keys
    options: Dict[str, str] = {}
    rest = []
    for a in argv:
        key = a.split("=", 1)[0]
        if "=" in a and key in own:
            options[key] = a.split("=", 1)[1]
        else:
            rest.append(a)
    return rest, options


def _overrides(argv: List[str]) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in HYDRA_PRINT_FLAGS or a in (
            "--package",
            "-p",
            "--config-name",
            "-cn",
            "--config-path",
            "-cp",
            "--config-dir",
            "-cd",
            "--experimental-rerun",
        ):
            skip = True  # these flags take a value
            continue
        if a.startswith("-"):
            continue
        out.append(a)
    return out


def _prog() -> str:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fttool"
    return "python -m fttool" if prog in ("__main__.py", "-m", "-c") else prog


def cpu_threads_env() -> None:
    """OpenMP threads that spin only briefly before they sleep at a barrier (GOMP_SPINCOUNT 10,000 instead of
    libgomp's 300,000): a run sharing its cores with another busy process then slows about in proportion instead of
    ~9x (threads spinning for a core that a peer thread needs). Measured on 2 cores: ~2% slower unloaded; full
    OMP_WAIT_POLICY=PASSIVE was 10-35% slower unloaded. Set before torch loads OpenMP; workers inherit it. The
    user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu_threads_env()
    try:
        verb, rest = split_verb(argv)
        if VERBS[verb].on == "tool":
            return VERBS[verb].call()(verb, rest)
        if VERBS[verb].on == "run":
            from fttool.after import run_verbs

            try:
                return run_verbs.main(verb, rest)
            except KeyboardInterrupt:
                fail(f"{verb} interrupted; nothing was left half-written.", 130)
        rest, samples, output = pop_samples(rest)
        rest, options = pop_options(verb, rest)
        if (samples is not None or output is not None) and verb != "preview":
            raise UserError(
                "--samples and output= belong to the preview verb: fttool preview [overrides] --samples N "
                "[output=FILE.jsonl]."
            )
        from fttool.config import registry

        registry.register()
        info_only = any(a in HYDRA_INFO_FLAGS for a in rest)
        if info_only and any(a in ("--help", "-h") for a in rest):
            print(
                USAGE.format(
                    verbs="\n".join(f"  {k:<11}{v.about}" for k, v in on("spec").items()),
                    run_verbs="\n".join(f"  {k:<11}{v.about}" for k, v in on("run").items()),
                    tool_verbs="\n".join(f"  {k:<11}{v.about}" for k, v in on("tool").items()),
                )
            )
            if VERBS[verb].keys:  # a spec verb's own options (plan's gpu=)
                print(f"{verb} options (besides overrides):")
                print("\n".join(f"  {k}=VALUE  {d}" for k, d in VERBS[verb].keys.items()))
                print(f"example: {VERBS[verb].example}\n")
        overrides = _overrides(rest)
        multirun = any(a in MULTIRUN_FLAGS for a in rest)
        checked = []
        if not info_only:
            from fttool.config.compose import precheck

            checked = precheck(overrides, multirun=multirun)  # composed and validated here, once
            if multirun and verb == "train":
                rest, sweep_dir = _fixed_sweep_dir(rest, overrides, checked[0].spec)
    except UserError as e:
        fail(str(e), e.exit_code)
    argv = [_prog()] + argv
    if not info_only and not multirun and not _needs_hydra(rest, overrides):
        from fttool.launch.run import run_checked

        with _ctrl_c(verb):  # one run needs nothing of Hydra's beyond the compose it had
            run_checked(verb, checked[0].spec, checked[0].choices, argv, samples, output, options)
        return
    _run_hydra(verb, rest, overrides, argv, samples, output, checked, options)
    if not info_only and multirun and verb == "train":
        from fttool.config.compose import MAX_CHECKED_TRIALS
        from fttool.launch import sweep

        failed = sweep.failures(sweep_dir, expected=len(checked) if len(checked) < MAX_CHECKED_TRIALS else None)
        if failed:
            fail(f"{len(failed)} sweep trial(s) failed: " + "; ".join(failed), 1)


def _needs_hydra(rest: List[str], overrides: List[str]) -> bool:
    """Hydra's own flags (--cfg, --info ...) or settings (hydra.*, hydra/launcher=...) are Hydra's to carry out."""
    return any(a.startswith("-") for a in rest) or any(
        o.lstrip("+~").startswith(("hydra.", "hydra/")) for o in overrides
    )


@contextmanager
def _ctrl_c(verb: str):
    try:
        yield
    except KeyboardInterrupt:  # tokenizing, loading, training in this process: the run folder is already tidied
        fail(
            f"{verb} interrupted (Ctrl-C); nothing was left half-written. A run that had begun keeps its "
            "checkpoints: continue with resume=auto run_name=NAME.",
            130,
        )


def _fixed_sweep_dir(rest: List[str], overrides: List[str], spec) -> Tuple[List[str], Path]:
    """The sweep folder as one absolute path, decided here: every trial, process and machine uses it (a ${now:}
    would resolve anew in each job), and the sweep's outcome is read from it when the trials end."""
    from dataclasses import asdict
    from datetime import datetime

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    given = [o for o in overrides if o.startswith("hydra.sweep.dir=")]
    value = given[-1].split("=", 1)[1] if given else "${output_dir}/sweep-${now:%Y%m%d-%H%M%S}"
    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda pattern: datetime.now().strftime(pattern))
    try:
        resolved = OmegaConf.create({**asdict(spec), "sweep_dir__": value.strip("'\"")}).sweep_dir__
    except OmegaConfBaseException as e:
        raise UserError(
            f"hydra.sweep.dir={value}: {str(e).splitlines()[0]}; it may refer to fttool keys "
            "(${output_dir}) and ${now:FORMAT} only."
        )
    path = Path(str(resolved)).expanduser().resolve()
    rest = [a for a in rest if not a.startswith("hydra.sweep.dir=")]
    at = next((i for i, a in enumerate(rest) if a in overrides), len(rest))  # argparse wants overrides together
    quote = "'" if "'" not in str(path) else '"'
    return rest[:at] + [f"hydra.sweep.dir={quote}{path}{quote}"] + rest[at:], path


def _run_hydra(
    verb: str,
    rest: List[str],
    overrides: List[str],
    argv: List[str],
    samples: Optional[int],
    output: Optional[str],
    checked: list,
    options: Optional[Dict[str, str]] = None,
) -> None:
    import hydra

    from fttool.config import registry
    from fttool.launch.run import run_task

    @hydra.main(config_path=str(registry.conf_dir()), config_name="config", version_base=None)
    def _app(cfg) -> None:
        run_task(verb, cfg, overrides, argv, samples, output, checked, options)

    sys.argv = [_prog()] + rest
    with _ctrl_c(verb):
        _app()
