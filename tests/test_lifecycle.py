"""Caches and allocators outside their normal life: never initialized, initialized by an
``__init__`` that raised, copied or pickled, rebuilt by a ``reset()`` that ran out of memory.

Each case was a defect: an object whose ``__init__`` never ran (``__new__``, a subclass
that skipped ``super().__init__()``) crashed the process on its first call (SIGSEGV in
the tree, SIGFPE or SIGSEGV in the allocators); ``copy.copy`` of an allocator gave a second
object sharing its free list, and Cython's generated ``__setstate__`` could swap a fresh
free list under slots that callers still held. The crash cases run in a child process, so
that a regression fails one test instead of ending the run.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from conftest import run_child  # tests/ is on sys.path (rootdir conftest)

from pymllm.mem_cache import (
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import (
    CacheError,
    NotInitializedError,
)
from pymllm.mem_cache.memory_pool import KVPool, MambaPool, ReqToTokenPool

UNINITIALIZED = """
from pymllm.mem_cache import (
    MambaRadixCache, RadixCache, RadixKey, SWATokenToKVPoolAllocator, TokenToKVPoolAllocator,
)
from pymllm.mem_cache.errors import NotInitializedError

K = RadixKey([1, 2, 3])
CACHE_CALLS = {
    "match_prefix": lambda c: c.match_prefix(K),
    "insert": lambda c: c.insert(K, [1, 2, 3]),
    "evict": lambda c: c.evict(1),
    "inc_lock_ref": lambda c: c.inc_lock_ref(None),
    "evictable_size": lambda c: c.evictable_size(),
    "protected_size": lambda c: c.protected_size(),
    "total_size": lambda c: c.total_size(),
    "root_node": lambda c: c.root_node,
    "pretty_print": lambda c: c.pretty_print(),
    "reset": lambda c: c.reset(),
    "_check_invariants": lambda c: c._check_invariants(),
}
ALLOC_CALLS = {
    "alloc": lambda a: a.alloc(1),
    "free": lambda a: a.free([1]),
    "free empty": lambda a: a.free([]),
    "available_size": lambda a: a.available_size(),
    "free_group_begin": lambda a: a.free_group_begin(),
    "free_group_end": lambda a: a.free_group_end(),
    "merge_and_sort_free": lambda a: a.merge_and_sort_free(),
    "clear": lambda a: a.clear(),
    "is_allocated": lambda a: a.is_allocated([1]),
    "_check_invariants": lambda a: a._check_invariants(),
}
SWA_CALLS = {
    "free_swa": lambda a: a.free_swa([1]),
    "translate_loc_from_full_to_swa": lambda a: a.translate_loc_from_full_to_swa([1]),
    "full_available_size": lambda a: a.full_available_size(),
    "swa_available_size": lambda a: a.swa_available_size(),
    "full_to_swa_index_mapping": lambda a: a.full_to_swa_index_mapping,
}


class SkipsInit(RadixCache):
    def __init__(self):  # forgets super().__init__()
        pass


class AllocSkipsInit(TokenToKVPoolAllocator):
    def __init__(self, size):
        self.wanted = size


objects = {
    "RadixCache.__new__": (RadixCache.__new__(RadixCache), CACHE_CALLS),
    "MambaRadixCache.__new__": (MambaRadixCache.__new__(MambaRadixCache), CACHE_CALLS),
    "subclass of RadixCache": (SkipsInit(), CACHE_CALLS),
    "TokenToKVPoolAllocator.__new__": (
        TokenToKVPoolAllocator.__new__(TokenToKVPoolAllocator), ALLOC_CALLS
    ),
    "subclass of TokenToKVPoolAllocator": (AllocSkipsInit(8), ALLOC_CALLS),
    "SWATokenToKVPoolAllocator.__new__": (
        SWATokenToKVPoolAllocator.__new__(SWATokenToKVPoolAllocator),
        {**ALLOC_CALLS, **SWA_CALLS},
    ),
}
for name, (obj, calls) in objects.items():
    repr(obj)
    for call, f in calls.items():
        try:
            f(obj)
        except NotInitializedError:
            continue
        print(f"{name}.{call}: no NotInitializedError")
