"""Slot allocators: the compiled ones against a pure-Python reference, op by op."""

from __future__ import annotations

import itertools
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_child  # tests/ is on sys.path (rootdir conftest)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from pymllm.mem_cache._allocator import _radix_pass_count
from pymllm.mem_cache.errors import AllocatorStateError, InvalidFreeError, InvalidValueError
from pymllm.mem_cache.memory_pool import SWATokenToKVPoolAllocator, TokenToKVPoolAllocator


class RefAllocator:
    """The reference model of ``TokenToKVPoolAllocator``: Python lists and sets, same order
    of hand-out (head of the free list; frees wait in ``release`` under ``need_sort`` and
    are merged sorted when the free list runs short)."""

    def __init__(self, size: int, page_size: int = 1, need_sort: bool = True) -> None:
        self.page_size = page_size
        self.num_pages = size // page_size
        self.size = self.num_pages * page_size
        self.need_sort = need_sort
        self.clear()

    def clear(self) -> None:
        self.pages = list(range(1, self.num_pages + 1))
        self.release: list[int] = []
        self.held: list[int] = []
        self.allocated: set[int] = set()
        self.depth = 0

    def available_size(self) -> int:
        return (len(self.pages) + len(self.release)) * self.page_size

    def merge_and_sort_free(self) -> None:
        self.pages = sorted(self.pages + self.release)
        self.release = []

    def alloc(self, n: int, prefix: Any = None) -> np.ndarray | None:
        if n < 0 or n % self.page_size:
            raise InvalidValueError(n)
        pre: list[int] = []
        if prefix is not None:
            arr = np.asarray(prefix)
            if (
                arr.ndim > 1
                or (arr.size and arr.dtype.kind not in "iu")
                or (isinstance(prefix, list) and any(isinstance(s, bool) for s in prefix))
            ):
                raise InvalidValueError(prefix)
            pre = arr.reshape(-1).tolist()
            if any(not self.page_size <= s < self.size + self.page_size for s in pre):
                raise InvalidValueError(prefix)
        need = n // self.page_size
        if need > len(self.pages) + len(self.release):
            return None
        if need > len(self.pages):
            self.merge_and_sort_free()
        got, self.pages = self.pages[:need], self.pages[need:]
        self.allocated.update(got)
        ps = self.page_size
        return np.array([*pre, *(p * ps + j for p in got for j in range(ps))], dtype=np.int32)

    def free(self, indices: Any) -> None:
        slots = np.asarray(indices).reshape(-1).tolist()
        pages: list[int] = []
        for s in slots:
            p = s // self.page_size
            if s < self.page_size or p > self.num_pages or p not in self.allocated:
                raise InvalidFreeError(s)
            if p in pages:
                if self.page_size == 1:
                    raise InvalidFreeError(s)
                continue
            pages.append(p)
        self.allocated.difference_update(pages)
        if self.depth:
            self.held += pages
        elif self.need_sort:
            self.release += pages
        else:
            self.pages += pages

    def free_group_begin(self) -> None:
        self.depth += 1

    def free_group_end(self) -> None:
        if not self.depth:
            raise AllocatorStateError("no group")
        self.depth -= 1
        if not self.depth:
            held, self.held = self.held, []
            (self.release if self.need_sort else self.pages).extend(held)

    def _check_invariants(self) -> None:
        assert len(set(self.pages) | set(self.release) | self.allocated | set(self.held)) == (
            len(self.pages) + len(self.release) + len(self.allocated) + len(self.held)
        )


IMPLS = {"ref": RefAllocator, "compiled": TokenToKVPoolAllocator}


@pytest.fixture(params=sorted(IMPLS))
def make(request: pytest.FixtureRequest) -> Any:
    return IMPLS[request.param]


def _state(a: Any) -> tuple[int, list[int]]:
    """What a failed call must leave unchanged: free count and which slots are owned."""
    slots = np.arange(a.size + a.page_size)
    if isinstance(a, RefAllocator):
        mask = [s >= a.page_size and s // a.page_size in a.allocated for s in slots.tolist()]
    else:
        mask = a.is_allocated(slots)
    return a.available_size(), slots[np.asarray(mask, dtype=bool)].tolist()


# -- contract tests, run against the reference and the compiled allocator ----------------


def test_alloc_hands_out_distinct_slots_never_zero(make: Any) -> None:
    a = make(64)
    got = np.concatenate([a.alloc(n) for n in (1, 7, 20, 36)])
    assert got.dtype == np.int32 and got.ndim == 1
    assert sorted(got.tolist()) == list(range(1, 65))
    assert a.available_size() == 0
    assert a.alloc(1) is None
    assert a.alloc(0).shape == (0,)


def test_alloc_too_many_returns_none_and_changes_nothing(make: Any) -> None:
    a = make(10)
    a.alloc(4)
    before = _state(a)
    assert a.alloc(7) is None
    assert _state(a) == before


def test_alloc_with_a_prefix_returns_prefix_then_new_slots(make: Any) -> None:
    a = make(16)
    held = a.alloc(5)
    out = a.alloc(3, prefix=held[1:4])
    assert out.dtype == np.int32 and out.ndim == 1
    assert out[:3].tolist() == held[1:4].tolist()
    new = out[3:]
    assert not set(new.tolist()) & set(held.tolist())
    assert a.available_size() == 8  # only the new slots left the pool
    a.free(new)  # the new slots are the caller's, apart from the prefix
    a.free(held)
    assert a.available_size() == 16
    assert a.alloc(0, prefix=[2]).tolist() == [2]
    assert a.alloc(2, prefix=[]).shape == (2,)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param([0], id="padding-slot"),
        pytest.param([17], id="past-end"),
        pytest.param([3, -1], id="negative"),
        pytest.param(np.array([2**40], dtype=np.int64), id="beyond-int32"),
        pytest.param(np.array([[1, 2]], dtype=np.int32), id="2-d"),
        pytest.param(np.array([1.0]), id="float"),
        pytest.param([1, True], id="bool"),
    ],
)
@pytest.mark.parametrize("short", [False, True], ids=["room", "pool-short"])
def test_a_bad_prefix_is_refused_and_changes_nothing(make: Any, bad: Any, short: bool) -> None:
    """Slots outside the pool, or no slots at all, are refused whether or not the pool could
    serve n; nothing is allocated."""
    a = make(16)
    a.alloc(4)
    before = _state(a)
    with pytest.raises(InvalidValueError):
        a.alloc(40 if short else 2, prefix=bad)
    assert _state(a) == before
    if make is TokenToKVPoolAllocator:
        a._check_invariants()


