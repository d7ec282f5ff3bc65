"""Row formats -> one normal form per kind of example.

- chat-like rows (chat, sharegpt, alpaca):  {"kind": "chat", "messages": [{role, content}], "tools": list | None}
- text rows (completion, segments):         {"kind": "segments", "segments": [[text, trained], ...]}
- preference rows:                           {"kind": "preference", "messages": prompt, "chosen": str, "rejected": str, "tools": ...}
- prompt rows ({"prompt", "answer"}):        chat: the prompt as the user's turn, the answer (when given) as the reply
- unpaired rows:                             {"kind": "unpaired", "messages": prompt, "completion": str, "label": bool, ...}

Features that train nothing (prompts for online objectives: needs_reply=False) also take conversations that end
with the user's turn, alpaca rows without an output and prompt rows without an answer.

Roles are normalised to system / user / assistant / tool. Every error names the row (file:line or record #i),
what was expected and the key that fixes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from fttool.errors import UserError, suggestion

ROLES = ("system", "user", "assistant", "tool")
# role names seen in public datasets -> the four roles templates know
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
    "ipython": "tool",
}

CHAT_FIELDS = {"role": "role", "content": "content", "tools": "tools", "documents": "documents", "system": "system"}


@dataclass(frozen=True)
class RowFormat:
    """One row format: its fields (each with the column it is read from by default; data.columns renames them), the
    Formatter method that reads a row, the fields whose presence says a row is in this format, and whether its rows
    are rendered with the chat template. A new format is one row here and one conf/data/*.yaml."""

    fields: Dict[str, str]
    reader: str  # Formatter method: row -> normal form (see the module docstring)
    detect: Tuple[str, ...]  # default field names that mark a row as this format (`guess_format`)
    templated: bool = True


ROW_FORMATS: Dict[str, RowFormat] = {
    "chat": RowFormat({"messages": "messages", **CHAT_FIELDS}, "_conversation", ("messages",)),
    "sharegpt": RowFormat(
        {"conversations": "conversations", **CHAT_FIELDS, "role": "from", "content": "value"},
        "_conversation",
        ("conversations",),
    ),
    "alpaca": RowFormat(
        {"instruction": "instruction", "input": "input", "output": "output", "system": "system", "history": "history"},
        "_alpaca_row",
        ("instruction",),
    ),
    "completion": RowFormat({"text": "text"}, "_completion", ("text",), templated=False),
    "segments": RowFormat({"segments": "segments"}, "_segments_row", ("segments",), templated=False),
    "preference": RowFormat(
        {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", **CHAT_FIELDS},
        "_preference",
        ("chosen", "rejected"),
    ),
    "prompt": RowFormat({"prompt": "prompt", "answer": "answer", "system": "system"}, "_prompt_row", ("prompt",)),
    "unpaired": RowFormat(
        {"prompt": "prompt", "completion": "completion", "label": "label", **CHAT_FIELDS},
        "_unpaired",
        ("completion", "label"),
    ),
}
FORMATS = tuple(ROW_FORMATS)
FIELDS: Dict[str, Dict[str, str]] = {name: f.fields for name, f in ROW_FORMATS.items()}
TEMPLATED = tuple(name for name, f in ROW_FORMATS.items() if f.templated)  # formats that need a chat template
# message fields passed on to the template as they are (templates render tool calls and reasoning from them)
EXTRA_FIELDS = ("tool_calls", "tool_call_id", "name", "reasoning_content", "thinking")
OPTIONAL = {"tools", "documents", "system", "input", "history", "role", "content"}
REPLIES = {"output", "answer"}  # optional where no reply is needed (prompt features)
Example = Dict[str, Any]
QUOTED = "'{}'"


def check_columns(fmt: str, columns: Mapping[str, str], key: str = "data.columns") -> None:
    """Config-time check: every mapped field exists in the format."""
    for name in columns:
        if name not in FIELDS[fmt]:
            raise UserError(
                f"{key}.{name}: data.format={fmt} has no field '{name}'.{suggestion(name, FIELDS[fmt], QUOTED)} "
                f"Its fields: {', '.join(FIELDS[fmt])}."
            )


def guess_format(rec: Dict[str, Any]) -> Optional[str]:
    """The format whose required fields a row has under their default names, if any."""
    for name, f in sorted(ROW_FORMATS.items(), key=lambda item: -len(item[1].detect)):  # most specific first
        if all(field in rec for field in f.detect):
            return name
    return None


class Formatter:
    """Turns the rows of one source into examples."""

    def __init__(
        self,
        fmt: str,
        columns: Mapping[str, str],
        roles: Mapping[str, str],
        system_prompt: Optional[str],
        needs_reply: bool = True,
    ):
        check_columns(fmt, columns)
        self.needs_reply = needs_reply  # False: prompts for generation (a conversation may end with the user)
        self.fmt = fmt
        self.col = {**FIELDS[fmt], **dict(columns)}
        self.roles = {**ROLE_ALIASES, **dict(roles)}
        self.system_prompt = system_prompt

    def __call__(self, loc: str, rec: Dict[str, Any]) -> Example:
        return getattr(self, ROW_FORMATS[self.fmt].reader)(loc, rec)

    # -- readers (RowFormat.reader): a row -> its normal form ---------------------------------------------
    def _conversation(self, loc: str, rec: Dict[str, Any]) -> Example:
        field = ROW_FORMATS[self.fmt].detect[0]  # messages / conversations
        return self._chat(loc, rec, self._messages(loc, self._get(loc, rec, field), field))

    def _alpaca_row(self, loc: str, rec: Dict[str, Any]) -> Example:
        return self._chat(loc, rec, self._alpaca(loc, rec))

    def _completion(self, loc: str, rec: Dict[str, Any]) -> Example:
        text = self._get(loc, rec, "text")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{loc}: '{self.col['text']}' must be a non-empty string.")
        return {"kind": "segments", "segments": [[text, True]]}

    def _prompt_row(self, loc: str, rec: Dict[str, Any]) -> Example:
        prompt, answer = self._get(loc, rec, "prompt"), self._get(loc, rec, "answer")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{loc}: '{self.col['prompt']}' must be a non-empty string.")
        if answer is not None and not isinstance(answer, (str, int, float)):
            raise UserError(f"{loc}: '{self.col['answer']}' must be a string or a number, got {type(answer).__name__}.")
        reply = [{"role": "assistant", "content": str(answer)}] if answer is not None else []
        return self._chat(loc, rec, [{"role": "user", "content": prompt}, *reply])

    def _segments_row(self, loc: str, rec: Dict[str, Any]) -> Example:
        return {"kind": "segments", "segments": self._segments(loc, self._get(loc, rec, "segments"))}

    # -- fields -----------------------------------------------------------------------------------------
    def _get(self, loc: str, rec: Dict[str, Any], name: str) -> Any:
        column = self.col[name]
        optional = name in OPTIONAL or (name in REPLIES and not self.needs_reply)
        if column not in rec or (optional and rec[column] is None):
            if optional:
                return None
            guess = guess_format(rec)
            hint = f" These rows look like data.format={guess}." if guess and guess != self.fmt else ""
            raise UserError(
                f"{loc}: row has no '{column}' field (data.format={self.fmt}).{suggestion(column, rec.keys(), QUOTED)} "
                f"Its fields: {', '.join(rec.keys()) or 'none'}.{hint} Map yours with data.columns.{name}=COLUMN, "
                "or pick the right data.format."
            )
        return rec[column]

    def _role(self, loc: str, j: int, raw: Any) -> str:
        role = self.roles.get(str(raw).strip())
        if role not in ROLES:
            names = sorted(self.roles)
            raise UserError(
                f"{loc}: message #{j} has role '{raw}', which fttool does not know.{suggestion(str(raw), names, QUOTED)} "
                f"Known roles: {', '.join(names)}. Map it with data.roles={{{raw}: assistant}} (or user, system, tool)."
            )
        return role

    def _messages(self, loc: str, msgs: Any, field: str) -> List[Dict[str, str]]:
        rk, ck = self.col["role"], self.col["content"]
        name = self.col[field]
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{loc}: '{name}' must be a non-empty list of {{{rk}, {ck}}} objects.")
        return [self._message(loc, j, m) for j, m in enumerate(msgs)]

    def _message(self, loc: str, j: int, m: Any) -> Dict[str, str]:
        rk, ck = self.col["role"], self.col["content"]
        if not isinstance(m, dict) or rk not in m:
            raise UserError(
                f"{loc}: message #{j} must be an object with '{rk}' and '{ck}' (map other names with "
                f"data.columns.role=... and data.columns.content=...)."
            )
        content = m.get(ck)
        extras = {k: m[k] for k in EXTRA_FIELDS if m.get(k) not in (None, "", [])}
        if content is None and extras:  # OpenAI style: a tool call has no text content
            content = ""
        if not isinstance(content, str):
            raise UserError(f"{loc}: message #{j} needs '{ck}' as a string, got {type(content).__name__}.")
        if "tool_calls" in extras and not isinstance(extras["tool_calls"], list):
            raise UserError(f"{loc}: message #{j} has 'tool_calls' that is not a list of calls.")
        return {"role": self._role(loc, j, m[rk]), "content": content, **extras}

    def _listed(self, loc: str, rec: Dict[str, Any], name: str, what: str) -> Optional[list]:
        """A row's tools or documents as the list it holds (an empty list stays empty: templates loop over it);
        None when the row has none. A JSON string (glaive-style rows) is read as JSON."""
        if name not in self.col:
            return None
        value = self._get(loc, rec, name)
        if isinstance(value, str):
            if not value.strip():
                return []
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{loc}: '{self.col[name]}' is a string but not valid JSON ({e.msg}); give a list of {what}."
                )
        if value is None:
            return None
        if isinstance(value, dict):
            return [value] if value else []
        if not isinstance(value, list):
            raise UserError(f"{loc}: '{self.col[name]}' must be a list of {what}, got {type(value).__name__}.")
        return value

    def _tools(self, loc: str, rec: Dict[str, Any]) -> Optional[list]:
        return self._listed(loc, rec, "tools", "tool schemas")

    def _alpaca(self, loc: str, rec: Dict[str, Any]) -> List[Dict[str, str]]:
        instruction, output = self._get(loc, rec, "instruction"), self._get(loc, rec, "output")
        extra = self._get(loc, rec, "input") or ""
        for name, val in (
            ("instruction", instruction),
            ("output", output if output is not None else ""),
            ("input", extra),
        ):
            if not isinstance(val, str):
                raise UserError(f"{loc}: '{self.col[name]}' must be a string, got {type(val).__name__}.")
        msgs = []
        for k, pair in enumerate(self._get(loc, rec, "history") or []):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise UserError(f"{loc}: history entry #{k} must be a [user, assistant] pair of strings.")
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        reply = [{"role": "assistant", "content": output}] if output is not None else []
        return msgs + [{"role": "user", "content": user}, *reply]

    def _system(self, loc: str, rec: Dict[str, Any], msgs: List[Dict[str, str]]) -> List[Dict[str, str]]:
        system = self._get(loc, rec, "system") or self.system_prompt
        if system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": str(system)}] + msgs
        return msgs

    def _chat(self, loc: str, rec: Dict[str, Any], msgs: List[Dict[str, str]]) -> Example:
        msgs = self._system(loc, rec, msgs)
        if self.needs_reply and not any(m["role"] == "assistant" for m in msgs):
            raise UserError(f"{loc}: the conversation has no assistant reply, so nothing would be trained.")
        for j, m in enumerate(msgs):
            if m["role"] == "assistant" and not m["content"].strip() and not any(k in m for k in EXTRA_FIELDS):
                raise UserError(
                    f"{loc}: message #{j} is an empty assistant reply; fill it in or remove the row "
                    "(data.skip_bad_rows=true skips such rows and counts them)."
                )
        return {
            "kind": "chat",
            "messages": msgs,
            "tools": self._tools(loc, rec),
            "documents": self._listed(loc, rec, "documents", "documents"),
        }

    def _segments(self, loc: str, segs: Any) -> List[list]:
        if not isinstance(segs, list) or not segs:
            raise UserError(f"{loc}: '{self.col['segments']}' must be a non-empty list of {{text, train}} objects.")
        out = []
        for j, s in enumerate(segs):
            flag = s.get("train", s.get("label")) if isinstance(s, dict) else None
            if not isinstance(s, dict) or not isinstance(s.get("text"), str) or not isinstance(flag, bool):
                raise UserError(
                    f'{loc}: segment #{j} must be {{"text": string, "train": true|false}} '
                    "('label' is accepted for 'train')."
                )
            out.append([s["text"], flag])
        if not any(flag and text.strip() for text, flag in out):
            raise UserError(f'{loc}: no segment is marked "train": true with text, so nothing would be trained.')
        return out

    def _unpaired(self, loc: str, rec: Dict[str, Any]) -> Example:
        label = self._get(loc, rec, "label")
        if not isinstance(label, bool):
            raise UserError(
                f"{loc}: '{self.col['label']}' must be true (a desirable reply) or false (an undesirable one), "
                f"got {label!r}."
            )
        out = self._prompt_of(loc, rec)
        out.update(kind="unpaired", completion=self._reply(loc, "completion", self._get(loc, rec, "completion")))
        out["label"] = label
        return out

    def _prompt_of(self, loc: str, rec: Dict[str, Any]) -> Example:
        """The prompt of a preference or unpaired row: text (the user's turn) or messages ending before the reply."""
        prompt = self._get(loc, rec, "prompt")
        msgs = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else self._messages(loc, prompt, "prompt")
        )
        if msgs[-1]["role"] == "assistant":
            raise UserError(f"{loc}: the prompt ends with an assistant message; it must end where the replies begin.")
        return {
            "messages": self._system(loc, rec, msgs),
            "tools": self._tools(loc, rec),
            "documents": self._listed(loc, rec, "documents", "documents"),
        }

    def _preference(self, loc: str, rec: Dict[str, Any]) -> Example:
        out = {"kind": "preference", **self._prompt_of(loc, rec)}
        for name in ("chosen", "rejected"):
            out[name] = self._reply(loc, name, self._get(loc, rec, name))
        if out["chosen"] == out["rejected"]:
            raise UserError(
                f"{loc}: chosen and rejected are the same reply; a preference pair needs two different ones."
            )
        return out

    def _reply(self, loc: str, name: str, val: Any) -> str:
        if isinstance(val, list) and val:
            val = val[-1]  # a conversation whose last message is the reply
        if isinstance(val, dict):
            val = self._message(loc, 0, val)
            if val["role"] != "assistant":
                raise UserError(f"{loc}: '{self.col[name]}' must be an assistant reply, got role '{val['role']}'.")
            val = val["content"]
        if not isinstance(val, str) or not val.strip():
            raise UserError(
                f"{loc}: '{self.col[name]}' must be a non-empty reply (a string or a {{role, content}} message)."
            )
        return val
