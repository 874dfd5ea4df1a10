"""Who owns a KV slot, as the allocator books it: free, a caller's, or a prefix cache's.

A radix tree over a ``TokenToKVPoolAllocator`` has the allocator book the slots it takes
in ``insert`` as the cache's, and frees them as the cache's when it evicts. So a caller
that frees a slot the tree still serves (which would let the allocator hand it to another
request while the tree hands it out as cached KV) gets ``InvalidFreeError``, and an insert
that would make the tree own a slot it already owns, or a free one (the tree would later
free it twice, or free another request's slot), gets ``InvalidValueError``. Either way
nothing changes hands.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from conftest import FlakyExtraKey, run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import (
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import (
    AllocatorStateError,
    InvalidFreeError,
    InvalidValueError,
    StaleNodeError,
)


def _stack(page_size: int = 1, size: int = 64, mamba: bool = False) -> tuple[Any, Any]:
    alloc = TokenToKVPoolAllocator(size, page_size=page_size, need_sort=False)
    cls = MambaRadixCache if mamba else RadixCache
    return cls(page_size=page_size, token_to_kv_pool_allocator=alloc), alloc


def _books(alloc: TokenToKVPoolAllocator) -> tuple[list[bool], list[bool], int]:
    every = np.arange(0, alloc.size + 2 * alloc.page_size)
    held, cached = alloc.is_allocated(every).tolist(), alloc.is_cached(every).tolist()
    return held, cached, alloc.available_size()


def _content(cache: Any) -> list[tuple[list[int], list[int]]]:
    """The cached content: every root-to-leaf path's tokens and slots (splits do not show)."""
    out = []
    nodes = list(cache._nodes())
    parents = {n.parent.id for n in nodes if n.parent is not None}
    for node in nodes:
        if node.id != 0 and node.id not in parents:
            toks: list[int] = []
            vals: list[int] = []
            n = node
            while n.parent is not None:
                toks[:0] = list(n.key.token_ids)
                vals[:0] = np.asarray(n.value).tolist()
                n = n.parent
            out.append((toks, vals))
    return sorted(out)


def _sizes(cache: Any) -> tuple[int, int, int]:
    return cache.evictable_size(), cache.protected_size(), cache.total_size()


@pytest.mark.parametrize("mamba", [False, True])
def test_the_tree_owns_what_it_takes_and_gives_it_back_on_evict(mamba: bool) -> None:
    cache, alloc = _stack(mamba=mamba)
    a = alloc.alloc(4)
    assert cache.insert(RadixKey([1, 2, 3, 4]), a).prefix_len == 0
    assert alloc.is_cached(a).all() and alloc.is_allocated(a).all()
    # a second request computed the first two tokens again: its copies stay its own
    b = alloc.alloc(3)
    assert cache.insert(RadixKey([1, 2, 9]), b).prefix_len == 2
    assert alloc.is_cached(b).tolist() == [False, False, True]
    alloc.free(b[:2])  # the duplicates are the caller's to free
    cache._check_invariants()
    alloc._check_invariants()
    cache.evict(100)
    assert not alloc.is_allocated(np.concatenate([a, b])).any()
    assert alloc.available_size() == alloc.size
    alloc._check_invariants()


def test_reset_gives_every_cached_slot_back() -> None:
    cache, alloc = _stack()
    cache.insert(RadixKey([1, 2, 3]), alloc.alloc(3))
    cache.insert(RadixKey([4, 5]), alloc.alloc(2))
    cache.reset()
    assert alloc.available_size() == alloc.size and not alloc.is_cached(np.arange(70)).any()
    alloc._check_invariants()


@pytest.mark.parametrize("with_good_slot", [False, True])
def test_a_caller_cannot_free_a_slot_the_tree_serves(with_good_slot: bool) -> None:
    cache, alloc = _stack()
    a = alloc.alloc(4)
    cache.insert(RadixKey([1, 2, 3, 4]), a)
    mine = alloc.alloc(2)
    before = _books(alloc)
    bad = np.concatenate([mine, a[2:3]]) if with_good_slot else a[2:3]
    with pytest.raises(InvalidFreeError, match=f"slot {a[2]} is owned by a prefix cache"):
        alloc.free(bad)
    assert _books(alloc) == before  # nothing of the call freed, the good slot included
    # the matched prefix still names the tree's slots, which no one else can be handed
    m = cache.match_prefix(RadixKey([1, 2, 3, 4]))
    assert m.indices.tolist() == a.tolist()
    alloc.free(mine)
    assert not set(alloc.alloc(alloc.available_size()).tolist()) & set(a.tolist())


def test_page_granularity() -> None:
    cache, alloc = _stack(page_size=2)
    a = alloc.alloc(4)  # two pages
    cache.insert(RadixKey([1, 2, 3, 4]), a)
    assert alloc.is_cached(a).all()
    with pytest.raises(InvalidFreeError, match="owned by a prefix cache"):
        alloc.free(a[3:])  # one slot of a cached page
    before = _books(alloc)
    content = _content(cache)
    # a page the tree already owns, passed as new under another key
    with pytest.raises(InvalidValueError, match="already owned by a prefix cache"):
        cache.insert(RadixKey([7, 8]), a[2:])
    assert _books(alloc) == before and _content(cache) == content
    cache.evict(100)
    assert alloc.available_size() == alloc.size
    alloc._check_invariants()


def _bad_values(alloc: TokenToKVPoolAllocator, cached: np.ndarray) -> dict[str, Any]:
    mine = alloc.alloc(2)
    freed = alloc.alloc(1)
    alloc.free(freed)
    return {
        "a slot the tree owns": (np.array([mine[0], cached[0]], dtype=np.int32), "already owned"),
        "a free slot": (np.array([mine[0], freed[0]], dtype=np.int32), "not allocated"),
        "a slot twice": (np.array([mine[0], mine[0]], dtype=np.int32), "listed twice"),
        "the padding slot": (np.array([mine[0], 0], dtype=np.int32), "not a slot the allocator"),
        "past the pool": (np.array([mine[0], alloc.size + 1], dtype=np.int32), "not a slot the"),
    }


@pytest.mark.parametrize("mamba", [False, True])
@pytest.mark.parametrize("namespace", [None, "new namespace"])
@pytest.mark.parametrize(
    "case",
    ["a slot the tree owns", "a free slot", "a slot twice", "the padding slot", "past the pool"],
)
def test_an_insert_of_slots_no_caller_holds_takes_nothing(
    mamba: bool, namespace: Any, case: str
) -> None:
    cache, alloc = _stack(mamba=mamba)
    cached = alloc.alloc(4)
    cache.insert(RadixKey([1, 2, 3, 4]), cached)
    value, message = _bad_values(alloc, cached)[case]
    # In the tree's namespace [1, 2] is cached and the prefix passed is the tree's own
    # slots (a match's indices); in a new namespace nothing is cached and the prefix is
    # the caller's. Either way the new part holds one slot no caller holds.
    prefix = cached[:2] if namespace is None else alloc.alloc(2)
    before = _books(alloc)
    content, sizes = _content(cache), _sizes(cache)
    key = RadixKey([1, 2, 5, 6], namespace)
    with pytest.raises(InvalidValueError, match=message):
        cache.insert(key, np.concatenate([prefix, value]))
    assert _books(alloc) == before
    assert _content(cache) == content and _sizes(cache) == sizes
    cache._check_invariants()
    alloc._check_invariants()
    # the same insert with slots the caller holds goes through
    good = alloc.alloc(2)
    r = cache.insert(key, np.concatenate([prefix, good]))
    assert r.prefix_len == (2 if namespace is None else 0)
    assert alloc.is_cached(good).all() and alloc.is_cached(prefix).all()
    cache._check_invariants()


