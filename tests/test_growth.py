"""Growth of the compiled tree's storage without a pass over it.

The node array grows by realloc alone: slots are initialized when first handed out (a
high-water mark), after the freed ones. The child map grows incrementally: a larger table is
started and the old one drained into it a few buckets per later reservation, while lookups
look in both. These tests drive both through many growths, with evictions, splits and
lookups of entries still in the old table, against the expected contents.
"""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache import RadixCache, RadixKey
from pymllm.mem_cache._allocator import TokenToKVPoolAllocator
from pymllm.mem_cache._radix_tree import _namespace_ids, _set_hash_key


def _cache() -> RadixCache:
    """A cache whose child map hashes with a fixed key: where the evicted leaves' deleted
    buckets fall, and so when the map grows and how long it drains, depends on the key
    each tree draws (the counts of lookups mid-drain below, with it)."""
    cache = RadixCache()
    _set_hash_key(cache, 0x0706050403020100, 0x0F0E0D0C0B0A0908)
    return cache


def _keys(n: int, seed: int = 0) -> np.ndarray:
    """n distinct 3-token keys (first tokens distinct: each is its own child of the root)."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 1 << 30, size=(n, 3), dtype=np.int32)
    keys[:, 0] = np.arange(n, dtype=np.int32)
    return keys


def test_map_drains_while_lookups_evictions_and_splits_go_on():
    n = 6000
    keys = _keys(n)
    vals = np.arange(1, 3 * n + 1, dtype=np.int32).reshape(n, 3)
    cache = _cache()
    cached: set[int] = set()
    rng = np.random.default_rng(1)
    draining_lookups = draining_inserts = 0
    for i in range(n):
        cache.insert(RadixKey(keys[i]), vals[i])
        cached.add(i)
        if not cache._storage_state()["map_draining"]:
            continue
        draining_inserts += 1
        # every cached key is found, in the old table or the new one (each lookup drains
        # a few buckets more, so the early ones look in the old table)
        for j in sorted(cached):
            draining_lookups += cache._storage_state()["map_draining"]
            m = cache.match_prefix(RadixKey(keys[j]))
            assert m.prefix_len == 3 and np.array_equal(m.indices, vals[j]), j
        if draining_inserts % 2:
            # a split of a node whose map entry may still be in the old table
            j = int(rng.choice(sorted(cached)))
            probe = keys[j].copy()
            probe[2] += 1
            assert cache.match_prefix(RadixKey(probe)).prefix_len == 2
        cache.evict(3)  # a least recently used leaf goes
        cached = {j for j in cached if cache.match_prefix(RadixKey(keys[j][:1])).prefix_len}
        cache._check_invariants()
    assert draining_lookups > 150, f"only {draining_lookups} lookups while the map drained"
    cache._check_invariants()
    for j in cached:
        m = cache.match_prefix(RadixKey(keys[j]))
        assert m.prefix_len == 3 and np.array_equal(m.indices, vals[j])
    state = cache._storage_state()
    assert state["map_capacity"] >= 2 * state["live"]


def test_freed_slots_are_reused_before_untouched_ones():
    keys = _keys(300, seed=2)
    cache = RadixCache()
    for k in keys[:200]:
        cache.insert(RadixKey(k))
    used = cache._storage_state()["slots_used"]
    assert used == 201  # the root and 200 leaves
    cache.evict(3 * 150)  # 150 leaves
    for k in keys[200:300]:  # 100 new leaves fit in the freed slots
        cache.insert(RadixKey(k))
    state = cache._storage_state()
    assert state["slots_used"] == used and state["live"] == 151
    assert state["node_capacity"] >= state["slots_used"]
    cache._check_invariants()
    for k in keys[250:300]:
        assert cache.match_prefix(RadixKey(k)).prefix_len == 3


def test_handles_to_never_used_slots_cannot_exist_after_reset():
    cache = RadixCache()
    keys = _keys(100, seed=3)
    handles = [cache.insert(RadixKey(k)).last_node for k in keys]
    cache.reset()
    assert cache._storage_state()["slots_used"] == 1
    assert all(h.evicted for h in handles)
    cache.insert(RadixKey(keys[0]))
    assert all(h.evicted for h in handles)  # slot 1 is reused with a new id
    cache._check_invariants()


@pytest.mark.parametrize("drain", [(0, 1), (0, 0)], ids=["one-bucket", "none"])
def test_lookups_and_changes_mid_drain_with_a_slow_drain(drain):
    """One bucket drained per reservation, or none (test settings; the default drains 8
    per reserved entry and 64 more): the map stays mid-drain for hundreds of operations, so
    lookups, splits and evictions meet entries whose probe chain crosses drained buckets;
    with none, every growth comes while the old table is not drained yet (its rest then
    moves into the newest table)."""
    from pymllm.mem_cache._radix_tree import _set_map_tuning

    previous = _set_map_tuning(*drain, 128)
    try:
        n = 700
        keys = _keys(n, seed=4)
        vals = np.arange(1, 3 * n + 1, dtype=np.int32).reshape(n, 3)
        cache = _cache()
        cached: set[int] = set()
        mid_drain = 0
        for i in range(n):
            cache.insert(RadixKey(keys[i]), vals[i])
            cached.add(i)
            if i % 10:
                continue
            for j in sorted(cached):
                mid_drain += cache._storage_state()["map_draining"]
                m = cache.match_prefix(RadixKey(keys[j]))
                assert m.prefix_len == 3 and np.array_equal(m.indices, vals[j]), j
            probe = keys[i].copy()
            probe[2] += 1  # splits leaf i after 2 tokens
            assert cache.match_prefix(RadixKey(probe)).prefix_len == 2
            cache.evict(5)  # the two halves of a split leaf, or two leaves
            cached = {j for j in cached if cache.match_prefix(RadixKey(keys[j])).prefix_len == 3}
            if i % 50 == 0:
                cache._check_invariants()
        assert mid_drain > 800, f"only {mid_drain} lookups mid-drain"
        cache._check_invariants()
    finally:
        _set_map_tuning(*previous)


def test_namespace_ids_are_reused_after_their_last_node_goes():
    """A server cycling through extra_keys (LoRA adapters, tenants) keeps a namespace table
    as large as the namespaces cached at once: an id whose last node is evicted is handed
    to the next new extra_key, not left behind (the table would grow with every key ever
    seen)."""
    alloc = TokenToKVPoolAllocator(64)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    for i in range(1000):
        cache.insert(RadixKey([1, 2], extra_key=f"lora-{i}"), alloc.alloc(2))
        if i % 2:  # two namespaces cached at once at most
            assert cache.evict(4).full_evicted == 4
    ever, free, registered = _namespace_ids(cache)
    # extra_key None's namespace (id 0) stays registered and is never freed
    assert registered == 1 and free == ever - 1 <= 2
    cache.insert(RadixKey([1, 2], extra_key="again"), alloc.alloc(2))
    assert _namespace_ids(cache) == (ever, free - 1, 2)
