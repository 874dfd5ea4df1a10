"""The benchmark's SGLang-style baseline (bench/seed_style.py) is only a fair yardstick if it
does the same job: request by request it must hit the same tokens as RadixCache, evict the
same amount and leave the allocator in the same state (both keep LRU by the same clock)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pymllm.mem_cache import RadixCache, RadixKey
from pymllm.mem_cache.memory_pool import TokenToKVPoolAllocator

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
from seed_style import SeedStyleRadixCache


def _requests(as_list: bool) -> list:
    """30 base keys re-requested at random, cut short and extended: hits refresh recency,
    splits make inner nodes, and a 300-slot pool keeps evicting."""
    rng = np.random.default_rng(7)
    base = rng.integers(0, 1000, size=(30, 20), dtype=np.int32)
    out = []
    for _ in range(400):
        b = base[int(rng.integers(0, 30))][: int(rng.integers(5, 21))]
        tail = rng.integers(0, 1000, size=int(rng.integers(0, 8)), dtype=np.int32)
        key = np.concatenate([b, tail])
        out.append(key.tolist() if as_list else key)
    return out


def _serve_one(cache, alloc, tokens) -> tuple[int, int]:
    key = RadixKey(tokens)
    m = cache.match_prefix(key)
    cache.inc_lock_ref(m.last_node)
    need = len(tokens) - m.prefix_len
    short = need - alloc.available_size()
    evicted = cache.evict(short).full_evicted if short > 0 else 0
    value = np.concatenate([m.indices, alloc.alloc(need)])
    r = cache.insert(key, value)
    if r.prefix_len > m.prefix_len:
        alloc.free(value[m.prefix_len : r.prefix_len])
    cache.dec_lock_ref(m.last_node)
    return m.prefix_len, evicted


@pytest.mark.parametrize("as_list", [False, True], ids=["numpy-keys", "list-keys"])
def test_seed_style_baseline_matches_radix_cache(as_list: bool) -> None:
    pair = []
    for cls in (RadixCache, SeedStyleRadixCache):
        alloc = TokenToKVPoolAllocator(300, need_sort=False)
        pair.append((cls(token_to_kv_pool_allocator=alloc), alloc))
    evictions = 0
    for tokens in _requests(as_list):
        (got, got_alloc), (want, want_alloc) = pair
        hit, ev = _serve_one(got, got_alloc, tokens)
        assert (hit, ev) == _serve_one(want, want_alloc, tokens)
        assert got_alloc.available_size() == want_alloc.available_size()
        assert got.evictable_size() == want.evictable_size()
        assert got.protected_size() == want.protected_size() == 0
        evictions += ev > 0
    assert evictions > 10  # the pool is small enough that eviction order matters
