"""``RefRadixCache``: the pure-Python reference model of :class:`RadixCache`.

Two jobs, one implementation:

* the oracle that the property tests (``tests/test_radix_stateful.py``) compare the compiled
  cache with, operation by operation;
* the pure-Python baseline that ``bench/`` times the compiled cache against.

So it is written the way the seed (and SGLang's ``radix_cache.py``) writes a radix tree:
``TreeNode`` objects holding their tokens as a Python list, a ``children`` dict keyed by the
first token (or first page, as a tuple) -- at the root by ``(namespace, first token/page)`` --,
token-by-token comparison in Python, and an ``evict`` that walks the tree to collect every
evictable leaf and ``heapq.heapify``s them on each call. It is neither tuned nor slowed down.

Semantics shared with the compiled cache (and pinned by ``tests/test_reference_model.py``):

* A key's namespace is ``(extra_key, width)``, width 0 for plain int tokens and k for k-tuple
  tokens; keys of different namespaces never share a node.
* A logical clock: each successful ``match_prefix``/``insert`` increments ``clock`` first and
  stamps every node it touches with it. Failed calls change nothing, not even the clock.
* Node ids: root 0, then 1, 2, ... for each new node (new leaf or split-off upper half); never
  reused, not even across :meth:`reset`.
* Eviction order: smallest ``(policy key, last_access_time, id)`` first among unlocked
  non-root leaves; the policy key is 0 for ``"lru"``, ``hit_count`` for ``"lfu"``, the
  creation clock for ``"fifo"`` (a split-off upper half keeps its node's), the largest
  ``insert(priority=)`` on the node's paths for ``"priority"`` and ``hit_count > 0`` for
  ``"slru"`` (probationary before protected).

This class models full attention only (``sliding_window_size`` raises
``NotImplementedError``); the sliding-window model :class:`RefSWARadixCache`
(``reference_swa.py``) and the Mamba model (``reference_mamba.py``) subclass it through the
small hooks ``_new_node``, ``_split_node``, ``_walk``, ``_insert_kv``, ``_evict_leaves``,
``_remove_leaf`` and ``_reset_state``: keep their contracts when changing this file.

Not thread-safe: callers serialise access (see :class:`BasePrefixCache`).
"""

from __future__ import annotations

import heapq
import operator
from collections.abc import Callable
from typing import Any, cast

import numpy as np

from pymllm.mem_cache._radix_tree import EVICTION_POLICIES
from pymllm.mem_cache.base_prefix_cache import (
    BasePrefixCache,
    EvictResult,
    InsertResult,
    MatchResult,
    RadixKey,
    hash_token_ids,
)
from pymllm.mem_cache.errors import (
    InvalidKeyError,
    InvalidValueError,
    LockStateError,
    StaleNodeError,
)

_U32_LIMIT = 1 << 32
_I32_MAX = (1 << 31) - 1
_EMPTY_I32 = np.zeros(0, dtype=np.int32)
_EMPTY_I32.flags.writeable = False


def _int64_arg(name: str, v: Any) -> int:
    """A 64-bit int argument; bools and floats are rejected (as the compiled core does)."""
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name}: expected an int, got {v!r} ({type(v).__name__})")
    v = v.__index__()
    if not -(1 << 63) <= v < (1 << 63):
        raise InvalidValueError(f"{name}: expected a 64-bit int, got {v}")
    return v


def _index(v: Any) -> int | None:
    """*v* as an int, read as the compiled cache reads every integer argument, token and
    index (``operator.index``: ints, numpy integers, anything with ``__index__``), or None
    for a bool (Python's or numpy's: a key of booleans is a bug, not tokens;
    hash_token_ids agrees) and for anything else."""
    if isinstance(v, (bool, np.bool_)) or not hasattr(v, "__index__"):
        return None
    return operator.index(v)


