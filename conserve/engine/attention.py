"""Attention over the paged KV cache for one step of mixed prefill and decode.

The runner orders a step's tokens as: all single-token chunks (decodes) first, then the
multi-token chunks (prefills), each contiguous. Decodes are attended in one batched call over
their gathered blocks; each prefill chunk is attended on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from conserve.engine.step_parts import StepParts
from conserve.kernels import CpuKernels
from conserve.kv.cache import KVTensors


@dataclass(frozen=True)
class PrefillSegment:
    row_start: int  # first row of the chunk in the step's token order
    num_tokens: int
    context_len: int  # tokens attended by the chunk's last query (start + num_tokens)
    block_ids: torch.Tensor  # [blocks covering context_len] long


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] long: where each token's K/V is written
    num_decodes: int
    decode_block_ids: torch.Tensor | None  # [num_decodes * max_blocks] long (padded, flat)
    decode_max_blocks: int
    decode_bias: torch.Tensor | None  # [num_decodes, max_blocks * block_size] f32, -inf pads
    decode_lens: torch.Tensor | None  # [num_decodes] long
    prefills: tuple[PrefillSegment, ...]

    @staticmethod
    def build(
        decode_tables: list[list[int]],
        decode_lens: list[int],
        prefills: list[tuple[int, int, int, list[int]]],
        slot_mapping: list[int],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        n_dec = len(decode_tables)
        dec_ids = dec_bias = dec_lens = None
        max_blocks = 0
        if n_dec:
            max_blocks = max(len(t) for t in decode_tables)
            padded = [t + [0] * (max_blocks - len(t)) for t in decode_tables]
            dec_ids = torch.tensor(padded, dtype=torch.long).view(-1).to(device)
            lens = torch.tensor(decode_lens)
            cols = torch.arange(max_blocks * block_size)
            dec_bias = torch.zeros(n_dec, max_blocks * block_size)
            dec_bias.masked_fill_(cols[None, :] >= lens[:, None], float("-inf"))
            dec_bias = dec_bias.to(device)
            dec_lens = lens.to(device)
        segments = tuple(
            PrefillSegment(row, n, ctx, torch.tensor(blocks, dtype=torch.long, device=device))
            for row, n, ctx, blocks in prefills
        )
        return AttentionMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            num_decodes=n_dec,
            decode_block_ids=dec_ids,
            decode_max_blocks=max_blocks,
            decode_bias=dec_bias,
            decode_lens=dec_lens,
            prefills=segments,
        )


_BYTE = torch.empty(0, dtype=torch.uint8)  # the prefill kernel's scratch is raw bytes

# Gathered K+V bytes per decode group: well inside a server CPU's L2+L3.
_DECODE_GATHER_BYTES = 4 << 20


class Workspace:
    """Grow-only scratch buffers reused by every layer and step for gathered K/V."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = 1
        for d in shape:
            numel *= d
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
            buf = torch.empty(int(numel * 1.25) + 1, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)


