"""The public API as a user's type checker sees it: checked by mypy in CI (``.ci/run``),
never run. A line marked ``# type: ignore[code]`` must stay that error: the module is
checked with ``warn_unused_ignores``, so a stub that lets the mistake through fails CI."""

from __future__ import annotations

from typing import assert_type

import numpy as np
from numpy.typing import NDArray

import pymllm.mem_cache
from pymllm.mem_cache import (
    KVPool,
    MambaRadixCache,
    MambaTreeNode,
    RadixCache,
    RadixKey,
    TreeNode,
    hash_bytes,
)


def radix(cache: RadixCache, key: RadixKey) -> None:
    cache.insert(key, None, prev_prefix_len=0, swa_evicted_seqlen=0, priority=1)
    cache.insert(key, None, prev_prefix=0)  # type: ignore[call-arg]  # a misspelt keyword
    node = cache.root_node
    assert_type(node, TreeNode)
    assert_type(node.value, NDArray[np.int32])
    assert_type(cache.inc_lock_ref(node), int | None)
    assert_type(cache.children(node), list[TreeNode])
    TreeNode()  # type: ignore[call-arg]  # handles come from a cache
    MambaTreeNode()  # type: ignore[call-arg]


def mamba(cache: MambaRadixCache, key: RadixKey) -> None:
    cache.insert(key, None, mamba_value=3, priority=1)
    cache.insert(key, None, prev_prefix_len=0)  # type: ignore[call-arg]  # not a Mamba one
    root = cache.root_node
    assert_type(root, MambaTreeNode)
    assert_type(root.mamba_value, NDArray[np.int32] | None)
    assert_type(cache.children(root), list[MambaTreeNode])
    assert_type(cache.inc_lock_ref(root), bool)


def hashing() -> None:
    for data in (b"ab", bytearray(b"ab"), memoryview(b"ab"), np.zeros(2, np.uint8)):
        assert_type(hash_bytes(data), int)
    hash_bytes("ab")  # type: ignore[arg-type]  # text has no bytes of its own


def pools(pool: KVPool) -> None:
    assert_type(pymllm.mem_cache.KVPool, type[KVPool])  # a lazy name: typed all the same
    _ = pymllm.mem_cache.KVPol  # type: ignore[attr-defined]  # a misspelt name, no lazy one
    pool.get_kv(0, np.arange(1, 3, dtype=np.int32))
