"""The end-of-run comparison: greedy generations on held-out prompts, fine-tuned vs base model."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Dict, List

from fttool.data import prompt_ids

log = logging.getLogger("fttool")


def generate(model, tokenizer, conversations: List[List[Dict]], max_new_tokens: int, batch_size: int = 16) -> List[str]:
    import torch

    device = next(model.parameters()).device
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    gen_eos = gen_eos if isinstance(gen_eos, list) else [gen_eos]
    stop = sorted({t for t in [tokenizer.eos_token_id, *gen_eos] if isinstance(t, int) and t >= 0})  # end of turn
    outs: List[str] = []
    model.eval()
    for i in range(0, len(conversations), batch_size):
        prompts = [prompt_ids(tokenizer, c) for c in conversations[i: i + batch_size]]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=stop, pad_token_id=pad, use_cache=True)
        outs += [tokenizer.decode(g[width:], skip_special_tokens=True).strip() for g in gen]
    return outs


def exact_match(preds: List[str], refs: List[str]) -> float:
    return sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / max(len(refs), 1)


def compare(spec, model, tokenizer, test: List[Dict], base_model=None) -> Dict:
    """Score the fine-tuned model (and the base: adapters disabled, or `base_model` for full fine-tunes)."""
    rows = test[: spec.eval.samples]
    convs, refs = [r["messages"] for r in rows], [r["reference"] for r in rows]
    tuned = generate(model, tokenizer, convs, spec.eval.max_new_tokens)
    result = {"samples": len(rows), "metric": "exact_match", "finetuned": exact_match(tuned, refs), "examples": []}
    base = None
    if spec.eval.compare_base:
        if base_model is not None:
            ctx, m = nullcontext(), base_model
        else:
            ctx, m = model.disable_adapter(), model
        with ctx:
            base = generate(m, tokenizer, convs, spec.eval.max_new_tokens)
        result["base"] = exact_match(base, refs)
    for i in range(len(rows)):
        ex = {"prompt": convs[i][-1]["content"], "reference": refs[i], "finetuned": tuned[i]}
        if base is not None:
            ex["base"] = base[i]
        result["examples"].append(ex)
    return result


def report(result: Dict, show: int) -> List[str]:
    lines = []
    for ex in result["examples"][:show]:
        lines.append(f"  prompt     {ex['prompt']!r}")
        lines.append(f"  expected   {ex['reference']!r}")
        if "base" in ex:
            lines.append(f"  base       {ex['base'][:120]!r}")
        lines.append(f"  fine-tuned {ex['finetuned'][:120]!r}")
        lines.append("")
    n = result["samples"]
    tuned = f"fine-tuned {result['finetuned']:.0%} ({round(result['finetuned'] * n)}/{n})"
    if "base" in result:
        lines.append(f"held-out exact match: base {result['base']:.0%} ({round(result['base'] * n)}/{n})  ->  {tuned}")
    else:
        lines.append(f"held-out exact match: {tuned}")
    return lines