class PagedAttention:
    """The attention callable handed to the model for one step."""

    def __init__(
        self,
        kv: KVTensors,
        meta: AttentionMetadata,
        scale: float,
        workspace: Workspace,
        kernels: CpuKernels | None = None,
        parts: StepParts | None = None,
    ) -> None:
        self.kv = kv
        self.meta = meta
        self.scale = scale
        self.workspace = workspace
        self.kernels = kernels
        self.parts = parts  # times each part as `attention` when set (step_parts.py)

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q: [N, Hq, D]; k, v: [N, Hkv, D] -> [N, Hq * D]
        call = self.begin(layer, q, k, v)
        call.run()
        return call.result()

    def begin(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> AttentionCall:
        """One layer's attention as parts that may be run with pauses between them."""
        return AttentionCall(self, layer, q, k, v)

    def _gather(self, name: str, cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        # cache: [Hkv, NB, BS, D] -> [Hkv, len(block_ids) * BS, D]
        # One contiguous-row gather per head into a reused buffer: on CPUs much faster than
        # gathering on the block axis of the 4-d tensor into a new allocation.
        hkv, nb, bs, d = cache.shape
        out = self.workspace.take(name, (hkv, block_ids.numel(), bs * d), cache)
        for h in range(hkv):
            torch.index_select(cache[h].view(nb, bs * d), 0, block_ids, out=out[h])
        return out.view(hkv, -1, d)

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        # q: [B, Hq, D] -> [B, Hq, D]; one query per request, grouped per KV head.
        # Requests are taken in groups small enough that their gathered K/V stay in the CPU's
        # cache between the gather and the two matmuls that read them.
        if self.kernels is not None:
            return self._decode_kernel(q, k_cache, v_cache)
        b = q.shape[0]
        max_blocks = self.meta.decode_max_blocks
        per_request = 2 * k_cache[:, :1].numel() * max_blocks * k_cache.element_size()
        group = max(1, _DECODE_GATHER_BYTES // per_request)
        if group >= b:
            return self._decode_group(q, k_cache, v_cache, 0, b)
        out = torch.empty_like(q)
        for lo in range(0, b, group):
            hi = min(b, lo + group)
            out[lo:hi] = self._decode_group(q[lo:hi], k_cache, v_cache, lo, hi)
        return out

    def _decode_kernel(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> torch.Tensor:
        # The compiled kernel reads the blocks in place; it computes in float32.
        b = q.shape[0]
        qf = q.float().contiguous()
        out = torch.empty_like(qf)
        tables = self.meta.decode_block_ids.view(b, self.meta.decode_max_blocks)
        self.kernels.paged_decode_attention(
            out, qf, k_cache, v_cache, tables, self.meta.decode_lens, self.scale
        )
        return out.to(q.dtype)

    def _decode_group(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        b, hq, d = q.shape
        hkv = k_cache.shape[0]
        g = hq // hkv
        mb = self.meta.decode_max_blocks
        ids = self.meta.decode_block_ids[lo * mb : hi * mb]
        keys = self._gather("k", k_cache, ids).view(hkv, b, -1, d)
        values = self._gather("v", v_cache, ids).view(hkv, b, -1, d)
        qg = (q * self.scale).view(b, hkv, g, d).transpose(0, 1)  # [Hkv, B, G, D]
        scores = torch.matmul(qg, keys.transpose(-1, -2)).float()  # [Hkv, B, G, L]
        scores += self.meta.decode_bias[None, lo:hi, None, :]
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, values)  # [Hkv, B, G, D]
        return out.transpose(0, 1).reshape(b, hq, d)

    def _prefill_kernel(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> bool:
        """Whether this step's prefill chunks run the compiled kernel (bf16, AVX512-BF16)."""
        return (
            self.kernels is not None
            and q.dtype == k_cache.dtype == torch.bfloat16
            and q.device.type == "cpu"
            and self.kernels.prefill_attention_supported(q.shape[1], k_cache.shape[0], q.shape[2])
        )

    def _prefill_into(
        self,
        out: torch.Tensor,
        seg: PrefillSegment,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> None:
        # q, out: [T, Hq, D]. The chunk's K/V are in the cache already (the step's first part).
        if self._prefill_kernel(q, k_cache, v_cache):
            hkv, d = k_cache.shape[0], q.shape[2]
            size = self.kernels.prefill_attention_scratch(hkv, seg.context_len, d)
            scratch = self.workspace.take("prefill", (size,), _BYTE)
            self.kernels.paged_prefill_attention_bf16(
                out, q, k_cache, v_cache, seg.block_ids, seg.context_len, self.scale, scratch
            )
            return
        out.copy_(self._prefill(seg, q, k, v, k_cache, v_cache))

    def _prefill(
        self,
        seg: PrefillSegment,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> torch.Tensor:
        # q: [T, Hq, D] -> [T, Hq, D]: torch's attention (every device and dtype)
        t = seg.num_tokens
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D]
        if seg.context_len == t:  # nothing cached before this chunk: attend to itself
            keys, values = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, T, D]
            mask, causal = None, True
        else:
            keys = self._gather("pk", k_cache, seg.block_ids)[:, : seg.context_len]
            values = self._gather("pv", v_cache, seg.block_ids)[:, : seg.context_len]
            past = seg.context_len - t
            rows = torch.arange(t, device=q.device)[:, None]
            cols = torch.arange(seg.context_len, device=q.device)[None, :]
            mask, causal = cols <= rows + past, False  # [T, L] bool
        out = F.scaled_dot_product_attention(
            qh,
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=self.scale,
            enable_gqa=True,
        )  # [1, Hq, T, D]
        return out[0].transpose(0, 1)


class AttentionCall:
    """One layer's attention for a step, in parts: the K/V write with the decodes' attention,
    then each prefill chunk's. A stopped step keeps the call and finishes it when resumed; the
    parts and their order are those of an uninterrupted call, so the result is the same."""

    def __init__(
        self, att: PagedAttention, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        self.att, self.layer, self.q, self.k, self.v = att, layer, q, k, v
        self.out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self.done = 0  # parts finished: 0 (none), 1 (K/V written, decodes), 1 + prefills

    @property
    def num_parts(self) -> int:
        return 1 + len(self.att.meta.prefills)

    def run(self, stop: Callable[[], bool] | None = None) -> bool:
        """Run the parts left; before each one but the first run in this call, `stop` may say
        to pause here. True when all parts are done."""
        first = True
        while self.done < self.num_parts:
            if stop is not None and not first and stop():
                return False
            if self.att.parts is None:
                self._part(self.done)
            else:
                with self.att.parts.part("attention"):
                    self._part(self.done)
            self.done, first = self.done + 1, False
        return True

    def result(self) -> torch.Tensor:
        n, hq, d = self.out.shape
        return self.out.view(n, hq * d)

    def _part(self, i: int) -> None:
        att, q, k, v = self.att, self.q, self.k, self.v
        k_cache, v_cache = att.kv.k[self.layer], att.kv.v[self.layer]  # [Hkv, NB, BS, D]
        if i == 0:
            hkv, d = k_cache.shape[0], q.shape[-1]
            k_cache.view(hkv, -1, d).index_copy_(1, att.meta.slot_mapping, k.transpose(0, 1))
            v_cache.view(hkv, -1, d).index_copy_(1, att.meta.slot_mapping, v.transpose(0, 1))
            nd = att.meta.num_decodes
            if nd:
                self.out[:nd] = att._decode(q[:nd], k_cache, v_cache)
            return
        seg = att.meta.prefills[i - 1]
        rows = slice(seg.row_start, seg.row_start + seg.num_tokens)
        att._prefill_into(self.out[rows], seg, q[rows], k[rows], v[rows], k_cache, v_cache)