def test_a_prefix_is_copied_as_given() -> None:
    """The prefix's owner is not checked (the caller locks its match): the prefix's slots
    keep whatever owner they had, a cache's included, and a too-short pool returns None."""
    from pymllm.mem_cache import RadixCache, RadixKey

    a = TokenToKVPoolAllocator(16)
    cache = RadixCache(token_to_kv_pool_allocator=a)
    cache.insert(RadixKey([5, 6, 7]), a.alloc(3))
    m = cache.match_prefix(RadixKey([5, 6, 7, 8]))
    out = a.alloc(1, prefix=m.indices)
    assert out[:3].tolist() == m.indices.tolist()
    assert a.is_cached(out).tolist() == [True, True, True, False]
    assert a.is_allocated(out[3:]).tolist() == [True]
    assert a.alloc(13, prefix=m.indices) is None
    r = cache.insert(RadixKey([5, 6, 7, 8]), out)
    assert r.prefix_len == 3 and a.is_cached(out).all()
    a._check_invariants()


def test_a_prefix_with_pages_and_other_types() -> None:
    a = TokenToKVPoolAllocator(32, page_size=4)
    held = a.alloc(8)
    for prefix in (held, held.tolist(), held.astype(np.int64), jnp.asarray(held)):
        out = a.alloc(4, prefix=prefix)
        assert out[:8].tolist() == held.tolist()
        assert out[8] % 4 == 0 and out[8:].tolist() == list(range(out[8], out[8] + 4))
        a.free(out[8:])
    assert a.available_size() == 24
    with pytest.raises(InvalidValueError, match=r"prefix: slot 3 is outside .* \[4, 36\)"):
        a.alloc(4, prefix=[4, 3])


def test_swa_alloc_with_a_prefix_maps_only_the_new_slots() -> None:
    a = SWATokenToKVPoolAllocator(16, 8)
    held = a.alloc(3)
    swa_before = a.translate_loc_from_full_to_swa(held)
    out = a.alloc(2, prefix=held)
    assert out[:3].tolist() == held.tolist()
    assert a.translate_loc_from_full_to_swa(held).tolist() == swa_before.tolist()
    swa_new = a.translate_loc_from_full_to_swa(out[3:])
    assert swa_new.min() >= 1 and not set(swa_new.tolist()) & set(swa_before.tolist())
    assert a.full_available_size() == 11 and a.swa_available_size() == 3
    before = (a.full_available_size(), a.swa_available_size())
    with pytest.raises(InvalidValueError, match="prefix"):
        a.alloc(1, prefix=[17])
    assert (a.full_available_size(), a.swa_available_size()) == before
    a._check_invariants()


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param([0], id="padding-slot"),
        pytest.param([11], id="past-end"),
        pytest.param([-1], id="negative"),
        pytest.param(np.array([2**40], dtype=np.int64), id="beyond-int32"),
        pytest.param([5], id="never-allocated"),
        pytest.param([2, 2], id="twice-in-one-call"),
        pytest.param([1, 2, 3, 0], id="valid-then-padding"),
        pytest.param([1, 5], id="valid-then-free"),
        pytest.param([2, 3, 4, 5], id="run-ending-free"),
        pytest.param([0, 1, 2, 3], id="run-from-padding"),
        pytest.param([9, 10, 11], id="run-past-end"),
        pytest.param([3, 4, 1, 2, 3], id="runs-then-repeat"),
        pytest.param([3, 4, 1, 2, 7], id="runs-then-free"),
        pytest.param([1, 2, 10, 11], id="run-then-run-past-end"),
    ],
)
def test_bad_free_raises_and_frees_nothing(make: Any, bad: Any) -> None:
    a = make(10)
    a.alloc(4)  # slots 1..4 owned
    before = _state(a)
    with pytest.raises(InvalidFreeError):
        a.free(bad)
    assert _state(a) == before
    a.free(np.arange(1, 5, dtype=np.int32))  # the valid slots are still freeable
    assert a.available_size() == 10


