"""The verbs that work on a finished run folder (or an exported model) rather than compose a new run:
`eval`, `export`, `generate` and `chat`. Their arguments are key=value; the run's own frozen spec is the config,
and `eval` may change only what is evaluated (eval.*, data.metrics, data.json_schema, data.test_path, device)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

from fttool.after.args import flag
from fttool.errors import UserError, suggestion
from fttool.launch import rundir


@dataclass(frozen=True)
class Verb:
    about: str
    keys: Dict[str, str]  # own key -> description
    required: Tuple[Tuple[str, ...], ...] = ()  # each tuple: exactly one of these keys must be given
    spec_keys: Tuple[str, ...] = ()  # spec keys (or prefixes ending in '.') that may be overridden
    example: str = ""


CHECKPOINT = "weights to use: final (default), best, last, or a checkpoint's step number"
GEN_KEYS = {
    "run": "run folder to load (its final/ adapter or model, with the training chat template)",
    "model": "a model folder instead of a run (an export: fttool export ... output=DIR)",
    "checkpoint": CHECKPOINT,
    "system": "system message to start the conversation with",
    "max_new_tokens": "most tokens in a reply (default 256)",
    "temperature": "0 = greedy (default); > 0 samples",
    "top_p": "nucleus sampling mass when temperature > 0 (default 1.0)",
    "device": "cpu or cuda (default: the run's hardware.device; cuda when a model= folder and a GPU are there)",
}
VERBS: Dict[str, Verb] = {
    "eval": Verb(
        "score the fine-tuned model and the base on the test split; results and a verdict into the run folder",
        {"run": "run folder to evaluate", "checkpoint": CHECKPOINT},
        (("run",),),
        ("eval.", "data.metrics", "data.json_schema", "data.test_path", "hardware.device", "hardware.precision"),
        "fttool eval run=runs/my-run eval.gate={exact_match:0.05} data.test_path=holdout.jsonl",
    ),
    "export": Verb(
        "merge the adapter into a full-precision base and write a standalone model folder with a model card",
        {
            "run": "run folder to export",
            "output": "folder to write (must not exist unless overwrite=true)",
            "checkpoint": CHECKPOINT,
            "dtype": "weights dtype: auto (the base model's), float32, bfloat16 or float16",
            "overwrite": "true to replace an existing output folder",
        },
        (("run",), ("output",)),
        (),
        "fttool export run=runs/my-run output=exports/my-model",
    ),
    "generate": Verb(
        "reply to one prompt, or to every row of a JSONL file, with a run or an exported model",
        {
            **GEN_KEYS,
            "prompt": "the user message to reply to",
            "input": 'JSONL file: one {"prompt": ...} or {"messages": [...]} per line',
            "output": "JSONL file for the replies to input= (default: print them)",
        },
        (("run", "model"), ("prompt", "input")),
        (),
        "fttool generate run=runs/my-run prompt='Reverse the words: a b c'",
    ),
    "chat": Verb(
        "talk to a run or an exported model in the terminal (/reset starts over, /exit or Ctrl-D leaves)",
        GEN_KEYS,
        (("run", "model"),),
        (),
        "fttool chat run=runs/my-run",
    ),
}


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


def parse(verb: str, argv: List[str]) -> Tuple[Dict[str, str], List[Tuple[str, object]]]:
    """(own keys -> raw string values, [(spec key, parsed value)]); a UserError names a bad argument and the fix."""
    v = VERBS[verb]
    own: Dict[str, str] = {}
    spec: List[Tuple[str, object]] = []
    for arg in argv:
        if "=" not in arg:
            raise UserError(f"{verb}: '{arg}' is not key=value.{suggestion(arg, v.keys)} Keys: {', '.join(v.keys)}.")
        key, value = arg.split("=", 1)
        if key in v.keys:
            own[key] = value
        elif v.spec_keys and any(key == k or (k.endswith(".") and key.startswith(k)) for k in v.spec_keys):
            spec.append((key, _value(arg)))
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
    from dataclasses import fields

    from fttool.config.spec import RunSpec

    out = []
    for k in spec_keys:
        if not k.endswith("."):
            out.append(k)
            continue
        group = next(f for f in fields(RunSpec) if f.name == k[:-1])
        out += [k + f.name for f in fields(group.default_factory())]
    return out


def _value(arg: str):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides([arg])[0].value()
    except Exception as e:  # noqa: BLE001 - Hydra's grammar errors
        raise UserError(f"could not parse '{arg}': {str(e).splitlines()[0]}")


def run_spec(own: Dict[str, str], overrides: List[Tuple[str, object]]):
    """(run folder, its spec with the overrides applied and checked)."""
    run_dir = rundir.open_run(own["run"])
    spec = rundir.load_spec(run_dir)
    if overrides:
        spec = apply(spec, overrides)
    return run_dir, spec


def apply(spec, overrides: List[Tuple[str, object]]):
    from dataclasses import asdict

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fttool.config import validation
    from fttool.config.registry import OPEN_DICTS

    cfg = OmegaConf.create(asdict(spec))
    OmegaConf.set_struct(cfg, True)
    for key in OPEN_DICTS:
        OmegaConf.set_struct(OmegaConf.select(cfg, key), False)
    for key, value in overrides:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if node is None or leaf not in node:
            known = [f"{parent}.{k}" for k in node.keys()] if node is not None else []
            raise UserError(f"unknown key '{key}'.{suggestion(key, known)}")
        if key in OPEN_DICTS:
            node[leaf] = {}  # a mapping given on the command line replaces the run's one
            OmegaConf.set_struct(node[leaf], False)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise UserError(f"{key}={value}: {str(e).splitlines()[0]}")
    for key in ("data.test_path", "data.json_schema"):
        OmegaConf.update(cfg, key, validation._absolute(OmegaConf.select(cfg, key)))
    validation.derive_metrics(cfg)
    try:
        typed = validation.to_spec(cfg)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "a value"
        raise UserError(f"{key}: {str(e).splitlines()[0]}")
    validation.check(OmegaConf.create(asdict(typed)))
    return typed


def main(verb: str, argv: List[str]) -> None:
    if verb == "generate" and argv[:1] == ["chat"]:  # `fttool generate chat ...` is `fttool chat ...`
        verb, argv = "chat", argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(usage(verb))
        return
    own, overrides = parse(verb, argv)
    if verb == "eval":
        return _eval(own, overrides)
    if verb == "export":
        from fttool.after.export import export

        run_dir, spec = run_spec(own, [])
        export(
            run_dir,
            spec,
            Path(own["output"]),
            own.get("checkpoint", rundir.FINAL),
            own.get("dtype", "auto"),
            flag(own, "overwrite"),
        )
        return
    from fttool.after import generate

    generate.main(verb, own)


def _eval(own, overrides) -> None:
    from fttool.logs import setup_logging
    from fttool.worker.model import check_inference_device

    run_dir, spec = run_spec(own, overrides)
    weights = rundir.weights_dir(run_dir, spec, own.get("checkpoint", rundir.FINAL))
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
