"""BlockManager: paged KV block allocation, reference counts and prefix caching.

Layout: the KV cache is ``num_blocks`` blocks of ``block_size`` token slots, ids
``0 .. num_blocks - 1``. The token at position ``p`` of a sequence lives in block
``seq.block_table[p // block_size]`` at offset ``p % block_size`` (the model runner turns
that into slot ids; this module only hands out block ids).

Prefix caching (as vLLM v1): once every token of a full block is computed, the block is
registered under ``hash_block(parent_hash, its tokens)``, so a hash names a whole prefix, not
just the block's own tokens. A later sequence whose leading full blocks hash the same shares
those blocks (ref_count + 1) instead of recomputing them. Only full blocks are shared and a
full block is never written again, so sharing needs no copy-on-write.

Free blocks sit in an LRU queue; a freed block keeps its hash and stays findable until it is
taken for other content (eviction drops the hash). ``free`` releases a table back to front,
and blocks without a findable hash go to the head of the queue, so the least useful blocks
are reused first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence as TokenIds
from dataclasses import dataclass

from dsray.engine.sequence import Sequence


def hash_block(parent_hash: int | None, token_ids: TokenIds[int]) -> int:
    """Stable content hash of a full block given the hash of the block before it (None for the first)."""
    data = repr((parent_hash, tuple(token_ids))).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:16], "little")


@dataclass
class Block:
    """One KV block. ``block_hash`` is set once the block is full and computed."""

    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class BlockManager:
    """Hands out KV blocks to sequences and shares computed full blocks between them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got num_blocks={num_blocks}, block_size={block_size}"
            )
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.num_prefix_queries = 0  # tokens looked up in the prefix cache
        self.num_prefix_hits = 0  # of those, tokens found

    @property
    def num_total_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, including cached ones that may be evicted."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by at least one sequence."""
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """The chain hashes of ``seq``'s first ``num_blocks`` full blocks (memoized on the sequence)."""
        hashes, tokens, bs = seq.block_hashes, seq.all_token_ids, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens[i * bs : (i + 1) * bs]))
        return hashes

    def _is_findable(self, block: Block) -> bool:
        return block.block_hash is not None and self._cached.get(block.block_hash) == block.block_id

    def _take(self, block_id: int) -> None:
        """Add a reference to a cached block, taking it out of the free queue if it was there."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _take_fresh(self) -> int:
        """Take the least recently used free block, evicting its cached content."""
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if self._is_findable(block):
            del self._cached[block.block_hash]
        block.block_hash = None
        block.ref_count = 1
        return block_id

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding ``seq``'s leading full blocks; no side effects.

        Stops at the first miss, and never covers the last token: that one must be computed so
        the model produces logits for the next. Pass the result to ``allocate``.
        """
        if not self.enable_prefix_caching:
            return []
        if seq.block_table:
            raise ValueError(f"match_prefix is for unallocated sequences; {seq} already has blocks")
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in self._block_hashes(seq, max_blocks)[:max_blocks]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def num_allocatable_tokens(self, cached_block_ids: list[int]) -> int:
        """How many tokens past a prefix hit (from ``match_prefix``) the free blocks could hold."""
        num_cached_free = sum(1 for b in cached_block_ids if self.blocks[b].ref_count == 0)
        return (self.num_free_blocks - num_cached_free) * self.block_size

    def allocate(self, seq: Sequence, cached_block_ids: list[int], num_new_tokens: int) -> None:
        """First allocation of a sequence: take its prefix hit, then slots for ``num_new_tokens`` more.

        Sets ``num_computed_tokens = num_cached_tokens`` = the tokens of the hit. Raises if the
        tokens do not fit; check ``num_allocatable_tokens`` first.
        """
        if seq.block_table or seq.num_computed_tokens:
            raise ValueError(f"allocate is for unallocated sequences, got {seq}")
        if num_new_tokens > self.num_allocatable_tokens(cached_block_ids):
            raise RuntimeError(f"cannot allocate {num_new_tokens} tokens for {seq}: too few free blocks")
        for block_id in cached_block_ids:
            self._take(block_id)
            seq.block_table.append(block_id)
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached_block_ids) * self.block_size
        if self.enable_prefix_caching:
            self.num_prefix_queries += seq.num_tokens
            self.num_prefix_hits += seq.num_cached_tokens
        self.append_slots(seq, num_new_tokens)

    def num_appendable_tokens(self, seq: Sequence) -> int:
        """How many tokens past ``seq.num_computed_tokens`` its blocks plus the free blocks hold."""
        return (len(seq.block_table) + self.num_free_blocks) * self.block_size - seq.num_computed_tokens

    def can_append_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        return num_new_tokens <= self.num_appendable_tokens(seq)

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow ``seq.block_table`` to cover ``num_computed_tokens + num_new_tokens`` tokens."""
        num_needed = self._num_blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if num_needed > self.num_free_blocks:
            raise RuntimeError(
                f"cannot append {num_new_tokens} tokens to {seq}: needs {num_needed} blocks, "
                f"{self.num_free_blocks} free; call can_append_slots first"
            )
        for _ in range(num_needed):
            seq.block_table.append(self._take_fresh())

    def commit_computed(self, seq: Sequence) -> None:
        """Register the blocks that ``seq.num_computed_tokens`` has made full, for later sharing.

        Call after each step that advanced ``num_computed_tokens``. A block whose content is
        already registered under another id keeps working but is not findable itself.
        """
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        hashes = self._block_hashes(seq, num_full)
        first = num_full  # registered blocks form a prefix of the table: find where it ends
        while first > 0 and self.blocks[seq.block_table[first - 1]].block_hash is None:
            first -= 1
        for i in range(first, num_full):
            block = self.blocks[seq.block_table[i]]
            block.block_hash = hashes[i]
            self._cached.setdefault(hashes[i], block.block_id)

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references, tail block first, and clear its block table.

        Does not touch ``seq.num_computed_tokens``: the scheduler resets it when it preempts.
        """
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
                if not self._is_findable(block):
                    self._free.move_to_end(block_id, last=False)
        seq.block_table.clear()
