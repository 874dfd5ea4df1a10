"""Coverage review (session 24): allocator and memory_pool paths the suite did not run, pinned to
their documented behaviour (typed error, nothing changed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from pymllm.mem_cache import SWATokenToKVPoolAllocator, TokenToKVPoolAllocator
from pymllm.mem_cache.base_prefix_cache import RadixKey
from pymllm.mem_cache.errors import InvalidValueError
from pymllm.mem_cache.memory_pool import KVPool, ReqToTokenPool
from pymllm.mem_cache.radix_cache import RadixCache


@pytest.mark.parametrize("swa", [False, True])
def test_alloc_count_that_is_not_an_exact_int(swa: bool) -> None:
    """_check_alloc_size's slow path (_allocator.pyx ~1048): a numpy int count, and a count
    past int32 (too many: None, nothing taken)."""
    alloc = SWATokenToKVPoolAllocator(64, 64) if swa else TokenToKVPoolAllocator(64)
    got = alloc.alloc(np.int64(5))
    assert got is not None and len(got) == 5
    assert alloc.alloc(2**40) is None
    assert alloc.available_size() == 59
    alloc.free(got)
    assert alloc.available_size() == 64
    alloc._check_invariants()


def test_paged_alloc_count_not_whole_pages_is_refused() -> None:
    alloc = TokenToKVPoolAllocator(64, page_size=4)
    with pytest.raises(InvalidValueError, match="whole number of pages"):
        alloc.alloc(np.int64(6))
    assert alloc.available_size() == 64


def test_free_of_a_deleted_jax_array() -> None:
    """_integer_array's RuntimeError branch (_allocator.pyx ~368)."""
    alloc = TokenToKVPoolAllocator(16)
    slots = alloc.alloc(4)
    donated = jnp.asarray(slots)
    donated.delete()
    with pytest.raises(InvalidValueError, match="deleted"):
        alloc.free(donated)
    assert alloc.available_size() == 12
    alloc.free(slots)
    alloc._check_invariants()


@pytest.mark.parametrize("bad", [[0, 1, 2, 3], [68, 69, 70, 71], [1000, 1001, 1002, 1003]])
def test_paged_insert_of_slots_outside_the_pool(bad) -> None:
    """A paged cache over its own allocator: a value naming the padding page or slots past
    the pool is refused (InvalidValueError), the tree and the allocator unchanged."""
    alloc = TokenToKVPoolAllocator(64, page_size=4)
    cache = RadixCache(page_size=4, token_to_kv_pool_allocator=alloc)
    mine = alloc.alloc(4)
    with pytest.raises(InvalidValueError):
        cache.insert(RadixKey([1, 2, 3, 4]), np.array(bad, dtype=np.int32))
    assert cache.total_size() == 0
    assert alloc.available_size() == 60
    alloc.free(mine)
    cache._check_invariants()
    alloc._check_invariants()


def _one_device_mesh(*names: str) -> Mesh:
    return Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(names)), names)


def test_kvpool_head_axis_without_a_mesh() -> None:
    with pytest.raises(InvalidValueError, match="without a mesh"):
        KVPool(16, 1, 2, 4, head_axis="tp")


def test_kvpool_on_a_mesh() -> None:
    """The mesh path of KVPool.__init__ (memory_pool.py ~718-735), on a one-device mesh."""
    pool = KVPool(16, 2, 2, 4, mesh=_one_device_mesh("tp"), dtype=jnp.float32)
    assert pool.head_axis == "tp"
    assert pool.mem_bytes() == pool.mem_bytes_per_device()  # one device
    pool.set_kv_buffer(0, np.array([1, 2]), jnp.ones((2, 2, 4)), jnp.ones((2, 2, 4)))
    k, _ = pool.get_kv(0, np.array([1, 2, 3]))
    assert np.asarray(k[:2], dtype=np.float32).tolist() == np.ones((2, 2, 4)).tolist()
    assert not np.asarray(k[2], dtype=np.float32).any()


def test_kvpool_mesh_errors() -> None:
    with pytest.raises(InvalidValueError, match="not in"):
        KVPool(16, 1, 2, 4, mesh=_one_device_mesh("tp"), head_axis="x")
    with pytest.raises(InvalidValueError, match="pass head_axis"):
        KVPool(16, 1, 2, 4, mesh=_one_device_mesh("a", "b"))
    pool = KVPool(16, 1, 2, 4, mesh=_one_device_mesh("a", "b"), head_axis="b")
    assert pool.head_axis == "b"


@pytest.mark.parametrize(
    "index, values",
    [
        (slice(1, 3, 0), [1]),  # zero step
        ((1, slice(0, 3)), [1, 2]),  # too few values
        ((np.array([1, 2]), slice(0, 2)), [[1, 2, 3]]),  # cannot broadcast
    ],
    ids=["zero-step", "short", "broadcast"],
)
def test_req_to_token_write_that_does_not_fit(index, values) -> None:
    """ReqToTokenPool.write: InvalidValueError, nothing written (memory_pool.py ~997-1004)."""
    pool = ReqToTokenPool(4, 8)
    pool.write((1, slice(0, 2)), [7, 8])
    before = pool.req_to_token.copy()
    with pytest.raises(InvalidValueError):
        pool.write(index, values)
    assert np.array_equal(pool.req_to_token, before)


def test_kvpool_copy_of_nothing_is_a_no_op() -> None:
    pool = KVPool(8, 1, 1, 2, dtype=jnp.float32)
    pool.set_kv_buffer(0, np.array([1]), jnp.ones((1, 1, 2)), jnp.ones((1, 1, 2)))
    before = np.asarray(pool.get_kv_buffer(0)[0], dtype=np.float32).copy()
    pool.copy(np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int32))
    assert np.array_equal(np.asarray(pool.get_kv_buffer(0)[0], dtype=np.float32), before)
    assert "KVPool(size=8" in repr(pool)


@pytest.mark.parametrize("loc", [[2**64], [2**64, -1], [2**63, 3]])
def test_pool_slot_ids_past_64_bits_are_refused(loc) -> None:
    """_check_slot_range on the object array of exact ints numpy makes of ints past 64 bits
    (_allocator.pyx ~935-937): InvalidValueError naming the slot, nothing written."""
    pool = KVPool(8, 1, 1, 2, dtype=jnp.float32)
    with pytest.raises(InvalidValueError, match="outside"):
        pool.get_kv(0, loc)
    req = ReqToTokenPool(4, 8)
    with pytest.raises(InvalidValueError, match="outside"):
        req.write((1, slice(0, len(loc))), loc)
    assert not req.req_to_token.any()
