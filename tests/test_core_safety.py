"""The compiled core against hostile callers and failing callbacks.

Each case was a defect: a read of freed memory, a C stack overflow, a slot or state leaked
or owned twice when a callback raised, or a failed call that changed the tree. Cases that
crashed the process run in a child process, so that a regression fails one test instead
of ending the run.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from conftest import collects_inside_calls, run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import (
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import InvalidKeyError, InvalidValueError, LockStateError

# -- Python code running in the middle of a call --------------------------------------


@collects_inside_calls
def test_repr_of_a_handle_while_the_collector_grows_the_tree() -> None:
    cache = RadixCache()
    cache.insert(RadixKey([1, 2, 3]), [1, 2, 3])
    node = cache.match_prefix(RadixKey([1, 2, 3])).last_node
    expected = repr(node)
    fired = []

    def grow(phase, info):
        if phase == "start" and not fired:
            fired.append(True)
            # enough new leaves that the node array is reallocated (and the old one freed)
            for i in range(100_000):
                cache.insert(RadixKey([10 + i]), [10 + i])
            junk = [bytearray(b"\xff" * 4096) for _ in range(5_000)]  # reuse freed memory
            del junk

    threshold = gc.get_threshold()
    gc.callbacks.append(grow)
    gc.set_threshold(1)
    try:
        during = repr(node)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(grow)
    assert fired
    assert during == expected == repr(node)


LIST_SHRUNK_BY_INDEX = r"""
from pymllm.mem_cache import RadixCache, RadixKey
from pymllm.mem_cache.errors import InvalidKeyError, InvalidValueError

class Token:
    def __init__(self, victim):
        self.victim = victim
    def __index__(self):
        self.victim.clear()                 # frees the list's item array mid-conversion
        junk[:] = [bytearray(64) for _ in range(50_000)]
        return 5

junk = []
cache = RadixCache()
for where in ("key", "value", "tuple key"):
    seq = [(1 << 31) + i for i in range(50_000)]    # heap ints, freed with the list
    if where == "key":
        seq.insert(0, Token(seq))
        args = (RadixKey(seq), list(range(1, 50_002)))
    elif where == "value":
        seq.insert(0, Token(seq))
        args = (RadixKey(list(range(1, 50_002))), seq)
    else:
        seq = [(i, i) for i in range(50_000)]
        seq.insert(0, (Token(seq), 1))
        args = (RadixKey(seq), list(range(1, 50_002)))
    try:
        cache.insert(*args)
    except (InvalidKeyError, InvalidValueError) as exc:
        print(type(exc).__name__)
print(cache.total_size())
"""


def test_a_list_changed_by_a_tokens_index_is_rejected_not_read_after_free() -> None:
    assert run_child(LIST_SHRUNK_BY_INDEX).split() == [
        "InvalidKeyError",
        "InvalidValueError",
        "InvalidKeyError",
        "0",
    ]


def test_an_int_like_token_that_leaves_the_list_alone_is_accepted() -> None:
    class Token:
        def __index__(self) -> int:
            return 7

    cache = RadixCache()
    assert cache.insert(RadixKey([1, Token(), 3]), [4, Token(), 6]).prefix_len == 0
    m = cache.match_prefix(RadixKey([1, 7, 3]))
    assert m.prefix_len == 3 and m.indices.tolist() == [4, 7, 6]


# -- deep trees: loops, not C recursion ------------------------------------------------

DEEP_CHAIN = r"""
import threading
import numpy as np
from pymllm.mem_cache import RadixCache, RadixKey

D = 20_000      # one-token nodes in a chain, far deeper than a 256 KB stack recursing

def build(window):
    cache = RadixCache(sliding_window_size=window)
    key = np.arange(1, D + 2, dtype=np.int32)
    cache.insert(RadixKey(key), key.copy())
    miss = np.array([0], np.int32)
    for k in range(D, 0, -1):                      # split at D, D-1, ..., 1
        cache.match_prefix(RadixKey(np.concatenate([key[:k], miss])))
    return cache, cache.match_prefix(RadixKey(key)).last_node

def work():
    cache, leaf = build(1)
    lock = cache.inc_lock_ref(leaf)                # window 1: only the leaf keeps SWA KV
    print(cache.evict(0, swa_num_tokens=D + 10).swa_evicted)
    cache.dec_lock_ref(leaf, lock)
    print(cache.evict(1).full_evicted)             # the leaf, then every tombstone above it
    cache, leaf = build(None)
    print(len(cache.compute_node_hash(leaf)))

