"""Reference-count leaks and memory growth of every public entry point, error paths included.

Each case is a step (one or a few calls) that leaves the cache or allocator as it found it.
It is repeated ``N`` times after a warm-up, and three things must not grow over the loop:
Python's allocated blocks (``sys.getallocatedblocks`` after ``gc.collect``), the C heap
(glibc's ``mallinfo2``: the trees' node blocks, scratch buffers and allocators live there)
and the reference count of each argument object the step passes in (key, token list, value
array, node handle, extra_key, callback) and of the Python classes whose instances the
calls make (results, exceptions). A real leak grows by at least one block, one reference or
one malloc chunk per call, so by ``N`` over the loop; the thresholds are a quarter of that.
Some growth is not the package's and stops (numpy's array repr, a cycle's garbage freed
into malloc's bins), so a case passes when any of ``ROUNDS`` rounds is clean: a leak grows
in every round. The objects alive before the rounds are frozen (``gc.freeze``), so that a
round's collections walk only what the round made.

``test_the_checks_catch_a_leak`` runs every case again with a leak of its own added to the
step (an object, a reference to an argument, a C allocation per call) and requires the
check to fire, so that no case passes for want of measuring anything.
``test_big_blocks_are_unmapped`` covers the blocks of 1 MiB and more, which the tree maps
from the kernel (mallinfo2 does not see them), through the process's mapped size.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from conftest import HAS_MALLINFO2, heap_bytes_in_use  # tests/ is on sys.path

from pymllm.mem_cache import (
    ChunkCache,
    EvictResult,
    InsertResult,
    MambaRadixCache,
    MatchResult,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    hash_bytes,
    hash_to_int64,
    hash_token_ids,
)
from pymllm.mem_cache import _radix_tree as rt
from pymllm.mem_cache.errors import (
    AllocatorStateError,
    InvalidFreeError,
    InvalidKeyError,
    InvalidValueError,
    LockStateError,
    NotInitializedError,
    ReentrantCallError,
    StaleNodeError,
)

N = 200  # calls per measured round
WARM = 50  # calls before the first round (caches of numpy and the interpreter fill up)
ROUNDS = 6  # a case passes when one round is clean
BLOCK_LIMIT = N // 4  # allocated blocks a clean round may gain
C_LIMIT = 16 * N  # C heap bytes a clean round may gain (a leaked malloc chunk is >= 32)
REF_LIMIT = N // 4  # references to an argument a clean round may gain


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------


_LIBC = ctypes.CDLL(None)  # malloc and free, for the test that leaks on purpose
_LIBC.malloc.restype = ctypes.c_void_p
_LIBC.malloc.argtypes = [ctypes.c_size_t]
_LIBC.free.argtypes = [ctypes.c_void_p]


def _refcounts(objs: tuple[Any, ...]) -> list[int]:
    """Reference counts of objs, read the same way before and after a round."""
    return [sys.getrefcount(o) for o in objs]


@dataclass
class Round:
    """What one measured round gained."""

    blocks: int
    c_bytes: int
    refs: list[int] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return (
            self.blocks < BLOCK_LIMIT
            and self.c_bytes < C_LIMIT
            and all(abs(r) < REF_LIMIT for r in self.refs)
        )


def _measure(step: Callable[[], object], watch: tuple[Any, ...], rounds: int) -> list[Round]:
    """Run step WARM times, then up to `rounds` rounds of N calls; stops at a clean one."""
    for _ in range(WARM):
        step()
    out = []
    # what exists now is frozen: each collection below walks only what the rounds made (a
    # walk of every object of pytest, hypothesis and numpy costs more than a round)
    gc.freeze()
    try:
        for _ in range(rounds):
            gc.collect()
            refs0 = _refcounts(watch)
            blocks0 = sys.getallocatedblocks()
            heap0 = heap_bytes_in_use()
            for _ in range(N):
                step()
            gc.collect()
            r = Round(
                sys.getallocatedblocks() - blocks0,
                heap_bytes_in_use() - heap0,
                [a - b for a, b in zip(_refcounts(watch), refs0, strict=True)],
            )
            out.append(r)
            if r.clean:
                break
    finally:
        gc.unfreeze()
    assert gc.isenabled(), "the garbage collector was left disabled"
    return out


def _raises(exc: type[BaseException], fn: Callable[..., object], *args: Any, **kw: Any):
    """A step that calls fn and requires it to raise exc (exactly that type or a subclass)."""

    def step() -> None:
        try:
            fn(*args, **kw)
        except exc:
            return
        raise AssertionError(f"{fn!r} did not raise {exc.__name__}")

    return step


def _steps(*steps: Callable[[], object]) -> Callable[[], None]:
    def step() -> None:
        for s in steps:
            s()

    return step


# ---------------------------------------------------------------------------------------
# Helpers: allocators and objects the caches call back into
# ---------------------------------------------------------------------------------------


class Boom(Exception):
    """Raised by the test's callbacks."""


class PyAlloc:
    """An allocator the caches do not book: its Python ``free`` (and ``free_swa``) runs, and
    raises Boom (a new one each time) while ``fail`` is set, or calls ``hook``."""

    def __init__(self) -> None:
        self.fail = False
        self.freed = 0
        self.hook: Callable[[], object] | None = None

    def free(self, indices: Any) -> None:
        self.freed += len(indices)
        if self.hook is not None:
            self.hook()
        if self.fail:
            raise Boom("free")

    def free_swa(self, indices: Any) -> None:
        self.free(indices)


