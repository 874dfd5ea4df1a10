"""Contracts the documentation states, pinned where a review found the docs once said
otherwise: who frees a windowed insert's partial page, which errors are outside the
``CacheError`` family, and what an evict with a raising callback leaves."""

from __future__ import annotations

import pytest

from pymllm.mem_cache import (
    ChunkCache,
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import CacheError, InvalidValueError, StaleNodeError


def test_sliding_window_insert_leaves_the_partial_page_to_the_caller() -> None:
    """With a window the tree settles ``value[prev_prefix_len:aligned_len]`` itself (frees
    the duplicates it does not keep); a partial last page past ``aligned_len`` stays the
    caller's, who must free it (RadixCache's docstring once said the caller frees none)."""
    alloc = SWATokenToKVPoolAllocator(32, 32, page_size=2)
    cache = RadixCache(page_size=2, sliding_window_size=4, token_to_kv_pool_allocator=alloc)
    key = RadixKey([1, 2, 3, 4, 5])  # 2 whole pages + 1 token
    v = alloc.alloc(6)[:5]
    cache.insert(key, v)
    w = alloc.alloc(6)[:5]
    r = cache.insert(key, w)  # a duplicate: the tree frees w[:4] itself
    assert r.prefix_len == 4
    assert alloc.is_allocated(w).tolist() == [False] * 4 + [True]
    assert not alloc.is_cached(w[4:]).any()
    alloc.free(w[4:])  # the caller's to free: not freeing it leaks a slot
    alloc.free(v[4:])


def test_type_errors_are_plain_type_errors_outside_cache_error() -> None:
    """errors.py: a wrong argument type raises a plain ``TypeError``, outside the
    ``CacheError`` family (which subclasses ValueError or RuntimeError only)."""
    cache = RadixCache()
    alloc = TokenToKVPoolAllocator(8)
    calls = [
        lambda: cache.match_prefix([1, 2]),
        lambda: cache.evict(1.5),
        lambda: alloc.alloc(1.0),
        lambda: ChunkCache().match_prefix([1]),
    ]
    for call in calls:
        with pytest.raises(TypeError) as info:
            call()
        assert not isinstance(info.value, CacheError)


def test_an_evict_whose_callback_raises_changes_state() -> None:
    """errors.py's documented exception to "a call that raises changes nothing": an evict
    whose ``on_node_evict`` raises still evicts and frees everything it took out, reports
    every node, then raises."""
    alloc = TokenToKVPoolAllocator(16)
    seen: list[int] = []

    def on_evict(nid: int) -> None:
        seen.append(nid)
        raise RuntimeError("callback")

    cache = RadixCache(token_to_kv_pool_allocator=alloc, on_node_evict=on_evict)
    cache.insert(RadixKey([1, 2]), alloc.alloc(2))
    cache.insert(RadixKey([3, 4]), alloc.alloc(2))
    with pytest.raises(RuntimeError):
        cache.evict(100)
    assert cache.total_size() == 0 and alloc.available_size() == 16 and len(seen) == 2


def test_a_running_request_locks_what_it_inserted_before_dropping_its_match_lock() -> None:
    """README, insert's docstring: the slots an insert takes are not locked by the match's
    lock, so an evict for another request hands them out while the first request still
    reads them; locking ``r.last_node`` first keeps them."""
    for relock in (False, True):
        alloc = TokenToKVPoolAllocator(40)
        cache = RadixCache(token_to_kv_pool_allocator=alloc)
        key = RadixKey(list(range(100, 130)))
        m = cache.match_prefix(key)
        lock = cache.inc_lock_ref(m.last_node)
        slots = alloc.alloc(30, prefix=m.indices)
        r = cache.insert(key, slots)
        assert r.prefix_len == 0 and alloc.is_cached(slots).all()
        if relock:
            lock2 = cache.inc_lock_ref(r.last_node)
            cache.dec_lock_ref(m.last_node, swa_boundary_id=lock)
        assert cache.protected_size() == (30 if relock else 0)
        # another request needs 35 slots: the loop evicts what it is short of
        cache.evict(35 - alloc.available_size())
        if relock:
            assert alloc.is_cached(slots).all(), "a locked request's slots were evicted"
            assert alloc.alloc(35) is None
            cache.dec_lock_ref(r.last_node, swa_boundary_id=lock2)
            assert cache.evictable_size() == 30
        else:
            assert not alloc.is_allocated(slots).any(), "the slots were not evictable"
            handed_out = alloc.alloc(35)
            assert handed_out is not None and set(slots.tolist()) <= set(handed_out.tolist())
            cache.dec_lock_ref(m.last_node, swa_boundary_id=lock)


def test_reset_frees_locked_nodes_and_their_handles_go_stale() -> None:
    """reset's docstring: locked nodes go too (their slots back to the allocator), and a
    later dec_lock_ref of such a handle raises StaleNodeError; protected_size() says
    whether a request holds a lock before a flush."""
    alloc = TokenToKVPoolAllocator(16)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    slots = alloc.alloc(4)
    node = cache.insert(RadixKey([1, 2, 3, 4]), slots).last_node
    cache.inc_lock_ref(node)
    assert cache.protected_size() == 4
    cache.reset()
    assert cache.protected_size() == cache.total_size() == 0
    assert alloc.available_size() == 16 and not alloc.is_allocated(slots).any()
    with pytest.raises(StaleNodeError):
        cache.dec_lock_ref(node)
    assert alloc.available_size() == 16


@pytest.mark.parametrize("allocator", [None, "pool"])
def test_evict_returns_what_it_freed_and_a_count_below_one_evicts_nothing(allocator) -> None:
    """evict's docstring: EvictResult counts the tokens freed; 0 or a negative count is a
    no-op; without an allocator the slots go to no one (nothing raises)."""
    alloc = TokenToKVPoolAllocator(16) if allocator else None
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    slots = alloc.alloc(3) if alloc else None
    cache.insert(RadixKey([1, 2, 3]), slots)
    for n in (0, -5):
        r = cache.evict(n)
        assert (r.full_evicted, r.swa_evicted) == (0, 0)
        assert cache.evictable_size() == 3
    r = cache.evict(1)
    assert (r.full_evicted, r.swa_evicted, cache.total_size()) == (3, 0, 0)
    if alloc is not None:
        assert alloc.available_size() == 16


@pytest.mark.parametrize("klass", [RadixCache, MambaRadixCache])
def test_an_allocator_passed_as_page_size_says_to_pass_it_by_keyword(klass) -> None:
    """RadixCache(alloc) put the allocator in page_size's place (RadixCache(1, alloc), in
    sliding_window_size's) and said only that an int was expected; the message now says
    where the allocator goes."""
    alloc = TokenToKVPoolAllocator(8)
    with pytest.raises(InvalidValueError, match="by keyword, token_to_kv_pool_allocator="):
        klass(alloc)
    if klass is RadixCache:  # MambaRadixCache's order: the allocator in the window's place
        swa = SWATokenToKVPoolAllocator(8, 8)
        with pytest.raises(InvalidValueError, match=r"sliding_window_size: .* by keyword"):
            klass(1, swa)
    with pytest.raises(InvalidValueError) as e:
        klass(1.5)
    assert "keyword" not in str(e.value)
    klass(token_to_kv_pool_allocator=alloc)
