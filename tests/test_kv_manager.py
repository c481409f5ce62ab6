"""KVCacheManager: block tables, prefix hits over the hash chain, commit and free order."""

from __future__ import annotations

import random

import pytest

from conserve.kv.manager import KVCacheManager, PrefixHit, hash_block

BS = 4


def toks(n: int, base: int = 100) -> list[int]:
    return list(range(base, base + n))


def computed(kv: KVCacheManager, rid: str, tokens: list[int]) -> list[int]:
    """Allocate a fresh request for all of `tokens`, mark them computed; return its table."""
    kv.allocate(rid, len(tokens))
    kv.commit(rid, tokens, len(tokens))
    return list(kv.block_table(rid))


@pytest.mark.parametrize(
    ("num_tokens", "blocks"), [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)]
)
def test_blocks_needed_rounds_up(num_tokens: int, blocks: int) -> None:
    assert KVCacheManager(8, BS).blocks_needed(num_tokens) == blocks


def test_allocate_grows_the_table_only_when_a_block_fills() -> None:
    kv = KVCacheManager(8, BS)
    kv.allocate("a", 3)
    assert kv.block_table("a") == [0]
    kv.allocate("a", 4)
    assert kv.block_table("a") == [0]
    kv.allocate("a", 5)
    assert kv.block_table("a") == [0, 1]
    kv.allocate("b", 9)
    assert kv.block_table("b") == [2, 3, 4]
    assert kv.pool.num_free_blocks == 3
    kv.check_integrity()


def test_prefix_hit_can_only_start_a_new_table() -> None:
    kv = KVCacheManager(8, BS)
    prompt = toks(9)
    computed(kv, "a", prompt)
    kv.allocate("b", 2)
    with pytest.raises(RuntimeError):
        kv.allocate("b", 9, kv.find_prefix(prompt))
    kv.check_integrity()


def test_commit_publishes_only_full_computed_blocks() -> None:
    kv = KVCacheManager(8, BS)
    tokens = toks(10)
    kv.allocate("a", 10)
    assert kv.block_table("a") == [0, 1, 2]
    kv.commit("a", tokens, 3)
    assert kv.pool.num_cached_blocks == 0
    kv.commit("a", tokens, 7)
    assert kv.pool.num_cached_blocks == 1
    assert kv.pool.blocks[0].block_hash == hash_block(None, tokens[:4])
    kv.commit("a", tokens, 10)
    assert kv.pool.num_cached_blocks == 2
    assert kv.pool.blocks[1].block_hash == hash_block(hash_block(None, tokens[:4]), tokens[4:8])
    assert kv.pool.blocks[2].block_hash is None  # partial block stays private
    kv.check_integrity()


def test_find_prefix_returns_full_blocks_and_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(8, BS)
    prompt = toks(12)
    table = computed(kv, "a", prompt)  # 3 full blocks, all cached
    assert kv.pool.num_cached_blocks == 3
    assert kv.find_prefix(prompt + [7]).block_ids == tuple(table)
    # all 3 blocks cached, but the last token must be computed to get logits
    assert kv.find_prefix(prompt).block_ids == tuple(table[:2])
    assert kv.find_prefix(prompt[:9]).block_ids == tuple(table[:2])
    # exactly 2 full cached blocks: a 1-block hit
    hit = kv.find_prefix(prompt[:8])
    assert hit.block_ids == (table[0],)
    assert hit.num_tokens == 4
    assert kv.find_prefix(prompt[:5]).block_ids == (table[0],)
    assert kv.find_prefix(prompt[:4]).block_ids == ()
    assert kv.find_prefix(prompt[:1]).block_ids == ()
    kv.check_integrity()


def test_find_prefix_stops_at_the_first_differing_block() -> None:
    kv = KVCacheManager(8, BS)
    prompt = toks(12)
    table = computed(kv, "a", prompt)
    changed = prompt[:5] + [0] + prompt[6:] + [1]  # block 1 differs
    assert kv.find_prefix(changed).block_ids == (table[0],)
    assert kv.find_prefix([0] + prompt[1:] + [1]).block_ids == ()