class Tag:
    """An extra_key. Every Tag hashes alike, so a lookup next to another Tag runs
    ``__eq__``; ``hash_fail`` / ``eq_fail`` make them raise Boom (``eq_interrupt``:
    KeyboardInterrupt), and ``hook`` runs inside ``__hash__`` (``eq_hook`` inside
    ``__eq__``, on the Tag asked)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hash_fail = False
        self.eq_fail = False
        self.eq_interrupt = False
        self.hook: Callable[[], object] | None = None
        self.eq_hook: Callable[[], object] | None = None

    def __hash__(self) -> int:
        if self.hook is not None:
            self.hook()
        if self.hash_fail:
            raise Boom("hash")
        return 7

    def __eq__(self, other: object) -> bool:
        if self.eq_hook is not None:
            self.eq_hook()
        if self.eq_interrupt or getattr(other, "eq_interrupt", False):
            raise KeyboardInterrupt
        if self.eq_fail or getattr(other, "eq_fail", False):  # whichever side is asked
            raise Boom("eq")
        return isinstance(other, Tag) and other.name == self.name


class Idx:
    """A token (or KV index) read through ``__index__``, which raises Boom if ``bad``."""

    def __init__(self, v: int, bad: bool = False) -> None:
        self.v = v
        self.bad = bad

    def __index__(self) -> int:
        if self.bad:
            raise Boom("index")
        return self.v


class _Sink:
    """A stdout that keeps nothing (pretty_print's output)."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


_SINK = _Sink()


@contextlib.contextmanager
def _fuse(arm: Callable[[int], object], count: int) -> Iterator[None]:
    arm(count)
    try:
        yield
    finally:
        arm(-1)


def _armed(arm: Callable[[int], object], count: int, fn: Callable[..., object], *args: Any):
    """A step: arm a MemoryError test hook, call fn, require the MemoryError, disarm."""

    def step() -> None:
        with _fuse(arm, count):
            try:
                fn(*args)
            except MemoryError:
                return
        raise AssertionError(f"{fn!r} did not raise MemoryError with the hook at {count}")

    return step


def _ar(start: int, n: int, dtype: Any = np.int32) -> np.ndarray:
    return np.arange(start, start + n, dtype=dtype)


# ---------------------------------------------------------------------------------------
# The cases: name -> factory of (step, watched objects)
# ---------------------------------------------------------------------------------------

Case = tuple[Callable[[], object], tuple[Any, ...]]
CASES: dict[str, Callable[[], Case]] = {}


def case(name: str):
    def register(factory: Callable[[], Case]) -> Callable[[], Case]:
        assert name not in CASES, name
        CASES[name] = factory
        return factory

    return register


# Key kinds: tokens for positions [base, base + n) and the value the caches take for them.
class MyInt(int):
    """An int subclass: read by its value, through ``__index__``."""


class MyKey(RadixKey):
    """A RadixKey subclass: its fields are read by getattr."""

    __slots__ = ()


def _tokens(kind: str, base: int, n: int) -> Any:
    if kind == "list":
        return list(range(base, base + n))
    if kind == "np32":
        return _ar(base, n)
    if kind == "np64":
        return _ar(base, n, np.int64)
    if kind == "u64":
        return _ar(base, n, np.uint64)
    if kind == "npint_list":  # numpy ints in a list: read one by one through __index__
        return [np.int64(t) for t in range(base, base + n)]
    if kind == "tuple":  # bigram keys
        return [(t, t + 1) for t in range(base, base + n)]
    if kind == "tuple_of_ints":
        return tuple(range(base, base + n))
    if kind == "deque":  # read through numpy
        return deque(range(base, base + n))
    if kind == "big_list":  # ints past one 30-bit digit: the general int path
        return [(1 << 31) + t for t in range(base, base + n)]
    if kind == "intsub_list":
        return [MyInt(t) for t in range(base, base + n)]
    if kind == "index_list":
        return [Idx(t) for t in range(base, base + n)]
    if kind == "strided":  # not contiguous: copied
        return _ar(base, 2 * n)[::2]
    if kind == "swapped":  # big-endian int32: converted
        return _ar(base, n).astype(">i4")
    raise AssertionError(kind)


KEY_KINDS = ("list", "np32", "np64", "u64", "npint_list", "tuple")
MORE_KEY_KINDS = (
    "tuple_of_ints",
    "deque",
    "big_list",
    "intsub_list",
    "index_list",
    "strided",
    "swapped",
)

# Cache configurations: (cache kwargs, allocator factory); None: no allocator.
CONFIGS: dict[str, tuple[dict[str, Any], Callable[[], Any] | None]] = {
    "p1": ({}, lambda: TokenToKVPoolAllocator(1 << 12)),
    "p4": ({"page_size": 4}, lambda: TokenToKVPoolAllocator(1 << 12, page_size=4)),
    "p1_pyalloc": ({}, PyAlloc),
    "p1_noalloc": ({}, None),
    "swa": ({"sliding_window_size": 4}, lambda: SWATokenToKVPoolAllocator(1 << 12, 1 << 12)),
    "swa_p2": (
        {"page_size": 2, "sliding_window_size": 4},
        lambda: SWATokenToKVPoolAllocator(1 << 12, 1 << 12, page_size=2),
    ),
    "swa_pyalloc": ({"sliding_window_size": 4}, PyAlloc),
    "lfu": ({"eviction_policy": "lfu"}, lambda: TokenToKVPoolAllocator(1 << 12)),
    "priority": ({"eviction_policy": "priority"}, lambda: TokenToKVPoolAllocator(1 << 12)),
    "fifo": ({"eviction_policy": "fifo"}, lambda: TokenToKVPoolAllocator(1 << 12)),
    "slru": ({"eviction_policy": "slru"}, PyAlloc),
}


class _Slots:
    """Slot values for a key: from a booking allocator, else a counter of fresh numbers."""

    def __init__(self, alloc: Any) -> None:
        self.alloc = alloc
        self.next = 1

    def get(self, n: int, prefix: np.ndarray | None = None) -> np.ndarray:
        if isinstance(self.alloc, (TokenToKVPoolAllocator, SWATokenToKVPoolAllocator)):
            out = self.alloc.alloc(n, prefix=prefix)
            assert out is not None, "the allocator ran out: a step leaks slots"
            return out
        new = _ar(self.next, n)
        self.next = self.next % 100_000 + n
        return new if prefix is None else np.concatenate([prefix, new])

    def give_back(self, slots: np.ndarray) -> None:
        """Free slots the tree did not take (to a booking allocator; others keep no books)."""
        if len(slots) and isinstance(
            self.alloc, (TokenToKVPoolAllocator, SWATokenToKVPoolAllocator)
        ):
            self.alloc.free(slots)


def _radix(config: str, **extra: Any) -> tuple[RadixCache, Any, _Slots]:
    kwargs, make_alloc = CONFIGS[config]
    alloc = make_alloc() if make_alloc else None
    cache = RadixCache(token_to_kv_pool_allocator=alloc, **kwargs, **extra)
    return cache, alloc, _Slots(alloc)


def _insert_request(
    cache: RadixCache, slots: _Slots, key: RadixKey, priority: int = 0
) -> tuple[Any, np.ndarray]:
    """A request's insert as a scheduler makes it: match, allocate the rest, insert, free
    the duplicates the tree did not take. Returns (InsertResult, value)."""
    m = cache.match_prefix(key)
    n = len(key)
    value = slots.get(n - m.prefix_len, prefix=m.indices)
    if cache.sliding_window_size is not None:
        r = cache.insert(key, value, prev_prefix_len=m.prefix_len, priority=priority)
    else:
        r = cache.insert(key, value, priority=priority)
        slots.give_back(value[m.prefix_len : r.prefix_len])
    return r, value


def _churn_case(config: str, kind: str, key_type: type[RadixKey] = RadixKey) -> Case:
    """Every entry point once per step on a tree that ends the step empty: insert (a new
    leaf, another namespace), hash, match (hit, split), lock, SWA eviction under the lock,
    children, node reads, unlock, evict everything."""
    on_evict_seen: list[int] = []

    def on_evict(uid: int) -> None:
        on_evict_seen.append(uid)
        on_evict_seen.clear()

    cache, _alloc, slots = _radix(config, on_node_evict=on_evict)
    ps = cache.page_size
    tag = Tag("ns")
    toks = _tokens(kind, 10, 8 * ps)
    key = key_type(toks, tag)
    half = key_type(_tokens(kind, 10, 4 * ps), tag)
    other = key_type(_tokens(kind, 500, 2 * ps), "other")
    swa = cache.sliding_window_size is not None

    def step() -> None:
        r, _ = _insert_request(cache, slots, key, priority=3)
        _insert_request(cache, slots, other)
        cache.compute_node_hash(r.last_node)  # cached, then split with the node
        m = cache.match_prefix(half)  # splits the leaf
        assert m.prefix_len == 4 * ps
        token = cache.inc_lock_ref(r.last_node)
        if swa:
            cache.evict(0, 1 << 30)  # tombstones what the SWA lock does not cover
        cache.compute_node_hash(r.last_node)
        cache.children(m.last_node)
        node = r.last_node
        _ = (node.key, node.value, node.parent, node.lock_ref, node.hit_count, repr(node))
        _ = (node.swa_tombstone, node.swa_lock_ref, node.last_access_time, hash(node))
        _ = (cache.evictable_size(), cache.protected_size(), cache.total_size())
        _ = (cache.swa_evictable_size(), cache.swa_protected_size(), cache.root_node)
        cache._nodes()
        if swa:
            cache.dec_lock_ref(r.last_node, token)
        else:
            cache.dec_lock_ref(r.last_node)
        cache.evict(1 << 30)
        assert cache.total_size() == 0
        assert node.evicted

    watch = (key, toks, tag, on_evict, half)
    if isinstance(toks, list):
        watch += tuple(t for t in toks if isinstance(t, (Idx, MyInt)))[:2]
    return step, watch


for _config in CONFIGS:
    for _kind in KEY_KINDS:
        if _kind == "tuple" and _config.startswith("swa"):
            continue  # swa-tuple below
        case(f"churn[{_config}-{_kind}]")(lambda c=_config, k=_kind: _churn_case(c, k))
for _config in ("p1", "p4", "swa"):
    for _kind in MORE_KEY_KINDS:
        case(f"churn[{_config}-{_kind}]")(lambda c=_config, k=_kind: _churn_case(c, k))
case("churn[p1-key_subclass]")(lambda: _churn_case("p1", "list", MyKey))
case("churn[swa-tuple]")(lambda: _churn_case("swa", "tuple"))


def _hit_case(config: str, kind: str) -> Case:
    cache, _alloc, slots = _radix(config)
    ps = cache.page_size
    toks = _tokens(kind, 10, 6 * ps)
    key = RadixKey(toks, "ns")
    _r, value = _insert_request(cache, slots, key)
    return (lambda: cache.match_prefix(key)), (key, toks, value)


for _config in ("p1", "p4", "swa"):
    for _kind in KEY_KINDS:
        case(f"match_hit[{_config}-{_kind}]")(lambda c=_config, k=_kind: _hit_case(c, k))


@case("insert_again[p1]")
def _insert_again() -> Case:
    cache, _alloc, slots = _radix("p1")
    toks = list(range(1, 9))
    key = RadixKey(toks)
    _r, value = _insert_request(cache, slots, key)
    return (lambda: cache.insert(key, value)), (key, toks, value)


@case("insert_again[swa_pyalloc]")
def _insert_again_swa() -> Case:
    cache, _alloc, slots = _radix("swa_pyalloc")
    toks = list(range(1, 9))
    key = RadixKey(toks)
    _r, value = _insert_request(cache, slots, key)
    return (lambda: cache.insert(key, value, prev_prefix_len=8)), (key, toks, value)


@case("insert_value_none[p1]")
def _insert_value_none() -> Case:
    cache = RadixCache()
    toks = list(range(1, 9))
    key = RadixKey(toks)

    def step() -> None:
        cache.insert(key)
        cache.evict(100)

    return step, (key, toks)


@case("insert_list_value[p1]")
def _insert_list_value() -> Case:
    cache = RadixCache(token_to_kv_pool_allocator=PyAlloc())
    toks = list(range(1, 9))
    key = RadixKey(toks)
    value = [Idx(v) for v in range(1, 9)]  # read through __index__

    def step() -> None:
        cache.insert(key, value)
        cache.evict(100)

    return step, (key, toks, value, value[0])


_VALUE_FORMS: dict[str, Callable[[], Any]] = {
    "big_ints": lambda: [(1 << 30) + v for v in range(8)],  # past one 30-bit digit
    "intsub": lambda: [MyInt(v) for v in range(1, 9)],
    "tuple": lambda: tuple(range(1, 9)),
    "int64": lambda: _ar(1, 8, np.int64),
    "uint64": lambda: _ar(1, 8, np.uint64),
    "strided": lambda: _ar(1, 16)[::2],
    "swapped": lambda: _ar(1, 8).astype(">i4"),
    "npint_list": lambda: [np.int32(v) for v in range(1, 9)],
}

for _name, _make_value in _VALUE_FORMS.items():

    def _value_form(make_value: Callable[[], Any] = _make_value) -> Case:
        cache = RadixCache(token_to_kv_pool_allocator=PyAlloc())
        key = RadixKey(list(range(1, 9)))
        value = make_value()

        def step() -> None:
            cache.insert(key, value)
            cache.evict(100)

        return step, (key, value)

    case(f"insert_value_form[{_name}]")(_value_form)


@case("swa_tombstones[swa_pyalloc]")
def _swa_tombstones() -> Case:
    """A windowed insert with swa_evicted_seqlen (a tombstone), its revival, SWA evict."""
    alloc = PyAlloc()
    cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=alloc)
    toks = list(range(1, 17))
    key = RadixKey(toks)
    value = _ar(1, 16)

    def step() -> None:
        node = cache.insert(key, value, swa_evicted_seqlen=8).last_node  # [0, 8) tombstone
        token = cache.inc_lock_ref(node)  # stops at the tombstone: boundary 8
        assert token == 8
        cache.match_prefix(key)
        cache.insert(key, _ar(100, 16), prev_prefix_len=0)  # the locked tombstone stays
        cache.dec_lock_ref(node, token)
        cache.insert(key, _ar(200, 16), prev_prefix_len=0)  # revives it
        cache.evict(0, 1 << 30)  # tombstones the rest
        cache.match_prefix(RadixKey(toks[:12]))
        cache.evict(1 << 30)
        assert cache.total_size() == 0

    return step, (key, toks, value)


@case("swa_tombstones[swa]")
def _swa_tombstones_booked() -> Case:
    """As above over the package's SWA allocator: the revived tombstone's own slots and
    the duplicates are freed by the tree, in C."""
    alloc = SWATokenToKVPoolAllocator(1 << 10, 1 << 10)
    toks = list(range(1, 17))
    key = RadixKey(toks)

    def step() -> None:
        cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=alloc)
        cache.insert(key, alloc.alloc(16), swa_evicted_seqlen=8)
        cache.insert(key, alloc.alloc(16), prev_prefix_len=0)  # revives [0, 8)
        cache.evict(0, 1 << 30)
        cache.evict(1 << 30)
        assert alloc.available_size() == 1 << 10

    return step, (alloc, key, toks)


@case("swa_lock_boundary[swa]")
def _swa_lock_boundary() -> Case:
    cache, _alloc, slots = _radix("swa")
    toks = list(range(1, 17))
    key = RadixKey(toks)
    _insert_request(cache, slots, RadixKey(toks[:8]))
    r, _ = _insert_request(cache, slots, key)
    node = r.last_node

    def step() -> None:
        token = cache.inc_lock_ref(node)
        cache.dec_lock_ref(node, swa_boundary_id=token)

    return step, (key, node)


@case("reset[p1]")
def _reset() -> Case:
    cache, _alloc, slots = _radix("p1")
    key = RadixKey(list(range(1, 9)))

    def step() -> None:
        _insert_request(cache, slots, key)
        cache.reset()

    return step, (key, cache)


@case("reset[p1_pyalloc]")
def _reset_pyalloc() -> Case:
    alloc = PyAlloc()
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    key = RadixKey(list(range(1, 9)))

    def step() -> None:
        cache.insert(key, _ar(1, 8))
        cache.reset()

    return step, (key, alloc)


@case("pretty_print[p1]")
def _pretty_print() -> Case:
    cache, _alloc, slots = _radix("p1")
    _insert_request(cache, slots, RadixKey(list(range(1, 9)), "x"))
    _insert_request(cache, slots, RadixKey(list(range(1, 5))))

    def step() -> None:
        with contextlib.redirect_stdout(_SINK):  # type: ignore[type-var]
            cache.pretty_print()

    return step, (cache,)


@case("check_invariants[swa]")
def _check_invariants() -> Case:
    cache, _alloc, slots = _radix("swa")
    _insert_request(cache, slots, RadixKey(list(range(1, 9))))
    return cache._check_invariants, (cache,)


@case("make_and_drop[p1]")
def _make_and_drop() -> Case:
    """Caches made, filled and dropped (their finalizer and dealloc hand slots back)."""
    alloc = TokenToKVPoolAllocator(1 << 10)
    key = RadixKey(list(range(1, 9)))

    def step() -> None:
        cache = RadixCache(token_to_kv_pool_allocator=alloc)
        cache.insert(key, alloc.alloc(8))
        cache.match_prefix(RadixKey([1, 2, 3]))
        del cache
        assert alloc.available_size() == 1 << 10

    return step, (alloc, key)


@case("make_and_drop[pyalloc-cycle]")
def _make_and_drop_cycle() -> Case:
    """A cache in a reference cycle with its owner (the collector frees it)."""
    alloc = PyAlloc()
    key = RadixKey(list(range(1, 9)))

    class Owner:
        def on_evict(self, uid: int) -> None:
            pass

    def step() -> None:
        owner = Owner()
        owner.cache = RadixCache(token_to_kv_pool_allocator=alloc, on_node_evict=owner.on_evict)
        owner.node = owner.cache.insert(key, _ar(1, 8)).last_node
        del owner

    return step, (alloc, key)


@case("make_and_drop[locked-request-cycle]")
def _make_and_drop_locked() -> Case:
    """A cache over a Python allocator dropped in a cycle with a request that holds a lock
    and unlocks it in ``__del__`` (whichever finalizer runs first)."""
    alloc = PyAlloc()
    key = RadixKey(list(range(1, 9)))

    class Request:
        def on_evict(self, uid: int) -> None:
            pass

        def __del__(self) -> None:
            self.cache.dec_lock_ref(self.node)

    def step() -> None:
        req = Request()
        req.cache = RadixCache(token_to_kv_pool_allocator=alloc, on_node_evict=req.on_evict)
        req.node = req.cache.insert(key, _ar(1, 8)).last_node
        req.cache.inc_lock_ref(req.node)
        del req

    return step, (alloc, key)


@case("make_and_drop[mamba]")
def _make_and_drop_mamba() -> Case:
    alloc = TokenToKVPoolAllocator(1 << 10)
    pool = TokenToKVPoolAllocator(64)
    key = RadixKey(list(range(1, 9)))

    def step() -> None:
        cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
        cache.insert(key, alloc.alloc(8), mamba_value=pool.alloc(1))
        del cache
        assert alloc.available_size() == 1 << 10 and pool.available_size() == 64

    return step, (alloc, pool, key)