def test_a_matched_prefix_passed_again_as_new_is_refused() -> None:
    """A new namespace caches nothing, so a prefix matched in another namespace would be
    taken a second time."""
    cache, alloc = _stack()
    cached = alloc.alloc(2)
    cache.insert(RadixKey([1, 2]), cached)
    m = cache.match_prefix(RadixKey([1, 2, 3]))
    value = np.concatenate([m.indices, alloc.alloc(1)])
    with pytest.raises(InvalidValueError, match=f"slot {cached[0]} is already owned"):
        cache.insert(RadixKey([1, 2, 3], "other"), value)
    assert cache.total_size() == 2


class _CountingKey:
    """An extra_key that counts its __hash__ calls and, from call `fail_at` on, raises (or,
    with `swap`, first overwrites the caller's value array with `swap`)."""

    def __init__(self, fail_at: int = 0, value: Any = None, swap: Any = None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.value, self.swap = value, swap

    def __hash__(self) -> int:
        self.calls += 1
        if self.fail_at and self.calls >= self.fail_at:
            if self.swap is not None:
                self.value[:] = self.swap
            if self.swap is None or self.fail_at > 0:
                raise RuntimeError("hash failed")
        return 1

    def __eq__(self, other: object) -> bool:
        return self is other


def _hash_calls_of_a_new_namespace_insert() -> int:
    cache, alloc = _stack()
    key_ns = _CountingKey()
    cache.insert(RadixKey([1, 2], key_ns), alloc.alloc(2))
    return key_ns.calls


@pytest.mark.parametrize("swap", [False, True])
def test_a_failed_new_namespace_gives_the_slots_back(swap: bool) -> None:
    """The slots are taken before the namespace is: an extra_key whose hash raises at any
    of its calls (before or after the slots were taken) leaves every slot with its owner,
    also when its code first overwrites the caller's value array."""
    n_calls = _hash_calls_of_a_new_namespace_insert()
    assert n_calls >= 2  # the lookup, then the interning: the failure points tried below
    for fail_at in range(1, n_calls + 1):
        cache, alloc = _stack()
        value = alloc.alloc(2)
        other = alloc.alloc(2)
        alloc.free(other)  # free slots: what the array holds when the hash raises
        before = _books(alloc)
        key_ns = _CountingKey(fail_at, value, other.copy() if swap else None)
        with pytest.raises(RuntimeError, match="hash failed"):
            cache.insert(RadixKey([1, 2], key_ns), value)
        assert _books(alloc) == before and cache.total_size() == 0, f"failing at call {fail_at}"
        cache._check_invariants()
        alloc._check_invariants()


def test_a_value_changed_by_the_extra_keys_code_is_taken_as_it_was() -> None:
    """The tree takes the slots it copied, not what the caller's array holds after the
    extra_key's code ran (a zero-copy int32 value is the caller's memory)."""
    cache, alloc = _stack()
    value = alloc.alloc(4)
    original = value.copy()
    other = alloc.alloc(4)

    class Swapping:
        calls = 0

        def __hash__(self) -> int:
            Swapping.calls += 1
            if Swapping.calls > 1:  # the interning's call, after the slots were copied
                value[:] = other
            return 1

        def __eq__(self, o: object) -> bool:
            return self is o

    r = cache.insert(RadixKey([1, 2, 3, 4], Swapping()), value)
    assert Swapping.calls >= 2 and value.tolist() == other.tolist()
    assert np.asarray(r.last_node.value).tolist() == original.tolist()
    assert alloc.is_cached(original).all() and not alloc.is_cached(other).any()
    cache._check_invariants()
    alloc._check_invariants()


def test_value_none_takes_the_token_ids_as_slots() -> None:
    cache, alloc = _stack()
    a = alloc.alloc(3)
    cache.insert(RadixKey(a.tolist()))  # the tokens are the slots
    assert alloc.is_cached(a).all()
    with pytest.raises(InvalidValueError, match="not allocated"):
        cache.insert(RadixKey([50, 51]))  # never allocated


def test_two_caches_over_one_allocator_cannot_both_own_a_slot() -> None:
    alloc = TokenToKVPoolAllocator(32, need_sort=False)
    one = RadixCache(token_to_kv_pool_allocator=alloc)
    two = RadixCache(token_to_kv_pool_allocator=alloc)
    a = alloc.alloc(2)
    one.insert(RadixKey([1, 2]), a)
    with pytest.raises(InvalidValueError, match="already owned"):
        two.insert(RadixKey([1, 2]), a)
    assert two.total_size() == 0
    one.evict(10)
    assert alloc.available_size() == alloc.size


def test_ownership_is_only_booked_by_our_allocator() -> None:
    """Another allocator (any object with free()) tracks no owners: inserts of any slots
    are taken as before, and evict hands them to its free()."""

    class Recording:
        def __init__(self) -> None:
            self.freed: list[int] = []

        def free(self, idx: Any) -> None:
            self.freed += np.asarray(idx).tolist()

    rec = Recording()
    cache = RadixCache(token_to_kv_pool_allocator=rec)
    cache.insert(RadixKey([1, 2]), np.array([40, 41], dtype=np.int32))
    cache.evict(10)
    assert sorted(rec.freed) == [40, 41]


@pytest.mark.parametrize(
    "value",
    [[2, 3, 4, 2], [3, 2, 4, 5], [3, 4, 5, 6], [2, 3, 2, 3]],
    ids=["a page split over two runs", "out of order", "runs across pages", "a page twice"],
)
def test_with_pages_each_run_must_be_one_page(value: list[int]) -> None:
    """A page split over two page-aligned runs could end up in two nodes (after a split),
    and evicting one would free the other's slots: every run must be one page, in order."""
    cache, alloc = _stack(page_size=2, size=16)
    a = alloc.alloc(4)
    assert a.tolist() == [2, 3, 4, 5]
    before = _books(alloc)
    with pytest.raises(InvalidValueError, match=r"not the slots of one page|listed twice"):
        cache.insert(RadixKey([1, 2, 3, 4]), np.array(value, dtype=np.int32))
    assert _books(alloc) == before and cache.total_size() == 0
    cache.insert(RadixKey([1, 2, 3, 4]), a)  # pages as alloc handed them out
    cache._check_invariants()


@pytest.mark.parametrize("cycle", [False, True])
def test_a_dropped_cache_gives_its_slots_back(cycle: bool) -> None:
    """Only the cache can free the slots the allocator books as its own, so dropping it
    hands them back (as reset() does), also when it dies in a reference cycle."""
    import gc

    alloc = TokenToKVPoolAllocator(16, need_sort=False)

    class Scheduler:
        def __init__(self) -> None:
            self.cache = RadixCache(
                token_to_kv_pool_allocator=alloc, on_node_evict=self.on_evict if cycle else None
            )

        def on_evict(self, node_id: int) -> None:
            pass

    sched = Scheduler()
    a = alloc.alloc(4)
    sched.cache.insert(RadixKey([1, 2, 3, 4]), a)
    b = alloc.alloc(2)
    sched.cache.insert(RadixKey([7, 8]), b)
    assert alloc.available_size() == 10
    del sched
    gc.collect()
    assert alloc.available_size() == 16 and not alloc.is_allocated(np.arange(18)).any()
    alloc._check_invariants()


def test_clear_is_refused_while_a_cache_holds_slots() -> None:
    cache, alloc = _stack(size=16)
    a = alloc.alloc(3)
    cache.insert(RadixKey([1, 2, 3]), a)
    mine = alloc.alloc(2)
    before = _books(alloc)
    with pytest.raises(AllocatorStateError, match="a prefix cache holds 3 slots"):
        alloc.clear()
    assert _books(alloc) == before
    cache.reset()
    alloc.clear()  # only callers' slots (`mine`) are left: clear takes them back
    assert alloc.available_size() == 16 and not alloc.is_allocated(mine).any()


@pytest.mark.parametrize(("tree_page", "alloc_page"), [(1, 4), (2, 4), (6, 4), (4, 8)])
@pytest.mark.parametrize("swa", [False, True])
def test_the_tree_page_must_be_a_multiple_of_the_allocators(
    tree_page: int, alloc_page: int, swa: bool
) -> None:
    """A tree page smaller than (or not a multiple of) the allocator's lets the tree's own
    splits put one allocator page in two nodes: the first one evicted frees the other's
    slots. Refused at construction."""
    if swa:
        from pymllm.mem_cache import SWATokenToKVPoolAllocator

        alloc: Any = SWATokenToKVPoolAllocator(64, 64, page_size=alloc_page)
    else:
        alloc = TokenToKVPoolAllocator(64, page_size=alloc_page)
    with pytest.raises(InvalidValueError, match="not a multiple of the allocator's page_size"):
        RadixCache(page_size=tree_page, token_to_kv_pool_allocator=alloc)
    with pytest.raises(InvalidValueError, match="not a multiple of the allocator's page_size"):
        MambaRadixCache(page_size=tree_page, token_to_kv_pool_allocator=alloc)


def test_a_tree_page_of_whole_allocator_pages_is_taken() -> None:
    alloc = TokenToKVPoolAllocator(64, page_size=2, need_sort=False)
    cache = RadixCache(page_size=4, token_to_kv_pool_allocator=alloc)
    a = alloc.alloc(8)
    cache.insert(RadixKey(list(range(1, 9))), a)
    b = alloc.alloc(8)
    r = cache.insert(RadixKey([1, 2, 3, 4, 9, 9, 9, 9]), b)  # splits at 4
    assert r.prefix_len == 4 and alloc.is_cached(b).tolist() == [False] * 4 + [True] * 4
    alloc.free(b[:4])  # the duplicates: ours
    cache.evict(100)
    assert alloc.available_size() == 64
    alloc._check_invariants()


@pytest.mark.parametrize("n", [63, 64, 65, 130])
@pytest.mark.parametrize("where", ["first", "second", "end of block 0", "start of block 1", "last"])
@pytest.mark.parametrize("kind", ["free", "twice", "cached"])
def test_a_bad_slot_anywhere_in_a_long_value_takes_nothing(n: int, where: str, kind: str) -> None:
    """The slots are taken in blocks of 64 (a block that is a run in one range update):
    a bad slot in any block, at its edges, after runs already taken, rolls all back."""
    at = {"first": 0, "second": 1, "end of block 0": 63, "start of block 1": 64, "last": n - 1}
    bad = min(at[where], n - 1)
    cache, alloc = _stack(size=1000)
    held = alloc.alloc(3)
    cache.insert(RadixKey([999_999, 1, 2]), held)
    value = alloc.alloc(n).copy()
    if kind == "free":
        freed = alloc.alloc(1)
        alloc.free(freed)
        value[bad] = freed[0]
    elif kind == "twice":
        value[bad] = value[0] if bad else value[1]
    else:
        value[bad] = held[1]
    before = _books(alloc)
    with pytest.raises(InvalidValueError):
        cache.insert(RadixKey(list(range(5, 5 + n))), value)
    assert _books(alloc) == before
    alloc._check_invariants()
    cache._check_invariants()


@pytest.mark.parametrize("key_len", [6, 4], ids=["longer key", "same key"])
def test_a_namespace_found_only_at_interning_takes_only_the_new_part(key_len: int) -> None:
    """An extra_key whose hash changes between the insert's two namespace lookups: the
    first misses (the slots are taken for a new namespace), interning finds the existing
    one, and the walk then matches its cached prefix. Those slots are the caller's again
    (duplicates); the leaf takes only the rest."""

    cache, alloc = _stack()
    cached = alloc.alloc(4)
    cache.insert(RadixKey([1, 2, 3, 4], FlakyExtraKey()), cached)
    value = alloc.alloc(key_len)
    r = cache.insert(RadixKey([1, 2, 3, 4, 5, 6][:key_len], FlakyExtraKey(wrong=1)), value)
    assert r.prefix_len == 4
    expect = value[4:] if key_len > 4 else cached  # the same key ends at the cached node
    assert np.asarray(r.last_node.value).tolist() == expect.tolist()
    held = sorted(s for n in cache._nodes() for s in np.asarray(n.value).tolist())
    every = np.arange(alloc.size + 2)
    assert np.flatnonzero(alloc.is_cached(every)).tolist() == held
    alloc.free(value[:4])  # the duplicates: the caller's
    cache.reset()
    assert alloc.available_size() == alloc.size
    alloc._check_invariants()


@pytest.mark.parametrize("evicted", [0, 6], ids=["live", "tombstone-past-the-match"])
def test_swa_a_namespace_found_only_at_interning_lays_out_the_new_nodes(evicted: int) -> None:
    """The windowed insert's twin of the test above: the new nodes' blocks are made for
    the whole key before the namespace is taken (a new namespace matches nothing), then the
    nodes hold only the part past the cached prefix. Each block is laid out again for what
    its node holds: a split's lower half finds its block from the node's key and value
    (the build before freed a pointer 4 positions before the block in ``reset``)."""

    cache, alloc = _swa_stack()
    cached = alloc.alloc(4)
    cache.insert(RadixKey([1, 2, 3, 4], FlakyExtraKey()), cached)
    value = alloc.alloc(10)
    kwargs = {"swa_evicted_seqlen": evicted} if evicted else {}
    r = cache.insert(RadixKey(list(range(1, 11)), FlakyExtraKey(wrong=1)), value, **kwargs)
    assert r.prefix_len == 4
    cache._check_invariants()
    held = sorted(np.asarray(n.value).tolist() for n in cache._nodes())
    new = value[4:].tolist()
    assert held == sorted([cached.tolist(), *([new] if not evicted else [new[:2], new[2:]])])
    m = cache.match_prefix(RadixKey(list(range(1, 9)), FlakyExtraKey()))  # splits the new leaf
    assert m.indices.tolist() == (cached.tolist() + new[:4] if not evicted else cached.tolist())
    cache._check_invariants()
    cache.reset()
    assert alloc.full_available_size() == alloc.size
    alloc._check_invariants()


# -- with a sliding window: SWATokenToKVPoolAllocator books the full side the same way ------


def _swa_stack(window: int = 4, size: int = 64) -> tuple[Any, Any]:
    from pymllm.mem_cache import SWATokenToKVPoolAllocator

    alloc = SWATokenToKVPoolAllocator(size, size, need_sort=False)
    return RadixCache(sliding_window_size=window, token_to_kv_pool_allocator=alloc), alloc


def _swa_books(alloc: Any) -> tuple[Any, ...]:
    every = np.arange(0, alloc.size + 2)
    return (
        alloc.is_allocated(every).tolist(),
        alloc.is_cached(every).tolist(),
        alloc.full_to_swa_index_mapping.tolist(),
        alloc.full_available_size(),
        alloc.swa_available_size(),
    )


@pytest.mark.parametrize("method", ["free", "free_swa"])
def test_swa_a_caller_cannot_free_either_side_of_a_tree_slot(method: str) -> None:
    cache, alloc = _swa_stack()
    a = alloc.alloc(6)
    cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), a)
    assert alloc.is_cached(a).all()
    before = _swa_books(alloc)
    with pytest.raises(InvalidFreeError, match="owned by a prefix cache"):
        getattr(alloc, method)(a[1:2])
    assert _swa_books(alloc) == before
    with pytest.raises(AllocatorStateError, match="a prefix cache holds 6 slots"):
        alloc.clear()
    cache.evict(6)
    assert alloc.full_available_size() == 64 and not alloc.is_allocated(a).any()
    alloc._check_invariants()


