"""Every verb of the command line, in one table: what it works on, what it does, its help, and the function that
carries it out (imported only when the verb runs, so `--help` and config errors stay fast).

- A verb `on="spec"` composes and validates a run from overrides (Hydra's grammar, recipes, `-m` sweeps) and hands
  the checked spec to its handler: `handler(SpecCall)`.
- A verb `on="run"` works on a finished run folder (or an exported model) with key=value arguments: its own `keys`,
  and the run settings named in `spec_keys` (parsed and checked by the same override code as a new run's);
  `handler(verb, own, spec_overrides)`.
- A verb `on="tool"` works on fttool's own files (recipes) with subcommands, each with its arguments, what it does
  and an example (`subcommands`); its handler gets the raw arguments: `handler(verb, argv)`.

Adding a verb is one row here and its function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass(frozen=True)
class Verb:
    on: str  # "spec", "run" or "tool"
    about: str
    handler: str  # "module:function"
    keys: Dict[str, str] = field(default_factory=dict)  # own key=value options -> description (not run settings)
    required: Tuple[Tuple[str, ...], ...] = ()  # run verbs: each tuple, exactly one of these keys must be given
    spec_keys: Tuple[str, ...] = ()  # run verbs: run settings (or prefixes ending in '.') that may be changed
    example: str = ""
    # tool verbs: subcommand -> (its arguments, what it does, an example)
    subcommands: Dict[str, Tuple[str, str, str]] = field(default_factory=dict)

    def call(self):
        from importlib import import_module

        module, _, name = self.handler.partition(":")
        return getattr(import_module(module), name)


@dataclass(frozen=True)
class SpecCall:
    """What a spec verb's handler gets: the verb, the checked spec, the group choices, the command line and the
    preview verb's own options."""

    verb: str
    spec: object
    choices: Dict[str, str]
    argv: List[str]
    samples: Optional[int] = None
    output: Optional[str] = None
    options: Dict[str, str] = field(default_factory=dict)  # the verb's own key=value options (Verb.keys)


CHECKPOINT = "weights to use: final (default), best, last, or a checkpoint's step number"
TRUST = "true to run the model's own code (only for a model you trust); a run folder never turns this on itself"
GEN_KEYS = {
    "run": "run folder to load (its final/ adapter or model, with the training chat template)",
    "model": "a model folder instead of a run (an export: fttool export ... output=DIR)",
    "checkpoint": CHECKPOINT,
    "system": "system message to start the conversation with",
    "max_new_tokens": "most tokens in a reply (default 256)",
    "temperature": "0 = greedy (default); > 0 samples",
    "top_p": "nucleus sampling mass when temperature > 0 (default 1.0)",
    "device": "cpu or cuda (default: the run's hardware.device; cuda when a model= folder and a GPU are there)",
    "trust_remote_code": TRUST,
}

VERBS: Dict[str, Verb] = {
    "train": Verb(
        "spec",
        "compose, validate, write the run folder and train (the default verb)",
        "fttool.launch.run:train",
    ),
    "check": Verb(
        "spec",
        "compose and validate, print the resolved spec and the plan; loads no model",
        "fttool.launch.run:check",
    ),
    "plan": Verb(
        "spec",
        "memory per device (itemised), whether it fits, the cheapest fixes, and the training time; loads no model",
        "fttool.launch.run:plan",
        {
            "gpu": "plan for this card (H100, A100-80GB, L4, RTX4090 ...; default: this machine's GPU)",
            "gpu_memory": "plan for a GPU with this many GiB instead of a named card",
        },
        example="fttool plan +recipe=qlora_7b gpu=L4",
    ),
    "preview": Verb(
        "spec",
        "show N tokenized samples with the trained tokens marked, and data statistics (--samples N, default 3)",
        "fttool.launch.run:preview",
    ),
    "preprocess": Verb(
        "spec",
        "tokenize the data into the cache without training, and print its statistics",
        "fttool.launch.run:preview",
    ),
    "eval": Verb(
        "run",
        "score the fine-tuned model and the base on the test split; results and a verdict into the run folder",
        "fttool.after.run_verbs:evaluate",
        {"run": "run folder to evaluate", "checkpoint": CHECKPOINT, "trust_remote_code": TRUST},
        (("run",),),
        ("eval.", "data.metrics", "data.json_schema", "data.test_path", "hardware.device", "hardware.precision"),
        "fttool eval run=runs/my-run eval.gate={exact_match:0.05} data.test_path=holdout.jsonl",
    ),
    "export": Verb(
        "run",
        "merge the adapter into a full-precision base and write a standalone model folder with a model card",
        "fttool.after.run_verbs:export",
        {
            "run": "run folder to export",
            "output": "folder to write (must not exist unless overwrite=true)",
            "checkpoint": CHECKPOINT,
            "dtype": "weights dtype: auto (the base model's), float32, bfloat16 or float16",
            "overwrite": "true to replace an existing output folder",
            "format": "safetensors (a transformers folder) or gguf (one llama.cpp/Ollama file, with a Modelfile)",
            "gguf_type": "format=gguf: f16, bf16, q8_0 or f32 weights (norms stay f32)",
            "trust_remote_code": TRUST,
        },
        (("run",), ("output",)),
        (),
        "fttool export run=runs/my-run output=exports/my-model",
    ),
    "generate": Verb(
        "run",
        "reply to one prompt, or to every row of a JSONL file, with a run or an exported model",
        "fttool.after.generate:main",
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
        "run",
        "talk to a run or an exported model in the terminal (/reset starts over, /exit or Ctrl-D leaves)",
        "fttool.after.generate:main",
        GEN_KEYS,
        (("run", "model"),),
        (),
        "fttool chat run=runs/my-run",
    ),
    "recipes": Verb(
        "tool",
        "list the recipes on the search path; show, compare or save one",
        "fttool.launch.recipe_verbs:main",
        example="fttool recipes diff tiny_cpu tiny_dpo_cpu",
        subcommands={
            "list": ("", "every recipe: name, description, folder, model, method, hardware", "fttool recipes"),
            "show": (
                "NAME [key=value ...]",
                "the recipe file, then the spec it resolves to (as fttool check +recipe=NAME does)",
                "fttool recipes show qlora_7b method.rank=32",
            ),
            "diff": (
                "A [B]",
                "the keys and group choices whose resolved values differ; A or B may be a run folder; no B = "
                "the defaults against A",
                "fttool recipes diff qlora_7b runs/my-run",
            ),
            "save": (
                "run=RUN name=NAME [dir=FOLDER] [overwrite=true]",
                "the smallest recipe that reproduces a finished run, into the first FTTOOL_RECIPE_PATH folder "
                "(else ./recipes)",
                "fttool recipes save run=runs/my-run name=support_bot",
            ),
        },
    ),
}


def on(kind: str) -> Dict[str, Verb]:
    return {name: v for name, v in VERBS.items() if v.on == kind}
