"""ChunkCache: the no-op fallback."""

from __future__ import annotations

import numpy as np

from pymllm.mem_cache import BasePrefixCache, ChunkCache, EvictResult, RadixKey


class _NoFree:
    def free(self, indices):  # pragma: no cover - must never be called
        raise AssertionError("ChunkCache must not free anything")


def test_chunk_cache_never_hits_and_never_takes_ownership():
    c = ChunkCache(token_to_kv_pool_allocator=_NoFree())
    assert isinstance(c, BasePrefixCache)
    key = RadixKey([1, 2, 3])
    assert c.insert(key, np.array([4, 5, 6], dtype=np.int32)).prefix_len == 0
    m = c.match_prefix(key)
    assert m.indices.dtype == np.int32 and m.indices.shape == (0,)
    assert m.last_node is None and m.prefix_len == 0
    assert c.inc_lock_ref(m.last_node) is None
    c.dec_lock_ref(m.last_node)
    assert c.evict(100) == EvictResult()
    c.reset()
    assert c.total_size() == c.evictable_size() == c.protected_size() == 0
    assert c.swa_evictable_size() == c.swa_protected_size() == 0
