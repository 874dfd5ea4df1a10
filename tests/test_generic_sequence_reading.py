"""The reading of sequences numpy reads item by item (``_sequence_as_list`` /
``_reads_as_items`` in ``_allocator.pyx``) against what numpy itself does with the same
object (an ``IntEnum`` member is an int, a ``mappingproxy`` one object), nested sequences
of any class, and the exceptions that reading lets through with their own type."""

from __future__ import annotations

import collections
import enum
import fractions
import types

import numpy as np
import pytest

from pymllm.mem_cache import RadixCache, RadixKey
from pymllm.mem_cache.chunk_cache import ChunkCache
from pymllm.mem_cache.errors import (
    InvalidKeyError,
    InvalidValueError,
    LockStateError,
    ReentrantCallError,
)
from pymllm.mem_cache.memory_pool import (
    ReqToTokenPool,
    TokenToKVPoolAllocator,
    scatter_rows,
)


class Slot(enum.IntEnum):
    ONE = 1
    THREE = 3


class Perm(enum.IntFlag):
    R = 1
    W = 2
    X = 4


class Seq(collections.abc.Sequence):
    """A plain abc Sequence (its metaclass is ABCMeta, as UserList's)."""

    def __init__(self, items):
        self.items = list(items)

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)


def _allocator_with(n: int) -> TokenToKVPoolAllocator:
    alloc = TokenToKVPoolAllocator(16)
    alloc.alloc(n)  # slots 1..n
    return alloc


# -- an int subclass whose metaclass has __len__/__getitem__ is an int, as numpy reads it --


def test_int_enum_slot_is_read_as_its_value():
    """A type test through ``hasattr(type, "__len__")`` sees EnumType's __len__: an IntEnum
    member would be taken for a sequence, and list() of it fails."""
    alloc = _allocator_with(4)
    assert alloc.is_allocated(Slot.THREE).tolist() == [True]
    alloc.free(Slot.THREE)
    assert alloc.available_size() == 13


def test_int_flag_slot_is_one_int_not_its_members():
    """An IntFlag member is iterable (its member flags) and its metaclass has __len__ and
    __getitem__: read as a sequence, R|W would free slots 1 and 2 instead of slot 3."""
    alloc = _allocator_with(4)
    assert np.asarray(Perm.R | Perm.W).tolist() == 3  # numpy: one int
    alloc.free(Perm.R | Perm.W)
    assert alloc.is_allocated([1, 2, 3, 4]).tolist() == [True, True, False, True]


def test_int_flag_key_is_refused_as_a_scalar():
    """numpy reads an IntFlag as a 0-d int: no 1-D key (not the key [1, 4])."""
    cache = RadixCache()
    with pytest.raises(InvalidKeyError):
        cache.insert(RadixKey(Perm.R | Perm.X))
    with pytest.raises(InvalidValueError):
        cache.insert(RadixKey([7, 8]), Perm.R | Perm.X)
    assert cache.total_size() == 0


def test_int_enum_request_row_and_scatter_slot():
    """memory_pool's shared checks (``_refuse_deleted``/``_refuse_bool_slots``) run
    ``_sequence_as_list`` on every argument: an IntEnum row or slot is an int there too."""
    pool = ReqToTokenPool(4, 8)
    pool.alloc(1)
    pool.write(Slot.ONE, np.arange(8, dtype=np.int32))
    pool.write((Slot.ONE, slice(0, 2)), np.array([5, 6], dtype=np.int32))
    assert pool.req_to_token[1, :3].tolist() == [5, 6, 2]
    assert int(scatter_rows(Slot.ONE, 8)) == 1


