"""Threads: eight schedulers share one cache (or one allocator), then every book balances.

Each public call on a cache or an allocator must be atomic with respect to Python threads
(the compiled core guards its state across the Python callbacks it makes: the allocator's
``free``, ``on_node_evict``). Eight threads, each with its own requests, run the serving mix
of ``bench/soak.py`` on one shared ``RadixCache`` (with an ``on_node_evict`` callback), one
windowed ``RadixCache`` and one ``MambaRadixCache``, or alloc/free on one shared allocator,
with the switch interval at 1 us so that threads change hands inside calls. Afterwards:
``_check_invariants()`` of the tree and the allocators, the slot ledger (free + in the tree
+ held by the threads' live requests == the pool), no node reported evicted twice or
evicted and still in the tree, and after aborting everything and a reset every slot free.

A sequence of calls (match then lock) is not atomic, and the schedulers here do what one
sharing a cache has to: a node evicted between the two by another thread raises
``StaleNodeError`` and the match is made again.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from conftest import load_bench, run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import SWATokenToKVPoolAllocator, TokenToKVPoolAllocator

THREADS = 8
OPS_PER_THREAD = 1500


@pytest.fixture
def fast_switching() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _run_threads(workers: list[Callable[[], None]]) -> None:
    """Start every worker at once (a barrier), join them, re-raise the first failure."""
    errors: list[str] = []
    barrier = threading.Barrier(len(workers))

    def run(work: Callable[[], None]) -> None:
        barrier.wait()
        try:
            work()
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hangs (deadlock?)"
    assert not errors, f"{len(errors)} thread(s) failed; the first:\n{errors[0]}"


@pytest.mark.parametrize("kind", ["radix", "swa", "mamba"])
def test_eight_schedulers_share_one_cache(kind: str, fast_switching: None) -> None:
    soak = load_bench("soak")
    args = soak.parser().parse_args(["--max-reqs", "6", "--max-len", "160"])
    stack = soak.Stack(kind, 1024, 24, 16)
    evicted: list[int] = []
    # RadixCache's callback attribute is read-only: rebuild the cache around the
    # recording callback with the stack's allocators.
    stack.cache = type(stack.cache)(
        **{
            "radix": {"token_to_kv_pool_allocator": stack.kv},
            "swa": {"token_to_kv_pool_allocator": stack.kv, "sliding_window_size": 16},
            "mamba": {"token_to_kv_pool_allocator": stack.kv, "mamba_pool": stack.states},
        }[kind],
        on_node_evict=evicted.append,
    )
    work = soak.Workload(np.random.default_rng(0), 24)  # few prefixes: threads share them
    clients = [stack.client() for _ in range(THREADS)]

    def worker(client: object, seed: int) -> Callable[[], None]:
        def work_loop() -> None:
            rng = np.random.default_rng(seed)
            for op in soak.draw_ops(rng, OPS_PER_THREAD):
                soak.step(client, work, rng, op, args)

        return work_loop

    _run_threads([worker(c, i + 1) for i, c in enumerate(clients)])

    held = sum(c.held() for c in clients)
    stack.check(held=held)  # invariants of tree and allocators, free + tree + held == pool
    assert len(set(evicted)) == len(evicted), "a node was reported evicted twice"
    in_tree = {n.id for n in stack.cache._nodes()}
    assert not in_tree & set(evicted), "a node reported evicted is still in the tree"
    assert len(evicted) > 0, "no eviction ran: the test lost its pressure"
    cache = stack.cache
    assert cache.total_size() == cache.evictable_size() + cache.protected_size()
    for c in clients:
        for r in list(c.reqs):
            c.abort(r)
    assert cache.protected_size() == 0 and cache.swa_protected_size() == 0
    cache.reset()
    stack.check(held=0)
    assert stack.full_available() == 1024
    if kind == "swa":
        assert stack.kv.swa_available_size() == stack.kv.swa_size
    if kind == "mamba":
        assert stack.states.available_size() == stack.states.size
        assert cache.mamba_protected_size() == 0


@pytest.mark.parametrize("swa", [False, True], ids=["full", "swa"])
def test_eight_threads_share_one_allocator(swa: bool, fast_switching: None) -> None:
    size = 4096
    alloc = SWATokenToKVPoolAllocator(size, size) if swa else TokenToKVPoolAllocator(size)
    book = threading.Lock()
    out: set[int] = set()  # every slot some thread holds

    def worker(seed: int) -> Callable[[], None]:
        def work_loop() -> None:
            rng = np.random.default_rng(seed)
            mine: list[np.ndarray] = []
            for _ in range(3000):
                if mine and rng.random() < 0.5:
                    slots = mine.pop(int(rng.integers(len(mine))))
                    if swa and rng.random() < 0.3:
                        alloc.free_swa(slots)
                    with book:
                        out.difference_update(slots.tolist())
                    alloc.free(slots)
                    continue
                got = alloc.alloc(int(rng.integers(1, 9)))
                if got is None:
                    continue
                with book:
                    twice = out.intersection(got.tolist())
                    assert not twice, f"slots {sorted(twice)} handed to two threads"
                    out.update(got.tolist())
                mine.append(got)
            for slots in mine:
                with book:
                    out.difference_update(slots.tolist())
                alloc.free(slots)

        return work_loop

    _run_threads([worker(i + 1) for i in range(THREADS)])
    alloc._check_invariants()
    assert not out
    assert alloc.available_size() == size


def test_swa_clear_holds_the_gil_throughout() -> None:
    """Every call changes the allocator in one stretch of C holding the GIL. The SWA
    allocator's clear zeroed its full -> SWA mapping with a numpy fill, which lets other
    threads run on a large array: an alloc in between lost its mapping (its SWA slot leaked
    and translated to 0). A thread counting while the main thread calls clear() must not
    count at all (the switch interval is long, so only a released GIL lets it run)."""
    a = SWATokenToKVPoolAllocator(1 << 22, 64)
    count = [0]
    stop = threading.Event()

    def counter() -> None:
        while not stop.is_set():
            count[0] += 1

    old = sys.getswitchinterval()
    t = threading.Thread(target=counter)
    t.start()
    try:
        while count[0] == 0:
            pass
        sys.setswitchinterval(1.0)
        # each thread reads the interval as it starts waiting for the GIL: a sleep hands
        # the GIL over, so that from here on both wait with the long one
        time.sleep(0.01)
        moved = 0
        for _ in range(3):
            c0 = count[0]
            a.clear()
            moved += count[0] - c0
    finally:
        sys.setswitchinterval(old)
        stop.set()
        t.join()
    assert moved == 0


def _insert_while_rewritten(
    make_cache: Callable[[], object],
    cached: list[np.ndarray],
    walked: np.ndarray,
    copied: np.ndarray,
) -> tuple[int, int]:
    """Insert a key, for 4 s or until 20 are refused, into fresh caches holding `cached`
    while a writer thread flips the key's array between `walked` and `copied` (numpy
    copies without the GIL). After each insert the tree's invariants hold, and a refused
    one (InvalidKeyError) left the tree as it was. Returns (inserted, refused)."""
    from pymllm.mem_cache import RadixKey
    from pymllm.mem_cache.errors import InvalidKeyError

    key = walked.copy()
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            np.copyto(key, walked)
            np.copyto(key, copied)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    refused = inserts = 0
    deadline = time.monotonic() + 4.0
    try:
        while time.monotonic() < deadline and refused < 20:
            cache: Any = make_cache()
            for tokens in cached:
                cache.insert(RadixKey(tokens), np.arange(1, len(tokens) + 1, dtype=np.int32))
            before = cache.total_size()
            try:
                cache.insert(RadixKey(key), np.arange(100, 100 + len(key), dtype=np.int32))
                inserts += 1
            except InvalidKeyError:
                refused += 1
                assert cache.total_size() == before
            cache._check_invariants()
    finally:
        stop.set()
        t.join(10)
    assert inserts + refused > 0
    return inserts, refused


@pytest.mark.parametrize("where", ["new child", "split"])
@pytest.mark.parametrize("window", [None, 64], ids=["plain", "windowed"])
def test_a_key_another_thread_writes_never_corrupts_the_tree(
    window: int | None, where: str
) -> None:
    """insert reads an int32 key array in place: the walk looks its pages up, and the new
    leaf's key is copied from the same memory later in the call. Another thread's numpy
    copy could rewrite the array in between, and the leaf then started with a page the
    walk never looked up: a second child with the same first page as one already there,
    which the child map cannot tell apart (a prefix stored twice). The tree now checks
    the leaf's copied first page (plain: InvalidKeyError when it collides, nothing
    inserted) or reads one copy of the key (windowed)."""
    from pymllm.mem_cache import RadixCache

    n = 4096
    walked = np.full(n, 2, np.int32)  # what the walk sees: no root child starting with 2
    if where == "split":  # the walk ends inside [1]*8 at 4: the leaf must not start with 1
        walked[:4] = 1
    copied = np.full(n, 1, np.int32)  # what the copy may see: starts as the cached child
    copied[8:] = 9
    _, refused = _insert_while_rewritten(
        lambda: RadixCache(sliding_window_size=window),
        [np.full(8, 1, np.int32)],
        walked,
        copied,
    )
    if window is not None:
        assert refused == 0  # one snapshot: nothing to refuse


@pytest.mark.parametrize(
    ("page_size", "where"),
    [(2, "new child"), (2, "split"), (1, "deep child"), (2, "deep child")],
)
def test_a_rewritten_key_never_leaves_two_children_with_one_first_page(
    page_size: int, where: str
) -> None:
    """The same with pages of two tokens (the child map is looked up with the whole page)
    and under a node other than the root (looked up under the walk's last node)."""
    from pymllm.mem_cache import RadixCache

    n = 4096
    base = np.full(8, 5, np.int32) if where == "deep child" else np.zeros(0, np.int32)
    b = len(base)
    # the cached child; for "split" its rest differs from its first page, so that only a
    # compare with the rest (not a child-map lookup under the parent) sees the collision
    child = np.array([1] * 8 if where != "split" else [1] * 4 + [3] * 4, np.int32)
    walked = np.full(n, 2, np.int32)
    walked[:b] = base
    if where == "split":  # the walk ends inside the child at 4, a page boundary
        walked[b : b + 4] = 1
    copied = np.full(n, 9, np.int32)  # the whole child, then pages no node has
    copied[:b] = base
    copied[b : b + 8] = child
    cached = [base, np.concatenate([base, child])] if b else [child]
    _insert_while_rewritten(lambda: RadixCache(page_size=page_size), cached, walked, copied)


def test_a_fork_while_another_thread_is_inside_a_call() -> None:
    """os.fork() while a thread is parked in a cache's callback: in the child that thread
    does not exist and its call never ends. The child's calls on that cache used to wait
    for ever and its garbage collector stayed off for good (the call's hold was never
    released), cache or no cache; now the calls raise NotInitializedError at once, the
    collector is back on, and a new cache works. The parent is unaffected."""
    out = run_child(
        """
        import gc, os, signal, threading
        import numpy as np
        from pymllm.mem_cache import RadixCache, RadixKey
        from pymllm.mem_cache.errors import NotInitializedError

        parked, release = threading.Event(), threading.Event()

        def on_evict(node_id):
            parked.set()
            release.wait()

        cache = RadixCache(on_node_evict=on_evict)
        cache.insert(RadixKey([1, 2, 3]), np.array([1, 2, 3], np.int32))
        t = threading.Thread(target=cache.evict, args=(3,))
        t.start()
        parked.wait()
        assert not gc.isenabled()  # held off by the evict in t
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # a hang ends the child, and the test sees no line
            enabled = gc.isenabled()
            try:
                cache.total_size()
                res = "answered"
            except NotInitializedError:
                res = "refused"
            fresh = RadixCache()
            fresh.insert(RadixKey([5]), np.array([9], np.int32))
            os.write(1, f"child {enabled} {res} {fresh.total_size()}\\n".encode())
            os._exit(0)
        release.set()
        t.join()
        os.waitpid(pid, 0)
        print("parent", gc.isenabled(), cache.total_size())
        """,
        timeout=120,
    )
    assert out.splitlines() == ["child True refused 1", "parent True 0"]
