"""Device KV block pool: ids, reference counts, and the prefix cache over full blocks.

Invariants (checked by `check_integrity`):
- Every block is in exactly one of three states:
  * free: ref_count == 0, no hash, in the free queue;
  * cached: ref_count == 0, has a hash, in the free queue (reusable by a prefix hit, evictable);
  * referenced: ref_count > 0, not in the free queue (may or may not have a hash).
  free + cached + referenced == num_blocks.
- `hash -> block` holds exactly the blocks that carry a hash, and each block's hash maps back to it.
- The free queue is in eviction order: blocks are taken from its front; blocks released by a
  request go to its back, so recently used prefixes are evicted last (LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

BlockHash = bytes


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # insertion-ordered set of block ids with ref_count 0, front = next to be reused
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.num_evictions = 0

    # -- queries ----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free or evictable cached)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._cached.get(block_hash)

    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    # -- mutations --------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks from the front of the free queue (evicting cached contents)."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        ids = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
                self.num_evictions += 1
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference on cached blocks (a prefix hit)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference on each block; unreferenced ones join the back of the queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"KV block {block_id} released more often than referenced")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.block_hash is None:
                    # Nothing worth keeping: reuse it before any cached block.
                    self._free[block_id] = None
                    self._free.move_to_end(block_id, last=False)
                else:
                    self._free[block_id] = None

    def cache(self, block_id: int, block_hash: BlockHash) -> bool:
        """Publish a full, computed block under its hash. False if the hash is already cached
        (another request computed the same content first); the block then stays private."""
        if not self.enable_caching or block_hash in self._cached:
            return False
        block = self.blocks[block_id]
        assert block.block_hash is None and block.ref_count > 0
        block.block_hash = block_hash
        self._cached[block_hash] = block_id
        return True

    def reset_prefix_cache(self) -> None:
        """Forget all cached contents of unreferenced blocks."""
        for block_id in self._free:
            block = self.blocks[block_id]
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None

    # -- checking ---------------------------------------------------------------------------
    def check_integrity(self) -> None:
        free = cached = referenced = 0
        for block in self.blocks:
            in_queue = block.block_id in self._free
            if block.ref_count < 0:
                raise AssertionError(f"block {block.block_id} has ref_count {block.ref_count}")
            if block.ref_count == 0 and not in_queue:
                raise AssertionError(f"unreferenced block {block.block_id} is not in the queue")
            if block.ref_count > 0 and in_queue:
                raise AssertionError(f"referenced block {block.block_id} is in the free queue")
            if (
                block.block_hash is not None
                and self._cached.get(block.block_hash) != block.block_id
            ):
                raise AssertionError(f"block {block.block_id} hash is not indexed")
            if block.ref_count > 0:
                referenced += 1
            elif block.block_hash is None:
                free += 1
            else:
                cached += 1
        if free + cached + referenced != self.num_blocks:
            raise AssertionError(
                f"{free} free + {cached} cached + {referenced} referenced "
                f"!= {self.num_blocks} blocks"
            )
        if len(self._cached) != sum(b.block_hash is not None for b in self.blocks):
            raise AssertionError("hash index holds blocks that carry no hash")