class FakeMambaPool:
    """A state pool with a ``slot_allocator`` (as ``MambaPool``): the tree books its states
    in that allocator."""

    def __init__(self) -> None:
        self.slot_allocator = TokenToKVPoolAllocator(64)

    def free(self, slots: Any) -> None:
        self.slot_allocator.free(slots)


@case("make_and_drop[mamba-slot_allocator]")
def _make_and_drop_mamba_pool() -> Case:
    alloc = TokenToKVPoolAllocator(1 << 10)
    pool = FakeMambaPool()
    states = pool.slot_allocator
    key = RadixKey(list(range(1, 9)))

    def step() -> None:
        cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
        cache.insert(key, alloc.alloc(8), mamba_value=states.alloc(1))
        value = alloc.alloc(1, prefix=cache.match_prefix(key).indices)
        cache.insert(RadixKey([*key.token_ids, 9]), value, mamba_value=states.alloc(1))
        cache.evict(0, mamba_num=1)
        del cache
        assert states.available_size() == 64

    return step, (alloc, pool, states, key)


def _drop_out_of_memory(mamba: bool) -> Case:
    """The finalizer cannot reset the cache (its buffer cannot grow): the deallocation
    hands the slots and states back node by node, through the Python free."""
    alloc = PyAlloc()
    pool = PyAlloc()
    key = RadixKey(list(range(1, 9)))

    def step() -> None:
        cache: Any
        if mamba:
            cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
            cache.insert(key, _ar(1, 8), mamba_value=3)
        else:
            cache = RadixCache(token_to_kv_pool_allocator=alloc)
            cache.insert(key, _ar(1, 8))
        before = alloc.freed
        with _fuse(rt._fail_scratch_growth_after, 0):
            del cache
        assert alloc.freed == before + 8

    return step, (alloc, pool, key)


case("make_and_drop[finalizer-out-of-memory]")(lambda: _drop_out_of_memory(False))
case("make_and_drop[mamba-finalizer-out-of-memory]")(lambda: _drop_out_of_memory(True))


@case("fail_storage_init[mamba-reset-then-init]")
def _storage_reset_mamba() -> Case:
    alloc = TokenToKVPoolAllocator(64)
    pool = FakeMambaPool()
    key = RadixKey([1, 2, 3])

    def step() -> None:
        cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
        cache.insert(key, alloc.alloc(3), mamba_value=pool.slot_allocator.alloc(1))
        with _fuse(rt._fail_next_storage_inits, 1):
            try:
                cache.reset()
            except MemoryError:
                pass
            else:
                raise AssertionError("no MemoryError")
        cache.__init__(1, alloc, pool)  # type: ignore[misc]
        cache.insert(key, alloc.alloc(3), mamba_value=pool.slot_allocator.alloc(1))

    return step, (alloc, pool, pool.slot_allocator, key)


@case("node_misc[p1]")
def _node_misc() -> Case:
    cache, _a, slots = _radix("p1")
    node = _insert_request(cache, slots, RadixKey([1, 2, 3]))[0].last_node
    stale = _insert_request(cache, slots, RadixKey([7, 8]))[0].last_node
    cache.evict(1 << 30)
    node = _insert_request(cache, slots, RadixKey([1, 2, 3]))[0].last_node
    root = cache.root_node
    other = object()

    def step() -> None:
        _ = (node == other, node == root, node != stale, repr(stale), repr(root), stale.id)
        _ = (root.key, root.value, root.parent, cache.compute_node_hash(root))
        cache.evict(-5)

    return step, (node, stale, root, other)


@case("evict_callback_other_cache[p1]")
def _callback_other_cache() -> Case:
    """A callback calls another cache (allowed) and switches the collector off and on:
    it is on again once the outermost call returns."""
    other = RadixCache()
    probe = RadixKey([1, 2])

    def on_evict(uid: int) -> None:
        other.match_prefix(probe)
        other.insert(probe)
        gc.disable()
        other.evict(10)

    cache = RadixCache(on_node_evict=on_evict)
    key = RadixKey([5, 6, 7])

    def step() -> None:
        cache.insert(key)
        cache.evict(10)
        assert gc.isenabled()

    return step, (key, probe, on_evict, other)


@case("threads_wait_their_turn[p1]")
def _threads() -> Case:
    """Another thread's calls (a query, a public call) wait while this thread's evict runs
    its callback."""
    inside = threading.Event()
    started = threading.Event()
    probe = RadixKey([5, 6])

    def on_evict(uid: int) -> None:
        inside.set()
        started.wait(1)
        time.sleep(0.0002)  # the other thread is now waiting

    cache = RadixCache(on_node_evict=on_evict)
    key = RadixKey([5, 6, 7])
    seen: list[Any] = []

    def other() -> None:
        inside.wait(1)
        started.set()
        seen.append(cache.total_size())
        seen.append(cache.match_prefix(probe).prefix_len)

    def step() -> None:
        inside.clear()
        started.clear()
        cache.insert(key)
        t = threading.Thread(target=other)
        t.start()
        cache.evict(10)
        t.join()
        assert seen == [0, 0]
        seen.clear()

    return step, (key, probe, on_evict)


@case("fail_results_after[root_node]")
def _results_root() -> Case:
    cache = RadixCache()
    return _armed(rt._fail_results_after, 0, lambda: cache.root_node), (cache,)


@case("lock_root[p1-swa-mamba]")
def _lock_root() -> Case:
    caches = [RadixCache(), RadixCache(sliding_window_size=4), MambaRadixCache()]
    roots = [c.root_node for c in caches]

    def step() -> None:
        for c, root in zip(caches, roots, strict=True):
            c.dec_lock_ref(root, c.inc_lock_ref(root))

    return step, (*roots,)


class Donated:
    """A jax array an update donated: reading it raises RuntimeError, ``is_deleted()``
    says why (or raises, when ``broken``)."""

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise RuntimeError("Array has been deleted")

    def is_deleted(self) -> bool:
        if self.broken:
            raise Boom("is_deleted")
        return True


for _name, (_exc, _call) in {
    "key": (InvalidKeyError, lambda c, d: c.match_prefix(RadixKey(d))),
    "key_broken": (RuntimeError, lambda c, d: c.match_prefix(RadixKey(d))),
    "value": (InvalidValueError, lambda c, d: c.insert(RadixKey([1, 2]), d)),
    "mamba_value": (InvalidValueError, lambda c, d: c.insert(RadixKey([1, 2]), None, d)),
    "free": (InvalidValueError, lambda c, d: TokenToKVPoolAllocator(8).free(d)),
}.items():

    def _donated(exc: type[BaseException] = _exc, call: Any = _call, name: str = _name):
        cache = MambaRadixCache()
        d = Donated(broken=name.endswith("broken"))
        return _raises(exc, call, cache, d), (cache, d)

    case(f"donated_array[{_name}]")(_donated)


# -- RadixCache: refused input --------------------------------------------------------


def _err_cache(config: str = "p1") -> tuple[RadixCache, Any, _Slots, RadixKey, np.ndarray]:
    cache, alloc, slots = _radix(config)
    key = RadixKey(list(range(1, 9)), Tag("a"))
    _r, value = _insert_request(cache, slots, key)
    return cache, alloc, slots, key, value


_BAD_KEYS: dict[str, tuple[type[BaseException], Callable[[], Any]]] = {
    "not_a_radixkey": (TypeError, lambda: [1, 2, 3]),
    "negative_token": (InvalidKeyError, lambda: RadixKey([1, 2, -3])),
    "token_2_32": (InvalidKeyError, lambda: RadixKey([1, 2, 1 << 32])),
    "huge_token": (InvalidKeyError, lambda: RadixKey([1, 1 << 100])),
    "float_token": (InvalidKeyError, lambda: RadixKey([1, 2.0])),
    "str_token": (InvalidKeyError, lambda: RadixKey([1, "2"])),
    "bool_token": (InvalidKeyError, lambda: RadixKey([1, True])),
    "index_raises": (Boom, lambda: RadixKey([1, Idx(2, bad=True)])),
    "mixed_arities": (InvalidKeyError, lambda: RadixKey([(1, 2), (3, 4, 5)])),
    "tuple_then_int": (InvalidKeyError, lambda: RadixKey([(1, 2), 3])),
    "int_then_tuple": (InvalidKeyError, lambda: RadixKey([1, (2, 3)])),
    "empty_tuple": (InvalidKeyError, lambda: RadixKey([(), ()])),
    "bad_tuple_elem": (InvalidKeyError, lambda: RadixKey([(1, 2), (3, -4)])),
    "array_2d": (InvalidKeyError, lambda: RadixKey(np.ones((2, 2), dtype=np.int32))),
    "array_float": (InvalidKeyError, lambda: RadixKey(np.ones(3))),
    "array_negative": (InvalidKeyError, lambda: RadixKey(np.array([1, -2], dtype=np.int32))),
    "array_i64_big": (InvalidKeyError, lambda: RadixKey(np.array([1, 1 << 40]))),
    "array_u64_big": (InvalidKeyError, lambda: RadixKey(np.array([1, 1 << 40], np.uint64))),
    "unhashable_extra": (TypeError, lambda: RadixKey([1, 2], extra_key=[1])),
    "extra_hash_raises": (Boom, lambda: _failing_tag("hash")),
    "extra_eq_raises": (Boom, lambda: _failing_tag("eq")),
    "ragged_object": (InvalidKeyError, lambda: RadixKey(_Ragged())),
}


class _Ragged:
    """A token sequence numpy cannot read as one array."""

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise ValueError("ragged")


def _failing_tag(how: str) -> RadixKey:
    tag = Tag("a" if how == "hash" else "b")  # "b": a Tag("a") is there, __eq__ runs
    if how == "hash":
        tag.hash_fail = True
    else:
        tag.eq_fail = True
    return RadixKey(list(range(1, 9)), tag)


for _name, (_exc, _make_key) in _BAD_KEYS.items():

    def _bad_match(exc: type[BaseException] = _exc, make_key: Callable[[], Any] = _make_key):
        cache, _a, _s, _k, _v = _err_cache()
        bad = make_key()
        toks = getattr(bad, "token_ids", bad)
        return _raises(exc, cache.match_prefix, bad), (bad, toks, cache)

    def _bad_insert(exc: type[BaseException] = _exc, make_key: Callable[[], Any] = _make_key):
        cache, _a, _s, _k, _v = _err_cache()
        bad = make_key()
        toks = getattr(bad, "token_ids", bad)
        value = _ar(900, len(toks) if isinstance(toks, list) else 2)
        return _raises(exc, cache.insert, bad, value), (bad, toks, value, cache)

    case(f"match_bad_key[{_name}]")(_bad_match)
    case(f"insert_bad_key[{_name}]")(_bad_insert)


_BAD_VALUES: dict[str, tuple[type[BaseException], Callable[[], Any]]] = {
    "too_short": (InvalidValueError, lambda: _ar(100, 3)),
    "too_long": (InvalidValueError, lambda: _ar(100, 9)),
    "list_too_short": (InvalidValueError, lambda: [100, 101]),
    "negative": (InvalidValueError, lambda: np.array([100, 101, -1, 103], np.int32)),
    "over_int32": (InvalidValueError, lambda: np.array([100, 101, 1 << 31, 103])),
    "u64_big": (InvalidValueError, lambda: np.array([100, 101, 1 << 40, 103], np.uint64)),
    "float": (InvalidValueError, lambda: np.ones(4)),
    "list_float": (InvalidValueError, lambda: [100, 101, 1.5, 103]),
    "list_negative": (InvalidValueError, lambda: [100, 101, -5, 103]),
    "list_bool": (InvalidValueError, lambda: [100, 101, True, 103]),
    "list_index_raises": (Boom, lambda: [100, 101, Idx(5, bad=True), 103]),
    "array_2d": (InvalidValueError, lambda: np.ones((2, 2), np.int32)),
    "unreadable": (InvalidValueError, lambda: object()),
    "none_for_tuples": (InvalidValueError, None),
}


for _name, (_exc, _make_value) in _BAD_VALUES.items():

    def _bad_value(exc: type[BaseException] = _exc, make_value: Any = _make_value):
        cache, _a, _s, _k, _v = _err_cache()
        if make_value is None:
            key = RadixKey([(1, 2), (3, 4), (5, 6), (7, 8)])
            value = None
        else:
            key = RadixKey([40, 41, 42, 43], Tag("a"))
            value = make_value()
        return _raises(exc, cache.insert, key, value), (key, key.token_ids, value, cache)

    case(f"insert_bad_value[{_name}]")(_bad_value)


