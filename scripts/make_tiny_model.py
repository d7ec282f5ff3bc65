#!/usr/bin/env python
"""Generate the bundled demo assets for fttool (deterministic, offline, CPU).

Produces:
  fttool/assets/demo/train.jsonl (16,000 rows: 3 epochs = ~3,000 steps of 16), fttool/assets/demo/test.jsonl
      A synthetic chat dataset for a rule-based task: reverse the order of a
      short list of words ("Reverse the words: cat sun tree" -> "tree sun cat").
      Test rows are disjoint from train rows (different word sequences).
  fttool/assets/tiny-chat/
      A tiny Llama causal LM + a byte-level BPE tokenizer with a ChatML chat
      template (eos = <|im_end|>). The model is briefly pretrained on plain
      (non-chat) text from the same domain so that it is a real "base LM" that
      does *not* follow the instruction yet.

Usage (from the repo root):
    python scripts/make_tiny_model.py [--out-root fttool/assets] [--pretrain-steps N]

Runtime: ~50 s on 2 CPU cores. Output is bit-identical across runs on the same
machine/torch build (seeded; other CPUs/thread counts may differ in the last bits).

Measured with a plain transformers Trainer on 2 CPU cores (batch 16, cosine
schedule, warmup 5%, loss on assistant tokens + closing <|im_end|> only, greedy
exact match on the 100 test rows; base model = 0.00):
  full fine-tune, lr 1e-3, 500 steps  (~10 s)  -> 0.93
  full fine-tune, lr 1e-3, 3000 steps (~55 s)  -> 1.00 (3 seeds)
  LoRA r16/a32, all-linear, lr 2e-3, 1000 steps (~27 s) -> 1.00
  LoRA r16/a32, q/k/v/o only, lr 2e-3, 3000 steps (~60 s) -> 0.72-0.98
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

SEED = 1234

# --------------------------------------------------------------------------
# Demo task data
# --------------------------------------------------------------------------

WORDS = [
    # animals
    "cat",
    "dog",
    "fox",
    "owl",
    "bee",
    "cow",
    "pig",
    "hen",
    "bat",
    "rat",
    "ant",
    "elk",
    "yak",
    "eel",
    "ape",
    "bear",
    "wolf",
    "frog",
    "fish",
    "bird",
    "duck",
    "goat",
    "lion",
    "deer",
    "crab",
    "moth",
    "mole",
    "seal",
    "swan",
    "toad",
    # nature
    "sun",
    "moon",
    "star",
    "tree",
    "leaf",
    "rock",
    "sand",
    "snow",
    "rain",
    "wind",
    "lake",
    "hill",
    "sea",
    "sky",
    "fire",
    "ice",
    "rose",
    "corn",
    "seed",
    "wave",
    # things
    "book",
    "door",
    "cup",
    "pen",
    "box",
    "key",
    "ship",
    "car",
    "bell",
    "lamp",
    "hat",
    "shoe",
    "ring",
    "coin",
    "bread",
    "milk",
    "cake",
    "salt",
    "rope",
    "drum",
    # colours
    "red",
    "blue",
    "green",
    "gold",
    "pink",
    "gray",
    "black",
    "white",
]
assert len(set(WORDS)) == len(WORDS)

PROMPTS = [
    "Reverse the words: {w}",
    "Reverse the order of these words: {w}",
    "Write these words in reverse order: {w}",
]

MIN_WORDS, MAX_WORDS = 3, 5
N_TRAIN, N_TEST = 16000, 100


def make_dataset(rng: random.Random):
    seen: set[tuple[str, ...]] = set()
    rows = []
    while len(rows) < N_TRAIN + N_TEST:
        n = rng.randint(MIN_WORDS, MAX_WORDS)
        seq = tuple(rng.sample(WORDS, n))
        if seq in seen:
            continue
        seen.add(seq)
        prompt = rng.choice(PROMPTS).format(w=" ".join(seq))
        answer = " ".join(reversed(seq))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    # first N_TEST rows are the test split; sequences are unique -> disjoint
    return rows[N_TEST:], rows[:N_TEST]


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------
# Generic plain text (for the tokenizer and the base-model pretraining)
# --------------------------------------------------------------------------

GENERIC_TEXT = """\
Once upon a time there was a small village near a quiet lake. The people of the
village worked in the fields during the day and told stories by the fire at night.
In the spring the hills turned green, and in the winter the snow covered every roof.
A language model reads text one token at a time and learns to predict what comes next.
Numbers such as 1, 2, 3, 10, 42 and 2024 appear in text, and so do names like Anna and Tom.
Please answer the question. What is the capital of France? The capital of France is Paris.
Water boils at one hundred degrees. The sky is blue because light is scattered by the air.
She opened the door, picked up the book from the table and walked out into the rain.
"""

ANIMALS, NATURE, THINGS, COLOURS = WORDS[:30], WORDS[30:50], WORDS[50:70], WORDS[70:]
VERBS = ["sees", "finds", "likes", "watches", "follows", "carries", "hides", "wants", "holds"]
PLACES = [
    "near the lake",
    "on the hill",
    "by the sea",
    "under the tree",
    "in the snow",
    "in the rain",
    "at night",
    "in the morning",
    "by the fire",
    "on the rock",
]


def generic_sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        # Repeated lists: the base LM learns to *copy* (forms induction heads), which
        # makes the later instruction fine-tune fast; it never sees a reversal.
        # The newline variants teach that "cat" (line start) and " cat" are the same word.
        items = " ".join(rng.sample(WORDS, rng.randint(3, 5)))
        return rng.choice(
            [
                f"Words: {items}. Again: {items}.",
                f"The list was {items}, and I wrote down {items}.",
                f"Words: {items}.\n{items}\n",
                f"List:\n{items}\nAgain: {items}.",
            ]
        )
    k = rng.randrange(5)
    if k == 0:
        return (
            f"The {rng.choice(COLOURS)} {rng.choice(ANIMALS)} {rng.choice(VERBS)} "
            f"the {rng.choice(THINGS)} {rng.choice(PLACES)}."
        )
    if k == 1:
        return (
            f"A {rng.choice(ANIMALS)} and a {rng.choice(ANIMALS)} "
            f"{rng.choice(['play', 'sleep', 'walk', 'sing', 'wait'])} {rng.choice(PLACES)}."
        )
    if k == 2:
        items = rng.sample(WORDS, rng.randint(3, 6))
        return "Words: " + " ".join(items) + "."
    if k == 3:
        return (
            f"I have a {rng.choice(COLOURS)} {rng.choice(THINGS)}, a {rng.choice(THINGS)} and a {rng.choice(NATURE)}."
        )
    return f"The {rng.choice(NATURE)} is {rng.choice(COLOURS)} {rng.choice(PLACES)}, said the {rng.choice(ANIMALS)}."


def make_generic_corpus(rng: random.Random, n_docs: int = 3000) -> list[str]:
    docs = [line.strip() for line in GENERIC_TEXT.splitlines() if line.strip()]
    for _ in range(n_docs):
        docs.append(" ".join(generic_sentence(rng) for _ in range(rng.randint(2, 4))))
    return docs


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

BOS, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, IM_START, IM_END]  # ids 0..3

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=IM_END,
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


# --------------------------------------------------------------------------
# Model + short pretraining
# --------------------------------------------------------------------------


def build_model(tokenizer, hidden_size: int = 128, num_layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=3 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    return LlamaForCausalLM(cfg)


def pretrain(
    model, tokenizer, docs: list[str], steps: int, seq_len: int = 64, batch_size: int = 16, lr: float = 1e-3, log=print
):
    """Plain next-token LM training on packed generic text (no chat format)."""
    import torch

    bos_id = tokenizer.convert_tokens_to_ids(BOS)
    stream: list[int] = []
    for d in docs:
        stream.append(bos_id)
        stream.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
    data = torch.tensor(stream, dtype=torch.long)
    n_chunks = len(data) // seq_len
    data = data[: n_chunks * seq_len].view(n_chunks, seq_len)

    g = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warmup, then linear decay
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / (steps - warmup))
    )
    model.train()
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(0, n_chunks, (batch_size,), generator=g)
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            log(f"  pretrain step {step:4d}/{steps} loss {loss.item():.3f} ({time.time() - t0:.1f}s)")
    model.eval()
    return model


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-root", default="fttool/assets")
    ap.add_argument("--vocab-size", type=int, default=768)
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--hidden-size", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import GenerationConfig

    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True, warn_only=True)

    out_root = Path(args.out_root)
    demo_dir, model_dir = out_root / "demo", out_root / "tiny-chat"
    t_start = time.time()

    # 1. data
    rng = random.Random(SEED)
    train_rows, test_rows = make_dataset(rng)
    write_jsonl(demo_dir / "train.jsonl", train_rows)
    write_jsonl(demo_dir / "test.jsonl", test_rows)
    print(f"wrote {len(train_rows)} train / {len(test_rows)} test rows to {demo_dir}")

    # 2. tokenizer (trained on demo chat text + generic text)
    generic_docs = make_generic_corpus(random.Random(SEED + 1))
    tok_texts = list(generic_docs)
    for r in train_rows:
        tok_texts.extend(m["content"] for m in r["messages"])
    tok_texts.extend(["user", "assistant", "system"] * 50)
    tokenizer = build_tokenizer(tok_texts, args.vocab_size)
    print(f"tokenizer: vocab {len(tokenizer)}")

    # 3. model + short plain-text pretraining (generic text only, no chat data)
    model = build_model(tokenizer, args.hidden_size, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M params; pretraining {args.pretrain_steps} steps")
    if args.pretrain_steps > 0:
        pretrain(model, tokenizer, generic_docs, args.pretrain_steps, lr=args.pretrain_lr)

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    for f in model_dir.iterdir():
        f.chmod(0o644)

    # 4. sanity check: reload offline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(model_dir)
    model2 = AutoModelForCausalLM.from_pretrained(model_dir)
    msgs = test_rows[0]["messages"][:1]
    ids = tok2.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model2.generate(**ids, max_new_tokens=16, do_sample=False)
    print("sample prompt :", msgs[0]["content"])
    print("base output   :", repr(tok2.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)))
    probe = "Words: ape cat elk pink. Again:"
    enc = tok2(probe, return_tensors="pt")
    out = model2.generate(**enc, max_new_tokens=5, do_sample=False)
    print(
        "copy probe    :",
        repr(probe),
        "->",
        repr(tok2.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)),
    )
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    print(f"saved {model_dir} ({size / 1e6:.2f} MB); total time {time.time() - t_start:.1f}s")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
