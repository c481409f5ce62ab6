"""Paged attention paths agree with dense attention: the PyTorch gather path and the compiled
CPU kernel, for float32 and bfloat16 caches, with ragged lengths and scattered blocks."""

from __future__ import annotations

import pytest
import torch
from conftest import native_kernels

from conserve.engine.attention import AttentionMetadata, PagedAttention, Workspace
from conserve.kv.cache import KVTensors
from conserve.model.config import ModelConfig

HKV, HQ, D, BS, NB = 2, 6, 32, 8, 64


def tiny_cfg() -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=10,
        hidden_size=HQ * D,
        intermediate_size=8,
        num_layers=1,
        num_heads=HQ,
        num_kv_heads=HKV,
        head_dim=D,
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )


def dense_reference(q, keys, values, scale):
    # q: [Hq, D]; keys, values: [Hkv, L, D]
    g = HQ // HKV
    qg = q.view(HKV, g, D)
    p = torch.softmax((qg @ keys.transpose(1, 2)) * scale, dim=-1)
    return (p @ values).reshape(HQ, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "cpu-kernel"])
def test_decode_paths_match_dense(dtype, backend):
    kernels = native_kernels() if backend == "cpu-kernel" else None
    torch.manual_seed(0)
    kv = KVTensors(tiny_cfg(), NB, BS, dtype, torch.device("cpu"))
    kv.k.normal_()
    kv.v.normal_()
    lens = [1, 7, 8, 9, 40, 63]
    perm = torch.randperm(NB).tolist()
    tables, used = [], 0
    for n in lens:  # scattered, non-overlapping blocks
        nblk = -(-n // BS)
        tables.append(perm[used : used + nblk])
        used += nblk
    # the new token of each sequence sits at position len-1
    slots = [t[(n - 1) // BS] * BS + (n - 1) % BS for t, n in zip(tables, lens, strict=True)]
    meta = AttentionMetadata.build(tables, lens, [], slots, BS, torch.device("cpu"))
    q = torch.randn(len(lens), HQ, D).to(dtype)
    k_new = torch.randn(len(lens), HKV, D).to(dtype)
    v_new = torch.randn(len(lens), HKV, D).to(dtype)
    attn = PagedAttention(kv, meta, D**-0.5, Workspace(), kernels)
    out = attn(0, q, k_new, v_new).view(len(lens), HQ, D)
    for i, (t, n) in enumerate(zip(tables, lens, strict=True)):
        keys = kv.k[0][:, t].reshape(HKV, -1, D)[:, :n].float()
        values = kv.v[0][:, t].reshape(HKV, -1, D)[:, :n].float()
        # the step wrote this token's K/V into the cache before attending
        assert torch.equal(keys[:, n - 1], k_new[i].float())
        ref = dense_reference(q[i].float(), keys, values, D**-0.5)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (out[i].float() - ref).abs().max().item() < tol


def test_loading_the_kernel_keeps_the_process_floating_point_state():
    """A library built with -ffast-math turns on flush-to-zero for the whole process when it is
    loaded; subnormal numbers must survive arithmetic after the kernel is loaded."""
    native_kernels()
    tiny = 5e-324  # the smallest subnormal double
    assert tiny * 1.0 > 0
    assert torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() > 0


def _kernel_case(kernels, hkv: int, hq: int, d: int, bs: int, lens: list[int]) -> None:
    """The compiled decode attention over a bf16 cache against dense float32 attention. With
    AVX512-BF16 and a head size that is a multiple of 32, the values are summed by bf16 dot
    products (probabilities rounded to bf16, as torch's attention does for bf16 inputs): its
    error must stay within 3x that of torch's own bf16 attention on the same inputs; otherwise
    (float32 products of bf16 values) within float32 rounding."""
    gen = torch.Generator().manual_seed(hkv * 1000 + d + bs)
    nb = sum(-(-n // bs) for n in lens) + 3
    k_cache = torch.randn(hkv, nb, bs, d, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(hkv, nb, bs, d, generator=gen).to(torch.bfloat16)
    perm = torch.randperm(nb, generator=gen).tolist()
    mb = max(-(-n // bs) for n in lens)
    tables, used = [], 0
    for n in lens:
        nblk = -(-n // bs)
        tables.append(perm[used : used + nblk] + [0] * (mb - nblk))
        used += nblk
    # q as a bf16 model makes it: bf16 values held in float32
    q = torch.randn(len(lens), hq, d, generator=gen).to(torch.bfloat16).float()
    out = torch.empty_like(q)
    scale = d**-0.5
    kernels.paged_decode_attention(
        out, q, k_cache, v_cache, torch.tensor(tables), torch.tensor(lens), scale
    )
    g = hq // hkv
    # the decode kernel sums values by bf16 dot products where the build has AVX512-BF16 and
    # d % 32 == 0: the same condition the prefill kernel reports for these shapes
    bf16_values = kernels.prefill_attention_supported(hq, hkv, d)
    for i, n in enumerate(lens):
        blocks = tables[i][: -(-n // bs)]
        keys = k_cache[:, blocks].reshape(hkv, -1, d)[:, :n].float()
        values = v_cache[:, blocks].reshape(hkv, -1, d)[:, :n].float()
        p = torch.softmax((q[i].view(hkv, g, d) @ keys.transpose(1, 2)) * scale, dim=-1)
        ref = (p @ values).reshape(hq, d)
        err = (out[i] - ref).abs().max().item()
        if not bf16_values:
            # float32 sums of exact bf16 products: about 5e-7 here (a wrong exp polynomial
            # term gave 1e-3)
            assert err < 2e-5, (hkv, hq, d, bs, n)
            continue
        qb = q[i].to(torch.bfloat16).view(hkv, g, 1, d)
        bf = torch.nn.functional.scaled_dot_product_attention(
            qb, keys.to(torch.bfloat16)[:, None], values.to(torch.bfloat16)[:, None], scale=scale
        )
        torch_err = (bf.float().reshape(hq, d) - ref).abs().max().item()
        # measured: 0.25-1.3x torch's error (its output is rounded to bf16, this one is not);
        # with the two tokens of a pair swapped in the values: errors of 2.6-3.1
        assert err < 3e-2 and err < 3 * torch_err + 1e-4, (hkv, hq, d, bs, n, err, torch_err)


# (KV heads, query heads, head size, block size): SmolLM2's 3 x 9 x 64 in blocks of 16, a
# Llama-like 128 with groups of 4, one head per group, a block of 32 and one of 8, an odd
# head size (the portable path in every build)
KERNEL_SHAPES = [(3, 9, 64, 16), (2, 8, 128, 16), (4, 4, 64, 32), (1, 6, 32, 8), (2, 4, 40, 16)]
KERNEL_LENS = [1, 2, 15, 16, 17, 33, 100, 2048]  # 2048: the default model's longest context


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
def test_compiled_decode_attention_over_many_shapes_and_the_longest_context(shape):
    _kernel_case(native_kernels(), *shape, KERNEL_LENS)


def test_portable_decode_attention_without_avx512_bf16_matches_too(tmp_path):
    import ctypes

    from conserve.kernels import _SOURCES, CpuKernels, build

    native_kernels()
    lib = tmp_path / "portable.so"
    build(_SOURCES, lib, ("-mno-avx512bf16",))
    portable = CpuKernels(ctypes.CDLL(str(lib)))
    for shape in KERNEL_SHAPES[:2]:
        _kernel_case(portable, *shape, KERNEL_LENS)