class Shrinker:
    """A token (or index) whose ``__index__`` empties the list it is read from."""

    def __init__(self, seq: list[Any]) -> None:
        self.seq = seq

    def __index__(self) -> int:
        del self.seq[1:]
        return 1


def _mutated_case(where: str, tuple_tokens: bool) -> Case:
    cache, _a, _s, _k, _v = _err_cache()
    seq: list[Any] = []

    def refill() -> None:
        seq.clear()
        if tuple_tokens:
            seq.extend([(1, 2), (Shrinker(seq), 3), (4, 5)])
        else:
            seq.extend([1, Shrinker(seq), 3])

    def call() -> None:
        refill()
        if where == "key":
            cache.match_prefix(RadixKey(seq))
        else:
            cache.insert(RadixKey([1, 2, 3]), seq)

    exc = InvalidKeyError if where == "key" else InvalidValueError
    return _raises(exc, call), (seq, cache)


case("list_changed_while_read[key]")(lambda: _mutated_case("key", False))
case("list_changed_while_read[tuple_key]")(lambda: _mutated_case("key", True))
case("list_changed_while_read[value]")(lambda: _mutated_case("value", False))


@case("key_slot_deleted[p1]")
def _key_slot_deleted() -> Case:
    cache, _a, _s, _k, _v = _err_cache()
    key = RadixKey([1, 2, 3])
    del key.extra_key
    return _steps(
        _raises(AttributeError, cache.match_prefix, key),
        _raises(AttributeError, cache.insert, key),
    ), (key, cache)


@case("insert_bad_arg[ppl_new_namespace]")
def _ppl_new_ns() -> Case:
    cache, _a, slots, _k, _v = _err_cache("swa")
    key = RadixKey([1, 2, 3, 4], Tag("new"))
    value = slots.get(4)
    return _raises(InvalidValueError, cache.insert, key, value, 2), (key, value)


for _es in (0, 2):

    def _swa_new_ns_refused(es: int = _es) -> Case:
        """A new namespace's slots are refused (never allocated): its blocks (a tombstone's
        too, with swa_evicted_seqlen) go back, no namespace is taken."""
        cache, _a, _s, _k, _v = _err_cache("swa")
        key = RadixKey([1, 2, 3, 4], Tag("new"))
        value = _ar(3000, 4)
        call = _raises(InvalidValueError, cache.insert, key, value, 0, es)
        return call, (key, value, key.extra_key)

    case(f"insert_booked_free_slot[swa-new-ns-es{_es}]")(_swa_new_ns_refused)


@case("insert_late_errors_both[p1]")
def _insert_late_errors() -> Case:
    """A bad extra_key (kept for later) and then a bad value: the value's error wins."""
    cache, _a, _s, _k, _v = _err_cache()
    key = _failing_tag("hash")
    value = _ar(1, 3)
    return _raises(InvalidValueError, cache.insert, key, value), (key, key.extra_key, value)


_BAD_INSERT_ARGS: dict[str, tuple[str, type[BaseException], dict[str, Any]]] = {
    "priority_float": ("p1", TypeError, {"priority": 1.5}),
    "priority_bool": ("p1", TypeError, {"priority": True}),
    "priority_2_64": ("p1", InvalidValueError, {"priority": 1 << 64}),
    "priority_index_raises": ("p1", Boom, {"priority": Idx(1, bad=True)}),
    "unknown_kwarg": ("p1", TypeError, {"bogus": 1}),
    "ppl_not_a_page": ("swa_p2", InvalidValueError, {"prev_prefix_len": 3}),
    "ppl_past_key": ("swa", InvalidValueError, {"prev_prefix_len": 99}),
    "ppl_negative": ("swa", InvalidValueError, {"prev_prefix_len": -1}),
    "ppl_float": ("swa", TypeError, {"prev_prefix_len": 1.0}),
    "ppl_uncached": ("swa", InvalidValueError, {"prev_prefix_len": 6}),
    "evicted_seqlen_str": ("swa", TypeError, {"swa_evicted_seqlen": "1"}),
}

for _name, (_config, _exc, _kw) in _BAD_INSERT_ARGS.items():

    def _bad_args(config: str = _config, exc: type[BaseException] = _exc, kw: Any = _kw):
        cache, _a, _s, key, _value = _err_cache(config)
        longer = RadixKey([*key.token_ids[:4], 77, 78, 79, 80], key.extra_key)
        args = tuple(kw.values())
        return _raises(exc, cache.insert, longer, _ar(3000, 8), **kw), (longer, cache, *args)

    case(f"insert_bad_arg[{_name}]")(_bad_args)


@case("insert_booked_free_slot[p1]")
def _insert_booked_free_slot() -> Case:
    cache, alloc, _s, _key, _v = _err_cache()
    free_slots = _ar(1000, 4)  # never allocated
    k = RadixKey([60, 61, 62, 63])
    assert not alloc.is_allocated(free_slots).any()
    return _raises(InvalidValueError, cache.insert, k, free_slots), (k, free_slots)


@case("insert_booked_cached_slot[p1]")
def _insert_booked_cached_slot() -> Case:
    cache, _alloc, _s, _key, value = _err_cache()
    k = RadixKey([60, 61, 62, 63, 64, 65, 66, 67])
    return _raises(InvalidValueError, cache.insert, k, value), (k, value)


@case("insert_booked_listed_twice[p1-new-ns]")
def _insert_booked_twice() -> Case:
    cache, _alloc, slots, _key, _v = _err_cache()
    s = slots.get(1)
    value = np.array([s[0], s[0]], np.int32)
    k = RadixKey([60, 61], Tag("fresh"))  # a new namespace: the slots are taken first
    return _raises(InvalidValueError, cache.insert, k, value), (k, value, k.extra_key)


@case("insert_booked_not_one_page[p4]")
def _insert_not_one_page() -> Case:
    cache, _alloc, slots, _key, _v = _err_cache("p4")
    s = slots.get(8)
    value = np.concatenate([s[4:], s[:4]])[[0, 1, 2, 4, 3, 5, 6, 7]]
    k = RadixKey(list(range(300, 308)))
    return _raises(InvalidValueError, cache.insert, k, value), (k, value)


@case("insert_swa_booked_duplicate_refused[swa]")
def _insert_swa_dup_refused() -> Case:
    """The duplicates a windowed insert frees are refused (not the caller's): nothing
    changes, every block allocated for the insert goes back."""
    cache, alloc, slots = _radix("swa")
    toks = list(range(1, 9))
    _r, _value = _insert_request(cache, slots, RadixKey(toks))
    longer = RadixKey([*toks, 9, 10, 11, 12])
    bad = np.concatenate([_ar(2000, 8), slots.get(4)])  # 2000..: never allocated
    assert not alloc.is_allocated(bad[:8]).any()
    return _raises(InvalidFreeError, cache.insert, longer, bad), (longer, bad)


@case("insert_swa_free_raises[swa_pyalloc]")
def _insert_swa_free_raises() -> Case:
    alloc = PyAlloc()
    cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=alloc)
    toks = list(range(1, 9))
    cache.insert(RadixKey(toks), _ar(1, 8))
    longer = RadixKey([*toks, 9, 10, 11, 12])
    value = _ar(500, 12)  # 500..507 duplicate the cached 1..8: freed, and free raises
    alloc.fail = True
    return _raises(Boom, cache.insert, longer, value), (longer, value, alloc)


@case("insert_swa_nothing_cached[swa_pyalloc-new-ns]")
def _insert_swa_nothing() -> Case:
    """A new namespace whose suffix lies below swa_evicted_seqlen: freed, no namespace."""
    alloc = PyAlloc()
    cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=alloc)
    tag = Tag("t")
    key = RadixKey(list(range(1, 9)), tag)
    value = _ar(1, 8)

    def step() -> None:
        r = cache.insert(key, value, swa_evicted_seqlen=8)
        assert r.prefix_len == 0 and cache.total_size() == 0

    return step, (key, tag, value)


def _intern_fails(config: str, fail: str, reuse: bool) -> Case:
    """A new namespace whose registration fails, with a free namespace id to reuse or
    not. ``fail="hash2"``: the extra_key's second hash raises (the first is the look-up
    made before the value is read, the second the registration's key, which serves both
    its look-up and its store). ``fail="eq3"``: another Tag's namespace is registered
    (every Tag hashes alike, so each registry access compares the two) and the third
    ``__eq__`` raises: the store's, after both look-ups found nothing. That Tag is
    registered (and its node locked) before the namespace that is dropped, so that the
    dropped one's id is still free when the failing registration runs; the step checks
    that the registry's ids (in all, free, registered) are as they were."""
    cache, _alloc, slots = _radix(config)
    tag = Tag("fresh")
    calls = [0]
    held = 0
    other = Tag("other")
    if fail == "eq3":
        r, _value = _insert_request(cache, slots, RadixKey([1, 2], other))
        cache.inc_lock_ref(r.last_node)  # stays through the evict below
        held = cache.total_size()
    if reuse:  # a namespace made and dropped: its id is free
        _insert_request(cache, slots, RadixKey([1, 2], "gone"))
        cache.evict(1 << 30)
    ids = rt._namespace_ids(cache)
    assert ids[1] == (1 if reuse else 0), ids  # a free id to reuse, or none

    def hook() -> None:
        calls[0] += 1
        if fail == "hash2":
            tag.hash_fail = calls[0] == 2
        else:
            tag.eq_fail = calls[0] == 3

    if fail == "hash2":
        tag.hook = hook
    else:  # the registry asks the Tag it holds: other == tag
        other.eq_hook = hook
    key = RadixKey(list(range(100, 108)), tag)
    value = slots.get(8)

    def step() -> None:
        calls[0] = 0
        tag.hash_fail = tag.eq_fail = False
        try:
            cache.insert(key, value)
        except Boom:
            assert calls[0] == int(fail[-1])
            assert cache.total_size() == held
            assert rt._namespace_ids(cache) == ids
            cache._check_invariants()
            return
        raise AssertionError("no Boom")

    return step, (key, tag, value, hook)


for _config in ("p1", "p1_pyalloc", "swa", "swa_pyalloc"):
    for _reuse in (False, True):
        case(f"extra_key_hash_raises_on_intern[{_config}-reuse{int(_reuse)}]")(
            lambda c=_config, r=_reuse: _intern_fails(c, "hash2", r)
        )
        case(f"extra_key_eq_raises_on_intern_store[{_config}-reuse{int(_reuse)}]")(
            lambda c=_config, r=_reuse: _intern_fails(c, "eq3", r)
        )


@case("extra_key_reentrant_hash[p1]")
def _reentrant_hash() -> Case:
    cache, _alloc, _slots, _k, _v = _err_cache()
    tag = Tag("fresh")
    probe = RadixKey([1])
    tag.hook = lambda: cache.match_prefix(probe)
    key = RadixKey(list(range(100, 104)), tag)
    return _raises(ReentrantCallError, cache.match_prefix, key), (key, tag, probe)


# -- RadixCache: locks, handles ----------------------------------------------------------


@case("dec_unlocked[p1]")
def _dec_unlocked() -> Case:
    cache, _a, _s, key, _v = _err_cache()
    node = cache.match_prefix(key).last_node
    return _raises(LockStateError, cache.dec_lock_ref, node), (node, cache)


@case("dec_unlocked_ancestor[p1]")
def _dec_unlocked_ancestor() -> Case:
    """Locked node; the caller unlocks its ancestor, which holds only the node's lock."""
    cache, _a, slots, key, _v = _err_cache()
    _insert_request(cache, slots, RadixKey([*key.token_ids, 9, 10], key.extra_key))
    child = cache.match_prefix(RadixKey([*key.token_ids, 9, 10], key.extra_key)).last_node
    parent = child.parent
    cache.inc_lock_ref(child)
    return _raises(LockStateError, cache.dec_lock_ref, parent), (child, parent)


@case("dec_swa_bad_boundary[swa]")
def _dec_swa_bad_boundary() -> Case:
    cache, _a, _s, key, _v = _err_cache("swa")
    node = cache.match_prefix(key).last_node
    cache.inc_lock_ref(node)
    return _raises(LockStateError, cache.dec_lock_ref, node, 3), (node,)


