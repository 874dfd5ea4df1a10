"""Sequences the caches read item by item must be the ones numpy reads item by item: one
with ``__getitem__`` but no ``__len__`` is one object (never read, so an endless lookup
cannot hang a call), one that merely has a ``dtype`` attribute is still read item by item
(a bool in it refused), and ``hash_token_ids`` reads a list subclass as the tree does."""

from collections import UserList

import numpy as np
import pytest

from pymllm.mem_cache import (
    RadixCache,
    RadixKey,
    TokenToKVPoolAllocator,
    hash_token_ids,
)
from pymllm.mem_cache.errors import CacheError, InvalidKeyError


class GetitemNoLen:
    """__getitem__ without __len__: numpy reads it as one object (a 0-d object array)."""

    def __init__(self, items, limit=1000):
        self.items = items
        self.calls = 0
        self.limit = limit

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > self.limit:  # stands in for an endless lookup (e.g. a default)
            raise RuntimeError("read past the limit")
        return self.items[i]


class EndlessLookup:
    """Answers every index and has no length: list() of it never ends."""

    def __init__(self):
        self.calls = 0

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > 10_000:
            raise RuntimeError("read item by item: list() of this would never end")
        return 0


class SeqWithDtypeAttr(UserList):
    """A plain sequence that carries a dtype attribute; numpy ignores the attribute and
    reads the items one by one (True as 1)."""

    dtype = np.dtype(np.int64)


class ListIterDiffers(list):
    """A list subclass whose __iter__ is not its stored items."""

    def __iter__(self):
        return iter([7] * len(self))


def test_hash_refuses_getitem_without_len():
    assert np.asarray(GetitemNoLen([1, 2])).shape == ()  # numpy: one object
    with pytest.raises(InvalidKeyError):
        hash_token_ids(GetitemNoLen([1, 2]))


def test_endless_getitem_is_never_read_item_by_item():
    obj = EndlessLookup()
    with pytest.raises(CacheError):
        hash_token_ids(obj)
    assert obj.calls == 0


def test_tree_refuses_getitem_without_len():
    cache = RadixCache(page_size=1)
    with pytest.raises(InvalidKeyError):
        cache.match_prefix(RadixKey(GetitemNoLen([1, 2])))


def test_free_refuses_getitem_without_len():
    alloc = TokenToKVPoolAllocator(16, 1)
    slots = alloc.alloc(2)
    with pytest.raises(CacheError):
        alloc.free(GetitemNoLen([int(slots[0])]))
    assert alloc.is_allocated([int(slots[0])]).all()


def test_free_refuses_bool_in_sequence_with_dtype_attr():
    assert np.asarray(SeqWithDtypeAttr([True, 2])).tolist() == [1, 2]  # numpy: item by item
    alloc = TokenToKVPoolAllocator(16, 1)
    slots = alloc.alloc(4)
    assert 1 in slots.tolist()
    with pytest.raises(CacheError):
        alloc.free(SeqWithDtypeAttr([True, int(slots[1])]))
    assert alloc.is_allocated([1]).all()


def test_hash_refuses_bool_in_sequence_with_dtype_attr():
    with pytest.raises(InvalidKeyError):
        hash_token_ids(SeqWithDtypeAttr([True, 2]))


def test_tree_refuses_bool_in_sequence_with_dtype_attr():
    cache = RadixCache(page_size=1)
    with pytest.raises(InvalidKeyError):
        cache.match_prefix(RadixKey(SeqWithDtypeAttr([True, 2])))


def test_hash_reads_list_subclass_as_the_tree_does():
    key = ListIterDiffers([1, 2, 3])
    cache = RadixCache(page_size=1)
    node = cache.insert(RadixKey(key), np.array([5, 6, 7], np.int32)).last_node
    assert node.key.token_ids == [1, 2, 3]  # the tree reads the items as stored
    assert hash_token_ids(key) == hash_token_ids([1, 2, 3])
