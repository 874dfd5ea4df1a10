"""Hand-computed tests of the RadixCache contract, run against every implementation.

The ``make_cache`` fixture (tests/conftest.py) is parametrized over the pure-Python reference
model (``RefRadixCache``) and the compiled ``RadixCache``: every expectation below is worked
out by hand from the written semantics, so both must meet it and they cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pymllm.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    EvictResult,
    RadixKey,
    hash_token_ids,
)
from pymllm.mem_cache.errors import (
    InvalidKeyError,
    InvalidValueError,
    LockStateError,
    StaleNodeError,
)


def K(tokens: Any, extra_key: Any = None) -> RadixKey:
    return RadixKey(tokens, extra_key)


def state(cache: Any) -> tuple[int, int, int]:
    # The logical clock is not public API: tests read it off the stamps of touched nodes.
    return (cache.evictable_size(), cache.protected_size(), cache.total_size())


def toks(node: Any) -> list[Any]:
    return list(node.key.token_ids)


def vals(node: Any) -> list[int]:
    return np.asarray(node.value).tolist()


def i32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.int32)


# ---------------------------------------------------------------- construction


def test_fresh_cache(make_cache):
    cache = make_cache(page_size=4)
    assert isinstance(cache, BasePrefixCache)
    assert cache.page_size == 4
    root = cache.root_node
    assert root.id == 0 and root.parent is None and root.lock_ref == 0 and not root.evicted
    assert len(root.key) == 0
    assert state(cache) == (0, 0, 0)
    assert cache.swa_evictable_size() == 0 and cache.swa_protected_size() == 0
    cache._check_invariants()


def test_reference_has_no_sliding_window():
    # The compiled cache grew SWA tombstones (issue 3); the reference model does not model
    # them yet and must say so rather than silently ignore the window.
    from reference_model import RefRadixCache

    with pytest.raises(NotImplementedError):
        RefRadixCache(sliding_window_size=128)


# ---------------------------------------------------------------- insert / match basics


def test_insert_into_empty_tree(make_cache, node_class):
    cache = make_cache()
    res = cache.insert(K([5, 6, 7]), i32([10, 11, 12]))
    assert res.prefix_len == 0
    leaf = res.last_node
    assert isinstance(leaf, node_class)
    assert leaf.id == 1 and leaf.parent == cache.root_node
    assert toks(leaf) == [5, 6, 7] and leaf.key.extra_key is None
    assert leaf.value.dtype == np.int32 and vals(leaf) == [10, 11, 12]
    assert (leaf.hit_count, leaf.last_access_time, leaf.lock_ref) == (0, 1, 0)
    assert not leaf.evicted
    assert state(cache) == (3, 0, 3)
    cache._check_invariants()


def test_match_exact_partial_and_miss(make_cache):
    cache = make_cache()
    cache.insert(K([1, 2, 3]), i32([7, 8, 9]))
    m = cache.match_prefix(K([1, 2, 3, 4]))
    assert m.prefix_len == 3 and m.last_node.id == 1
    assert m.indices.dtype == np.int32 and m.indices.tolist() == [7, 8, 9]
    assert (m.last_node.hit_count, m.last_node.last_access_time) == (1, 2)

    miss = cache.match_prefix(K([9, 1]))
    assert miss.prefix_len == 0 and miss.last_node == cache.root_node
    assert miss.indices.dtype == np.int32 and miss.indices.shape == (0,)

    empty = cache.match_prefix(K([]))
    assert empty.prefix_len == 0 and empty.last_node.id == 0
    # insert, match, miss and empty match each ticked the clock.
    assert cache.match_prefix(K([1, 2, 3])).last_node.last_access_time == 5
    cache._check_invariants()


def test_match_inside_a_node_splits_it(make_cache):
    cache = make_cache()
    leaf = cache.insert(K([1, 2, 3, 4]), i32([10, 11, 12, 13])).last_node
    cache.inc_lock_ref(leaf)
    cache.match_prefix(K([1, 2, 3, 4]))  # hit_count 1, t=2
    m = cache.match_prefix(K([1, 2, 9]))  # t=3
    upper = m.last_node
    assert m.prefix_len == 2 and m.indices.tolist() == [10, 11]
    assert upper.id == 2 and toks(upper) == [1, 2] and vals(upper) == [10, 11]
    assert upper.parent == cache.root_node
    # The split-off upper node inherits lock_ref, hit_count, last_access_time, then is touched.
    assert (upper.lock_ref, upper.hit_count, upper.last_access_time) == (1, 2, 3)
    # The original node keeps its id, its tail and its own stats.
    assert leaf.id == 1 and toks(leaf) == [3, 4] and vals(leaf) == [12, 13]
    assert leaf.parent == upper
    assert (leaf.lock_ref, leaf.hit_count, leaf.last_access_time) == (1, 1, 2)
    assert state(cache) == (0, 4, 4)
    cache._check_invariants()


# around the 64-token blocks the compiled compare works in, and a long key's tail
DIVERGE_AT = [0, 1, 62, 63, 64, 65, 127, 128, 129, 191, 192, 255, 256, 299]


@pytest.mark.parametrize("at", DIVERGE_AT)
def test_long_keys_diverging_anywhere(make_cache, at):
    """A 300-token node matched by keys that differ at one position: every position before
    it matches, none after; a key cut short matches its whole length."""
    cache = make_cache()
    base = np.arange(1000, 1300, dtype=np.int32)
    cache.insert(K(base), np.arange(1, 301, dtype=np.int32))
    probe = base.copy()
    probe[at] += 7
    m = cache.match_prefix(K(probe.tolist()))
    assert m.prefix_len == at and m.indices.tolist() == list(range(1, at + 1))
    assert cache.match_prefix(K(base[:at])).prefix_len == at
    r = cache.insert(K(probe), np.arange(301, 601, dtype=np.int32))
    assert r.prefix_len == at
    assert cache.match_prefix(K(probe)).indices.tolist() == (
        list(range(1, at + 1)) + list(range(301 + at, 601))
    )
    cache._check_invariants()


@pytest.mark.parametrize("at", [0, 31, 32, 33, 63, 64, 99])
@pytest.mark.parametrize("element", [0, 1])
def test_long_tuple_keys_diverging_in_either_element(make_cache, at, element):
    """Bigram keys (2 ids per position, 64-id blocks = 32 positions): a difference in either
    element of position `at` ends the match there."""
    cache = make_cache()
    base = [(1000 + i, 2000 + i) for i in range(100)]
    cache.insert(K(base), np.arange(1, 101, dtype=np.int32))
    probe = list(base)
    pair = list(probe[at])
    pair[element] += 5
    probe[at] = tuple(pair)
    assert cache.match_prefix(K(probe)).prefix_len == at
    cache._check_invariants()


def test_insert_duplicate_and_extension(make_cache, allocator):
    cache = make_cache()
    a = allocator.alloc(3)
    first = cache.insert(K([1, 2, 3]), a).last_node
    b = allocator.alloc(5)
    res = cache.insert(K([1, 2, 3, 4, 5]), b)
    assert res.prefix_len == 3
    assert res.last_node.id == 2 and res.last_node.parent == first
    assert toks(res.last_node) == [4, 5] and vals(res.last_node) == b[3:].tolist()
    # Duplicates stay the caller's: the tree kept the first insert's slots.
    assert cache.match_prefix(K([1, 2, 3, 4, 5])).indices.tolist() == [*a.tolist(), *b[3:]]
    assert first.hit_count == 1 and first.last_access_time == 3
    c = allocator.alloc(3)
    again = cache.insert(K([1, 2, 3]), c)
    assert again.prefix_len == 3 and again.last_node == first
    assert first.hit_count == 1 and first.last_access_time == 4  # insert touches, no hit
    assert state(cache) == (5, 0, 5)
    allocator.free(b[:3])
    allocator.free(c)
    cache.reset()
    allocator.assert_all_free()


def test_insert_diverging_key_splits(make_cache):
    cache = make_cache()
    cache.insert(K([1, 2, 3]), i32([10, 11, 12]))
    res = cache.insert(K([1, 2, 4, 5]), i32([20, 21, 22, 23]))
    assert res.prefix_len == 2
    new_leaf = res.last_node
    upper = new_leaf.parent
    # The split takes id 2 before the new leaf takes id 3.
    assert (upper.id, new_leaf.id) == (2, 3)
    assert toks(upper) == [1, 2] and vals(upper) == [10, 11]
    assert toks(new_leaf) == [4, 5] and vals(new_leaf) == [22, 23]
    assert new_leaf.hit_count == 0 and upper.hit_count == 0
    assert upper.last_access_time == 2 and new_leaf.last_access_time == 2
    assert cache.match_prefix(K([1, 2, 3])).last_node.id == 1
    assert cache.total_size() == 5
    cache._check_invariants()


def test_insert_ending_inside_a_node_splits(make_cache):
    cache = make_cache()
    leaf = cache.insert(K([1, 2, 3, 4]), i32([10, 11, 12, 13])).last_node
    res = cache.insert(K([1, 2]), i32([30, 31]))
    assert res.prefix_len == 2 and res.last_node.id == 2
    assert leaf.parent == res.last_node and toks(leaf) == [3, 4]
    assert res.last_node.hit_count == 0 and res.last_node.last_access_time == 2
    assert leaf.last_access_time == 1
    cache._check_invariants()


def test_insert_value_none_uses_token_ids(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    leaf = cache.insert(K([4, 5, 6])).last_node
    assert vals(leaf) == [4, 5, 6]
    assert cache.match_prefix(K([4, 5, 6])).indices.tolist() == [4, 5, 6]
    assert cache.evict(10) == EvictResult(full_evicted=3)


@pytest.mark.parametrize("kind", ["list", "int32", "int64", "jax"])
def test_value_array_kinds(make_cache, kind):
    raw = [3, 1, 4, 1000]
    if kind == "jax":
        jnp = pytest.importorskip("jax.numpy")
        value = jnp.asarray(raw, dtype=jnp.int32)
    elif kind == "list":
        value = raw
    else:
        value = np.asarray(raw, dtype=kind)
    cache = make_cache(token_to_kv_pool_allocator=None)
    leaf = cache.insert(K([9, 8, 7, 6]), value).last_node
    assert leaf.value.dtype == np.int32 and vals(leaf) == raw


def test_tree_copies_value(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    value = np.array([1, 2, 3], dtype=np.int32)
    cache.insert(K([1, 2, 3]), value)
    value[:] = 99
    assert cache.match_prefix(K([1, 2, 3])).indices.tolist() == [1, 2, 3]


# ---------------------------------------------------------------- pages


def test_paged_insert_keeps_whole_pages(make_cache, allocator):
    cache = make_cache(page_size=4)
    value = allocator.alloc(10)
    res = cache.insert(K(list(range(10))), value)
    assert res.prefix_len == 0 and toks(res.last_node) == list(range(8))
    assert vals(res.last_node) == value[:8].tolist()
    assert cache.total_size() == 8
    allocator.free(value[8:])  # the partial page stays the caller's
    short = allocator.alloc(3)
    res = cache.insert(K([0, 1, 2]), short)
    assert res.prefix_len == 0 and res.last_node == cache.root_node
    allocator.free(short)
    assert cache.match_prefix(K(list(range(8)))).last_node.last_access_time == 3
    cache.reset()
    allocator.assert_all_free()


def test_paged_match_rounds_down_and_splits_on_page_boundary(make_cache):
    cache = make_cache(page_size=2)
    leaf = cache.insert(K([1, 2, 3, 4, 5, 6]), i32([10, 11, 12, 13, 14, 15])).last_node
    m = cache.match_prefix(K([1, 2, 3, 9, 5, 6]))
    assert m.prefix_len == 2 and m.indices.tolist() == [10, 11]
    assert m.last_node.id == 2 and toks(m.last_node) == [1, 2]
    assert toks(leaf) == [3, 4, 5, 6]
    # Fewer than a page left: no lookup at all.
    m = cache.match_prefix(K([1, 2, 3]))
    assert m.prefix_len == 2 and m.last_node.id == 2
    m = cache.match_prefix(K([1]))
    assert m.prefix_len == 0 and m.last_node.id == 0
    cache._check_invariants()


def test_paged_children_keyed_by_whole_first_page(make_cache):
    cache = make_cache(page_size=2)
    a = cache.insert(K([1, 2, 7, 7]), i32([10, 11, 12, 13])).last_node
    b = cache.insert(K([1, 3, 7, 7]), i32([20, 21, 22, 23])).last_node
    # [1, 3] differs from [1, 2] inside the first page: siblings under the root, no split.
    assert a.parent == cache.root_node and b.parent == cache.root_node
    assert (a.id, b.id) == (1, 2)
    assert cache.match_prefix(K([1, 3, 7, 7])).indices.tolist() == [20, 21, 22, 23]
    cache._check_invariants()


# ---------------------------------------------------------------- namespaces and key kinds


def test_namespaces_never_share_nodes(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    n0 = cache.insert(K([1, 2]), i32([1, 2])).last_node
    na = cache.insert(K([1, 2], "a"), i32([3, 4])).last_node
    n7 = cache.insert(K([1, 2], 7), i32([5, 6])).last_node
    nt = cache.insert(K([(1, 2), (3, 4)]), i32([7, 8])).last_node
    nt3 = cache.insert(K([(1, 2, 0)]), i32([9])).last_node
    assert [n.id for n in (n0, na, n7, nt, nt3)] == [1, 2, 3, 4, 5]
    assert all(n.parent == cache.root_node for n in (n0, na, n7, nt, nt3))
    assert na.key.extra_key == "a" and n7.key.extra_key == 7
    assert toks(nt) == [(1, 2), (3, 4)]
    assert cache.match_prefix(K([1, 2], "a")).indices.tolist() == [3, 4]
    assert cache.match_prefix(K([1, 2], 7)).indices.tolist() == [5, 6]
    assert cache.match_prefix(K([(1, 2)])).indices.tolist() == [7]
    assert cache.match_prefix(K([1, 2], "b")).prefix_len == 0
    assert cache.match_prefix(K([(1, 2, 0)], "a")).prefix_len == 0
    assert cache.total_size() == 9
    cache._check_invariants()


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint32])
def test_numpy_keys_share_nodes_with_list_keys(make_cache, dtype):
    cache = make_cache(token_to_kv_pool_allocator=None)
    leaf = cache.insert(K([1, 2, 3]), i32([4, 5, 6])).last_node
    m = cache.match_prefix(K(np.array([1, 2, 3, 4], dtype=dtype)))
    assert m.prefix_len == 3 and m.last_node == leaf
    res = cache.insert(K(np.array([1, 2, 9], dtype=dtype)), i32([7, 8, 9]))
    assert res.prefix_len == 2 and toks(res.last_node) == [9]
    assert all(type(t) is int for t in toks(res.last_node))
    big = cache.insert(K(np.array([2**32 - 1], dtype=np.uint32)), i32([1])).last_node
    assert toks(big) == [2**32 - 1]


# Ints of 0, 1, 2 and 3 internal 30-bit digits, at the edges of the valid ranges: the
# compiled cache reads small ints from the object itself and everything else the general way.
_EDGE_TOKENS = [0, 1, 2**30 - 1, 2**30, 2**31 - 1, 2**31, 2**32 - 1]
_EDGE_INDICES = [0, 1, 2**30 - 1, 2**30, 2**31 - 1]


def test_list_keys_and_values_at_int_edges(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    res = cache.insert(K(list(_EDGE_TOKENS)), [*_EDGE_INDICES, 5, 6])
    assert toks(res.last_node) == _EDGE_TOKENS
    m = cache.match_prefix(K(np.array(_EDGE_TOKENS, dtype=np.uint32)))
    assert m.prefix_len == len(_EDGE_TOKENS)
    assert m.indices.tolist() == [*_EDGE_INDICES, 5, 6]
    pairs = [(t, _EDGE_TOKENS[-1 - i]) for i, t in enumerate(_EDGE_TOKENS)]
    tup = cache.insert(K(pairs), list(range(len(pairs))))
    assert toks(tup.last_node) == pairs
    assert cache.match_prefix(K(pairs)).prefix_len == len(pairs)
    cache._check_invariants()


@pytest.mark.parametrize(
    "bad_token",
    [-1, -(2**30), 2**32, 2**60, -(2**60), 2**100, True],
    ids=["-1", "-2**30", "2**32", "2**60", "-2**60", "2**100", "True"],
)
def test_list_keys_reject_ints_past_the_edges(make_cache, bad_token):
    cache = make_cache(token_to_kv_pool_allocator=None)
    cache.insert(K([1, 2]), [1, 2])
    before = cache.total_size()
    for key in (K([1, bad_token]), K([(1, 2), (bad_token, 3)])):
        with pytest.raises((InvalidKeyError, TypeError)):
            cache.insert(key, [3, 4])
        with pytest.raises((InvalidKeyError, TypeError)):
            cache.match_prefix(key)
    assert cache.total_size() == before
    cache._check_invariants()


@pytest.mark.parametrize("bad_index", [-1, 2**31, 2**32, 2**60, -(2**60)])
def test_list_values_reject_indices_past_the_edges(make_cache, bad_index):
    cache = make_cache(token_to_kv_pool_allocator=None)
    with pytest.raises(InvalidValueError):
        cache.insert(K([1, 2]), [1, bad_index])
    assert cache.total_size() == 0
    cache._check_invariants()


def test_tuple_keys_paged(make_cache):
    cache = make_cache(page_size=2, token_to_kv_pool_allocator=None)
    key = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 3)]
    res = cache.insert(K(key, "x"), i32([10, 11, 12, 13, 14]))
    assert toks(res.last_node) == key[:4] and res.last_node.key.extra_key == "x"
    m = cache.match_prefix(K([(1, 1), (1, 2), (2, 1), (9, 9)], "x"))
    assert m.prefix_len == 2 and m.indices.tolist() == [10, 11]


# ---------------------------------------------------------------- ids


def test_ids_count_up_and_survive_reset(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    assert cache.insert(K([1]), i32([1])).last_node.id == 1
    assert cache.insert(K([2]), i32([2])).last_node.id == 2
    cache.evict(1)
    assert cache.insert(K([3]), i32([3])).last_node.id == 3
    cache.reset()
    leaf = cache.insert(K([1]), i32([1])).last_node
    assert leaf.id == 4 and leaf.last_access_time == 1  # the clock restarted at 0


def test_handles_compare_by_id(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    leaf = cache.insert(K([1, 2]), i32([1, 2])).last_node
    same = cache.match_prefix(K([1, 2])).last_node
    assert same == leaf and hash(same) == hash(leaf)
    other = cache.insert(K([3]), i32([3])).last_node
    assert other != leaf


# ---------------------------------------------------------------- eviction


def test_evict_lru_order_and_one_free_call(make_cache, allocator):
    cache = make_cache()
    a = cache.insert(K([1, 1]), allocator.alloc(2)).last_node  # id 1, t=1
    b = cache.insert(K([2, 2, 2]), allocator.alloc(3)).last_node  # id 2, t=2
    c = cache.insert(K([3]), allocator.alloc(1)).last_node  # id 3, t=3
    cache.match_prefix(K([1, 1]))  # a: t=4
    assert cache.evict(3) == EvictResult(full_evicted=3)  # b alone covers 3 tokens
    assert b.evicted and not a.evicted and not c.evicted
    assert allocator.freed_sequence == [[3, 4, 5]]
    assert cache.evict(2) == EvictResult(full_evicted=3)  # c (1 token), then a (2)
    assert allocator.freed_sequence == [[3, 4, 5], [6, 1, 2]]
    assert make_cache.evicted_ids == [2, 3, 1]
    assert state(cache) == (0, 0, 0)
    assert cache.evict(5) == EvictResult(full_evicted=0)
    assert len(allocator.free_calls) == 2
    allocator.assert_all_free()


def test_evict_cascades_to_parents_and_skips_locked(make_cache, allocator):
    cache = make_cache()
    cache.insert(K([1, 2, 3]), allocator.alloc(3))  # id 1
    cache.insert(K([1, 2, 4]), allocator.alloc(3))  # upper 2 = [1, 2], leaf 3 = [4]
    locked = cache.insert(K([8, 8]), allocator.alloc(2)).last_node  # id 4
    cache.inc_lock_ref(locked)
    res = cache.evict(100)
    # Leaf 1 (t=1), then leaf 3 (t=2); their parent 2 joins the candidates once both are gone.
    assert res.full_evicted == 4
    assert make_cache.evicted_ids == [1, 3, 2]
    assert allocator.freed_sequence == [[3, 6, 1, 2]]
    assert state(cache) == (0, 2, 2)
    assert not locked.evicted
    cache.dec_lock_ref(locked)
    assert cache.evict(1).full_evicted == 2
    allocator.free(np.asarray([4, 5], dtype=np.int32))  # the duplicate [1, 2] of insert 2
    allocator.assert_all_free()


def test_evict_nothing_when_not_positive(make_cache, allocator):
    cache = make_cache()
    cache.insert(K([1]), allocator.alloc(1))
    assert cache.evict(0) == EvictResult(full_evicted=0)
    assert cache.evict(-5) == EvictResult(full_evicted=0)
    assert allocator.free_calls == [] and cache.total_size() == 1


def test_evict_locked_parent_with_unlocked_leaf(make_cache, allocator):
    cache = make_cache()
    upper = cache.insert(K([1, 2]), allocator.alloc(2)).last_node
    leaf = cache.insert(K([1, 2, 3]), allocator.alloc(3)).last_node
    cache.inc_lock_ref(upper)
    assert state(cache) == (1, 2, 3)
    assert cache.evict(10).full_evicted == 1
    assert leaf.evicted and not upper.evicted
    cache.dec_lock_ref(upper)
    cache.reset()


def test_evicted_handle_is_stale(make_cache, allocator):
    cache = make_cache()
    leaf = cache.insert(K([1, 2]), allocator.alloc(2)).last_node
    cache.evict(1)
    assert leaf.evicted and leaf.id == 1
    before = state(cache)
    with pytest.raises(StaleNodeError):
        cache.inc_lock_ref(leaf)
    with pytest.raises(StaleNodeError):
        cache.dec_lock_ref(leaf)
    assert state(cache) == before
    # A new node with the same tokens is a new node.
    assert cache.insert(K([1, 2]), allocator.alloc(2)).last_node.id == 2


# ---------------------------------------------------------------- locks


def test_lock_moves_tokens_along_the_path(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    cache.insert(K([1, 2, 3]), i32([1, 2, 3]))
    leaf = cache.insert(K([1, 2, 3, 4, 5]), i32([1, 2, 3, 4, 5])).last_node
    other = cache.insert(K([9]), i32([9])).last_node
    assert cache.inc_lock_ref(leaf) is None
    assert (leaf.lock_ref, leaf.parent.lock_ref, other.lock_ref) == (1, 1, 0)
    assert state(cache) == (1, 5, 6)
    cache.inc_lock_ref(leaf)
    assert (leaf.lock_ref, leaf.parent.lock_ref) == (2, 2) and state(cache) == (1, 5, 6)
    cache.dec_lock_ref(leaf)
    assert state(cache) == (1, 5, 6)
    cache.dec_lock_ref(leaf)
    assert (leaf.lock_ref, leaf.parent.lock_ref) == (0, 0) and state(cache) == (6, 0, 6)
    assert cache.match_prefix(K([9])).last_node.last_access_time == 4  # locks do not tick
    cache._check_invariants()


def test_unlock_unlocked_raises_and_changes_nothing(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    leaf = cache.insert(K([1, 2]), i32([1, 2])).last_node
    with pytest.raises(LockStateError):
        cache.dec_lock_ref(leaf)
    assert leaf.lock_ref == 0 and state(cache) == (2, 0, 2)
    cache.inc_lock_ref(leaf)
    cache.dec_lock_ref(leaf)
    with pytest.raises(LockStateError):
        cache.dec_lock_ref(leaf)
    assert leaf.lock_ref == 0 and state(cache) == (2, 0, 2)


def test_lock_on_root_is_noop(make_cache):
    cache = make_cache()
    assert cache.inc_lock_ref(cache.root_node) is None
    cache.dec_lock_ref(cache.root_node)
    cache.dec_lock_ref(cache.root_node)
    assert cache.root_node.lock_ref == 0 and state(cache) == (0, 0, 0)


def test_split_of_locked_node_keeps_sizes(make_cache):
    cache = make_cache(page_size=2, token_to_kv_pool_allocator=None)
    leaf = cache.insert(K([1, 2, 3, 4]), i32([1, 2, 3, 4])).last_node
    cache.inc_lock_ref(leaf)
    upper = cache.match_prefix(K([1, 2])).last_node
    assert upper.lock_ref == 1 and state(cache) == (0, 4, 4)
    cache.dec_lock_ref(leaf)
    assert (upper.lock_ref, leaf.lock_ref) == (0, 0) and state(cache) == (4, 0, 4)
    cache._check_invariants()


# ---------------------------------------------------------------- reset


def test_reset_frees_everything_in_one_call(make_cache, allocator):
    cache = make_cache()
    cache.reset()
    assert allocator.free_calls == []
    leaf = cache.insert(K([1, 2, 3]), allocator.alloc(3)).last_node
    cache.insert(K([1, 2, 4]), allocator.alloc(3))
    cache.inc_lock_ref(leaf)
    allocator.free(np.asarray([4, 5], dtype=np.int32))  # duplicates of the second insert
    cache.reset()
    assert len(allocator.free_calls) == 2
    assert sorted(allocator.free_calls[1].tolist()) == [1, 2, 3, 6]
    allocator.assert_all_free()
    assert state(cache) == (0, 0, 0) and make_cache.evicted_ids == []
    assert cache.match_prefix(K([1, 2, 3])).prefix_len == 0
    cache._check_invariants()


# ---------------------------------------------------------------- hashes


def test_compute_node_hash_chains_pages(make_cache):
    cache = make_cache(page_size=2, token_to_kv_pool_allocator=None)
    leaf = cache.insert(K([1, 2, 3, 4, 5, 6]), i32([1, 2, 3, 4, 5, 6])).last_node
    h1 = hash_token_ids([1, 2])
    h2 = hash_token_ids([3, 4], h1)
    h3 = hash_token_ids([5, 6], h2)
    assert cache.compute_node_hash(leaf) == [h1, h2, h3]
    upper = cache.match_prefix(K([1, 2, 3, 4, 9, 9])).last_node
    assert cache.compute_node_hash(upper) == [h1, h2]
    assert cache.compute_node_hash(leaf) == [h3]
    other = cache.insert(K([1, 2, 3, 4, 7, 7]), i32([1, 2, 3, 4, 7, 7])).last_node
    assert cache.compute_node_hash(other) == [hash_token_ids([7, 7], h2)]


def test_compute_node_hash_tuple_tokens(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    leaf = cache.insert(K([(1, 2), (3, 4)], "e"), i32([1, 2])).last_node
    h1 = hash_token_ids([(1, 2)])
    assert cache.compute_node_hash(leaf) == [h1, hash_token_ids([(3, 4)], h1)]
    assert h1 == hash_token_ids([1, 2])


# ---------------------------------------------------------------- bad input


BAD_KEYS = [
    pytest.param(K([1, -1]), InvalidKeyError, id="negative-token"),
    pytest.param(K([1, 2**32]), InvalidKeyError, id="token-2**32"),
    pytest.param(K([1, 2.0]), InvalidKeyError, id="float-token"),
    pytest.param(K(np.array([1.0, 2.0])), InvalidKeyError, id="float-array"),
    pytest.param(K(np.array([[1, 2], [3, 4]])), InvalidKeyError, id="2d-array"),
    pytest.param(K(np.array([1, -1], dtype=np.int64)), InvalidKeyError, id="negative-array"),
    pytest.param(K(np.array([2**32], dtype=np.int64)), InvalidKeyError, id="array-2**32"),
    pytest.param(K([(1, 2), (3,)]), InvalidKeyError, id="mixed-arity"),
    pytest.param(K([(1, 2), 3]), InvalidKeyError, id="tuple-then-int"),
    pytest.param(K([1, (2, 3)]), InvalidKeyError, id="int-then-tuple"),
    pytest.param(K([(1, -2)]), InvalidKeyError, id="negative-in-tuple"),
]


@pytest.mark.parametrize(("key", "error"), BAD_KEYS)
def test_bad_keys_raise_and_change_nothing(make_cache, allocator, key, error):
    cache = make_cache(page_size=1)
    cache.insert(K([1, 2]), allocator.alloc(2))
    before = state(cache)
    with pytest.raises(error):
        cache.match_prefix(key)
    with pytest.raises(error):
        cache.insert(key, np.arange(len(key), dtype=np.int32))
    assert state(cache) == before
    probe = cache.insert(K([5]), allocator.alloc(1)).last_node
    assert probe.id == 2 and probe.last_access_time == 2  # no id, no clock tick was used
    cache._check_invariants()


BAD_VALUES = [
    pytest.param(K([1, 2, 3]), [1, 2], id="too-short"),
    pytest.param(K([1, 2, 3]), [1, 2, 3, 4], id="too-long"),
    pytest.param(K([1, 2]), [1, -1], id="negative"),
    pytest.param(K([1, 2]), np.array([1.0, 2.0]), id="float-array"),
    pytest.param(K([1, 2]), np.array([[1, 2]]), id="2d-array"),
    pytest.param(K([(1, 2), (3, 4)]), None, id="none-with-tuple-key"),
    pytest.param(K([1]), [], id="empty-for-one-token"),
    pytest.param(K([1, 2]), [1, 2.5], id="float-in-list"),
    pytest.param(K([1, 2]), [1, 2**31], id="index-2**31"),
    pytest.param(K([1, 2]), np.array([1, 2**31], dtype=np.int64), id="array-index-2**31"),
    pytest.param(K([1, 2**31]), None, id="none-token-2**31"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_values_raise_and_change_nothing(make_cache, key, value):
    cache = make_cache(token_to_kv_pool_allocator=None)
    cache.insert(K([1, 2, 3]), i32([7, 8, 9]))
    before = state(cache)
    with pytest.raises(InvalidValueError):
        cache.insert(key, value)
    assert state(cache) == before
    m = cache.match_prefix(K([1, 2, 3]))
    assert m.indices.tolist() == [7, 8, 9] and m.last_node.last_access_time == 2
    assert cache.insert(K([4]), i32([4])).last_node.id == 2


def test_bad_value_prevents_split(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    leaf = cache.insert(K([1, 2, 3, 4]), i32([1, 2, 3, 4])).last_node
    with pytest.raises(InvalidValueError):
        cache.insert(K([1, 2, 9]), [1, 2])
    assert toks(leaf) == [1, 2, 3, 4] and leaf.parent == cache.root_node
    cache._check_invariants()


def test_errors_are_value_errors():
    assert issubclass(InvalidKeyError, ValueError)
    assert issubclass(InvalidValueError, ValueError)
    assert issubclass(StaleNodeError, ValueError)
    assert issubclass(LockStateError, ValueError)


def test_key_must_be_radix_key(make_cache):
    cache = make_cache()
    with pytest.raises(TypeError):
        cache.match_prefix([1, 2, 3])
    with pytest.raises(TypeError):
        cache.insert([1, 2, 3], i32([1, 2, 3]))
    assert state(cache) == (0, 0, 0)
    assert cache.insert(K([1]), i32([1])).last_node.last_access_time == 1


_TOKENS_SLOT = RadixKey.__dict__["token_ids"]  # RadixKey's own slots (member descriptors)
_EXTRA_SLOT = RadixKey.__dict__["extra_key"]


class _ShiftedKey(RadixKey):
    """A RadixKey subclass serving its fields through properties: it stores the tokens and
    the namespace given, and the cache must see them as the properties give them."""

    __slots__ = ()

    @property  # type: ignore[override]
    def token_ids(self) -> list[int]:
        return [t + 1 for t in _TOKENS_SLOT.__get__(self)]

    @token_ids.setter
    def token_ids(self, value: Any) -> None:
        _TOKENS_SLOT.__set__(self, value)

    @property  # type: ignore[override]
    def extra_key(self) -> Any:
        return ("shifted", _EXTRA_SLOT.__get__(self))

    @extra_key.setter
    def extra_key(self, value: Any) -> None:
        _EXTRA_SLOT.__set__(self, value)


def test_radix_key_subclass_fields_are_read_through_its_attributes(make_cache):
    cache = make_cache()
    assert cache.insert(_ShiftedKey([1, 2, 3], "a"), i32([7, 8, 9])).prefix_len == 0
    m = cache.match_prefix(K([2, 3, 4], ("shifted", "a")))
    assert (m.prefix_len, m.indices.tolist()) == (3, [7, 8, 9])
    assert cache.match_prefix(K([1, 2, 3], "a")).prefix_len == 0
    assert cache.match_prefix(_ShiftedKey([1, 2], "a")).prefix_len == 2


@pytest.mark.parametrize("field", ["token_ids", "extra_key"])
def test_radix_key_with_a_deleted_field_raises_and_changes_nothing(make_cache, field):
    cache = make_cache()
    cache.insert(K([1, 2]), i32([1, 2]))
    key = K([1, 2, 3])
    delattr(key, field)
    before = state(cache)
    with pytest.raises(AttributeError):
        cache.match_prefix(key)
    with pytest.raises(AttributeError):
        cache.insert(key, i32([1, 2, 3]))
    assert state(cache) == before
    assert cache.match_prefix(K([1, 2, 3])).prefix_len == 2


# ---------------------------------------------------------------- handles and edge cases


def test_reset_leaves_a_fresh_tree_and_stale_handles(make_cache, allocator):
    cache = make_cache()
    leaf = cache.insert(K([1, 2]), allocator.alloc(2)).last_node
    cache.match_prefix(K([1, 2]))
    cache.reset()
    assert leaf.evicted
    with pytest.raises(StaleNodeError):
        cache.inc_lock_ref(leaf)
    with pytest.raises(StaleNodeError):
        cache.compute_node_hash(leaf)
    root = cache.root_node
    assert root.id == 0 and not root.evicted
    # Indistinguishable from a fresh cache but for the ids: the root was never touched.
    assert (root.lock_ref, root.hit_count, root.last_access_time) == (0, 0, 0)
    assert cache.insert(K([1, 2]), allocator.alloc(2)).last_node.id == 2
    cache.reset()
    allocator.assert_all_free()


def test_foreign_and_wrong_handles(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    other = make_cache(token_to_kv_pool_allocator=None)
    foreign = other.insert(K([1]), i32([1])).last_node
    cache.insert(K([1]), i32([1]))
    with pytest.raises(StaleNodeError):
        cache.inc_lock_ref(foreign)
    with pytest.raises(StaleNodeError):
        cache.dec_lock_ref(foreign)
    with pytest.raises(TypeError):
        cache.inc_lock_ref("node 1")
    with pytest.raises(TypeError):
        cache.dec_lock_ref(None)
    assert foreign.lock_ref == 0 and state(cache) == (1, 0, 1)
    assert cache.compute_node_hash(cache.root_node) == []


def test_insert_empty_key(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    res = cache.insert(K([]), [])
    assert res.prefix_len == 0 and res.last_node.id == 0
    res = cache.insert(K(np.zeros(0, dtype=np.int64)))
    assert res.prefix_len == 0 and res.last_node.id == 0
    assert cache.insert(K([3]), [3]).last_node.last_access_time == 3


def test_value_none_with_numpy_key(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    leaf = cache.insert(K(np.array([7, 8, 9], dtype=np.int32))).last_node
    assert vals(leaf) == [7, 8, 9] and toks(leaf) == [7, 8, 9]


def test_pretty_print_runs(make_cache, capsys):
    cache = make_cache(token_to_kv_pool_allocator=None)
    cache.insert(K([1, 2, 3]), [1, 2, 3])
    cache.insert(K([1, 2, 4], "ns"), [1, 2, 4])
    cache.pretty_print()
    assert capsys.readouterr().out


def test_unlock_through_an_ancestor_is_refused(make_cache):
    """Locks held on a leaf pin its ancestors, but an ancestor's lock_ref that is all its
    descendants' cannot be undone there: that unlock would strand the leaf's lock (its own
    unlock then failing on the unlocked ancestor, its slots protected until a reset). It
    raises and changes nothing; the leaf's own unlock then releases everything."""
    cache = make_cache(token_to_kv_pool_allocator=None)
    cache.insert(K([1, 2, 3]), i32([1, 2, 3]))
    leaf = cache.insert(K([1, 2, 3, 4]), i32([1, 2, 3, 4])).last_node
    parent = leaf.parent
    cache.inc_lock_ref(leaf)
    with pytest.raises(LockStateError, match="descendants"):
        cache.dec_lock_ref(parent)
    assert (parent.lock_ref, leaf.lock_ref) == (1, 1) and state(cache) == (0, 4, 4)
    cache._check_invariants()
    cache.inc_lock_ref(parent)  # a lock of the parent's own: undone there
    cache.dec_lock_ref(parent)
    cache.dec_lock_ref(leaf)
    assert (parent.lock_ref, leaf.lock_ref) == (0, 0) and state(cache) == (4, 0, 4)
    cache._check_invariants()
    with pytest.raises(LockStateError, match=r"no lock|not locked"):
        cache.dec_lock_ref(leaf)


