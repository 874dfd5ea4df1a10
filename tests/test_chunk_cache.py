"""ChunkCache: the no-op fallback."""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache import (
    BasePrefixCache,
    ChunkCache,
    EvictResult,
    MambaRadixCache,
    RadixCache,
    RadixKey,
)


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


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda c: c.match_prefix([1, 2]), id="match-a-list"),
        pytest.param(lambda c: c.insert("abc"), id="insert-a-str"),
        pytest.param(lambda c: c.insert(RadixKey([1]), [1], prev_prefix=0), id="insert-typo"),
        pytest.param(lambda c: c.evict(1.5), id="evict-a-float"),
        pytest.param(lambda c: c.evict(True), id="evict-a-bool"),
        pytest.param(lambda c: c.evict(1, "2"), id="evict-swa-a-str"),
        pytest.param(lambda c: c.evict(1, mamba_num=0.5), id="evict-mamba-a-float"),
        pytest.param(lambda c: c.evict(1, mamba=1), id="evict-typo"),
        pytest.param(lambda c: c.evict(np.array(1.5)), id="evict-a-float-array"),
        pytest.param(lambda c: c.evict(np.array([3])), id="evict-a-1-d-array"),
        pytest.param(lambda c: c.evict(np.array(True)), id="evict-a-bool-array"),
        pytest.param(lambda c: c.evict(1, mamba_num=np.array(0.5)), id="evict-mamba-float-array"),
        pytest.param(lambda c: c.inc_lock_ref(42), id="lock-not-its-node"),
        pytest.param(lambda c: c.dec_lock_ref(42), id="unlock-not-its-node"),
        pytest.param(lambda c: c.dec_lock_ref(None, swa_boundary=1), id="unlock-typo"),
        pytest.param(lambda c: c.insert(RadixKey([1]), [1], priority=1.5), id="priority-float"),
        pytest.param(lambda c: c.insert(RadixKey([1]), [1], priority=True), id="priority-bool"),
        pytest.param(lambda c: c.insert(RadixKey([1]), [1], priority=None), id="priority-none"),
        pytest.param(lambda c: c.evict(1, 2, mamba_num=1), id="mamba-count-twice"),
    ],
)
def test_chunk_cache_refuses_what_the_radix_caches_refuse(call):
    """A scheduler's wrong argument raised on the radix caches and passed on ChunkCache, so
    it showed only once caching was turned on."""
    with pytest.raises(TypeError):
        call(ChunkCache(token_to_kv_pool_allocator=_NoFree()))


@pytest.mark.parametrize("priority", [1.5, True, None])
@pytest.mark.parametrize("cache_cls", [RadixCache, MambaRadixCache])
def test_the_radix_caches_refuse_a_priority_before_reading_tokens(cache_cls, priority):
    """The radix side of the priority cases above: a key they would refuse is not read."""
    with pytest.raises(TypeError, match="priority"):
        cache_cls().insert(RadixKey([-5, 1]), [1, 2], priority=priority)


def test_mamba_refuses_a_state_count_given_twice():
    """The radix side of ``mamba-count-twice`` above."""
    with pytest.raises(TypeError, match="once"):
        MambaRadixCache().evict(1, 2, mamba_num=1)


def test_chunk_cache_takes_the_radix_caches_keywords():
    c = ChunkCache()
    key = RadixKey([1, 2])
    kwargs = {"prev_prefix_len": 0, "swa_evicted_seqlen": 0, "priority": 3, "mamba_value": 1}
    assert c.insert(key, [1, 2], **kwargs).prefix_len == 0
    assert c.evict(np.int64(4), 0, mamba_num=1) == EvictResult()
    assert c.evict(0, mamba_num=None) == EvictResult()
    c.dec_lock_ref(c.inc_lock_ref(None), swa_boundary_id=None)


@pytest.mark.parametrize("priority", [2**63, -(2**63) - 1, 2**70])
@pytest.mark.parametrize("cache_cls", [ChunkCache, RadixCache, MambaRadixCache])
def test_every_cache_refuses_a_priority_past_64_bits(cache_cls, priority):
    """ChunkCache took one; the radix caches refuse it before reading the key."""
    from pymllm.mem_cache.errors import InvalidValueError

    with pytest.raises(InvalidValueError, match="priority: expected a 64-bit int"):
        cache_cls().insert(RadixKey([-5, 1]), [1, 2], priority=priority)


@pytest.mark.parametrize("priority", [2**63 - 1, -(2**63)])
@pytest.mark.parametrize("cache_cls", [ChunkCache, RadixCache, MambaRadixCache])
def test_every_cache_takes_a_priority_at_the_64_bit_ends(cache_cls, priority):
    assert cache_cls().insert(RadixKey([1, 2]), [1, 2], priority=priority).prefix_len == 0