threading.stack_size(256 * 1024)
t = threading.Thread(target=work)
t.start()
t.join()
"""


def test_evicting_a_deep_tombstone_chain_and_hashing_a_deep_node_on_a_small_stack() -> None:
    assert run_child(DEEP_CHAIN).split() == ["20000", "20001", "1"]


# -- failed unlocks change nothing -------------------------------------------------------


def test_a_failed_mamba_unlock_keeps_the_state_lock() -> None:
    cache = MambaRadixCache()
    cache.insert(RadixKey([1, 2, 3, 4]), [1, 2, 3, 4])
    cache.insert(RadixKey([1, 2, 3, 4, 5, 6, 7, 8]), [1, 2, 3, 4, 5, 6, 7, 8], mamba_value=9)
    node = cache.match_prefix(RadixKey([1, 2, 3, 4, 5, 6, 7, 8])).last_node
    token = cache.inc_lock_ref(node)
    # misuse: the ancestor unlocked on its own. It used to pass, leaving the node's own
    # unlock to fail on the unlocked ancestor; since session 17 it fails itself
    with pytest.raises(LockStateError, match="descendants"):
        cache.dec_lock_ref(node.parent, False)
    assert (node.mamba_lock_ref, cache.mamba_protected_size(), node.lock_ref) == (1, 1, 1)
    assert node.parent.lock_ref == 1
    assert cache.evict(0, mamba_num=1).mamba_evicted == 0  # the state is still locked
    assert node.mamba_value.tolist() == [9]
    cache.dec_lock_ref(node, token)
    assert (node.mamba_lock_ref, cache.mamba_protected_size(), node.lock_ref) == (0, 0, 0)
    cache._check_invariants()


def test_a_failed_sliding_window_unlock_keeps_the_swa_lock() -> None:
    cache = RadixCache(sliding_window_size=4)
    cache.insert(RadixKey([1, 2, 3, 4]), [1, 2, 3, 4])
    cache.insert(RadixKey([1, 2, 3, 4, 5, 6, 7, 8]), [1, 2, 3, 4, 5, 6, 7, 8])
    node = cache.match_prefix(RadixKey([1, 2, 3, 4, 5, 6, 7, 8])).last_node
    token = cache.inc_lock_ref(node)
    before = (node.swa_lock_ref, cache.swa_protected_size(), node.lock_ref, node.parent.lock_ref)
    # misuse: the parent's unlock with the child's lock. It used to release the parent's
    # full lock, leaving the child's unlock to fail on the unlocked ancestor; since locks
    # are recorded with their node and boundary it fails itself, changing nothing
    with pytest.raises(LockStateError, match="does not match an SWA lock"):
        cache.dec_lock_ref(node.parent, token)
    after = (node.swa_lock_ref, cache.swa_protected_size(), node.lock_ref, node.parent.lock_ref)
    assert after == before == (1, 4, 1, 1)
    cache.dec_lock_ref(node, token)
    assert (cache.swa_protected_size(), cache.protected_size()) == (0, 0)
    cache._check_invariants()


# -- callbacks that raise ------------------------------------------------------------------


class _FailingFree:
    """Wraps a real allocator; its next free() raises after handing the slots on."""

    def __init__(self, real) -> None:
        self.real = real
        self.fail = False

    def free(self, idx) -> None:
        self.real.free(idx)
        if self.fail:
            self.fail = False
            raise RuntimeError("free failed")

    def free_swa(self, idx) -> None:
        self.real.free_swa(idx)


def test_evict_runs_every_stage_when_the_allocator_raises() -> None:
    real = TokenToKVPoolAllocator(64)
    alloc = _FailingFree(real)
    freed_states: list[int] = []
    reported: list[int] = []

    class States:
        def free(self, states) -> None:
            freed_states.extend(np.asarray(states).tolist())

    cache = MambaRadixCache(
        token_to_kv_pool_allocator=alloc, mamba_pool=States(), on_node_evict=reported.append
    )
    for t in range(3):
        cache.insert(RadixKey([100 * t + i for i in range(8)]), real.alloc(8), mamba_value=t + 1)
    ids = {n.id for n in cache._nodes() if n.id != 0}
    alloc.fail = True
    with pytest.raises(RuntimeError, match="free failed"):
        cache.evict(24)
    assert sorted(freed_states) == [1, 2, 3]  # the state pool still got its states
    assert set(reported) == ids  # and every evicted node was reported
    assert real.available_size() == 64 and cache.total_size() == 0


def test_evict_frees_every_slot_when_on_node_evict_raises() -> None:
    real = TokenToKVPoolAllocator(64)
    reported: list[int] = []

    def on_evict(node_id: int) -> None:
        reported.append(node_id)
        raise ValueError(f"listener failed on {node_id}")

    cache = RadixCache(token_to_kv_pool_allocator=real, on_node_evict=on_evict)
    for t in range(4):
        cache.insert(RadixKey([100 * t + i for i in range(8)]), real.alloc(8))
    with pytest.raises(ValueError, match="listener failed"):
        cache.evict(32)
    assert len(reported) == 4  # every node reported although the first report raised
    assert real.available_size() == 64 and cache.total_size() == 0


def test_a_sliding_window_insert_whose_duplicate_free_raises_takes_nothing() -> None:
    real = SWATokenToKVPoolAllocator(64, 64)

    class Refusing(_FailingFree):
        def free(self, idx) -> None:  # refuses before freeing anything
            if self.fail:
                self.fail = False
                raise RuntimeError("free failed")
            self.real.free(idx)

    alloc = Refusing(real)
    cache = RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=alloc)
    first = real.alloc(8)
    cache.insert(RadixKey(list(range(1, 9))), first)
    value = real.alloc(16)  # its first 8 slots duplicate cached tokens
    key = RadixKey(list(range(1, 9)) + list(range(100, 108)))
    alloc.fail = True
    with pytest.raises(RuntimeError, match="free failed"):
        cache.insert(key, value)
    assert cache.total_size() == 8  # nothing of `value` was taken
    assert not set(cache.match_prefix(key).indices.tolist()) & set(value.tolist())
    real.free(value)  # the caller still owned all of it
    assert cache.evict(100).full_evicted == 8
    assert real.available_size() == 64


def test_bad_value_lists_raise_the_documented_errors() -> None:
    cache = RadixCache()
    with pytest.raises(InvalidValueError):
        cache.insert(RadixKey([1, 2]), [1, -2])
    with pytest.raises(InvalidKeyError):
        cache.insert(RadixKey([1, -2]), [1, 2])
    assert cache.total_size() == 0


# -- __init__ called again ----------------------------------------------------------------

REINIT = """
import numpy as np
from pymllm.mem_cache import MambaRadixCache, RadixCache, RadixKey, TokenToKVPoolAllocator
for make in (lambda a: RadixCache(token_to_kv_pool_allocator=a),
             lambda a: RadixCache(sliding_window_size=4, token_to_kv_pool_allocator=None),
             lambda a: MambaRadixCache(token_to_kv_pool_allocator=a)):
    alloc = TokenToKVPoolAllocator(100_000, need_sort=False)
    cache = make(alloc)
    # large enough that the node array and the map are mapped blocks (1 MiB and more)
    for i in range(20_000):
        cache.insert(RadixKey([i, 1]), alloc.alloc(2))
    before = cache.total_size()
    try:
        cache.__init__()
    except RuntimeError as exc:
        assert "already initialized" in str(exc), exc
    else:
        raise AssertionError("__init__ ran twice")
    assert cache.total_size() == before
    cache._check_invariants()
    cache.reset()
