"""The compiled caches' thread guard: a call that hands the GIL away in the middle (its
``on_node_evict`` or allocator callback runs Python code) still keeps other threads out
until it returns, and a callback that calls back into its own cache is refused cleanly."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from conftest import RecordingAllocator

from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey
from pymllm.mem_cache.errors import CacheError, ReentrantCallError


def _fill(cache: Any, alloc: RecordingAllocator, keys: list[list[int]]) -> None:
    for k in keys:
        cache.insert(RadixKey(k), alloc.alloc(len(k)))


READERS = {
    "match_prefix": lambda cache, node: cache.match_prefix(RadixKey([7, 8, 9])),
    "size query": lambda cache, node: cache.total_size(),
    "node handle": lambda cache, node: node.evicted,
}


@pytest.mark.parametrize("call", sorted(READERS))
@pytest.mark.parametrize("cls", [RadixCache, MambaRadixCache])
def test_other_threads_wait_while_a_callback_runs(cls: type, call: str) -> None:
    in_callback = threading.Event()
    b_started = threading.Event()
    b_done = threading.Event()
    seen_during_callback: list[bool] = []

    def on_evict(node_id: int) -> None:
        if in_callback.is_set():
            return
        in_callback.set()
        assert b_started.wait(5)
        # B is now calling match_prefix; give it every chance to run (it must not)
        for _ in range(50):
            threading.Event().wait(0.001)
        seen_during_callback.append(b_done.is_set())

    alloc = RecordingAllocator()
    cache = cls(token_to_kv_pool_allocator=alloc, on_node_evict=on_evict)
    _fill(cache, alloc, [[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    node = cache.match_prefix(RadixKey([7, 8, 9])).last_node
    errors: list[BaseException] = []

    def thread_b() -> None:
        try:
            assert in_callback.wait(5)
            b_started.set()
            READERS[call](cache, node)
            b_done.set()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=thread_b)
    t.start()
    assert cache.evict(6).full_evicted == 6
    t.join(10)
    assert not t.is_alive() and not errors
    assert seen_during_callback == [False], "another thread ran inside a running evict"
    assert b_done.is_set()
    cache._check_invariants()


def test_reentrant_call_from_a_callback_is_refused() -> None:
    alloc = RecordingAllocator()
    seen: list[Any] = []
    cache: RadixCache

    def on_evict(node_id: int) -> None:
        # O(1) size queries are allowed inside a callback; tree calls are not
        seen.append(cache.total_size())
        try:
            cache.match_prefix(RadixKey([4, 5]))
        except ReentrantCallError as exc:
            seen.append(exc)

    cache = RadixCache(token_to_kv_pool_allocator=alloc, on_node_evict=on_evict)
    _fill(cache, alloc, [[1, 2], [4, 5]])
    assert cache.evict(1).full_evicted == 2
    assert seen[0] == 2
    assert isinstance(seen[1], ReentrantCallError) and isinstance(seen[1], CacheError)
    assert "callback" in str(seen[1])
    # the refused call changed nothing and the outer one completed
    cache._check_invariants()
    assert cache.match_prefix(RadixKey([4, 5])).prefix_len == 2
    assert cache.evict(10).full_evicted == 2
    alloc.assert_all_free()


def test_guard_is_released_after_an_error() -> None:
    cache = RadixCache()
    with pytest.raises(CacheError):
        cache.insert(RadixKey([1, 2]), np.array([1], dtype=np.int32))
    with pytest.raises(TypeError):
        cache.match_prefix([1, 2])
    # a later call from another thread does not wait forever on a guard left set
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(cache.insert(RadixKey([1]), [3]).prefix_len))
    t.start()
    t.join(5)
    assert out == [0]
