import pytest

from engine.block_manager import BlockManager, OutOfBlocks, chain_hash


def hashes(*contents: bytes) -> list[int]:
    out, h = [], None
    for c in contents:
        h = chain_hash(h, c)
        out.append(h)
    return out


def test_allocate_append_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.allocate("a", num_tokens=6) == 0
    assert bm.num_used == 2
    slots = [bm.append_slot("a") for _ in range(3)]  # positions 6, 7, 8 -> third block
    table = bm.table("a")
    assert slots == [table.blocks[1] * 4 + 2, table.blocks[1] * 4 + 3, table.blocks[2] * 4 + 0]
    assert bm.num_used == 3
    bm.free_request("a")
    bm.free_request("a")  # idempotent
    assert bm.num_used == 0 and bm.num_free == 8


def test_shared_prefix_is_reused_only_after_commit():
    bm = BlockManager(num_blocks=8, block_size=4)
    prefix = hashes(b"voice", b"lang")
    assert bm.allocate("a", 10, prefix) == 0
    # Same step, not yet computed: no sharing.
    assert bm.allocate("b", 10, prefix) == 0
    bm.commit_prefix("a")
    assert bm.allocate("c", 11, prefix) == 8
    assert bm.table("c").blocks[:2] == bm.table("a").blocks[:2]
    assert bm.ref_count[bm.table("a").blocks[0]] == 2
    for r in ("a", "b", "c"):
        bm.free_request(r)
    assert bm.num_used == 0
    assert bm.num_cached == 2  # the committed prefix stays findable
    assert bm.allocate("d", 9, prefix) == 8


def test_different_prefix_does_not_match():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", 9, hashes(b"voice1", b"x"))
    bm.commit_prefix("a")
    assert bm.allocate("b", 9, hashes(b"voice2", b"x")) == 0
    assert bm.allocate("c", 9, hashes(b"voice1", b"y")) == 4


def test_cached_blocks_are_evicted_last_and_unlinked():
    bm = BlockManager(num_blocks=3, block_size=4)
    prefix = hashes(b"p")
    bm.allocate("a", 5, prefix)
    bm.commit_prefix("a")
    bm.free_request("a")
    assert bm.num_cached == 1 and bm.num_free == 3
    bm.allocate("b", 8)  # two plain blocks suffice: the cached one survives
    assert bm.cached_prefix_blocks(prefix) == 1
    bm.allocate("c", 4)  # now the cached block must be recycled
    assert bm.cached_prefix_blocks(prefix) == 0
    with pytest.raises(OutOfBlocks):
        bm.append_slot("c")  # c's only block is full; nothing is free


def test_out_of_blocks_is_reported_before_any_change():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(9)
    with pytest.raises(OutOfBlocks):
        bm.allocate("a", 9)
    assert bm.num_free == 2 and "a" not in bm.tables