@case("dec_swa_boundary_not_int[swa]")
def _dec_swa_boundary_type() -> Case:
    cache, _a, _s, key, _v = _err_cache("swa")
    node = cache.match_prefix(key).last_node
    cache.inc_lock_ref(node)
    boundary = "x"
    return _raises(TypeError, cache.dec_lock_ref, node, boundary), (node, boundary)


@case("dec_unknown_kwarg[p1]")
def _dec_kwarg() -> Case:
    cache, _a, _s, key, _v = _err_cache()
    node = cache.match_prefix(key).last_node
    return _raises(TypeError, cache.dec_lock_ref, node, bogus=1), (node,)


def _stale(config: str = "p1") -> tuple[RadixCache, Any]:
    cache, _a, slots = _radix(config)
    node = _insert_request(cache, slots, RadixKey([5, 6, 7]))[0].last_node
    cache.evict(1 << 30)
    assert node.evicted
    _insert_request(cache, slots, RadixKey([5, 6, 7]))  # the slot is reused
    return cache, node


_STALE_CALLS: dict[str, Callable[[Any, Any], object]] = {
    "inc_lock_ref": lambda c, n: c.inc_lock_ref(n),
    "dec_lock_ref": lambda c, n: c.dec_lock_ref(n),
    "compute_node_hash": lambda c, n: c.compute_node_hash(n),
    "children": lambda c, n: c.children(n),
    "key": lambda c, n: n.key,
    "value": lambda c, n: n.value,
    "parent": lambda c, n: n.parent,
    "lock_ref": lambda c, n: n.lock_ref,
}

for _name, _call in _STALE_CALLS.items():

    def _stale_case(call: Callable[[Any, Any], object] = _call):
        cache, node = _stale()
        return _raises(StaleNodeError, call, cache, node), (node, cache)

    case(f"stale_node[{_name}]")(_stale_case)


@case("stale_node[swa-inc_lock_ref]")
def _stale_swa() -> Case:
    cache, node = _stale("swa")
    return _raises(StaleNodeError, cache.inc_lock_ref, node), (node,)


@case("node_of_another_cache[p1]")
def _foreign_node() -> Case:
    cache, _a, _s, _key, _v = _err_cache()
    other, _a2, _s2, key2, _v2 = _err_cache()
    node = other.match_prefix(key2).last_node
    return _raises(StaleNodeError, cache.inc_lock_ref, node), (node, other)


@case("lock_not_a_node[p1]")
def _lock_not_node() -> Case:
    cache, _a, _s, _key, _v = _err_cache()
    bad = object()
    return _raises(TypeError, cache.inc_lock_ref, bad), (bad,)


@case("treenode_init[p1]")
def _treenode_init() -> Case:
    return _raises(TypeError, rt.TreeNode), ()


# -- RadixCache: evict and its callbacks ----------------------------------------------------


_BAD_COUNTS: dict[str, Any] = {"float": 1.5, "bool": True, "str": "3", "none": None}

for _name, _count in _BAD_COUNTS.items():

    def _bad_count(count: Any = _count):
        cache, _a, _s, _k, _v = _err_cache()
        return _raises(TypeError, cache.evict, count), (cache,)

    case(f"evict_bad_count[{_name}]")(_bad_count)


@case("evict_huge_count[p1]")
def _evict_huge() -> Case:
    cache, _a, slots = _radix("p1")
    key = RadixKey([1, 2, 3])
    count = 1 << 100

    def step() -> None:
        _insert_request(cache, slots, key)
        assert cache.evict(count).full_evicted == 3

    return step, (key, count)


def _evict_case(
    config: str, callback: Callable[[Any], Callable[[int], object]], exc: type[BaseException]
) -> Case:
    """Insert two leaves, evict them with a callback that fails (as `exc`)."""
    holder: list[Any] = []
    cb = callback(holder)
    cache, _alloc, slots = _radix(config, on_node_evict=cb)
    holder.append(cache)
    k1 = RadixKey([1, 2, 3, 4])
    k2 = RadixKey([1, 2, 9, 9])

    def step() -> None:
        _insert_request(cache, slots, k1)
        _insert_request(cache, slots, k2)
        try:
            cache.evict(1 << 30)
        except exc:
            assert cache.total_size() == 0
            return
        raise AssertionError(f"evict did not raise {exc.__name__}")

    return step, (k1, k2, cb)


def _raising_cb(holder: list[Any]) -> Callable[[int], object]:
    def on_evict(uid: int) -> None:
        raise Boom(uid)

    return on_evict


def _reentrant_cb(holder: list[Any]) -> Callable[[int], object]:
    probe = RadixKey([1, 2])

    def on_evict(uid: int) -> None:
        holder[0].match_prefix(probe)

    return on_evict


def _interrupt_cb(holder: list[Any]) -> Callable[[int], object]:
    def on_evict(uid: int) -> None:
        raise KeyboardInterrupt

    return on_evict


for _config in ("p1", "p1_pyalloc", "swa", "swa_pyalloc"):
    case(f"evict_callback_raises[{_config}]")(lambda c=_config: _evict_case(c, _raising_cb, Boom))
    case(f"evict_callback_reentrant[{_config}]")(
        lambda c=_config: _evict_case(c, _reentrant_cb, ReentrantCallError)
    )
case("evict_callback_interrupt[p1]")(lambda: _evict_case("p1", _interrupt_cb, KeyboardInterrupt))


@case("evict_free_raises[p1_pyalloc]")
def _evict_free_raises() -> Case:
    alloc = PyAlloc()
    seen: list[int] = []
    cache = RadixCache(token_to_kv_pool_allocator=alloc, on_node_evict=seen.append)
    key = RadixKey([1, 2, 3, 4])

    def step() -> None:
        alloc.fail = False
        cache.insert(key, _ar(1, 4))
        alloc.fail = True
        try:
            cache.evict(10)
        except Boom:
            seen.clear()
            return
        raise AssertionError("no Boom")

    return step, (key, alloc)


@case("evict_free_reentrant[swa_pyalloc]")
def _evict_free_reentrant() -> Case:
    alloc = PyAlloc()
    cache = RadixCache(sliding_window_size=2, token_to_kv_pool_allocator=alloc)
    key = RadixKey([1, 2, 3, 4])
    probe = RadixKey([1])

    def step() -> None:
        alloc.hook = None
        cache.insert(key, _ar(1, 4))
        alloc.hook = lambda: cache.match_prefix(probe)
        try:
            cache.evict(0, 10)  # free_swa reenters
        except ReentrantCallError:
            alloc.hook = None
            cache.evict(10)
            return
        raise AssertionError("no ReentrantCallError")

    return step, (key, probe, alloc)


@case("evict_extra_key_hash_raises_on_release[p1]")
def _evict_ns_release_hash() -> Case:
    """The namespace's extra_key would raise if hashed again when its last node goes: the
    registry keeps its keyed hash, so the namespace is released all the same, and the key
    (hashing again) takes a namespace again."""
    cache, _a, slots = _radix("p1")
    tag = Tag("t")
    key = RadixKey([1, 2, 3, 4], tag)

    def step() -> None:
        tag.hash_fail = False
        _insert_request(cache, slots, key)
        tag.hash_fail = True
        cache.evict(1 << 30)
        tag.hash_fail = False

    return step, (key, tag)


@case("evict_extra_key_eq_raises_on_release[p1]")
def _evict_ns_release_eq() -> Case:
    """As above with ``__eq__``: a namespace's extra_key is compared with another of the
    same hash when its last node goes, and the comparison raises."""
    cache, _a, slots = _radix("p1")
    first = RadixKey([1, 2], Tag("a"))
    _insert_request(cache, slots, first)  # registered first: probed first
    tag = Tag("b")
    key = RadixKey([5, 6, 7, 8], tag)

    def step() -> None:
        tag.eq_fail = False
        _insert_request(cache, slots, key)
        cache.match_prefix(first)  # key's leaf is now the least recently used
        tag.eq_fail = True
        assert cache.evict(4).full_evicted == 4
        tag.eq_fail = False
        assert cache.total_size() == 2

    return step, (key, tag, first)


@case("evict_extra_key_eq_interrupt[p1]")
def _evict_ns_release_interrupt() -> Case:
    """The comparison of ``_evict_ns_release_eq`` interrupted: held back, raised once the
    evict has handed everything over."""
    cache, _a, slots = _radix("p1")
    first = RadixKey([1, 2], Tag("a"))
    _insert_request(cache, slots, first)  # registered first: probed first
    tag = Tag("t")
    key = RadixKey([5, 6, 7, 8], tag)

    def step() -> None:
        tag.eq_interrupt = False
        _insert_request(cache, slots, key)
        cache.match_prefix(first)  # key's leaf is now the least recently used
        tag.eq_interrupt = True
        try:
            cache.evict(4)
        except KeyboardInterrupt:
            tag.eq_interrupt = False
            assert cache.total_size() == 2
            return
        raise AssertionError("no KeyboardInterrupt")

    return step, (key, tag, first)


@case("reset_free_raises[p1_pyalloc]")
def _reset_free_raises() -> Case:
    alloc = PyAlloc()
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    key = RadixKey([1, 2, 3, 4])

    def step() -> None:
        alloc.fail = False
        cache.insert(key, _ar(1, 4))
        alloc.fail = True
        try:
            cache.reset()
        except Boom:
            return
        raise AssertionError("no Boom")

    return step, (key, alloc)


@case("not_initialized[radix]")
def _not_initialized() -> Case:
    blank = RadixCache.__new__(RadixCache)
    key = RadixKey([1, 2])
    return _steps(
        _raises(NotInitializedError, blank.match_prefix, key),
        _raises(NotInitializedError, blank.insert, key),
        _raises(NotInitializedError, blank.evict, 1),
        _raises(NotInitializedError, blank.total_size),
    ), (blank, key)


@case("init_twice[radix]")
def _init_twice() -> Case:
    alloc = TokenToKVPoolAllocator(16)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    return _raises(RuntimeError, cache.__init__, 1, None, alloc), (alloc, cache)


_BAD_INITS: dict[str, tuple[type[BaseException], dict[str, Any]]] = {
    "page_size_0": (InvalidValueError, {"page_size": 0}),
    "policy": (InvalidValueError, {"eviction_policy": "mru"}),
    "callback": (TypeError, {"on_node_evict": 3}),
    "allocator": (TypeError, {"token_to_kv_pool_allocator": object()}),
    "window_no_free_swa": (
        TypeError,
        {"sliding_window_size": 4, "token_to_kv_pool_allocator": TokenToKVPoolAllocator(8)},
    ),
    "page_not_multiple": (
        InvalidValueError,
        {"page_size": 2, "token_to_kv_pool_allocator": TokenToKVPoolAllocator(8, page_size=4)},
    ),
}

for _name, (_exc, _kw) in _BAD_INITS.items():

    def _bad_init(exc: type[BaseException] = _exc, kw: Any = _kw):
        return _raises(exc, RadixCache, **kw), tuple(kw.values())

    case(f"init_refused[{_name}]")(_bad_init)


# -- MemoryError test hooks -----------------------------------------------------------


def _results_case(call: str, count: int) -> Case:
    cache, _a, slots, key, _v = _err_cache()
    new = RadixKey([200, 201, 202, 203], key.extra_key)
    new_ns = RadixKey([200, 201, 202, 203], "brand-new")
    node = cache.match_prefix(key).last_node
    value = slots.get(4)
    calls: dict[str, Callable[[], object]] = {
        "match": lambda: cache.match_prefix(key),
        "match_miss": lambda: cache.match_prefix(new),
        "match_new_ns": lambda: cache.match_prefix(new_ns),
        "insert_new": lambda: cache.insert(new, value),
        "insert_new_ns": lambda: cache.insert(new_ns, value),
        "insert_again": lambda: cache.insert(key, _v),
        "children": lambda: cache.children(cache.root_node),
        "nodes": cache._nodes,
        "parent": lambda: node.parent,
    }
    return _armed(rt._fail_results_after, count, calls[call]), (key, new, value, node)


for _call, _counts in {
    "match": (0, 1, 2),
    "match_miss": (0, 1, 2),
    "match_new_ns": (0, 1, 2),
    "insert_new": (0, 1),
    "insert_new_ns": (0, 1),
    "insert_again": (0, 1),
    "children": (0,),
    "nodes": (0,),
    "parent": (0,),
}.items():
    for _n in _counts:
        case(f"fail_results_after[{_call}-{_n}]")(lambda c=_call, n=_n: _results_case(c, n))


