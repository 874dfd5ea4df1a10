"""Hand-computed tests of the MambaRadixCache contract, run against both implementations.

The ``make_cache`` fixture below is parametrized (through conftest's ``impl``) over the
pure-Python reference model ``RefMambaRadixCache`` and the compiled ``MambaRadixCache``:
every expectation is worked out by hand from the written semantics (see the docstring of
``tests/reference_mamba.py``), so both must meet it.

Both pools are ``RecordingAllocator``s with slots 1..999 handed out up front, so a test can
use literal slot numbers and a double free still raises.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conftest import RecordingAllocator  # tests/ is on sys.path (rootdir conftest)
from reference_mamba import MambaTreeNode as RefMambaTreeNode
from reference_mamba import RefMambaRadixCache

from pymllm.mem_cache import MambaRadixCache, RadixKey
from pymllm.mem_cache import MambaTreeNode as CompiledMambaTreeNode
from pymllm.mem_cache.base_prefix_cache import BasePrefixCache, EvictResult
from pymllm.mem_cache.errors import InvalidValueError, LockStateError, StaleNodeError

CLASSES = {
    "ref": (RefMambaRadixCache, RefMambaTreeNode),
    "compiled": (MambaRadixCache, CompiledMambaTreeNode),
}


def K(tokens: Any, extra_key: Any = None) -> RadixKey:
    return RadixKey(tokens, extra_key)


def i32(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.int32)


def sizes(cache: Any) -> tuple[int, int, int, int, int]:
    return (
        cache.evictable_size(),
        cache.protected_size(),
        cache.total_size(),
        cache.mamba_evictable_size(),
        cache.mamba_protected_size(),
    )


def state(node: Any) -> int | None:
    v = node.mamba_value
    if v is None:
        return None
    assert isinstance(v, np.ndarray) and v.dtype == np.int32 and v.shape == (1,)
    return int(v[0])


def toks(node: Any) -> list[Any]:
    return list(node.key.token_ids)


@pytest.fixture
def kv_pool() -> RecordingAllocator:
    pool = RecordingAllocator()
    pool.alloc(999)
    return pool


@pytest.fixture
def state_pool() -> RecordingAllocator:
    pool = RecordingAllocator()
    pool.alloc(999)
    return pool


@pytest.fixture
def make_cache(
    impl: str, kv_pool: RecordingAllocator, state_pool: RecordingAllocator
) -> Callable[..., Any]:
    """Factory for a Mamba cache of the parametrized implementation; ``evicted_ids``
    collects every ``on_node_evict`` call."""
    cls = CLASSES[impl][0]

    def make(page_size: int = 1, **kwargs: Any) -> Any:
        kwargs.setdefault("token_to_kv_pool_allocator", kv_pool)
        kwargs.setdefault("mamba_pool", state_pool)
        kwargs.setdefault("on_node_evict", make.evicted_ids.append)
        return cls(page_size=page_size, **kwargs)

    make.evicted_ids = []  # type: ignore[attr-defined]
    return make


@pytest.fixture
def node_class(impl: str) -> type:
    return CLASSES[impl][1]


# ---------------------------------------------------------------- construction


def test_fresh_cache(make_cache, node_class):
    cache = make_cache(page_size=2)
    assert isinstance(cache, BasePrefixCache)
    assert cache.page_size == 2
    root = cache.root_node
    assert isinstance(root, node_class)
    assert root.id == 0 and root.mamba_value is None and root.mamba_lock_ref == 0
    assert sizes(cache) == (0, 0, 0, 0, 0)
    cache._check_invariants()


def test_constructor_checks(impl):
    cls = CLASSES[impl][0]
    with pytest.raises(TypeError):
        cls(mamba_pool=object())  # no free()
    with pytest.raises(TypeError):
        cls(sliding_window_size=4)  # not a parameter of this cache
    cache = cls()  # no pools at all: evictions just forget the slots
    cache.insert(K([1, 2]), mamba_value=3)
    assert cache.evict(5, mamba_num=1) == EvictResult(full_evicted=2, mamba_evicted=1)
    cache.insert(K([1, 2]), mamba_value=3)
    cache.reset()
    assert sizes(cache) == (0, 0, 0, 0, 0)


# ---------------------------------------------------------------- issue: repeated prompt hits


def test_repeated_prompt_hits_after_its_state_is_saved(make_cache, kv_pool, state_pool):
    cache = make_cache()
    prompt = [1, 2, 3, 4, 5]
    m = cache.match_prefix(K(prompt))  # t=1: cold
    assert m.prefix_len == 0 and m.last_node == cache.root_node
    assert m.indices.dtype == np.int32 and m.indices.shape == (0,)
    assert m.mamba_branching_seqlen is None

    r = cache.insert(K(prompt), i32([11, 12, 13, 14, 15]), mamba_value=7)  # t=2
    leaf = r.last_node
    assert (r.prefix_len, leaf.id, r.mamba_exist) == (0, 1, False)
    assert state(leaf) == 7 and leaf.mamba_lock_ref == 0 and leaf.full_lock_ref == 0
    assert sizes(cache) == (5, 0, 5, 1, 0)

    m = cache.match_prefix(K(prompt))  # t=3: the whole prompt, state included
    assert m.prefix_len == 5 and m.indices.tolist() == [11, 12, 13, 14, 15]
    assert m.last_node == leaf and m.mamba_branching_seqlen is None
    assert (leaf.hit_count, leaf.last_access_time) == (1, 3)

    # A longer request on the same prompt: hit up to the state, nothing more matched.
    m = cache.match_prefix(K([*prompt, 6, 7]))  # t=4
    assert (m.prefix_len, m.last_node.id, m.mamba_branching_seqlen) == (5, 1, None)

    # The second request saves its own state: one is there, the slot stays the caller's.
    r = cache.insert(K(prompt), i32([21, 22, 23, 24, 25]), mamba_value=8)  # t=5
    assert (r.prefix_len, r.last_node.id, r.mamba_exist) == (5, 1, True)
    assert state(leaf) == 7 and leaf.last_access_time == 5
    assert sizes(cache) == (5, 0, 5, 1, 0)

    cache.reset()
    assert kv_pool.freed == {11, 12, 13, 14, 15} and len(kv_pool.free_calls) == 1
    assert state_pool.freed_sequence == [[7]]
    cache._check_invariants()


def test_state_forms_accepted(make_cache):
    cache = make_cache()
    for i, slot in enumerate([5, np.int64(6), [7], (8,), i32([9]), np.array(10, np.uint8)]):
        r = cache.insert(K([i, 100]), mamba_value=slot)
        assert state(r.last_node) == 5 + i and not r.mamba_exist
    assert cache.mamba_evictable_size() == 6
    cache._check_invariants()


# ---------------------------------------------------------------- issue: state-less split


def test_extension_past_a_stateless_split(make_cache):
    cache = make_cache()
    cache.insert(K([1, 2, 3, 4, 5, 6]), i32([11, 12, 13, 14, 15, 16]), mamba_value=7)  # t=1
    r = cache.insert(K([1, 2, 3, 9]), i32([21, 22, 23, 24]))  # t=2: split, no state
    assert (r.prefix_len, r.last_node.id, r.mamba_exist) == (3, 3, False)
    assert state(r.last_node) is None and toks(r.last_node) == [9]
    upper = r.last_node.parent
    assert upper.id == 2 and toks(upper) == [1, 2, 3] and upper.value.tolist() == [11, 12, 13]
    assert state(upper) is None and upper.mamba_lock_ref == 0  # a split invents no state
    assert sizes(cache) == (7, 0, 7, 1, 0)

    # Below the split only KV: no state to resume from, branch at the KV match's end.
    m = cache.match_prefix(K([1, 2, 3, 9, 10]))  # t=3
    assert (m.prefix_len, m.last_node.id, m.mamba_branching_seqlen) == (0, 0, 4)
    assert m.indices.tolist() == []

    # Through the split to the saved state.
    m = cache.match_prefix(K([1, 2, 3, 4, 5, 6, 7]))  # t=4
    assert (m.prefix_len, m.last_node.id, m.mamba_branching_seqlen) == (6, 1, None)
    assert m.indices.tolist() == [11, 12, 13, 14, 15, 16]
    node1 = m.last_node  # the lower part of the split kept its id and its state
    assert toks(node1) == [4, 5, 6] and state(node1) == 7 and node1.parent == upper
    assert (node1.hit_count, node1.last_access_time) == (1, 4)

    # Diverging inside node 1: it is not split and not touched; KV matched 4 tokens.
    m = cache.match_prefix(K([1, 2, 3, 4, 8]))  # t=5
    assert (m.prefix_len, m.last_node.id, m.mamba_branching_seqlen) == (0, 0, 4)
    assert (node1.hit_count, node1.last_access_time) == (1, 4)
    assert toks(node1) == [4, 5, 6]
    assert (upper.hit_count, upper.last_access_time) == (3, 5)
    assert sizes(cache) == (7, 0, 7, 1, 0)

    # The caller saves a state at the branching point: that split carries the new state.
    r = cache.insert(K([1, 2, 3, 4]), i32([31, 32, 33, 34]), mamba_value=8)  # t=6
    assert (r.prefix_len, r.last_node.id, r.mamba_exist) == (4, 4, False)
    assert toks(r.last_node) == [4] and state(r.last_node) == 8
    assert toks(node1) == [5, 6] and state(node1) == 7 and node1.parent == r.last_node
    m = cache.match_prefix(K([1, 2, 3, 4, 8]))  # t=7
    assert (m.prefix_len, m.last_node.id, m.mamba_branching_seqlen) == (4, 4, None)
    assert m.indices.tolist() == [11, 12, 13, 14]
    assert sizes(cache) == (7, 0, 7, 2, 0)
    cache._check_invariants()


def test_branching_seqlen_is_page_aligned(make_cache):
    cache = make_cache(page_size=2)
    cache.insert(K([1, 2, 3, 4, 5, 6]), i32([11, 12, 13, 14, 15, 16]), mamba_value=7)
    # 5 tokens agree; whole pages: 4.
    m = cache.match_prefix(K([1, 2, 3, 4, 5, 9]))
    assert (m.prefix_len, m.mamba_branching_seqlen) == (0, 4)
    m = cache.match_prefix(K([1, 2, 3, 4, 5]))  # the key ends mid-page inside the node
    assert (m.prefix_len, m.mamba_branching_seqlen) == (0, 4)
    m = cache.match_prefix(K([1, 2, 3]))  # one page
    assert (m.prefix_len, m.mamba_branching_seqlen) == (0, 2)
    m = cache.match_prefix(K([1]))  # less than a page
    assert (m.prefix_len, m.mamba_branching_seqlen) == (0, None)
    m = cache.match_prefix(K([1, 2, 3, 4, 5, 6, 7]))
    assert (m.prefix_len, m.mamba_branching_seqlen) == (6, None)
    # The state sits on the node ending at the end of the inserted key (split there).
    r = cache.insert(K([1, 2, 3, 4]), i32([21, 22, 23, 24]), mamba_value=9)
    assert (r.prefix_len, toks(r.last_node), r.mamba_exist) == (4, [1, 2, 3, 4], False)
    assert state(r.last_node) == 9
    m = cache.match_prefix(K([1, 2, 3, 4, 5]))
    assert (m.prefix_len, m.last_node.id, m.mamba_branching_seqlen) == (4, 2, None)
    cache._check_invariants()


def test_insert_ending_inside_a_node_puts_the_state_on_the_upper_part(make_cache):
    cache = make_cache()
    cache.insert(K([1, 2, 3, 4]), i32([11, 12, 13, 14]), mamba_value=1)
    r = cache.insert(K([1, 2]), i32([21, 22]), mamba_value=2)
    assert (r.prefix_len, r.last_node.id, r.mamba_exist) == (2, 2, False)
    assert toks(r.last_node) == [1, 2] and state(r.last_node) == 2
    m = cache.match_prefix(K([1, 2, 3, 4]))
    assert (m.prefix_len, m.last_node.id) == (4, 1) and state(m.last_node) == 1
    m = cache.match_prefix(K([1, 2, 3]))
    assert (m.prefix_len, m.last_node.id, m.mamba_branching_seqlen) == (2, 2, 3)
    assert sizes(cache) == (4, 0, 4, 2, 0)
    cache._check_invariants()


def test_namespaces_keep_states_apart(make_cache):
    cache = make_cache()
    cache.insert(K([1, 2], "lora-a"), i32([11, 12]), mamba_value=1)
    m = cache.match_prefix(K([1, 2]))
    assert (m.prefix_len, m.last_node.id, m.mamba_branching_seqlen) == (0, 0, None)
    m = cache.match_prefix(K([1, 2], "lora-a"))
    assert (m.prefix_len, m.last_node.id) == (2, 1)
    r = cache.insert(K([1, 2]), i32([21, 22]), mamba_value=2)
    assert (r.prefix_len, r.last_node.id, r.mamba_exist) == (0, 2, False)
    assert cache.mamba_evictable_size() == 2


# ---------------------------------------------------------------- issue: eviction order


def test_mamba_only_then_full_eviction_in_lru_order(make_cache, kv_pool, state_pool):
    cache = make_cache()
    cache.insert(K([1, 2]), i32([11, 12]), mamba_value=1)  # id1, t=1
    cache.insert(K([1, 2, 3, 4]), i32([21, 22, 13, 14]), mamba_value=2)  # id2 under 1, t=2
    cache.insert(K([5, 6]), i32([15, 16]), mamba_value=3)  # id3, t=3
    cache.insert(K([7, 8]), i32([17, 18]))  # id4, no state, t=4
    cache.match_prefix(K([5, 6]))  # id3 t=5
    assert sizes(cache) == (8, 0, 8, 3, 0)
    # States by (t, id): id1 (2), id2 (2), id3 (5). id1 has a child: only its state goes.
    assert cache.evict(0, 1) == EvictResult(full_evicted=0, mamba_evicted=1)
    assert state_pool.freed_sequence == [[1]] and kv_pool.free_calls == []
    assert make_cache.evicted_ids == []
    assert sizes(cache) == (8, 0, 8, 2, 0)
    # id2 and id3 are unlocked leaves: removed whole, one free call per pool.
    assert cache.evict(0, mamba_num=2) == EvictResult(full_evicted=4, mamba_evicted=2)
    assert kv_pool.freed_sequence == [[13, 14, 15, 16]]
    assert state_pool.freed_sequence == [[1], [2, 3]]
    assert make_cache.evicted_ids == [2, 3]
    assert sizes(cache) == (4, 0, 4, 0, 0)
    # No state left: Mamba-only eviction does nothing, even though id1 is now a leaf.
    assert cache.evict(0, mamba_num=5) == EvictResult()
    # Full eviction: id1 (t=2) before id4 (t=4).
    assert cache.evict(1) == EvictResult(full_evicted=2)
    assert kv_pool.freed_sequence[-1] == [11, 12] and make_cache.evicted_ids == [2, 3, 1]
    assert cache.evict(100, 100) == EvictResult(full_evicted=2)
    assert kv_pool.freed_sequence[-1] == [17, 18] and make_cache.evicted_ids == [2, 3, 1, 4]
    assert len(state_pool.free_calls) == 2
    assert sizes(cache) == (0, 0, 0, 0, 0)
    cache._check_invariants()


def test_eviction_follows_recency_not_ids(make_cache, kv_pool, state_pool):
    cache = make_cache()
    for tok in (1, 2, 3, 4):
        cache.insert(K([tok]), i32([10 + tok]), mamba_value=tok)  # id=tok, t=tok
    cache.match_prefix(K([1]))  # id1 t=5
    cache.match_prefix(K([2]))  # id2 t=6
    # States by (t, id): id3 (3), id4 (4), id1 (5), id2 (6).
    assert cache.evict(0, 2) == EvictResult(full_evicted=2, mamba_evicted=2)
    assert state_pool.freed_sequence == [[3, 4]] and kv_pool.freed_sequence == [[13, 14]]
    cache.match_prefix(K([2]))  # id2 t=8
    assert cache.evict(1, 1) == EvictResult(full_evicted=1, mamba_evicted=1)
    assert make_cache.evicted_ids == [3, 4, 1]
    assert state_pool.freed_sequence[-1] == [1]
    assert sizes(cache) == (1, 0, 1, 1, 0)


def test_full_eviction_frees_states_and_they_count(make_cache, kv_pool, state_pool):
    cache = make_cache()
    cache.insert(K([1, 2]), i32([11, 12]), mamba_value=1)  # id1 t=1
    cache.insert(K([3, 4]), i32([13, 14]), mamba_value=2)  # id2 t=2
    cache.insert(K([5, 6]), i32([15, 16]))  # id3 t=3
    # Phase 1 removes id1 with its state: one state freed already, phase 2 has nothing to do.
    assert cache.evict(2, mamba_num=1) == EvictResult(full_evicted=2, mamba_evicted=1)
    assert state_pool.freed_sequence == [[1]] and kv_pool.freed_sequence == [[11, 12]]
    # Phase 1 takes id2 (and its state); phase 2 wants one more and finds none.
    assert cache.evict(1, 2) == EvictResult(full_evicted=2, mamba_evicted=1)
    assert state_pool.freed_sequence == [[1], [2]]
    assert make_cache.evicted_ids == [1, 2]
    assert sizes(cache) == (2, 0, 2, 0, 0)
    cache._check_invariants()


def test_both_phases_in_one_call_share_the_free_calls(make_cache, kv_pool, state_pool):
    cache = make_cache()
    cache.insert(K([1, 2]), i32([11, 12]))  # id1 t=1
    cache.insert(K([3, 4]), i32([13, 14]), mamba_value=1)  # id2 t=2
    cache.insert(K([3, 4, 5]), i32([23, 24, 15]), mamba_value=2)  # id3 t=3 (id2 t=3)
    cache.insert(K([6]), i32([16]), mamba_value=3)  # id4 t=4
    # Phase 1: id1 (2 tokens). Phase 2 (2 states): id2 (t=3, has a child: state only), id3.
    assert cache.evict(1, mamba_num=2) == EvictResult(full_evicted=3, mamba_evicted=2)
    assert kv_pool.freed_sequence == [[11, 12, 15]]
    assert state_pool.freed_sequence == [[1, 2]]
    assert make_cache.evicted_ids == [1, 3]
    # id2 is now a state-less leaf, a candidate for full eviction again (before id4).
    assert cache.evict(1) == EvictResult(full_evicted=2)
    assert make_cache.evicted_ids == [1, 3, 2]
    assert sizes(cache) == (1, 0, 1, 1, 0)
    cache._check_invariants()


def test_evict_arguments(make_cache):
    cache = make_cache()
    cache.insert(K([1, 2]), i32([11, 12]), mamba_value=1)
    with pytest.raises(TypeError):
        cache.evict(0, 1, mamba_num=1)  # the state count given twice
    with pytest.raises(TypeError):
        cache.evict(0, 1, mamba_num=0)
    with pytest.raises(TypeError):
        cache.evict(0, mamba_num="1")
    assert sizes(cache) == (2, 0, 2, 1, 0)
    assert cache.evict(-5, 0, mamba_num=0) == EvictResult()
    assert cache.evict(0, 0, mamba_num=-1) == EvictResult()
    assert cache.evict(0, 0, mamba_num=1) == EvictResult(full_evicted=2, mamba_evicted=1)


def test_evict_rejects_non_int_counts(make_cache):
    # bool and float counts are caller bugs (the compiled core once cast them silently)
    cache = make_cache()
    cache.insert(K([1, 2]), i32([11, 12]), mamba_value=1)
    for args in [(True,), (1.5,), (0, 0.5), (0, True)]:
        with pytest.raises(TypeError):
            cache.evict(*args)
    assert sizes(cache) == (2, 0, 2, 1, 0)


# ---------------------------------------------------------------- issue: locks


def test_locks_keep_kv_and_state_alive(make_cache, kv_pool, state_pool):
    cache = make_cache()
    leaf = cache.insert(K([1, 2, 3]), i32([11, 12, 13]), mamba_value=5).last_node
    assert cache.inc_lock_ref(leaf) is True  # the token: a state lock was taken
    assert (leaf.lock_ref, leaf.full_lock_ref, leaf.mamba_lock_ref) == (1, 1, 1)
    assert sizes(cache) == (0, 3, 3, 0, 1)
    assert cache.evict(100, mamba_num=100) == EvictResult()
    assert kv_pool.free_calls == [] and state_pool.free_calls == []
    cache.inc_lock_ref(leaf)
    assert (leaf.full_lock_ref, leaf.mamba_lock_ref) == (2, 2)
    cache.dec_lock_ref(leaf)
    assert (leaf.full_lock_ref, leaf.mamba_lock_ref) == (1, 1)
    assert sizes(cache) == (0, 3, 3, 0, 1)
    cache.dec_lock_ref(leaf)
    assert (leaf.full_lock_ref, leaf.mamba_lock_ref) == (0, 0)
    assert sizes(cache) == (3, 0, 3, 1, 0)
    with pytest.raises(LockStateError):
        cache.dec_lock_ref(leaf)
    assert sizes(cache) == (3, 0, 3, 1, 0)
    cache._check_invariants()
    assert cache.evict(100, mamba_num=100) == EvictResult(full_evicted=3, mamba_evicted=1)
    with pytest.raises(StaleNodeError):
        cache.inc_lock_ref(leaf)
    with pytest.raises(StaleNodeError):
        cache.dec_lock_ref(leaf)


def test_locking_a_child_locks_ancestor_kv_not_ancestor_state(make_cache, state_pool):
    cache = make_cache()
    parent = cache.insert(K([1, 2]), i32([11, 12]), mamba_value=1).last_node  # id1
    child = cache.insert(K([1, 2, 3, 4]), i32([21, 22, 13, 14]), mamba_value=2).last_node
    cache.inc_lock_ref(child)
    assert (parent.full_lock_ref, parent.mamba_lock_ref) == (1, 0)
    assert (child.full_lock_ref, child.mamba_lock_ref) == (1, 1)
    assert sizes(cache) == (0, 4, 4, 1, 1)
    # Only the parent's state is droppable; the parent itself stays (locked, has a child).
    assert cache.evict(100, mamba_num=100) == EvictResult(mamba_evicted=1)
    assert state(parent) is None and state_pool.freed_sequence == [[1]]
    assert sizes(cache) == (0, 4, 4, 0, 1)
    cache.dec_lock_ref(child)
    assert sizes(cache) == (4, 0, 4, 1, 0)
    # The child is an unlocked leaf now: Mamba-only eviction removes it whole; the parent
    # (a state-less leaf) stays for full eviction.
    assert cache.evict(0, 1) == EvictResult(full_evicted=2, mamba_evicted=1)
    assert child.evicted and not parent.evicted
    assert sizes(cache) == (2, 0, 2, 0, 0)
    cache._check_invariants()


def test_state_added_to_a_locked_node_is_not_locked(make_cache):
    cache = make_cache()
    node = cache.insert(K([1, 2])).last_node
    cache.inc_lock_ref(node)  # no state yet: only KV locked
    assert (node.full_lock_ref, node.mamba_lock_ref) == (1, 0)
    r = cache.insert(K([1, 2]), mamba_value=9)
    assert r.last_node == node and not r.mamba_exist and state(node) == 9
    assert node.mamba_lock_ref == 0 and sizes(cache) == (0, 2, 2, 1, 0)
    # Droppable although the KV is locked: state only.
    assert cache.evict(5, mamba_num=1) == EvictResult(mamba_evicted=1)
    cache.dec_lock_ref(node)
    assert sizes(cache) == (2, 0, 2, 0, 0)
    cache._check_invariants()


def test_lock_token_keeps_another_requests_state_lock(make_cache, state_pool):
    """Request 1 locks a node without a state; a state arrives; request 2 locks it (state
    lock included). Request 1's unlock, given its token, must not release request 2's
    state lock, so the state cannot be dropped while request 2 copies from it."""
    cache = make_cache()
    node = cache.insert(K([1, 2])).last_node
    token1 = cache.inc_lock_ref(node)
    assert token1 is False
    cache.insert(K([1, 2]), mamba_value=5)
    token2 = cache.inc_lock_ref(node)
    assert token2 is True and node.mamba_lock_ref == 1
    cache.dec_lock_ref(node, swa_boundary_id=token1)
    assert (node.full_lock_ref, node.mamba_lock_ref) == (1, 1)
    assert cache.evict(0, mamba_num=1) == EvictResult()  # the state is still protected
    assert state_pool.free_calls == []
    with pytest.raises(TypeError):
        cache.dec_lock_ref(node, swa_boundary_id=3)
    cache.dec_lock_ref(node, swa_boundary_id=token2)
    assert (node.full_lock_ref, node.mamba_lock_ref) == (0, 0)
    with pytest.raises(LockStateError):
        cache.dec_lock_ref(node, swa_boundary_id=True)
    cache._check_invariants()


def test_split_of_a_locked_node(make_cache):
    cache = make_cache()
    leaf = cache.insert(K([1, 2, 3, 4]), i32([11, 12, 13, 14]), mamba_value=1).last_node
    cache.inc_lock_ref(leaf)
    r = cache.insert(K([1, 2, 9]), i32([21, 22, 23]))
    upper = r.last_node.parent
    assert upper.id == 2 and toks(upper) == [1, 2]
    assert (upper.full_lock_ref, upper.mamba_lock_ref, state(upper)) == (1, 0, None)
    assert (leaf.full_lock_ref, leaf.mamba_lock_ref, state(leaf)) == (1, 1, 1)
    assert sizes(cache) == (1, 4, 5, 0, 1)
    cache.dec_lock_ref(leaf)
    assert sizes(cache) == (5, 0, 5, 1, 0)
    assert (upper.full_lock_ref, upper.mamba_lock_ref) == (0, 0)
    cache._check_invariants()


def test_a_lock_token_kept_as_a_numpy_bool_unlocks(make_cache):
    # a scheduler that keeps its batch's lock tokens in a numpy array hands back np.bool_
    cache = make_cache()
    cache.insert(RadixKey([1, 2]), [3, 4], mamba_value=5)
    node = cache.match_prefix(RadixKey([1, 2])).last_node
    tokens = np.array([cache.inc_lock_ref(node), cache.inc_lock_ref(node)])
    assert tokens.dtype == np.bool_ and tokens.all()
    for token in tokens:
        cache.dec_lock_ref(node, token)
    assert node.lock_ref == 0 and node.mamba_lock_ref == 0
    with pytest.raises(LockStateError):
        cache.dec_lock_ref(node, np.False_)
    cache._check_invariants()


def test_root_lock_is_a_no_op(make_cache):
    cache = make_cache()
    root = cache.root_node
    assert cache.inc_lock_ref(root) is False  # no state lock taken
    cache.dec_lock_ref(root)
    cache.dec_lock_ref(root)
    cache.dec_lock_ref(root, swa_boundary_id=False)  # the token inc_lock_ref gave
    with pytest.raises(LockStateError, match="no state lock"):
        cache.dec_lock_ref(root, swa_boundary_id=True)  # never handed out for the root
    assert root.lock_ref == 0 and root.mamba_lock_ref == 0
    assert sizes(cache) == (0, 0, 0, 0, 0)


def test_foreign_handles(make_cache, impl):
    cache, other = make_cache(), make_cache()
    node = other.insert(K([1]), mamba_value=1).last_node
    with pytest.raises(StaleNodeError):
        cache.inc_lock_ref(node)
    with pytest.raises(TypeError):
        cache.inc_lock_ref("node")


# ---------------------------------------------------------------- issue: counters to zero


def test_counters_return_to_zero_after_unlock_and_reset(make_cache, kv_pool, state_pool):
    cache = make_cache()
    a = cache.insert(K([1, 2, 3]), i32([11, 12, 13]), mamba_value=1).last_node  # id1
    b = cache.insert(K([1, 2, 3, 4]), i32([21, 22, 23, 14]), mamba_value=2).last_node  # id2
    c = cache.insert(K([5, 6]), i32([15, 16])).last_node  # id3
    for n in (a, b, b, c):
        cache.inc_lock_ref(n)
    assert sizes(cache) == (0, 6, 6, 0, 2)
    assert (a.full_lock_ref, a.mamba_lock_ref, b.full_lock_ref, b.mamba_lock_ref) == (3, 1, 2, 2)
    for n in (b, c, a, b):
        cache.dec_lock_ref(n)
    assert sizes(cache) == (6, 0, 6, 2, 0)
    assert all(n.full_lock_ref == 0 and n.mamba_lock_ref == 0 for n in (a, b, c))
    cache.inc_lock_ref(b)  # reset drops locked nodes too
    cache.reset()
    assert sizes(cache) == (0, 0, 0, 0, 0)
    assert len(kv_pool.free_calls) == 1 and kv_pool.freed == {11, 12, 13, 14, 15, 16}
    assert len(state_pool.free_calls) == 1 and state_pool.freed == {1, 2}
    assert make_cache.evicted_ids == []  # reset does not report nodes
    assert a.evicted and b.evicted and c.evicted
    with pytest.raises(StaleNodeError):
        cache.dec_lock_ref(b)
    # Ids keep counting; the clock restarts.
    r = cache.insert(K([1]), i32([17]), mamba_value=3)
    assert (r.last_node.id, r.last_node.last_access_time) == (4, 1)
    cache.reset()
    assert state_pool.freed_sequence[-1] == [3]
    cache.reset()  # empty: no free calls
    assert len(kv_pool.free_calls) == 2 and len(state_pool.free_calls) == 2
    cache._check_invariants()


# ---------------------------------------------------------------- bad input changes nothing


@pytest.mark.parametrize(
    ("bad", "exc"),
    [
        (True, TypeError),
        (np.bool_(True), InvalidValueError),
        (1.0, InvalidValueError),
        ("5", InvalidValueError),
        ([1, 2], InvalidValueError),
        ([], InvalidValueError),
        (np.array([[3]]), InvalidValueError),
        (-1, InvalidValueError),
        (2**31, InvalidValueError),
        (np.uint64(2**31), InvalidValueError),
    ],
)
def test_bad_mamba_value_changes_nothing(make_cache, kv_pool, state_pool, bad, exc):
    cache = make_cache()
    node = cache.insert(K([1, 2]), i32([11, 12])).last_node  # t=1
    with pytest.raises(exc):
        cache.insert(K([1, 2, 3]), i32([21, 22, 23]), mamba_value=bad)
    with pytest.raises(exc):
        cache.insert(K([1, 2]), i32([21, 22]), mamba_value=bad)
    assert sizes(cache) == (2, 0, 2, 0, 0) and state(node) is None
    assert node.last_access_time == 1
    assert cache.insert(K([9])).last_node.last_access_time == 2  # the clock did not move
    assert kv_pool.free_calls == [] and state_pool.free_calls == []
    cache._check_invariants()


def test_state_needs_a_whole_page(make_cache):
    cache = make_cache(page_size=2)
    with pytest.raises(InvalidValueError):
        cache.insert(K([1]), i32([11]), mamba_value=3)
    with pytest.raises(InvalidValueError):
        cache.insert(K([]), i32([]), mamba_value=3)
    r = cache.insert(K([1]), i32([11]))  # no state: fine, nothing stored
    assert (r.prefix_len, r.last_node.id, r.mamba_exist) == (0, 0, False)
    # The state after token 3 must not sit on the node ending at token 2: a later prompt
    # [1, 2, 9] would resume from it. A key with a partial last page takes no state.
    with pytest.raises(InvalidValueError, match="must end on a page boundary"):
        cache.insert(K([1, 2, 3]), i32([11, 12, 13]), mamba_value=3)
    assert sizes(cache) == (0, 0, 0, 0, 0)
    r = cache.insert(K([1, 2, 3]), i32([11, 12, 13]))  # without a state: the whole pages
    assert toks(r.last_node) == [1, 2] and state(r.last_node) is None
    r = cache.insert(K([1, 2, 3, 4]), i32([11, 12, 13, 14]), mamba_value=3)
    assert toks(r.last_node) == [3, 4] and state(r.last_node) == 3
    assert sizes(cache) == (4, 0, 4, 1, 0)
    cache._check_invariants()


def test_the_nodes_own_state_handed_back_is_not_a_second_state(make_cache, state_pool):
    cache = make_cache()
    cache.insert(K([1, 2]), i32([11, 12]), mamba_value=5)
    r = cache.insert(K([1, 2]), i32([11, 12]), mamba_value=5)
    assert (r.prefix_len, r.mamba_exist, state(r.last_node)) == (2, False, 5)  # keep it
    r = cache.insert(K([1, 2]), i32([11, 12]), mamba_value=6)
    assert (r.mamba_exist, state(r.last_node)) == (True, 5)  # 6 stays the caller's
    assert sizes(cache) == (2, 0, 2, 1, 0)
    cache._check_invariants()


def test_an_unlock_without_the_state_token_cannot_strand_a_state_lock(make_cache, state_pool):
    """full_lock_ref >= mamba_lock_ref always: the node's only lock holds its state, so an
    unlock that names no state lock (False) is refused, changing nothing."""
    cache = make_cache()
    node = cache.insert(K([1, 2, 3, 4]), i32([1, 2, 3, 4]), mamba_value=7).last_node
    token = cache.inc_lock_ref(node)
    assert token is True
    before = sizes(cache)
    with pytest.raises(LockStateError, match="holds its state"):
        cache.dec_lock_ref(node, swa_boundary_id=False)
    assert (node.full_lock_ref, node.mamba_lock_ref) == (1, 1) and sizes(cache) == before
    cache._check_invariants()
    assert cache.evict(100, mamba_num=5) == EvictResult()  # still locked: nothing goes
    cache.dec_lock_ref(node, swa_boundary_id=token)
    assert cache.evict(100, mamba_num=5).full_evicted == 4
    assert state_pool.freed_sequence == [[7]] and sizes(cache) == (0, 0, 0, 0, 0)
    cache._check_invariants()


def _parent_and_child_with_states(cache: Any) -> tuple[Any, Any]:
    parent = cache.insert(K([1, 2]), i32([1, 2]), mamba_value=7).last_node
    child = cache.insert(K([1, 2, 3]), i32([1, 2, 3]), mamba_value=8).last_node
    assert child.parent == parent
    return parent, child


def test_a_false_token_cannot_take_a_descendants_lock_from_a_state_locked_node(
    make_cache, state_pool
):
    """The parent's only own lock holds its state; the child's lock also counts in the
    parent's full lock. A False unlock of the parent used to pass (2 full locks > 1 state
    lock): then the child's unlock left the parent's state locked under no full lock, and
    evict freed that locked state. Refused now, changing nothing."""
    cache = make_cache()
    parent, child = _parent_and_child_with_states(cache)
    t_parent, t_child = cache.inc_lock_ref(parent), cache.inc_lock_ref(child)
    assert (t_parent, t_child) == (True, True) and parent.full_lock_ref == 2
    before = sizes(cache)
    with pytest.raises(LockStateError, match="holds its state"):
        cache.dec_lock_ref(parent, swa_boundary_id=False)
    assert sizes(cache) == before and (parent.full_lock_ref, parent.mamba_lock_ref) == (2, 1)
    cache._check_invariants()
    cache.dec_lock_ref(child, swa_boundary_id=t_child)
    assert cache.evict(100, mamba_num=5) == EvictResult(full_evicted=1, mamba_evicted=1)
    assert not parent.evicted and state(parent) == 7 and state_pool.freed_sequence == [[8]]
    cache.dec_lock_ref(parent, swa_boundary_id=t_parent)
    assert sizes(cache) == (2, 0, 2, 1, 0)
    cache._check_invariants()


@pytest.mark.parametrize("token", [None, False])
def test_a_node_locked_only_through_its_descendants_cannot_be_unlocked(make_cache, token):
    """Undoing the child's lock through its parent would let a state lock taken on the
    parent afterwards lose its cover when the child's holder unlocks: refused."""
    cache = make_cache()
    parent, child = _parent_and_child_with_states(cache)
    t_child = cache.inc_lock_ref(child)
    before = sizes(cache)
    with pytest.raises(LockStateError, match="descendants"):
        cache.dec_lock_ref(parent, swa_boundary_id=token)
    assert sizes(cache) == before and (parent.full_lock_ref, parent.mamba_lock_ref) == (1, 0)
    t_parent = cache.inc_lock_ref(parent)  # now the parent holds a lock of its own
    cache.dec_lock_ref(child, swa_boundary_id=t_child)
    assert (parent.full_lock_ref, parent.mamba_lock_ref) == (1, 1)
    assert cache.evict(100, mamba_num=5).mamba_evicted == 1  # the child's; the parent's stays
    assert state(parent) == 7
    cache.dec_lock_ref(parent, swa_boundary_id=t_parent)
    cache._check_invariants()


