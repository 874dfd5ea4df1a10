"""An adversarial review of the split rework (session 24): a split's lower half keeps its
block with key and value advanced, is compacted once lead > len, and _link_leaf lays out a
block made for more positions. Targeted paths: repeated and compacting splits for every
token width and page size, both windowed-insert splits in one node, namespaces found only
at interning, out-of-memory at each block, the 4 KiB-aliasing copies, heap bytes."""

from __future__ import annotations

import gc
import platform

import numpy as np
import pytest
from conftest import (
    FlakyExtraKey,
    RecordingAllocator,
    RecordingSWAAllocator,
    heap_bytes_in_use,
)

from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey, _radix_tree

GLIBC = platform.libc_ver()[0] == "glibc"


def _snap(cache) -> list:
    """Every node's id, tokens and slots, sorted: the tree as a value to compare."""
    return sorted(
        (n.id, tuple(n.key.token_ids), tuple(np.asarray(n.value).tolist())) for n in cache._nodes()
    )


def _insert_out_of_memory_then_again(cache, fuse: int, insert) -> None:
    """Run `insert` with the tree's `fuse`-th next node-block allocation failing: it either
    succeeds (fewer blocks than that) or raises MemoryError with the tree unchanged, and
    then succeeds when run again. Invariants hold throughout."""
    before = _snap(cache)
    _radix_tree._fail_node_arrays_after(fuse)
    try:
        try:
            insert()
            failed = False
        except MemoryError:
            failed = True
    finally:
        _radix_tree._fail_node_arrays_after(-1)
    cache._check_invariants()
    if failed:
        assert _snap(cache) == before
        insert()
        cache._check_invariants()


def _toks(n: int, width: int, start: int = 1) -> list:
    if width == 0:
        return list(range(start, start + n))
    return [tuple(start + i * width + j for j in range(width)) for i in range(n)]


def _key(toks: list, ek=None) -> RadixKey:
    return RadixKey(list(toks), ek)


def _probe(toks: list, d: int, width: int) -> list:
    """toks[:d] then a token that differs from toks[d] (a match ending at d splits there)."""
    bad = 0 if width == 0 else tuple([0] * width)
    return [*list(toks[:d]), bad]


def _evict_all(cache, alloc, callers=()) -> None:
    while cache.total_size():
        cache.evict(1)
        cache._check_invariants()
    assert cache._nodes() == []
    assert alloc.live == set(callers)


@pytest.mark.parametrize("width", [0, 1, 2, 3])
@pytest.mark.parametrize("page", [1, 2, 4])
@pytest.mark.parametrize("step", [1, 2, 3, 7, 31])
def test_splits_deeper_and_deeper_into_one_node(width: int, page: int, step: int) -> None:
    """Each probe splits the lower half of the previous split: its lead grows by `step`
    pages until it exceeds what is left (compaction), at every boundary."""
    alloc = RecordingAllocator()
    cache = RadixCache(page, token_to_kv_pool_allocator=alloc)
    n = 96 * page
    toks = _toks(n, width)
    vals = alloc.alloc(n)
    cache.insert(_key(toks), vals.copy())
    d = step * page
    depths = []
    while d < n:
        m = cache.match_prefix(_key(_probe(toks, d, width)))
        assert m.prefix_len == d, (d, m.prefix_len)
        assert m.indices.tolist() == vals[:d].tolist()
        cache._check_invariants()
        full = cache.match_prefix(_key(toks))
        assert full.prefix_len == n and full.indices.tolist() == vals.tolist()
        # every node's own key and value still line up with what was inserted
        for node in cache._nodes():
            v = np.asarray(node.value)
            off = int(v[0]) - 1
            assert v.tolist() == vals[off : off + len(v)].tolist()
            assert list(node.key.token_ids) == toks[off : off + len(v)]
        depths.append(d)
        d += step * page
    # a new leaf under a lower half that has a lead, then under the lead's upper half
    k2 = list(toks[: n - page]) + _toks(5 * page, width, start=10_000)
    v2 = alloc.alloc(len(k2))
    r = cache.insert(_key(k2), v2.copy())
    assert r.prefix_len == n - page
    cache._check_invariants()
    m = cache.match_prefix(_key(k2))
    assert m.indices.tolist() == vals[: n - page].tolist() + v2[n - page :].tolist()
    _evict_all(cache, alloc, v2[: n - page].tolist())
    cache.reset()
    cache._check_invariants()


