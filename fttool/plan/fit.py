"""Does a run fit the device it is planned for, and if not, the cheapest changes that make it fit, each with its new
estimate and the overrides that make it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

from fttool.config import devices
from fttool.config.spec import SELECTIVE, QloraSpec
from fttool.errors import UserError
from fttool.plan import cards, estimate
from fttool.plan.estimate import Setup
from fttool.plan.shapes import ModelShape

HEADROOM = 0.95  # plan to fill at most this share of a device: estimates are estimates


@dataclass(frozen=True)
class Target:
    """The device(s) a run is planned for."""

    name: str
    memory_gib: Optional[float]  # per device; None when unknown (a GPU run planned on a machine without one)
    tflops: float  # 16-bit peak per device (0: unknown; the CPU's rate is measured instead)
    kind: str  # gpu or cpu
    where: str  # how it was chosen: "gpu=H100", "this machine", ...
    bf16: bool = True
    bandwidth: float = 0.0  # memory bandwidth per device, TB/s (0: unknown)


def target(spec, gpu: Optional[str] = None, gpu_memory: Optional[float] = None) -> Target:
    device = spec.hardware.device
    if (gpu or gpu_memory) and not devices.of(device).gpu:
        opt = f"gpu={gpu}" if gpu else f"gpu_memory={gpu_memory:g}"
        raise UserError(
            f"{opt} plans a GPU run, but this spec runs on the CPU (hardware={spec.hardware.name}): add "
            "hardware=single_gpu (or ddp, fsdp2, zero3 ...) to plan it on that GPU."
        )
    if gpu_memory is not None:
        if gpu_memory <= 0:
            raise UserError(f"gpu_memory={gpu_memory:g}: give the GPU's memory in GiB, e.g. gpu_memory=24.")
        card = cards.by_name(gpu) if gpu else None
        return Target(
            f"{card.name if card else 'GPU'} with {gpu_memory:g} GiB",
            float(gpu_memory),
            card.tflops if card else 0.0,
            "gpu",
            "gpu_memory=" + f"{gpu_memory:g}",
            card.bf16 if card else True,
            card.bandwidth if card else 0.0,
        )
    if gpu:
        c = cards.by_name(gpu)
        return Target(c.name, c.memory_gib, c.tflops, "gpu", f"gpu={gpu}", c.bf16, c.bandwidth)
    if not devices.of(device).gpu:
        return Target("this machine's CPU", cards.host_memory_gib(), 0.0, "cpu", "hardware.device=cpu")
    local = cards.local_gpus()
    if local:
        c = local[0]
        more = f" ({len(local)} here)" if len(local) > 1 else ""
        return Target(c.name + more, c.memory_gib, c.tflops, "gpu", "this machine's GPU", c.bf16, c.bandwidth)
    return Target("a GPU", None, 0.0, "gpu", "none here")


def fits(total_gib: float, t: Target, s: Optional[Setup] = None) -> Optional[bool]:
    """Whether `total_gib` per device fits `t`; on a CPU the processes of a machine share its memory."""
    if t.memory_gib is None:
        return None
    per_machine = total_gib * (s.processes if s is not None and t.kind == "cpu" else 1)
    return per_machine <= t.memory_gib * HEADROOM


# -- fixes -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Move:
    name: str
    cost: int  # how much it costs in speed or quality: lower is cheaper
    apply: Callable[[Setup], Optional[Tuple[Setup, List[str], str]]]  # (new setup, overrides, what it costs) or None


def _ckpt(s: Setup):
    if s.ckpt is True:
        return None
    key = "hardware.activation_checkpointing" if s.strategy_obj.own_checkpointing else "train.gradient_checkpointing"
    return replace(s, ckpt=True), [f"{key}=true"], "~20-30% slower steps (a layer's forward recomputed)"


def _selective(s: Setup):
    if s.ckpt or s.strategy_obj.own_checkpointing:
        return None
    return (
        replace(s, ckpt=SELECTIVE),
        [f"train.gradient_checkpointing={SELECTIVE}"],
        "~5-10% slower steps (the elementwise ops recomputed; about half the activations kept)",
    )


def _batch(factor: int):
    def apply(s: Setup):
        if s.batch < factor or s.batch % factor:
            return None
        b = s.batch // factor
        accum = s.grad_accum * factor
        return (
            replace(s, batch=b, grad_accum=accum),
            [f"train.batch_size={b}", f"train.grad_accum={accum}"],
            "same global batch, smaller matmuls (a little slower)",
        )

    return apply


def _optim8(s: Setup):
    if s.method_obj.adapter or not devices.of(s).gpu or estimate.OPTIMIZER_BYTES.get(s.optim, 8) != 8:
        return None
    return replace(s, optim="adamw_bnb_8bit"), ["train.optim=adamw_bnb_8bit"], "8-bit AdamW states (bitsandbytes)"


def _qlora(s: Setup):
    if s.method_obj.quantized or not devices.of(s).gpu:
        return None
    m = s.mspec
    if s.method_obj.adapter:
        keep = {k: getattr(m, k) for k in ("rank", "alpha", "dropout", "target_modules", "use_rslora")}
        return (
            replace(s, method="qlora", mspec=QloraSpec(**keep)),
            ["method=qlora"],
            "4-bit base (nf4): slower steps, a small quality cost",
        )
    return (
        replace(s, method="qlora", mspec=QloraSpec()),
        ["method=qlora"],
        "LoRA adapters over a 4-bit base instead of training every weight",
    )


def _zero3(s: Setup):
    if s.world < 2 or s.strategy_obj.shards_parameters or not devices.of(s).gpu:
        return None
    return (
        replace(s, strategy="zero3", offload=False, ckpt=s.ckpt),
        ["hardware=zero3", f"hardware.num_processes={s.world}"],
        "parameters, gradients and optimizer state split over the GPUs (more communication)",
    )


def _offload(s: Setup):
    if s.offload or not devices.of(s).gpu or not s.method_obj.shardable_base:
        return None
    return (
        replace(s, strategy="zero3", offload=True),
        ["hardware=zero3_offload", f"hardware.num_processes={max(s.world, 1)}"],
        "parameters and optimizer state in CPU memory: much slower steps, needs host RAM",
    )


MOVES = [
    Move("selective checkpointing", 1, _selective),
    Move("checkpointing", 2, _ckpt),
    Move("batch/2", 1, _batch(2)),
    Move("batch/4", 2, _batch(4)),
    Move("batch/8", 3, _batch(8)),
    Move("8-bit optimizer", 1, _optim8),
    Move("qlora", 3, _qlora),
    Move("zero3", 3, _zero3),
    Move("offload", 6, _offload),
]


@dataclass
class Fix:
    overrides: List[str]
    costs: List[str]
    total_gib: float
    cost: int


def fixes(s: Setup, shape: ModelShape, t: Target, limit: int = 3) -> List[Fix]:
    """The cheapest combinations of up to three moves that make the run fit `t` (cheapest first)."""
    if t.memory_gib is None:
        return []
    found: List[Fix] = []
    for size in (1, 2, 3):
        for combo in itertools.combinations(MOVES, size):
            if any(sum(1 for m in combo if kind in m.name) > 1 for kind in ("batch", "checkpointing")):
                continue
            cur, ovs, costs, ok = s, [], [], True
            for m in combo:
                r = m.apply(cur)
                if r is None:
                    ok = False
                    break
                cur, o, c = r
                ovs, costs = ovs + [x for x in o if x not in ovs], costs + [c]
            if not ok:
                continue
            total = estimate.memory(cur, shape).total
            if fits(total, t, cur):
                found.append(Fix(ovs, costs, total, sum(m.cost for m in combo)))
        if len(found) >= limit:
            break
    found.sort(key=lambda f: (f.cost, f.total_gib))
    # drop a fix that only adds moves to a cheaper one that already fits
    out: List[Fix] = []
    for f in found:
        if any(set(g.overrides) <= set(f.overrides) for g in out):
            continue
        out.append(f)
    return out[:limit]
