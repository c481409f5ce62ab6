"""BlockPool: block ids, reference counts, the LRU free queue and the prefix-cache index."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from conserve.kv.block_pool import BlockPool


def h(i: int) -> bytes:
    return f"hash-{i}".encode()


def drain_order(pool: BlockPool) -> list[int]:
    """Allocate every free block one at a time: the queue's eviction order."""
    order = [pool.allocate(1)[0] for _ in range(pool.num_free_blocks)]
    pool.check_integrity()
    return order


def test_pool_needs_at_least_one_block() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_hands_out_ids_in_order_with_one_reference() -> None:
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.num_free_blocks == 1
    assert [b.ref_count for b in pool.blocks] == [1, 1, 1, 1, 1, 0]
    assert pool.usage() == pytest.approx(5 / 6)
    pool.check_integrity()


def test_allocate_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) == [3]
    pool.check_integrity()


def test_release_of_unhashed_blocks_puts_them_at_the_front() -> None:
    pool = BlockPool(6)
    pool.allocate(4)  # 0..3; queue: 4, 5
    pool.release([1])  # queue: 1, 4, 5
    pool.release([2])  # queue: 2, 1, 4, 5
    assert pool.num_free_blocks == 4
    pool.check_integrity()
    assert drain_order(pool) == [2, 1, 4, 5]


def test_release_of_cached_blocks_puts_them_at_the_back() -> None:
    pool = BlockPool(6)
    pool.allocate(4)  # 0..3; queue: 4, 5
    assert pool.cache(0, h(0))
    assert pool.cache(1, h(1))
    pool.release([1])  # queue: 4, 5, 1
    pool.release([0])  # queue: 4, 5, 1, 0
    pool.release([2])  # unhashed, front: 2, 4, 5, 1, 0
    assert pool.num_cached_blocks == 2
    pool.check_integrity()
    assert drain_order(pool) == [2, 4, 5, 1, 0]


def test_cached_block_is_found_touched_and_released_again() -> None:
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    assert pool.cache(block, h(7))
    pool.release([block])
    assert pool.num_free_blocks == 4  # cached blocks still count as reusable
    assert pool.lookup(h(7)) == block
    assert pool.lookup(h(8)) is None

    pool.touch([block])
    assert pool.blocks[block].ref_count == 1
    assert pool.num_free_blocks == 3  # it left the free queue
    pool.touch([block])
    assert pool.blocks[block].ref_count == 2
    assert pool.num_free_blocks == 3
    pool.check_integrity()

    pool.release([block])
    assert pool.num_free_blocks == 3  # still referenced once
    pool.release([block])
    assert pool.num_free_blocks == 4
    assert pool.lookup(h(7)) == block  # hash survives the release
    pool.check_integrity()
    # it went to the back again: evicted last
    assert drain_order(pool) == [1, 2, 3, block]


def test_touch_and_release_refresh_lru_position() -> None:
    pool = BlockPool(3)
    pool.allocate(3)
    for b in range(3):
        pool.cache(b, h(b))
    pool.release([0, 1, 2])  # queue: 0, 1, 2
    pool.touch([0])  # a prefix hit on block 0 ...
    pool.release([0])  # ... and its release: 0 is now the most recently used
    pool.check_integrity()
    assert drain_order(pool) == [1, 2, 0]


def test_allocating_over_cached_blocks_evicts_them() -> None:
    pool = BlockPool(3)
    pool.allocate(3)
    pool.cache(0, h(0))
    pool.cache(1, h(1))
    pool.release([0, 1, 2])  # queue: 2 (unhashed, front), 0, 1
    assert pool.num_evictions == 0

    assert pool.allocate(2) == [2, 0]
    assert pool.num_evictions == 1
    assert pool.lookup(h(0)) is None
    assert pool.blocks[0].block_hash is None
    assert pool.lookup(h(1)) == 1
    assert pool.num_cached_blocks == 1
    pool.check_integrity()

    assert pool.allocate(1) == [1]
    assert pool.num_evictions == 2
    assert pool.num_cached_blocks == 0
    pool.check_integrity()


def test_evicted_block_can_be_cached_under_a_new_hash() -> None:
    pool = BlockPool(1)
    pool.allocate(1)
    pool.cache(0, h(0))
    pool.release([0])
    assert pool.allocate(1) == [0]
    assert pool.cache(0, h(1))
    assert pool.lookup(h(0)) is None
    assert pool.lookup(h(1)) == 0
    pool.check_integrity()


def test_releasing_more_than_referenced_raises() -> None:
    pool = BlockPool(2)
    (block,) = pool.allocate(1)
    pool.release([block])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([block])
    with pytest.raises(RuntimeError):
        pool.release([1])  # never allocated
    pool.check_integrity()


def test_cache_of_an_already_cached_hash_returns_false_and_keeps_block_private() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    assert pool.cache(a, h(0))
    assert not pool.cache(b, h(0))
    assert pool.blocks[b].block_hash is None
    assert pool.lookup(h(0)) == a
    pool.release([a, b])
    pool.check_integrity()
    assert drain_order(pool) == [b, 2, a]  # private b is reused first, cached a last


def test_caching_disabled_never_caches() -> None:
    pool = BlockPool(3, enable_caching=False)
    (block,) = pool.allocate(1)
    assert pool.cache(block, h(0)) is False
    assert pool.lookup(h(0)) is None
    assert pool.blocks[block].block_hash is None
    assert pool.num_cached_blocks == 0
    pool.release([block])
    pool.check_integrity()
    assert drain_order(pool) == [block, 1, 2]


def test_reset_prefix_cache_forgets_only_unreferenced_blocks() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    pool.cache(0, h(0))
    pool.cache(1, h(1))
    pool.release([0])
    pool.reset_prefix_cache()
    assert pool.lookup(h(0)) is None
    assert pool.blocks[0].block_hash is None
    assert pool.lookup(h(1)) == 1  # still in use: keeps its hash
    assert pool.num_cached_blocks == 1
    pool.check_integrity()


def _bump_free_ref(pool: BlockPool) -> None:
    pool.blocks[3].ref_count += 1  # referenced but still in the free queue


def _drop_referenced_ref(pool: BlockPool) -> None:
    pool.blocks[0].ref_count = 0  # unreferenced but not in the free queue


def _negative_ref(pool: BlockPool) -> None:
    pool.blocks[3].ref_count = -1


def _unindexed_hash(pool: BlockPool) -> None:
    pool.blocks[2].block_hash = h(99)  # carries a hash the index does not know


def _stale_index_entry(pool: BlockPool) -> None:
    pool._cached[h(98)] = 3  # index entry for a block without a hash


def _hash_index_points_elsewhere(pool: BlockPool) -> None:
    pool._cached[h(1)] = 0  # block 1 carries h(1), but the index names block 0


def _lost_free_block(pool: BlockPool) -> None:
    del pool._free[3]  # unreferenced block vanished from the queue


@pytest.mark.parametrize(
    "corrupt",
    [
        _bump_free_ref,
        _drop_referenced_ref,
        _negative_ref,
        _unindexed_hash,
        _stale_index_entry,
        _hash_index_points_elsewhere,
        _lost_free_block,
    ],
)
def test_check_integrity_detects_corruption(corrupt: Callable[[BlockPool], None]) -> None:
    pool = BlockPool(4)
    pool.allocate(3)  # 0, 1, 2 referenced; 3 free
    pool.cache(1, h(1))
    pool.check_integrity()
    corrupt(pool)
    with pytest.raises(AssertionError):
        pool.check_integrity()
