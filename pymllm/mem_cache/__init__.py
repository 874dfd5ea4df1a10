"""Prefix (KV) cache for JAX LLM inference.

The compiled radix tree (:class:`RadixCache`, :class:`MambaRadixCache`) hands out KV slot
indices; the JAX pools (:mod:`pymllm.mem_cache.memory_pool`) hold the KV those slots name.
"""

from pymllm.mem_cache.base_prefix_cache import BasePrefixCache as BasePrefixCache
from pymllm.mem_cache.base_prefix_cache import EvictResult as EvictResult
from pymllm.mem_cache.base_prefix_cache import InsertResult as InsertResult
from pymllm.mem_cache.base_prefix_cache import MatchResult as MatchResult
from pymllm.mem_cache.base_prefix_cache import RadixKey as RadixKey
from pymllm.mem_cache.base_prefix_cache import hash_bytes as hash_bytes
from pymllm.mem_cache.base_prefix_cache import hash_to_int64 as hash_to_int64
from pymllm.mem_cache.base_prefix_cache import hash_token_ids as hash_token_ids
from pymllm.mem_cache.chunk_cache import ChunkCache as ChunkCache
from pymllm.mem_cache.mamba_radix_cache import MambaRadixCache as MambaRadixCache
from pymllm.mem_cache.mamba_radix_cache import MambaTreeNode as MambaTreeNode
from pymllm.mem_cache.memory_pool import KVPool as KVPool
from pymllm.mem_cache.memory_pool import MambaPool as MambaPool
from pymllm.mem_cache.memory_pool import ReqToTokenPool as ReqToTokenPool
from pymllm.mem_cache.memory_pool import SWATokenToKVPoolAllocator as SWATokenToKVPoolAllocator
from pymllm.mem_cache.memory_pool import TokenToKVPoolAllocator as TokenToKVPoolAllocator
from pymllm.mem_cache.memory_pool import (
    make_full_attention_net_mem_pool as make_full_attention_net_mem_pool,
)
from pymllm.mem_cache.memory_pool import make_req_to_token_pool as make_req_to_token_pool
from pymllm.mem_cache.radix_cache import RadixCache as RadixCache
from pymllm.mem_cache.radix_cache import TreeNode as TreeNode

__all__ = [
    "BasePrefixCache",
    "ChunkCache",
    "EvictResult",
    "InsertResult",
    "KVPool",
    "MambaPool",
    "MambaRadixCache",
    "MambaTreeNode",
    "MatchResult",
    "RadixCache",
    "RadixKey",
    "ReqToTokenPool",
    "SWATokenToKVPoolAllocator",
    "TokenToKVPoolAllocator",
    "TreeNode",
    "hash_bytes",
    "hash_to_int64",
    "hash_token_ids",
    "make_full_attention_net_mem_pool",
    "make_req_to_token_pool",
]
