"""Out of memory at each allocation of one public call leaves the cache consistent.

Each test fails one CPython allocation at a time (``_testcapi.set_nomemory``) during one
call, then checks the tree, the allocator and the eviction reports. Each was a defect: a
Python object made after the tree had started to change (the namespace free list, the
evicted ids for on_node_evict, an owner's bound ``free``), where an error left a node half
removed, two extra_keys sharing a namespace, nodes unreported, or slots in no one's hands.
"""

import random
import sys
from collections import deque

import numpy as np
import pytest

_testcapi = pytest.importorskip("_testcapi")

from pymllm.mem_cache import (  # noqa: E402
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
    _radix_tree,
)
from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache  # noqa: E402

STARTS = range(40)


def _fail_one(start, fn):
    """fn() with allocation number `start` failing; returns the exception, if any."""
    _testcapi.set_nomemory(start, start + 1)
    try:
        fn()
    except MemoryError as exc:
        return exc
    finally:
        _testcapi.remove_mem_hooks()
    return None


def _recorder() -> deque:
    """A full ring for on_node_evict(uid): its append (C, no Python frame) takes its blocks
    from the deque's own free list, so a report allocates nothing and cannot fail."""
    return deque([None] * 1024, maxlen=1024)


@pytest.mark.parametrize("page_size", [1, 2])
def test_evict_of_a_namespaces_last_root_child_under_oom(page_size):
    """Releasing a namespace id midway through a node's removal appended to a Python list;
    a MemoryError there left the node half removed (out of the child map, the counts
    already lowered, its slots handed back while it still named them)."""
    for start in STARTS:
        a = TokenToKVPoolAllocator(64, page_size=page_size)
        c = RadixCache(page_size, token_to_kv_pool_allocator=a)
        c.insert(RadixKey([1, 2, 3, 4], "ns"), a.alloc(4))
        err = _fail_one(start, lambda c=c: c.evict(4))
        c._check_invariants()
        a._check_invariants()
        # no slot held twice (by the tree and the free pool): reset hands back exactly
        # what the tree holds
        c.reset()
        assert a.available_size() == 64, (start, err)
        if err is None:
            assert start > 0, "the call allocated nothing: nothing was tested"
            break


def test_new_namespace_reusing_a_freed_id_under_oom():
    """Registering a namespace popped the reused id off a Python list after the key was
    registered; a MemoryError from that pop left the id both registered and free, so the
    next new extra_key got it too and matched the other's KV."""
    for start in STARTS:
        a = TokenToKVPoolAllocator(64)
        c = RadixCache(1, token_to_kv_pool_allocator=a)
        c.insert(RadixKey([1, 2, 3, 4], "a"), a.alloc(4))
        c.evict(4)  # namespace "a" had one root child: its id goes to the free list
        v = a.alloc(4)
        err = _fail_one(start, lambda c=c, v=v: c.insert(RadixKey([1, 2, 3, 4], "c"), v))
        if err is None:
            assert start > 0, "the call allocated nothing: nothing was tested"
            break
        a.free(v)
        assert _radix_tree._namespace_ids(c) == (2, 1, 1), (
            start,
            "registry changed by a failed insert",
        )
        vc = a.alloc(4)
        c.insert(RadixKey([1, 2, 3, 4], "c"), vc)
        vd = a.alloc(4)
        rd = c.insert(RadixKey([1, 2, 3, 4], "d"), vd)
        assert rd.prefix_len == 0, (start, "extra_key 'd' matched extra_key 'c''s KV")
        c._check_invariants()


@pytest.mark.parametrize("num_tokens", [8, 1000])
def test_every_removed_node_is_reported_under_oom(num_tokens):
    """The evicted ids were made into ints after the nodes were gone: out of memory there,
    no on_node_evict call was made for nodes the evict had removed."""
    for start in STARTS:
        a = TokenToKVPoolAllocator(256)
        rec = _recorder()
        c = RadixCache(1, token_to_kv_pool_allocator=a, on_node_evict=rec.append)
        for base in (0, 100, 200, 300):  # the root namespace: no namespace is released
            c.insert(RadixKey([base + i for i in range(1, 9)]), a.alloc(8))
        before = {h.id for h in c._nodes()}
        err = _fail_one(start, lambda c=c: c.evict(num_tokens))
        after = {h.id for h in c._nodes()}
        assert before - after == {uid for uid in rec if uid is not None}, (start, err)
        if err is None:
            assert start > 0, "the call allocated nothing: nothing was tested"
            break


class _PyAllocator(TokenToKVPoolAllocator):
    """A subclass: the tree books nothing and hands slots back through Python free()."""


