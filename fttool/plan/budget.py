"""A run's memory and time budget: what `fttool plan` prints, and what `train` writes into the run folder (plan.json)
to set beside the measured figures in result.json. Arithmetic on the spec and the model's config.json; the CPU's
speed is measured (numpy matmul, a fraction of a second)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Optional

from fttool.config.spec import resolved_precision
from fttool.plan import estimate, fit, shapes, workload
from fttool.plan.estimate import Setup, fmt_duration, gib

# On a CPU, training reaches ~50% of numpy's best fp32 matmul rate and spends besides ~2.2 ms per decoder layer per
# micro-batch (python and autograd dispatch of a layer's forward and backward, whatever its width), ~15 us per token
# (memory-bound elementwise work) and ~4 ns per trained parameter per optimizer step (AdamW, clipping, zeroing).
# Measured on 2 cores: the bundled 2-layer demo (LoRA 15,500 and full 9,100 steady tokens/s of ~100-token
# micro-batches), random 8-layer (3,500) and 2-layer hidden-512 (2,900) Llamas on the demo data, SmolLM2-135M's 30
# layers on word problems (201), a 19M Llama on 512-token batches.
CPU_EFFICIENCY = 0.5
CPU_LAYER_S = 2.2e-3
CPU_TOKEN_S = 15e-6
CPU_OPTIM_S = 4e-9
# Sampling (transformers' generate, one token per step for every row at once). On a CPU a step reads the weights
# (~11.5 GB/s here), spends ~0.85 ms per decoder layer (dispatch) and per row ~60 us (sampling, cache updates) plus
# its matmuls at ~28% of the measured fp32 rate (skinny products). Fitted on 2 cores to the demo model, random 8 x 256
# and 4 x 512 Llamas (vocabulary 32,000) and SmolLM2-135M, 8 and 64 rows of 32 tokens each: within 12%.
# On a GPU a step reads the weights and the KV cache at the card's bandwidth, or computes at the method's share of
# its peak when that is slower, plus ~0.8 ms per decoder layer of kernel launches (eager generate; not measured here:
# no GPU was lent, a typical figure); vLLM replays CUDA graphs, so only the reads and the compute count.
CPU_READ_BPS = 11.5e9
CPU_GEN_LAYER_S = 0.85e-3
CPU_GEN_ROW_S = 60e-6
CPU_GEN_EFFICIENCY = 0.28
GPU_GEN_LAYER_S = 0.8e-3


def make_plan(spec, gpu: Optional[str] = None, gpu_memory: Optional[float] = None, measure_cpu: bool = True) -> Dict:
    """The plan as a JSON-able dict. UserError when the model's shape cannot be read (named, with the fix)."""
    shape = shapes.of_model(spec.model)
    t = fit.target(spec, gpu, gpu_memory)
    precision = resolved_precision(spec.hardware, t.bf16 if t.kind == "gpu" else None)
    work = workload.sample(spec)
    worst_case = Setup.of(spec, precision)
    worst_case = replace(worst_case, device_gib=t.memory_gib)
    s = replace(  # sized by the data's lengths
        worst_case,
        batch_tokens=work.batch_tokens if work else None,
        trained_share=work.trained_share if work else 1.0,
    )
    mem, worst = estimate.memory(s, shape), estimate.memory(worst_case, shape)
    weight_bytes = sum(i.gib for i in mem.items if i.name.startswith("weights")) * estimate.GIB
    ok = fit.fits(mem.total, t, s)
    fixes = fit.fixes(s, shape, t) if ok is False else []
    return {
        "model": {"name": spec.model.name_or_path, "shape": shape.describe(), "config": shape.source},
        "parameters": {"total": shape.total, "trainable": estimate.trained_parameters(s.method_obj, s.mspec, shape)},
        "setup": {
            "method": s.method,
            "precision": s.precision,
            "micro_batch": s.batch,
            "tokens_per_micro_batch": s.tokens,
            "tokens_per_micro_batch_worst": s.worst_tokens,
            "checkpointing": s.ckpt,
            "strategy": s.strategy,
            "processes": s.world,
            "processes_per_machine": s.processes,
            "optim": s.optim,
        },
        "memory": {
            "device": s.device,
            "per_device_gib": round(mem.total, 3),
            "tensors_gib": round(mem.tensors, 3),
            "host_gib": round(mem.host, 3),
            "worst_case_gib": round(worst.total, 3),  # every micro-batch data.max_length tokens long
            "items": [
                {"name": i.name, "gib": round(i.gib, 4), "note": i.note, **({"on_host": True} if i.on_host else {})}
                for i in mem.items
            ],
        },
        "target": {"name": t.name, "memory_gib": t.memory_gib, "tflops": t.tflops, "chosen_by": t.where},
        "fits": ok,
        "fixes": [{"overrides": f.overrides, "per_device_gib": round(f.total_gib, 3), "costs": f.costs} for f in fixes],
        "time": _time(spec, s, shape, t, measure_cpu, work, weight_bytes),
    }


