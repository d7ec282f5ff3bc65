"""Activation checkpointing for train.gradient_checkpointing: true (each decoder layer's forward recomputed in
backward, only its input kept) or selective (torch's selective activation checkpointing: the outputs of the
matmuls and of attention are kept, the elementwise ops between them - norms, rotary embeddings, activations,
dropout, residual adds - and the adapters' low-rank products are recomputed).

Selective keeps about half of what a layer stores for backward and costs a few percent of a step, where full
checkpointing keeps ~5% and costs ~20-30%. The gradients are the same as without checkpointing: the
recomputation restores the RNG state, so LoRA dropout draws the same masks (tests/test_checkpointing.py)."""

from __future__ import annotations

import functools
from typing import Any, Dict

from fttool.config.spec import KEEP_INNER_DIM, SELECTIVE


@functools.lru_cache(maxsize=1)
def _ops():
    import torch

    aten = torch.ops.aten
    attention = {
        getattr(aten, name).default
        for name in (
            "_scaled_dot_product_flash_attention_for_cpu",
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
        )
        if hasattr(aten, name)
    }
    # op -> the position of its left operand (whose last dimension is the inner one)
    matmuls = {aten.mm.default: 0, aten.bmm.default: 0, aten.addmm.default: 1, aten.baddbmm.default: 1}
    return attention, matmuls


def keep(ctx, op, *args, **kwargs):
    """The policy: keep attention's and the wide matmuls' outputs, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    attention, matmuls = _ops()
    if op in attention:
        return CheckpointPolicy.MUST_SAVE
    pos = matmuls.get(op)
    if pos is not None and args[pos].shape[-1] >= KEEP_INNER_DIM:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_context():
    """The context_fn of torch.utils.checkpoint.checkpoint for selective checkpointing (a module-level function:
    the Trainer pickles its arguments with each checkpoint)."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(keep)


def trainer_kwargs(mode: Any) -> Dict[str, Any]:
    """TrainingArguments for train.gradient_checkpointing: false, true or selective. Non-reentrant checkpointing
    (transformers' default, and the one selective checkpointing needs)."""
    if not mode:
        return {"gradient_checkpointing": False}
    kwargs: Dict[str, Any] = {"use_reentrant": False}
    if mode == SELECTIVE:
        kwargs["context_fn"] = selective_context
    return {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": kwargs}
