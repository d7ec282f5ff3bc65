"""The worker: reads the frozen spec from a run folder, builds data, model and a transformers Trainer, trains.

Run in-process for a single process, or as `python -m fttool.worker.train RUN_DIR` by a launcher.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from fttool.config import devices, losspath, methods, objectives, strategies
from fttool.config.spec import has_test, has_validation
from fttool.data.tokenizer import load_tokenizer
from fttool.errors import UserError
from fttool.logs import rank, setup_logging
from fttool.runfolder import folder, runfiles
from fttool.runfolder.checkpoint import best_checkpoint, last_checkpoint, mark_best, wait_for_hashes
from fttool.runfolder.runfiles import CHECKPOINTS, FINAL
from fttool.worker import checkpointing, memory, trainers

log = logging.getLogger("fttool")


def validation_args(spec) -> dict:
    """Validation loss every eval_steps (default: at every checkpoint); the best checkpoint kept and loaded at the end."""
    t = spec.train
    if not has_validation(spec):
        return {"eval_strategy": "no"}
    out = {
        "eval_strategy": "steps",
        "eval_steps": t.eval_steps or t.save_steps,
        "per_device_eval_batch_size": t.batch_size,
    }
    if t.load_best:
        out.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return out


def training_args(spec, run_dir: Path, precision: str):
    """The objective's TrainingArguments class (transformers', or TRL's DPOConfig) with every run's settings."""

    t = spec.train
    objective = objectives.of(spec)
    return trainers.arguments_class(spec)(
        output_dir=str(run_dir / CHECKPOINTS),
        seed=spec.seed,
        data_seed=spec.seed,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        **checkpointing.trainer_kwargs(t.gradient_checkpointing),
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # rotation: safe_trainer.RunTrainer
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not devices.of(spec.hardware).gpu,
        dataloader_num_workers=t.dataloader_workers,
        report_to=["wandb"] if spec.logging.backend == "wandb" else [],
        run_name=spec.run_name,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (the Trainer would log the average so far, or 0)
        remove_unused_columns=False,
        save_only_model=False,
        **validation_args(spec),
        **strategies.of(spec).training_kwargs(spec.hardware, run_dir),
        **objective.extra_args(spec.objective),
    )


def _read_record(run_dir: Path) -> Optional[dict]:
    path = run_dir / runfiles.DATA
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _data_history(spec, run_dir: Path, before: dict, prepared) -> list:
    """On resume the data must be what the run trained on; resume_data=changed continues on new data, and
    data.json keeps what each earlier part of the run used."""
    from fttool import data

    changes = data.drift(before.get("key", {}), prepared.key, spec)
    history = before.get("history", [])
    if not changes:
        return history
    if spec.resume_data != "changed":
        raise UserError(
            f"resume: the data differs from what {run_dir} trained on: {'; '.join(changes)}. Restore it, "
            f"or continue on the new data with resume_data=changed (recorded in data.json; validation "
            "losses before and after are then not comparable)."
        )
    log.warning(f"resume_data=changed: continuing on new data ({'; '.join(changes)})")
    return history + [
        {
            "key": before.get("key"),
            "stats": before.get("stats"),
            "changed": changes,
            "replaced_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    ]


def log_data(prepared) -> None:
    how = "loaded from cache" if prepared.from_cache else "tokenized and cached"
    log.info(f"data: {how} in {prepared.seconds:.2f} s ({prepared.cache_dir})")
    log.info(f"data: {prepared.stats.summary()}")
    for example in prepared.stats.bad_row_examples:
        log.info(f"data: skipped: {example}")


def log_format_notes(spec) -> None:
    from fttool.data import sources_of
    from fttool.data.features import PAIRS

    if any(s.format == "preference" for s in sources_of(spec.data)) and objectives.of(spec).features is not PAIRS:
        log.info(
            "data: preference pairs under objective=sft: training supervised on the chosen replies (objective=dpo "
            "or objective=orpo trains on the pairs); `fttool preview` shows what is trained"
        )


def as_batches(spec, split, tok):
    """A prepared split as the collator wants it: the features' columns, or bins of max_length tokens."""
    if split is None:
        return None
    ds = split.select_columns(list(objectives.of(spec).features.columns))
    if spec.data.packing != "bins":
        return ds
    import datasets

    from fttool.data import pack

    bins = pack.pack_bins(ds["input_ids"], ds["labels"], spec.data.max_length, pack.pad_id(tok))
    log.info(
        f"data: {len(ds):,} samples packed into {len(bins['input_ids']):,} rows of {spec.data.max_length} tokens "
        f"({100 * sum(split['length']) / (len(bins['input_ids']) * spec.data.max_length):.1f}% filled)"
    )
    return datasets.Dataset.from_dict(bins)


