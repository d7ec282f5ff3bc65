"""The chunked LM-head path in a run (config/losspath.py decides it): fttool's chunked loss installed for its own
objectives (worker/chunked_loss.py), a LoRA on lm_head read through its merged weight by TRL's fused head too, and a
check, at the first training step, that the chunked loss equals the model's own.

TRL's fused head (DPO, KTO, GRPO) reads `lm_head.weight` itself instead of calling the module, so a peft LoRA layer
on lm_head would be read as its frozen base weight: the adapter would neither count nor learn. `merged_head_weight`
makes that layer's `weight` the merged one (base + B A x scaling, built from the adapter's tensors so gradients
reach A and B), for the adapter-enabled forward only.

The check runs both paths on one short row of token ids (dropout off, no gradient): a model whose forward does to
its logits something the chunked head does not know would train on a wrong loss. Under train.loss_impl=auto such a run
falls back to the full path with a warning; asked for explicitly, or under DPO/KTO/GRPO (always chunked), it stops
with the two losses named.
"""

from __future__ import annotations

import logging
import math

from fttool.errors import UserError

log = logging.getLogger("fttool")

PROBE_TOKENS = 32


def install(model, own_loss: bool, by_trl: bool) -> None:
    """Before the Trainer is built: fttool's chunked loss on the base model when fttool's own trainer computes the
    loss (`own_loss`); the merged-weight view of a LoRA lm_head where TRL's fused head reads it (`by_trl`)."""
    from peft import PeftModel

    from fttool.worker import chunked_loss

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    if own_loss:
        chunked_loss.install(base)
    if by_trl:
        merged_head_weight(base.get_output_embeddings())


def merged_head_weight(head) -> None:
    from peft.tuners.lora import LoraLayer

    from fttool.worker.chunked_loss import head_weight

    if not isinstance(head, LoraLayer) or getattr(type(head), "_fttool_merged", False):
        return
    cls = type(head)
    head.__class__ = type(
        cls.__name__, (cls,), {"weight": property(lambda self: head_weight(self)[0]), "_fttool_merged": True}
    )


class HeadCheck:
    """Trainer mixin: at the first training step, the chunked loss against the model's own on a short row."""

    chunked_head = False  # set by build_trainer: this run's loss takes the chunked path
    head_fallback = False  # train.loss_impl=auto: on a mismatch, fall back to the full path (fttool's objectives)
    _head_checked = False

    def training_step(self, model, inputs, *args, **kwargs):
        if self.chunked_head and not self._head_checked:
            self._head_checked = True
            self._check_head(model)
        return super().training_step(model, inputs, *args, **kwargs)

    def chunked_probe_loss(self, model, batch):
        """The chunked path's loss on `batch` (TRL's fused head; fttool's own trainer overrides it)."""
        return model(**batch, fused_lm_head=True).loss

    def _check_head(self, model) -> None:
        import torch

        config = self.accelerator.unwrap_model(model).config.get_text_config()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, config.vocab_size, (1, PROBE_TOKENS), generator=g).to(self.accelerator.device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "use_cache": False}
        temperature = getattr(self, "temperature", None) or 1.0  # GRPO's log-probs are of logits / temperature
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.compute_loss_context_manager():
                logits = model(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
                full = float(
                    torch.nn.functional.cross_entropy(
                        logits[0, :-1].float() / temperature, ids[0, 1:].to(logits.device)
                    )
                )
                chunked = float(self.chunked_probe_loss(model, dict(batch)))
        finally:
            model.train(was_training)
        tol = 2e-2 if self.args.bf16 or self.args.fp16 else 1e-4
        if math.isfinite(full) and abs(full - chunked) <= tol * max(1.0, abs(full)):
            log.info(f"loss: chunked LM head checked against the model's own loss ({chunked:.6f} vs {full:.6f})")
            return
        what = (
            f"the chunked LM head's loss on a probe row is {chunked:.6f}, the model's own {full:.6f}: this model "
            "does something to its logits the chunked head does not know"
        )
        if not self.head_fallback:
            raise UserError(f"{what}; it cannot train on the chunked path (train.loss_impl=full where allowed).")
        log.warning(f"{what}; train.loss_impl=auto falls back to the full path for this run.")
        self.chunked_head = False
