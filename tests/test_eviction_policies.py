"""Eviction policies (issue 7): lru, lfu, fifo, priority, slru.

Each policy's order is checked on small trees whose order is worked out by hand, on both the
compiled cache and the pure-Python reference; a property test then drives both with random
operation sequences under every policy and compares every call and every eviction.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from conftest import (
    RecordingAllocator,
    RecordingStates,
    assert_same_trees,
    cache_classes,
    outcome,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from pymllm.mem_cache import EVICTION_POLICIES, RadixKey
from pymllm.mem_cache.errors import InvalidValueError


def _insert(cache: Any, alloc: RecordingAllocator, tokens: list[int], **kwargs: Any) -> int:
    r = cache.insert(RadixKey(tokens), alloc.alloc(len(tokens)), **kwargs)
    assert r.prefix_len == 0, "these scenarios insert disjoint keys"
    return r.last_node.id


def _match(cache: Any, tokens: list[int]) -> None:
    cache.match_prefix(RadixKey(tokens))


def _node_ids(cache: Any) -> list[int]:
    nodes = cache._nodes() if hasattr(cache, "_nodes") else cache._iter_nodes()
    return sorted(n.id for n in nodes)


def _eviction_order(cache: Any, evicted_ids: list[int]) -> list[int]:
    """Evict one node at a time (every node holds >= 1 token) until nothing is evictable."""
    start = len(evicted_ids)
    while cache.evictable_size() > 0:
        cache.evict(1)
        cache._check_invariants()
    return evicted_ids[start:]


def test_policy_names(impl: str) -> None:
    cls, _ = cache_classes(impl)
    assert EVICTION_POLICIES == ("lru", "lfu", "fifo", "priority", "slru")
    for name in EVICTION_POLICIES:
        cls(eviction_policy=name)
    for bad in ("LRU", "mru", "", None, 3):
        with pytest.raises(ValueError, match="eviction_policy") as info:
            cls(eviction_policy=bad)
        assert all(name in str(info.value) for name in EVICTION_POLICIES)
        assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    "policy, expected",
    [
        # A, B, C inserted at t1..t3; A hit twice, C once; D inserted last, never hit
        ("lru", ["B", "A", "C", "D"]),  # by last access
        ("lfu", ["B", "D", "C", "A"]),  # by hits (0, 0, 1, 2), ties by recency
        ("fifo", ["A", "B", "C", "D"]),  # by insertion, hits do not matter
        ("slru", ["B", "D", "A", "C"]),  # never-hit segment first, then hit ones by recency
        ("priority", ["B", "A", "C", "D"]),  # all priority 0: plain recency
    ],
)
def test_order_hand_computed(make_cache: Any, allocator: RecordingAllocator, policy, expected):
    cache = make_cache(eviction_policy=policy)
    ids = {
        "A": _insert(cache, allocator, [1, 2]),
        "B": _insert(cache, allocator, [3, 4]),
        "C": _insert(cache, allocator, [5, 6]),
    }
    _match(cache, [1, 2])
    _match(cache, [1, 2])
    _match(cache, [5, 6])
    ids["D"] = _insert(cache, allocator, [7, 8])
    names = {v: k for k, v in ids.items()}
    order = _eviction_order(cache, make_cache.evicted_ids)
    assert [names[i] for i in order] == expected
    allocator.assert_all_free()


def test_priority_order_and_raising(make_cache: Any, allocator: RecordingAllocator) -> None:
    cache = make_cache(eviction_policy="priority")
    a = _insert(cache, allocator, [1, 2], priority=5)
    b = _insert(cache, allocator, [3, 4], priority=1)
    c = _insert(cache, allocator, [5, 6], priority=3)
    d = _insert(cache, allocator, [7, 8])  # default priority 0
    # a longer key through A raises A to 10; its new leaf E gets 10 too
    v = np.concatenate([cache.match_prefix(RadixKey([1, 2])).indices, allocator.alloc(1)])
    e = cache.insert(RadixKey([1, 2, 9]), v, priority=10).last_node.id
    # a lower priority never lowers a node
    v = cache.match_prefix(RadixKey([3, 4])).indices
    assert cache.insert(RadixKey([3, 4]), v.copy(), priority=-7).prefix_len == 2
    assert _eviction_order(cache, make_cache.evicted_ids) == [d, b, c, e, a]
    allocator.assert_all_free()


def test_priority_raises_the_ancestors_too(make_cache: Any, allocator: RecordingAllocator) -> None:
    """insert(priority=p) raises every node on the path to p, not only the new leaf: a
    prefix that a priority-5 request extended outlives a priority-3 leaf once that
    request's own suffix is gone (in the test above the order comes out the same whether
    the inner node A is raised or not)."""
    cache = make_cache(eviction_policy="priority")
    prefix = _insert(cache, allocator, [1, 2, 3, 4])  # priority 0
    v = np.concatenate([cache.match_prefix(RadixKey([1, 2, 3, 4])).indices, allocator.alloc(2)])
    assert cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), v, priority=5).prefix_len == 4
    assert cache.evict(2).full_evicted == 2  # the suffix, the only leaf
    low = _insert(cache, allocator, [9, 9], priority=3)
    assert _eviction_order(cache, make_cache.evicted_ids) == [low, prefix]
    allocator.assert_all_free()


def test_priority_ties_by_recency(make_cache: Any, allocator: RecordingAllocator) -> None:
    cache = make_cache(eviction_policy="priority")
    a = _insert(cache, allocator, [1], priority=2)
    b = _insert(cache, allocator, [2], priority=2)
    c = _insert(cache, allocator, [3], priority=1)
    _match(cache, [1])
    assert _eviction_order(cache, make_cache.evicted_ids) == [c, b, a]


def test_fifo_split_keeps_insertion_time(make_cache: Any, allocator: RecordingAllocator) -> None:
    cache = make_cache(eviction_policy="fifo")
    x = _insert(cache, allocator, [1, 2, 3, 4])  # t1
    y = _insert(cache, allocator, [5, 6])  # t2
    upper = cache.match_prefix(RadixKey([1, 2])).last_node.id  # t3: splits X into [1,2]+[3,4]
    # the upper half was inserted at t1 with X, so it goes before Y (t2), not after
    assert _eviction_order(cache, make_cache.evicted_ids) == [x, upper, y]


@pytest.mark.parametrize("policy", EVICTION_POLICIES)
def test_locked_nodes_are_never_candidates(make_cache, allocator, policy) -> None:
    cache = make_cache(eviction_policy=policy)
    first = _insert(cache, allocator, [1, 2], priority=-1)  # lowest priority, oldest
    _insert(cache, allocator, [3, 4])
    _insert(cache, allocator, [5, 6, 7])
    kept = cache.match_prefix(RadixKey([1, 2])).last_node
    assert kept.id == first
    cache.inc_lock_ref(kept)
    assert cache.evict(100).full_evicted == 5
    assert cache.total_size() == cache.protected_size() == 2
    assert _node_ids(cache) == [first]
    cache.dec_lock_ref(kept)
    assert cache.evict(100).full_evicted == 2
    allocator.assert_all_free()


@pytest.mark.parametrize("bad, exc", [(1.5, TypeError), (True, TypeError), (2**63, ValueError)])
def test_bad_priority_changes_nothing(make_cache, allocator, bad, exc) -> None:
    cache = make_cache(eviction_policy="priority")
    _insert(cache, allocator, [1, 2])
    before = (cache.total_size(), _node_ids(cache))
    value = allocator.alloc(3)
    with pytest.raises(exc, match="priority"):
        cache.insert(RadixKey([1, 2, 3]), value, priority=bad)
    assert (cache.total_size(), _node_ids(cache)) == before


def test_sliding_window_cache_uses_the_policy() -> None:
    from conftest import RecordingSWAAllocator
    from reference_swa import RefSWARadixCache

    from pymllm.mem_cache import RadixCache

    for cls in (RadixCache, RefSWARadixCache):
        alloc = RecordingSWAAllocator()
        evicted: list[int] = []
        cache = cls(
            sliding_window_size=2,
            token_to_kv_pool_allocator=alloc,
            on_node_evict=evicted.append,
            eviction_policy="lfu",
        )
        a = _insert(cache, alloc, [1, 2])
        b = _insert(cache, alloc, [3, 4])
        _match(cache, [1, 2])
        _match(cache, [1, 2])
        _match(cache, [3, 4])
        # the window phase follows the policy too: B (1 hit, but the most recent) goes
        # first, and as an unlocked leaf it goes whole
        assert cache.evict(0, swa_num_tokens=1).swa_evicted == 2
        assert evicted == [b]
        assert alloc.calls[-1] == ("free", [3, 4])
        cache.evict(4)
        assert evicted == [b, a]
        alloc.assert_all_free()


def test_mamba_states_follow_the_policy() -> None:
    from reference_mamba import RefMambaRadixCache

    from pymllm.mem_cache import MambaRadixCache

    for cls in (MambaRadixCache, RefMambaRadixCache):
        alloc, states = RecordingAllocator(), RecordingStates()
        cache = cls(token_to_kv_pool_allocator=alloc, mamba_pool=states, eviction_policy="fifo")
        for state, tokens in enumerate([[1, 2], [1, 2, 3, 4], [5, 6]]):
            m = cache.match_prefix(RadixKey(tokens))
            value = np.concatenate([m.indices, alloc.alloc(len(tokens) - m.prefix_len)])
            cache.insert(RadixKey(tokens), value, mamba_value=state)
        _match(cache, [1, 2, 3, 4])  # recency would protect [1,2] and [1,2,3,4]; FIFO does not
        # FIFO drops the oldest state first: [1,2] is inner, so it only loses its state
        assert cache.evict(0, mamba_num=1).mamba_evicted == 1
        assert states.freed == [0]
        assert cache.total_size() == 6


# -- the compiled cache against the reference, under every policy --------------------------


def _describe(node: Any) -> tuple[Any, ...]:
    return (
        list(node.key.token_ids),
        np.asarray(node.value).tolist(),
        node.lock_ref,
        node.last_access_time,
        node.hit_count,
    )


_SIZES = ("evictable_size", "protected_size", "total_size")


def _random_ops(rng: random.Random) -> tuple[list[list[int]], list[tuple[str, int, int, int]]]:
    """A few keys, used whole or cut short so that leaves are hit again and again, and a
    serving-like mix of operations over them. Uniform draws: hypothesis's own draws favour
    tiny, repetitive trees in which the policies seldom disagree."""
    keys = [[rng.randint(0, 3) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(2, 5))]
    kinds = ["insert", "insert", "match", "match", "lock", "unlock", "evict"]
    ops = [
        (rng.choice(kinds), rng.randint(0, 4), rng.randint(1, 8), rng.randint(-2, 3))
        for _ in range(rng.randint(5, 40))
    ]
    return keys, ops


@settings(max_examples=300)
@given(
    policy=st.sampled_from(EVICTION_POLICIES),
    page_size=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**32 - 1),
)
def test_compiled_matches_reference_under_every_policy(policy, page_size, seed) -> None:
    keys, ops = _random_ops(random.Random(seed))
    caches, allocs, evicted, locks = [], [], [], [[], []]
    for impl in ("ref", "compiled"):
        cls, _ = cache_classes(impl)
        alloc, ids = RecordingAllocator(), []
        caches.append(
            cls(
                page_size=page_size,
                token_to_kv_pool_allocator=alloc,
                on_node_evict=ids.append,
                eviction_policy=policy,
            )
        )
        allocs.append(alloc)
        evicted.append(ids)
    handles: dict[int, tuple[Any, Any]] = {}
    for kind, which, cut, arg in ops:
        tokens = keys[which % len(keys)][:cut]
        results = []
        for side, (cache, alloc) in enumerate(zip(caches, allocs, strict=True)):
            key = RadixKey(list(tokens))
            if kind == "insert":
                value = alloc.alloc(len(tokens))
                r = outcome(lambda c=cache, k=key, v=value, p=arg: c.insert(k, v, priority=p))
                if r[0] == "ok":  # the caller frees the duplicates and the unaligned tail
                    res = r[1]
                    aligned = len(tokens) // page_size * page_size
                    dup = np.concatenate([value[: res.prefix_len], value[aligned:]])
                    if len(dup):
                        alloc.free(dup)
                    r = ("ok", (res.prefix_len, res.last_node.id))
            elif kind == "match":
                m = cache.match_prefix(key)
                r = ("ok", (m.indices.tolist(), m.last_node.id))
                if arg == 3:
                    cache.inc_lock_ref(m.last_node)
                    locks[side].append(m.last_node)
            elif kind == "lock" and locks[side]:
                node = locks[side][arg % len(locks[side])]
                r = outcome(lambda c=cache, n=node: c.inc_lock_ref(n))
                if r[0] == "ok":
                    locks[side].append(node)
            elif kind == "unlock" and locks[side]:
                node = locks[side].pop(arg % len(locks[side]))
                r = outcome(lambda c=cache, n=node: c.dec_lock_ref(n))
            elif kind == "evict":
                r = ("ok", cache.evict(arg * 2).full_evicted)
            else:
                r = ("skip", None)
            results.append(r)
        assert results[0] == results[1], (kind, tokens, arg, results)
        assert evicted[0] == evicted[1]
        assert allocs[0].freed_sequence == allocs[1].freed_sequence
        assert_same_trees(caches[0], caches[1], _describe, handles, _SIZES)
    for side, cache in enumerate(caches):
        for node in locks[side]:
            cache.dec_lock_ref(node)
        cache.evict(10**6)
        allocs[side].assert_all_free()


def test_bad_priority_is_reported_by_name() -> None:
    cls, _ = cache_classes("compiled")
    cache = cls(eviction_policy="priority")
    with pytest.raises(InvalidValueError, match=r"priority: expected a 64-bit int, got 9223"):
        cache.insert(RadixKey([1]), [5], priority=2**63)


def test_lru_keeps_its_leaves_in_the_run_not_the_heap() -> None:
    """Under LRU a new leaf and a touched one order after every other, so the compiled
    cache keeps them in its run (O(1) push, touch and evict) instead of sifting them
    through a heap whose every level reads two node structs (evict per node on a 1e6-token
    tree: 0.59 against 0.36 us, bench/RESULTS.md, session 17). A leaf that comes back with
    an older last access (unlocked) goes to the heap, and the victims still come in exact
    LRU order."""
    from pymllm.mem_cache import RadixCache

    alloc = RecordingAllocator()
    order: list[int] = []
    cache = RadixCache(token_to_kv_pool_allocator=alloc, on_node_evict=order.append)
    keys = [[3 * j, 3 * j + 1, 3 * j + 2] for j in range(100)]
    handles = [cache.insert(RadixKey(k), alloc.alloc(3)).last_node for k in keys]
    assert cache._evictable_layout() == (100, 0)
    for j in range(0, 100, 10):  # each touched leaf moves to the run's end
        _match(cache, keys[j])
    assert cache._evictable_layout() == (100, 0)
    cache.inc_lock_ref(handles[5])
    assert cache._evictable_layout() == (99, 0)
    cache.dec_lock_ref(handles[5])  # back with its old last access: into the heap
    assert cache._evictable_layout() == (99, 1)
    cache._check_invariants()
    touched = list(range(0, 100, 10))
    expected = [handles[j].id for j in range(100) if j not in touched]
    expected += [handles[j].id for j in touched]
    assert cache.evict(10**6).full_evicted == 300
    assert order == expected
    assert cache._evictable_layout() == (0, 0)
    cache._check_invariants()
