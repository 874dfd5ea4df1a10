"""Hand-computed tests of ``RadixCache(sliding_window_size=W)``, run against both
implementations.

The ``make_cache`` fixture below is parametrized (through conftest's ``impl``) over the
pure-Python reference model ``RefSWARadixCache`` and the compiled ``RadixCache``: every
expectation is worked out by hand from the written semantics (see the docstring of
``tests/reference_swa.py``), so both must meet it. The window is 4 tokens
throughout; page sizes 1 and 2.

Values are literal slot numbers (token t usually gets slot 100 + t, a second request's
fresh slots 200 + t); the pool is a ``RecordingSWAAllocator`` with slots 1..999 handed out
up front, so a double free of either side raises. ``tree(cache)`` shows every node as
``id: (parent id, tokens, slots, tombstone?)``; node ids are part of the contract.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import RecordingAllocator, RecordingSWAAllocator
from reference_swa import RefSWARadixCache, SWATreeNode

from pymllm.mem_cache import RadixCache, RadixKey
from pymllm.mem_cache import TreeNode as CompiledTreeNode
from pymllm.mem_cache.base_prefix_cache import EvictResult
from pymllm.mem_cache.errors import InvalidValueError, LockStateError, StaleNodeError

W = 4
CLASSES = {"ref": (RefSWARadixCache, SWATreeNode), "compiled": (RadixCache, CompiledTreeNode)}


def K(tokens: Any, extra_key: Any = None) -> RadixKey:
    return RadixKey(list(tokens), extra_key)


def slots(*ranges: Any) -> list[int]:
    """Concatenated slot numbers: ints and ranges."""
    out: list[int] = []
    for r in ranges:
        out.extend([r] if isinstance(r, int) else r)
    return out


def sizes(cache: Any) -> tuple[int, int, int, int]:
    """(evictable, protected, swa_evictable, swa_protected)."""
    assert cache.total_size() == cache.evictable_size() + cache.protected_size()
    return (
        cache.evictable_size(),
        cache.protected_size(),
        cache.swa_evictable_size(),
        cache.swa_protected_size(),
    )


def _tok(t: Any) -> Any:
    return tuple(int(e) for e in t) if isinstance(t, tuple) else int(t)


def _nodes(cache: Any) -> list[Any]:
    return cache._nodes() if isinstance(cache, RadixCache) else cache._iter_nodes()


def tree(cache: Any) -> dict[int, tuple[int, list[Any], list[int], bool]]:
    return {
        n.id: (
            n.parent.id,
            [_tok(t) for t in n.key.token_ids],
            np.asarray(n.value).tolist(),
            bool(n.swa_tombstone),
        )
        for n in _nodes(cache)
    }


def locks(cache: Any) -> dict[int, tuple[int, int]]:
    """id -> (lock_ref, swa_lock_ref) of every node that holds a lock."""
    return {n.id: (n.lock_ref, n.swa_lock_ref) for n in _nodes(cache) if n.lock_ref}


def node(cache: Any, node_id: int) -> Any:
    (found,) = [n for n in _nodes(cache) if n.id == node_id]
    return found


def match(cache: Any, tokens: Any) -> tuple[int, int, list[int]]:
    """(prefix_len, last_node id, indices), after checking that they agree."""
    m = cache.match_prefix(K(tokens))
    assert isinstance(m.indices, np.ndarray) and m.indices.dtype == np.int32
    assert len(m.indices) == m.prefix_len
    if m.prefix_len:
        assert m.last_node.value.tolist() == m.indices[-len(m.last_node.value) :].tolist()
    else:
        assert m.last_node.id == 0
    return m.prefix_len, m.last_node.id, m.indices.tolist()


@pytest.fixture
def pool() -> RecordingSWAAllocator:
    p = RecordingSWAAllocator()
    p.alloc(999)
    return p


@pytest.fixture
def make_cache(impl: str, pool: RecordingSWAAllocator) -> Callable[..., Any]:
    """Factory for a windowed cache of the parametrized implementation (window 4);
    ``evicted_ids`` collects every ``on_node_evict`` call."""
    cls = CLASSES[impl][0]

    def make(page_size: int = 1, **kwargs: Any) -> Any:
        kwargs.setdefault("sliding_window_size", W)
        kwargs.setdefault("token_to_kv_pool_allocator", pool)
        kwargs.setdefault("on_node_evict", make.evicted_ids.append)
        return cls(page_size=page_size, **kwargs)

    make.evicted_ids = []  # type: ignore[attr-defined]
    return make


# ---------------------------------------------------------------- construction


def test_fresh_cache(make_cache, impl):
    cache = make_cache(page_size=2)
    assert cache.sliding_window_size == W and cache.page_size == 2
    root = cache.root_node
    assert isinstance(root, CLASSES[impl][1])
    assert root.id == 0 and not root.swa_tombstone and root.swa_lock_ref == 0
    assert sizes(cache) == (0, 0, 0, 0)
    assert cache.inc_lock_ref(root) is None  # the root: a no-op with no boundary
    cache.dec_lock_ref(root)
    cache._check_invariants()


@pytest.mark.parametrize("token", [0, 3, "3"])
def test_root_unlock_refuses_a_token_it_never_gave(make_cache, token):
    # inc_lock_ref(root) gives None; another node's boundary passed for the root is a
    # scheduler's mix-up, refused as it is without a window
    cache = make_cache()
    cache.insert(RadixKey([1, 2, 3, 4]))
    before = sizes(cache)
    with pytest.raises(LockStateError, match="root"):
        cache.dec_lock_ref(cache.root_node, token)
    assert sizes(cache) == before
    cache._check_invariants()


@pytest.mark.parametrize("bad", [0, -1, True, 4.0, "4"])
def test_window_must_be_a_positive_int(impl, pool, bad):
    with pytest.raises(ValueError):
        CLASSES[impl][0](sliding_window_size=bad, token_to_kv_pool_allocator=pool)


def test_window_needs_an_allocator_with_free_swa(impl):
    with pytest.raises(TypeError):
        CLASSES[impl][0](sliding_window_size=W, token_to_kv_pool_allocator=RecordingAllocator())
    CLASSES[impl][0](sliding_window_size=W)  # no allocator at all is allowed


def test_no_allocator(impl):
    cache = CLASSES[impl][0](sliding_window_size=W)
    cache.insert(K([1, 2, 3]), [101, 102, 103])
    cache.insert(K([1, 2, 3, 4, 5]), [201, 202, 203, 204, 205])  # duplicates: no one to free
    assert cache.evict(0, 1) == EvictResult(full_evicted=0, swa_evicted=3)
    assert cache.evict(10) == EvictResult(full_evicted=5, swa_evicted=2)
    cache.reset()
    cache._check_invariants()


# ---------------------------------------------------------------- insert


def test_insert_without_tombstones_is_plain_radix(make_cache, pool):
    cache = make_cache()
    r = cache.insert(K(range(1, 9)), slots(range(101, 109)))
    assert (r.prefix_len, r.last_node.id) == (0, 1)
    assert tree(cache) == {1: (0, list(range(1, 9)), slots(range(101, 109)), False)}
    assert sizes(cache) == (8, 0, 8, 0)
    assert match(cache, range(1, 12)) == (8, 1, slots(range(101, 109)))
    assert pool.calls == []
    cache._check_invariants()


@pytest.mark.parametrize(("page_size", "evicted_seqlen"), [(1, 3), (2, 3), (2, 4)])
def test_insert_below_swa_evicted_seqlen_is_a_tombstone(
    make_cache, pool, page_size, evicted_seqlen
):
    """Tokens below swa_evicted_seqlen (rounded up to a page) go in as a tombstone, the rest
    as a live leaf under it."""
    cache = make_cache(page_size)
    r = cache.insert(K(range(1, 9)), slots(range(101, 109)), swa_evicted_seqlen=evicted_seqlen)
    t = 3 if page_size == 1 else 4  # page 2: 3 rounds up to 4
    assert (r.prefix_len, r.last_node.id) == (0, 2)
    assert tree(cache) == {
        1: (0, list(range(1, t + 1)), slots(range(101, 101 + t)), True),
        2: (1, list(range(t + 1, 9)), slots(range(101 + t, 109)), False),
    }
    assert sizes(cache) == (8, 0, 8 - t, 0)
    assert pool.calls == []
    # at least W live tokens follow the tombstone: the whole key is usable
    assert match(cache, range(1, 9)) == (8, 2, slots(range(101, 109)))
    cache._check_invariants()


@pytest.mark.parametrize("page_size", [1, 2])
def test_suffix_wholly_below_swa_evicted_seqlen_is_freed(make_cache, pool, page_size):
    cache = make_cache(page_size)
    cache.insert(K([1, 2, 3, 4]), [101, 102, 103, 104])
    value = [101, 102, 103, 104, 205, 206, 207, 208]
    r = cache.insert(K(range(1, 9)), value, prev_prefix_len=4, swa_evicted_seqlen=8)
    assert (r.prefix_len, r.last_node.id) == (4, 1)
    assert tree(cache) == {1: (0, [1, 2, 3, 4], [101, 102, 103, 104], False)}
    assert pool.calls == [("free", [205, 206, 207, 208])]
    # the same without prev_prefix_len: the tree's own slots handed back are not freed
    r = cache.insert(K(range(1, 10)), [*value[:4], 305, 306, 307, 308, 309], swa_evicted_seqlen=99)
    assert (r.prefix_len, r.last_node.id) == (4, 1)
    aligned_tail = [305, 306, 307, 308] + ([309] if page_size == 1 else [])
    assert pool.calls[1:] == [("free", aligned_tail)]  # 309 is a partial page at page 2
    assert sizes(cache) == (4, 0, 4, 0)
    cache._check_invariants()


def test_uncached_suffix_in_a_new_namespace_leaves_no_trace(make_cache, pool):
    """Nothing cached in a new namespace: no namespace id stays behind either (the
    compiled cache's invariant check counts them)."""
    cache = make_cache()
    r = cache.insert(K([1, 2], "lora-7"), [101, 102], swa_evicted_seqlen=2)
    assert (r.prefix_len, r.last_node.id) == (0, 0)
    assert pool.calls == [("free", [101, 102])]
    assert tree(cache) == {} and sizes(cache) == (0, 0, 0, 0)
    cache._check_invariants()


def test_new_suffix_straddling_swa_evicted_seqlen_page2(make_cache, pool):
    cache = make_cache(page_size=2)
    cache.insert(K([1, 2, 3, 4]), [101, 102, 103, 104])
    r = cache.insert(
        K(range(1, 11)), slots(range(101, 111)), prev_prefix_len=4, swa_evicted_seqlen=5
    )
    assert (r.prefix_len, r.last_node.id) == (4, 3)
    assert tree(cache) == {
        1: (0, [1, 2, 3, 4], [101, 102, 103, 104], False),
        2: (1, [5, 6], [105, 106], True),  # 5 rounds up to 6
        3: (2, [7, 8, 9, 10], [107, 108, 109, 110], False),
    }
    assert sizes(cache) == (10, 0, 8, 0)
    assert pool.calls == []
    cache._check_invariants()


def test_insert_revives_a_tombstone_at_or_beyond_swa_evicted_seqlen(make_cache, pool):
    cache = make_cache()
    cache.insert(K(range(1, 9)), slots(range(101, 109)), swa_evicted_seqlen=4)
    # fresh slots for every position, nothing evicted on the request's side
    r = cache.insert(K(range(1, 9)), slots(range(201, 209)))
    assert (r.prefix_len, r.last_node.id) == (8, 2)
    assert tree(cache) == {
        1: (0, [1, 2, 3, 4], [201, 202, 203, 204], False),  # revived with the new slots
        2: (1, [5, 6, 7, 8], [105, 106, 107, 108], False),
    }
    # the duplicates of the live node, then (once the tree holds the new slots) the
    # tombstone's old ones
    assert pool.calls == [("free", slots(range(205, 209))), ("free", slots(range(101, 105)))]
    assert sizes(cache) == (8, 0, 8, 0)
    cache._check_invariants()


def test_locked_tombstone_is_not_revived(make_cache, pool):
    """A request that matched through a tombstone still reads its full KV: another
    request's insert must not revive it (which would free those slots under the first
    request); its incoming duplicates are freed instead. Two requests as a scheduler runs
    them."""
    cache = make_cache()
    cache.insert(K(range(1, 9)), slots(range(101, 109)), swa_evicted_seqlen=4)
    a = cache.match_prefix(K(range(1, 9)))  # request A: 4 live tokens after the tombstone
    assert a.prefix_len == 8 and a.indices.tolist() == slots(range(101, 109))
    assert cache.inc_lock_ref(a.last_node) == 4
    # request B shares the tombstone but only 2 live tokens after it: no usable prefix
    key_b = [1, 2, 3, 4, 5, 6, 90, 91]
    assert match(cache, key_b) == (0, 0, [])
    r = cache.insert(K(key_b), slots(range(201, 209)), prev_prefix_len=0)
    assert (r.prefix_len, r.last_node.id) == (6, 4)
    assert tree(cache)[1] == (0, [1, 2, 3, 4], [101, 102, 103, 104], True)  # still A's
    assert pool.calls == [("free", [201, 202, 203, 204, 205, 206])]
    assert locks(cache) == {1: (1, 0), 3: (1, 1), 2: (1, 1)}
    cache.dec_lock_ref(a.last_node, 4)
    cache._check_invariants()
    # unlocked now: the next such insert revives it
    r = cache.insert(K(key_b), slots(range(301, 309)), prev_prefix_len=0)
    assert tree(cache)[1] == (0, [1, 2, 3, 4], [301, 302, 303, 304], False)
    # the duplicates, then the revived tombstone's old slots
    assert pool.calls[1:] == [("free", [305, 306, 307, 308]), ("free", [101, 102, 103, 104])]
    cache._check_invariants()


def test_insert_keeps_a_tombstone_below_swa_evicted_seqlen_or_sharing_a_slot(make_cache, pool):
    cache = make_cache()
    cache.insert(K(range(1, 9)), slots(range(101, 109)), swa_evicted_seqlen=4)
    # the tombstone starts at 0 < 1: the incoming duplicates are freed instead
    r = cache.insert(K(range(1, 9)), slots(range(201, 209)), swa_evicted_seqlen=1)
    assert r.prefix_len == 8
    assert pool.calls == [("free", slots(range(201, 209)))]
    # one incoming slot is the tombstone's own: it is the tree's, so no revival; only the
    # differing ones are freed
    r = cache.insert(K(range(1, 9)), slots(101, range(302, 305), range(305, 309)))
    assert r.prefix_len == 8
    assert pool.calls[1:] == [("free", slots(range(302, 309)))]
    assert tree(cache) == {
        1: (0, [1, 2, 3, 4], [101, 102, 103, 104], True),
        2: (1, [5, 6, 7, 8], [105, 106, 107, 108], False),
    }
    assert sizes(cache) == (8, 0, 4, 0)
    cache._check_invariants()


def test_prev_prefix_len_is_left_alone_and_splits_the_node_it_ends_in(make_cache, pool):
    cache = make_cache()
    cache.insert(K([1, 2]), [101, 102])
    cache.insert(K(range(1, 9)), slots(range(101, 109)))  # clock 2
    # value[:4] is the caller's protected prefix: whatever it holds, it is not freed
    value = [9, 9, 9, 9, 205, 206, 207, 208]
    r = cache.insert(K(range(1, 9)), value, prev_prefix_len=4)  # clock 3
    assert (r.prefix_len, r.last_node.id) == (8, 2)
    assert tree(cache) == {
        1: (0, [1, 2], [101, 102], False),
        3: (1, [3, 4], [103, 104], False),  # split off at prev_prefix_len
        2: (3, [5, 6, 7, 8], [105, 106, 107, 108], False),
    }
    assert pool.calls == [("free", [205, 206, 207, 208])]
    assert [node(cache, i).last_access_time for i in (1, 3, 2)] == [3, 3, 3]
    assert [node(cache, i).hit_count for i in (1, 3, 2)] == [0, 0, 0]
    cache._check_invariants()


def test_prev_prefix_len_must_be_cached(make_cache, pool):
    """value[:prev_prefix_len] is the caller's matched prefix: if the tree does not hold
    those tokens, the call is refused before any index changes hands."""
    cache = make_cache()
    with pytest.raises(InvalidValueError, match="holds only 0 tokens of this key"):
        cache.insert(K(range(1, 9)), slots(range(101, 109)), prev_prefix_len=4)
    cache.insert(K([1, 2]), [101, 102])
    with pytest.raises(InvalidValueError, match="holds only 2 tokens of this key"):
        cache.insert(K(range(1, 9)), slots(range(101, 109)), prev_prefix_len=4)
    with pytest.raises(InvalidValueError, match="prev_prefix_len: 2, but the tree holds"):
        cache.insert(K(range(1, 9), "x"), slots(range(101, 109)), prev_prefix_len=2)
    assert pool.calls == []
    assert sizes(cache)[:1] == (2,)
    cache._check_invariants()


def test_insert_of_less_than_a_page_ticks_the_clock_and_frees_nothing(make_cache, pool):
    cache = make_cache(page_size=2)
    r = cache.insert(K([1]), [101], swa_evicted_seqlen=7)
    assert (r.prefix_len, r.last_node.id) == (0, 0)
    assert tree(cache) == {} and pool.calls == []
    cache.insert(K([1, 2]), [101, 102])
    assert node(cache, 1).last_access_time == 2


BAD_INSERTS = [
    ({"prev_prefix_len": 3}, InvalidValueError),  # not a whole page
    ({"prev_prefix_len": 10}, InvalidValueError),  # beyond the key
    ({"prev_prefix_len": -2}, InvalidValueError),
    ({"prev_prefix_len": True}, TypeError),
    ({"prev_prefix_len": 2.0}, TypeError),
    ({"swa_evicted_seqlen": -1}, InvalidValueError),
    ({"swa_evicted_seqlen": False}, TypeError),
    ({"swa_evicted_seqlen": "2"}, TypeError),
    ({"swa_evicted_seqlen": 1, "bogus": 1}, TypeError),
]


@pytest.mark.parametrize(("kwargs", "error"), BAD_INSERTS)
def test_bad_insert_changes_nothing(make_cache, pool, kwargs, error):
    cache = make_cache(page_size=2)
    cache.insert(K(range(1, 9)), slots(range(101, 109)), swa_evicted_seqlen=2)
    before = tree(cache), sizes(cache)
    with pytest.raises(error):
        cache.insert(K(range(1, 9)), slots(range(201, 209)), **kwargs)
    assert (tree(cache), sizes(cache)) == before
    assert pool.calls == []
    cache.match_prefix(K([1, 2]))
    assert node(cache, 1).last_access_time == 2  # the failed call did not tick the clock
    cache._check_invariants()


# ---------------------------------------------------------------- match


def test_match_crossing_a_tombstone_with_fewer_than_w_live_tokens(make_cache, pool):
    """Issue 3, case 1: the match stops before the tombstone."""
    cache = make_cache()
    cache.insert(K(range(1, 12)), slots(range(101, 112)), swa_evicted_seqlen=5)  # clock 1
    # a second request shares [1, 2]: the split-off upper tombstone is revived
    r = cache.insert(K([1, 2, 80]), [201, 202, 280])  # clock 2
    assert (r.prefix_len, r.last_node.id) == (2, 4)
    assert pool.calls == [("free", [101, 102])]
    assert tree(cache) == {
        3: (0, [1, 2], [201, 202], False),
        1: (3, [3, 4, 5], [103, 104, 105], True),
        2: (1, list(range(6, 12)), slots(range(106, 112)), False),
        4: (3, [80], [280], False),
    }
    assert sizes(cache) == (12, 0, 9, 0)
    # 3 live tokens after the tombstone: only [1, 2] is usable
    assert match(cache, [1, 2, 3, 4, 5, 6, 7, 8, 20]) == (2, 3, [201, 202])  # clock 3
    # ... but the walk went on: every walked node (and node 5, split off node 2) is touched
    assert tree(cache)[5] == (1, [6, 7, 8], [106, 107, 108], False)
    assert [node(cache, i).hit_count for i in (3, 1, 5, 2)] == [1, 1, 1, 0]
    assert [node(cache, i).last_access_time for i in (3, 1, 5, 2)] == [3, 3, 3, 1]
    # 4 live tokens after it: usable through the end of the match
    assert match(cache, range(1, 10)) == (9, 6, slots(201, 202, range(103, 110)))
    assert match(cache, [1, 2, 3]) == (2, 3, [201, 202])
    assert match(cache, [1, 2, 3, 4, 5]) == (2, 3, [201, 202])
    cache._check_invariants()


def test_match_crossing_a_tombstone_page2(make_cache, pool):
    """Issue 3, case 1, in pages of 2: the same cut, and a walk that splits at pages."""
    cache = make_cache(page_size=2)
    cache.insert(K(range(1, 13)), slots(range(101, 113)), swa_evicted_seqlen=5)  # 5 -> 6
    r = cache.insert(K([1, 2, 3, 4, 80, 81]), [201, 202, 203, 204, 280, 281])
    assert (r.prefix_len, r.last_node.id) == (4, 4)
    assert pool.calls == [("free", [101, 102, 103, 104])]
    assert tree(cache) == {
        3: (0, [1, 2, 3, 4], [201, 202, 203, 204], False),  # revived
        1: (3, [5, 6], [105, 106], True),
        2: (1, list(range(7, 13)), slots(range(107, 113)), False),
        4: (3, [80, 81], [280, 281], False),
    }
    # [7, 8, 9] matches 3 tokens of node 2, 2 in whole pages: 2 live tokens, cut back
    assert match(cache, [*range(1, 10), 20]) == (4, 3, [201, 202, 203, 204])
    assert tree(cache)[5] == (1, [7, 8], [107, 108], False)
    assert match(cache, range(1, 11)) == (10, 6, slots(range(201, 205), range(105, 111)))
    cache._check_invariants()


def test_live_count_restarts_at_every_tombstone(make_cache, pool):
    cache = make_cache()
    cache.insert(K([1, 2]), [101, 102])
    cache.insert(K(range(1, 9)), slots(range(101, 109)), swa_evicted_seqlen=3)
    cache.insert(K(range(1, 13)), slots(range(101, 113)), swa_evicted_seqlen=9)
    assert pool.calls == []  # every incoming slot was the tree's own or went into a node
    assert tree(cache) == {
        1: (0, [1, 2], [101, 102], False),
        2: (1, [3], [103], True),
        3: (2, [4, 5, 6, 7, 8], [104, 105, 106, 107, 108], False),
        4: (3, [9], [109], True),
        5: (4, [10, 11, 12], [110, 111, 112], False),
    }
    assert sizes(cache) == (12, 0, 10, 0)
    # after the second tombstone only 3 live tokens: cut back to the end of node 3
    assert match(cache, range(1, 13)) == (8, 3, slots(range(101, 109)))
    assert match(cache, [1, 2, 3, 4, 5, 6]) == (2, 1, [101, 102])
    cache._check_invariants()


@pytest.mark.parametrize("page_size", [1, 2])
def test_swa_eviction_of_an_internal_node_keeps_matches_with_w_live_tokens(
    make_cache, pool, page_size
):
    """Issue 3, case 2: the multi-turn shape, an earlier turn [1, 2] extended by a later
    one; equally recent, the older (smaller id) node goes first and, internal, is only
    tombstoned."""
    cache = make_cache(page_size)
    cache.insert(K([1, 2]), [101, 102])
    cache.insert(K(range(1, 9)), slots(range(101, 109)))
    assert cache.evict(0, 1) == EvictResult(full_evicted=0, swa_evicted=2)
    assert pool.calls == [("free_swa", [101, 102])]
    assert tree(cache) == {
        1: (0, [1, 2], [101, 102], True),
        2: (1, [3, 4, 5, 6, 7, 8], slots(range(103, 109)), False),
    }
    assert sizes(cache) == (8, 0, 6, 0)
    # full KV is all still there: 6 live tokens follow the tombstone
    assert match(cache, range(1, 9)) == (8, 2, slots(range(101, 109)))
    assert match(cache, range(1, 7)) == (6, 3, slots(range(101, 107)))  # 4 live: usable
    assert tree(cache)[3] == (1, [3, 4, 5, 6], [103, 104, 105, 106], False)
    # 3 live tokens (page 2: the walk stops at 4, 2 live): nothing usable
    assert match(cache, range(1, 6)) == (0, 0, [])
    assert match(cache, [1, 2]) == (0, 0, [])
    assert make_cache.evicted_ids == []
    cache._check_invariants()


def test_tuple_keys_page2(make_cache, pool):
    cache = make_cache(page_size=2)
    key = [(t, t) for t in range(1, 9)]
    cache.insert(K(key), slots(range(101, 109)), swa_evicted_seqlen=3)
    assert tree(cache) == {
        1: (0, key[:4], slots(range(101, 105)), True),
        2: (1, key[4:], slots(range(105, 109)), False),
    }
    assert match(cache, key) == (8, 2, slots(range(101, 109)))
    assert match(cache, key[:7]) == (0, 0, [])  # 2 live tokens after the tombstone
    assert cache.match_prefix(K(key, "other")).prefix_len == 0  # another namespace
    cache._check_invariants()


# ---------------------------------------------------------------- evict


def test_full_eviction_cascades_through_tombstoned_parents(make_cache, pool):
    """Issue 3, case 3: a tombstone left childless and unlocked goes at once."""
    cache = make_cache()
    cache.insert(K(range(1, 9)), slots(range(101, 109)), swa_evicted_seqlen=5)
    assert match(cache, [1, 2, 99]) == (0, 0, [])  # splits the tombstone: two in a row
    assert tree(cache) == {
        3: (0, [1, 2], [101, 102], True),
        1: (3, [3, 4, 5], [103, 104, 105], True),
        2: (1, [6, 7, 8], [106, 107, 108], False),
    }
    assert cache.evict(1) == EvictResult(full_evicted=8, swa_evicted=3)
    assert pool.calls == [("free", slots(range(106, 109), range(103, 106), 101, 102))]
    assert make_cache.evicted_ids == [2, 1, 3]
    assert tree(cache) == {} and sizes(cache) == (0, 0, 0, 0)
    cache._check_invariants()


def test_full_eviction_cascades_page2(make_cache, pool):
    cache = make_cache(page_size=2)
    cache.insert(K(range(1, 11)), slots(range(101, 111)), swa_evicted_seqlen=6)
    assert match(cache, [1, 2, 99, 98]) == (0, 0, [])
    assert tree(cache) == {
        3: (0, [1, 2], [101, 102], True),
        1: (3, [3, 4, 5, 6], [103, 104, 105, 106], True),
        2: (1, [7, 8, 9, 10], [107, 108, 109, 110], False),
    }
    assert cache.evict(1) == EvictResult(full_evicted=10, swa_evicted=4)
    assert pool.calls == [("free", slots(range(107, 111), range(103, 107), 101, 102))]
    assert make_cache.evicted_ids == [2, 1, 3]
    cache._check_invariants()


def test_cascade_stops_at_a_locked_tombstone_until_it_is_unlocked(make_cache, pool):
    cache = make_cache()
    cache.insert(K(range(1, 9)), slots(range(101, 109)), swa_evicted_seqlen=5)
    cache.match_prefix(K([1, 2, 99]))
    tomb = node(cache, 1)
    assert cache.inc_lock_ref(tomb) == 5  # a tombstone: no SWA lock, boundary at its end
    assert locks(cache) == {3: (1, 0), 1: (1, 0)}
    assert sizes(cache) == (3, 5, 3, 0)
    assert cache.evict(100) == EvictResult(full_evicted=3, swa_evicted=3)
    assert pool.calls == [("free", [106, 107, 108])]
    assert cache.evict(100) == EvictResult()  # a locked childless tombstone stays
    cache.dec_lock_ref(tomb, 5)
    assert cache.evict(1) == EvictResult(full_evicted=5, swa_evicted=0)
    assert pool.calls[1:] == [("free", [103, 104, 105, 101, 102])]
    assert make_cache.evicted_ids == [2, 1, 3]
    cache._check_invariants()


def test_cascade_stops_at_a_tombstone_with_another_child(make_cache, pool):
    cache = make_cache()
    cache.insert(K(range(1, 9)), slots(range(101, 109)), swa_evicted_seqlen=4)  # clock 1
    cache.insert(K([1, 2, 3, 4, 50, 51, 52, 53]), slots(range(101, 105), range(250, 254)))
    assert tree(cache)[3] == (1, [50, 51, 52, 53], [250, 251, 252, 253], False)
    assert cache.evict(1) == EvictResult(full_evicted=4, swa_evicted=4)  # node 2 (clock 1)
    assert pool.calls == [("free", [105, 106, 107, 108])]
    assert sorted(tree(cache)) == [1, 3]
    assert cache.evict(1) == EvictResult(full_evicted=8, swa_evicted=4)  # node 3, then 1
    assert pool.calls[1:] == [("free", slots(range(250, 254), range(101, 105)))]
    cache._check_invariants()


def test_swa_eviction_lru_order_ties_by_id(make_cache, pool):
    """Phase 2 takes live nodes by (last_access_time, id), internal nodes included: an
    unlocked leaf is removed whole, an internal node tombstoned. A split-off upper node
    [1, 2] has a smaller id than the sibling inserted with it, so it goes first."""
    cache = make_cache()
    cache.insert(K([1, 2, 3, 4]), [101, 102, 103, 104])  # clock 1
    cache.insert(K([1, 2, 5, 6]), [101, 102, 205, 206])  # clock 2: [1, 2] split off as node 2
    assert cache.evict(0, 1) == EvictResult(full_evicted=2, swa_evicted=2)  # node 1, clock 1
    assert pool.calls == [("free", [103, 104])]
    assert cache.evict(0, 1) == EvictResult(full_evicted=0, swa_evicted=2)  # node 2 < node 3
    assert pool.calls[1:] == [("free_swa", [101, 102])]
    assert tree(cache) == {2: (0, [1, 2], [101, 102], True), 3: (2, [5, 6], [205, 206], False)}
    assert match(cache, [1, 2, 5, 6]) == (0, 0, [])  # 2 live tokens after the tombstone
    assert make_cache.evicted_ids == [1]
    cache._check_invariants()


def test_swa_eviction_tombstones_then_removes_in_one_call(make_cache, pool):
    """A node tombstoned and then removed by the cascade in the same call is in both
    lists; free_swa goes first, while its full slots are still held."""
    cache = make_cache()
    cache.insert(K([1, 2, 3]), [101, 102, 103])
    cache.insert(K(range(1, 10)), slots(range(101, 110)))
    assert cache.evict(0, 4) == EvictResult(full_evicted=9, swa_evicted=9)
    assert pool.calls == [
        ("free_swa", [101, 102, 103]),
        ("free", slots(range(104, 110), range(101, 104))),
    ]
    assert make_cache.evicted_ids == [2, 1]
    assert sizes(cache) == (0, 0, 0, 0)
    cache._check_invariants()


def test_full_eviction_counts_toward_swa_num_tokens(make_cache, pool):
    cache = make_cache()
    cache.insert(K([1, 2, 3]), [101, 102, 103])
    cache.insert(K(range(1, 10)), slots(range(101, 110)))
    assert cache.evict(1, 6) == EvictResult(full_evicted=6, swa_evicted=6)
    assert pool.calls == [("free", slots(range(104, 110)))]  # no free_swa call
    assert tree(cache) == {1: (0, [1, 2, 3], [101, 102, 103], False)}
    cache._check_invariants()


def test_swa_eviction_skips_swa_locked_nodes(make_cache, pool):
    cache = make_cache()
    cache.insert(K([1, 2]), [101, 102])
    cache.insert(K(range(1, 9)), slots(range(101, 109)))
    leaf = node(cache, 2)
    assert cache.inc_lock_ref(leaf) == 2  # 6 >= W tokens locked in node 2 alone
    assert locks(cache) == {1: (1, 0), 2: (1, 1)}
    assert sizes(cache) == (0, 8, 2, 6)
    # node 1 is full-locked but not SWA-locked: it can lose its SWA KV
    assert cache.evict(0, 100) == EvictResult(full_evicted=0, swa_evicted=2)
    assert pool.calls == [("free_swa", [101, 102])]
    assert cache.evict(100, 100) == EvictResult()
    assert sizes(cache) == (0, 8, 0, 6)
    cache.dec_lock_ref(leaf, 2)
    assert sizes(cache) == (8, 0, 6, 0)
    assert cache.evict(0, 1) == EvictResult(full_evicted=8, swa_evicted=6)
    assert pool.calls[1:] == [("free", slots(range(103, 109), 101, 102))]
    cache._check_invariants()


@pytest.mark.parametrize("args", [("1",), (1.0,), (True,), (None,)])
def test_bad_evict_changes_nothing(make_cache, pool, args):
    cache = make_cache()
    cache.insert(K(range(1, 9)), slots(range(101, 109)))
    with pytest.raises(TypeError):
        cache.evict(*args)
    assert sizes(cache) == (8, 0, 8, 0) and pool.calls == []


@pytest.mark.parametrize("bad", ["1", 1.0, True, None])
def test_bad_swa_num_tokens_changes_nothing(make_cache, pool, bad):
    """Both counts are checked before anything is evicted."""
    cache = make_cache()
    cache.insert(K(range(1, 9)), slots(range(101, 109)))
    with pytest.raises(TypeError):
        cache.evict(5, bad)
    assert sizes(cache) == (8, 0, 8, 0) and pool.calls == []
    cache._check_invariants()


def test_reset_frees_everything_in_one_call(make_cache, pool):
    cache = make_cache()
    cache.insert(K([1, 2, 3]), [101, 102, 103])
    cache.insert(K(range(1, 10)), slots(range(101, 110)), swa_evicted_seqlen=5)
    cache.evict(0, 1)
    handle = node(cache, 2)
    cache.inc_lock_ref(handle)
    pool.calls.clear()
    cache.reset()
    assert [kind for kind, _ in pool.calls] == ["free"]
    assert sorted(pool.calls[0][1]) == slots(range(101, 110))
    assert sizes(cache) == (0, 0, 0, 0) and tree(cache) == {}
    assert handle.evicted
    with pytest.raises(StaleNodeError):
        cache.dec_lock_ref(handle)
    cache._check_invariants()


# ---------------------------------------------------------------- locks


def _chain(cache: Any) -> tuple[Any, Any, Any]:
    """Live nodes 1 = [1, 2], 2 = [3, 4, 5], 3 = [6 .. 11] in a chain."""
    cache.insert(K([1, 2]), [101, 102])
    cache.insert(K(range(1, 6)), slots(range(101, 106)))
    cache.insert(K(range(1, 12)), slots(range(101, 112)))
    return node(cache, 1), node(cache, 2), node(cache, 3)


def test_lock_unlock_with_boundaries_restores_every_counter(make_cache, pool):
    """Issue 3, case 4, with a split of locked nodes in between."""
    cache = make_cache()
    n1, n2, n3 = _chain(cache)
    start = sizes(cache)
    assert start == (11, 0, 11, 0)
    b3 = cache.inc_lock_ref(n3)
    assert b3 == 5  # node 3 alone holds 6 >= W tokens: the lock stops at its start
    assert locks(cache) == {1: (1, 0), 2: (1, 0), 3: (1, 1)}
    assert sizes(cache) == (0, 11, 5, 6)
    b2 = cache.inc_lock_ref(n2)
    assert b2 == 0  # 3 + 2 tokens: node 1 is SWA-locked too, the lock stops at position 0
    b1 = cache.inc_lock_ref(n1)
    assert b1 is None  # 2 tokens, then the root
    assert locks(cache) == {1: (3, 2), 2: (2, 1), 3: (1, 1)}
    assert sizes(cache) == (0, 11, 0, 11)
    # another request splits node 3: the upper half inherits both lock counts
    assert match(cache, range(1, 9)) == (8, 4, slots(range(101, 109)))
    assert locks(cache) == {1: (3, 2), 2: (2, 1), 4: (1, 1), 3: (1, 1)}
    assert sizes(cache) == (0, 11, 0, 11)
    cache.dec_lock_ref(n2, b2)
    cache.dec_lock_ref(n3, b3)
    cache.dec_lock_ref(n1, b1)
    assert locks(cache) == {}
    assert sizes(cache) == start
    assert pool.calls == []
    cache._check_invariants()


def test_lock_unlock_with_boundaries_page2(make_cache, pool):
    cache = make_cache(page_size=2)
    cache.insert(K([1, 2]), [101, 102])
    cache.insert(K(range(1, 7)), slots(range(101, 107)))
    cache.insert(K(range(1, 13)), slots(range(101, 113)))
    n1, n2, n3 = node(cache, 1), node(cache, 2), node(cache, 3)  # [1, 2], [3 .. 6], [7 .. 12]
    start = sizes(cache)
    assert cache.inc_lock_ref(n3) == 6
    assert cache.inc_lock_ref(n2) == 2  # node 2 alone holds W tokens
    assert cache.inc_lock_ref(n1) is None
    assert locks(cache) == {1: (3, 1), 2: (2, 1), 3: (1, 1)}
    assert sizes(cache) == (0, 12, 0, 12)
    assert match(cache, range(1, 10)) == (8, 4, slots(range(101, 109)))  # splits node 3
    assert locks(cache) == {1: (3, 1), 2: (2, 1), 4: (1, 1), 3: (1, 1)}
    cache.dec_lock_ref(n2, 2)
    cache.dec_lock_ref(n3, 6)
    cache.dec_lock_ref(n1, None)
    assert locks(cache) == {} and sizes(cache) == start
    cache._check_invariants()


def test_lock_stops_at_a_tombstone(make_cache, pool):
    cache = make_cache()
    cache.insert(K([1, 2]), [101, 102])
    cache.insert(K(range(1, 9)), slots(range(101, 109)), swa_evicted_seqlen=3)
    cache.insert(K(range(1, 13)), slots(range(101, 113)), swa_evicted_seqlen=9)
    # nodes: 1 = [1, 2], 2 = [3] tombstone, 3 = [4 .. 8], 4 = [9] tombstone, 5 = [10 .. 12]
    n3, n4, n5 = node(cache, 3), node(cache, 4), node(cache, 5)
    start = sizes(cache)
    assert cache.inc_lock_ref(n5) == 9  # 3 live tokens, then the tombstone ending at 9
    assert cache.inc_lock_ref(n4) == 9  # a tombstone itself: nothing SWA-locked
    assert cache.inc_lock_ref(n3) == 3  # 5 >= W live tokens in node 3
    assert locks(cache) == {1: (3, 0), 2: (3, 0), 3: (3, 1), 4: (2, 0), 5: (1, 1)}
    assert sizes(cache) == (0, 12, 2, 8)
    cache.dec_lock_ref(n4, 9)
    cache.dec_lock_ref(n5, 9)
    cache.dec_lock_ref(n3, 3)
    assert locks(cache) == {} and sizes(cache) == start
    cache._check_invariants()


def test_bad_unlocks_raise_and_change_nothing(make_cache, pool):
    cache = make_cache()
    n3 = _chain(cache)[2]
    other = cache.insert(K([1, 2, 50]), [101, 102, 150]).last_node
    b3 = cache.inc_lock_ref(n3)
    before = locks(cache), sizes(cache)
    # boundary 0 claims SWA locks on nodes 2 and 1, which hold none
    with pytest.raises(LockStateError):
        cache.dec_lock_ref(n3, 0)
    with pytest.raises(LockStateError):
        cache.dec_lock_ref(n3)  # None means 0
    with pytest.raises(LockStateError):
        cache.dec_lock_ref(other, None)  # holds no lock
    with pytest.raises(InvalidValueError):
        cache.dec_lock_ref(n3, -1)
    for bad in (True, 5.0, "5"):
        with pytest.raises(TypeError):
            cache.dec_lock_ref(n3, bad)
    assert (locks(cache), sizes(cache)) == before
    cache.dec_lock_ref(n3, np.int64(b3))  # any integer type will do
    assert locks(cache) == {}
    cache.evict(100)
    with pytest.raises(StaleNodeError):
        cache.inc_lock_ref(n3)
    with pytest.raises(StaleNodeError):
        cache.dec_lock_ref(n3, b3)
    cache._check_invariants()


# ------------------------------------------- prev_prefix_len inside a node (a review's fuzzer)


def test_prev_prefix_len_inside_the_node_the_match_ends_in(make_cache, pool):
    """prev_prefix_len=4 falls inside the 8-token node the insert's match ends in (at 6):
    the node splits at 4 and 6, the caller's [101..104] prefix is left alone, its
    duplicates [205, 206] are freed, and the new leaf takes [207, 208]. (No hand-computed
    test had prev_prefix_len inside a node: the length of the matched part past it was
    computed from the node's start, and a mutant that did so made a node of length -2.)"""
    cache = make_cache(sliding_window_size=2)
    cache.insert(K(slots(range(1, 9))), slots(range(101, 109)))
    pool.calls.clear()
    r = cache.insert(
        K([1, 2, 3, 4, 5, 6, 90, 91]), [101, 102, 103, 104, 205, 206, 207, 208], prev_prefix_len=4
    )
    assert (r.prefix_len, r.last_node.id) == (6, 4)
    assert tree(cache) == {
        1: (3, [7, 8], [107, 108], False),
        2: (0, [1, 2, 3, 4], [101, 102, 103, 104], False),
        3: (2, [5, 6], [105, 106], False),
        4: (3, [90, 91], [207, 208], False),
    }
    assert pool.calls == [("free", [205, 206])]
    cache._check_invariants()


def test_prev_prefix_len_inside_a_full_node_then_a_tombstone_is_revived(make_cache, pool):
    """prev_prefix_len=2 falls inside a live node, and the match goes on into a tombstone
    (tokens 5-8, whose SWA KV a request freed) that no one locks: the insert revives it
    with the incoming [205, 206] where it splits, frees the duplicates [203, 204] first and
    the tombstone's old [105, 106] after. A mutant that revived the node of the path at
    the tombstone's index in the wrong list (the split shifted it) went unnoticed."""
    cache = make_cache(sliding_window_size=2)
    cache.insert(K([1, 2, 3, 4]), [101, 102, 103, 104])
    cache.insert(
        K(slots(range(1, 11))),
        slots(range(101, 111)),
        prev_prefix_len=4,
        swa_evicted_seqlen=8,
    )
    pool.calls.clear()
    r = cache.insert(
        K([1, 2, 3, 4, 5, 6, 70, 71]), [101, 102, 203, 204, 205, 206, 207, 208], prev_prefix_len=2
    )
    assert (r.prefix_len, r.last_node.id) == (6, 6)
    assert tree(cache) == {
        1: (4, [3, 4], [103, 104], False),
        2: (5, [7, 8], [107, 108], True),
        3: (2, [9, 10], [109, 110], False),
        4: (0, [1, 2], [101, 102], False),
        5: (1, [5, 6], [205, 206], False),
        6: (5, [70, 71], [207, 208], False),
    }
    assert pool.calls == [("free", [203, 204]), ("free", [105, 106])]
    cache._check_invariants()
