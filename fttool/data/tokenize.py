"""Render examples with the chat template and mark exactly the tokens to train.

Masks come from character spans of the rendered text, found from the template's own structure, never by searching
for a reply's words (a short reply like "OK" can also occur inside the markup):

- A message's place in the text is found by rendering the same conversation once more with that message's content
  replaced by a sentinel character: the rendering before and after the sentinel is the template's markup around the
  message, so what lies between is exactly what the template made of the content (trimmed, with reasoning
  stripped, or as it was).
- A trained turn starts where the generation prompt ends: the markup after the previous message is compared with
  what the template writes after that message when it asks for a reply (`add_generation_prompt`). What the template
  writes for the model beyond that (an empty `<think></think>` block, leading whitespace of the reply) is trained.
- It ends with the turn's end-of-turn marker: the markup the template writes after the reply when the reply ends the
  conversation, cut after its first special token (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `</s>`); when that differs
  mid-conversation (gpt-oss writes `<|return|>` only at the very end), the special token that closes the turn before
  the next turn's header. What a template writes after the last turn only (phi-3's `<|endoftext|>` after `<|end|>`)
  is not trained: generation stops at the end-of-turn marker. A template that closes replies with no special token
  gets the tokenizer's EOS inserted and trained there (counted as eos_appended), so the model learns to stop.

A token is trained when its characters overlap a span. Message text reaches the template as data, never as template
source, so `{{...}}` in a dataset stays literal. Text in a message that spells one of the tokenizer's special tokens
(a chat quoting `<|im_end|>`) is kept as plain text: it is tokenized as ordinary characters, so it can never forge
a turn boundary, and masked like the rest of its message.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fttool.data.token_text import LIT_CLOSE, LIT_OPEN, TokenText, common, common_suffix, unmark
from fttool.errors import UserError

log = logging.getLogger("fttool")

IGNORE = -100  # the label of a token that is not trained (what Hugging Face losses skip); fttool's one definition
Span = Tuple[int, int]
TOOLS_INTRO = "You can call these tools (JSON schemas):\n"
# Private-use characters (plane 15) that no dataset contains stand in for a message's content to find its place in
# the rendering (literal special-token text is marked with token_text.LIT_OPEN/LIT_CLOSE).
SENTINELS = ("\U000f0002", "@@fttool-sentinel@@")  # the second for templates that JSON-escape content
REPLY_OF = {"preference": "chosen", "unpaired": "completion"}  # the reply a prompt-and-reply row is trained on
COUNTERS = ("eos_appended", "tools_in_system", "literal_markers", "empty_replies")  # per-row counts, summed in stats
RESERVED_KWARGS = (
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "tokenize",
    "conversation",
)


class Turn:
    """A trained turn's span, and whether the template closed it with an end-of-turn token."""

    __slots__ = ("start", "end", "closed")

    def __init__(self, start: int, end: int, closed: bool):
        self.start, self.end, self.closed = start, end, closed