def test_runs_across_bitmap_words(make: Any) -> None:
    # Consecutive slots take a whole-range path (state bytes, free bitmap words).
    a = make(300)
    x = a.alloc(300)
    a.free(x[59:131])  # crosses two 64-page words
    a._check_invariants()
    with pytest.raises(InvalidFreeError):
        a.free(x[100:140])  # a run, partly free already
    assert a.available_size() == 72
    a.free_group_begin()
    a.free(x[0:59])
    assert a.available_size() == 72
    a.free_group_end()
    assert a.alloc(131).tolist() == list(range(1, 132))  # one sorted run again
    a._check_invariants()
    a.free(np.arange(1, 132, dtype=np.int32))
    assert a.available_size() == 131
    a._check_invariants()


def test_free_in_runs_any_order(make: Any) -> None:
    # Frees arrive as runs of consecutive slots in any order (evicted nodes, finished
    # requests): each run is checked and freed as a range, the bitmap set per run.
    a = make(200)
    x = a.alloc(200)
    parts = [x[130:190], x[3:70], x[190:191], x[100:101], x[71:99]]
    a.free(np.concatenate(parts))
    a._check_invariants()
    freed = sorted(np.concatenate(parts).tolist())
    assert a.available_size() == len(freed)
    assert _state(a)[1] == sorted(set(range(1, 201)) - set(freed))
    assert sorted(a.alloc(len(freed)).tolist()) == freed
    a._check_invariants()


@pytest.mark.parametrize(
    "bad_at",
    [
        pytest.param(150, id="already-free-inside-a-later-run-block"),
        pytest.param(64, id="already-free-first-slot-of-a-block"),
        pytest.param(3, id="already-free-in-the-first-block"),
    ],
)
def test_multi_block_free_rolls_back(make: Any, bad_at: int) -> None:
    # A free of several 64-slot blocks: the blocks before the bad slot were already
    # booked (whole-range updates) and must be rolled back with nothing freed.
    a = make(400)
    x = a.alloc(400)
    a.free(x[bad_at : bad_at + 1])
    before = _state(a)
    with pytest.raises(InvalidFreeError):
        a.free(x[:200])
    assert _state(a) == before
    a._check_invariants()
    with pytest.raises(InvalidFreeError):
        a.free(np.concatenate([x[200:330], x[250:251]]))  # repeat lands in a third block
    assert _state(a) == before
    a.free(np.concatenate([x[:bad_at], x[bad_at + 1 : 400]]))
    assert a.available_size() == 400
    a._check_invariants()


def test_double_free_across_calls(make: Any) -> None:
    a = make(8)
    x = a.alloc(3)
    a.free(x[:1])
    with pytest.raises(InvalidFreeError):
        a.free(x)
    assert a.available_size() == 6


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda x: x, id="int32"),
        pytest.param(lambda x: x.astype(np.int64), id="int64"),
        pytest.param(lambda x: x.astype(np.uint16), id="uint16"),
        pytest.param(lambda x: x.tolist(), id="list"),
        pytest.param(lambda x: jnp.asarray(x), id="jax"),
        pytest.param(lambda x: x[::-1], id="strided"),
    ],
)
def test_free_accepts_arrays_lists_and_jax(make: Any, convert: Any) -> None:
    a = make(8)
    x = a.alloc(5)
    a.free(convert(x))
    assert a.available_size() == 8


def test_free_scalar_and_empty(make: Any) -> None:
    a = make(4)
    x = a.alloc(2)
    a.free(int(x[0]))
    a.free([])
    a.free(np.zeros(0, dtype=np.int32))
    assert a.available_size() == 3


def test_need_sort_hands_out_lowest_after_merge(make: Any) -> None:
    a = make(8)
    a.alloc(8)
    a.free([7, 2, 5])
    assert a.alloc(3).tolist() == [2, 5, 7]


def test_without_need_sort_frees_go_to_the_back(make: Any) -> None:
    a = make(8, need_sort=False)
    a.alloc(4)
    a.free([3, 1])
    assert a.alloc(6).tolist() == [5, 6, 7, 8, 3, 1]


def test_merge_and_sort_free(make: Any) -> None:
    a = make(8, need_sort=False)
    a.alloc(8)
    a.free([6, 1, 4])
    a.merge_and_sort_free()
    assert a.alloc(3).tolist() == [1, 4, 6]


