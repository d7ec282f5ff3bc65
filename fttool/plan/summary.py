"""What a run will do, worked out from the spec alone: processes, precision, batch, steps, parameters.

Reads at most a model's config.json and counts data rows of local files; never imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fttool import assets
from fttool.config import devices, losspath, methods, objectives, strategies
from fttool.config.spec import SELECTIVE, RunSpec, effective_gate, has_validation, resolved_precision, world_size


def model_shape(spec):
    """The model's shapes from its config.json, or None when it cannot be read without a download."""
    from fttool.errors import UserError
    from fttool.plan import shapes

    if spec.model.name_or_path and not Path(assets.resolve(spec.model.name_or_path)).expanduser().is_dir():
        return None  # `check` never fetches; `plan` does
    try:
        return shapes.of_model(spec.model)
    except UserError:
        return None


def param_counts(spec: RunSpec, shape=None) -> Optional[Dict[str, int]]:
    """Total and trainable parameter estimates from a local config.json (or the shape already read from it)."""
    from fttool.plan.estimate import trained_parameters

    shape = shape or model_shape(spec)
    if shape is None:
        return None
    method = methods.of(spec)
    n = trained_parameters(method, spec.method, shape)
    return {"total": shape.total + n if method.adapter else shape.total, "trainable": n}


def local_rows(path: str) -> Optional[int]:
    """Rows of a local JSONL/JSON source (file, folder or glob), counted without parsing JSONL lines."""
    from fttool.data.sources import is_local, local_files
    from fttool.errors import UserError

    if not path or not is_local(path):
        return None
    try:
        files = local_files(path)
    except UserError:
        return None
    total = 0
    for p in files:
        if p.suffix == ".jsonl":
            with open(p, "rb") as f:
                total += sum(1 for line in f if line.strip())
        elif p.suffix == ".json":
            try:
                data = json.loads(p.read_text())
            except ValueError:
                return None
            if not isinstance(data, list):
                return None
            total += len(data)
        else:
            return None  # parquet/csv: counted when the data is read
    return total


def data_lines(spec: RunSpec) -> Tuple[List[str], Optional[int]]:
    from fttool.data import sources_of

    d = spec.data
    lines = []
    rows_total: Optional[int] = 0
    for s in sources_of(d):
        rows = local_rows(s.path)
        taken = None if rows is None else round(rows * s.weight)
        rows_total = None if rows_total is None or taken is None else rows_total + taken
        weight = f", weight {s.weight:g}" if d.mix else ""
        lines.append(
            f"data        {s.path} (format {s.format}{weight})" + (f", {rows:,} rows" if rows is not None else "")
        )
    held = 1 - d.val_ratio - d.test_ratio
    if rows_total is not None:
        rows_total = round(rows_total * held)
        if d.max_samples:
            rows_total = min(rows_total, d.max_samples)
    template = (
        d.template if d.template and "{" not in d.template else ("custom" if d.template else "the tokenizer's own")
    )
    trained = "every token" if d.train_on_inputs else f"{'/'.join(d.train_roles)} turns ({d.train_turns})"
    lines.append(
        f"tokens      template {template}; trained: {trained}; max_length {d.max_length} ({d.truncation}); packing {d.packing}"
    )
    return lines, rows_total


def eval_lines(spec: RunSpec) -> List[str]:
    d, tr, ev = spec.data, spec.train, spec.eval
    if has_validation(spec):
        held = d.val_path or f"{d.val_ratio:g} of the rows"
        stop = (
            f"; early stopping after {tr.early_stopping_patience} without improvement"
            if tr.early_stopping_patience
            else ""
        )
        best = "; best checkpoint kept as checkpoints/best and final/" if tr.load_best else ""
        lines = [f"validation  loss every {tr.eval_steps or tr.save_steps} steps on {held}{stop}{best}"]
    else:
        lines = [
            "validation  none (set data.val_ratio=0.05 for a validation loss, early stopping and the best checkpoint)"
        ]
    test = d.test_path or (f"{d.test_ratio:g} of the rows" if d.test_ratio else None)
    if not test:
        return lines + ["test        none: `fttool eval run=RUN data.test_path=FILE` evaluates later"]
    from fttool.metrics import fmt_diff

    gate = effective_gate(spec)
    when = "after training and with `fttool eval`" if ev.after_training else "with `fttool eval`"
    against = (
        (
            " vs the base; verdict: "
            + ", ".join(f"{k} {'beats base' if v == 0 else f'beats base by {fmt_diff(k, v)}'}" for k, v in gate.items())
        )
        if ev.compare_base
        else ""
    )
    return lines + [f"test        {test} ({ev.samples or 'all'} examples), {when}: {', '.join(d.metrics)}{against}"]


