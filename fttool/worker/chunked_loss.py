"""The chunked LM-head loss of fttool's own objectives (SFT, ORPO): the output layer and log-softmax over the trained
positions only, a chunk of tokens at a time, recomputed in backward; the [tokens, vocab] logits never exist.

Pure PyTorch, so CPU and CUDA run the same code. TRL's fused head (which DPO, KTO and GRPO use) folds each tile with
8 to 10 tile-sized temporaries where it has no Triton; on the CPU that measured more memory than the full logits
(SmolLM2-135M, LoRA, batch 8: 12.1 vs 10.5 GiB) and fewer tokens/s (95 vs 110). Here a chunk's logits are the one
tile-sized buffer, worked in place: the log-sum-exp in forward; in backward the softmax, minus one at the target,
times the incoming gradient, then two matrix products for the hidden states' and the weight's gradients.

The model's forward is wrapped (as TRL wraps it): with `chunked_labels`, it runs the backbone, then this loss inside
the forward, so DDP, FSDP2 and DeepSpeed see the LM head's parameters used where they expect; under ZeRO-3 the head's
weight is gathered (TRL's helper) for the forward and again for the backward. Logit soft-capping (Gemma 2/3) and a
config `logit_scale` (Cohere) are applied exactly; anything else a model does to its logits is caught by the check
at the first step (worker/lm_head.py).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Optional

import torch
from transformers.utils import ModelOutput

from fttool.config.losspath import chunk_tokens


def device_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gather(weight, bias):
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    return maybe_gather_lm_head_ctx(weight, bias)


def _logits(h, weight, bias, softcap, scale):
    """fp32 logits of a chunk, transformed as the model transforms them (scaled, then soft-capped), in place."""
    z = h.float() @ weight.float().t()
    if bias is not None:
        z += bias.float()
    if scale != 1.0:
        z *= scale
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


class ChunkedLogProbs(torch.autograd.Function):
    """log p(target) of each row of `hidden` [N, H] under `hidden @ weight.T (+ bias)`, chunk by chunk: one fp32
    [chunk, vocab] buffer alive at a time, in forward and in backward (two with soft-capping in backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, softcap: Optional[float], scale: float):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        with _gather(weight, bias):
            for s in range(0, hidden.shape[0], chunk):
                z = _logits(hidden[s : s + chunk], weight, bias, softcap, scale)
                target = z.gather(1, targets[s : s + chunk, None])[:, 0]
                top = z.amax(dim=-1)
                lse[s : s + chunk] = z.sub_(top[:, None]).exp_().sum(dim=-1).log_() + top  # logsumexp, in place
                out[s : s + chunk] = target - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.softcap, ctx.scale = chunk, softcap, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        with _gather(weight, bias):
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            gb = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            w = weight.float()
            for s in range(0, hidden.shape[0], ctx.chunk):
                h = hidden[s : s + ctx.chunk]
                z = _logits(h, weight, bias, ctx.softcap, ctx.scale)
                # through softcap * tanh(y / softcap): dz/dy = 1 - (z / softcap)^2
                capped = (z / ctx.softcap).square_().neg_().add_(1) if ctx.softcap is not None else None
                g = z.sub_(lse[s : s + ctx.chunk, None]).exp_()  # softmax, in place
                g.scatter_add_(1, targets[s : s + ctx.chunk, None], torch.full_like(g[:, :1], -1.0))
                g.mul_(-grad_out[s : s + ctx.chunk, None].float())  # d log p(target) / dz = onehot - softmax
                if capped is not None:
                    g.mul_(capped)
                if ctx.scale != 1.0:
                    g.mul_(ctx.scale)
                if gh is not None:
                    gh[s : s + ctx.chunk] = g @ w
                if gw is not None:
                    gw.addmm_(g.t(), h.float())
                if gb is not None:
                    gb += g.sum(0)
        return (
            gh.to(hidden.dtype) if gh is not None else None,
            gw.to(weight.dtype) if gw is not None else None,
            gb.to(bias.dtype) if gb is not None else None,
            None,
            None,
            None,
            None,
        )


@dataclass
class ChunkedOutput(ModelOutput):
    """What the wrapped forward returns with `chunked_labels`: the log-prob of every next-token label, zero where
    the label is -100 ([batch, seq - 1]), and where labels are."""

    log_probs: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None


def token_loss(out: ChunkedOutput, count=None) -> torch.Tensor:
    """The causal LM loss: minus the summed log-probs over `count` (transformers' num_items_in_batch: the trained
    tokens of the whole accumulated batch) or, without it, over this micro-batch's trained tokens."""
    total = -out.log_probs.sum()
    if count is None:
        return total / out.label_mask.sum()
    return total / (count.to(total.device) if torch.is_tensor(count) else count)


def head_weight(head):
    """The LM head's (weight, bias) as the model's forward applies them: a peft LoRA layer's merged weight (base +
    the active adapters' B A x scaling, built from their tensors so gradients reach them); FSDP2's DTensors gathered."""
    from peft.tuners.lora import LoraLayer

    if isinstance(head, LoraLayer):
        base = head.get_base_layer()
        weight, bias = base.weight, base.bias
        if not (head.disable_adapters or head.merged):
            for name in head.active_adapters:
                if name in head.lora_A:
                    weight = weight + head.get_delta_weight(name)
    else:
        weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None and hasattr(bias, "full_tensor") else bias
    return weight, bias


def install(model) -> None:
    """Wrap the (unwrapped, non-peft) causal LM's forward: `model(..., chunked_labels=LABELS)` returns a ChunkedOutput
    instead of logits; without it, the forward is the model's own (generation unchanged)."""
    if getattr(model, "_fttool_chunked", False):
        return
    original = model.forward
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = float(getattr(config, "logit_scale", None) or 1.0)

    @functools.wraps(type(model).forward)
    def forward(self, *args, chunked_labels=None, **kwargs):
        if chunked_labels is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("num_items_in_batch", None)
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        labels = chunked_labels[:, 1:].to(hidden.device)
        mask = labels != -100
        weight, bias = head_weight(self.get_output_embeddings())
        chunk = chunk_tokens(weight.shape[0], device_bytes(hidden.device))
        picked = ChunkedLogProbs.apply(hidden[mask], weight, bias, labels[mask], chunk, softcap, scale)
        # masked_scatter keeps a micro-batch without trained tokens connected to the graph (a zero, not an error)
        log_probs = picked.new_zeros(mask.shape).masked_scatter(mask, picked)
        return ChunkedOutput(log_probs=log_probs, label_mask=mask)

    model.forward = types.MethodType(forward, model)
    model._fttool_chunked = True
