"""An allocator's (or state pool's) ``free`` that stopped being callable after the cache
was built: the cache must not take nodes out of the tree and then drop their slots.

The constructor refuses a non-callable ``free`` for exactly this reason, and an ``evict``
whose ``free`` attribute is missing raises ``AttributeError`` with nothing changed; a
``free`` (or ``free_swa``, or a state pool's ``free``) replaced by a non-callable object
must be refused the same way, not found only once the nodes are gone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey


class Alloc:
    """Hands out slots 1, 2, 3, ... and records what is freed (both sides of a window)."""

    def __init__(self) -> None:
        self.next_slot = 1
        self.freed: set[int] = set()
        self.swa_freed: set[int] = set()

    def alloc(self, n: int) -> np.ndarray:
        out = np.arange(self.next_slot, self.next_slot + n, dtype=np.int32)
        self.next_slot += n
        return out

    def free(self, indices: Any) -> None:
        slots = set(np.asarray(indices).tolist())
        assert not slots & self.freed
        self.freed |= slots
        self.swa_freed |= slots

    def free_swa(self, indices: Any) -> None:
        slots = set(np.asarray(indices).tolist())
        assert not slots & self.swa_freed
        self.swa_freed |= slots

    @property
    def live(self) -> set[int]:
        return set(range(1, self.next_slot)) - self.freed

    @property
    def swa_live(self) -> set[int]:
        return set(range(1, self.next_slot)) - self.swa_freed


def tree_slots(cache: Any, live_window_only: bool = False) -> set[int]:
    out: set[int] = set()
    for node in cache._nodes():
        if live_window_only and node.swa_tombstone:
            continue
        out |= set(np.asarray(node.value).tolist())
    return out


def test_evict_with_free_replaced_by_non_callable_loses_no_slot() -> None:
    a = Alloc()
    cache = RadixCache(token_to_kv_pool_allocator=a)
    cache.insert(RadixKey([1, 2, 3]), a.alloc(3))
    a.free = None  # type: ignore[assignment,method-assign]
    with pytest.raises(TypeError, match="not callable"):
        cache.evict(3)
    cache._check_invariants()
    # every slot still allocated is the tree's: none was taken out and dropped
    assert a.live == tree_slots(cache)
    assert cache.total_size() == len(tree_slots(cache))


def test_reset_with_free_replaced_by_non_callable_loses_no_slot() -> None:
    a = Alloc()
    cache = RadixCache(token_to_kv_pool_allocator=a)
    cache.insert(RadixKey([1, 2, 3]), a.alloc(3))
    a.free = 0  # type: ignore[assignment,method-assign]
    with pytest.raises(TypeError, match="not callable"):
        cache.reset()
    assert a.live == tree_slots(cache)


def _windowed_two_nodes() -> tuple[Alloc, RadixCache]:
    """A window-1 cache holding [1, 2, 3] and, below it, [4] (the inner node can be
    tombstoned by an SWA evict)."""
    a = Alloc()
    cache = RadixCache(sliding_window_size=1, token_to_kv_pool_allocator=a)
    cache.insert(RadixKey([1, 2, 3]), a.alloc(3))
    m = cache.match_prefix(RadixKey([1, 2, 3]))
    cache.insert(RadixKey([1, 2, 3, 4]), np.concatenate([m.indices, a.alloc(1)]), prev_prefix_len=3)
    return a, cache


def test_swa_evict_with_free_swa_replaced_by_non_callable_loses_no_window_slot() -> None:
    a, cache = _windowed_two_nodes()
    a.free_swa = 5  # type: ignore[assignment,method-assign]
    with pytest.raises(TypeError, match="not callable"):
        cache.evict(0, 2)
    cache._check_invariants()
    # a tombstone's window slots were handed to free_swa; a live node's are still held
    assert a.swa_live == tree_slots(cache, live_window_only=True)


def test_windowed_insert_with_free_replaced_by_non_callable_loses_no_slot() -> None:
    a, cache = _windowed_two_nodes()
    cache.evict(0, 2)  # tombstones the inner node [1, 2, 3] (slots 1, 2, 3)
    new = a.alloc(3)  # the caller's: a revival of the tombstone would free 1, 2, 3
    a.free = None  # type: ignore[assignment,method-assign]
    with pytest.raises(TypeError, match="not callable"):
        cache.insert(RadixKey([1, 2, 3]), new)
    cache._check_invariants()
    # refused before anything changed: the tree keeps its slots and the caller its own
    assert a.live == tree_slots(cache) | set(new.tolist())


def test_mamba_evict_with_state_pool_free_replaced_by_non_callable_loses_no_state() -> None:
    a = Alloc()
    states = Alloc()
    cache = MambaRadixCache(token_to_kv_pool_allocator=a, mamba_pool=states)
    state = int(states.alloc(1)[0])
    cache.insert(RadixKey([1, 2]), a.alloc(2), mamba_value=state)
    states.free = "not callable"  # type: ignore[assignment,method-assign]
    with pytest.raises(TypeError, match="not callable"):
        cache.evict(2)
    cache._check_invariants()
    held = {
        int(np.asarray(n.mamba_value).reshape(-1)[0])
        for n in cache._nodes()
        if n.mamba_value is not None and np.asarray(n.mamba_value).size
    }
    assert states.live == held
    assert a.live == tree_slots(cache)


class CountingAlloc:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def free(self, indices: Any) -> None:
        self.calls.append(np.asarray(indices).tolist())

    def free_swa(self, indices: Any) -> None:
        self.calls.append(np.asarray(indices).tolist())


def test_insert_of_new_tokens_makes_no_empty_free_call() -> None:
    for window in (None, 2):
        a = CountingAlloc()
        cache = RadixCache(sliding_window_size=window, token_to_kv_pool_allocator=a)
        cache.insert(RadixKey([1, 2, 3]), np.array([1, 2, 3], np.int32))
        cache.insert(RadixKey([1, 2, 3, 4]), np.array([1, 2, 3, 4], np.int32), prev_prefix_len=3)
        assert a.calls == []


def test_insert_needing_no_free_runs_with_free_replaced() -> None:
    """Only an insert that will call ``free`` needs it callable."""
    a = CountingAlloc()
    cache = RadixCache(sliding_window_size=2, token_to_kv_pool_allocator=a)
    a.free = None  # type: ignore[assignment,method-assign]
    r = cache.insert(RadixKey([1, 2, 3]), np.array([1, 2, 3], np.int32))
    assert r.prefix_len == 0
    assert cache.total_size() == 3
