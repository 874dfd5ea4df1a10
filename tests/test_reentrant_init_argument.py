"""A second ``__init__`` run from inside the first one's argument conversion.

The allocators and pools refuse ``__init__`` on a live object (``AlreadyInitializedError``):
run again, it would drop the slots its owners still hold. They check that first, then
convert their arguments, whose ``__index__`` is Python code. That code can run ``__init__``
to completion on the same object and take slots from it; the outer call then goes on and
replaces the free list, so the same slots are handed out a second time.

Expected: one of the two calls raises ``AlreadyInitializedError`` (the object keeps the
state the inner one gave it), so no slot that a caller or a cache holds is ever free again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from pymllm.mem_cache import RadixCache, RadixKey
from pymllm.mem_cache.errors import AlreadyInitializedError
from pymllm.mem_cache.memory_pool import (
    KVPool,
    MambaPool,
    ReqToTokenPool,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)


class _InitFromIndex:
    """An int whose ``__index__`` first runs *inner* (a complete ``__init__`` of the object
    being built, then an ``alloc`` of all of it)."""

    def __init__(self, value: int, inner: Callable[[], None]) -> None:
        self.value = value
        self.inner = inner

    def __index__(self) -> int:
        self.inner()
        return self.value


def _take_slots(obj: Any) -> Any:
    return obj.alloc(4)


def _slots_still_held(obj: Any, taken: Any) -> bool:
    return obj.available_size() == 0 and obj.alloc(1) is None


# kind -> (class, the outer __init__'s arguments around the size, the inner __init__,
# what a user takes from the inner one's object, whether it is still theirs afterwards)
_CASES: dict[
    str, tuple[type, Callable[[Any], tuple[Any, ...]], Callable[[Any], None], Any, Any]
] = {
    "allocator": (
        TokenToKVPoolAllocator,
        lambda size: (size,),
        lambda obj: obj.__init__(4),
        _take_slots,
        _slots_still_held,
    ),
    "swa allocator": (
        SWATokenToKVPoolAllocator,
        lambda size: (size, 4),
        lambda obj: obj.__init__(4, 4),
        _take_slots,
        _slots_still_held,
    ),
    "mamba pool": (
        MambaPool,
        lambda size: (size, 1, (2,), (2,)),
        lambda obj: obj.__init__(4, 1, (2,), (2,)),
        _take_slots,
        _slots_still_held,
    ),
    "kv pool": (
        KVPool,
        lambda size: (size, 1, 1, 2),
        lambda obj: obj.__init__(4, 1, 1, 2),
        lambda obj: obj.buffers,
        lambda obj, taken: obj.buffers is taken,  # not replaced under its user
    ),
    "req-to-token pool": (
        ReqToTokenPool,
        lambda size: (size, 8),
        lambda obj: obj.__init__(4, 8),
        _take_slots,
        _slots_still_held,
    ),
}


@pytest.mark.parametrize("kind", list(_CASES))
def test_init_reentered_from_an_argument_is_refused(kind: str) -> None:
    """One of the two runs is refused: either the inner one (the pools refuse an __init__
    while one runs) or the outer one once its arguments are read (the allocators); then
    what the inner one handed out is still its holder's."""
    cls, outer_args, inner_init, take, still_held = _CASES[kind]
    obj = cls.__new__(cls)
    held: list[Any] = []

    def inner() -> None:
        inner_init(obj)
        held.append(take(obj))

    with pytest.raises(AlreadyInitializedError):  # neither was refused before
        obj.__init__(*outer_args(_InitFromIndex(4, inner)))
    if held:
        assert still_held(obj, held[0])
    else:  # the outer run raised: the object is not initialized, and can be now
        obj.__init__(*outer_args(4))
        assert still_held(obj, take(obj))


def test_cache_slots_survive_a_reentered_allocator_init() -> None:
    """The same hole with a radix cache on the allocator: after the outer __init__ the
    cache's slots were free in a fresh free list (handed out again by the next alloc), and
    the cache's evict then raised InvalidFreeError (the allocator no longer knew them)."""
    alloc = TokenToKVPoolAllocator.__new__(TokenToKVPoolAllocator)
    caches: list[RadixCache] = []

    def inner() -> None:
        alloc.__init__(4)
        cache = RadixCache(token_to_kv_pool_allocator=alloc)
        cache.insert(RadixKey([7, 8, 9, 10]), alloc.alloc(4))
        caches.append(cache)

    with contextlib.suppress(AlreadyInitializedError):
        alloc.__init__(_InitFromIndex(4, inner))
    if not caches:
        return
    assert alloc.is_cached(np.arange(1, 5)).all()
    assert alloc.alloc(1) is None
    caches[0].evict(4)  # raised InvalidFreeError
    alloc._check_invariants()
    assert alloc.available_size() == 4
