"""Real chat templates x the conversations that break masking, judged against a reference written by hand.

Used by tests/test_templates_real.py and by `python bench/masks_report.py` (the per-template table).

Each template in ../shared/data/chat_templates/ (and hf/) gets a real tokenizer (phi-2's byte-level BPE) with the
template's markers added, as special tokens for turn markers and as ordinary added tokens for reasoning and
tool-call tags (as Qwen3's tokenizer has them). The reference is independent of fttool's span logic: which markers
may end a trained reply (END), which markers belong to turn headers and must never be trained (HEADERS), what
the model may write before its reply (MODEL_PREFIX), and the conversation as the template renders it directly.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT.parent / "shared" / "data" / "chat_templates"
TOKENIZER = ROOT.parent / "shared" / "data" / "tokenizers" / "phi-2"
OWN = ROOT / "tests" / "templates"
BOS, EOS = "<s>", "</s>"
# tags a model writes inside its replies: added tokens, but not special (as in Qwen3's and GLM's tokenizers)
PLAIN_TAG = re.compile(
    r"^</?(think|tool_call|tool_response|arg_key|arg_value|tools|minimax:tool_call|seed:think|"
    r"seed:tool_call|seed:cot_budget_reflect|response|invoke)>$"
)
MARKER = re.compile(
    r"<\|[A-Za-z_\"]+\|>|<[a-z_\"]+\|>|<\|[a-z_\"]+>|<｜[^｜]+｜>|\[/?[A-Z_]+\]|</?[a-z_:]+>|"
    r"\]~!b\[|\]~b\]|\[e~\[|\[gMASK\]|<sop>"
)

CHATML = {"<|im_end|>"}
# the markers that may close a trained reply (EOS is always allowed: fttool appends it where nothing closes a reply)
END: Dict[str, set] = {
    "hf/Apertus-8B-Instruct.jinja": {"<|assistant_end|>", "<|tools_suffix|>"},  # a tool call ends with its list
    "hf/ByteDance-Seed-OSS.jinja": {"<seed:eos>"},
    "hf/GLM-4.7-Flash.jinja": set(),
    "hf/HuggingFaceTB-SmolLM3-3B.jinja": CHATML,
    "hf/LFM2.5-8B-A1B.jinja": CHATML,
    "hf/MiMo-VL.jinja": CHATML,
    "hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja": CHATML,
    "hf/Qwen-QwQ-32B.jinja": CHATML,
    "hf/Qwen-Qwen3-0.6B.jinja": CHATML,
    "hf/Qwen3-Coder.jinja": CHATML,
    "hf/Qwen3.5-4B.jinja": CHATML,
    "hf/moonshotai-Kimi-K2.jinja": CHATML,
    "hf/MiniMax-M2.jinja": {"[e~["},
    "hf/Mistral-Small-3.2-24B-Instruct-2506.jinja": {EOS},
    "hf/mistralai-Ministral-3-14B-Reasoning-2512.jinja": {EOS},
    "hf/unsloth-mistral-Devstral-Small-2507.jinja": {EOS},
    "hf/deepseek-ai-DeepSeek-V3.1.jinja": {"<｜end▁of▁sentence｜>"},
    "hf/google-gemma-4-31B-it.jinja": {"<turn|>", "<|tool_response>"},  # a tool call ends by asking for the result
    "hf/ibm-granite-granite-3.3-2B-Instruct.jinja": {"<|end_of_text|>"},
    "hf/ibm-granite-granite-4.0.jinja": {"<|end_of_text|>"},
    "hf/openai-gpt-oss-120b.jinja": {"<|end|>", "<|return|>", "<|call|>"},
    "alpaca.jinja": {EOS},
    "amberchat.jinja": {EOS},
    "chatml.jinja": CHATML,
    "chatqa.jinja": {EOS},
    "falcon-instruct.jinja": {EOS},
    "gemma-it.jinja": {"<end_of_turn>"},
    "granite-3.0-instruct.jinja": {"<|end_of_text|>"},
    "llama-2-chat.jinja": {EOS},
    "llama-3-instruct.jinja": {"<|eot_id|>"},
    "mistral-instruct.jinja": {EOS},
    "openchat-3.5.jinja": {"<|end_of_turn|>"},
    "phi-3-small.jinja": {"<|end|>"},
    "phi-3.jinja": {"<|end|>"},
    "qwen2.5-instruct.jinja": CHATML,
    "saiga.jinja": {EOS},
    "solar-instruct.jinja": {EOS},
    "vicuna.jinja": {EOS},
    "zephyr.jinja": {EOS},
    # written here in the shape of families outside the shared set (tests/templates/README.md)
    "own/cohere-r7b-shape.jinja": {"<|END_OF_TURN_TOKEN|>"},
    "own/cohere-rplus-tool-use-shape.jinja": {"<|END_OF_TURN_TOKEN|>"},
    "own/hermes-tools-loop-shape.jinja": CHATML,
    "own/deepseek-r1-distill-shape.jinja": {"<｜end▁of▁sentence｜>"},
    "own/phi-3.5-mini-shape.jinja": {"<|end|>"},
    "own/cohere-r7b-tool-use-shape.jinja": {"<|END_OF_TURN_TOKEN|>"},
}
IM = {"<|im_start|>"}
COHERE = {"<|START_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|USER_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|START_RESPONSE|>"}
MISTRAL = {"[INST]", "[/INST]", "[TOOL_RESULTS]", "[SYSTEM_PROMPT]"}
# turn-header markup: never trained
HEADERS: Dict[str, set] = {
    "hf/Apertus-8B-Instruct.jinja": {
        "<|user_start|>",
        "<|assistant_start|>",
        "<|system_start|>",
        "<|developer_start|>",
    },
    "hf/ByteDance-Seed-OSS.jinja": {"<seed:bos>"},
    "hf/GLM-4.7-Flash.jinja": {"<|user|>", "<|assistant|>", "<|system|>", "<|observation|>"},
    "hf/HuggingFaceTB-SmolLM3-3B.jinja": IM,
    "hf/LFM2.5-8B-A1B.jinja": IM,
    "hf/MiMo-VL.jinja": IM,
    "hf/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16.jinja": IM,
    "hf/Qwen-QwQ-32B.jinja": IM,
    "hf/Qwen-Qwen3-0.6B.jinja": IM,
    "hf/Qwen3-Coder.jinja": IM,
    "hf/Qwen3.5-4B.jinja": IM,
    "hf/moonshotai-Kimi-K2.jinja": {"<|im_user|>", "<|im_assistant|>", "<|im_system|>", "<|im_middle|>"},
    "hf/MiniMax-M2.jinja": {"]~b]"},
    "hf/Mistral-Small-3.2-24B-Instruct-2506.jinja": MISTRAL,
    "hf/mistralai-Ministral-3-14B-Reasoning-2512.jinja": MISTRAL,
    "hf/unsloth-mistral-Devstral-Small-2507.jinja": MISTRAL,
    "hf/deepseek-ai-DeepSeek-V3.1.jinja": {"<｜User｜>", "<｜Assistant｜>"},
    "hf/google-gemma-4-31B-it.jinja": {"<|turn>"},
    "hf/ibm-granite-granite-3.3-2B-Instruct.jinja": {"<|start_of_role|>", "<|end_of_role|>"},
    "hf/ibm-granite-granite-4.0.jinja": {"<|start_of_role|>", "<|end_of_role|>"},
    "hf/openai-gpt-oss-120b.jinja": {"<|start|>"},
    "alpaca.jinja": {"### Instruction", "### Response"},
    "amberchat.jinja": {"###Human", "###Assistant"},
    "chatml.jinja": IM,
    "chatqa.jinja": {"User:", "Assistant:"},
    "falcon-instruct.jinja": {"User:", "Assistant:"},
    "gemma-it.jinja": {"<start_of_turn>"},
    "granite-3.0-instruct.jinja": {"<|start_of_role|>", "<|end_of_role|>"},
    "llama-2-chat.jinja": {"[INST]", "[/INST]"},
    "llama-3-instruct.jinja": {"<|start_header_id|>", "<|end_header_id|>"},
    "mistral-instruct.jinja": {"[INST]", "[/INST]"},
    "openchat-3.5.jinja": {"GPT4 Correct"},
    "phi-3-small.jinja": {"<|user|>", "<|assistant|>", "<|system|>"},
    "phi-3.jinja": {"<|user|>", "<|assistant|>", "<|system|>"},
    "qwen2.5-instruct.jinja": IM,
    "saiga.jinja": {"<s>user", "<s>bot"},
    "solar-instruct.jinja": {"### User", "### Assistant"},
    "vicuna.jinja": {"USER:", "ASSISTANT:"},
    "zephyr.jinja": {"<|user|>", "<|assistant|>", "<|system|>"},
    "own/cohere-r7b-shape.jinja": COHERE,
    "own/cohere-rplus-tool-use-shape.jinja": COHERE,
    "own/hermes-tools-loop-shape.jinja": IM,
    "own/deepseek-r1-distill-shape.jinja": {"<｜User｜>", "<｜Assistant｜>"},
    "own/phi-3.5-mini-shape.jinja": {"<|user|>", "<|assistant|>", "<|system|>"},
    # its generation prompt ends at <|CHATBOT_TOKEN|>: the model writes <|START_RESPONSE|> (or <|START_ACTION|>)
    "own/cohere-r7b-tool-use-shape.jinja": COHERE - {"<|START_RESPONSE|>"},
}
# what a model writes before its reply under some templates (gpt-oss's channel, an empty reasoning block)
MODEL_PREFIX = re.compile(r"^(\s|<think>|</think>|<\|channel\|>final<\|message\|>|<\|START_RESPONSE\|>)*")

TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
REASONING = "R1 weighs it"


def conversations(end_marker: str) -> Dict[str, dict]:
    """The conversation classes of the masking issue. `end_marker` is quoted literally in one of them."""

    def chat(*pairs, system=None):
        msgs = [{"role": "system", "content": system}] if system else []
        for u, a in pairs:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return {"messages": msgs}

    return {
        "multi_turn_system": chat(("Reverse: red fox", "fox red"), ("Now: one two", "two one"), system="Be terse."),
        "leading_whitespace": chat(("Start with a blank line", "\n\n  Sure, here it is.\n")),
        "word_in_markup": chat(("Say OK", "OK"), ("Name a role", "assistant"), ("Another", "user")),
        "think_in_earlier_turn": chat(("Q1", f"<think>\n{REASONING}\n</think>\n\nA1 is four"), ("Q2", "A2 is five")),
        "literal_markers": chat(
            (f"What do {end_marker} and <|im_end|>, </s>, [INST] mean?", f"They end turns: {end_marker} or <|eot_id|>.")
        ),
        "tools": {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {
                            "id": "call12345",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                        }
                    ],
                },
                {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call12345", "name": "get_weather"},
                {"role": "assistant", "content": "It is 21 degrees."},
            ],
            "tools": [{"type": "function", "function": TOOL}],
        },
    }


def template_names() -> List[str]:
    if not TEMPLATES.is_dir():
        return []
    return [f"hf/{p.name}" for p in sorted((TEMPLATES / "hf").glob("*.jinja"))] + [
        p.name for p in sorted(TEMPLATES.glob("*.jinja"))
    ]


def own_template_names() -> List[str]:
    """Templates written in this repository in the shape of families outside the shared set."""
    return [f"own/{p.name}" for p in sorted(OWN.glob("*.jinja"))]


def template_source(name: str) -> str:
    if name.startswith("own/"):
        return (OWN / name[4:]).read_text(encoding="utf-8").rstrip("\n")
    text = (TEMPLATES / name).read_text(encoding="utf-8")
    # the older collection is indented for reading; its README says to strip that before use
    return text if name.startswith("hf/") else text.replace("    ", "").replace("\n", "")


def markers(name: str) -> List[str]:
    src = template_source(name)
    found = set(MARKER.findall(src)) | {m for m in END[name] | HEADERS[name] if MARKER.fullmatch(m)}
    readme = TEMPLATES / "hf" / "README.md"
    if name.startswith("hf/") and readme.is_file():
        for line in readme.read_text(encoding="utf-8").splitlines():
            if line.startswith(f"| {name[3:]} "):
                found |= {
                    m for m in re.findall(r"`([^`]+)`", line.split("|")[-2].replace("\\|", "|")) if MARKER.fullmatch(m)
                }
    return sorted(found - {BOS, EOS})


@functools.lru_cache(maxsize=None)
def tokenizer(name: str):
    """phi-2's real tokenizer plus this template's markers, with the template as its own."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    ms = markers(name)
    tok.add_tokens([m for m in ms if PLAIN_TAG.match(m)], special_tokens=False)
    tok.add_special_tokens(
        {"bos_token": BOS, "eos_token": EOS, "additional_special_tokens": [m for m in ms if not PLAIN_TAG.match(m)]}
    )
    tok.chat_template = template_source(name)
    return tok


