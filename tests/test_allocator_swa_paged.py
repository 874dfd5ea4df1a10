"""The allocators' behaviour that a mutation review of ``_allocator.pyx`` (session 23: 49
mutants of the SWA allocator, paged allocation and the bool-slot refusal; 34 killed by the
suite, 4 equivalent) found no test pinning: each test fails on one of the 11 survivors."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from pymllm.mem_cache._allocator import SWATokenToKVPoolAllocator, TokenToKVPoolAllocator
from pymllm.mem_cache.errors import AllocatorStateError, InvalidFreeError, InvalidValueError


@pytest.mark.parametrize("page_size", [1, 4])
def test_swa_translate_refuses_the_slot_one_past_the_mapping(page_size: int) -> None:
    """translate_loc_from_full_to_swa bounds its slots by the mapping's length: the slot
    just past it is refused (not read from past the end of the C array)."""
    a = SWATokenToKVPoolAllocator(8 * page_size, 8 * page_size, page_size=page_size)
    n = len(a.full_to_swa_index_mapping)
    assert a.translate_loc_from_full_to_swa([n - 1]).tolist() == [0]
    for bad in ([n], np.array([n], np.int64), n):
        with pytest.raises(InvalidValueError):
            a.translate_loc_from_full_to_swa(bad)


@pytest.mark.parametrize("need_sort", [False, True])
def test_swa_merge_and_sort_free_sorts_the_swa_side_too(need_sort: bool) -> None:
    """merge_and_sort_free folds both sides' frees into ascending free lists: the SWA slots
    handed out next are the lowest free ones, as the full slots are."""
    a = SWATokenToKVPoolAllocator(10, 10, need_sort=need_sort)
    x = a.alloc(8)
    assert a.translate_loc_from_full_to_swa(x).tolist() == x.tolist() == list(range(1, 9))
    a.free([6, 1, 4])
    a.merge_and_sort_free()
    y = a.alloc(3 if not need_sort else 2)
    expect = [1, 4, 6] if not need_sort else [1, 4]
    assert y.tolist() == expect
    assert a.translate_loc_from_full_to_swa(y).tolist() == expect
    a._check_invariants()


@pytest.mark.parametrize("page_size", [1, 2])
def test_swa_is_cached_is_false_for_a_callers_slots(page_size: int) -> None:
    """SWATokenToKVPoolAllocator.is_cached answers for a prefix cache's slots only: slots a
    caller allocated are allocated but not cached."""
    a = SWATokenToKVPoolAllocator(8, 8, page_size=page_size)
    x = a.alloc(4)
    assert a.is_allocated(x).tolist() == [True] * 4
    assert a.is_cached(x).tolist() == [False] * 4


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: TokenToKVPoolAllocator(8, page_size=2), id="token-pages"),
        pytest.param(lambda: SWATokenToKVPoolAllocator(8, 8), id="swa"),
        pytest.param(lambda: SWATokenToKVPoolAllocator(8, 8, page_size=2), id="swa-pages"),
    ],
)
def test_a_free_of_the_slot_one_past_the_pool_is_out_of_range(make) -> None:
    """The slot just past the last page, (num_pages + 1) * page_size, is out of range: a
    free of it is refused as such (its page's state byte lies past the state array), and
    nothing is freed."""
    a = make()
    x = a.alloc(a.size)
    hi = a.size + a.page_size
    for bad in ([hi], [int(x[0]), hi]):
        with pytest.raises(InvalidFreeError, match="out of range"):
            a.free(bad)
        if isinstance(a, SWATokenToKVPoolAllocator):
            with pytest.raises(InvalidFreeError, match="out of range"):
                a.free_swa(bad)
    assert a.available_size() == 0 and a.is_allocated(x).all()
    a._check_invariants()


@pytest.mark.parametrize("cls", ["token", "swa"])
def test_releases_sorted_but_for_the_last_are_sorted_by_the_merge(cls: str) -> None:
    """The merge takes releases as already ascending only if every one is: [1, 4, 2] (out of
    order at its last entry) is sorted before it joins the free list."""
    a = TokenToKVPoolAllocator(8) if cls == "token" else SWATokenToKVPoolAllocator(8, 8)
    a.alloc(8)
    a.free([1, 4, 2])
    a.merge_and_sort_free()
    a._check_invariants()
    assert a.alloc(3).tolist() == [1, 2, 4]


@pytest.mark.parametrize("cls", ["token", "swa"])
def test_clear_drops_an_open_free_group(cls: str) -> None:
    """clear() drops an open free group: frees after it are allocatable at once, and the
    group's free_group_end() finds no group to close."""
    a = TokenToKVPoolAllocator(8) if cls == "token" else SWATokenToKVPoolAllocator(8, 8)
    a.alloc(4)
    a.free_group_begin()
    a.clear()
    x = a.alloc(4)
    a.free(x)
    assert a.available_size() == 8
    with pytest.raises(AllocatorStateError):
        a.free_group_end()
    a._check_invariants()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda s: [(True, s)], id="tuple-in-list"),
        pytest.param(lambda s: [deque([True, s])], id="deque-in-list"),
        pytest.param(lambda s: ([s, s], (np.True_, s)), id="tuple-in-tuple"),
        pytest.param(
            lambda s: [[s, s], deque([s, np.array(True)])], id="0-d-bool-in-deque-in-list"
        ),
    ],
)
@pytest.mark.parametrize("cls", ["token", "swa"])
def test_a_bool_in_a_nested_tuple_or_deque_is_not_a_slot(cls: str, bad) -> None:
    """The bool refusal looks inside nested tuples and deques, not only nested lists:
    numpy reads [(True, 2)] as [[1, 2]], and is_allocated / translate (which take any
    shape) would answer for slot 1."""
    a = TokenToKVPoolAllocator(8) if cls == "token" else SWATokenToKVPoolAllocator(8, 8)
    x = a.alloc(3)
    s = int(x[1])
    with pytest.raises(InvalidValueError, match="integer slot ids"):
        a.is_allocated(bad(s))
    with pytest.raises(InvalidValueError, match="integer slot ids"):
        a.free(bad(s))
    if cls == "swa":
        with pytest.raises(InvalidValueError, match="integer slot ids"):
            a.translate_loc_from_full_to_swa(bad(s))
    assert a.is_allocated(x).all()


