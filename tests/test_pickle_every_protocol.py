"""Pickling at protocols 0 and 1 goes through ``copyreg._reduce_ex``, which builds the
first compiled base class from the object itself (``RadixTreeCore(cache)``). For the
caches and for Python subclasses of the allocators that call raised a ``ValueError``
(``InvalidValueError: page_size: expected an int >= 1, got RadixCache ...``) or a
``TypeError`` about ``__init__`` arguments, instead of the ``TypeError("cannot pickle
...")`` that protocols 2-5, ``copy.copy`` and ``copy.deepcopy`` raise."""

from __future__ import annotations

import pickle

import pytest

from pymllm.mem_cache import (
    MambaRadixCache,
    RadixCache,
    RadixKey,
    SWATokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)


class _Alloc(TokenToKVPoolAllocator):
    pass


class _SWAAlloc(SWATokenToKVPoolAllocator):
    pass


def _used_cache() -> RadixCache:
    alloc = TokenToKVPoolAllocator(16)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    cache.insert(RadixKey([1, 2, 3]), alloc.alloc(3))
    return cache


MAKERS = {
    "cache": RadixCache,
    "used-cache": _used_cache,
    "windowed-cache": lambda: RadixCache(sliding_window_size=4),
    "mamba-cache": MambaRadixCache,
    "cache-without-init": lambda: RadixCache.__new__(RadixCache),
    "allocator-subclass": lambda: _Alloc(8),
    "swa-allocator-subclass": lambda: _SWAAlloc(8, 4),
}


@pytest.mark.parametrize("protocol", [0, 1])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_low_protocol_pickle_raises_cannot_pickle(kind: str, protocol: int) -> None:
    obj = MAKERS[kind]()
    with pytest.raises(TypeError, match="cannot pickle"):
        pickle.dumps(obj, protocol=protocol)


@pytest.mark.parametrize("kind", ["cache", "mamba-cache", "allocator-subclass"])
def test_reduce_raises_cannot_pickle(kind: str) -> None:
    obj = MAKERS[kind]()
    with pytest.raises(TypeError, match="cannot pickle"):
        obj.__reduce__()
