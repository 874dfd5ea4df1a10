"""Tests from a mutation review of the namespace table, the evict's hand-over, the
refusal of deleted jax arrays and the trace checks: each fails on a mutant of that code
that every other test let through (a changed condition, a dropped statement)."""

from __future__ import annotations

import json
from collections import deque

import jax.numpy as jnp
import numpy as np
import pytest

from pymllm.engine.workloads import load_mooncake_trace
from pymllm.mem_cache import (
    RadixCache,
    RadixKey,
    TokenToKVPoolAllocator,
    _radix_tree,
)
from pymllm.mem_cache.errors import InvalidKeyError, InvalidValueError

try:  # CPython's test helpers: fail the n-th allocation (absent from some builds)
    import _testcapi
except ImportError:
    _testcapi = None


def write_trace(tmp_path, lines):
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def rec(ts=0, n_in=600, n_out=4, ids=(1, 2)):
    return {"timestamp": ts, "input_length": n_in, "output_length": n_out, "hash_ids": list(ids)}


@pytest.mark.parametrize("scale", [True, False, np.bool_(True)])
def test_time_scale_refuses_a_bool(tmp_path, scale):
    # a bool is not a scale (without its check True read as 1)
    path = write_trace(tmp_path, [rec(0), rec(10)])
    with pytest.raises(ValueError, match="time_scale must be a number"):
        load_mooncake_trace(path, vocab_size=100, time_scale=scale)


def test_block_size_is_not_bounded_by_int32(tmp_path):
    # the int32 bound is the replay's, not the workload reader's: it draws only the
    # tokens it reads, so a huge block size is valid
    path = write_trace(tmp_path, [rec(0, n_in=5, ids=(1,))])
    wl = load_mooncake_trace(path, vocab_size=100, block_size=2**31)
    assert [len(r.prompt) for r in wl.requests] == [5]


def _deleted():
    x = jnp.asarray(1, jnp.int32)
    x.delete()
    return x


@pytest.mark.parametrize("container", [list, tuple, deque])
def test_a_deleted_item_of_a_deque_is_a_typed_error(container) -> None:
    alloc = TokenToKVPoolAllocator(8)
    slots = alloc.alloc(3)
    with pytest.raises(InvalidValueError, match="item 1 is a deleted array"):
        alloc.free(container([int(slots[0]), _deleted()]))
    assert alloc.available_size() == 5
    assert alloc.is_allocated(slots).all()


class Boom:
    """An integer-like whose __index__ raises a RuntimeError of its own."""

    def __index__(self) -> int:
        raise RuntimeError("boom from __index__")


@pytest.mark.parametrize("where", ["key", "value"])
def test_a_runtime_error_of_index_propagates_unchanged(where: str) -> None:
    alloc = TokenToKVPoolAllocator(16)
    cache = RadixCache(token_to_kv_pool_allocator=alloc)
    v = alloc.alloc(3)
    if where == "key":
        key, value = RadixKey([1, Boom(), 3]), v
    else:
        key, value = RadixKey([1, 2, 3]), [int(v[0]), Boom(), int(v[2])]
    with pytest.raises(RuntimeError, match="boom from __index__"):
        cache.insert(key, value)
    assert cache.total_size() == 0
    cache._check_invariants()


@pytest.mark.parametrize("where", ["key", "value"])
def test_a_deleted_item_names_the_argument_alone(where: str) -> None:
    """The error names the argument (the part of _as_index's message before ':'), as for
    a deleted array passed whole."""
    cache = RadixCache()
    if where == "key":
        key, value, err = RadixKey([1, _deleted(), 3]), [1, 2, 3], InvalidKeyError
        msg = r"^token_ids: the array was deleted"
    else:
        key, value, err = RadixKey([1, 2, 3]), [1, _deleted(), 3], InvalidValueError
        msg = r"^value: the array was deleted"
    with pytest.raises(err, match=msg):
        cache.insert(key, value)
    assert cache.total_size() == 0


class BadHash:
    """Hashes fine `ok` times, then raises (the lookup succeeds, the registration fails)."""

    def __init__(self, ok: int) -> None:
        self.ok = ok

    def __hash__(self) -> int:
        if self.ok <= 0:
            raise ValueError("no hash")
        self.ok -= 1
        return 7

    def __eq__(self, other: object) -> bool:
        return self is other


@pytest.mark.parametrize("ok", [0, 1, 2, 3])
def test_a_failing_hash_keeps_a_freed_namespace_id_free(ok: int) -> None:
    cache = RadixCache()
    cache.insert(RadixKey([1, 2, 3], "a"), np.arange(3, dtype=np.int32))
    cache.evict(3)  # namespace "a" had one root child: its id goes to the free list
    assert _radix_tree._namespace_ids(cache) == (2, 1, 1)
    try:
        cache.insert(RadixKey([1, 2, 3], BadHash(ok)), np.arange(3, dtype=np.int32))
    except ValueError:
        assert _radix_tree._namespace_ids(cache) == (2, 1, 1)
        cache._check_invariants()
        # the freed id is reused, not a new one
        cache.insert(RadixKey([4, 5], "b"), np.arange(10, 12, dtype=np.int32))
        assert _radix_tree._namespace_ids(cache) == (2, 0, 2)
    cache._check_invariants()