def test_hash_chain_needs_the_same_preceding_blocks() -> None:
    kv = KVCacheManager(8, BS)
    prompt = toks(9)
    computed(kv, "a", prompt)
    # block 1 has the same tokens as in `prompt`, but block 0 differs
    other = [1, 2, 3, 4] + prompt[4:]
    assert kv.find_prefix(other).block_ids == ()


def test_two_requests_with_a_shared_prefix_share_blocks() -> None:
    kv = KVCacheManager(8, BS)
    shared = toks(8)
    a_tokens = shared + toks(2, base=500)
    b_tokens = shared + toks(3, base=900)
    assert computed(kv, "a", a_tokens) == [0, 1, 2]

    hit = kv.find_prefix(b_tokens)
    assert hit == PrefixHit((0, 1), BS)
    assert kv.can_allocate("b", len(b_tokens), hit)
    kv.allocate("b", len(b_tokens), hit)
    assert kv.block_table("b") == [0, 1, 3]
    assert [kv.pool.blocks[i].ref_count for i in range(4)] == [2, 2, 1, 1]
    kv.check_integrity()

    kv.free("a")
    assert [kv.pool.blocks[i].ref_count for i in range(4)] == [1, 1, 0, 1]
    assert kv.pool.num_free_blocks == 5  # only a's private tail came back
    kv.check_integrity()
    kv.free("b")
    assert kv.pool.num_free_blocks == 8
    assert kv.num_request_tables == 0
    kv.check_integrity()


def test_free_releases_the_tail_first_so_the_prefix_survives_eviction() -> None:
    kv = KVCacheManager(6, BS)
    prompt = toks(13)
    assert computed(kv, "a", prompt) == [0, 1, 2, 3]  # 3 cached blocks + private tail
    kv.free("a")  # queue: 3 (unhashed, front), 4, 5, then 2, 1, 0 (tail first)
    kv.check_integrity()

    other = toks(20, base=5000)
    kv.allocate("b", len(other))  # 5 blocks: two cached ones must be evicted
    assert kv.block_table("b") == [3, 4, 5, 2, 1]
    assert kv.pool.num_evictions == 2
    # the first block of the prefix survived, so a new request still gets a hit
    assert kv.find_prefix(prompt).block_ids == (0,)
    kv.check_integrity()


def test_can_allocate_counts_unreferenced_hit_blocks_as_taken() -> None:
    kv = KVCacheManager(4, BS)
    prompt = toks(9)
    assert computed(kv, "a", prompt) == [0, 1, 2]
    kv.free("a")  # blocks 0, 1 cached; all 4 blocks in the queue
    assert kv.pool.num_free_blocks == 4

    longer = prompt[:8] + toks(9, base=700)  # 17 tokens = 5 blocks, 2 of them hit
    hit = kv.find_prefix(longer)
    assert hit.block_ids == (0, 1)
    # 3 new blocks needed; 4 are free but 2 of those are the hit blocks themselves
    assert not kv.can_allocate("b", 17, hit)
    assert kv.can_allocate("b", 16, hit)
    with pytest.raises(RuntimeError):
        kv.allocate("b", 17, hit)  # can_allocate told the truth
    # a refused allocation changes nothing
    assert not kv.has("b")
    assert kv.pool.num_free_blocks == 4
    kv.check_integrity()

    kv.allocate("b", 16, hit)
    assert kv.block_table("b") == [0, 1, 2, 3]
    assert kv.pool.num_free_blocks == 0
    kv.check_integrity()


