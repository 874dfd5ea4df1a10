"""A call that raises changes nothing.

Not the cached content, and not the rest of the tree's state either: no split stands, no
node's recency or hit count moves, the eviction order is the same, and every slot keeps its
owner. Each case builds the same cache twice, makes the refused call on one of them, and
compares the two: every node (id, parent, key, slots, locks, recency, hits, window state),
the size counters, the allocator's books, then the order in which evicting everything
removes the nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from pymllm.mem_cache import (
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    _radix_tree,
)
from pymllm.mem_cache.errors import InvalidValueError

PROMPT = list(range(1, 9))  # the first cached key; the refused calls diverge inside it


class _Stack:
    """A cache over its allocator, recording the ids that on_node_evict reports."""

    def __init__(self, kind: str, page_size: int = 1) -> None:
        self.evicted: list[int] = []
        self.kind = kind
        if kind == "swa" or kind == "swa-python-free":
            cls = SWATokenToKVPoolAllocator if kind == "swa" else _FailingFreeSWA
            self.alloc: Any = cls(64, 64, need_sort=False)
            self.cache: Any = RadixCache(
                sliding_window_size=2,
                token_to_kv_pool_allocator=self.alloc,
                on_node_evict=self.evicted.append,
            )
        else:
            self.alloc = TokenToKVPoolAllocator(64, page_size=page_size, need_sort=False)
            cls2: Any = MambaRadixCache if kind == "mamba" else RadixCache
            self.cache = cls2(
                page_size=page_size,
                token_to_kv_pool_allocator=self.alloc,
                on_node_evict=self.evicted.append,
            )

    def snapshot(self) -> tuple[Any, ...]:
        rows = []
        for n in sorted(self.cache._nodes(), key=lambda n: n.id):
            row = [
                n.id,
                None if n.parent is None else n.parent.id,
                list(n.key.token_ids),
                np.asarray(n.value).tolist(),
                n.lock_ref,
                n.last_access_time,
                n.hit_count,
                n.swa_tombstone,
                n.swa_lock_ref,
            ]
            if self.kind == "mamba":
                row.append(n.mamba_value)
            rows.append(tuple(row))
        c = self.cache
        sizes = (
            c.evictable_size(),
            c.protected_size(),
            c.total_size(),
            c.swa_evictable_size(),
            c.swa_protected_size(),
        )
        every = np.arange(self.alloc.size + 2 * getattr(self.alloc, "page_size", 1))
        books: tuple[Any, ...] = (
            self.alloc.is_allocated(every).tolist(),
            self.alloc.is_cached(every).tolist(),
        )
        if self.kind.startswith("swa"):
            books += (
                self.alloc.full_to_swa_index_mapping.tolist(),
                self.alloc.full_available_size(),
                self.alloc.swa_available_size(),
            )
        else:
            books += (self.alloc.available_size(),)
        return tuple(rows), sizes, books

    def drain(self) -> list[int]:
        """Evict everything unlocked; the order the nodes went in."""
        start = len(self.evicted)
        if self.kind.startswith("swa"):
            self.cache.evict(10**6, swa_num_tokens=10**6)
        else:
            self.cache.evict(10**6)
        return self.evicted[start:]


class _FailingFreeSWA(SWATokenToKVPoolAllocator):
    """An SWA allocator of another type (so the tree books nothing in it) whose ``free``
    raises while ``fail`` is set, before it frees anything."""

    fail = False

    def free(self, free_index: Any) -> None:
        if self.fail:
            raise RuntimeError("free refused (test)")
        super().free(free_index)


def _plain_setup(s: _Stack) -> dict[str, Any]:
    """Two branches, one split by a match, one node locked by a running request."""
    c, a = s.cache, s.alloc
    p = a.alloc(8)
    kw = {"mamba_value": 1} if s.kind == "mamba" else {}
    c.insert(RadixKey(PROMPT), p, **kw)
    other = a.alloc(8)
    kw = {"mamba_value": 2} if s.kind == "mamba" else {}
    c.insert(RadixKey(list(range(20, 28))), other, **kw)
    m = c.match_prefix(RadixKey([20, 21, 22, 23, 99, 98]))
    c.inc_lock_ref(m.last_node)
    c.match_prefix(RadixKey(PROMPT))
    return {"prompt": p}


def _refused_plain(s: _Stack, ctx: dict[str, Any], case: str) -> Callable[[], object]:
    """An insert that shares PROMPT's first 4 tokens and diverges inside its node."""
    p = ctx["prompt"]
    key = RadixKey([*PROMPT[:4], 50, 51, 52, 53])
    kw = {"mamba_value": 3} if s.kind == "mamba" else {}
    if case == "a slot the tree owns":
        value = np.concatenate([p[:4], p[6:8], s.alloc.alloc(2)]).astype(np.int32)
        return lambda: s.cache.insert(key, value, **kw)
    value = np.concatenate([p[:4], s.alloc.alloc(4)]).astype(np.int32)
    # the leaf's block is the first node block the insert allocates, the split's the second
    fuse = 0 if case == "no memory for the leaf" else 1
    return lambda: _out_of_memory_after(fuse, lambda: s.cache.insert(key, value, **kw))