def test_unhashable_extra_key_raises_and_changes_nothing(make_cache):
    cache = make_cache(token_to_kv_pool_allocator=None)
    cache.insert(K([1]), [1])
    with pytest.raises(TypeError):
        cache.match_prefix(K([1], ["not", "hashable"]))
    with pytest.raises(TypeError):
        cache.insert(K([1], {}), [1])
    assert state(cache) == (1, 0, 1)
    assert cache.insert(K([2]), [2]).last_node.last_access_time == 2


@pytest.mark.parametrize("dtype", ["<i4", ">i4", "<i8", ">i8", "<u4", "<u8"])
def test_strided_and_byteswapped_arrays(make_cache, dtype):
    cache = make_cache(token_to_kv_pool_allocator=None)
    base = np.arange(20, dtype=dtype)
    key, value = base[::2], base[1::2]  # not contiguous
    leaf = cache.insert(K(key), value).last_node
    assert toks(leaf) == list(range(0, 20, 2)) and vals(leaf) == list(range(1, 20, 2))
    assert cache.match_prefix(K(base[::2][:4])).indices.tolist() == [1, 3, 5, 7]
    bad = np.arange(4, dtype=dtype)[::2].copy()
    if bad.dtype.kind == "i":
        bad = (bad - 1)[::-1]  # [1, -1], a negative-stride view
        with pytest.raises(InvalidKeyError):
            cache.match_prefix(K(bad))
        with pytest.raises(InvalidValueError):
            cache.insert(K([5, 6]), bad)
    assert state(cache) == (10, 0, 10)
