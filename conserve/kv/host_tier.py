"""Host-tier block store: incremental checkpoints of offline requests' KV.

KV is append-only, so a block that is full never changes. After each step the engine copies the
blocks that offline requests completed in that step (and only those) to the host tier, gathered
into one copy. When online work needs device memory, an offline request is paused by freeing
its device blocks with no copy at all; when it resumes, its checkpointed blocks are copied back
and only the tail after the last full block is recomputed.

The store keeps the bookkeeping (which host blocks hold which request's blocks, in order); a
`BlockMover` does the copies, so the scheduler can be tested without tensors. With a
`HostFile` (`--host-kv-path`) the blocks and the bookkeeping outlive the engine: blocks a new
engine finds saved are orphans, adopted by a request that starts with the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch

from conserve.kv.host_file import HostFile
from conserve.kv.manager import hash_block, iter_block_hashes


class BlockMover(Protocol):
    def save(self, device_blocks: Sequence[int], host_blocks: Sequence[int]) -> None: ...

    def load(self, host_blocks: Sequence[int], device_blocks: Sequence[int]) -> None: ...


class TensorMover:
    """Copies blocks between the device KV tensors and host tensors of the same layout
    ([layers, kv_heads, blocks, block_size, head_dim]); optionally file-backed."""

    def __init__(
        self,
        device_k: torch.Tensor,
        device_v: torch.Tensor,
        num_blocks: int,
        file: HostFile | None = None,
    ) -> None:
        shape = list(device_k.shape)
        shape[2] = num_blocks
        if file is not None:  # mapped from the file: K then V
            numel = torch.Size(shape).numel()
            flat = file.tensor(2 * numel, device_k.dtype)
            self.k, self.v = flat[:numel].view(shape), flat[numel:].view(shape)
        else:
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
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        mover: BlockMover,
        file: HostFile | None = None,
        checkpoint_free: float = 1.0,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.mover = mover
        self.file = file
        # checkpoints are taken while less than this share of the device pool is free (1.0:
        # always); the scheduler reads it (`--host-kv-checkpoint-free`)
        self.checkpoint_free = checkpoint_free
        self._saved: dict[str, list[int]] = {}  # request -> host block of its block j
        self._keys: dict[str, list[bytes]] = {}  # request -> key of its block j (with a file)
        # key -> host blocks saved by an earlier engine, not adopted yet (with a file)
        self._orphans: dict[bytes, list[int]] = {}
        for block, key in (file.load(num_blocks) if file else {}).items():
            self._orphans.setdefault(key, []).append(block)
        held = {b for blocks in self._orphans.values() for b in blocks}
        # pop() hands out low ids first
        self._free = [b for b in range(num_blocks - 1, -1, -1) if b not in held]
        self.blocks_checkpointed = 0
        self.blocks_restored = 0
        self.blocks_adopted = 0  # orphans taken over by a new request
        # copies made and seconds spent in them (observed by `Engine.stats()`)
        self.num_checkpoints = 0
        self.num_restores = 0
        self.checkpoint_s = 0.0
        self.restore_s = 0.0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_orphans(self) -> int:
        return sum(len(v) for v in self._orphans.values())

    def saved_ids(self) -> list[str]:
        return list(self._saved)

    def saved_tokens(self, request_id: str) -> int:
        return len(self._saved.get(request_id, ())) * self.block_size

    def checkpoint(
        self,
        pending: dict[str, tuple[Sequence[int], int, Sequence[int]]],
        max_blocks: int | None = None,
    ) -> int:
        """`pending`: request -> (device block table, computed tokens, token ids). Copies every
        full block not saved yet (at most `max_blocks`, in the order of `pending`), all in one
        copy; stops when the host tier is full (orphans are given up first). Returns the
        number of blocks copied."""
        src: list[int] = []
        dst: list[int] = []
        keyed: list[tuple[int, bytes]] = []
        limit = max_blocks if max_blocks is not None else float("inf")
        for rid, (table, computed, tokens) in pending.items():
            saved = self._saved.setdefault(rid, [])
            for j in range(len(saved), computed // self.block_size):
                if len(src) >= limit:
                    break
                h = self._take_block()
                if h is None:
                    break
                saved.append(h)
                src.append(table[j])
                dst.append(h)
                if self.file is not None:
                    keys = self._keys.setdefault(rid, [])
                    bs = self.block_size
                    keys.append(
                        hash_block(keys[-1] if keys else None, tokens[j * bs : (j + 1) * bs])
                    )
                    keyed.append((h, keys[-1]))
        if src:
            t = time.perf_counter()
            self.mover.save(src, dst)
            self.checkpoint_s += time.perf_counter() - t
            self.num_checkpoints += 1
            self.blocks_checkpointed += len(src)
            if self.file is not None:
                self.file.saved(keyed)  # after the data: a journal line means its block is there
        return len(src)

    def _take_block(self) -> int | None:
        """A free host block, or an orphan's (given up), or None when the tier is full."""
        if not self._free and self._orphans:
            key = next(iter(self._orphans))
            blocks = self._orphans[key]
            self._free.append(blocks.pop())
            if not blocks:
                del self._orphans[key]
            self.file.freed(self._free[-1:])
        return self._free.pop() if self._free else None

    def orphan_blocks(self, token_ids: Sequence[int], max_blocks: int) -> int:
        """How many leading full blocks of `token_ids` (at most `max_blocks`) orphans hold."""
        if not self._orphans:
            return 0
        n = 0
        for key in iter_block_hashes(token_ids, self.block_size, max_blocks):
            if key not in self._orphans:
                break
            n += 1
        return n

    def adopt(self, request_id: str, token_ids: Sequence[int], num_blocks: int) -> None:
        """Make the orphans of the first `num_blocks` blocks of `token_ids` the saved blocks
        of `request_id` (which has none yet); `restore` then copies them back."""
        if self._saved.get(request_id):
            raise RuntimeError(f"{request_id} already has saved blocks")
        keys = list(iter_block_hashes(token_ids, self.block_size, num_blocks))
        saved = []
        for key in keys:
            blocks = self._orphans[key]
            saved.append(blocks.pop())
            if not blocks:
                del self._orphans[key]
        self._saved[request_id], self._keys[request_id] = saved, keys
        self.blocks_adopted += num_blocks

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
        blocks = self._saved.pop(request_id, [])
        self._keys.pop(request_id, None)
        self._free.extend(reversed(blocks))
        if self.file is not None and blocks:
            self.file.freed(blocks)

    def check_integrity(self) -> None:
        held = [b for blocks in self._saved.values() for b in blocks]
        held += [b for blocks in self._orphans.values() for b in blocks]
        if len(held) != len(set(held)) or set(held) & set(self._free):
            raise AssertionError("a host block is held twice or held and free")
        if len(held) + len(self._free) != self.num_blocks:
            raise AssertionError("host blocks are lost")
        if self.file is not None and any(
            len(self._keys.get(r, ())) != len(b) for r, b in self._saved.items()
        ):
            raise AssertionError("a saved block has no key")
