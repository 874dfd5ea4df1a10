"""``MambaRadixCache``: prefix caching for hybrid attention + SSM (Mamba / GDN) models.

A cached prefix of a hybrid model is reusable only where the recurrent state at exactly
that prefix's end was saved. The compiled core
(:class:`~pymllm.mem_cache._radix_tree.MambaTreeCore`) is the same radix tree as
``RadixCache`` (one copy of the tree code) with one optional state slot per node.
"""

from __future__ import annotations

from pymllm.mem_cache._radix_tree import MambaTreeCore, MambaTreeNode
from pymllm.mem_cache.base_prefix_cache import BasePrefixCache


# The ignore: dec_lock_ref takes swa_boundary_id only, as in RadixCache.
class MambaRadixCache(MambaTreeCore, BasePrefixCache):  # type: ignore[misc]
    """Radix-tree prefix cache with independent Mamba/SSM state tracking.

    ``MambaRadixCache(page_size=1, token_to_kv_pool_allocator=None, mamba_pool=None,
    on_node_evict=None, eviction_policy="lru")``; ``mamba_pool`` is anything with
    ``free(int32 slots)`` (normally :class:`~pymllm.mem_cache.memory_pool.MambaPool`).
    ``eviction_policy`` as in RadixCache; it orders both the KV leaves and the states
    that ``evict(..., mamba_num=)`` drops.

    Ownership: KV slots as in :class:`~pymllm.mem_cache.radix_cache.RadixCache`. A state
    slot passed to ``insert`` becomes the tree's unless ``InsertResult.mamba_exist`` is True;
    states leave the tree only through ``evict``/``reset`` or when the cache is dropped.
    A pool that is a ``TokenToKVPoolAllocator`` or a ``SWATokenToKVPoolAllocator``, or has
    one as ``slot_allocator`` (``MambaPool``), must have ``page_size`` 1
    (``InvalidValueError`` otherwise: a paged free would free a state's neighbours too).
    A ``TokenToKVPoolAllocator`` books the states the tree holds as the cache's: the
    pool's ``free`` refuses them (``InvalidFreeError``), ``insert`` refuses a state that
    is free or another node's (``InvalidValueError``, nothing changed), and the tree frees
    them straight into that allocator. Any other pool gets them back through
    ``mamba_pool.free``.
    ``match_prefix`` results end at a node holding a state; copy that state
    (``last_node.mamba_value``) into the request's own slot before extending it. So a
    request that caches a chunk without a state and goes on cannot get the tree's slots
    for that chunk back from a match: it keeps reading the slots it passed (its duplicates
    it frees when it ends; they hold the same KV as the tree's copies), and it locks the
    insert's ``last_node`` before any ``evict`` can run, since the slots the tree took
    are not locked by its match's lock (as in ``RadixCache.insert``).

    Where states are saved decides the hit rate: a match stops at the last node with a
    state, even where the KV matches further. ``MatchResult.mamba_branching_seqlen``, when
    not None, is how far the KV matches (whole pages): a request that stops its prefill
    there, inserts ``key[:mamba_branching_seqlen]`` with a copy of its state at that point
    (``insert(..., mamba_value=slot)``), then goes on, lets every later request with that
    prefix hit it. A loop that saves a state only at each prompt's end hits only where a
    whole earlier prompt is a prefix of the new one.

    Locks: ``inc_lock_ref(node)`` returns a token (True when it also locked the node's
    state); pass it back to ``dec_lock_ref`` on the same node. As in RadixCache, a node
    whose locks are all its descendants' cannot be unlocked (``LockStateError``): undoing a
    descendant's lock through an ancestor would strand that lock, and here could leave a
    locked state that no KV lock covers, which ``evict`` would then free.

    Thread safety: as RadixCache (each call atomic, guarded against the threads its
    callbacks may let in; re-entry from a callback raises ``ReentrantCallError``).
    """

    __slots__ = ()


__all__ = ["MambaRadixCache", "MambaTreeNode"]
