"""The run's tokenizer, loaded from the spec's model; a tokenizer without a pad token pads with its EOS token (the one
place this fallback is decided: training, evaluation, export and generation all use it)."""

from __future__ import annotations

from fttool import assets, gguf_read
from fttool.errors import UserError


def with_pad(tok):
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(spec):
    from transformers import AutoTokenizer

    path = assets.resolve(spec.model.name_or_path)
    if spec.model.gguf_file:
        gguf_read.check_loadable(spec.model)
    try:
        tok = AutoTokenizer.from_pretrained(
            path,
            revision=spec.model.revision,
            trust_remote_code=spec.model.trust_remote_code,
            **gguf_read.load_kwargs(spec.model),
        )
    except (OSError, ValueError) as e:
        raise UserError(
            f"model.name_or_path={spec.model.name_or_path}: could not load its tokenizer: {str(e).splitlines()[0]}"
        )
    return with_pad(tok)