@pytest.mark.parametrize("case", ["a slot the tree owns", "a free slot", "a slot twice"])
def test_swa_an_insert_of_slots_no_caller_holds_takes_nothing(case: str) -> None:
    cache, alloc = _swa_stack()
    cached = alloc.alloc(4)
    cache.insert(RadixKey([1, 2, 3, 4]), cached)
    mine = alloc.alloc(2)
    if case == "a slot the tree owns":
        bad = cached[3]
    elif case == "a free slot":
        freed = alloc.alloc(1)
        alloc.free(freed)
        bad = freed[0]
    else:
        bad = mine[0]
    value = np.concatenate([cached[:2], mine[:1], [bad]]).astype(np.int32)
    before = _swa_books(alloc)
    sizes = _sizes(cache)
    with pytest.raises((InvalidValueError, InvalidFreeError)):
        cache.insert(RadixKey([1, 2, 7, 8]), value, prev_prefix_len=2)
    assert _swa_books(alloc) == before and _sizes(cache) == sizes
    cache._check_invariants()
    alloc._check_invariants()


def test_swa_a_revived_tombstone_books_the_new_slots_and_frees_its_old_ones() -> None:
    cache, alloc = _swa_stack(window=2)
    old = alloc.alloc(6)
    alloc.free_swa(old[:4])  # the request's window moved past them (its own slots)
    cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), old, swa_evicted_seqlen=4)
    # [1..4] is a tombstone: its SWA side is gone, its full side is the cache's
    assert alloc.is_cached(old).all()
    assert alloc.translate_loc_from_full_to_swa(old[:4]).tolist() == [0] * 4
    new = alloc.alloc(4)
    before = _swa_books(alloc)
    with pytest.raises(InvalidValueError, match="already owned"):  # nothing changes
        cache.insert(RadixKey([1, 2, 3, 4]), np.concatenate([new[:3], old[5:]]))
    assert _swa_books(alloc) == before
    r = cache.insert(RadixKey([1, 2, 3, 4]), new)  # revived with the incoming slots
    assert r.prefix_len == 4
    held = sorted(s for n in cache._nodes() for s in np.asarray(n.value).tolist())
    assert held == sorted([*new.tolist(), *old[4:].tolist()])
    every = np.arange(alloc.size + 2)
    assert np.flatnonzero(alloc.is_cached(every)).tolist() == held
    assert not alloc.is_allocated(old[:4]).any()  # the tombstone's old slots: freed
    cache._check_invariants()
    alloc._check_invariants()
    cache.reset()
    assert alloc.full_available_size() == 64 and alloc.swa_available_size() == 64
    alloc._check_invariants()