@pytest.mark.parametrize(
    ("pages", "live", "freed", "path"),
    [
        pytest.param(10_000, 0, 3000, 2, id="bitmap-scan"),  # many releases: scan the bitmap
        pytest.param(10_000, 5000, 10, 1, id="radix-2-passes"),  # few releases, long free run
        pytest.param(2000, 1900, 20, 1, id="radix-1-pass"),  # ids < 2048: one 11-bit pass
        pytest.param(10_000, 5000, 1, 0, id="already-sorted"),
    ],
)
def test_merge_paths_agree_with_sorted(
    make: Any, pages: int, live: int, freed: int, path: int
) -> None:
    a = make(pages)
    x = a.alloc(pages)
    if live:
        a.free(x[:live])
        assert a.alloc(1).tolist() == [1]  # merges; slots 2..live stay on the free list
    rng = np.random.default_rng(freed)
    gone = rng.choice(x[live:], size=freed, replace=False)  # released out of order
    a.free(gone)
    want = sorted(x[1:live].tolist() + gone.tolist())
    before = a._merge_counts() if make is TokenToKVPoolAllocator else None
    assert a.alloc(len(want)).tolist() == want
    a._check_invariants()
    if before is not None:
        after = a._merge_counts()
        assert [y - b for b, y in zip(before, after, strict=True)] == [
            int(path == i) for i in range(3)
        ]


def test_radix_digits_stop_before_the_width_of_a_page_id() -> None:
    """From 2**22 pages the digit loops shifted an int32 page id by 33 bits, undefined in C
    (UBSan: 'shift exponent 33 is too large for 32-bit type'); three 11-bit digits cover
    every int32 id."""
    maxima = [0, 2047, 2048, 2**22 - 1, 2**22, 5_000_000, 2**31 - 1]
    assert [_radix_pass_count(m) for m in maxima] == [1, 1, 2, 2, 3, 3, 3]


def test_radix_merge_sorts_ids_past_2_22_pages() -> None:
    n = (1 << 22) + 1000  # three digits: the loops ran into the shift by 33 bits
    a = TokenToKVPoolAllocator(n)
    x = a.alloc(n)
    rng = np.random.default_rng(22)
    gone = rng.permutation(np.append(rng.choice(x[:-1], 299, replace=False), n))
    a.free(gone)  # out of order, the largest id among them
    before = a._merge_counts()
    assert a.alloc(300).tolist() == sorted(gone.tolist())
    assert [y - b for b, y in zip(before, a._merge_counts(), strict=True)] == [0, 1, 0]
    a._check_invariants()


def test_free_group_holds_slots_until_end(make: Any) -> None:
    a = make(4)
    x = a.alloc(4)
    a.free_group_begin()
    a.free(x[:2])
    a.free_group_begin()  # groups nest
    a.free(x[2:3])
    with pytest.raises(InvalidFreeError):
        a.free(x[:1])  # already freed inside the group: still a double free
    a.free_group_end()
    assert a.available_size() == 0 and a.alloc(1) is None
    a.free_group_end()
    assert a.available_size() == 3
    with pytest.raises(AllocatorStateError):
        a.free_group_end()


def test_clear_frees_everything(make: Any) -> None:
    a = make(6)
    a.alloc(5)
    a.clear()
    assert a.available_size() == 6
    assert sorted(a.alloc(6).tolist()) == list(range(1, 7))


def test_pages_are_whole_and_contiguous(make: Any) -> None:
    a = make(64, page_size=16)  # pages 1..4 -> slots 16..79
    x = a.alloc(32)
    assert x.tolist() == list(range(16, 48))
    with pytest.raises(InvalidValueError):
        a.alloc(5)
    a.free(x[17:18])  # one slot frees its whole page
    assert a.available_size() == 16 + 32
    with pytest.raises(InvalidFreeError):
        a.free(x[16:17])  # another slot of that freed page
    with pytest.raises(InvalidFreeError):
        a.free([15])  # the padding page
    a.free(np.array([x[0], x[3]]))  # two slots of one page: one page freed
    assert a.available_size() == 64


def test_size_rounds_down_to_pages(make: Any) -> None:
    a = make(40, page_size=16)
    assert a.size == 32 and a.available_size() == 32


def test_bad_inputs_are_value_errors(make: Any) -> None:
    a = make(4)
    with pytest.raises(InvalidValueError):
        a.alloc(-1)
    x = a.alloc(2)
    if make is TokenToKVPoolAllocator:
        with pytest.raises(InvalidValueError):
            a.free(x.astype(np.float32))
        with pytest.raises(InvalidValueError):
            a.free(x.reshape(1, 2))
        with pytest.raises(TypeError):
            a.alloc(1.5)
    assert a.available_size() == 2


class _SlotList(list):
    pass


class _BoolArray(np.ndarray):
    """A numpy array subclass (a bool one is still a bool)."""

    def __new__(cls, value: bool) -> _BoolArray:
        return np.asarray(value).view(cls)


BOOL_FREES = [
    pytest.param(lambda x: [True, int(x[1])], id="list-bool-then-slot"),
    pytest.param(lambda x: (int(x[0]), np.True_), id="tuple-numpy-bool"),
    pytest.param(lambda x: _SlotList([True, int(x[1])]), id="list-subclass"),
    pytest.param(lambda x: __import__("collections").deque([int(x[0]), True]), id="deque"),
    pytest.param(lambda x: [True], id="list-bool"),
    pytest.param(lambda x: [[int(x[0]), True]], id="nested-list"),
    pytest.param(lambda x: [np.array(True), int(x[1])], id="0-d-numpy-bool-array"),
    pytest.param(lambda x: [[np.array(True)], [int(x[1])]], id="nested-0-d-numpy-bool-array"),
    pytest.param(lambda x: [[[True, int(x[1])]]], id="two-levels-down"),
    pytest.param(lambda x: [[_BoolArray(True), int(x[1])]], id="bool-ndarray-subclass-nested"),
    pytest.param(lambda x: True, id="bool"),
]