print("ok")
"""


def test_objects_whose_init_never_ran_raise_not_initialized() -> None:
    """Every public call of a cache or allocator whose __init__ never ran raises
    NotInitializedError (it crashed the process before)."""
    assert run_child(UNINITIALIZED).strip() == "ok"


class _AllocSkipsInit(TokenToKVPoolAllocator):
    def __init__(self, size: int) -> None:
        self.wanted = size


@pytest.mark.parametrize(
    "cls", [TokenToKVPoolAllocator, _AllocSkipsInit, SWATokenToKVPoolAllocator]
)
def test_a_cache_refuses_an_allocator_whose_init_never_ran(cls: type) -> None:
    """Such an allocator has no slots (its page_size is still 0): the cache's constructor
    says so with NotInitializedError instead of dividing by that page_size
    (ZeroDivisionError before)."""
    alloc = cls(8) if cls is _AllocSkipsInit else cls.__new__(cls)
    kwargs: dict = {"sliding_window_size": 4} if cls is SWATokenToKVPoolAllocator else {}
    for make in (RadixCache, MambaRadixCache):
        if make is MambaRadixCache and kwargs:
            continue
        with pytest.raises(NotInitializedError, match=r"token_to_kv_pool_allocator: .*__init__"):
            make(token_to_kv_pool_allocator=alloc, **kwargs)


def test_not_initialized_error_is_a_cache_error_and_a_runtime_error() -> None:
    assert issubclass(NotInitializedError, CacheError)
    assert issubclass(NotInitializedError, RuntimeError)


# The cases below call into objects whose __init__ failed; before the fix such calls
# crashed, so they run in a child process too (PRELUDE: imports and `expect`).
PRELUDE = """
import numpy as np
from pymllm.mem_cache import (
    RadixCache, RadixKey, SWATokenToKVPoolAllocator, TokenToKVPoolAllocator,
)
from pymllm.mem_cache import _radix_tree
from pymllm.mem_cache.errors import InvalidValueError, NotInitializedError, StaleNodeError

def expect(exc, match, f, *args, **kwargs):
    try:
        f(*args, **kwargs)
    except exc as e:
        assert match in str(e), (match, str(e))
        return
    raise AssertionError(f"{f} did not raise {exc.__name__}")
"""

RETRY_AFTER_FAILED_INIT = """
cache = RadixCache.__new__(RadixCache)
expect(InvalidValueError, "page_size", cache.__init__, page_size=0)
expect(NotInitializedError, "__init__", cache.match_prefix, RadixKey([1]))
cache.__init__(page_size=2)
assert cache.insert(RadixKey([1, 2, 3]), [1, 2, 3]).prefix_len == 0
assert cache.total_size() == 2
# nothing of a failed __init__ stays: here, sliding-window mode
windowed = RadixCache.__new__(RadixCache)
expect(InvalidValueError, "page_size", windowed.__init__, page_size=0, sliding_window_size=4)
windowed.__init__()
windowed.insert(RadixKey([1, 2, 3]), [1, 2, 3])
assert windowed.sliding_window_size is None
assert (windowed.swa_evictable_size(), windowed.evictable_size()) == (0, 3)
print("ok")
"""


def test_an_init_that_raised_can_be_retried() -> None:
    assert run_child(PRELUDE + RETRY_AFTER_FAILED_INIT).strip() == "ok"


HALF_BUILT_SWA_ALLOCATOR = """
alloc = SWATokenToKVPoolAllocator.__new__(SWATokenToKVPoolAllocator)
expect(InvalidValueError, "do not fit", alloc.__init__, 8, 2**31 - 1)
expect(NotInitializedError, "__init__", alloc.alloc, 1)
alloc.__init__(8, 4)
assert alloc.available_size() == 4
slots = alloc.alloc(4)
assert slots is not None and alloc.is_allocated(slots).all()
print("ok")
"""


def test_a_sliding_window_allocator_whose_init_raised_is_not_half_built() -> None:
    """Its full side was built before the SWA side's size check failed: the object then
    refused a second __init__ and crashed on use. Now nothing is kept."""
    assert run_child(PRELUDE + HALF_BUILT_SWA_ALLOCATOR).strip() == "ok"


@pytest.mark.parametrize(
    "make",
    [
        lambda: RadixCache(),
        lambda: RadixCache().insert(RadixKey([1, 2]), [1, 2]).last_node,
        lambda: MambaRadixCache(),
        lambda: TokenToKVPoolAllocator(8),
        lambda: SWATokenToKVPoolAllocator(8, 4),
        lambda: KVPool(8, 1, 1, 2, dtype=np.float32),
        lambda: ReqToTokenPool(4, 8),
        lambda: MambaPool(2, 1, (2,), (2,)),
    ],
    ids=[
        "cache",
        "handle",
        "mamba-cache",
        "allocator",
        "swa-allocator",
        "kv-pool",
        "req-to-token-pool",
        "mamba-pool",
    ],
)
@pytest.mark.parametrize(
    "duplicate", [copy.copy, copy.deepcopy, pickle.dumps], ids=["copy", "deepcopy", "pickle"]
)
def test_caches_handles_and_allocators_cannot_be_copied(make, duplicate) -> None:
    """They stand for slot ownership: copy.copy of an allocator shared its free list (two
    objects handing out the same slots), a handle's generated __setstate__ could name any
    slot, and a copied pool shared its buffers, which the original's next update deleted."""
    obj = make()
    with pytest.raises(TypeError, match="cannot pickle"):
        duplicate(obj)
    assert not hasattr(obj, "__setstate_cython__")


