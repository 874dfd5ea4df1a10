"""Fixed, hand-checked cases of rules the property tests cover only by random search (a
mutation audit of the compiled core found each caught by the stateful comparison alone):
locks and evictability, a locked parent left childless, hit counts across a split, a
namespace id released only with its last root child, and the free list sorted after a
nearly sorted release."""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache import RadixCache, RadixKey, TokenToKVPoolAllocator


def _cache(**kwargs: object) -> tuple[RadixCache, TokenToKVPoolAllocator]:
    alloc = TokenToKVPoolAllocator(64, need_sort=False)
    return RadixCache(token_to_kv_pool_allocator=alloc, **kwargs), alloc


def _insert(cache: RadixCache, alloc: TokenToKVPoolAllocator, tokens: list[int], ns=None):
    key = RadixKey(tokens, ns)
    m = cache.match_prefix(key)
    value = alloc.alloc(len(tokens) - m.prefix_len, prefix=m.indices)
    assert value is not None
    return cache.insert(key, value)


def test_a_locked_leaf_is_not_evictable_and_is_again_once_unlocked() -> None:
    cache, alloc = _cache()
    leaf = _insert(cache, alloc, [1, 2, 3]).last_node
    cache.inc_lock_ref(leaf)
    assert (cache.evictable_size(), cache.protected_size()) == (0, 3)
    assert cache.evict(100).full_evicted == 0 and not leaf.evicted
    cache.dec_lock_ref(leaf)
    assert (cache.evictable_size(), cache.protected_size()) == (3, 0)
    assert cache.evict(100).full_evicted == 3 and leaf.evicted
    assert alloc.available_size() == 64


def test_a_locked_parent_left_childless_stays_until_unlocked() -> None:
    cache, alloc = _cache()
    _insert(cache, alloc, [1, 2, 3, 4])
    _insert(cache, alloc, [1, 2, 3, 5])  # splits: [1, 2, 3] -> [4], [5]
    parent = cache.match_prefix(RadixKey([1, 2, 3])).last_node
    assert len(parent.key) == 3
    cache.inc_lock_ref(parent)
    assert cache.evict(100).full_evicted == 2  # both children; the parent is locked
    assert not parent.evicted and cache.total_size() == 3
    assert cache.evict(100).full_evicted == 0
    cache.dec_lock_ref(parent)
    assert cache.evict(100).full_evicted == 3 and parent.evicted


def test_a_split_keeps_the_hit_count_in_both_halves() -> None:
    """Under LFU the upper half of a split is as hot as the node it came from: a split that
    dropped its hits made a shared prefix the first victim."""
    cache, alloc = _cache(eviction_policy="lfu")
    node = _insert(cache, alloc, [1, 2, 3, 4, 5, 6]).last_node
    for _ in range(3):
        cache.match_prefix(RadixKey([1, 2, 3, 4, 5, 6]))
    hits = node.hit_count
    assert hits >= 3
    leaf = _insert(cache, alloc, [1, 2, 3, 9]).last_node  # splits the node after 3 tokens
    upper = leaf.parent
    assert list(upper.key) == [1, 2, 3] and upper.hit_count >= hits
    assert node.hit_count == hits  # the lower half, [4, 5, 6], keeps its own
    # the cold new leaf goes first, then the lower half; the shared prefix outlives both
    assert cache.evict(1).full_evicted == 1 and leaf.evicted and not node.evicted


def test_a_namespace_stays_apart_until_its_last_root_child_goes() -> None:
    """Two root children in namespace "a"; evicting one must not release "a"'s id, or a new
    namespace would take it and match "a"'s other prefix."""
    cache, alloc = _cache()
    first = _insert(cache, alloc, [1, 2], "a").last_node
    _insert(cache, alloc, [3, 4], "a")
    assert cache.evict(1).full_evicted == 2 and first.evicted  # the older of the two
    r = _insert(cache, alloc, [3, 4], "c")
    assert r.prefix_len == 0  # nothing shared with "a"
    assert cache.match_prefix(RadixKey([3, 4], "a")).prefix_len == 2
    assert cache.match_prefix(RadixKey([3, 4], "c")).prefix_len == 2
    cache._check_invariants()


@pytest.mark.parametrize(
    "release",
    [[3, 4, 5, 7, 6], [4, 5, 6, 7, 3], [7, 3, 4, 5, 6], [3, 4, 5, 6, 7]],
    ids=["last-pair-swapped", "first-last", "last-first", "sorted"],
)
def test_a_sorted_allocator_hands_out_ascending_slots_after_any_release(release) -> None:
    alloc = TokenToKVPoolAllocator(10, need_sort=True)
    assert alloc.alloc(10).tolist() == list(range(1, 11))
    alloc.free(np.array(release, np.int32))
    alloc.merge_and_sort_free()
    assert alloc.alloc(5).tolist() == [3, 4, 5, 6, 7]
