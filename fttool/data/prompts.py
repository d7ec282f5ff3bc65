"""Prompts for generation (online objectives, evaluation): a normalised row's conversation before the reply it is
asked for, and that reply as the reference; rendered with the run's template and the generation prompt."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from fttool.data.token_text import LIT_OPEN, unmark
from fttool.data.tokenize import COUNTERS
from fttool.errors import UserError


def prompt_of(loc: str, ex: Dict) -> Tuple[List[Dict[str, Any]], Optional[str]]:
    """A normalised example as a prompt: the conversation before its last reply (a preference row: its prompt), and
    that reply (the chosen one) as the reference; a conversation that ends with the user's turn has no reference."""
    if ex["kind"] == "preference":
        return ex["messages"], ex["chosen"]
    if ex["kind"] == "unpaired":  # a desirable completion is a reference; an undesirable one is none
        return ex["messages"], ex["completion"] if ex["label"] else None
    if ex["kind"] != "chat":
        raise UserError(f"{loc}: a text row has no prompt to answer; prompt features need chat-like rows.")
    msgs = ex["messages"]
    if msgs[-1]["role"] != "assistant":
        return msgs, None
    return msgs[:-1], msgs[-1]["content"]


def encode_prompts(encoder, locs: Sequence[str], examples: Sequence[Dict], skip_bad: bool = False) -> Dict[str, list]:
    """Prompts for generation: each example's conversation before the reply it is asked for, rendered with the
    generation prompt (literal special-token text kept as plain characters), as ids and text; `reference` is the
    reply the row holds ("" when none). Nothing is trained. Errors as in encode_batch."""
    out: Dict[str, list] = {"input_ids": [], "prompt": [], "reference": [], "error": []}
    for loc, ex in zip(locs, examples):
        try:
            messages, reference = prompt_of(loc, ex)
            text = encoder.render_prompt(loc, {**ex, "messages": messages})
            if LIT_OPEN in text:
                ids = encoder.codec.encode_marked(loc, text, [])[0]
            else:
                ids = encoder.tok(text, add_special_tokens=False)["input_ids"]
            row = (ids, unmark(text), reference or "", "")
        except UserError as e:
            if not skip_bad:
                raise
            row = ([], "", "", str(e))
        for k, v in zip(("input_ids", "prompt", "reference", "error"), row):
            out[k].append(v)
    return {**out, **{k: [0] * len(out["error"]) for k in COUNTERS}}
