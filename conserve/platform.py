"""Facts about the machine that decide defaults, and process-wide tuning."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """bf16 matmuls run natively (AVX512-BF16 or AMX); without them torch emulates bf16 and
    float32 is several times faster (measured: benchmarks/results/dtype-*.md)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def tune_cpu_allocator() -> bool:
    """Keep freed activation memory in the heap instead of returning it to the kernel.

    glibc serves large allocations with fresh mmap pages, so every step pays page faults for
    its activations, which on the 2-core development machine visibly slowed large matmuls and
    copies. Raising the mmap and trim thresholds makes the heap
    reuse that memory.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31) == 1
        return bool(ok)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False


@functools.cache
def device_name(device: str) -> str:
    """What a step-latency profile was measured on: the GPU's name for a CUDA device, else the
    CPU model ("model name" in /proc/cpuinfo, else `platform.processor()`) and its core count.
    Two machines with the same name time steps alike; a profile keyed by it is not reused on a
    machine that differs."""
    kind = device.split(":", 1)[0]
    if kind == "cuda":
        import torch

        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return torch.cuda.get_device_name(index)
    if kind != "cpu":
        return f"{kind} on {_cpu_model()}"
    return f"{_cpu_model()} x{os.cpu_count() or 1}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_steal_s() -> float | None:
    """CPU time the hypervisor gave to others while this machine wanted it, summed over its
    CPUs, in seconds since boot (Linux `/proc/stat`); None elsewhere. A benchmark window with
    steal was run on a machine that was partly taken away."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
