"""A windowed tree over the real paged ``SWATokenToKVPoolAllocator``: two cases that a
mutation sweep of that path (session 36: 16 mutants of the windowed insert, the SWA lock
walk, the SWA eviction phase and the paged SWA allocator) found only slow or rare
randomized runs reaching. Each fails on one of those mutants."""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache import (
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import InvalidValueError

P = 4


def _windowed(size: int) -> tuple[SWATokenToKVPoolAllocator, RadixCache]:
    alloc = SWATokenToKVPoolAllocator(size, size, page_size=P)
    cache = RadixCache(page_size=P, sliding_window_size=P, token_to_kv_pool_allocator=alloc)
    return alloc, cache


@pytest.mark.parametrize("order", ["last page first", "last page second"])
def test_a_new_tombstone_on_the_pools_last_page_loses_its_swa_side(order: str) -> None:
    """swa_evicted_seqlen=6 rounds up to 8: the key's first two pages become a tombstone.
    The caller freed none of their SWA KV, so the tree frees what they still hold, on the
    pool's highest page as on any other (that page's slots end one short of the mapping's
    length; a bound a page lower would skip it and leave 4 SWA slots no size counts)."""
    alloc, cache = _windowed(12)
    x = alloc.alloc(12)  # pages 1..3: slots 4..15; page 3 is the pool's last
    assert x is not None
    pages = [x[8:], x[4:8], x[:4]] if order == "last page first" else [x[4:8], x[8:], x[:4]]
    value = np.concatenate(pages)
    result = cache.insert(RadixKey(list(range(12))), value, swa_evicted_seqlen=6)
    assert result.prefix_len == 0
    assert alloc.translate_loc_from_full_to_swa(value[:8]).tolist() == [0] * 8
    assert (alloc.translate_loc_from_full_to_swa(value[8:]) != 0).all()
    assert alloc.swa_available_size() == 8
    assert cache.swa_evictable_size() == 4 and cache.evictable_size() == 12
    assert alloc.is_cached(value).all()
    alloc._check_invariants()
    cache._check_invariants()


@pytest.mark.parametrize("window", [True, False])
def test_a_run_of_consecutive_slots_across_two_pages_is_not_a_page(window: bool) -> None:
    """Each page of an inserted value must be one of the allocator's pages: slots 5..8 are
    consecutive but lie in pages 1 and 2, so the tree refuses them (a page boundary is
    checked, not only consecutiveness) and nothing changes hands. With and without a
    window: both allocators book pages through the same code."""
    alloc: SWATokenToKVPoolAllocator | TokenToKVPoolAllocator
    if window:
        alloc, cache = _windowed(8)
    else:
        alloc = TokenToKVPoolAllocator(8, page_size=P)
        cache = RadixCache(page_size=P, token_to_kv_pool_allocator=alloc)
    x = alloc.alloc(8)  # slots 4..11
    assert x is not None
    with pytest.raises(InvalidValueError):
        cache.insert(RadixKey([1, 2, 3, 4]), x[1:5])  # [5, 6, 7, 8]
    assert not alloc.is_cached(x).any() and alloc.is_allocated(x).all()
    if isinstance(alloc, SWATokenToKVPoolAllocator):
        assert (alloc.translate_loc_from_full_to_swa(x) != 0).all()
    assert cache.total_size() == 0
    alloc.free(x)
    assert alloc.available_size() == 8
    alloc._check_invariants()
    cache._check_invariants()
