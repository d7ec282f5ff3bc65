"""A merged model written as one GGUF file (llama.cpp's format) with llama.cpp's own `gguf` package: its tensor-name
map, its writer, its quantizers and its special-vocabulary reader (merges, special token ids, chat template).

Written as llama.cpp's convert_hf_to_gguf.py writes these architectures, so that llama.cpp, Ollama and transformers'
GGUF loader read the file back: Llama and Mistral (q/k rows permuted to llama.cpp's rope layout), Qwen2 and Qwen3.
Byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, GPT-2 style) are written; a sentencepiece tokenizer is refused by
name (llama.cpp's converter handles those).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict

from fttool.errors import UserError

log = logging.getLogger("fttool")

GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")
# transformers model_type -> (gguf architecture name, q/k permuted for llama.cpp's rope)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False)}
# tokenizer.ggml.pre: how llama.cpp splits text before BPE, by the vocabulary it was learned on
PRE_BY_TYPE = {"qwen2": "qwen2", "qwen3": "qwen2"}


def check_exportable(config) -> None:
    kind = getattr(config, "model_type", "")
    if kind not in ARCHS:
        raise UserError(
            f"format=gguf: fttool writes GGUF for {', '.join(sorted(ARCHS))} models, not model_type '{kind}'; "
            "export format=safetensors and convert that folder with llama.cpp's convert_hf_to_gguf.py."
        )


def _permute(w, n_head: int):
    """HF's q/k rows -> llama.cpp's (interleaved rotary pairs), as convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_type(gguf, name: str, data, wanted: str):
    """The stored type of one tensor: norms and other 1-D tensors stay F32 (as llama.cpp keeps them); Q8_0 needs
    rows of whole 32-value blocks (else F16)."""
    T = gguf.GGMLQuantizationType
    if data.ndim < 2 or wanted == "f32":
        return T.F32
    if wanted == "q8_0":
        return T.Q8_0 if data.shape[-1] % 32 == 0 else T.F16
    return {"f16": T.F16, "bf16": T.BF16}[wanted]


def _vocab(gguf, tok, tok_dir: Path, writer, n_vocab: int, pre: str) -> None:
    """Byte-level BPE vocabulary: tokens by id, their types, merges, special ids and the chat template."""
    backend = getattr(tok, "backend_tokenizer", None)
    model = backend.model if backend is not None else None
    if type(model).__name__ != "BPE" or "ByteLevel" not in str(backend.pre_tokenizer):
        raise UserError(
            "format=gguf: fttool writes byte-level BPE tokenizers (Llama 3, Qwen, SmolLM, GPT-2 style); this one is "
            f"{type(model).__name__}. Export format=safetensors and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(T.CONTROL if added[t].special else T.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(T.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tok_dir, load_merges=True, n_vocab=n_vocab)
    if tok.pad_token_id is not None:
        special.special_token_ids.setdefault("pad", tok.pad_token_id)
    if not special.merges:
        raise UserError("format=gguf: the tokenizer has no BPE merges to write; its tokenizer.json is incomplete.")
    if not special.chat_template and tok.chat_template:
        special.chat_template = tok.chat_template
    special.add_to_gguf(writer, quiet=True)


def source_pre(spec) -> str:
    """The pre-tokenizer name of the GGUF the run started from (kept as it was), else one by model family."""
    from fttool import gguf_read

    path = gguf_read.file_of(spec.model)
    if path is not None and path.is_file():
        pre = gguf_read.value(gguf_read.reader(path), "tokenizer.ggml.pre")
        if pre:
            return str(pre)
    return ""


def write(model, tok, tok_dir: Path, out: Path, gguf_type: str, name: str, pre: str = "") -> Dict:
    """Write `model` (merged, plain transformers) and its tokenizer (saved in tok_dir) to `out`; returns a summary."""
    import numpy as np
    import torch

    from fttool.gguf_read import need_gguf

    gguf = need_gguf()
    from gguf.quants import quantize

    cfg = model.config
    check_exportable(cfg)
    arch, permuted = ARCHS[cfg.model_type]
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    writer.add_rope_freq_base(float(theta or getattr(cfg, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _vocab(gguf, tok, tok_dir, writer, cfg.vocab_size, pre or PRE_BY_TYPE.get(cfg.model_type, "default"))

    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    counts: Dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the tied output layer from token_embd
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise UserError(f"format=gguf: no GGUF name for tensor {hf_name} of a {cfg.model_type} model.")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if permuted and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif permuted and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        qtype = _tensor_type(gguf, gg_name, data, gguf_type)
        stored = data if qtype == gguf.GGMLQuantizationType.F32 else quantize(np.ascontiguousarray(data), qtype)
        writer.add_tensor(gg_name, stored, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": out.name, "architecture": arch, "tensor_types": counts, "pre_tokenizer": pre}


def modelfile(gguf_name: str, tok) -> str:
    """An Ollama Modelfile beside the GGUF: its stop tokens (Ollama takes the chat template from the GGUF itself)."""
    stops = [t for t in {tok.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>"} if t and t in tok.get_vocab()]
    lines = [f"FROM ./{gguf_name}", "PARAMETER temperature 0"]
    lines += [f'PARAMETER stop "{s}"' for s in sorted(stops)]
    return "\n".join(lines) + "\n"
