"""State slot 0 is a valid Mamba state for a pool that does not book states (any object
with ``free``): ``mamba_value`` accepts [0, 2**31). The existing suite pins that a node
holding state 0 is matched (tests/test_tree_edges.py); these pin that ``evict`` and
``reset`` hand state 0 back to the pool like any other state. A tree that took slot 0 for
"no state" when a leaf is removed or the tree reset would leak that state: the pool
never gets it back.

Run against both the reference model ``RefMambaRadixCache`` and the compiled cache."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import RecordingAllocator, RecordingStates
from reference_mamba import RefMambaRadixCache

from pymllm.mem_cache import MambaRadixCache, RadixKey

CLASSES = {"ref": RefMambaRadixCache, "compiled": MambaRadixCache}


def make(impl: str) -> tuple[Any, RecordingAllocator, RecordingStates]:
    kv = RecordingAllocator()
    kv.alloc(99)
    states = RecordingStates()
    cache = CLASSES[impl](token_to_kv_pool_allocator=kv, mamba_pool=states)
    return cache, kv, states


def K(tokens: list[int]) -> RadixKey:
    return RadixKey(tokens)


@pytest.mark.parametrize("impl", ["ref", "compiled"])
def test_evict_hands_state_zero_to_the_pool(impl):
    cache, kv, states = make(impl)
    cache.insert(K([1, 2, 3]), np.array([11, 12, 13], dtype=np.int32), mamba_value=0)
    assert cache.mamba_evictable_size() == 1
    r = cache.evict(3)
    assert r.full_evicted == 3 and r.mamba_evicted == 1
    assert states.freed == [0]
    assert cache.mamba_evictable_size() == 0
    assert kv.freed == {11, 12, 13}
    cache._check_invariants()


@pytest.mark.parametrize("impl", ["ref", "compiled"])
def test_reset_hands_state_zero_to_the_pool(impl):
    cache, kv, states = make(impl)
    cache.insert(K([1, 2, 3]), np.array([11, 12, 13], dtype=np.int32), mamba_value=0)
    value = np.array([11, 12, 13, 14, 15], dtype=np.int32)
    cache.insert(K([1, 2, 3, 4, 5]), value, mamba_value=7)
    cache.reset()
    assert sorted(states.freed) == [0, 7]
    assert kv.freed == {11, 12, 13, 14, 15}
