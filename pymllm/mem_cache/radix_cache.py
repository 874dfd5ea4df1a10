"""``RadixCache``: the compiled radix-tree prefix cache.

The tree itself (node storage, child hash map, eviction heap, locking) is the Cython class
:class:`~pymllm.mem_cache._radix_tree.RadixTreeCore`; this module binds it to the
:class:`~pymllm.mem_cache.base_prefix_cache.BasePrefixCache` interface.
"""

from __future__ import annotations

from pymllm.mem_cache._radix_tree import RadixTreeCore, TreeNode
from pymllm.mem_cache.base_prefix_cache import BasePrefixCache


# The ignore: the compiled dec_lock_ref takes the one keyword the base's **kwargs carries
# (swa_boundary_id) and rejects any other, rather than swallowing a typo.
class RadixCache(RadixTreeCore, BasePrefixCache):  # type: ignore[misc]
    """Radix-tree prefix cache: repeated prompt prefixes reuse their KV slots.

    ``RadixCache(page_size=1, sliding_window_size=None, token_to_kv_pool_allocator=None,
    on_node_evict=None, eviction_policy="lru")``

    * ``page_size``: keys are matched and stored in whole pages of this many tokens.
    * ``sliding_window_size``: ``None`` for full attention; ``W`` for a model with
      windowed layers, which need only the last ``W`` tokens' SWA KV: ``evict`` may then
      drop a node's SWA KV and keep its full KV (a tombstone), and a match stops where
      its prefix would have fewer than ``W`` live tokens after a tombstone (see ``insert``
      and ``inc_lock_ref``).
    * ``token_to_kv_pool_allocator``: anything with ``free(int32 array)`` (with a window,
      ``free_swa(int32 array)`` too, as a ``SWATokenToKVPoolAllocator`` has); evicted KV
      slots go back through it. ``None``: evicted slots go to no one (a tree that models
      hit rates).
    * ``on_node_evict``: optional ``callback(node_id)`` called for each evicted node.
    * ``eviction_policy``: which unlocked leaf ``evict`` removes first (every policy breaks
      ties by recency, then node id): ``"lru"`` least recently matched or inserted;
      ``"lfu"`` fewest ``match_prefix`` hits; ``"fifo"`` oldest insertion (a node split in
      two keeps its insertion time); ``"priority"`` lowest ``insert(..., priority=p)``
      (the nodes an insert makes start at ``p``, even a negative one, and it raises every
      node on its path to at least ``p``); ``"slru"`` nodes never
      hit since insertion (probationary) before nodes hit at least once (protected).
      Neither decays: under ``"lfu"`` a prefix that was popular once outranks every
      newer one for as long as it stays cached; under ``"slru"`` a prefix hit once
      outranks every one not hit yet, so new prefixes go first, possibly before their
      first hit. A long run whose popular prompts change is better served by ``"lru"``.
      With a sliding window the same order picks the nodes whose window KV goes first.

    Namespaces: keys whose ``extra_key`` differ (by ``==``) never share a node; equal ones
    (``1``, ``True``, ``1.0``, ``numpy.int64(1)``, ``Fraction(1)``; a namedtuple and the
    equal tuple) share one. The registry of extra_keys hashes them with a random key of
    the tree's (ints by value; floats, complex, Fraction, Decimal and numpy numbers by
    their exact ratio; tuples and frozensets by their items, tagged; anything else by its
    own hash), so extra_keys whose Python hashes collide (the ints ``k + i * (2**61 - 1)``,
    ``-1`` and ``-2``, tuples over such ints) cost a match or an insert no more than any
    others. Kept apart although equal (a miss, never a wrong hit): an extra_key of your
    own class and ``-1``, the int past ``2**61``, the tuple or the frozenset it compares
    equal to; a ``Decimal`` beyond ``10**1233`` in size (or below ``10**-1233``) or a
    numpy long double beyond ``2**1100`` (or below ``2**-1100``) and the equal int,
    Fraction or float. Those are hashed by their own hash rather than expanded into their
    exact ratio, an int that could take hours to build (``Decimal('1e999999999')``).

    KV slot ownership: ``match_prefix`` hands out the tree's slots (in a new array; the
    tree keeps owning them: lock ``last_node`` to keep them); ``insert`` takes
    ``value[prefix_len:aligned_len]``; of ``value[:prefix_len]``, tokens the tree already
    held, the slots the caller allocated itself are duplicates for it to free (usually
    ``value[match.prefix_len:prefix_len]``;
    with a sliding window the tree settles all of ``value[prev_prefix_len:aligned_len]``
    itself and the caller frees none of it: see ``insert``; a partial last page
    ``value[aligned_len:]`` stays the caller's in every case), and the tree's own slots it
    passed back (the match's) stay the tree's; ``evict`` and ``reset`` give tree-owned
    slots back to the allocator. Over a
    ``TokenToKVPoolAllocator`` or ``SWATokenToKVPoolAllocator`` the allocator books the
    tree's slots as the cache's (``is_cached``): a caller's ``free`` (or ``free_swa``) of
    one raises ``InvalidFreeError`` and ``clear()``
    raises ``AllocatorStateError``; an insert handing the tree a slot no caller holds (free,
    or already the cache's) or, with pages, a page-aligned run that is not one whole page
    in order raises ``InvalidValueError`` and takes nothing (in a windowed insert, a
    duplicate the tree would free that the caller does not hold raises
    ``InvalidFreeError``, also with nothing taken). ``page_size`` must be a
    multiple of the allocator's. A cache that is dropped hands its slots back, to any
    allocator (through its ``free`` when it is not one of these two, from the cache's
    finalizer: without ``on_node_evict``, as ``reset``).

    Thread safety: every call is atomic with respect to other Python threads. The GIL alone
    would not make it so (``evict`` runs the allocator's ``free`` and ``on_node_evict``,
    Python code that can hand the GIL to another thread midway), so each call also holds
    the cache's own guard: another thread's call waits until it returns, and so do its size
    queries and node-handle reads. A callback that calls back into the same cache gets
    ``ReentrantCallError`` (size queries and handle reads are allowed there, and see the
    call's state as it stands: an ``extra_key``'s ``__eq__`` run while ``evict`` drops a
    namespace's last node (compared with another registered key of its hash) sees the
    sizes without that node and its handle already stale (``evicted``); ``on_node_evict``
    sees each node gone), and so does a
    finalizer that a callback's own code runs, and a callback's call into another cache
    whose running call, in another thread, waits for this one (it would wait forever).
    The garbage collector is held off while a call runs, so the finalizer of cyclic
    garbage that calls the cache (a request's ``__del__`` unlocking its node) runs after
    it, not inside; a ``gc.disable()`` or
    ``gc.enable()`` made while a call runs (in a callback, or in another thread while one
    waits in a callback) is undone when the outermost call returns. Sequences of
    calls (match, then lock) are not atomic: threads sharing one cache serialise them with a
    lock of their own.
    """

    __slots__ = ()


__all__ = ["RadixCache", "TreeNode"]
