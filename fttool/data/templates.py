"""Chat templates: the tokenizer's own, a named one shipped with fttool, a .jinja file, or Jinja text.

Named templates are for tokenizers without a template of their own (base models). Each one handles system,
user, assistant and tool turns, has a generation prompt, and closes every assistant reply with an
end-of-turn token so a fine-tuned model learns to stop. This module imports nothing heavy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from fttool.errors import UserError, suggestion

NAMED = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + ('ipython' if m['role'] == 'tool' else m['role'])"
        " + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
        "{% elif m['role'] == 'user' %}{{ '[INST] ' + ns.system + m['content'] + ' [/INST]' }}{% set ns.system = '' %}"
        "{% elif m['role'] == 'tool' %}{{ '[TOOL_RESULTS] ' + m['content'] + ' [/TOOL_RESULTS]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'tool' %}{{ '### Input:\\n' + m['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "phi-3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.system = m['content'] + '\\n\\n' %}"
        "{% else %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' + ns.system"
        " + m['content'] + '<end_of_turn>\\n' }}{% set ns.system = '' %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}


def resolve(value: Optional[str], key: str = "data.template") -> Optional[str]:
    """The Jinja source data.template names; None when the tokenizer's own template is to be used."""
    if value is None or value == "":
        return None
    if value in NAMED:
        return NAMED[value]
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if path.suffix in (".jinja", ".j2", ".txt") or path.exists():
        if not path.is_file():
            raise UserError(f"{key}={value}: no such template file.")
        return path.read_text(encoding="utf-8")
    raise UserError(
        f"{key}={value}: not a template name, a .jinja file or Jinja text.{suggestion(value, NAMED)} "
        f"Named templates: {', '.join(NAMED)}."
    )


SAMPLES = [
    [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ],
]


def _render(tokenizer, template: str, messages, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # a template may reject a role
        return f"(cannot render: {e})"


def _renderings(tokenizer, template: str) -> list:
    return [_render(tokenizer, template, m, g) for m in SAMPLES for g in (False, True)] + [
        _render(tokenizer, template, SAMPLES[0][:2], True)
    ]


def check_change(tokenizer, training: str, allow: bool, name: str) -> None:
    """Fail when the training template renders differently from the tokenizer's own, unless the user allowed it.
    Templates that differ only in source text but render the same conversations identically are the same."""
    own = tokenizer.chat_template
    if not own or own == training or allow or _renderings(tokenizer, own) == _renderings(tokenizer, training):
        return
    raise UserError(
        f"data.template={name} differs from the chat template the tokenizer ships with, which is what inference "
        f"will use with the base tokenizer. A short conversation renders as:\n"
        f"  tokenizer's own: {_render(tokenizer, own, SAMPLES[0])!r}\n"
        f"  data.template:   {_render(tokenizer, training, SAMPLES[0])!r}\n"
        "Remove data.template to train with the tokenizer's own, or add data.allow_template_change=true "
        "(the run's final/ folder then carries the training template)."
    )


def end_of_turn(tokenizer) -> Optional[int]:
    """The token that closes an assistant reply under the tokenizer's chat template (<|im_end|>, <|eot_id|>, <|end|>),
    when that is one special token; None when the template closes replies with plain text (training then appends EOS)."""
    if not tokenizer.chat_template:
        return None
    probe = "\u2063reply\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template with its own rules about roles; fall back to EOS
        return None
    after = text[text.find(probe) + len(probe) :] if probe in text else ""
    ids = tokenizer(after.lstrip(" "), add_special_tokens=False)["input_ids"] if after else []
    if not ids:
        return None
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    return ids[0] if ids[0] in special else None