@pytest.mark.parametrize("cls", [TokenToKVPoolAllocator, SWATokenToKVPoolAllocator])
@pytest.mark.parametrize("bad", BOOL_FREES)
def test_bool_is_not_a_slot(cls: Any, bad: Any) -> None:
    """numpy reads [True, 2] as [1, 2]: a bool inside a list freed slot 1. Refused wherever
    it stands, nothing freed (the tree refuses bool tokens and indices the same way)."""
    a = cls(8) if cls is TokenToKVPoolAllocator else cls(8, 8)
    x = a.alloc(3)
    before = _state(a)
    with pytest.raises(InvalidValueError, match="integer slot ids"):
        a.free(bad(x))
    with pytest.raises(InvalidValueError, match="integer slot ids"):
        a.is_allocated(bad(x))
    if cls is SWATokenToKVPoolAllocator:
        with pytest.raises(InvalidValueError, match="integer slot ids"):
            a.translate_loc_from_full_to_swa(bad(x))
    assert _state(a) == before
    a._check_invariants()


@pytest.mark.parametrize("cls", [TokenToKVPoolAllocator, SWATokenToKVPoolAllocator])
def test_slots_beyond_64_bits_are_out_of_range(cls: Any) -> None:
    """A Python int beyond 64 bits is just another slot outside the pool: free raises
    InvalidFreeError (as for 2**63) and frees nothing; is_allocated answers False."""
    a = cls(8) if cls is TokenToKVPoolAllocator else cls(8, 8)
    x = a.alloc(3)
    before = _state(a)
    for bad in ([2**64], [int(x[0]), 2**64], [-(2**63) - 1], [2**63]):
        with pytest.raises(InvalidFreeError, match="out of range"):
            a.free(bad)
        assert _state(a) == before
    assert a.is_allocated(2**64).tolist() == [False]
    assert a.is_allocated([2**64, int(x[0]), -(2**70)]).tolist() == [False, True, False]
    with pytest.raises(InvalidValueError, match="integer slot ids"):
        a.is_allocated([2**64, "3"])
    a._check_invariants()


@pytest.mark.parametrize("cls", [TokenToKVPoolAllocator, SWATokenToKVPoolAllocator])
def test_ints_of_both_signs_past_int64_are_out_of_range(cls: Any) -> None:
    """numpy reads [2**63, -1] as float64 (no integer dtype holds both): they are still
    integers, outside the pool, so free raises InvalidFreeError and is_allocated answers
    False, as for each alone; a real float among such ints is still refused."""
    a = cls(8) if cls is TokenToKVPoolAllocator else cls(8, 8)
    x = a.alloc(3)
    before = _state(a)
    for bad in ([2**63, -1], [int(x[0]), 2**63, -1], (-1, 2**64 - 1)):
        with pytest.raises(InvalidFreeError, match="out of range"):
            a.free(bad)
        assert _state(a) == before
        assert a.is_allocated(bad).tolist() == [int(v) == int(x[0]) for v in bad]
    with pytest.raises(InvalidValueError, match="integer slot ids"):
        a.free([2**63, -1, 1.5])
    with pytest.raises(InvalidValueError, match="prefix"):
        a.alloc(1, prefix=[2**63, -1])
    assert _state(a) == before
    a._check_invariants()


@pytest.mark.parametrize("bad", [[2**63, -1], [1, 2**64], [-(2**63) - 1, 1]])
def test_translate_names_ints_past_int64_as_out_of_range(bad: list[int]) -> None:
    """translate_loc_from_full_to_swa read these as ints (no float, no object) and then
    refused them as "must hold integers, got dtype object"; like free, it names the slot
    as outside the pool."""
    a = SWATokenToKVPoolAllocator(8, 8)
    x = a.alloc(2)
    worst = max(bad, key=abs)
    with pytest.raises(InvalidValueError, match=f"full_indices: slot {worst} is outside"):
        a.translate_loc_from_full_to_swa(bad)
    assert a.translate_loc_from_full_to_swa(x).tolist() != [0, 0]
    a._check_invariants()


