"""The held-out rows an evaluation scores, and prompts rendered as training rendered them: what after/ reads of the
data, without tokenizing the training set."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from fttool.data.pipeline import Rows, read_source, rows_of, sources_of
from fttool.data.prompts import prompt_of
from fttool.data.stats import DataStats
from fttool.errors import UserError


def prompt_ids(tokenizer, messages, template_kwargs: Optional[Dict] = None) -> List[int]:
    """Token ids of a conversation up to where the assistant answers, with the tokenizer's current template and the
    run's data.template_kwargs (so inference renders prompts as training did)."""
    kwargs = dict(template_kwargs or {})
    text = tokenizer.apply_chat_template(
        messages,
        tools=kwargs.pop("tools", None),
        documents=kwargs.pop("documents", None),
        tokenize=False,
        add_generation_prompt=True,
        **kwargs,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_rows(spec, needs_reply: bool = True) -> Tuple[Rows, str]:
    """The held-out test rows, read afresh (no tokenizing): data.test_path, or the seeded data.test_ratio split of
    the sources exactly as training made it (`needs_reply`: as the run's features read them). Also says where they
    come from."""
    d = spec.data
    if d.test_path:
        rows = read_source(d.test_path, sources_of(d)[0], d, DataStats(), "data.test_path", needs_reply)
        return rows, f"data.test_path={d.test_path}"
    if not d.test_ratio:
        return [], "no test split (data.test_ratio=0 and no data.test_path)"
    return rows_of(spec, sources_of(d), needs_reply)[2], f"data.test_ratio={d.test_ratio} of the training sources"


def eval_example(loc: str, ex: Dict) -> Optional[Dict]:
    """A test row as a generation task: the conversation before the last reply, and that reply as the reference (a
    preference row: its prompt and the chosen reply). Rows with no reply to compare with (text rows) are None."""
    try:
        messages, reference = prompt_of(loc, ex)
    except UserError:
        return None
    if reference is None:  # a conversation that ends with the user's turn: its last reply is the reference
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            return None
        messages, reference = messages[:last], messages[last]["content"]
    return {"messages": messages, "reference": reference, "loc": loc, "example": ex}
