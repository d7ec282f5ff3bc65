"""Peak memory of this process: accelerator memory (allocated and reserved by torch's caching allocator) on CUDA,
and the process's peak resident set size (RSS) everywhere. Figures in GiB."""

from __future__ import annotations

import resource
import sys
from typing import Dict, Optional

GIB = 2**30


def peak_rss_gib() -> float:
    """The most resident memory this process has held since it started.

    On Linux, VmHWM of /proc/self/status: getrusage's ru_maxrss survives exec, so a process started by a large
    parent (pytest, a notebook, a launcher) would report the parent's size at fork time as its own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) * 1024 / GIB, 3)  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak * (1 if sys.platform == "darwin" else 1024) / GIB, 3)


def cuda_peaks(reset: bool = False) -> Optional[Dict[str, float]]:
    """Peak allocated and reserved CUDA memory on this process's device since the last reset; None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    out = {
        "gpu_alloc_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "gpu_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3),
    }
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return out


class PeakTracker:
    """Peaks per logging interval (CUDA's counters are reset after each reading) and over the whole run."""

    def __init__(self):
        self.run: Dict[str, float] = {}

    def read(self) -> Dict[str, float]:
        """This interval's peaks: {gpu_alloc_gib, gpu_reserved_gib} on CUDA, and peak_rss_gib (the process's so far)."""
        now = dict(cuda_peaks(reset=True) or {})
        now["peak_rss_gib"] = peak_rss_gib()
        for k, v in now.items():
            self.run[k] = max(self.run.get(k, 0.0), v)
        return now


def describe(peaks: Dict[str, float]) -> str:
    """'gpu 3.21/4.00 GiB, rss 2.10 GiB' (allocated/reserved) for a progress line."""
    parts = []
    if "gpu_alloc_gib" in peaks:
        parts.append(f"gpu {peaks['gpu_alloc_gib']:.2f}/{peaks['gpu_reserved_gib']:.2f} GiB")
    if "peak_rss_gib" in peaks:
        parts.append(f"rss {peaks['peak_rss_gib']:.2f} GiB")
    return ", ".join(parts)