@pytest.mark.parametrize("cls", [TokenToKVPoolAllocator, SWATokenToKVPoolAllocator])
def test_ragged_slot_lists_are_invalid_values(cls: Any) -> None:
    """Lists of unequal lengths are no slot array: InvalidValueError (a CacheError) naming
    the argument, not numpy's bare ValueError, and nothing changes."""
    a = cls(8) if cls is TokenToKVPoolAllocator else cls(8, 8)
    x = a.alloc(3)
    ragged = [[int(x[0])], [int(x[1]), int(x[2])]]
    before = _state(a)
    calls = {"indices": [a.free, a.is_allocated], "prefix": [lambda v: a.alloc(1, prefix=v)]}
    if cls is SWATokenToKVPoolAllocator:
        calls["indices"] += [a.free_swa]
        calls["full_indices"] = [a.translate_loc_from_full_to_swa]
    for name, fns in calls.items():
        for fn in fns:
            with pytest.raises(InvalidValueError, match=f"^{name}: .*form no array .ragged"):
                fn(ragged)
            assert _state(a) == before
    a._check_invariants()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": True}, "size: expected an int"),
        ({"size": 8, "page_size": np.True_}, "page_size: expected an int"),
        ({"size": 8, "need_sort": "no"}, "need_sort: expected True or False"),
        ({"size": 8, "need_sort": 1}, "need_sort: expected True or False"),
    ],
)
@pytest.mark.parametrize("cls", [TokenToKVPoolAllocator, SWATokenToKVPoolAllocator])
def test_constructor_flags_and_sizes_are_checked(cls: Any, kwargs: dict, match: str) -> None:
    """A bool is not a size (True built a 1-slot pool), and need_sort takes a bool only
    ("no" read as on)."""
    if cls is SWATokenToKVPoolAllocator:
        kwargs = {"swa_size": 8, **kwargs}
    with pytest.raises(InvalidValueError, match=match):
        cls(**kwargs)
    if cls is TokenToKVPoolAllocator:  # numpy's bools are bools
        assert cls(8, need_sort=np.False_).need_sort is False
    else:
        cls(8, 8, need_sort=np.False_)._check_invariants()


def test_swa_mapping_view_cannot_be_made_writeable() -> None:
    """full_to_swa_index_mapping is read-only for good: flipping the flag back on (numpy
    allowed it over a writeable base) let a caller re-map slots, and free then handed
    another request's SWA slots back (out twice after the next alloc)."""
    a = SWATokenToKVPoolAllocator(8, 8)
    r1, r2 = a.alloc(2), a.alloc(2)
    m = a.full_to_swa_index_mapping
    with pytest.raises(ValueError, match="WRITEABLE"):
        m.flags.writeable = True
    with pytest.raises(ValueError, match="read-only"):
        m[r1] = 3
    r3 = a.alloc(2)  # the view follows the allocator (no copy)
    assert (m[r3] == a.translate_loc_from_full_to_swa(r3)).all()
    assert not set(m[r2].tolist()) & set(m[r1].tolist())
    a._check_invariants()


def test_swa_invariants_catch_an_swa_page_mapped_twice() -> None:
    """_check_invariants counted mapped pages only: two full slots mapped to one SWA slot
    (and another SWA slot leaked) kept the count and passed."""
    import ctypes

    a = SWATokenToKVPoolAllocator(8, 4)
    r1, r2 = a.alloc(2), a.alloc(2)
    view = a.full_to_swa_index_mapping
    assert view.base is a  # no writeable array behind it to reach
    ptr = ctypes.cast(view.ctypes.data, ctypes.POINTER(ctypes.c_int32))
    internal = np.ctypeslib.as_array(ptr, shape=view.shape)  # its memory, by force
    internal[r1] = internal[r2]
    with pytest.raises(AssertionError, match="mapped twice"):
        a._check_invariants()


# -- stateful: compiled vs reference, invariants after every step -----------------------


class AllocatorMachine(RuleBasedStateMachine):
    owned = Bundle("owned")

    def __init__(self) -> None:
        super().__init__()
        self.ps = 1
        self.pair: tuple[Any, Any] | None = None
        self.live: set[int] = set()

    MAX_PAGES = 40  # pool size drawn up to this
    MAX_ALLOC = 12  # pages per alloc drawn up to this

    @initialize(ps=st.sampled_from([1, 4]), need_sort=st.booleans(), data=st.data())
    def init(self, ps: int, need_sort: bool, data: st.DataObject) -> None:
        pages = data.draw(st.integers(1, self.MAX_PAGES), label="pages")
        self.ps = ps
        self.pair = (
            TokenToKVPoolAllocator(pages * ps, ps, need_sort),
            RefAllocator(pages * ps, ps, need_sort),
        )

    @rule(target=owned, data=st.data())
    def alloc(self, data: st.DataObject) -> Any:
        pages = data.draw(st.integers(0, self.MAX_ALLOC), label="alloc pages")
        # a prefix of held slots, as a match's indices (sometimes with a slot off the pool)
        prefix = data.draw(
            st.none() | st.lists(st.sampled_from(sorted(self.live) or [-1]), max_size=8),
            label="prefix",
        )
        if prefix is not None and data.draw(st.booleans(), label="bad prefix"):
            prefix.append(data.draw(st.sampled_from([-1, 0, self.pair[1].size + self.ps])))
        before = [_state(a) for a in self.pair]
        outcome = []
        for a in self.pair:
            try:
                outcome.append(a.alloc(pages * self.ps, prefix=prefix))
            except InvalidValueError:
                outcome.append("refused")
        got, want = outcome
        if isinstance(want, str) or want is None:
            assert isinstance(got, str) if isinstance(want, str) else got is None
            assert [_state(a) for a in self.pair] == before
            return None
        assert got.dtype == np.int32 and got.tolist() == want.tolist()
        got = got[len(prefix or []) :]  # the fresh slots, ours now
        assert not self.live & set(got.tolist()), "slot handed out twice"
        self.live |= set(got.tolist())
        return got

    @rule(x=consumes(owned), data=st.data())
    def free(self, x: Any, data: st.DataObject) -> None:
        if x is None:
            return
        # In allocation order (runs: the whole-range paths), shuffled (slot by slot), or
        # as the allocation's pieces in shuffled order (what one evict frees).
        order = data.draw(
            st.one_of(
                st.just(list(range(len(x)))),
                st.permutations(range(len(x))),
                _shuffled_pieces(len(x)),
            )
        )
        for a in self.pair:
            a.free(x[list(order)])
        self.live -= set(x.tolist())

    @rule(slot=st.integers(-3, 200), x=owned)
    def bad_free(self, slot: int, x: Any) -> None:
        if slot in self.live:  # not a bad free (a no-op step, not a discarded example)
            return
        bad = [slot] if x is None else [*x.tolist(), slot]
        for a in self.pair:
            before = _state(a)
            with pytest.raises(InvalidFreeError):
                a.free(bad)
            assert _state(a) == before

    @rule()
    def group_begin(self) -> None:
        for a in self.pair:
            a.free_group_begin()

    @precondition(lambda self: self.pair[1].depth > 0)
    @rule()
    def group_end(self) -> None:
        for a in self.pair:
            a.free_group_end()

    @rule()
    def merge(self) -> None:
        for a in self.pair:
            a.merge_and_sort_free()

    @invariant()
    def agree(self) -> None:
        assert self.pair is not None  # made by the @initialize step, before any invariant
        got, want = self.pair
        assert got.available_size() == want.available_size()
        got._check_invariants()
        want._check_invariants()