def _counts(*counts: Any) -> tuple[int, ...]:
    """Eviction counts as ints, read as the compiled cache reads them (``TypeError`` for a
    bool or a non-integer)."""
    out = [_index(c) for c in counts]
    if None in out:
        raise TypeError(f"eviction counts must be ints, got {counts!r}")
    return tuple(cast(list[int], out))


class TreeNode:
    """One node of the reference tree; the object itself is the handle callers hold.

    ``tokens`` (list of ints or of k-tuples) and ``value`` (``np.int32``, read-only) are this
    node's own slice of the key and of the KV indices. Handles compare equal by ``id``.
    """

    __slots__ = (
        "_owner",
        "children",
        "created",
        "evicted",
        "extra_key",
        "hit_count",
        "id",
        "last_access_time",
        "lock_ref",
        "own_lock",
        "parent",
        "priority",
        "tokens",
        "value",
        "width",
    )

    def __init__(
        self,
        node_id: int,
        owner: object,
        tokens: list[Any],
        value: np.ndarray,
        extra_key: Any,
        width: int,
        parent: TreeNode | None,
    ) -> None:
        self.id = node_id
        self._owner = owner
        self.tokens = tokens
        self.value = value
        self.extra_key = extra_key
        self.width = width
        self.parent = parent
        self.children: dict[Any, TreeNode] = {}
        self.lock_ref = 0
        self.own_lock = 0  # inc_lock_ref calls on this node itself not yet undone
        self.last_access_time = 0
        self.hit_count = 0
        self.created = 0  # clock when the node (or the node it was split from) was made
        self.priority = 0  # largest insert(priority=) through this node
        self.evicted = False

    @property
    def key(self) -> RadixKey:
        return RadixKey(list(self.tokens), self.extra_key)

    @property
    def namespace(self) -> tuple[Any, int]:
        return (self.extra_key, self.width)

    def is_leaf(self) -> bool:
        return not self.children

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TreeNode):
            return NotImplemented
        return self.id == other.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        state = " evicted" if self.evicted else ""
        return (
            f"TreeNode(id={self.id}, len={len(self.tokens)}, lock_ref={self.lock_ref}, "
            f"last_access_time={self.last_access_time}, hit_count={self.hit_count}{state})"
        )


