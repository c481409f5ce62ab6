"""The bf16 linear kernel (linear_bf16.c) and `FastLinear`'s paths against a float32 reference
over many shapes: odd sizes, partial column blocks, more rows than one register block, strided
rows, bias; the portable C path built without AVX512-BF16 as well; and the default engine
running the native path."""

from __future__ import annotations

import ctypes

import pytest
import torch
from conftest import native_kernels

from conserve.kernels import _SOURCES, CpuKernels, build, pack_linear_weight
from conserve.kernels.linear import (
    FEW_KERNEL_ROWS,
    ONEDNN_ROWS,
    FastLinear,
    kernel_rows,
    onednn_bf16,
)

SHAPES = [(576, 1728), (64, 32), (1536, 576), (577, 33), (3, 100), (130, 47), (1, 1)]


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.float() @ w.float()
    return y if bias is None else y + bias.float()


def _check(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    # float32 accumulation rounded once to bf16: within a bf16 rounding step of the
    # reference (plus float32 summation-order noise, relative to the row's scale)
    scale = ref.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
    err = ((y.float() - ref).abs() / scale).max().item()
    assert err < 8e-3, err


def _cases():
    gen = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        w = torch.randn(k, n, generator=gen).to(torch.bfloat16)
        for bias in (None, torch.randn(n, generator=gen).to(torch.bfloat16)):
            for m in (1, 2, 3, 8, 9, 17):
                x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                yield w, bias, x


def _run_all(kernels: CpuKernels) -> None:
    for w, bias, x in _cases():
        y = kernels.linear_bf16(x, pack_linear_weight(w), *w.shape, bias)
        _check(y, _reference(x, w, bias))
    # rows with a stride (a column slice of a wider tensor), as a split leaves them
    w = torch.randn(96, 40).to(torch.bfloat16)
    wide = torch.randn(5, 300).to(torch.bfloat16)
    x = wide[:, 100:196]
    _check(kernels.linear_bf16(x, pack_linear_weight(w), 96, 40), _reference(x, w, None))


def test_linear_kernel_matches_the_reference_over_many_shapes():
    _run_all(native_kernels())


def test_portable_linear_kernel_without_avx512_bf16_matches_too(tmp_path):
    native_kernels()  # a compiler is there
    lib = tmp_path / "portable.so"
    build(_SOURCES, lib, ("-mno-avx512bf16",))
    _run_all(CpuKernels(ctypes.CDLL(str(lib))))


def test_largest_shape_and_full_vocabulary_projection():
    kernels = native_kernels()
    w = torch.randn(576, 49152).to(torch.bfloat16)  # SmolLM2's vocabulary projection
    x = torch.randn(2, 576).to(torch.bfloat16)
    _check(kernels.linear_bf16(x, pack_linear_weight(w), 576, 49152), _reference(x, w, None))


@pytest.mark.parametrize("rows", [1, FEW_KERNEL_ROWS, FEW_KERNEL_ROWS + 1, 64, ONEDNN_ROWS + 1])
def test_fast_linear_paths_match_the_reference(rows):
    kernels = native_kernels()
    w = torch.randn(200, 72).to(torch.bfloat16)
    bias = torch.randn(72).to(torch.bfloat16)
    x = torch.randn(rows, 200).to(torch.bfloat16)
    # the kernel for every row count (AVX512-BF16 without AMX), for few rows (elsewhere), and
    # no kernel: each path this step size can take
    seen = set()
    for k, onednn, most in (
        (kernels, onednn_bf16(), None),
        (kernels, onednn_bf16(), FEW_KERNEL_ROWS),
        (None, False, None),
    ):
        fast = FastLinear(w, bias, k, onednn, most)
        seen.add(fast.path(rows))
        _check(fast(x), _reference(x, w, bias))
    assert "kernel" in seen or rows > kernel_rows()


def test_the_default_bf16_engine_runs_the_native_linear_and_attention_paths():
    from conserve import LLM

    native_kernels()
    llm = LLM("default", dtype="bfloat16", num_blocks=64)
    model = llm.engine.runner.model
    layer = model.layers[0]
    mid = "onednn" if onednn_bf16() else "torch"  # where the kernel takes few rows
    for mod in (layer.qkv, layer.o_proj, layer.gate_up, layer.down, model.lm_head):
        assert mod.fast is not None and mod.fast.packed is not None
        assert mod.fast.path(1) == "kernel"
        assert mod.fast.path(64) == ("kernel" if kernel_rows() >= 64 else mid)
    assert llm.engine.runner.kernels is not None  # decode attention too
    # and a float32 engine keeps torch's matmuls (parity with the reference implementation)
    fp32 = LLM("default", dtype="float32", num_blocks=64).engine.runner.model
    assert fp32.lm_head.fast is None and fp32.layers[0].qkv.fast is None
    # --linear torch turns the prepacked path off
    plain = LLM("default", dtype="bfloat16", num_blocks=64, layers="torch").engine.runner.model
    assert plain.lm_head.fast is None


def test_without_a_working_compiler_the_engine_runs_on_the_torch_paths(tmp_path):
    """A machine whose compiler fails (here CC=false, in a fresh cache directory): the build is
    logged and skipped, and a bf16 engine generates on the torch paths (oneDNN matmuls where
    torch has them, torch attention)."""
    import os
    import subprocess
    import sys

    script = (
        "from conserve import LLM, SamplingParams\n"
        "llm = LLM('default', dtype='bfloat16', num_blocks=64)\n"
        "r = llm.engine.runner\n"
        "assert r.kernels is None and r.native is None\n"
        "lin = r.model.layers[0].qkv.fast\n"
        "assert lin is None or lin.packed is None\n"
        "assert r.model.layers[0].ops is None\n"
        "out = llm.generate('The capital of France is', SamplingParams(temperature=0, "
        "max_tokens=5), use_tqdm=False)[0].outputs[0]\n"
        "assert len(out.token_ids) == 5\n"
        "print('ok')\n"
    )
    env = os.environ | {"CC": "false", "CONSERVE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("CONSERVE_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert "compiled CPU kernels unavailable" in proc.stderr


def test_kernel_rows_default_and_override(monkeypatch):
    import sys

    from conserve.kernels import linear

    monkeypatch.delenv("CONSERVE_KERNEL_ROWS", raising=False)
    monkeypatch.setattr(linear, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert kernel_rows() == sys.maxsize  # every step on the kernel
    monkeypatch.setattr(linear, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert kernel_rows() == FEW_KERNEL_ROWS  # oneDNN's AMX matmuls from 4 rows
    monkeypatch.setattr(linear, "cpu_flags", lambda: frozenset())
    assert kernel_rows() == FEW_KERNEL_ROWS  # the portable loop is no GEMM
    monkeypatch.setenv("CONSERVE_KERNEL_ROWS", "7")
    assert kernel_rows() == 7