def test_mappingproxy_is_not_read_as_its_keys():
    """A mappingproxy has __len__ and __getitem__ (mp_subscript) but no sq_item: numpy
    reads it as one object (refused), not as a sequence of its keys."""
    assert np.asarray(types.MappingProxyType({3: "x"})).dtype == object
    alloc = _allocator_with(4)
    with pytest.raises(InvalidValueError):
        alloc.is_allocated(types.MappingProxyType({3: "x"}))
    with pytest.raises(InvalidValueError):
        alloc.free(types.MappingProxyType({3: "x"}))
    assert alloc.available_size() == 12
    with pytest.raises(InvalidKeyError):
        RadixCache().insert(RadixKey(types.MappingProxyType({1: 0, 2: 0})))


# -- item types whose metaclass is not exactly `type` (Cython's exact check of `type t`) --


def test_user_list_of_user_lists():
    """The outer UserList is read as a list, and ``_holds_bool`` then tests the inner
    UserList's type (metaclass ABCMeta): a ``type``-typed Cython argument raised a bare
    TypeError there. numpy reads it as [[3]]."""
    alloc = _allocator_with(4)
    nested = collections.UserList([collections.UserList([3])])
    assert alloc.is_allocated(nested).tolist() == [True]


@pytest.mark.parametrize(
    "inner",
    [collections.UserList, Seq, collections.deque],
    ids=["UserList", "abc-Sequence", "deque"],
)
def test_other_sequence_nested_in_a_list(inner):
    """A bool in a nested UserList / abc Sequence is refused as in a nested list (the
    sequence reading's aim); plain ints in it are read (ABCMeta types raised TypeError)."""
    alloc = _allocator_with(4)
    assert alloc.is_allocated([inner([3])]).tolist() == [True]
    with pytest.raises(InvalidValueError):
        alloc.is_allocated([inner([True, 3])])
    with pytest.raises(InvalidValueError):
        alloc.free([inner([True])])
    assert alloc.available_size() == 12


def test_items_with_a_metaclass_in_a_list():
    """IntEnum items are ints (numpy reads them so); a Fraction is no slot id
    (InvalidValueError, a ValueError), not a bare TypeError from the type test."""
    alloc = _allocator_with(4)
    assert alloc.is_allocated([Slot.THREE, Slot.ONE]).tolist() == [True, True]
    with pytest.raises(InvalidValueError):
        alloc.is_allocated([fractions.Fraction(3)])


# -- exceptions raised while reading the sequence keep their type --


def test_reentrant_call_while_reading_a_key_stays_reentrant_call_error():
    """``_sequence_as_list`` wraps a reading error in the call's typed error, but not the
    cache's own ReentrantCallError (a documented contract)."""
    cache = RadixCache()

    class Reenter(collections.UserList):
        def __iter__(self):
            cache.match_prefix(RadixKey([1]))
            return super().__iter__()

    with pytest.raises(ReentrantCallError):
        cache.insert(RadixKey(Reenter([1, 2, 3])))
    cache._check_invariants()
    assert cache.total_size() == 0


def test_memory_error_while_reading_is_not_a_value_error():
    class OutOfMemory(collections.UserList):
        def __iter__(self):
            raise MemoryError("simulated")

    alloc = _allocator_with(4)
    with pytest.raises(MemoryError):
        alloc.free(OutOfMemory([1]))
    with pytest.raises(MemoryError):
        RadixCache().insert(RadixKey(OutOfMemory([1, 2])))
    assert alloc.available_size() == 12


# -- item 3 across the caches --


def test_chunk_cache_refuses_a_foreign_unlock_token_like_radix_cache():
    """RadixCache without a window refuses a non-None swa_boundary_id (inc_lock_ref gave
    None); so does ChunkCache, whose inc_lock_ref also gives None."""
    plain = RadixCache()
    node = plain.insert(RadixKey([1, 2])).last_node
    plain.inc_lock_ref(node)
    with pytest.raises(LockStateError):
        plain.dec_lock_ref(node, swa_boundary_id=5)
    chunk = ChunkCache()
    m = chunk.match_prefix(RadixKey([1, 2]))
    assert chunk.inc_lock_ref(m.last_node) is None
    with pytest.raises(LockStateError):
        chunk.dec_lock_ref(m.last_node, swa_boundary_id=5)
