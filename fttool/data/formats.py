"""Row formats -> one normal form: a list of chat messages, or raw text for completion training."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from fttool.errors import UserError, suggestion

ROLES = ("system", "user", "assistant", "tool")
Messages = List[Dict[str, str]]


def _field(loc: str, rec: Dict[str, Any], name: str, fmt: str, fix: str) -> Any:
    if name not in rec:
        raise UserError(f"{loc}: row has no '{name}' field (data.format={fmt}).{suggestion(name, rec.keys(), repr)} "
                        f"Its fields: {', '.join(rec.keys())}. {fix}")
    return rec[name]


def to_messages(loc: str, rec: Dict[str, Any], fmt: str, messages_field: str, system_prompt: Optional[str]) -> Messages:
    if fmt == "chat":
        msgs = _field(loc, rec, messages_field, fmt, "Set data.messages_field=NAME, or pick the right data.format.")
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{loc}: '{messages_field}' must be a non-empty list of {{role, content}} objects.")
        out = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UserError(f"{loc}: message #{j} must be an object with 'role' and 'content'.")
            if m["role"] not in ROLES:
                raise UserError(f"{loc}: message #{j} has role '{m['role']}'; expected one of {', '.join(ROLES)}.{suggestion(m['role'], ROLES, repr)}")
            if not isinstance(m["content"], str):
                raise UserError(f"{loc}: message #{j} content must be a string.")
            out.append({"role": m["role"], "content": m["content"]})
    elif fmt == "alpaca":
        fix = "Alpaca rows need instruction, input (may be empty) and output."
        instruction = _field(loc, rec, "instruction", fmt, fix)
        output = _field(loc, rec, "output", fmt, fix)
        extra = rec.get("input") or ""
        out = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra else str(instruction)},
               {"role": "assistant", "content": str(output)}]
    else:
        raise UserError(f"data.format={fmt} has no chat form.")
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    replies = [m for m in out if m["role"] == "assistant"]
    if not replies:
        raise UserError(f"{loc}: the conversation has no assistant reply, so nothing would be trained.")
    for j, m in enumerate(out):
        if m["role"] == "assistant" and not m["content"].strip():
            raise UserError(f"{loc}: an assistant reply is empty; remove the row or fill in the reply.")
    return out


def to_text(loc: str, rec: Dict[str, Any], text_field: str) -> str:
    text = _field(loc, rec, text_field, "completion", "Set data.text_field=NAME.")
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{loc}: '{text_field}' must be a non-empty string.")
    return text
