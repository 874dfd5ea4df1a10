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
from pymllm.mem_cache.radix_cache import RadixCache as RadixCache
from pymllm.mem_cache.radix_cache import TreeNode as TreeNode

__all__ = [
    "BasePrefixCache",
    "ChunkCache",
    "EvictResult",
    "InsertResult",
    "MambaRadixCache",
    "MambaTreeNode",
    "MatchResult",
    "RadixCache",
    "RadixKey",
    "TreeNode",
    "hash_bytes",
    "hash_to_int64",
    "hash_token_ids",
]
