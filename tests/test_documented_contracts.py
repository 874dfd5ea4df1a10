"""Contracts the documentation states, pinned where a review found the docs once said
otherwise: who frees a windowed insert's partial page, which errors are outside the
``CacheError`` family, and what an evict with a raising callback leaves."""

from __future__ import annotations

import pytest

from pymllm.mem_cache import (
    ChunkCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import CacheError


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
