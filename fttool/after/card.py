"""The model card (README.md) of an exported model: what was trained, on what, how it scored against the base,
and what it takes to reproduce it. Everything comes from the run folder's record; nothing is typed by hand."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

from fttool.after import public
from fttool.config import methods, objectives
from fttool.runfolder import folder, runfiles


def _json(path: Path) -> Optional[Dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _method_lines(spec) -> List[str]:
    m = asdict(spec.method)
    m.pop("default_lr", None)
    lines = [f"- method: **{m.pop('name')}**" + "".join(f", {k} {v}" for k, v in m.items())]
    return lines + methods.of(spec).card_lines(spec.method)


def _lineage_lines(data: Optional[Dict]) -> List[str]:
    """base -> each earlier run (model.from_run) -> this run, with method, objective and data hash."""
    chain = (data or {}).get("lineage") or []
    if len(chain) < 2:
        return []
    steps = [f"`{chain[0].get('base')}`"] + [
        f"{Path(e['run']).name} ({e['method']}, {e['objective']}, data `{e.get('data') or 'n/a'}`)" for e in chain[1:]
    ]
    return ["- lineage: " + " -> ".join(steps)]


def _data_lines(spec, data: Optional[Dict]) -> List[str]:
    from fttool.data import sources_of

    lines = ["| source | format | rows used for training | content sha256 |", "|---|---|---:|---|"]
    key = (data or {}).get("key", {})
    stats = (data or {}).get("stats", {})
    hashes = [s[0] if len(s) > 2 else s[1] for s in key.get("sources", [])]
    per_source = stats.get("per_source", {})
    srcs = sources_of(spec.data)
    for i, s in enumerate(srcs):
        lines.append(
            f"| `{s.path}` | {s.format} | {per_source.get(s.path, 'n/a')} | `{hashes[i] if i < len(hashes) else 'n/a'}` |"
        )
    for i, (k, path) in enumerate(
        (k, p) for k, p in (("data.val_path", spec.data.val_path), ("data.test_path", spec.data.test_path)) if p
    ):
        j = len(srcs) + i
        lines.append(f"| `{path}` ({k}) | {spec.data.format} | - | `{hashes[j] if j < len(hashes) else 'n/a'}` |")
    if stats:
        trained = stats.get("trained_tokens", 0) / max(stats.get("tokens", 1), 1)
        lines += [
            "",
            f"- {stats.get('samples', 0):,} training samples, {stats.get('tokens', 0):,} tokens, {trained:.1%} of them "
            f"trained; {stats.get('validation', 0):,} validation and {stats.get('test', 0):,} test rows held out",
            f"- truncated {stats.get('truncated', 0)}, dropped as too long {stats.get('dropped_too_long', 0)}, dropped with "
            f"nothing to train {stats.get('dropped_no_trained_tokens', 0)}, bad rows skipped {stats.get('bad_rows_skipped', 0)}, "
            f"duplicates removed {stats.get('duplicates_removed', 0)}",
            f"- tokenizer sha256 `{key.get('tokenizer', 'n/a')}`, chat template sha256 `{key.get('template', 'n/a')}` "
            f"({spec.data.template or 'the tokenizer’s own'})",
        ]
    return lines


def _result_lines(result: Optional[Dict]) -> List[str]:
    if not result:
        return ["- no result.json: the run did not finish"]
    lines = [
        f"- {result.get('steps')} optimizer steps, {result.get('runtime_s') or 0:.0f} s; training loss "
        f"{result.get('first_loss', float('nan')):.4f} -> {result.get('last_loss', float('nan')):.4f}"
    ]
    if result.get("eval_loss") is not None:
        lines.append(f"- validation loss {result['eval_loss']:.4f}")
    if result.get("best_step") is not None:
        lines.append(
            f"- best checkpoint: step {result['best_step']} (validation loss {result['best_eval_loss']:.4f})"
            + ("; training stopped early" if result.get("stopped_early") else "")
        )
    return lines


def _eval_lines(run_dir: Path, spec) -> List[str]:
    from fttool.after import report

    ev = _json(run_dir / "eval.json")
    if not ev:
        return [
            f"Not evaluated. Run `fttool eval run={run_dir}` and export again to include the comparison with the base."
        ]
    return [
        f"{ev['examples']} held-out test examples ({ev['test_source']}), greedy decoding, weights `{ev['checkpoint']}`:",
        "",
        *report.table(ev),
        "",
        f"**{report.verdict_line(ev)}**",
        "",
        *[f"- {r}" for r in ev["reasons"]],
    ]


def model_card(run_dir: Path, spec, weights: Path, dtype: str, n_params: int, name: str) -> str:
    env = _json(run_dir / runfiles.ENV) or {}
    result = _json(run_dir / runfiles.RESULT)
    data = _json(run_dir / runfiles.DATA)
    git = env.get("git") or {}
    command = "\n".join(public.commands(run_dir)) or "n/a"
    t = spec.train
    base = spec.model.name_or_path
    front = [
        "---",
        f"base_model: {base}",
        "library_name: transformers",
        "tags:",
        "- fttool",
        f"- {spec.method.name}",
        f"- {spec.objective.name}",
        "---",
        "",
    ]
    body = [
        f"# {name}",
        "",
        f"`{base}` fine-tuned with fttool ({spec.method.name}), exported from run `{spec.run_name}` "
        f"(weights `{weights.relative_to(run_dir) if run_dir in weights.parents else weights}`) in {dtype}, "
        f"{n_params:,} parameters.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tok = AutoTokenizer.from_pretrained("{name}")',
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        'ids = tok.apply_chat_template([{"role": "user", "content": "..."}], add_generation_prompt=True, return_tensors="pt")',
        "out = model.generate(ids, max_new_tokens=128)  # stops at the end-of-turn token (generation_config.json)",
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        f"or in a terminal: `fttool chat model={name}`. The tokenizer carries the chat template the model was trained with.",
        "",
        "## Training",
        "",
        f"- base model: `{base}`" + (f" (revision {spec.model.revision})" if spec.model.revision else ""),
        *_lineage_lines(data),
        *_method_lines(spec),
        f"- objective: {objectives.of(spec).describe(spec.objective)}",
        f"- schedule: lr {t.lr:g} ({t.lr_scheduler}, warmup {t.warmup_ratio:g}), batch {t.batch_size} x {t.grad_accum} "
        f"accumulation x {spec.hardware.num_processes * max(spec.hardware.num_machines, 1)} process(es), "
        + (f"max_steps {t.max_steps}" if t.max_steps else f"{t.epochs:g} epochs")
        + f", seed {spec.seed}",
        f"- hardware: {spec.hardware.name} ({spec.hardware.device}, precision {spec.hardware.precision}, strategy {spec.hardware.strategy})",
        *_result_lines(result),
        "",
        "## Data",
        "",
        *_data_lines(spec, data),
        "",
        "## Evaluation against the base model",
        "",
        *_eval_lines(run_dir, spec),
        "",
        "## Reproduce",
        "",
        "The run was started with:",
        "",
        "```",
        command,
        "```",
        "",
        f"fttool {env.get('packages', {}).get('fttool', 'n/a')}, git revision of the working directory: "
        + (
            f"`{git.get('commit')}`" + (" (with uncommitted changes)" if git.get("dirty") else "")
            if git
            else "none (not a git checkout)"
        )
        + f"; python {env.get('python', 'n/a')} on {env.get('platform', 'n/a')}.",
        "",
        "| package | version |",
        "|---|---|",
        *[f"| {k} | {v or 'not installed'} |" for k, v in env.get("packages", {}).items()],
        "",
        "The resolved spec (also in `fttool/spec.yaml`, with the run's data record and results; local paths are cut to "
        "their last part):",
        "",
        "```yaml",
        folder.spec_to_yaml(spec).rstrip(),
        "```",
        "",
    ]
    return public.scrub_text("\n".join(front + body))  # published with the model: no local paths