TestAllocatorMachine = AllocatorMachine.TestCase


class LargeAllocatorMachine(AllocatorMachine):
    """The same machine with allocations spanning several 64-page blocks, so frees and
    allocs mix whole-block range updates with per-page ones (and bad slots land in any
    block)."""

    MAX_PAGES = 700
    MAX_ALLOC = 260


TestLargeAllocatorMachine = LargeAllocatorMachine.TestCase


@st.composite
def _shuffled_pieces(draw: Any, n: int) -> list[int]:
    """range(n) cut at drawn points into pieces, the pieces in a drawn order."""
    cuts = sorted(draw(st.sets(st.integers(1, max(n - 1, 1)), max_size=6))) if n > 1 else []
    bounds = [0, *cuts, n]
    pieces = [list(range(a, b)) for a, b in itertools.pairwise(bounds) if a < b]
    return [i for piece in draw(st.permutations(pieces)) for i in piece]


# -- SWA --------------------------------------------------------------------------------


def test_swa_alloc_maps_full_to_swa() -> None:
    a = SWATokenToKVPoolAllocator(16, 8)
    x = a.alloc(5)
    swa = a.translate_loc_from_full_to_swa(x)
    assert swa.dtype == np.int32 and len(set(swa.tolist())) == 5 and swa.min() >= 1
    assert (a.full_to_swa_index_mapping[x] == swa).all()
    assert a.available_size() == 3 and a.full_available_size() == 11
    a._check_invariants()


def test_swa_alloc_none_when_either_side_is_short() -> None:
    a = SWATokenToKVPoolAllocator(16, 4)
    assert a.alloc(5) is None
    assert a.full_available_size() == 16 and a.swa_available_size() == 4
    a = SWATokenToKVPoolAllocator(4, 16)
    assert a.alloc(5) is None


def test_free_swa_frees_only_the_swa_side_then_free_frees_the_rest() -> None:
    a = SWATokenToKVPoolAllocator(16, 8)
    x = a.alloc(6)
    a.free_swa(x[:4])
    assert a.swa_available_size() == 6 and a.full_available_size() == 10
    assert a.translate_loc_from_full_to_swa(x[:4]).tolist() == [0, 0, 0, 0]
    a.free_swa(x[:2])  # SWA side already gone: skipped
    a._check_invariants()
    a.free(x)  # full side of all six, SWA side of the last two
    assert a.swa_available_size() == 8 and a.full_available_size() == 16
    a._check_invariants()


@pytest.mark.parametrize("which", ["free", "free_swa"])
@pytest.mark.parametrize("bad", [[0], [17], [9], [1, 1]], ids=["pad", "range", "unowned", "dup"])
def test_swa_bad_frees_change_nothing(which: str, bad: list[int]) -> None:
    a = SWATokenToKVPoolAllocator(16, 8)
    x = a.alloc(4)  # full slots 1..4
    before = (a.full_available_size(), a.swa_available_size(), a.translate_loc_from_full_to_swa(x))
    with pytest.raises(InvalidFreeError):
        getattr(a, which)(bad)
    after = (a.full_available_size(), a.swa_available_size(), a.translate_loc_from_full_to_swa(x))
    assert before[:2] == after[:2] and (before[2] == after[2]).all()
    a._check_invariants()


def test_swa_pages_keep_offsets() -> None:
    a = SWATokenToKVPoolAllocator(64, 32, page_size=16)
    x = a.alloc(32)
    swa = a.translate_loc_from_full_to_swa(x)
    assert (swa % 16 == x % 16).all() and (np.diff(swa[:16]) == 1).all()
    a.free_swa(x[3:4])  # one slot frees the whole SWA page
    assert a.translate_loc_from_full_to_swa(x[:16]).tolist() == [0] * 16
    assert a.swa_available_size() == 16
    a._check_invariants()