@pytest.mark.parametrize("page_size", [1, 2])
def test_swa_a_duplicate_that_is_a_revived_tombstones_old_slot_is_refused(page_size: int) -> None:
    """One insert revives a tombstone (its old slots go back to the pool) and hands back, as
    a duplicate of a live node's slots, the tombstone's old slots: the caller never held
    them. With page size 1 this was refused (the slot was listed twice in the one free);
    with pages it was accepted, since a free frees each page once however often it is
    listed. Now the duplicates are freed while the tombstone's slots are still the tree's,
    and the insert is refused and changes nothing at every page size."""
    from pymllm.mem_cache import SWATokenToKVPoolAllocator

    alloc = SWATokenToKVPoolAllocator(64, 64, page_size=page_size, need_sort=False)
    cache = RadixCache(page_size=page_size, sliding_window_size=2, token_to_kv_pool_allocator=alloc)
    old = alloc.alloc(6)
    alloc.free_swa(old[:4])
    cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), old, swa_evicted_seqlen=4)  # [1..4]: tombstone
    new = alloc.alloc(4)
    before = _swa_books(alloc)
    sizes = _sizes(cache)
    nodes = [(n.key.token_ids, np.asarray(n.value).tolist()) for n in cache._nodes()]
    bad = np.concatenate([new, old[:2]]).astype(np.int32)  # [5, 6] "duplicates": old's
    with pytest.raises(InvalidFreeError, match="owned by a prefix cache"):
        cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), bad)
    assert _swa_books(alloc) == before and _sizes(cache) == sizes
    assert [(n.key.token_ids, np.asarray(n.value).tolist()) for n in cache._nodes()] == nodes
    cache._check_invariants()
    alloc._check_invariants()
    # the same insert with the live node's own slots passed back: the tombstone is revived
    r = cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), np.concatenate([new, old[4:]]))
    assert r.prefix_len == 6
    assert not alloc.is_allocated(old[:4]).any() and alloc.is_cached(new).all()
    cache._check_invariants()
    alloc._check_invariants()
    cache.reset()
    assert alloc.full_available_size() == 64 and alloc.swa_available_size() == 64


