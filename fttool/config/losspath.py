"""Which LM-head and loss path a run takes (train.loss_impl), decided from the config alone.

chunked: the output layer and the log-softmax only at the positions that are trained, a chunk at a time,
recomputed in backward, so the [tokens, vocab] logits never exist (fttool's own for SFT and ORPO:
worker/chunked_loss.py; TRL's fused LM head, which TRL's DPO, KTO and GRPO trainers always take); logit
soft-capping and logit scales are applied exactly. full: the model's own forward, logits for every position, and its
own loss. auto: chunked wherever it is exact. A LoRA on lm_head is read through its merged weight (base + B A x
scaling, differentiable), which is exact only without LoRA dropout; DoRA's per-feature magnitude is not a merged
weight.
"""

from __future__ import annotations

from typing import Optional, Tuple

from fttool.config import methods
from fttool.errors import UserError, suggestion

LOSS_IMPLS = ("auto", "chunked", "full")
BUDGET_SHARE = 1 / 256  # of the device's memory: what one chunk's fp32 logits may take
BUDGET_MIN, BUDGET_MAX = 16 * 2**20, 128 * 2**20
FUSED_BY_TRL = ("dpo", "kto", "grpo")  # their TRL trainers compute every log-prob through the fused head


def chunk_tokens(vocab: int, device_bytes: float) -> int:
    """Tokens per chunk: its fp32 [chunk, vocab] logits within 1/256 of the device's memory (16-128 MiB)."""
    budget = min(max(device_bytes * BUDGET_SHARE, BUDGET_MIN), BUDGET_MAX)
    return max(16, int(budget // (vocab * 4)))


def head_problem(cfg) -> Optional[str]:
    """Why the chunked head would not be exact for this method's adapters, or None."""
    m = cfg.method
    if "lm_head" not in list(getattr(m, "target_modules", None) or []):
        return None
    if methods.of(cfg).dora:
        return "a DoRA adapter on lm_head rescales each output feature by a learned magnitude, which the chunked head cannot read"
    if m.dropout:
        return (
            f"LoRA dropout ({m.dropout:g}) on lm_head drops the adapter's inputs only, which the chunked head (it reads "
            "the merged weight) cannot reproduce"
        )
    return None


def check(cfg) -> None:
    impl, name = cfg.train.loss_impl, cfg.objective.name
    if impl not in LOSS_IMPLS:
        raise UserError(
            f"train.loss_impl={impl} is not allowed; expected one of: {', '.join(LOSS_IMPLS)}."
            f"{suggestion(str(impl), LOSS_IMPLS, 'train.loss_impl={}')}"
        )
    if impl == "full" and name in FUSED_BY_TRL:
        raise UserError(
            f"train.loss_impl=full: objective={name} runs on TRL's trainer, which always computes log-probs through "
            "its chunked LM head; use train.loss_impl=auto."
        )
    problem = head_problem(cfg)
    if problem and (impl == "chunked" or name in FUSED_BY_TRL):
        why = "train.loss_impl=chunked" if impl == "chunked" else f"objective={name} (always chunked)"
        fix = "method.dropout=0 or train.loss_impl=full" if impl == "chunked" else "method.dropout=0"
        if methods.of(cfg).dora:
            fix = "method=lora, or lm_head out of method.target_modules" + (
                ", or train.loss_impl=full" if impl == "chunked" else ""
            )
        raise UserError(f"{why} with {problem}; use {fix}.")


def decide(cfg) -> Tuple[str, str]:
    """(chunked or full, why) for a checked config."""
    impl, name = cfg.train.loss_impl, cfg.objective.name
    if name in FUSED_BY_TRL:
        return "chunked", f"TRL's fused LM head (objective={name} always takes it)"
    if impl == "full":
        return "full", "train.loss_impl=full"
    problem = head_problem(cfg)
    if problem:
        return "full", f"train.loss_impl=auto: {problem}"
    return "chunked", f"train.loss_impl={impl}"


def describe(cfg) -> str:
    impl, why = decide(cfg)
    if impl == "chunked":
        return f"chunked: the LM head and loss over trained positions only, in tiles ({why})"
    return f"full: the model's logits for every position ({why})"
