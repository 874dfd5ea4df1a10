"""Allocator behaviours that no other test pinned (a mutation-testing review of
``_allocator.pyx``: 53 mutants, 48 killed by the suite; each test here fails on one of the
five survivors and passes on the real code).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from pymllm.mem_cache import (
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import AllocatorStateError, InvalidFreeError, InvalidValueError

# -- need_sort=False: a free list whose head is not a run, but whose first and last page
# differ by exactly need - 1 ([1, 5, 6, 4]), is still booked page by page. Booked as the
# range 1..4, slots 5 and 6 would be handed out while marked free and 2, 3 stuck allocated.


def test_unsorted_free_list_with_a_run_like_span_is_booked_per_page() -> None:
    a = TokenToKVPoolAllocator(8, need_sort=False)
    held = a.alloc(8)
    assert held is not None
    for s in (1, 5, 6, 4):  # free list becomes [1, 5, 6, 4]: 4 - 1 == 4 - 1, yet no run
        a.free([s])
    got = a.alloc(4)
    assert sorted(got.tolist()) == [1, 4, 5, 6]
    assert a.is_allocated(np.arange(1, 9)).all()
    a._check_invariants()
    a.free(got)  # each handed-out slot is the caller's to free
    assert a.available_size() == 4
    assert not a.is_allocated([1, 4, 5, 6]).any()
    assert a.is_allocated([2, 3, 7, 8]).all()
    a._check_invariants()


def test_unsorted_span_swa() -> None:
    a = SWATokenToKVPoolAllocator(8, 8, need_sort=False)
    a.alloc(8)
    for s in (1, 5, 6, 4):
        a.free([s])
    got = a.alloc(4)
    a._check_invariants()
    a.free(got)
    a._check_invariants()


# -- SWATokenToKVPoolAllocator.free_group_begin holds back the SWA side as well as the
# full side: SWA slots freed inside a group are not handed out again before it ends (the
# device may still read their window KV). available_size() is the smaller side, so a
# check of it alone cannot see the SWA side leave the group early.


def test_swa_slots_freed_in_a_group_wait_for_its_end() -> None:
    a = SWATokenToKVPoolAllocator(16, 8)
    x = a.alloc(4)
    swa_x = set(a.translate_loc_from_full_to_swa(x).tolist())
    y = a.alloc(4)  # SWA side now full: 0 free
    assert a.swa_available_size() == 0
    a.free_group_begin()
    a.free(x)
    assert a.full_available_size() == 8 and a.swa_available_size() == 0
    assert a.alloc(1) is None  # the freed SWA slots are still held
    a._check_invariants()
    a.free_group_end()
    assert a.swa_available_size() == 4
    z = a.alloc(4)
    assert set(a.translate_loc_from_full_to_swa(z).tolist()) == swa_x
    a.free(y)
    a.free(z)
    a._check_invariants()


def test_swa_free_swa_in_a_group_is_held() -> None:
    a = SWATokenToKVPoolAllocator(16, 4)
    x = a.alloc(4)
    a.free_group_begin()
    a.free_swa(x)
    assert a.swa_available_size() == 0
    a.free_group_end()
    assert a.swa_available_size() == 4
    a._check_invariants()


# -- clear() is refused while a prefix cache holds any page, the pool's last page
# included (the other tests insert the pool's first slots, never its last page alone);
# a clear that went through would hand out a page the tree still serves.


@pytest.mark.parametrize("page_size", [1, 4])
def test_clear_refused_when_the_cache_holds_only_the_last_page(page_size: int) -> None:
    alloc = TokenToKVPoolAllocator(16, page_size=page_size)
    cache = RadixCache(page_size=page_size, token_to_kv_pool_allocator=alloc)
    every = alloc.alloc(16)
    last = every[-page_size:]
    assert last[-1] == 16 + page_size - 1  # the pool's last slot
    cache.insert(RadixKey(list(range(100, 100 + page_size))), last)
    alloc.free(every[:-page_size])
    assert alloc.is_cached(last).all()
    with pytest.raises(AllocatorStateError, match=f"a prefix cache holds {page_size} slots"):
        alloc.clear()
    assert alloc.is_cached(last).all()  # nothing changed: the cache still owns it
    assert alloc.available_size() == 16 - page_size
    cache.reset()
    alloc.clear()
    assert alloc.available_size() == 16
    alloc._check_invariants()


def test_swa_clear_refused_when_the_cache_holds_only_the_last_slot() -> None:
    alloc = SWATokenToKVPoolAllocator(8, 8)
    cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=alloc)
    every = alloc.alloc(8)
    cache.insert(RadixKey([100]), every[-1:])
    alloc.free(every[:-1])
    with pytest.raises(AllocatorStateError):
        alloc.clear()
    assert alloc.is_cached(every[-1:]).all()
    alloc._check_invariants()


# -- A 64-bit slot id outside [0, 2**31) is refused, never truncated to int32:
# -2**32 + 5 would truncate to slot 5, another owner's (-1, which the other tests use,
# stays -1 when truncated and is refused anyway).

WRAPS_TO_5 = 5 - 2**32


@pytest.mark.parametrize("cls", [TokenToKVPoolAllocator, lambda n: SWATokenToKVPoolAllocator(n, n)])
@pytest.mark.parametrize("as_list", [False, True])
def test_free_of_a_negative_int64_that_wraps_to_a_live_slot_frees_nothing(cls, as_list) -> None:
    a = cls(16)
    held = a.alloc(8)
    assert 5 in held.tolist()
    bad = [WRAPS_TO_5] if as_list else np.array([WRAPS_TO_5], dtype=np.int64)
    with pytest.raises(InvalidFreeError, match="out of range"):
        a.free(bad)
    assert a.is_allocated(held).all() and a.available_size() == 8
    a._check_invariants()


def test_a_prefix_that_wraps_to_a_pool_slot_is_refused() -> None:
    a = TokenToKVPoolAllocator(16)
    a.alloc(8)
    with pytest.raises(InvalidValueError, match="prefix"):
        a.alloc(1, prefix=np.array([WRAPS_TO_5], dtype=np.int64))
    assert a.available_size() == 8


# -- page_size > 1: every slot of page 0, not only slot 0, is refused as the padding
# page, and the message says so (not "not allocated (double free?); its page 0 is free",
# which would be false: page 0 is reserved, never free).


@pytest.mark.parametrize("slot", [1, 3])
def test_slots_inside_the_padding_page_are_named_padding(slot: int) -> None:
    a = TokenToKVPoolAllocator(32, page_size=4)
    held = a.alloc(8)
    with pytest.raises(InvalidFreeError, match="padding"):
        a.free([held[0], slot])
    assert a.is_allocated(held).all()
    a._check_invariants()


@pytest.mark.parametrize("method", ["free", "free_swa"])
def test_swa_padding_page_slots_named_padding(method: str) -> None:
    a = SWATokenToKVPoolAllocator(32, 32, page_size=4)
    held = a.alloc(4)
    with pytest.raises(InvalidFreeError, match="padding"):
        getattr(a, method)([held[0], 2])
    a._check_invariants()


@pytest.mark.parametrize("swa", [False, True], ids=["full", "swa"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, object, "U1"])
def test_an_empty_non_integer_array_of_slots_is_refused(swa: bool, dtype: object) -> None:
    """An empty float array was taken as no slots by ``free``, ``is_allocated`` and
    ``alloc``'s prefix while a non-empty one was refused, and the tree refuses an empty
    float value: every one of them now refuses it, as it does a non-empty one. An empty
    list or tuple (which numpy reads as float64) is still no slots."""
    alloc = SWATokenToKVPoolAllocator(16, 16) if swa else TokenToKVPoolAllocator(16)
    empty = np.array([], dtype=dtype)
    calls = [
        lambda x: alloc.free(x),
        lambda x: alloc.is_allocated(x),
        lambda x: alloc.alloc(2, prefix=x),
    ]
    for call in calls:
        with pytest.raises(InvalidValueError, match="expected integer slot ids"):
            call(empty)
        call([])
        call(())
    alloc._check_invariants()


# "u" (text) is deprecated from Python 3.13 on: its warning would fail the run there
@pytest.mark.parametrize("typecode", ["d", "f"] + (["u"] if sys.version_info < (3, 13) else []))
def test_an_empty_float_array_array_of_slots_is_refused(typecode: str) -> None:
    """An ``array.array`` is read as a list (whose emptiness says nothing of its type): an
    empty one of floats was taken as no slots while a non-empty one was refused."""
    import array

    alloc = TokenToKVPoolAllocator(16)
    item = "a" if typecode == "u" else 1.0
    for arr in (array.array(typecode), array.array(typecode, [item])):
        for call in (alloc.free, alloc.is_allocated, lambda x: alloc.alloc(2, prefix=x)):
            with pytest.raises(InvalidValueError, match="expected integer slot ids"):
                call(arr)
    alloc.free(array.array("i"))  # an empty one of ints is no slots
    alloc._check_invariants()
