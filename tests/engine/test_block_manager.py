"""BlockManager: allocation, growth, prefix sharing by hash chain, freeing and LRU eviction."""

from __future__ import annotations

import pytest

from dsray.engine.block_manager import BlockManager, hash_block
from dsray.engine.sequence import Sequence

BS = 4


def make_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, tokens)


def prefill(bm: BlockManager, seq: Sequence) -> list[int]:
    """Allocate ``seq`` with its prefix hit, compute all its tokens, register its blocks."""
    cached = bm.match_prefix(seq)
    bm.allocate(seq, cached, seq.num_tokens - len(cached) * BS)
    seq.num_computed_tokens = seq.num_tokens
    bm.commit_computed(seq)
    return cached


def test_allocate_and_append():
    bm = BlockManager(num_blocks=8, block_size=BS)
    seq = make_seq(list(range(10)))
    assert bm.match_prefix(seq) == []
    bm.allocate(seq, [], 6)  # chunk of 6 tokens -> 2 blocks
    assert len(seq.block_table) == 2
    assert seq.num_computed_tokens == seq.num_cached_tokens == 0
    assert bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(2 / 8)
    seq.num_computed_tokens = 6
    assert bm.can_append_slots(seq, 4)
    bm.append_slots(seq, 4)  # covers 10 tokens -> 3 blocks
    assert len(seq.block_table) == 3
    assert len(set(seq.block_table)) == 3
    bm.append_slots(seq, 1)  # 7 tokens still fit in 3 blocks
    assert len(seq.block_table) == 3
    assert bm.num_appendable_tokens(seq) == 8 * BS - 6
    assert not bm.can_append_slots(seq, 8 * BS - 5)
    with pytest.raises(RuntimeError, match="can_append_slots"):
        bm.append_slots(seq, 8 * BS - 5)


def test_allocate_refuses_what_does_not_fit():
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(list(range(20)))
    assert bm.num_allocatable_tokens([]) == 2 * BS
    with pytest.raises(RuntimeError, match="too few free blocks"):
        bm.allocate(seq, [], 9)
    assert seq.block_table == [] and bm.num_free_blocks == 2


def test_full_blocks_are_shared_with_same_prefix():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(list(range(10)), "a")
    prefill(bm, a)  # blocks [0..3], [4..7] full, [8, 9] partial
    b = make_seq(list(range(8)) + [50, 51, 52], "b")
    cached = prefill(bm, b)
    assert cached == a.block_table[:2]
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]  # partial blocks are never shared
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    assert bm.num_prefix_queries == 10 + 11
    assert bm.num_prefix_hits == 8


def test_no_sharing_after_a_different_token():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(list(range(12)), "a")
    prefill(bm, a)
    b = make_seq([0, 1, 2, 3, 4, 99, 6, 7, 8, 9, 10, 11, 12], "b")  # differs in block 1
    assert bm.match_prefix(b) == a.block_table[:1]


def test_same_block_content_at_another_prefix_is_not_a_hit():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0], "a")
    prefill(bm, a)
    b = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 0], "b")  # block 1 equal, parent differs
    assert bm.match_prefix(b) == []
    assert hash_block(None, [1, 2, 3, 4]) != hash_block(None, [9, 9, 9, 9])
    assert hash_block(hash_block(None, [1, 2, 3, 4]), [5, 6, 7, 8]) != hash_block(
        hash_block(None, [9, 9, 9, 9]), [5, 6, 7, 8]
    )


def test_hash_is_deterministic():
    assert hash_block(None, [1, 2, 3]) == hash_block(None, (1, 2, 3))
    assert hash_block(5, [1, 2, 3]) != hash_block(6, [1, 2, 3])


def test_last_token_is_never_a_cache_hit():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(list(range(8)), "a")  # exactly 2 full blocks
    prefill(bm, a)
    assert len(bm.match_prefix(make_seq(list(range(8)), "b"))) == 1  # cap: (8 - 1) // 4
    assert len(bm.match_prefix(make_seq(list(range(9)), "c"))) == 2
    assert bm.match_prefix(make_seq(list(range(4)), "d")) == []


def test_only_computed_blocks_are_registered():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq(list(range(12)), "a")
    bm.allocate(a, [], 12)
    a.num_computed_tokens = 6  # block 0 computed, block 1 half
    bm.commit_computed(a)
    assert len(bm.match_prefix(make_seq(list(range(12)), "b"))) == 1
    a.num_computed_tokens = 12
    bm.commit_computed(a)
    assert len(bm.match_prefix(make_seq(list(range(13)), "c"))) == 3


