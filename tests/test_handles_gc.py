"""Node handles must not keep a cache alive behind the garbage collector's back.

The common serving shape is a cycle: a scheduler owns the cache, the cache calls back into
the scheduler on eviction (``on_node_evict=self.on_evict``), and the scheduler keeps node
handles, which refer to their cache. Such a cycle must be collected once the scheduler is
dropped, whatever the cache kind.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any

import numpy as np
import pytest
from conftest import collects_inside_calls  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey


def _radix(on_evict):
    return RadixCache(on_node_evict=on_evict)


def _swa(on_evict):
    return RadixCache(sliding_window_size=4, on_node_evict=on_evict)


def _mamba(on_evict):
    return MambaRadixCache(on_node_evict=on_evict)


class _Scheduler:
    def __init__(self, make) -> None:
        self.cache = make(self.on_evict)
        key = RadixKey([1, 2, 3, 4, 5])
        if isinstance(self.cache, MambaRadixCache):
            self.cache.insert(key, np.arange(1, 6, dtype=np.int32), mamba_value=1)
        else:
            self.cache.insert(key, np.arange(1, 6, dtype=np.int32))
        self.last: Any = self.cache.match_prefix(key).last_node
        self.evicted: list[int] = []

    def on_evict(self, node_id: int) -> None:
        self.evicted.append(node_id)


@pytest.mark.parametrize("make", [_radix, _swa, _mamba], ids=["radix", "swa", "mamba"])
def test_a_scheduler_holding_handles_is_collected(make) -> None:
    scheduler = _Scheduler(make)
    assert scheduler.last.id > 0  # a live handle into the cache that calls back into it
    gone = weakref.ref(scheduler)
    del scheduler
    gc.collect()
    assert gone() is None


_FIND_HANDLES = """
import gc
from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey, TreeNode


def poke():
    for o in gc.get_objects():
        if isinstance(o, TreeNode):
            print(o.id, o.evicted, flush=True)
"""


@pytest.mark.parametrize(
    "during",
    [
        """
class K:
    armed = False
    def __hash__(self):
        if K.armed:
            poke()
        return 1
    def __eq__(self, other):
        return isinstance(other, K)
cache, k = RadixCache(), K()
cache.insert(RadixKey([1, 2, 3], k), [10, 11, 12])
K.armed = True
cache.insert(RadixKey([1, 2, 3, 4], k), [10, 11, 12, 13])
""",
        """
import numpy as np
class S:
    def __array__(self, dtype=None, copy=None):
        poke()
        return np.array([3])
MambaRadixCache().insert(RadixKey([1, 2]), [10, 11], mamba_value=S())
""",
        """
from pymllm.mem_cache import SWATokenToKVPoolAllocator
class A(SWATokenToKVPoolAllocator):
    def free(self, free_index):
        poke()
        super().free(free_index)
alloc = A(64, 64, need_sort=False)
cache = RadixCache(sliding_window_size=2, token_to_kv_pool_allocator=alloc)
cache.insert(RadixKey([1, 2, 3, 4]), alloc.alloc(4), swa_evicted_seqlen=4)
""",
    ],
    ids=["extra_key-hash", "mamba_value-array", "allocator-free"],
)
def test_a_handle_found_while_an_insert_runs_python_code_is_valid(during: str) -> None:
    """An insert allocates its result's handle before the tree changes and runs Python
    code after that (an extra_key's __hash__, a state's __array__, a Python allocator's
    free): the collector can hand the handle to that code, and reading it crashed while it
    named no tree. It names the root until the insert aims it."""
    from conftest import run_child

    out = run_child(_FIND_HANDLES + during + "\nprint('done')")
    assert out.rstrip().endswith("done")


@collects_inside_calls
@pytest.mark.parametrize("finalizer", ["evicts", "evicts and inserts"])
def test_parent_read_while_the_collector_changes_the_tree(finalizer: str) -> None:
    """``handle.parent`` makes a new handle, and that allocation can run the collector,
    whose finalizers may evict the parent (and reuse its slot). It read the parent's slot
    first and aimed the handle at it after: a handle to a free slot (id -1, not evicted,
    lockable, counters driven negative, a segfault on .key), or to an unrelated node that
    took the slot. Now the node is read after the allocation."""
    from pymllm.mem_cache import TokenToKVPoolAllocator
    from pymllm.mem_cache.errors import StaleNodeError

    alloc = TokenToKVPoolAllocator(64)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey([1, 2]), alloc.alloc(2))
    leaf = cache.insert(RadixKey([1, 2, 3, 4]), alloc.alloc(4)).last_node

    class Request:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

        def __del__(self) -> None:
            cache.evict(100)
            if finalizer == "evicts and inserts":
                cache.insert(RadixKey([9, 9]), alloc.alloc(2))

    gc.collect()
    Request()
    old = gc.get_threshold()
    stale = False
    gc.set_threshold(1)  # the next tracked allocation (the new handle's) collects
    try:
        _ = leaf.parent  # nothing else may allocate between the threshold and this
    except StaleNodeError:
        stale = True
    finally:
        gc.set_threshold(*old)
    assert stale and leaf.evicted
    cache._check_invariants()
    assert cache.evictable_size() == cache.total_size() == (2 if "inserts" in finalizer else 0)


@collects_inside_calls
def test_tuple_key_read_while_the_collector_changes_the_tree() -> None:
    """``handle.key`` of a tuple-token node read the node's length after building the list
    of tuples, an allocation that can run the collector, whose finalizers may evict the
    node and reuse its slot: "cannot reshape array of size 8 into shape (7,2)", or a length
    read from freed memory. Every field is now read, and the tokens copied, first: the key
    comes back as it was when the read began."""
    from pymllm.mem_cache import TokenToKVPoolAllocator

    alloc = TokenToKVPoolAllocator(4096)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    pairs = [(1, 1), (2, 2), (3, 3), (4, 4)]
    leaf = cache.insert(RadixKey(pairs), alloc.alloc(4)).last_node

    class Request:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            cache.evict(10**6)
            for i in range(300):  # reuses the slot and moves the node array
                cache.insert(RadixKey([(9, i)] * 7), alloc.alloc(7))

    gc.collect()
    Request()
    old = gc.get_threshold()
    gc.set_threshold(1)
    try:
        key = leaf.key
    finally:
        gc.set_threshold(*old)
    assert key.token_ids == pairs and leaf.evicted
    cache._check_invariants()


def test_the_unguarded_children_map_is_not_reachable_from_python() -> None:
    """``_children_slots`` walked the node array with no call guard, allocating as it went:
    a collection whose finalizer reset the cache shrank the array under the loop (a
    segfault). It is now C-only, used under the guard by children(), pretty_print() and
    _check_invariants()."""
    cache = RadixCache()
    assert not hasattr(cache, "_children_slots")
    node = cache.insert(RadixKey([1, 2, 3]), [1, 2, 3]).last_node
    assert cache.children(cache.root_node) == [node]
