"""The compiled prefill attention (bf16, AVX512-BF16) against dense float32 attention: chunks
with and without cached context before them, scattered blocks, odd lengths, several head
shapes, the longest context; and through `PagedAttention` in a step that mixes decodes and
two prefill chunks, against the torch path."""

from __future__ import annotations

import ctypes

import pytest
import torch
from conftest import native_kernels

from conserve.engine.attention import AttentionMetadata, PagedAttention, Workspace
from conserve.kv.cache import KVTensors
from conserve.model.config import ModelConfig


def _kernels():
    kernels = native_kernels()
    if not kernels.prefill_attention_supported(9, 3, 64):
        pytest.skip("this CPU has no AVX512-BF16: prefill attention stays on torch")
    return kernels


def _scattered(nb: int, n: int, bs: int, gen: torch.Generator) -> list[int]:
    return torch.randperm(nb, generator=gen)[: -(-n // bs)].tolist()


def _case(kernels, hkv: int, hq: int, d: int, bs: int, t: int, ctx: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed + hkv * 100 + d + t + ctx)
    nb = -(-ctx // bs) + 5
    k_cache = torch.randn(hkv, nb, bs, d, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(hkv, nb, bs, d, generator=gen).to(torch.bfloat16)
    blocks = _scattered(nb, ctx, bs, gen)
    # q as the model hands it over: a strided view of the fused qkv projection
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen).to(torch.bfloat16)
    q = qkv[:, : hq * d].view(t, hq, d)
    out = torch.full((t, hq, d), float("nan"), dtype=torch.bfloat16)
    scale = d**-0.5
    scratch = torch.empty(kernels.prefill_attention_scratch(hkv, ctx, d), dtype=torch.uint8)
    ids = torch.tensor(blocks, dtype=torch.long)
    kernels.paged_prefill_attention_bf16(out, q, k_cache, v_cache, ids, ctx, scale, scratch)

    keys = k_cache[:, blocks].reshape(hkv, -1, d)[:, :ctx].float()
    values = v_cache[:, blocks].reshape(hkv, -1, d)[:, :ctx].float()
    g = hq // hkv
    qg = q.float().view(t, hkv, g, d).permute(1, 2, 0, 3)  # [Hkv, G, T, D]
    scores = (qg @ keys.transpose(1, 2)[:, None]) * scale  # [Hkv, G, T, L]
    past = ctx - t
    visible = torch.arange(ctx)[None, :] <= torch.arange(t)[:, None] + past
    scores = scores.masked_fill(~visible, float("-inf"))
    ref = (torch.softmax(scores, -1) @ values[:, None]).permute(2, 0, 1, 3).reshape(t, hq, d)
    err = (out.float() - ref).abs().max().item()
    # torch's own attention on the same bf16 inputs, for the size of a bf16 result's error
    bf = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        keys.to(torch.bfloat16)[None],
        values.to(torch.bfloat16)[None],
        attn_mask=visible,
        scale=scale,
        enable_gqa=True,
    )[0].transpose(0, 1)
    torch_err = (bf.float() - ref).abs().max().item()
    # probabilities rounded to bf16 before the values are summed (as torch does for bf16),
    # and the output rounded to bf16: about 1e-2 on values of unit size
    assert err < 3e-2 and err < 3 * torch_err + 1e-3, (hkv, hq, d, bs, t, ctx, err, torch_err)
    return err, torch_err


# (KV heads, query heads, head size, block size): SmolLM2's, a Llama-like 128 with groups of 4,
# one query head per KV head in blocks of 32, groups of 8 in blocks of 8, a head of 32
SHAPES = [(3, 9, 64, 16), (2, 8, 128, 16), (4, 4, 64, 32), (1, 8, 64, 8), (2, 6, 32, 16)]
# (chunk tokens, context): a chunk alone, a chunk after cached context, one token, lengths that
# are not multiples of the kernel's 32-key blocks or 16-token tiles
CHUNKS = [(1, 1), (1, 37), (5, 5), (17, 17), (33, 100), (64, 64), (100, 1000), (31, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_prefill_kernel_matches_dense_attention(shape):
    kernels = _kernels()
    for t, ctx in CHUNKS:
        _case(kernels, *shape, t, ctx)


def test_prefill_kernel_at_the_longest_context():
    kernels = _kernels()
    _case(kernels, 3, 9, 64, 16, 2048, 2048)  # a whole 2048-token prompt in one chunk
    _case(kernels, 3, 9, 64, 16, 256, 2048)  # the last chunk of one


def _cfg(hkv: int, hq: int, d: int) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=10,
        hidden_size=hq * d,
        intermediate_size=8,
        num_layers=1,
        num_heads=hq,
        num_kv_heads=hkv,
        head_dim=d,
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def test_a_mixed_step_gives_the_torch_paths_result():
    """Decodes, a chunk after cached context and a chunk alone in one step: the step with the
    compiled prefill attention agrees with the step on torch's attention."""
    kernels = _kernels()
    hkv, hq, d, bs, nb = 3, 9, 64, 16, 64
    torch.manual_seed(1)
    kv = KVTensors(_cfg(hkv, hq, d), nb, bs, torch.bfloat16, torch.device("cpu"))
    kv.k.normal_()
    kv.v.normal_()
    perm = torch.randperm(nb).tolist()
    dec_tables, dec_lens = [perm[0:2], perm[2:3]], [20, 9]
    pre1 = perm[3:13]  # 150 tokens cached, 10 new at positions 150..159
    pre2 = perm[13:17]  # a new prompt of 50 tokens
    slots = [
        t[(n - 1) // bs] * bs + (n - 1) % bs for t, n in zip(dec_tables, dec_lens, strict=True)
    ]
    slots += [pre1[p // bs] * bs + p % bs for p in range(150, 160)]
    slots += [pre2[p // bs] * bs + p % bs for p in range(50)]
    prefills = [(2, 10, 160, pre1), (12, 50, 50, pre2)]
    n = 2 + 10 + 50
    q = torch.randn(n, hq, d).to(torch.bfloat16)
    k = torch.randn(n, hkv, d).to(torch.bfloat16)
    v = torch.randn(n, hkv, d).to(torch.bfloat16)
    outs = []
    for use in (kernels, None):
        meta = AttentionMetadata.build(dec_tables, dec_lens, prefills, slots, bs, q.device)
        att = PagedAttention(kv, meta, d**-0.5, Workspace(), use)
        # the kernel's step takes the compiled prefill path; the other torch's
        assert att._prefill_kernel(q, kv.k[0], kv.v[0]) == (use is not None)
        outs.append(att(0, q, k, v))
    native, reference = outs
    assert (native.float() - reference.float()).abs().max().item() < 3e-2


def test_a_build_without_avx512_bf16_says_unsupported(tmp_path):
    """Where the instruction is missing the kernel declines, and the attention runs torch's."""
    from conserve.kernels import _SOURCES, CpuKernels, build

    native_kernels()
    lib = tmp_path / "portable.so"
    build(_SOURCES, lib, ("-mno-avx512bf16",))
    portable = CpuKernels(ctypes.CDLL(str(lib)))
    assert not portable.prefill_attention_supported(9, 3, 64)
