"""Prefix (KV) cache for JAX LLM inference.

The compiled radix tree (:class:`RadixCache`, :class:`MambaRadixCache`) hands out KV slot
indices; the JAX pools (:mod:`pymllm.mem_cache.memory_pool`) hold the KV those slots name.
"""

from typing import TYPE_CHECKING

from pymllm.mem_cache._allocator import SWATokenToKVPoolAllocator as SWATokenToKVPoolAllocator
from pymllm.mem_cache._allocator import TokenToKVPoolAllocator as TokenToKVPoolAllocator
from pymllm.mem_cache._radix_tree import EVICTION_POLICIES as EVICTION_POLICIES
from pymllm.mem_cache.base_prefix_cache import BasePrefixCache as BasePrefixCache
from pymllm.mem_cache.base_prefix_cache import EvictResult as EvictResult
from pymllm.mem_cache.base_prefix_cache import InsertResult as InsertResult
from pymllm.mem_cache.base_prefix_cache import MatchResult as MatchResult
from pymllm.mem_cache.base_prefix_cache import RadixKey as RadixKey
from pymllm.mem_cache.base_prefix_cache import hash_bytes as hash_bytes
from pymllm.mem_cache.base_prefix_cache import hash_to_int64 as hash_to_int64
from pymllm.mem_cache.base_prefix_cache import hash_token_ids as hash_token_ids
from pymllm.mem_cache.chunk_cache import ChunkCache as ChunkCache
from pymllm.mem_cache.errors import AllocatorStateError as AllocatorStateError
from pymllm.mem_cache.errors import AlreadyInitializedError as AlreadyInitializedError
from pymllm.mem_cache.errors import BuffersDeletedError as BuffersDeletedError
from pymllm.mem_cache.errors import CacheError as CacheError
from pymllm.mem_cache.errors import InvalidFreeError as InvalidFreeError
from pymllm.mem_cache.errors import InvalidKeyError as InvalidKeyError
from pymllm.mem_cache.errors import InvalidValueError as InvalidValueError
from pymllm.mem_cache.errors import LockStateError as LockStateError
from pymllm.mem_cache.errors import NotInitializedError as NotInitializedError
from pymllm.mem_cache.errors import ReentrantCallError as ReentrantCallError
from pymllm.mem_cache.errors import StaleNodeError as StaleNodeError
from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache as MambaRadixCache
from pymllm.mem_cache.mamba_radix_cache import MambaTreeNode as MambaTreeNode
from pymllm.mem_cache.radix_cache import RadixCache as RadixCache
from pymllm.mem_cache.radix_cache import TreeNode as TreeNode

# The device pools need JAX; import them on first use so that a host-only user of the
# tree (a replay tool, a scheduler test) does not pay for initialising JAX. A type checker
# sees them as imported (the package ships py.typed: they are typed, not Any).
if TYPE_CHECKING:
    from pymllm.mem_cache.memory_pool import KVPool as KVPool
    from pymllm.mem_cache.memory_pool import MambaPool as MambaPool
    from pymllm.mem_cache.memory_pool import ReqToTokenPool as ReqToTokenPool
    from pymllm.mem_cache.memory_pool import (
        make_full_attention_net_mem_pool as make_full_attention_net_mem_pool,
    )
    from pymllm.mem_cache.memory_pool import make_req_to_token_pool as make_req_to_token_pool

_DEVICE_NAMES = frozenset(
    {
        "KVPool",
        "MambaPool",
        "ReqToTokenPool",
        "make_full_attention_net_mem_pool",
        "make_req_to_token_pool",
    }
)


if not TYPE_CHECKING:  # a type checker would take every misspelt name for a lazy one

    def __getattr__(name: str):
        if name in _DEVICE_NAMES:
            from pymllm.mem_cache import memory_pool

            return getattr(memory_pool, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the device pools, which load on first use (tab completion
    and ``help`` list them before they are loaded)."""
    return sorted(set(globals()) | _DEVICE_NAMES)


__all__ = [
    "EVICTION_POLICIES",
    "AllocatorStateError",
    "AlreadyInitializedError",
    "BasePrefixCache",
    "BuffersDeletedError",
    "CacheError",
    "ChunkCache",
    "EvictResult",
    "InsertResult",
    "InvalidFreeError",
    "InvalidKeyError",
    "InvalidValueError",
    "KVPool",
    "LockStateError",
    "MambaPool",
    "MambaRadixCache",
    "MambaTreeNode",
    "MatchResult",
    "NotInitializedError",
    "RadixCache",
    "RadixKey",
    "ReentrantCallError",
    "ReqToTokenPool",
    "SWATokenToKVPoolAllocator",
    "StaleNodeError",
    "TokenToKVPoolAllocator",
    "TreeNode",
    "hash_bytes",
    "hash_to_int64",
    "hash_token_ids",
    "make_full_attention_net_mem_pool",
    "make_req_to_token_pool",
]
