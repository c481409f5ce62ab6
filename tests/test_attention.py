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