def test_swa_translate_keeps_the_shape_and_refuses_negative_slots() -> None:
    """translate_loc_from_full_to_swa answers in the shape it was asked in (2-D, and empty
    ones too), and a negative slot is refused (not read from before the mapping)."""
    a = SWATokenToKVPoolAllocator(8, 8)
    x = a.alloc(4)
    m = a.full_to_swa_index_mapping
    grid = x.reshape(2, 2)
    out = a.translate_loc_from_full_to_swa(grid)
    assert out.shape == (2, 2) and out.dtype == np.int32
    assert out.tolist() == m[grid].tolist()
    for shape in [(0,), (0, 3), (2, 0)]:
        assert a.translate_loc_from_full_to_swa(np.zeros(shape, np.int32)).shape == shape
    for bad in ([-1], np.array([-1], np.int32), [int(x[0]), -1]):
        with pytest.raises(InvalidValueError):
            a.translate_loc_from_full_to_swa(bad)


class _IntArrayOfAnUnknownDtype:
    """An array-like item whose ``dtype`` numpy does not know, converting to an int."""

    dtype = "no-such-dtype"

    def __index__(self) -> int:
        return 3

    def __int__(self) -> int:
        return 3

    def __array__(self, dtype=None, copy=None):
        return np.array(3, dtype=dtype)


def test_an_item_with_a_dtype_numpy_does_not_know_is_not_taken_for_a_bool() -> None:
    """The bool refusal asks numpy about an array-like item's dtype; one numpy does not
    know is not numpy's bool, so the item is read as the slot it converts to."""
    a = TokenToKVPoolAllocator(8)
    a.alloc(4)
    assert a.is_allocated([_IntArrayOfAnUnknownDtype(), 2]).tolist() == [True, True]


class _BoolArrayLikeWithoutDtype:
    """An array-like item (``__array__``, no ``dtype``) that converts to a 0-d bool."""

    def __array__(self, dtype=None, copy=None):
        return np.array(True, dtype=dtype)


def test_an_array_like_item_numpy_cannot_read_is_an_invalid_value() -> None:
    """Indices that are not slot ids raise InvalidValueError (the allocator's contract):
    numpy's conversion of [obj, 2], obj a 0-d array-like with no dtype, raises TypeError,
    which escaped bare before."""
    a = TokenToKVPoolAllocator(8)
    x = a.alloc(4)
    with pytest.raises(InvalidValueError):
        a.free([_BoolArrayLikeWithoutDtype(), 2])
    assert a.is_allocated(x).all()
