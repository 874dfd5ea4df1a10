"""A subclass's own ``__reduce__`` is Python's hook for making it picklable and copyable
(say, rebuilding an empty cache or allocator of the same configuration in a worker).
``object.__reduce_ex__`` honours it; a base-class ``__reduce_ex__`` that always raises
hides it. The previous release honoured it for the allocators and the caches."""

from __future__ import annotations

import copy
import pickle

import pytest

from pymllm.mem_cache import RadixCache, SWATokenToKVPoolAllocator, TokenToKVPoolAllocator


class FreshAllocator(TokenToKVPoolAllocator):
    def __reduce__(self):
        return (FreshAllocator, (8,))


class FreshSWAAllocator(SWATokenToKVPoolAllocator):
    def __reduce__(self):
        return (FreshSWAAllocator, (8, 4))


class FreshCache(RadixCache):
    def __reduce__(self):
        return (FreshCache, ())


MAKERS = {
    "allocator": lambda: FreshAllocator(8),
    "swa-allocator": lambda: FreshSWAAllocator(8, 4),
    "cache": FreshCache,
}


@pytest.mark.parametrize("kind", list(MAKERS))
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_subclass_reduce_is_used_by_pickle(kind: str, protocol: int) -> None:
    obj = MAKERS[kind]()
    back = pickle.loads(pickle.dumps(obj, protocol=protocol))
    assert type(back) is type(obj)
    assert back is not obj


@pytest.mark.parametrize("kind", list(MAKERS))
def test_subclass_reduce_is_used_by_copy(kind: str) -> None:
    obj = MAKERS[kind]()
    assert type(copy.copy(obj)) is type(obj)
    assert type(copy.deepcopy(obj)) is type(obj)


def test_plain_objects_still_refuse() -> None:
    with pytest.raises(TypeError, match="cannot pickle"):
        pickle.dumps(TokenToKVPoolAllocator(8))
    with pytest.raises(TypeError, match="cannot pickle"):
        copy.copy(RadixCache())