def train(run_dir: Path) -> dict:
    """Train the run in `run_dir` (in every worker process); returns the summary written to result.json."""
    run_dir = Path(run_dir)
    spec = folder.load_spec(run_dir)
    main = rank() == 0
    setup_logging(run_dir, main)
    from transformers import set_seed

    from fttool import models as model_lib
    from fttool.errors import Preempted
    from fttool.worker import callbacks, tracking
    from fttool.worker.guard import NonFiniteStep, TrainingDiverged, diverged_message

    strategies.of(spec).before_worker(spec.hardware)
    set_seed(spec.seed)
    precision = model_lib.resolve_precision(spec)
    args = training_args(spec, run_dir, precision)  # also starts the process group when there are several processes
    strategies.of(spec).after_process_group(spec.hardware)
    tok = load_tokenizer(spec)
    prepared, record = prepare_data(spec, run_dir, args, tok, main)  # bad data fails here, before any model loads
    model, precision = model_lib.load_model(spec)
    trainable, total = describe_model(spec, model, precision, args)
    if main:
        tracking.start(spec, run_dir)
    trainer, parts = build_trainer(spec, run_dir, model, args, prepared, tok, precision)
    resume_from = last_checkpoint(run_dir, say=main)  # the launcher hands over checkpoints only under resume=auto
    step = int(resume_from.name.split("-")[-1]) if resume_from else 0
    if main:
        callbacks.truncate_metrics(run_dir, step)  # rows logged after the checkpoint are logged again
    if resume_from:
        log.info(f"resuming from {resume_from} (step {step})")
    log.info(f"training: run folder {run_dir}")
    parts.preempt.install()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        if parts.preempt.stopped:  # the checkpoint of this step is saved; nothing after training runs
            raise Preempted(
                parts.preempt.message(run_dir, spec.run_name, trainer.state.global_step), parts.preempt.signal
            )
        best = mark_best(run_dir, trainer.state) if main else None
        # every process takes part; a non-finite loss here stops the run before final/ is written
        eval_loss = trainer.evaluate()["eval_loss"] if prepared.validation is not None else None
    except KeyboardInterrupt:
        ckpt = last_checkpoint(run_dir)
        log.info(
            f"interrupted. Last complete checkpoint: {ckpt or 'none'}. Continue with: resume=auto run_name={spec.run_name}"
        )
        raise SystemExit(130)
    except NonFiniteStep as e:  # nothing of this step was applied; final/ is not written from this run's weights
        if main:
            parts.metrics.record_stop(e, trainer.state)
            tracking.finish(run_dir)
        raise TrainingDiverged(diverged_message(e, spec, run_dir, last_checkpoint(run_dir), precision)) from None
    finally:
        parts.preempt.restore()
        if main:
            _plot(run_dir, trainer)
    trainer.save_model(str(run_dir / FINAL))  # every process: FSDP and ZeRO-3 gather the full weights for rank 0
    if not main:
        return {}
    tok.save_pretrained(str(run_dir / FINAL))
    summary = _summarize(spec, run_dir, out, trainable, total, prepared.stats)
    summary.update(_measured(trainer, out, parts, eval_loss, best, record))
    return finish(spec, run_dir, summary, prepared, model if args.world_size == 1 else None, tok)


def prepare_data(spec, run_dir: Path, args, tok, main: bool):
    """The run's data as its objective's features (one process per machine tokenizes; the rest read its cache),
    checked against what a resumed run trained on, and recorded in data.json. Returns (prepared, record)."""
    from fttool import data

    before = _read_record(run_dir)  # read before process 0 rewrites it: what the run trained on so far
    with args.main_process_first(local=True, desc="data"):
        prepared = data.prepare_datasets(spec, tok, objectives.of(spec).features)
    record = prepared.record()
    record["lineage"] = folder.lineage(spec) + [folder.lineage_entry(run_dir, spec, record)]
    code = getattr(spec.objective, "reward_code", None)
    if code:  # what ran: the reward file's hash beside its name
        from fttool import rewards

        record["reward_code"] = {"ref": code, "sha256": rewards.code_hash(code)}
    if before is not None:
        record["history"] = _data_history(spec, run_dir, before, prepared)
    if has_validation(spec) and not (prepared.validation is not None and len(prepared.validation)):
        d = spec.data
        source = (
            f"data.val_path={d.val_path}"
            if d.val_path
            else f"data.val_ratio={d.val_ratio} of {prepared.stats.rows} rows"
        )
        raise UserError(f"the validation split is empty ({source}); raise data.val_ratio or give data.val_path rows.")
    if main:
        log_data(prepared)
        log_format_notes(spec)
        runfiles.write_json(run_dir / runfiles.DATA, record, indent=1)
    return prepared, record


