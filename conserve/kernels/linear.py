"""bf16 linear layers on CPUs with weights prepacked once, at load.

`torch.mm` on a plain [K, N] bf16 weight reorders it into the GEMM library's blocked layout on
every call: the linear layers of 1-64 row steps moved their weights at 9-12.5 GB/s where the
development machine read 34.6 GB/s (benchmarks/results/roofline-20261202-2142.md).
`FastLinear` packs each weight once:
- rows <= SMALL_ROWS: linear_bf16.c streams its own packed copy with AVX512-BF16 dot products
  (about the memory bandwidth at one row; its compute rate bounds it from 3-4 rows on);
- up to ONEDNN_ROWS rows: oneDNN's linear (torch's mkldnn op, the one torch.compile uses for
  frozen CPU weights) on a weight reordered for it once;
- more rows, or neither available: torch.mm, as before (at 512 rows and more the reorder is
  a small share of the product; in quick checks torch.mm was as fast there).
float32 models never come here: their matmuls stay torch's, so fp32 outputs keep matching the
reference implementation token for token.
"""

from __future__ import annotations

import torch

from conserve.kernels import CpuKernels, pack_linear_weight

# The compiled kernel takes steps of at most this many rows: in quick checks on the
# development CPU (the model's 120 layer weights) it beat oneDNN's prepacked linear at 1 row,
# tied at 2 and lost from 4; `bench roofline` shows the result in the engine's own steps.
SMALL_ROWS = 2
# In the same checks oneDNN on prepacked weights beat torch.mm from 1 to 256 rows, by less as
# the rows grow, and lost at 512.
ONEDNN_ROWS = 256


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
    ) -> None:
        assert weight_t.dtype == torch.bfloat16 and weight_t.device.type == "cpu"
        self.k, self.n = weight_t.shape
        self.weight_t = weight_t
        self.bias = None if bias is None else bias.detach().contiguous()
        self.kernels = kernels
        self.packed = pack_linear_weight(weight_t) if kernels is not None else None
        self.onednn = (
            torch.ops.mkldnn._reorder_linear_weight(weight_t.t().contiguous(), 16)
            if onednn
            else None
        )

    @property
    def path(self) -> str:
        """What mid-sized steps run on: "onednn" or "torch" (small ones on the kernel when
        packed, large ones on torch)."""
        return "onednn" if self.onednn is not None else "torch"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.shape[0] <= SMALL_ROWS:
            return self.kernels.linear_bf16(x, self.packed, self.k, self.n, self.bias)
        if self.onednn is not None and x.shape[0] <= ONEDNN_ROWS:
            if x.stride(-1) != 1:
                x = x.contiguous()
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn, self.bias, "none", [], "")
        if self.bias is None:
            return torch.mm(x, self.weight_t)
        return torch.addmm(self.bias, x, self.weight_t)
