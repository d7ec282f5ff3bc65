"""The non-finite guard: a NaN or inf loss or gradient norm stops the run at that step, before the update.

transformers' Trainer, left to itself, applies a NaN gradient to the weights, hides the NaN loss from its logs
(`logging_nan_inf_filter`: a run that trained into NaN logs `loss 0.0000`), saves checkpoints of NaN weights and
exits 0. Here every optimizer step's loss (summed over its micro-batches) and gradient norm are checked right
after the gradients are reduced and clipped and before the optimizer applies them. With several processes the
verdict is agreed over all of them (one tiny all-reduce), so every rank stops at the same step.

- `train.nonfinite_tolerance=0` (default): the first such step stops the run. Nothing of that step is applied or
  saved; the checkpoints written before it hold finite weights and `resume=auto` continues from the newest. Under
  DeepSpeed the engine has already applied the update inside backward: the message says so; nothing of it is saved.
- `train.nonfinite_tolerance=N`: up to N such steps are skipped (their gradients dropped, so the optimizer leaves
  the weights and its state as they were) and counted in metrics.jsonl and result.json; the N+1-th stops the run.
- fp16: an inf/NaN gradient norm with a finite loss is the loss scaler's business (it skips that step and lowers
  the scale, as it is meant to); a non-finite loss still stops the run.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional

from transformers import Trainer

from fttool.config import strategies
from fttool.errors import UserError

log = logging.getLogger("fttool")


class NonFiniteStep(Exception):
    """Raised inside the training loop at the step that would have applied a non-finite update, or at a validation
    whose loss is not finite (the weights then give NaN/inf outputs: that checkpoint is not written)."""

    def __init__(self, step: int, loss: float, grad_norm: Optional[float], validation: bool = False):
        super().__init__(f"step {step}: {'validation ' if validation else ''}loss {loss}, grad norm {grad_norm}")
        self.step, self.loss, self.grad_norm, self.validation = step, loss, grad_norm, validation


class TrainingDiverged(UserError):
    """The run stopped at a non-finite step (the message says which, why it happens and what to change)."""

    exit_code = 4


@dataclass
class NonFiniteGuard:
    tolerance: int = 0  # steps that may be skipped before the run stops
    fp16: bool = False  # the loss scaler owns gradient overflow
    skipped: List[int] = field(default_factory=list)  # steps whose update was dropped
    _losses: list = field(default_factory=list)  # this optimizer step's micro-batch losses (device tensors)

    def see_loss(self, loss) -> None:
        self._losses.append(loss.detach().float().reshape(()))

    def check(self, model, grad_norm, step: int) -> None:
        """Before the optimizer step `step`: drop its gradients (tolerated) or raise NonFiniteStep."""
        import torch

        losses, self._losses = self._losses, []
        loss = torch.stack(losses).sum() if losses else None
        device = loss.device if loss is not None else torch.device("cpu")
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
            grad_norm = grad_norm.full_tensor()
        check_norm = grad_norm is not None and not self.fp16
        false = torch.tensor(False, device=device)
        bad = torch.stack(
            [
                ~torch.isfinite(loss) if loss is not None else false,
                ~torch.isfinite(torch.as_tensor(grad_norm, dtype=torch.float32, device=device))
                if check_norm
                else false,
            ]
        ).int()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank takes the same decision
        if not bool(
            bad.any()
        ):  # one device sync per optimizer step (the Trainer's own NaN filter made one per micro-batch)
            return
        loss_v = float(loss) if loss is not None else float("nan")
        norm_v = float(grad_norm) if grad_norm is not None else None
        if len(self.skipped) >= self.tolerance:
            raise NonFiniteStep(step, loss_v, norm_v)
        self.skipped.append(step)
        model.zero_grad(set_to_none=True)  # a parameter without a gradient is left alone by the optimizer
        log.warning(
            f"step {step}: non-finite {_what(loss_v, norm_v)}; its update was dropped "
            f"({len(self.skipped)} of train.nonfinite_tolerance={self.tolerance})"
        )


class GuardedTrainer(Trainer):
    """transformers' Trainer whose every optimizer step passes the non-finite guard before the update."""

    def __init__(self, *args, guard: NonFiniteGuard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.see_loss(loss)
        return loss

    def evaluate(self, *args, **kwargs):
        # a non-finite validation loss means the weights give NaN/inf outputs: stop before they are saved
        metrics = super().evaluate(*args, **kwargs)
        loss = metrics.get(f"{kwargs.get('metric_key_prefix', 'eval')}_loss")
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteStep(self.state.global_step, loss, None, validation=True)
        return metrics

    def _get_grad_norm(self, model, grad_norm=None):
        # the Trainer's one place between the reduced, clipped gradients and optimizer.step(), on every strategy
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.guard.check(model, grad_norm, self.state.global_step + 1)
        return grad_norm


def _what(loss: float, grad_norm: Optional[float]) -> str:
    parts = [
        f"loss {loss}" if not math.isfinite(loss) else None,
        f"gradient norm {grad_norm}" if grad_norm is not None and not math.isfinite(grad_norm) else None,
    ]
    return " and ".join(p for p in parts if p) or f"loss {loss}"


def diverged_message(e: NonFiniteStep, spec, run_dir, last_checkpoint, precision: str) -> str:
    """What stopped, what was kept, the usual causes and the keys that change them."""
    t = spec.train
    kept = (
        f"the newest checkpoint, written before it with finite weights, is {last_checkpoint} (`resume=auto "
        f"run_name={spec.run_name}` continues from it, though with the same settings it will likely meet the same "
        "step again)"
        if last_checkpoint
        else "no checkpoint was written before it"
    )
    causes = [
        f"learning rate too high: train.lr={t.lr:g} now; try train.lr={t.lr / 10:g}, or a longer warmup "
        f"(train.warmup_ratio={t.warmup_ratio:g})"
    ]
    if precision == "fp16":
        causes.append("fp16 overflow: hardware.precision=bf16 on a GPU that has it, or fp32")
    causes.append(
        "a bad batch (a sample with no trained token, extreme lengths): check the data with `fttool preview`, "
        "data.max_length"
    )
    if spec.model.attn_implementation != "eager":
        causes.append(
            f"the attention kernel's numerics (model.attn_implementation={spec.model.attn_implementation}): "
            "compare with model.attn_implementation=eager"
        )
    if e.validation:
        head = (
            f"training stopped at step {e.step}: the validation loss is {e.loss}, so the weights after this step give "
            f"non-finite outputs. They were not saved; {kept}."
        )
    elif strategies.of(spec).drops_steps:
        head = (
            f"training stopped at step {e.step}: non-finite {_what(e.loss, e.grad_norm)}. Nothing of this step was "
            f"applied or saved; {kept}."
        )
    else:  # DeepSpeed: the engine steps inside backward, before the guard sees the gradient norm
        head = (
            f"training stopped at step {e.step}: non-finite {_what(e.loss, e.grad_norm)}. DeepSpeed "
            f"(hardware.strategy={spec.hardware.strategy}) had already applied this step's update inside its "
            f"backward pass, so the weights in memory may be non-finite; nothing after the previous checkpoint was "
            f"saved, and no checkpoint holds this step; {kept}."
        )
    lines = [head, "Usual causes, and the keys to change:"]
    lines += [f"  - {c}" for c in causes]
    lines.append(
        f"To skip a few such steps instead (each one's update is dropped and counted): "
        f"train.nonfinite_tolerance=N (now {t.nonfinite_tolerance})."
    )
    return "\n".join(lines)
