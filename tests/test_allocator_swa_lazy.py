"""``SWATokenToKVPoolAllocator``: full slots taken without an SWA side
(``alloc(n, swa=False)``) and SWA sides attached to them later (``alloc_swa``), the way the
engine takes the SWA side of a position just before a step writes it.

Every refused call is checked to change nothing: both sides' free counts, the mapping, and
which slots are allocated and cached are compared before and after. Page sizes 1 and 4."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pymllm.mem_cache import RadixCache, RadixKey
from pymllm.mem_cache._allocator import SWATokenToKVPoolAllocator
from pymllm.mem_cache.errors import InvalidFreeError, InvalidValueError

PAGES = [1, 4]


def snapshot(a: SWATokenToKVPoolAllocator) -> tuple[Any, ...]:
    """Everything a call could change, for before/after comparisons."""
    every = np.arange(len(a.full_to_swa_index_mapping))
    return (
        a.full_available_size(),
        a.swa_available_size(),
        a.full_to_swa_index_mapping.tolist(),
        a.is_allocated(every).tolist(),
        a.is_cached(every).tolist(),
    )


def refused(a: SWATokenToKVPoolAllocator, error: type[Exception], call: Any) -> None:
    before = snapshot(a)
    with pytest.raises(error):
        call()
    assert snapshot(a) == before
    a._check_invariants()


def swa_of(a: SWATokenToKVPoolAllocator, full: Any) -> list[int]:
    return a.translate_loc_from_full_to_swa(np.asarray(full)).tolist()


@pytest.mark.parametrize("ps", PAGES)
def test_alloc_without_swa_takes_the_full_side_alone(ps: int) -> None:
    a = SWATokenToKVPoolAllocator(8 * ps, 2 * ps, page_size=ps)
    x = a.alloc(6 * ps, swa=False)
    assert x is not None and len(x) == 6 * ps
    assert swa_of(a, x) == [0] * (6 * ps)
    assert a.full_available_size() == 2 * ps and a.swa_available_size() == 2 * ps
    assert a.is_allocated(x).all() and not a.is_cached(x).any()
    a._check_invariants()
    # only the full side is checked: a larger request than the SWA pool fits...
    assert a.alloc(2 * ps, swa=False) is not None
    # ...and a full side that is short refuses, changing nothing
    before = snapshot(a)
    assert a.alloc(ps, swa=False) is None
    assert snapshot(a) == before
    # the default still takes both sides, and refuses when the SWA side is short
    b = SWATokenToKVPoolAllocator(8 * ps, 2 * ps, page_size=ps)
    before = snapshot(b)
    assert b.alloc(3 * ps) is None
    assert snapshot(b) == before


@pytest.mark.parametrize("ps", PAGES)
def test_alloc_without_swa_after_a_prefix(ps: int) -> None:
    a = SWATokenToKVPoolAllocator(8 * ps, 8 * ps, page_size=ps)
    pre = a.alloc(2 * ps)
    assert pre is not None
    x = a.alloc(ps, prefix=pre, swa=False)
    assert x is not None and x[: 2 * ps].tolist() == pre.tolist()
    assert all(swa_of(a, pre)) and swa_of(a, x[2 * ps :]) == [0] * ps
    assert a.swa_available_size() == 6 * ps
    a._check_invariants()


@pytest.mark.parametrize("bad", ["no", 1, None, 0.0])
def test_alloc_swa_flag_must_be_a_bool(bad: Any) -> None:
    a = SWATokenToKVPoolAllocator(8, 8)
    refused(a, InvalidValueError, lambda: a.alloc(2, swa=bad))
    assert a.alloc(2, swa=np.bool_(False)) is not None  # type: ignore[arg-type]


@pytest.mark.parametrize("ps", PAGES)
def test_alloc_swa_attaches_whole_pages(ps: int) -> None:
    a = SWATokenToKVPoolAllocator(8 * ps, 8 * ps, page_size=ps)
    x = a.alloc(4 * ps, swa=False)
    assert x is not None
    # one slot of the second page (and the first page whole): two pages attached
    assert a.alloc_swa(np.concatenate([x[:ps], x[ps : ps + 1]])) is True
    assert a.swa_available_size() == 6 * ps
    got = np.asarray(swa_of(a, x[: 2 * ps]))
    assert got.min() >= ps and len(set(got.tolist())) == 2 * ps
    for p in range(2):  # each full page maps to one SWA page, slot by slot
        page = got[p * ps : (p + 1) * ps]
        assert page[0] % ps == 0 and page.tolist() == list(range(page[0], page[0] + ps))
    assert swa_of(a, x[2 * ps :]) == [0] * (2 * ps)
    a._check_invariants()
    # the rest later, in any order and any integer dtype
    assert a.alloc_swa(x[2 * ps :][::-1].astype(np.int64).tolist()) is True
    assert all(swa_of(a, x)) and a.swa_available_size() == 4 * ps
    a._check_invariants()


def test_alloc_swa_of_nothing_is_true() -> None:
    a = SWATokenToKVPoolAllocator(8, 0)
    before = snapshot(a)
    assert a.alloc_swa([]) is True
    assert a.alloc_swa(np.zeros(0, np.int32)) is True
    assert snapshot(a) == before


@pytest.mark.parametrize("ps", PAGES)
def test_alloc_swa_short_is_false_and_changes_nothing(ps: int) -> None:
    a = SWATokenToKVPoolAllocator(8 * ps, 3 * ps, page_size=ps)
    x = a.alloc(4 * ps, swa=False)
    assert x is not None
    before = snapshot(a)
    assert a.alloc_swa(x) is False
    assert snapshot(a) == before
    a._check_invariants()
    assert a.alloc_swa(x[: 3 * ps]) is True  # exactly what is left
    assert a.swa_available_size() == 0
    assert a.alloc_swa(x[3 * ps :]) is False
    a.free(x[:ps])  # freeing a full slot gives its SWA side back: room again
    assert a.alloc_swa(x[3 * ps :]) is True
    a._check_invariants()


@pytest.mark.parametrize("ps", PAGES)
def test_alloc_swa_refuses_slots_that_are_not_the_callers_or_have_a_side(ps: int) -> None:
    a = SWATokenToKVPoolAllocator(16 * ps, 16 * ps, page_size=ps)
    both = a.alloc(2 * ps)  # with an SWA side from alloc
    bare = a.alloc(4 * ps, swa=False)
    freed = a.alloc(ps, swa=False)
    assert both is not None and bare is not None and freed is not None
    a.free(freed)
    assert a.alloc_swa(bare[ps : 2 * ps]) is True  # attached once already
    hi = (a.size // ps + 1) * ps
    cases: list[tuple[Any, str | None]] = [
        ([bare[0], both[0]], "already has an SWA side"),
        ([bare[0], bare[ps]], "already has an SWA side"),
        ([bare[0], freed[0]], "not allocated"),
        ([bare[0], 0], "padding"),
        ([bare[0], hi], "out of range"),
        ([bare[0], -1], "out of range"),
        ([bare[0], 2**40], "out of range"),
        (np.array([float(bare[0])]), None),
        ([True], None),
        (np.array([[bare[0]]]), None),
    ]
    if ps == 1:
        cases.append(([bare[0], bare[2], bare[0]], "listed twice"))
    for indices, msg in cases:
        before = snapshot(a)
        with pytest.raises(InvalidValueError, match=msg) as info:
            a.alloc_swa(indices)
        # the message names this call's argument and frees nothing
        text = str(info.value)
        if msg is not None:
            assert text.startswith("full_indices: "), text
            assert "free()" not in text and "double free" not in text, text
            assert "cannot be freed" not in text, text
        assert snapshot(a) == before, indices
        a._check_invariants()
    # nothing was attached by the refused calls: the good slots take one now
    assert a.alloc_swa([bare[0]]) is True


@pytest.mark.parametrize("ps", PAGES)
def test_alloc_swa_refuses_a_prefix_caches_slots(ps: int) -> None:
    a = SWATokenToKVPoolAllocator(16 * ps, 16 * ps, page_size=ps)
    cache = RadixCache(token_to_kv_pool_allocator=a, page_size=ps, sliding_window_size=2 * ps)
    x = a.alloc(4 * ps, swa=False)
    assert x is not None and a.alloc_swa(x[2 * ps :]) is True
    # the first two pages have no SWA side: a tombstone; the last two are live
    cache.insert(RadixKey(list(range(1, 4 * ps + 1))), x, swa_evicted_seqlen=2 * ps)
    assert a.is_cached(x).all()
    refused(a, InvalidValueError, lambda: a.alloc_swa(x[:1]))
    cache._check_invariants()


@pytest.mark.parametrize("ps", PAGES)
def test_free_and_free_swa_skip_sides_never_attached(ps: int) -> None:
    a = SWATokenToKVPoolAllocator(8 * ps, 8 * ps, page_size=ps)
    x = a.alloc(4 * ps, swa=False)
    assert x is not None and a.alloc_swa(x[: 2 * ps]) is True
    a.free_swa(x)  # frees the two attached pages, skips the others
    assert a.swa_available_size() == 8 * ps and a.full_available_size() == 4 * ps
    assert a.alloc_swa(x) is True  # every page bare again: all four attach
    a.free(x[2 * ps :])
    assert a.swa_available_size() == 6 * ps and a.full_available_size() == 6 * ps
    y = a.alloc(2 * ps, swa=False)
    assert y is not None
    a.free(np.concatenate([x[: 2 * ps], y]))  # attached and bare in one call
    assert a.swa_available_size() == a.full_available_size() == 8 * ps
    a._check_invariants()
    refused(a, InvalidFreeError, lambda: a.free(y))


def test_alloc_swa_waits_for_a_free_group() -> None:
    """SWA slots freed inside an open free group are not handed out by alloc_swa until it
    ends, as with alloc."""
    a = SWATokenToKVPoolAllocator(8, 2)
    x = a.alloc(2)
    y = a.alloc(2, swa=False)
    assert x is not None and y is not None
    a.free_group_begin()
    a.free(x)
    assert a.alloc_swa(y) is False
    a.free_group_end()
    assert a.alloc_swa(y) is True
    a._check_invariants()


@pytest.mark.parametrize("ps", PAGES)
def test_a_windowed_tree_takes_and_evicts_slots_never_given_an_swa_side(ps: int) -> None:
    """The engine inserts a request's slots with ``swa_evicted_seqlen``: those below it
    may never have had an SWA side (taken with ``swa=False``, freed or never attached).
    The tree stores them as a tombstone and frees them through the allocator's C entry
    points, which skip a missing SWA side: no double free, no leak."""
    w = 2 * ps
    a = SWATokenToKVPoolAllocator(32 * ps, 8 * ps, page_size=ps)
    cache = RadixCache(token_to_kv_pool_allocator=a, page_size=ps, sliding_window_size=w)
    n = 12 * ps
    x = a.alloc(n, swa=False)
    assert x is not None
    # attached, then freed out of the window, for the first 4 pages; never for the next 4;
    # live for the last 4 (what a decoding request leaves behind)
    assert a.alloc_swa(x[: 4 * ps]) is True
    a.free_swa(x[: 4 * ps])
    assert a.alloc_swa(x[8 * ps :]) is True
    key = RadixKey(list(range(1, n + 1)))
    cache.insert(key, x, swa_evicted_seqlen=8 * ps)
    assert cache.total_size() == n and cache.swa_evictable_size() == 4 * ps
    assert a.swa_available_size() == 4 * ps and a.full_available_size() == 20 * ps
    cache._check_invariants()
    a._check_invariants()
    m = cache.match_prefix(key)
    assert len(m.indices) == n  # the window past the tombstone is live: usable whole
    # the SWA KV alone first, then everything
    cache.evict(0, 4 * ps)
    assert a.swa_available_size() == 8 * ps and cache.swa_evictable_size() == 0
    cache.evict(n)
    assert cache.total_size() == 0
    assert a.full_available_size() == 32 * ps and a.swa_available_size() == 8 * ps
    a._check_invariants()
    cache._check_invariants()
    # reset() over such slots too
    y = a.alloc(n, swa=False)
    assert y is not None and a.alloc_swa(y[8 * ps :]) is True
    cache.insert(key, y, swa_evicted_seqlen=8 * ps)
    cache.reset()
    assert a.full_available_size() == 32 * ps and a.swa_available_size() == 8 * ps
    a._check_invariants()


class LazySwaModel(RuleBasedStateMachine):
    """The allocator against a pure-Python model of who holds which page: every full page
    is free or the caller's, and a caller's page has an SWA page or none. Random
    ``alloc`` (with and without the SWA side), ``alloc_swa`` (of bare pages, or of pages
    that make it refuse), ``free_swa`` and ``free``; after each step both sides' free
    counts, which pages have an SWA side, and that no SWA page is mapped twice."""

    def __init__(self) -> None:
        super().__init__()
        self.a: SWATokenToKVPoolAllocator | None = None
        self.ps = 1
        self.full_pages = self.swa_pages = 0
        self.held: dict[int, bool] = {}  # the caller's full pages: whether each has SWA

    def _page(self, x: np.ndarray) -> list[int]:
        return sorted({int(s) // self.ps for s in x.tolist()})

    def _slots(self, pages: list[int]) -> np.ndarray:
        ps = self.ps
        return np.array([p * ps + j for p in pages for j in range(ps)], np.int32)

    @initialize(ps=st.sampled_from(PAGES), full=st.integers(1, 12), swa=st.integers(0, 8))
    def init(self, ps: int, full: int, swa: int) -> None:
        self.a = SWATokenToKVPoolAllocator(full * ps, swa * ps, page_size=ps)
        self.ps, self.full_pages, self.swa_pages = ps, full, swa

    @rule(pages=st.integers(1, 5), with_swa=st.booleans())
    def alloc(self, pages: int, with_swa: bool) -> None:
        assert self.a is not None
        free_full = self.full_pages - len(self.held)
        free_swa = self.swa_pages - sum(self.held.values())
        x = self.a.alloc(pages * self.ps, swa=with_swa)
        fits = pages <= free_full and (not with_swa or pages <= free_swa)
        assert (x is not None) == fits
        if x is not None:
            for p in self._page(x):
                assert p not in self.held
                self.held[p] = with_swa

    @rule(data=st.data())
    def alloc_swa(self, data: st.DataObject) -> None:
        assert self.a is not None
        if not self.held:  # a no-op step rather than a rule hypothesis must redraw
            return
        pages = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1, unique=True))
        x = self._slots(pages)
        if any(self.held[p] for p in pages):
            refused(self.a, InvalidValueError, lambda: self.a.alloc_swa(x))  # type: ignore[union-attr]
            return
        fits = len(pages) <= self.swa_pages - sum(self.held.values())
        assert self.a.alloc_swa(x) is fits
        if fits:
            self.held.update(dict.fromkeys(pages, True))

    @rule(data=st.data(), whole=st.booleans())
    def free(self, data: st.DataObject, whole: bool) -> None:
        assert self.a is not None
        if not self.held:  # a no-op step rather than a rule hypothesis must redraw
            return
        pages = data.draw(st.lists(st.sampled_from(sorted(self.held)), min_size=1, unique=True))
        if whole:
            self.a.free(self._slots(pages))
            for p in pages:
                del self.held[p]
        else:
            self.a.free_swa(self._slots(pages))
            self.held.update(dict.fromkeys(pages, False))

    @invariant()
    def matches_the_model(self) -> None:
        a = self.a
        assert a is not None  # made by the @initialize step, before any invariant
        assert a.full_available_size() == (self.full_pages - len(self.held)) * self.ps
        assert a.swa_available_size() == (self.swa_pages - sum(self.held.values())) * self.ps
        mapping = a.full_to_swa_index_mapping
        mapped = {p for p in range(1, self.full_pages + 1) if mapping[p * self.ps] != 0}
        assert mapped == {p for p, has in self.held.items() if has}
        assert len({int(mapping[p * self.ps]) for p in mapped}) == len(mapped)
        a._check_invariants()

    def teardown(self) -> None:
        if self.a is not None and self.held:  # everything back: nothing leaked
            self.a.free(self._slots(sorted(self.held)))
            assert self.a.full_available_size() == self.full_pages * self.ps
            assert self.a.swa_available_size() == self.swa_pages * self.ps


test_lazy_swa_against_a_model = LazySwaModel.TestCase