@pytest.mark.parametrize("namespace", [None, "new"])
@pytest.mark.parametrize("freed", [2, 0])
def test_swa_a_new_tombstone_keeps_no_swa_kv(namespace: Any, freed: int) -> None:
    """A tree page of 4 over an allocator page of 2: a request that freed the SWA side of
    its first allocator page only (swa_evicted_seqlen 2, rounded up to 4 by the tree), or
    none of it, hands over tokens 0-3 as a tombstone whose slots still hold SWA KV. The
    tree frees that SWA side itself (it was left allocated, counted by no size and freed
    by no evict): every SWA slot in use is the live node's, and a SWA evict frees it."""
    from pymllm.mem_cache import SWATokenToKVPoolAllocator

    alloc = SWATokenToKVPoolAllocator(32, 32, page_size=2)
    cache = RadixCache(4, sliding_window_size=4, token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey([9, 9, 9, 9]), alloc.alloc(4))  # the None namespace exists
    v = alloc.alloc(8)
    alloc.free_swa(v[:freed])
    key = RadixKey(list(range(8)), namespace)
    assert cache.insert(key, v, swa_evicted_seqlen=2).prefix_len == 0
    assert alloc.is_cached(v).all()
    assert alloc.translate_loc_from_full_to_swa(v[:4]).tolist() == [0] * 4
    assert (alloc.translate_loc_from_full_to_swa(v[4:]) > 0).all()
    swa_in_use = alloc.swa_size - alloc.swa_available_size()
    assert swa_in_use == cache.swa_evictable_size() + cache.swa_protected_size() == 8
    cache.evict(0, 8)
    assert alloc.swa_available_size() == alloc.swa_size
    cache._check_invariants()
    alloc._check_invariants()
    cache.reset()
    assert alloc.full_available_size() == alloc.size
    alloc._check_invariants()


def test_swa_a_dropped_cache_gives_both_sides_back() -> None:
    import gc

    cache, alloc = _swa_stack()
    cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), alloc.alloc(6))
    cache.evict(0, swa_num_tokens=2)
    del cache
    gc.collect()
    assert alloc.full_available_size() == 64 and alloc.swa_available_size() == 64
    alloc._check_invariants()


def test_swa_a_refused_insert_in_a_new_namespace_leaves_no_namespace() -> None:
    cache, alloc = _swa_stack()
    a = alloc.alloc(4)
    cache.insert(RadixKey([1, 2, 3, 4]), a)
    b = alloc.alloc(3)
    before = _swa_books(alloc)
    with pytest.raises(InvalidValueError, match="already owned"):
        cache.insert(RadixKey([5, 6, 7, 8], "new-ns"), np.concatenate([b, a[:1]]))
    assert _swa_books(alloc) == before
    cache._check_invariants()  # an interned namespace with no node would fail here
    r = cache.insert(RadixKey([5, 6, 7, 8], "new-ns"), np.concatenate([b, alloc.alloc(1)]))
    assert r.prefix_len == 0
    cache._check_invariants()


