"""With a sliding window and ``eviction_policy="priority"``, an insert that raises the
priority of a cached node must reorder that node in the window's eviction order too, not
only in the full-KV order: the window phase of ``evict`` then takes the node of lowest
priority first. Run against both the reference model and the compiled cache."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RecordingSWAAllocator
from reference_swa import RefSWARadixCache

from pymllm.mem_cache import RadixCache, RadixKey

CLASSES = {"ref": RefSWARadixCache, "compiled": RadixCache}


@pytest.mark.parametrize("impl", ["ref", "compiled"])
def test_raised_priority_reorders_the_window_eviction(impl):
    alloc = RecordingSWAAllocator()
    evicted: list[int] = []
    cache = CLASSES[impl](
        sliding_window_size=8,
        token_to_kv_pool_allocator=alloc,
        on_node_evict=evicted.append,
        eviction_policy="priority",
    )
    ids = {}
    for tokens, prio in (([1, 2], 0), ([5, 6], 2), ([7, 8], 1)):
        r = cache.insert(RadixKey(tokens), alloc.alloc(2), priority=prio)
        ids[tokens[0]] = r.last_node.id
    # the same prompt again, at a higher priority: [1, 2] now ranks above the others
    again = alloc.alloc(2)
    r = cache.insert(RadixKey([1, 2]), again, priority=3)
    assert r.prefix_len == 2
    assert alloc.freed == set(again.tolist())  # with a window the tree frees duplicates
    cache._check_invariants()
    # the window phase takes the lowest priority first: [7, 8] (1), then [5, 6] (2)
    assert cache.evict(0, swa_num_tokens=1).swa_evicted == 2
    assert evicted == [ids[7]]
    assert cache.evict(0, swa_num_tokens=1).swa_evicted == 2
    assert evicted == [ids[7], ids[5]]
    cache._check_invariants()
    assert np.asarray(cache.match_prefix(RadixKey([1, 2])).indices).tolist() == [1, 2]
