"""bf16 linear layers on CPUs with weights prepacked once, at load.

`torch.mm` on a plain [K, N] bf16 weight reorders it into the GEMM library's blocked layout on
every call: the linear layers of 1-64 row steps moved their weights at 9-12.5 GB/s where the
development machine read 34.6 GB/s (benchmarks/results/roofline-20261202-2142.md).
`FastLinear` packs each weight once:
- rows <= `kernel_rows()` (every row count on a CPU with AVX512-BF16 and no AMX): linear_bf16.c
  streams its own packed copy with AVX512-BF16 dot products (about the memory bandwidth at one
  row, near the measured bf16 GEMM peak from ~16 rows on);
- up to ONEDNN_ROWS rows: oneDNN's linear (torch's mkldnn op, the one torch.compile uses for
  frozen CPU weights) on a weight reordered for it once;
- more rows, or neither available: torch.mm, as before (at 512 rows and more the reorder is
  a small share of the product; in quick checks torch.mm was as fast there).
float32 models never come here: their matmuls stay torch's, so fp32 outputs keep matching the
reference implementation token for token.
"""

from __future__ import annotations

import os
import sys

import torch

from conserve.hugepages import Arena
from conserve.kernels import CpuKernels, pack_linear_weight
from conserve.platform import cpu_flags

# Elsewhere (with AMX, or without AVX512-BF16) the compiled kernel takes steps of at most this
# many rows: oneDNN's AMX matmuls beat its dot products from 4 rows on
# (benchmarks/results/native-rows-20261204.md), and its portable loop is no GEMM.
FEW_KERNEL_ROWS = 2
# oneDNN on prepacked weights beat torch.mm from 1 to 256 rows in quick checks, by less as the
# rows grow, and lost at 512.
ONEDNN_ROWS = 256


def kernel_rows() -> int:
    """The most rows a linear layer runs on the compiled kernel (CONSERVE_KERNEL_ROWS overrides
    it). With AVX512-BF16 and no AMX, every row count: on an AMD EPYC (2 cores) the kernel took
    0.47-0.98x oneDNN's time on SmolLM2's weights and vocabulary projection at 1-256 rows, and
    0.94-0.99x oneDNN's (0.89-0.96x torch.mm's) at 512-2048
    (benchmarks/results/linear-paths-20261205.txt, benchmarks/diagnostics/linear_paths.py)."""
    env = os.environ.get("CONSERVE_KERNEL_ROWS")
    if env:
        return max(0, int(env))
    flags = cpu_flags()
    return sys.maxsize if "avx512_bf16" in flags and "amx_bf16" not in flags else FEW_KERNEL_ROWS


def onednn_bf16() -> bool:
    """Whether torch's oneDNN linear with prepacked bf16 weights is usable here."""
    try:
        return bool(
            torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


class FastLinear:
    """y = x W (+ b) for bf16 x [M, K], W given as [K, N] (a module's `weight_t`)."""

    def __init__(
        self,
        weight_t: torch.Tensor,
        bias: torch.Tensor | None,
        kernels: CpuKernels | None,
        onednn: bool,
        max_kernel_rows: int | None = None,
        arena: Arena | None = None,
    ) -> None:
        assert weight_t.dtype == torch.bfloat16 and weight_t.device.type == "cpu"
        self.k, self.n = weight_t.shape
        self.weight_t = weight_t
        self.bias = None if bias is None else bias.detach().contiguous()
        self.kernels = kernels
        self.packed = pack_linear_weight(weight_t, arena) if kernels is not None else None
        self.kernel_rows = kernel_rows() if max_kernel_rows is None else max_kernel_rows
        # oneDNN's own copy of the weight, unless the kernel takes every step oneDNN would
        self.onednn = (
            torch.ops.mkldnn._reorder_linear_weight(weight_t.t().contiguous(), 16)
            if onednn and not (self.packed is not None and self.kernel_rows >= ONEDNN_ROWS)
            else None
        )

    def path(self, rows: int) -> str:
        """What a step of `rows` rows runs on: "kernel", "onednn" or "torch"."""
        if self.packed is not None and rows <= self.kernel_rows:
            return "kernel"
        return "onednn" if self.onednn is not None and rows <= ONEDNN_ROWS else "torch"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] <= self.kernel_rows:
            return self.kernels.linear_bf16(x, self.packed, self.k, self.n, self.bias)
        if self.onednn is not None and x.shape[0] <= ONEDNN_ROWS:
            if x.stride(-1) != 1:
                x = x.contiguous()
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn, self.bias, "none", [], "")
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)
