"""GPU check: does fttool train correctly on this CUDA machine? One command, about 5 minutes on one GPU:

    python bench/gpu_check.py                  # from the repository root, fttool installed
    python bench/gpu_check.py --out DIR        # keep the model, runs and export in DIR (default: a temporary folder)

It builds a randomly initialised Llama-shaped model of about 1B parameters locally, with a real left-padding
tokenizer (phi-3-mini's from ../shared/data when present, else one it trains itself), and GSM8K in alpaca form
(../shared/data, else arithmetic rows it writes). Then, through fttool's own command line as a user runs it, for
LoRA, QLoRA (nf4, bf16 compute) and full fine-tuning, each with padded and padding-free batches, and DPO with LoRA
and QLoRA (pairs made from the same rows), it trains 30 steps in bf16 and checks: every loss and gradient norm finite, the loss falls. It prints peak GPU memory and
tokens/s per run as a table. Then it exports the QLoRA run, reloads it with plain AutoModelForCausalLM, and checks
that a left-padded batch of prompts of different lengths gives the logits of one prompt at a time (finite, equal
within bf16 rounding), and compares batched greedy generation with one prompt at a time. It also reports
whether this GPU's SDPA returns NaN for a fully masked query row (the reason fttool pads training batches on the
right and repairs generation masks). Nothing is loaded from a hub. Exit 0 when every check passes, 1 otherwise;
on a machine without CUDA it says so and exits 0.

`--cpu-dry-run` runs the same flow on the CPU with a tiny model and a few steps, to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
GSM8K = SHARED / "alpaca" / "alpacadatacleaned_gsm_8k_train.json"
PHI3 = SHARED / "tokenizers" / "phi-3-mini"
# ~1.1B parameters, Llama-3.2-1B-like (hidden 2048, 16 layers, GQA 32/8)
GPU_SHAPE = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8
)
CPU_SHAPE = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
LR = {"lora": 1e-3, "qlora": 1e-3, "full": 5e-5}
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def sdpa_probe(device: str) -> str:
    """What this device's SDPA returns for a query row whose mask admits no key, in bf16."""
    import torch
    import torch.nn.functional as F

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (torch.randn(1, 8, 4, 64, device=device, dtype=dtype) for _ in range(3))
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool, device=device).tril()
    mask[..., 0, :] = False  # row 0 attends to nothing (a left-padded position)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return "NaN" if torch.isnan(out[..., 0, :]).any() else "finite"


def arithmetic_rows(n: int):
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        q = f"Tom has {a} apples and buys {c} bags of {b} apples each. How many apples does he have now?"
        rows.append(
            {
                "instruction": q,
                "input": "",
                "output": f"He buys {c} * {b} = {c * b} apples. {a} + {c * b} = {a + c * b}. #### {a + c * b}",
            }
        )
    return rows


def data_file(work: Path) -> Path:
    if GSM8K.is_file():
        return GSM8K
    path = work / "arithmetic.json"
    path.write_text(json.dumps(arithmetic_rows(2000)))
    return path