def test_generated_tokens_are_registered_too():
    bm = BlockManager(num_blocks=16, block_size=BS)
    a = make_seq([5, 6, 7], "a")
    prefill(bm, a)
    for t in (8, 9):
        a.append_token(t)
        bm.append_slots(a, 1)
        a.num_computed_tokens += 1
        bm.commit_computed(a)
    assert len(bm.match_prefix(make_seq([5, 6, 7, 8, 9, 10], "b"))) == 1


def test_free_keeps_cached_blocks_findable():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(10)), "a")
    prefill(bm, a)
    table = list(a.block_table)
    bm.free(a)
    assert a.block_table == []
    assert bm.num_free_blocks == bm.num_total_blocks == 8
    assert all(bm.blocks[i].ref_count == 0 for i in table)
    b = make_seq(list(range(10)), "b")
    assert prefill(bm, b) == table[:2]
    assert bm.num_free_blocks == 8 - 3


def test_eviction_is_lru_and_drops_the_hash():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(5)), "a")  # 1 full block + 1 partial
    b = make_seq(list(range(100, 105)), "b")
    prefill(bm, a)
    prefill(bm, b)
    bm.free(a)  # a's blocks freed first: least recently used
    bm.free(b)
    # The partial (unhashed) blocks are reused before any cached one, then a's block, then b's.
    c = make_seq(list(range(200, 212)), "c")
    bm.allocate(c, [], 12)
    assert bm.match_prefix(make_seq(list(range(5)), "a2")) == []  # a's block was evicted
    assert len(bm.match_prefix(make_seq(list(range(100, 105)), "b2"))) == 1  # b's survives


def test_free_order_evicts_tail_blocks_first():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = make_seq(list(range(13)), "a")  # 3 full blocks + 1 token: 4 blocks
    prefill(bm, a)
    bm.free(a)
    c = make_seq(list(range(500, 503)), "c")
    bm.allocate(c, [], 3)  # takes the unhashed partial block
    d = make_seq(list(range(600, 603)), "d")
    bm.allocate(d, [], 3)  # evicts the tail full block (a's block 2); the prefix stays
    assert len(bm.match_prefix(make_seq(list(range(13)), "a2"))) == 2


def test_shared_block_stays_until_last_reference_goes():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(6)), "a")
    b = make_seq(list(range(6)), "b")
    prefill(bm, a)
    prefill(bm, b)
    shared = a.block_table[0]
    assert bm.blocks[shared].ref_count == 2
    bm.free(a)
    assert bm.blocks[shared].ref_count == 1
    assert bm.num_free_blocks == 8 - 2
    bm.free(b)
    assert bm.num_free_blocks == 8


def test_cached_block_in_free_queue_is_taken_out_of_it():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = make_seq(list(range(6)), "a")
    prefill(bm, a)
    bm.free(a)
    b = make_seq(list(range(9)), "b")
    cached = bm.match_prefix(b)
    assert len(cached) == 1
    assert bm.num_allocatable_tokens(cached) == 2 * BS  # the hit block is not free for new tokens
    bm.allocate(b, cached, 5)
    assert bm.num_free_blocks == 0
    assert bm.blocks[cached[0]].ref_count == 1


def test_prefix_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_seq(list(range(9)), "a")
    prefill(bm, a)
    assert bm.match_prefix(make_seq(list(range(9)), "b")) == []
    assert all(b.block_hash is None for b in bm.blocks)
    assert bm.num_prefix_queries == 0


def test_duplicate_content_registered_twice():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = make_seq(list(range(6)), "a")
    b = make_seq(list(range(6)), "b")
    bm.allocate(a, bm.match_prefix(a), 6)
    bm.allocate(b, bm.match_prefix(b), 6)  # both miss: computed side by side
    for seq in (a, b):
        seq.num_computed_tokens = 6
        bm.commit_computed(seq)
    assert bm.match_prefix(make_seq(list(range(6)), "c")) == a.block_table[:1]
    a_block, b_block = a.block_table[0], b.block_table[0]
    bm.free(b)
    bm.free(a)
    assert bm.num_free_blocks == 8
    assert bm.match_prefix(make_seq(list(range(6)), "d")) == [a_block]
    # b's copy is not findable, so it is reused before a's cached block.
    e = make_seq(list(range(700, 712)), "e")
    bm.allocate(e, [], 12)
    assert b_block in e.block_table and a_block not in e.block_table
    assert bm.match_prefix(make_seq(list(range(6)), "f")) == [a_block]


def test_invalid_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
