"""The page rounding of ``swa_evicted_seqlen`` in a windowed insert over the real paged
``SWATokenToKVPoolAllocator``, for every residue of the boundary in a page.

The tree makes the new suffix a tombstone up to ``swa_evicted_seqlen`` rounded up to a whole
tree page. The other hand-computed tests pin that rounding on a few boundaries only (such as
3, 4 and 5 at page 2, 2 and 6 at page 4), so two mis-roundings passed every deterministic
test of the suite and were left to the randomized (hypothesis) state machines: rounding to
the nearest page (``+ P // 2`` instead of ``+ P - 1``: the same as rounding up at page 2,
and at page 4 for a boundary 2 or 3 past a page, but down for one 1 past a page) and
rounding with a bit mask (``& -P``: right for a power-of-two page only, so at a page of 3 a
tombstone ends inside a page). The test below sweeps every boundary from 0 to past the
key's end at pages of 4 and 3 and at a tree page of two allocator pages, and reads the
result through the public API only: the tree's sizes and handles, ``match_prefix``, and the
allocator's sizes, ``is_cached`` and ``translate_loc_from_full_to_swa``.
"""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache import RadixCache, RadixKey, SWATokenToKVPoolAllocator


def _swa_live(alloc: SWATokenToKVPoolAllocator, slots: np.ndarray) -> list[bool]:
    """Which of the full slots still have an SWA slot."""
    return (alloc.translate_loc_from_full_to_swa(slots) != 0).tolist()


@pytest.mark.parametrize(("tree_page", "alloc_page"), [(4, 4), (3, 3), (4, 2)])
@pytest.mark.parametrize("evicted", range(0, 19))
def test_swa_evicted_seqlen_rounds_up_to_the_next_page_boundary(
    evicted: int, tree_page: int, alloc_page: int
) -> None:
    """An insert of 4 tree pages with ``swa_evicted_seqlen=e``: the new suffix is a tombstone
    up to ``ceil(e / page) * page`` (a whole tree page) and live after it; when that reaches
    the key's end nothing is cached and every slot goes back to the pool. The caller freed
    the SWA side of the allocator pages wholly below ``e``; the tree frees the rest of the
    tombstone's SWA side, and not one page more. With a window of 2 tree pages the whole key
    matches only while that many live tokens follow the tombstone. Exact multiples of the
    page (no rounding), one past them (a whole page more) and one or two short of them
    (rounded up, never down or to the nearest page) are all pinned, at a page of 3 (not a
    power of two) too, as is the pool after a full evict (no SWA slot lost or freed
    twice)."""
    tp = tree_page
    n = 4 * tp  # the key: 4 tree pages
    alloc = SWATokenToKVPoolAllocator(2 * n, 2 * n, page_size=alloc_page)
    cache = RadixCache(page_size=tp, sliding_window_size=2 * tp, token_to_kv_pool_allocator=alloc)
    key = list(range(1, n + 1))
    value = alloc.alloc(n)
    assert value is not None
    below = min(evicted, n) // alloc_page * alloc_page  # the caller's SWA pages to free
    if below:
        alloc.free_swa(value[:below])
    r = cache.insert(RadixKey(key), value, swa_evicted_seqlen=evicted)
    tomb = min(-(-evicted // tp) * tp, n)  # rounded up to a tree page, at most the key
    if tomb == n:
        # the whole suffix lost its SWA KV: nothing cached, every slot back in the pool
        assert r.prefix_len == 0 and r.last_node == cache.root_node
        assert cache.total_size() == 0 and cache.swa_evictable_size() == 0
        assert alloc.full_available_size() == 2 * n and alloc.swa_available_size() == 2 * n
        return
    assert r.prefix_len == 0 and not r.last_node.swa_tombstone
    assert r.last_node.value.tolist() == value[tomb:].tolist()
    parent = r.last_node.parent
    assert parent is not None
    if tomb:
        assert parent.swa_tombstone and parent.value.tolist() == value[:tomb].tolist()
    else:
        assert parent == cache.root_node
    assert cache.evictable_size() == n
    assert cache.swa_evictable_size() == n - tomb
    assert _swa_live(alloc, value) == [False] * tomb + [True] * (n - tomb)
    assert alloc.swa_available_size() == 2 * n - (n - tomb)
    assert alloc.full_available_size() == n
    assert alloc.is_cached(value).all()
    assert cache.match_prefix(RadixKey(key)).prefix_len == (n if n - tomb >= 2 * tp else 0)
    assert cache.evict(n).full_evicted == n
    assert cache.total_size() == 0
    assert alloc.full_available_size() == 2 * n and alloc.swa_available_size() == 2 * n
