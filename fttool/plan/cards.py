"""Accelerators `fttool plan gpu=NAME` knows: memory torch can use, dense 16-bit tensor peak (no sparsity) and
memory bandwidth (vendor datasheets), and what this machine has (nvidia-smi, or /proc/meminfo for the CPU). No torch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import List, Optional

from fttool.errors import UserError, suggestion


@dataclass(frozen=True)
class Card:
    name: str
    memory_gib: float  # what torch.cuda reports as total memory (a little under the nominal GB)
    tflops: float  # dense bf16 (fp16 where the card has no bf16) tensor-core peak, TFLOPS
    bf16: bool = True
    aliases: tuple = ()
    bandwidth: float = 0.0  # memory bandwidth, TB/s (what sampling one token at a time is bound by); 0: unknown


CARDS = [
    Card("H100", 79.2, 989, bandwidth=3.35, aliases=("H100-SXM", "H100-80GB", "H100-SXM5")),
    Card("H100-PCIe", 79.2, 756, bandwidth=2.0, aliases=("H100-PCIE-80GB",)),
    Card("H200", 139.8, 989, bandwidth=4.8, aliases=("H200-SXM", "H200-141GB")),
    Card("B200", 178.0, 2250, bandwidth=8.0),
    Card("GH200", 94.5, 989, bandwidth=4.0),
    Card("A100-80GB", 79.2, 312, bandwidth=2.04, aliases=("A100-SXM4-80GB", "A100-PCIE-80GB")),
    Card("A100-40GB", 39.4, 312, bandwidth=1.56, aliases=("A100-SXM4-40GB", "A100-PCIE-40GB")),
    Card("L40S", 44.4, 362, bandwidth=0.864),
    Card("L40", 44.4, 181, bandwidth=0.864),
    Card("L4", 22.0, 121, bandwidth=0.3),
    Card("A10", 22.0, 125, bandwidth=0.6, aliases=("A10G",)),
    Card("A6000", 47.4, 155, bandwidth=0.768, aliases=("RTX-A6000",)),
    Card("RTX6000-Ada", 47.4, 364, bandwidth=0.96, aliases=("RTX-6000-ADA",)),
    Card("RTX4090", 23.6, 165, bandwidth=1.01, aliases=("RTX-4090", "4090")),
    Card("RTX3090", 23.6, 71, bandwidth=0.936, aliases=("RTX-3090", "3090")),
    Card("RTX5090", 31.4, 210, bandwidth=1.79, aliases=("RTX-5090", "5090")),
    Card("V100-32GB", 31.7, 125, bandwidth=0.9, bf16=False, aliases=("V100",)),
    Card("V100-16GB", 15.8, 125, bandwidth=0.9, bf16=False),
    Card("T4", 14.6, 65, bandwidth=0.32, bf16=False),
    Card("MI300X", 191.5, 1307, bandwidth=5.3),
    Card("MI250X", 63.9, 383, bandwidth=3.2),
]


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.upper()).replace("NVIDIA", "").replace("TESLA", "").replace("GEFORCE", "")


def by_name(name: str) -> Card:
    want = _norm(name)
    for c in CARDS:
        if want in {_norm(c.name), *(_norm(a) for a in c.aliases)}:
            return c
    if want == "A100":
        raise UserError("gpu=A100: name the memory size, gpu=A100-80GB or gpu=A100-40GB.")
    names = [c.name for c in CARDS]
    raise UserError(
        f"gpu={name}: not a card fttool knows.{suggestion(name, names, 'gpu={}')} Known: {', '.join(names)}; "
        "or give its memory: gpu_memory=GiB."
    )


def from_device_name(name: str, memory_gib: float) -> Card:
    """The table's card for a name nvidia-smi reports (e.g. 'NVIDIA H100 80GB HBM3'), or one with its memory and an
    unknown peak."""
    n = _norm(name)
    best = None
    for c in CARDS:
        for alias in (c.name, *c.aliases):
            a = _norm(alias).split("80GB")[0].split("40GB")[0]
            if a and a in n and (best is None or len(a) > best[1]):
                best = (c, len(a))
    if best and abs(best[0].memory_gib - memory_gib) < 0.15 * best[0].memory_gib:
        return Card(best[0].name, memory_gib, best[0].tflops, best[0].bf16, bandwidth=best[0].bandwidth)
    return Card(name, memory_gib, 0.0)


def local_gpus() -> List[Card]:
    """The GPUs of this machine (nvidia-smi; no torch import), CUDA_VISIBLE_DEVICES respected."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    keep = None if visible is None else {v.strip() for v in visible.split(",") if v.strip()}
    cards = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[2].isdigit():
            continue
        if keep is not None and parts[0] not in keep:
            continue
        cards.append(from_device_name(parts[1], int(parts[2]) / 1024))
    return cards


def host_memory_gib() -> Optional[float]:
    """This machine's available memory (MemAvailable), or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None
