"""``RefMambaRadixCache``: the pure-Python reference model of :class:`MambaRadixCache`.

The oracle of ``tests/test_mamba_stateful.py`` and the pure-Python baseline of
``bench/bench_mamba_radix_cache.py``. It is :class:`RefRadixCache` (same tree, clock, node
ids, namespaces, key/value checks, KV insert and LRU leaf eviction) plus one optional state
slot per node, written as plainly as the parent: a second ``sorted`` list built on each
``evict`` stands in for the compiled cache's second heap.

What the Mamba model adds (the compiled ``MambaTreeCore`` implements the same):

* ``mamba_value`` on a node is the recurrent state after the node's last token (a length-1
  read-only int32 array) or None. A split's new upper node never has one.
* ``match_prefix`` never splits: a match ending inside a node stops before it and leaves it
  untouched. The result ends at the deepest fully matched node that holds a state;
  ``mamba_branching_seqlen`` is the page-aligned KV match length (the part inside the
  partially matched node included) when it is longer than that, else None.
* ``insert(key, value, mamba_value)`` attaches the state to the node ending at the aligned key
  end unless one is already there (``mamba_exist=True``: the slot stays the caller's); without
  a state, ``mamba_exist`` says whether one is stored at the key's end.
* ``inc_lock_ref`` also locks the node's own state (``mamba_lock_ref``); ``dec_lock_ref``
  releases a state lock when the node holds one, then the KV locks. A node counts the locks
  taken on it (``own_lock``, beside ``lock_ref``, which also counts its descendants'): only
  a node that was locked itself can be unlocked, and a token False needs one of its locks
  that holds no state.
* ``evict(num_tokens, swa_num_tokens=0, mamba_num=None)``: phase 1 is RadixCache's LRU leaf
  eviction (a removed node's state goes too); phase 2 takes unlocked states by smallest
  ``(last_access_time, id)`` until ``mamba_num`` states are gone in this call: an unlocked
  leaf is removed whole, any other node only loses its state. One ``allocator.free`` and one
  ``mamba_pool.free`` call per ``evict``/``reset``.

Not thread-safe: callers serialise access (see :class:`BasePrefixCache`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from reference_model import (
    _EMPTY_I32,
    _I32_MAX,
    RefRadixCache,
    TreeNode,
    _counts,
    _int64_arg,
)

from pymllm.mem_cache.base_prefix_cache import EvictResult, InsertResult, MatchResult, RadixKey
from pymllm.mem_cache.errors import InvalidValueError, LockStateError


class MambaTreeNode(TreeNode):
    """A reference tree node with an optional Mamba state slot."""

    __slots__ = ("mamba_lock_ref", "mamba_value")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.mamba_value: np.ndarray | None = None
        self.mamba_lock_ref = 0

    @property
    def full_lock_ref(self) -> int:
        return self.lock_ref

    def __repr__(self) -> str:
        state = "" if self.mamba_value is None else f" mamba={int(self.mamba_value[0])}"
        return f"{super().__repr__()[:-1]}{state} mamba_lock_ref={self.mamba_lock_ref})"


def _parse_state_slot(mamba_value: Any) -> int:
    """One state slot from an int or a length-1 (or 0-d) integer array/list."""
    if isinstance(mamba_value, bool):
        raise TypeError("mamba_value: expected an int slot or a length-1 int array, got bool")
    if not isinstance(mamba_value, int):
        try:
            arr = np.asarray(mamba_value)
        except (TypeError, ValueError) as exc:
            raise InvalidValueError(f"mamba_value: cannot read {mamba_value!r}: {exc}") from exc
        if arr.dtype.kind not in "iu" or arr.size != 1 or arr.ndim > 1:
            raise InvalidValueError(
                f"mamba_value: expected one integer state slot, got {mamba_value!r}"
            )
        mamba_value = int(arr.reshape(-1)[0])
    if not 0 <= mamba_value <= _I32_MAX:
        raise InvalidValueError(f"mamba_value: state slot {mamba_value} is outside [0, 2**31)")
    return mamba_value


class RefMambaRadixCache(RefRadixCache):
    """Pure-Python radix-tree prefix cache with Mamba state slots; same contract as
    ``MambaRadixCache``.

    Ownership: KV slots as in :class:`RefRadixCache`. A state slot passed to ``insert``
    becomes the tree's unless ``mamba_exist`` is True; states leave the tree only through
    ``evict``/``reset``, back to ``mamba_pool.free(int32 array)``. A call that raises changes
    nothing.
    """

    NODE_CLASS = MambaTreeNode

    def __init__(
        self,
        page_size: int = 1,
        token_to_kv_pool_allocator: Any = None,
        mamba_pool: Any = None,
        on_node_evict: Callable[[int], Any] | None = None,
        eviction_policy: str = "lru",
    ) -> None:
        if mamba_pool is not None and not callable(getattr(mamba_pool, "free", None)):
            raise TypeError(f"mamba_pool: expected an object with free(slots), got {mamba_pool!r}")
        super().__init__(
            page_size, None, token_to_kv_pool_allocator, on_node_evict, eviction_policy
        )
        self.mamba_pool = mamba_pool

    def _reset_state(self) -> None:
        super()._reset_state()
        self._mamba_evictable = 0
        self._mamba_protected = 0
        self._states_out: list[int] = []  # states freed by the running evict, in order

    # ------------------------------------------------------------------ public API

    def match_prefix(self, key: RadixKey, **kwargs: Any) -> MatchResult:
        """Longest cached prefix of *key* that ends at a node holding a state; never splits.

        Fully matched nodes get ``hit_count += 1`` and ``last_access_time = clock``.
        """
        tokens, extra_key, width = self._parse_key(key)
        ns = (extra_key, width)
        self.clock += 1
        node, pos, path = self.root_node, 0, []
        partial = 0
        while len(tokens) - pos >= self.page_size:
            child = node.children.get(self._child_key(node, tokens, pos, ns))
            if child is None:
                break
            c = self._key_match(child.tokens, tokens, pos, len(tokens))
            if c < len(child.tokens):
                partial = c  # the key leaves (or ends) inside child: stop above it
                break
            child.last_access_time = self.clock
            child.hit_count += 1
            path.append(child)
            pos += c
            node = child
        while path and path[-1].mamba_value is None:
            path.pop()
        last = path[-1] if path else self.root_node
        indices = (
            np.concatenate([n.value for n in path]).astype(np.int32) if path else _EMPTY_I32.copy()
        )
        kv_len = pos + partial
        return MatchResult(
            indices=indices,
            last_node=last,
            prefix_len=len(indices),
            mamba_branching_seqlen=kv_len if kv_len > len(indices) else None,
        )

    def insert(  # type: ignore[override]  # the compiled cache's order: mamba_value 3rd
        self,
        key: RadixKey,
        value: Any = None,
        mamba_value: Any = None,
        priority: int = 0,
        **kwargs: Any,
    ) -> InsertResult:
        """Insert KV as :meth:`RefRadixCache.insert` and attach *mamba_value* (an int or a
        length-1 int array) to the node ending at the key's end (a key of whole pages), unless
        another is there (``mamba_exist=True``; the slot stays the caller's). Without
        *mamba_value*, ``mamba_exist`` says whether a state is stored at the key's end."""
        if kwargs:
            raise TypeError(f"insert() got unexpected keyword arguments {sorted(kwargs)}")
        prio = _int64_arg("priority", priority)
        tokens, extra_key, width = self._parse_key(key)
        arr = self._parse_value(value, tokens, width)
        self._new_priority = prio
        state = None
        if mamba_value is not None:
            state = _parse_state_slot(mamba_value)
            if not tokens or len(tokens) % self.page_size:
                raise InvalidValueError(
                    f"mamba_value: a state is the one after the key's last token, so the key "
                    f"must end on a page boundary (page_size {self.page_size}), got "
                    f"{len(tokens)} tokens"
                )
        prefix_len, node = self._insert_kv(tokens, arr, (extra_key, width))
        exist = False
        if state is not None:
            if node.mamba_value is not None:
                # the node's own state handed back is no second one
                exist = int(node.mamba_value[0]) != state
            else:
                node.mamba_value = np.array([state], dtype=np.int32)
                node.mamba_value.flags.writeable = False
                node.mamba_lock_ref = 0
                self._mamba_evictable += 1
        else:
            exist = (
                node is not self.root_node
                and len(tokens) % self.page_size == 0
                and node.mamba_value is not None
            )
        self._raise_priority(node, prio)
        return InsertResult(prefix_len=prefix_len, last_node=node, mamba_exist=exist)

    def evict(
        self, num_tokens: int, swa_num_tokens: int = 0, mamba_num: int | None = None
    ) -> EvictResult:
        """Phase 1: LRU leaves until *num_tokens* KV tokens are freed (with their states).
        Phase 2: LRU unlocked states until *mamba_num* (default: the second argument)
        states are freed in this call; an unlocked leaf goes whole, others lose the state."""
        if mamba_num is None:
            mamba_num = swa_num_tokens
        elif swa_num_tokens:
            raise TypeError("evict(): give the Mamba state count once (mamba_num or the 2nd arg)")
        num_tokens, mamba_num = _counts(num_tokens, mamba_num)
        freed: list[np.ndarray] = []
        self._states_out = []
        evicted = self._evict_leaves(num_tokens, freed) if num_tokens > 0 else 0
        if len(self._states_out) < mamba_num:
            holders = [n for n in self._iter_nodes() if n.mamba_value is not None]
            candidates = sorted(
                (*self._evict_order(n), n) for n in holders if n.mamba_lock_ref == 0
            )
            for *_, node in candidates:
                if len(self._states_out) >= mamba_num:
                    break
                if not node.children and node.lock_ref == 0:
                    evicted += self._remove_leaf(node, freed)
                else:
                    self._drop_state(cast(MambaTreeNode, node))
        states, self._states_out = self._states_out, []
        if freed and self.token_to_kv_pool_allocator is not None:
            kv = np.concatenate(freed).astype(np.int32)
            if len(kv):
                self.token_to_kv_pool_allocator.free(kv)
        if states and self.mamba_pool is not None:
            self.mamba_pool.free(np.array(states, dtype=np.int32))
        return EvictResult(full_evicted=evicted, mamba_evicted=len(states))

    def _remove_leaf(self, node: TreeNode, freed: list[np.ndarray]) -> int:
        assert isinstance(node, MambaTreeNode)
        if node.mamba_value is not None:
            self._drop_state(node)
        return super()._remove_leaf(node, freed)

    def _drop_state(self, node: MambaTreeNode) -> None:
        assert node.mamba_value is not None and node.mamba_lock_ref == 0
        self._states_out.append(int(node.mamba_value[0]))
        node.mamba_value = None
        self._mamba_evictable -= 1

    def inc_lock_ref(self, node: Any) -> bool:
        """Lock *node*'s KV and its ancestors' (as RadixCache), and *node*'s own state.
        Returns the token for :meth:`dec_lock_ref`: whether a state lock was taken."""
        node = self._check_node(node)
        super().inc_lock_ref(node)  # and node.own_lock
        if node is self.root_node:
            return False
        if node.mamba_value is None:
            return False
        if node.mamba_lock_ref == 0:
            self._mamba_evictable -= 1
            self._mamba_protected += 1
        node.mamba_lock_ref += 1
        return True

    def dec_lock_ref(self, node: Any, swa_boundary_id: Any = None) -> None:  # type: ignore[override]
        """Undo one :meth:`inc_lock_ref` given its token (True: release the state lock too;
        None: release one if the node holds one). ``LockStateError`` (nothing changed) when
        the node, or with token True its state, holds no lock, when the token is False and
        every lock taken on the node holds its state, and when the node's locks are all its
        descendants'. The root: a no-op, except that True raises (its token is False)."""
        node = self._check_node(node)
        root = node is self.root_node
        if not root and node.lock_ref == 0:
            raise LockStateError(f"{node!r} holds no lock")
        if swa_boundary_id is None:
            release_state = node.mamba_lock_ref > 0
        elif isinstance(swa_boundary_id, (bool, np.bool_)):  # a token kept in numpy too
            release_state = bool(swa_boundary_id)
            if release_state and node.mamba_lock_ref == 0:
                raise LockStateError(
                    f"swa_boundary_id: got {swa_boundary_id!r} (a state lock), but {node!r} "
                    "holds no state lock"
                )
        else:
            raise TypeError(f"swa_boundary_id: expected a bool token, got {swa_boundary_id!r}")
        if root:
            return
        if node.own_lock == 0:
            raise LockStateError(f"{node!r} holds only its descendants' locks")
        if not release_state and node.own_lock <= node.mamba_lock_ref:
            raise LockStateError(
                f"swa_boundary_id: got {swa_boundary_id!r} (no state lock), but each of "
                f"{node!r}'s locks holds its state"
            )
        super().dec_lock_ref(node)  # all or nothing: a refusal changes no count (own_lock too)
        if release_state:
            node.mamba_lock_ref -= 1
            if node.mamba_lock_ref == 0:
                self._mamba_protected -= 1
                self._mamba_evictable += 1

    def mamba_evictable_size(self) -> int:
        """Stored states that are not locked."""
        return self._mamba_evictable

    def mamba_protected_size(self) -> int:
        """Stored states that are locked."""
        return self._mamba_protected

    def reset(self) -> None:
        """Free every tree-owned KV slot (one call) and every state (one call); empty the
        tree. Handles become stale; the clock goes back to 0; node ids keep counting."""
        states = [int(n.mamba_value[0]) for n in self._iter_nodes() if n.mamba_value is not None]
        super().reset()  # frees the KV and calls _reset_state
        if states and self.mamba_pool is not None:
            self.mamba_pool.free(np.array(states, dtype=np.int32))

    # ------------------------------------------------------------------ test hooks

    def _tree_states(self) -> np.ndarray:
        """Every tree-owned state slot (the test ledger reads the tree through this)."""
        states = [int(n.mamba_value[0]) for n in self._iter_nodes() if n.mamba_value is not None]
        return np.array(states, dtype=np.int32)

    def _check_invariants(self) -> None:
        super()._check_invariants()
        root = self.root_node
        assert isinstance(root, MambaTreeNode) and root.mamba_value is None
        assert root.mamba_lock_ref == 0
        evictable = protected = 0
        for node in self._iter_nodes():
            assert isinstance(node, MambaTreeNode), f"{node!r} is not a MambaTreeNode"
            assert node.lock_ref >= node.mamba_lock_ref >= 0, f"{node!r}: mamba lock"
            assert node.own_lock >= node.mamba_lock_ref, f"{node!r}: state lock without a lock"
            if node.mamba_value is None:
                assert node.mamba_lock_ref == 0, f"{node!r}: locks a state it does not hold"
                continue
            v = node.mamba_value
            assert v.dtype == np.int32 and v.shape == (1,) and 0 <= v[0], f"{node!r}: state"
            if node.mamba_lock_ref:
                protected += 1
            else:
                evictable += 1
        assert evictable == self._mamba_evictable, (
            f"mamba evictable {self._mamba_evictable} != {evictable}"
        )
        assert protected == self._mamba_protected, (
            f"mamba protected {self._mamba_protected} != {protected}"
        )
        states = self._tree_states().tolist()
        assert len(set(states)) == len(states), "a state slot is held by two nodes"


__all__ = ["MambaTreeNode", "RefMambaRadixCache"]
