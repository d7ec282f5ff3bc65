"""Render conversations with the chat template and mark exactly the tokens to train.

Masks come from character spans: the template is rendered for each prefix of the conversation, the span
each assistant reply adds (its text and the end-of-turn token that closes it) is trained, and a token is
trained when its first character falls inside such a span. Message text is passed to the template as data,
never as template source, so `{{...}}` in a dataset stays literal.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

from fttool.errors import UserError

IGNORE = -100
Span = Tuple[int, int]


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def reply_spans(tokenizer, messages: List[Dict[str, str]], loc: str) -> Tuple[str, List[Span]]:
    """The rendered conversation and the character spans of its assistant replies."""
    text = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1])
        if not text.startswith(upto) or not upto.startswith(before):
            raise UserError(f"{loc}: the chat template does not render this conversation prefix by prefix, so the "
                            "reply tokens cannot be located; use another template (model.chat_template).")
        end = len(upto)
        while end > len(before) and upto[end - 1].isspace():
            end -= 1  # the separator after the end-of-turn token is the template's, not the reply's
        spans.append((len(before), end))
    return text, spans


def encode_chat(tokenizer, messages, loc: str, train_on_inputs: bool) -> Dict[str, List[int]]:
    text, spans = reply_spans(tokenizer, messages, loc)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_inputs:
        labels = list(ids)
    else:
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    return {"input_ids": ids, "labels": labels}


def encode_text(tokenizer, text: str) -> Dict[str, List[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def prompt_ids(tokenizer, messages) -> List[int]:
    """Token ids of a conversation up to the point where the assistant answers (for generation)."""
    text = _render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
