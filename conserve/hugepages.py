"""CPU memory backed by 2 MiB pages where the kernel allows it, for what is streamed every step.

A decode step reads every packed weight once (269 MB for the default model) and the KV blocks
of its sequences, scattered over the cache. With 4 KiB pages each page costs a TLB miss and
the hardware prefetcher stops at its end; on a 2-core AMD EPYC the compiled linear kernel
streamed the default model's weights in 0.85-0.91x the time from 2 MiB pages
(benchmarks/results/hugepages-20261205.txt). Linux gives an anonymous mapping transparent
huge pages when it asks for them (madvise) and the system allows it
(/sys/kernel/mm/transparent_hugepage/enabled: "always" or "madvise"); elsewhere the memory is
ordinary pages, and where anonymous mappings are not available, torch's own allocation.

Memory from a mapping is given back when the last tensor viewing it is gone.
"""

from __future__ import annotations

import math
import mmap
import os

import torch

HUGE = 2 << 20  # bytes of a huge page (x86-64, and the usual size on arm64)
_ALIGN = 4096  # each tensor taken from an arena starts on a page


def enabled() -> bool:
    """Whether tensors are placed on madvised mappings (CONSERVE_HUGEPAGES=0 turns it off)."""
    return (
        os.environ.get("CONSERVE_HUGEPAGES", "1") != "0"
        and hasattr(mmap, "MADV_HUGEPAGE")
        and hasattr(mmap, "MAP_ANONYMOUS")
    )


def _mapping(nbytes: int) -> torch.Tensor | None:
    """A uint8 tensor over a fresh anonymous mapping of at least `nbytes`, starting on a huge
    page boundary, asked to be backed by huge pages; None where that is not possible."""
    if not enabled() or nbytes <= 0:
        return None
    try:
        m = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError):
        return None
    buf = torch.frombuffer(m, dtype=torch.uint8)  # holds the mapping while any view lives
    start = (-buf.data_ptr()) % HUGE
    return buf[start : start + nbytes]


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor of this shape on huge pages where possible (torch.zeros else)."""
    buf = _mapping(math.prod(shape) * dtype.itemsize)
    if buf is None:
        return torch.zeros(shape, dtype=dtype)
    # Touched now, as torch.zeros would: the memory is the process's from the start, and a
    # machine without enough of it fails here rather than while serving.
    buf.zero_()
    return buf.view(dtype).view(shape)


class Arena:
    """Room for several tensors in one mapping (small tensors together fill huge pages), each
    starting on a 4 KiB boundary. `take` hands them out in order; what is not taken is never
    touched, so it costs address space only."""

    def __init__(self, nbytes: int) -> None:
        self.buf = _mapping(nbytes)
        self.used = 0

    @staticmethod
    def room(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes a tensor of this shape takes in an arena."""
        return -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized tensor from the arena, or from torch when the arena has no room
        (or no mapping)."""
        n = self.room(shape, dtype)
        if self.buf is None or self.used + n > self.buf.numel():
            return torch.empty(shape, dtype=dtype)
        t = self.buf[self.used : self.used + math.prod(shape) * dtype.itemsize]
        self.used += n
        return t.view(dtype).view(shape)