def _node_arrays_case(config: str, call: str, count: int) -> Case:
    cache, _a, slots = _radix(config)
    ps = cache.page_size
    key = RadixKey(list(range(1, 1 + 8 * ps)), Tag("a"))
    _insert_request(cache, slots, key)
    part = RadixKey(list(range(1, 1 + 4 * ps)), key.extra_key)
    longer = RadixKey([*key.token_ids[: 6 * ps], *([77] * (4 * ps))], key.extra_key)
    value = slots.get(10 * ps)
    new_ns = RadixKey(list(range(1, 1 + 4 * ps)), Tag("fresh"))
    calls: dict[str, Callable[[], object]] = {
        "match_split": lambda: cache.match_prefix(part),
        "insert_split_and_leaf": lambda: cache.insert(longer, value),
        "insert_new_ns": lambda: cache.insert(new_ns, value[: 4 * ps]),
        "insert_swa_tombstone": lambda: cache.insert(
            longer, value, prev_prefix_len=0, swa_evicted_seqlen=8 * ps
        ),
    }
    return _armed(rt._fail_node_arrays_after, count, calls[call]), (key, part, longer, value)


for _config, _call, _counts in (
    ("p1", "match_split", (0,)),
    ("p1", "insert_split_and_leaf", (0, 1)),
    ("p1", "insert_new_ns", (0,)),
    ("p4", "insert_split_and_leaf", (0, 1)),
    ("swa", "insert_split_and_leaf", (0, 1)),
    ("swa", "insert_new_ns", (0,)),
    ("swa", "insert_swa_tombstone", (0, 1, 2)),
    ("swa_pyalloc", "insert_swa_tombstone", (0, 1, 2)),
):
    for _n in _counts:
        case(f"fail_node_arrays_after[{_config}-{_call}-{_n}]")(
            lambda c=_config, f=_call, n=_n: _node_arrays_case(c, f, n)
        )


def _scratch_case(config: str, count: int) -> Case:
    """A fresh cache per step (its scratch buffers grow from nothing): insert long keys,
    then an evict whose buffer growth fails midway (the removed nodes are handed over)."""
    kwargs, make_alloc = CONFIGS[config]
    alloc = make_alloc() if make_alloc else None
    seen: list[int] = []
    keys = [RadixKey([i, *range(1000, 1040)]) for i in range(1, 5)]

    def step() -> None:
        cache = RadixCache(token_to_kv_pool_allocator=alloc, on_node_evict=seen.append, **kwargs)
        slots = _Slots(alloc)
        for k in keys:
            _insert_request(cache, slots, k)
        with _fuse(rt._fail_scratch_growth_after, count):
            try:
                cache.evict(1 << 30)
            except MemoryError:
                pass
            else:
                raise AssertionError("no MemoryError")
        cache.evict(1 << 30)
        seen.clear()
        assert cache.total_size() == 0
        del cache

    return step, (alloc, keys[0])


for _config in ("p1", "p1_pyalloc"):
    for _n in (0, 1, 2):  # the KV buffer grows 3 times over the 4 leaves
        case(f"fail_scratch_growth_after[evict-{_config}-{_n}]")(
            lambda c=_config, n=_n: _scratch_case(c, n)
        )


@case("fail_scratch_growth_after[evict-swa-tombstone]")
def _scratch_swa() -> Case:
    """A windowed evict removes leaves, then its tombstone list cannot grow: the removed
    leaves are handed over, the error raised."""
    alloc = SWATokenToKVPoolAllocator(1 << 10, 1 << 10)
    seen: list[int] = []
    keys = [RadixKey([*range(1000, 1040), i]) for i in range(1, 5)]

    def step() -> None:
        cache = RadixCache(
            sliding_window_size=4, token_to_kv_pool_allocator=alloc, on_node_evict=seen.append
        )
        slots = _Slots(alloc)
        for k in keys:
            _insert_request(cache, slots, k)
        with _fuse(rt._fail_scratch_growth_after, 0):
            try:
                cache.evict(0, 1 << 30)
            except MemoryError:
                pass
            else:
                raise AssertionError("no MemoryError")
        assert seen, "no leaf was removed before the failure"
        cache.evict(1 << 30)
        seen.clear()
        del cache
        assert alloc.available_size() == 1 << 10

    return step, (alloc, keys[0])


def _scratch_insert(count: int) -> Case:
    """A windowed insert into a fresh cache whose scratch buffers cannot grow."""
    alloc = SWATokenToKVPoolAllocator(1 << 10, 1 << 10)
    key = RadixKey(list(range(1, 41)))

    def step() -> None:
        cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=alloc)
        value = alloc.alloc(40)
        with _fuse(rt._fail_scratch_growth_after, count):
            try:
                cache.insert(key, value)
            except MemoryError:
                pass
            else:
                raise AssertionError("no MemoryError")
        alloc.free(value)
        del cache

    return step, (alloc, key)


for _n in (0, 1, 2, 3):
    case(f"fail_scratch_growth_after[insert-swa-{_n}]")(lambda n=_n: _scratch_insert(n))


@case("fail_storage_init[radix-init]")
def _storage_init() -> Case:
    alloc = TokenToKVPoolAllocator(64)
    cb = lambda uid: None  # noqa: E731

    def step() -> None:
        with _fuse(rt._fail_next_storage_inits, 1):
            try:
                RadixCache(token_to_kv_pool_allocator=alloc, on_node_evict=cb)
            except MemoryError:
                return
        raise AssertionError("no MemoryError")

    return step, (alloc, cb)


@case("fail_storage_init[radix-reset-then-init]")
def _storage_reset() -> Case:
    alloc = TokenToKVPoolAllocator(64)
    key = RadixKey([1, 2, 3])

    def step() -> None:
        cache = RadixCache(token_to_kv_pool_allocator=alloc)
        cache.insert(key, alloc.alloc(3))
        with _fuse(rt._fail_next_storage_inits, 1):
            try:
                cache.reset()
            except MemoryError:
                pass
            else:
                raise AssertionError("no MemoryError")
        assert alloc.available_size() == 64
        try:
            cache.match_prefix(key)
        except NotInitializedError:
            pass
        cache.__init__(1, None, alloc)  # type: ignore[misc]
        cache.insert(key, alloc.alloc(3))

    return step, (alloc, key)


@case("fail_storage_init[mamba-init]")
def _storage_init_mamba() -> Case:
    alloc = TokenToKVPoolAllocator(64)
    pool = TokenToKVPoolAllocator(8)

    def step() -> None:
        with _fuse(rt._fail_next_storage_inits, 1):
            try:
                MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=pool)
            except MemoryError:
                return
        raise AssertionError("no MemoryError")

    return step, (alloc, pool)


# -- MambaRadixCache ------------------------------------------------------------------


def _mamba_pool(kind: str) -> Any:
    """A state pool: the package's allocator, a ``MambaPool`` (JAX; it books through its
    ``slot_allocator``) or a Python pool that books nothing."""
    if kind == "booked":
        return TokenToKVPoolAllocator(256)
    if kind == "mambapool":
        memory_pool = pytest.importorskip("pymllm.mem_cache.memory_pool")
        return memory_pool.MambaPool(256, 1, (2,), (2,))
    return PyAlloc()


def _mamba(booked: bool | str = True, **kw: Any) -> tuple[MambaRadixCache, Any, Any, _Slots]:
    alloc = TokenToKVPoolAllocator(1 << 12)
    kind = booked if isinstance(booked, str) else "booked" if booked else "pypool"
    pool = _mamba_pool(kind)
    cache = MambaRadixCache(token_to_kv_pool_allocator=alloc, mamba_pool=pool, **kw)
    return cache, alloc, pool, _Slots(alloc)


def _mamba_insert(
    cache: MambaRadixCache, slots: _Slots, pool: Any, key: RadixKey, form: str = "array"
) -> Any:
    m = cache.match_prefix(key)
    value = slots.get(len(key) - m.prefix_len, prefix=m.indices)
    booked = hasattr(pool, "alloc")  # a pool that hands out (and books) state slots
    state = pool.alloc(1) if booked else np.array([7], np.int32)
    arg: Any = {
        "array": state,
        "int": int(state[0]),
        "intsub": MyInt(state[0]),
        "list": [int(state[0])],
        "npint": np.int64(state[0]),
    }[form]
    r = cache.insert(key, value, mamba_value=arg)
    slots.give_back(value[m.prefix_len : r.prefix_len])
    if r.mamba_exist and booked:
        pool.free(state)
    return r


def _mamba_churn(booked: bool | str, kind: str) -> Case:
    seen: list[int] = []
    cache, _alloc, pool, slots = _mamba(booked, on_node_evict=seen.append)
    tag = Tag("m")
    toks = _tokens(kind, 10, 8)
    key = RadixKey(toks, tag)
    half = RadixKey(_tokens(kind, 10, 4), tag)
    longer = RadixKey(_tokens(kind, 10, 12), tag)

    def step() -> None:
        r = _mamba_insert(cache, slots, pool, key)
        _mamba_insert(cache, slots, pool, key, "int")  # the state exists: mamba_exist
        _mamba_insert(cache, slots, pool, half, "list")  # split, a state on the upper half
        m = cache.match_prefix(longer)  # misses: the KV past 8 is not there yet
        value = slots.get(4, prefix=cache.match_prefix(key).indices)
        cache.insert(longer, value)  # KV only, no state
        m = cache.match_prefix(longer)
        assert m.prefix_len == 8 and m.mamba_branching_seqlen == 12
        token = cache.inc_lock_ref(m.last_node)
        _mamba_insert(cache, slots, pool, longer, "intsub")
        _ = (r.last_node.mamba_value, r.last_node.mamba_lock_ref, r.last_node.full_lock_ref)
        _ = (cache.mamba_evictable_size(), cache.mamba_protected_size())
        cache.evict(0, mamba_num=10)  # the unlocked states go (a leaf with its state)
        cache.dec_lock_ref(m.last_node, token)
        own = cache.match_prefix(key)
        r2 = cache.insert(key, own.indices, mamba_value=own.last_node.mamba_value)
        assert not r2.mamba_exist  # its own state handed back
        cache.inc_lock_ref(own.last_node)
        cache.dec_lock_ref(own.last_node)  # no token: the state lock it holds
        _mamba_insert(cache, slots, pool, half, "npint")
        cache.evict(0, mamba_num=1)
        cache.evict(1 << 30)
        seen.clear()
        assert cache.total_size() == 0

    return step, (key, toks, tag, half, longer)


for _booked in ("booked", "pypool"):
    for _kind in ("list", "np32", "tuple"):
        case(f"mamba_churn[{_booked}-{_kind}]")(lambda b=_booked, k=_kind: _mamba_churn(b, k))
case("mamba_churn[mambapool-list]")(lambda: _mamba_churn("mambapool", "list"))


@case("mamba_pool_free_refused[mambapool]")
def _mamba_pool_refused() -> Case:
    """MambaPool's free of a state the cache holds, and of a free slot."""
    cache, _alloc, pool, slots = _mamba("mambapool")
    r = _mamba_insert(cache, slots, pool, RadixKey([1, 2, 3, 4]))
    state = r.last_node.mamba_value
    return _steps(
        _raises(InvalidFreeError, pool.free, state),
        _raises(InvalidFreeError, pool.free, [200]),
        lambda: pool.free(pool.alloc(2)),
    ), (pool, state, cache)


def _mamba_err() -> tuple[MambaRadixCache, Any, Any, _Slots, RadixKey]:
    cache, alloc, pool, slots = _mamba()
    key = RadixKey(list(range(1, 9)))
    _mamba_insert(cache, slots, pool, key)
    return cache, alloc, pool, slots, key


_BAD_STATES: dict[str, tuple[type[BaseException], Any]] = {
    "bool": (TypeError, True),
    "negative": (InvalidValueError, -1),
    "two_slots": (InvalidValueError, np.array([1, 2], np.int32)),
    "float_array": (InvalidValueError, np.array([1.0])),
    "too_big": (InvalidValueError, 1 << 31),
    "unreadable": (InvalidValueError, _Ragged()),
    "free_slot": (InvalidValueError, 200),
    "other_nodes_state": (InvalidValueError, "cached"),
}