def _time(spec, s: Setup, shape, t: fit.Target, measure_cpu: bool, work, weight_bytes: float) -> Dict:
    from fttool.config import objectives

    tr = spec.train
    global_batch = s.batch * s.grad_accum * s.world
    repeat = objectives.of(spec).samples_per_row(spec.objective)  # GRPO: a prompt is num_generations samples
    out: Dict = {}
    if work is None:
        out["note"] = "no local data to sample (a hub dataset): run `fttool preprocess` for its statistics"
        return out
    out.update(
        rows=work.rows,
        tokens_per_sample=round(work.mean_tokens, 1),
        computed_per_sample=round(work.padded_tokens, 1),
        sampled=work.how,
    )
    units, per_unit = work.rows, work.padded_tokens  # what one row of a micro-batch is, and its tokens computed
    generated = s.completion * s.sequences  # GRPO: tokens sampled per row, computed at their longest
    per_unit += generated
    if generated and work.reply_tokens:  # as long as the data's reference replies, as far as a guess goes
        generated = min(work.reply_tokens, s.completion) * s.sequences
    if units is not None:
        units *= repeat
    if spec.data.packing == "bins":  # rows of max_length tokens, samples packed into them
        per_unit = float(spec.data.max_length * s.sequences)
        units = None if work.rows is None else math.ceil(work.rows * work.mean_tokens / per_unit)
    if tr.max_steps:
        steps = tr.max_steps
    elif units is not None:
        steps = math.ceil(units * tr.epochs / global_batch)
    else:
        out["note"] = "row count unknown (a hub dataset): set train.max_steps or run `fttool preprocess`"
        return out
    computed = steps * global_batch * per_unit
    real = computed if spec.data.packing == "bins" else steps * global_batch * (work.mean_tokens + generated)
    context = per_unit / s.sequences
    per_token = estimate.flops_per_token(s, shape, context)
    out.update(steps=steps, tokens_computed=int(computed), flops=computed * per_token)
    if work.tokens_per_epoch() is not None:
        out["tokens_per_epoch"] = work.tokens_per_epoch()
    if t.kind == "cpu":
        if not measure_cpu:
            return out
        rate = workload.cpu_gflops() * 1e9 * CPU_EFFICIENCY
        out["assumed"] = (
            f"{CPU_EFFICIENCY:.0%} of this CPU's measured fp32 matmul rate = {rate / 1e9:.0f} GFLOP/s, "
            f"+{CPU_LAYER_S * 1e3:g} ms per layer per micro-batch, {CPU_TOKEN_S * 1e6:g} us per token and "
            f"{CPU_OPTIM_S * 1e9:g} ns per trained parameter per step"
        )
    elif t.tflops:
        util = estimate.utilisation(s)
        rate = t.tflops * 1e12 * util * s.world
        out["assumed"] = (
            f"{util:.0%} of {t.name}'s {t.tflops:g} TFLOPS 16-bit peak"
            + (f" x {s.world} GPUs" if s.world > 1 else "")
            + f" ({s.method})"
        )
    else:
        out["note"] = "name the GPU (gpu=H100, gpu=L4 ...) for a time estimate"
        return out
    seconds = computed * per_token / rate
    if t.kind == "cpu":
        trained = estimate.trained_parameters(s.method_obj, s.mspec, shape)
        seconds += steps * (s.grad_accum * shape.layers * CPU_LAYER_S + trained * CPU_OPTIM_S) + computed * CPU_TOKEN_S
    if s.completion:
        per_call = _sampling_seconds(s, shape, t, rate, weight_bytes, work.padded_tokens / s.sequences)
        out["generation"] = {
            "rows": s.generated_rows,
            "tokens": s.completion,
            "seconds": steps * per_call,
            "note": "every row sampled to the longest (a batch waits for its longest completion); tokens/s counts "
            + (
                f"completions as long as the data's references (~{generated:.0f} tokens)"
                if generated < s.completion
                else "completions at their longest"
            ),
        }
        seconds += steps * per_call
        if t.kind == "gpu" and not s.vllm and steps * per_call > seconds / 2:
            out["generation"]["advice"] = (
                "sampling token by token dominates; objective.use_vllm=true (vLLM colocated, pip install vllm) "
                "samples without generate's per-layer launch cost"
            )
    out["seconds"] = seconds
    out["tokens_per_s"] = real / seconds  # non-padding tokens, as result.json measures them
    return out


