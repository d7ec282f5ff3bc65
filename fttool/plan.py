"""What a run will do, worked out from the spec alone: processes, precision, batch, steps, parameters.

Reads at most a model's config.json and counts data rows of local files; never imports torch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from fttool import assets
from fttool.spec import RunSpec


def param_counts(spec: RunSpec) -> Optional[Dict[str, int]]:
    """Total and trainable parameter estimates from a local config.json (Llama-style decoders)."""
    cfg_file = Path(assets.resolve(spec.model.name_or_path)).expanduser() / "config.json"
    if not cfg_file.is_file():
        return None
    c = json.loads(cfg_file.read_text())
    try:
        h, n, inter, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    except KeyError:
        return None
    heads = c.get("num_attention_heads", 1)
    kv = c.get("num_key_value_heads", heads)
    hd = c.get("head_dim") or h // heads
    shapes = {"q_proj": (h, heads * hd), "k_proj": (h, kv * hd), "v_proj": (h, kv * hd), "o_proj": (heads * hd, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(i * o for i, o in shapes.values()) + 2 * h
    emb = vocab * h * (1 if c.get("tie_word_embeddings") else 2)
    total = n * per_layer + emb + h
    if spec.method.name == "full":
        return {"total": total, "trainable": total}
    r = spec.method.rank
    lora = n * sum(r * (shapes[m][0] + shapes[m][1]) for m in spec.method.target_modules if m in shapes)
    return {"total": total + lora, "trainable": lora}


def local_rows(path: str) -> Optional[int]:
    p = Path(assets.resolve(path)).expanduser()
    if p.is_file() and p.suffix == ".jsonl":
        with open(p, "rb") as f:
            return sum(1 for line in f if line.strip())
    if p.is_file() and p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except ValueError:
            return None
        return len(data) if isinstance(data, list) else None
    return None


def describe(spec: RunSpec) -> List[str]:
    hw, tr, m = spec.hardware, spec.train, spec.method
    precision = hw.precision if hw.precision != "auto" else ("fp32" if hw.device == "cpu" else "bf16 (fp16 if the GPU lacks bf16)")
    global_batch = tr.batch_size * tr.grad_accum * hw.num_processes
    lines = [
        f"processes   {hw.num_processes} on {hw.device} (hardware={hw.name}), precision {precision}",
        f"model       {spec.model.name_or_path} (dtype {spec.model.dtype}, attention {spec.model.attn_implementation})",
    ]
    if m.name == "full":
        lines.append("method      full fine-tune")
    else:
        quant = f", base quantized to {m.bits}-bit {m.quant_type if m.bits == 4 else 'int8'}" if m.name == "qlora" else ""
        lines.append(f"method      {m.name}: rank {m.rank}, alpha {m.alpha:g}, dropout {m.dropout:g} on {', '.join(m.target_modules)}{quant}")
    counts = param_counts(spec)
    if counts:
        lines.append(f"parameters  {counts['trainable']:,} trainable of {counts['total']:,} ({100 * counts['trainable'] / counts['total']:.2f}%)")
    else:
        lines.append("parameters  counted when the model loads (no local config.json)")
    rows = local_rows(spec.data.path)
    if spec.data.max_samples and rows:
        rows = min(rows, spec.data.max_samples)
    lines.append(f"data        {spec.data.path} (format {spec.data.format}, max_length {spec.data.max_length})" + (f", {rows:,} rows" if rows else ""))
    if tr.max_steps:
        steps = f"{tr.max_steps} steps"
    elif rows:
        steps = f"~{int(-(-rows * tr.epochs // global_batch)):,} steps ({tr.epochs:g} epochs)"
    else:
        steps = f"{tr.epochs:g} epochs"
    lines.append(f"schedule    {steps}, global batch {global_batch} ({tr.batch_size} x {tr.grad_accum} accum x {hw.num_processes} proc), "
                 f"lr {tr.lr:g} {tr.lr_scheduler}, warmup {tr.warmup_ratio:g}")
    lines.append(f"checkpoints every {tr.save_steps} steps, keep {tr.save_total_limit}; logging={spec.logging.backend}")
    lines.append(f"run folder  {Path(spec.output_dir) / str(spec.run_name)}")
    return lines
