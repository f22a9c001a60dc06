"""Helpers shared by the benchmark modules: device choice and peak memory of one call
(the method is described in benchmarks/conftest.py)."""

from __future__ import annotations

import ctypes
import gc
import re

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    return torch.device("cuda" if on_gpu() else "cpu")


# ----------------------------------------------------------------------------- peak memory

def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


def _cpu_peak_mb(fn) -> float | None:
    """Peak RSS during fn() above the RSS before it. malloc_trim first hands the free heap
    memory back to the kernel, so that reusing it faults pages in and shows in RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    except (OSError, AttributeError):
        return None
    fn()
    return max(_status_mb("VmHWM") - base, 0.0)


def peak_memory_mb(fn) -> float | None:
    """Memory that one call of fn adds at its peak, in MiB (None where it cannot be read)."""
    gc.collect()
    if not on_gpu():
        return _cpu_peak_mb(fn)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
