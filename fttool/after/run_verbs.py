"""The verbs that work on a finished run folder (or an exported model) rather than compose a new run: `eval`,
`export`, `generate` and `chat` (rows of the one verb table, `fttool/verbs.py`). Their arguments are key=value; the
run's own frozen spec is the config, and `eval` may change only what is evaluated (eval.*, data.metrics,
data.json_schema, data.test_path, device) — checked by the same override code as a new run's."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path
from typing import Dict, List, Tuple

from fttool.after.args import flag
from fttool.errors import UserError, suggestion
from fttool.runfolder import folder
from fttool.verbs import VERBS


def usage(verb: str) -> str:
    v = VERBS[verb]
    lines = [f"usage: fttool {verb} key=value ...", "", v.about, "", "keys:"]
    lines += [f"  {k:<15}{d}" for k, d in v.keys.items()]
    if v.spec_keys:
        lines += [
            "",
            "run settings it may change (key=value, as in training): "
            + ", ".join(k + "*" if k.endswith(".") else k for k in v.spec_keys),
        ]
    return "\n".join(lines + ["", "example:", f"  {v.example}"])


def parse(verb: str, argv: List[str]) -> Tuple[Dict[str, str], List[str]]:
    """(own keys -> raw string values, [spec overrides as key=value]); a UserError names a bad argument and the
    fix."""
    v = VERBS[verb]
    own: Dict[str, str] = {}
    spec: List[str] = []
    for arg in argv:
        if "=" not in arg:
            raise UserError(f"{verb}: '{arg}' is not key=value.{suggestion(arg, v.keys)} Keys: {', '.join(v.keys)}.")
        key, value = arg.split("=", 1)
        if key in v.keys:
            own[key] = value
        elif v.spec_keys and any(key == k or (k.endswith(".") and key.startswith(k)) for k in v.spec_keys):
            spec.append(arg)
        else:
            allowed = list(v.keys) + _spec_key_names(v.spec_keys)
            shown = ", ".join(k + "*" if k.endswith(".") else k for k in v.spec_keys)
            extra = f"; of the run's settings only {shown} can change" if v.spec_keys else ""
            raise UserError(f"{verb}: unknown key '{key}'.{suggestion(key, allowed)} Keys: {', '.join(v.keys)}{extra}.")
    for group in v.required:
        given = [k for k in group if k in own]
        if len(given) != 1:
            what = " or ".join(f"{k}=VALUE" for k in group)
            raise UserError(
                f"{verb}: {'give one of ' if len(group) > 1 else 'missing '}{what}"
                f"{' (not both)' if len(given) > 1 else ''}. Example: {v.example}"
            )
    return own, spec


def _spec_key_names(spec_keys: Tuple[str, ...]) -> List[str]:
    """Every spec key the verb may change, for did-you-mean (prefixes expanded from the schema)."""
    from fttool.config.spec import RunSpec

    out = []
    for k in spec_keys:
        if not k.endswith("."):
            out.append(k)
            continue
        group = next(f for f in fields(RunSpec) if f.name == k[:-1])
        out += [k + f.name for f in fields(group.default_factory())]
    return out


def run_spec(own: Dict[str, str], overrides: List[str]):
    """(run folder, its spec with the overrides applied and checked)."""
    run_dir = folder.open_run(own["run"])
    spec = folder.load_spec_to_use(run_dir, flag(own, "trust_remote_code"))
    if overrides:
        from fttool.config.compose import override_spec

        spec = override_spec(spec, overrides)
    return run_dir, spec


def main(verb: str, argv: List[str]) -> None:
    if verb == "generate" and argv[:1] == ["chat"]:  # `fttool generate chat ...` is `fttool chat ...`
        verb, argv = "chat", argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(usage(verb))
        return
    own, overrides = parse(verb, argv)
    VERBS[verb].call()(verb, own, overrides)


def export(verb: str, own: Dict[str, str], overrides: List[str]) -> None:
    from fttool.after.export import export as export_run

    run_dir, spec = run_spec(own, overrides)
    export_run(
        run_dir,
        spec,
        Path(own["output"]),
        own.get("checkpoint", folder.FINAL),
        own.get("dtype", "auto"),
        flag(own, "overwrite"),
        own.get("format", "safetensors"),
        own.get("gguf_type", "f16"),
    )


def evaluate(verb: str, own: Dict[str, str], overrides: List[str]) -> None:
    from fttool.logs import setup_logging
    from fttool.models import check_inference_device

    run_dir, spec = run_spec(own, overrides)
    weights = folder.weights_dir(run_dir, spec, own.get("checkpoint", folder.FINAL))
    check_inference_device(spec, "hardware.device")
    setup_logging(run_dir, log_file="eval.log")
    from fttool.after.evaluate import run_eval

    result = run_eval(spec, run_dir, weights)
    if result["verdict"] == "fail":
        print(
            f"fttool: the fine-tuned model did not beat the base as eval.gate requires ({run_dir / 'eval.md'})",
            file=sys.stderr,
        )
        raise SystemExit(3)