@pytest.mark.parametrize("op", ["evict", "reset"])
def test_python_allocator_gets_every_slot_back_under_oom(op):
    """The allocator's ``free`` (a new bound-method object) was looked up after the nodes
    were gone: a MemoryError there lost every evicted slot (the tree no longer held them,
    the allocator never got them). It is looked up before any node goes now."""
    for start in STARTS:
        a = _PyAllocator(256)
        c = RadixCache(1, token_to_kv_pool_allocator=a)
        for base in (0, 100):
            c.insert(RadixKey([base + i for i in range(1, 9)], "a"), a.alloc(8))
        err = _fail_one(start, c.reset if op == "reset" else lambda c=c: c.evict(100))
        try:
            held = c.total_size()
        except Exception:  # reset could not rebuild the tree: it holds nothing
            held = 0
        assert a.available_size() + held == 256, (start, err, "slots lost")
        if err is None:
            assert start > 0, "the call allocated nothing: nothing was tested"
            break


class _PySWAAllocator(SWATokenToKVPoolAllocator):
    """A subclass: the windowed tree hands slots back through Python free and free_swa."""


@pytest.mark.parametrize("op", ["evict", "swa-evict", "reset"])
def test_python_swa_allocator_gets_every_slot_back_under_oom(op):
    """As above for a windowed cache, whose tombstoning evict hands window slots back
    through ``free_swa``."""
    for start in STARTS:
        a = _PySWAAllocator(256, 256)
        c = RadixCache(1, sliding_window_size=4, token_to_kv_pool_allocator=a)
        for base in (0, 100):
            c.insert(RadixKey([base + i for i in range(1, 9)], "a"), a.alloc(8))
        calls = {
            "evict": lambda c=c: c.evict(100),
            "swa-evict": lambda c=c: c.evict(0, 100),
            "reset": c.reset,
        }
        err = _fail_one(start, calls[op])
        try:
            held, swa_held = c.total_size(), c.swa_evictable_size() + c.swa_protected_size()
        except Exception:  # reset could not rebuild the tree: it holds nothing
            held = swa_held = 0
        assert a.available_size() + held == 256, (start, err, "full slots lost")
        assert a.swa_available_size() + swa_held == 256, (start, err, "window slots lost")
        if err is None:
            assert start > 0, "the call allocated nothing: nothing was tested"
            break


class _StatePool:
    """A Python Mamba state pool that checks every free (memory is back on by then)."""

    def __init__(self, n):
        self.free_ids = set(range(n))
        self.n = n

    def take(self):
        return self.free_ids.pop() if self.free_ids else None

    def free(self, idx):
        _testcapi.remove_mem_hooks()
        for i in idx.tolist():
            assert i not in self.free_ids, ("state freed twice", i)
            self.free_ids.add(i)


