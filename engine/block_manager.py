"""Paged-KV bookkeeping: which cache blocks each request owns, with prefix sharing.

The talker's KV cache is a pool of fixed-size blocks (16 positions each). A request holds a
*block table* (block ids in position order). Blocks are reference counted: requests whose
prompts start with the same rows (same voice prompt, same language) share the blocks of that
common prefix and skip its prefill.

Prefix identity is a hash chain over *full* blocks: ``h_i = hash(h_{i-1}, content_i)`` where
``content_i`` is a digest of the prompt rows of block i (computed by the caller, who knows what
the rows are). Equal hashes mean equal rows at equal positions, hence equal K/V. A block whose
last user leaves keeps its hash and stays findable until its memory is needed again, so a voice
used a moment ago is still warm ("cached", not "used").

This module knows nothing of tensors; it hands out block ids.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class OutOfBlocks(RuntimeError):
    """No free block: the scheduler must wait or preempt."""


@dataclass
class BlockTable:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # positions written (or about to be written) in these blocks
    pending_hashes: list[tuple[int, int]] = field(default_factory=list)  # (block, hash) until computed


def chain_hash(previous: int | None, content: bytes) -> int:
    return hash((previous, content))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_count = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Free blocks: plain ones first; cached ones (hash kept, findable) in LRU order, evicted last.
        self.free_plain: list[int] = list(range(num_blocks - 1, -1, -1))
        self.free_cached: OrderedDict[int, None] = OrderedDict()
        self.tables: dict[str, BlockTable] = {}

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one request (cached-but-unused blocks are not counted)."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Free blocks that still hold a findable prefix."""
        return len(self.free_cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, request_id: str) -> BlockTable:
        return self.tables[request_id]

    def cached_prefix_blocks(self, block_hashes: list[int]) -> int:
        """How many leading blocks of a prompt are already in the cache."""
        n = 0
        for h in block_hashes:
            if h not in self.hash_to_block:
                break
            n += 1
        return n

    # ---- allocation ----------------------------------------------------------------------
    def _take_free_block(self) -> int:
        if self.free_plain:
            block = self.free_plain.pop()
        elif self.free_cached:
            block, _ = self.free_cached.popitem(last=False)  # least recently used prefix
            del self.hash_to_block[self.block_hash[block]]
        else:
            raise OutOfBlocks("no free KV block")
        self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def can_allocate(self, num_tokens: int, block_hashes: list[int] | None = None) -> bool:
        hashes = block_hashes or []
        hits = self.cached_prefix_blocks(hashes)
        # Hits that sit on the free list still come out of it.
        reused_from_free = sum(1 for h in hashes[:hits] if self.ref_count[self.hash_to_block[h]] == 0)
        return self.blocks_needed(num_tokens) - hits + reused_from_free <= self.num_free

    def allocate(self, request_id: str, num_tokens: int, block_hashes: list[int] | None = None) -> int:
        """Blocks for a prompt of ``num_tokens`` rows. ``block_hashes`` covers the prompt's full
        blocks that may be shared (the caller leaves out the block holding the last row, which must
        be computed to get a hidden state). Returns the number of prompt rows already cached."""
        if request_id in self.tables:
            raise ValueError(f"request {request_id!r} already holds blocks")
        if not self.can_allocate(num_tokens, block_hashes):
            raise OutOfBlocks(f"{self.blocks_needed(num_tokens)} blocks needed, {self.num_free} free")
        hashes = block_hashes or []
        table = BlockTable(num_tokens=num_tokens)
        hits = self.cached_prefix_blocks(hashes)
        for h in hashes[:hits]:
            block = self.hash_to_block[h]
            if self.ref_count[block] == 0:
                del self.free_cached[block]
            self.ref_count[block] += 1
            table.blocks.append(block)
        for i in range(hits, self.blocks_needed(num_tokens)):
            block = self._take_free_block()
            if i < len(hashes):  # shareable once this prefill has written it
                table.pending_hashes.append((block, hashes[i]))
            table.blocks.append(block)
        self.tables[request_id] = table
        return hits * self.block_size

    def commit_prefix(self, request_id: str) -> None:
        """The prompt's K/V are written: its full blocks become findable by later requests.
        (Before this, a request admitted in the same step must not read them.)"""
        table = self.tables[request_id]
        for block, h in table.pending_hashes:
            if h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
        table.pending_hashes.clear()

    def can_append(self, request_id: str) -> bool:
        table = self.tables[request_id]
        return table.num_tokens < len(table.blocks) * self.block_size or self.num_free > 0

    def append_slot(self, request_id: str) -> int:
        """Reserve the next position of a decoding request; returns its slot (block*size+offset)."""
        table = self.tables[request_id]
        if table.num_tokens == len(table.blocks) * self.block_size:
            table.blocks.append(self._take_free_block())
        pos = table.num_tokens
        table.num_tokens += 1
        return table.blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def free_request(self, request_id: str) -> None:
        """Release a request's blocks (finish, cancel or preempt). Idempotent."""
        table = self.tables.pop(request_id, None)
        if table is None:
            return
        for block in reversed(table.blocks):  # tail first: the prefix stays cached longest
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if self.block_hash[block] is None:
                    self.free_plain.append(block)
                else:
                    self.free_cached[block] = None