def _sampling_seconds(s: Setup, shape, t: fit.Target, rate: float, weight_bytes: float, prompt: float) -> float:
    """One generate call of a process (once per optimizer step): its rows' prompts in one forward, then a step per
    completion token (see the constants above)."""
    rows, n = s.generated_rows, shape.matmul_params
    prefill = rows * prompt * 2 * n / rate
    if t.kind == "cpu":
        step = (
            weight_bytes / CPU_READ_BPS
            + shape.layers * CPU_GEN_LAYER_S
            + rows * (2 * n / (rate / CPU_EFFICIENCY * CPU_GEN_EFFICIENCY) + CPU_GEN_ROW_S)
        )
    else:
        kv = 2 * shape.layers * shape.kv_dim * s.compute_bytes * rows * (prompt + s.completion / 2)
        read = (weight_bytes + kv) / (t.bandwidth * 1e12) if t.bandwidth else 0.0
        step = max(read, rows * 2 * n / (rate / s.world)) + (0 if s.vllm else shape.layers * GPU_GEN_LAYER_S)
    return prefill + s.completion * step


def lines(p: Dict) -> List[str]:
    """The plan as `fttool plan` prints it."""
    mem, tm = p["memory"], p["time"]
    st = p["setup"]
    per = "per GPU" if mem["device"] == "cuda" else "for the CPU process"
    out = [
        f"model       {p['model']['name']}: {p['model']['shape']}",
        f"            {p['parameters']['total']:,} parameters, {p['parameters']['trainable']:,} trained "
        f"({st['method']}, {st['precision']}, {st['processes']} process{'es' if st['processes'] > 1 else ''}, "
        f"strategy {st['strategy']}, micro-batch {st['micro_batch']} = {st['tokens_per_micro_batch']:,} tokens at the "
        f"data's longest, {st.get('tokens_per_micro_batch_worst', st['tokens_per_micro_batch']):,} at most)",
        f"memory      {per} (GiB):",
    ]
    width = max(len(i["name"]) for i in mem["items"])
    for i in mem["items"]:
        where = " (CPU memory)" if i.get("on_host") else ""
        out.append(f"  {i['name']:<{width}}  {gib(i['gib']):>6}  {i['note']}{where}")
    out.append(f"  {'total':<{width}}  {gib(mem['per_device_gib']):>6}")
    if mem["host_gib"]:
        out.append(f"  {'CPU memory':<{width}}  {gib(mem['host_gib']):>6}  offloaded (per process)")
    out.append(_verdict(p))
    worst = mem.get("worst_case_gib")
    if worst and worst > mem["per_device_gib"] * 1.005:
        out.append(
            f"            worst case {gib(worst)} GiB: every micro-batch data.max_length tokens long (the expected "
            "figure above sizes them by the data's own lengths)"
        )
    for j, f in enumerate(p["fixes"], 1):
        out.append(f"  {j}. {' '.join(f['overrides'])}  -> {gib(f['per_device_gib'])} GiB ({'; '.join(f['costs'])})")
    if p["fits"] is False and not p["fixes"]:
        out.append(
            "  no change among micro-batch, checkpointing, 8-bit optimizer, QLoRA, ZeRO-3 and offload makes it fit: "
            "a larger GPU, more GPUs (hardware=zero3 hardware.num_processes=N) or a shorter data.max_length"
        )
    out += _time_lines(tm)
    return out


def _verdict(p: Dict) -> str:
    t, total = p["target"], p["memory"]["per_device_gib"]
    if p["fits"] is None:
        return (
            f"fit         unknown: no GPU on this machine; name the target, e.g. gpu=H100, gpu=L4 or gpu_memory=24 "
            f"({gib(total)} GiB needed per GPU)"
        )
    cap = t["memory_gib"]
    n = p["setup"]["processes_per_machine"]
    if p["memory"]["device"] == "cpu" and n > 1:  # the processes share this machine's memory
        total = total * n
    if p["fits"]:
        return (
            f"fit         FITS {t['name']} ({gib(cap)} GiB, {t['chosen_by']}): {gib(total)} GiB, "
            f"{gib(cap - total)} GiB to spare"
        )
    return (
        f"fit         DOES NOT FIT {t['name']} ({gib(cap)} GiB, {t['chosen_by']}): {gib(total)} GiB needed "
        f"(plan keeps {100 - fit.HEADROOM * 100:.0f}% headroom). Cheapest changes that fit:"
    )