def _out_of_memory_after(blocks: int, call: Callable[[], object]) -> object:
    """call() with the tree's node blocks failing after `blocks` more (-1: none fails)."""
    if blocks < 0:
        return call()
    _radix_tree._fail_node_arrays_after(blocks)
    try:
        return call()
    finally:
        _radix_tree._fail_node_arrays_after(-1)


def _refused_match(s: _Stack, ctx: dict[str, Any]) -> Callable[[], object]:
    """A match ending inside a node of PROMPT, out of memory for the split."""
    key = RadixKey([*PROMPT[:6], 77])
    return lambda: _out_of_memory_after(0, lambda: s.cache.match_prefix(key))


def _assert_refused_call_changes_nothing(
    make: Callable[[], _Stack],
    setup: Callable[[_Stack], dict[str, Any]],
    prepare: Callable[[_Stack, dict[str, Any]], Callable[[], object]],
    expected: type[BaseException],
) -> None:
    """`prepare` allocates what the call needs (on both caches) and returns the call."""
    hit, twin = make(), make()
    call = prepare(hit, setup(hit))
    prepare(twin, setup(twin))
    before = hit.snapshot()
    assert before == twin.snapshot()
    with pytest.raises(expected):
        call()
    assert hit.snapshot() == before
    hit.cache._check_invariants()
    hit.alloc._check_invariants()
    # the clock did not move either: the next call stamps the same time on both
    for s in (hit, twin):
        s.cache.match_prefix(RadixKey([*PROMPT, 5]))
    assert hit.snapshot() == twin.snapshot()
    assert hit.drain() == twin.drain()
    assert hit.snapshot()[1:] == twin.snapshot()[1:]


PLAIN_CASES = {
    "a slot the tree owns": InvalidValueError,
    "no memory for the leaf": MemoryError,
    "no memory for the split": MemoryError,
}


@pytest.mark.parametrize("case", list(PLAIN_CASES))
@pytest.mark.parametrize("kind,page_size", [("plain", 1), ("plain", 2), ("mamba", 1)])
def test_a_refused_insert_changes_nothing(kind: str, page_size: int, case: str) -> None:
    _assert_refused_call_changes_nothing(
        lambda: _Stack(kind, page_size),
        _plain_setup,
        lambda s, ctx: _refused_plain(s, ctx, case),
        PLAIN_CASES[case],
    )


@pytest.mark.parametrize("kind,page_size", [("plain", 1), ("plain", 2), ("swa", 1)])
def test_a_match_out_of_memory_for_its_split_changes_nothing(kind: str, page_size: int) -> None:
    _assert_refused_call_changes_nothing(
        lambda: _Stack(kind, page_size),
        _swa_setup if kind == "swa" else _plain_setup,
        _refused_match,
        MemoryError,
    )


def test_the_same_insert_goes_through_once_memory_is_back() -> None:
    """The refused calls above are refused for the reason the test gives them."""
    s = _Stack("plain")
    ctx = _plain_setup(s)
    with pytest.raises(MemoryError):
        _refused_plain(s, ctx, "no memory for the split")()
    value = np.concatenate([ctx["prompt"][:4], s.alloc.alloc(4)]).astype(np.int32)
    r = s.cache.insert(RadixKey([*PROMPT[:4], 50, 51, 52, 53]), value)
    assert r.prefix_len == 4
    assert s.alloc.is_cached(value[4:]).all()
    s.cache._check_invariants()


# -- with a sliding window ---------------------------------------------------------------


