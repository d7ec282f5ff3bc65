"""Where the processes run: one row per `hardware.device`, answering what differs between them, so nothing else
compares the device's name. Light: no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class Device:
    name: str
    gpu: bool  # an accelerator: mixed precision, pinned host memory, overlapped communication, bitsandbytes kernels
    backend: str  # torch.distributed backend between processes on this device
    about: str  # for messages: "the CPU", "a CUDA GPU"


DEVICES: Dict[str, Device] = {
    d.name: d
    for d in (
        Device("cpu", gpu=False, backend="gloo", about="the CPU"),
        Device("cuda", gpu=True, backend="nccl", about="a CUDA GPU"),
    )
}


def of(hw_or_name) -> Device:
    """The row of a hardware section (or of a device name)."""
    return DEVICES[getattr(hw_or_name, "device", hw_or_name)]