def test_swa_free_group_and_clear() -> None:
    a = SWATokenToKVPoolAllocator(8, 8)
    x = a.alloc(4)
    a.free_group_begin()
    a.free(x)
    assert a.available_size() == 4
    a.free_group_end()
    assert a.available_size() == 8
    a.alloc(3)
    a.clear()
    assert a.available_size() == 8 and not a.full_to_swa_index_mapping.any()
    a._check_invariants()


@settings(max_examples=40)
@given(ops=st.lists(st.tuples(st.sampled_from("afs"), st.integers(0, 6)), max_size=40))
def test_swa_random_ops_keep_invariants(ops: list[tuple[str, int]]) -> None:
    a = SWATokenToKVPoolAllocator(24, 10)
    live: list[np.ndarray] = []
    for op, n in ops:
        if op == "a":
            x = a.alloc(n)
            if x is not None:
                live.append(x)
        elif live:
            x = live.pop(n % len(live))
            (a.free if op == "f" else a.free_swa)(x)
            if op == "s":
                live.append(x)  # full side still owned
        a._check_invariants()
    for x in live:
        a.free(x)
    assert a.full_available_size() == 24 and a.swa_available_size() == 10


def test_a_list_that_holds_itself_is_refused_without_a_crash() -> None:
    """The bool check looks one nested list down, no deeper (it used to recurse without
    bound: a list holding itself, or nested 200,000 deep, overflowed the C stack)."""
    alloc = TokenToKVPoolAllocator(16, need_sort=False)
    a = alloc.alloc(2)
    loop: list[Any] = [int(a[0])]
    loop.append(loop)
    deep: list[Any] = [int(a[1])]
    for _ in range(200_000):
        deep = [deep]
    for bad in (loop, deep):
        with pytest.raises(InvalidValueError, match="form no array"):
            alloc.free(bad)
    assert alloc.is_allocated(a).all()
    alloc._check_invariants()


def test_slots_across_int32s_end_are_refused_not_read_as_a_run() -> None:
    """free([2**31 - 1, -2**31]): the run check summed 2**31 - 1 + 1 in 32 bits, which wrapped
    below the pool's size, and read the state bytes 2 GiB past the array (a segfault, or a
    write there if they matched). A child process, so that the old code's crash fails the
    test instead of the run. The insert's adopt had the same sum (undefined behaviour
    without -fwrapv)."""
    out = run_child(
        """
import numpy as np
from pymllm.mem_cache import RadixCache, RadixKey, TokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidFreeError, InvalidValueError
a = TokenToKVPoolAllocator(100, need_sort=False)
held = a.alloc(64)
for bad in ([2**31 - 1, -2**31], [2**31 - 2, 2**31 - 1, -2**31, -2**31 + 1]):
    try:
        a.free(np.array(bad, np.int32))
    except InvalidFreeError:
        print("refused")
cache = RadixCache(token_to_kv_pool_allocator=a)
try:
    cache.insert(RadixKey([1, 2]), np.array([2**31 - 1, int(held[0])], np.int32))
except InvalidValueError:
    print("refused")
assert a.available_size() == 36 and a.is_allocated(held).all() and not a.is_cached(held).any()
a._check_invariants()
cache._check_invariants()
print("ok")
"""
    )
    assert out.split() == ["refused", "refused", "refused", "ok"]


def test_a_slot_listed_twice_is_named_so_and_nothing_is_freed() -> None:
    a = TokenToKVPoolAllocator(8)
    x = a.alloc(3)
    with pytest.raises(InvalidFreeError, match=f"slot {x[0]} is listed twice"):
        a.free([x[0], x[1], x[0]])
    assert a.is_allocated(x).all() and a.available_size() == 5
    a._check_invariants()


def test_the_pools_end_bound_must_fit_int32() -> None:
    """With the padding page first, slots end before (pages + 1) * page_size, a bound kept
    in int32: the largest pool of 2**20-slot pages has 2,046 of them (its last slot
    2**31 - 2**20 - 1); one more page is refused, by its end bound, before any memory is
    taken."""
    page = 2**20
    a = TokenToKVPoolAllocator(2046 * page, page_size=page)
    assert a.num_pages == 2046 and a.available_size() == 2046 * page
    with pytest.raises(InvalidValueError, match=r"end before slot 2147483648"):
        TokenToKVPoolAllocator(2047 * page, page_size=page)


@pytest.mark.parametrize("n", [1, 2, 7])
def test_a_full_pool_churned_one_slot_at_a_time_keeps_its_free_list_in_bounds(n: int) -> None:
    """need_sort=False appends frees at the tail of a list twice the pool's size and
    compacts it when the tail reaches the end: a full pool whose one slot is freed and
    taken again many times crosses that end again and again (AddressSanitizer, in
    .ci/asan, sees a write past it)."""
    a = TokenToKVPoolAllocator(n, need_sort=False)
    held = list(a.alloc(n))
    for i in range(6 * n + 6):
        a.free([held[i % n]])
        (slot,) = a.alloc(1)
        held[i % n] = slot
        a._check_invariants()
    assert sorted(held) == list(range(1, n + 1)) and a.available_size() == 0