print("ok")
"""


def test_init_again_raises_and_keeps_the_tree() -> None:
    """__init__ on a live cache dropped the tree without giving its KV slots back (and, once
    the node array was a mapped block, freed it with free(): SIGSEGV). It now raises and
    changes nothing (a child process: the old failure was a crash)."""
    assert run_child(REINIT).strip() == "ok"


def test_a_list_keys_read_never_touches_the_item_array_past_its_end() -> None:
    """The list-key read prefetches the ints some items ahead; the item pointer it
    prefetches through is loaded from the list's array, so that load must stay inside
    it. A list whose item array ends right before a page without access (its header
    pointed there through ctypes) is matched and inserted at every length around the
    groups of four and the prefetch distance: a read past the end ends the child."""
    out = run_child(
        """
        import ctypes, mmap
        from pymllm.mem_cache import RadixCache, RadixKey

        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        PAGE = mmap.PAGESIZE
        buf = mmap.mmap(-1, 2 * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert libc.mprotect(base + PAGE, PAGE, 0) == 0  # the second page: no access

        class ListHead(ctypes.Structure):
            _fields_ = [("ob_refcnt", ctypes.c_ssize_t), ("ob_type", ctypes.c_void_p),
                        ("ob_size", ctypes.c_ssize_t), ("ob_item", ctypes.c_void_p),
                        ("allocated", ctypes.c_ssize_t)]

        ints = list(range(1000, 1100))  # the borrowed items, kept alive here
        cache = RadixCache()
        for n in range(90):
            lst = [0] * n
            head = ListHead.from_address(id(lst))
            saved = head.ob_item, head.allocated
            start = base + PAGE - 8 * n  # items[n] would be on the closed page
            items = (ctypes.c_void_p * n).from_address(start)
            for j in range(n):
                items[j] = id(ints[j])
            head.ob_item, head.allocated = start, n
            try:
                cache.match_prefix(RadixKey(lst))
                cache.insert(RadixKey(lst), list(range(n)))
                assert cache.match_prefix(RadixKey(lst)).prefix_len == n
            finally:
                head.ob_item, head.allocated = saved
        cache._check_invariants()
        print("read", n)
        """
    )
    assert out.split() == ["read", "89"]