def _time_lines(tm: Dict) -> List[str]:
    if "tokens_computed" not in tm and "rows" not in tm:
        return [f"time        {tm.get('note', 'unknown')}"]
    out = []
    rows = f"{tm['rows']:,} rows x " if tm.get("rows") is not None else ""
    epoch = f" = {tm['tokens_per_epoch']:,} tokens per epoch" if "tokens_per_epoch" in tm else ""
    out.append(f"data        {rows}~{tm['tokens_per_sample']:.0f} tokens{epoch} ({tm['sampled']})")
    if "steps" not in tm:
        return out + [f"time        {tm.get('note', 'unknown')}"]
    pad = tm["computed_per_sample"] / max(tm["tokens_per_sample"], 1e-9)
    padding = f", {pad - 1:.0%} padding" if pad > 1.005 else ""
    out.append(
        f"compute     {tm['steps']:,} steps, {tm['tokens_computed']:,} tokens computed{padding}, "
        f"{tm['flops'] / 1e15:.3g} PFLOP"
    )
    gen = tm.get("generation")
    if gen and "seconds" in tm:
        out.append(
            f"sampling    {gen['rows']} completions of up to {gen['tokens']} tokens at once per process and step: "
            f"~{fmt_duration(gen['seconds'])} of the time below ({gen['note']})"
        )
        if gen.get("advice"):
            out.append(f"            {gen['advice']}")
    if "seconds" in tm:
        out.append(
            f"time        ~{fmt_duration(tm['seconds'])} of training ({tm['tokens_per_s']:,.0f} non-padding tokens/s at "
            f"{tm['assumed']}); loading, evaluation and checkpoints come on top"
        )
    else:
        out.append(f"time        {tm.get('note', 'not estimated')}")
    return out


def summary(p: Dict) -> List[str]:
    """The plan in a line (and a warning when it does not fit), for the log of a run starting."""
    mem = p["memory"]
    where = "per GPU" if mem["device"] == "cuda" else "(CPU)"
    fits = {True: "fits", False: "DOES NOT FIT", None: "fit unknown"}[p["fits"]]
    eta = f", ~{fmt_duration(p['time']['seconds'])} of training" if "seconds" in p["time"] else ""
    out = [
        f"plan: {gib(mem['per_device_gib'])} GiB {where}, {fits} {p['target']['name']}"
        f" ({gib(p['target']['memory_gib'] or 0)} GiB){eta}; details: fttool plan"
    ]
    if p["fits"] is False:
        out.append(
            "warning: the plan expects this run to run out of memory; `fttool plan` with the same overrides lists "
            "the cheapest changes that fit."
        )
    return out


def versus(plan: Dict, summary: Dict) -> Dict:
    """Predicted beside measured, for result.json: peak memory per device and tokens per second."""
    out: Dict = {}
    peaks = summary.get("peak_memory") or {}
    mem = plan.get("memory") or {}
    if "gpu_reserved_gib" in peaks and mem.get("device") == "cuda":
        measured = peaks["gpu_reserved_gib"] + estimate.CUDA_CONTEXT_GIB
        out["peak_memory_gib"] = {
            "predicted": mem.get("per_device_gib"),
            "measured": round(measured, 3),
            "measure": f"torch max reserved + {estimate.CUDA_CONTEXT_GIB} GiB CUDA context (about what nvidia-smi shows)",
        }
    elif "peak_rss_gib" in peaks and mem.get("device") == "cpu":
        out["peak_memory_gib"] = {
            "predicted": mem.get("per_device_gib"),
            "measured": peaks["peak_rss_gib"],
            "measure": "peak resident memory of the training process",
        }
    tm = plan.get("time") or {}
    tps = tm.get("tokens_per_s")
    if tps and summary.get("tokens_per_s"):
        out["tokens_per_s"] = {"predicted": round(tps, 1), "measured": round(summary["tokens_per_s"], 1)}
    if tm.get("seconds") and summary.get("runtime_s") and summary.get("steps") == tm.get("steps"):
        out["train_seconds"] = {"predicted": round(tm["seconds"], 1), "measured": round(summary["runtime_s"], 1)}
    for v in out.values():
        if v.get("predicted"):
            v["ratio"] = round(v["measured"] / v["predicted"], 3)
    return out