RESET_OUT_OF_MEMORY = """
alloc = TokenToKVPoolAllocator(64, need_sort=False)
cache = RadixCache(token_to_kv_pool_allocator=alloc)
slots = alloc.alloc(20)
cache.insert(RadixKey(list(range(20))), slots)
stale = cache.match_prefix(RadixKey(list(range(20)))).last_node
_radix_tree._fail_next_storage_inits(1)
expect(MemoryError, "injected", cache.reset)
assert alloc.available_size() == 64  # the tree's 20 slots went back all the same
assert not alloc.is_allocated(slots).any()
expect(NotInitializedError, "__init__", cache.total_size)
# __init__ again brings it back; node ids are not reused, so the old handle stays stale
cache.__init__(token_to_kv_pool_allocator=alloc)
again = alloc.alloc(20)
r = cache.insert(RadixKey(list(range(20))), again)
assert r.prefix_len == 0 and r.last_node.id != stale.id
assert stale.evicted
expect(StaleNodeError, "", cache.inc_lock_ref, stale)
cache._check_invariants()
cache.reset()
assert alloc.available_size() == 64
print("ok")
"""


def test_a_reset_that_runs_out_of_memory_still_frees_every_slot() -> None:
    assert run_child(PRELUDE + RESET_OUT_OF_MEMORY).strip() == "ok"


INIT_OUT_OF_MEMORY = """
_radix_tree._fail_next_storage_inits(1)
cache = RadixCache.__new__(RadixCache)
expect(MemoryError, "injected", cache.__init__)
expect(NotInitializedError, "__init__", cache.evict, 1)
cache.__init__()
cache.insert(RadixKey([5, 6]), np.array([1, 2], dtype=np.int32))
cache._check_invariants()
assert cache.total_size() == 2
print("ok")
"""


def test_an_init_that_runs_out_of_memory_leaves_no_half_tree() -> None:
    assert run_child(PRELUDE + INIT_OUT_OF_MEMORY).strip() == "ok"


def test_a_reset_whose_python_free_raises_still_empties_the_tree() -> None:
    """As documented (``reset``, docs/design.md): the pool's own ``free`` decides what happens to
    the slots it was handed; the tree is empty either way and the exception propagates."""

    class Busy(TokenToKVPoolAllocator):
        def free(self, indices):  # type: ignore[no-untyped-def]
            raise RuntimeError("pool busy")

    alloc = Busy(64)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    node = cache.insert(RadixKey([1, 2, 3]), alloc.alloc(3)).last_node
    with pytest.raises(RuntimeError, match="pool busy"):
        cache.reset()
    assert cache.total_size() == 0 and node.evicted
    cache._check_invariants()
    assert cache.insert(RadixKey([1, 2]), alloc.alloc(2)).prefix_len == 0
