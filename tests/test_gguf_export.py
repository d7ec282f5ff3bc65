"""GGUF export of every architecture and tokenizer kind fttool writes, read back by transformers' own GGUF loader:
the same logits (f32 exactly, 16-bit and q8_0 within their rounding), the same token ids on the raw tokenizer, the
same chat template. Tiny random models with real vocabularies (byte-level BPE: the bundled tiny-chat tokenizer;
sentencepiece BPE with byte fallback: phi-3-mini's from ../shared, and a Gemma tokenizer built from it), so no file
is fetched. Refusals (an architecture, a tokenizer kind, a GGUF type) are named."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA, run_cli_here

PHI3_TOK = SHARED_DATA / "tokenizers" / "phi-3-mini"
# text a tokenizer can get wrong: double spaces, a leading space, new lines, a tab, digits, accents, CJK, an emoji
TEXTS = ["Reverse the words: red fox  über 😀 x", "  leading\n\nnew lines\ttab 123456 ÄÖÜ ☃ 中文字符", "Hello world"]


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_a_gguf_of_an_unsupported_architecture_or_type_is_named(tmp_path):
    import gguf
    import numpy as np

    from fttool import gguf_read
    from fttool.config.spec import ModelSpec
    from fttool.errors import UserError

    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "rwkv7")
    w.add_tensor("blk.0.x.weight", np.zeros((1, 292), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = gguf_read.describe(tmp_path / "odd.gguf")
    assert info["architecture"] == "rwkv7" and info["tensor_types"] == ["Q8_K"]
    with pytest.raises(UserError, match="Q8_K cannot be dequantized"):
        gguf_read.check_dequantizable(tmp_path / "odd.gguf", info)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        gguf_read.describe(tmp_path / "bad.gguf")
    r = run_cli_here(
        "train", f"model.name_or_path={tmp_path}", "model.gguf_file=odd.gguf", f"output_dir={tmp_path / 'runs'}"
    )
    assert r.returncode != 0 and "architecture 'rwkv7'" in r.stderr and "cannot read" in r.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    from fttool.plan import shapes

    with pytest.raises(UserError, match="is not on this machine"):
        shapes.of_model(ModelSpec("org/not-fetched", gguf_file="m.gguf"))


def _sentencepiece_vocab():
    data = json.loads((PHI3_TOK / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    return dict(data["vocab"]), merges


def _gemma_tokenizer():
    """A Gemma-shaped tokenizer (sentencepiece BPE with byte fallback, <start_of_turn>/<end_of_turn>, Gemma's chat
    format) on phi-3-mini's vocabulary: Gemma's own is 262k pieces, too big for a tiny test."""
    from transformers import GemmaTokenizer

    vocab, merges = _sentencepiece_vocab()
    for t in ("<start_of_turn>", "<end_of_turn>", "<pad>"):
        vocab[t] = len(vocab)
    tok = GemmaTokenizer(
        vocab=vocab, merges=merges, unk_token="<unk>", bos_token="<s>", eos_token="<end_of_turn>", pad_token="<pad>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}"
        "\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
        "{% endif %}"
    )
    return tok


def _tiny(kind: str, tmp_path):
    """(model, tokenizer) of one architecture, random weights; biases and norm weights randomised so that a lost
    bias or a norm stored without Gemma's + 1 shows in the logits."""
    import torch
    import transformers as tf
    from transformers import AutoTokenizer

    from fttool import assets

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512)  # fmt: skip
    if kind in ("llama", "qwen2"):
        tok = AutoTokenizer.from_pretrained(assets.resolve("fttool:tiny-chat"))
        if kind == "qwen2":  # Qwen's split (each digit alone): what transformers' GGUF loader builds for qwen2
            from tokenizers import Regex, pre_tokenizers

            from fttool.after.gguf_export import PRE_BY_REGEX

            qwen = next(r for r, name in PRE_BY_REGEX.items() if name == "qwen2")
            tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(qwen), "isolated"), pre_tokenizers.ByteLevel(False, use_regex=False)]
            )
    elif kind == "phi3":
        tok = AutoTokenizer.from_pretrained(str(PHI3_TOK))
    else:
        tok = _gemma_tokenizer()
    ids = dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=len(tok), num_hidden_layers=2, **common, **ids)
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(vocab_size=len(tok), num_hidden_layers=2, tie_word_embeddings=False, **common, **ids)
        model = tf.Qwen2ForCausalLM(cfg)
    elif kind == "phi3":  # phi-3-mini's vocabulary size: ids past the tokenizer's are [PAD] rows
        cfg = tf.Phi3Config(vocab_size=32064, num_hidden_layers=2, tie_word_embeddings=False, **common, **ids)
        model = tf.Phi3ForCausalLM(cfg)
    elif kind == "gemma2":  # Gemma's defaults kept: soft-capping 50/30, query_pre_attn_scalar 256; tied embeddings
        cfg = tf.Gemma2Config(vocab_size=len(tok), num_hidden_layers=2, head_dim=16, sliding_window=8, **common, **ids)
        model = tf.Gemma2ForCausalLM(cfg)
    else:  # six layers: five sliding, one full attention with its own rope base
        cfg = tf.Gemma3TextConfig(
            vocab_size=len(tok), num_hidden_layers=6, head_dim=16, sliding_window=8, **common, **ids
        )
        model = tf.Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
            elif n.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model.eval(), tok