def describe(spec: RunSpec) -> List[str]:
    hw, tr, m = spec.hardware, spec.train, spec.method
    precision = resolved_precision(hw)
    if hw.precision == "auto" and precision == "bf16":
        precision += " (fp16 if the GPU lacks bf16)"
    machines = hw.num_machines or 0
    world = world_size(hw)
    global_batch = tr.batch_size * tr.grad_accum * world
    where = (
        f"{hw.num_processes} per machine x {machines if machines else 'SLURM_NNODES'} machines"
        if machines != 1
        else f"{hw.num_processes}"
    )
    strategy = strategies.of(hw).about
    offload = ", offload to CPU" if hw.offload else ""
    lines = [
        f"processes   {where} on {hw.device}, {strategy}{offload} (hardware={hw.name}), precision {precision}",
        f"model       {spec.model.name_or_path} (dtype {spec.model.dtype}, attention {spec.model.attn_implementation})",
    ]
    lines.append(f"method      {methods.of(spec).describe(m)}")
    lines.append(f"objective   {objectives.of(spec).describe(spec.objective)}")
    lines.append(f"loss        {losspath.describe(spec)}")
    lines.append(f"activations {checkpointing_line(spec)}")
    if spec.model.from_run:
        how = {"merge": "its adapter merged into the base", "continue": "its adapter trained further"}
        what = how[spec.model.from_run_adapter] if spec.model.parent_adapter else "its trained model"
        lines.append(f"starts from {spec.model.from_run} ({what})")
    shape = model_shape(spec)
    counts = param_counts(spec, shape)
    if counts:
        lines.append(
            f"parameters  {counts['trainable']:,} trainable of {counts['total']:,} ({100 * counts['trainable'] / counts['total']:.2f}%)"
        )
        from fttool.plan import estimate

        mem = estimate.memory(estimate.Setup.of(spec), shape)
        where = "per GPU" if devices.of(spec.hardware).gpu else "for the CPU process"
        lines.append(f"memory      ~{estimate.gib(mem.total)} GiB {where} (itemised, with fit and time: fttool plan)")
    else:
        lines.append("parameters  counted when the model loads (no local config.json)")
    more, rows = data_lines(spec)
    lines += more
    if tr.max_steps:
        steps = f"{tr.max_steps} steps"
    elif rows:
        steps = f"~{int(-(-rows * tr.epochs // global_batch)):,} steps ({tr.epochs:g} epochs)"
    else:
        steps = f"{tr.epochs:g} epochs"
    lines.append(
        f"schedule    {steps}, global batch {global_batch} ({tr.batch_size} x {tr.grad_accum} accum x {world if machines else '?'} proc), "
        f"lr {tr.lr:g} {tr.lr_scheduler}, warmup {tr.warmup_ratio:g}"
    )
    lines.append(f"checkpoints every {tr.save_steps} steps, keep {tr.save_total_limit}; logging={spec.logging.backend}")
    tolerate = (
        f"skips up to {tr.nonfinite_tolerance} step(s) with a NaN/inf loss or gradient norm, then stops"
        if tr.nonfinite_tolerance
        else "stops at the first NaN/inf loss or gradient norm (exit 4)"
    )
    lines.append(f"guard       {tolerate}" + ("; batches padded on the right" if spec.data.packing == "none" else ""))
    lines += eval_lines(spec)
    lines.append(f"run folder  {Path(spec.output_dir) / str(spec.run_name)}")
    return lines


def checkpointing_line(spec) -> str:
    """What a layer keeps for backward (train.gradient_checkpointing, or FSDP2's own)."""
    kind = spec.train.gradient_checkpointing
    if spec.hardware.activation_checkpointing:
        return "each layer recomputed in backward (hardware.activation_checkpointing=true, FSDP2's own)"
    if kind == SELECTIVE:
        return (
            "selective checkpointing: the matmuls' and attention's outputs kept, the elementwise ops recomputed "
            "(train.gradient_checkpointing=selective)"
        )
    if kind:
        return "each layer recomputed in backward, its input kept (train.gradient_checkpointing=true)"
    return "all kept for backward (train.gradient_checkpointing=selective or true to recompute)"
