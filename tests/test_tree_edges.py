"""Windowed, Mamba and eviction-policy behaviours of the tree that no test pinned (a
mutation-testing review of those paths of ``_radix_tree.pyx``; each test here fails on one
of its survivors and passes on the real code).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RecordingAllocator, RecordingStates  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import (
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    _radix_tree,
)
from pymllm.mem_cache.errors import InvalidValueError

# -- A node split keeps its eviction class (prio) in its upper half, under every policy
# where the class is not constant.
#
# Behaviour pinned: when an insert (or a match) splits a cached node, the upper half is the
# same cached tokens and must keep the node's eviction class: its LFU hit frequency, its
# FIFO insertion time, its insert(priority=) and its SLRU segment. Without it, a prefix that
# many requests share (high LFU count, a high request priority, the protected SLRU segment)
# drops to the lowest class the moment another request branches off it, and once its
# branches are gone it is evicted ahead of colder entries: a hot system prompt is thrown out
# before a one-off prompt, and every later request sharing it recomputes its prefill.
#
# The scenario: A is given a high class, D a middle one (D is locked meanwhile so that it
# survives while A's branches go); another insert splits A into U (the shared part) + X, and
# hangs a new leaf L under U. L and X are evicted, U becomes a leaf, D is unlocked: the next
# victim must be D (middle class), not U (A's high class).


def _insert(cache, alloc, tokens, **kw):
    return cache.insert(RadixKey(tokens), alloc.alloc(len(tokens)), **kw).last_node


def _node_with_key(cache, tokens):
    """Find a node by its own tokens without a match (a match would count a hit, and under
    LFU and SLRU a hit rewrites the class this test checks)."""
    return next(n for n in cache._nodes() if list(n.key.token_ids) == tokens)


@pytest.mark.parametrize("policy", ["lfu", "fifo", "priority", "slru"])
def test_upper_half_of_a_split_keeps_the_nodes_eviction_class(policy: str) -> None:
    alloc, evicted = RecordingAllocator(), []
    cache = RadixCache(
        1, token_to_kv_pool_allocator=alloc, on_node_evict=evicted.append, eviction_policy=policy
    )
    A, D, C = [1, 2, 3, 4], [7, 7], [1, 2, 5, 6]
    if policy == "fifo":
        cache.match_prefix(RadixKey([0]))  # tick the clock: D's insertion time is > 0
        d = _insert(cache, alloc, D)  # D inserted before A: older, evicted first
        _insert(cache, alloc, A)
    else:
        _insert(cache, alloc, A, **({"priority": 5} if policy == "priority" else {}))
        d = _insert(cache, alloc, D, **({"priority": 4} if policy == "priority" else {}))
    if policy == "lfu":
        for _ in range(3):
            cache.match_prefix(RadixKey(A))  # A: 3 hits
        cache.match_prefix(RadixKey(D))  # D: 1 hit
    if policy == "slru":
        cache.match_prefix(RadixKey(A))  # A: protected segment; D stays probationary
    cache.inc_lock_ref(d)
    # An insert (no match first: no hit is counted) splits A into U = [1, 2], which must
    # keep A's class, and X = [3, 4], and hangs the new leaf L = [5, 6] under U. Its [1, 2]
    # slots are duplicates, the caller's to free (the stub allocator does not care).
    _insert(cache, alloc, C)
    u = _node_with_key(cache, [1, 2])
    assert cache.evict(4).full_evicted == 4  # X and L go; U is now a leaf
    assert not u.evicted and u.lock_ref == 0
    if policy == "slru":
        # refresh D's recency without a hit (its own slots inserted again): under SLRU the
        # segment decides, not recency
        assert cache.insert(RadixKey(D), d.value).prefix_len == 2
    cache.dec_lock_ref(d)
    del evicted[:]
    cache.evict(1)
    assert evicted == [d.id], f"{policy}: the split's upper half lost its eviction class"
    cache._check_invariants()


# -- MambaRadixCache under eviction_policy="priority": an insert raises the existing path.
#
# Behaviour pinned: as in RadixCache, insert(priority=p) on a hybrid (attention + SSM) cache
# raises every node on the path to the key's end to at least p, for the KV eviction order and
# for the state eviction order alike, not only the nodes the insert creates. Without it, a
# scheduler that re-inserts a shared prompt with a high priority (a paying tier, a pinned
# system prompt) gets no protection for the part that was already cached: that prefix and its
# SSM state are evicted ahead of lower-priority entries, and every request on it pays the
# full prefill (and state recompute) again.


def _scenario(cache, kv):
    """A (priority 0) and B (priority 1) cached; A inserted again with priority 5."""
    kw = {"mamba_value": None} if isinstance(cache, MambaRadixCache) else {}
    a = cache.insert(RadixKey([1, 2]), kv.alloc(2), priority=0, **kw).last_node
    b = cache.insert(RadixKey([3, 4]), kv.alloc(2), priority=1, **kw).last_node
    # the same prompt again, its cached slots handed back, now with a high priority
    assert cache.insert(RadixKey([1, 2]), a.value, priority=5).prefix_len == 2
    return a, b


def test_reinsert_with_higher_priority_protects_the_cached_prefix_kv() -> None:
    for make in (
        lambda kv, st, ev: RadixCache(
            1, token_to_kv_pool_allocator=kv, on_node_evict=ev, eviction_policy="priority"
        ),
        lambda kv, st, ev: MambaRadixCache(
            1,
            token_to_kv_pool_allocator=kv,
            mamba_pool=st,
            on_node_evict=ev,
            eviction_policy="priority",
        ),
    ):
        kv, st, evicted = RecordingAllocator(), RecordingStates(), []
        cache = make(kv, st, evicted.append)
        _, b = _scenario(cache, kv)
        cache.evict(2)
        assert evicted == [b.id], f"{type(cache).__name__}: priority 5 prefix evicted first"
        cache._check_invariants()


def test_reinsert_with_higher_priority_protects_the_cached_state() -> None:
    kv, st, evicted = RecordingAllocator(), RecordingStates(), []
    cache = MambaRadixCache(
        1,
        token_to_kv_pool_allocator=kv,
        mamba_pool=st,
        on_node_evict=evicted.append,
        eviction_policy="priority",
    )
    a = cache.insert(RadixKey([1, 2]), kv.alloc(2), mamba_value=10, priority=0).last_node
    cache.insert(RadixKey([3, 4]), kv.alloc(2), mamba_value=11, priority=1)
    assert cache.insert(RadixKey([1, 2]), a.value, priority=5).prefix_len == 2
    cache.evict(0, mamba_num=1)
    assert st.freed == [11], "the state of the priority-5 prefix was dropped first"
    cache._check_invariants()


def test_reinsert_with_higher_priority_protects_the_swa_kv() -> None:
    """The same for the SWA eviction order of a sliding-window cache."""

    class RecordingSWAAllocator(RecordingAllocator):
        def free_swa(self, idx: np.ndarray) -> None:
            pass

    kv, evicted = RecordingSWAAllocator(), []
    cache = RadixCache(
        1,
        sliding_window_size=2,
        token_to_kv_pool_allocator=kv,
        on_node_evict=evicted.append,
        eviction_policy="priority",
    )
    a = cache.insert(RadixKey([1, 2]), kv.alloc(2), priority=0).last_node
    b = cache.insert(RadixKey([3, 4]), kv.alloc(2), priority=1).last_node
    assert cache.insert(RadixKey([1, 2]), a.value, priority=5).prefix_len == 2
    cache.evict(0, swa_num_tokens=2)
    assert evicted == [b.id], "the SWA KV of the priority-5 prefix was dropped first"
    cache._check_invariants()


# -- MambaRadixCache: state slot 0 is a state like any other.
#
# Behaviour pinned: insert(mamba_value=0) is accepted (slots in [0, 2**31) are valid, and a
# state pool other than this package's MambaPool may well hand out slot 0), so a node holding
# state 0 must be found by match_prefix like a node holding any other state. A match that
# took slot 0 for "no state" would return a shorter prefix (or nothing) for a prompt whose
# state is cached: the request recomputes the whole prefill, and the cached state is never
# hit again, while it is still counted and held.


def test_a_node_holding_state_slot_zero_is_matched() -> None:
    kv, states = RecordingAllocator(), RecordingStates()
    cache = MambaRadixCache(1, token_to_kv_pool_allocator=kv, mamba_pool=states)
    v = kv.alloc(4)
    cache.insert(RadixKey([1, 2]), v[:2], mamba_value=5)
    cache.insert(RadixKey([1, 2, 3, 4]), v, mamba_value=0)
    m = cache.match_prefix(RadixKey([1, 2, 3, 4, 9]))
    assert m.prefix_len == 4 and m.indices.tolist() == v.tolist()
    assert m.last_node.mamba_value.tolist() == [0]
    assert m.mamba_branching_seqlen is None
    assert cache.mamba_evictable_size() == 2
    cache._check_invariants()


# -- A booked Mamba state cannot be passed back at a key that ends inside its node.
#
# Behaviour pinned: over a state pool that books states (a TokenToKVPoolAllocator or a
# MambaPool), insert(key, mamba_value=s) where s is a state the cache already holds passes
# only as the node's own state handed back at exactly that node's key. A key that is a
# strict prefix of the node's key (it ends inside the node) names a different point of the
# sequence: the state after token 2 is not the state after token 4. Pristine code refuses it
# with InvalidValueError and changes nothing. If it were taken as "the node's own", the
# insert would split the node, attach nothing, report mamba_exist False (the caller then
# believes the tree owns the slot at the shorter prefix) and a later request matching that
# prefix would get no state while the engine thinks it saved one; worse, a caller that
# reuses that slot believing the tree holds it at the prefix corrupts the longer prompt's
# state.


def test_a_held_state_passed_at_a_shorter_key_inside_its_node_is_refused() -> None:
    kv = TokenToKVPoolAllocator(64)
    states = TokenToKVPoolAllocator(8)
    cache = MambaRadixCache(1, token_to_kv_pool_allocator=kv, mamba_pool=states)
    s = states.alloc(1)
    v = kv.alloc(4)
    cache.insert(RadixKey([1, 2, 3, 4]), v, mamba_value=s)
    before = [(n.id, list(n.key.token_ids)) for n in cache._nodes()]
    with pytest.raises(InvalidValueError, match="mamba_value: state slot"):
        cache.insert(RadixKey([1, 2]), v[:2], mamba_value=s)
    assert [(n.id, list(n.key.token_ids)) for n in cache._nodes()] == before  # no split
    cache._check_invariants()


# -- Over SWATokenToKVPoolAllocator with page_size 1, a windowed insert frees the SWA side of
# every token it stores as a tombstone, the last one included.
#
# Behaviour pinned: insert(..., swa_evicted_seqlen=e) stores tokens [matched, e) as a
# tombstone; over this package's SWATokenToKVPoolAllocator the tree frees whatever SWA KV
# those tokens still hold (documented in RadixCache.insert). The existing test only uses an
# allocator page of 2, where freeing a page frees both of its slots, so a slot missed at the
# end of the tombstone goes unnoticed. With page_size 1 every slot is its own page: a missed
# slot keeps an SWA slot allocated that no size counts (swa_evictable_size /
# swa_protected_size) and no evict ever frees. A serving engineer would see the SWA pool
# shrink by a slot or more per request that hands over a tombstone, until admission fails
# on an SWA pool that the cache reports as nearly empty.


@pytest.mark.parametrize("freed", [0, 2])
def test_new_tombstone_keeps_no_swa_kv_with_single_slot_pages(freed: int) -> None:
    alloc = SWATokenToKVPoolAllocator(32, 32, page_size=1)
    cache = RadixCache(1, sliding_window_size=2, token_to_kv_pool_allocator=alloc)
    v = alloc.alloc(6)
    alloc.free_swa(v[:freed])  # the request freed none, or only part, of its out-of-window SWA KV
    assert cache.insert(RadixKey(list(range(6))), v, swa_evicted_seqlen=4).prefix_len == 0
    assert alloc.translate_loc_from_full_to_swa(v[:4]).tolist() == [0] * 4
    swa_in_use = alloc.swa_size - alloc.swa_available_size()
    assert swa_in_use == cache.swa_evictable_size() + cache.swa_protected_size() == 2
    cache.evict(0, 2)
    assert alloc.swa_available_size() == alloc.swa_size
    cache._check_invariants()
    cache.reset()
    assert alloc.full_available_size() == alloc.size
    alloc._check_invariants()


# -- Over SWATokenToKVPoolAllocator, SWA eviction that tombstones a node hands its SWA slots
# back at once (its full KV stays cached).
#
# Behaviour pinned: evict(0, swa_num_tokens=n) on a windowed cache tombstones nodes that
# cannot be removed whole (inner nodes, or locked leaves outside any SWA lock); their SWA KV
# must go back to the SWA pool in that call, while their full-attention slots stay the
# cache's. The existing deterministic tests over this allocator only evict leaves whole
# (both sides freed together), so an SWA-only free that was skipped would be noticed only
# by the randomized serving test. Without it, the SWA pool would report the tokens as
# evicted (EvictResult.swa_evicted, swa_evictable_size both drop) while no SWA slot comes
# back: the scheduler evicts for SWA room, gets none, and admission stalls or loops on
# evict.


def test_tombstoning_an_inner_node_frees_its_swa_slots() -> None:
    alloc = SWATokenToKVPoolAllocator(64, 64, page_size=1)
    cache = RadixCache(1, sliding_window_size=2, token_to_kv_pool_allocator=alloc)
    a = alloc.alloc(4)
    cache.insert(RadixKey([1, 2, 3, 4]), a)
    b = alloc.alloc(2)
    assert cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), np.concatenate([a, b])).prefix_len == 4
    swa_free = alloc.swa_available_size()
    r = cache.evict(0, swa_num_tokens=4)  # the inner node [1..4] first (lowest id on a tie)
    assert r.full_evicted == 0 and r.swa_evicted == 4
    node = cache.match_prefix(RadixKey([1, 2, 3, 4])).last_node
    # the match is cut back: [1..4] is a tombstone with < window live tokens after it
    inner = next(n for n in cache._nodes() if list(n.key.token_ids) == [1, 2, 3, 4])
    assert inner.swa_tombstone and node.id == 0
    assert alloc.swa_available_size() == swa_free + 4, "tombstoned tokens kept their SWA slots"
    assert alloc.translate_loc_from_full_to_swa(a).tolist() == [0] * 4
    assert alloc.is_cached(a).all()  # the full side stays the cache's
    assert alloc.swa_size - alloc.swa_available_size() == cache.swa_evictable_size() == 2
    cache._check_invariants()
    alloc._check_invariants()
    cache.reset()
    assert (
        alloc.full_available_size() == alloc.size and alloc.swa_available_size() == alloc.swa_size
    )


# -- A Mamba evict that runs out of memory at any of its buffer growths leaves the tree
# whole and loses no slot or state.
#
# Behaviour pinned: every buffer a node's removal writes to (the evicted KV indices, the
# evicted node ids, and for a Mamba cache the evicted states) is grown before the node is
# touched, so a MemoryError midway through evict() leaves the node fully in the tree; the
# nodes removed before it are handed over (KV slots, states, on_node_evict) and the error is
# raised. The existing test injects the failure at one fixed growth (the KV index buffer's),
# never at the state buffer's. If the state buffer grew only inside the removal, a failure
# there would leave a node unlinked from the child map but still counted and held: later
# matches miss it, its KV slots and its state are never freed (a leak the size of the node
# per failure), and the tree's counters disagree with its contents. On a serving host under
# memory pressure that turns one failed evict into a permanent loss of KV pool capacity.


@pytest.mark.parametrize("count", range(8))
def test_mamba_evict_out_of_memory_at_any_growth_keeps_the_tree_whole(count: int) -> None:
    n_keys, key_len = 40, 8
    alloc, pool, reported = TokenToKVPoolAllocator(n_keys * key_len), RecordingStates(), []
    cache = MambaRadixCache(
        token_to_kv_pool_allocator=alloc, mamba_pool=pool, on_node_evict=reported.append
    )
    for i in range(n_keys):
        key = RadixKey(np.arange(i * key_len, (i + 1) * key_len, dtype=np.int32))
        cache.insert(key, alloc.alloc(key_len), mamba_value=i + 1)
    total = cache.total_size()
    _radix_tree._fail_scratch_growth_after(count)
    try:
        try:
            cache.evict(total)
        except MemoryError:
            pass
    finally:
        _radix_tree._fail_scratch_growth_after(-1)
    cache._check_invariants()
    removed = total - cache.total_size()
    assert alloc.available_size() == removed
    assert len(reported) == len(pool.freed) == removed // key_len
    assert cache.mamba_evictable_size() == n_keys - removed // key_len
    cache.evict(total)  # the rest, as usual
    assert cache.total_size() == 0 and alloc.available_size() == total
    assert sorted(pool.freed) == list(range(1, n_keys + 1))
    cache._check_invariants()


def test_a_bigram_split_whose_rest_overlaps_the_new_page_is_not_refused() -> None:
    """Node [(1,2),(3,4)]; insert [(1,2),(2,3)]: the match ends inside the node at 1, the
    node's rest is (3,4), the new leaf starts with (2,3), the tokens at offset 1 (not 2) of
    the node's key."""
    cache = RadixCache()
    cache.insert(RadixKey([(1, 2), (3, 4)]), np.array([1, 2], np.int32))
    res = cache.insert(RadixKey([(1, 2), (2, 3)]), np.array([1, 7], np.int32))
    assert res.prefix_len == 1 and cache.total_size() == 3
    cache._check_invariants()


