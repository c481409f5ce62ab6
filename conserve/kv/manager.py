"""Per-request block tables on top of the block pool, with prefix caching by hash chain.

A request's KV lives in `block_table(request_id)`: token i is in block `table[i // block_size]`
at offset `i % block_size`. A block is shared between requests only through a prefix hit, and a
block is published in the prefix cache only once all of its tokens are computed. The hash of
block j covers the tokens of blocks 0..j (hash chain), so equal hashes mean equal prefixes.

Check/commit pairs: `can_allocate` says whether `allocate` would succeed; planning calls the
first, applying the plan calls the second.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from conserve.kv.block_pool import BlockHash, BlockPool


def hash_block(parent: BlockHash | None, tokens: Sequence[int]) -> BlockHash:
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


def iter_block_hashes(
    token_ids: Sequence[int], block_size: int, num_blocks: int
) -> Iterator[BlockHash]:
    """The hash chain of the first `num_blocks` full blocks of `token_ids`, lazily."""
    parent: BlockHash | None = None
    for j in range(num_blocks):
        parent = hash_block(parent, token_ids[j * block_size : (j + 1) * block_size])
        yield parent


@dataclass(frozen=True)
class PrefixHit:
    block_ids: tuple[int, ...] = ()
    block_size: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.block_ids) * self.block_size


@dataclass
class _Table:
    blocks: list[int] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # of the leading full, computed blocks


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self._tables: dict[str, _Table] = {}
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    # -- queries ----------------------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables[request_id].blocks

    def has(self, request_id: str) -> bool:
        return request_id in self._tables

    def iter_block_hashes(self, token_ids: Sequence[int], num_blocks: int) -> Iterator[BlockHash]:
        """The hash chain of the first `num_blocks` full blocks of `token_ids`, lazily."""
        return iter_block_hashes(token_ids, self.block_size, num_blocks)

    def block_hashes(self, token_ids: Sequence[int], num_blocks: int) -> list[BlockHash]:
        return list(self.iter_block_hashes(token_ids, num_blocks))

    def find_prefix(self, token_ids: Sequence[int]) -> PrefixHit:
        """Longest run of cached full blocks at the start of `token_ids`. At least one token is
        always left to compute, so the request still produces logits."""
        if not self.enable_prefix_caching:
            return PrefixHit((), self.block_size)
        bs = self.block_size
        found: list[int] = []
        for block_hash in self.iter_block_hashes(token_ids, (len(token_ids) - 1) // bs):
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return PrefixHit(tuple(found), bs)

    def can_allocate(
        self, request_id: str, num_tokens: int, prefix: PrefixHit | None = None
    ) -> bool:
        """Would `allocate(request_id, num_tokens, prefix)` succeed now?"""
        have = len(self._tables[request_id].blocks) if request_id in self._tables else 0
        hit = prefix.block_ids if prefix else ()
        need = self.blocks_needed(num_tokens) - have - len(hit)
        # Hit blocks that are unreferenced leave the free queue when we take them.
        taken = sum(1 for b in hit if self.pool.blocks[b].ref_count == 0)
        return need <= self.pool.num_free_blocks - taken

    # -- mutations --------------------------------------------------------------------------
    def allocate(self, request_id: str, num_tokens: int, prefix: PrefixHit | None = None) -> None:
        """Grow the request's table so it can hold `num_tokens` tokens, starting with the
        prefix-hit blocks for a request that has no table yet."""
        if not self.can_allocate(request_id, num_tokens, prefix):
            raise RuntimeError(f"not enough free KV blocks for {num_tokens} tokens")
        table = self._tables.get(request_id)
        if table is None:
            table = self._tables[request_id] = _Table()
            if prefix and prefix.block_ids:
                self.pool.touch(prefix.block_ids)
                table.blocks.extend(prefix.block_ids)
        elif prefix and prefix.block_ids:
            raise RuntimeError("a prefix hit can only start a new block table")
        need = self.blocks_needed(num_tokens) - len(table.blocks)
        if need > 0:
            table.blocks.extend(self.pool.allocate(need))

    def record_prefix_query(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    def commit(self, request_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Publish the request's blocks that became full and computed (`num_computed` tokens of
        `token_ids` are now in the cache)."""
        if not self.enable_prefix_caching:
            return
        table = self._tables[request_id]
        bs = self.block_size
        for j in range(len(table.hashes), num_computed // bs):
            parent = table.hashes[-1] if table.hashes else None
            block_hash = hash_block(parent, token_ids[j * bs : (j + 1) * bs])
            table.hashes.append(block_hash)
            if self.pool.blocks[table.blocks[j]].block_hash is None:
                self.pool.cache(table.blocks[j], block_hash)

    def free(self, request_id: str) -> None:
        """Release all blocks of a request (finished, aborted or preempted)."""
        table = self._tables.pop(request_id, None)
        if table is not None:
            # Tail first, so a shared prefix stays cached longer than the tail behind it.
            self.pool.release(reversed(table.blocks))

    # -- checking ---------------------------------------------------------------------------
    @property
    def num_request_tables(self) -> int:
        return len(self._tables)

    def check_integrity(self) -> None:
        """Pool invariants, plus: each block's ref_count equals the number of tables holding it."""
        self.pool.check_integrity()
        refs = [0] * self.pool.num_blocks
        for table in self._tables.values():
            for b in table.blocks:
                refs[b] += 1
        for block in self.pool.blocks:
            if block.ref_count != refs[block.block_id]:
                raise AssertionError(
                    f"block {block.block_id}: ref_count {block.ref_count}, "
                    f"held by {refs[block.block_id]} tables"
                )