class RefRadixCache(BasePrefixCache):
    """Pure-Python radix-tree prefix cache with the same contract as ``RadixCache``.

    Ownership of KV indices: ``insert(key, value)`` takes ``value[prefix_len:aligned_len]``
    into the tree; the duplicates ``value[:prefix_len]`` and the unaligned tail
    ``value[aligned_len:]`` stay the caller's. ``evict`` and ``reset`` hand tree-owned indices
    back through ``token_to_kv_pool_allocator.free(np.int32 array)``, one call per ``evict`` /
    ``reset``. ``match_prefix`` indices stay tree-owned. A call that raises changes nothing.
    """

    #: the node type this model builds (the SWA and Mamba models add fields)
    NODE_CLASS: type[TreeNode] = TreeNode

    def __init__(
        self,
        page_size: int = 1,
        sliding_window_size: int | None = None,
        token_to_kv_pool_allocator: Any = None,
        on_node_evict: Callable[[int], Any] | None = None,
        eviction_policy: str = "lru",
    ) -> None:
        p = _index(page_size)
        if p is None or p < 1:
            raise InvalidValueError(f"page_size: expected an int >= 1, got {page_size!r}")
        if not isinstance(eviction_policy, str) or eviction_policy not in EVICTION_POLICIES:
            raise InvalidValueError(
                f"eviction_policy: expected one of {', '.join(EVICTION_POLICIES)}, "
                f"got {eviction_policy!r}"
            )
        self.eviction_policy = eviction_policy
        if sliding_window_size is not None:
            raise NotImplementedError(
                "RefRadixCache: sliding_window_size (SWA) is not supported yet"
            )
        self.page_size = p
        self.sliding_window_size: int | None = sliding_window_size
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.on_node_evict = on_node_evict
        self._owner = object()
        self._next_id = 1
        self.root_node = self.NODE_CLASS(0, self._owner, [], _EMPTY_I32, None, 0, None)
        self._reset_state()

    def _reset_state(self) -> None:
        self.root_node.children = {}
        self.clock = 0
        self._evictable = 0
        self._protected = 0

    # ------------------------------------------------------------------ input checks

    def _parse_key(self, key: Any) -> tuple[list[Any], Any, int]:
        """Return (tokens as a list of ints or tuples, extra_key, width); raise on bad input."""
        if not isinstance(key, RadixKey):
            raise TypeError(f"key must be a RadixKey, got {type(key).__name__}")
        try:
            hash(key.extra_key)
        except TypeError:
            raise TypeError(
                f"extra_key: must be hashable, got {type(key.extra_key).__name__}"
            ) from None
        ids = key.token_ids
        if not isinstance(ids, (list, tuple, np.ndarray)):
            try:
                ids = np.asarray(ids)
            except (TypeError, ValueError) as exc:
                raise InvalidKeyError(f"token_ids: cannot read {type(ids).__name__}") from exc
        if isinstance(ids, np.ndarray):
            if ids.ndim != 1:
                raise InvalidKeyError(f"token_ids: expected a 1-D array, got shape {ids.shape}")
            if ids.dtype.kind not in "iu":  # an empty float array too, as the compiled cache
                raise InvalidKeyError(f"token_ids: tokens must be integers, got {ids.dtype}")
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= _U32_LIMIT):
                raise InvalidKeyError("token_ids: a token is outside [0, 2**32)")
            return ids.tolist(), key.extra_key, 0
        if ids and isinstance(ids[0], tuple):
            width = len(ids[0])
            if width == 0:
                raise InvalidKeyError("token_ids: tuple tokens must not be empty")
            tokens: list[Any] = []
            for t in ids:
                if not isinstance(t, tuple) or len(t) != width:
                    raise InvalidKeyError(
                        f"token_ids: tuple tokens must all have length {width}, got {t!r}"
                    )
                elems = [_index(e) for e in t]
                for e, i in zip(t, elems, strict=True):
                    if i is None:
                        raise InvalidKeyError(f"token_ids: non-integer token element {e!r}")
                    if not 0 <= i < _U32_LIMIT:
                        raise InvalidKeyError(f"token_ids: token {i} is outside [0, 2**32)")
                tokens.append(tuple(cast(list[int], elems)))
            return tokens, key.extra_key, width
        tokens = []
        for t in ids:
            i = _index(t)
            if i is None:
                raise InvalidKeyError(f"token_ids: non-integer token {t!r}")
            if not 0 <= i < _U32_LIMIT:
                raise InvalidKeyError(f"token_ids: token {i} is outside [0, 2**32)")
            tokens.append(i)
        return tokens, key.extra_key, 0

    def _parse_value(self, value: Any, tokens: list[Any], width: int) -> np.ndarray:
        """Return *value* as an int64 array of len(tokens) slot indices; raise on bad input."""
        if value is None:
            if width:
                raise InvalidValueError("value=None (indices = token ids) needs plain int tokens")
            arr = np.array(tokens, dtype=np.int64)
        elif isinstance(value, (list, tuple)):  # read item by item, as the compiled cache does
            idx = [_index(v) for v in value]
            if None in idx:
                raise InvalidValueError("value: indices must be integers")
            if any(not 0 <= i <= _I32_MAX for i in cast(list[int], idx)):
                raise InvalidValueError("value: an index is outside [0, 2**31)")
            arr = np.array(idx, dtype=np.int64)
        else:
            try:
                arr = np.asarray(value)
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidValueError(f"value: not an array of indices ({exc})") from exc
            if arr.ndim != 1:
                raise InvalidValueError(f"value: expected a 1-D array, got shape {arr.shape}")
            if arr.dtype.kind not in "iu":  # an empty float array too, as the compiled cache
                raise InvalidValueError(f"value: indices must be integers, got {arr.dtype}")
        if len(arr) != len(tokens):
            raise InvalidValueError(f"value: {len(arr)} indices for a key of {len(tokens)} tokens")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > _I32_MAX):
            raise InvalidValueError("value: an index is outside [0, 2**31)")
        return arr.astype(np.int64)

    def _check_node(self, node: Any) -> TreeNode:
        if not isinstance(node, TreeNode):
            raise TypeError(f"expected a TreeNode of this cache, got {type(node).__name__}")
        if node._owner is not self._owner:
            raise StaleNodeError(f"{node!r} belongs to another cache")
        if node.evicted:
            raise StaleNodeError(f"{node!r} was evicted")
        return node

    # ------------------------------------------------------------------ tree helpers

    def _child_key(self, parent: TreeNode, tokens: list[Any], pos: int, ns: Any) -> Any:
        first = tokens[pos] if self.page_size == 1 else tuple(tokens[pos : pos + self.page_size])
        return (ns, first) if parent is self.root_node else first

    def _key_match(self, node_tokens: list[Any], tokens: list[Any], pos: int, end: int) -> int:
        """Common prefix of node_tokens and tokens[pos:end], rounded down to whole pages."""
        n = min(len(node_tokens), end - pos)
        i = 0
        while i < n and node_tokens[i] == tokens[pos + i]:
            i += 1
        return i // self.page_size * self.page_size

    def _new_node(
        self, tokens: list[Any], value: np.ndarray, parent: TreeNode, ns: Any
    ) -> TreeNode:
        # a namespace keeps the extra_key object it was made with: of equal extra_keys
        # (1 and True, 7 and 7.0) the first the tree took, until its last node goes
        if parent is not self.root_node:
            ns = (parent.extra_key, ns[1])
        else:
            for child in parent.children.values():
                if (child.extra_key, child.width) == ns:
                    ns = (child.extra_key, ns[1])
                    break
        node = self.NODE_CLASS(self._next_id, self._owner, tokens, value, ns[0], ns[1], parent)
        node.created = self.clock
        node.priority = self._new_priority  # a split's upper half then takes its child's
        self._next_id += 1
        return node

    def _evict_order(self, node: TreeNode) -> tuple[Any, int, int]:
        """Sort key of an eviction candidate under the policy: smallest goes first."""
        policy = self.eviction_policy
        if policy == "lru":
            first: Any = 0
        elif policy == "lfu":
            first = node.hit_count
        elif policy == "fifo":
            first = node.created
        elif policy == "priority":
            first = node.priority
        else:  # slru: never-hit (probationary) nodes before hit (protected) ones
            first = node.hit_count > 0
        return first, node.last_access_time, node.id

    # the priority of the nodes the current insert makes (``"priority"`` policy: a new node
    # starts at its insert's priority, even a negative one)
    _new_priority = 0

    def _raise_priority(self, node: TreeNode, priority: int) -> None:
        """Raise *node* and its ancestors to at least *priority* (``"priority"`` policy)."""
        if self.eviction_policy != "priority":
            return
        while node.parent is not None:
            node.priority = max(node.priority, priority)
            node = node.parent

    def _split_node(self, child: TreeNode, split_len: int) -> TreeNode:
        """Cut *child* after split_len tokens; the new upper node takes the head, child the tail."""
        parent = child.parent
        assert parent is not None
        slot = self._child_key(parent, child.tokens, 0, child.namespace)
        upper = self._new_node(
            child.tokens[:split_len], child.value[:split_len], parent, child.namespace
        )
        upper.lock_ref = child.lock_ref
        upper.hit_count = child.hit_count
        upper.last_access_time = child.last_access_time
        upper.created = child.created
        upper.priority = child.priority
        child.tokens = child.tokens[split_len:]
        child.value = child.value[split_len:]
        child.parent = upper
        upper.children[self._child_key(upper, child.tokens, 0, child.namespace)] = child
        parent.children[slot] = upper
        return upper

    def _walk(
        self, tokens: list[Any], end: int, ns: Any, count_hit: bool
    ) -> tuple[TreeNode, int, list[np.ndarray]]:
        """Follow tokens[:end] down the tree, splitting a partly matched node and stamping
        every matched node with the clock. Returns (last matched node, matched, values)."""
        node = self.root_node
        pos = 0
        values = []
        while end - pos >= self.page_size:
            child = node.children.get(self._child_key(node, tokens, pos, ns))
            if child is None:
                break
            c = self._key_match(child.tokens, tokens, pos, end)
            if c < len(child.tokens):
                child = self._split_node(child, c)
            child.last_access_time = self.clock
            if count_hit:
                child.hit_count += 1
            values.append(child.value)
            pos += c
            node = child
        return node, pos, values

    def _held(self, tokens: list[Any], end: int, ns: Any) -> int:
        """How much of tokens[:end] the tree holds (whole pages), changing nothing."""
        node = self.root_node
        pos = 0
        while end - pos >= self.page_size:
            child = node.children.get(self._child_key(node, tokens, pos, ns))
            if child is None:
                break
            c = self._key_match(child.tokens, tokens, pos, end)
            pos += c
            if c < len(child.tokens):
                break
            node = child
        return pos

    def _iter_nodes(self) -> list[TreeNode]:
        """Every node except the root, parents before children."""
        out = []
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    # ------------------------------------------------------------------ public API

    def reset(self) -> None:
        """Free every tree-owned index (one ``allocator.free`` call) and empty the tree.

        Handles to the removed nodes become stale (``evicted`` is True). The clock goes back
        to 0; node ids keep counting. ``on_node_evict`` is not called.
        """
        nodes = self._iter_nodes()
        for node in nodes:
            node.evicted = True
        values = [node.value for node in nodes]
        self._reset_state()
        if values and self.token_to_kv_pool_allocator is not None:
            freed = np.concatenate(values).astype(np.int32)
            if len(freed):
                self.token_to_kv_pool_allocator.free(freed)

    def match_prefix(self, key: RadixKey, **kwargs: Any) -> MatchResult:
        """Longest cached prefix of *key* in whole pages; splits a node the match ends inside.

        Every matched node gets ``hit_count += 1`` and ``last_access_time = clock``. The
        returned indices stay tree-owned.
        """
        tokens, extra_key, width = self._parse_key(key)
        self.clock += 1
        node, pos, values = self._walk(tokens, len(tokens), (extra_key, width), count_hit=True)
        indices = np.concatenate(values).astype(np.int32) if values else _EMPTY_I32.copy()
        return MatchResult(indices=indices, last_node=node, prefix_len=pos)

    def insert(
        self,
        key: RadixKey,
        value: Any = None,
        prev_prefix_len: Any = 0,
        swa_evicted_seqlen: Any = 0,
        priority: int = 0,
        **kwargs: Any,
    ) -> InsertResult:
        """Insert the whole pages of *key* with KV indices *value* (``None``: the token ids).

        The tree takes ``value[prefix_len:aligned_len]``; ``value[:prefix_len]`` (already
        cached) and ``value[aligned_len:]`` (partial page) stay the caller's to free.
        ``priority``: see :meth:`_raise_priority`. ``prev_prefix_len`` and
        ``swa_evicted_seqlen`` only matter with a sliding window (the compiled cache's
        argument order; without a window it ignores them, unread).
        """
        if kwargs:
            raise TypeError(f"insert() got unexpected keyword arguments {sorted(kwargs)}")
        prio = _int64_arg("priority", priority)
        tokens, extra_key, width = self._parse_key(key)
        arr = self._parse_value(value, tokens, width)
        self._new_priority = prio
        prefix_len, node = self._insert_kv(tokens, arr, (extra_key, width))
        self._raise_priority(node, prio)
        return InsertResult(prefix_len=prefix_len, last_node=node)

    def _insert_kv(self, tokens: list[Any], arr: np.ndarray, ns: Any) -> tuple[int, TreeNode]:
        """The mutation half of :meth:`insert` (input already checked); returns
        (prefix_len, node ending at the page-aligned key end). Shared with the Mamba model."""
        self.clock += 1
        aligned = len(tokens) // self.page_size * self.page_size
        node, pos, _ = self._walk(tokens, aligned, ns, count_hit=False)
        if pos < aligned:
            leaf = self._new_node(tokens[pos:aligned], arr[pos:aligned].astype(np.int32), node, ns)
            leaf.value.flags.writeable = False
            leaf.last_access_time = self.clock
            node.children[self._child_key(node, tokens, pos, ns)] = leaf
            self._evictable += aligned - pos
            node = leaf
        return pos, node

    def evict(self, num_tokens: int, swa_num_tokens: int = 0) -> EvictResult:
        """Evict unlocked leaves, least recently used first (ties: smaller id), until at least
        *num_tokens* tokens are freed or nothing is evictable. Whole nodes, so it may free
        more than asked. One ``allocator.free`` call; ``on_node_evict(id)`` per node."""
        num_tokens, swa_num_tokens = _counts(num_tokens, swa_num_tokens)
        if num_tokens <= 0:
            return EvictResult()
        freed: list[np.ndarray] = []
        evicted = self._evict_leaves(num_tokens, freed)
        if freed and self.token_to_kv_pool_allocator is not None:
            self.token_to_kv_pool_allocator.free(np.concatenate(freed).astype(np.int32))
        return EvictResult(full_evicted=evicted)

    def _evict_leaves(self, num_tokens: int, freed: list[np.ndarray]) -> int:
        """The LRU loop of :meth:`evict`: remove leaves until *num_tokens* tokens are gone,
        appending their values to *freed* (not freed yet); returns the tokens removed."""
        leaves = [n for n in self._iter_nodes() if not n.children and n.lock_ref == 0]
        heap = [(*self._evict_order(n), n) for n in leaves]
        heapq.heapify(heap)
        evicted = 0
        while evicted < num_tokens and heap:
            node = heapq.heappop(heap)[-1]
            parent = node.parent
            assert parent is not None
            evicted += self._remove_leaf(node, freed)
            if parent is not self.root_node and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (*self._evict_order(parent), parent))
        return evicted

    def _remove_leaf(self, node: TreeNode, freed: list[np.ndarray]) -> int:
        """Unlink an unlocked leaf, append its value to *freed*, report it; returns its
        length. (The Mamba model extends this to drop the node's state too.)"""
        parent = node.parent
        assert parent is not None
        del parent.children[self._child_key(parent, node.tokens, 0, node.namespace)]
        node.evicted = True
        self._evictable -= len(node.tokens)
        freed.append(node.value)
        if self.on_node_evict is not None:
            self.on_node_evict(node.id)
        return len(node.tokens)

    def inc_lock_ref(self, node: Any) -> Any:
        """Lock *node* and its ancestors against eviction; returns None."""
        node = self._check_node(node)
        if node is not self.root_node:
            node.own_lock += 1
        while node is not self.root_node:
            if node.lock_ref == 0:
                self._evictable -= len(node.tokens)
                self._protected += len(node.tokens)
            node.lock_ref += 1
            node = node.parent
        return None

    def dec_lock_ref(self, node: Any, **kwargs: Any) -> None:
        """Undo one :meth:`inc_lock_ref` of *node* itself; raises ``LockStateError`` if
        *node* holds no lock, or only its descendants' (an unlock through an ancestor),
        leaving every lock as it was."""
        node = self._check_node(node)
        if node is not self.root_node and node.own_lock == 0:
            raise LockStateError(
                f"{node!r} holds no lock"
                if node.lock_ref == 0
                else f"{node!r} holds only its descendants' locks"
            )
        path = []
        while node is not self.root_node:
            if node.lock_ref == 0:
                raise LockStateError(f"{node!r} holds no lock")
            path.append(node)
            node = node.parent
        if path:
            path[0].own_lock -= 1
        for n in path:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._protected -= len(n.tokens)
                self._evictable += len(n.tokens)

    def evictable_size(self) -> int:
        return self._evictable

    def protected_size(self) -> int:
        return self._protected

    def total_size(self) -> int:
        return self._evictable + self._protected

    def swa_evictable_size(self) -> int:
        return 0

    def swa_protected_size(self) -> int:
        return 0

    def compute_node_hash(self, node: Any) -> list[str]:
        """One chained SHA-256 hex digest per page of *node*'s key; the chain starts at the
        first page below the root, so the node's hashes depend on its whole path."""
        node = self._check_node(node)
        path = []
        n = node
        while n is not self.root_node:
            path.append(n)
            n = n.parent
        prior = None
        hashes: list[str] = []
        for n in reversed(path):
            hashes = []
            for i in range(0, len(n.tokens), self.page_size):
                prior = hash_token_ids(n.tokens[i : i + self.page_size], prior)
                hashes.append(prior)
        return hashes

    def pretty_print(self) -> None:
        stack = [(self.root_node, 0)]
        while stack:
            node, depth = stack.pop()
            head = node.tokens[:10]
            more = "..." if len(node.tokens) > 10 else ""
            ns = "" if node is self.root_node else f" ns={node.namespace!r}"
            print(
                f"{'  ' * depth}[{node.id}]{ns} {head}{more} len={len(node.tokens)} "
                f"lock_ref={node.lock_ref} t={node.last_access_time} hits={node.hit_count}"
            )
            stack.extend((c, depth + 1) for c in node.children.values())
        print(f"evictable={self._evictable} protected={self._protected} clock={self.clock}")

    # ------------------------------------------------------------------ test hooks

    def _tree_values(self) -> np.ndarray:
        """Every tree-owned index (the test ledger reads the tree through this)."""
        values = [n.value for n in self._iter_nodes()]
        return np.concatenate(values).astype(np.int32) if values else _EMPTY_I32.copy()

    def _check_invariants(self) -> None:
        """Walk the whole tree, recompute every counter; AssertionError on any mismatch."""
        root = self.root_node
        assert root.id == 0 and root.parent is None and not root.tokens and not root.evicted
        assert root.lock_ref == 0, f"root lock_ref {root.lock_ref}"
        evictable = protected = 0
        ids = set()
        stack = [root]
        while stack:
            node = stack.pop()
            assert node.id not in ids, f"node id {node.id} appears twice"
            ids.add(node.id)
            for slot, child in node.children.items():
                assert child.parent is node, f"{child!r}: parent is not {node!r}"
                assert not child.evicted, f"{child!r} in the tree but marked evicted"
                assert child._owner is self._owner
                assert slot == self._child_key(node, child.tokens, 0, child.namespace), (
                    f"{child!r} filed under {slot!r}"
                )
                if node is not root:
                    assert child.namespace == node.namespace, f"{child!r}: namespace differs"
                stack.append(child)
            if node is root:
                continue
            n = len(node.tokens)
            assert n > 0 and n % self.page_size == 0, f"{node!r}: bad key length {n}"
            assert node.value.dtype == np.int32 and node.value.shape == (n,), f"{node!r}: value"
            if node.width:
                assert all(isinstance(t, tuple) and len(t) == node.width for t in node.tokens)
            else:
                assert all(type(t) is int for t in node.tokens)
            assert 0 < node.id < self._next_id
            assert node.lock_ref >= 0 and node.hit_count >= 0
            # no unlock passes through a node not locked itself: its own locks plus its
            # children's, exactly
            child_locks = sum(c.lock_ref for c in node.children.values())
            assert node.lock_ref == node.own_lock + child_locks, f"{node!r}: lock count"
            assert 0 <= node.last_access_time <= self.clock
            if node.lock_ref:
                protected += n
            else:
                evictable += n
        assert evictable == self._evictable, f"evictable {self._evictable} != {evictable}"
        assert protected == self._protected, f"protected {self._protected} != {protected}"


__all__ = ["RefRadixCache", "TreeNode"]
