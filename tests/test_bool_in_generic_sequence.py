"""A bool, or a deleted jax array, inside a sequence that is not a list, tuple or deque.

The allocators refuse a bool among slot ids (``InvalidValueError``: numpy would read
``[True, 3]`` as slots 1 and 3) and a deleted (donated) jax array (``InvalidValueError``,
not numpy's bare ``RuntimeError``), but they look for them only in lists, tuples and
deques. numpy reads any sequence (``collections.UserList``, a custom ``Sequence``) the
same way, so through one of those ``True`` is freed, or taken by a radix cache, as slot 1,
and a deleted array raises an untyped ``RuntimeError``.

Expected: the same refusal whatever sequence type holds the items, with nothing changed.
"""

from __future__ import annotations

from collections import UserList, deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from pymllm.mem_cache import RadixCache, RadixKey, hash_token_ids
from pymllm.mem_cache.errors import InvalidKeyError, InvalidValueError
from pymllm.mem_cache.memory_pool import (
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    pad_slots,
)


class _Slots(Sequence):
    """A read-only sequence of slot ids (no list underneath)."""

    def __init__(self, items: list[Any]) -> None:
        self._items = items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: Any) -> Any:
        return self._items[i]


SEQUENCES = [UserList, _Slots, deque]


def _snapshot(alloc: Any) -> tuple[int, bytes]:
    return alloc.available_size(), alloc.is_allocated(np.arange(alloc.size + 1)).tobytes()


@pytest.mark.parametrize("seq", SEQUENCES)
@pytest.mark.parametrize("cls", [TokenToKVPoolAllocator, SWATokenToKVPoolAllocator])
def test_free_refuses_a_bool_in_any_sequence(cls: type, seq: type) -> None:
    alloc = cls(8) if cls is TokenToKVPoolAllocator else cls(8, 8)
    alloc.alloc(4)
    before = _snapshot(alloc)
    with pytest.raises(InvalidValueError):
        alloc.free(seq([True, 3]))  # freed slots 1 and 3
    assert _snapshot(alloc) == before


@pytest.mark.parametrize("seq", SEQUENCES)
def test_alloc_prefix_refuses_a_bool_in_any_sequence(seq: type) -> None:
    alloc = TokenToKVPoolAllocator(8)
    alloc.alloc(4)
    before = _snapshot(alloc)
    with pytest.raises(InvalidValueError):
        alloc.alloc(1, prefix=seq([True, 3]))  # returned [1, 3, 5]
    assert _snapshot(alloc) == before


@pytest.mark.parametrize("seq", SEQUENCES)
def test_pad_slots_refuses_a_bool_in_any_sequence(seq: type) -> None:
    with pytest.raises(InvalidValueError):
        pad_slots(seq([True, 5]))  # returned [1, 5, 0, ...]


@pytest.mark.parametrize("seq", SEQUENCES)
def test_insert_refuses_a_bool_value_in_any_sequence(seq: type) -> None:
    """The tree took slot 1 (another request's) as the cache's for the True."""
    alloc = TokenToKVPoolAllocator(8)
    alloc.alloc(4)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    with pytest.raises(InvalidValueError):
        cache.insert(RadixKey([10, 11]), seq([True, 3]))
    assert not alloc.is_cached(np.arange(1, 9)).any()
    assert cache.total_size() == 0


@pytest.mark.parametrize("seq", SEQUENCES)
def test_deleted_array_in_any_sequence_is_a_typed_error(seq: type) -> None:
    jnp = pytest.importorskip("jax.numpy")
    alloc = TokenToKVPoolAllocator(8)
    alloc.alloc(4)
    gone = jnp.asarray(np.array([2], np.int32))
    gone.delete()
    before = _snapshot(alloc)
    for call in (alloc.free, alloc.is_allocated, lambda x: alloc.alloc(1, prefix=x)):
        with pytest.raises(InvalidValueError):
            call(seq([gone]))  # a bare RuntimeError from numpy
    assert _snapshot(alloc) == before


@pytest.mark.parametrize("seq", SEQUENCES)
def test_key_refuses_a_bool_token_in_any_sequence(seq: type) -> None:
    """A key of [True, 3] was cached as tokens [1, 3]."""
    cache = RadixCache()
    with pytest.raises(InvalidKeyError):
        cache.insert(RadixKey(seq([True, 3])), np.array([5, 6], np.int32))
    with pytest.raises(InvalidKeyError):
        cache.match_prefix(RadixKey(seq([True, 3])))
    assert cache.total_size() == 0


@pytest.mark.parametrize("seq", SEQUENCES)
def test_any_sequence_of_ints_reads_as_the_list(seq: type) -> None:
    """What the sequence holds is read once, as the same list would be."""
    alloc = TokenToKVPoolAllocator(8)
    taken = alloc.alloc(4)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey(seq([7, 8])), seq([int(taken[0]), int(taken[1])]))
    m = cache.match_prefix(RadixKey([7, 8, 9]))
    assert m.indices.tolist() == taken[:2].tolist()
    alloc.free(seq([int(taken[2])]))
    assert alloc.available_size() == 5
    cache._check_invariants()
    alloc._check_invariants()


def test_a_sequence_that_cannot_be_read_is_a_typed_error() -> None:
    class Broken(_Slots):
        def __getitem__(self, i: Any) -> Any:
            raise KeyError(i)

    alloc = TokenToKVPoolAllocator(8)
    alloc.alloc(4)
    before = _snapshot(alloc)
    with pytest.raises(InvalidValueError):
        alloc.free(Broken([1]))
    with pytest.raises(InvalidKeyError):
        RadixCache().match_prefix(RadixKey(Broken([1])))
    assert _snapshot(alloc) == before


@pytest.mark.parametrize("seq", SEQUENCES)
def test_hash_token_ids_refuses_a_bool_in_any_sequence(seq: type) -> None:
    """UserList([True, 3]) hashed as the page [1, 3]; a sequence of ints hashes as its list."""
    with pytest.raises(InvalidKeyError):
        hash_token_ids(seq([True, 3]))
    assert hash_token_ids(seq([1, 3])) == hash_token_ids([1, 3])
    assert hash_token_ids(seq([(1, 2), (3, 4)])) == hash_token_ids([(1, 2), (3, 4)])
