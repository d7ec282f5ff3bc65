"""The Trainer pieces that keep a run's work safe: checkpoints with a manifest written before older ones are
rotated out (checkpoint.py), save errors that name the folder, and a clean stop on preemption.

SIGTERM (what SLURM and Kubernetes send before preemption), SIGUSR1 (SLURM's early warning) and, in a submitit job,
submitit's signal (preemption.py) make every process save a checkpoint at the end of the current step and stop; the
run then exits 143 with the resume command, or its SLURM job requeues itself.
"""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path
from typing import Optional

from transformers import Trainer, TrainerCallback

from fttool.errors import UserError
from fttool.preemption import stop_signals
from fttool.runfolder.checkpoint import disk_full_message, failed_file, low_space, rotate, write_failure, write_manifest
from fttool.worker.guard import GuardedTrainer
from fttool.worker.lm_head import HeadCheck

log = logging.getLogger("fttool")


class TrustedCheckpoints(Trainer):
    """transformers' Trainer whose checkpoints get a manifest before older ones are rotated out, and whose save
    errors name the folder. Rotation is fttool's (TrainingArguments.save_total_limit is left unset)."""

    keep_checkpoints = 2

    def _save_checkpoint(self, model, trial):
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        run_dir = folder.parent.parent
        if self.args.should_save:
            warn = low_space(run_dir)
            if warn:
                log.warning(f"checkpoint-{self.state.global_step}: {warn}")
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every process's shards are written
            if self.args.should_save:
                write_manifest(folder)
                rotate(run_dir, self.keep_checkpoints, self.state.best_model_checkpoint)
        except Exception as e:  # noqa: BLE001 - only a failed write is named; anything else goes on up
            why = write_failure(e)
            if why is None:
                raise
            message = disk_full_message(run_dir, folder, why, failed_file(e, folder))  # the space as it was
            if self.args.should_save:
                shutil.rmtree(folder, ignore_errors=True)  # half a checkpoint is never left to be mistaken for one
            raise UserError(message) from None


class Preemption(TrainerCallback):
    """On a stop signal (preemption.stop_signals): finish the current step, save a checkpoint, stop. Every process stops at the same
    step: the flag is all-reduced each step when there are several processes."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def install(self) -> None:
        for sig in stop_signals():
            self._previous[sig] = signal.signal(sig, self._note)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum, frame) -> None:
        self.signal = signum

    def _agreed(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = self.signal is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor(
                [1.0 if flag else 0.0],
                device="cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu",
            )
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t.item() > 0 and self.signal is None:
                self.signal = signal.SIGTERM  # a peer was told to stop
            return t.item() > 0
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            control.should_save = True
            control.should_training_stop = True
        return control

    @property
    def stopped(self) -> bool:
        return self.signal is not None

    def message(self, run_dir: Path, run_name: str, step: int) -> str:
        name = signal.Signals(self.signal).name if self.signal else "a stop signal"
        return (
            f"stopped by {name} at step {step}: checkpoint-{step} saved in {run_dir}. Continue with: "
            f"python -m fttool resume=auto run_name={run_name} (same settings)."
        )


class RunTrainer(HeadCheck, TrustedCheckpoints, GuardedTrainer):
    """The Trainer of fttool's own objectives: trusted checkpoints, the non-finite guard, and the loss through the
    chunked LM head when the run takes that path (worker/chunked_loss.py): the log-probs of the trained tokens,
    summed and divided by the accumulated batch's count, as the model's own loss is."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.chunked_head:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from fttool.worker.chunked_loss import token_loss

        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs, chunked_labels=labels)
        # normalised exactly as transformers normalises the model's own loss (Trainer.compute_loss, training_step)
        per_batch = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        loss = token_loss(outputs, num_items_in_batch if per_batch else None)
        if self.args.average_tokens_across_devices and per_batch:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def chunked_probe_loss(self, model, batch):
        from fttool.worker.chunked_loss import token_loss

        labels = batch.pop("labels")
        return token_loss(model(**batch, chunked_labels=labels))
