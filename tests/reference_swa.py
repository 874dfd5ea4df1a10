"""``RefSWARadixCache``: the pure-Python reference model of ``RadixCache(sliding_window_size=W)``.

The oracle of ``tests/test_swa_stateful.py`` and the pure-Python baseline of
``bench/bench_swa_radix_cache.py``. It is :class:`RefRadixCache` (same tree, clock, node ids,
namespaces, key/value checks, splits, LRU order by ``(last_access_time, id)``) plus, per node,
a tombstone flag and an SWA lock count, written as plainly as the parent: the SWA eviction
phase heapifies its candidates on each ``evict`` where the compiled cache keeps a second heap.

What a window W adds (the compiled ``RadixTreeCore`` with ``swa`` on implements the same):

* A node holds full KV and, unless it is a tombstone, SWA KV for its tokens.
  ``swa_evictable_size()`` counts live (non-tombstone) tokens without an SWA lock,
  ``swa_protected_size()`` live tokens with one. A split's upper node inherits the tombstone
  flag and the SWA lock count.
* ``match_prefix`` walks (and splits) as without a window, then cuts back to the longest
  usable path prefix: one without a tombstone, or with at least W live tokens after its last
  tombstone (the count restarts at each tombstone).
* ``inc_lock_ref(node)`` locks full KV up to the root and SWA KV over whole nodes upwards
  until W live tokens are locked or a tombstone is reached; it returns the boundary: the
  prefix position where the SWA lock stopped (the start of the last SWA-locked node, or a
  tombstone's end), None if it reached the root. ``dec_lock_ref(node, swa_boundary_id)``
  releases the SWA lock of every node on the path that ends after the boundary.
* ``insert(key, value, prev_prefix_len, swa_evicted_seqlen)`` settles every index of
  ``value[prev_prefix_len:aligned]``: duplicates go to ``allocator.free`` (one call), a
  tombstone starting at or after ``swa_evicted_seqlen`` (rounded up to a page) with no index
  in common is revived with the incoming indices (its old ones are freed, in a second call
  after the duplicates'); a new suffix is a
  tombstone up to ``swa_evicted_seqlen`` and live after it, or, lying wholly below it, is
  freed and not cached. Over an allocator that tells which SWA sides are still held
  (``translate_loc_from_full_to_swa``, as the compiled cache reads the exact
  ``SWATokenToKVPoolAllocator``'s mapping) the new tombstone's slots whose SWA side the
  caller did not free (the rest of the page holding ``swa_evicted_seqlen``, say) have it
  freed in one ``allocator.free_swa`` call, after the ``free`` calls.
* ``evict(num_tokens, swa_num_tokens)``: phase 1 removes LRU leaves (tombstones included),
  and a tombstoned parent left childless and unlocked goes with its child at once; phase 2
  takes LRU live nodes without an SWA lock until ``swa_num_tokens`` SWA tokens are freed in
  this call: an unlocked leaf is removed, any other node tombstoned. One
  ``allocator.free_swa`` call (tombstoned indices) before one ``allocator.free`` call
  (removed nodes).

Not thread-safe: callers serialise access (see :class:`BasePrefixCache`).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

import numpy as np
from reference_model import _EMPTY_I32, RefRadixCache, TreeNode, _counts, _index, _int64_arg

from pymllm.mem_cache.base_prefix_cache import EvictResult, InsertResult, MatchResult, RadixKey
from pymllm.mem_cache.errors import InvalidValueError, LockStateError


class SWATreeNode(TreeNode):
    """A reference tree node with a tombstone flag and an SWA lock count."""

    __slots__ = ("swa_lock_ref", "swa_tombstone")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.swa_tombstone = False
        self.swa_lock_ref = 0

    def __repr__(self) -> str:
        tomb = " tombstone" if self.swa_tombstone else ""
        return f"{super().__repr__()[:-1]} swa_lock_ref={self.swa_lock_ref}{tomb})"


def _nonneg_int(name: str, v: Any) -> int:
    """An int >= 0 (anything with ``__index__`` but a bool), as the compiled cache reads it."""
    if isinstance(v, (bool, np.bool_)) or not hasattr(v, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    v = v.__index__()
    if not 0 <= v < (1 << 63):
        raise InvalidValueError(f"{name}: expected an int in [0, 2**63), got {v}")
    return v


class RefSWARadixCache(RefRadixCache):
    """Pure-Python radix-tree prefix cache with a sliding window; same contract as
    ``RadixCache(sliding_window_size=W)``.

    Ownership: ``insert`` settles ``value[prev_prefix_len:aligned]`` itself (kept by the tree
    or freed through the allocator); ``value[:prev_prefix_len]`` (the caller's matched,
    locked prefix: the tree's own indices) and the unaligned tail stay the caller's.
    ``evict``/``reset`` give tree-owned slots back through ``free`` and ``free_swa``. A call
    that raises changes nothing.
    """

    NODE_CLASS = SWATreeNode
    sliding_window_size: int  # always set here (the base class allows None)

    def __init__(
        self,
        page_size: int = 1,
        sliding_window_size: int | None = None,
        token_to_kv_pool_allocator: Any = None,
        on_node_evict: Callable[[int], Any] | None = None,
        eviction_policy: str = "lru",
    ) -> None:
        w = _index(sliding_window_size)
        if w is None or w < 1:
            raise InvalidValueError(
                f"sliding_window_size: expected an int >= 1, got {sliding_window_size!r}"
            )
        alloc = token_to_kv_pool_allocator
        if alloc is not None and not callable(getattr(alloc, "free_swa", None)):
            raise TypeError(
                "token_to_kv_pool_allocator: a sliding window needs an allocator with "
                "free_swa() (SWATokenToKVPoolAllocator)"
            )
        super().__init__(page_size, None, alloc, on_node_evict, eviction_policy)
        self.sliding_window_size = w

    def _reset_state(self) -> None:
        super()._reset_state()
        self._swa_evictable = 0
        self._swa_protected = 0
        self._swa_freed = 0  # SWA tokens freed by the running evict
        # (locked node's id, boundary) -> inc_lock_refs held: an unlock must name one
        self._swa_locks: dict[tuple[int, int], int] = {}

    def _split_node(self, child: TreeNode, split_len: int) -> TreeNode:
        assert isinstance(child, SWATreeNode)
        upper = super()._split_node(child, split_len)
        assert isinstance(upper, SWATreeNode)
        # SWA KV and SWA locks cover whole nodes: both halves keep the old node's
        upper.swa_tombstone = child.swa_tombstone
        upper.swa_lock_ref = child.swa_lock_ref
        return upper

    @staticmethod
    def _path(node: TreeNode) -> list[SWATreeNode]:
        """The nodes from the root's child down to *node* (empty for the root)."""
        path = []
        while node.parent is not None:
            path.append(node)
            node = node.parent
        path.reverse()
        return path  # type: ignore[return-value]

    @staticmethod
    def _end(node: TreeNode) -> int:
        """Prefix length at *node*'s end."""
        end = 0
        while node.parent is not None:
            end += len(node.tokens)
            node = node.parent
        return end

    # ------------------------------------------------------------------ public API

    def match_prefix(self, key: RadixKey, **kwargs: Any) -> MatchResult:
        """Walk as :meth:`RefRadixCache.match_prefix` (splitting, touching every walked
        node), then cut back to the longest prefix that has no tombstone or at least W live
        tokens after its last one."""
        tokens, extra_key, width = self._parse_key(key)
        self.clock += 1
        node, _, _ = self._walk(tokens, len(tokens), (extra_key, width), count_hit=True)
        path = self._path(node)
        usable = 0
        live_since: int | None = None  # live tokens since the last tombstone; None: none yet
        for i, n in enumerate(path):
            if n.swa_tombstone:
                live_since = 0
            elif live_since is not None:
                live_since += len(n.tokens)
            if live_since is None or live_since >= self.sliding_window_size:
                usable = i + 1
        path = path[:usable]
        last = path[-1] if path else self.root_node
        indices = (
            np.concatenate([n.value for n in path]).astype(np.int32) if path else _EMPTY_I32.copy()
        )
        return MatchResult(indices=indices, last_node=last, prefix_len=len(indices))

    def insert(  # the compiled cache's keyword order: prev_prefix_len third
        self,
        key: RadixKey,
        value: Any = None,
        prev_prefix_len: Any = 0,
        swa_evicted_seqlen: Any = 0,
        priority: int = 0,
        **kwargs: Any,
    ) -> InsertResult:
        """Insert the whole pages of *key*; the tree settles ``value[prev_prefix_len:
        aligned]`` (keeps it or frees it in one ``allocator.free`` call)."""
        if kwargs:
            raise TypeError(f"insert() got unexpected keyword arguments {sorted(kwargs)}")
        prio = _int64_arg("priority", priority)
        tokens, extra_key, width = self._parse_key(key)
        arr = self._parse_value(value, tokens, width)
        self._new_priority = prio
        ppl = _nonneg_int("prev_prefix_len", prev_prefix_len)
        es = _nonneg_int("swa_evicted_seqlen", swa_evicted_seqlen)
        page = self.page_size
        if ppl > len(tokens) or ppl % page:
            raise InvalidValueError(
                f"prev_prefix_len: expected a multiple of page_size {page} in "
                f"[0, {len(tokens)}], got {ppl}"
            )
        es = -(-es // page) * page
        ns = (extra_key, width)
        held = self._held(tokens, ppl, ns)
        if held < ppl:  # refused before anything changes
            raise InvalidValueError(
                f"prev_prefix_len: {ppl}, but the tree holds only {held} tokens of this key"
            )
        self.clock += 1
        aligned = len(tokens) // page * page
        if aligned == 0:
            return InsertResult(prefix_len=0, last_node=self.root_node)
        if ppl > 0:  # no node straddles the caller's protected prefix
            self._walk(tokens, ppl, ns, count_hit=False)
        node, matched, _ = self._walk(tokens, aligned, ns, count_hit=False)
        to_free: list[int] = []  # the caller's duplicates
        swa_live: np.ndarray = _EMPTY_I32  # a new tombstone's slots with an SWA side
        old: list[int] = []  # the revived tombstones' own slots, freed after them
        start = 0
        for n in self._path(node):
            length = len(n.tokens)
            if start >= ppl:
                incoming = arr[start : start + length]
                # an incoming index equal to the node's own is the tree's slot handed back
                same = int(np.count_nonzero(incoming == n.value))
                # a locked tombstone's slots are still read by the request holding it:
                # never revived (its old slots freed) under that request
                if n.swa_tombstone and start >= es and same == 0 and n.lock_ref == 0:
                    old.extend(n.value.tolist())
                    n.value = incoming.astype(np.int32)
                    n.value.flags.writeable = False
                    n.swa_tombstone = False
                    self._swa_evictable += length
                elif same < length:
                    to_free.extend(incoming[incoming != n.value].tolist())
            start += length
        if matched < aligned:
            if es >= aligned:  # the whole new suffix lost its SWA KV: not worth caching
                to_free.extend(arr[matched:aligned].tolist())
            else:
                live_from = matched
                if es > matched:
                    node = self._add_leaf(node, tokens, arr, matched, es, ns, live=False)
                    live_from = es
                    swa_live = self._swa_still_held(node.value)
                node = self._add_leaf(node, tokens, arr, live_from, aligned, ns, live=True)
        for slots in (to_free, old):
            if slots and self.token_to_kv_pool_allocator is not None:
                self.token_to_kv_pool_allocator.free(np.array(slots, dtype=np.int32))
        if len(swa_live):
            self.token_to_kv_pool_allocator.free_swa(swa_live)
        self._raise_priority(node, prio)
        return InsertResult(prefix_len=matched, last_node=node)

    def _swa_still_held(self, slots: np.ndarray) -> np.ndarray:
        """Those of *slots* whose SWA side the allocator still holds; none when it cannot
        tell (no ``translate_loc_from_full_to_swa``)."""
        translate = getattr(self.token_to_kv_pool_allocator, "translate_loc_from_full_to_swa", None)
        if translate is None:
            return _EMPTY_I32
        return slots[np.asarray(translate(slots)) != 0].astype(np.int32)

    def _add_leaf(
        self,
        parent: TreeNode,
        tokens: list[Any],
        arr: np.ndarray,
        start: int,
        end: int,
        ns: Any,
        live: bool,
    ) -> SWATreeNode:
        leaf = self._new_node(tokens[start:end], arr[start:end].astype(np.int32), parent, ns)
        assert isinstance(leaf, SWATreeNode)
        leaf.value.flags.writeable = False
        leaf.last_access_time = self.clock
        leaf.swa_tombstone = not live
        parent.children[self._child_key(parent, tokens, start, ns)] = leaf
        self._evictable += end - start
        if live:
            self._swa_evictable += end - start
        return leaf

    def evict(self, num_tokens: int, swa_num_tokens: int = 0) -> EvictResult:
        """Phase 1: LRU unlocked leaves until *num_tokens* tokens are removed (a tombstoned
        parent left childless and unlocked goes at once). Phase 2: LRU live nodes without an
        SWA lock until *swa_num_tokens* SWA tokens are freed in this call (an unlocked leaf
        is removed, others tombstoned). One ``free_swa`` call, then one ``free`` call."""
        num_tokens, swa_num_tokens = _counts(num_tokens, swa_num_tokens)
        removed: list[np.ndarray] = []
        tombstoned: list[np.ndarray] = []
        self._swa_freed = 0
        full = 0
        if num_tokens > 0:
            leaves = [n for n in self._iter_nodes() if not n.children and n.lock_ref == 0]
            heap = [(*self._evict_order(n), n) for n in leaves]
            heapq.heapify(heap)
            while full < num_tokens and heap:
                node = heapq.heappop(heap)[-1]
                parent, n_full = self._remove_cascade(node, removed)
                full += n_full
                if parent is not self.root_node and not parent.children and parent.lock_ref == 0:
                    heapq.heappush(heap, (*self._evict_order(parent), parent))
        if self._swa_freed < swa_num_tokens:
            live = [n for n in self._iter_nodes() if not n.swa_tombstone and n.swa_lock_ref == 0]
            heap = [(*self._evict_order(n), n) for n in live]
            heapq.heapify(heap)
            while self._swa_freed < swa_num_tokens and heap:
                node = heapq.heappop(heap)[-1]
                if not node.children and node.lock_ref == 0:
                    full += self._remove_cascade(node, removed)[1]
                else:
                    tombstoned.append(node.value)
                    node.swa_tombstone = True
                    self._swa_evictable -= len(node.tokens)
                    self._swa_freed += len(node.tokens)
        alloc = self.token_to_kv_pool_allocator
        if tombstoned and alloc is not None:
            alloc.free_swa(np.concatenate(tombstoned).astype(np.int32))
        if removed and alloc is not None:
            alloc.free(np.concatenate(removed).astype(np.int32))
        return EvictResult(full_evicted=full, swa_evicted=self._swa_freed)

    def _remove_cascade(self, node: TreeNode, removed: list[np.ndarray]) -> tuple[TreeNode, int]:
        """Remove an unlocked leaf and then every tombstoned ancestor it leaves childless and
        unlocked; returns (the first ancestor kept, tokens removed)."""
        n_full = self._remove_leaf(node, removed)
        parent = node.parent
        assert isinstance(parent, SWATreeNode)
        while (
            parent is not self.root_node
            and parent.swa_tombstone
            and not parent.children
            and parent.lock_ref == 0
        ):
            # no leaf stays a tombstone: its full KV alone serves no match
            node = parent
            n_full += self._remove_leaf(node, removed)
            parent = node.parent
            assert isinstance(parent, SWATreeNode)
        return parent, n_full

    def _remove_leaf(self, node: TreeNode, freed: list[np.ndarray]) -> int:
        assert isinstance(node, SWATreeNode) and node.swa_lock_ref == 0
        if not node.swa_tombstone:
            self._swa_evictable -= len(node.tokens)
            self._swa_freed += len(node.tokens)
        return super()._remove_leaf(node, freed)

    def inc_lock_ref(self, node: Any) -> int | None:
        """Lock full KV from *node* to the root, and SWA KV over the nearest W live tokens
        (whole nodes, stopping at a tombstone). Returns the boundary to hand back to
        :meth:`dec_lock_ref`: the prefix position where the SWA lock stopped, or None."""
        node = self._check_node(node)
        super().inc_lock_ref(node)
        if node is self.root_node:
            return None
        path = self._path(node)
        end = sum(len(n.tokens) for n in path)
        acc = 0
        boundary = None
        for n in reversed(path):
            if n.swa_tombstone:
                boundary = end
                break
            if n.swa_lock_ref == 0:
                self._swa_evictable -= len(n.tokens)
                self._swa_protected += len(n.tokens)
            n.swa_lock_ref += 1
            acc += len(n.tokens)
            end -= len(n.tokens)
            if acc >= self.sliding_window_size:
                boundary = end
                break
        key = (node.id, 0 if boundary is None else boundary)
        self._swa_locks[key] = self._swa_locks.get(key, 0) + 1
        return boundary

    def dec_lock_ref(self, node: Any, swa_boundary_id: Any = None, **kwargs: Any) -> None:
        """Undo one :meth:`inc_lock_ref` that returned *swa_boundary_id*: SWA locks of the
        path nodes ending after it, then the full locks. ``LockStateError`` (nothing
        changed) when the node holds no lock or the boundary matches no held SWA lock."""
        if kwargs:
            raise TypeError(f"dec_lock_ref() got unexpected keyword arguments {sorted(kwargs)}")
        node = self._check_node(node)
        if node is self.root_node:
            if swa_boundary_id is not None:
                raise LockStateError("swa_boundary_id: the root's lock token is None")
            return
        if node.lock_ref == 0:
            raise LockStateError(f"{node!r} holds no lock")
        boundary = 0 if swa_boundary_id is None else _nonneg_int("swa_boundary_id", swa_boundary_id)
        path = self._path(node)
        end = sum(len(n.tokens) for n in path)
        held = []
        for n in reversed(path):
            if end <= boundary:
                break
            held.append(n)
            end -= len(n.tokens)
        count = self._swa_locks.get((node.id, boundary), 0)
        if count <= 0 or any(n.swa_lock_ref <= 0 for n in held):
            raise LockStateError(
                f"swa_boundary_id: {swa_boundary_id!r} matches no SWA lock of {node!r}"
            )
        if any(n.lock_ref == 0 for n in path):  # as the base's check, before any change
            raise LockStateError(f"{node!r}: an ancestor holds no lock")
        if count == 1:
            del self._swa_locks[(node.id, boundary)]
        else:
            self._swa_locks[(node.id, boundary)] = count - 1
        for n in held:
            n.swa_lock_ref -= 1
            if n.swa_lock_ref == 0:
                self._swa_protected -= len(n.tokens)
                self._swa_evictable += len(n.tokens)
        super().dec_lock_ref(node)

    def swa_evictable_size(self) -> int:
        return self._swa_evictable

    def swa_protected_size(self) -> int:
        return self._swa_protected

    def pretty_print(self) -> None:
        super().pretty_print()
        print(f"swa_evictable={self._swa_evictable} swa_protected={self._swa_protected}")

    # ------------------------------------------------------------------ test hooks

    def _check_invariants(self) -> None:
        super()._check_invariants()
        root = self.root_node
        assert isinstance(root, SWATreeNode)
        assert not root.swa_tombstone and root.swa_lock_ref == 0
        evictable = protected = 0
        for node in self._iter_nodes():
            assert isinstance(node, SWATreeNode), f"{node!r} is not an SWATreeNode"
            assert node.lock_ref >= node.swa_lock_ref >= 0, f"{node!r}: SWA lock"
            n = len(node.tokens)
            if node.swa_tombstone:
                assert node.swa_lock_ref == 0, f"{node!r}: SWA-locked tombstone"
            elif node.swa_lock_ref:
                protected += n
            else:
                evictable += n
        assert evictable == self._swa_evictable, (
            f"swa evictable {self._swa_evictable} != {evictable}"
        )
        assert protected == self._swa_protected, (
            f"swa protected {self._swa_protected} != {protected}"
        )


__all__ = ["RefSWARadixCache", "SWATreeNode"]