def _round_trip(tmp_path, kind: str, gguf_type: str):
    """Export, load back with transformers' GGUF loader; the logits' largest difference relative to their scale."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from fttool.after import gguf_export

    model, tok = _tiny(kind, tmp_path)
    tok.save_pretrained(str(tmp_path / "tok"))
    out = tmp_path / f"m-{gguf_type}.gguf"
    summary = gguf_export.write(model, tok, tmp_path / "tok", out, gguf_type, "m")
    assert summary["tokenizer"] == ("gpt2" if kind in ("llama", "qwen2") else "llama")
    back = AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=out.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    back_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    conv = [{"role": "user", "content": TEXTS[0]}]
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert back_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == text
    # the tokenizer file as the model ships it, nothing rebuilt (transformers 5 rebuilds Phi-3's as Metaspace, which
    # adds no "▁" before text that starts with a space; sentencepiece, llama.cpp and the GGUF loader do)
    raw = Tokenizer.from_file(str((PHI3_TOK if kind == "phi3" else tmp_path / "tok") / "tokenizer.json"))
    for t in TEXTS:
        assert back_tok(t, add_special_tokens=False).input_ids == raw.encode(t, add_special_tokens=False).ids, t
    ids = raw.encode(text, add_special_tokens=False).ids * 2  # longer than Gemma's sliding window of 8
    a, b = _logits(model, ids), _logits(back, ids)
    return (a - b).abs().max().item() / a.abs().max().item(), summary


@pytest.mark.parametrize(
    "kind,gguf_type,tolerance",
    [("llama", "f32", 1e-5), ("llama", "q8_0", 0.05), ("qwen2", "f32", 1e-5), ("qwen2", "bf16", 0.03),
     ("phi3", "f32", 1e-5), ("phi3", "f16", 0.01), ("gemma2", "f32", 1e-5), ("gemma3", "f32", 1e-5)],
)  # fmt: skip
def test_gguf_export_round_trips_through_transformers_loader(tmp_path, kind, gguf_type, tolerance):
    diff, summary = _round_trip(tmp_path, kind, gguf_type)
    assert diff < tolerance
    assert summary["pre_tokenizer"] == {"llama": "gpt-2", "qwen2": "qwen2"}.get(kind, "")
    if kind == "phi3":  # llama.cpp strips the whitespace after Phi-3's special tokens only for a "phi-3" name
        assert summary["name"] == "m (Phi-3)"


def test_a_tokenizer_gguf_cannot_hold_and_a_long_context_phi3_are_refused_by_name(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import Phi3Config, PreTrainedTokenizerFast

    from fttool.after import gguf_export
    from fttool.errors import UserError

    wordpiece = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1})))
    with pytest.raises(UserError, match="this one is WordPiece"):
        gguf_export.tokenizer_model(wordpiece)
    cfg = Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=8192, original_max_position_embeddings=4096,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8},
    )  # fmt: skip
    with pytest.raises(UserError, match="longrope rope scaling"):
        gguf_export._phi3(None, cfg)