def test_bad_key_or_value_wins_over_bad_state(make_cache):
    # Key, then KV value, then state slot are checked, in that order.
    cache = make_cache()
    with pytest.raises(InvalidValueError, match="indices"):
        cache.insert(K([1, 2]), i32([1]), mamba_value=-1)
    with pytest.raises(TypeError):
        cache.insert(K([1, 2]), i32([1, 2]), mamba_value=3, unknown=1)
    with pytest.raises(TypeError):
        cache.insert([1, 2], mamba_value=3)
    assert sizes(cache) == (0, 0, 0, 0, 0)


def test_the_state_pools_last_slot_is_a_state_like_any_other() -> None:
    """A pool that books states (slots 1..size): its last slot, size itself, is taken as a
    mamba_value and booked as the cache's like the others (the range check's upper bound)."""
    from pymllm.mem_cache import TokenToKVPoolAllocator

    kv, states = TokenToKVPoolAllocator(64), TokenToKVPoolAllocator(4)
    cache = MambaRadixCache(token_to_kv_pool_allocator=kv, mamba_pool=states)
    last = int(states.alloc(4)[-1])
    assert last == 4
    r = cache.insert(RadixKey([1, 2, 3]), kv.alloc(3), mamba_value=last)
    assert not r.mamba_exist and states.is_cached([last]).all()
    m = cache.match_prefix(RadixKey([1, 2, 3]))
    assert m.prefix_len == 3 and int(m.last_node.mamba_value[0]) == last
    cache.evict(3)
    assert not states.is_allocated([last]).any()