def test_a_paged_split_differing_late_in_the_page_is_not_refused() -> None:
    """page_size 2: node [1,2,3,4]; insert [1,2,3,5]: the new page [3,5] and the node's
    rest [3,4] share their first token only."""
    for cache in (RadixCache(page_size=2), MambaRadixCache(page_size=2)):
        cache.insert(RadixKey(np.array([1, 2, 3, 4], np.int32)), np.arange(1, 5, dtype=np.int32))
        key = RadixKey(np.array([1, 2, 3, 5], np.int32))
        res = cache.insert(key, np.array([1, 2, 8, 9], np.int32))
        assert res.prefix_len == 2 and cache.total_size() == 6
        cache._check_invariants()


def test_a_bigram_child_page_is_looked_up_whole() -> None:
    """Bigram keys under a node, page_size 2: children [(5,6),(7,8)] and a new leaf
    [(5,6),(7,9)] differ only in the last token of their first page."""
    cache = RadixCache(page_size=2)
    base = [(1, 1), (2, 2)]
    cache.insert(RadixKey(base), np.array([1, 2], np.int32))
    cache.insert(RadixKey([*base, (5, 6), (7, 8)]), np.array([1, 2, 3, 4], np.int32))
    res = cache.insert(RadixKey([*base, (5, 6), (7, 9)]), np.array([1, 2, 5, 6], np.int32))
    assert res.prefix_len == 2 and cache.total_size() == 6
    cache._check_invariants()


def test_a_split_whose_new_page_is_the_nodes_first_page_is_not_refused() -> None:
    """Node [1,2,2,2]; insert [1,1,1,1]: the match ends inside it at 1 and the new leaf's
    page [1] is the node's own first page (a child of the root), not its rest [2]."""
    cache = RadixCache()
    cache.insert(RadixKey(np.array([1, 2, 2, 2], np.int32)), np.arange(1, 5, dtype=np.int32))
    res = cache.insert(RadixKey(np.array([1, 1, 1, 1], np.int32)), np.array([1, 6, 7, 8], np.int32))
    assert res.prefix_len == 1 and cache.total_size() == 7
    cache._check_invariants()