def _tool_variants(row: dict) -> List[dict]:
    """The tools row in the shapes templates disagree on: schemas wrapped or bare, arguments an object or a string."""
    out = []
    for bare in (False, True):
        for as_string in (False, True):
            r = json.loads(json.dumps(row))
            if bare:
                r["tools"] = [TOOL]
            if as_string:
                for m in r["messages"]:
                    for c in m.get("tool_calls", []):
                        c["function"]["arguments"] = json.dumps(c["function"]["arguments"])
            out.append(r)
    return out


def renderable(tok, row: dict) -> Optional[dict]:
    """The row (or the first tools variant) that the template renders directly; None when none renders."""
    # a row without tools also as the model's own chat code passes it to a template that loops over tools
    for r in _tool_variants(row) if "tools" in row else [row, {**row, "tools": []}]:
        try:
            tok.apply_chat_template(r["messages"], tools=r.get("tools"), tokenize=False)
            return r
        except Exception:  # noqa: BLE001 - the template's own refusal
            continue
    return None


def refusal(tok, row: dict) -> str:
    try:
        tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
    except Exception as e:  # noqa: BLE001
        return str(e).splitlines()[0][:120]
    return ""


def trained_runs(ids: List[int], labels: List[int]) -> List[List[int]]:
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def encode(tok, row: dict, data_spec):
    from fttool.data.formats import Formatter
    from fttool.data.tokenize import Encoder

    ex = Formatter("chat", {}, {}, None)("case", row)
    out = Encoder(tok, None, data_spec).encode_batch(["case"], [ex])
    return {k: v[0] for k, v in out.items()}, ex


