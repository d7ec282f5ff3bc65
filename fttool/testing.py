"""Small randomly initialised models for tests, benchmarks and the GPU check: built here, never downloaded."""

from __future__ import annotations

from pathlib import Path


def random_llama(folder: Path, tokenizer, seed: int = 0, device: str = "cpu", dtype: str = "float32", **shape) -> int:
    """Save a Llama with random weights and `tokenizer` (a loaded tokenizer or a folder) into `folder`; its special
    token ids are the tokenizer's. `shape` overrides LlamaConfig's sizes (hidden 64, 2 layers, 4 heads by default).
    Returns the parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer)) if isinstance(tokenizer, (str, Path)) else tokenizer
    sizes = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    sizes.update(shape)
    cfg = LlamaConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype=dtype,
        **sizes,
    )
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch_dtype)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    params = sum(p.numel() for p in model.parameters())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return params


def reverse_pairs(rows, seed: int = 0):
    """Preference pairs from the demo's reverse-the-words rows ({"messages": [user, assistant]}): the correct reversal
    is chosen; the rejected reply is the words in their original order, or the reversal with two words swapped."""
    import random

    rng = random.Random(seed)
    out = []
    for r in rows:
        prompt, reply = r["messages"][0]["content"], r["messages"][1]["content"]
        words = reply.split()
        if len(words) < 2:
            continue
        if rng.random() < 0.5:
            wrong = list(reversed(words))
        else:
            wrong = list(words)
            i = rng.randrange(len(wrong) - 1)
            wrong[i], wrong[i + 1] = wrong[i + 1], wrong[i]
        if wrong == words:
            continue
        out.append({"prompt": prompt, "chosen": reply, "rejected": " ".join(wrong)})
    return out