class Encoder:
    """Turns normalised examples (see formats.py) into input_ids and labels for one tokenizer and template."""

    def __init__(self, tokenizer, template: Optional[str], data_spec):
        self.tok = tokenizer
        self.template = template or tokenizer.chat_template
        self.d = data_spec
        self.kwargs: Dict[str, Any] = dict(getattr(data_spec, "template_kwargs", None) or {})
        self.template_has_tools = bool(self.template) and "tools" in self.template
        self.template_has_tool_calls = bool(self.template) and "tool_calls" in self.template
        self.tools_default: Optional[list] = None  # [] once the template is seen to need a tools list
        decoder = tokenizer.added_tokens_decoder.values()
        special = {t for t in tokenizer.all_special_tokens if t} | {t.content for t in decoder if t.special}
        added = {t.content for t in decoder} | special
        self.special_re = _alternation(special)  # turn markers, and what data may not spell as a token
        self.added_re = _alternation(added)  # every token a boundary must not cut through
        self.added_ids = {i for i, t in tokenizer.added_tokens_decoder.items()}  # markup: trains only from its start
        self.codec = TokenText(tokenizer)  # marked text to ids, and the check that ids decode to the rendering

    # -- rendering --------------------------------------------------------------------------------------
    def render(self, messages, tools=None, add_generation_prompt: bool = False, documents=None) -> str:
        """The template's text for a conversation, with data.template_kwargs; `tools` exactly as the row has it. A
        template that loops over `tools` and so cannot render a row without them gets an empty list, as the model's
        own chat code passes (said once in the log); from then on every row without tools gets one."""
        kwargs = dict(self.kwargs)
        if tools is None:
            tools = kwargs.pop("tools", None)
        kwargs.pop("tools", None)
        if documents is None:
            documents = kwargs.pop("documents", None)
        kwargs.pop("documents", None)

        def apply(tools_value):
            return self.tok.apply_chat_template(
                messages,
                tools=tools_value,
                documents=documents,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )

        if tools is not None or not self.template_has_tools:
            return apply(tools)
        if self.tools_default is not None:
            return apply(self.tools_default)
        try:
            return apply(None)
        except TypeError as e:
            if "NoneType" not in str(e) or "iterable" not in str(e):
                raise
            out = apply([])  # still failing: the caller names the error
        self.tools_default = []
        log.info("data: the chat template loops over `tools`; rows without tools are rendered with tools=[]")
        return out

    def prepare_messages(self, ex: Dict) -> Tuple[List[Dict[str, Any]], Optional[list], bool]:
        """Messages ready to render. Tool calls reach a template that renders `tool_calls` as they are, and are
        written into the content as JSON for one that does not; tool schemas go into the system message when the
        template has no slot for them."""
        msgs, tools = [dict(m) for m in ex["messages"]], ex.get("tools")
        if not self.template_has_tool_calls:
            for m in msgs:
                calls = m.pop("tool_calls", None)
                if calls:
                    text = json.dumps(calls, ensure_ascii=False)
                    m["content"] = f"{m['content']}\n{text}" if m["content"].strip() else text
        in_system = False
        if tools and not self.template_has_tools:
            schema = TOOLS_INTRO + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
            if msgs[0]["role"] == "system":
                msgs[0]["content"] = f"{msgs[0]['content']}\n\n{schema}"
            else:
                msgs.insert(0, {"role": "system", "content": schema})
            tools, in_system = None, True
        return msgs, tools, in_system

    def render_prompt(self, loc: str, ex: Dict) -> str:
        """The text a model is prompted with for `ex`'s messages: rendered with the generation prompt, literal
        special-token text inside the messages marked to stay plain characters (data/prompts.py)."""
        msgs, tools, _ = self.prepare_messages(ex)
        marked, _ = self._mark_literals(msgs)
        return self._safe_render(loc, marked, tools, ex.get("documents"), add_generation_prompt=True)

    def _mark_literals(self, msgs: List[Dict[str, str]], parsed=frozenset()) -> Tuple[List[Dict[str, str]], int]:
        """Wrap special-token text inside messages in private markers, so it is later tokenized as plain text; texts
        in `parsed` (ones the template itself looks for in a message, such as Qwen3's '</think>') stay as written."""
        if self.special_re is None:
            return msgs, 0
        count = 0
        out = []

        def mark(x):
            nonlocal count
            if x.group(0) in parsed:
                return x.group(0)
            count += 1
            return f"{LIT_OPEN}{x.group(0)}{LIT_CLOSE}"

        for m in msgs:
            content = m["content"].replace(LIT_OPEN, "").replace(LIT_CLOSE, "")
            out.append({**m, "content": self.special_re.sub(mark, content)})
        return out, count

    def _render_marked(self, loc: str, msgs, tools, documents) -> Tuple[List[Dict[str, str]], str, int]:
        """Messages with literal special-token text marked, their rendering, and how many texts were marked. The
        rendering without the marks must be the template's own rendering of the messages as written: a template that
        parses a special token's text out of a message (splitting off reasoning at '</think>') gets that text as
        written, so it renders exactly what the model sees at inference; if it still differs, the row is refused."""
        marked, literals = self._mark_literals(msgs)
        text = self._safe_render(loc, marked, tools, documents)
        if not literals:
            return marked, text, 0
        plain = self._safe_render(loc, msgs, tools, documents)
        if unmark(text) == plain:
            return marked, text, literals
        found = {x.group(0) for m in msgs for x in self.special_re.finditer(m["content"])}
        parsed = frozenset(t for t in found if t in self.template)
        marked, literals = self._mark_literals(msgs, parsed)
        text = self._safe_render(loc, marked, tools, documents)
        if unmark(text) != plain:
            raise UserError(
                f"{loc}: the chat template treats special-token text inside a message ({', '.join(sorted(found))}) "
                "differently once fttool keeps it as plain text, so the training text would not be what the "
                "model sees; remove that text from the row (or data.skip_bad_rows=true)."
            )
        return marked, text, literals

    def _safe_render(self, loc: str, messages, tools, documents=None, add_generation_prompt=False) -> str:
        try:
            return self.render(messages, tools, add_generation_prompt, documents)
        except Exception as e:  # jinja2 TemplateError from raise_exception, or a template bug
            roles = "/".join(m["role"] for m in messages)
            first = (str(e).splitlines() or [type(e).__name__])[0]
            hint = ""
            if "NoneType" in first and "iterable" in first:
                hint = (
                    ' The template loops over a variable the row does not give: rows with tools need a "tools" '
                    "list (an empty list is passed as it is), and other variables go in data.template_kwargs "
                    "(e.g. data.template_kwargs={tools: []})."
                )
            elif "undefined" in first.lower():
                hint = " A variable the template reads can be given with data.template_kwargs (e.g. {date_string: '26 Jul 2024'})."
            raise UserError(
                f"{loc}: the chat template cannot render this conversation (roles {roles}): {first}.{hint} "
                "Pick a template that supports it (data.template=chatml) or fix the row."
            )

    def _try_render(self, messages, tools, documents, add_generation_prompt=False) -> Optional[str]:
        try:
            return self.render(messages, tools, add_generation_prompt, documents)
        except Exception:  # noqa: BLE001 - a template with rules about which conversations it renders
            return None

    @staticmethod
    def _stand_ins(m: Dict[str, Any], s: str, whole: bool) -> List[Dict[str, Any]]:
        """Versions of message m with a sentinel in place of what it says. For the whole conversation the first has
        only a role and the sentinel, so the difference covers everything the message renders (content, tool calls,
        reasoning); a message with tool calls also gets one whose calls keep their ids and names but not their
        arguments (templates check results against calls). For a prefix its other fields are kept first, so the
        markup after it is the template's own."""
        bare = {"role": m["role"], "content": s}
        kept = {**m, "content": s}
        calls = (
            {
                **kept,
                "tool_calls": [
                    {**c, "function": {**c["function"], "arguments": {s: s}}}
                    if isinstance(c, dict) and isinstance(c.get("function"), dict)
                    else c
                    for c in m["tool_calls"]
                ],
            }
            if m.get("tool_calls")
            else None
        )
        if whole:
            return [bare] + ([calls] if calls else [])
        return ([kept, calls] if calls else [kept] if len(m) > 2 else []) + [bare]

    def _rendered_at(
        self,
        msgs,
        j: int,
        tools,
        documents,
        prefix_only: bool,
        add_generation_prompt=False,
        variants: Optional[List[Dict[str, Any]]] = None,
    ):
        """Render msgs (or msgs[:j+1] when prefix_only) with message j replaced by a stand-in: (text, where the
        first sentinel starts, where the last one ends), or None when the template refuses every stand-in or does not
        write message j at all."""
        upto = msgs[: j + 1] if prefix_only else msgs
        for s in SENTINELS:
            for v in variants or self._stand_ins(msgs[j], s, whole=not prefix_only):
                v = {k: (s if x is SENTINELS else x) for k, x in v.items()}
                out = self._try_render(upto[:j] + [v] + upto[j + 1 :], tools, documents, add_generation_prompt)
                pos = out.find(s) if out is not None else -1
                if pos >= 0:
                    return out, pos, out.rfind(s) + len(s)
        return None

    def region(self, text: str, msgs, j: int, tools, documents) -> Optional[Span]:
        """Where message j lies in `text` (the full rendering): the rendering with a stand-in in its place agrees
        with `text` before and after it. None when the template does not write the message."""
        got = self._rendered_at(msgs, j, tools, documents, prefix_only=False)
        if got is None:
            return None
        other, first, last = got
        a = min(first, common(text, other))
        b = len(text) - min(len(other) - last, common_suffix(text, other))
        return a, max(a, b)

    def _check_rendered(self, loc: str, msgs, tools, documents) -> None:
        """Every message must appear in the rendered text: some templates silently skip roles they do not know.
        One rendering with a distinct sentinel in every message tells."""
        marks = [f"{SENTINELS[0]}{j}{SENTINELS[0]}" for j in range(len(msgs))]
        out = self._try_render([dict(m, content=s) for m, s in zip(msgs, marks)], tools, documents)
        if out is None or not any(s in out for s in marks):
            return  # the template looks at the content (or escapes it); the per-turn regions still check trained turns
        for j, (m, s) in enumerate(zip(msgs, marks)):
            if s not in out and m["content"].strip():
                raise UserError(
                    f"{loc}: the chat template leaves out message #{j} (role {m['role']}), so the model would "
                    "never see it; pick a template that renders this role (data.template=chatml with "
                    "data.allow_template_change=true) or drop the role from the data."
                )

    def _snap(self, a: str, b: str, k: int) -> int:
        """Move a boundary k (where a and b stop agreeing) back to the start of any token it would cut through."""
        if self.added_re is None:
            return k
        for s in (a, b):
            for m in self.added_re.finditer(s, max(0, k - 64), min(len(s), k + 64)):
                if m.start() < k < m.end():
                    k = m.start()
        return k

    def _tail(self, msgs, j: int, tools, documents, add_generation_prompt: bool) -> Optional[str]:  # noqa: D401
        """What the template writes after message j when it is the last one (with a generation prompt or not)."""
        got = self._rendered_at(
            msgs, j, tools, documents, prefix_only=True, add_generation_prompt=add_generation_prompt
        )
        return None if got is None else got[0][got[2] :]

    def _agree(self, tail: Optional[str], text: str) -> int:
        """How far `tail` and `text` agree, moved back to a token boundary."""
        return 0 if tail is None else self._snap(tail, text, common(tail, text))

    def _start(self, text: str, msgs, i: int, tools, documents, prev: Optional[Span], a: int) -> int:
        """Where the model's part of turn i begins: after the generation prompt that follows message i-1."""
        if i == 0 or prev is None:
            return a
        prompt = self._tail(msgs, i - 1, tools, documents, True)
        k = self._agree(prompt, text[prev[1] :])
        # what follows the generation prompt is the model's (gpt-oss's <|channel|>final<|message|>, an empty
        # <think></think>); when the prompt does not even agree with the markup after message i-1, this template
        # writes it differently once a reply follows: start where the reply itself starts. When it agrees only in
        # part (Command-R+ tool use asks for a reply after an instruction turn that a written reply does not
        # have), the header between the agreed part and the reply is still markup: start at the reply at the
        # earliest
        if prompt is not None and 0 < k < len(prompt.rstrip()):
            return max(prev[1] + k, a)
        return prev[1] + k if k or prev[1] == a else a

    def _message_end(self, text: str, msgs, i: int, tools, documents) -> Optional[Tuple[int, str]]:
        """Where message i's own rendering ends in `text`, and the markup the template writes after it when it is the
        last message. Found by rendering the conversation up to message i as it is and with a bare sentinel in its
        place: what both end with is the closing. None when the template renders earlier turns differently once more
        follow (the caller then keeps the end of the sentinel region)."""
        real = self._try_render(msgs[: i + 1], tools, documents)
        got = self._rendered_at(msgs, i, tools, documents, prefix_only=True, variants=[self._bare(msgs[i])])
        if real is None or got is None:
            return None
        end = len(real) - common_suffix(real, got[0])
        for m in self.added_re.finditer(real, max(0, end - 64), min(len(real), end + 64)) if self.added_re else ():
            if m.start() < end < m.end():
                end = m.end()  # a token both renderings end with in part is the message's own (<|call|> vs <|return|>)
        if text[:end] != real[:end]:
            return None
        return end, real[end:]

    @staticmethod
    def _bare(m: Dict[str, Any]) -> Dict[str, Any]:
        return {"role": m["role"], "content": SENTINELS}

    def _end(self, text: str, msgs, i: int, tools, documents, here: Span, nxt: Optional[Span]) -> Tuple[int, bool]:
        """Where turn i ends and whether an end-of-turn token closed it, in this order:
        1. the markup the template writes after the reply when it is the last message, to its first special token
           (<|im_end|>, <|eot_id|>; phi-3's <|end|> but not the <|endoftext|> written once at the very end);
        2. the special token that closes a plain reply when another reply is asked for after it, when it follows
           here too (gpt-oss: <|end|> mid-conversation, <|return|> at the end);
        3. a special token that ends the reply itself (a tool call's <|call|>; Gemma 4's <|tool_response>);
        4. a special token written only when another turn follows, before that turn's own markup (Apertus);
        otherwise nothing closes the reply (the caller inserts EOS)."""
        b = here[1]
        got = self._message_end(text, msgs, i, tools, documents)
        if got is not None:
            b, tail = got
            closing = text[b : b + self._agree(tail, text[b:])]
            marker = self.special_re.search(closing) if self.special_re else None
            if marker:
                earlier = self._template_marker(text, marker.group(0), here[0], b)
                if earlier is not None:  # the reply closed once already (DeepSeek-R1's tool calls, then "" again)
                    return earlier, True
                opener = self._turn_opener(text)
                return b + self._closing_run(closing, marker.end(), tail, msgs, i, tools, documents, opener), True
        if self.special_re is None:
            return b, False
        got = self._rendered_at(
            msgs, i, tools, documents, prefix_only=True, add_generation_prompt=True, variants=[self._bare(msgs[i])]
        )
        if got is not None:
            tail = got[0][got[2] :]
            first = self.special_re.search(tail)
            ws = len(text[b:]) - len(text[b:].lstrip())
            if first and not tail[: first.start()].strip() and text.startswith(first.group(0), b + ws):
                return b + ws + len(first.group(0)), True
        last = None
        for last in self.special_re.finditer(text, max(here[0], b - 64), b):  # noqa: B007 - the last match is kept
            pass
        if last is not None and last.end() == b:
            return b, True
        if nxt is not None:
            found = list(self.special_re.finditer(text, b, nxt[0]))
            if len(found) >= 2 and not text[b : found[0].start()].strip():
                return found[0].end(), True
        return b, False

    def _template_marker(self, text: str, marker: str, a: int, b: int) -> Optional[int]:
        """The end of the template's own first `marker` inside text[a:b] (never one quoted in a message), or None."""
        at = text.find(marker, a, b)
        while at >= 0:
            if not (at and text[at - 1] == LIT_OPEN):
                return at + len(marker)
            at = text.find(marker, at + 1, b)
        return None

    def _turn_opener(self, text: str) -> Optional[str]:
        """The special token a turn's header opens with: the first one of the rendering, past a BOS written once
        (<|START_OF_TURN_TOKEN|>, <|im_start|>, which is also SmolLM2's BOS, <|start_header_id|>, <|start|>)."""
        found = [m.group(0) for m in self.special_re.finditer(text)] if self.special_re else []
        bos = self.tok.bos_token
        return next((t for t in found if t != bos or found.count(bos) > 1), None)

    def _closing_run(
        self, closing: str, end: int, last: str, msgs, i: int, tools, documents, opener: Optional[str] = None
    ) -> int:
        """Where a closing that starts with special tokens ends: special tokens that follow the first one directly
        close the turn too when the template also writes them before a generation prompt that follows the reply
        (Command R7B's <|END_RESPONSE|><|END_OF_TURN_TOKEN|>); one written only at the very end of a conversation
        does not, nor the token that opens every turn's header (`opener`: Command R7B's own template writes
        <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|> after every conversation, asked for a reply or not). `last` is what
        the template writes after the reply when it is the last message."""
        nxt = self.special_re.match(closing, end)
        if not nxt:
            return end
        gp = self._tail(msgs, i, tools, documents, True)
        if gp is None:
            return end
        opens = self.special_re.search(gp[common(gp, last) :])  # the generation prompt's header opens with it
        while (
            nxt
            and gp.startswith(closing[: nxt.end()])
            and not (opens and nxt.group(0) == opens.group(0))
            and nxt.group(0) != opener
        ):
            end = nxt.end()
            nxt = self.special_re.match(closing, end)
        return end

    def trained_turns(self, msgs) -> List[int]:
        roles = set(self.d.train_roles)
        idx = [i for i, m in enumerate(msgs) if m["role"] in roles]
        return idx[-1:] if self.d.train_turns == "last" else idx

    def chat_spans(
        self, loc: str, ex: Dict, turns: Optional[Sequence[int]] = None
    ) -> Tuple[str, List[Span], Dict[str, int]]:
        """The rendered text (literal special tokens still marked), the character spans to train, and counters."""
        msgs, tools, in_system = self.prepare_messages(ex)
        documents = ex.get("documents")
        msgs, text, literals = self._render_marked(loc, msgs, tools, documents)
        self._check_rendered(loc, msgs, tools, documents)
        wanted = self.trained_turns(msgs) if turns is None else list(turns)
        regions: Dict[int, Optional[Span]] = {}

        def region(j: int) -> Optional[Span]:
            if j not in regions:
                regions[j] = self.region(text, msgs, j, tools, documents) if 0 <= j < len(msgs) else None
            return regions[j]

        out: List[Turn] = []
        empty = 0
        for i in wanted:
            here = region(i)
            if here is None:
                raise UserError(
                    f"{loc}: the chat template does not write message #{i} (role {msgs[i]['role']}), so it "
                    "cannot be trained; pick a template that renders this role or drop it from the data."
                )
            if not text[here[0] : here[1]].strip():
                empty += 1  # the template made nothing of the reply (reasoning stripped from an earlier turn)
                continue
            prev = region(i - 1) if i and msgs[i]["role"] == "assistant" else None  # other roles: their content on
            start = self._start(text, msgs, i, tools, documents, prev, here[0])
            end, closed = self._end(text, msgs, i, tools, documents, here, region(i + 1) if i + 1 < len(msgs) else None)
            if out and start < out[-1].end:
                start = out[-1].end
            out.append(Turn(start, max(start, end), closed))
        text, spans, appended = self._close_with_eos(text, out)
        return (
            text,
            spans,
            {
                "eos_appended": appended,
                "tools_in_system": int(in_system),
                "literal_markers": literals,
                "empty_replies": empty,
            },
        )

    def _close_with_eos(self, text: str, turns: List[Turn]) -> Tuple[str, List[Span], int]:
        eos = self.tok.eos_token
        out, shift, appended = [], 0, 0
        for t in turns:
            s, e = t.start + shift, t.end + shift
            if not t.closed and eos:
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
        if ex["kind"] in REPLY_OF:  # a prompt and one reply (preference: the chosen; unpaired: its completion)
            reply = ex[REPLY_OF[ex["kind"]]]
            ex = {**ex, "messages": ex["messages"] + [{"role": "assistant", "content": reply}]}
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
        plain = [i for i, t in enumerate(texts) if LIT_OPEN not in t and LIT_CLOSE not in t]
        ids: List[list] = [[] for _ in texts]
        offsets: List[list] = [[] for _ in texts]
        if plain:
            enc = self.tok([texts[i] for i in plain], add_special_tokens=False, return_offsets_mapping=True)
            for i, x, o in zip(plain, enc["input_ids"], enc["offset_mapping"]):
                ids[i], offsets[i] = x, o
        for i in set(range(len(texts))) - set(plain):
            try:
                ids[i], offsets[i], all_spans[i] = self.codec.encode_marked(locs[i], texts[i], all_spans[i])
            except UserError as e:
                if not skip_bad:
                    raise
                ids[i], offsets[i], all_spans[i], errors[i] = [], [], [], str(e)
        for i in range(len(texts)):
            if errors[i] or not ids[i]:
                continue
            try:
                self.codec.check(locs[i], texts[i], ids[i])
            except UserError as e:
                if not skip_bad:
                    raise
                ids[i], offsets[i], all_spans[i], errors[i] = [], [], [], str(e)
        labels = []
        for x, o, sp in zip(ids, offsets, all_spans):
            if self.d.train_on_inputs:
                labels.append(list(x))
            else:
                labels.append([t if self._trains(t, a, b, sp) else IGNORE for t, (a, b) in zip(x, o)])
        return {
            "input_ids": ids,
            "labels": labels,
            "error": errors,
            **{k: [c.get(k, 0) for c in counters] for k in COUNTERS},
        }

    def _trains(self, token: int, a: int, b: int, spans: List[Span]) -> bool:
        """A token trains when its characters overlap a trained span; a template marker (an added token) only when it
        starts inside one: one that starts before, and reaches in by swallowing the reply's leading whitespace
        (phi-3's `<|assistant|>` with rstrip), is the turn's header."""
        return any(s < b and a < e and (a >= s or token not in self.added_ids) for s, e in spans)


def _alternation(tokens) -> Optional["re.Pattern"]:
    tokens = sorted((t for t in tokens if t and not t.isspace()), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def auto_num_proc(rows: int, requested: int) -> int:
    if requested:
        return requested
    return max(1, min(os.cpu_count() or 1, rows // 20000))
