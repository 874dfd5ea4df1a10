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
