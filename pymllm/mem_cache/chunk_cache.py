"""``ChunkCache``: the no-op prefix cache used when prefix caching is disabled."""

from __future__ import annotations

from typing import Any

import numpy as np

from pymllm.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    EvictResult,
    InsertResult,
    MatchResult,
    RadixKey,
)


class ChunkCache(BasePrefixCache):
    """A cache that caches nothing.

    ``match_prefix`` always misses, ``insert`` takes ownership of nothing (every index the
    caller passes stays the caller's to free: ``prefix_len`` is 0), ``evict`` frees nothing
    and locks are no-ops. Use it to serve without prefix reuse through the same scheduler
    code path as :class:`~pymllm.mem_cache.radix_cache.RadixCache`, provided that path
    frees what the cache did not take: a loop that frees only the duplicates a radix
    insert reports would leak every slot here. ``pymllm.engine`` measures what an insert
    took as the growth of ``total_size()`` (always 0 here) and frees the rest when the
    request ends.
    """

    def __init__(self, token_to_kv_pool_allocator: Any = None) -> None:
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator

    def reset(self) -> None:
        """Nothing is cached, so nothing is cleared."""

    def match_prefix(self, key: RadixKey) -> MatchResult:
        """Always a miss: empty int32 ``indices``, ``prefix_len`` 0, ``last_node`` None."""
        return MatchResult(indices=np.zeros(0, dtype=np.int32), last_node=None, prefix_len=0)

    def insert(self, key: RadixKey, value: Any = None, **kwargs: Any) -> InsertResult:
        """Stores nothing: the caller keeps ownership of every index in *value*."""
        return InsertResult(prefix_len=0, last_node=None)

    def evict(self, num_tokens: int, swa_num_tokens: int = 0, **kwargs: Any) -> EvictResult:
        """Nothing to evict."""
        return EvictResult()

    def inc_lock_ref(self, node: Any) -> None:
        """No-op; returns None (the token to hand back to :meth:`dec_lock_ref`)."""
        return None

    def dec_lock_ref(self, node: Any, **kwargs: Any) -> None:
        """No-op."""

    def pretty_print(self) -> None:
        print("ChunkCache (caches nothing)")


__all__ = ["ChunkCache"]
