"""A straightforward pure-Python radix cache, written the way the seed's documentation and
SGLang's ``radix_cache.py`` write one: the baseline the issue-2 workload is timed against.

It takes keys exactly as the caller gives them: a list key is compared as Python ints, a
numpy key element by element as numpy scalars (``zip`` over the two arrays), with no
conversion up front. ``children`` dicts keyed by the first token (``(extra_key, token)``
under the root), a per-token ``_key_match``, values stored as a copy of the caller's slice
(SGLang clones them), and an ``evict`` that walks the tree to collect the evictable leaves
and ``heapq.heapify``s them on every call. No input checks: it is a yardstick, not a cache
to serve with (``RefRadixCache`` in ``tests/reference_model.py`` is the checked model
the property tests use, and it converts numpy keys to lists once).

LRU by a logical clock stamped on every node a match or insert passes, ties broken by node
creation order: the same order as :class:`~pymllm.mem_cache.RadixCache`, so on the same
requests both caches hit the same tokens (the benchmark checks that).
"""

from __future__ import annotations

import heapq
import itertools

import numpy as np

_EMPTY = np.zeros(0, dtype=np.int32)


# A node's recency is one int, the logical clock above its id, so that the heap compares
# one attribute, as SGLang's TreeNode.__lt__ compares its float last_access_time (a tuple
# built per comparison made every evict's heapify about 1.5x dearer), while ties of the
# clock still break by creation order, as in the compiled cache.
_UID_BITS = 40


class _Node:
    __slots__ = ("children", "key", "last_access", "lock_ref", "parent", "uid", "value")

    _ids = itertools.count()

    def __init__(self, key, value, parent, clock):
        self.children = {}
        self.parent = parent
        self.key = key
        self.value = value
        self.lock_ref = 0
        self.uid = next(self._ids)
        self.last_access = (clock << _UID_BITS) | self.uid

    def touch(self, clock):
        self.last_access = (clock << _UID_BITS) | self.uid

    def __lt__(self, other):
        return self.last_access < other.last_access


class SeedStyleRadixCache:
    """Page size 1, full attention: ``match_prefix``, ``insert``, ``evict``,
    ``inc_lock_ref``/``dec_lock_ref`` and the size queries of ``BasePrefixCache``."""

    def __init__(self, token_to_kv_pool_allocator=None):
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.reset()

    def reset(self):
        self.root = _Node(_EMPTY, _EMPTY, None, 0)
        self.root.lock_ref = 1
        self.clock = 0
        self._evictable = 0
        self._protected = 0

    def _child_key(self, node, key, extra_key):
        return (extra_key, key[0]) if node is self.root else key[0]

    @staticmethod
    def _key_match(key0, key1):
        i = 0
        for a, b in zip(key0, key1, strict=False):
            if a != b:
                break
            i += 1
        return i

    def _split(self, child, n, extra_key):
        parent = child.parent
        upper = _Node(child.key[:n], child.value[:n], parent, child.last_access >> _UID_BITS)
        upper.lock_ref = child.lock_ref
        parent.children[self._child_key(parent, child.key, extra_key)] = upper
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def _walk(self, tokens, extra_key):
        """Follow `tokens` down the tree, splitting where the match ends inside a node; the
        rest of the key is sliced once a node, as SGLang's _match_prefix_helper does."""
        self.clock += 1
        node, pos, values, key = self.root, 0, [], tokens
        while len(key):
            child = node.children.get(self._child_key(node, key, extra_key))
            if child is None:
                break
            n = self._key_match(child.key, key)
            if n < len(child.key):
                child = self._split(child, n, extra_key)
                child.touch(self.clock)
                values.append(child.value)
                pos += n
                node = child
                break
            child.touch(self.clock)
            values.append(child.value)
            pos += n
            node = child
            key = key[n:]
        return node, pos, values

    def match_prefix(self, key):
        from pymllm.mem_cache import MatchResult

        node, pos, values = self._walk(key.token_ids, key.extra_key)
        indices = np.concatenate(values) if values else _EMPTY.copy()
        return MatchResult(indices=indices, last_node=node, prefix_len=pos)

    def insert(self, key, value=None):
        from pymllm.mem_cache import InsertResult

        tokens = key.token_ids
        node, pos, _ = self._walk(tokens, key.extra_key)
        if pos < len(tokens):
            rest = tokens[pos:]
            leaf = _Node(rest, np.array(value[pos:], dtype=np.int32), node, self.clock)
            node.children[self._child_key(node, rest, key.extra_key)] = leaf
            self._evictable += len(tokens) - pos
            node = leaf
        return InsertResult(prefix_len=pos, last_node=node)

    def _collect_leaves(self):
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if not node.children:
                if node.lock_ref == 0:
                    leaves.append(node)
            else:
                stack.extend(node.children.values())
        return leaves

    def evict(self, num_tokens, swa_num_tokens=0):
        from pymllm.mem_cache import EvictResult

        leaves = self._collect_leaves()
        heapq.heapify(leaves)
        evicted = 0
        while evicted < num_tokens and leaves:
            node = heapq.heappop(leaves)
            if self.token_to_kv_pool_allocator is not None:
                self.token_to_kv_pool_allocator.free(node.value)
            parent = node.parent
            for k, v in parent.children.items():
                if v is node:
                    del parent.children[k]
                    break
            evicted += len(node.key)
            self._evictable -= len(node.key)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return EvictResult(full_evicted=evicted)

    def inc_lock_ref(self, node):
        while node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node, **kwargs):
        while node is not self.root:
            if node.lock_ref == 1:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node.lock_ref -= 1
            node = node.parent

    def evictable_size(self):
        return self._evictable

    def protected_size(self):
        return self._protected

    def total_size(self):
        return self._evictable + self._protected


class SeedStyleTolistRadixCache(SeedStyleRadixCache):
    """The same tree with a numpy key converted to a list of ints once per call
    (``tolist()``), as an implementation that stores list keys would do at its boundary: the
    baseline with the cost of comparing numpy scalars taken out of its numpy-key rounds
    (``python bench/ab_builds.py BUILD.so seed-style seed-style-tolist``)."""

    def _walk(self, tokens, extra_key):
        if isinstance(tokens, np.ndarray):
            tokens = tokens.tolist()
        return super()._walk(tokens, extra_key)

    def insert(self, key, value=None):
        from pymllm.mem_cache import RadixKey

        if isinstance(key.token_ids, np.ndarray):
            key = RadixKey(key.token_ids.tolist(), key.extra_key)
        return super().insert(key, value)
