"""``RadixCache``: the compiled radix-tree prefix cache.

The tree itself (node storage, child hash map, eviction heap, locking) is the Cython class
:class:`~pymllm.mem_cache._radix_tree.RadixTreeCore`; this module binds it to the
:class:`~pymllm.mem_cache.base_prefix_cache.BasePrefixCache` interface.
"""

from __future__ import annotations

from pymllm.mem_cache._radix_tree import RadixTreeCore, TreeNode
from pymllm.mem_cache.base_prefix_cache import BasePrefixCache


class RadixCache(RadixTreeCore, BasePrefixCache):
    """Radix-tree prefix cache: repeated prompt prefixes reuse their KV slots.

    ``RadixCache(page_size=1, sliding_window_size=None, token_to_kv_pool_allocator=None,
    on_node_evict=None)``

    * ``page_size``: keys are matched and stored in whole pages of this many tokens.
    * ``token_to_kv_pool_allocator``: anything with ``free(int32 array)``; evicted KV slots
      go back through it.
    * ``on_node_evict``: optional ``callback(node_id)`` called for each evicted node.

    KV slot ownership: ``match_prefix`` hands out *views* (the tree keeps owning them; lock
    ``last_node`` to keep them); ``insert`` takes ``value[prefix_len:aligned_len]`` and
    leaves the duplicates ``value[:prefix_len]`` to the caller to free; ``evict`` and
    ``reset`` give tree-owned slots back to the allocator.

    Thread safety: every call runs with the GIL held throughout, so each call is atomic
    with respect to other Python threads; sequences of calls (match then lock) are not, and
    need a lock of the caller's if several threads share one cache.
    """

    __slots__ = ()


__all__ = ["RadixCache", "TreeNode"]
