"""Tests that kill the mutants of the sequence reading that the suite let live: each pins
one line of ``_reads_as_items`` / ``_holds_bool`` / ``_refuse_deleted_array`` /
``_integer_array`` in ``_allocator.pyx``, or ``_check_invariants``' page-hash check."""

from __future__ import annotations

import collections
import gc

import jax.numpy as jnp
import numpy as np
import pytest

from pymllm.mem_cache import RadixKey
from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache
from pymllm.mem_cache.memory_pool import TokenToKVPoolAllocator
from pymllm.mem_cache.radix_cache import RadixCache


def _allocator_with(n: int) -> TokenToKVPoolAllocator:
    alloc = TokenToKVPoolAllocator(16)
    alloc.alloc(n)  # slots 1..n
    return alloc


def test_dict_is_not_read_as_its_keys():
    """numpy reads a dict as one object (refused): ``dict`` in ``_NOT_ITEM_SEQUENCES``
    keeps ``list(d)`` (its keys) from being taken as slot ids."""
    alloc = _allocator_with(4)
    with pytest.raises(InvalidValueError):
        alloc.is_allocated({3: "x"})
    with pytest.raises(InvalidValueError):
        alloc.free({3: "x"})
    assert alloc.available_size() == 12


class _ArrayWithOtherItems:
    """A sequence with ``__array__``: numpy reads the array (slot 3), not the items."""

    def __array__(self, dtype=None, copy=None):
        return np.array([3], dtype=np.int32)

    def __len__(self):
        return 1

    def __getitem__(self, i):
        if i == 0:
            return True
        raise IndexError(i)


def test_array_protocol_wins_over_items():
    alloc = _allocator_with(4)
    assert np.asarray(_ArrayWithOtherItems()).tolist() == [3]
    assert alloc.is_allocated(_ArrayWithOtherItems()).tolist() == [True]
    alloc.free(_ArrayWithOtherItems())
    assert alloc.is_allocated([1, 2, 3, 4]).tolist() == [True, True, False, True]


@pytest.mark.parametrize("outer", [list, tuple])
def test_bool_in_a_deque_nested_in_a_list(outer):
    """``_holds_bool`` looks into a nested deque (the types test and the stack loop both):
    numpy would read ``[deque([True, 3])]`` as slots 1 and 3 (is_allocated takes any
    shape, so only the bool check refuses it)."""
    alloc = _allocator_with(4)
    assert np.asarray(outer([collections.deque([True, 3])])).dtype.kind == "i"
    with pytest.raises(InvalidValueError):
        alloc.is_allocated(outer([collections.deque([True, 3])]))
    with pytest.raises(InvalidValueError):
        alloc.is_allocated(outer([[collections.deque([np.bool_(True), 3])]]))
    assert alloc.is_allocated(outer([collections.deque([3])])).tolist() == [True]


def test_deleted_state_array_in_a_deque_is_refused():
    """``_refuse_deleted_array`` reads a deque as a list: a donated jax array in it is
    InvalidValueError, not numpy's bare RuntimeError."""
    state = jnp.asarray(3)
    state.delete()
    cache = MambaRadixCache()
    with pytest.raises(InvalidValueError, match="deleted"):
        cache.insert(RadixKey([1, 2]), [1, 2], mamba_value=collections.deque([state]))
    assert cache.total_size() == 0


class _CountingList(collections.UserList):
    reads = 0

    def __iter__(self):
        type(self).reads += 1
        return super().__iter__()


def test_a_generic_sequence_is_read_once_by_the_allocator():
    """``_integer_array`` reads it once, as a list, before the bool check and numpy."""
    alloc = _allocator_with(4)
    _CountingList.reads = 0
    alloc.free(_CountingList([3]))
    assert _CountingList.reads == 1
    _CountingList.reads = 0
    assert alloc.is_allocated(_CountingList([3, 4])).tolist() == [False, True]
    assert _CountingList.reads == 1


def test_check_invariants_sees_a_stale_page_hash():
    """``_check_invariants`` recomputes every cached page hash (``_check_hash_values``):
    a cached list edited in place (the tree's own dict, reached through the collector's
    referents) must fail it, though its length is right."""
    cache = RadixCache(2)
    node = cache.insert(RadixKey([1, 2, 3, 4]), np.arange(4, dtype=np.int32)).last_node
    hashes = cache.compute_node_hash(node)
    cache._check_invariants()
    (held,) = [
        d
        for d in gc.get_referents(cache)
        if isinstance(d, dict) and any(v == hashes[::-1] for v in d.values())
    ]
    (key,) = [k for k, v in held.items() if v == hashes[::-1]]
    held[key][0] = hashes[0]  # the last page's slot gets the first page's hash
    with pytest.raises(AssertionError, match="stale page hashes"):
        cache._check_invariants()
