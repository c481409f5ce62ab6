"""The compiled per-layer ops (ops_bf16.c) against the torch ops of the bf16 layer path they
replace, over odd sizes, strided rows and enough rows to be split over threads: the same bits
(RoPE), or now and then one bf16 rounding step away (RMSNorm: float32 summation order; SiLU:
a vector exp of its own)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import native_kernels

from conserve.model.llama import RMSNorm, apply_rope

ROWS = [1, 3, 17, 300]  # 300 x 576 and more: split over the threads


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("n", [576, 65, 2048])
def test_rms_norm_matches_the_torch_path(rows, n):
    kernels = native_kernels()
    gen = torch.Generator().manual_seed(rows * n)
    norm = RMSNorm(n, 1e-5)
    norm.weight.data = torch.randn(n, generator=gen)
    norm = norm.to(torch.bfloat16)
    wide = (torch.randn(rows, n + 7, generator=gen) * 4).to(torch.bfloat16)
    # the sum of squares is taken in another order than torch's: now and then the result is
    # one bf16 rounding step (of the normalized value, then of the product) away
    for x in (wide[:, :n].contiguous(), wide[:, 7:]):  # contiguous and strided rows
        out, want = kernels.rms_norm_bf16(x, norm.weight, 1e-5).float(), norm(x).float()
        assert ((out - want).abs() <= want.abs() / 64).all()
        assert (out != want).float().mean() < 1e-3


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("inter", [1536, 37])
def test_silu_mul_matches_the_torch_path(rows, inter):
    kernels = native_kernels()
    gate_up = (torch.randn(rows, 2 * inter) * 4).to(torch.bfloat16)
    gate, up = gate_up.split(inter, -1)
    out, want = kernels.silu_mul_bf16(gate_up).float(), (F.silu(gate) * up).float()
    # a vector exp of its own: now and then a last-bit difference in silu before the rounding,
    # one bf16 rounding step (of silu, then of the product) at most
    assert ((out - want).abs() <= want.abs() / 64).all()
    assert (out != want).float().mean() < 0.01


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("heads", "d"), [(12, 64), (5, 128), (3, 16)])
def test_rope_in_place_matches_the_torch_path_bit_for_bit(rows, heads, d):
    kernels = native_kernels()
    qkv = torch.randn(rows, heads * d + 2 * d).to(torch.bfloat16)  # rotated heads, then others
    cos, sin = torch.randn(rows, d).to(torch.bfloat16), torch.randn(rows, d).to(torch.bfloat16)
    want = apply_rope(qkv[:, : heads * d].view(rows, heads, d), cos[:, None], sin[:, None])
    out = qkv.clone()
    kernels.rope_bf16(out, cos, sin, heads, d)
    assert torch.equal(out[:, : heads * d].view(rows, heads, d), want)
    assert torch.equal(out[:, heads * d :], qkv[:, heads * d :])  # the rest untouched


@pytest.mark.parametrize("lines", [1, 7, 1000, 70001])  # 70001 lines: split over the threads
def test_stream_read_reads_every_byte_once(lines):
    """bench roofline's bandwidth probe: its result is the wrapping sum of all 64-bit words,
    so a byte skipped or read twice changes it."""
    kernels = native_kernels()
    gen = torch.Generator().manual_seed(lines)
    buf = torch.randint(0, 1 << 40, (lines * 8,), generator=gen, dtype=torch.int64)
    assert kernels.stream_read(buf) == int(buf.sum()) % (1 << 64)
    with pytest.raises(AssertionError, match="multiple of 64"):
        kernels.stream_read(buf[:-1])
