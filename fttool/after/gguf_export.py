"""A merged model written as one GGUF file (llama.cpp's format) with llama.cpp's own `gguf` package: its tensor-name
map, its writer, its quantizers and its special-vocabulary reader (merges, special token ids, chat template).

Written as llama.cpp's convert_hf_to_gguf.py writes these architectures, so that llama.cpp, Ollama and transformers'
GGUF loader read the file back: Llama and Mistral (q/k rows permuted to llama.cpp's rope layout), Qwen2, Qwen3,
Phi-3 (fused qkv and gate_up, as HF stores them) and Gemma 2 / Gemma 3 text (norm weights stored as 1 + w, llama.cpp's
RMSNorm convention; soft-capping and sliding window in the metadata). Two tokenizer kinds are written: byte-level BPE
(Llama 3, Qwen, SmolLM, GPT-2 style: tokenizer model "gpt2") and sentencepiece BPE with byte fallback (Llama 2,
Mistral v0.1-v0.3, Phi-3, Gemma: model "llama", with scores from the merge order). Anything else is refused by name.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from fttool.errors import UserError

log = logging.getLogger("fttool")

GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")


def _phi3(writer, cfg) -> None:
    scaling = getattr(cfg, "rope_scaling", None) or {}
    if isinstance(scaling, dict) and scaling.get("type", scaling.get("rope_type")) not in (None, "default"):
        raise UserError(
            f"format=gguf: this Phi-3 uses {scaling.get('type', scaling.get('rope_type'))} rope scaling (a long-context "
            "variant), whose factor tensors fttool does not write; export format=safetensors and convert with "
            "llama.cpp's convert_hf_to_gguf.py."
        )
    original = getattr(cfg, "original_max_position_embeddings", None)
    if original:
        writer.add_rope_scaling_orig_ctx_len(int(original))
    writer.add_sliding_window(int(getattr(cfg, "sliding_window", None) or 0))


def _gemma(writer, cfg) -> None:
    for key, add in (
        ("attn_logit_softcapping", writer.add_attn_logit_softcapping),
        ("final_logit_softcapping", writer.add_final_logit_softcapping),
    ):
        if getattr(cfg, key, None) is not None:
            add(float(getattr(cfg, key)))
    if getattr(cfg, "sliding_window", None):
        writer.add_sliding_window(int(cfg.sliding_window))


@dataclass(frozen=True)
class Arch:
    """How one transformers model_type is written: llama.cpp's architecture name and its conventions."""

    gguf: str
    permute_qk: bool = False  # q/k rows permuted to llama.cpp's interleaved rope (Llama, Mistral)
    norm_plus_one: bool = False  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w, so 1 + w is stored
    extra: Optional[Callable] = None  # architecture-specific metadata


# transformers model_type -> how it is written
ARCHS = {
    "llama": Arch("llama", permute_qk=True),
    "mistral": Arch("llama", permute_qk=True),
    "qwen2": Arch("qwen2"),
    "qwen3": Arch("qwen3"),
    "phi3": Arch("phi3", extra=_phi3),
    "gemma2": Arch("gemma2", norm_plus_one=True, extra=_gemma),
    "gemma3_text": Arch("gemma3", norm_plus_one=True, extra=_gemma),
}
# tokenizer.ggml.pre: how llama.cpp splits text before byte-level BPE. Read off the tokenizer's own pre-tokenizer
# (its Split regex, a digit split, GPT-2's built-in regex) where it is one llama.cpp knows; else by model family.
_APOS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_BY_REGEX = {
    _APOS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}" + _TAIL: "llama-bpe",  # Llama 3
    _APOS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + _TAIL: "qwen2",  # Qwen 2 / 2.5 / 3
}
PRE_BY_TYPE = {"qwen2": "qwen2", "qwen3": "qwen2"}