def _swa_setup(s: _Stack) -> dict[str, Any]:
    """PROMPT cached as a tombstone over its first 4 tokens and live KV after them, a
    second branch, one node locked."""
    c, a = s.cache, s.alloc
    p = a.alloc(8)
    a.free_swa(p[:4])  # the request's window moved past them
    c.insert(RadixKey(PROMPT), p, swa_evicted_seqlen=4)
    other = a.alloc(6)
    c.insert(RadixKey(list(range(20, 26))), other)
    m = c.match_prefix(RadixKey([20, 21, 22, 23, 99]))
    c.inc_lock_ref(m.last_node)
    c.match_prefix(RadixKey(PROMPT))
    return {"prompt": p}


def _swa_value(s: _Stack, ctx: dict[str, Any], bad: bool) -> np.ndarray:
    """For [1, 2, 3, 4, 5, 6, 70, 71] with prev_prefix_len 2: the tree's own two protected
    slots, two fresh ones to revive the tombstone's [3, 4] (split off at 2), two fresh
    duplicates of the live [5, 6] (split off at 6, the match end), two for the new leaf (the
    last one, with `bad`, a slot the tree owns)."""
    p = ctx["prompt"]
    tail = [s.alloc.alloc(1)[0], p[7]] if bad else s.alloc.alloc(2).tolist()
    return np.array([*p[:2], *s.alloc.alloc(4).tolist(), *tail], dtype=np.int32)


SWA_KEY = RadixKey([*PROMPT[:6], 70, 71])


# node blocks a windowed SWA_KEY insert allocates: with es 0, the new live leaf and the two
# splits'; with es 7 also a tombstone leaf over [6, 7)
SWA_BLOCKS = {0: 3, 7: 4}
SWA_CASES = [
    (case, expected, es)
    for es in SWA_BLOCKS
    for case, expected in [
        ("prev_prefix_len past the cached prefix", InvalidValueError),
        ("prev_prefix_len in a new namespace", InvalidValueError),
        ("a slot the tree owns", InvalidValueError),
        ("the allocator's free raises", RuntimeError),
    ]
    + [(f"no memory: block {i}", MemoryError) for i in range(SWA_BLOCKS[es])]
]


@pytest.mark.parametrize("case,expected,es", SWA_CASES)
def test_a_refused_windowed_insert_changes_nothing(
    case: str, expected: type[BaseException], es: int
) -> None:
    kind = "swa-python-free" if case == "the allocator's free raises" else "swa"

    def prepare(s: _Stack, ctx: dict[str, Any]) -> Callable[[], object]:
        ppl = 2
        value = _swa_value(s, ctx, bad=case == "a slot the tree owns")
        key = SWA_KEY
        if case == "prev_prefix_len past the cached prefix":
            ppl = 8  # 6 are cached
            value[:6] = ctx["prompt"][:6]
        elif case == "prev_prefix_len in a new namespace":
            key = RadixKey(SWA_KEY.token_ids, "new namespace")  # holds nothing
        blocks = int(case[-1]) if case.startswith("no memory") else -1

        def call() -> object:
            if isinstance(s.alloc, _FailingFreeSWA):
                s.alloc.fail = True
            try:
                return _out_of_memory_after(
                    blocks,
                    lambda: s.cache.insert(key, value, prev_prefix_len=ppl, swa_evicted_seqlen=es),
                )
            finally:
                if isinstance(s.alloc, _FailingFreeSWA):
                    s.alloc.fail = False

        return call

    _assert_refused_call_changes_nothing(lambda: _Stack(kind), _swa_setup, prepare, expected)


@pytest.mark.parametrize("es", list(SWA_BLOCKS))
def test_the_windowed_insert_goes_through_with_one_block_more(es: int) -> None:
    """The cases above fail each of the insert's node blocks; armed to fail the one after
    its last, the same insert succeeds: the tombstone's part past prev_prefix_len revived
    (es 0) or its incoming slots freed as duplicates (es 7), splits at both ends."""
    s = _Stack("swa")
    ctx = _swa_setup(s)
    value = _swa_value(s, ctx, bad=False)
    r: Any = _out_of_memory_after(
        SWA_BLOCKS[es],
        lambda: s.cache.insert(SWA_KEY, value, prev_prefix_len=2, swa_evicted_seqlen=es),
    )
    assert r.prefix_len == 6
    s.cache._check_invariants()
    s.alloc._check_invariants()
    by_key = {tuple(n.key.token_ids): n for n in s.cache._nodes()}
    assert set(by_key) >= {(1, 2), (3, 4), (5, 6), (7, 8)}  # split at ppl and at the end
    assert by_key[(1, 2)].swa_tombstone  # the protected prefix is left alone
    revived = np.asarray(by_key[(3, 4)].value).tolist() == value[2:4].tolist()
    assert revived == (es == 0) and by_key[(3, 4)].swa_tombstone == (es != 0)
    if es == 0:
        assert not by_key[(70, 71)].swa_tombstone
    else:
        assert by_key[(70,)].swa_tombstone and not by_key[(71,)].swa_tombstone
    assert not s.alloc.is_allocated(value[4:6]).any()  # duplicates of the live [5, 6]