def describe_model(spec, model, precision: str, args):
    """The loaded model checked and made ready for the batches; says what trains. Returns (trainable, total)."""
    from fttool import models as model_lib
    from fttool.data import pack

    model_lib.check_cpu_4bit_shapes(spec, model)
    if spec.data.packing != "none":
        pack.guard_kv_cache(model)
    trainable, total = model_lib.count_parameters(model)
    log.info(
        f"model: {spec.model.name_or_path}, {spec.method.name}, {trainable:,} trainable of {total:,} parameters, "
        f"precision {precision}, {args.world_size} process(es), strategy {spec.hardware.strategy}"
    )
    return trainable, total


class TrainerParts:
    """What the training loop talks to besides the Trainer: the metrics callback, the guard, preemption."""

    def __init__(self, metrics, guard, preempt):
        self.metrics, self.guard, self.preempt = metrics, guard, preempt


def build_trainer(spec, run_dir: Path, model, args, prepared, tok, precision: str):
    """The objective's Trainer over the prepared features, with fttool's callbacks. Returns (trainer, parts)."""
    from transformers import PrinterCallback

    from fttool.worker import callbacks, lm_head
    from fttool.worker.guard import NonFiniteGuard
    from fttool.worker.safe_trainer import Preemption

    t, objective = spec.train, objectives.of(spec)
    extra = (
        [callbacks.EarlyStopping(t.early_stopping_patience, t.early_stopping_threshold)]
        if t.early_stopping_patience
        else []
    )
    guard = NonFiniteGuard(tolerance=t.nonfinite_tolerance, fp16=precision == "fp16")
    impl, why = losspath.decide(spec)
    fused_by_trl = spec.objective.name in losspath.FUSED_BY_TRL
    lm_head.install(model, own_loss=impl == "chunked" and not fused_by_trl, by_trl=fused_by_trl)
    log.info(f"loss: {impl} ({why})")
    parts = TrainerParts(callbacks.MetricsCallback(run_dir, guard, objective.progress), guard, Preemption())
    trainer = trainers.trainer_class(spec)(
        model=model,
        args=args,
        train_dataset=as_batches(spec, prepared.train, tok),
        eval_dataset=as_batches(spec, prepared.validation, tok),
        data_collator=objective.features.collator(spec.data.packing, tok),
        processing_class=tok,
        callbacks=[parts.metrics, callbacks.LayoutCallback(), parts.preempt, *extra],
        guard=guard,
        **objective.trainer_kwargs(spec),
    )
    trainer.keep_checkpoints = t.save_total_limit
    trainer.chunked_head = impl == "chunked"
    trainer.head_fallback = t.loss_impl == "auto" and not fused_by_trl
    trainer.remove_callback(PrinterCallback)  # MetricsCallback prints one readable line per logging step
    return trainer, parts


def _measured(trainer, out, parts, eval_loss, best, record) -> dict:
    """What the finished training measured: throughput, peak memory, skipped steps, the best checkpoint."""
    runtime = out.metrics.get("train_runtime") or 0
    parts.metrics.peaks.read()  # the end of training, the final save and validation included
    skipped = parts.guard.skipped
    log.info(
        f"peak memory: {memory.describe(parts.metrics.peaks.run)}"
        + (f"; {len(skipped)} non-finite step(s) skipped: {skipped}" if skipped else "")
    )
    return dict(
        eval_loss=eval_loss,
        tokens_seen=trainer.state.num_input_tokens_seen,
        tokens_per_s=trainer.state.num_input_tokens_seen / runtime if runtime else None,
        **(best or {}),
        peak_memory=parts.metrics.peaks.run,
        nonfinite_steps=skipped,
        lineage=record["lineage"],
        stopped_early=out.global_step < trainer.state.max_steps,  # with early stopping on (see finish)
    )