def tokenizer(work: Path):
    """phi-3-mini's real tokenizer (padding_side left), else a BPE one trained here on the data, also left-padding."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if PHI3.is_dir():
        return AutoTokenizer.from_pretrained(str(PHI3)), "phi-3-mini's (../shared/data)"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [" ".join(r.values()) for r in json.loads(data_file(work).read_text())]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    fast.chat_template = CHATML
    return fast, "a BPE one made here (no ../shared/data)"


def build_model(work: Path, device: str, shape: dict):
    from fttool.testing import random_llama

    tok, where = tokenizer(work)
    folder = work / "model"
    params = random_llama(
        folder,
        tok,
        device=device,
        dtype="bfloat16" if device == "cuda" else "float32",
        vocab_size=-(-len(tok) // 64) * 64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **shape,
    )
    return folder, params, where, tok.padding_side


def pairs_file(work: Path, data: Path) -> Path:
    """Preference pairs from the alpaca rows: the row's own answer is chosen over a fixed non-answer (an easy
    preference even a random model learns in a few steps, so a falling loss shows the machinery works)."""
    rows = json.loads(data.read_text())
    path = work / "pairs.jsonl"
    with open(path, "w") as f:
        for a in rows:
            prompt = (a["instruction"] + "\n" + a.get("input", "")).strip()
            f.write(json.dumps({"prompt": prompt, "chosen": a["output"], "rejected": "I am not sure."}) + "\n")
    return path


def run_name(method: str, packing: str, objective: str = "sft") -> str:
    if objective != "sft":
        return f"{method}-{objective}"
    return f"{method}-{'padded' if packing == 'none' else packing}"


def train_run(work: Path, model: Path, data: Path, method: str, packing: str, args, objective: str = "sft") -> dict:
    name = run_name(method, packing, objective)
    hw = ["hardware=single_gpu", "hardware.precision=bf16"] if args.device == "cuda" else ["hardware=cpu"]
    rows = ["data=alpaca", f"data.path={data}"]
    if objective == "dpo":  # chosen and rejected batches padded together: the left-padding tokenizer's other path
        rows = ["objective=dpo", "data=preference", f"data.path={pairs_file(work, data)}"]
    if objective == "grpo":  # left-padded prompts, sampled completions, the numeric reward on GSM8K-style answers
        rows += ["objective=grpo", "objective.num_generations=4", "objective.max_completion_length=32"]
    if (
        objective == "fullloss"
    ):  # SFT on the full logits: the baseline of the chunked LM-head loss every other run takes
        rows += ["train.loss_impl=full"]
    cmd = [
        sys.executable,
        "-m",
        "fttool",
        f"model.name_or_path={model}",
        *rows,
        f"data.max_samples={args.steps * args.batch}",
        "data.max_length=512",
        "data.val_ratio=0",
        "data.test_ratio=0",
        f"method={method}",
        f"data.packing={packing}",
        *hw,
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}",
        "train.grad_accum=1",
        "train.logging_steps=1",
        "train.save_steps=100000",
        f"train.lr={LR[method]}",
        "train.warmup_ratio=0.1",
        "eval.after_training=false",
        f"data.cache_dir={work / 'cache'}",
        f"output_dir={work / 'runs'}",
        f"run_name={name}",
    ]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    run_dir = work / "runs" / name
    (work / f"{name}.log").write_text(r.stdout + r.stderr)
    out = {
        "name": name,
        "method": method,
        "packing": packing,
        "rc": r.returncode,
        "wall_s": time.time() - t0,
        "run_dir": run_dir,
        "problems": [],
    }
    if r.returncode != 0:
        out["problems"].append(f"exit {r.returncode}: " + (r.stderr.strip().splitlines() or ["?"])[-1][:300])
        return out
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [x for x in rows if "loss" in x]
    result = json.loads((run_dir / "result.json").read_text())
    losses, norms = [x["loss"] for x in rows], [x.get("grad_norm") for x in rows]
    k = max(1, min(5, len(losses) // 3))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    out.update(
        first=first,
        last=last,
        max_norm=max((n for n in norms if n is not None), default=float("nan")),
        peak=result.get("peak_memory", {}),
        vs=result.get("plan_vs_measured", {}),
        tokens_per_s=result.get("tokens_per_s"),
        steps=result["steps"],
    )
    if not all(math.isfinite(x) for x in losses):
        out["problems"].append("non-finite loss")
    if not all(n is not None and math.isfinite(n) for n in norms):
        out["problems"].append("non-finite grad norm")
    if objective == "grpo":  # a policy-gradient loss need not fall; its rewards must be numbers
        rewards = [x.get("reward") for x in rows]
        if not all(r is not None and math.isfinite(r) for r in rewards):
            out["problems"].append(f"reward missing or non-finite: {rewards[:5]}")
    elif not last < first:
        out["problems"].append(f"loss did not fall ({first:.3f} -> {last:.3f})")
    if result.get("nonfinite_steps"):
        out["problems"].append(f"non-finite steps skipped: {result['nonfinite_steps']}")
    return out


def prefill_logits(model, tok, convs, repaired: bool = True):
    """Each prompt's logits at its real positions from one left-padded batch (fttool's mask repair on or off)."""
    from contextlib import nullcontext

    import torch

    from fttool.after.attention import no_fully_masked_rows
    from fttool.after.evaluate import left_padded
    from fttool.data import pack, prompt_ids

    prompts = [prompt_ids(tok, c) for c in convs]
    ids, mask = left_padded(prompts, pack.pad_id(tok), next(model.parameters()).device)
    width = ids.shape[1]
    with torch.no_grad(), no_fully_masked_rows() if repaired else nullcontext():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    return [logits[i, width - len(p) :] for i, p in enumerate(prompts)]


def export_and_generate(work: Path, run_dir: Path, data: Path, device: str):
    """Export the run, reload it with plain transformers, and compare a left-padded batch with one prompt at a time:
    the logits at every real prompt position (finite, equal within the dtype's rounding) and the greedy replies.
    Replies of a barely trained random model can part at a near-tie of two tokens (batched matmuls round
    differently), so their equality is reported; the logits are what must agree."""
    export = work / "export"
    r = subprocess.run(
        [sys.executable, "-m", "fttool", "export", f"run={run_dir}", f"output={export}", "dtype=bfloat16"],
        capture_output=True,
        text=True,
        cwd=work,
    )
    if r.returncode != 0:
        return [f"export exit {r.returncode}: " + (r.stderr.strip().splitlines() or ["?"])[-1][:300]], None, ""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fttool.after.evaluate import generate

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(export), dtype=dtype).to(device)
    tok = AutoTokenizer.from_pretrained(str(export))
    rows = sorted(json.loads(data.read_text())[:64], key=lambda x: len(x["instruction"]))
    convs = [[{"role": "user", "content": rows[i]["instruction"]}] for i in (0, len(rows) // 3, 2 * len(rows) // 3, -1)]
    single = [prefill_logits(model, tok, [c])[0] for c in convs]
    batched, plain = prefill_logits(model, tok, convs), prefill_logits(model, tok, convs, repaired=False)
    scale = max(float(s.abs().max()) for s in single)
    tol = (5e-2 if device == "cuda" else 1e-3) * max(1.0, scale)
    diff = max(float((b - s).abs().max()) for b, s in zip(batched, single))
    problems = []
    if not all(torch.isfinite(b).all() for b in batched):
        problems.append("non-finite logits in a left-padded batch")
    elif diff > tol:
        problems.append(
            f"left-padded batch logits differ from one prompt at a time by {diff:.3g} (tolerance {tol:.3g})"
        )
    plain_state = (
        "NaN"
        if not all(torch.isfinite(b).all() for b in plain)
        else f"max difference {max(float((b - s).abs().max()) for b, s in zip(plain, single)):.3g}"
    )
    replies_b = generate(model, tok, convs, max_new_tokens=24, batch_size=len(convs))
    replies_1 = [generate(model, tok, [c], max_new_tokens=24, batch_size=1)[0] for c in convs]
    same = sum(a == b for a, b in zip(replies_b, replies_1))
    info = (
        f"prompt logits, batch vs one at a time: max difference {diff:.3g} (tolerance {tol:.3g}); without fttool's "
        f"mask repair: {plain_state}; greedy replies identical: {same} of {len(convs)}"
    )
    return problems, tok.padding_side, info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="keep everything in this folder (default: a temporary one, removed)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch")
    ap.add_argument("--cpu-dry-run", action="store_true", help="the same flow on the CPU with a tiny model")
    ap.add_argument(
        "--runs",
        default="",
        help="only these runs, comma-separated (e.g. qlora-padded,lora-padding_free,lora-dpo,lora-grpo,lora-fullloss); "
        "default: all ten",
    )
    args = ap.parse_args()
    import torch

    if args.cpu_dry_run:
        args.device, shape = "cpu", CPU_SHAPE
        args.steps, args.batch = min(args.steps, 6), min(args.batch, 4)
    elif torch.cuda.is_available():
        args.device, shape = "cuda", GPU_SHAPE
    else:
        print(
            f"gpu_check: torch {torch.__version__} sees no CUDA GPU here: nothing to check. Run it on a machine with "
            "one (or --cpu-dry-run to try the script itself)."
        )
        return 0
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    sys.path.insert(0, str(ROOT))
    work = args.out.resolve() if args.out else Path(tempfile.mkdtemp(prefix="fttool-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (dry run)"
        print(
            f"gpu_check: {device_name}, torch {torch.__version__}"
            + (f", CUDA {torch.version.cuda}" if args.device == "cuda" else "")
        )
        print(f"  SDPA on a fully masked query row: {sdpa_probe(args.device)}")
        data = data_file(work)
        model, params, tok_from, side = build_model(work, args.device, shape)
        print(
            f"  model: random Llama, {params / 1e9:.2f}B parameters; tokenizer: {tok_from} (padding_side {side}); "
            f"data: {data.name}; {args.steps} steps x batch {args.batch}, bf16"
            if args.device == "cuda"
            else f"  model: random Llama, {params / 1e6:.1f}M parameters; tokenizer: {tok_from} (padding_side {side}); "
            f"data: {data.name}; {args.steps} steps x batch {args.batch}, fp32"
        )
        runs = []
        chosen = {r for r in args.runs.split(",") if r}
        plan = [(m, p, "sft") for m in ("lora", "qlora", "full") for p in ("none", "padding_free")]
        online = [
            ("lora", "none", "dpo"),
            ("qlora", "none", "dpo"),
            ("lora", "none", "grpo"),
            ("lora", "none", "fullloss"),
        ]
        for method, packing, objective in plan + online:
            if chosen and run_name(method, packing, objective) not in chosen:
                continue
            run = train_run(work, model, data, method, packing, args, objective)
            runs.append(run)
            print(
                f"  {run['name']:<18} {'ok' if not run['problems'] else 'FAIL: ' + '; '.join(run['problems'])} "
                f"({run['wall_s']:.0f} s)",
                flush=True,
            )
        qlora = next((r for r in runs if r["name"] == "qlora-padded"), None)
        gen_problems, export_side, gen_info = (
            export_and_generate(work, qlora["run_dir"], data, args.device)
            if qlora and qlora["rc"] == 0
            else (["no successful qlora-padded run to export"], None, "")
        )
        print(
            "\n| run | loss first -> last | max grad norm | peak GPU alloc / reserved GiB | plan GiB (measured/plan) "
            "| peak RSS GiB | tokens/s | check |"
        )
        print("|---|---|---:|---|---|---:|---:|---|")
        for r in runs:
            if r["rc"] != 0:
                print(f"| {r['name']} | | | | | | | FAIL: {'; '.join(r['problems'])} |")
                continue
            p = r["peak"]
            gpu = f"{p['gpu_alloc_gib']:.2f} / {p['gpu_reserved_gib']:.2f}" if "gpu_alloc_gib" in p else "n/a"
            mem = r["vs"].get("peak_memory_gib")
            planned = f"{mem['predicted']:.2f} ({mem['ratio']:.2f})" if mem else "n/a"
            print(
                f"| {r['name']} | {r['first']:.3f} -> {r['last']:.3f} | {r['max_norm']:.3g} | {gpu} | {planned} | "
                f"{p.get('peak_rss_gib', float('nan')):.2f} | {r['tokens_per_s'] or 0:,.0f} | "
                f"{'ok' if not r['problems'] else 'FAIL: ' + '; '.join(r['problems'])} |"
            )
        print(
            f"\nexport of qlora-padded, reloaded with AutoModelForCausalLM (tokenizer padding_side {export_side}): "
            + ("ok" if not gen_problems else "FAIL: " + "; ".join(gen_problems))
            + (f"\n  {gen_info}" if gen_info else "")
        )
        failed = [r["name"] for r in runs if r["problems"]] + (["export/generate"] if gen_problems else [])
        print(
            f"\ngpu_check: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'} in {time.time() - t0:.0f} s"
            + (f"; logs in {work}" if args.out else "")
        )
        return 1 if failed else 0
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
