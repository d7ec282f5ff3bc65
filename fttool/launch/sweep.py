"""Sweeps: `fttool -m key=a,b ...` runs each trial as an ordinary run in one sweep folder, then summarises.

<output_dir>/sweep-<time>/
  trial-00-<overrides>/ ...   each trial's run folder (spec.yaml, metrics.jsonl, result.json, final/ ...)
  trials.jsonl                one line per trial as it ends: number, overrides, run folder, status, error
  summary.md, summary.csv     each trial's overrides, final train loss, eval loss, tokens/s, run folder
  loss_curves.png             every trial's training loss against steps
  multirun.yaml               Hydra's record of the sweep

The summary is written by a Hydra callback when the multirun ends, whatever launcher ran the trials.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback

from fttool.runfolder.runfiles import METRICS, RESULT, read_json, read_jsonl

TRIALS = "trials.jsonl"


def trial_name(num: int, overrides: List[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9._+=,-]+", "_", ",".join(overrides)).strip("_,")
    return f"trial-{num:02d}" + (f"-{slug[:80]}" if slug else "")


def record_trial(
    sweep_dir: Path, num: int, overrides: List[str], run_dir: Optional[Path], status: str, error: str = ""
) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    row = {
        "trial": num,
        "overrides": overrides,
        "run_dir": str(run_dir) if run_dir else None,
        "status": status,
        "error": error,
    }
    with open(sweep_dir / TRIALS, "a") as f:
        f.write(json.dumps(row) + "\n")


def failures(sweep_dir: Path, expected: Optional[int] = None) -> List[str]:
    """The sweep's outcome, read from its trial records wherever the trials ran (this process, SLURM jobs): one
    line per failed trial, and per expected trial that left no record (its job ended without reporting)."""
    rows = read_jsonl(Path(sweep_dir) / TRIALS)
    out = [f"trial {r['trial']} ({' '.join(r['overrides'])}): {r['error']}" for r in rows if r["status"] != "ok"]
    if expected is not None:
        seen = {r["trial"] for r in rows}
        out += [
            f"trial {n}: no record in {Path(sweep_dir) / TRIALS} (its job ended without reporting; see its log)"
            for n in range(expected)
            if n not in seen
        ]
    return out


def collect(sweep_dir: Path) -> List[Dict[str, Any]]:
    """One row per trial: what it changed, how it ended, its figures."""
    rows = []
    for t in sorted(read_jsonl(sweep_dir / TRIALS), key=lambda r: r["trial"]):
        run_dir = Path(t["run_dir"]) if t["run_dir"] else None
        result = (read_json(run_dir / RESULT) or {}) if run_dir else {}
        losses = [r["loss"] for r in read_jsonl(run_dir / METRICS) if "loss" in r] if run_dir else []
        rows.append(
            {
                "trial": t["trial"],
                "overrides": " ".join(t["overrides"]),
                "status": t["status"],
                "final_train_loss": losses[-1] if losses else None,
                "eval_loss": result.get("eval_loss"),
                "tokens_per_s": result.get("tokens_per_s"),
                "steps": result.get("steps"),
                "best_step": result.get("best_step"),
                "verdict": (result.get("eval") or {}).get("verdict"),
                "run_dir": str(run_dir) if run_dir else "",
                "error": t["error"],
            }
        )
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


COLUMNS = [
    "trial",
    "overrides",
    "status",
    "final_train_loss",
    "eval_loss",
    "best_step",
    "verdict",
    "tokens_per_s",
    "steps",
    "run_dir",
]


def markdown(rows: List[Dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]).replace("|", "\\|") for c in COLUMNS) + " |")
    failed = [r for r in rows if r["status"] != "ok"]
    for r in failed:
        lines.append(f"\ntrial {r['trial']} failed: {r['error']}")
    return "\n".join(lines) + "\n"


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS + ["error"])
    w.writeheader()
    w.writerows(rows)
    path.write_text(buf.getvalue())


def plot(rows: List[Dict[str, Any]], path: Path) -> bool:
    from fttool.plots import loss_curves

    series = [
        (
            f"{r['trial']}: {r['overrides'] or '(defaults)'}",
            [(m["step"], m["loss"]) for m in read_jsonl(Path(r["run_dir"]) / METRICS) if "loss" in m]
            if r["run_dir"]
            else [],
            "-",
        )
        for r in rows
    ]
    drawn = sum(1 for s in series if s[1])
    return loss_curves(series, path, f"{path.parent.name}: {drawn} trials", ylabel="training loss")


def summarize(sweep_dir: Path) -> Optional[str]:
    rows = collect(sweep_dir)
    if not rows:
        return None
    table = markdown(rows)
    (sweep_dir / "summary.md").write_text(f"# {sweep_dir.name}\n\n" + table)
    write_csv(rows, sweep_dir / "summary.csv")
    plotted = plot(rows, sweep_dir / "loss_curves.png")
    return table + f"\nsweep folder {sweep_dir}: summary.md, summary.csv" + (", loss_curves.png" if plotted else "")


class SweepSummary(Callback):
    """Hydra callback: when a multirun ends, write the sweep's summary, CSV and loss plot and print the table."""

    def on_multirun_end(self, config, **kwargs) -> None:
        text = summarize(Path(config.hydra.sweep.dir).resolve())
        if text:
            print("\n" + text, flush=True)
