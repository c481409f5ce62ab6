"""Host-tier block store: incremental checkpoints of offline requests' KV.

KV is append-only, so a block that is full never changes. After each step the engine copies the
blocks that offline requests completed in that step (and only those) to the host tier, gathered
into one copy. When online work needs device memory, an offline request is paused by freeing
its device blocks with no copy at all; when it resumes, its checkpointed blocks are copied back
and only the tail after the last full block is recomputed.

The store keeps the bookkeeping (which host blocks hold which request's blocks, in order); a
`BlockMover` does the copies, so the scheduler can be tested without tensors.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch


class BlockMover(Protocol):
    def save(self, device_blocks: Sequence[int], host_blocks: Sequence[int]) -> None: ...

    def load(self, host_blocks: Sequence[int], device_blocks: Sequence[int]) -> None: ...


class TensorMover:
    """Copies blocks between the device KV tensors and host tensors of the same layout
    ([layers, kv_heads, blocks, block_size, head_dim]); optionally file-backed."""

    def __init__(self, device_k: torch.Tensor, device_v: torch.Tensor, num_blocks: int) -> None:
        shape = list(device_k.shape)
        shape[2] = num_blocks
        pin = device_k.device.type == "cuda"
        self.k = torch.zeros(shape, dtype=device_k.dtype, pin_memory=pin)
        self.v = torch.zeros(shape, dtype=device_k.dtype, pin_memory=pin)
        self.dk, self.dv = device_k, device_v

    def save(self, device_blocks: Sequence[int], host_blocks: Sequence[int]) -> None:
        src = torch.tensor(device_blocks, device=self.dk.device)
        dst = torch.tensor(host_blocks)
        for d, h in ((self.dk, self.k), (self.dv, self.v)):
            h.index_copy_(2, dst, d.index_select(2, src).to("cpu", non_blocking=False))

    def load(self, host_blocks: Sequence[int], device_blocks: Sequence[int]) -> None:
        src = torch.tensor(host_blocks)
        dst = torch.tensor(device_blocks, device=self.dk.device)
        for d, h in ((self.dk, self.k), (self.dv, self.v)):
            d.index_copy_(2, dst, h.index_select(2, src).to(d.device))


class HostKVStore:
    def __init__(self, num_blocks: int, block_size: int, mover: BlockMover) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.mover = mover
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._saved: dict[str, list[int]] = {}  # request -> host block of its block j
        self.blocks_checkpointed = 0
        self.blocks_restored = 0
        # copies made and seconds spent in them (observed by `Engine.stats()`)
        self.num_checkpoints = 0
        self.num_restores = 0
        self.checkpoint_s = 0.0
        self.restore_s = 0.0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def saved_ids(self) -> list[str]:
        return list(self._saved)

    def saved_tokens(self, request_id: str) -> int:
        return len(self._saved.get(request_id, ())) * self.block_size

    def checkpoint(self, pending: dict[str, tuple[Sequence[int], int]]) -> int:
        """`pending`: request -> (device block table, computed tokens). Copies every full
        block not saved yet, all requests in one copy; stops when the host tier is full.
        Returns the number of blocks copied."""
        src: list[int] = []
        dst: list[int] = []
        for rid, (table, computed) in pending.items():
            saved = self._saved.setdefault(rid, [])
            for j in range(len(saved), computed // self.block_size):
                if not self._free:
                    break
                h = self._free.pop()
                saved.append(h)
                src.append(table[j])
                dst.append(h)
        if src:
            t = time.perf_counter()
            self.mover.save(src, dst)
            self.checkpoint_s += time.perf_counter() - t
            self.num_checkpoints += 1
            self.blocks_checkpointed += len(src)
        return len(src)

    def restore(self, request_id: str, table: Sequence[int], first: int, last: int) -> None:
        """Copy the request's saved blocks first .. last - 1 into its device blocks."""
        saved = self._saved[request_id]
        if last > first:
            t = time.perf_counter()
            self.mover.load(saved[first:last], table[first:last])
            self.restore_s += time.perf_counter() - t
            self.num_restores += 1
            self.blocks_restored += last - first

    def drop(self, request_id: str) -> None:
        self._free.extend(reversed(self._saved.pop(request_id, [])))

    def check_integrity(self) -> None:
        held = [b for blocks in self._saved.values() for b in blocks]
        if len(held) != len(set(held)) or set(held) & set(self._free):
            raise AssertionError("a host block is held twice or held and free")
        if len(held) + len(self._free) != self.num_blocks:
            raise AssertionError("host blocks are lost")