def _run_random_ops(seed, kind, steps):
    """Random inserts, matches, locks, evicts and resets, 40% of them with one failing
    allocation; after each, the tree's and the allocator's invariants, the nodes reported
    against the nodes gone, and every KV slot and state in exactly one place."""
    rng = random.Random(seed)
    N = 300
    booked = rng.random() < 0.3
    a = (TokenToKVPoolAllocator if booked else _PyAllocator)(N)
    rec = deque([None] * 4096, maxlen=4096)
    pool = _StatePool(40) if kind == "mamba" else None
    if kind == "mamba":
        c = MambaRadixCache(
            1, token_to_kv_pool_allocator=a, mamba_pool=pool, on_node_evict=rec.append
        )
    else:
        c = RadixCache(1, token_to_kv_pool_allocator=a, on_node_evict=rec.append)
    names = ["a", "b", "c", None]
    locks = []
    for step in range(steps):
        op = rng.random()
        oom = rng.random() < 0.4
        start = rng.randrange(30)
        before = {h.id for h in c._nodes()}
        rec.extend([None] * 4096)
        v = None
        st = None
        did_evict = False
        try:
            if oom:
                _testcapi.set_nomemory(start, start + 1)
            try:
                if op < 0.5:
                    n = rng.randrange(1, 6)
                    if a.available_size() < n:
                        continue
                    toks = [rng.randrange(3) for _ in range(n)]
                    v = a.alloc(n)
                    kw = {}
                    if kind == "mamba":
                        st = pool.take()
                        if st is None:
                            a.free(v)
                            v = None
                            continue
                        kw["mamba_value"] = np.array([st], np.int32)
                    r = c.insert(RadixKey(toks, rng.choice(names)), v, **kw)
                    _testcapi.remove_mem_hooks()
                    if r.prefix_len:
                        a.free(v[: r.prefix_len])
                    if kind == "mamba" and r.mamba_exist:
                        pool.free(np.array([st]))
                    v = st = None
                elif op < 0.6:
                    m = c.match_prefix(
                        RadixKey([rng.randrange(3) for _ in range(4)], rng.choice(names))
                    )
                    if m.last_node.id != 0 and rng.random() < 0.5:
                        _testcapi.remove_mem_hooks()
                        locks.append((m.last_node, c.inc_lock_ref(m.last_node)))
                elif op < 0.7 and locks:
                    h, t = locks.pop(rng.randrange(len(locks)))
                    if kind == "mamba":
                        c.dec_lock_ref(h, t)
                    else:
                        c.dec_lock_ref(h)
                elif op < 0.95:
                    did_evict = True
                    if kind == "mamba":
                        c.evict(rng.randrange(0, 8), mamba_num=rng.randrange(3))
                    else:
                        c.evict(rng.randrange(1, 10))
                else:
                    c.reset()
                    locks.clear()
            finally:
                _testcapi.remove_mem_hooks()
        except MemoryError:
            if v is not None:
                a.free(v)
            if st is not None:
                pool.free(np.array([st]))
        except Exception as e:
            if type(e).__name__ not in ("LockStateError", "StaleNodeError", "NotInitializedError"):
                raise
        try:
            c._check_invariants()
            nodes_after = {h.id for h in c._nodes()}
            total = c.total_size()
            held_states = (
                sum(1 for h in c._nodes() if getattr(h, "mamba_value", None) is not None)
                if kind == "mamba"
                else 0
            )
        except Exception as e:
            if type(e).__name__ != "NotInitializedError":
                raise
            c.__init__(
                1, token_to_kv_pool_allocator=a, mamba_pool=pool, on_node_evict=rec.append
            ) if kind == "mamba" else c.__init__(
                1, token_to_kv_pool_allocator=a, on_node_evict=rec.append
            )
            locks.clear()
            nodes_after = set()
            total = 0
            held_states = 0
        a._check_invariants()
        reported = {u for u in rec if u is not None}
        if did_evict:
            assert before - nodes_after == reported, (seed, step, before - nodes_after, reported)
        else:
            assert not reported, (seed, step, reported)
        assert a.available_size() + total == N, (seed, step, "kv slots", a.available_size(), total)
        if kind == "mamba":
            assert len(pool.free_ids) + held_states == pool.n, (seed, step, "states")


@pytest.mark.parametrize("kind", ["plain", "mamba"])
@pytest.mark.parametrize("seed", range(8))
def test_random_ops_under_oom(kind, seed):
    """A guard over this file's fixes together, with Python and booked owners."""
    _run_random_ops(seed, kind, steps=150)


# --- the bound methods an evict looks up are dropped once used, or once a lookup fails (a
# mutation review: either way the cache kept a reference to its allocator)


@pytest.mark.parametrize("op", ["evict", "reset"])
def test_an_evict_keeps_no_bound_free_of_the_allocator(op: str) -> None:
    a = _PyAllocator(64)
    c = RadixCache(1, token_to_kv_pool_allocator=a)
    c.insert(RadixKey([1, 2, 3, 4]), a.alloc(4))
    before = sys.getrefcount(a)
    if op == "evict":
        c.evict(4)
    else:
        c.reset()
    assert a.available_size() == 64
    assert sys.getrefcount(a) == before, "the cache still holds a bound method of the allocator"


@pytest.mark.parametrize("swa", [False, True], ids=["plain", "swa"])
def test_a_failed_bind_keeps_no_bound_free_of_the_allocator(swa: bool) -> None:
    failed = 0
    for start in range(40):
        if swa:  # free bound, then free_swa's lookup fails
            a = _PySWAAllocator(64, 64)
            c = RadixCache(1, sliding_window_size=4, token_to_kv_pool_allocator=a)
        else:
            a = _PyAllocator(64)
            c = RadixCache(1, token_to_kv_pool_allocator=a, on_node_evict=lambda uid: None)
        c.insert(RadixKey([1, 2, 3, 4]), np.asarray(a.alloc(4)))
        before = sys.getrefcount(a)
        _testcapi.set_nomemory(start, start + 1)
        try:
            c.evict(4)
            err = False
        except MemoryError:
            err = True
        finally:
            _testcapi.remove_mem_hooks()
        c._check_invariants()
        if err:
            failed += 1
            assert sys.getrefcount(a) == before, f"start {start}: bound free kept"
        else:
            break
    assert failed > 0, "nothing failed: nothing was tested"