def check(name: str, case: str, data_spec) -> str:
    """Encode one conversation class under one template and compare with the reference. Returns "refused: why" when
    the template itself cannot render the conversation (fttool must then refuse it with a message), "" when right;
    raises AssertionError naming what is wrong otherwise."""
    from fttool.errors import UserError

    tok = tokenizer(name)
    end_marker = sorted(END[name])[0] if END[name] else EOS
    row = renderable(tok, conversations(end_marker)[case])
    if row is None:
        raw = conversations(end_marker)[case]
        try:
            encode(tok, raw, data_spec)
        except UserError as e:
            assert "cannot render" in str(e) or "leaves out" in str(e), str(e)
            return f"refused: {refusal(tok, raw)}"
        raise AssertionError("the template cannot render this conversation but fttool accepted it")
    try:
        out, ex = encode(tok, row, data_spec)
    except UserError as e:  # right only where the template silently drops a message
        dropped = re.search(r"message #(\d+)", str(e))
        assert "leaves out" in str(e) and dropped, str(e)
        from fttool.data.formats import Formatter
        from fttool.data.tokenize import Encoder

        # the messages as fttool gives them to the template (tool schemas may have become a system message)
        msgs, tools, _ = Encoder(tok, None, data_spec).prepare_messages(Formatter("chat", {}, {}, None)("case", row))
        rendered = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
        assert msgs[int(dropped.group(1))]["content"] not in rendered, str(e)
        return f"refused: the template drops message #{dropped.group(1)}"
    ids, labels = out["input_ids"], out["labels"]
    # as fttool gives it to the template: tool schemas in the system message and tool calls as JSON text where the
    # template has no place for them (counted in the data statistics)
    from fttool.data.tokenize import Encoder

    msgs, tools, _ = Encoder(tok, None, data_spec).prepare_messages(ex)
    rendered = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    decoded = tok.decode(ids, skip_special_tokens=False)
    # nothing lost or added but the EOS fttool appends where no marker closes a reply
    assert decoded.replace(EOS, "") == rendered.replace(EOS, ""), (decoded, rendered)
    assert decoded.count(EOS) - rendered.count(EOS) == out["eos_appended"]
    # marker text inside messages never becomes the marker's token
    special = {t.content: i for i, t in tok.added_tokens_decoder.items() if t.special}
    any_special = re.compile("|".join(map(re.escape, sorted(special, key=len, reverse=True))))
    literal = sum(len(any_special.findall(m["content"])) for m in row["messages"])
    written = len(any_special.findall(rendered)) - literal + out["eos_appended"]
    assert sum(1 for i in ids if i in special.values()) == written, "a literal marker became a special token"
    replies = [m for m in ex["messages"] if m["role"] == "assistant"]
    runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(ids, labels)]
    assert len(runs) == len(replies), runs
    ends = END[name] | {EOS}
    for run, m in zip(runs, replies):
        assert any(run.endswith(e) for e in ends), f"trained run does not end with {sorted(ends)}: {run!r}"
        for h in HEADERS[name]:
            assert h not in run, f"header markup {h!r} trained: {run!r}"
        if m.get("tool_calls"):
            assert "Paris" in run, run  # the call's arguments are the model's output
            continue
        answer = m["content"].split("</think>")[-1]
        body = run[: len(run) - len(next(e for e in ends if run.endswith(e)))]
        at = body.find(answer.strip())
        assert at >= 0, f"reply {answer!r} not in its trained run {run!r}"
        before = body[:at]
        assert MODEL_PREFIX.match(before).end() == len(before) or (REASONING in before and REASONING in rendered), (
            f"trained before the reply: {before!r}"
        )
        lead = answer[: len(answer) - len(answer.lstrip())]
        if lead and lead + answer.strip() in rendered:  # the template keeps the reply's leading whitespace
            assert lead + answer.strip() in body, f"leading whitespace of the reply not trained: {run!r}"
        if REASONING in m["content"]:
            assert (REASONING in run) == (REASONING in rendered), "reasoning trained iff the template keeps it"
    for m in ex["messages"]:
        if m["role"] in ("user", "system") and m["content"].strip():
            assert all(m["content"].strip() not in r for r in runs), f"{m['role']} text trained"
    return ""
