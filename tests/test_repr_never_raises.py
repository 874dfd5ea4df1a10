"""``repr`` must answer in every state: it is what logging, tracebacks and debuggers
call, often in the handler of the very error that left the object in that state."""

from __future__ import annotations

import numpy as np
import pytest

from pymllm.mem_cache import (
    MambaRadixCache,
    RadixCache,
    RadixKey,
    TokenToKVPoolAllocator,
    _radix_tree,
)
from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import KVPool


@pytest.mark.parametrize("make", [RadixCache, MambaRadixCache], ids=["radix", "mamba"])
def test_handle_repr_after_a_reset_that_ran_out_of_memory(make) -> None:
    """TreeNode's docstring: once its node is gone a handle reads ``evicted`` and its ``repr``
    says so. A reset that runs out of memory rebuilding the tree has handed every node's
    slots back; reading the handle's ``evicted`` or repr then raised NotInitializedError."""
    alloc = TokenToKVPoolAllocator(16)
    cache = make(token_to_kv_pool_allocator=alloc)
    node = cache.insert(RadixKey([1, 2, 3]), alloc.alloc(3)).last_node
    root = cache.root_node
    _radix_tree._fail_next_storage_inits(1)
    with pytest.raises(MemoryError):
        cache.reset()
    assert alloc.available_size() == 16  # the node is gone
    assert node.evicted and root.evicted  # a handle to a node that is gone says so
    assert "evicted" in repr(node)
    assert "evicted" in str(node)
    assert isinstance(repr(root), str)


def test_kv_pool_repr_without_init() -> None:
    pool = KVPool.__new__(KVPool)
    assert "KVPool" in repr(pool)


def test_kv_pool_repr_after_init_raised() -> None:
    pool = KVPool.__new__(KVPool)
    with pytest.raises(InvalidValueError):
        pool.__init__(8, 1, 1, 2, dtype="not-a-dtype")
    assert "KVPool" in repr(pool)


@pytest.mark.parametrize("tokens", [None, 5, np.int32(3)], ids=["none", "int", "numpy-scalar"])
def test_radix_key_repr_of_tokens_the_caches_refuse(tokens) -> None:
    """A key the caches refuse (InvalidKeyError) is what an error handler logs; its repr
    raised TypeError (``len()`` / iteration of a non-sequence)."""
    text = repr(RadixKey(tokens))
    assert text.startswith("RadixKey(")


@pytest.mark.parametrize(
    "tokens", [np.int32(3), np.int64(3), np.array(3)], ids=["int32", "int64", "0d-array"]
)
def test_radix_key_repr_of_scalar_token_ids_shows_the_value(tokens) -> None:
    """A numpy scalar or 0-d array is read as a 0-d array, which does not iterate: the repr
    printed ``<ndarray>``, losing the refused value the handler logs."""
    text = repr(RadixKey(tokens))
    assert "<ndarray>" not in text and "3" in text