class _PlainPool:
    """A state pool that books nothing (no ``slot_allocator``): states come back to it
    through ``free`` alone, Python code."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    def free(self, slots: Any) -> None:
        self._pool.free(slots)


@pytest.mark.parametrize("booked", [True, False])
@pytest.mark.parametrize("cycle", [False, True])
@pytest.mark.parametrize("locked", [False, True])
def test_mamba_a_dropped_cache_gives_its_states_back(
    cycle: bool, locked: bool, booked: bool
) -> None:
    """A dropped tree hands its states back (with its KV slots), also from a reference
    cycle and with a request's lock on: booked ones in C as it is deallocated, a plain
    pool's through its ``free`` from the tree's finalizer."""
    import gc

    from pymllm.mem_cache.memory_pool import MambaPool

    alloc = TokenToKVPoolAllocator(16, need_sort=False)
    pool = MambaPool(4, 1, (1,), (1,))

    class Scheduler:
        def __init__(self) -> None:
            self.cache = MambaRadixCache(
                token_to_kv_pool_allocator=alloc,
                mamba_pool=pool if booked else _PlainPool(pool),
                on_node_evict=self.on_evict if cycle else None,
            )

        def on_evict(self, node_id: int) -> None:
            pass

    sched = Scheduler()
    for toks in ([1, 2, 3, 4], [1, 2, 7], [9]):
        state = pool.alloc(1)
        assert state is not None
        value = alloc.alloc(len(toks))
        r = sched.cache.insert(RadixKey(toks), value, mamba_value=state)
        assert not r.mamba_exist
        alloc.free(value[: r.prefix_len])  # duplicates stay the caller's
    del r  # its node handle keeps the tree alive
    if locked:
        sched.cache.inc_lock_ref(sched.cache.match_prefix(RadixKey([1, 2, 7])).last_node)
    assert pool.available_size() == 1 and alloc.available_size() == 10
    del sched
    gc.collect()
    assert pool.available_size() == 4
    assert alloc.available_size() == 16 and not alloc.is_allocated(np.arange(18)).any()
    alloc._check_invariants()


def test_mamba_a_dropped_cache_whose_pool_refuses_still_frees_its_kv() -> None:
    """A pool that raises while the dropped tree hands its states back (it may be shutting
    down) costs those states only: nothing is raised, and the KV slots come back."""
    import gc

    class Refusing:
        calls = 0

        def free(self, slots: Any) -> None:
            Refusing.calls += 1
            raise RuntimeError("pool is gone")

    alloc = TokenToKVPoolAllocator(8, need_sort=False)
    cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=Refusing())
    cache.insert(RadixKey([1, 2, 3]), alloc.alloc(3), mamba_value=0)
    del cache
    gc.collect()
    assert Refusing.calls == 1
    assert alloc.available_size() == 8
    alloc._check_invariants()


# --- Mamba states: a MambaPool books the states its cache holds --------------------------


def _books_of(pool: Any) -> TokenToKVPoolAllocator:
    """The allocator that books a state pool's slots: the pool's own, or the pool itself."""
    return pool if isinstance(pool, TokenToKVPoolAllocator) else pool.slot_allocator


def _mamba_stack(kind: str) -> tuple[Any, TokenToKVPoolAllocator, Any]:
    """A MambaRadixCache over 32 KV slots and 4 state slots: in a ``MambaPool``, or in a
    bare ``TokenToKVPoolAllocator`` as the pool (both book the tree's states)."""
    from pymllm.mem_cache.memory_pool import MambaPool

    alloc = TokenToKVPoolAllocator(32, need_sort=False)
    if kind == "MambaPool":
        pool: Any = MambaPool(4, 1, (1,), (1,))
    else:
        pool = TokenToKVPoolAllocator(4, need_sort=False)
    cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
    return cache, alloc, pool


@pytest.fixture(params=["MambaPool", "allocator"])
def mamba_stack(request: pytest.FixtureRequest) -> tuple[Any, TokenToKVPoolAllocator, Any]:
    return _mamba_stack(request.param)


def _state_books(pool: Any) -> tuple[list[bool], list[bool], int]:
    every = np.arange(0, _books_of(pool).size + 2)
    books = _books_of(pool)
    return (
        books.is_allocated(every).tolist(),
        books.is_cached(every).tolist(),
        books.available_size(),
    )


def _mamba_state(cache: Any, alloc: TokenToKVPoolAllocator, pool: Any) -> tuple[Any, ...]:
    nodes = sorted(
        (n.id, list(n.key.token_ids), np.asarray(n.value).tolist(), n.mamba_value is not None)
        for n in cache._nodes()
    )
    sizes = (*_sizes(cache), cache.mamba_evictable_size(), cache.mamba_protected_size())
    return nodes, sizes, _books(alloc), _state_books(pool)


def test_mamba_the_pool_books_the_states_the_tree_holds(mamba_stack: Any) -> None:
    cache, alloc, pool = mamba_stack
    state = pool.alloc(1)
    cache.insert(RadixKey([1, 2, 3]), alloc.alloc(3), mamba_value=state)
    assert _books_of(pool).is_cached(state).all()
    before = _mamba_state(cache, alloc, pool)
    with pytest.raises(InvalidFreeError):
        pool.free(state)
    with pytest.raises(AllocatorStateError):
        pool.clear()
    assert _mamba_state(cache, alloc, pool) == before
    r = cache.evict(0, mamba_num=1)
    assert r.mamba_evicted == 1 and pool.available_size() == 4
    assert not _books_of(pool).is_allocated(state).any()
    cache._check_invariants()
    _books_of(pool)._check_invariants()


@pytest.mark.parametrize("bad", ["free", "out of range", "another node's"])
def test_mamba_an_insert_refuses_a_state_it_cannot_take(bad: str, mamba_stack: Any) -> None:
    """A free state (the tree would free it later, maybe while another request holds it) or
    one another node already holds (the tree would free it twice) is refused before the
    insert changes anything."""
    cache, alloc, pool = mamba_stack
    held = pool.alloc(1)
    cache.insert(RadixKey([1, 2, 3]), alloc.alloc(3), mamba_value=held)
    state = {"free": 3, "out of range": 9, "another node's": int(held[0])}[bad]
    value = alloc.alloc(4)
    before = _mamba_state(cache, alloc, pool)
    with pytest.raises(InvalidValueError, match="mamba_value: state slot"):
        cache.insert(RadixKey([1, 2, 3, 4]), value, mamba_value=state)
    assert _mamba_state(cache, alloc, pool) == before
    cache._check_invariants()


@pytest.mark.parametrize("end", ["a stateless node's end", "inside the state's node"])
def test_mamba_another_nodes_state_is_refused_where_the_key_ends(
    end: str, mamba_stack: Any
) -> None:
    """An insert may hand back the state its key's end node already holds (nothing
    changes); another node's state is refused, also where the key ends at an existing node
    without a state, and where it ends inside the node that holds that state (a key that
    is a view of a longer array: the walk must stop at the key's end, not read on into the
    array's next tokens, which equal the node's)."""
    cache, alloc, pool = mamba_stack
    state = pool.alloc(1)
    if end == "a stateless node's end":
        cache.insert(RadixKey([9, 9]), alloc.alloc(2), mamba_value=state)
        cache.insert(RadixKey([1, 2]), alloc.alloc(2))
        key = RadixKey([1, 2])
    else:
        cache.insert(RadixKey([1, 2, 3, 4]), alloc.alloc(4), mamba_value=state)
        key = RadixKey(np.array([1, 2, 3, 4], dtype=np.int32)[:2])
    value = alloc.alloc(2)
    before = _mamba_state(cache, alloc, pool)
    with pytest.raises(InvalidValueError, match="mamba_value: state slot"):
        cache.insert(key, value, mamba_value=state)
    assert _mamba_state(cache, alloc, pool) == before
    cache._check_invariants()


def test_mamba_the_nodes_own_state_handed_back_changes_nothing(mamba_stack: Any) -> None:
    cache, alloc, pool = mamba_stack
    state = pool.alloc(1)
    value = alloc.alloc(3)
    cache.insert(RadixKey([1, 2, 3]), value, mamba_value=state)
    before = _mamba_state(cache, alloc, pool)
    dup = alloc.alloc(3)
    r = cache.insert(RadixKey([1, 2, 3]), dup, mamba_value=state)
    assert r.prefix_len == 3 and not r.mamba_exist
    alloc.free(dup)
    assert _mamba_state(cache, alloc, pool) == before


def test_mamba_a_second_state_stays_the_callers(mamba_stack: Any) -> None:
    cache, alloc, pool = mamba_stack
    cache.insert(RadixKey([1, 2, 3]), alloc.alloc(3), mamba_value=pool.alloc(1))
    mine = pool.alloc(1)
    dup = alloc.alloc(3)
    r = cache.insert(RadixKey([1, 2, 3]), dup, mamba_value=mine)
    assert r.mamba_exist
    assert not _books_of(pool).is_cached(mine).any()
    pool.free(mine)  # the caller's, as mamba_exist says
    alloc.free(dup)
    cache._check_invariants()


def test_mamba_a_failed_insert_leaves_the_state_the_callers(mamba_stack: Any) -> None:
    cache, alloc, pool = mamba_stack
    a = alloc.alloc(3)
    cache.insert(RadixKey([1, 2, 3]), a)
    state = pool.alloc(1)
    before = _mamba_state(cache, alloc, pool)
    with pytest.raises(InvalidValueError, match="already owned"):  # a KV slot the tree holds
        cache.insert(RadixKey([5, 6]), np.array([a[0], a[1]], dtype=np.int32), mamba_value=state)
    assert _mamba_state(cache, alloc, pool) == before
    pool.free(state)


@pytest.mark.parametrize("kind", ["MambaPool", "allocator"])
def test_mamba_reset_and_drop_hand_booked_states_back(kind: str) -> None:
    import gc

    cache, alloc, pool = _mamba_stack(kind)  # not the fixture: it would keep the cache
    cache.insert(RadixKey([1, 2]), alloc.alloc(2), mamba_value=pool.alloc(1))
    cache.reset()
    assert pool.available_size() == 4 and not _books_of(pool).is_allocated(np.arange(6)).any()
    cache.insert(RadixKey([3, 4]), alloc.alloc(2), mamba_value=pool.alloc(1))
    del cache
    gc.collect()
    assert pool.available_size() == 4 and alloc.available_size() == 32
    _books_of(pool)._check_invariants()
    alloc._check_invariants()


class _PythonAllocator:
    """A KV allocator the tree cannot book (not this package's): slots go back to it only
    through ``free``, Python code."""

    def __init__(self, size: int) -> None:
        self.books = TokenToKVPoolAllocator(size, need_sort=False)

    def alloc(self, n: int) -> Any:
        return self.books.alloc(n)

    def free(self, slots: Any) -> None:
        self.books.free(slots)


@pytest.mark.parametrize("cache_kind", ["radix", "mamba booked", "mamba plain"])
def test_a_dropped_cache_gives_slots_back_to_a_python_allocator(cache_kind: str) -> None:
    """Slots only Python code can take back go back from the tree's finalizer, whatever
    else the tree books."""
    import gc

    from pymllm.mem_cache.memory_pool import MambaPool

    kv = _PythonAllocator(16)
    pool = MambaPool(4, 1, (1,), (1,))
    state = None
    if cache_kind == "radix":
        cache: Any = RadixCache(token_to_kv_pool_allocator=kv)
    else:
        state = pool.alloc(1)
        states = pool if cache_kind == "mamba booked" else _PlainPool(pool)
        cache = MambaRadixCache(token_to_kv_pool_allocator=kv, mamba_pool=states)
    states_kw = {} if state is None else {"mamba_value": state}
    cache.insert(RadixKey([1, 2, 3]), kv.alloc(3), **states_kw)
    del cache
    gc.collect()
    assert kv.books.available_size() == 16 and pool.available_size() == 4


def test_mamba_a_key_changed_by_its_extra_key_is_checked_as_changed() -> None:
    """A node's own state handed back, while the extra_key's __hash__ (the insert's one
    namespace look-up, before the state is checked) rewrites the key array: the check
    reads the key as rewritten, where no node holds that state, and refuses it as
    another node's; nothing changes, and the state stays the tree's at its node."""
    from pymllm.mem_cache.memory_pool import MambaPool

    class Shifty:
        arr: Any = None

        def __hash__(self) -> int:
            if Shifty.arr is not None:
                Shifty.arr[:] = [3, 4]
            return 7

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Shifty)

    alloc = TokenToKVPoolAllocator(16, need_sort=False)
    pool = MambaPool(4, 1, (1,), (1,))
    cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
    extra = Shifty()
    state = pool.alloc(1)
    first = cache.insert(RadixKey([1, 2], extra), alloc.alloc(2), mamba_value=state)
    arr = np.array([1, 2], dtype=np.int32)
    value = alloc.alloc(2)
    content, sizes = _content(cache), _sizes(cache)
    Shifty.arr = arr
    with pytest.raises(InvalidValueError, match="another node's state"):
        cache.insert(RadixKey(arr, extra), value, mamba_value=state)
    assert arr.tolist() == [3, 4]  # the rewrite happened
    assert _content(cache) == content and _sizes(cache) == sizes
    assert first.last_node.mamba_value == int(state[0])
    assert pool.slot_allocator.is_cached(state).all()
    assert not alloc.is_cached(value).any()  # the KV slots stay the caller's
    cache._check_invariants()