@pytest.mark.parametrize("width", [0, 2])
@pytest.mark.parametrize("page", [1, 2, 4])
def test_random_split_orders_of_one_long_node(width: int, page: int) -> None:
    """Probes at random depths, in random order: halves of halves, with and without lead."""
    rng = np.random.default_rng(page * 10 + width)
    for _ in range(20):
        alloc = RecordingAllocator()
        cache = RadixCache(page, token_to_kv_pool_allocator=alloc)
        n = int(rng.integers(2, 80)) * page
        toks = _toks(n, width)
        vals = alloc.alloc(n)
        cache.insert(_key(toks), vals.copy())
        for d in rng.permutation(np.arange(1, n // page))[: int(rng.integers(1, n // page))]:
            d = int(d) * page
            assert cache.match_prefix(_key(_probe(toks, d, width))).prefix_len == d
            cache._check_invariants()
        full = cache.match_prefix(_key(toks))
        assert full.indices.tolist() == vals.tolist()
        if rng.integers(2):
            _evict_all(cache, alloc)
        else:
            cache.reset()
            alloc.assert_all_free()


@pytest.mark.parametrize("window", [1, 4, 1000])
@pytest.mark.parametrize("width", [0, 2])
def test_swa_both_splits_in_a_lower_half_with_lead(window: int, width: int) -> None:
    """The windowed insert splits one node at prev_prefix_len and at the match end; the node
    is already a lower half with a lead, and the second split compacts it."""
    for es_a in (0, 48):  # node [0, 48) live, or a tombstone (revived by the insert)
        alloc = RecordingSWAAllocator()
        cache = RadixCache(1, sliding_window_size=window, token_to_kv_pool_allocator=alloc)
        toks = _toks(64, width)
        vals = alloc.alloc(64)
        cache.insert(_key(toks), vals.copy(), 0, es_a)
        cache._check_invariants()
        # a lead of 8 in the node holding [8, 48) (or [8, 64))
        cache.match_prefix(_key(_probe(toks, 8, width)))
        cache._check_invariants()
        new = alloc.alloc(24)
        k2 = list(toks[:40]) + _toks(4, width, start=50_000)
        v2 = np.concatenate([vals[:20], new]).astype(np.int32)
        r = cache.insert(_key(k2), v2, 20, 0)
        assert r.prefix_len == 40
        cache._check_invariants()
        for node in cache._nodes():
            assert len(np.asarray(node.value)) == len(node.key.token_ids)
        # what a full match of k2 returns comes from the nodes as they now are
        m = cache.match_prefix(_key(k2))
        exp_ok = m.prefix_len in (0, 8, 20, 40, 44)
        assert exp_ok, m.prefix_len
        got = m.indices.tolist()
        if m.prefix_len >= 20:
            assert got[:20] == vals[:20].tolist()
        if m.prefix_len == 44:
            assert got[40:] == v2[40:].tolist()
            if es_a == 0:
                assert got[20:40] == vals[20:40].tolist()
            else:
                assert got[20:40] == v2[20:40].tolist()  # revived with the incoming slots
        cache.evict(10**6, 10**6)
        cache._check_invariants()
        cache.reset()
        cache._check_invariants()


@pytest.mark.parametrize("width", [0, 2])
@pytest.mark.parametrize("page", [1, 2, 4])
@pytest.mark.parametrize("swa", [None, 3])
def test_a_namespace_found_only_when_taken_then_its_leaf_split(width, page, swa) -> None:
    """_insert_kv / _insert_swa allocate a block for the whole key when the namespace is not
    found, then match part of it after all: _link_leaf lays the block out for the leaf.
    That leaf is then split at every depth and evicted."""
    alloc = RecordingSWAAllocator() if swa else RecordingAllocator()
    cache = RadixCache(page, sliding_window_size=swa, token_to_kv_pool_allocator=alloc)
    n0 = 20 * page
    toks = _toks(n0, width)
    vals = alloc.alloc(n0)
    cache.insert(_key(toks, FlakyExtraKey("k")), vals.copy())
    for es in [0] if not swa else [0, 10 * page, 22 * page, 25 * page + 1]:
        tail = _toks(40 * page, width, start=100_000 + es * 1000)
        cut = 12 * page
        k2 = list(toks[:cut]) + tail
        v2 = np.concatenate([vals[:cut], alloc.alloc(len(tail))]).astype(np.int32)
        ek = FlakyExtraKey("k", wrong=1)
        kw = {"swa_evicted_seqlen": es} if swa else {}
        r = cache.insert(_key(k2, ek), v2, **kw)
        assert ek.calls >= 2
        assert r.prefix_len == cut
        cache._check_invariants()
        n2 = len(k2) - len(k2) % page
        for d in range(cut + page, n2, page):
            m = cache.match_prefix(_key(_probe(k2, d, width), FlakyExtraKey("k")))
            cache._check_invariants()
            if not swa:
                assert m.prefix_len == d and m.indices.tolist() == v2[:d].tolist()
        m = cache.match_prefix(_key(k2, FlakyExtraKey("k")))
        if not swa:
            assert m.prefix_len == n2 and m.indices.tolist() == v2[:n2].tolist()
        else:
            assert m.indices.tolist() == v2[: m.prefix_len].tolist()
    while cache.total_size():
        cache.evict(1, 1) if swa else cache.evict(1)
        cache._check_invariants()
    cache.reset()
    cache._check_invariants()


@pytest.mark.parametrize("width", [0, 2])
def test_a_new_namespace_insert_in_mamba_found_when_taken(width) -> None:
    kv, st = RecordingAllocator(), RecordingAllocator()
    cache = MambaRadixCache(2, token_to_kv_pool_allocator=kv, mamba_pool=st)
    toks = _toks(40, width)
    vals = kv.alloc(40)
    cache.insert(_key(toks, FlakyExtraKey("m")), vals.copy(), mamba_value=int(st.alloc(1)[0]))
    k2 = list(toks[:10]) + _toks(30, width, 7000)
    v2 = np.concatenate([vals[:10], kv.alloc(30)]).astype(np.int32)
    r = cache.insert(_key(k2, FlakyExtraKey("m", 1)), v2, mamba_value=int(st.alloc(1)[0]))
    assert r.prefix_len == 10
    cache._check_invariants()
    for d in range(12, 40, 2):
        cache.match_prefix(_key(_probe(k2, d, width), FlakyExtraKey("m")))
        cache._check_invariants()
    m = cache.match_prefix(_key(k2, FlakyExtraKey("m")))
    assert m.indices.tolist() == v2.tolist()
    cache.evict(10**6, mamba_num=10**6)
    cache._check_invariants()
    assert cache.total_size() == 0


@pytest.mark.parametrize("fuse", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("es", [0, 42, 50])
def test_out_of_memory_in_a_windowed_insert_with_two_splits_in_a_lead_node(fuse, es) -> None:
    """Node blocks failing at each of the windowed insert's allocations (the new nodes', the
    split at prev_prefix_len's, the split at the match end's): nothing changes, and the
    same insert then succeeds."""

    def build():
        alloc = RecordingSWAAllocator()
        cache = RadixCache(1, sliding_window_size=2, token_to_kv_pool_allocator=alloc)
        toks = _toks(64, 2)
        vals = alloc.alloc(64)
        cache.insert(_key(toks), vals.copy())
        cache.match_prefix(_key(_probe(toks, 8, 2)))  # lead 8 in [8, 64)
        k2 = list(toks[:40]) + _toks(16, 2, 90_000)
        v2 = np.concatenate([vals[:20], alloc.alloc(36)]).astype(np.int32)
        return cache, alloc, k2, v2

    cache, _alloc, k2, v2 = build()
    _insert_out_of_memory_then_again(cache, fuse, lambda: cache.insert(_key(k2), v2, 20, es))
    twin, _, k2t, v2t = build()
    twin.insert(_key(k2t), v2t, 20, es)
    assert [x[1:] for x in _snap(cache)] == [x[1:] for x in _snap(twin)]
    cache.evict(10**6, 10**6)
    cache._check_invariants()


@pytest.mark.parametrize("fuse", [0, 1])
@pytest.mark.parametrize("width", [0, 2])
def test_out_of_memory_splitting_a_lower_half_with_lead(fuse, width) -> None:
    alloc = RecordingAllocator()
    cache = RadixCache(1, token_to_kv_pool_allocator=alloc)
    toks = _toks(50, width)
    vals = alloc.alloc(50)
    cache.insert(_key(toks), vals.copy())
    cache.match_prefix(_key(_probe(toks, 10, width)))
    for d in (20, 45, 47, 49):  # 45: lead 45 > 5: compaction
        _radix_tree._fail_node_arrays_after(fuse)
        try:
            try:
                cache.match_prefix(_key(_probe(toks, d, width)))
            except MemoryError:
                pass
            cache.insert(_key([*_probe(toks, d, width), toks[0]]), alloc.alloc(d + 2))
        except MemoryError:
            pass
        finally:
            _radix_tree._fail_node_arrays_after(-1)
        cache._check_invariants()
        m = cache.match_prefix(_key(toks))
        assert m.indices.tolist() == vals.tolist()
    cache.reset()


@pytest.mark.skipif(not GLIBC, reason="mallinfo2")
def test_no_block_leaks_over_many_split_evict_cycles() -> None:
    """Split a long node at rising depths (lead, compaction), evict everything, again:
    heap use comes back to where it was."""
    toks = list(range(1, 4097))
    vals = np.arange(1, 4097, dtype=np.int32)

    def cycle(cache):
        cache.insert(RadixKey(toks), vals)
        for d in range(16, 4096, 48):
            cache.match_prefix(RadixKey([*toks[:d], 0]))
        k2 = toks[:3000] + list(range(10**6, 10**6 + 100))
        cache.insert(RadixKey(k2), np.arange(10**6, 10**6 + 3100, dtype=np.int32))
        for d in range(3001, 3100, 7):
            cache.match_prefix(RadixKey([*k2[:d], 0]))
        cache.evict(10**9)
        assert cache.total_size() == 0

    cache = RadixCache()
    for _ in range(3):
        cycle(cache)
    base = heap_bytes_in_use()
    for _ in range(30):
        cycle(cache)
    grew = heap_bytes_in_use() - base
    assert grew < 64 * 1024, grew
    # and dropping caches with split nodes frees their blocks
    base = heap_bytes_in_use()
    for _ in range(30):
        c = RadixCache()
        c.insert(RadixKey(toks), vals)
        for d in range(16, 4096, 48):
            c.match_prefix(RadixKey([*toks[:d], 0]))
        del c
    gc.collect()
    grew = heap_bytes_in_use() - base
    assert grew < 64 * 1024, grew


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("width", [1, 0])
def test_compaction_and_leaf_layout_moves_in_the_4k_aliasing_window(mode, width) -> None:
    """The stepped copy (mode 1) runs when the move's shift is 1-63 bytes short of a multiple
    of 4 KiB: a split at 1023 positions of a 1623-position node compacts the lower half (600
    positions, lead 1023) with both moves in that window; a leaf block made for 1023 more
    positions than it holds moves its value by as much."""
    before = _radix_tree._copy_set_mode(mode)
    try:
        alloc = RecordingAllocator()
        cache = RadixCache(token_to_kv_pool_allocator=alloc)
        toks = _toks(1623, width)
        vals = alloc.alloc(1623)
        cache.insert(_key(toks, FlakyExtraKey("z")), vals.copy())
        m = cache.match_prefix(_key(_probe(toks, 1023, width), FlakyExtraKey("z")))
        assert m.prefix_len == 1023
        cache._check_invariants()
        assert cache.match_prefix(_key(toks, FlakyExtraKey("z"))).indices.tolist() == vals.tolist()
        # a namespace found only when taken, 1023 positions matched: the leaf's block was made
        # for 1023 more positions than the leaf's 700
        k2 = list(toks[:1023]) + _toks(700, width, 50_000)
        v2 = np.concatenate([vals[:1023], alloc.alloc(700)]).astype(np.int32)
        ek = FlakyExtraKey("z", 1)
        assert cache.insert(_key(k2, ek), v2).prefix_len == 1023 and ek.calls == 2
        cache._check_invariants()
        assert cache.match_prefix(_key(k2, FlakyExtraKey("z"))).indices.tolist() == v2.tolist()
        for d in (1023 + 1, 1023 + 200, 1023 + 650):
            cache.match_prefix(_key(_probe(k2, d, width), FlakyExtraKey("z")))
            cache._check_invariants()
            assert cache.match_prefix(_key(k2, FlakyExtraKey("z"))).indices.tolist() == v2.tolist()
        cache.evict(10**6)
        assert cache.total_size() == 0
    finally:
        _radix_tree._copy_set_mode(before)


@pytest.mark.parametrize("fuse", [0, 1, 2, 3])
@pytest.mark.parametrize("swa", [None, 3])
@pytest.mark.parametrize("es", [0, 14, 30])
def test_out_of_memory_after_a_namespace_found_only_when_taken(fuse, swa, es) -> None:
    """The whole-key block(s) allocated up front, then the split at the match end (inside a
    lower half with a lead) runs out of memory: all freed, nothing changed; then the insert
    succeeds and its leaf (laid out by _link_leaf) is split again."""
    if not swa and es:
        pytest.skip("es is the window's")
    alloc = RecordingSWAAllocator() if swa else RecordingAllocator()
    cache = RadixCache(2, sliding_window_size=swa, token_to_kv_pool_allocator=alloc)
    toks = _toks(40, 2)
    vals = alloc.alloc(40)
    cache.insert(_key(toks, FlakyExtraKey("q")), vals.copy())
    cache.match_prefix(_key(_probe(toks, 4, 2), FlakyExtraKey("q")))  # lead 4 in [4, 40)
    k2 = list(toks[:20]) + _toks(30, 2, 70_000)
    v2 = np.concatenate([vals[:20], alloc.alloc(30)]).astype(np.int32)
    kw = {"swa_evicted_seqlen": es} if swa else {}

    _insert_out_of_memory_then_again(
        cache, fuse, lambda: cache.insert(_key(k2, FlakyExtraKey("q", 1)), v2, **kw)
    )
    for d in range(22, 50, 2):
        cache.match_prefix(_key(_probe(k2, d, 2), FlakyExtraKey("q")))
        cache._check_invariants()
    m = cache.match_prefix(_key(k2, FlakyExtraKey("q")))
    assert m.indices.tolist() == v2[: m.prefix_len].tolist()
    if not swa:
        assert m.prefix_len == 50
    cache.evict(10**6, 10**6) if swa else cache.evict(10**6)
    assert cache.total_size() == 0
    cache._check_invariants()
