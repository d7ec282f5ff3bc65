"""Evaluation results as a record: the side-by-side table, the verdict against the margin the user set, and the
files eval.json, eval.md and eval_samples.jsonl in the run folder. No torch here."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

from fttool.config.spec import effective_gate
from fttool.metrics import METRICS, fmt, fmt_diff, improvement


def gate_of(spec) -> Dict[str, float]:
    """metric -> margin the verdict requires; by default the first metric the data group names, margin 0."""
    return effective_gate(spec)


def gate_why(spec, gate: Dict[str, float]) -> str:
    """Which metric decides the verdict, and why that one."""
    names = ", ".join(gate)
    if spec.eval.gate:
        return f"gated on {names}: eval.gate names it"
    return (
        f"gated on {names}: the first of data.metrics [{', '.join(spec.data.metrics)}] (the data group's choice for "
        "this task; eval.gate={METRIC: MARGIN} gates on another)"
    )


def verdict(tuned: Dict[str, float], base: Optional[Dict[str, float]], gate: Dict[str, float]) -> Dict:
    """pass when every gated metric improves on the base by at least its margin, and by more than nothing."""
    if base is None:
        return {"verdict": None, "reasons": ["no base model evaluated (eval.compare_base=false)"]}
    reasons, ok = [], True
    for m, margin in gate.items():
        gain = improvement(m, base[m], tuned[m])
        passed = gain > 1e-12 and gain >= margin - 1e-9 and not math.isnan(gain)  # rates like 3/10 - 1/10 are inexact
        ok &= passed
        need = "beat the base" if margin == 0 else f"beat the base by >= {fmt_diff(m, margin)}"
        reasons.append(
            f"{m}: {fmt(m, base[m])} -> {fmt(m, tuned[m])} ({fmt_diff(m, tuned[m] - base[m])}); "
            f"required: {need}: {'met' if passed else 'NOT met'}"
        )
    return {"verdict": "pass" if ok else "fail", "reasons": reasons}


def assemble(
    spec, examples: List[Dict], tuned: Dict, base: Optional[Dict], source: str, checkpoint: str, seconds: float
) -> Dict:
    gate = gate_of(spec)
    t, b = tuned["metrics"], base["metrics"] if base else None
    v = verdict(t, b, gate)
    if v["verdict"] is not None:
        v["reasons"].append(gate_why(spec, gate))
    samples = []
    for i, e in enumerate(examples):
        row = {
            "loc": e["loc"],
            "prompt": e["messages"][-1]["content"] if e["messages"] else "",
            "reference": e["reference"],
        }
        for side, res in (("finetuned", tuned), ("base", base)):
            if res is None:
                continue
            if res["replies"]:
                row[side], row[f"{side}_stopped"] = res["replies"][i]
            row[f"{side}_scores"] = res["per_example"][i]
        samples.append(row)
    return {
        "run": spec.run_name,
        "checkpoint": checkpoint,
        "test_source": source,
        "examples": len(examples),
        "decoding": {"greedy": True, "max_new_tokens": spec.eval.max_new_tokens},
        "metrics": list(t),
        "finetuned": t,
        "base": b,
        "diff": {m: t[m] - b[m] for m in t} if b else None,
        "better": {m: improvement(m, b[m], t[m]) > 0 for m in t} if b else None,
        "gate": gate,
        **v,
        "seconds": round(seconds, 1),
        "samples": samples,
    }


def table(result: Dict) -> List[str]:
    """The side-by-side table as markdown rows."""
    has_base = result["base"] is not None
    head = "| metric | base | fine-tuned | difference | verdict gate |" if has_base else "| metric | fine-tuned |"
    lines = [head, "|---|---:|---:|---:|---|" if has_base else "|---|---:|"]
    for m in result["metrics"]:
        arrow = "↑" if METRICS[m].higher_is_better else "↓"
        t = fmt(m, result["finetuned"][m])
        if not has_base:
            lines.append(f"| {m} {arrow} | {t} |")
            continue
        gate = ""
        if m in result["gate"]:
            margin = result["gate"][m]
            gate = "must beat base" if margin == 0 else f"must beat base by {fmt_diff(m, margin)}"
        lines.append(f"| {m} {arrow} | {fmt(m, result['base'][m])} | {t} | {fmt_diff(m, result['diff'][m])} | {gate} |")
    return lines


def verdict_line(result: Dict) -> str:
    if result["verdict"] is None:
        return "verdict: none (" + result["reasons"][0] + ")"
    return f"verdict: {result['verdict'].upper()}"


def _inline(text: str, limit: int = 200) -> str:
    """A reply as one line of inline code in markdown."""
    one = text.replace("`", "'").replace("\r", "").replace("\n", " ⏎ ")
    return one if len(one) <= limit else one[:limit] + " …"


def markdown(result: Dict, show: int = 5, title: Optional[str] = None) -> str:
    out = [
        f"# {title or 'Evaluation: ' + str(result['run'])}",
        "",
        f"{result['examples']} test examples ({result['test_source']}), greedy decoding, at most "
        f"{result['decoding']['max_new_tokens']} new tokens; weights: `{result['checkpoint']}`.",
        "",
    ]
    out += table(result) + ["", f"**{verdict_line(result)}**", ""]
    out += [f"- {r}" for r in result["reasons"]] + [""]
    if show and result["samples"]:
        out += ["## Examples", ""]
        for s in result["samples"][:show]:
            out += [f"- prompt: `{_inline(s['prompt'])}`", f"  - expected: `{_inline(s['reference'])}`"]
            if "base" in s:
                out.append(f"  - base: `{_inline(s['base'])}`")
            if "finetuned" in s:
                out.append(f"  - fine-tuned: `{_inline(s['finetuned'])}`")
        out.append("")
    return "\n".join(out)


def console(result: Dict, show: int) -> List[str]:
    lines = []
    for s in result["samples"][:show]:
        if "finetuned" not in s:
            break
        lines.append(f"  prompt     {s['prompt']!r}")
        lines.append(f"  expected   {s['reference']!r}")
        if "base" in s:
            lines.append(f"  base       {s['base'][:120]!r}")
        lines.append(f"  fine-tuned {s['finetuned'][:120]!r}")
        lines.append("")
    lines.append(f"held-out evaluation, {result['examples']} examples ({result['test_source']}):")
    lines += ["  " + line for line in table(result)]
    lines.append(verdict_line(result))
    lines += [f"  {r}" for r in result["reasons"]]
    return lines


def write(run_dir: Path, result: Dict) -> List[Path]:
    """eval.json (everything but the samples), eval.md and eval_samples.jsonl, each written whole."""
    run_dir = Path(run_dir)
    summary = {k: v for k, v in result.items() if k != "samples"}
    texts = {
        "eval.json": json.dumps(summary, indent=2) + "\n",
        "eval.md": markdown(result),
        "eval_samples.jsonl": "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in result["samples"]),
    }
    paths = []
    for name, text in texts.items():
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(run_dir / name)
        paths.append(run_dir / name)
    return paths
