"""Data: read rows, normalise their format, tokenize with the chat template, mask, filter by length."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fttool.data.formats import to_messages, to_text
from fttool.data.sources import read_rows
from fttool.data.tokenize import IGNORE, encode_chat, encode_text, prompt_ids
from fttool.errors import UserError


@dataclass
class DataStats:
    rows: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_trained_tokens: int = 0

    def summary(self) -> str:
        frac = self.trained_tokens / self.tokens if self.tokens else 0.0
        return (f"{self.samples:,} samples from {self.rows:,} rows, {self.tokens:,} tokens "
                f"({100 * frac:.1f}% trained); truncated {self.truncated}, dropped {self.dropped_too_long} over max_length, "
                f"{self.dropped_no_trained_tokens} with no trained tokens")


@dataclass
class Prepared:
    train: Dict[str, List[List[int]]]
    stats: DataStats
    test: List[Dict] = field(default_factory=list)  # {"messages": prompt messages, "reference": str}


def check_template(tokenizer, spec) -> None:
    if spec.model.chat_template:
        tokenizer.chat_template = spec.model.chat_template
    if spec.data.format != "completion" and not tokenizer.chat_template:
        raise UserError(f"the tokenizer of {spec.model.name_or_path} has no chat template, which data.format={spec.data.format} "
                        "needs; set model.chat_template='<jinja template>' or use data.format=completion.")


def build(spec, tokenizer) -> Prepared:
    d = spec.data
    check_template(tokenizer, spec)
    rows = read_rows(d.path, d.split)
    if d.max_samples:
        rows = rows[: d.max_samples]
    if not rows:
        raise UserError(f"data.path={d.path}: no rows to train on.")
    stats = DataStats(rows=len(rows))
    cols: Dict[str, List[List[int]]] = {"input_ids": [], "labels": [], "attention_mask": []}
    for loc, rec in rows:
        if d.format == "completion":
            enc = encode_text(tokenizer, to_text(loc, rec, d.text_field))
        else:
            enc = encode_chat(tokenizer, to_messages(loc, rec, d.format, d.messages_field, d.system_prompt), loc, d.train_on_inputs)
        ids, labels = enc["input_ids"], enc["labels"]
        if len(ids) > d.max_length:
            if d.truncation == "drop":
                stats.dropped_too_long += 1
                continue
            ids, labels = ids[: d.max_length], labels[: d.max_length]
            stats.truncated += 1
        trained = sum(1 for x in labels if x != IGNORE)
        if trained == 0:
            stats.dropped_no_trained_tokens += 1
            continue
        cols["input_ids"].append(ids)
        cols["labels"].append(labels)
        cols["attention_mask"].append([1] * len(ids))
        stats.samples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += trained
    if not stats.samples:
        raise UserError(f"data.path={d.path}: every sample was dropped ({stats.summary()}); raise data.max_length or fix the data.")
    return Prepared(train=cols, stats=stats, test=load_test(spec) if d.test_path else [])


def load_test(spec) -> List[Dict]:
    d = spec.data
    out = []
    for loc, rec in read_rows(d.test_path, "test", key="data.test_path"):
        msgs = to_messages(loc, rec, d.format, d.messages_field, d.system_prompt)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        out.append({"messages": msgs[:last], "reference": msgs[last]["content"], "loc": loc})
    return out


__all__ = ["build", "load_test", "prompt_ids", "DataStats", "Prepared", "IGNORE"]