def test_can_allocate_with_hit_blocks_still_referenced_by_another_request() -> None:
    kv = KVCacheManager(4, BS)
    prompt = toks(9)
    computed(kv, "a", prompt)  # holds 0, 1, 2; only block 3 is free
    hit = kv.find_prefix(prompt)
    assert hit.block_ids == (0, 1)
    assert kv.can_allocate("b", 12, hit)  # hit blocks are already out of the queue
    assert not kv.can_allocate("b", 13, hit)
    kv.allocate("b", 12, hit)
    assert kv.block_table("b") == [0, 1, 3]
    kv.check_integrity()


def test_can_allocate_for_an_existing_table_counts_its_blocks() -> None:
    kv = KVCacheManager(3, BS)
    kv.allocate("a", 5)  # 2 blocks
    assert kv.can_allocate("a", 12)
    assert not kv.can_allocate("a", 13)
    assert kv.can_allocate("a", 3)  # shrinking never needs blocks
    kv.check_integrity()


def test_identical_content_computed_twice_is_cached_once() -> None:
    kv = KVCacheManager(6, BS)
    prompt = toks(9)
    kv.allocate("a", 9)
    kv.allocate("b", 9)  # no hit: neither was computed yet
    kv.commit("a", prompt, 9)
    kv.commit("b", prompt, 9)
    assert kv.pool.num_cached_blocks == 2
    assert [kv.pool.blocks[b].block_hash is None for b in kv.block_table("b")] == [
        True,
        True,
        True,
    ]
    assert kv.find_prefix(prompt).block_ids == (0, 1)  # a's blocks
    kv.free("b")
    kv.free("a")
    kv.check_integrity()
    assert kv.find_prefix(prompt).block_ids == (0, 1)


def test_prefix_caching_disabled_gives_no_hits() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=False)
    prompt = toks(13)
    computed(kv, "a", prompt)
    assert kv.pool.num_cached_blocks == 0
    hit = kv.find_prefix(prompt)
    assert hit.block_ids == ()
    assert hit.num_tokens == 0
    kv.free("a")
    assert kv.find_prefix(prompt).block_ids == ()
    kv.check_integrity()


def test_prefix_query_counters() -> None:
    kv = KVCacheManager(8, BS)
    kv.record_prefix_query(10, 8)
    kv.record_prefix_query(5, 0)
    assert (kv.prefix_queries, kv.prefix_hits) == (15, 8)


def test_check_integrity_detects_a_reference_without_a_table() -> None:
    kv = KVCacheManager(4, BS)
    computed(kv, "a", toks(5))
    kv.check_integrity()
    kv.pool.touch([0])  # a second reference that no table holds
    with pytest.raises(AssertionError):
        kv.check_integrity()


def test_random_workload_keeps_ref_counts_equal_to_table_membership() -> None:
    rng = random.Random(1234)
    kv = KVCacheManager(12, BS)
    prefixes = [toks(8, base=1000 * i) for i in range(3)]
    live: dict[str, list[int]] = {}
    for step in range(400):
        if live and (rng.random() < 0.4 or len(live) > 5):
            rid = rng.choice(sorted(live))
            kv.free(rid)
            del live[rid]
        else:
            rid = f"r{step}"
            tokens = rng.choice(prefixes)[: rng.randint(1, 8)] + toks(rng.randint(1, 9), step)
            hit = kv.find_prefix(tokens)
            assert hit.num_tokens < len(tokens)
            if not kv.can_allocate(rid, len(tokens), hit):
                with pytest.raises(RuntimeError):
                    kv.allocate(rid, len(tokens), hit)
                kv.free(rid)  # a failed allocate may leave a partial table
                kv.check_integrity()
                continue
            kv.allocate(rid, len(tokens), hit)
            kv.commit(rid, tokens, rng.randint(hit.num_tokens, len(tokens)))
            live[rid] = tokens
        kv.check_integrity()
        refs = [0] * 12
        for rid in live:
            for b in kv.block_table(rid):
                refs[b] += 1
        assert [b.ref_count for b in kv.pool.blocks] == refs
    for rid in list(live):
        kv.free(rid)
    assert kv.pool.num_free_blocks == 12
    kv.check_integrity()
