"""Render examples with the chat template and mark exactly the tokens to train.

Masks come from character spans of the rendered text. For a trained turn i:

- it starts where the template's rendering of the conversation before it (with the generation prompt for an
  assistant turn) stops agreeing with the full text, moved forward to where the message's own text begins,
  so role headers are never trained;
- it ends where the rendering up to turn i stops agreeing with the full text, and where the rendering up to
  turn i followed by a probe turn does; the earlier of the two drops whatever a template writes only at the
  very end of a conversation, and trailing whitespace is left out;
- when it does not end with a special token, the tokenizer's EOS is inserted there, so the model learns to
  stop even under templates that close replies with plain text.

A token is trained when its characters overlap a span. Message text is passed to the template as data, never
as template source, so `{{...}}` in a dataset stays literal; message text that contains one of the
tokenizer's control tokens is refused, since it would be read as the template's own token.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from fttool.errors import UserError

IGNORE = -100
_PARTIAL_MARKER = re.compile(r"[<\[][^<>\[\]\s]*$")  # an opened <...> or [...] marker at the end of a string
Span = Tuple[int, int]
PROBE = "\u2063probe\u2063"
TOOLS_INTRO = "You can call these tools (JSON schemas):\n"


def _common(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on the first differing character
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _head(content: str) -> str:
    """The start of a message as any template renders it (templates may trim or rewrite line breaks)."""
    return content.strip().split("\n", 1)[0].strip()[:32]


class Encoder:
    """Turns normalised examples (see formats.py) into input_ids and labels for one tokenizer and template."""

    def __init__(self, tokenizer, template: Optional[str], data_spec):
        self.tok = tokenizer
        self.template = template or tokenizer.chat_template
        self.d = data_spec
        self.template_has_tools = bool(self.template) and "tools" in self.template
        self.special = sorted({t for t in tokenizer.all_special_tokens if t} |
                              {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
        added = sorted({t.content for t in tokenizer.added_tokens_decoder.values()}, key=len, reverse=True)
        self.control_re = re.compile("|".join(map(re.escape, added))) if added else None

    # -- rendering --------------------------------------------------------------------------------------
    def render(self, messages, tools=None, add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, tools=tools if self.template_has_tools else None,
                                            chat_template=self.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def prepare_messages(self, ex: Dict) -> Tuple[List[Dict[str, str]], Optional[list], bool]:
        """Messages ready to render; tool schemas go into the system message when the template has no slot for them."""
        msgs, tools = [dict(m) for m in ex["messages"]], ex.get("tools")
        in_system = False
        if tools and not self.template_has_tools:
            schema = TOOLS_INTRO + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
            if msgs[0]["role"] == "system":
                msgs[0]["content"] = f"{msgs[0]['content']}\n\n{schema}"
            else:
                msgs.insert(0, {"role": "system", "content": schema})
            tools, in_system = None, True
        return msgs, tools, in_system

    def _check_control(self, loc: str, msgs) -> None:
        if self.control_re is None:
            return
        for j, m in enumerate(msgs):
            hit = self.control_re.search(m["content"])
            if hit:
                raise UserError(f"{loc}: message #{j} contains the control token {hit.group(0)!r} as text; it would be "
                                "tokenized as the template's own token. Remove it from the data (or data.skip_bad_rows=true).")

    def _safe_render(self, loc: str, messages, tools, add_generation_prompt=False) -> str:
        try:
            return self.render(messages, tools, add_generation_prompt)
        except Exception as e:  # jinja2 TemplateError from raise_exception, or a template bug
            roles = "/".join(m["role"] for m in messages)
            raise UserError(f"{loc}: the chat template cannot render this conversation (roles {roles}): "
                            f"{str(e).splitlines()[0]}. Pick a template that supports it (data.template=chatml) "
                            "or fix the row.")

    @staticmethod
    def _check_rendered(loc: str, msgs, text: str) -> None:
        """Every message must appear in the rendered text: some templates silently skip roles they do not know."""
        at = 0
        for j, m in enumerate(msgs):
            head = _head(m["content"])
            pos = text.find(head, at) if head else at
            if pos < 0:
                raise UserError(f"{loc}: the chat template leaves out message #{j} (role {m['role']}), so the model would "
                                "never see it; pick a template that renders this role (data.template=chatml with "
                                "data.allow_template_change=true) or drop the role from the data.")
            at = pos

    def _turn_end(self, msgs, tools, i: int, text: str) -> int:
        end = len(text) if i == len(msgs) - 1 else _common(self.render(msgs[: i + 1], tools), text)
        for role in ("user", "assistant"):
            try:
                probed = self.render(msgs[: i + 1] + [{"role": role, "content": PROBE}], tools)
            except Exception:  # the template refuses this role here; try the other one
                continue
            return self._snap(text, min(end, _common(probed, text)))
        return end

    def _snap(self, text: str, end: int) -> int:
        """A probed end can stop inside a marker the template writes at the very end and the probe turn starts
        with too (phi-3: `<|endoftext|>` vs `<|user|>` share `<|`): move it back to the marker's start."""
        if self.control_re is not None:
            for m in self.control_re.finditer(text, max(0, end - 64), min(len(text), end + 64)):
                if m.start() < end < m.end():
                    return m.start()
        partial = _PARTIAL_MARKER.search(text, 0, end)
        return partial.start() if partial else end

    def trained_turns(self, msgs) -> List[int]:
        roles = set(self.d.train_roles)
        idx = [i for i, m in enumerate(msgs) if m["role"] in roles]
        return idx[-1:] if self.d.train_turns == "last" else idx

    def chat_spans(self, loc: str, ex: Dict, turns: Optional[Sequence[int]] = None) -> Tuple[str, List[Span], Dict[str, int]]:
        """The rendered text, the character spans to train, and counters (eos_appended, tools_in_system)."""
        msgs, tools, in_system = self.prepare_messages(ex)
        self._check_control(loc, msgs)
        text = self._safe_render(loc, msgs, tools)
        self._check_rendered(loc, msgs, text)
        spans: List[Span] = []
        for i in self.trained_turns(msgs) if turns is None else turns:
            before = self.render(msgs[:i], tools, add_generation_prompt=msgs[i]["role"] == "assistant") if i else ""
            start = _common(before, text)
            end = self._turn_end(msgs, tools, i, text)
            while end > start and text[end - 1].isspace():
                end -= 1
            head = _head(msgs[i]["content"])
            pos = text.find(head, start, end) if head else -1
            spans.append((pos if pos >= 0 else start, end))
        text, spans, appended = self._close_with_eos(text, spans)
        return text, spans, {"eos_appended": appended, "tools_in_system": int(in_system)}

    def _close_with_eos(self, text: str, spans: List[Span]) -> Tuple[str, List[Span], int]:
        eos = self.tok.eos_token
        if not eos:
            return text, spans, 0
        out, shift, appended = [], 0, 0
        for s, e in spans:
            s, e = s + shift, e + shift
            if not any(text[s:e].endswith(t) for t in self.special):
                text = text[:e] + eos + text[e:]
                e += len(eos)
                shift += len(eos)
                appended += 1
            out.append((s, e))
        return text, out, appended

    def text_spans(self, ex: Dict) -> Tuple[str, List[Span], Dict[str, int]]:
        """completion / segments: the texts joined; trained segments are the spans. Completion text ends with EOS."""
        text, spans = "", []
        if self.tok.bos_token and getattr(self.tok, "add_bos_token", False):
            text = self.tok.bos_token
        for seg, trained in ex["segments"]:
            if trained and seg:
                spans.append((len(text), len(text) + len(seg)))
            text += seg
        if self.d.format == "completion" and self.tok.eos_token:
            spans.append((len(text), len(text) + len(self.tok.eos_token)))
            text += self.tok.eos_token
        return text, spans, {}

    def spans(self, loc: str, ex: Dict) -> Tuple[str, List[Span], Dict[str, int]]:
        if ex["kind"] == "segments":
            return self.text_spans(ex)
        if ex["kind"] == "preference":  # supervised on the chosen reply (preference training comes later)
            ex = {"messages": ex["messages"] + [{"role": "assistant", "content": ex["chosen"]}], "tools": ex["tools"]}
            msgs = ex["messages"]
            return self.chat_spans(loc, ex, turns=None if self.d.train_on_inputs else [len(msgs) - 1])
        return self.chat_spans(loc, ex)

    # -- tokenizing -------------------------------------------------------------------------------------
    def encode_batch(self, locs: Sequence[str], examples: Sequence[Dict], skip_bad: bool = False) -> Dict[str, list]:
        """Batched fast tokenization with offsets: input_ids, labels, per-example counters, and `error` ("" when
        fine). A bad example raises, or with skip_bad comes back empty with its error, so a worker never fails."""
        texts, all_spans, counters, errors = [], [], [], []
        for loc, ex in zip(locs, examples):
            try:
                text, sp, c = self.spans(loc, ex)
                err = ""
            except UserError as e:
                if not skip_bad:
                    raise
                text, sp, c, err = "", [], {}, str(e)
            texts.append(text)
            all_spans.append(sp)
            counters.append(c)
            errors.append(err)
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        labels = []
        for ids, offsets, sp in zip(enc["input_ids"], enc["offset_mapping"], all_spans):
            if self.d.train_on_inputs:
                labels.append(list(ids))
            else:
                labels.append([t if any(s < b and a < e for s, e in sp) else IGNORE for t, (a, b) in zip(ids, offsets)])
        return {"input_ids": enc["input_ids"], "labels": labels, "error": errors,
                "eos_appended": [c.get("eos_appended", 0) for c in counters],
                "tools_in_system": [c.get("tools_in_system", 0) for c in counters]}


def auto_num_proc(rows: int, requested: int) -> int:
    if requested:
        return requested
    return max(1, min(os.cpu_count() or 1, rows // 20000))