for _name, (_exc, _state) in _BAD_STATES.items():

    def _bad_state(exc: type[BaseException] = _exc, state: Any = _state):
        cache, _alloc, _pool, slots, key = _mamba_err()
        if isinstance(state, str):  # the state of the node at `key`
            state = cache.match_prefix(key).last_node.mamba_value
        other = RadixKey([50, 51, 52, 53])
        value = slots.get(4)
        return _raises(exc, cache.insert, other, value, state), (other, value, state)

    case(f"mamba_insert_bad_state[{_name}]")(_bad_state)


@case("mamba_insert_state_unaligned[p2]")
def _mamba_unaligned() -> Case:
    alloc = TokenToKVPoolAllocator(64, page_size=2)
    cache = MambaRadixCache(page_size=2, token_to_kv_pool_allocator=alloc, mamba_pool=PyAlloc())
    key = RadixKey([1, 2, 3])
    value = _ar(2, 3)
    return _raises(InvalidValueError, cache.insert, key, value, 5), (key, value)


@case("mamba_insert_bad_value[list_index_raises]")
def _mamba_bad_value() -> Case:
    cache, _a, _p, _s, _key = _mamba_err()
    key = RadixKey([50, 51])
    value = [Idx(1, bad=True), 2]
    return _raises(Boom, cache.insert, key, value, 3), (key, value)


@case("mamba_insert_kv_refused_state_kept[booked]")
def _mamba_kv_refused() -> Case:
    """The state is taken, then the KV refused: the state is the caller's again."""
    cache, _alloc, pool, _slots, _key = _mamba_err()
    state = pool.alloc(1)
    key = RadixKey([50, 51])
    value = _ar(3000, 2)  # never allocated

    def step() -> None:
        try:
            cache.insert(key, value, mamba_value=state)
        except InvalidValueError:
            assert not pool.is_cached(state).any()
            return
        raise AssertionError("no InvalidValueError")

    return step, (key, value, state)


def _mamba_lock_case(exc: type[BaseException], how: str) -> Case:
    """A node with a state (`node`) under one with a state (`parent`), and a node without
    one (`bare`), locked as `how` needs; then the refused unlock."""
    cache, _alloc, pool, slots, key = _mamba_err()
    node = _mamba_insert(cache, slots, pool, RadixKey([*key.token_ids, 9, 10])).last_node
    bare_key = RadixKey([*key.token_ids, 11, 12])
    value = slots.get(2, prefix=cache.match_prefix(bare_key).indices)
    bare = cache.insert(bare_key, value).last_node
    calls: dict[str, Callable[[], object]] = {
        "dec_unlocked": lambda: cache.dec_lock_ref(node),
        "dec_true_no_state_lock": lambda: cache.dec_lock_ref(bare, True),
        "dec_token_not_bool": lambda: cache.dec_lock_ref(node, 1),
        "dec_descendants_lock": lambda: cache.dec_lock_ref(node.parent),
        "dec_false_state_locked": lambda: cache.dec_lock_ref(node, False),
    }
    if how == "dec_true_no_state_lock":
        assert cache.inc_lock_ref(bare) is False
    elif how != "dec_unlocked":
        assert cache.inc_lock_ref(node) is True
    return _raises(exc, calls[how]), (node, bare, cache)


for _name, _exc in {
    "dec_unlocked": LockStateError,
    "dec_true_no_state_lock": LockStateError,
    "dec_token_not_bool": TypeError,
    "dec_descendants_lock": LockStateError,
    "dec_false_state_locked": LockStateError,
}.items():
    case(f"mamba_lock_error[{_name}]")(lambda e=_exc, n=_name: _mamba_lock_case(e, n))


@case("mamba_evict_count_twice[booked]")
def _mamba_evict_twice() -> Case:
    cache, _a, _p, _s, _k = _mamba_err()
    return _raises(TypeError, cache.evict, 1, 1, mamba_num=1), (cache,)


@case("mamba_evict_pool_free_raises[pypool]")
def _mamba_pool_raises() -> Case:
    seen: list[int] = []
    cache, _alloc, pool, slots = _mamba(booked=False, on_node_evict=seen.append)
    key = RadixKey([1, 2, 3, 4])

    def step() -> None:
        pool.fail = False
        _mamba_insert(cache, slots, pool, key)
        pool.fail = True
        try:
            cache.evict(1 << 30)
        except Boom:
            seen.clear()
            pool.fail = False
            return
        raise AssertionError("no Boom")

    return step, (key, pool)


@case("mamba_init_refused[paged_pool]")
def _mamba_init_refused() -> Case:
    pool = TokenToKVPoolAllocator(64, page_size=2)
    return _raises(InvalidValueError, MambaRadixCache, mamba_pool=pool), (pool,)


@case("mamba_init_refused[pool_without_free]")
def _mamba_init_nofree() -> Case:
    pool = object()
    return _raises(TypeError, MambaRadixCache, mamba_pool=pool), (pool,)


@case("mamba_through_radix_init[refused]")
def _mamba_radix_init() -> Case:
    blank = MambaRadixCache.__new__(MambaRadixCache)
    return _raises(TypeError, RadixCache.__init__, blank), (blank,)


def _state_stays_the_callers(cache, pool, hook, count, key, value, state) -> Callable[[], None]:
    """A step: an insert of `state` that the armed hook makes raise MemoryError, after which
    the state is not the cache's."""

    def step() -> None:
        with _fuse(hook, count):
            try:
                cache.insert(key, value, mamba_value=state)
            except MemoryError:
                assert not pool.is_cached(state).any()
                return
        raise AssertionError("no MemoryError")

    return step


@case("mamba_fail_results_after[insert-state-booked]")
def _mamba_results_insert() -> Case:
    """The state is taken, then the result cannot be made: the state is the caller's."""
    cache, _a, pool, slots, _key = _mamba_err()
    other = RadixKey([50, 51, 52, 53])
    value = slots.get(4)
    state = pool.alloc(1)
    step = _state_stays_the_callers(cache, pool, rt._fail_results_after, 1, other, value, state)
    return step, (other, value, state)


@case("mamba_fail_results_after[match]")
def _mamba_results() -> Case:
    cache, _a, _p, _s, key = _mamba_err()
    return _armed(rt._fail_results_after, 1, cache.match_prefix, key), (key,)


@case("mamba_fail_node_arrays_after[insert_split]")
def _mamba_node_arrays() -> Case:
    cache, _a, pool, _slots, key = _mamba_err()
    half = RadixKey(key.token_ids[:4])
    state = pool.alloc(1)
    step = _state_stays_the_callers(cache, pool, rt._fail_node_arrays_after, 0, half, None, state)
    return step, (half, state)


# -- ChunkCache -------------------------------------------------------------------------


@case("chunk_cache[all]")
def _chunk_all() -> Case:
    cache = ChunkCache(TokenToKVPoolAllocator(8))
    key = RadixKey([1, 2, 3], "x")
    value = _ar(1, 3)

    def step() -> None:
        m = cache.match_prefix(key)
        cache.insert(key, value, prev_prefix_len=0, priority=2, mamba_value=None)
        cache.inc_lock_ref(m.last_node)
        cache.dec_lock_ref(m.last_node, swa_boundary_id=None)
        cache.evict(3, mamba_num=2)
        cache.reset()
        _ = (cache.evictable_size(), cache.total_size(), cache.protected_size())
        with contextlib.redirect_stdout(_SINK):  # type: ignore[type-var]
            cache.pretty_print()

    return step, (key, value)


_CHUNK_ERRORS: dict[str, tuple[type[BaseException], Callable[[ChunkCache], object]]] = {
    "match_not_key": (TypeError, lambda c: c.match_prefix([1])),
    "insert_not_key": (TypeError, lambda c: c.insert([1])),
    "insert_kwarg": (TypeError, lambda c: c.insert(RadixKey([1]), bogus=1)),
    "insert_priority_float": (TypeError, lambda c: c.insert(RadixKey([1]), priority=1.5)),
    "insert_priority_range": (
        InvalidValueError,
        lambda c: c.insert(RadixKey([1]), priority=1 << 64),
    ),
    "evict_float": (TypeError, lambda c: c.evict(1.5)),
    "evict_kwarg": (TypeError, lambda c: c.evict(1, bogus=2)),
    "evict_mamba_twice": (TypeError, lambda c: c.evict(1, 2, mamba_num=3)),
    "lock_node": (TypeError, lambda c: c.inc_lock_ref(object())),
    "unlock_kwarg": (TypeError, lambda c: c.dec_lock_ref(None, bogus=1)),
}

for _name, (_exc, _call) in _CHUNK_ERRORS.items():

    def _chunk_err(exc: type[BaseException] = _exc, call: Any = _call):
        cache = ChunkCache()
        return _raises(exc, call, cache), (cache,)

    case(f"chunk_cache_error[{_name}]")(_chunk_err)


# -- the hashing helpers ------------------------------------------------------------------


@case("hash_helpers[ok]")
def _hash_ok() -> Case:
    toks = list(range(1, 300))
    arr = _ar(1, 100, np.int64)
    data = b"abc" * 10

    def step() -> None:
        h = hash_token_ids(toks)
        hash_token_ids(arr, prior_hash=h)
        hash_token_ids([(1, 2), (3, 4)])
        hash_to_int64(h)
        hash_bytes(data)
        key = RadixKey(toks, "x")
        _ = (key[1:5], key[3], len(key), repr(key), list(iter(RadixKey([1, 2]))))

    return step, (toks, arr, data)


_HASH_ERRORS: dict[str, tuple[type[BaseException], Callable[[], object]]] = {
    "negative": (InvalidKeyError, lambda: hash_token_ids([1, -1])),
    "ragged": (InvalidKeyError, lambda: hash_token_ids([(1, 2), (3,)])),
    "bool": (InvalidKeyError, lambda: hash_token_ids([True, 2])),
    "index_raises": (Boom, lambda: hash_token_ids([1, Idx(2, bad=True)])),
    "bad_prior": (InvalidKeyError, lambda: hash_token_ids([1], prior_hash="zz")),
    "to_int64_type": (TypeError, lambda: hash_to_int64(3)),
    "to_int64_hex": (InvalidKeyError, lambda: hash_to_int64("0x12")),
    "bytes_objects": (TypeError, lambda: hash_bytes(np.array([1], dtype=object))),
    "key_index": (IndexError, lambda: RadixKey([1, 2])[5]),
}

for _name, (_exc, _call) in _HASH_ERRORS.items():
    case(f"hash_helpers_error[{_name}]")(lambda exc=_exc, call=_call: (_raises(exc, call), ()))


# -- allocators ---------------------------------------------------------------------------


def _alloc_cycle(alloc: Any, n: int, prefix: Any) -> Callable[[], None]:
    def step() -> None:
        a = alloc.alloc(n)
        b = alloc.alloc(n, prefix=prefix)
        alloc.free_group_begin()
        alloc.free(a)
        alloc.free_group_end()
        c = alloc.alloc(n, prefix=prefix.tolist())
        alloc.free(b[len(prefix) :].tolist())
        alloc.free(c[len(prefix) :].astype(np.int64))
        d = alloc.alloc(alloc.page_size)
        alloc.free(int(d[0]))  # a 0-d slot id
        alloc.is_allocated(a)
        alloc.is_cached([1, 2, 1 << 70])
        alloc.merge_and_sort_free()
        _ = (alloc.available_size(), repr(alloc))
        alloc.clear()

    return step


@case("allocator_cycle[plain-p1]")
def _alloc_plain() -> Case:
    alloc = TokenToKVPoolAllocator(256, need_sort=False)
    prefix = _ar(200, 4)
    return _alloc_cycle(alloc, 8, prefix), (alloc, prefix)


@case("allocator_cycle[plain-p4]")
def _alloc_plain_p4() -> Case:
    alloc = TokenToKVPoolAllocator(256, page_size=4)
    prefix = _ar(200, 4)
    return _alloc_cycle(alloc, 8, prefix), (alloc, prefix)


@case("allocator_cycle[swa-p1]")
def _alloc_swa() -> Case:
    alloc = SWATokenToKVPoolAllocator(256, 128)
    prefix = _ar(200, 4)
    cycle = _alloc_cycle(alloc, 8, prefix)

    def step() -> None:
        cycle()
        a = alloc.alloc(4)
        alloc.translate_loc_from_full_to_swa(a)
        alloc.full_to_swa_index_mapping  # noqa: B018 (a view whose base is the allocator)
        alloc.free_swa(a)
        alloc.free(a)
        _ = (alloc.full_available_size(), alloc.swa_available_size())

    return step, (alloc, prefix)