@pytest.mark.parametrize("save_at_branch", [False, True])
def test_saving_a_state_at_the_branching_point_makes_the_shared_prefix_hit(save_at_branch):
    """MambaRadixCache's docstring: with states saved only at each prompt's end, prompts
    that share a system prefix and then differ never hit; a request that stops at
    ``mamba_branching_seqlen`` and inserts the prefix with a state there makes every
    later request with that prefix hit it."""
    from pymllm.mem_cache import TokenToKVPoolAllocator

    kv, states = TokenToKVPoolAllocator(256), TokenToKVPoolAllocator(16)
    cache = MambaRadixCache(token_to_kv_pool_allocator=kv, mamba_pool=states)
    system = list(range(100, 108))
    hits = []
    for suffix in ([1, 2], [3, 4], [5, 6], [7, 8]):
        prompt = system + suffix
        m = cache.match_prefix(K(prompt))
        hits.append(m.prefix_len)
        slots = kv.alloc(len(prompt) - m.prefix_len, prefix=m.indices)
        b = m.mamba_branching_seqlen
        if save_at_branch and b is not None and m.prefix_len < b < len(prompt):
            r = cache.insert(K(prompt[:b]), slots[:b], mamba_value=states.alloc(1))
            assert not r.mamba_exist
            kv.free(slots[m.prefix_len : r.prefix_len])
            m = cache.match_prefix(K(prompt))
            assert m.prefix_len == b
            slots = np.concatenate([m.indices, slots[b:]])
        r = cache.insert(K(prompt), slots, mamba_value=states.alloc(1))
        assert not r.mamba_exist
        kv.free(slots[m.prefix_len : r.prefix_len])
    # the first request has nothing to match; the second finds the system prompt's KV
    # but no state at its end
    assert hits == ([0, 0, 8, 8] if save_at_branch else [0, 0, 0, 0])
    cache.reset()
    assert kv.available_size() == 256 and states.available_size() == 16