def finish(spec, run_dir: Path, summary: dict, prepared, own_model, tok) -> dict:
    """Process 0 after the final save: plan vs measured, validation, the held-out evaluation, result.json."""
    from fttool.worker import tracking

    summary["stopped_early"] = bool(spec.train.early_stopping_patience) and summary.pop("stopped_early")
    plan = runfiles.read_json(run_dir / runfiles.PLAN)
    if plan and "memory" in plan:
        from fttool.plan.budget import versus

        summary["plan_vs_measured"] = versus(plan, summary)
        log.info(
            "plan vs measured: "
            + ", ".join(f"{k} {v['predicted']} vs {v['measured']}" for k, v in summary["plan_vs_measured"].items())
        )
    if summary["eval_loss"] is not None:
        log.info(f"validation loss {summary['eval_loss']:.4f} on {len(prepared.validation):,} held-out samples")
    final = run_dir / FINAL
    if spec.eval.after_training and has_test(spec):
        summary["eval"] = _evaluate(spec, run_dir, final, own_model, tok)
    wait_for_hashes()  # the checkpoints' manifests get their hashes before the run is called finished
    runfiles.write_json(run_dir / runfiles.RESULT, summary)
    tracking.log_eval(summary.get("eval"))
    log.info(f"done: {methods.of(spec).holds} saved to {final}")
    log.info(f"next: fttool eval run={run_dir} | fttool export run={run_dir} output=DIR | fttool chat run={run_dir}")
    tracking.finish(run_dir)
    return summary


def _plot(run_dir: Path, trainer) -> None:
    """loss.png from metrics.jsonl; a plotting failure never fails the run."""
    from fttool import plots
    from fttool.worker.callbacks import read_metrics

    best = best_checkpoint(run_dir, trainer.state)
    try:
        plots.run_loss_plot(run_dir, read_metrics(run_dir), (best[1], trainer.state.best_metric) if best else None)
    except Exception as e:  # noqa: BLE001 - a missing font or backend must not cost the trained model
        log.warning(f"could not draw loss.png: {e}")


def _summarize(spec, run_dir: Path, out, trainable: int, total: int, stats) -> dict:
    from fttool.worker.callbacks import read_metrics, sparkline

    losses = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    summary = {
        "run_dir": str(run_dir),
        "steps": out.global_step,
        "train_loss": out.training_loss,
        "runtime_s": out.metrics.get("train_runtime"),
        "trainable_params": trainable,
        "total_params": total,
        "data": stats.__dict__,
    }
    if losses:
        summary.update(first_loss=losses[0], last_loss=losses[-1])
        log.info(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}  {sparkline(losses)}")
    return summary


def _evaluate(spec, run_dir: Path, final: Path, own, tok) -> dict:
    """The held-out evaluation of the saved model against the base (as `fttool eval` does). The model is saved
    already, so a problem here is reported and leaves the run intact."""
    from fttool.after.evaluate import run_eval

    try:  # sharded or wrapped weights (own=None): reload what was saved instead
        result = run_eval(spec, run_dir, final, own=own, tokenizer=tok)
    except UserError as e:
        log.warning(f"eval after training skipped: {e}")
        return {"error": str(e)}
    return {k: result[k] for k in ("examples", "finetuned", "base", "diff", "gate", "verdict")}


def main(argv=None) -> None:
    """`python -m fttool.worker.train RUN_DIR`: one worker. A failure is also written to RUN_DIR/errors/rank-N.txt so the
    launching process can show which rank failed and why."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fttool.worker.train RUN_DIR", file=sys.stderr)
        raise SystemExit(2)
    run_dir = Path(argv[0])
    from fttool import lifeline

    lifeline.die_with_parent(signal.SIGTERM, os.getppid())  # a killed launcher (torch's agent) stops this worker
    try:
        train(run_dir)
    except UserError as e:
        _error_report(run_dir, f"fttool: error: {e}", e.exit_code)
        from fttool.errors import fail

        fail(str(e), e.exit_code)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:
        import traceback

        _error_report(run_dir, traceback.format_exc())
        raise
    finally:
        _close_process_group()
    _exit_cleanly()


def _exit_cleanly() -> None:
    """A worker whose work is done and written leaves without the interpreter's teardown: there, threads of the
    gloo / DeepSpeed communication libraries were seen to abort a finished rank ("terminate called without an
    active exception", SIGABRT), and the launcher then killed its peers mid-write. Logs are flushed first."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _error_report(run_dir: Path, text: str, exit_code: Optional[int] = None) -> None:
    """errors/rank-N.txt, and errors/rank-N.exit with the exit code a user error asks for (4: training diverged)."""
    try:
        folder = run_dir / runfiles.ERRORS
        folder.mkdir(exist_ok=True)
        (folder / f"rank-{rank()}.txt").write_text(text)
        if exit_code is not None:
            (folder / f"rank-{rank()}.exit").write_text(f"{exit_code}\n")
    except OSError:
        pass


def _close_process_group() -> None:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # already torn down by a failing peer
        pass


if __name__ == "__main__":
    main()