@case("allocator_full[plain]")
def _alloc_full() -> Case:
    alloc = TokenToKVPoolAllocator(4)
    return (lambda: alloc.alloc(8)), (alloc,)


@case("allocator_make_and_drop[both]")
def _alloc_make() -> Case:
    def step() -> None:
        TokenToKVPoolAllocator(1024, page_size=2).alloc(4)
        SWATokenToKVPoolAllocator(1024, 512).alloc(4)

    return step, ()


def _alloc_err_case(kind: str, exc: type[BaseException], call: Callable[[Any, Any], object]):
    alloc: Any
    if kind == "plain":
        alloc = TokenToKVPoolAllocator(64)
    elif kind == "p4":
        alloc = TokenToKVPoolAllocator(64, page_size=4)
    else:
        alloc = SWATokenToKVPoolAllocator(64, 32)
    held = alloc.alloc(8)
    return _raises(exc, call, alloc, held), (alloc, held)


_ALLOC_ERRORS: dict[str, tuple[type[BaseException], Callable[[Any, Any], object]]] = {
    "double_free": (InvalidFreeError, lambda a, h: a.free(_ar(40, 2))),
    "free_padding": (InvalidFreeError, lambda a, h: a.free([0])),
    "free_out_of_range": (InvalidFreeError, lambda a, h: a.free(np.array([1 << 20], np.int32))),
    "free_negative": (InvalidFreeError, lambda a, h: a.free([-1])),
    "free_huge_int": (InvalidFreeError, lambda a, h: a.free([1 << 70])),
    "free_listed_twice": (InvalidFreeError, lambda a, h: a.free([int(h[0]), int(h[0])])),
    "free_after_good": (InvalidFreeError, lambda a, h: a.free(np.array([*h[:3], 60], np.int32))),
    "free_bool": (InvalidValueError, lambda a, h: a.free([True])),
    "free_float": (InvalidValueError, lambda a, h: a.free(np.ones(2))),
    "free_2d": (InvalidValueError, lambda a, h: a.free(np.ones((2, 2), np.int32))),
    "free_objects": (InvalidValueError, lambda a, h: a.free(["x"])),
    "alloc_negative": (InvalidValueError, lambda a, h: a.alloc(-1)),
    "alloc_bool": (TypeError, lambda a, h: a.alloc(True)),
    "alloc_float": (TypeError, lambda a, h: a.alloc(1.5)),
    "alloc_bad_prefix": (InvalidValueError, lambda a, h: a.alloc(1, prefix=[0])),
    "alloc_prefix_float": (InvalidValueError, lambda a, h: a.alloc(1, prefix=[1.5])),
    "group_end_without_begin": (AllocatorStateError, lambda a, h: a.free_group_end()),
    "is_allocated_float": (InvalidValueError, lambda a, h: a.is_allocated([1.5])),
    "is_cached_bool": (InvalidValueError, lambda a, h: a.is_cached(np.array([True]))),
}

for _name, (_exc, _call) in _ALLOC_ERRORS.items():
    for _kind in ("plain", "swa"):
        case(f"allocator_error[{_kind}-{_name}]")(
            lambda k=_kind, e=_exc, c=_call: _alloc_err_case(k, e, c)
        )

for _name, (_exc, _call) in {
    "alloc_not_pages": (InvalidValueError, lambda a, h: a.alloc(3)),
    "double_free_page": (InvalidFreeError, lambda a, h: a.free(_ar(40, 4))),
}.items():
    case(f"allocator_error[p4-{_name}]")(lambda e=_exc, c=_call: _alloc_err_case("p4", e, c))

for _name, (_exc, _call) in {
    "free_swa_unallocated": (InvalidFreeError, lambda a, h: a.free_swa(_ar(40, 2))),
    "translate_out_of_range": (
        InvalidValueError,
        lambda a, h: a.translate_loc_from_full_to_swa([1 << 20]),
    ),
    "translate_float": (InvalidValueError, lambda a, h: a.translate_loc_from_full_to_swa([1.5])),
}.items():
    case(f"allocator_error[swa-{_name}]")(lambda e=_exc, c=_call: _alloc_err_case("swa", e, c))


@case("allocator_error[plain-free_cached_slot]")
def _free_cached() -> Case:
    cache, alloc, _s, _key, value = _err_cache("p1")
    return _raises(InvalidFreeError, alloc.free, value), (alloc, value, cache)


@case("allocator_error[plain-clear_while_cached]")
def _clear_cached() -> Case:
    cache, alloc, _s, _key, _value = _err_cache("p1")
    return _raises(AllocatorStateError, alloc.clear), (alloc, cache)


@case("allocator_error[swa-free_swa_cached_slot]")
def _free_swa_cached() -> Case:
    cache, alloc, _s, _key, value = _err_cache("swa")
    return _raises(InvalidFreeError, alloc.free_swa, value), (alloc, value, cache)


_ALLOC_INITS: dict[str, tuple[type[BaseException], Callable[[], object]]] = {
    "plain_size_negative": (InvalidValueError, lambda: TokenToKVPoolAllocator(-1)),
    "plain_size_float": (InvalidValueError, lambda: TokenToKVPoolAllocator(1.5)),
    "plain_need_sort_str": (InvalidValueError, lambda: TokenToKVPoolAllocator(8, 1, "no")),
    "swa_size_bool": (InvalidValueError, lambda: SWATokenToKVPoolAllocator(8, True)),
    "swa_page_0": (InvalidValueError, lambda: SWATokenToKVPoolAllocator(8, 8, page_size=0)),
    "plain_too_big": (InvalidValueError, lambda: TokenToKVPoolAllocator(1 << 31)),
}

for _name, (_exc, _call) in _ALLOC_INITS.items():
    case(f"allocator_init_refused[{_name}]")(lambda e=_exc, c=_call: (_raises(e, c), ()))


@case("allocator_not_initialized[both]")
def _alloc_blank() -> Case:
    plain = TokenToKVPoolAllocator.__new__(TokenToKVPoolAllocator)
    swa = SWATokenToKVPoolAllocator.__new__(SWATokenToKVPoolAllocator)
    return _steps(
        _raises(NotInitializedError, plain.alloc, 1),
        _raises(NotInitializedError, plain.free, [1]),
        _raises(NotInitializedError, swa.alloc, 1),
        _raises(NotInitializedError, swa.free_swa, [1]),
    ), (plain, swa)


@case("allocator_init_twice[both]")
def _alloc_twice() -> Case:
    plain = TokenToKVPoolAllocator(8)
    swa = SWATokenToKVPoolAllocator(8, 8)
    return _steps(
        _raises(RuntimeError, plain.__init__, 8),
        _raises(RuntimeError, swa.__init__, 8, 8),
    ), (plain, swa)


def _map_churn(per_entry: int, minimum: int) -> Case:
    """A child map that drains slowly or never (its next growth then moves the rest of the
    old table): tables made and freed as a tree grows, shrinks and is dropped."""
    keys = [RadixKey([i, i + 1]) for i in range(300)]

    def step() -> None:
        previous = rt._set_map_tuning(per_entry, minimum, 2)
        try:
            cache = RadixCache()
            for k in keys:
                cache.insert(k)
            cache.match_prefix(RadixKey([3]))  # a split
            cache.evict(300)
            for k in keys[:50]:
                cache.insert(k)
            del cache  # dropped while its map drains
        finally:
            rt._set_map_tuning(*previous)

    return step, (keys[0],)


case("map_tables[no-drain]")(lambda: _map_churn(0, 0))
case("map_tables[slow-drain]")(lambda: _map_churn(1, 1))


# ---------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------


def _report(name: str, rounds: list[Round], watch: tuple[Any, ...]) -> str:
    lines = [f"{name}: growth over {N} calls in each of {len(rounds)} rounds"]
    for r in rounds:
        refs = ", ".join(
            f"{o.__name__ if isinstance(o, type) else type(o).__name__}:{d:+d}"
            for o, d in zip(watch, r.refs, strict=True)
            if d or not isinstance(o, type)
        )
        lines.append(f"  blocks {r.blocks:+d}, C heap {r.c_bytes:+d} B, refs [{refs}]")
    return "\n".join(lines)


def _watchable(o: object) -> bool:
    """Whether o's reference count is the step's alone to change: not a shared constant
    (None, a bool, a small int, an interned string) that any code refers to."""
    return not isinstance(o, (bool, int, float, str, bytes, type(None)))


# Python classes whose instances the calls make (each instance holds a reference to its
# class): a result or an exception leaked, or its class referenced once too often, shows.
_CLASSES = (
    MatchResult,
    InsertResult,
    EvictResult,
    RadixKey,
    RadixCache,
    MambaRadixCache,
    Boom,
    InvalidKeyError,
    InvalidValueError,
    InvalidFreeError,
    LockStateError,
    StaleNodeError,
    ReentrantCallError,
    NotInitializedError,
    AllocatorStateError,
)


def _case(name: str) -> Case:
    step, watch = CASES[name]()
    return step, tuple(o for o in watch if _watchable(o)) + _CLASSES


@pytest.mark.parametrize("name", sorted(CASES))
def test_no_growth(name: str) -> None:
    """Neither blocks, C heap nor the arguments' reference counts grow with the calls."""
    step, watch = _case(name)
    rounds = _measure(step, watch, ROUNDS)
    assert rounds[-1].clean, _report(name, rounds, watch)


_LEAKED: list[Any] = []


def _with_leak(step: Callable[[], object], how: str, watch: tuple[Any, ...]):
    def leaky() -> None:
        step()
        if how == "object":
            _LEAKED.append(object())
        elif how == "ref":
            _LEAKED.append(watch[0])
        else:  # a C allocation never freed (64 bytes, an 80-byte chunk)
            _LEAKED.append(_LIBC.malloc(64))

    return leaky


def _forget_leaked(how: str) -> None:
    if how == "c_heap":
        for p in _LEAKED:
            _LIBC.free(p)
    _LEAKED.clear()


@pytest.mark.parametrize("how", ["object", "ref", "c_heap"])
def test_the_checks_catch_a_leak(how: str) -> None:
    """Every case, given a leak of its own (an object, a reference to its first argument or
    a C allocation a call), fails the check."""
    if how == "c_heap" and not HAS_MALLINFO2:
        pytest.skip("no mallinfo2 (not glibc)")
    missed = []
    try:
        for name in sorted(CASES):
            step, watch = _case(name)
            if how == "ref" and not watch:
                continue
            rounds = _measure(_with_leak(step, how, watch), watch, 1)
            if rounds[-1].clean:
                missed.append(_report(name, rounds, watch))
            _forget_leaked(how)
    finally:
        _forget_leaked(how)
    assert not missed, "\n".join(missed)


def _vm_size() -> int:
    """The process's mapped bytes (/proc/self/statm; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[0])
    except OSError:
        return 0
    return pages * resource.getpagesize()


@pytest.mark.skipif(not _vm_size(), reason="no /proc/self/statm")
def test_big_blocks_are_unmapped() -> None:
    """Blocks of 1 MiB and more (a child map's tables, a large tree's node array) are mapped
    from the kernel, not malloc'ed: caches that grow them (a copy into a first mapping,
    then mremap), drain a map into a larger table, reset and are dropped map no more than
    they unmap. A leak maps at least 1 MiB a cache (over 30 MiB here)."""
    many = [RadixKey([i]) for i in range(20_000)]  # a node array of 3.9 MiB, a 1 MiB map

    def step(initial_map: int) -> None:
        previous = rt._set_map_tuning(8, 64, initial_map)
        try:
            cache = RadixCache(token_to_kv_pool_allocator=PyAlloc())
            for k in many:
                cache.insert(k)
            cache.match_prefix(many[5])
            cache.evict(4000)
            cache.reset()  # a fresh map table
            for k in many[:100]:
                cache.insert(k)
            del cache  # its finalizer resets it again
        finally:
            rt._set_map_tuning(*previous)

    step(1 << 15)
    step(1 << 16)
    gc.collect()
    before = _vm_size()
    for i in range(30):
        step(1 << 15 if i % 2 else 1 << 16)  # a map that grows past 1 MiB; one born there
    gc.collect()
    grown = _vm_size() - before
    assert grown < 16 << 20, f"mapped memory grew by {grown >> 20} MiB over 30 caches"
