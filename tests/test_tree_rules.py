"""Fixed, hand-checked cases of rules the property tests cover only by random search (a
mutation audit of the compiled core found each caught by the stateful comparison alone):
locks and evictability, a locked parent left childless, hit counts across a split, a
namespace id released only with its last root child, and the free list sorted after a
nearly sorted release. Then those a second review (session 23, 63 mutants of the
full-attention core) found unpinned or pinned only by randomized runs: a split's upper half
refreshed by the match, an insert refreshing recency, reset reporting no node, handles
stale after a reset, and the bounds of every value and key reader."""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache import RadixCache, RadixKey, TokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidKeyError, InvalidValueError, StaleNodeError


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


# -- session 23's review ----------------------------------------------------------------

INT32_MAX = 2**31 - 1


def test_a_match_that_splits_a_node_refreshes_the_upper_half() -> None:
    # mutant: the recency refresh skipped the upper half a match's split made
    cache, alloc = _cache()
    _insert(cache, alloc, [1, 2, 3, 4])
    other = _insert(cache, alloc, [9]).last_node
    upper = cache.match_prefix(RadixKey([1, 2])).last_node
    assert upper.last_access_time > other.last_access_time
    assert cache.evict(1).full_evicted == 2  # the lower half [3, 4]: the oldest leaf
    assert not upper.evicted and not other.evicted
    assert cache.evict(1).full_evicted == 1  # then [9]: the upper half was just matched
    assert other.evicted and not upper.evicted


def test_reset_reports_no_node_to_on_node_evict_even_after_an_evict() -> None:
    # mutant: reset handed on_node_evict the ids of the previous evict again
    ids: list[int] = []
    alloc = TokenToKVPoolAllocator(64, need_sort=False)
    cache = RadixCache(token_to_kv_pool_allocator=alloc, on_node_evict=ids.append)
    a = _insert(cache, alloc, [1, 2]).last_node
    _insert(cache, alloc, [3, 4])
    cache.evict(1)
    assert ids == [a.id]
    cache.reset()
    assert ids == [a.id]
    assert alloc.available_size() == 64


_LARGEST = {
    "none": lambda: None,
    "np_int_in_list": lambda: [np.int64(INT32_MAX)],
    "uint32": lambda: np.array([INT32_MAX], dtype=np.uint32),
    "uint64": lambda: np.array([INT32_MAX], dtype=np.uint64),
    "int64_be": lambda: np.array([INT32_MAX], dtype=">i8"),
    "uint64_be": lambda: np.array([INT32_MAX], dtype=">u8"),
    "uint64_strided": lambda: np.array([INT32_MAX, 0], dtype=np.uint64)[::2],
}


@pytest.mark.parametrize("form", sorted(_LARGEST))
def test_the_largest_kv_index_is_accepted_from_every_value_form(form: str) -> None:
    # mutants: an off-by-one at 2**31 - 1 in each value reader (None: the token ids; a list
    # item that is not an exact int; a uint32 array; a uint64 array; a big-endian int64
    # array, read by the generic path; a uint64 array that is not native words)
    cache = RadixCache()  # no allocator: no slot booking, any index in range goes
    r = cache.insert(RadixKey([INT32_MAX]), _LARGEST[form]())
    assert r.prefix_len == 0 and cache.total_size() == 1
    m = cache.match_prefix(RadixKey([INT32_MAX]))
    assert m.indices.tolist() == [INT32_MAX]


def test_a_kv_index_of_2_31_is_refused_from_every_value_form() -> None:
    forms = {
        "none": None,
        "np_int_in_list": [np.int64(2**31)],
        "uint32": np.array([2**31], dtype=np.uint32),
        "uint64": np.array([2**31], dtype=np.uint64),
        "int64": np.array([2**31], dtype=np.int64),
        "int64_be": np.array([2**31], dtype=">i8"),
        "uint64_be": np.array([2**31], dtype=">u8"),
        "uint64_strided": np.array([2**31, 0], dtype=np.uint64)[::2],
    }
    for name, value in forms.items():
        cache = RadixCache()
        with pytest.raises(InvalidValueError):
            cache.insert(RadixKey([2**31]), value)
        assert cache.total_size() == 0, name
        assert cache.match_prefix(RadixKey([2**31])).prefix_len == 0, name


def test_a_token_of_2_32_is_refused_from_every_key_form() -> None:
    forms = {
        "np_int_in_list": [np.int64(2**32)],
        "int64": np.array([2**32], dtype=np.int64),
        "uint64": np.array([2**32], dtype=np.uint64),
        "int64_be": np.array([2**32], dtype=">i8"),
    }
    for name, tokens in forms.items():
        cache = RadixCache()
        with pytest.raises(InvalidKeyError):
            cache.insert(RadixKey(tokens), [5])
        with pytest.raises(InvalidKeyError):
            cache.match_prefix(RadixKey(tokens))
        assert cache.total_size() == 0, name
    cache = RadixCache()
    for tokens in ([np.int64(2**32 - 1)], np.array([2**32 - 1], dtype=">i8")):
        cache.insert(RadixKey(tokens), [5])
        assert cache.match_prefix(RadixKey([2**32 - 1])).indices.tolist() == [5]


def test_inserting_a_cached_key_again_refreshes_its_recency() -> None:
    # mutants: insert skipped the refresh of its path, or refreshed it without a clock tick
    # (then the refreshed node ties with the newest leaf and the older id goes first)
    cache, alloc = _cache()
    a = _insert(cache, alloc, [1, 2]).last_node
    cached = cache.match_prefix(RadixKey([1, 2])).indices
    b = _insert(cache, alloc, [3, 4]).last_node
    r = cache.insert(RadixKey([1, 2]), cached)  # no match in between: the insert refreshes
    assert r.prefix_len == 2 and r.last_node.id == a.id
    assert a.last_access_time > b.last_access_time
    cache.evict(1)
    assert b.evicted and not a.evicted


def test_handles_are_evicted_after_reset_and_cannot_be_locked() -> None:
    # mutant: a handle was judged by its slot's old contents (the node array the reset
    # rebuilds may reuse the freed one's memory, old ids and all)
    cache, alloc = _cache()
    handles = [_insert(cache, alloc, [10 * i + 1, 10 * i + 2]).last_node for i in range(5)]
    cache.reset()
    assert alloc.available_size() == 64
    for h in handles:
        assert h.evicted
        with pytest.raises(StaleNodeError):
            cache.inc_lock_ref(h)
    assert (cache.evictable_size(), cache.protected_size(), cache.total_size()) == (0, 0, 0)
