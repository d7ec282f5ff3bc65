"""The Hydra task: one composed config -> a validated spec -> `check` output or a launched run."""
from __future__ import annotations

import sys
from typing import List

from fttool.errors import UserError, fail


def _hydra_context():
    """(recipe name, job number in a multirun or None, group choices)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    choices = dict(hc.runtime.choices)
    job_num = hc.job.num if hc.mode == RunMode.MULTIRUN else None
    return choices.get("recipe"), job_num, choices


def run_task(verb: str, cfg, overrides: List[str], argv: List[str], samples: int = 3) -> None:
    from fttool import compose, validation

    recipe, job_num, choices = _hydra_context()
    try:
        spec = validation.build(cfg, compose.user_keys(overrides), recipe, job_num)
        if verb == "check":
            _print_check(spec)
            return
        if verb in ("preview", "preprocess"):
            from fttool.data import preview

            preview.run(verb, spec, samples)
            return
        from fttool.launch import launch

        launch(spec, argv, choices)
    except UserError as e:
        fail(str(e), e.exit_code)


def _print_check(spec) -> None:
    from fttool import plan, rundir

    print("# resolved spec")
    print(rundir.spec_to_yaml(spec), end="")
    print("# plan")
    for line in plan.describe(spec):
        print(f"#   {line}")
    print("# ok: the spec is valid", file=sys.stderr)
