"""Trainer callbacks: metrics.jsonl in the run folder and a one-line progress report per logging step."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Dict, List

from transformers import EarlyStoppingCallback, TrainerCallback

from fttool.runfolder import runfiles
from fttool.runfolder.runfiles import read_jsonl, write_atomic
from fttool.worker import memory

log = logging.getLogger("fttool")
METRICS_FILE = runfiles.METRICS


def _hms(seconds: float) -> str:
    s = int(max(seconds, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


STANDARD = {"loss", "learning_rate", "grad_norm", "epoch", "num_tokens", "num_input_tokens_seen"}


class MetricsCallback(TrainerCallback):
    """Append one JSON object per logging step to metrics.jsonl and print step/total, loss, grad norm, lr, tokens/s,
    peak memory and ETA. A NaN is written and shown as NaN; steps the non-finite guard skipped are counted."""

    def __init__(self, run_dir: Path, guard=None, progress=()):
        self.path = Path(run_dir) / METRICS_FILE
        self.guard = guard
        self.progress = tuple(progress)  # (metric key, label): the objective's own figures on the progress line
        self.peaks = memory.PeakTracker()
        self.t0 = self.t_last = time.time()
        self.tokens_last = 0
        self.step0 = 0
        self.best_val = None
        self.training = False

    def on_train_end(self, args, state, control, **kw):
        self.training = False  # the final validation is reported by the worker itself

    def on_train_begin(self, args, state, control, **kw):
        self.training = True
        self.t0 = self.t_last = time.time()
        self.step0 = state.global_step
        self.tokens_last = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        rec: Dict = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            dt = max(now - self.t_last, 1e-9)
            tokens = state.num_input_tokens_seen
            peaks = self.peaks.read()
            rec.update(
                loss=logs["loss"],
                lr=logs.get("learning_rate"),
                grad_norm=logs.get("grad_norm"),
                tokens=tokens,
                tokens_per_s=round((tokens - self.tokens_last) / dt, 1),
                elapsed_s=round(now - self.t0, 2),
                **peaks,
            )
            own = {k: v for k, v in logs.items() if isinstance(v, (int, float)) and k not in STANDARD and k not in rec}
            rec.update(own)  # the objective's metrics (rewards/accuracies, rewards/margins, ...)
            skipped = len(self.guard.skipped) if self.guard is not None else 0
            if skipped:
                rec["nonfinite_steps"] = skipped
            self.t_last, self.tokens_last = now, tokens
            done = state.global_step - self.step0
            eta = (now - self.t0) / done * (state.max_steps - state.global_step) if done else 0.0
            norm = logs.get("grad_norm")
            log.info(
                f"step {state.global_step}/{state.max_steps} ({100 * state.global_step / max(state.max_steps, 1):.0f}%) | "
                f"loss {logs['loss']:.4f}"
                + (f" | grad norm {norm:.3g}" if norm is not None else "")
                + "".join(f" | {label} {logs[k]:.3g}" for k, label in self.progress if k in logs)
                + f" | lr {logs.get('learning_rate', 0):.2e} | {rec['tokens_per_s']:,.0f} tok/s | {memory.describe(peaks)}"
                + (f" | {skipped} non-finite step(s) skipped" if skipped else "")
                + f" | elapsed {_hms(now - self.t0)} | eta {_hms(eta)}"
            )
        else:
            rec.update({k: v for k, v in logs.items() if isinstance(v, (int, float))})
            if "eval_loss" in logs and self.training:
                val = logs["eval_loss"]
                best = self.best_val is None or val < self.best_val
                self.best_val = val if best else self.best_val
                log.info(
                    f"step {state.global_step}/{state.max_steps} | validation loss {val:.4f}"
                    + "".join(
                        f" | {label} {logs['eval_' + k]:.3g}" for k, label in self.progress if "eval_" + k in logs
                    )
                    + (" (best so far)" if best else "")
                )
        self._append(rec)

    def _append(self, rec: Dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")  # NaN and Infinity as JavaScript writes them: json.loads reads them back

    def record_stop(self, e, state) -> None:
        """The row of the step the non-finite guard stopped at, and its progress line."""
        if e.validation:
            rec = {"step": e.step, "epoch": round(state.epoch or 0.0, 4), "eval_loss": e.loss, "nonfinite": "stopped"}
            log.info(f"step {e.step}/{state.max_steps} | validation loss {e.loss} | non-finite: stopped")
        else:
            rec = {
                "step": e.step,
                "epoch": round(state.epoch or 0.0, 4),
                "loss": e.loss,
                "grad_norm": e.grad_norm,
                "nonfinite": "stopped",
                **self.peaks.read(),
            }
            log.info(
                f"step {e.step}/{state.max_steps} | loss {e.loss:.4f} | grad norm {e.grad_norm} | non-finite: stopped"
            )
        self._append(rec)


class EarlyStopping(EarlyStoppingCallback):
    """transformers' early stopping on the validation loss, saying when and why it stops."""

    def on_evaluate(self, args, state, control, metrics, **kw):
        super().on_evaluate(args, state, control, metrics, **kw)
        if control.should_training_stop and state.is_world_process_zero:
            log.info(
                f"early stopping at step {state.global_step}: validation loss did not improve by more than "
                f"{self.early_stopping_threshold:g} for {self.early_stopping_patience} validation(s); "
                f"best {state.best_metric:.4f}"
            )


class LayoutCallback(TrainerCallback):
    """Logs once how the parameters are laid out over the processes, so a run shows it really sharded."""

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.is_world_process_zero and model is not None and args.world_size > 1:
            log.info(f"parameters: {describe_layout(model, args.world_size)}")


def describe_layout(model, world_size: int) -> str:
    """'N of M parameter tensors sharded ...' for FSDP2 (DTensor) and ZeRO-3 (partitioned), else replicated."""
    params = list(model.parameters())
    total = sum(getattr(p, "ds_numel", None) or p.numel() for p in params)
    dtensors = [
        p for p in params if type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor"
    ]
    if dtensors:
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.data.to_local().numel() for p in dtensors)
        placements = sorted({str(pl) for p in dtensors for pl in p.placements})
        return (
            f"{len(dtensors)} of {len(params)} tensors sharded over {world_size} processes by FSDP2 "
            f"({', '.join(placements)}); process 0 holds {local:,} of {total:,} values"
        )
    partitioned = [p for p in params if hasattr(p, "ds_tensor")]
    if partitioned:
        local = sum(p.ds_tensor.numel() for p in partitioned)
        return (
            f"{len(partitioned)} of {len(params)} tensors partitioned over {world_size} processes by ZeRO-3; "
            f"process 0 holds {local:,} of {total:,} values"
        )
    return f"all {len(params)} tensors replicated on each of {world_size} processes ({total:,} values)"


def read_metrics(run_dir: Path) -> List[Dict]:
    return read_jsonl(Path(run_dir) / METRICS_FILE)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop rows logged after `step` (a resumed run logs those steps again); training and validation rows up to it
    stay (the end-of-training summary row goes: the run is not over)."""
    rows = [r for r in read_metrics(run_dir) if r["step"] <= step and ("loss" in r or "eval_loss" in r)]
    write_atomic(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))


def sparkline(values: List[float], width: int = 40) -> str:
    """A row of bars for a loss curve; a non-finite value is shown as ×."""
    import math

    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width)]
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    bars = "▁▂▃▄▅▆▇█"
    return "".join(
        bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] if math.isfinite(v) else "×" for v in values
    )