def pre_tokenizer_name(tok) -> str:
    """llama.cpp's name for this byte-level tokenizer's pre-tokenizer, "" where it is not one llama.cpp knows."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return ""
    pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    regexes = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split" and "pattern" in p]
    if kinds == ["Split", "ByteLevel"] and regexes[0] in PRE_BY_REGEX and not parts[1].get("use_regex", True):
        return PRE_BY_REGEX[regexes[0]]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # each digit alone, then GPT-2's regex (SmolLM, and llama.cpp's smollm pre)
    return ""


def check_exportable(config) -> None:
    kind = getattr(config, "model_type", "")
    if kind not in ARCHS:
        raise UserError(
            f"format=gguf: fttool writes GGUF for {', '.join(sorted(ARCHS))} models, not model_type '{kind}'; "
            "export format=safetensors and convert that folder with llama.cpp's convert_hf_to_gguf.py."
        )


def _general_name(name: str, tok, arch: Arch) -> str:
    """general.name as llama.cpp needs it. llama.cpp strips the whitespace after Phi-3's special tokens (as the HF
    tokenizer's rstrip does) only when the model's name contains "phi-3" or "phi3": the attribute is not stored in
    GGUF. So a Phi-3 vocabulary whose special tokens rstrip gets "Phi-3" in its name."""
    rstrips = any(t.special and t.rstrip for t in tok.added_tokens_decoder.values())
    if arch.gguf == "phi3" and rstrips and not any(k in name.lower() for k in ("phi-3", "phi3")):
        return f"{name} (Phi-3)"
    return name


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


def tokenizer_model(tok) -> str:
    """llama.cpp's tokenizer model for this tokenizer: "gpt2" (byte-level BPE) or "llama" (sentencepiece BPE with
    byte fallback); anything else is refused by name."""
    backend = getattr(tok, "backend_tokenizer", None)
    model = backend.model if backend is not None else None
    if type(model).__name__ == "BPE":
        if "ByteLevel" in str(backend.pre_tokenizer):
            return "gpt2"
        if getattr(model, "byte_fallback", False):
            return "llama"
    raise UserError(
        "format=gguf: fttool writes byte-level BPE (Llama 3, Qwen, SmolLM, GPT-2 style) and sentencepiece BPE with "
        f"byte fallback (Llama 2, Mistral, Phi-3, Gemma) tokenizers; this one is {type(model).__name__}. "
        "Export format=safetensors and convert with llama.cpp's convert_hf_to_gguf.py."
    )


def _merge_scores(tok_dir: Path) -> Dict[str, float]:
    """Sentencepiece scores from the BPE merge order: the piece a merge of rank r makes scores -r, so llama.cpp's
    highest-score-first merging applies the merges in the order transformers' BPE does."""
    model = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    scores: Dict[str, float] = {}
    for rank, merge in enumerate(model.get("merges") or ()):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _vocab(gguf, tok, tok_dir: Path, writer, n_vocab: int, kind: str, pre: str) -> None:
    """The vocabulary of tokenizer model `kind`: tokens by id, their types (and, for sentencepiece, scores), merges,
    special ids and the chat template."""
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in tok.added_tokens_decoder.values()}
    scores = _merge_scores(tok_dir) if kind == "llama" else {}
    unk = getattr(tok, "unk_token", None)
    T = gguf.TokenType
    tokens, types, token_scores = [], [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        score = 0.0
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif kind == "llama" and t == unk:
            tokens.append(t)
            types.append(T.UNKNOWN)
        elif t in added:
            tokens.append(t)
            types.append(T.CONTROL if added[t].special else T.USER_DEFINED)
        elif kind == "llama" and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            tokens.append(t)
            types.append(T.BYTE)
        else:
            tokens.append(t)
            types.append(T.NORMAL)
            score = scores.get(t, -float(len(scores) + i))  # a piece no merge makes: a single character
        token_scores.append(score)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre if kind == "gpt2" else "default")
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(token_scores)
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


def _rope(cfg) -> dict:
    """The rope parameters of full attention (Gemma 3 keeps one set per layer type)."""
    rope = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        rope = rope["full_attention"]
    return rope if isinstance(rope, dict) else {}


def write(model, tok, tok_dir: Path, out: Path, gguf_type: str, name: str, pre: str = "") -> Dict:
    """Write `model` (merged, plain transformers) and its tokenizer (saved in tok_dir) to `out`; returns a summary."""
    import numpy as np
    import torch

    from fttool.gguf_read import need_gguf

    gguf = need_gguf()
    from gguf.quants import quantize

    cfg = model.config
    check_exportable(cfg)
    arch = ARCHS[cfg.model_type]
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = _rope(cfg)
    rotary = float(rope.get("partial_rotary_factor") or getattr(cfg, "partial_rotary_factor", None) or 1.0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.gguf.upper()], cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(out), arch.gguf)
    writer.add_name(_general_name(name, tok, arch))
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rotary))
    writer.add_rope_freq_base(float(rope.get("rope_theta") or getattr(cfg, "rope_theta", None) or 10000.0))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    if arch.extra is not None:
        arch.extra(writer, cfg)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kind = tokenizer_model(tok)
    if not pre and kind == "gpt2":
        pre = pre_tokenizer_name(tok) or PRE_BY_TYPE.get(cfg.model_type, "")
        if not pre:
            log.warning(
                "format=gguf: this tokenizer's pre-tokenizer is not one llama.cpp knows by name; the GGUF says "
                "'default' (GPT-2's split), so llama.cpp may split some text differently than transformers does. "
                "llama.cpp's convert_hf_to_gguf.py names the pre-tokenizers it supports."
            )
    _vocab(gguf, tok, tok_dir, writer, cfg.vocab_size, kind, pre or "default")

    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    counts: Dict[str, int] = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the tied output layer from token_embd
        gg_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gg_name is None:
            raise UserError(f"format=gguf: no GGUF name for tensor {hf_name} of a {cfg.model_type} model.")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch.permute_qk and hf_name.endswith("q_proj.weight"):
            data = _permute(data, n_head)
        elif arch.permute_qk and hf_name.endswith("k_proj.weight"):
            data = _permute(data, n_kv)
        elif arch.norm_plus_one and hf_name.endswith("norm.weight"):
            data = data + 1.0
        qtype = _tensor_type(gguf, gg_name, data, gguf_type)
        stored = data if qtype == gguf.GGMLQuantizationType.F32 else quantize(np.ascontiguousarray(data), qtype)
        writer.add_tensor(gg_name, stored, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "file": out.name, "name": _general_name(name, tok, arch), "architecture": arch.gguf,
        "tensor_types": counts, "tokenizer": kind, "pre_tokenizer": pre,
    }  # fmt: skip


def modelfile(gguf_name: str, tok) -> str:
    """An Ollama Modelfile beside the GGUF: its stop tokens (Ollama takes the chat template from the GGUF itself)."""
    stops = [t for t in {tok.eos_token, "<|im_end|>", "<|eot_id|>", "<|end|>"} if t and t in tok.get_vocab()]
    lines = [f"FROM ./{gguf_name}", "PARAMETER temperature 0"]
    lines += [f'PARAMETER stop "{s}"' for s in sorted(stops)]
    return "\n".join(lines) + "\n"