def test_mamba_init_reads_the_pools_books_before_building_the_tree() -> None:
    """A pool whose slot_allocator raises makes __init__ raise with no tree built, so a
    second __init__ (the pool ready now) builds one that books the states."""
    from pymllm.mem_cache.memory_pool import MambaPool

    class Pool:
        def __init__(self) -> None:
            self.pool = MambaPool(4, 1, (1,), (1,))
            self.ready = False

        def free(self, slots: Any) -> None:
            self.pool.free(slots)

        @property
        def slot_allocator(self) -> Any:
            if not self.ready:
                raise RuntimeError("not ready")
            return self.pool.slot_allocator

    pool = Pool()
    alloc = TokenToKVPoolAllocator(8, need_sort=False)
    cache = MambaRadixCache.__new__(MambaRadixCache)
    with pytest.raises(RuntimeError, match="not ready"):
        cache.__init__(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
    pool.ready = True
    cache.__init__(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
    state = pool.pool.alloc(1)
    cache.insert(RadixKey([1, 2]), alloc.alloc(2), mamba_value=state)
    assert pool.slot_allocator.is_cached(state).all()


class _PagedStatePool:
    """A state pool whose slot allocator hands out pages of 2 slots."""

    def __init__(self) -> None:
        self.slot_allocator = TokenToKVPoolAllocator(4, page_size=2, need_sort=False)

    def free(self, slots: Any) -> None:
        self.slot_allocator.free(slots)


@pytest.mark.parametrize("kind", ["allocator", "behind a pool", "SWA allocator"])
def test_mamba_refuses_a_paged_state_allocator(kind: str) -> None:
    """A paged allocator frees whole pages, so the tree's free of one state freed its page's
    other slot: another request's (and it went unbooked: the pool's free of a state the
    tree held passed). Refused when the cache is made, nothing built; a paged
    SWATokenToKVPoolAllocator too (its evict freed a state the tree still held)."""
    pool: Any = {
        "allocator": lambda: TokenToKVPoolAllocator(4, page_size=2, need_sort=False),
        "behind a pool": _PagedStatePool,
        "SWA allocator": lambda: SWATokenToKVPoolAllocator(4, 4, page_size=2, need_sort=False),
    }[kind]()
    alloc = TokenToKVPoolAllocator(8, need_sort=False)
    with pytest.raises(InvalidValueError, match="page_size 1"):
        MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
    assert alloc.available_size() == 8


def _collect_scheduler_with_requests(kv: Any, fail_rebuild: bool = False) -> list[Any]:
    """A scheduler, its cache over *kv* and two requests whose ``__del__`` unlocks their
    node, left as garbage and collected together (the cache's finalizer may run first);
    with *fail_rebuild* the finalizer's reset cannot rebuild the empty tree. Returns what
    the collection raised where nobody could catch it (``sys.unraisablehook``)."""
    import gc
    import sys

    from pymllm.mem_cache import _radix_tree

    unraisable: list[Any] = []
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable.append

    class Request:
        def __init__(self, cache: Any, node: Any) -> None:
            self.cache, self.node = cache, node
            cache.inc_lock_ref(node)

        def __del__(self) -> None:
            self.cache.dec_lock_ref(self.node)

    class Scheduler:
        def __init__(self) -> None:
            self.cache = RadixCache(token_to_kv_pool_allocator=kv, on_node_evict=self.on_evict)
            self.requests: list[Request] = []

        def on_evict(self, node_id: int) -> None:
            pass

    try:
        sched = Scheduler()
        for toks in ([1, 2, 3], [4, 5]):
            r = sched.cache.insert(RadixKey(toks), kv.alloc(len(toks)))
            sched.requests.append(Request(sched.cache, r.last_node))
        del sched, r
        if fail_rebuild:
            _radix_tree._fail_next_storage_inits(1)
        gc.collect()
    finally:
        _radix_tree._fail_next_storage_inits(0)
        sys.unraisablehook = old_hook
    return unraisable


def test_requests_that_unlock_in_their_del_after_the_cache_is_finalized() -> None:
    """A scheduler, its cache (over a Python allocator) and requests whose ``__del__``
    unlocks their node, collected together: the cache's finalizer may run first and hand
    everything back; the requests' unlocks after it are then no-ops, not errors."""
    kv = _PythonAllocator(64)
    unraisable = _collect_scheduler_with_requests(kv)
    assert not unraisable, [u.exc_value for u in unraisable]
    assert kv.books.available_size() == 64


def test_a_cache_whose_finalizer_runs_out_of_memory_still_hands_its_slots_back() -> None:
    import gc

    from pymllm.mem_cache import _radix_tree

    kv = _PythonAllocator(128)
    cache = RadixCache(token_to_kv_pool_allocator=kv)
    cache.insert(RadixKey(list(range(1, 101))), kv.alloc(100))
    _radix_tree._fail_scratch_growth_after(0)  # the finalizer's reset cannot copy them out
    try:
        del cache
        gc.collect()
    finally:
        _radix_tree._fail_scratch_growth_after(-1)
    assert kv.books.available_size() == 128


class _Resurrecting(_PythonAllocator):
    """Brings its cache back to life: the first ``free`` after ``owner`` is set (a
    finalizer's) stores the cache in *saved*. ``handles`` rides along in the garbage."""

    def __init__(self, size: int, saved: list[Any]) -> None:
        super().__init__(size)
        self.saved = saved
        self.owner: Any = None
        self.handles: Any = None

    def free(self, slots: Any) -> None:
        super().free(slots)
        if self.owner is not None:
            self.saved.append(self.owner)
            self.owner = None


def test_a_cache_brought_back_by_its_finalizer_and_dropped_again_hands_back_the_rest() -> None:
    """A finalizer runs once: a cache resurrected by its allocator's free (which keeps a
    reference), used again and dropped, gives back the slots it took since."""
    import gc

    saved: list[Any] = []
    kv = _Resurrecting(16, saved)
    cache = RadixCache(token_to_kv_pool_allocator=kv)
    cache.insert(RadixKey([1, 2, 3]), kv.alloc(3))
    kv.owner = cache  # a cycle: cache <-> allocator, nothing else holds either
    books = kv.books
    del cache, kv
    gc.collect()
    assert books.available_size() == 16 and len(saved) == 1
    cache = saved.pop()
    cache._check_invariants()
    assert cache.total_size() == 0
    cache.insert(RadixKey([4, 5]), books.alloc(2))
    del cache  # by reference count now; its finalizer has run already
    gc.collect()
    assert books.available_size() == 16


def test_unlocks_after_a_finalizer_that_could_not_rebuild_the_tree() -> None:
    """The finalizer hands everything back but runs out of memory rebuilding the empty
    tree: the requests' unlocks after it are still no-ops (no tree is needed for them)."""
    kv = _PythonAllocator(16)
    unraisable = _collect_scheduler_with_requests(kv, fail_rebuild=True)
    assert not unraisable, [u.exc_value for u in unraisable]
    assert kv.books.available_size() == 16


def test_after_the_finalizer_only_the_locks_it_found_unlock_silently() -> None:
    """On a cache brought back to life after its finalizer, each lock held at finalization
    can be undone once, silently; a second unlock, or one of a node evicted earlier, still
    raises as on any cache."""
    import gc

    saved: list[Any] = []
    kv = _Resurrecting(16, saved)
    cache = RadixCache(token_to_kv_pool_allocator=kv)
    cache.insert(RadixKey([1, 2, 3]), kv.alloc(3))
    cache.insert(RadixKey([7, 8]), kv.alloc(2))
    locked = cache.match_prefix(RadixKey([1, 2, 3])).last_node
    cache.inc_lock_ref(locked)
    cache.inc_lock_ref(locked)
    gone = cache.match_prefix(RadixKey([7, 8])).last_node
    cache.evict(2)  # [7, 8]: evicted before the finalizer
    assert gone.evicted
    kv.owner = cache
    kv.handles = (locked, gone)  # in the garbage too: a handle keeps its cache alive
    del cache, kv, locked, gone
    gc.collect()
    cache = saved.pop()
    locked, gone = cache.token_to_kv_pool_allocator.handles
    with pytest.raises(StaleNodeError):
        cache.dec_lock_ref(gone)
    assert cache.dec_lock_ref(locked) is None
    assert cache.dec_lock_ref(locked) is None  # it held two locks
    with pytest.raises(StaleNodeError):
        cache.dec_lock_ref(locked)
    cache._check_invariants()


def test_a_cache_the_collector_cleared_refuses_calls_from_code_run_meanwhile() -> None:
    """While the collector destroys a reference cycle it clears a cache that code still
    reaches: here another dying cache's allocator, which runs from that cache's
    deallocation (its finalizer could not reset it). The call raises instead of crashing
    the interpreter (a child process, so that a crash fails this test only)."""
    import textwrap

    code = textwrap.dedent(
        """
        import gc
        import numpy as np
        from pymllm.mem_cache import RadixCache, RadixKey, TokenToKVPoolAllocator
        from pymllm.mem_cache import _radix_tree

        books = TokenToKVPoolAllocator(16, need_sort=False)
        outcomes = []

        class Alloc:
            __slots__ = ("peer", "holder")  # they survive the collector's clear of this

            def alloc(self, n):
                return books.alloc(n)

            def free(self, slots):
                books.free(slots)
                try:
                    self.peer.match_prefix(RadixKey([1, 2]))
                    outcomes.append("returned")
                except Exception as exc:
                    outcomes.append(type(exc).__name__)

        def scenario():
            peer = RadixCache()  # tracked first: cleared first
            peer.insert(RadixKey([1, 2, 3]), np.arange(1, 4, dtype=np.int32))
            kv = Alloc()
            kv.peer = peer
            holder = []
            cache = RadixCache(token_to_kv_pool_allocator=kv)
            cache.insert(RadixKey([1, 2, 3]), kv.alloc(3))
            holder.append(cache)
            kv.holder = holder  # cache -> kv -> holder -> cache; kv -> peer

        scenario()
        _radix_tree._fail_scratch_growth_after(0)  # the cache's finalizer cannot reset it
        gc.collect()
        _radix_tree._fail_scratch_growth_after(-1)
        print(outcomes, books.available_size())
        """
    )
    assert run_child(code, timeout=120).split() == ["['NotInitializedError']", "16"]


class _InterruptedFree(SWATokenToKVPoolAllocator):
    """A Python allocator (the tree does not book it) whose free call number
    `interrupt_at` is interrupted once its slots are back: where an asynchronous
    KeyboardInterrupt can land."""

    interrupt_at = 0
    calls: list[list[int]]

    def free(self, indices) -> None:
        self.calls.append(np.asarray(indices).tolist())
        super().free(indices)
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("with_duplicates", [False, True])
def test_a_revived_tombstones_old_slots_leave_the_tree_before_they_are_freed(
    with_duplicates: bool,
) -> None:
    """A windowed insert over a Python allocator frees the revived tombstone's old slots in
    a call of their own once the tree holds the new ones: interrupted after freeing them, no
    slot is left both in the tree and free (they went with the caller's duplicates, before
    the tree changed, and stayed in it: the next alloc handed them to a second owner)."""
    alloc = _InterruptedFree(64, 64)
    alloc.calls = []
    cache = RadixCache(sliding_window_size=2, token_to_kv_pool_allocator=alloc)
    old = alloc.alloc(6)
    alloc.free_swa(old[:4])
    cache.insert(RadixKey([1, 2, 3, 4, 5, 6]), old, swa_evicted_seqlen=4)  # [1..4] tombstone
    new = alloc.alloc(6)
    key = [1, 2, 3, 4, 5, 6] if with_duplicates else [1, 2, 3, 4]
    dups = new[4:6].tolist() if with_duplicates else []
    alloc.calls = []
    alloc.interrupt_at = 2 if dups else 1  # the old slots' free
    with pytest.raises(KeyboardInterrupt):
        cache.insert(RadixKey(key), new[: len(key)])
    # the duplicates first (before the tree changed), then the old slots: the one interrupted
    assert alloc.calls == [*([dups] if dups else []), old[:4].tolist()]
    held = sorted(s for n in cache._nodes() for s in n.value.tolist())
    assert held == sorted(new[:4].tolist() + old[4:6].tolist())  # revived with the new slots
    assert alloc.is_allocated(np.array(held, dtype=np.int32)).all()
    assert not alloc.is_allocated(old[:4]).any()
    cache._check_invariants()
    alloc.merge_and_sort_free()
    other = alloc.alloc(alloc.available_size())
    assert not set(other.tolist()) & set(held)
    cache.evict(100)  # the tree frees only its own slots
    alloc.free(other)
    if len(key) < 6:
        alloc.free(new[len(key) :])  # never inserted: still the caller's
    assert alloc.available_size() == 64