def test_a_windowed_new_namespace_below_the_window_refused_by_free_keeps_the_clock() -> None:
    """A new namespace's key lying wholly below swa_evicted_seqlen caches nothing and frees
    the whole value; when that free raises, the clock has not moved either."""

    def prepare(s: _Stack, ctx: dict[str, Any]) -> Callable[[], object]:
        value = s.alloc.alloc(4)

        def call() -> object:
            s.alloc.fail = True
            try:
                return s.cache.insert(RadixKey([9, 9, 9, 9], "new"), value, swa_evicted_seqlen=4)
            finally:
                s.alloc.fail = False

        return call

    _assert_refused_call_changes_nothing(
        lambda: _Stack("swa-python-free"), _swa_setup, prepare, RuntimeError
    )


# -- out of memory for a call's result ---------------------------------------------------

# A match allocates its result's node handle, index array and result object; an insert its
# node handle and result object. The hook fails the n-th of them.
RESULT_CALLS = {
    "match that splits": 3,
    "match of a namespace the tree lacks": 3,
    "insert that splits": 2,
    "insert into a new namespace": 2,
    "insert of an empty key": 2,
}


def _result_call(s: _Stack, ctx: dict[str, Any], call: str) -> Callable[[], object]:
    """The call (its slots allocated now, on both twins), without the hook."""
    c = s.cache
    if call == "match that splits":
        key = RadixKey([*PROMPT[:6], 77])
        return lambda: c.match_prefix(key)
    if call == "match of a namespace the tree lacks":
        key = RadixKey(PROMPT, "elsewhere")
        return lambda: c.match_prefix(key)
    kw: dict[str, Any] = {"mamba_value": 3} if s.kind == "mamba" else {}
    if call == "insert of an empty key":
        return lambda: c.insert(RadixKey([]), np.zeros(0, np.int32))
    if call == "insert that splits":
        key = RadixKey([*PROMPT[:4], 50, 51, 52, 53])
        value = np.concatenate([ctx["prompt"][:4], s.alloc.alloc(4)]).astype(np.int32)
    else:
        key = RadixKey(PROMPT, "a new namespace")
        value = s.alloc.alloc(8)
    return lambda: c.insert(key, value, **kw)


def _results_fail_after(n: int, call: Callable[[], object]) -> object:
    """call() with the n-th result allocation out of memory (-1: none)."""
    _radix_tree._fail_results_after(n)
    try:
        return call()
    finally:
        _radix_tree._fail_results_after(-1)


@pytest.mark.parametrize(
    "call,n", [(call, n) for call, points in RESULT_CALLS.items() for n in range(points)]
)
@pytest.mark.parametrize("kind,page_size", [("plain", 1), ("plain", 2), ("mamba", 1), ("swa", 1)])
def test_a_call_out_of_memory_for_its_result_changes_nothing(
    kind: str, page_size: int, call: str, n: int
) -> None:
    """Each of the result's allocations in turn: the call raises MemoryError, and neither
    the tree (no split, no recency, no clock tick, no new node) nor any slot's owner has
    changed; the slots an insert was handed stay the caller's."""
    _assert_refused_call_changes_nothing(
        lambda: _Stack(kind, page_size),
        _swa_setup if kind == "swa" else _plain_setup,
        lambda s, ctx: (lambda f: lambda: _results_fail_after(n, f))(_result_call(s, ctx, call)),
        MemoryError,
    )


@pytest.mark.parametrize("call", list(RESULT_CALLS))
def test_the_calls_go_through_with_one_result_allocation_more(call: str) -> None:
    """The hook counts each call's result allocations: armed past the last, nothing fails."""
    s = _Stack("plain")
    ctx = _plain_setup(s)
    r: Any = _results_fail_after(RESULT_CALLS[call], _result_call(s, ctx, call))
    assert r.last_node is not None
    s.cache._check_invariants()
    s.alloc._check_invariants()
